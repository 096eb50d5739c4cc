"""Padding-free (varlen) attention: one row holding several sequences, each attending only to itself.

Registered with transformers as `dist_tune_sdpa`, so any model that dispatches through `ALL_ATTENTION_FUNCTIONS`
can use it. In a flattened row (no 2-D mask; sequence starts given by `cu_seq_lens_q`, or by `position_ids`
restarting at 0) each sequence gets its own causal SDPA call on its slice of the row: the linear layers see no
padding, attention costs sum(len_i^2) instead of (sum len_i)^2, and no T×T mask is built. Anything else (padded
batches, decoding with a cache) is plain SDPA. With many short sequences per row on a GPU, flash_attention_2
(one varlen kernel, same `cu_seq_lens` inputs) avoids the per-sequence calls."""
from __future__ import annotations

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


def _is_flattened(query: torch.Tensor, key: torch.Tensor, attention_mask, cu_seq_lens_q, position_ids) -> bool:
    same_length = query.shape[2] == key.shape[2]  # no cache or prefix keys
    return attention_mask is None and same_length and (cu_seq_lens_q is not None or position_ids is not None)


def _one_row(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, S, dim) → (1, heads, B·S, dim): the rows laid end to end."""
    return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])


def varlen_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, cu_seq_lens_q: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (B, heads, S, dim) inputs → ((B, S, heads, dim) output, None)."""
    for unused in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(unused, None)
    if not _is_flattened(query, key, attention_mask, cu_seq_lens_q, position_ids):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_from_positions(position_ids)
    bounds = cu.tolist()
    q, k, v = _one_row(query), _one_row(key), _one_row(value)
    outputs = [sdpa_attention_forward(module, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, is_causal=True,
                                      **kwargs)[0] for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, 1).reshape(query.shape[0], query.shape[2], *outputs[0].shape[2:]), None


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
