"""DeepSpeed config mapping of the offload, overlap and optimizer options, and the optimizer each setting builds."""
from __future__ import annotations

import pytest
import torch

from dist_tune.config import load_config
from dist_tune.engines.deepspeed import ds_config
from dist_tune.optim import optimizer_factory


def conf(monkeypatch, cuda: bool = False, **engine):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = load_config(None, {"engine.kind": "deepspeed", "engine.zero_stage": 3, "engine.mixed_precision": "fp32",
                             **{f"engine.{k}": v for k, v in engine.items()}})
    return ds_config(cfg, world_size=2, hidden_size=64)["zero_optimization"]


@pytest.mark.parametrize("optimizer, params", [(False, False), (True, False), (False, True), (True, True)])
def test_offload_optimizer_and_offload_params_act_independently(monkeypatch, optimizer, params):
    zero = conf(monkeypatch, offload_optimizer=optimizer, offload_params=params)
    assert ("offload_optimizer" in zero, "offload_param" in zero) == (optimizer, params)


def test_offload_pins_host_memory_and_overlaps_communication_only_on_a_gpu(monkeypatch):
    cpu = conf(monkeypatch, offload_optimizer=True)
    assert cpu["offload_optimizer"] == {"device": "cpu", "pin_memory": False} and cpu["overlap_comm"] is False
    gpu = conf(monkeypatch, cuda=True, offload_optimizer=True)
    assert gpu["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and gpu["overlap_comm"] is True
    for stage in (1, 2):
        assert conf(monkeypatch, cuda=True, zero_stage=stage)["overlap_comm"] is True


def test_adamw_uses_torchs_fused_kernel_when_asked_else_foreach():
    cfg = load_config(None, {}).optim
    groups = [{"params": [torch.nn.Parameter(torch.ones(2))]}]
    assert optimizer_factory(cfg, fused=True)(groups).defaults["fused"] is True
    foreach = optimizer_factory(cfg)(groups).defaults
    assert foreach["foreach"] is True and not foreach["fused"]


@pytest.mark.slow  # compiles DeepSpeed's cpu_adam op when it is not cached yet (minutes)
def test_offloaded_optimizer_states_step_with_deepspeed_cpu_adam(monkeypatch, tmp_path, caplog):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from dist_tune import optim

    cfg = load_config(None, {"optim.lr": 0.1, "optim.weight_decay": 0.0}).optim
    param = torch.nn.Parameter(torch.ones(4))
    reference = torch.nn.Parameter(torch.ones(4))
    monkeypatch.setattr(optim, "cpu_adam_build_dir", lambda: tmp_path)  # as on a machine that never built it
    with caplog.at_level("WARNING", logger="dist_tune.optim"):
        adam = optimizer_factory(cfg, cpu_adam=True)([{"params": [param], "weight_decay": 0.0}])
    assert isinstance(adam, DeepSpeedCPUAdam)
    notice = f"compiling DeepSpeed's cpu_adam op for engine.offload_optimizer (once, a few minutes; cached in {tmp_path})"
    assert notice in caplog.text
    torch_adam = optimizer_factory(cfg)([{"params": [reference], "weight_decay": 0.0}])
    for p, opt in ((param, adam), (reference, torch_adam)):
        p.grad = torch.tensor([1.0, -1.0, 0.5, 0.0])
        opt.step()
    torch.testing.assert_close(param.detach(), reference.detach())  # the same AdamW update
