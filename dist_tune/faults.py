"""Fault injection for tests: DIST_TUNE_KILL_AT_STEP=N SIGKILLs rank DIST_TUNE_KILL_RANK (default 0) after step N,
once per run directory (a marker file there records it), so a resumed run trains on. `run.build_trainer` installs
the hook as the trainer's `after_step` only when the variable is set."""
from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from dist_tune.checkpoint import TrainState

KILL_AT_STEP = "DIST_TUNE_KILL_AT_STEP"
KILL_RANK = "DIST_TUNE_KILL_RANK"


def kill_hook(run_dir: Path, rank: int,
              environ: Mapping[str, str] | None = None) -> Callable[[TrainState], None] | None:
    """The after-step hook the environment asks for, or None when DIST_TUNE_KILL_AT_STEP is unset."""
    environ = os.environ if environ is None else environ
    if not environ.get(KILL_AT_STEP):
        return None
    kill_at = int(environ[KILL_AT_STEP])

    def kill_after(state: TrainState) -> None:
        if kill_at != state.step or rank != int(environ.get(KILL_RANK, "0")):
            return
        marker = run_dir / f"fault_injected_at_{kill_at}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return kill_after
