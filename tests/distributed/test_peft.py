"""peft methods on single and sharded engines: complete adapter saves, reload, merge, resume, mixed dtypes."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import TINY, dist_tune, read_metrics, seed_overrides
from dist_tune.config import load_config
from dist_tune.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow

STEPS = 10
LR = {"lora": "1e-2", "dora": "1e-2", "ia3": "1.0", "prefix_tuning": "3e-2", "prompt_tuning": "1e-1", "adapter": "2e-1", "freeze": "1e-2"}
ADAPTER_KEYS = {"lora": "lora_", "dora": "lora_magnitude_vector", "ia3": "ia3_", "prefix_tuning": "prompt_embeddings",
                "prompt_tuning": "prompt_embeddings", "adapter": "adaption_"}


def run_args(root, name, method, *extra):
    return [*TINY, f"--peft.method={method}", f"--train.max_steps={STEPS}", f"--train.eval_steps={STEPS // 2}",
            "--train.eval_max_batches=null", f"--optim.lr={LR[method]}", "--log.log_steps=1", f"--train.output_dir={root}",
            f"--train.run_name={name}", *extra]


def base_model():
    cfg = load_config(None, {"model.name_or_path": "tiny-llama", **seed_overrides()})
    return load_model(cfg, load_tokenizer(cfg)).eval()


def check_adapter_dir(final, method):
    """A complete adapter: only adapter tensors, none empty, no copy of the frozen base model."""
    assert (final / "adapter_config.json").is_file()
    tensors = load_file(final / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any(ADAPTER_KEYS[method] in k for k in tensors), sorted(tensors)[:5]
    assert not any(k.endswith(("q_proj.weight", "embed_tokens.weight", "mlp.up_proj.weight")) for k in tensors)
    base_bytes = sum(p.numel() * 4 for p in base_model().parameters())
    assert sum(t.numel() * t.element_size() for t in tensors.values()) < 0.2 * base_bytes


@pytest.mark.parametrize("method", list(ADAPTER_KEYS))
@pytest.mark.parametrize("engine", ["single", "fsdp"])
def test_method_trains_saves_complete_adapter_and_reloads(method, engine, runs_root):
    name = f"{method}-{engine}"
    extra = ["--engine.kind=fsdp"] if engine == "fsdp" else []
    proc = dist_tune("train", *run_args(runs_root, name, method, *extra), nproc=2 if engine == "fsdp" else 1)
    run_dir = runs_root / name
    losses = read_metrics(run_dir)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # the held-out loss falls between the two evals (same rows: ratio 0.993-0.998 over seeds 1, 2, 3 and 42 for
    # every method); the last 3 steps' train loss against the first 3's was other batches: prompt tuning's reached
    # 0.999 at seed 3
    evals = read_metrics(run_dir, "eval/loss")
    assert evals[STEPS] < evals[STEPS // 2], evals
    assert "trainable of" in proc.stderr
    check_adapter_dir(run_dir / "final", method)
    model = PeftModel.from_pretrained(base_model(), run_dir / "final")  # plain peft loads it
    saved, loaded = load_file(run_dir / "final" / "adapter_model.safetensors"), get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    reloaded = json.loads(dist_tune("eval", str(run_dir)).stdout.strip().splitlines()[-1])
    assert reloaded["eval/loss"] == pytest.approx(read_metrics(run_dir, "eval/loss")[STEPS], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merge_adapter_gives_the_unmerged_logits(method, runs_root):
    run_dir = runs_root / f"{method}-single"
    if not run_dir.exists():
        dist_tune("train", *run_args(runs_root, f"{method}-single", method))
    merged_dir = run_dir / "merged"
    dist_tune("merge-adapter", str(run_dir), "--out", str(merged_dir))
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(base_model(), run_dir / "final").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()
    assert not any("lora" in k or "ia3" in k for k in load_file(merged_dir / "model.safetensors"))


def test_fsdp_lora_with_bf16_base_and_fp32_adapters(runs_root):
    name = "lora-fsdp-bf16"
    dist_tune("train", *run_args(runs_root, name, "lora", "--engine.kind=fsdp", "--model.dtype=bfloat16",
                                 "--engine.mixed_precision=bf16"), nproc=2)
    losses = read_metrics(runs_root / name)
    assert sum(losses[s] for s in (8, 9, 10)) < sum(losses[s] for s in (1, 2, 3)), losses
    tensors = load_file(runs_root / name / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_freeze_trains_only_the_last_layer_and_named_modules(runs_root):
    name = "freeze-single"
    dist_tune("train", *run_args(runs_root, name, "freeze", "--peft.train_last_n_layers=1",
                                 "--peft.trainable_modules=[lm_head]"))
    before = base_model().state_dict()
    after = AutoModelForCausalLM.from_pretrained(runs_root / name / "final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") or k.startswith("lm_head") for k in changed), changed
    assert "lm_head.weight" in changed and "model.layers.1.mlp.up_proj.weight" in changed
