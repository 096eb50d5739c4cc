"""Per-GPU memory estimate: model-state bytes per parameter as each engine holds them (ZeRO paper accounting)
plus a transformer activation model.

Model state per parameter before sharding (`bytes_per_param`), AdamW:

| engine | weights | grads | optimizer | total |
| --- | --- | --- | --- | --- |
| single, ddp, fsdp (fp32 model, any engine.mixed_precision) | 4 | 4 | 8 (m, v) | 16 |
| deepspeed, bf16/fp16 (ZeRO paper "mixed-precision Adam") | 2 | 2 | 12 (fp32 master + m + v) | 16 |
| deepspeed, fp32 | 4 | 4 | 12 (fp32 master + m + v) | 20 |

Autocast (single/ddp) and FSDP's MixedPrecisionPolicy only cast copies for compute, so weights, grads and torch
optimizer states stay in model.dtype and there is no master copy; DeepSpeed casts the module to bf16/fp16 and its
ZeRO optimizers always keep a separate fp32 master partition (also in fp32 training, DeepSpeed 0.19). Frozen
(peft) weights cost only their storage bytes (0.5 with 4-bit QLoRA); peft keeps the adapters of LoRA, DoRA, IA3
and prefix/prompt tuning in fp32 over any base dtype. `auto` precision is estimated as it resolves on a bf16 GPU
(config.resolve_precision), the device an estimate is for. Sharding (`shard_factors`): ZeRO-1 splits
the optimizer state, ZeRO-2 also the grads, ZeRO-3 and FSDP everything; FSDP with engine.sync_each_batch=false and
train.grad_accum > 1 keeps whole fp32 (reduce-dtype) gradients between micro-batches instead. What an offload
option moves to the host is counted in `host_gib` instead. A sharded engine also gathers weights whole for
compute (`gathered_bytes`): FSDP its root unit and two neighbouring units at a time, ZeRO-3 up to
stage3_max_live_parameters plus one module (and, with hpZ, its secondary in-group partition of the weights).
HSDP (FSDP with engine.replicate_degree) shards within groups of world size / replicate_degree ranks.

Host RAM per node (`HostMemory`), for loading the model and for the final save, is the process baseline
(torch + transformers, PROCESS_GIB) plus what each process holds: loading, FSDP reads only its shard of the
weights, ZeRO-3 builds the model partitioned (rank 0 reads each tensor and scatters it) and every other engine
builds the whole model on the CPU first; saving, a peft run's
rank 0 gathers only the adapters and full tuning writes safetensors files of at most checkpoint.max_shard_size,
one per process at a time.

The architecture comes from a preset or a local model directory (its config.json; no weights are read), or, for the
hub ids in `KNOWN_SHAPES`, from a built-in copy of their config.json's shape, so estimating a recipe downloads nothing.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.serialization._base import parse_size_to_int
from transformers import AutoConfig

from dist_tune.config import FP32_ADAPTER_METHODS, Config, loss_chunk_positions, resolve_precision, shards_parameters
from dist_tune.models import count_parameters, load_tokenizer, model_config

GIB = 1024 ** 3
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
PROCESS_GIB = 0.6  # a process with torch + transformers imported (measured on CPU)

_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0)
_LLAMA3_8B = dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)
_LLAMA3_70B = dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
# Shapes of well-known hub models, as in their config.json (GPT2Config() and BertConfig() defaults are gpt2 and
# bert-base-uncased).
KNOWN_SHAPES: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2"), "openai-community/gpt2": dict(model_type="gpt2"),
    "bert-base-uncased": dict(model_type="bert"), "google-bert/bert-base-uncased": dict(model_type="bert"),
    **{f"meta-llama/{name}": dict(_LLAMA3_8B, max_position_embeddings=8192)
       for name in ("Meta-Llama-3-8B", "Meta-Llama-3-8B-Instruct")},
    **{f"meta-llama/{name}": dict(_LLAMA3_8B, max_position_embeddings=131072)
       for name in ("Llama-3.1-8B", "Llama-3.1-8B-Instruct")},
    **{f"meta-llama/{name}": dict(_LLAMA3_70B, max_position_embeddings=8192)
       for name in ("Meta-Llama-3-70B", "Meta-Llama-3-70B-Instruct")},
    **{f"meta-llama/{name}": dict(_LLAMA3_70B, max_position_embeddings=131072)
       for name in ("Llama-3.1-70B", "Llama-3.1-70B-Instruct", "Llama-3.3-70B-Instruct")},
}


@dataclass
class HostMemory:
    """Peak host RAM of one node, GiB: loading the model and writing the final model."""
    procs_per_node: int
    load_gib: float
    save_gib: float


@dataclass
class Estimate:
    params: int
    trainable: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    gathered_gib: float = 0.0  # weights a sharded engine gathers whole for compute
    host_gib: float = 0.0  # model state an offload option keeps in host memory instead
    host: HostMemory | None = None

    @property
    def total_gib(self) -> float:
        return (self.weights_gib + self.grads_gib + self.optimizer_gib + self.gathered_gib + self.activations_gib
                + self.logits_gib)


def meta_model(cfg: Config) -> tuple[torch.nn.Module, object]:
    """The configured model with its peft adapters, built on the meta device (no memory), and its config."""
    from dist_tune.models import auto_class
    from dist_tune.peft import apply_peft

    hf_cfg = architecture(cfg)
    with torch.device("meta"):
        return apply_peft(auto_class(cfg.model.task).from_config(hf_cfg), cfg), hf_cfg


def architecture(cfg: Config):
    """The transformers config of the configured model without its weights: the built-in shape of a KNOWN_SHAPES hub
    id (unless a local directory has that name), else what the run would build or load (preset, local directory)."""
    name = cfg.model.name_or_path
    if name not in KNOWN_SHAPES or Path(name).expanduser().is_dir():
        return model_config(cfg, load_tokenizer(cfg))
    shape = dict(KNOWN_SHAPES[name])
    hf_cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    if cfg.model.max_position_embeddings:
        hf_cfg.max_position_embeddings = cfg.model.max_position_embeddings
    if cfg.model.task != "causal_lm":
        hf_cfg.num_labels = 1 if cfg.model.task == "regression" else cfg.model.num_labels
    return hf_cfg


def shard_factors(kind: str, stage: int, world: int) -> tuple[float, float, float]:
    """Fraction of (weights, grads, optimizer states) one rank holds."""
    if kind == "fsdp" or (kind == "deepspeed" and stage == 3):
        return 1 / world, 1 / world, 1 / world
    if kind == "deepspeed" and stage == 2:
        return 1.0, 1 / world, 1 / world
    if kind == "deepspeed" and stage == 1:
        return 1.0, 1.0, 1 / world
    return 1.0, 1.0, 1.0


def activation_bytes(hf_cfg, cfg: Config, precision_bytes: int) -> tuple[float, float]:
    """(activations, logits) bytes for one micro-batch: ~34·s·b·h per layer (attention scores not stored,
    SDPA/flash) or 2·s·b·h per layer plus one live layer with checkpointing; fp32 logits and their gradient, for
    one chunk of positions when the head and loss are chunked (train.chunked_loss), else for the micro-batch."""
    b, s = cfg.train.micro_batch_size, cfg.data.max_length
    h, layers = hf_cfg.hidden_size, hf_cfg.num_hidden_layers
    per_layer = 34 * s * b * h * precision_bytes / 2
    if cfg.engine.activation_checkpointing:
        acts = layers * 2 * s * b * h * precision_bytes / 2 + per_layer
    else:
        acts = layers * per_layer
    vocab = getattr(hf_cfg, "vocab_size", 0) if cfg.model.task == "causal_lm" else hf_cfg.num_labels
    positions = min(b * s, loss_chunk_positions(cfg, hf_cfg) or b * s)
    return acts, 2 * 4 * positions * vocab


def optimizer_states(cfg: Config) -> int:
    """State tensors the optimizer keeps per trainable parameter: AdamW m and v; SGD its momentum buffer."""
    if cfg.optim.name == "sgd":
        return 1 if cfg.optim.momentum else 0
    return 2


@dataclass(frozen=True)
class BytesPerParam:
    """Model-state bytes per parameter on one rank before sharding (see the module docstring)."""
    weights: float  # a trainable weight
    frozen: float  # a frozen (peft base) weight
    grads: float  # a trainable parameter's gradient
    optimizer: float  # optimizer states (+ DeepSpeed's fp32 master copy) of a trainable parameter


def on_bf16_gpu(cfg: Config) -> Config:
    """The config with `auto` model.dtype / engine.mixed_precision as they resolve on a bf16 GPU."""
    return resolve_precision(copy.deepcopy(cfg), bf16=True)


def bytes_per_param(cfg: Config) -> BytesPerParam:
    cfg = on_bf16_gpu(cfg)
    storage = DTYPE_BYTES[cfg.model.dtype]
    if cfg.engine.kind == "deepspeed":
        # DeepSpeed casts the module (adapters too) to bf16/fp16 when enabled; its ZeRO optimizer keeps fp32 master
        # + fp32 states
        weights = frozen = WEIGHT_BYTES[cfg.engine.mixed_precision] if cfg.engine.mixed_precision != "fp32" else storage
        optimizer = FP32 * (optimizer_states(cfg) + 1)
    else:
        # autocast / FSDP MixedPrecisionPolicy cast for compute only: weights, grads and states stay in their dtype
        frozen = storage
        weights = FP32 if cfg.peft.method in FP32_ADAPTER_METHODS else storage
        optimizer = weights * optimizer_states(cfg)
    frozen = 0.5 if cfg.peft.load_in_4bit else frozen
    return BytesPerParam(weights=weights, frozen=frozen, grads=weights, optimizer=optimizer)


def fsdp_gathered(model: torch.nn.Module, shard_unit: str, reshard_after_forward: bool) -> int:
    """Parameters FSDP2 holds gathered at its peak: the root's, plus two units next to each other in module order
    (the next unit's all-gather overlaps this one's compute); every unit when none reshards after the forward."""
    from dist_tune.engines.fsdp import shard_units

    claimed: set[int] = set()
    owned: dict[int, int] = {}
    for unit in shard_units(model, shard_unit):  # inner units first: each owns what no inner unit took
        params = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in params)
        owned[id(unit)] = sum(p.numel() for p in params)
    root = sum(p.numel() for p in model.parameters() if id(p) not in claimed)
    if not reshard_after_forward:
        return root + sum(owned.values())
    in_order = [owned[id(m)] for m in model.modules() if id(m) in owned]
    return root + max((a + b for a, b in zip(in_order, in_order[1:])), default=sum(in_order))


def zero3_gathered(model: torch.nn.Module, zero: dict) -> float:
    """Parameters ZeRO-3 holds gathered at its peak: the persistent ones (stage3_param_persistence_threshold
    elements or fewer) always, plus stage3_max_live_parameters fetched by whole modules, so one more module (at
    worst the largest, such as the output head) can join them, at most the whole model; plus, with hpZ, its
    secondary partition of the weights within each group."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    persistent = sum(p.numel() for p in params if p.numel() <= int(zero["stage3_param_persistence_threshold"]))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    live = min(total, persistent + int(zero["stage3_max_live_parameters"]) + largest)
    return live + total / zero.get("zero_hpz_partition_size", math.inf)


