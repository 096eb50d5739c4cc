"""Typed, nested run configuration: YAML files plus dotted overrides; unknown keys are errors."""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_tune.errors import UserError

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A problem with the user's configuration; its message is one actionable line."""


@dataclass
class ModelConfig:
    name_or_path: str = "tiny-llama"
    revision: str = "main"
    task: str = "causal_lm"
    num_labels: int = 2
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    max_position_embeddings: int | None = None
    trust_remote_code: bool = False


@dataclass
class SourceConfig:
    """One source of a data.sources mixture; a field left null takes the data section's value."""
    path: str | None = None
    weight: float = 1.0
    format: str | None = None
    config: str | None = None
    split: str | None = None
    data_files: list[str] | None = None
    validation_path: str | None = None
    text_field: str | None = None
    instruction_field: str | None = None
    input_field: str | None = None
    output_field: str | None = None
    label_field: str | None = None
    prompt_template: str | None = None
    messages_field: str | None = None
    train_on: str | None = None


@dataclass
class DataConfig:
    path: str = "bundled:instructions"
    format: str = "instruction"
    config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    validation_path: str | None = None
    validation_split: float = 0.1
    max_length: int = 256
    pack: bool = False
    padding_free: bool | str = "auto"
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    label_field: str = "label"
    label_names: list[str] | None = None
    prompt_template: str = "alpaca"
    messages_field: str = "auto"
    train_on: str = "assistant"
    num_workers: int = 0
    pin_memory: bool = False
    cache_dir: str | None = None
    num_proc: int | None = None
    sources: list[SourceConfig] = field(default_factory=list)


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
    mixed_precision: str = "auto"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    ds_config: str | None = None
    reshard_after_forward: bool = True
    shard_unit: str = "block"
    sync_each_batch: bool = True
    cpu_offload: bool = False
    replicate_degree: int = 1
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
    chunked_loss: bool = True
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
    max_shard_size: str = "1GB"
    verify: bool = True


