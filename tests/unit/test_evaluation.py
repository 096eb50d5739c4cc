"""Classification eval: per-class precision/recall/F1, macro averages and the confusion matrix the run dir gets."""
from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch

from dist_tune.config import Config
from dist_tune.evaluation import EvalTally, Evaluation, class_names, classification_metrics

NAMES = ["neg", "neu", "pos", "other"]
# rows: true class, columns: predicted. pos is predicted once but never true; other never occurs at all.
CONFUSION = torch.tensor([[3., 1., 0., 0.],
                          [1., 2., 1., 0.],
                          [0., 0., 0., 0.],
                          [0., 0., 0., 0.]])


def test_per_class_and_macro_metrics_from_a_hand_built_confusion_matrix():
    m = classification_metrics(CONFUSION, NAMES)
    assert m["eval/accuracy"] == pytest.approx(5 / 8)
    assert (m["eval/precision_neg"], m["eval/recall_neg"], m["eval/f1_neg"]) == pytest.approx((3 / 4, 3 / 4, 3 / 4))
    assert (m["eval/precision_neu"], m["eval/recall_neu"], m["eval/f1_neu"]) == pytest.approx((2 / 3, 1 / 2, 4 / 7))
    assert (m["eval/precision_pos"], m["eval/recall_pos"], m["eval/f1_pos"]) == (0.0, 0.0, 0.0)
    assert (m["eval/precision_other"], m["eval/recall_other"], m["eval/f1_other"]) == (0.0, 0.0, 0.0)
    # macro: over neg, neu and pos (a label or a prediction); `other` never occurs, so it is left out
    assert m["eval/precision"] == pytest.approx((3 / 4 + 2 / 3 + 0) / 3)
    assert m["eval/recall"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)
    assert m["eval/f1"] == pytest.approx((3 / 4 + 4 / 7 + 0) / 3)


def test_tally_reports_the_confusion_matrix_under_class_names_and_writes_it(tmp_path):
    cfg = Config()
    cfg.model.task, cfg.model.num_labels, cfg.data.format = "classification", 4, "classification"
    engine = SimpleNamespace(all_reduce_sum=lambda t: t)
    tally = EvalTally(cfg, torch.device("cpu"), NAMES)
    true = [0, 0, 0, 0, 1, 1, 1, 1]
    predicted = [0, 0, 0, 1, 0, 1, 1, 2]
    logits = torch.nn.functional.one_hot(torch.tensor(predicted), 4).float()
    tally.add(SimpleNamespace(logits=logits), {"labels": torch.tensor(true)}, causal=False)
    metrics, confusion = tally.result(engine)
    assert confusion == {"labels": NAMES, "matrix": CONFUSION.long().tolist()}
    assert metrics["eval/recall_neu"] == pytest.approx(0.5)
    Evaluation(metrics, confusion).write(tmp_path)
    assert json.loads((tmp_path / "confusion_matrix.json").read_text()) == confusion
    assert not (tmp_path / "generations.jsonl").exists()


def test_class_names_come_from_the_labels_feature_else_the_index():
    named = datasets.Dataset.from_dict({"labels": [0, 1]}, features=datasets.Features(
        {"labels": datasets.ClassLabel(names=["bad", "good"])}))
    assert class_names(named, 3) == ["bad", "good", "2"]
    assert class_names(datasets.Dataset.from_dict({"labels": [0.5]}), 2) == ["0", "1"]


def test_a_rank_with_no_validation_rows_still_runs_the_other_ranks_forward_count():
    """Rank 1 of 2 with a one-row validation set has nothing to score but must forward once (sharded engines
    gather weights in every forward); it uses the set's first batch as the filler."""
    from dist_tune.cluster import ClusterEnv
    from dist_tune.config import load_config
    from dist_tune.data.pipeline import build_datasets
    from dist_tune.models import load_tokenizer
    from dist_tune.evaluation import evaluate_model

    cfg = load_config(overrides={"model.name_or_path": "tiny-llama", "data.max_length": 64,
                                 "data.prompt_template": "plain"})
    tokenizer = load_tokenizer(cfg)
    _, val_set = build_datasets(cfg, tokenizer)
    one_row = val_set.select([0])
    seen = []
    model = torch.nn.Module()
    engine = SimpleNamespace(env=ClusterEnv(rank=1, world_size=2, launcher="torchrun"), device=torch.device("cpu"),
                             model=model, unwrap=lambda: model, all_reduce_max=lambda t: torch.ones_like(t),
                             all_reduce_sum=lambda t: t, forward=lambda inputs: seen.append(inputs["input_ids"]))
    result = evaluate_model(cfg, engine, one_row, tokenizer)
    assert len(seen) == 1 and seen[0].reshape(-1)[-len(one_row[0]["input_ids"]):].tolist() == one_row[0]["input_ids"]
    assert result.metrics["eval/loss"] == 0.0  # nothing of this rank's own was scored