def gathered_bytes(model: torch.nn.Module, hf_cfg, cfg: Config, world_size: int) -> float:
    """Weights a sharded engine (FSDP, ZeRO-3) holds gathered for compute at its peak, in compute precision."""
    from dist_tune.engines.deepspeed import ds_config

    e = cfg.engine
    if e.kind == "fsdp":
        gathered = fsdp_gathered(model, e.shard_unit, e.reshard_after_forward)
    elif e.kind == "deepspeed" and e.zero_stage == 3:
        gathered = zero3_gathered(model, ds_config(cfg, world_size, hf_cfg.hidden_size)["zero_optimization"])
    else:
        return 0.0
    compute = WEIGHT_BYTES[e.mixed_precision] if e.mixed_precision != "fp32" else DTYPE_BYTES[cfg.model.dtype]
    return gathered * compute


def grads_unsharded_between_micro_batches(cfg: Config) -> bool:
    return cfg.engine.kind == "fsdp" and not cfg.engine.sync_each_batch and cfg.train.grad_accum > 1


def host_memory(cfg: Config, total: int, trainable: int, world_size: int, procs_per_node: int) -> HostMemory:
    """Host RAM per node to load the model and to write the final model (see the module docstring)."""
    storage = DTYPE_BYTES[cfg.model.dtype]
    adapter = FP32 if cfg.peft.method in FP32_ADAPTER_METHODS else storage
    model = (total - trainable) * storage + trainable * adapter
    load = model / world_size if shards_parameters(cfg) else model
    if cfg.peft.method != "full":
        save, writers = trainable * adapter, 1
    else:
        max_shard = parse_size_to_int(cfg.checkpoint.max_shard_size)
        save, writers = min(model, max_shard), min(procs_per_node, math.ceil(model / max_shard))
    return HostMemory(procs_per_node, load_gib=procs_per_node * (PROCESS_GIB + load / GIB),
                      save_gib=procs_per_node * PROCESS_GIB + writers * save / GIB)


