"""`eval` and `generate` on a finished run, in one process."""
from __future__ import annotations

from pathlib import Path

import torch

from dist_tune import cluster
from dist_tune.config import apply_overrides
from dist_tune.data import build_datasets, prompt_for
from dist_tune.engines.single import SingleEngine
from dist_tune.errors import UserError
from dist_tune.export import load_trained
from dist_tune.trainer import Trainer


def evaluate_run(run_dir: Path, overrides: dict) -> dict[str, float]:
    """Validation metrics of the run's final model (data overrides allowed, e.g. another validation file)."""
    cfg, model, tokenizer = load_trained(run_dir)
    apply_overrides(cfg, overrides)
    engine = SingleEngine(cfg, cluster.detect())
    engine.model = model.to(engine.device)
    train_set, val_set = build_datasets(cfg, tokenizer)
    trainer = Trainer(cfg, engine, train_set, val_set, tokenizer, Path(run_dir), metrics=None)
    return trainer.evaluate()


@torch.no_grad()
def generate_text(run_dir: Path, prompt: str, input_text: str = "", *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """Greedy (temperature 0) or nucleus sampling; returns only the generated continuation."""
    cfg, model, tokenizer = load_trained(run_dir)
    if cfg.model.task != "causal_lm":
        raise UserError(f"run '{run_dir}' trained a {cfg.model.task} model; generate needs model.task=causal_lm")
    text = prompt_for(cfg, prompt, input_text) if cfg.data.format == "instruction" else prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature if sample else None,
                         top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
