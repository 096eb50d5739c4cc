"""The run configuration's schema: one typed dataclass per section, every field documented by the docstring on the
line after it (docs/config.md is generated from them), and the allowed values of the keys that have a fixed set."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dist_tune.errors import UserError


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
