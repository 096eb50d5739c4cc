"""FSDP2: `fully_shard` on every decoder block (or on each of its linear layers, then the block), on an untied
embedding and head, then the root; DCP sharded checkpoints."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dist_tune import init_weights
from dist_tune.engines.base import AUTOCAST, Engine, OptimizerFactory, SchedulerFactory, param_groups
from dist_tune.engines.parallelize import apply_common
from dist_tune.errors import UserError
from dist_tune.hf_save import FullTensor
from dist_tune.models import decoder_layers, load_weights
from dist_tune.safetensors_read import PositionalHFReader

log = logging.getLogger(__name__)


def fsdp_mesh(device: torch.device, world_size: int, replicate_degree: int) -> DeviceMesh:
    """1-D ("shard",) mesh, or for HSDP a 2-D ("replicate", "shard") mesh: parameters sharded within each group of
    world_size / replicate_degree ranks and replicated across the groups."""
    if replicate_degree == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate_degree, world_size // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


def linear_layers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The block's linear layers (torch Linear, transformers' Conv1D), each peft-wrapped one with its adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.pytorch_utils import Conv1D

    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in block.named_modules():
        inside_found = any(name.startswith(f"{outer}.") for outer, _ in found)
        if not inside_found and isinstance(module, (BaseTunerLayer, torch.nn.Linear, Conv1D)):
            found.append((name, module))
    return [module for _, module in found]


def untied_ends(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The input embedding and the output head, unless they share their weight (GPT-2, Llama-3.2): FSDP's root
    unit stays gathered through the whole forward and backward, so a 128k-token vocabulary would keep both
    matrices whole on every rank all step (2 GiB at Llama-3-8B's size in bf16); tied, they stay in the root."""
    if init_weights.tied_embeddings(model):
        return []
    return [end for end in (model.get_input_embeddings(), model.get_output_embeddings()) if end is not None]


def shard_units(model: torch.nn.Module, shard_unit: str) -> list[torch.nn.Module]:
    """The modules apply_fsdp shards before the root, inner ones first: each decoder block (after its linear
    layers, with shard_unit "linear"), then the untied ends."""
    units: list[torch.nn.Module] = []
    for layer in decoder_layers(model):
        units += linear_layers(layer) if shard_unit == "linear" else []
        units.append(layer)
    return units + untied_ends(model)


def apply_fsdp(model: torch.nn.Module, *, mesh: DeviceMesh, param_dtype: torch.dtype | None,
               reshard_after_forward: bool, cpu_offload: bool, shard_unit: str) -> None:
    """Shard each decoder block as its own unit (with shard_unit "linear", each of its linear layers first, so only
    one linear layer's weights are gathered at a time), the untied embedding and head each as one, then the root
    (what is left: final norm, tied embeddings)."""
    kwargs = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(model, shard_unit):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)


def read_checkpoint_shards(model: torch.nn.Module, source: Path, groups: dict[str, list[str]]) -> None:
    """Read this rank's shard of each checkpoint tensor from the HF safetensors in `source` (one file or an index of
    several) straight into the parameters' DTensors (models.checkpoint_plan says which)."""
    params = dict(model.named_parameters())
    dcp.load({key: params[names[0]] for key, names in groups.items()},
             storage_reader=PositionalHFReader(str(source)))
    with torch.no_grad():
        for names in groups.values():
            for name in names[1:]:
                params[name].to_local().copy_(params[names[0]].to_local())


def placement(device: torch.device, cpu_offload: bool) -> tuple[torch.device, torch.device]:
    """(parameter device, buffer device). Offloaded parameters live on the CPU and FSDP copies each unit to
    the GPU for compute; buffers (e.g. rotary inv_freq) are not FSDP's to move, so they stay on `device`."""
    return (torch.device("cpu") if cpu_offload else device), device


def move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))


class FSDPEngine(Engine):
    name = "fsdp"
    shards_state = True

    def __init__(self, cfg, env, device):
        super().__init__(cfg, env, device)
        if cfg.engine.cpu_offload and self.device.type != "cuda":
            raise UserError("engine.cpu_offload moves FSDP shards from GPU to host memory, and this run has no GPU; "
                            "unset engine.cpu_offload")

    def init_device(self) -> torch.device:
        """Every rank builds the model on meta; prepare() shards it, then reads or initialises only its shards."""
        return torch.device("meta")

    def prepare(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory,
                scheduler_factory: SchedulerFactory) -> None:
        apply_common(model, self.cfg, self.device)
        mesh = fsdp_mesh(self.device, self.env.world_size, self.cfg.engine.replicate_degree)
        apply_fsdp(model, mesh=mesh, param_dtype=AUTOCAST.get(self.cfg.engine.mixed_precision),
                   reshard_after_forward=self.cfg.engine.reshard_after_forward, cpu_offload=self.cfg.engine.cpu_offload,
                   shard_unit=self.cfg.engine.shard_unit)
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        log.info("FSDP mesh %s, %d units (shard_unit %s)", dict(zip(mesh.mesh_dim_names, mesh.shape)), units,
                 self.cfg.engine.shard_unit)
        param_device, buffer_device = placement(self.device, self.cfg.engine.cpu_offload)
        init_weights.materialise(model, param_device)
        move_buffers(model, buffer_device)
        load_weights(model, self.cfg, read_checkpoint_shards)
        self.model = model
        self.optimizer = optimizer_factory(param_groups(model, self.cfg.optim.weight_decay))
        self.scheduler = scheduler_factory(self.optimizer)

    def autocast(self):
        return contextlib.nullcontext()

    def no_sync(self, is_last_micro_step: bool):
        """engine.sync_each_batch: reduce-scatter every micro-batch's gradients, so only sharded gradients are kept
        (an HSDP replica all-reduce still waits for the last); otherwise keep unsharded ones until the last."""
        self.model.set_requires_gradient_sync(is_last_micro_step or self.cfg.engine.sync_each_batch)
        self.model.set_requires_all_reduce(is_last_micro_step)
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

    def full_tensor(self, name: str, tensor: torch.Tensor) -> FullTensor:
        """A sharded parameter is all-gathered (over every mesh dimension) when asked for; buffers are whole."""
        gather = tensor.detach().full_tensor if isinstance(tensor, DTensor) else tensor.detach
        return FullTensor(name, tuple(tensor.shape), tensor.dtype, gather)
