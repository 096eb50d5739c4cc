"""Parity of every engine with single-device training (2 gloo ranks, fp32), resume after a SIGKILL,
per-rank memory of sharded engines, and exports that reload in plain transformers. The engines run the default
padding-free rows and the LM head and loss in chunks of 16 positions, the single-device reference padded rows and
the whole logits, so parity also shows the two give the same training."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import TINY, dist_tune, read_metrics, seed_overrides
from dist_tune.config import load_config
from dist_tune.models import load_model, load_tokenizer

pytestmark = pytest.mark.slow

# Loss trajectories agree to this relative tolerance (fp32; reduction order differs between engines).
RTOL = 1e-4
STEPS, SAVE, KILL = 8, 4, 6
ENGINES = {
    "ddp": ["--engine.kind=ddp"],
    "fsdp": ["--engine.kind=fsdp"],
    "zero1": ["--engine.kind=deepspeed", "--engine.zero_stage=1"],
    "zero2": ["--engine.kind=deepspeed", "--engine.zero_stage=2"],
    "zero3": ["--engine.kind=deepspeed", "--engine.zero_stage=3"],
    "zero3_offload": ["--engine.kind=deepspeed", "--engine.zero_stage=3", "--engine.offload_optimizer=true",
                      "--engine.offload_params=true"],
}


METHODS = {"full": [], "lora": ["--peft.method=lora", "--optim.lr=1e-2"]}


def common(root, name):
    return [*TINY, f"--train.max_steps={STEPS}", f"--checkpoint.save_steps={SAVE}", "--log.log_steps=1",
            "--optim.lr=3e-3", "--train.grad_accum=2", f"--train.eval_steps={STEPS}",
            "--train.eval_max_batches=null", f"--train.output_dir={root}", f"--train.run_name={name}"]


def load_exported(path):
    """A plain transformers model, or the tiny base model + the exported peft adapter."""
    if (path / "adapter_config.json").is_file():
        cfg = load_config(None, {"model.name_or_path": "tiny-llama", **seed_overrides()})
        return PeftModel.from_pretrained(load_model(cfg, load_tokenizer(cfg)), path).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=list(METHODS))
def method(request):
    return request.param


@pytest.fixture(scope="module")
def reference(runs_root, method):
    """Single device, micro-batch 8 of padded rows: the same 16 sequences per step as 2 ranks × micro-batch 4."""
    name = f"single-{method}"
    dist_tune("train", *common(runs_root, name), *METHODS[method], "--train.micro_batch_size=8",
              "--data.padding_free=false", "--train.chunked_loss=false")
    return runs_root / name


@pytest.fixture(scope="module", params=list(ENGINES))
def engine_run(request, runs_root, method):
    """Each engine on 2 ranks, SIGKILLed after step 6 (last checkpoint: step 4), then resumed to the end."""
    name = f"{request.param}-{method}"
    args = [*common(runs_root, name), *ENGINES[request.param], *METHODS[method], "--train.ce_chunk_tokens=16"]
    killed = dist_tune("train", *args, nproc=2, env={"DIST_TUNE_KILL_AT_STEP": str(KILL)}, check=False)
    assert killed.returncode != 0
    assert read_metrics(runs_root / name).keys() == set(range(1, KILL + 1))
    resumed = dist_tune("train", *args, nproc=2)
    assert f"step_{SAVE:08d}" in resumed.stderr and "resumed from" in resumed.stderr
    return request.param, runs_root / name, json.loads(resumed.stdout.strip().splitlines()[-1])


def test_loss_trajectory_matches_single_device_after_kill_and_resume(engine_run, reference):
    _, run_dir, _ = engine_run
    expected, got = read_metrics(reference), read_metrics(run_dir)
    assert got.keys() == set(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), (step, got[step], expected[step])
    assert got[STEPS] < got[1]


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_padded_rows_on_parallel_engines_match_padded_single_device(engine, runs_root, method, reference):
    """data.padding_free=false: each rank's micro-batch is padded rows again; losses equal padded single device."""
    name = f"{engine}-{method}-padded"
    dist_tune("train", *common(runs_root, name), *ENGINES[engine], *METHODS[method], "--data.padding_free=false",
              "--checkpoint.save_steps=null", nproc=2)
    expected, got = read_metrics(reference), read_metrics(runs_root / name)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """The tiny-llama shape with its input embedding and output head tied, saved as a local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_tune.models import PRESETS

    cfg = load_config(None, {"model.name_or_path": "tiny-llama"})
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**PRESETS["tiny-llama"], vocab_size=len(tokenizer), tie_word_embeddings=True,
                                         pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("tied-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_chunked_head_with_lora_on_tied_head_matches_the_whole_logits(engine, runs_root, tied_llama):
    """LoRA on q, v and the tied LM head, padding-free rows, 2 ranks: the head and loss in chunks of 16 positions
    give the losses of the whole logits to 1e-5 at every step (the gradients too, or later steps would part)."""
    losses = {}
    for chunked in ("--train.ce_chunk_tokens=16", "--train.chunked_loss=false"):
        name = f"{engine}-tied-lora-head-{chunked.split('.')[1].split('=')[0]}"
        dist_tune("train", *common(runs_root, name), *ENGINES[engine], f"--model.name_or_path={tied_llama}",
                  "--peft.method=lora", "--peft.target_modules=[q_proj,v_proj,lm_head]", "--optim.lr=1e-2",
                  "--checkpoint.save_steps=null", "--train.max_steps=4", chunked, nproc=2)
        losses[chunked] = read_metrics(runs_root / name)
    chunked, whole = losses.values()
    assert chunked.keys() == whole.keys() == set(range(1, 5))
    for step in whole:
        assert chunked[step] == pytest.approx(whole[step], rel=1e-5), (step, chunked[step], whole[step])
    assert whole[4] < whole[1]


def test_final_export_reloads_with_the_in_training_eval_loss(engine_run):
    _, run_dir, summary = engine_run
    in_training = read_metrics(run_dir, "eval/loss")[STEPS]
    reloaded = json.loads(dist_tune("eval", str(run_dir)).stdout.strip().splitlines()[-1])
    assert reloaded["eval/loss"] == pytest.approx(in_training, rel=1e-5)
    assert summary["final_eval_loss"] == pytest.approx(in_training, rel=1e-9)


def test_checkpoint_export_matches_single_device_weights(engine_run, reference):
    name, run_dir, _ = engine_run
    ref = reference / "export"
    if not ref.exists():
        dist_tune("export", str(reference), "--out", str(ref))
    out = run_dir / "export"
    dist_tune("export", str(run_dir), "--out", str(out))
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        mine, theirs = load_exported(out)(ids).logits, load_exported(ref)(ids).logits
    assert torch.allclose(mine, theirs, atol=2e-2), (name, (mine - theirs).abs().max())
    assert (mine - theirs).abs().mean() < 2e-3


# Share of a full replica's (parameter, optimizer) bytes that one of 2 ranks holds. DeepSpeed keeps an fp32
# master copy of the trainable weights beside Adam's m and v: 1.5 × the optimizer state, then partitioned.
STATE_SHARE = {"ddp": (1.0, 1.0), "fsdp": (0.5, 0.5), "zero1": (1.0, 0.75), "zero2": (1.0, 0.75),
               "zero3": (0.5, 0.75), "zero3_offload": (0.5, 0.75)}


def test_sharded_engines_hold_their_share_of_the_model_state_per_rank(engine_run, reference):
    name, _, summary = engine_run
    replica = json.loads((reference / "summary.json").read_text())  # single device: what every DDP rank holds
    param_share, optim_share = STATE_SHARE[name]
    assert summary["param_bytes"] == pytest.approx(param_share * replica["param_bytes"], rel=0.02)
    assert summary["optim_bytes"] == pytest.approx(optim_share * replica["optim_bytes"], rel=0.02)


def test_fsdp_starts_from_a_local_pretrained_directory(runs_root):
    """Ranks > 0 build the architecture on meta and receive rank 0's loaded weights."""
    source = runs_root / "pretrained"
    dist_tune("train", *common(runs_root, "pretrained"), "--train.max_steps=3", "--checkpoint.save_steps=null")
    args = [*TINY, f"--model.name_or_path={source / 'final'}", "--train.max_steps=2", "--log.log_steps=1",
            "--train.micro_batch_size=8", f"--train.output_dir={runs_root}"]
    dist_tune("train", *args, "--train.run_name=from-dir-single")
    dist_tune("train", *args, "--train.micro_batch_size=4", "--engine.kind=fsdp", "--train.run_name=from-dir-fsdp",
              nproc=2)
    single, fsdp = read_metrics(runs_root / "from-dir-single"), read_metrics(runs_root / "from-dir-fsdp")
    assert fsdp[1] == pytest.approx(single[1], rel=1e-5)
    assert single[1] < 7.0  # the trained weights were loaded, not a fresh init (≈ ln(1606) = 7.38)


def test_bf16_zero2_saves_the_fp32_master_weights(runs_root):
    """Under bf16 DeepSpeed trains a bf16 copy of the module against fp32 master weights; final/ must hold the
    master in the model's float32 (a bf16 copy cast up would have every value exactly representable in bf16)."""
    name = "zero2-bf16"
    dist_tune("train", *common(runs_root, name), *ENGINES["zero2"], "--engine.mixed_precision=bf16",
              "--train.max_steps=3", "--checkpoint.save_steps=null", nproc=2)
    saved = load_file(runs_root / name / "final" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    weights = torch.cat([t.flatten() for k, t in saved.items() if k.endswith("proj.weight")])
    assert (weights != weights.bfloat16().float()).float().mean() > 0.9
