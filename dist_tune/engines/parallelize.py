"""Model transforms shared by engines, applied as functions (torchtitan style)."""
from __future__ import annotations

import logging

import torch

from dist_tune.config import Config, loss_chunk_positions, shards_parameters
from dist_tune.errors import UserError
from dist_tune.host_heap import release_after_each_block
from dist_tune.init_weights import base_model, shared_parameters
from dist_tune.loss import ChunkedHeadLoss, liger_loss
from dist_tune.models import decoder_layers


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant, so frozen inputs are fine)."""
    base = base_model(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile each decoder block in place (keeps module classes and state-dict keys)."""
    for layer in decoder_layers(model):
        layer.compile()


log = logging.getLogger(__name__)


def apply_chunked_loss(model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    """The LM head and its loss computed chunk by chunk of target positions (loss.ChunkedHeadLoss; Liger's fused
    kernel where it applies), or say why the whole micro-batch's logits are built."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chunk = loss_chunk_positions(cfg, model.config) if head is not None else 0
    if not chunk:
        if cfg.model.task == "causal_lm":
            log.info("loss: logits of the whole micro-batch (train.chunked_loss=%s)", cfg.train.chunked_loss)
        return
    fused = liger_loss(head, device)
    ChunkedHeadLoss(head, chunk, fused)
    if fused is not None:
        log.info("loss: Liger's fused linear cross-entropy (LM head and loss in one kernel, chunked)")
    else:
        log.info("loss: LM head and cross-entropy in chunks of %d target positions (%.0f MiB of fp32 logits each)",
                 chunk, chunk * model.config.vocab_size * 4 / 2**20)


def apply_common(model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    apply_chunked_loss(model, cfg, device)
    if device.type == "cpu" and shards_parameters(cfg):
        release_after_each_block(decoder_layers(model))
    if cfg.engine.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.engine.compile:
        apply_compile(model)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only: what a checkpoint must hold beyond the base weights."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a trainable-state dict into the model, requiring exactly the same keys and shapes (tied aliases
    aside: sharded engines' state dicts list a shared parameter's second name beside the first)."""
    aliases = {alias for alias, _ in shared_parameters(model)}
    state = {k: v for k, v in state.items() if k not in aliases}
    own = dict(model.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise UserError(f"checkpoint does not match this model (missing {missing}, unexpected {extra}); "
                        "resume only into the same model and peft settings, or set train.resume=none")
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise UserError(f"checkpoint tensor '{name}' has shape {tuple(value.shape)} but the model has "
                                f"{tuple(own[name].shape)}; resume only into the same model")
            own[name].copy_(value)
