"""FSDP engine.cpu_offload placement: parameters on the CPU, buffers (rotary inv_freq) on the GPU; refused without one."""
from __future__ import annotations

import pytest
import torch

from dist_tune.cluster import ClusterEnv
from dist_tune.config import load_config
from dist_tune.engines.fsdp import FSDPEngine, move_buffers, placement
from dist_tune.errors import UserError
from dist_tune.models import load_model, load_tokenizer

GPU = torch.device("cuda", 3)


def test_offload_keeps_parameters_on_the_cpu_and_buffers_on_the_gpu():
    assert placement(GPU, cpu_offload=True) == (torch.device("cpu"), GPU)
    assert placement(GPU, cpu_offload=False) == (GPU, GPU)


def test_move_buffers_moves_only_buffers():
    """The rotary inv_freq of a real tiny Llama follows the buffer device; no parameter moves ("meta" stands in
    for the GPU here)."""
    cfg = load_config(None, {"model.name_or_path": "tiny-llama"})
    model = load_model(cfg, load_tokenizer(cfg))
    buffers = dict(model.named_buffers())
    assert any(name.endswith("inv_freq") for name in buffers)
    move_buffers(model, torch.device("meta"))
    assert {b.device.type for b in model.buffers()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert set(dict(model.named_buffers())) == set(buffers)


def test_cpu_offload_without_a_gpu_is_refused():
    cfg = load_config(None, {"engine.kind": "fsdp", "engine.cpu_offload": True})
    with pytest.raises(UserError, match="engine.cpu_offload moves FSDP shards from GPU to host memory, and this run "
                                        "has no GPU; unset engine.cpu_offload"):
        FSDPEngine(cfg, ClusterEnv(rank=0, world_size=2, local_world_size=2, launcher="torchrun"), torch.device("cpu"))
