"""Per-rank model-state memory of every engine (world size 2, CPU/gloo) vs the ZeRO formulas and estimate-memory.

    python benchmarks/memory_per_engine.py                        # full + LoRA × ddp, fsdp, zero1, zero2, zero3
    python benchmarks/memory_per_engine.py --methods full --engines ddp,fsdp --json-out /tmp/m.json --results-md ''
    python benchmarks/memory_per_engine.py --hidden 1024 --layers 8   # a bigger random-init local model

For each (peft method, engine) it runs the real CLI under torchrun (`python -m torch.distributed.run
--nproc_per_node=2 -m dist_tune.cli train ...`, gloo, fp32 by default) for a few steps and reads rank 0's
`summary.json`: `param_bytes` and `optim_bytes` from `engine.local_state_bytes()` (shards counted at their local
size; DeepSpeed's optim_bytes include its fp32 master partition). Gradients are NOT in those numbers (they are
freed by zero_grad before the summary); the grads columns are formula/estimate only. Peak RSS is
`train/peak_rss_gib` from metrics.jsonl: ru_maxrss, the process lifetime peak (libraries, model build and engine
setup included), the maximum over the ranks (the trainer all-reduces it).

Compared with
  formula   the ZeRO paper's bytes per parameter, per rank: mixed-precision Adam (bf16/fp16) 16 bytes, on DeepSpeed
            2 weights + 2 grads + 12 optimizer (fp32 master + m + v), on DDP/FSDP 4 + 4 + 8 (m, v) since their
            fp32 parameter is the master copy; fp32 Adam 4 + 4 + 8 (m, v) + 4 fp32 master on DeepSpeed;
            ZeRO-1 divides the optimizer state by the world size, ZeRO-2 also the grads, ZeRO-3 and FSDP
            everything; frozen (LoRA base) weights count as weights only. Computed here, independently of
            dist_tune.estimate.
  estimate  `dist-tune estimate-memory CONFIG --world_size 2` for the same resolved config
            (`dist_tune.estimate.estimate(cfg, world_size)`).

Prints a markdown table and the JSON, writes --json-out (default benchmarks/results/memory_cpu.json) and
appends a section to --results-md (default benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, git_commit, write_report

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"ddp": ("ddp", 2), "fsdp": ("fsdp", 2), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2),
           "zero3": ("deepspeed", 3)}
METHODS = {"full": {}, "lora": {"peft.method": "lora", "peft.r": 8, "peft.alpha": 16}}
MIB = 2 ** 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of full, lora")
    p.add_argument("--preset", default="small-llama", help="model preset (ignored with --hidden)")
    p.add_argument("--hidden", type=int, help="build a random-init local Llama of this width instead of the preset")
    p.add_argument("--layers", type=int, default=8, help="with --hidden: decoder layers")
    p.add_argument("--intermediate", type=int, help="with --hidden: MLP width (default 2.6875 × hidden)")
    p.add_argument("--heads", type=int, help="with --hidden: attention heads (default hidden / 64)")
    p.add_argument("--kv-heads", type=int, help="with --hidden: KV heads (default heads / 2)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--mixed-precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--verbose", action="store_true", help="print the output of failed runs")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a failed run before it is reported failed")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "memory_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                   help="markdown file a section is appended to ('' = none)")
    args = p.parse_args(argv)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [e for e in args.engine_list if e not in ENGINES] + [m for m in args.method_list if m not in METHODS]
    if bad or not args.engine_list or not args.method_list:
        p.error(f"unknown engine/method {bad}; engines: {', '.join(ENGINES)}; methods: {', '.join(METHODS)}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def custom_model(args: argparse.Namespace, where: Path) -> str:
    """A seeded random-init Llama of the requested shape saved as a local HF directory (with the shipped tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_tune.config import load_config
    from dist_tune.models import load_tokenizer

    tokenizer = load_tokenizer(load_config(None, {"model.name_or_path": "tiny-llama"}))
    heads = args.heads or max(1, args.hidden // 64)
    hf_cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                         intermediate_size=args.intermediate or int(args.hidden * 2.6875), num_attention_heads=heads,
                         num_key_value_heads=args.kv_heads or max(1, heads // 2), max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg)
    path = where / f"llama-h{args.hidden}-l{args.layers}"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def overrides_for(args: argparse.Namespace, model: str, engine: str, method: str, out_dir: str) -> dict[str, object]:
    kind, stage = ENGINES[engine]
    return {"model.name_or_path": model, "model.dtype": "float32",
            "data.path": "bundled:instructions", "data.format": "instruction", "data.max_length": args.max_length,
            "data.validation_split": 0.0, "engine.kind": kind, "engine.zero_stage": stage,
            "engine.mixed_precision": args.mixed_precision, **METHODS[method],
            "train.micro_batch_size": args.micro_batch, "train.grad_accum": 1, "train.max_steps": args.steps,
            "train.eval_steps": "null", "train.output_dir": out_dir, "train.run_name": f"{method}-{engine}",
            "train.resume": "none", "optim.warmup_steps": 0, "log.log_steps": 1, "log.progress": False,
            "log.plot": False, "log.jsonl": True, "log.wandb.mode": "disabled", "checkpoint.save_steps": "null",
            "checkpoint.save_final": False}


def run_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def formula(engine: str, precision: str, world: int, n: int, trainable: int) -> dict[str, float]:
    """ZeRO-paper model-state bytes per rank (see the module docstring)."""
    kind, stage = ENGINES[engine]
    if precision == "fp32":
        weight, grad, optim = 4, 4, 8 + (4 if kind == "deepspeed" else 0)
    elif kind == "deepspeed":
        weight, grad, optim = 2, 2, 12
    else:  # autocast / FSDP MixedPrecisionPolicy: the fp32 parameter is the master copy, cast for compute only
        weight, grad, optim = 4, 4, 8
    sharded = {"ddp": (False, False, False), "fsdp": (True, True, True), "zero1": (False, False, True),
               "zero2": (False, True, True), "zero3": (True, True, True)}[engine]
    fw, fg, fo = (1 / world if s else 1.0 for s in sharded)
    return {"weights": n * weight * fw, "grads": trainable * grad * fg, "optimizer": trainable * optim * fo,
            "bytes_per_param": f"{weight}+{grad}+{optim}"}


def one_run(args: argparse.Namespace, model: str, engine: str, method: str, root: Path) -> dict:
    from dist_tune.config import load_config
    from dist_tune.estimate import GIB, estimate

    failures = []
    for attempt in range(1 + args.retries):  # a retry covers e.g. a rendezvous port taken between pick and bind
        name = f"{method}-{engine}" + (f"-retry{attempt}" if attempt else "")
        overrides = overrides_for(args, model, engine, method, str(root))
        overrides["train.run_name"] = name
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world_size}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dist_tune.cli", "train",
               *(f"--{k}={v}" for k, v in overrides.items())]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(args.threads), capture_output=True, text=True,
                              timeout=args.timeout)
        wall = time.perf_counter() - start
        run_dir = root / name
        if proc.returncode == 0 and (run_dir / "summary.json").is_file():
            break
        reason = first_error(proc.stderr) or f"exit {proc.returncode}"
        failures.append({"reason": reason, "wall_s": wall, "stderr_tail": proc.stderr[-4000:]})
        print(f"  {method:5s} {engine:6s} FAILED attempt {attempt + 1} ({wall:.0f} s): {reason}\n"
              f"    command: {' '.join(cmd)}", file=sys.stderr)
        if args.verbose:
            print(proc.stdout[-3000:], proc.stderr[-12000:], sep="\n", file=sys.stderr)
    else:
        return {"method": method, "engine": engine, "kind": ENGINES[engine][0], "zero_stage": ENGINES[engine][1],
                "failed": failures[-1]["reason"], "attempts": failures, "command": cmd}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rss = [r["train/peak_rss_gib"] for r in records if "train/peak_rss_gib" in r]

    cfg = load_config(None, overrides)  # the config the CLI resolved (overrides without a recipe: library defaults)
    e = estimate(cfg, args.world_size)
    f = formula(engine, args.mixed_precision, args.world_size, e.params, e.trainable)
    measured = {"params": summary["param_bytes"], "optimizer": summary["optim_bytes"]}
    out = {"method": method, "engine": engine, "kind": ENGINES[engine][0], "zero_stage": ENGINES[engine][1],
           "params": e.params, "trainable": e.trainable, "steps": summary.get("steps"), "wall_s": wall,
           "failed_attempts": failures,
           "measured_rank0": measured,
           "formula": f,
           "estimate": {"weights": e.weights_gib * GIB, "grads": e.grads_gib * GIB,
                        "optimizer": e.optimizer_gib * GIB},
           "peak_rss_gib_max_over_ranks": max(rss) if rss else None}
    out["ratio_measured_vs_formula"] = {
        "params": measured["params"] / f["weights"], "optimizer": measured["optimizer"] / f["optimizer"]
        if f["optimizer"] else None}
    out["ratio_measured_vs_estimate"] = {
        "params": measured["params"] / out["estimate"]["weights"],
        "optimizer": measured["optimizer"] / out["estimate"]["optimizer"] if out["estimate"]["optimizer"] else None}
    print(f"  {method:5s} {engine:6s} params {measured['params'] / MIB:8.2f} MiB (formula {f['weights'] / MIB:8.2f}, "
          f"estimate {out['estimate']['weights'] / MIB:8.2f})  optim {measured['optimizer'] / MIB:8.2f} MiB "
          f"(formula {f['optimizer'] / MIB:8.2f}, estimate {out['estimate']['optimizer'] / MIB:8.2f})  "
          f"{wall:.0f} s", file=sys.stderr)
    return out


