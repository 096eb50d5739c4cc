"""Run under torchrun with an engine (fsdp or zero3) and a JSON list of config overrides: for each, prepare the model
with that engine (FSDP: meta build, sharding, each rank reading or initialising only its shards; ZeRO-3: built
partitioned under zero.Init, weights scattered one tensor at a time) and print, on rank 0, one JSON line comparing its
gathered weights and logits with the model the unsharded engines build on the CPU."""
from __future__ import annotations

import json
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dist_tune import cluster, process_group
from dist_tune.config import load_config
from dist_tune import zero3
from dist_tune.engines.deepspeed import DeepSpeedEngine
from dist_tune.engines.fsdp import FSDPEngine
from dist_tune.models import load_tokenizer, model_config
from dist_tune.peft import build_model


def sgd(groups):
    return torch.optim.SGD(groups, lr=0.1)


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


ENGINES = {"fsdp": (FSDPEngine, {"engine.kind": "fsdp"}),
           "zero3": (DeepSpeedEngine, {"engine.kind": "deepspeed", "engine.zero_stage": 3})}


def prepared(kind: str, overrides: dict, env, device):
    engine_class, engine_keys = ENGINES[kind]
    cfg = load_config(None, {**overrides, **engine_keys, "model.dtype": "float32", "engine.mixed_precision": "fp32",
                             "train.micro_batch_size": 1, "train.grad_accum": 1})
    engine = engine_class(cfg, env, device)
    tokenizer = load_tokenizer(cfg)
    with engine.construction(model_config(cfg, tokenizer)):
        model = build_model(cfg, tokenizer, engine.init_device())
    engine.prepare(model, sgd, constant)
    return cfg, engine, tokenizer


def gathered_state(kind: str, model: torch.nn.Module) -> tuple[dict, float]:
    """(every tensor whole, this rank's share of the parameters). Collective."""
    if kind == "fsdp":
        local = sum(p.to_local().numel() for p in model.parameters()) / sum(p.numel() for p in model.parameters())
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)), local
    params = list(model.parameters())
    local = sum(p.ds_tensor.numel() if zero3.is_partitioned(p) else p.numel() for p in params) / \
        sum(p.ds_numel if zero3.is_partitioned(p) else p.numel() for p in params)
    state = {name: zero3.gathered(t) if zero3.is_partitioned(t) else t.detach()
             for name, t in model.state_dict(keep_vars=True).items()}
    return state, local


def compare(kind: str, overrides: dict, env, device) -> dict | None:
    cfg, engine, tokenizer = prepared(kind, overrides, env, device)
    ids = torch.arange(3, 19).reshape(2, 8)
    engine.model.eval()
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits
    full, local_share = gathered_state(kind, engine.unwrap())
    if env.rank != 0:
        return None
    reference = build_model(cfg, tokenizer, torch.device("cpu")).eval()
    expected = reference.state_dict()
    with torch.no_grad():
        expected_logits = reference(input_ids=ids).logits
    return {"keys_equal": set(full) == set(expected), "local_share": local_share,
            "different": sorted(k for k in full.keys() & expected.keys() if not torch.equal(full[k], expected[k])),
            "logits_max_diff": float((logits - expected_logits).abs().max())}


def main() -> None:
    env = cluster.detect()
    device = process_group.select_device("cpu", env)
    process_group.init_distributed(env, device, "gloo", 5.0)
    try:
        for overrides in json.loads(sys.argv[2]):
            result = compare(sys.argv[1], overrides, env, device)
            if result is not None:
                print(json.dumps(result), flush=True)
    finally:
        process_group.destroy_distributed()


if __name__ == "__main__":
    main()
