"""DeepSpeed ZeRO 1/2/3 (+ CPU offload) with a torch optimizer and a config whose "auto" values come from ours."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from dist_tune.config import Config
from dist_tune.engines.base import Engine, OptimizerFactory, SchedulerFactory, param_groups
from dist_tune.engines.parallelize import apply_common
from dist_tune.errors import UserError

TEMPLATES = Path(__file__).resolve().parent.parent / "ds_configs"


def template_path(cfg: Config) -> Path:
    if cfg.engine.ds_config:
        path = Path(cfg.engine.ds_config)
        if not path.is_file():
            raise UserError(f"engine.ds_config '{path}' not found; pass a DeepSpeed JSON file or leave it unset")
        return path
    offload = cfg.engine.offload_params or cfg.engine.offload_optimizer
    return TEMPLATES / ("zero3_offload.json" if offload and cfg.engine.zero_stage == 3
                        else f"zero{cfg.engine.zero_stage}.json")


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
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    if cfg.engine.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
    if cfg.engine.offload_params:
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": torch.cuda.is_available()})
    if "offload_optimizer" in zero or "offload_param" in zero:
        conf["zero_force_ds_cpu_optimizer"] = False
    conf.setdefault("zero_allow_untested_optimizer", True)
    return conf


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: Config, env) -> None:
        super().__init__(cfg, env)
        self.scaler = None  # DeepSpeed's fp16 optimizer does its own loss scaling
        ds_config(cfg, env.world_size, hidden_size=1024)  # fail fast on a JSON that contradicts the config

    shards_state = True

    def prepare(self, model: torch.nn.Module, optimizer_factory: OptimizerFactory,
                scheduler_factory: SchedulerFactory) -> None:
        import deepspeed

        apply_common(model, self.cfg)
        hidden = getattr(getattr(model, "config", None), "hidden_size", 1024)
        self.ds_config = ds_config(self.cfg, self.env.world_size, hidden)
        optimizer = optimizer_factory(param_groups(model, self.cfg.optim.weight_decay))
        scheduler = scheduler_factory(optimizer)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.scheduler = self.scheduler or scheduler

    def unwrap(self) -> torch.nn.Module:
        return self.model.module

    def autocast(self):
        return contextlib.nullcontext()

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss * self.env.world_size, scale_wrt_gas=False)
        self.model.step()

    @property
    def handles_overflow(self) -> bool:
        return self.cfg.engine.mixed_precision == "fp16"

    def step(self, skip: bool = False) -> float:
        """The update already ran inside the last micro-step's engine.step(); report its grad norm."""
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def current_lr(self) -> float:
        return float(self.model.get_lr()[0])

    def _frozen(self) -> bool:
        return any(not p.requires_grad for p in self.unwrap().parameters())

    def save(self, ckpt_dir: Path) -> None:
        self.model.save_checkpoint(str(ckpt_dir / "deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=self._frozen())

    def load(self, ckpt_dir: Path) -> None:
        path, _ = self.model.load_checkpoint(str(ckpt_dir / "deepspeed"), tag="state",
                                             load_module_strict=not self._frozen())
        if path is None:
            raise UserError(f"DeepSpeed checkpoint in '{ckpt_dir}' could not be loaded; "
                            "remove it or set train.resume=none")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.cfg.engine.zero_stage == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        if self.env.rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap().state_dict().items()}

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
