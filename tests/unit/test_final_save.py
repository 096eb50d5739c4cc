"""export.export_final in one process: a sharding engine's peft save gathers only the adapter tensors and peft's own
save writes them (every peft method); a full save is transformers' sharded layout and reloads with the same logits."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dist_tune import hf_save
from dist_tune.cluster import ClusterEnv
from dist_tune.config import load_config
from dist_tune.export import export_final
from dist_tune.engines.single import SingleEngine
from dist_tune.models import load_model, load_tokenizer
from dist_tune.optim import optimizer_factory, scheduler_factory
from dist_tune.peft import build_model


class ShardingEngine(SingleEngine):
    """A single-device engine that saves as the sharded engines do, recording which tensors it gathers."""
    shards_state = True

    def __init__(self, *args):
        super().__init__(*args)
        self.gathered: list[str] = []

    def full_tensor(self, name, tensor):
        def gather():
            self.gathered.append(name)
            return tensor.detach()
        return hf_save.FullTensor(name, tuple(tensor.shape), tensor.dtype, gather)


def trained_engine(method: str, engine_class=ShardingEngine, **overrides):
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", "peft.method": method, **overrides})
    tokenizer = load_tokenizer(cfg)
    engine = engine_class(cfg, ClusterEnv(), torch.device("cpu"))
    engine.prepare(build_model(cfg, tokenizer, torch.device("cpu")), optimizer_factory(cfg.optim),
                   scheduler_factory(cfg.optim, 10))
    with torch.no_grad():  # a "trained" model: every trainable tensor moved away from its initial value
        for p in engine.unwrap().parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return engine, tokenizer


IDS = torch.arange(3, 35).reshape(2, 16)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix_tuning", "prompt_tuning", "adapter"])
def test_sharded_peft_save_gathers_only_the_adapter_and_reloads_with_the_same_logits(method, tmp_path):
    engine, tokenizer = trained_engine(method)
    export_final(engine, tokenizer, tmp_path)
    model = engine.unwrap().eval()
    assert engine.gathered == [n for n, p in model.named_parameters() if p.requires_grad]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(model)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    base = load_model(engine.cfg, tokenizer).eval()
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base, tmp_path).eval()(IDS).logits
        assert torch.equal(reloaded, model(IDS).logits)


def test_full_save_is_the_sharded_layout_save_pretrained_writes(tmp_path):
    engine, tokenizer = trained_engine("full", SingleEngine, **{"checkpoint.max_shard_size": "100KB"})
    export_final(engine, tokenizer, tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    reloaded.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    mine = json.loads((tmp_path / "final" / hf_save.INDEX).read_text())
    assert mine == json.loads((tmp_path / "theirs" / hf_save.INDEX).read_text())
    assert len(set(mine["weight_map"].values())) > 1
    assert json.loads((tmp_path / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, engine.unwrap().eval()(IDS).logits)


def test_a_stale_single_file_save_cannot_shadow_a_sharded_one(tmp_path):
    engine, tokenizer = trained_engine("full", SingleEngine, **{"checkpoint.max_shard_size": "100KB"})
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"stale")
    export_final(engine, tokenizer, tmp_path / "final")
    assert not (tmp_path / "final" / "model.safetensors").exists()
