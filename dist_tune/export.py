"""Offline (single-process) consolidation of any engine's checkpoint, loading trained runs, adapter merging."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from dist_tune import checkpoint as ckpt
from dist_tune.config import Config, config_from_dict, qlora_compute_dtype, read_yaml
from dist_tune.engines.parallelize import load_trainable_state
from dist_tune.errors import UserError
from dist_tune.models import load_model, load_tokenizer
from dist_tune.peft import build_model, is_peft_model

# what each peft method learns that is not a weight of the base model, so cannot be merged into it
UNMERGEABLE = {"prefix_tuning": "per-layer prefix key/values", "prompt_tuning": "virtual input tokens",
               "adapter": "adaption prompts"}


def run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a dist_tune run directory (no config.yaml); pass the folder "
                        "that `dist-tune train` printed as its run dir")
    return config_from_dict(read_yaml(path))


def _dcp_state(path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path / "dcp"), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=False)["model"]


def _deepspeed_state(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(path / "deepspeed"), tag="state",
                                                    exclude_frozen_parameters=True)


def checkpoint_trainable_state(path: Path) -> dict[str, torch.Tensor]:
    """The trainable weights stored in a checkpoint of any engine, as one full (unsharded) dict."""
    if (path / "engine_state.pt").is_file():
        return torch.load(path / "engine_state.pt", map_location="cpu", weights_only=True)["model"]
    if (path / "dcp").is_dir():
        return _dcp_state(path)
    if (path / "deepspeed").is_dir():
        return _deepspeed_state(path)
    raise UserError(f"checkpoint '{path}' holds no engine state; it is incomplete or not a dist_tune checkpoint")


def model_from_checkpoint(cfg: Config, path: Path):
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, torch.device("cpu"))
    load_trainable_state(model, checkpoint_trainable_state(path))
    return model, tokenizer


def export_checkpoint(run_dir: Path, out_dir: Path | None = None, checkpoint: Path | None = None) -> Path:
    """Write a save_pretrained directory (safetensors) from the latest (or given) complete checkpoint."""
    cfg = run_config(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(Path(run_dir))
    if path is None or not ckpt.is_complete(path):
        raise UserError(f"no complete checkpoint in '{run_dir}'; train with checkpoint.save_steps set, "
                        "or pass --checkpoint checkpoints/step_N")
    model, tokenizer = model_from_checkpoint(cfg, path)
    out = Path(out_dir) if out_dir else Path(run_dir) / f"export-{path.name}"
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def unquantised_base(cfg: Config) -> Config:
    """The config of the base an adapter is merged into: a QLoRA run's base without 4-bit quantisation, in the
    16-bit dtype it computed in (merging into NF4 weights would round the merged weights back to 4 bits)."""
    if not cfg.peft.load_in_4bit:
        return cfg
    base = copy.deepcopy(cfg)
    base.peft.load_in_4bit = False
    base.model.dtype = qlora_compute_dtype(cfg)
    return base


def load_trained(run_dir: Path, *, unquantised: bool = False) -> tuple[Config, torch.nn.Module, object]:
    """The final model of a run (base + adapter for peft runs), in eval mode; unquantised: a QLoRA adapter goes
    on the unquantised base (see `unquantised_base`)."""
    cfg = run_config(run_dir)
    final = Path(run_dir) / "final"
    if not final.is_dir():
        raise UserError(f"run '{run_dir}' has no final/ model; it did not finish — use `dist-tune export` on its "
                        "latest checkpoint")
    tokenizer = load_tokenizer(cfg)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(unquantised_base(cfg) if unquantised else cfg, tokenizer)
        model = PeftModel.from_pretrained(base, str(final))
    else:
        cfg.model.name_or_path = str(final)
        model = load_model(cfg, tokenizer)
    return cfg, model.eval(), tokenizer


def merge_adapter(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Fold a peft adapter into the base weights and save a plain transformers model."""
    method = run_config(run_dir).peft.method
    if method in UNMERGEABLE:
        raise UserError(f"peft.method={method} learns {UNMERGEABLE[method]}, not changes to base weights, so it "
                        f"cannot be merged; use the adapter as is: PeftModel.from_pretrained(base_model, "
                        f"'{Path(run_dir) / 'final'}') or `dist-tune generate {run_dir} PROMPT`")
    _, model, tokenizer = load_trained(run_dir, unquantised=True)
    if not is_peft_model(model):
        raise UserError(f"run '{run_dir}' has no adapter to merge (peft.method was full or freeze); "
                        "its final/ directory is already a plain model")
    merged = model.merge_and_unload()
    out = Path(out_dir) if out_dir else Path(run_dir) / "merged"
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
