"""Run-directory layout, atomic checkpoints (tmp dir → fsync → rename, COMPLETE marker) and resume discovery."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dist_tune import checkpoint_trust as trust
from dist_tune.errors import UserError
from dist_tune.host_heap import returning_large_frees

if TYPE_CHECKING:
    from dist_tune.config import Config

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
DATA_STATE = "data_rank{rank}.pt"  # a streaming run's place in each rank's share of the stream
FINISHED = "summary.json"  # report.SUMMARY_NAME: written when a run ends


@dataclass
class TrainState:
    """Where training is: enough to continue on exactly the next batch, at any world size. samples_in_epoch
    counts the epoch's samples trained on over all ranks (the position in the epoch's order); world_size is the
    saving run's (0 until saved); eval_pending: saved before this step's evaluation, which a resume runs first."""
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0
    consecutive_bad_steps: int = 0
    skipped_steps: int = 0
    model_name: str = ""
    world_size: int = 0
    eval_pending: bool = False


def default_run_name(cfg: Config) -> str:
    """Stable across requeues and elastic restarts (job or rendezvous id), unique otherwise."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    stem = f"{Path(cfg.model.name_or_path).name}-{cfg.data.format}-{cfg.engine.kind}"
    return f"{stem}-{job}" if job and job != "none" else f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    """A COMPLETE marker and a readable trainer_state.json that holds a TrainState."""
    try:
        read_state(path)
    except (OSError, ValueError, TypeError):
        return False
    return (path / COMPLETE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete or corrupt ones are reported and skipped."""
    found = []
    for path in sorted(checkpoints_dir(run_dir).glob("step_*")):
        if path.name.endswith(".tmp") or not is_complete(path):
            log.warning("ignoring incomplete checkpoint %s (no %s marker or unreadable state)", path, COMPLETE)
            continue
        found.append(path)
    return found


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path, mode: str, model_name: str) -> Path | None:
    """The checkpoint train.resume=`mode` continues from (None: start fresh), checked to be complete and
    trained from `model_name`; raises UserError otherwise. Cheap: called before any model is built."""
    if mode == "none":
        return None
    path = latest_checkpoint(run_dir) if mode == "auto" else Path(mode)
    if path is None and (run_dir / FINISHED).is_file():
        raise UserError(f"run dir {run_dir} holds a finished run and no checkpoint to continue from; use a new "
                        "train.run_name, or train.resume=none to train it again from step 1, replacing it")
    if path is None:
        return None
    if not is_complete(path):
        raise UserError(f"train.resume='{mode}' is not a complete checkpoint; pass a checkpoints/step_N "
                        "directory with a COMPLETE marker, or auto")
    saved = read_state(path)
    if saved.model_name != model_name:
        raise UserError(f"checkpoint {path} was trained from model '{saved.model_name}', not '{model_name}'; "
                        "use a new train.run_name or set train.resume=none")
    return path


def read_state(path: Path, micro_batch_size: int | None = None) -> TrainState:
    """The checkpoint's TrainState. Checkpoints from before samples_in_epoch recorded micro-batches per rank and
    no world size: it is the number of rng_rank*.pt files, and the position converts to samples given the
    run's `micro_batch_size` (without it the position is left at 0: for checks that do not read it)."""
    data = json.loads((path / STATE_FILE).read_text())
    batches = data.pop("batches_in_epoch", None)
    if batches is not None:
        data["world_size"] = len(list(path.glob("rng_rank*.pt")))
        if batches and micro_batch_size is not None:
            if not data["world_size"]:
                raise UserError(f"checkpoint {path} records neither its world size nor per-rank RNG files, so its "
                                "position in the epoch is unknown; set train.resume=none to start fresh")
            data["samples_in_epoch"] = batches * micro_batch_size * data["world_size"]
    return TrainState(**data)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers, so torch.load(weights_only=True) reads it back."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # renamed in NumPy 2
OLD_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), NUMPY_CORE.multiarray._reconstruct]


