"""Losses as sums, so the trainer can normalise by the global token/sample count of a whole step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def shifted_labels(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets; in packed rows the first token of a document is not predicted from the previous one."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = IGNORE
    return targets


def target_positions(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Sorted positions (1-D) whose next token is a target in at least one row: the only logits a loss needs."""
    return torch.nonzero((shifted_labels(labels, position_ids) != IGNORE).any(0)).reshape(-1)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy over `chunk` rows at a time, each chunk recomputed in backward, so the fp32 copy of the
    logits and its softmax gradient never exist for the whole batch at once."""
    return sum(checkpoint(_ce_sum, logits[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
               for i in range(0, logits.shape[0], chunk))


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                       chunk: int = 0, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of target tokens), computed in fp32 (chunked when chunk > 0).

    positions: the model computed logits at these positions only (`logits_to_keep`, see target_positions)."""
    targets = shifted_labels(labels, position_ids)
    if positions is None:
        logits = logits[:, -labels.shape[1]:][:, :-1]  # prompt tuning prepends virtual tokens
    else:
        targets = targets[:, positions]
    targets = targets.reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    loss = chunked_ce_sum(flat, targets, chunk) if chunk else _ce_sum(flat, targets)
    return loss, (targets != IGNORE).sum()


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if labels.dtype.is_floating_point:
        loss = F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    else:
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, torch.tensor(labels.shape[0], device=labels.device)
