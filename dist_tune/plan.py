"""`dist-tune train --dry_run`: the plan of a run from its config and the launcher's environment alone — world size,
batch, steps, memory, run dir, W&B — with no process group, no weights loaded and nothing written.

The world is the launcher's (torchrun or srun variables, as `cluster.detect` reads them), else the planned job of
the launch scripts' variables NNODES (or SLURM_NNODES) × NPROC_PER_NODE, else one process. So an sbatch line can be
checked on a login node: `NNODES=2 NPROC_PER_NODE=8 dist-tune train RECIPE --dry_run`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from dist_tune import checkpoint as ckpt
from dist_tune import cluster
from dist_tune.config import Config
from dist_tune.data.sources import HUB, load_records, resolve_path
from dist_tune.engines.registry import check_single_process
from dist_tune.errors import UserError
from dist_tune.schedule import batch_terms, global_batch, steps_per_epoch, total_steps


@dataclass(frozen=True)
class Layout:
    world_size: int
    num_nodes: int
    per_node: int
    source: str


def _count(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{name}={value!r} is not a positive number; set NNODES and NPROC_PER_NODE to the "
                                "job's node count and processes per node for the dry run")
            return int(value)
    return None


def layout(environ: Mapping[str, str] | None = None) -> Layout:
    """The job's processes: from the launcher, else NNODES/SLURM_NNODES × NPROC_PER_NODE, else one process."""
    environ = os.environ if environ is None else environ
    env = cluster.detect(environ, resolve=False, use_scontrol=False)
    if env.launcher != "single":
        return Layout(env.world_size, env.num_nodes, env.local_world_size, f"{env.launcher} environment")
    nodes, per_node = _count(environ, "NNODES", "SLURM_NNODES"), _count(environ, "NPROC_PER_NODE")
    if nodes is None and per_node is None:
        return Layout(1, 1, 1, "no launcher: one process; set NNODES and NPROC_PER_NODE to plan a job")
    nodes, per_node = nodes or 1, per_node or 1
    return Layout(nodes * per_node, nodes, per_node, "NNODES × NPROC_PER_NODE")


def count_rows(path: str, split: str) -> int | None:
    """Rows of a local or bundled source (JSONL lines and parquet metadata are not parsed); None for `hf:` data."""
    if path.startswith(HUB):
        return None
    resolved = resolve_path(path)
    suffix = resolved.suffix.lower()
    if resolved.is_file() and suffix == ".jsonl":
        with resolved.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if resolved.is_file() and suffix == ".parquet":
        return pq.ParquetFile(resolved).metadata.num_rows
    return len(load_records(path, split=split))


def training_rows(cfg: Config, rows: int) -> tuple[int, str]:
    """Rows left for training once the validation hold-out (as data.pipeline splits it) is taken."""
    if cfg.data.validation_path or cfg.data.validation_split == 0:
        return rows, "all for training"
    held = max(1, round(rows * cfg.data.validation_split))
    return rows - held, f"{rows - held:,} for training, {held:,} held out by data.validation_split"


