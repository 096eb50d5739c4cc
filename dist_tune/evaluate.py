"""`eval` and `generate` on a finished run, in one process."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dist_tune import cluster, process_group
from dist_tune.config import apply_overrides
from dist_tune.data.formats import prompt_ids
from dist_tune.data.pipeline import build_datasets
from dist_tune.engines.single import SingleEngine
from dist_tune.errors import UserError
from dist_tune.export import load_trained
from dist_tune.generation import GENERATIONS_FILE
from dist_tune.evaluation import evaluate_model

log = logging.getLogger(__name__)
GENERATE_SAMPLES = 16  # prompts for --generate when the run's config sets none


def evaluate_run(run_dir: Path, overrides: dict, generate: bool = False) -> dict[str, Any]:
    """Validation metrics of the run's final model (data overrides allowed, e.g. another validation file), with
    the confusion matrix of a classifier; generate: also generation metrics over eval.generate_samples prompts
    (GENERATE_SAMPLES when the run set none).
    Like training's evals, it writes confusion_matrix.json / generations.jsonl to the run dir."""
    cfg, model, tokenizer = load_trained(run_dir)
    apply_overrides(cfg, overrides)
    if generate and not cfg.eval.generate_samples:
        cfg.eval.generate_samples = GENERATE_SAMPLES
        log.info("--generate: this run's eval.generate_samples is 0, so generating for up to %d validation prompts "
                 "(set --eval.generate_samples=N for another count)", GENERATE_SAMPLES)
    cfg.eval.generate_samples = cfg.eval.generate_samples if generate else 0
    env = cluster.detect()
    engine = SingleEngine(cfg, env, process_group.select_device(cfg.train.device, env))
    engine.model = model.to(engine.device)
    _, val_set = build_datasets(cfg, tokenizer)
    if val_set is None:
        raise UserError(f"run '{run_dir}' has no validation rows (data.validation_split=0, or streamed data without "
                        "data.validation_path); pass --data.validation_path=FILE")
    evaluation = evaluate_model(cfg, engine, val_set, tokenizer)
    evaluation.write(run_dir)
    if evaluation.generations:
        log.info("wrote %d generations to %s", len(evaluation.generations), Path(run_dir) / GENERATIONS_FILE)
    confusion = {"confusion_matrix": evaluation.confusion} if evaluation.confusion is not None else {}
    return {**evaluation.metrics, **confusion}


@torch.no_grad()
def generate_text(run_dir: Path, prompt: str, input_text: str = "", *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
    """Greedy (temperature 0) or nucleus sampling; returns only the generated continuation."""
    cfg, model, tokenizer = load_trained(run_dir)
    if cfg.model.task != "causal_lm":
        raise UserError(f"run '{run_dir}' trained a {cfg.model.task} model; generate needs model.task=causal_lm")
    ids = torch.tensor([prompt_ids(cfg, tokenizer, prompt, input_text)])
    ids = ids.to(next(model.parameters()).device)  # a QLoRA base sits on the GPU it was quantised on
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=sample, temperature=temperature if sample else None,
                         top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
