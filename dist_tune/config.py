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
    """A local HF dir, a Hub id (`gpt2`) or a preset: `tiny-llama`, `small-llama`, `llama-3.2-1b`, `llama-3-8b`."""
    revision: str = "main"
    """Branch, tag or commit of a hub id; a cached `main` is not re-checked (pin a commit to move)."""
    task: str = "causal_lm"
    """Next-token prediction, or a label per sequence (classification, regression; `data.format=classification`)."""
    num_labels: int = 2
    """Classes of a classification head (a regression head has one output)."""
    dtype: str = "auto"
    """Weight dtype; `auto`: `bfloat16` for lora, dora, ia3, prefix/prompt tuning computing in bf16, else `float32`."""
    attn_implementation: str = "sdpa"
    """`sdpa`, `eager` or `flash_attention_2` (if installed); `sdpa` on padding-free rows is dist_tune's varlen form."""
    max_position_embeddings: int | None = None
    """Replaces the model config's position limit (null: the model's own); `data.max_length` must fit in it."""
    trust_remote_code: bool = False
    """Let `from_pretrained` run a model's own Python code; off, such a model stops with one line naming this switch."""


@dataclass
class SourceConfig:
    """One source of a data.sources mixture; a field left null takes the data section's value."""
    path: str | None = None
    """This source's data, in any form `data.path` takes (required)."""
    weight: float = 1.0
    """This source's share of each training epoch, `weight / Σ weight` of its rows; must be > 0."""
    format: str | None = None
    """This source's data format (null: `data.format`)."""
    config: str | None = None
    """Dataset config of an `hf:` source (null: `data.config`)."""
    split: str | None = None
    """Split of an `hf:` source (null: `data.split`)."""
    data_files: list[str] | None = None
    """Files of an `hf:` source (null: `data.data_files`)."""
    validation_path: str | None = None
    """This source's validation data (null: its `data.validation_split` hold-out)."""
    text_field: str | None = None
    """Column of the text (null: `data.text_field`)."""
    instruction_field: str | None = None
    """Column of the instruction (null: `data.instruction_field`)."""
    input_field: str | None = None
    """Column of the optional input (null: `data.input_field`)."""
    output_field: str | None = None
    """Column of the response (null: `data.output_field`)."""
    label_field: str | None = None
    """Column of the label (null: `data.label_field`)."""
    prompt_template: str | None = None
    """Instruction prompt template (null: `data.prompt_template`)."""
    messages_field: str | None = None
    """Column of a chat row's turns (null: `data.messages_field`)."""
    train_on: str | None = None
    """Chat tokens that carry a loss (null: `data.train_on`)."""


@dataclass
class DataConfig:
    path: str = "bundled:instructions"
    """Training data: a .jsonl/.json/.csv/.parquet file or dir of them, a `save_to_disk` dir, `bundled:`, `hf:NAME`."""
    format: str = "instruction"
    """Row layout: text documents, alpaca-style instructions, text with a label, or chat conversations."""
    config: str | None = None
    """Dataset config (subset) name of `hf:` data."""
    split: str = "train"
    """Split of `hf:` data to train on; slices such as `train[:10%]` work."""
    data_files: list[str] | None = None
    """Files of `hf:` data to load (passed to `datasets.load_dataset`)."""
    validation_path: str | None = None
    """Validation data in any form `path` takes (`hf:NAME`: its `validation` split); null: `validation_split` rows."""
    validation_split: float = 0.1
    """Share of training rows held out for validation (seeded by train.seed) if `validation_path` is unset; 0: none."""
    max_length: int = 256
    """Longest tokenized row: longer rows are truncated; with `pack`, the length of a packed row."""
    pack: bool = False
    """Concatenate examples into rows of up to `max_length` tokens, positions restarting at each; padding-free."""
    padding_free: bool | str = "auto"
    """One padding-free row per micro-batch; `auto`: on for causal LMs, off for prefix/prompt tuning, short windows."""
    text_field: str = "text"
    """Column of the text (`text` and `classification` formats)."""
    instruction_field: str = "instruction"
    """Column of the instruction (`instruction` format)."""
    input_field: str = "input"
    """Column of the optional input or context (`instruction` format)."""
    output_field: str = "output"
    """Column of the response (`instruction` format)."""
    label_field: str = "label"
    """Column of the label (`classification` format): strings, integers, or floats for regression."""
    label_names: list[str] | None = None
    """Class names in label-index order (null: the data's string labels sorted, or the indices)."""
    prompt_template: str = "alpaca"
    """Instruction prompt: `alpaca`, `plain`, or a format string with `{instruction}` and optionally `{input}`."""
    messages_field: str = "auto"
    """Column of a chat row's turns; `auto`: `messages`, else `conversations`."""
    train_on: str = "assistant"
    """Chat tokens that carry a loss: every `assistant` turn, the `last_assistant` turn, or `all` tokens."""
    num_workers: int = 0
    """DataLoader worker processes (0: batches are collated in the training process)."""
    pin_memory: bool = False
    """Batches in pinned host memory, for faster host-to-GPU copies (CUDA only)."""
    cache_dir: str | None = None
    """Prepared Arrow files, local files' Arrow copies, `hf:` downloads (null: `dist_tune/` in the datasets cache)."""
    num_proc: int | None = None
    """Tokenizing processes (null: the CPUs this process may use, at most one per 2,000 rows)."""
    streaming: bool = False
    """Read, tokenize and pack rows on the fly for `hf:` datasets and local shard directories; needs train.max_steps."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A weighted mixture of sources (the `data.sources[]` table); `path` is then not read."""


