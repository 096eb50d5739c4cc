"""Parameter-efficient tuning through peft, plus plain freezing; applied before the engine wraps the model."""
from __future__ import annotations

import logging

import torch

from dist_tune import init_weights
from dist_tune.config import Config
from dist_tune.errors import UserError
from dist_tune.models import count_parameters, decoder_layers, load_model

log = logging.getLogger(__name__)


def _task_type(cfg: Config) -> str:
    return "CAUSAL_LM" if cfg.model.task == "causal_lm" else "SEQ_CLS"


def has_conv1d(model: torch.nn.Module) -> bool:
    """GPT-2 style models keep linear weights transposed in transformers' Conv1D; peft adapters on them need
    fan_in_fan_out=True."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def peft_config(cfg: Config, model: torch.nn.Module):
    """The peft config object for peft.method (lora, dora, prefix_tuning, prompt_tuning, ia3, adapter). Unset
    peft.target_modules: peft's default for the architecture (Llama q_proj/v_proj, GPT-2 c_attn, BERT query/value)."""
    import peft

    p, task = cfg.peft, _task_type(cfg)
    targets = p.target_modules
    if isinstance(targets, list) and targets == ["all-linear"]:
        targets = "all-linear"
    if p.method in ("lora", "dora"):
        return peft.LoraConfig(task_type=task, r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                               target_modules=targets, use_dora=p.method == "dora",
                               fan_in_fan_out=has_conv1d(model))
    if p.method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    if p.method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=p.num_virtual_tokens)
    if p.method == "ia3":
        return peft.IA3Config(task_type=task, target_modules=targets,
                              feedforward_modules=[] if targets else None, fan_in_fan_out=has_conv1d(model))
    if p.method == "adapter":
        if cfg.model.task != "causal_lm":
            raise UserError("peft.method=adapter (LLaMA-Adapter) supports model.task=causal_lm only; use lora")
        layers = len(decoder_layers(model))
        return peft.AdaptionPromptConfig(task_type=task, adapter_len=p.num_virtual_tokens,
                                         adapter_layers=max(1, min(layers, p.adapter_bottleneck)))
    raise UserError(f"peft.method={p.method} is not a peft method")


def freeze(model: torch.nn.Module, trainable_modules: list[str] | None, last_n_layers: int | None) -> None:
    """Train only parameters whose name contains one of `trainable_modules` and/or the last N blocks."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if trainable_modules and any(m in name for m in trainable_modules):
            p.requires_grad_(True)
    if last_n_layers:
        for layer in decoder_layers(model)[-last_n_layers:]:
            layer.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("peft.method=freeze left no trainable parameter; set peft.trainable_modules "
                        "(name substrings) or peft.train_last_n_layers")


def apply_peft(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """Wrap or freeze the model per peft.method and log the trainable-parameter share."""
    method = cfg.peft.method
    if method == "freeze":
        freeze(model, cfg.peft.trainable_modules, cfg.peft.train_last_n_layers)
    elif method != "full":
        import peft

        try:
            model = peft.get_peft_model(model, peft_config(cfg, model))
        except ValueError as exc:
            raise UserError(f"peft.method={method} could not be applied: {str(exc).splitlines()[0]}; "
                            "check peft.target_modules") from None
        if not init_weights.built_empty(model):
            init_weights.initialise(model, init_weights.added_by_peft(model), cfg.train.seed)
        if cfg.peft.trainable_modules:
            for name, p in model.named_parameters():
                if any(m in name for m in cfg.peft.trainable_modules):
                    p.requires_grad_(True)
    total, trainable = count_parameters(model)
    log.info("peft.method=%s: %s trainable of %s parameters (%.4f%%)", method, f"{trainable:,}", f"{total:,}",
             100.0 * trainable / max(total, 1))
    return model


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def build_model(cfg: Config, tokenizer, device: torch.device) -> torch.nn.Module:
    """The configured model with its peft method applied, built on `device`."""
    return apply_peft(load_model(cfg, tokenizer, device=device), cfg)
