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


@pytest.mark.slow
def test_a_bad_streamed_record_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """Rank 1's share (the second of 2 shards) holds a record with no text: rank 1 names it, rank 0 says another
    rank stopped, and no rank prints a traceback (no gloo 'connection closed' from the rank left waiting)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", 40, seed=0)
    write_jsonl(shards / "part-1.jsonl", 40, seed=1)
    with (shards / "part-1.jsonl").open("a") as handle:
        handle.write(json.dumps({"text": None}) + "\n")
    proc = dist_tune("train", *TINY, "--engine.kind=ddp", f"--data.path={shards}", "--data.format=text",
                     "--data.streaming=true", "--data.validation_split=0", "--train.max_steps=200",
                     f"--train.output_dir={tmp_path}", nproc=2, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert f"dist-tune: error: a streamed record of '{shards}' has no text in 'text'; fill it in or drop the record" \
        in lines
    assert ("dist-tune: error: another rank stopped on bad streamed data (its one-line error is in the job's "
            "output); fix or drop that record") in lines
    assert not any(line.startswith("[rank") and "Traceback" in line for line in lines)
    assert "connection closed" not in proc.stderr.lower()