@dataclass
class PeftConfig:
    method: str = "full"
    """How the model is tuned: every weight (`full`), a peft method, or `freeze` (plain tuning of chosen layers)."""
    r: int = 8
    """LoRA/DoRA rank."""
    alpha: int = 16
    """LoRA/DoRA scaling (`lora_alpha`)."""
    dropout: float = 0.0
    """LoRA/DoRA dropout on the adapter's input."""
    target_modules: list[str] | str | None = None
    """Modules LoRA, DoRA and IA3 wrap: names, `all-linear`, or null for peft's default for the architecture."""
    num_virtual_tokens: int = 8
    """Virtual tokens of prefix and prompt tuning; the adaption prompt length of `adapter`."""
    adapter_bottleneck: int = 16
    """`adapter` (LLaMA-Adapter): how many of the top layers get adaption prompts."""
    trainable_modules: list[str] | None = None
    """`freeze`: train the parameters whose name contains one of these substrings."""
    train_last_n_layers: int | None = None
    """`freeze`: train the last N decoder blocks."""
    load_in_4bit: bool = False
    """QLoRA: an NF4 base through bitsandbytes (CUDA only; `lora` or `dora`, engine `single` or `ddp`)."""


@dataclass
class EngineConfig:
    kind: str = "single"
    """How the work is spread: one device, DDP replicas, FSDP2 sharding, or DeepSpeed ZeRO."""
    mixed_precision: str = "auto"
    """Compute precision; `auto`: `bf16` on a CUDA GPU that supports it, else `fp32`."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 1 shards the optimizer state, 2 also the gradients, 3 also the weights."""
    offload_optimizer: bool = False
    """DeepSpeed: optimizer state and step on the CPU (DeepSpeedCPUAdam, compiled on first use)."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: parameters kept on the CPU."""
    ds_config: str | None = None
    """Your DeepSpeed JSON; its `"auto"` values are filled from this config (null: the shipped `zero{stage}.json`)."""
    reshard_after_forward: bool = True
    """FSDP: free a unit's gathered weights after its forward and gather them again in backward."""
    shard_unit: str = "block"
    """What a sharded engine gathers at once: a decoder block, or one linear layer (ZeRO-3: 3·hidden² live, not 24)."""
    sync_each_batch: bool = True
    """FSDP: reduce-scatter every micro-batch's gradients; false keeps them unsharded until the last micro-batch."""
    cpu_offload: bool = False
    """FSDP: parameters, gradients and the optimizer step on the CPU."""
    replicate_degree: int = 1
    """Replicas of a sharded model (FSDP: HSDP, ZeRO-3: hpZ); must divide the world size, usually the node count."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in backward instead of keeping them."""
    compile: bool = False
    """`torch.compile` each decoder block."""
    timeout_minutes: float = 30.0
    """Timeout of the process group's collectives."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: torch AdamW (fused on CUDA, DeepSpeedCPUAdam with `engine.offload_optimizer`) or SGD."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay of weight matrices; never applied to norms, biases or other 1-D tensors."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    scheduler: str = "cosine"
    """Learning-rate shape after the warmup: cosine or linear decay to `min_lr_ratio`, or constant."""
    warmup_steps: int = 0
    """Steps of linear warmup (0: `warmup_ratio` of the run's steps)."""
    warmup_ratio: float = 0.0
    """Warmup as a share of the run's steps, when `warmup_steps` is 0."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of a cosine or linear decay, as a share of `lr`."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; null: no clipping."""


@dataclass
class TrainConfig:
    seed: int = 42
    """Seed of weight initialisation, data order and the validation hold-out."""
    micro_batch_size: int = 8
    """Sequences per rank in one forward and backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro batch × grad_accum × data-parallel world size."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed), when `max_steps` is unset."""
    max_steps: int | None = None
    """Optimizer steps of the whole run; overrides `epochs`."""
    eval_steps: int | None = None
    """Evaluate every N steps and at the last step (null: at the last step only)."""
    eval_max_batches: int | None = None
    """Most validation micro-batches per evaluation (null: the whole validation set)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improving `early_stopping_metric` (null: never)."""
    early_stopping_metric: str = "eval/loss"
    """Evaluation metric early stopping watches (`eval/loss`, `eval/accuracy`, `eval/rougeL`, ...)."""
    early_stopping_mode: str = "min"
    """Whether a lower (`min`) or higher (`max`) value of the metric is better."""
    output_dir: str = "runs"
    """Parent directory of the run directories."""
    run_name: str | None = None
    """Run directory under `output_dir` (null: `{model}-{format}-{engine}-{Slurm job, torchrun id or timestamp}`)."""
    device: str = "auto"
    """`auto`: CUDA when a GPU is visible, else the CPU; `cpu` keeps a GPU node's processes on the CPU; `cuda`."""
    resume: str = "auto"
    """`auto`: continue from the run dir's latest complete checkpoint; `none`: start fresh; or a checkpoint dir."""
    chunked_loss: bool = True
    """LM head and cross-entropy chunk by chunk of target positions, each chunk's logits recomputed in backward."""
    ce_chunk_tokens: int = 0
    """Positions per chunk of `chunked_loss` (0: as many as make 128 MiB of fp32 logits)."""
    target_logits_only: bool = True
    """LM head and softmax only at positions whose next token is a target (passed as `logits_to_keep`)."""
    nan_policy: str = "skip"
    """On a non-finite loss or gradient: `skip` the update (counted in the summary) or `stop` the run."""
    max_bad_steps: int = 5
    """Stop after this many non-finite steps in a row."""


@dataclass
class WandbConfig:
    mode: str = "auto"
    """`auto`: `WANDB_MODE` when set, else online with `WANDB_API_KEY`, else offline; `disabled`: no W&B."""
    project: str = "dist_tune"
    """W&B project."""
    entity: str | None = None
    """W&B entity, a user or team (null: the account's default)."""
    name: str | None = None
    """W&B run name (null: the run directory's name)."""
    tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    group: str | None = None
    """W&B run group."""


@dataclass
class LogConfig:
    log_steps: int = 10
    """Log training metrics every N optimizer steps (and at the first and the last)."""
    progress: bool = True
    """A progress bar on the console; false: one line per logged step (batch jobs)."""
    jsonl: bool = True
    """Write `metrics.jsonl` in the run directory (also what `loss.png` and `dist-tune report` read)."""
    plot: bool = True
    """Write `loss.png` (train and eval loss, learning rate) at the end."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings (the `log.wandb` table)."""


@dataclass
class CheckpointConfig:
    save_steps: int | None = None
    """Checkpoint every N steps; the last step is always checkpointed (null: only the last)."""
    save_total_limit: int | None = 2
    """Complete checkpoints kept, oldest deleted first, never the only complete one (null: all)."""
    save_final: bool = True
    """Write `final/` at the end: the HF model, or the peft adapter."""
    max_shard_size: str = "1GB"
    """Largest safetensors file of a full `final/` or export, written like `1GB` or `500MB`."""
    verify: bool = True
    """Resume and export check each checkpoint file against the size and SHA-256 recorded at save."""


@dataclass
class EvalConfig:
    generate_samples: int = 0
    """Validation prompts answered greedily and scored (exact match, BLEU, ROUGE) at every evaluation; 0: off."""
    max_new_tokens: int = 64
    """Most tokens generated per answer."""


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
        (not (cfg.data.streaming and cfg.train.max_steps is None),
         "data.streaming reads rows as it trains, with no length to count epochs in; set train.max_steps"),
        (not (cfg.data.streaming and "classification" in data_formats(cfg)),
         "data.streaming reads causal-LM formats (text, instruction, chat); classification needs every label before "
         "training; set data.streaming=false"),
        (not (cfg.data.streaming and cfg.data.num_workers),
         "data.streaming reads the stream in the training process; set data.num_workers=0"),
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
