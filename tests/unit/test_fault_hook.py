"""faults.kill_hook: installed only when DIST_TUNE_KILL_AT_STEP is set; it kills only the chosen rank at the chosen
step, once per run dir (the SIGKILL itself is exercised by tests/distributed/test_faults.py)."""
from __future__ import annotations

from dist_tune import faults
from dist_tune.checkpoint import TrainState


def test_no_hook_without_the_variable(tmp_path):
    assert faults.kill_hook(tmp_path, 0, environ={}) is None


def test_the_hook_spares_other_steps_other_ranks_and_a_run_dir_already_killed(tmp_path, monkeypatch):
    killed = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append(sig))
    environ = {"DIST_TUNE_KILL_AT_STEP": "3", "DIST_TUNE_KILL_RANK": "1"}
    faults.kill_hook(tmp_path, 1, environ)(TrainState(step=2))
    faults.kill_hook(tmp_path, 0, environ)(TrainState(step=3))
    assert killed == [] and not (tmp_path / "fault_injected_at_3").exists()
    faults.kill_hook(tmp_path, 1, environ)(TrainState(step=3))
    assert killed == [faults.signal.SIGKILL] and (tmp_path / "fault_injected_at_3").exists()
    faults.kill_hook(tmp_path, 1, environ)(TrainState(step=3))  # the resumed run passes step 3 again
    assert len(killed) == 1
