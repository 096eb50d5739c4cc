"""Per-GPU memory estimate: ZeRO-paper model-state bytes per parameter plus a transformer activation model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_tune.config import Config
from dist_tune.models import load_tokenizer, model_config

GIB = 1024 ** 3
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Estimate:
    params: int
    trainable: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.logits_gib


def count_from_config(cfg: Config) -> tuple[int, int, object]:
    """(total, trainable) parameters of the configured model/peft, built on the meta device (no memory)."""
    from dist_tune.models import auto_class
    from dist_tune.peft import apply_peft

    tokenizer = load_tokenizer(cfg)
    hf_cfg = model_config(cfg, tokenizer)
    with torch.device("meta"):
        model = apply_peft(auto_class(cfg.model.task).from_config(hf_cfg), cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable, hf_cfg


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
    SDPA/flash) or 2·s·b·h per layer plus one live layer with checkpointing; fp32 logits and their gradient."""
    b, s = cfg.train.micro_batch_size, cfg.data.max_length
    h, layers = hf_cfg.hidden_size, hf_cfg.num_hidden_layers
    per_layer = 34 * s * b * h * precision_bytes / 2
    if cfg.engine.activation_checkpointing:
        acts = layers * 2 * s * b * h * precision_bytes / 2 + per_layer
    else:
        acts = layers * per_layer
    vocab = getattr(hf_cfg, "vocab_size", 0) if cfg.model.task == "causal_lm" else hf_cfg.num_labels
    return acts, 2 * 4 * b * s * vocab


def estimate(cfg: Config, world_size: int = 1) -> Estimate:
    total, trainable, hf_cfg = count_from_config(cfg)
    precision = WEIGHT_BYTES[cfg.engine.mixed_precision]
    frozen_bytes = 0.5 if cfg.peft.load_in_4bit else precision
    w, g, o = shard_factors(cfg.engine.kind, cfg.engine.zero_stage, world_size)
    master = 4 if precision == 2 else 0
    offload = cfg.engine.offload_optimizer or cfg.engine.cpu_offload
    weights = (trainable * precision + (total - trainable) * frozen_bytes) * w
    if cfg.engine.offload_params or cfg.engine.cpu_offload:
        weights = 0.0
    optimizer = 0.0 if offload else trainable * (8 + master) * o
    acts, logits = activation_bytes(hf_cfg, cfg, precision)
    return Estimate(total, trainable, weights / GIB, trainable * precision * g / GIB, optimizer / GIB,
                    acts / GIB, logits / GIB)


def format_estimate(e: Estimate) -> str:
    rows = [("parameters", f"{e.params:,}"), ("trainable", f"{e.trainable:,}"),
            ("weights", f"{e.weights_gib:.3f} GiB"), ("gradients", f"{e.grads_gib:.3f} GiB"),
            ("optimizer states", f"{e.optimizer_gib:.3f} GiB"), ("activations", f"{e.activations_gib:.3f} GiB"),
            ("logits (fp32 + grad)", f"{e.logits_gib:.3f} GiB"), ("total per GPU", f"{e.total_gib:.3f} GiB")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
