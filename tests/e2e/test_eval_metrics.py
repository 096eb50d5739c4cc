"""Generation metrics and classification reports through the CLI: logged at every eval, written to the run dir,
and the same from `dist-tune eval` on the final model."""
from __future__ import annotations

import json

import pytest

from helpers import TINY, dist_tune
from dist_tune.evaluate import GENERATE_SAMPLES, evaluate_run

GENERATION_KEYS = ("eval/exact_match", "eval/bleu", "eval/rouge1", "eval/rouge2", "eval/rougeL")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_json(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_rows(run_dir) -> dict[int, dict]:
    return {row["step"]: row for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in row}


@pytest.mark.slow
def test_generation_metrics_every_eval_and_from_the_eval_command(runs_root):
    run_dir = runs_root / "gen-single"
    proc = dist_tune("train", *TINY, "--train.max_steps=4", "--train.eval_steps=2", "--eval.generate_samples=4",
                     "--eval.max_new_tokens=8", f"--train.output_dir={runs_root}", "--train.run_name=gen-single")
    evals = eval_rows(run_dir)
    assert sorted(evals) == [2, 4]
    for row in evals.values():
        assert all(0 <= row[key] <= (100 if key == "eval/bleu" else 1) for key in GENERATION_KEYS), row
    summary = last_json(proc)
    assert summary["final_eval_rougeL"] == evals[4]["eval/rougeL"]
    rows = read_jsonl(run_dir / "generations.jsonl")
    assert len(rows) == 4 and all(set(row) == {"prompt", "reference", "output"} for row in rows)
    assert all(row["prompt"] and row["reference"] for row in rows)

    result = last_json(dist_tune("eval", str(run_dir), "--generate"))
    assert {key: result[key] for key in GENERATION_KEYS} == {key: evals[4][key] for key in GENERATION_KEYS}
    assert read_jsonl(run_dir / "generations.jsonl") == rows
    assert not set(GENERATION_KEYS) & set(evaluate_run(run_dir, {}))  # without --generate
    zero = dist_tune("eval", str(run_dir), "--generate", "--eval.generate_samples=0")  # --generate alone generates
    assert set(GENERATION_KEYS) <= set(last_json(zero))
    assert f"generating for up to {GENERATE_SAMPLES} validation prompts" in zero.stderr
    assert len(read_jsonl(run_dir / "generations.jsonl")) == GENERATE_SAMPLES


@pytest.mark.slow
def test_classification_reports_per_class_metrics_and_the_confusion_matrix(runs_root):
    run_dir = runs_root / "cls-report"
    dist_tune("train", *TINY, "--model.task=classification", "--data.format=classification",
              "--data.path=bundled:sentiment", "--train.max_steps=3", f"--train.output_dir={runs_root}",
              "--train.run_name=cls-report")
    confusion = json.loads((run_dir / "confusion_matrix.json").read_text())
    assert confusion["labels"] == ["negative", "positive"]
    evaluated = sum(map(sum, confusion["matrix"]))
    assert evaluated == 8  # train.eval_max_batches=2 × micro-batch 4
    final = eval_rows(run_dir)[3]
    for name, row in zip(confusion["labels"], confusion["matrix"]):
        assert final[f"eval/recall_{name}"] == pytest.approx(row[confusion["labels"].index(name)] / max(sum(row), 1))
    result = last_json(dist_tune("eval", str(run_dir)))
    assert result["confusion_matrix"] == confusion
    assert result["eval/precision"] == pytest.approx(final["eval/precision"], abs=1e-12)
