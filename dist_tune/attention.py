"""Padding-free (varlen) attention: one row holding several sequences, each attending only to itself.

Registered with transformers as `dist_tune_sdpa`, so any model that dispatches through `ALL_ATTENTION_FUNCTIONS`
can use it. In a flattened row (no 2-D mask; sequence starts given by `cu_seq_lens_q`, or by `position_ids`
restarting at 0) the linear layers see no padding, no T×T mask is built and attention costs sum(len_i^2) instead
of (sum len_i)^2. Which kernel runs (`varlen_kernel`): on CUDA with 16-bit inputs one varlen kernel over the whole
row, flash-attn 2's `flash_attn_varlen_func` when flash_attn is installed, else torch's `varlen_attn`; otherwise
(CPU, fp32) one causal SDPA call per sequence on its slice of the row. The kernels read the boundaries from the
device tensors the collator made; the per-sequence loop needs them as host ints, copied once per batch (every
layer gets the same boundary tensor), never once per layer. Anything else (padded batches, decoding with a cache)
is plain SDPA."""
from __future__ import annotations

import importlib.util
import inspect
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "dist_tune_sdpa"


def cu_seq_lens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence starts (int32, last entry = total tokens) of rows whose positions restart at 0."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    return torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)


def _torch_varlen_parameters() -> frozenset[str]:
    """Keyword names of torch's `varlen_attn` (empty when this torch has none); they changed between releases."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


# looked up once at import, so the per-layer dispatch under torch.compile reads constants
FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
TORCH_VARLEN_PARAMETERS = _torch_varlen_parameters()


def flash_attn_installed() -> bool:
    return FLASH_ATTN


def torch_varlen_available() -> bool:
    params = TORCH_VARLEN_PARAMETERS
    return "scale" in params and ("window_size" in params or "is_causal" in params)


def varlen_kernel(device_type: str, dtype: torch.dtype, dropout: float) -> str:
    """`flash_attn`, `torch_varlen` or `sdpa_loop`: the varlen kernels need CUDA and fp16/bf16 inputs, torch's
    also no attention dropout."""
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa_loop"
    if flash_attn_installed():
        return "flash_attn"
    if torch_varlen_available() and not dropout:
        return "torch_varlen"
    return "sdpa_loop"


class HostBoundaries:
    """A batch's sequence starts as Python ints, copied from its boundary tensor (`cu_seq_lens_q`, else
    `position_ids`, which transformers may give as one row for the whole batch) by the first layer and reused by
    the others while that tensor is the one passed in."""

    def __init__(self) -> None:
        self._key: tuple[weakref.ref, int] | None = None
        self._starts: list[int] = []

    def __call__(self, cu_seq_lens: torch.Tensor | None, position_ids: torch.Tensor | None, rows: int) -> list[int]:
        source = cu_seq_lens if cu_seq_lens is not None else position_ids
        if self._key is None or self._key[0]() is not source or self._key[1] != rows:
            cu = cu_seq_lens if cu_seq_lens is not None else cu_seq_lens_from_positions(position_ids.expand(rows, -1))
            self._starts = cu.tolist()
            self._key = (weakref.ref(source), rows)
        return self._starts


host_boundaries = HostBoundaries()


def _is_flattened(query: torch.Tensor, key: torch.Tensor, attention_mask, cu_seq_lens_q, position_ids) -> bool:
    same_length = query.shape[2] == key.shape[2]  # no cache or prefix keys
    return attention_mask is None and same_length and (cu_seq_lens_q is not None or position_ids is not None)


def _one_row(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, dim) → (1, heads, B·S, dim): the rows laid end to end."""
    return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, dim) → (B·S, heads, dim): the varlen kernels' layout."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])


def sdpa_loop(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              starts: list[int], **kwargs) -> torch.Tensor:
    """One causal SDPA call per sequence; (B, heads, S, dim) inputs → (B, S, heads, dim)."""
    q, k, v = _one_row(query), _one_row(key), _one_row(value)
    outputs = [sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal=True,
                                      **kwargs)[0] for a, b in zip(starts[:-1], starts[1:])]
    return torch.cat(outputs, 1).reshape(query.shape[0], query.shape[2], *outputs[0].shape[2:])


def flash_attn_varlen(q, k, v, cu: torch.Tensor, longest: int, scale: float | None, dropout: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scale,
                                  causal=True)


def torch_varlen(q, k, v, cu: torch.Tensor, longest: int, scale: float | None, dropout: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    params = TORCH_VARLEN_PARAMETERS
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)


KERNELS = {"flash_attn": flash_attn_varlen, "torch_varlen": torch_varlen}


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, cu_seq_lens_q: torch.Tensor | None = None,
                          max_length_q: int | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (B, heads, S, dim) inputs → ((B, S, heads, dim) output, None)."""
    for unused in ("cu_seq_lens_k", "max_length_k", "is_causal"):
        kwargs.pop(unused, None)
    if not _is_flattened(query, key, attention_mask, cu_seq_lens_q, position_ids):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    dropout = kwargs.get("dropout", 0.0)
    kernel = varlen_kernel(query.device.type, query.dtype, dropout)
    if kernel == "sdpa_loop":
        starts = host_boundaries(cu_seq_lens_q, position_ids, query.shape[0])
        return sdpa_loop(module, query, key, value, starts, **kwargs), None
    if cu_seq_lens_q is None or max_length_q is None:
        starts = host_boundaries(cu_seq_lens_q, position_ids, query.shape[0])
        cu_seq_lens_q = torch.tensor(starts, dtype=torch.int32, device=query.device)
        max_length_q = max(b - a for a, b in zip(starts[:-1], starts[1:]))
    out = KERNELS[kernel](_tokens_first(query), _tokens_first(key), _tokens_first(value),
                          cu_seq_lens_q.to(torch.int32), max_length_q, kwargs.get("scaling"), dropout)
    return out.reshape(query.shape[0], query.shape[2], *out.shape[1:]), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask for flattened rows (the attention function finds the sequences); SDPA's mask for padded ones."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make `dist_tune_sdpa` a valid `attn_implementation` in this process; returns the name."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, varlen_mask)
    return VARLEN_SDPA
