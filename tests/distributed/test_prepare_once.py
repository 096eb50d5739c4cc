"""prepare_once on 2 gloo ranks: one preparation per shared cache directory (one per "node" where each sees its
own), the others wait on a file past the collective timeout, and the preparer's error reaches every rank."""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp

from dist_tune.data.once import prepare_once
from dist_tune.errors import DataError
from helpers import free_port

TIMEOUT_S = 2  # the process group's collective timeout; rank 0 prepares for longer than that


def _log(cache: Path, rank: int, event: str) -> None:
    with (cache / "events.jsonl").open("a") as handle:
        handle.write(json.dumps({"rank": rank, "event": event, "t": time.monotonic()}) + "\n")


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        # shared: both ranks see one directory, node-local rank 0 of a 2-rank node and its local rank 1
        shared = Path(root) / "shared"
        env = SimpleNamespace(rank=rank, local_rank=rank, world_size=2)

        def slow_prepare() -> str:
            _log(shared, rank, "prepare")
            time.sleep(2 * TIMEOUT_S if rank == 0 else 0)
            return f"rows of rank {rank}"
        assert prepare_once(env, shared, slow_prepare) == f"rows of rank {rank}"
        # not shared: each rank is local rank 0 of its own node with its own directory
        own = Path(root) / f"node{rank}"
        node_env = SimpleNamespace(rank=rank, local_rank=0, world_size=2)
        prepare_once(node_env, own, lambda: _log(own, rank, "prepare"))

        def bad_data() -> None:
            raise DataError("data file 'x.jsonl' line 3 is not valid JSON; fix or remove that line")
        try:
            prepare_once(env, shared, bad_data if rank == 0 else lambda: _log(shared, rank, "prepared bad data"))
        except DataError as exc:
            _log(shared, rank, f"error: {exc}")
    finally:
        dist.destroy_process_group()


def events(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (cache / "events.jsonl").read_text().splitlines()]


def test_one_preparation_per_cache_directory_the_others_wait_past_the_timeout_and_share_its_error(tmp_path):
    for name in ("shared", "node0", "node1"):
        (tmp_path / name).mkdir()
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    shared = events(tmp_path / "shared")
    first, second = shared[:2]
    assert (first["rank"], first["event"]) == (0, "prepare") and (second["rank"], second["event"]) == (1, "prepare")
    assert second["t"] - first["t"] >= 2 * TIMEOUT_S  # rank 1 waited for rank 0, longer than the timeout
    assert [e["event"] for e in events(tmp_path / "node0")] == ["prepare"]  # each node prepared its own
    assert [e["event"] for e in events(tmp_path / "node1")] == ["prepare"]
    error = "error: data file 'x.jsonl' line 3 is not valid JSON; fix or remove that line"
    assert sorted((e["rank"], e["event"]) for e in shared[2:]) == [(0, error), (1, error)]  # rank 1 never read it
    # the finished jobs removed their files; the failed one leaves its marker and outcome (removed after a day)
    marker, outcome = sorted(p.name for p in (tmp_path / "shared").iterdir() if p.name.startswith(".dist_tune"))
    assert outcome == f"{marker}.done" and "error" in json.loads((tmp_path / "shared" / outcome).read_text())
