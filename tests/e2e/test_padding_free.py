"""Padding-free micro-batches and target-only logits through the CLI: the same training as padded rows."""
from __future__ import annotations

import json

import pytest
import yaml

from helpers import TINY, dist_tune, read_metrics

STEPS = 12
COMMON = [*TINY, f"--train.max_steps={STEPS}", "--optim.lr=1e-2", f"--train.eval_steps={STEPS}", "--log.log_steps=1",
          "--train.eval_max_batches=null"]
VARIANTS = {
    "padded": ["--data.padding_free=false", "--train.target_logits_only=false"],
    "padded_target_logits": ["--data.padding_free=false"],
    "padding_free": ["--data.padding_free=true"],
    "padding_free_all_logits": ["--data.padding_free=true", "--train.target_logits_only=false"],
    "default": [],
}


class Runs(dict):
    """Each variant's (run dir, summary), trained on first use, so the quick tier runs only the variants it reads."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        proc = dist_tune("train", *COMMON, *VARIANTS[name], f"--train.output_dir={self.root}",
                         f"--train.run_name=pf-{name}")
        self[name] = (self.root / f"pf-{name}", json.loads(proc.stdout.strip().splitlines()[-1]))
        return self[name]


@pytest.fixture(scope="module")
def runs(runs_root):
    return Runs(runs_root)


@pytest.mark.slow
def test_every_variant_trains_exactly_like_padded_rows(runs):
    reference = read_metrics(runs["padded"][0])
    eval_reference = runs["padded"][1]["final_eval_loss"]
    assert reference[STEPS] < 0.8 * reference[1]
    for name in VARIANTS:
        run_dir, summary = runs[name]
        losses = read_metrics(run_dir)
        assert losses.keys() == reference.keys(), name
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), (name, step)
        assert summary["final_eval_loss"] == pytest.approx(eval_reference, rel=1e-4), name


@pytest.mark.slow
def test_the_default_run_is_the_padding_free_one(runs):
    run_dir, _ = runs["default"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["padding_free"] is True
    assert read_metrics(run_dir) == read_metrics(runs["padding_free"][0])


def test_padding_free_counts_examples_not_rows(runs):
    padded = read_metrics(runs["padded"][0], "train/samples_per_s")
    flat = read_metrics(runs["padding_free"][0], "train/samples_per_s")
    tokens_padded = read_metrics(runs["padded"][0], "train/tokens_per_s")
    tokens_flat = read_metrics(runs["padding_free"][0], "train/tokens_per_s")
    for step in padded:  # same examples and real tokens per step: the ratio of the rates is the ratio of the times
        assert flat[step] / tokens_flat[step] == pytest.approx(padded[step] / tokens_padded[step], rel=1e-6)


def test_eval_command_reproduces_the_padding_free_runs_eval_loss(runs):
    run_dir, summary = runs["padding_free"]
    proc = dist_tune("eval", str(run_dir))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["eval/loss"] == pytest.approx(
        summary["final_eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_packed_rows_train_and_reload(runs_root):
    name = "pf-packed"
    proc = dist_tune("train", *COMMON, "--data.pack=true", f"--train.output_dir={runs_root}", f"--train.run_name={name}")
    losses = read_metrics(runs_root / name)
    assert losses[STEPS] < 0.8 * losses[1]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    evaluated = json.loads(dist_tune("eval", str(runs_root / name)).stdout.strip().splitlines()[-1])
    assert evaluated["eval/loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)


def test_default_run_of_a_sliding_window_model_is_padded_and_says_why(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig

    from dist_tune.config import Config
    from dist_tune.models import load_tokenizer

    tokenizer = load_tokenizer(Config())
    model_dir = tmp_path / "mistral"
    AutoModelForCausalLM.from_config(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=16)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    proc = dist_tune("train", *TINY, f"--model.name_or_path={model_dir}", "--train.max_steps=2",
                     f"--train.output_dir={tmp_path}", "--train.run_name=window")
    assert ("data.padding_free=auto is off: the model's sliding attention window (16 tokens) is shorter than "
            "data.max_length=64") in proc.stderr
    assert yaml.safe_load((tmp_path / "window" / "config.yaml").read_text())["data"]["padding_free"] is False
