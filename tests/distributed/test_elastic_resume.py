"""Elastic resume: a run continued at another world size trains on exactly the samples an uninterrupted run would
(the data position is the global count of samples consumed), with FSDP resharding its state and DeepSpeed loading
its ZeRO checkpoint through a universal conversion."""
from __future__ import annotations

import pytest

from helpers import TINY, dist_tune, read_metrics

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 8
# (ranks, train.max_steps): each phase continues from the previous one's last-step checkpoint
PHASES = [(2, 2), (4, 4), (2, 6)]


def args(root, name, ranks, steps, *extra, engine="fsdp"):
    return [*TINY, f"--engine.kind={engine}", f"--train.micro_batch_size={GLOBAL_BATCH // ranks}",
            f"--train.max_steps={steps}", "--optim.lr=1e-2", "--optim.scheduler=constant", "--log.log_steps=1",
            "--checkpoint.save_final=false", f"--train.output_dir={root}", f"--train.run_name={name}", *extra]


def train_elastic_and_straight(root, name, *extra, engine="fsdp"):
    """Train `name` through PHASES and `name`-straight at 2 ranks in one go; the last phase's stderr."""
    dist_tune("train", *args(root, f"{name}-straight", 2, PHASES[-1][1], *extra, engine=engine), nproc=2)
    for ranks, steps in PHASES:
        proc = dist_tune("train", *args(root, name, ranks, steps, *extra, engine=engine), nproc=ranks)
    return proc.stderr


def assert_same_losses(root, name, rel=1e-4):
    straight, elastic = read_metrics(root / f"{name}-straight"), read_metrics(root / name)
    assert elastic.keys() == straight.keys() == set(range(1, 7))
    for step in straight:  # same global batch of the same samples: same loss, whichever ranks held them
        assert elastic[step] == pytest.approx(straight[step], rel=rel), (step, elastic, straight)
    # the losses tell batches apart far beyond that tolerance, so a skipped or repeated sample would show
    losses = list(straight.values())
    assert min(abs(a - b) for a in losses for b in losses if a != b) > 10 * rel * max(losses)


def test_two_to_four_to_two_ranks_trains_on_the_uninterrupted_runs_samples(runs_root):
    stderr = train_elastic_and_straight(runs_root, "elastic")
    assert "step_00000004 at step 4 (epoch 0, 32 samples in)" in stderr  # 4 steps × 8, whichever ranks
    assert_same_losses(runs_root, "elastic")


@pytest.mark.parametrize("stage,method", [(2, "full"), (3, "lora")])
def test_deepspeed_two_to_four_to_two_ranks_resumes_through_a_universal_checkpoint(runs_root, stage, method):
    name = f"elastic-zero{stage}-{method}"
    stderr = train_elastic_and_straight(runs_root, name, f"--engine.zero_stage={stage}", f"--peft.method={method}",
                                        engine="deepspeed")
    assert "step_00000004 at step 4 (epoch 0, 32 samples in)" in stderr
    # the save limit (2) keeps steps 4 and 6; step 4, saved by 4 ranks, was converted for the last 2-rank phase
    converted = (runs_root / name / "checkpoints").glob("*/deepspeed_universal/state")
    assert [p.parent.parent.name for p in converted] == ["step_00000004"]
    assert_same_losses(runs_root, name, rel=1e-5)  # LoRA's losses lie closer together; ZeRO matches to 1e-7


def test_fsdp_checkpoint_resumes_with_another_shard_unit(runs_root):
    """Block units for 2 steps, then linear units to step 4: the same losses as 4 steps with block units (DCP keys
    are parameter names, whatever the FSDP units)."""
    lora = ("--peft.method=lora", "--checkpoint.save_steps=2")
    dist_tune("train", *args(runs_root, "units-straight", 2, 4, *lora), nproc=2)
    dist_tune("train", *args(runs_root, "units", 2, 2, *lora), nproc=2)
    proc = dist_tune("train", *args(runs_root, "units", 2, 4, *lora, "--engine.shard_unit=linear"), nproc=2)
    # 2 blocks × (7 projections + the block), the untied embedding and head, the root
    assert "resumed from" in proc.stderr and "19 units (shard_unit linear)" in proc.stderr
    straight, resumed = read_metrics(runs_root / "units-straight"), read_metrics(runs_root / "units")
    assert resumed.keys() == straight.keys() == {1, 2, 3, 4}
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
