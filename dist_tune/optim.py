"""Optimizer and learning-rate schedule factories built from the config."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch

from dist_tune.config import OptimConfig

log = logging.getLogger(__name__)


def optimizer_factory(cfg: OptimConfig, *, fused: bool = False,
                      cpu_adam: bool = False) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    """SGD, or AdamW: torch's fused kernel (`fused`: parameters and states on a GPU), DeepSpeedCPUAdam (`cpu_adam`:
    states DeepSpeed offloads to the host), else torch's foreach implementation."""
    def build(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if cfg.name == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
        adam = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        if cpu_adam:
            return deepspeed_cpu_adam(groups, **adam)
        return torch.optim.AdamW(groups, **adam, **({"fused": True} if fused else {"foreach": True}))
    return build


def cpu_adam_build_dir() -> Path:
    """Where torch's JIT extension loader keeps DeepSpeed's cpu_adam op."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("cpu_adam", verbose=False))


def deepspeed_cpu_adam(groups: list[dict[str, Any]], **adam) -> torch.optim.Optimizer:
    """DeepSpeed's multi-threaded, vectorised C++ AdamW; its op is compiled on first use (cached afterwards)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    build_dir = cpu_adam_build_dir()
    if not list(build_dir.glob("cpu_adam*.so")):
        log.warning("compiling DeepSpeed's cpu_adam op for engine.offload_optimizer (once, a few minutes; cached in "
                    "%s)", build_dir)
    return DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)


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
