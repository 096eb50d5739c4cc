"""dist_tune.preemption: real signals become a stop flag all ranks agree on; rank 0 requeues under Slurm."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dist_tune import preemption
from dist_tune.cluster import ClusterEnv
from dist_tune.preemption import PreemptionHandler

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    preemption._early_signal = None
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    preemption._early_signal = None


def deliver(signum: int, handler: PreemptionHandler) -> None:
    """Send `signum` to this process and wait until the Python-level handler ran (between bytecodes)."""
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 5
    while handler.signal_name is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_real_signal_sets_the_stop_flag_and_does_not_kill(signum):
    handler = PreemptionHandler(ClusterEnv(), CPU)
    assert not handler.should_stop() and handler.signal_name is None
    deliver(signum, handler)
    assert handler.signal_name == signal.Signals(signum).name
    assert handler.should_stop() and handler.should_stop()   # sticky


def test_sigusr1_during_start_up_is_kept_for_the_handler():
    """USR1 while the model loads (before the handler exists) is neither lost nor fatal; SIGTERM is left alone."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)      # as inherited from the sbatch templates
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert preemption.capture_early_signal()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    handler = PreemptionHandler(ClusterEnv(), CPU)
    assert handler.signal_name == "SIGUSR1" and handler.should_stop()
    assert PreemptionHandler(ClusterEnv(), CPU).signal_name is None   # taken over once


def test_capture_leaves_a_handler_someone_else_installed():
    def mine(signum, frame):
        pass

    signal.signal(signal.SIGUSR1, mine)
    assert not preemption.capture_early_signal()
    assert signal.getsignal(signal.SIGUSR1) is mine


def test_requeue_runs_scontrol_on_rank_0_inside_slurm_only(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(preemption.subprocess, "run", fake_run)
    assert PreemptionHandler(ClusterEnv(), CPU).requeue() is False
    assert PreemptionHandler(ClusterEnv(rank=1, world_size=2, slurm_job_id="42"), CPU).requeue() is False
    assert calls == []
    assert PreemptionHandler(ClusterEnv(world_size=2, slurm_job_id="42"), CPU).requeue() is True
    assert [cmd[1:] for cmd in calls] == [["requeue", "42"]]


def test_requeue_failure_is_logged_not_raised(monkeypatch, caplog):
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "scontrol: error: Requested operation is presently disabled")

    monkeypatch.setattr(preemption.subprocess, "run", failing)
    assert PreemptionHandler(ClusterEnv(slurm_job_id="42"), CPU).requeue() is False
    assert "presently disabled" in caplog.text

    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(preemption.subprocess, "run", missing)
    assert PreemptionHandler(ClusterEnv(slurm_job_id="42"), CPU).requeue() is False


_TWO_RANK_SCRIPT = r"""
import os, signal, time
import torch
from dist_tune import cluster, preemption, process_group
env = cluster.detect()
process_group.init_distributed(env, torch.device("cpu"), "gloo", timeout_minutes=1)
h = preemption.PreemptionHandler(env, torch.device("cpu"))
if env.rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
stops = [h.should_stop() for _ in range(2)]
print(f"rank{env.rank} signal={h.signal_name} stops={stops}", flush=True)
process_group.destroy_distributed()
"""


def test_should_stop_agrees_across_two_ranks(tmp_path):
    """Only rank 1 gets SIGUSR1; both ranks see should_stop() True in the same step (gloo, 2 procs)."""
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANK_SCRIPT)
    port = 20000 + os.getpid() % 20000
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    procs = []
    for r in range(2):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank0 signal=None stops=[True, True]" in outs[0], outs
    assert "rank1 signal=SIGUSR1 stops=[True, True]" in outs[1], outs
