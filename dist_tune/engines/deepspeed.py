"""DeepSpeed ZeRO 1/2/3 (+ CPU offload) with a torch optimizer and a config whose "auto" values come from ours."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from functools import partial
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import torch

from dist_tune import init_weights
from dist_tune.checkpoint import read_state
from dist_tune.config import Config
from dist_tune import zero3
from dist_tune.engines.base import Engine, OptimizerFactory, SchedulerFactory, param_groups
from dist_tune.engines.parallelize import apply_common
from dist_tune.errors import UserError
from dist_tune.hf_save import FullTensor
from dist_tune.models import load_weights

TEMPLATES = Path(__file__).resolve().parent.parent / "ds_configs"
# How many hidden² parameters ZeRO-3 keeps gathered at once, per engine.shard_unit: about two decoder blocks
# (~12 hidden² each), or about one linear layer (an MLP projection is ~3 hidden²; DeepSpeed still gathers a larger
# module whole). DeepSpeed's default (1e9 parameters) keeps a whole 1B model gathered from the second step on.
LIVE_HIDDEN_SQUARES = {"block": 24, "linear": 3}
TAG = "state"
UNIVERSAL = "deepspeed_universal"


def template_path(cfg: Config) -> Path:
    if cfg.engine.ds_config:
        path = Path(cfg.engine.ds_config)
        if not path.is_file():
            raise UserError(f"engine.ds_config '{path}' not found; pass a DeepSpeed JSON file or leave it unset")
        return path
    return TEMPLATES / f"zero{cfg.engine.zero_stage}.json"


def _resolve(section: dict, key: str, value: Any, where: str, why: str = "") -> None:
    """Fill an "auto" value; an explicit value that disagrees with the dist_tune config is an error."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise UserError(f"DeepSpeed config sets {where}={current!r} but the dist_tune config implies {value!r}"
                        f"{why}; set it to \"auto\" in the JSON and configure it once in dist_tune")


def ds_config(cfg: Config, world_size: int, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON with every batch/precision/clipping/ZeRO value derived from the dist_tune config."""
    path = template_path(cfg)
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"engine.ds_config '{path}' is not valid JSON (line {exc.lineno}); fix the file") from None
    micro, gas = cfg.train.micro_batch_size, cfg.train.grad_accum
    _resolve(conf, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu")
    _resolve(conf, "gradient_accumulation_steps", gas, "gradient_accumulation_steps")
    _resolve(conf, "train_batch_size", micro * gas * world_size, "train_batch_size",
             f" (train.micro_batch_size {micro} × train.grad_accum {gas} × world size {world_size})")
    _resolve(conf, "gradient_clipping", float(cfg.optim.max_grad_norm or 0.0), "gradient_clipping")
    for precision in ("bf16", "fp16"):
        conf.setdefault(precision, {})
        _resolve(conf[precision], "enabled", cfg.engine.mixed_precision == precision, f"{precision}.enabled")
    zero = conf.setdefault("zero_optimization", {})
    _resolve(zero, "stage", cfg.engine.zero_stage, "zero_optimization.stage")
    if cfg.engine.replicate_degree > 1:  # ZeRO++ hpZ: a secondary parameter partition within each group
        _resolve(zero, "zero_hpz_partition_size", world_size // cfg.engine.replicate_degree,
                 "zero_optimization.zero_hpz_partition_size",
                 f" (world size {world_size} / engine.replicate_degree {cfg.engine.replicate_degree})")
    on_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    live = LIVE_HIDDEN_SQUARES[cfg.engine.shard_unit] * hidden_size * hidden_size
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size),
                       ("stage3_max_live_parameters", live),
                       ("stage3_max_reuse_distance", live),
                       ("overlap_comm", on_gpu)):  # overlapping needs a GPU's side streams
        if zero.get(key) == "auto":
            zero[key] = value
    offloads = {"offload_optimizer": cfg.engine.offload_optimizer, "offload_param": cfg.engine.offload_params}
    for key, wanted in offloads.items():
        if wanted:
            zero.setdefault(key, {"device": "cpu", "pin_memory": on_gpu})
    if "offload_optimizer" in zero or "offload_param" in zero:
        conf["zero_force_ds_cpu_optimizer"] = False
    conf.setdefault("zero_allow_untested_optimizer", True)
    return conf


def full_value(p: torch.Tensor) -> torch.Tensor:
    """A parameter or buffer whole: a trainable parameter's fp32 master (the module holds a bf16/fp16 copy under
    mixed precision), a frozen ZeRO-3 parameter gathered from its partitions, anything else as the module holds it.
    Collective under ZeRO: every rank calls it for the same tensor."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(p) if p.requires_grad else None
    if master is not None:
        return master
    if zero3.is_partitioned(p):
        return zero3.gathered(p)
    return p.detach()