def first_error(stderr: str) -> str | None:
    """The root exception line of any rank ("[rankN]: SomeError: ..." or "dist-tune: error: ..."); a rank's
    "connection closed by peer" is only the echo of another rank's crash, so it is reported only if alone."""
    found = []
    for line in stderr.splitlines():
        text = line.split("]: ", 1)[1] if line.startswith("[rank") and "]: " in line else line
        if text.startswith("dist-tune: error:") or (not text.startswith(" ") and "Error: " in text
                                                     and "ChildFailedError" not in text):
            rank = line.split("]", 1)[0] + "] " if line.startswith("[rank") else ""
            found.append((rank + text.strip())[:400])
    secondary = ("Connection closed by peer", "Connection reset by peer")
    root = [f for f in found if not any(word in f for word in secondary)]
    return (root or found or [None])[0]


def versions() -> dict:
    import deepspeed
    import peft
    import torch
    import transformers

    import dist_tune

    commit = git_commit()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "peft": peft.__version__,
            "dist_tune": f"{dist_tune.__version__} @ {commit}"}


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MIB:.2f}"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(report: dict) -> str:
    s, d, v = report["settings"], report["device"], report["versions"]
    lines = [f"### Model-state memory per rank (world size {s['world_size']}, CPU/gloo), {report['date']}", "",
             f"- device: {d['cpu']}, {d['logical_cores']} logical cores; {s['world_size']} ranks × "
             f"OMP_NUM_THREADS={s['threads']}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- settings: model {s['model']} ({s['mixed_precision']}, AdamW), bundled:instructions, max_length "
             f"{s['max_length']}, micro-batch {s['micro_batch']}, {s['steps']} steps; LoRA r=8 on q_proj, v_proj",
             "- measured: rank 0's `summary.json` `param_bytes` / `optim_bytes` (`engine.local_state_bytes()`: "
             "local shards; DeepSpeed's optim_bytes include its fp32 master partition). Gradients are not "
             "measured (freed before the summary): the grads column is the formula only.",
             f"- formula: ZeRO paper per rank, {report['formula_note']}",
             "- estimate: `dist-tune estimate-memory` (`dist_tune.estimate.estimate(cfg, world_size)`) for the "
             "same config",
             "- peak RSS: `train/peak_rss_gib`, max over ranks (process lifetime peak incl. libraries, model build "
             "and engine setup: FSDP's rank 0 and every ZeRO-3 rank hold the full model before it is sharded, so this "
             "is not model state alone)",
             "",
             "| method | engine | N (trainable) | params MiB measured / formula / estimate | optimizer MiB measured / "
             "formula / estimate | grads MiB formula / estimate | measured ÷ formula (params, optim) | "
             "peak RSS GiB (max over ranks) |",
             "| --- | --- | --- | --- | --- | --- | --- | ---: |"]
    for r in report["runs"]:
        if "failed" in r:
            lines.append(f"| {r['method']} | {r['engine']} | FAILED: {r['failed'].replace('|', '/')} | | | | | |")
            continue
        m, f, e = r["measured_rank0"], r["formula"], r["estimate"]
        rss = "n/a" if r["peak_rss_gib_max_over_ranks"] is None else f"{r['peak_rss_gib_max_over_ranks']:.2f}"
        lines.append(
            f"| {r['method']} | {r['engine']} | {r['params']:,} ({r['trainable']:,}) | "
            f"{mib(m['params'])} / {mib(f['weights'])} / {mib(e['weights'])} | "
            f"{mib(m['optimizer'])} / {mib(f['optimizer'])} / {mib(e['optimizer'])} | "
            f"{mib(f['grads'])} / {mib(e['grads'])} | "
            f"{ratio(r['ratio_measured_vs_formula']['params'])}, {ratio(r['ratio_measured_vs_formula']['optimizer'])}"
            f" | {rss} |")
    retried = [f"{r['method']}/{r['engine']} ({r['failed_attempts'][0]['reason']})"
               for r in report["runs"] if r.get("failed_attempts")]
    if retried:
        lines += ["", "Succeeded on a retry: " + "; ".join(retried)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        model = custom_model(args, root) if args.hidden else args.preset
        runs = []
        for method in args.method_list:
            for engine in args.engine_list:
                runs.append(one_run(args, model, engine, method, root / "runs"))
    precision_note = ("fp32 Adam: 4 weights + 4 grads + 8 (m, v) [+ 4 fp32 master on DeepSpeed] bytes/param"
                      if args.mixed_precision == "fp32" else
                      "mixed-precision Adam, 16 bytes/param: DeepSpeed 2 weights + 2 grads + 12 (fp32 master + m + "
                      "v); DDP/FSDP 4 fp32 weights (the master copy, cast to bf16 for compute) + 4 grads + 8 (m, v)")
    report = {
        "benchmark": "memory_per_engine", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "settings": {"model": (f"local Llama hidden {args.hidden}, {args.layers} layers" if args.hidden
                               else args.preset), "world_size": args.world_size, "steps": args.steps,
                     "micro_batch": args.micro_batch, "max_length": args.max_length,
                     "mixed_precision": args.mixed_precision, "threads": args.threads,
                     "engines": args.engine_list, "methods": args.method_list},
        "formula_note": precision_note + "; ZeRO-1 shards the optimizer state, ZeRO-2 + grads, ZeRO-3/FSDP all",
        "units": "bytes per rank (rank 0)",
        "total_wall_s": time.perf_counter() - started,
        "runs": runs,
    }
    write_report(report, markdown(report), args.json_out, args.results_md)
    print(json.dumps(report, indent=2))
    failed = [f"{r['method']}/{r['engine']}" for r in runs if "failed" in r]
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (see the table; --verbose prints their output)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
