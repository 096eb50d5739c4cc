"""Faults under torchrun: a rank SIGKILLed mid-run under `torchrun --max-restarts=1` is restarted with its peers,
resumes from the last complete checkpoint and finishes with the same losses as an uninterrupted run
(2 gloo ranks, DDP, tiny model, fp32)."""
from __future__ import annotations

import json

import pytest

from helpers import TINY, dist_tune, read_metrics

pytestmark = pytest.mark.slow

STEPS, SAVE = 10, 3
RTOL = 1e-6


def args(root, name):
    return [*TINY, "--engine.kind=ddp", f"--train.max_steps={STEPS}", f"--checkpoint.save_steps={SAVE}",
            "--log.log_steps=1", "--optim.lr=3e-3", "--train.grad_accum=2", "--checkpoint.save_final=false",
            f"--train.output_dir={root}", f"--train.run_name={name}"]


@pytest.fixture(scope="module")
def uninterrupted(runs_root):
    dist_tune("train", *args(runs_root, "faults-straight"), nproc=2, torchrun_args=["--max-restarts=1"])
    return read_metrics(runs_root / "faults-straight")


# Rendezvous: "static" is plain `torchrun --master_addr/--master_port` (conftest's), "standalone" is what
# launch/torchrun_local.sh runs. Both keep one store across restarts (see process_group._restart_store).
RENDEZVOUS = {"static": [], "standalone": ["--standalone"]}
# (rank killed, step after which it dies, checkpoint the restart resumes from, rendezvous)
FAULTS = [(1, 5, 3, "static"),      # a non-zero rank, two steps of work lost since the step-3 checkpoint
          (0, 6, 6, "standalone")]  # rank 0, right after it finished writing the step-6 checkpoint


@pytest.mark.parametrize("rank,kill_at,resume_at,rdzv", FAULTS,
                         ids=[f"rank{r}-step{s}-{z}" for r, s, _, z in FAULTS])
def test_sigkilled_rank_restarts_and_matches_uninterrupted_run(runs_root, uninterrupted, rank, kill_at, resume_at,
                                                               rdzv):
    name = f"faults-rank{rank}-step{kill_at}"
    run_dir = runs_root / name
    proc = dist_tune("train", *args(runs_root, name), nproc=2, torchrun_args=[*RENDEZVOUS[rdzv], "--max-restarts=1"],
                     env={"DIST_TUNE_KILL_AT_STEP": str(kill_at), "DIST_TUNE_KILL_RANK": str(rank)})
    assert (run_dir / f"fault_injected_at_{kill_at}").is_file()  # the fault really happened, once
    assert f"exitcode: -9) local_rank: {rank}" in proc.stderr, proc.stderr[-3000:]  # SIGKILL seen by torchrun
    assert "resumed from" in proc.stderr and f"step_{resume_at:08d}" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == STEPS and summary["stopped"] == "completed" and summary["skipped_steps"] == 0
    got = read_metrics(run_dir)
    assert got.keys() == uninterrupted.keys() == set(range(1, STEPS + 1))  # replayed steps logged once
    assert got[STEPS] == pytest.approx(uninterrupted[STEPS], rel=RTOL)
    for step in uninterrupted:
        assert got[step] == pytest.approx(uninterrupted[step], rel=RTOL), (step, got[step], uninterrupted[step])
    eval_got, eval_ref = read_metrics(run_dir, "eval/loss"), read_metrics(runs_root / "faults-straight", "eval/loss")
    assert eval_got[STEPS] == pytest.approx(eval_ref[STEPS], rel=RTOL)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step_00000009", "step_00000010"]  # save_total_limit=2 (the last step saved too), nothing partial
