"""DistributedDataParallel: full replicas, gradients all-reduced (averaged) on the last micro-step."""
from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_tune.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    name = "ddp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self) -> torch.nn.Module:
        return self.model.module

    def no_sync(self, is_last_micro_step: bool):
        return super().no_sync(True) if is_last_micro_step else self.model.no_sync()
