"""Optimizer step time on the host: DeepSpeedCPUAdam (what engine.offload_optimizer uses) vs torch AdamW.

    python benchmarks/cpu_adam.py --params 50e6 --threads 1,2

The same fp32 parameters and gradients (--params elements in 16 tensors) are stepped by each optimizer, in one
process, after 2 warm-up steps; the median of --steps timed steps is reported per torch thread count
(torch.set_num_threads; DeepSpeedCPUAdam's OpenMP loop follows it). Appends a section to --results-md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import ROOT, cpu_model, git_commit, write_report


def step_time(make, params: list[torch.nn.Parameter], steps: int) -> float:
    optimizer = make(params)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=50e6)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "cpu_adam.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    n = int(args.params) // 16
    params = [torch.nn.Parameter(torch.randn(n)) for _ in range(16)]
    for q in params:
        q.grad = torch.randn(n)
    makers = {"torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
              "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
              "DeepSpeedCPUAdam": lambda ps: DeepSpeedCPUAdam(ps, lr=1e-4, adamw_mode=True)}
    load, rows = os.getloadavg()[0], {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        rows[threads] = {name: step_time(make, params, args.steps) for name, make in makers.items()}
    lines = [f"### Host optimizer step time, {n * 16 / 1e6:.0f}M fp32 parameters, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "",
             f"commit {git_commit()}, {cpu_model()}; `python benchmarks/cpu_adam.py --params {args.params:g} "
             f"--threads {args.threads}`; median of {args.steps} steps, in seconds; 1-minute load average before: "
             f"{load:.2f} on {os.cpu_count()} cores", "",
             "| threads | " + " | ".join(makers) + " |", "| --- |" + " --- |" * len(makers)]
    for threads, row in rows.items():
        lines.append(f"| {threads} | " + " | ".join(f"{row[name]:.3f}" for name in makers) + " |")
    write_report({"params": n * 16, "seconds": rows}, "\n".join(lines) + "\n", args.json_out, args.results_md)


if __name__ == "__main__":
    main()
