"""One data preparation per job, or one per node where the cache directory is not shared between nodes. The other
ranks wait for it by watching a file, not in a collective, so a preparation that outlasts
engine.timeout_minutes cannot time the job out, and a bad input the preparing rank finds reaches every rank as
the same one-line error."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist

from dist_tune.errors import DataError, UserError

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # every rank says who prepares and who waits (other ranks log warnings only)

T = TypeVar("T")
POLL_SECONDS = 0.5
REPORT_EVERY_SECONDS = 60.0
STALE_SECONDS = 86400.0  # markers of jobs that died before cleaning up are removed a day later
PREFIX = ".dist_tune-prepare-"


def _job_key() -> str:
    """A key rank 0 draws and every rank receives (the one collective, before any preparation)."""
    key = [uuid.uuid4().hex]
    dist.broadcast_object_list(key, src=0)
    return key[0]


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _outcome(exc: BaseException) -> dict:
    if isinstance(exc, UserError):
        return {"error": str(exc)}
    return {"error": f"the rank preparing the data failed ({type(exc).__name__}: "
                     f"{next(iter(str(exc).splitlines()), '')}); its traceback is in the job's output above"}


def _wait(done: Path, who: str, cache: Path) -> dict:
    """The preparer's outcome, once it is written; a log line every REPORT_EVERY_SECONDS until then."""
    start = last_report = time.monotonic()
    while not done.is_file():
        time.sleep(POLL_SECONDS)
        if time.monotonic() - last_report >= REPORT_EVERY_SECONDS:
            last_report = time.monotonic()
            log.info("waiting for %s to prepare the data in %s (%.0f s so far)", who, cache,
                     last_report - start)
    return json.loads(done.read_text())


def _remove_stale(cache: Path) -> None:
    for path in cache.glob(f"{PREFIX}*"):
        try:
            if time.time() - path.stat().st_mtime > STALE_SECONDS:
                path.unlink()
        except FileNotFoundError:
            pass


def prepare_once(env, cache: Path, prepare: Callable[[], T]) -> T:
    """prepare() on one rank first (global rank 0 where it and this rank see the same `cache` directory, else
    this node's local rank 0); every other rank calls it once that one has finished, reading what it cached.
    Collective: every rank of the job calls it."""
    if env.world_size == 1 or not dist.is_initialized():
        return prepare()
    key = _job_key()
    marker, done = cache / f"{PREFIX}{key}", cache / f"{PREFIX}{key}.done"
    if env.rank == 0:
        _remove_stale(cache)
        marker.touch()
    dist.barrier()  # the marker exists before anyone looks for it
    shared = marker.exists()
    preparer = env.rank == 0 if shared else env.local_rank == 0
    scope = "the job (every rank sees" if shared else "this node (rank 0 does not see"
    if preparer:
        log.info("this rank prepares the data for %s the cache directory %s)", scope, cache)
        try:
            result = prepare()
        except BaseException as exc:
            _write_json(done, _outcome(exc))
            raise
        _write_json(done, {"ok": True})
    else:
        who = "rank 0" if shared else "this node's local rank 0"
        outcome = _wait(done, who, cache)
        if "error" in outcome:
            raise DataError(outcome["error"])
        log.info("using the data %s prepared in %s", who, cache)
        result = prepare()
    dist.barrier()  # everyone has read the outcome: the files can go
    if env.local_rank == 0:
        for path in (done, marker):
            path.unlink(missing_ok=True)
    return result
