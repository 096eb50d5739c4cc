"""Decisions a config implies at run time: padding-free rows, precision, what the engine shards, the loss chunk
size, target-only logits."""
from __future__ import annotations

import logging

from dist_tune.config.schema import FP32_ADAPTER_METHODS, VIRTUAL_TOKEN_METHODS, Config

log = logging.getLogger("dist_tune.config")


def data_formats(cfg: Config) -> set[str]:
    """The formats the run's data comes in: each data.sources entry's (default data.format), else data.format."""
    return {source.format or cfg.data.format for source in cfg.data.sources} or {cfg.data.format}


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
