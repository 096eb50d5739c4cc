"""Collation of model rows into tensors: dynamic right padding, or one padding-free row per micro-batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_tune.attention import cu_seq_lens_from_positions
from dist_tune.config import Config, flattened, uses_target_logits
from dist_tune.data.formats import IGNORE_INDEX
from dist_tune.loss import target_positions


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _concat(rows: list[list[int]]) -> torch.Tensor:
    return torch.as_tensor([x for row in rows for x in row], dtype=torch.long).unsqueeze(0)


def _positions(row: dict) -> list[int]:
    return row["position_ids"] if "position_ids" in row else list(range(len(row["input_ids"])))


@dataclass(frozen=True)
class Collator:
    """Pads `input_ids` (pad_id), `labels` (-100) and `position_ids` (0) to the longest row; attention_mask is
    1 on every real token (packed rows included). Scalar labels become a long or float tensor.

    padding_free: the rows are concatenated into one (1, total) row instead, with `position_ids` restarting at
    every example and the sequence boundaries as `cu_seq_lens_q/k` and `max_length_q/k` (the flash-attention
    keyword names), so varlen attention keeps every example to itself.
    target_positions: adds `logits_to_keep`, the positions whose next token is a target, so the model computes
    logits (and the loss its softmax) only there."""

    pad_id: int
    label_dtype: torch.dtype = torch.long
    padding_free: bool = False
    target_positions: bool = False

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | int]:
        batch = self._flat(rows) if self.padding_free else self._padded(rows)
        if self.target_positions:
            batch["logits_to_keep"] = target_positions(batch["labels"], batch.get("position_ids"))
        return batch

    def _padded(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [row["input_ids"] for row in rows]
        width = max(len(x) for x in ids)
        batch = {"input_ids": _pad(ids, width, self.pad_id),
                 "attention_mask": _pad([[1] * len(x) for x in ids], width, 0)}
        labels = [row["labels"] for row in rows]
        if isinstance(labels[0], list):
            batch["labels"] = _pad(labels, width, IGNORE_INDEX)
        else:
            batch["labels"] = torch.tensor(labels, dtype=self.label_dtype)
        if "position_ids" in rows[0]:
            batch["position_ids"] = _pad([row["position_ids"] for row in rows], width, 0)
        return batch

    def _flat(self, rows: list[dict]) -> dict[str, torch.Tensor | int]:
        position_ids = _concat([_positions(row) for row in rows])
        cu = cu_seq_lens_from_positions(position_ids)
        longest = int((cu[1:] - cu[:-1]).max())
        return {"input_ids": _concat([row["input_ids"] for row in rows]),
                "labels": _concat([row["labels"] for row in rows]),
                "attention_mask": torch.ones_like(position_ids), "position_ids": position_ids,
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def make_collator(cfg: Config, tokenizer) -> Collator:
    """Collator padding with the tokenizer's pad token (eos when it has none), or padding-free (data.pack or
    data.padding_free), with target positions when train.target_logits_only applies."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Collator(pad_id=pad_id if pad_id is not None else 0,
                    label_dtype=torch.float32 if cfg.model.task == "regression" else torch.long,
                    padding_free=flattened(cfg), target_positions=uses_target_logits(cfg))
