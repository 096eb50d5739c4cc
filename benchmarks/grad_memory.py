"""Gradient memory per rank while FSDP accumulates (engine.sync_each_batch true vs false), against estimate-memory.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node=2 benchmarks/grad_memory.py
    ... benchmarks/grad_memory.py --preset tiny-llama --grad-accum 4 --results-md ''

Each setting builds the preset through dist_tune's FSDP engine (CPU/gloo, fp32), runs --grad-accum micro-batches
of random tokens through engine.no_sync / forward / backward, and after every micro-batch counts the gradient bytes
this rank holds: FSDP2's sharded gradients (`p.grad`, local shard), the unsharded gradients it keeps between
micro-batches without a reduce-scatter (each FSDPParam's `unsharded_param.grad` and `unsharded_accumulated_grad`).
The peak over the micro-batches is compared with `dist_tune.estimate.estimate(cfg, world_size).grads_gib`.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

from common import ROOT, cpu_model, git_commit, write_report
from dist_tune import cluster, process_group
from dist_tune.config import load_config
from dist_tune.engines.registry import build_engine
from dist_tune.estimate import GIB, estimate
from dist_tune.models import load_tokenizer
from dist_tune.optim import optimizer_factory, scheduler_factory
from dist_tune.peft import build_model

MIB = 2 ** 20


def grad_bytes(model: torch.nn.Module) -> int:
    """Bytes of every gradient this rank holds: sharded ones on the parameters, unsharded ones FSDP keeps."""
    held = sum(p.grad.to_local().nbytes for p in model.parameters() if p.grad is not None)
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        for group in (state()._fsdp_param_groups if state else []):
            for param in group.fsdp_params:
                assert isinstance(param, FSDPParam)
                unsharded = getattr(param, "_unsharded_param", None)
                held += sum(t.nbytes for t in (getattr(unsharded, "grad", None), param.unsharded_accumulated_grad)
                            if t is not None)
    return held


def measure(preset: str, sync_each_batch: bool, accum: int, env, device) -> tuple[list[int], float]:
    cfg = load_config(None, {"model.name_or_path": preset, "engine.kind": "fsdp", "engine.mixed_precision": "fp32",
                             "model.dtype": "float32", "engine.sync_each_batch": sync_each_batch,
                             "train.grad_accum": accum, "train.micro_batch_size": 2, "data.max_length": 64})
    engine = build_engine(cfg, env, device)
    tokenizer = load_tokenizer(cfg)
    engine.prepare(build_model(cfg, tokenizer, engine.init_device()), optimizer_factory(cfg.optim),
                   scheduler_factory(cfg.optim, 10))
    torch.manual_seed(env.rank)
    held = []
    for i in range(accum):
        ids = torch.randint(0, len(tokenizer), (2, 64))
        with engine.no_sync(i == accum - 1):
            engine.backward(engine.forward({"input_ids": ids}).logits.float().logsumexp(-1).mean())
        held.append(grad_bytes(engine.model))
    return held, estimate(cfg, env.world_size).grads_gib * GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small-llama")
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "grad_memory_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args()
    env = cluster.detect()
    device = torch.device("cpu")
    process_group.init_distributed(env, device, "gloo")
    rows = {}
    for sync in (True, False):
        held, est = measure(args.preset, sync, args.grad_accum, env, device)
        peaks = [None] * env.world_size
        dist.all_gather_object(peaks, max(held))
        rows[sync] = {"per_micro_batch_rank0_mib": [h / MIB for h in held],
                      "peak_per_rank_mib": [h / MIB for h in peaks],
                      "estimate_mib": est / MIB}
    if env.rank == 0:
        lines = [f"### FSDP gradient memory per rank during accumulation ({args.preset}, world size {env.world_size}, "
                 f"grad_accum {args.grad_accum}, CPU/gloo fp32), "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
                 "", f"commit {git_commit()}, {cpu_model()}; `python -m torch.distributed.run --nproc_per_node="
                 f"{env.world_size} benchmarks/grad_memory.py --preset {args.preset}`", "",
                 "| engine.sync_each_batch | rank 0 after each micro-batch (MiB) | peak per rank (MiB) | "
                 "estimate-memory gradients (MiB) |", "| --- | --- | --- | --- |"]
        for sync, row in rows.items():
            lines.append(f"| {str(sync).lower()} | {', '.join(f'{v:.2f}' for v in row['per_micro_batch_rank0_mib'])} | "
                         f"{' / '.join(f'{v:.2f}' for v in row['peak_per_rank_mib'])} | {row['estimate_mib']:.2f} |")
        report = {"preset": args.preset, "world_size": env.world_size, "grad_accum": args.grad_accum,
                  "rows": {str(k).lower(): v for k, v in rows.items()}}
        write_report(report, "\n".join(lines) + "\n", args.json_out, args.results_md)
    process_group.destroy_distributed()


if __name__ == "__main__":
    main()
