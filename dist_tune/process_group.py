"""The process group: the device this rank computes on, the backend that joins the ranks, init and teardown.

One rule places a rank (:func:`select_device`), from ``train.device``, the CUDA devices this process sees
and its local rank; the backend follows the device (:func:`backend_for`). Both are decided once, before
``init_process_group``, and the engine receives the device instead of choosing its own.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_tune.cluster import ClusterEnv
from dist_tune.errors import UserError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_device(requested: str, env: ClusterEnv) -> torch.device:
    """``train.device`` for this rank: cpu stays on the CPU (even on a GPU node); cuda (or auto with a GPU)
    takes cuda:LOCAL_RANK when the node's processes can each have their own visible GPU, cuda:0 when the
    launcher gave this process exactly one (``srun --gpus-per-task=1``), and is an error otherwise."""
    if requested not in DEVICES:
        raise UserError(f"train.device={requested!r} is not a device choice; use one of {', '.join(DEVICES)}")
    visible = visible_gpus()
    if requested == "cpu" or (requested == "auto" and visible == 0):
        return torch.device("cpu")
    if visible == 0:
        raise UserError("train.device=cuda but this process sees no CUDA device (check CUDA_VISIBLE_DEVICES and "
                        "the job's GPU request); use train.device=auto or cpu to train on the CPU")
    if visible >= env.local_world_size:
        return torch.device("cuda", env.local_rank)
    if visible == 1:
        return torch.device("cuda", 0)
    raise UserError(f"local rank {env.local_rank} of {env.local_world_size} processes on this node sees {visible} "
                    f"CUDA devices; start at most {visible} processes per node, give each process one GPU "
                    "(srun --gpus-per-task=1), or make every GPU of the node visible to each process")


def backend_for(device: torch.device, cpu_offload: bool = False) -> str:
    """gloo on the CPU, NCCL on CUDA; FSDP's CPU offload also moves CPU tensors, which need gloo beside NCCL."""
    if device.type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"


def init_distributed(env: ClusterEnv, device: torch.device, backend: str, timeout_minutes: float = 30, *,
                     group_when_alone: bool = False) -> bool:
    """Bind this process to `device` and, unless the launcher is ``single``, create the default process
    group; alone, a one-rank group on an in-memory store if `group_when_alone` (DeepSpeed needs one). Returns True
    when a group exists afterwards.

    Exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for srun-direct launches
    (torchrun already set them, and alone they may be set: they are only filled in where missing)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.launcher == "single" and not group_when_alone:
        return False
    if dist.is_initialized():
        return True
    if env.launcher in ("torchrun", "single"):
        for key, value in env.torch_env().items():
            os.environ.setdefault(key, value)
    else:
        os.environ.update(env.torch_env())
    logger.info("init_process_group(%s) on %s; %s", backend, device, env.describe())
    timeout = timedelta(minutes=timeout_minutes)
    store = dist.HashStore() if env.launcher == "single" else _restart_store(env, timeout)
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
        **({"store": store} if store is not None else {"init_method": "env://"}),
    )
    return True


def _restart_store(env: ClusterEnv, timeout: timedelta):
    """After a torchrun --max-restarts restart, a store whose keys are fresh; None otherwise (plain env://).

    torchrun workers share the agent's TCPStore, which outlives a restart with the previous attempt's keys
    (the peers' gloo/NCCL addresses) in it, so the restarted group connects to dead peers (pytorch#135712).
    On one node every worker gets the same TORCHELASTIC_RESTART_COUNT, which then namespaces the keys;
    across nodes the count is per agent and may differ, so multi-node restarts are left to torch."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if (env.launcher != "torchrun" or env.num_nodes != 1 or restart in ("", "0")
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return None
    client = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_tune/restart_{restart}", client)


def destroy_distributed() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # Release the GIL for a moment before the caller drops the last references (e.g. DDP's Reducer) to the
        # group: gloo's worker threads free finished work (and with it Python-created tensors, which needs the
        # GIL) after the collective returned, while ~ProcessGroupGloo joins those threads with the GIL held --
        # a rank exiting within the GIL switch interval of its last collective then hangs forever.
        time.sleep(0.1)
