"""`dist-tune export` of a DCP checkpoint in one process: only the model's tensors are read, never the optimizer's,
and the output is the HF sharded layout that reloads with the checkpoint's logits."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM

from dist_tune import checkpoint as ckpt
from dist_tune import hf_save
from dist_tune.config import dump_config, load_config
from dist_tune.errors import UserError
from dist_tune.export import export_checkpoint
from dist_tune.models import load_model, load_tokenizer


def dcp_run(tmp_path, **overrides):
    """A run directory whose one checkpoint is a DCP save of a tiny Llama ("trained": moved off its init) beside
    an optimizer state as big as the model."""
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", "checkpoint.max_shard_size": "100KB", **overrides})
    model = load_model(cfg, load_tokenizer(cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run_dir = tmp_path / "run"
    step = ckpt.step_dir(run_dir, 1)
    step.mkdir(parents=True)
    optimizer = {"state": {name: {"exp_avg": torch.randn_like(p)} for name, p in model.named_parameters()}}
    dcp.save({"model": model.state_dict(), "optimizer": optimizer}, checkpoint_id=str(step / "dcp"), no_dist=True)
    (step / ckpt.STATE_FILE).write_text(json.dumps(asdict(ckpt.TrainState(step=1, model_name="tiny-llama"))))
    (step / ckpt.COMPLETE).touch()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir, model


def test_export_reads_only_model_tensors_and_writes_the_sharded_layout(tmp_path, monkeypatch):
    run_dir, model = dcp_run(tmp_path)
    read = []
    original = dcp.FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend(item.dest_index.fqn for item in plan.items)
        return original(self, plan, planner)
    monkeypatch.setattr(dcp.FileSystemReader, "read_data", spy)
    out = export_checkpoint(run_dir, tmp_path / "export")
    assert read and all(fqn.startswith("model.") for fqn in read), sorted(set(read))[:5]
    assert len(set(json.loads((out / hf_save.INDEX).read_text())["weight_map"].values())) > 1
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, model(ids).logits)


def test_export_with_another_model_config_names_the_missing_tensors(tmp_path):
    run_dir, _ = dcp_run(tmp_path)
    (run_dir / "config.yaml").write_text(dump_config(load_config(None, {"model.name_or_path": "small-llama"})))
    with pytest.raises(UserError, match=r"checkpoint '.*step_00000001' lacks \['model.layers.2.input_layernorm.weight', "
                                        r".*\(18 tensors\) of the run's model; export it with the config.yaml it was"):
        export_checkpoint(run_dir, tmp_path / "export")
