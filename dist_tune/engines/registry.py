"""Engine registry: the only place that branches on `engine.kind`."""
from __future__ import annotations

import torch

from dist_tune.cluster import ClusterEnv
from dist_tune.config import Config
from dist_tune.engines.base import Engine
from dist_tune.errors import UserError


def check_replicate_degree(cfg: Config, world_size: int) -> None:
    if world_size % cfg.engine.replicate_degree:
        raise UserError(f"engine.replicate_degree={cfg.engine.replicate_degree} does not divide the world size "
                        f"{world_size}; set it to a divisor, usually the number of nodes")


def check_single_process(cfg: Config, world_size: int) -> None:
    if cfg.engine.kind == "single" and world_size > 1:
        raise UserError(f"engine.kind=single cannot run in {world_size} processes; use ddp, fsdp or deepspeed")


def build_engine(cfg: Config, env: ClusterEnv, device: torch.device) -> Engine:
    kind = cfg.engine.kind
    if kind in ("ddp", "fsdp") and env.launcher == "single":
        raise UserError(f"engine.kind={kind} needs a process group; launch with torchrun (launch/torchrun_local.sh, "
                        "--nproc_per_node 1 is fine) or use engine.kind=single")
    check_single_process(cfg, env.world_size)
    check_replicate_degree(cfg, env.world_size)
    if kind == "single":
        from dist_tune.engines.single import SingleEngine
        return SingleEngine(cfg, env, device)
    if kind == "ddp":
        from dist_tune.engines.ddp import DDPEngine
        return DDPEngine(cfg, env, device)
    if kind == "fsdp":
        from dist_tune.engines.fsdp import FSDPEngine
        return FSDPEngine(cfg, env, device)
    from dist_tune.engines.deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(cfg, env, device)
