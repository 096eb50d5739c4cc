"""The one training loop: accumulation, globally normalised loss, clipping, evaluation cadence, early stopping,
checkpoints."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dist_tune import checkpoint as ckpt
from dist_tune.config import Config
from dist_tune.data.loader import EpochBatches
from dist_tune.data.stream import StreamBatches
from dist_tune.engines.base import Engine
from dist_tune.errors import DataError, TrainingError
from dist_tune.evaluation import evaluate_model
from dist_tune.forward import forward, logit_positions, loss_sum, sequence_count, target_count, to_device
from dist_tune.memory_probe import memory_metrics, reset_peak_memory
from dist_tune.metrics import MetricsLogger
from dist_tune.preemption import PreemptionHandler

log = logging.getLogger(__name__)

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
    def run_evaluation(self) -> dict[str, float] | None:
        """Validation metrics (None when a preemption signal interrupted them); rank 0 writes the eval's confusion
        matrix and generations to the run dir."""
        evaluation = evaluate_model(self.cfg, self.engine, self.val_set, self.tokenizer,
                                    stop=self.preemption.should_stop)
        if evaluation is None:
            return None
        if self.engine.env.rank == 0:
            evaluation.write(self.run_dir)
        return evaluation.metrics

    def _evaluate_step(self, history: dict[str, Any]) -> str | None:
        """This step's evaluation: "preempted" when a signal interrupted it (the step is then checkpointed, marked
        to evaluate again on resume), "early_stopping" when patience ran out, else None."""
        evaluation = self.run_evaluation()
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
