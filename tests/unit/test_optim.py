"""Optimizer groups and learning-rate schedules."""
import math

import pytest
import torch

from dist_tune.config import load_config
from dist_tune.engines.base import param_groups
from dist_tune.models import load_model, load_tokenizer
from dist_tune.optim import lr_multiplier, optimizer_factory, scheduler_factory


def test_no_weight_decay_on_norms_and_biases():
    cfg = load_config(None, {"model.name_or_path": "tiny-llama"})
    model = load_model(cfg, load_tokenizer(cfg))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert not any("norm" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kind, step, expected", [
    ("cosine", 0, 0.25), ("cosine", 3, 1.0), ("cosine", 4, 1.0), ("cosine", 14, 0.5 * (1 + math.cos(math.pi * 0.5))),
    ("cosine", 24, 0.0), ("linear", 14, 0.5), ("linear", 24, 0.0), ("constant", 20, 1.0),
])
def test_warmup_then_decay(kind, step, expected):
    assert lr_multiplier(step, warmup=4, total=24, kind=kind, min_ratio=0.0) == pytest.approx(expected)


def test_min_lr_ratio_floors_the_decay():
    assert lr_multiplier(24, warmup=0, total=24, kind="cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_factories_build_sgd_and_adamw_with_the_schedule():
    cfg = load_config(None, {"optim.name": "sgd", "optim.lr": 0.5, "optim.warmup_steps": 2, "optim.momentum": 0.8})
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = optimizer_factory(cfg.optim)([{"params": params, "weight_decay": 0.0}])
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    sched = scheduler_factory(cfg.optim, total_steps=10)(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)  # warmup step 1 of 2
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    adam = optimizer_factory(load_config(None, {}).optim)([{"params": params}])
    assert isinstance(adam, torch.optim.AdamW)


def test_fp16_grad_scaler_skips_overflowing_steps_and_recovers(tmp_path):
    from dist_tune.cluster import detect
    from dist_tune.engines.single import SingleEngine

    cfg = load_config(None, {"engine.mixed_precision": "fp16", "train.device": "cpu"})
    engine = SingleEngine(cfg, detect({}), torch.device("cpu"))
    layer = torch.nn.Linear(4, 1)
    engine.prepare(layer, optimizer_factory(cfg.optim), scheduler_factory(cfg.optim, 10))
    before = layer.weight.detach().clone()
    engine.backward(layer(torch.ones(1, 4)).sum() * float("inf"))
    assert engine.step() == float("inf") and engine.handles_overflow
    assert torch.equal(layer.weight, before)  # overflow: update skipped, scale reduced
    assert engine.scaler.get_scale() < 65536.0
    engine.backward(layer(torch.ones(1, 4)).sum())
    assert torch.isfinite(torch.tensor(engine.step()))
    assert not torch.equal(layer.weight, before)
    engine.save(tmp_path)
    restored = SingleEngine(cfg, detect({}), torch.device("cpu"))
    restored.prepare(torch.nn.Linear(4, 1), optimizer_factory(cfg.optim), scheduler_factory(cfg.optim, 10))
    restored.load(tmp_path)
    assert restored.scaler.get_scale() == engine.scaler.get_scale()
