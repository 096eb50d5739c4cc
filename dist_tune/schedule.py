"""Schedule arithmetic: the global batch, optimizer steps per epoch and in the whole run."""
from __future__ import annotations

import math

from dist_tune.config import Config
from dist_tune.errors import UserError


def steps_per_epoch(micro_batches: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over a rank's `micro_batches` training batches (at least one, or a UserError)."""
    steps = micro_batches // grad_accum
    if steps < 1:
        raise UserError(f"the training set gives {micro_batches} micro-batches per rank, fewer than "
                        f"train.grad_accum={grad_accum}; use more data or a smaller batch")
    return steps


def global_batch(cfg: Config, world_size: int) -> int:
    """Sequences per optimizer step: micro batch × accumulation × data-parallel world size."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum * world_size


def batch_terms(cfg: Config, world_size: int) -> str:
    """The global batch's factors in words: `micro 8 × accumulation 2 × data-parallel 4`."""
    return f"micro {cfg.train.micro_batch_size} × accumulation {cfg.train.grad_accum} × data-parallel {world_size}"


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """train.max_steps, else train.epochs of `steps_per_epoch` (rounded up, at least one)."""
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
