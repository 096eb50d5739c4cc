"""FLOPs per token and MFU: the model split into body and LM head, the formula for full and parameter-efficient
tuning, and the devices' peak FLOP/s (or DIST_TUNE_PEAK_FLOPS)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dist_tune.config import Config, qlora_compute_dtype
from dist_tune.errors import UserError
from dist_tune.logs import warn_once

FLOPS_FORMULA_FULL = "6*N_body + 6*N_head*(logit positions/token) + 12*L*H*S (full)"
FLOPS_FORMULA_PEFT = ("4*N_body + 2*N_body_trainable + (4*N_head + 2*N_head_trainable)*(logit positions/token)"
                      " + 12*L*H*S (peft)")
PEAK_FLOPS_ENV = "DIST_TUNE_PEAK_FLOPS"

# Dense (non-sparse) peak FLOP/s per device; fp32 is the non-tensor-core rate. The longest matching name wins.
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
)
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class FlopsModel:
    """What the training FLOPs of one token depend on (PaLM / torchtitan accounting).

    body: parameters applied at every token; an untied input embedding is a lookup and is left out.
    head: the LM head, applied only where logits are computed (a tied embedding is counted once, here).
    Per token: forward 2N and activation gradients 2N over all weights, weight gradients 2N over trainable ones
    only (frozen peft weights need none), plus attention scores/values 12·L·H·S (QK^T and AV: 4LHS forward,
    8LHS backward; no weights), S the mean example length (padding-free rows keep examples apart).
    """
    body: int
    body_trainable: int
    head: int
    head_trainable: int
    n_layers: int
    hidden: int

    def per_token(self, seq_len: float, logit_positions_per_token: float) -> float:
        body = 4 * self.body + 2 * self.body_trainable
        head = (4 * self.head + 2 * self.head_trainable) * logit_positions_per_token
        return float(body + head + 12 * self.n_layers * self.hidden * seq_len)


def compute_dtype(cfg: Config) -> str:
    """The dtype the matmuls run in: engine.mixed_precision when bf16/fp16, else model.dtype, or for a QLoRA
    base its compute dtype (config.qlora_compute_dtype)."""
    if cfg.engine.mixed_precision in ("bf16", "fp16"):
        return cfg.engine.mixed_precision
    dtype = qlora_compute_dtype(cfg) if cfg.peft.load_in_4bit else cfg.model.dtype
    return _DTYPE_ALIASES.get(dtype, dtype)


def peak_flops_per_device(device: torch.device, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device for `dtype` ("bf16"/"bfloat16", "fp16", "fp32"), or None if unknown.

    The DIST_TUNE_PEAK_FLOPS environment variable (FLOP/s per device) overrides the table, on any device.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise UserError(f"{PEAK_FLOPS_ENV}={override!r} is not a number; set it to FLOP/s per device, e.g. 989e12") from None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [(pattern, peaks) for pattern, peaks in _PEAK_FLOPS if pattern in name]
    if not matches:
        warn_once(f"unknown GPU {name!r}: MFU is not reported; set {PEAK_FLOPS_ENV} to its peak FLOP/s")
        return None
    _, peaks = max(matches, key=lambda match: len(match[0]))
    return peaks.get(_DTYPE_ALIASES.get(dtype, dtype))


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]; `tokens_per_s` is the global rate over all `world_size` devices."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)
