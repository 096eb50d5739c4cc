"""Two ranks and a locked run dir: rank 0 finds the lock held, and every rank stops with the same line (no hang)."""
from __future__ import annotations

import pytest

import json
import os
import socket

from helpers import TINY, dist_tune
from dist_tune.run_lock import LOCK_NAME


@pytest.mark.slow
def test_every_rank_stops_with_the_holder_named_when_the_run_dir_is_locked(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    proc = dist_tune("train", *TINY, "--engine.kind=ddp", "--train.max_steps=2", f"--train.output_dir={tmp_path}",
                     "--train.run_name=run", nproc=2, check=False, timeout=300)
    assert proc.returncode != 0
    line = f"dist-tune: error: run dir {run_dir} is in use by another run (pid {os.getpid()} on {holder['host']})"
    # rank 0 and rank 1 (unless torchrun stops rank 1 first, on rank 0's exit), and nothing else
    errors = [text for text in proc.stderr.splitlines() if text.startswith("dist-tune: error:")]
    assert len(errors) in (1, 2) and all(text.startswith(line) for text in errors), proc.stderr[-4000:]
    assert f"traceback : {line}" in proc.stderr  # and torchrun's failure summary, from the ranks' error files
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]