@dataclass
class EvalConfig:
    generate_samples: int = 0
    max_new_tokens: int = 64


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
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every value, except the unset (null) fields of data.sources entries."""
        data = dataclasses.asdict(self)
        data["data"]["sources"] = [{k: v for k, v in s.items() if v is not None} for s in data["data"]["sources"]]
        return data


CHOICES = {
    "model.task": ("causal_lm", "classification", "regression"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.padding_free": ("auto", True, False),
    "data.format": ("text", "instruction", "classification", "chat"),
    "data.train_on": ("assistant", "last_assistant", "all"),
    "peft.method": ("full", "lora", "dora", "prefix_tuning", "prompt_tuning", "ia3", "adapter", "freeze"),
    "engine.kind": ("single", "ddp", "fsdp", "deepspeed"),
    "engine.mixed_precision": ("auto", "fp32", "bf16", "fp16"),
    "engine.zero_stage": (1, 2, 3),
    "engine.shard_unit": ("block", "linear"),
    "optim.name": ("adamw", "sgd"),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "train.nan_policy": ("skip", "stop"),
    "train.early_stopping_mode": ("min", "max"),
    "log.wandb.mode": ("auto", "online", "offline", "disabled"),
}


VIRTUAL_TOKEN_METHODS = ("prefix_tuning", "prompt_tuning")
# peft methods whose trainable weights peft keeps in float32 over a lower-precision base (not LLaMA-Adapter's
# adaption prompts, which take the base's dtype)
FP32_ADAPTER_METHODS = ("lora", "dora", "ia3", "prefix_tuning", "prompt_tuning")


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
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return _sections(value, args[0], key)
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


def _sections(value: Any, cls: type, key: str) -> list[Any]:
    """A list of `cls` sections from a list of mappings (on the command line, a YAML string of one)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"config key '{key}' is not valid YAML; give a list of mappings, e.g. "
                              "'[{path: a.jsonl, weight: 3}, {path: b.jsonl}]'") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"config key '{key}' expects a list of mappings, e.g. [{{path: a.jsonl, weight: 3}}], "
                          f"got {value!r}")
    sections = [cls() for _ in value]
    for i, (section, item) in enumerate(zip(sections, value)):
        _merge(section, item, f"{key}[{i}].")
    return sections


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> list[str]:
    """Set `updates` (nested mappings) on the dataclass `obj`; returns the dotted keys it set."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    keys = []
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key '{key}'{_closest(name, names)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping, not {value!r}")
            keys += _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))
            keys.append(key)
    return keys


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
            words = ", ".join(map(_yaml_word, options))
            raise ConfigError(f"config key '{dotted}' is {value!r}; choose one of {words}")
    checks = [
        (cfg.train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (cfg.train.ce_chunk_tokens >= 0, "train.ce_chunk_tokens must be >= 0 (0: sized from the vocabulary)"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.data.max_length >= 8, "data.max_length must be >= 8"),
        (0.0 <= cfg.data.validation_split < 1.0, "data.validation_split must be in [0, 1)"),
        (cfg.data.num_proc is None or cfg.data.num_proc >= 1,
         "data.num_proc must be >= 1 or null (the CPUs available)"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1 or null"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (cfg.eval.generate_samples >= 0, "eval.generate_samples must be >= 0 (0 turns generation metrics off)"),
        (cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1"),
        (re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", cfg.checkpoint.max_shard_size, re.IGNORECASE) is not None,
         f"checkpoint.max_shard_size={cfg.checkpoint.max_shard_size!r} is not a size; write it like 1GB or 500MB"),
        (not (cfg.model.task == "causal_lm" and "classification" in data_formats(cfg)),
         "data.format=classification needs model.task=classification or regression"),
        (not (cfg.model.task != "causal_lm" and data_formats(cfg) != {"classification"}),
         f"model.task={cfg.model.task} needs data.format=classification"),
        (not ((cfg.engine.offload_optimizer or cfg.engine.offload_params) and cfg.engine.kind != "deepspeed"),
         "engine.offload_optimizer/offload_params are DeepSpeed options; set engine.kind=deepspeed or use engine.cpu_offload with fsdp"),
        (not (cfg.engine.cpu_offload and cfg.engine.kind != "fsdp"),
         "engine.cpu_offload is an FSDP option; set engine.kind=fsdp or use offload_optimizer with deepspeed"),
        (cfg.engine.sync_each_batch or cfg.engine.kind == "fsdp",
         "engine.sync_each_batch=false is an FSDP option (DDP and DeepSpeed reduce at the last micro-batch already); "
         "remove it or set engine.kind=fsdp"),
        (not (cfg.engine.offload_params and cfg.engine.zero_stage != 3),
         "engine.offload_params needs engine.zero_stage=3"),
        (cfg.engine.shard_unit == "block" or shards_parameters(cfg),
         "engine.shard_unit=linear sets how much of a sharded model is gathered at once; it needs engine.kind=fsdp, "
         "or deepspeed with engine.zero_stage=3; remove it"),
        (cfg.engine.replicate_degree >= 1, "engine.replicate_degree must be >= 1"),
        (cfg.engine.replicate_degree == 1 or shards_parameters(cfg),
         "engine.replicate_degree (hierarchical sharding) needs engine.kind=fsdp, or deepspeed with "
         "engine.zero_stage=3; set engine.replicate_degree=1"),
        (not (cfg.data.padding_free is True and cfg.model.task != "causal_lm"),
         "data.padding_free concatenates causal-LM rows; set data.padding_free=false for classification"),
        (not (flattened(cfg) and cfg.peft.method in VIRTUAL_TOKEN_METHODS),
         f"peft.method={cfg.peft.method} puts virtual tokens in front of the whole row, so examples sharing a row "
         "cannot be kept apart; set data.pack=false and data.padding_free=false"),
        (not (cfg.peft.load_in_4bit and cfg.peft.method not in ("lora", "dora")),
         "peft.load_in_4bit (QLoRA) needs peft.method=lora or dora"),
        (not (cfg.peft.load_in_4bit and cfg.engine.kind in ("fsdp", "deepspeed")),
         f"peft.load_in_4bit (QLoRA) cannot be sharded by engine.kind={cfg.engine.kind}; use engine.kind=single "
         "or ddp, or drop peft.load_in_4bit"),
    ]
    for ok, message in checks + _source_checks(cfg):
        if not ok:
            raise ConfigError(message)
    return cfg


def _source_checks(cfg: Config) -> list[tuple[bool, str]]:
    checks = [(not (cfg.data.sources and cfg.data.validation_path),
               "data.validation_path does not apply to data.sources; set validation_path on each source instead")]
    for i, source in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        checks += [
            (bool(source.path), f"{key} has no path; give every source a path (a file, directory, hf:NAME or "
                                "bundled:NAME)"),
            (source.weight > 0, f"{key}.weight is {source.weight:g}; give every source a weight > 0"),
            (source.format in (None, *CHOICES["data.format"]),
             f"{key}.format is {source.format!r}; choose one of {', '.join(CHOICES['data.format'])}"),
            (source.train_on in (None, *CHOICES["data.train_on"]),
             f"{key}.train_on is {source.train_on!r}; choose one of {', '.join(CHOICES['data.train_on'])}"),
        ]
    return checks


def data_formats(cfg: Config) -> set[str]:
    """The formats the run's data comes in: each data.sources entry's (default data.format), else data.format."""
    return {source.format or cfg.data.format for source in cfg.data.sources} or {cfg.data.format}


def _yaml_word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def padding_free_blocker(cfg: Config, attention_window: int | None = None) -> str | None:
    """Why this run cannot use padding-free rows (None: it can); attention_window: the model's sliding window."""
    if cfg.model.task != "causal_lm":
        return f"model.task={cfg.model.task} batches whole sequences, not concatenated causal-LM rows"
    if cfg.peft.method in VIRTUAL_TOKEN_METHODS:
        return f"peft.method={cfg.peft.method} puts virtual tokens in front of the whole row"
    if attention_window and attention_window < cfg.data.max_length:
        return (f"the model's sliding attention window ({attention_window} tokens) is shorter than "
                f"data.max_length={cfg.data.max_length}")
    return None


