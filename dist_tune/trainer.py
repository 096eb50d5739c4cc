"""The one training loop: accumulation, globally normalised loss, clipping, eval, early stopping, checkpoints."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dist_tune import checkpoint as ckpt
from dist_tune.config import Config
from dist_tune.data.loader import EpochBatches, build_loader
from dist_tune.data.stream import StreamBatches
from dist_tune.engines.base import Engine
from dist_tune.errors import DataError, TrainingError
from dist_tune.generation import generation_eval, write_generations
from dist_tune.metrics import MetricsLogger, memory_metrics, reset_peak_memory
from dist_tune.preemption import PreemptionHandler
from dist_tune.loss import (IGNORE, aligned_targets, causal_lm_loss_sum, chunked_head_loss, classification_loss_sum,
                            shifted_labels)

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_to_keep",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Inputs for the HF forward; padding-free rows pass position_ids (and sequence boundaries) and no mask,
    so attention stays per example."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
        inputs["use_cache"] = False  # with a cache, transformers ignores the position-id document boundaries
    return inputs


def target_count(batch: dict[str, torch.Tensor], causal: bool) -> int:
    if not causal:
        return int(batch["labels"].shape[0])
    return int((shifted_labels(batch["labels"], batch.get("position_ids")) != IGNORE).sum())


def logit_positions(batch: dict[str, torch.Tensor]) -> int:
    """Real-token positions where the model computes logits: every one, or only those in `logits_to_keep`."""
    mask = batch["attention_mask"]
    keep = batch.get("logits_to_keep")
    return int((mask[:, keep] if torch.is_tensor(keep) else mask).sum())


def sequence_count(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a micro-batch: rows, or in packed/padding-free rows the real tokens at position 0."""
    if "position_ids" not in batch:
        return int(batch["input_ids"].shape[0])
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


def forward(engine: Engine, batch: dict[str, torch.Tensor]) -> Any:
    """The model's output on a micro-batch; where the head computes the loss in chunks (loss.ChunkedHeadLoss),
    its `logits` are the summed cross-entropy of the batch's targets."""
    head = chunked_head_loss(engine.unwrap()) if "labels" in batch else None
    if head is None:
        return engine.forward(model_inputs(batch))
    with head.computing(aligned_targets(batch["labels"], batch.get("position_ids"), batch.get("logits_to_keep"))):
        return engine.forward(model_inputs(batch))


