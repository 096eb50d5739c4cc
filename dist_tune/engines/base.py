"""The interface every engine implements; the trainer talks to nothing else."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from dist_tune.cluster import ClusterEnv
from dist_tune.config import Config, bf16_device, resolve_precision
from dist_tune.hf_save import FullTensor, state_tensors

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed weights and undecayed norms/biases/1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm_or_bias = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()
        (no_decay if is_norm_or_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Engine:
    """Owns the wrapped model, optimizer and scheduler; hides how gradients are synced and state is saved."""

    name = "base"
    shards_state = False

    def __init__(self, cfg: Config, env: ClusterEnv, device: torch.device):
        """`device`: this rank's device, chosen once by process_group.select_device. The engine is the
        first thing a run builds, so `auto` model.dtype / engine.mixed_precision settle here for that device."""
        self.cfg = cfg
        self.env = env
        self.device = device
        resolve_precision(cfg, bf16_device(device))
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.engine.mixed_precision == "fp16" else None

    # --- lifecycle -------------------------------------------------------
    def init_device(self) -> torch.device:
        """Where the model is built before prepare()."""
        return torch.device("cpu")

    def construction(self, hf_config) -> contextlib.AbstractContextManager:
        """Context the model is built in (ZeRO-3: partitioned as it is constructed)."""
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory,
                scheduler_factory: SchedulerFactory) -> None:
        raise NotImplementedError

    def unwrap(self) -> torch.nn.Module:
        """The HF (or peft) module with its original class and methods."""
        return self.model

    # --- step ------------------------------------------------------------
    def autocast(self):
        dtype = AUTOCAST.get(self.cfg.engine.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        with self.autocast():
            return self.model(**batch)

    def grad_sum_factor(self) -> float:
        """What the loss is multiplied by so the backend's gradient average over ranks becomes a sum (the loss
        is already normalised by the global target count): the world size (DDP, FSDP and DeepSpeed average over
        every rank; the single engine runs on one)."""
        return float(self.env.world_size)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss, accumulating gradients; the update happens in step()."""
        loss = loss * self.grad_sum_factor()
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def no_sync(self, is_last_micro_step: bool):
        """Context for one micro-batch's forward and backward: gradients are synchronised only on the last."""
        return contextlib.nullcontext()

    def clip_and_norm(self) -> torch.Tensor:
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    @property
    def handles_overflow(self) -> bool:
        """True when fp16 loss scaling skips overflowing steps itself (a non-finite grad norm is expected then)."""
        return self.scaler is not None

    def step(self, skip: bool = False) -> float:
        """Unscale (fp16), clip, step optimizer and scheduler (unless skip), zero grads; returns the grad norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = self.clip_and_norm()
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if self.scaler:
            if not skip:
                self.scaler.step(self.optimizer)  # skips the update itself on inf/nan gradients
            self.scaler.update()
        elif not skip and math.isfinite(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def scaler_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_scaler_state(self, state: dict) -> None:
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- state -------------------------------------------------------------
    def save(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: Path) -> None:
        raise NotImplementedError

    def full_tensors(self, trainable_only: bool = False) -> list[FullTensor]:
        """Every tensor of the model's saved state (trainable_only: its trainable parameters), each gathered whole
        only when asked for, in the dtype it is saved in; tied weights once. Sharded engines gather collectively:
        every rank asks for the same tensors in the same order."""
        return [self.full_tensor(name, t) for name, t in state_tensors(self.unwrap(), trainable_only).items()]

    def full_tensor(self, name: str, tensor: torch.Tensor) -> FullTensor:
        return FullTensor(name, tuple(tensor.shape), tensor.dtype, tensor.detach)

    def local_state_bytes(self) -> dict[str, int]:
        """Bytes of parameters and optimizer state held by this rank (shards counted at local size)."""
        params = sum(_local(p).numel() * _local(p).element_size() for p in self.model.parameters())
        optim = 0
        for state in self.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.ndim > 0:
                    optim += _local(value).numel() * _local(value).element_size()
        return {"param_bytes": params, "optim_bytes": optim}

    # --- collectives -------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
