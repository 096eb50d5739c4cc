"""data.streaming through the CLI on 2 gloo ranks: a shard directory read on the fly, split across ranks, evaluated on
a prepared validation file, and resumed exactly from a checkpoint."""
from __future__ import annotations

import json
import random

import pytest

from helpers import TINY, dist_tune, read_metrics

WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing softly near old stone walls".split()


def write_jsonl(path, rows: int, seed: int) -> None:
    r = random.Random(seed)
    path.write_text("".join(json.dumps({"text": " ".join(r.choice(WORDS) for _ in range(r.randint(5, 40)))}) + "\n"
                            for _ in range(rows)))


def test_a_streamed_run_resumes_on_the_next_row(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):  # 3 shards on 2 ranks: the interleaved split; ~2 micro-batches per rank per epoch
        write_jsonl(shards / f"part-{s}.jsonl", 12, seed=s)
    write_jsonl(tmp_path / "val.jsonl", 8, seed=9)
    common = [*TINY, "--engine.kind=ddp", f"--data.path={shards}", "--data.format=text", "--data.pack=true",
              "--data.streaming=true", f"--data.validation_path={tmp_path / 'val.jsonl'}", "--train.max_steps=8",
              "--checkpoint.save_steps=4", "--log.log_steps=1", "--train.eval_steps=null",
              f"--train.output_dir={tmp_path}"]
    straight = dist_tune("train", *common, "--train.run_name=straight", nproc=2)
    assert "interleaved: 3 shard(s) do not divide among 2 ranks" in straight.stderr
    assert "streamed data: epoch 1 ended" in straight.stderr
    step4 = tmp_path / "straight" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step4.glob("data_rank*.pt")) == ["data_rank0.pt", "data_rank1.pt"]
    assert read_metrics(tmp_path / "straight", "eval/loss").keys() == {8}

    dist_tune("train", *common, "--train.run_name=resumed", f"--train.resume={step4}", nproc=2)
    straight_losses, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert resumed.keys() == {5, 6, 7, 8}
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight_losses[step], rel=1e-9), step

    no_rows = dist_tune("eval", str(tmp_path / "straight"), "--data.validation_path=null", check=False)
    assert no_rows.returncode == 2
    assert no_rows.stderr.strip().splitlines()[-1] == (
        f"dist-tune: error: run '{tmp_path / 'straight'}' has no validation rows (data.validation_split=0, or "
        "streamed data without data.validation_path); pass --data.validation_path=FILE")
