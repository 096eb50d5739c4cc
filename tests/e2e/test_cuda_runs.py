"""On a CUDA GPU (marked gpu, skipped elsewhere): padding-free rows train like padded rows through the CUDA attention
path, the run reports MFU and device memory, and `generate` answers from the trained run."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, dist_tune, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 6
COMMON = [*TINY, f"--train.max_steps={STEPS}", "--optim.lr=1e-2", "--log.log_steps=1", "--data.validation_split=0",
          "--model.dtype=float32", "--engine.mixed_precision=fp32"]


@pytest.fixture(scope="module")
def runs(runs_root):
    """{padding_free: run dir} for padded and padding-free rows, otherwise the same run on the GPU."""
    out = {}
    for padding_free in (False, True):
        name = f"cuda-padding-free-{padding_free}"
        dist_tune("train", *COMMON, f"--data.padding_free={str(padding_free).lower()}",
                  f"--train.output_dir={runs_root}", f"--train.run_name={name}")
        out[padding_free] = runs_root / name
    return out


def test_padding_free_rows_train_like_padded_rows_on_cuda(runs):
    padded, flat = read_metrics(runs[False]), read_metrics(runs[True])
    assert flat.keys() == padded.keys() == set(range(1, STEPS + 1))
    assert flat[1] == pytest.approx(padded[1], rel=1e-3)  # same weights, same batch: only the attention path differs
    for step in padded:
        assert flat[step] == pytest.approx(padded[step], rel=1e-2), step


def test_a_cuda_run_reports_mfu_and_device_memory(runs):
    rows = read_metrics(runs[True], "train/mfu")
    assert rows.keys() == set(range(1, STEPS + 1)) and all(0 < mfu < 1 for mfu in rows.values())
    first = json.loads((runs[True] / "metrics.jsonl").read_text().splitlines()[0])
    assert any(key.startswith("train/peak_mem") and first[key] > 0 for key in first), first


def test_greedy_generate_from_a_cuda_trained_run_is_repeatable(runs):
    answers = [dist_tune("generate", str(runs[True]), "--prompt", "Name three primary colors.", "--max_new_tokens=8",
                         f"--seed={seed}").stdout for seed in (0, 1)]
    assert answers[0] == answers[1]
