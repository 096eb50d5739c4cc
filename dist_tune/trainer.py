"""The one training loop: accumulation, globally normalised loss, clipping, eval, early stopping, checkpoints."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dist_tune import checkpoint as ckpt
from dist_tune.config import Config
from dist_tune.data import build_loader
from dist_tune.engines.base import Engine
from dist_tune.errors import TrainingError, UserError
from dist_tune.metrics import memory_metrics
from dist_tune.loss import IGNORE, causal_lm_loss_sum, classification_loss_sum, shifted_labels

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


def sequence_count(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a micro-batch: rows, or in packed/padding-free rows the real tokens at position 0."""
    if "position_ids" not in batch:
        return int(batch["input_ids"].shape[0])
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


def loss_sum(output: Any, batch: dict[str, torch.Tensor], causal: bool,
             chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if causal:
        return causal_lm_loss_sum(output.logits, batch["labels"], batch.get("position_ids"), chunk,
                                  batch.get("logits_to_keep"))
    return classification_loss_sum(output.logits, batch["labels"])


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    samples: int
    data_wait_s: float
    compute_s: float
    skipped: bool = False


@dataclass
class Trainer:
    cfg: Config
    engine: Engine
    train_set: Any
    val_set: Any
    tokenizer: Any
    run_dir: Path
    metrics: Any
    preemption: Any = None
    mfu: Callable[[float, float], float | None] = lambda tokens_per_s, seq_len: None
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    last_saved_step: int | None = None

    def __post_init__(self) -> None:
        env = self.engine.env
        self.causal = self.cfg.model.task == "causal_lm"
        self.loader, self.sampler = build_loader(self.train_set, self.cfg, self.tokenizer, rank=env.rank,
                                                 world_size=env.world_size, shuffle=True, seed=self.cfg.train.seed)
        self.steps_per_epoch = len(self.loader) // self.cfg.train.grad_accum
        if self.steps_per_epoch < 1:
            raise UserError(f"the training set gives {len(self.loader)} micro-batches per rank, fewer than "
                            f"train.grad_accum={self.cfg.train.grad_accum}; use more data or a smaller batch")

    # --- schedule ----------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return total_steps(self.cfg, self.steps_per_epoch)

    def _epoch_iterator(self) -> Iterator[dict[str, torch.Tensor]]:
        self.sampler.set_epoch(self.state.epoch, skip=self.state.batches_in_epoch * self.cfg.train.micro_batch_size)
        return iter(self.loader)

    def _next_micro_batches(self, it: Iterator) -> tuple[list[dict], Iterator, float]:
        """grad_accum micro-batches for one step, moving to the next epoch when this one runs short."""
        start = time.perf_counter()
        accum = self.cfg.train.grad_accum
        if len(self.loader) - self.state.batches_in_epoch < accum:
            self.state.epoch += 1
            self.state.batches_in_epoch = 0
            it = self._epoch_iterator()
        batches = [next(it) for _ in range(accum)]
        self.state.batches_in_epoch += accum
        return batches, it, time.perf_counter() - start

    # --- one step ------------------------------------------------------------
    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.engine.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        engine, device = self.engine, self.engine.device
        counts = torch.tensor([sum(target_count(b, self.causal) for b in micro_batches),
                               sum(int(b["attention_mask"].sum()) for b in micro_batches),
                               sum(sequence_count(b) for b in micro_batches)], dtype=torch.float64)
        global_targets, tokens, samples = engine.all_reduce_sum(counts.to(device)).tolist()
        start = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            with engine.no_sync(i == len(micro_batches) - 1):
                output = engine.forward(model_inputs(batch))
                summed, _ = loss_sum(output, batch, self.causal, self.cfg.train.ce_chunk_tokens)
                engine.backward(summed / max(global_targets, 1.0))
            total += summed.detach().double()
        loss = float(engine.all_reduce_sum(total)) / max(global_targets, 1.0)
        bad = not math.isfinite(loss)
        grad_norm = engine.step(skip=bad)
        bad = bad or not (math.isfinite(grad_norm) or engine.handles_overflow)
        return StepResult(loss, grad_norm, int(tokens), int(samples), 0.0, time.perf_counter() - start, skipped=bad)

    def train_metrics(self, result: StepResult, elapsed: float) -> dict[str, float]:
        tokens_per_s = result.tokens / max(elapsed, 1e-9)
        metrics = {"train/loss": result.loss, "train/grad_norm": result.grad_norm, "train/lr": self.engine.current_lr(),
                   "train/tokens_per_s": tokens_per_s, "train/samples_per_s": result.samples / max(elapsed, 1e-9),
                   "train/data_wait_s": result.data_wait_s, "train/compute_s": result.compute_s,
                   "train/epoch": self.state.epoch + self.state.batches_in_epoch / max(len(self.loader), 1)}
        metrics.update(self._peak_memory_over_ranks())
        mfu = self.mfu(tokens_per_s, result.tokens / max(result.samples, 1))
        if mfu is not None:
            metrics["train/mfu"] = mfu
        return metrics

    def _peak_memory_over_ranks(self) -> dict[str, float]:
        """Peak device memory (host RSS on CPU), the maximum over all ranks."""
        local = memory_metrics(self.engine.device)
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
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        env, engine = self.engine.env, self.engine
        loader, _ = build_loader(self.val_set, self.cfg, self.tokenizer, rank=env.rank,
                                 world_size=env.world_size, shuffle=False, seed=self.cfg.train.seed)
        limit = self.cfg.train.eval_max_batches or len(loader)
        n_batches = int(engine.all_reduce_max(torch.tensor(min(len(loader), limit), device=engine.device)))
        engine.model.eval()
        tally = EvalTally(self.cfg, engine.device)
        batches, filler = iter(loader), None
        for _ in range(n_batches):
            batch = next(batches, None)
            if batch is None:  # this rank ran out: a filler forward keeps sharded engines' collectives in step
                engine.forward(model_inputs(filler))
                continue
            batch = self._to_device(batch)
            filler = filler if filler is not None else batch
            tally.add(engine.forward(model_inputs(batch)), batch, self.causal)
        engine.model.train()
        return tally.result(engine)

    # --- loop ------------------------------------------------------------------
    def resume_if_requested(self) -> None:
        path = ckpt.resume_checkpoint(self.run_dir, self.cfg.train.resume, self.state.model_name)
        if path is None:
            return
        self.state = ckpt.load_checkpoint(self.engine, path)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", path, self.state.step,
                 self.state.epoch, self.state.batches_in_epoch)

    def save(self) -> None:
        """Checkpoint this step once (a periodic and a preemption save can fall on the same step)."""
        if self.last_saved_step != self.state.step:
            ckpt.save_checkpoint(self.engine, self.state, self.run_dir, self.cfg.checkpoint.save_total_limit)
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

    def _maybe_inject_fault(self) -> None:
        """Test hook: DIST_TUNE_KILL_AT_STEP=N SIGKILLs rank DIST_TUNE_KILL_RANK (0) after step N, once per run dir."""
        kill_at = int(os.environ.get("DIST_TUNE_KILL_AT_STEP", "0"))
        marker = self.run_dir / f"fault_injected_at_{kill_at}"
        if kill_at != self.state.step or self.engine.env.rank != int(os.environ.get("DIST_TUNE_KILL_RANK", "0")):
            return
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def train(self) -> dict[str, Any]:
        """Run to total_steps (or early stop / preemption); returns the run summary."""
        total = self.total_steps
        it = self._epoch_iterator()
        history: dict[str, Any] = {"stopped": "completed"}
        last_step_time = time.perf_counter()
        while self.state.step < total:
            micro, it, wait = self._next_micro_batches(it)
            result = self.train_step(micro)
            result.data_wait_s = wait
            self.state.step += 1
            self._track_bad_step(result)
            elapsed, last_step_time = time.perf_counter() - last_step_time, time.perf_counter()
            if self._should(self.cfg.log.log_steps) or self.state.step in (1, total):
                self.metrics.log(self.state.step, self.train_metrics(result, elapsed))
            history["final_train_loss"] = result.loss
            if self._should(self.cfg.train.eval_steps) or self.state.step == total:
                evaluation = self.evaluate()
                self.metrics.log(self.state.step, evaluation)
                history.update({f"final_{k.replace('/', '_')}": v for k, v in evaluation.items()})
                if self._after_eval(evaluation):
                    history["stopped"] = "early_stopping"
                    self.save()
                    break
            if self._should(self.cfg.checkpoint.save_steps) and self.state.step < total:
                self.save()
            self._maybe_inject_fault()
            if self.preemption is not None and self.preemption.should_stop(self.engine.device):
                history["stopped"] = "preempted"
                self.save()
                break
        history.update(steps=self.state.step, total_steps=total, skipped_steps=self.state.skipped_steps)
        return history


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


class EvalTally:
    """Sums of loss/targets (and a confusion matrix for classification), reduced across ranks at the end."""

    def __init__(self, cfg: Config, device: torch.device):
        self.task = cfg.model.task
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

    def result(self, engine: Engine) -> dict[str, float]:
        loss_sum_, count = engine.all_reduce_sum(self.loss).tolist()
        loss = loss_sum_ / max(count, 1.0)
        result = {"eval/loss": loss}
        if self.task == "causal_lm":
            result["eval/perplexity"] = math.exp(min(loss, 50.0))
        if self.task == "classification":
            result.update(classification_metrics(engine.all_reduce_sum(self.confusion)))
        return result


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from a (true, predicted) confusion matrix."""
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    present = confusion.sum(1) > 0
    return {"eval/accuracy": float(tp.sum() / confusion.sum().clamp(min=1)),
            "eval/f1": float(f1[present].mean()) if present.any() else 0.0}