def padding_free(cfg: Config) -> bool:
    """data.padding_free, with `auto` on wherever it is valid (as far as the config alone tells)."""
    if cfg.data.padding_free == "auto":
        return padding_free_blocker(cfg) is None
    return cfg.data.padding_free


def resolve_padding_free(cfg: Config, attention_window: int | None) -> None:
    """Settle data.padding_free=auto now that the model's attention window is known; say why when it is off."""
    if cfg.data.padding_free != "auto":
        return
    blocker = padding_free_blocker(cfg, attention_window)
    cfg.data.padding_free = blocker is None
    if blocker:
        log.info("data.padding_free=auto is off: %s", blocker)


def resolve_precision(cfg: Config, bf16: bool) -> Config:
    """Replace `auto` in engine.mixed_precision and model.dtype; bf16: the run's device computes in bfloat16.

    mixed_precision: bf16 where the device supports it, else fp32. model.dtype: bfloat16 for peft methods that
    keep their trainable weights in float32 (frozen base in bf16) when computing in bf16, float32 otherwise
    (full tuning keeps fp32 master weights under bf16 autocast / FSDP param_dtype)."""
    if cfg.engine.mixed_precision == "auto":
        cfg.engine.mixed_precision = "bf16" if bf16 else "fp32"
    if cfg.model.dtype == "auto":
        frozen_bf16 = cfg.engine.mixed_precision == "bf16" and cfg.peft.method in FP32_ADAPTER_METHODS
        cfg.model.dtype = "bfloat16" if frozen_bf16 else "float32"
    return cfg


def qlora_compute_dtype(cfg: Config) -> str:
    """The dtype a 4-bit (QLoRA) base computes in, and an unquantised copy of it is merged in: model.dtype when it
    is 16-bit, else bfloat16."""
    return cfg.model.dtype if cfg.model.dtype in ("bfloat16", "float16") else "bfloat16"


def bf16_device(device) -> bool:
    """True for a CUDA device that computes in bfloat16 (Ampere and later); CPUs train in fp32."""
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def shards_parameters(cfg: Config) -> bool:
    """FSDP and ZeRO-3 shard the weights themselves (each rank builds, loads and gathers only its share); every
    other engine holds the whole model in each process."""
    return cfg.engine.kind == "fsdp" or (cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage == 3)


def flattened(cfg: Config) -> bool:
    """Micro-batches are one padding-free row: data.padding_free, or packed rows (data.pack)."""
    return cfg.model.task == "causal_lm" and (padding_free(cfg) or cfg.data.pack)


LOGITS_CHUNK_BYTES = 128 * 2**20
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # applied after the head


def loss_chunk_positions(cfg: Config, hf_config) -> int:
    """Positions per chunk of the LM head and loss (train.chunked_loss): train.ce_chunk_tokens, or as many as
    make LOGITS_CHUNK_BYTES of fp32 logits; 0 where the loss needs the model's whole logits (another task, or a
    model that transforms its logits after the head)."""
    if cfg.model.task != "causal_lm" or not cfg.train.chunked_loss:
        return 0
    if any(getattr(hf_config, name, None) for name in LOGIT_TRANSFORMS):
        return 0
    return cfg.train.ce_chunk_tokens or max(1, LOGITS_CHUNK_BYTES // (4 * hf_config.vocab_size))


def uses_target_logits(cfg: Config) -> bool:
    """Logits only where there is a target (prompt tuning prepends virtual tokens, which shifts positions)."""
    return cfg.model.task == "causal_lm" and cfg.train.target_logits_only and cfg.peft.method != "prompt_tuning"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from defaults, an optional YAML file and dotted overrides, then validate it."""
    return load_with_sources(path, overrides)[0]


def load_with_sources(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                      label: str | None = None) -> tuple[Config, dict[str, str]]:
    """load_config, plus which layer last set each dotted key: `label` (default: the YAML path) or "command line"."""
    cfg, sources = Config(), {}
    if path is not None:
        sources.update(dict.fromkeys(_merge(cfg, read_yaml(path)), label or str(path)))
    sources.update(dict.fromkeys(_merge(cfg, _nest(overrides or {})), "command line"))
    return validate(cfg), sources


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in data.items():
        flat.update(_flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value})
    return flat


def changed_values(cfg: Config, sources: dict[str, str]) -> list[str]:
    """`key = value (source)` for every value of cfg that differs from the library default."""
    defaults = _flat(Config().to_dict())
    return [f"{key} = {value if isinstance(value, str) else json.dumps(value)} ({sources.get(key, 'resolved')})"
            for key, value in _flat(cfg.to_dict()).items() if value != defaults[key]]


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