def to_universal(ckpt_dir: Path) -> Path:
    """The ZeRO checkpoint in `ckpt_dir` converted by DeepSpeed's ds_to_universal into its universal format, which
    loads at any world size; written once beside it (tmp dir, then rename) and reused. Call on one rank."""
    out = ckpt_dir / UNIVERSAL
    if not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal.main(SimpleNamespace(
            input_folder=str(ckpt_dir / "deepspeed" / TAG), output_folder=str(tmp / TAG), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        os.replace(tmp, out)
    return out


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: Config, env, device: torch.device) -> None:
        super().__init__(cfg, env, device)
        self.scaler = None  # DeepSpeed's fp16 optimizer does its own loss scaling
        ds_config(cfg, env.world_size, hidden_size=1024)  # fail fast on a JSON that contradicts the config

    shards_state = True

    def construction(self, hf_config) -> contextlib.AbstractContextManager:
        """ZeRO-3 builds the model partitioned (zero.Init), so no rank holds it whole; prepare() loads the weights."""
        if self.cfg.engine.zero_stage != 3:
            return contextlib.nullcontext()
        return zero3.partitioned_construction(ds_config(self.cfg, self.env.world_size, hf_config.hidden_size))

    def prepare(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory,
                scheduler_factory: SchedulerFactory) -> None:
        import deepspeed

        if init_weights.built_empty(model):
            load_weights(model, self.cfg, zero3.read_checkpoint)
        apply_common(model, self.cfg, self.device)
        self.saved_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        hidden = getattr(getattr(model, "config", None), "hidden_size", 1024)
        self.ds_config = ds_config(self.cfg, self.env.world_size, hidden)
        optimizer = optimizer_factory(param_groups(model, self.cfg.optim.weight_decay))
        scheduler = scheduler_factory(optimizer)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False, args=SimpleNamespace(device_rank=self.device_rank()))
        self.scheduler = self.scheduler or scheduler

    def device_rank(self) -> int:
        """The GPU index this process was given (DeepSpeed would take LOCAL_RANK, wrong under `srun
        --gpus-per-task=1`, where each task sees one GPU); LOCAL_RANK on CPU, where -1 would mean world size 1."""
        return self.device.index if self.device.type == "cuda" else self.env.local_rank

    def unwrap(self) -> torch.nn.Module:
        return self.model.module

    def autocast(self):
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def no_sync(self, is_last_micro_step: bool):
        """DeepSpeed reduces (ZeRO-1) and may update only at the accumulation boundary it is told about."""
        self.model.set_gradient_accumulation_boundary(is_last_micro_step)
        return super().no_sync(is_last_micro_step)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.grad_sum_factor(), scale_wrt_gas=False)

    @property
    def handles_overflow(self) -> bool:
        return self.cfg.engine.mixed_precision == "fp16"

    def step(self, skip: bool = False) -> float:
        """DeepSpeed clips, steps optimizer and scheduler and zeroes the gradients at the boundary set for the last
        micro-batch; returns its grad norm. It cannot skip an update: `skip` relies on its own fp16 overflow check."""
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def current_lr(self) -> float:
        return float(self.model.get_lr()[0])

    def _frozen(self) -> bool:
        return any(not p.requires_grad for p in self.unwrap().parameters())

    def save(self, ckpt_dir: Path) -> None:
        self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag=TAG, save_latest=False,
                                   exclude_frozen_parameters=self._frozen())

    def load(self, ckpt_dir: Path) -> None:
        """A checkpoint saved at another world size loads through its universal conversion (rank 0 converts)."""
        load_dir = ckpt_dir / "deepspeed"
        if read_state(ckpt_dir).world_size != self.env.world_size:
            if self.env.rank == 0:
                to_universal(ckpt_dir)
            self.barrier()
            load_dir = ckpt_dir / UNIVERSAL
            self.model._config.load_universal_checkpoint = True
        path, _ = self.model.load_checkpoint(str(load_dir), tag=TAG, load_module_strict=not self._frozen())
        if path is None:
            raise UserError(f"DeepSpeed checkpoint in '{ckpt_dir}' could not be loaded; "
                            "remove it or set train.resume=none")

    def full_tensor(self, name: str, tensor: torch.Tensor) -> FullTensor:
        """Saved in the dtype it had before DeepSpeed cast the module (as the other engines save it)."""
        return FullTensor(name, tuple(init_weights.full_shape(tensor)),
                          self.saved_dtypes.get(name, tensor.dtype), partial(full_value, tensor))

    def local_state_bytes(self) -> dict[str, int]:
        params = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in self.unwrap().parameters())
        optim = 0
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for state in inner.state.values():
            optim += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
        master = getattr(self.optimizer, "single_partition_of_fp32_groups", None) or \
            getattr(self.optimizer, "fp32_partitioned_groups_flat", None) or []
        optim += sum(t.numel() * t.element_size() for t in master)
        return {"param_bytes": params, "optim_bytes": optim}
