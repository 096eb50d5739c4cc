"""Engine registry: the only place that branches on `engine.kind`."""
from __future__ import annotations

from dist_tune.cluster import ClusterEnv
from dist_tune.config import Config
from dist_tune.engines.base import Engine
from dist_tune.errors import UserError


def build_engine(cfg: Config, env: ClusterEnv) -> Engine:
    kind = cfg.engine.kind
    if kind in ("ddp", "fsdp") and env.world_size < 2 and not env.is_distributed:
        raise UserError(f"engine.kind={kind} needs several processes; launch with torchrun "
                        "(launch/torchrun_local.sh) or use engine.kind=single")
    if kind == "single" and env.world_size > 1:
        raise UserError(f"engine.kind=single cannot run in {env.world_size} processes; use ddp, fsdp or deepspeed")
    if kind == "single":
        from dist_tune.engines.single import SingleEngine
        return SingleEngine(cfg, env)
    if kind == "ddp":
        from dist_tune.engines.ddp import DDPEngine
        return DDPEngine(cfg, env)
    if kind == "fsdp":
        from dist_tune.engines.fsdp import FSDPEngine
        return FSDPEngine(cfg, env)
    from dist_tune.engines.deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(cfg, env)
