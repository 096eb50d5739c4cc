"""A finished run leaves a checkpoint at its last step: rerun with a larger train.max_steps, it continues from there;
a finished run without one is not silently retrained from step 1 over its final/ and metrics."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import TINY, dist_tune, read_metrics

pytestmark = pytest.mark.slow


def test_a_larger_max_steps_continues_a_finished_run_from_its_last_step(tmp_path):
    common = [*TINY, "--log.log_steps=1", f"--train.output_dir={tmp_path}", "--train.run_name=done"]
    run_dir = tmp_path / "done"
    dist_tune("train", *common, "--train.max_steps=2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]
    first = (run_dir / "metrics.jsonl").read_text()

    proc = dist_tune("train", *common, "--train.max_steps=4")
    assert "resumed from" in proc.stderr and "step_00000002 at step 2" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text().startswith(first)  # steps 1-2 kept, not retrained
    assert set(read_metrics(run_dir)) == {1, 2, 3, 4}
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    shutil.rmtree(run_dir / "checkpoints")  # a run finished before last-step checkpoints existed
    final = (run_dir / "final" / "model.safetensors").read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_text()
    proc = dist_tune("train", *common, "--train.max_steps=6", check=False)
    assert proc.returncode == 2
    assert proc.stderr.endswith(f"dist-tune: error: run dir {run_dir} holds a finished run and no checkpoint to "
                                "continue from; use a new train.run_name, or train.resume=none to train it again "
                                "from step 1, replacing it\n"), proc.stderr[-2000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == final
    assert (run_dir / "metrics.jsonl").read_text() == metrics
