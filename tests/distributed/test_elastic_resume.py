"""Elastic resume: a run continued at another world size trains on exactly the samples an uninterrupted run would
(the data position is the global count of samples consumed), with FSDP resharding its state; a DeepSpeed
checkpoint at another world size stops with one line before any model is built."""
from __future__ import annotations

import pytest

from helpers import TINY, dist_tune, read_metrics

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
# (ranks, train.max_steps): each phase continues from the previous one's last-step checkpoint
PHASES = [(2, 2), (4, 4), (2, 6)]


def args(root, name, ranks, steps, engine="fsdp"):
    return [*TINY, f"--engine.kind={engine}", f"--train.micro_batch_size={GLOBAL_BATCH // ranks}",
            f"--train.max_steps={steps}", "--optim.lr=1e-2", "--optim.scheduler=constant", "--log.log_steps=1",
            "--checkpoint.save_final=false", f"--train.output_dir={root}", f"--train.run_name={name}"]


def test_two_to_four_to_two_ranks_trains_on_the_uninterrupted_runs_samples(runs_root):
    dist_tune("train", *args(runs_root, "elastic-straight", 2, PHASES[-1][1]), nproc=2)
    for ranks, steps in PHASES:
        proc = dist_tune("train", *args(runs_root, "elastic", ranks, steps), nproc=ranks)
    assert "step_00000004 at step 4 (epoch 0, 32 samples in)" in proc.stderr  # 4 steps × 8, whichever ranks
    straight, elastic = read_metrics(runs_root / "elastic-straight"), read_metrics(runs_root / "elastic")
    assert elastic.keys() == straight.keys() == set(range(1, 7))
    for step in straight:  # same global batch of the same samples: same loss, whichever ranks held them
        assert elastic[step] == pytest.approx(straight[step], rel=1e-4), (step, elastic, straight)
    # the losses tell batches apart far beyond that tolerance, so a skipped or repeated sample would show
    losses = list(straight.values())
    assert min(abs(a - b) for a in losses for b in losses if a != b) > 1e-3 * max(losses)


def test_deepspeed_resume_at_another_world_size_stops_before_building_the_model(runs_root):
    dist_tune("train", *args(runs_root, "zero", 2, 1, engine="deepspeed"), nproc=2)
    proc = dist_tune("train", *args(runs_root, "zero", 1, 2, engine="deepspeed"), check=False)
    assert proc.returncode != 0
    step = runs_root / "zero" / "checkpoints" / "step_00000001"
    assert (f"dist-tune: error: checkpoint {step} was saved by DeepSpeed on 2 ranks and this run has 1; ZeRO "
            "checkpoints resume only at the world size that saved them: launch 2 ranks, or start fresh with "
            "train.resume=none") in proc.stderr
    assert "Traceback" not in proc.stderr
