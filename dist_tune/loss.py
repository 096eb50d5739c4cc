"""Losses as sums, so the trainer can normalise by the global token/sample count of a whole step."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shifted_labels(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets; in packed rows the first token of a document is not predicted from the previous one."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = IGNORE
    return targets


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of target tokens), computed in fp32."""
    logits = logits[:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
    targets = shifted_labels(labels, position_ids)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if labels.dtype.is_floating_point:
        loss = F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    else:
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, torch.tensor(labels.shape[0], device=labels.device)
