"""One device, no parallelism; also the base for DDP."""
from __future__ import annotations

from pathlib import Path

import torch

from dist_tune.engines.base import Engine, OptimizerFactory, SchedulerFactory, param_groups
from dist_tune.engines.parallelize import apply_common, load_trainable_state, trainable_state


class SingleEngine(Engine):
    name = "single"

    def prepare(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory,
                scheduler_factory: SchedulerFactory) -> None:
        if not getattr(model, "hf_device_map", None):  # quantised models were placed at load time
            model.to(self.device)
        apply_common(model, self.cfg, self.device)
        self.model = self.wrap(model)
        self.optimizer = optimizer_factory(param_groups(self.unwrap(), self.cfg.optim.weight_decay))
        self.scheduler = scheduler_factory(self.optimizer)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def save(self, ckpt_dir: Path) -> None:
        if self.env.rank == 0:
            torch.save({"model": trainable_state(self.unwrap()), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), **self.scaler_state()}, ckpt_dir / "engine_state.pt")

    def load(self, ckpt_dir: Path) -> None:
        state = torch.load(ckpt_dir / "engine_state.pt", map_location=self.device, weights_only=True)
        load_trainable_state(self.unwrap(), state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_scaler_state(state)
