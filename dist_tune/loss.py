"""Losses as sums, so the trainer can normalise by the global token/sample count of a whole step."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of target tokens) from the model's logits, computed in fp32.

    positions: the model computed logits at these positions only (`logits_to_keep`, see target_positions)."""
    targets = shifted_labels(labels, position_ids)
    if positions is None:
        logits = logits[:, -labels.shape[1]:][:, :-1]  # prompt tuning prepends virtual tokens
    else:
        targets = targets[:, positions]
    targets = targets.reshape(-1)
    return _ce_sum(logits.reshape(-1, logits.shape[-1]), targets), (targets != IGNORE).sum()


def aligned_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """Each position's next-token target, aligned with the hidden states the LM head receives: at `positions`
    only when the model keeps those (`logits_to_keep`), else at every position (the last one has none)."""
    targets = shifted_labels(labels, position_ids)
    if positions is not None:
        return targets[:, positions]
    return F.pad(targets, (0, 1), value=IGNORE)


def _head_ce_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    return _ce_sum(head(hidden), targets)


def target_rows(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, targets) at the positions that have a target, flattened. hidden (batch, positions, width)
    may hold leading positions that `targets` lacks (prompt tuning's virtual tokens)."""
    targets = F.pad(targets, (hidden.shape[1] - targets.shape[1], 0), value=IGNORE)
    real = targets != IGNORE
    return hidden[real], targets[real]


def chunked_head_ce_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                        chunk: int) -> torch.Tensor:
    """Sum of cross-entropies of `head(hidden)` against `targets` (IGNORE: no target), over the target positions
    only (target_rows), `chunk` positions at a time; each chunk's logits are recomputed in backward, so neither the
    logits nor their gradient ever exist for more than one chunk."""
    rows, targets = target_rows(hidden, targets)
    if rows.shape[0] <= chunk:
        return _head_ce_sum(head, rows, targets)
    return sum(checkpoint(_head_ce_sum, head, rows[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
               for i in range(0, rows.shape[0], chunk))


class ChunkedHeadLoss:
    """Makes a causal LM's output head (the module `get_output_embeddings` returns, LoRA-wrapped or not) return
    the summed cross-entropy of its logits while `targets` is set, computed by chunked_head_ce_sum, or by `fused`
    (a fused linear cross-entropy taking weight, rows, targets, bias) for a plain linear head; the model's forward
    then carries that scalar as `logits`. Without targets (generation) the head returns logits as before. The head
    is patched in place, so parameter names, sharding units and hooks (FSDP, ZeRO-3) stay as they are: they see
    one call per forward, as before."""

    def __init__(self, head: torch.nn.Module, chunk: int, fused: Callable | None = None):
        self.chunk, self.fused = chunk, fused
        self.targets: torch.Tensor | None = None
        self._head = head
        self._logits = head.forward
        head.forward = self.forward
        head.chunked_loss = self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return self._logits(hidden)
        if self.fused is None:
            return chunked_head_ce_sum(self._logits, hidden, self.targets, self.chunk)
        rows, targets = target_rows(hidden, self.targets)
        return self.fused(self._head.weight, rows, targets, self._head.bias)

    @contextlib.contextmanager
    def computing(self, targets: torch.Tensor) -> Iterator[None]:
        self.targets = targets
        try:
            yield
        finally:
            self.targets = None


def liger_loss(head: torch.nn.Module, device: torch.device) -> Callable | None:
    """Liger's fused linear cross-entropy (summed) where it applies: a CUDA device, liger-kernel installed
    (`pip install 'dist_tune[liger]'`) and a plain linear head (LoRA on the head takes the chunked path)."""
    if device.type != "cuda" or not isinstance(head, torch.nn.Linear):
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")


def chunked_head_loss(model: torch.nn.Module) -> ChunkedHeadLoss | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "chunked_loss", None)


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if labels.dtype.is_floating_point:
        loss = F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    else:
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, torch.tensor(labels.shape[0], device=labels.device)
