"""FSDP2: `fully_shard` on every decoder block, then the root; DCP sharded checkpoints."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from dist_tune.engines.base import AUTOCAST, Engine, OptimizerFactory, SchedulerFactory, param_groups
from dist_tune.engines.parallelize import apply_common
from dist_tune.errors import UserError
from dist_tune.models import decoder_layers


def apply_fsdp(model: torch.nn.Module, *, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               cpu_offload: bool) -> None:
    """Shard each decoder block as its own unit, then the root (embeddings, norm, head)."""
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def canonical_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without alias keys of shared modules (e.g. peft prompt tuning's `word_embeddings`)."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in names}


def placement(device: torch.device, cpu_offload: bool) -> tuple[torch.device, torch.device]:
    """(parameter device, buffer device). Offloaded parameters live on the CPU and FSDP copies each unit to
    the GPU for compute; buffers (e.g. rotary inv_freq) are not FSDP's to move, so they stay on `device`."""
    return (torch.device("cpu") if cpu_offload else device), device


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Buffers are neither sharded nor all saved (e.g. rotary inv_freq); copy rank 0's to the meta-built ranks,
    on the buffers' own device (the GPU, over NCCL, with or without CPU offload)."""
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


class FSDPEngine(Engine):
    name = "fsdp"
    shards_state = True

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        if cfg.engine.cpu_offload and self.device.type != "cuda":
            raise UserError("engine.cpu_offload moves FSDP shards from GPU to host memory, and this run has no GPU; "
                            "unset engine.cpu_offload")

    def init_device(self) -> torch.device:
        """Only rank 0 materialises the full model; the others build it on meta and receive shards."""
        return torch.device("cpu") if self.env.rank == 0 else torch.device("meta")

    def prepare(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory,
                scheduler_factory: SchedulerFactory) -> None:
        full_state = canonical_state(model) if self.env.rank == 0 else None
        apply_common(model, self.cfg)
        apply_fsdp(model, param_dtype=AUTOCAST.get(self.cfg.engine.mixed_precision),
                   reshard_after_forward=self.cfg.engine.reshard_after_forward, cpu_offload=self.cfg.engine.cpu_offload)
        param_device, buffer_device = placement(self.device, self.cfg.engine.cpu_offload)
        if self.env.rank == 0:
            model.to(param_device)
        else:
            model.to_empty(device=param_device)
        set_model_state_dict(model, full_state or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, cpu_offload=self.cfg.engine.cpu_offload, strict=False))
        move_buffers(model, buffer_device)  # after loading: the state dict must sit on one device
        broadcast_buffers(model)
        self.model = model
        self.optimizer = optimizer_factory(param_groups(model, self.cfg.optim.weight_decay))
        self.scheduler = scheduler_factory(self.optimizer)

    def autocast(self):
        return contextlib.nullcontext()

    def grad_sum_factor(self) -> float:
        return float(self.env.world_size)

    def no_sync(self, is_last_micro_step: bool):
        self.model.set_requires_gradient_sync(is_last_micro_step)
        return super().no_sync(is_last_micro_step)

    def _options(self) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=True)

    def save(self, ckpt_dir: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(ckpt_dir / "dcp"))
        if self.env.rank == 0:
            (ckpt_dir / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            torch.save(self.scaler_state(), ckpt_dir / "scaler.pt")

    def load(self, ckpt_dir: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt_dir / "dcp"))
        # dcp.load already failed on any trainable key missing from the checkpoint; frozen keys are absent
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        self.scheduler.load_state_dict(json.loads((ckpt_dir / "scheduler.json").read_text()))
        self.load_scaler_state(torch.load(ckpt_dir / "scaler.pt", weights_only=True))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.env.rank == 0 else None