def read_rng_state(file: Path) -> dict:
    """An rng_rank*.pt, weights-only; files written before the NumPy state was tensors hold NumPy's array
    globals, which are allowed for them."""
    with torch.serialization.safe_globals(OLD_RNG_GLOBALS):
        return torch.load(file, weights_only=True)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        numpy = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                 numpy["cached_gaussian"])
    np.random.set_state(numpy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, state: TrainState, run_dir: Path, total_limit: int | None,
                    data_state: dict | None = None) -> Path:
    """Collective: every rank writes its part into step_N.tmp (with `data_state`, its place in a data stream);
    rank 0 marks it complete and renames it."""
    final = step_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    rank = engine.env.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    with returning_large_frees():
        engine.save(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if data_state is not None:
        torch.save(data_state, tmp / DATA_STATE.format(rank=rank))
    engine.barrier()
    trust.write_share(tmp, rank, engine.env.world_size, exclude=(STATE_FILE, COMPLETE))
    engine.barrier()
    if rank == 0:
        write_state(tmp, state, engine.env.world_size)
        record = trust.merge_shares(tmp)  # trainer_state.json is JSON (no code), checked when read, and rewritten
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"files": record}, indent=0, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_tree(final.parent)
        prune_checkpoints(run_dir, total_limit)
    engine.barrier()
    return final


def write_state(path: Path, state: TrainState, world_size: int) -> None:
    """trainer_state.json of checkpoint `path`, replaced atomically."""
    tmp = path / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(replace(state, world_size=world_size)), indent=1))
    os.replace(tmp, path / STATE_FILE)


def prune_checkpoints(run_dir: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` complete checkpoints; never delete the only complete one."""
    if not total_limit:
        return
    for path in complete_checkpoints(run_dir)[:-max(total_limit, 1)]:
        shutil.rmtree(path, ignore_errors=True)


def checked_share(path: Path, verify: bool, rank: int = 0, world_size: int = 1) -> str | None:
    """Refuse pickles that could run code (UnsafeCheckpoint: every file's pickle is read); then, unless `verify`
    is off, the first of this rank's share of files that differs from the COMPLETE marker's record, or None."""
    trust.check_pickles(path)
    record = trust.read_record(path / COMPLETE) if verify else {}
    if record is None:
        log.warning("checkpoint %s was written before dist_tune recorded its files' digests: not verified", path)
    return trust.verify_share(path, record, rank, world_size) if record else None


def verify_checkpoint(path: Path, verify: bool, rank: int, world_size: int) -> None:
    """Collective, before anything is loaded: checked_share on every rank; any rank's finding stops every rank
    with the same line."""
    found = [checked_share(path, verify, rank, world_size)]
    if world_size > 1:
        found = [None] * world_size
        torch.distributed.all_gather_object(found, checked_share(path, verify, rank, world_size))
    problem = next((f for f in found if f), None)
    if problem:
        raise trust.integrity_error(path, problem)


def check_data_resume(path: Path, streaming: bool, world_size: int) -> None:
    """A streamed run resumes from a streamed checkpoint at the world size that saved it (each rank's place is in
    its own share of the stream); a prepared-data run from one that was not streamed. Cheap: before any model."""
    streamed = (path / DATA_STATE.format(rank=0)).is_file()
    if streamed != streaming:
        raise UserError(f"checkpoint {path} was saved by a run with data.streaming={str(streamed).lower()}; set "
                        f"data.streaming={str(streamed).lower()} to resume it, or use a new train.run_name")
    saved = read_state(path).world_size
    if streaming and saved != world_size:
        raise UserError(f"checkpoint {path} streamed its data on {saved} ranks and a streamed run resumes only on "
                        f"as many (each rank's place is in its own share of the stream); run on {saved} ranks, or "
                        "use a new train.run_name")


def read_data_state(path: Path, rank: int) -> dict:
    """This rank's place in the data stream, as a streaming run saved it."""
    return torch.load(path / DATA_STATE.format(rank=rank), weights_only=True)


def load_checkpoint(engine, path: Path) -> TrainState:
    engine.load(path)
    rng_file = path / f"rng_rank{engine.env.rank}.pt"
    if rng_file.is_file():
        set_rng_state(read_rng_state(rng_file))
    return read_state(path, engine.cfg.train.micro_batch_size)
