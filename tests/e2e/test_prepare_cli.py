"""`dist-tune prepare` through the CLI: a report of what it prepared, a 2-rank training run that memory-maps it
instead of tokenizing again, and a bad input found by the preparing rank ending every rank with the same line."""
from __future__ import annotations

import json

from helpers import TINY, dist_tune

TEXT = ["--data.path=bundled:text", "--data.format=text", "--data.pack=true", "--data.max_length=64"]
RUN = ["--engine.kind=ddp", "--train.max_steps=1", "--checkpoint.save_final=false", "--train.eval_max_batches=1"]


def test_prepare_reports_the_packed_corpus_and_training_reuses_it_on_every_rank(tmp_path):
    data = [*TEXT, f"--data.cache_dir={tmp_path / 'cache'}"]
    proc = dist_tune("prepare", *TINY, *data)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["train_records"] + report["validation_records"] == 2000  # bundled:text, 5 % held out
    assert report["train_dropped"] == 0 and report["train_examples"] == report["train_records"]
    assert report["train_at_max_length"] == 0 and report["train_length_max"] > 64  # packed text is split, not cut
    assert report["train_rows"] == -(-report["train_tokens"] // 64)  # fixed 64-token blocks, the last one partial
    assert report["train_length_p50"] <= report["train_length_p90"] <= report["train_length_p99"] \
        <= report["train_length_max"]
    assert 0 <= report["train_padding_share"] * report["train_rows"] < 1.1  # only the last block has padding
    assert f"train: {report['train_records']:,} records -> " in proc.stdout
    assert [name.split("/")[-1] for name in report["train_files"]] == [
        name for name in sorted(p.name for p in (tmp_path / "cache").glob("train-*.arrow")) if "packed" in name]
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir() if f.is_file()}

    run = dist_tune("train", *TINY, *data, *RUN, f"--train.output_dir={tmp_path}", "--train.run_name=r", nproc=2)
    assert "[rank 0] data from 'bundled:text': 2,087 train rows, 103 validation rows, prepared earlier" in run.stderr
    assert "[rank 1] using the data rank 0 prepared in" in run.stderr, run.stderr[-3000:]
    assert "Tokenizing" not in run.stderr
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir() if f.is_file()} == stamps  # no rewrite


def test_bad_data_found_by_the_preparing_rank_ends_every_rank_with_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "no closing brace"\n')
    proc = dist_tune("train", *TINY, "--data.format=text", f"--data.path={bad}",
                     f"--data.cache_dir={tmp_path / 'cache'}", *RUN, f"--train.output_dir={tmp_path}",
                     "--train.run_name=r", nproc=2, check=False, timeout=300)
    line = (f"dist-tune: error: data file '{bad}' line 2 is not valid JSON: Expecting ',' delimiter at column 1; "
            "fix or remove that line")
    assert proc.returncode != 0
    # rank 0 found it, rank 1 read it from rank 0's outcome (unless torchrun stopped it first, on rank 0's exit)
    errors = [text for text in proc.stderr.splitlines() if text.startswith("dist-tune: error:")]
    assert errors in ([line], [line, line]), proc.stderr[-4000:]
    assert "connection reset" not in proc.stderr.lower()
    # the one traceback is torchrun's own; its failure summary, the job's last lines, names the error
    assert proc.stderr.count("Traceback") == 1 and "ChildFailedError" in proc.stderr
    assert f"traceback : {line}" in proc.stderr.strip().splitlines()[-2], proc.stderr[-2000:]
