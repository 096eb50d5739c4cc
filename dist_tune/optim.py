"""Optimizer and learning-rate schedule factories built from the config."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from dist_tune.config import OptimConfig


def optimizer_factory(cfg: OptimConfig) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    return build


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Linear warmup to 1, then constant, linear or cosine decay to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def scheduler_factory(cfg: OptimConfig, total_steps: int):
    warmup = warmup_steps(cfg, total_steps)

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
            step, warmup=warmup, total=total_steps, kind=cfg.scheduler, min_ratio=cfg.min_lr_ratio))
    return build
