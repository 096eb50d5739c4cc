"""A data.sources mixture through the real CLI: trains, logs its shares, records them, resumes exactly."""
from __future__ import annotations

import pytest
import yaml

from helpers import TINY, dist_tune, read_metrics

SOURCES = "--data.sources=[{path: bundled:instructions, weight: 3}, {path: bundled:chat, format: chat, weight: 1}]"


@pytest.mark.slow
def test_mixture_trains_records_its_sources_and_resumes_on_the_next_batch(tmp_path):
    common = [*TINY, SOURCES, "--optim.lr=3e-3", "--train.max_steps=6", "--checkpoint.save_steps=3",
              "--log.log_steps=1", "--train.eval_steps=null", f"--train.output_dir={tmp_path}"]
    proc = dist_tune("train", *common, "--train.run_name=straight")
    assert "data.sources[0] bundled:instructions (instruction, weight 3): 2,850 rows, 2,351 per epoch (75.0%)" \
        in proc.stderr
    assert "data.sources[1] bundled:chat (chat, weight 1): 285 rows, 784 per epoch (25.0%)" in proc.stderr
    saved = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())["data"]["sources"]
    assert saved == [{"path": "bundled:instructions", "weight": 3.0},
                     {"path": "bundled:chat", "weight": 1.0, "format": "chat"}]

    killed = dist_tune("train", *common, "--train.run_name=resumed", env={"DIST_TUNE_KILL_AT_STEP": "5"},
                       check=False)
    assert killed.returncode == -9
    resumed = dist_tune("train", *common, "--train.run_name=resumed")
    assert "resumed from" in resumed.stderr and "step_00000003" in resumed.stderr
    straight, again = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert again.keys() == straight.keys() == set(range(1, 7))
    for step in straight:
        assert again[step] == pytest.approx(straight[step], rel=1e-9), step
