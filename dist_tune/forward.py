"""One micro-batch through the model: its inputs, its forward (the chunked head computing the loss where it
applies), its summed loss and its counts (targets, tokens, examples, logit positions); used by the training loop
and by evaluation."""
from __future__ import annotations

from typing import Any

import torch

from dist_tune.engines.base import Engine
from dist_tune.loss import (IGNORE, aligned_targets, causal_lm_loss_sum, chunked_head_loss, classification_loss_sum,
                            shifted_labels)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_to_keep",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Inputs for the HF forward; padding-free rows pass position_ids (and sequence boundaries) and no mask,
    so attention stays per example."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
        inputs["use_cache"] = False  # with a cache, transformers ignores the position-id document boundaries
    return inputs


def target_count(batch: dict[str, torch.Tensor], causal: bool) -> int:
    if not causal:
        return int(batch["labels"].shape[0])
    return int((shifted_labels(batch["labels"], batch.get("position_ids")) != IGNORE).sum())


def logit_positions(batch: dict[str, torch.Tensor]) -> int:
    """Real-token positions where the model computes logits: every one, or only those in `logits_to_keep`."""
    mask = batch["attention_mask"]
    keep = batch.get("logits_to_keep")
    return int((mask[:, keep] if torch.is_tensor(keep) else mask).sum())


def sequence_count(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a micro-batch: rows, or in packed/padding-free rows the real tokens at position 0."""
    if "position_ids" not in batch:
        return int(batch["input_ids"].shape[0])
    return int(((batch["position_ids"] == 0) & batch["attention_mask"].bool()).sum())


def forward(engine: Engine, batch: dict[str, torch.Tensor]) -> Any:
    """The model's output on a micro-batch; where the head computes the loss in chunks (loss.ChunkedHeadLoss),
    its `logits` are the summed cross-entropy of the batch's targets."""
    head = chunked_head_loss(engine.unwrap()) if "labels" in batch else None
    if head is None:
        return engine.forward(model_inputs(batch))
    with head.computing(aligned_targets(batch["labels"], batch.get("position_ids"), batch.get("logits_to_keep"))):
        return engine.forward(model_inputs(batch))


def loss_sum(output: Any, batch: dict[str, torch.Tensor], causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of targets) of a micro-batch's output."""
    if causal and output.logits.dim() == 0:  # the head already reduced it (see forward)
        return output.logits, torch.tensor(target_count(batch, causal), device=output.logits.device)
    if causal:
        return causal_lm_loss_sum(output.logits, batch["labels"], batch.get("position_ids"),
                                  batch.get("logits_to_keep"))
    return classification_loss_sum(output.logits, batch["labels"])


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
