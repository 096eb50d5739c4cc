"""One run per run directory: rank 0 holds ``run.lock`` (host, pid, Slurm job id) while the run writes there.

Two runs in one directory (a job resubmitted while the old one still runs) would resume from each other's
checkpoints and interleave metrics and final weights. A lock whose holder is gone (same host, process
ended) or is an earlier attempt of this same Slurm job (requeue) is stale and taken over; any other holder
stops the new run with one line naming it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from dist_tune.cluster import ClusterEnv
from dist_tune.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job_id: str | None = None

    @classmethod
    def this_process(cls, env: ClusterEnv) -> Holder:
        return cls(socket.gethostname(), os.getpid(), env.slurm_job_id)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else "")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_reason(holder: Holder, me: Holder) -> str | None:
    """Why `holder`'s lock no longer guards a live run, or None when it may (then it must be respected)."""
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        return f"Slurm job {holder.slurm_job_id} was requeued"
    if holder.host == me.host and not pid_alive(holder.pid):
        return f"process {holder.pid} on {holder.host} has ended"
    return None


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; None when the file is missing or not a lock this module wrote."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _create(path: Path, me: Holder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(asdict(me)) + "\n")
    return True


def acquire(run_dir: Path, me: Holder) -> Path:
    """Create ``run_dir/run.lock`` for `me`, taking over a stale one; UserError when a live run holds it."""
    path = run_dir / LOCK_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    if _create(path, me):
        return path
    holder = read_holder(path)
    if holder is None:
        raise UserError(f"run dir {run_dir} has an unreadable {LOCK_NAME}; if no run uses this directory, "
                        f"delete {path}")
    reason = stale_reason(holder, me)
    if reason is None:
        raise UserError(f"run dir {run_dir} is in use by another run ({holder.describe()}); wait for it to end, "
                        f"pick another train.run_name, or delete {path} if that run is gone")
    log.warning("run dir %s: taking over the lock of %s (%s)", run_dir, holder.describe(), reason)
    path.unlink(missing_ok=True)
    if not _create(path, me):
        raise UserError(f"run dir {run_dir} was locked by another run starting at the same time; "
                        "pick another train.run_name")
    return path


def release(path: Path, me: Holder) -> None:
    """Remove the lock if it is still `me`'s."""
    if read_holder(path) == me:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(run_dir: Path, env: ClusterEnv) -> Iterator[None]:
    """Rank 0 holds the run-dir lock for the block; when it cannot, every rank raises the same UserError.
    A run dir this call created is removed again if the block left it empty (a run stopped by bad input)."""
    me = Holder.this_process(env)
    created = not run_dir.exists()
    error = None
    if env.rank == 0:
        try:
            path = acquire(run_dir, me)
        except UserError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot lock run dir {run_dir} ({exc.strerror}); check train.output_dir"
    if dist.is_initialized():
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        if env.rank == 0:
            release(path, me)
            if created:
                with contextlib.suppress(OSError):  # not empty: the run wrote there
                    run_dir.rmdir()