def shard_world(cfg: Config, world_size: int) -> int:
    """Ranks one copy of the model is sharded over: HSDP (FSDP with engine.replicate_degree) shards within groups."""
    return world_size // cfg.engine.replicate_degree if cfg.engine.kind == "fsdp" else world_size


def estimate(cfg: Config, world_size: int = 1, procs_per_node: int | None = None) -> Estimate:
    """Per-GPU memory at `world_size`, and host RAM per node with `procs_per_node` processes (default: all on one
    node, up to 8)."""
    from dist_tune.engines.registry import check_replicate_degree

    check_replicate_degree(cfg, world_size)
    cfg = on_bf16_gpu(cfg)
    model, hf_cfg = meta_model(cfg)
    total, trainable = count_parameters(model)
    precision = WEIGHT_BYTES[cfg.engine.mixed_precision]
    per = bytes_per_param(cfg)
    w, g, o = shard_factors(cfg.engine.kind, cfg.engine.zero_stage, shard_world(cfg, world_size))
    grads = trainable * (FP32 if grads_unsharded_between_micro_batches(cfg) else per.grads * g)
    state = {"weights": (trainable * per.weights + (total - trainable) * per.frozen) * w,
             "grads": grads, "optimizer": trainable * per.optimizer * o}
    e = cfg.engine  # FSDP's CPUOffloadPolicy keeps weights, grads and optimizer states on the host
    on_host = {"weights": e.offload_params or e.cpu_offload, "grads": e.cpu_offload,
               "optimizer": e.offload_optimizer or e.cpu_offload}
    gpu = {k: 0.0 if on_host[k] else v / GIB for k, v in state.items()}
    acts, logits = activation_bytes(hf_cfg, cfg, precision)
    return Estimate(total, trainable, gpu["weights"], gpu["grads"], gpu["optimizer"], acts / GIB, logits / GIB,
                    gathered_gib=gathered_bytes(model, hf_cfg, cfg, world_size) / GIB,
                    host_gib=sum(v for k, v in state.items() if on_host[k]) / GIB,
                    host=host_memory(cfg, total, trainable, shard_world(cfg, world_size),
                                     procs_per_node or min(world_size, 8)))


def format_estimate(e: Estimate) -> str:
    rows = [("parameters", f"{e.params:,}"), ("trainable", f"{e.trainable:,}"),
            ("weights", f"{e.weights_gib:.3f} GiB"), ("gradients", f"{e.grads_gib:.3f} GiB"),
            ("optimizer states", f"{e.optimizer_gib:.3f} GiB"), ("gathered weights", f"{e.gathered_gib:.3f} GiB"),
            ("activations", f"{e.activations_gib:.3f} GiB"),
            ("logits (fp32 + grad)", f"{e.logits_gib:.3f} GiB"), ("total per GPU", f"{e.total_gib:.3f} GiB")]
    if e.host_gib:
        rows.append(("offloaded to host", f"{e.host_gib:.3f} GiB per process"))
    if e.host:
        rows += [("host RAM per node, load", f"{e.host.load_gib:.3f} GiB ({e.host.procs_per_node} processes)"),
                 ("host RAM per node, save", f"{e.host.save_gib:.3f} GiB ({e.host.procs_per_node} processes)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
