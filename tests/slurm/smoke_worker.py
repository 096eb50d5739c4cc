"""Rank program for tests/slurm/smoke.sh (no training: cluster detection, process group and preemption on a
real Slurm job).

    python smoke_worker.py allreduce           # gloo all_reduce across all ranks, prints ALLREDUCE_OK
    python smoke_worker.py preempt MARKER_DIR  # steps until a signal; all ranks stop together; rank 0 requeues

Run one per rank: under torchrun (launcher "torchrun") or straight from srun (launcher "slurm").
"""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_tune import cluster, preemption, process_group

CPU = torch.device("cpu")


def start() -> cluster.ClusterEnv:
    env = cluster.detect()
    process_group.init_distributed(env, CPU, "gloo", timeout_minutes=2)
    return env


def allreduce() -> int:
    env = start()
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    expected = env.world_size * (env.world_size + 1) / 2
    nodes = [None] * env.world_size
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME", socket.gethostname()))
    ok = t.item() == expected
    print(f"{'ALLREDUCE_OK' if ok else 'ALLREDUCE_BAD'} {env.describe()} sum={t.item()} expected={expected} "
          f"slurmd_nodes={nodes}", flush=True)
    process_group.destroy_distributed()
    return 0 if ok else 1


def preempt(marker_dir: str) -> int:
    env = start()
    handler = preemption.PreemptionHandler(env, CPU)
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    marker = Path(marker_dir)
    marker.mkdir(parents=True, exist_ok=True)
    print(f"START attempt={attempt} {env.describe()}", flush=True)
    max_steps = 8 if attempt > 0 else 600
    for step in range(1, max_steps + 1):
        time.sleep(0.1)
        if step == 3 and env.is_main:
            (marker / f"running.{attempt}").write_text(str(os.getpid()))
        if handler.should_stop():
            print(f"PREEMPT_STOP rank={env.rank} step={step} local_signal={handler.signal_name}", flush=True)
            dist.barrier()               # (a trainer saves its checkpoint here)
            process_group.destroy_distributed()
            if env.is_main:
                ok = handler.requeue()
                print(f"REQUEUE_CALLED ok={ok}", flush=True)
            return 0
    process_group.destroy_distributed()
    if attempt > 0:
        print(f"RESUMED_DONE attempt={attempt} rank={env.rank}", flush=True)
        return 0
    print(f"NO_SIGNAL rank={env.rank}", flush=True)
    return 3


if __name__ == "__main__":
    mode = sys.argv[1]
    sys.exit(allreduce() if mode == "allreduce" else preempt(sys.argv[2]))
