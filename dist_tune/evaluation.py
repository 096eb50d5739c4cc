"""Evaluation of a model on the validation set: loss and perplexity, classification metrics with the confusion
matrix, and generation metrics; reduced across ranks. The training loop and `dist-tune eval` both call
`evaluate_model`."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dist_tune.config import Config
from dist_tune.data.loader import build_loader
from dist_tune.engines.base import Engine
from dist_tune.forward import forward, loss_sum, to_device
from dist_tune.generation import generation_eval, write_generations

CONFUSION_FILE = "confusion_matrix.json"


@dataclass
class Evaluation:
    """One eval: its metrics (logged; the same on every rank), the classification confusion matrix and the
    eval.generate_samples generations (`write` puts both in the run dir)."""
    metrics: dict[str, float] = field(default_factory=dict)
    confusion: dict[str, Any] | None = None
    generations: list[dict] = field(default_factory=list)

    def write(self, run_dir: Path) -> None:
        """confusion_matrix.json and generations.jsonl, replacing the previous eval's (call it on one rank)."""
        if self.confusion is not None:
            (Path(run_dir) / CONFUSION_FILE).write_text(json.dumps(self.confusion) + "\n")
        if self.generations:
            write_generations(self.generations, Path(run_dir))


@torch.no_grad()
def evaluate_model(cfg: Config, engine: Engine, val_set: Any, tokenizer: Any,
             stop: Callable[[], bool] | None = None) -> Evaluation | None:
    """Validation metrics of the engine's model over `val_set`, reduced across ranks (none without a set), plus
    generation metrics when eval.generate_samples is set; None when `stop` (asked before each batch and before
    generating; a collective that every rank answers alike) says to stop. Collective: every rank calls it."""
    if val_set is None or len(val_set) == 0:
        return Evaluation()
    env = engine.env
    loader, _ = build_loader(val_set, cfg, tokenizer, rank=env.rank, world_size=env.world_size, shuffle=False,
                             seed=cfg.train.seed)
    limit = cfg.train.eval_max_batches or len(loader)
    n_batches = int(engine.all_reduce_max(torch.tensor(min(len(loader), limit), device=engine.device)))
    tally = EvalTally(cfg, engine.device, class_names(val_set, cfg.model.num_labels))
    stop = stop or (lambda: False)
    engine.model.eval()
    try:
        if not _tally_batches(cfg, engine, val_set, tokenizer, iter(loader), n_batches, tally, stop):
            return None
        if cfg.eval.generate_samples and stop():
            return None
        generated, generations = generation_eval(cfg, engine, val_set, tokenizer)
    finally:
        engine.model.train()
    metrics, confusion = tally.result(engine)
    return Evaluation({**metrics, **generated}, confusion, generations)


def _tally_batches(cfg: Config, engine: Engine, val_set: Any, tokenizer: Any, batches: Iterator, n_batches: int,
                   tally: EvalTally, stop: Callable[[], bool]) -> bool:
    """n_batches forwards into `tally` (a rank out of batches runs a filler: sharded engines gather weights in
    every forward); False when `stop` interrupted them."""
    filler = None
    for _ in range(n_batches):
        if stop():
            return False
        batch = next(batches, None)
        if batch is None:
            filler = filler if filler is not None else first_batch(cfg, val_set, tokenizer, engine.device)
            forward(engine, filler)
            continue
        batch = to_device(batch, engine.device)
        filler = filler if filler is not None else batch
        tally.add(forward(engine, batch), batch, cfg.model.task == "causal_lm")
    return True


def first_batch(cfg: Config, val_set: Any, tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """The validation set's first micro-batch (a filler for a rank whose own share is empty)."""
    loader, _ = build_loader(val_set, cfg, tokenizer, rank=0, world_size=1, shuffle=False, seed=cfg.train.seed)
    return to_device(next(iter(loader)), device)


def class_names(val_set: Any, num_labels: int) -> list[str]:
    """Class names in index order as the validation labels record them (data.label_names or the data's own
    label strings), else the class indices."""
    names = list(getattr(val_set.features.get("labels"), "names", None) or [])
    return names + [str(i) for i in range(len(names), num_labels)]


class EvalTally:
    """Sums of loss/targets (and a confusion matrix for classification), reduced across ranks at the end."""

    def __init__(self, cfg: Config, device: torch.device, names: list[str] | None = None):
        self.task = cfg.model.task
        self.names = names
        self.loss = torch.zeros(2, dtype=torch.float64, device=device)
        classes = cfg.model.num_labels if self.task == "classification" else 1
        self.confusion = torch.zeros(classes, classes, dtype=torch.float64, device=device)

    def add(self, output: Any, batch: dict[str, torch.Tensor], causal: bool) -> None:
        summed, count = loss_sum(output, batch, causal)
        self.loss += torch.stack([summed.double(), count.double()])
        if self.task == "classification":
            preds = output.logits.argmax(-1)
            self.confusion.index_put_((batch["labels"], preds), torch.ones_like(preds, dtype=torch.float64),
                                      accumulate=True)

    def result(self, engine: Engine) -> tuple[dict[str, float], dict[str, Any] | None]:
        """The metrics, and for classification the confusion matrix as {labels, matrix} (matrix[true][predicted])."""
        loss_sum_, count = engine.all_reduce_sum(self.loss).tolist()
        loss = loss_sum_ / max(count, 1.0)
        result = {"eval/loss": loss}
        if self.task == "causal_lm":
            result["eval/perplexity"] = math.exp(min(loss, 50.0))
        if self.task != "classification":
            return result, None
        confusion = engine.all_reduce_sum(self.confusion).cpu()
        names = self.names or [str(i) for i in range(len(confusion))]
        result.update(classification_metrics(confusion, names))
        return result, {"labels": names, "matrix": confusion.long().tolist()}


def classification_metrics(confusion: torch.Tensor, names: list[str]) -> dict[str, float]:
    """Accuracy; per-class precision, recall and F1 (`eval/precision_<name>`, ...); and their macro averages over
    the classes that occur as a label or a prediction (scikit-learn's convention), from a confusion matrix
    indexed [true, predicted]."""
    tp = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = tp / predicted.clamp(min=1)
    recall = tp / actual.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = (predicted + actual) > 0

    def macro(values: torch.Tensor) -> float:
        return float(values[present].mean()) if present.any() else 0.0

    metrics = {"eval/accuracy": float(tp.sum() / confusion.sum().clamp(min=1)), "eval/f1": macro(f1),
               "eval/precision": macro(precision), "eval/recall": macro(recall)}
    for name, p, r, f in zip(names, precision.tolist(), recall.tolist(), f1.tolist()):
        metrics.update({f"eval/precision_{name}": p, f"eval/recall_{name}": r, f"eval/f1_{name}": f})
    return metrics
