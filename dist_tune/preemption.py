"""Preemption: a signal becomes a flag, all ranks stop after the same step, checkpoint, and rank 0 requeues.

What a training run does (:func:`dist_tune.run.train` and :meth:`dist_tune.trainer.Trainer.train`)::

    capture_early_signal()                  # first thing: a SIGUSR1 during start-up is remembered, not fatal
    ...                                     # process group, run-dir lock, data, model, engine, resume
    handler = PreemptionHandler(env, device)    # SIGUSR1 and SIGTERM now only set a flag
    for step in ...:                        # Trainer.train
        train_step()
        if handler.should_stop():           # all-reduce MAX of the flag: every rank stops after this step
            save_checkpoint()               # collective; ends with a barrier and the COMPLETE marker
            break                           # summary["stopped"] = "preempted"; no final export
    metrics.close(summary)                  # run.train: summary.json, then the run-dir lock is released
    handler.requeue()                       # last, rank 0 under Slurm: scontrol requeue $SLURM_JOB_ID
                                            # every rank then leaves the process group and exits 0

Exit status 0 keeps torchrun from restarting the workers and Slurm from recording a failure.
``scontrol requeue`` kills the whole job at once (every node) and puts it back in the queue; the requeued
job gets ``SLURM_RESTART_COUNT=1,2,...`` and the same ``SLURM_JOB_ID`` (so the same default run name and
a run-dir lock it may take over) and, with ``train.resume=auto``, continues from the checkpoint just
written. Slurm keeps a requeued job ineligible for ``cred_expire`` seconds (AuthInfo, default 120 s).

Signal delivery (verified on Slurm 22.05, proctrack/linuxproc; see slurm/preemptible.sbatch):
``--signal=B:USR1@T`` and ``scancel -s USR1 -b`` reach only the batch shell; ``--signal=USR1@T`` and
``scancel -s USR1 JOBID`` reach *every process* of every srun step (torchrun and its workers, even
though torchrun starts workers in new sessions), never the batch shell; ``scancel -f`` reaches both.
torchrun dies on SIGUSR1 (it has no handler for it), so the per-node command ignores USR1 before
``exec torchrun`` and only the workers (which install this handler) act on it.
"""
from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from typing import Any

import torch
import torch.distributed as dist

from dist_tune.cluster import SCONTROL_TIMEOUT_S, ClusterEnv

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_early_signal: int | None = None


def _remember(signum: int, frame: Any) -> None:
    global _early_signal
    if _early_signal is None:
        _early_signal = signum


def capture_early_signal() -> bool:
    """Remember a SIGUSR1 that arrives before the :class:`PreemptionHandler` exists (model loading, data
    preparation) instead of losing it (SIG_IGN, inherited from the sbatch templates) or dying of it (default
    action); the handler picks it up. Only a SIGUSR1 still at SIG_DFL/SIG_IGN is taken. SIGTERM is never
    taken here: a process that dies before building a handler must still terminate on it."""
    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return False
    signal.signal(signal.SIGUSR1, _remember)
    return True


class PreemptionHandler:
    """Turns SIGUSR1/SIGTERM into a flag that every rank acts on after the same step.

    The constructor replaces the handlers of both signals by one that only records the signal (no I/O, no
    collectives inside a signal handler) and takes over a SIGUSR1 that :func:`capture_early_signal` kept.
    It must be built in the main thread. `device` is where :meth:`should_stop` all-reduces the flag."""

    def __init__(self, env: ClusterEnv, device: torch.device) -> None:
        global _early_signal
        self.env = env
        self.device = device
        self._signum: int | None = None
        self._agreed = False
        for s in SIGNALS:
            signal.signal(s, self._handle)
        if _early_signal is not None:
            logger.warning("preemption: %s arrived during start-up", signal.Signals(_early_signal).name)
            self._handle(_early_signal, None)
        _early_signal = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._signum is None:
            self._signum = signum

    @property
    def signal_name(self) -> str | None:
        """The first signal this process received, None before any."""
        return signal.Signals(self._signum).name if self._signum is not None else None

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal. A collective when a process group with more than
        one rank exists: every rank must call it at the same point (once per step)."""
        if self._agreed:
            return True
        flag = self._signum is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self._agreed = True
            who = f"got {self.signal_name}" if self._signum is not None else "another rank got a signal"
            logger.warning("preemption: %s; stopping after this step to checkpoint and requeue", who)
        return flag

    def requeue(self) -> bool:
        """Rank 0 inside a Slurm job: ``scontrol requeue $SLURM_JOB_ID``. Returns True if requeued.

        Never raises: a failure (no scontrol, job not requeueable, ...) is logged. Call it last, after every
        rank has finished saving: Slurm kills the whole job as soon as it accepts."""
        if not self.env.is_main:
            return False
        job = self.env.slurm_job_id
        if not job:
            logger.info("preemption: not inside a Slurm job, nothing to requeue")
            return False
        cmd = [shutil.which("scontrol") or "scontrol", "requeue", job]
        logger.warning("preemption: requeueing Slurm job %s: %s", job, " ".join(cmd))
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            logger.error("preemption: %s failed: %s", " ".join(cmd), e)
            return False
        if res.returncode != 0:
            logger.error("preemption: %s exited %s: %s", " ".join(cmd), res.returncode,
                         (res.stderr or res.stdout).strip())
            return False
        return True
