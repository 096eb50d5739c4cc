"""Quick-tier parity: DDP, FSDP2 and ZeRO-3 on 2 gloo ranks, with the LM head and loss in chunks of 16 positions,
give the single-device losses of the whole logits for a few steps (the slow matrix in test_engines.py adds every
ZeRO stage, LoRA, kill-and-resume and exports)."""
from __future__ import annotations

import pytest

from helpers import TINY, dist_tune, read_metrics

STEPS = 3
ENGINES = {"ddp": ["--engine.kind=ddp"], "fsdp": ["--engine.kind=fsdp"],
           "zero3": ["--engine.kind=deepspeed", "--engine.zero_stage=3"]}


def common(root, name):
    return [*TINY, f"--train.max_steps={STEPS}", "--log.log_steps=1", "--optim.lr=3e-3", "--train.eval_steps=null",
            "--checkpoint.save_final=false", f"--train.output_dir={root}", f"--train.run_name={name}"]


@pytest.fixture(scope="module")
def reference(runs_root):
    dist_tune("train", *common(runs_root, "quick-single"), "--train.micro_batch_size=8", "--train.chunked_loss=false")
    return read_metrics(runs_root / "quick-single")


@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_ranks_match_single_device_losses(runs_root, reference, engine):
    name = f"quick-{engine}"
    dist_tune("train", *common(runs_root, name), *ENGINES[engine], "--train.ce_chunk_tokens=16", nproc=2)
    got = read_metrics(runs_root / name)
    assert got.keys() == reference.keys() == set(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), (engine, step)
