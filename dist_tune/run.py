"""Wires one training run: cluster → engine → tokenizer/data → model/peft → trainer → final export."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_tune import checkpoint as ckpt
from dist_tune import cluster, metrics
from dist_tune.config import Config, dump_config
from dist_tune.data import build_datasets
from dist_tune.engines import build_engine
from dist_tune.engines.base import Engine
from dist_tune.models import check_sequence_length, count_parameters, load_model, load_tokenizer
from dist_tune.optim import optimizer_factory, scheduler_factory
from dist_tune.peft import apply_peft
from dist_tune.trainer import Trainer

log = logging.getLogger(__name__)


def default_run_name(cfg: Config) -> str:
    """Stable across requeues and elastic restarts (job or rendezvous id), unique otherwise."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    stem = f"{Path(cfg.model.name_or_path).name}-{cfg.data.format}-{cfg.engine.kind}"
    return f"{stem}-{job}" if job and job != "none" else f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(cfg: Config) -> Path:
    """Rank 0 picks the run name; every rank gets the same directory."""
    name = [cfg.train.run_name or default_run_name(cfg)]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    cfg.train.run_name = name[0]
    return Path(cfg.train.output_dir) / name[0]


def rank0_first(engine: Engine, fn):
    """Run fn on rank 0 first (it fills the datasets cache), then on the other ranks."""
    if engine.env.rank == 0:
        result = fn()
        engine.barrier()
        return result
    engine.barrier()
    return fn()


def flops_formula(cfg: Config) -> str:
    return metrics.FLOPS_FORMULA_FULL if cfg.peft.method == "full" else metrics.FLOPS_FORMULA_PEFT


def mfu_function(cfg: Config, model: torch.nn.Module, engine: Engine):
    hf = getattr(model, "config", None)
    total, trainable = count_parameters(model)
    peak = metrics.peak_flops_per_device(engine.device, cfg.engine.mixed_precision)

    def compute(tokens_per_s: float, seq_len: float) -> float | None:
        per_token = metrics.flops_per_token(
            n_params=total, n_trainable=trainable, n_layers=getattr(hf, "num_hidden_layers", 0),
            hidden=getattr(hf, "hidden_size", 0), seq_len=int(seq_len), full_tuning=cfg.peft.method == "full")
        return metrics.mfu(tokens_per_s, per_token, peak, engine.env.world_size)
    return compute


def export_final(engine: Engine, tokenizer, out_dir: Path) -> None:
    """Gather the full state (all ranks) and write a save_pretrained directory on rank 0.

    Sharded engines load the gathered state strictly into a fresh unsharded model first, so the saved
    model or adapter is complete and peft's own save logic never touches sharded parameters."""
    state = engine.full_state_dict()
    if engine.env.rank == 0:
        model = engine.unwrap()
        if engine.shards_state:
            model = build_model(engine.cfg, tokenizer, torch.device("cpu"))
            model.load_state_dict(state, strict=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    engine.barrier()


def build_model(cfg: Config, tokenizer, device: torch.device) -> torch.nn.Module:
    return apply_peft(load_model(cfg, tokenizer, device=device), cfg)


def describe_batch(cfg: Config, env: cluster.ClusterEnv) -> str:
    t = cfg.train
    return (f"global batch = micro {t.micro_batch_size} × accumulation {t.grad_accum} × data-parallel "
            f"{env.world_size} = {t.micro_batch_size * t.grad_accum * env.world_size} sequences per step")


def build_trainer(cfg: Config, env: cluster.ClusterEnv) -> Trainer:
    engine = build_engine(cfg, env)
    run_dir = resolve_run_dir(cfg)
    # fail before any data, model or run-dir work: a resume that cannot work, a length the model cannot take
    ckpt.resume_checkpoint(run_dir, cfg.train.resume, cfg.model.name_or_path)
    tokenizer = load_tokenizer(cfg)
    check_sequence_length(cfg, tokenizer)
    train_set, val_set = rank0_first(engine, lambda: build_datasets(cfg, tokenizer))
    model = build_model(cfg, tokenizer, engine.init_device())
    trainer = Trainer(cfg, engine, train_set, val_set, tokenizer, run_dir, metrics=None)
    trainer.state.model_name = cfg.model.name_or_path
    engine.prepare(model, optimizer_factory(cfg.optim), scheduler_factory(cfg.optim, trainer.total_steps))
    trainer.mfu = mfu_function(cfg, model, engine)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info("run dir %s; engine %s on %s; %s; %d steps; MFU formula %s", run_dir, engine.name, engine.device,
             describe_batch(cfg, env), trainer.total_steps, flops_formula(cfg))
    return trainer


def train(cfg: Config) -> dict[str, Any]:
    """Train per the config in this process (one rank of the job); returns the run summary."""
    env = cluster.detect()
    cluster.init_distributed(env, timeout_minutes=cfg.engine.timeout_minutes)
    metrics.rank_logging(env.rank)
    try:
        trainer = build_trainer(cfg, env)
        trainer.preemption = cluster.PreemptionHandler()
        trainer.resume_if_requested()
        trainer.metrics = metrics.MetricsLogger(cfg, trainer.run_dir, rank=env.rank,
                                                total_steps=trainer.total_steps, start_step=trainer.state.step)
        summary = trainer.train()
        summary.update(trainer.engine.local_state_bytes())
        summary["flops_formula"] = flops_formula(cfg)
        preempted = summary["stopped"] == "preempted"
        if cfg.checkpoint.save_final and not preempted:
            export_final(trainer.engine, trainer.tokenizer, trainer.run_dir / "final")
        summary["run_dir"] = str(trainer.run_dir)
        trainer.metrics.close(summary)
        if preempted and env.rank == 0:
            trainer.preemption.requeue()  # last: Slurm ends the job as soon as it is requeued
        return summary
    finally:
        cluster.destroy_distributed()
