"""Run-directory lock: a live holder stops a second run with one line; a stale one (process gone, requeued Slurm
job) is taken over with a log line; the lock is released when the run ends."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess

import pytest

from helpers import TINY, dist_tune
from dist_tune import run_lock
from dist_tune.cluster import ClusterEnv
from dist_tune.errors import UserError
from dist_tune.run_lock import LOCK_NAME, Holder

HOST = socket.gethostname()


def ended_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(run_dir, host: str, pid: int, job: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "slurm_job_id": job}))


def live_error(run_dir, holder: str) -> str:
    return (f"run dir {run_dir} is in use by another run ({holder}); wait for it to end, pick another "
            f"train.run_name, or delete {run_dir / LOCK_NAME} if that run is gone")


def test_a_fresh_run_dir_is_locked_with_host_pid_and_job(tmp_path):
    me = Holder(HOST, 4242, "77")
    path = run_lock.acquire(tmp_path / "run", me)
    assert path == tmp_path / "run" / LOCK_NAME
    assert json.loads(path.read_text()) == {"host": HOST, "pid": 4242, "slurm_job_id": "77"}


@pytest.mark.parametrize("host, job, mine, described", [
    (HOST, None, None, "pid {pid} on " + HOST),                     # same host, process alive
    ("other-node", None, None, "pid {pid} on other-node"),          # another host: cannot check, so respected
    (HOST, "41", "42", "pid {pid} on " + HOST + ", Slurm job 41"),  # another Slurm job still running
])
def test_a_live_holder_is_named_in_one_line_and_its_lock_is_kept(tmp_path, host, job, mine, described):
    run_dir = tmp_path / "run"
    pid = os.getpid()
    write_lock(run_dir, host, pid, job)
    before = (run_dir / LOCK_NAME).read_text()
    with pytest.raises(UserError) as exc:
        run_lock.acquire(run_dir, Holder(HOST, 1, mine))
    assert str(exc.value) == live_error(run_dir, described.format(pid=pid))
    assert (run_dir / LOCK_NAME).read_text() == before


@pytest.mark.parametrize("holder_pid, job, reason", [
    (None, None, "process {pid} on " + HOST + " has ended"),
    ("alive", "42", "Slurm job 42 was requeued"),   # the requeued job starts while its old attempt's lock is left
])
def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog, holder_pid, job, reason):
    run_dir = tmp_path / "run"
    pid = os.getpid() if holder_pid == "alive" else ended_pid()
    write_lock(run_dir, HOST, pid, job)
    me = Holder(HOST, 4242, job)
    with caplog.at_level(logging.WARNING, logger="dist_tune.run_lock"):
        run_lock.acquire(run_dir, me)
    assert run_lock.read_holder(run_dir / LOCK_NAME) == me
    expected = f"taking over the lock of pid {pid} on {HOST}" + (f", Slurm job {job}" if job else "")
    assert f"{expected} ({reason.format(pid=pid)})" in caplog.text


def test_an_unreadable_lock_is_an_error_with_the_fix(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text("")
    with pytest.raises(UserError, match=f"has an unreadable {LOCK_NAME}; if no run uses this directory, delete"):
        run_lock.acquire(run_dir, Holder(HOST, 1))


def test_hold_releases_on_success_and_on_error_but_never_removes_anothers_lock(tmp_path):
    run_dir, env = tmp_path / "run", ClusterEnv()
    with run_lock.hold(run_dir, env):
        assert run_lock.read_holder(run_dir / LOCK_NAME) == Holder.this_process(env)
    assert not (run_dir / LOCK_NAME).exists()
    with pytest.raises(RuntimeError, match="boom"), run_lock.hold(run_dir, env):
        raise RuntimeError("boom")
    assert not (run_dir / LOCK_NAME).exists()
    with run_lock.hold(run_dir, env):
        write_lock(run_dir, "other-node", 1)   # someone took it over meanwhile
    assert run_lock.read_holder(run_dir / LOCK_NAME) == Holder("other-node", 1)


def test_second_train_into_a_locked_run_dir_fails_with_one_line_and_writes_nothing(tmp_path):
    """The lock of a live run (this test process stands in for it) stops `dist-tune train` before it writes."""
    run_dir = tmp_path / "run"
    write_lock(run_dir, HOST, os.getpid(), None)
    proc = dist_tune("train", *TINY, "--train.max_steps=2", f"--train.output_dir={tmp_path}", "--train.run_name=run",
                     check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == "dist-tune: error: " + live_error(run_dir, f"pid {os.getpid()} on {HOST}")
    assert "Traceback" not in proc.stderr
    assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]


def test_train_takes_over_a_dead_runs_lock_and_releases_it_at_the_end(tmp_path):
    run_dir, dead = tmp_path / "run", ended_pid()
    write_lock(run_dir, HOST, dead, None)
    proc = dist_tune("train", *TINY, "--train.max_steps=2", f"--train.output_dir={tmp_path}", "--train.run_name=run",
                     "--checkpoint.save_final=false", timeout=600)
    assert f"taking over the lock of pid {dead} on {HOST} (process {dead} on {HOST} has ended)" in proc.stderr
    assert (run_dir / "summary.json").is_file() and not (run_dir / LOCK_NAME).exists()