def steps_line(cfg: Config, train_rows: int | None, world: int, data: str) -> str:
    """Optimizer steps and epochs, as the trainer counts them (whole micro-batches per rank, then grad_accum)."""
    t = cfg.train
    if train_rows is None:
        unknown = f"{data} is not downloaded or counted by a dry run"
        if t.max_steps:
            return f"{t.max_steps:,} (train.max_steps); epochs unknown: {unknown}"
        return f"unknown: train.epochs={t.epochs:g} of {unknown}; set train.max_steps to fix the count"
    per_epoch = steps_per_epoch(train_rows // world // t.micro_batch_size, t.grad_accum)
    packed = " before packing (data.pack merges rows: fewer steps)" if cfg.data.pack else ""
    if t.max_steps:
        epochs = t.max_steps / per_epoch
        return f"{t.max_steps:,} (train.max_steps) = {epochs:.2f} epochs of {per_epoch:,} steps{packed}"
    return f"{total_steps(cfg, per_epoch):,} = {per_epoch:,} steps per epoch × train.epochs={t.epochs:g}{packed}"


def sharding(cfg: Config, world: int) -> str:
    kind, stage = cfg.engine.kind, cfg.engine.zero_stage
    if kind == "fsdp" or (kind == "deepspeed" and stage == 3):
        split = "weights, gradients and optimizer states"
    elif kind == "deepspeed":
        split = "gradients and optimizer states" if stage == 2 else "optimizer states"
    else:
        return f"data-parallel {world}, engine {kind}: every rank holds the whole model"
    replicas = cfg.engine.replicate_degree
    engine = f"engine {kind}{f' ZeRO-{stage}' if kind == 'deepspeed' else ''}"
    if replicas > 1 and kind == "fsdp":
        return f"data-parallel {world}, {engine} (HSDP): {split} sharded within {replicas} groups of " \
               f"{world // replicas} ranks and replicated across them"
    hpz = f", the weights also within groups of {world // replicas} ranks (hpZ)" if replicas > 1 else ""
    return f"data-parallel {world}, {engine}: {split} sharded over all {world} ranks{hpz}"


def memory_lines(cfg: Config, where: Layout) -> list[tuple[str, str]]:
    from dist_tune.estimate import estimate

    try:
        e = estimate(cfg, where.world_size, where.per_node)
    except UserError as exc:
        return [("memory per GPU", f"unknown: {exc}")]
    per_gpu = (f"{e.total_gib:.2f} GiB (weights {e.weights_gib:.2f}, gradients {e.grads_gib:.2f}, optimizer "
               f"{e.optimizer_gib:.2f}, gathered {e.gathered_gib:.2f}, activations {e.activations_gib:.2f}, "
               f"logits {e.logits_gib:.2f}; as on a bf16 GPU)")
    per_node = f"{where.per_node} × {e.total_gib:.2f} = {where.per_node * e.total_gib:.2f} GiB of GPU memory"
    if e.host_gib:
        per_node += (f"; offloaded to host {where.per_node} × {e.host_gib:.2f} = {where.per_node * e.host_gib:.2f} "
                     "GiB")
    host = f"per node {e.host.load_gib:.2f} GiB to load the model, {e.host.save_gib:.2f} GiB to save it"
    return [("memory per GPU", per_gpu), ("memory per node", per_node), ("host RAM", host)]


def run_dir_lines(cfg: Config) -> list[tuple[str, str]]:

    name = cfg.train.run_name or ckpt.default_run_name(cfg)
    run_dir = Path(cfg.train.output_dir) / name
    note = "" if cfg.train.run_name or not re.search(r"-\d{8}-\d{6}$", name) else \
        " (timestamped at launch; set train.run_name to fix it)"
    resume = ckpt.resume_checkpoint(run_dir, cfg.train.resume, cfg.model.name_or_path) if run_dir.is_dir() else None
    c = cfg.checkpoint
    saves = [f"every {c.save_steps} steps and the last under checkpoints/ (keep {c.save_total_limit or 'all'})"
             if c.save_steps else "the last step only under checkpoints/ (checkpoint.save_steps=null)",
             "final model in final/" if c.save_final else "no final model (checkpoint.save_final=false)"]
    if resume:
        saves.append(f"resumes from {resume}")
    return [("run dir", f"{run_dir}{note}"), ("checkpoints", "; ".join(saves))]


def wandb_line(cfg: Config) -> str:
    from dist_tune.metrics import wandb_mode

    configured = cfg.log.wandb.mode
    mode = wandb_mode(configured)
    if configured != "auto":
        why = f"log.wandb.mode={configured}"
    elif os.environ.get("WANDB_MODE"):
        why = f"WANDB_MODE={os.environ['WANDB_MODE']}"
    else:
        why = "WANDB_API_KEY is set" if mode == "online" else "log.wandb.mode=auto and no WANDB_API_KEY"
    return f"{mode} ({why}), project {cfg.log.wandb.project}"


def plan(cfg: Config, changes: list[str], where: Layout) -> list[tuple[str, str]]:
    """(label, value) rows of the plan; `changes`: config.changed_values lines."""
    world = where.world_size
    check_single_process(cfg, world)
    batch = global_batch(cfg, world)
    mixture = f"a mixture of {len(cfg.data.sources)} data.sources" if cfg.data.sources else None
    streamed = "streamed (data.streaming): read as it trains, not counted" if cfg.data.streaming else None
    rows = None if mixture or streamed else count_rows(cfg.data.path, cfg.data.split)
    train_rows, split = training_rows(cfg, rows) if rows is not None else (None, "")
    tokens = (f"{batch * cfg.data.max_length:,} (packed rows of data.max_length={cfg.data.max_length})" if cfg.data.pack
              else f"at most {batch * cfg.data.max_length:,} (global batch × data.max_length={cfg.data.max_length})")
    return [
        ("world size",
         f"{world} = {where.num_nodes} node(s) × {where.per_node} process(es) per node ({where.source})"),
        ("mesh", sharding(cfg, world)),
        ("global batch", f"{batch:,} sequences = {batch_terms(cfg, world)}"),
        ("tokens per step", tokens),
        ("data", f"{mixture or cfg.data.path}: {streamed}" if streamed else f"{mixture}: not counted" if mixture else
         f"{cfg.data.path}: " + (f"{rows:,} rows, {split}" if rows is not None else "not counted (hub)")),
        ("steps", steps_line(cfg, train_rows, world, mixture or cfg.data.path)),
        *memory_lines(cfg, where),
        *run_dir_lines(cfg),
        ("W&B", wandb_line(cfg)),
        *[("config" if i == 0 else "", line) for i, line in enumerate(changes or ["library defaults"])],
    ]


def format_plan(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows) + 1
    lines = ["dry run: the plan below; no weights loaded, nothing written"]
    lines += [f"{label + ':' if label else '':<{width}} {value}" for label, value in rows]
    return "\n".join(lines)
