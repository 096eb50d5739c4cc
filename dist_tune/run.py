"""Wires one training run: cluster → process group → run-dir lock → engine → tokenizer/data → model/peft →
trainer → final export."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_tune import checkpoint as ckpt
from dist_tune import (cluster, faults, flops, host_heap, init_weights, memory_probe, metrics, preemption,
                       process_group, run_lock)
from dist_tune.config import Config, dump_config, shards_parameters
from dist_tune.data.collate import make_collator
from dist_tune.data.loader import EpochBatches, build_loader
from dist_tune.data.once import prepare_once
from dist_tune.data.pipeline import build_datasets, cache_dir
from dist_tune.data.stream import build_stream_batches
from dist_tune.engines.registry import build_engine
from dist_tune.engines.base import Engine
from dist_tune.export import export_final
from dist_tune.models import (check_sequence_length, count_parameters, fetch_model, load_tokenizer, model_config,
                              settle_padding_free)
from dist_tune.optim import optimizer_factory, scheduler_factory
from dist_tune.peft import build_model
from dist_tune.schedule import batch_terms, global_batch, steps_per_epoch, total_steps
from dist_tune.trainer import Trainer

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: Config) -> Path:
    """Rank 0 picks the run name; every rank gets the same directory."""
    name = [cfg.train.run_name or ckpt.default_run_name(cfg)]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    cfg.train.run_name = name[0]
    return Path(cfg.train.output_dir) / name[0]


def rank0_first(engine: Engine, fn, *, per_node: bool = False):
    """Run fn on rank 0 (per_node: on each node's local rank 0) first, as it fills a cache, then on the others."""
    if (engine.env.local_rank if per_node else engine.env.rank) == 0:
        result = fn()
        engine.barrier()
        return result
    engine.barrier()
    return fn()


def flops_formula(cfg: Config) -> str:
    return flops.FLOPS_FORMULA_FULL if cfg.peft.method == "full" else flops.FLOPS_FORMULA_PEFT


def flops_model(model: torch.nn.Module) -> flops.FlopsModel:
    """The model's parameters split into body and LM head (see flops.FlopsModel): an untied input embedding
    is left out, a tied one counted once, as the head; classifiers have no LM head (their score layer is body)."""
    hf = getattr(model, "config", None)
    total, trainable = count_parameters(model)
    head = model.get_output_embeddings()
    head_total, head_trainable = count_parameters(head) if head is not None else (0, 0)
    tied = init_weights.tied_embeddings(model)
    embedding_total, embedding_trainable = (0, 0) if tied else count_parameters(model.get_input_embeddings())
    return flops.FlopsModel(body=total - head_total - embedding_total,
                              body_trainable=trainable - head_trainable - embedding_trainable,
                              head=head_total, head_trainable=head_trainable,
                              n_layers=getattr(hf, "num_hidden_layers", 0), hidden=getattr(hf, "hidden_size", 0))


def mfu_function(cfg: Config, model: torch.nn.Module, engine: Engine):
    """MFU of a logged window from (tokens/s, mean example length, logit positions per token), at the peak
    of the dtype the matmuls run in."""
    counted = flops_model(model)
    peak = flops.peak_flops_per_device(engine.device, flops.compute_dtype(cfg))

    def compute(tokens_per_s: float, seq_len: float, logit_positions_per_token: float) -> float | None:
        per_token = counted.per_token(seq_len, logit_positions_per_token)
        return flops.mfu(tokens_per_s, per_token, peak, engine.env.world_size)
    return compute


def describe_batch(cfg: Config, env: cluster.ClusterEnv) -> str:
    return (f"global batch = {batch_terms(cfg, env.world_size)} = {global_batch(cfg, env.world_size)} sequences "
            "per step")


def resume_state(engine: Engine, path: Path | None, model_name: str) -> ckpt.TrainState:
    """Where training starts: the state of checkpoint `path` (loaded into the prepared engine), or step 0."""
    if path is None:
        return ckpt.TrainState(model_name=model_name)
    state = ckpt.load_checkpoint(engine, path)
    log.info("resumed from %s at step %d (epoch %d, %d samples in)", path, state.step, state.epoch,
             state.samples_in_epoch)
    return state


def training_batches(cfg: Config, tokenizer, train_set, env: cluster.ClusterEnv) -> tuple[Any, int]:
    """This rank's training micro-batches and the run's optimizer steps: epochs of the prepared rows, or a stream
    read as it trains (data.streaming, for train.max_steps)."""
    if cfg.data.streaming:
        batches = build_stream_batches(cfg, tokenizer, make_collator(cfg, tokenizer), env.rank, env.world_size)
        return batches, cfg.train.max_steps
    loader, _ = build_loader(train_set, cfg, tokenizer, rank=env.rank, world_size=env.world_size, shuffle=True,
                             seed=cfg.train.seed)
    return EpochBatches(loader, env.world_size), total_steps(cfg, steps_per_epoch(len(loader), cfg.train.grad_accum))


def build_trainer(cfg: Config, env: cluster.ClusterEnv, device: torch.device, run_dir: Path) -> Trainer:
    """Everything the loop needs, built in dependency order. Rank 0 must hold run_dir's lock (run_lock.hold)."""
    engine = build_engine(cfg, env, device)
    # fail before any data or model work: a resume that cannot work, a length the model cannot take
    resume_from = ckpt.resume_checkpoint(run_dir, cfg.train.resume, cfg.model.name_or_path)
    if resume_from is not None:
        ckpt.verify_checkpoint(resume_from, cfg.checkpoint.verify, env.rank, env.world_size)
        ckpt.check_data_resume(resume_from, cfg.data.streaming, env.world_size)
    rank0_first(engine, lambda: fetch_model(cfg), per_node=True)  # one download per node; the rest read the cache
    tokenizer = load_tokenizer(cfg)
    check_sequence_length(cfg, tokenizer)
    settle_padding_free(cfg, tokenizer)
    train_set, val_set = prepare_once(env, cache_dir(cfg), lambda: build_datasets(cfg, tokenizer))
    batches, steps = training_batches(cfg, tokenizer, train_set, env)
    with engine.construction(model_config(cfg, tokenizer)):
        model = build_model(cfg, tokenizer, engine.init_device())
    optimizer = optimizer_factory(cfg.optim, fused=device.type == "cuda" and not cfg.engine.cpu_offload,
                                  cpu_adam=cfg.engine.offload_optimizer)
    engine.prepare(model, optimizer, scheduler_factory(cfg.optim, steps))
    handler = preemption.PreemptionHandler(env, device)
    state = resume_state(engine, resume_from, cfg.model.name_or_path)
    if resume_from is not None and cfg.data.streaming:
        batches.load_state_dict(ckpt.read_data_state(resume_from, env.rank))
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    log.info("run dir %s; engine %s on %s; %s; %d steps; MFU formula %s", run_dir, engine.name, engine.device,
             describe_batch(cfg, env), steps, flops_formula(cfg))
    return Trainer(cfg, engine, batches, steps, val_set, tokenizer, run_dir,
                   metrics=metrics.MetricsLogger(cfg, run_dir, rank=env.rank, total_steps=steps, start_step=state.step),
                   preemption=handler, mfu=mfu_function(cfg, model, engine), state=state,
                   after_step=faults.kill_hook(run_dir, env.rank))


def train(cfg: Config) -> dict[str, Any]:
    """Train per the config in this process (one rank of the job); returns the run summary."""
    preemption.capture_early_signal()
    env = cluster.detect()
    device = process_group.select_device(cfg.train.device, env)
    process_group.init_distributed(env, device, process_group.backend_for(device, cfg.engine.cpu_offload),
                                   cfg.engine.timeout_minutes, group_when_alone=cfg.engine.kind == "deepspeed")
    try:
        run_dir = resolve_run_dir(cfg)
        with run_lock.hold(run_dir, env):
            with host_heap.returning_large_frees():
                trainer = build_trainer(cfg, env, device, run_dir)
            load_peak = memory_probe.peak_host_rss_per_rank()
            host_heap.use_for_steps(shards_parameters(cfg) and device.type == "cpu")
            summary = trainer.train()
            summary.update(trainer.engine.local_state_bytes())
            summary["flops_formula"] = flops_formula(cfg)
            if cfg.checkpoint.save_final and summary["stopped"] != "preempted":
                with host_heap.returning_large_frees():
                    export_final(trainer.engine, trainer.tokenizer, run_dir / "final")
            summary["load_peak_host_rss_gib_per_rank"] = load_peak
            summary["peak_host_rss_gib_per_rank"] = memory_probe.peak_host_rss_per_rank()
            summary["run_dir"] = str(run_dir)
            trainer.metrics.close(summary)
        if summary["stopped"] == "preempted":
            trainer.preemption.requeue()  # last (rank 0 only): Slurm ends the job as soon as it is requeued
        return summary
    finally:
        process_group.destroy_distributed()
