"""Dynamic right padding of model rows into tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_tune.config import Config
from dist_tune.data.formats import IGNORE_INDEX


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


@dataclass(frozen=True)
class Collator:
    """Pads `input_ids` (pad_id), `labels` (-100) and `position_ids` (0) to the longest row; attention_mask is
    1 on every real token (packed rows included). Scalar labels become a long or float tensor."""

    pad_id: int
    label_dtype: torch.dtype = torch.long

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
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


def make_collator(cfg: Config, tokenizer) -> Collator:
    """Collator padding with the tokenizer's pad token (eos when it has none)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Collator(pad_id=pad_id if pad_id is not None else 0,
                    label_dtype=torch.float32 if cfg.model.task == "regression" else torch.long)
