"""Typed, nested run configuration: YAML files plus dotted overrides; unknown keys are errors."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_tune.errors import UserError


class ConfigError(UserError):
    """A problem with the user's configuration; its message is one actionable line."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-llama"
    task: str = "causal_lm"
    num_labels: int = 2
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    max_position_embeddings: int | None = None


@dataclass
class DataConfig:
    path: str = "bundled:instructions"
    format: str = "instruction"
    validation_path: str | None = None
    validation_split: float = 0.1
    max_length: int = 256
    pack: bool = False
    padding_free: bool = False
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    label_field: str = "label"
    label_names: list[str] | None = None
    prompt_template: str = "alpaca"
    num_workers: int = 0
    pin_memory: bool = False
    cache_dir: str | None = None


@dataclass
class PeftConfig:
    method: str = "full"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int = 8
    adapter_bottleneck: int = 16
    trainable_modules: list[str] | None = None
    train_last_n_layers: int | None = None
    load_in_4bit: bool = False


@dataclass
class EngineConfig:
    kind: str = "single"
    mixed_precision: str = "fp32"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    ds_config: str | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    timeout_minutes: float = 30.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0


@dataclass
class TrainConfig:
    seed: int = 42
    micro_batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    eval_steps: int | None = None
    eval_max_batches: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "eval/loss"
    early_stopping_mode: str = "min"
    output_dir: str = "runs"
    run_name: str | None = None
    device: str = "auto"
    resume: str = "auto"
    ce_chunk_tokens: int = 0
    target_logits_only: bool = True
    nan_policy: str = "skip"
    max_bad_steps: int = 5


@dataclass
class WandbConfig:
    mode: str = "auto"
    project: str = "dist_tune"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None


@dataclass
class LogConfig:
    log_steps: int = 10
    progress: bool = True
    jsonl: bool = True
    plot: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    save_steps: int | None = None
    save_total_limit: int | None = 2
    save_final: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.task": ("causal_lm", "classification", "regression"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.format": ("text", "instruction", "classification"),
    "peft.method": ("full", "lora", "dora", "prefix_tuning", "prompt_tuning", "ia3", "adapter", "freeze"),
    "engine.kind": ("single", "ddp", "fsdp", "deepspeed"),
    "engine.mixed_precision": ("fp32", "bf16", "fp16"),
    "engine.zero_stage": (1, 2, 3),
    "optim.name": ("adamw", "sgd"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "train.nan_policy": ("skip", "stop"),
    "train.early_stopping_mode": ("min", "max"),
    "log.wandb.mode": ("auto", "online", "offline", "disabled"),
}


# Names other trainers (HF TrainingArguments, DeepSpeed) use for our keys; spelling distance cannot find these.
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
           "train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "max_seq_length": "max_length", "model_name_or_path": "name_or_path"}


def _closest(name: str, options: list[str]) -> str:
    initials = "".join(part[:1] for part in name.split("_"))  # learning_rate -> lr
    match = [m for m in (ALIASES.get(name), initials if "_" in name else None) if m in options]
    match = match or difflib.get_close_matches(name, options, n=1, cutoff=0.4)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{key}'{_closest(name, names)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping, not {value!r}")
            _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = key.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file or use a packaged recipe name")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, ...)")
    return data


def validate(cfg: Config) -> Config:
    for dotted, options in CHOICES.items():
        section, *rest = dotted.split(".")
        value = getattr(getattr(cfg, section), rest[0])
        if len(rest) == 2:
            value = getattr(value, rest[1])
        if value not in options:
            raise ConfigError(f"config key '{dotted}' is {value!r}; choose one of {', '.join(map(str, options))}")
    checks = [
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.data.max_length >= 8, "data.max_length must be >= 8"),
        (0.0 <= cfg.data.validation_split < 1.0, "data.validation_split must be in [0, 1)"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1 or null"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (not (cfg.model.task == "causal_lm" and cfg.data.format == "classification"),
         "data.format=classification needs model.task=classification or regression"),
        (not (cfg.model.task != "causal_lm" and cfg.data.format != "classification"),
         f"model.task={cfg.model.task} needs data.format=classification"),
        (not ((cfg.engine.offload_optimizer or cfg.engine.offload_params) and cfg.engine.kind != "deepspeed"),
         "engine.offload_optimizer/offload_params are DeepSpeed options; set engine.kind=deepspeed or use engine.cpu_offload with fsdp"),
        (not (cfg.engine.cpu_offload and cfg.engine.kind != "fsdp"),
         "engine.cpu_offload is an FSDP option; set engine.kind=fsdp or use offload_optimizer with deepspeed"),
        (not (cfg.engine.offload_params and cfg.engine.zero_stage != 3),
         "engine.offload_params needs engine.zero_stage=3"),
        (not (cfg.data.padding_free and cfg.model.task != "causal_lm"),
         "data.padding_free concatenates causal-LM rows; set data.padding_free=false for classification"),
        (not (flattened(cfg) and cfg.peft.method in ("prefix_tuning", "prompt_tuning")),
         f"peft.method={cfg.peft.method} puts virtual tokens in front of the whole row, so examples sharing a row "
         "cannot be kept apart; set data.pack=false and data.padding_free=false"),
        (not (cfg.peft.load_in_4bit and cfg.peft.method not in ("lora", "dora")),
         "peft.load_in_4bit (QLoRA) needs peft.method=lora or dora"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def flattened(cfg: Config) -> bool:
    """Micro-batches are one padding-free row: data.padding_free, or packed rows (data.pack)."""
    return cfg.model.task == "causal_lm" and (cfg.data.padding_free or cfg.data.pack)


def uses_target_logits(cfg: Config) -> bool:
    """Logits only where there is a target (prompt tuning prepends virtual tokens, which shifts positions)."""
    return cfg.model.task == "causal_lm" and cfg.train.target_logits_only and cfg.peft.method != "prompt_tuning"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from defaults, an optional YAML file and dotted overrides, then validate it."""
    cfg = Config()
    if path is not None:
        _merge(cfg, read_yaml(path))
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Merge dotted overrides (`{"optim.lr": 1e-4}`) into cfg and validate the result."""
    _merge(cfg, _nest(overrides))
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, data)
    return validate(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
