"""W&B never stops training: an unreachable server falls back to an offline run within a bounded time."""
from __future__ import annotations

import re
from datetime import datetime

import pytest

from helpers import TINY, dist_tune, free_port, read_metrics


def clock(line: str) -> datetime:
    return datetime.strptime(line.split()[0], "%H:%M:%S")


@pytest.mark.slow  # about 35 s: the fallback waits for wandb's init timeout
def test_unreachable_wandb_server_falls_back_to_offline(tmp_path):
    """WANDB_API_KEY set (and WANDB_MODE empty), the server a closed local port, wandb not silenced (its login
    check waits too): the run finishes, with one warning that gives the `wandb sync` command for the offline run
    it wrote instead, within 30 s of the run's start line."""
    run_dir = tmp_path / "runs" / "unreachable"
    proc = dist_tune("train", *TINY, "--log.wandb.mode=auto", "--train.max_steps=2", "--checkpoint.save_final=false",
                     f"--train.output_dir={tmp_path / 'runs'}", "--train.run_name=unreachable",
                     f"--data.cache_dir={tmp_path / 'cache'}",
                     env={"WANDB_API_KEY": "f" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",
                          "WANDB_MODE": "", "WANDB_SILENT": "false"})
    (warning,) = [line for line in proc.stderr.splitlines() if "dist_tune" in line and "W&B" in line]
    (offline,) = run_dir.glob("wandb/offline-run-*")
    assert re.search(r"WARNING dist_tune: \[rank 0\] W&B unreachable \(.*\); logging offline instead, upload later "
                     rf"with `wandb sync {re.escape(str(offline))}`$", warning), warning
    (start_line,) = [line for line in proc.stderr.splitlines() if "] run dir " in line]
    assert (clock(warning) - clock(start_line)).total_seconds() < 30  # W&B init, from the run's start line
    assert list(offline.glob("run-*.wandb"))
    assert sorted(read_metrics(run_dir)) == [1, 2]