def loss_sum(output: Any, batch: dict[str, torch.Tensor], causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of targets) of a micro-batch's output."""
    if causal and output.logits.dim() == 0:  # the head already reduced it (see forward)
        return output.logits, torch.tensor(target_count(batch, causal), device=output.logits.device)
    if causal:
        return causal_lm_loss_sum(output.logits, batch["labels"], batch.get("position_ids"),
                                  batch.get("logits_to_keep"))
    return classification_loss_sum(output.logits, batch["labels"])


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    samples: int
    logit_positions: int
    data_wait_s: float
    compute_s: float
    skipped: bool = False


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Trainer:
    """The loop; run.build_trainer builds everything it talks to. `batches` gives this rank's training
    micro-batches from where `state` says training is (fresh or resumed: mid-epoch, or mid-stream),
    `mfu` maps (tokens/s, mean example length, logit positions per token) to MFU or None; `after_step`, when
    set, is called once after each step that did not stop the run (faults.kill_hook, for tests)."""
    cfg: Config
    engine: Engine
    batches: EpochBatches | StreamBatches
    total_steps: int
    val_set: Any
    tokenizer: Any
    run_dir: Path
    metrics: MetricsLogger
    preemption: PreemptionHandler
    mfu: Callable[[float, float, float], float | None]
    state: ckpt.TrainState
    after_step: Callable[[ckpt.TrainState], None] | None = None
    last_saved_step: int | None = None

    def __post_init__(self) -> None:
        self.causal = self.cfg.model.task == "causal_lm"

    def _next_micro_batches(self) -> tuple[list[dict], float, DataError | None]:
        """grad_accum micro-batches for one step, the seconds spent waiting for them, and the bad-data error a
        stream raised instead (train_step stops every rank on it)."""
        start = time.perf_counter()
        try:
            batches, problem = self.batches.take(self.state, self.cfg.train.grad_accum), None
        except DataError as exc:
            batches, problem = [], exc
        return batches, time.perf_counter() - start, problem

    # --- one step ------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]],
                   problem: DataError | None = None) -> StepResult:
        """One optimizer step. `problem`: this rank's data failed it (no batches); the step's first collective
        tells every rank, and each stops with one line rather than waiting on a rank that is gone."""
        engine, device = self.engine, self.engine.device
        counts = torch.tensor([sum(target_count(b, self.causal) for b in micro_batches),
                               sum(int(b["attention_mask"].sum()) for b in micro_batches),
                               sum(sequence_count(b) for b in micro_batches),
                               sum(logit_positions(b) for b in micro_batches), problem is not None],
                              dtype=torch.float64)
        global_targets, tokens, samples, logits, failed = engine.all_reduce_sum(counts.to(device)).tolist()
        if failed:
            raise problem or DataError("another rank stopped on bad streamed data (its one-line error is in the "
                                       "job's output); fix or drop that record")
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, device)
            with engine.no_sync(i == len(micro_batches) - 1):
                summed, _ = loss_sum(forward(engine, batch), batch, self.causal)
                engine.backward(summed / max(global_targets, 1.0))
            total += summed.detach().double()
        loss = float(engine.all_reduce_sum(total)) / max(global_targets, 1.0)
        bad = not math.isfinite(loss)
        grad_norm = engine.step(skip=bad)
        bad = bad or not (math.isfinite(grad_norm) or engine.handles_overflow)
        return StepResult(loss, grad_norm, int(tokens), int(samples), int(logits), 0.0, time.perf_counter() - start,
                          skipped=bad)

    def train_metrics(self, result: StepResult, elapsed: float) -> dict[str, float]:
        tokens_per_s = result.tokens / max(elapsed, 1e-9)
        metrics = {"train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": self.engine.current_lr(),
                   "train/tokens_per_s": tokens_per_s, "train/samples_per_s": result.samples / max(elapsed, 1e-9),
                   "train/data_wait_s": result.data_wait_s, "train/compute_s": result.compute_s,
                   "train/epoch": self.batches.epoch_progress(self.state)}
        metrics.update(self._peak_memory_over_ranks())
        tokens = max(result.tokens, 1)
        mfu = self.mfu(tokens_per_s, result.tokens / max(result.samples, 1), result.logit_positions / tokens)
        if mfu is not None:
            metrics["train/mfu"] = mfu
        return metrics

    def _peak_memory_over_ranks(self) -> dict[str, float]:
        """Memory of this log window (see metrics.memory_metrics), the maximum over all ranks."""
        local = memory_metrics(self.engine.device)
        reset_peak_memory(self.engine.device)
        if not local:
            return {}
        values = self.engine.all_reduce_max(torch.tensor(list(local.values()), dtype=torch.float64,
                                                         device=self.engine.device))
        return dict(zip(local, values.tolist()))

    def _track_bad_step(self, result: StepResult) -> None:
        if not result.skipped:
            self.state.consecutive_bad_steps = 0
            return
        self.state.consecutive_bad_steps += 1
        self.state.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped (%d in a row)",
                    self.state.step, result.loss, result.grad_norm, self.state.consecutive_bad_steps)
        if self.cfg.train.nan_policy == "stop" or self.state.consecutive_bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(f"stopping: {self.state.consecutive_bad_steps} consecutive non-finite steps at step "
                                f"{self.state.step} (train.nan_policy={self.cfg.train.nan_policy}, "
                                f"train.max_bad_steps={self.cfg.train.max_bad_steps}); lower optim.lr, enable "
                                "clipping (optim.max_grad_norm) or check the data")

    # --- evaluation ------------------------------------------------------------
    def evaluate(self) -> dict[str, float] | None:
        """Validation metrics (None when a preemption signal interrupted them); rank 0 writes the eval's confusion
        matrix and generations to the run dir."""
        evaluation = evaluate(self.cfg, self.engine, self.val_set, self.tokenizer, stop=self.preemption.should_stop)
        if evaluation is None:
            return None
        if self.engine.env.rank == 0:
            evaluation.write(self.run_dir)
        return evaluation.metrics

    def _evaluate_step(self, history: dict[str, Any]) -> str | None:
        """This step's evaluation: "preempted" when a signal interrupted it (the step is then checkpointed, marked
        to evaluate again on resume), "early_stopping" when patience ran out, else None."""
        evaluation = self.evaluate()
        if evaluation is None:
            self.state.eval_pending = True
            self.save()
            return "preempted"
        self.state.eval_pending = False
        self.metrics.log(self.state.step, evaluation)
        history.update({f"final_{k.replace('/', '_')}": v for k, v in evaluation.items()})
        stop = self._after_eval(evaluation)
        if self.last_saved_step == self.state.step and self.engine.env.rank == 0:
            ckpt.write_state(ckpt.step_dir(self.run_dir, self.state.step), self.state, self.engine.env.world_size)
        if stop:
            self.save()
            return "early_stopping"
        return None

    # --- loop ------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint this step once (a periodic and a preemption save can fall on the same step)."""
        if self.last_saved_step != self.state.step:
            ckpt.save_checkpoint(self.engine, self.state, self.run_dir, self.cfg.checkpoint.save_total_limit,
                                 data_state=self.batches.state_dict())
            self.last_saved_step = self.state.step

    def _should(self, every: int | None) -> bool:
        return bool(every) and self.state.step % every == 0

    def _after_eval(self, result: dict[str, float]) -> bool:
        """Track the early-stopping metric; True when patience is exhausted."""
        patience, key = self.cfg.train.early_stopping_patience, self.cfg.train.early_stopping_metric
        if not patience or key not in result:
            return False
        value, best = result[key], self.state.best_metric
        better = best is None or (value < best if self.cfg.train.early_stopping_mode == "min" else value > best)
        if better:
            self.state.best_metric, self.state.evals_without_improvement = value, 0
        else:
            self.state.evals_without_improvement += 1
        return self.state.evals_without_improvement >= patience

    def _after_step(self, history: dict[str, Any], total: int) -> str | None:
        """Checkpoint (before the evaluation, so a signal during it loses nothing; the last step too, so a larger
        train.max_steps continues from it), evaluate, then stop on a preemption signal; why it stopped, or None."""
        evaluate_now = self._should(self.cfg.train.eval_steps) or self.state.step == total
        if self._should(self.cfg.checkpoint.save_steps) or self.state.step == total:
            self.state.eval_pending = evaluate_now
            self.save()
        stopped = self._evaluate_step(history) if evaluate_now else None
        if stopped:
            return stopped
        if self.after_step is not None:
            self.after_step(self.state)
        if self.preemption.should_stop():
            self.save()
            return "preempted"
        return None

    def train(self) -> dict[str, Any]:
        """Run to total_steps (or early stop / preemption); returns the run summary."""
        total = self.total_steps
        history: dict[str, Any] = {}
        last_step_time = time.perf_counter()
        self.engine.model.train()  # from_pretrained returns eval mode; dropout belongs on from the first step
        if self.state.step >= total:
            log.info("already at step %d of train.max_steps=%d: nothing to train (raise train.max_steps to continue)",
                     self.state.step, total)
        stopped = self._evaluate_step(history) if self.state.eval_pending else None
        while stopped is None and self.state.step < total:
            micro, wait, problem = self._next_micro_batches()
            result = self.train_step(micro, problem)
            result.data_wait_s = wait
            self.state.step += 1
            self._track_bad_step(result)
            elapsed, last_step_time = time.perf_counter() - last_step_time, time.perf_counter()
            if self._should(self.cfg.log.log_steps) or self.state.step in (1, total):
                self.metrics.log(self.state.step, self.train_metrics(result, elapsed))
            history["final_train_loss"] = result.loss
            stopped = self._after_step(history, total)
        history["stopped"] = stopped or "completed"
        history.update(steps=self.state.step, total_steps=total, skipped_steps=self.state.skipped_steps)
        return history


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
def evaluate(cfg: Config, engine: Engine, val_set: Any, tokenizer: Any,
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
