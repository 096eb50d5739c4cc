"""dist_tune.process_group: one device rule (visible GPUs + local rank), the backend that follows it, group setup."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from helpers import free_port
from dist_tune.cluster import ClusterEnv
from dist_tune.errors import UserError
from dist_tune.process_group import backend_for, destroy_distributed, init_distributed, select_device


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): this process sees n CUDA devices."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


def rank(local_rank: int, local_world_size: int) -> ClusterEnv:
    return ClusterEnv(rank=local_rank, world_size=local_world_size, local_rank=local_rank,
                      local_world_size=local_world_size, launcher="torchrun")


@pytest.mark.parametrize("visible, local_rank, local_world, expected", [
    (8, 5, 8, "cuda:5"),   # torchrun --nproc-per-node=8 on an 8-GPU node
    (8, 1, 2, "cuda:1"),   # fewer processes than GPUs
    (1, 7, 8, "cuda:0"),   # srun --gpus-per-task=1: each task sees only its own GPU
    (1, 0, 1, "cuda:0"),
])
def test_cuda_rank_placement(gpus, visible, local_rank, local_world, expected):
    gpus(visible)
    for requested in ("auto", "cuda"):
        device = select_device(requested, rank(local_rank, local_world))
        assert device == torch.device(expected)
        assert backend_for(device) == "nccl"


def test_train_device_cpu_on_a_gpu_node_is_cpu_and_gloo(gpus):
    gpus(8)
    device = select_device("cpu", rank(3, 8))
    assert device == torch.device("cpu") and backend_for(device) == "gloo"


def test_auto_without_gpus_is_cpu_and_gloo(gpus):
    gpus(0)
    device = select_device("auto", rank(1, 2))
    assert device == torch.device("cpu") and backend_for(device, cpu_offload=True) == "gloo"


def test_fsdp_cpu_offload_on_cuda_adds_gloo_for_host_tensors(gpus):
    gpus(2)
    assert backend_for(select_device("auto", rank(1, 2)), cpu_offload=True) == "cpu:gloo,cuda:nccl"


def test_more_processes_than_gpus_is_one_line_with_the_fix(gpus):
    gpus(2)
    with pytest.raises(UserError) as exc:
        select_device("auto", rank(3, 4))
    assert str(exc.value) == ("local rank 3 of 4 processes on this node sees 2 CUDA devices; start at most 2 processes "
                              "per node, give each process one GPU (srun --gpus-per-task=1), or make every GPU of the "
                              "node visible to each process")


def test_cuda_requested_without_gpus_and_unknown_devices_are_user_errors(gpus):
    gpus(0)
    with pytest.raises(UserError, match="train.device=cuda but this process sees no CUDA device"):
        select_device("cuda", rank(0, 1))
    with pytest.raises(UserError, match="train.device='cuda:1' is not a device choice; use one of auto, cpu, cuda"):
        select_device("cuda:1", rank(0, 1))


def test_single_launcher_creates_no_group():
    assert init_distributed(ClusterEnv(), torch.device("cpu"), "gloo") is False
    assert not dist.is_initialized()


def test_torchrun_world_of_one_creates_the_chosen_backend(monkeypatch):
    env = ClusterEnv(launcher="torchrun", master_port=free_port())
    for key, value in env.torch_env().items():
        monkeypatch.setenv(key, value)   # restored afterwards
    try:
        assert init_distributed(env, torch.device("cpu"), "gloo", timeout_minutes=1)
        assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
    finally:
        destroy_distributed()
    assert not dist.is_initialized()
    destroy_distributed()  # twice is fine


def test_a_plain_process_gets_a_group_of_one_for_deepspeed(monkeypatch):
    for key in ClusterEnv().torch_env():
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)  # recorded, so whatever init_distributed exports is undone afterwards
    try:
        assert init_distributed(ClusterEnv(), torch.device("cpu"), "gloo", timeout_minutes=1, group_when_alone=True)
        assert dist.get_world_size() == 1
        assert os.environ["LOCAL_RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"  # deepspeed.initialize reads them
    finally:
        destroy_distributed()


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_world_of_one_under_torchrun_builds_ddp_and_fsdp_but_a_plain_process_is_told_to_use_torchrun(kind):
    from dist_tune.config import load_config
    from dist_tune.engines.registry import build_engine

    cfg = load_config(overrides={"engine.kind": kind})
    engine = build_engine(cfg, rank(0, 1), torch.device("cpu"))
    assert engine.name == kind
    with pytest.raises(UserError, match=f"engine.kind={kind} needs a process group; launch with torchrun"):
        build_engine(cfg, ClusterEnv(), torch.device("cpu"))


def test_deepspeed_uses_the_chosen_gpu_not_local_rank(gpus, monkeypatch):
    """srun --gpus-per-task=1: local rank 5 sees one GPU, so DeepSpeed must be told cuda:0, not LOCAL_RANK=5."""
    from dist_tune.config import load_config
    from dist_tune.engines.deepspeed import DeepSpeedEngine

    gpus(1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    env = rank(5, 8)
    cfg = load_config(overrides={"engine.kind": "deepspeed", "engine.mixed_precision": "fp32", "model.dtype": "float32"})
    assert DeepSpeedEngine(cfg, env, select_device("auto", env)).device_rank() == 0
    assert DeepSpeedEngine(cfg, env, torch.device("cpu")).device_rank() == 5
