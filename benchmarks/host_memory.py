"""Peak host RAM per rank when a ~1B-parameter checkpoint is fine-tuned on CPU, relative to the checkpoint's size.

    python benchmarks/host_memory.py                                   # fsdp, zero3 × lora, full × world size 2, 4
    python benchmarks/host_memory.py --engines fsdp --methods lora --world-sizes 2 --hidden 512 --layers 4
    python benchmarks/host_memory.py --methods lora --shard-unit linear   # gather one linear layer at a time
    python benchmarks/host_memory.py --vocab 32000                        # TinyLlama's own vocabulary size

It writes a seeded random-init Llama-shaped checkpoint in bf16 once (default: TinyLlama's 1.1B shape with the
shipped 2k-token tokenizer, `--cache` keeps it between runs), then runs the real CLI under torchrun (gloo) for each
(engine, method, world size): load, `--steps` optimizer steps, a one-batch eval, final save. Each rank's lifetime peak RSS comes
from `summary.json`'s `peak_host_rss_gib_per_rank` (ru_maxrss, gathered after the final save). The same run on
the `tiny-llama` preset gives the process overhead (libraries, gloo, data), so per rank

    ratio = (peak RSS on the big checkpoint - peak RSS on tiny-llama) / checkpoint bytes

Ideal: 1 / world size (each rank holds its share of the weights); a rank that materialises the whole model
scores >= 1. Targets (issue 13): LoRA <= 0.6 at world size 2 and <= 0.35 at 4 on every rank; full tuning: rank
0's peak within 10 % of the other ranks' peak (no rank-0 spike). The same ratio at the end of loading (before the
first step, `load_peak_host_rss_gib_per_rank`) separates loading from training: on CPU the training steps' gathered
blocks (FSDP all-gathers, ZeRO-3's live parameters, gloo's copies of them) are host memory, where on a GPU run
they would be device memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, git_commit, write_report
from memory_per_engine import free_port

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {"fsdp": ["--engine.kind=fsdp"], "zero3": ["--engine.kind=deepspeed", "--engine.zero_stage=3"]}
METHODS = {"lora": ["--peft.method=lora", "--peft.r=8", "--peft.alpha=16"], "full": ["--peft.method=full"]}
TARGETS = {("lora", 2): 0.6, ("lora", 4): 0.35}
GIB = 2 ** 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--world-sizes", default="2,4")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=0, help="embedding rows (default: the shipped tokenizer's 1606)")
    p.add_argument("--shard-unit", choices=("block", "linear"), default="block",
                   help="engine.shard_unit: how much of the model FSDP / ZeRO-3 gathers at once")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="engine.activation_checkpointing=true (keeps each block's input, not its activations)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist_tune_host_memory"),
                   help="where the checkpoint is written once and the runs go")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "host_memory_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = p.parse_args(argv)
    args.engine_list = args.engines.split(",")
    args.method_list = args.methods.split(",")
    args.world_size_list = [int(w) for w in args.world_sizes.split(",")]
    bad = [e for e in args.engine_list if e not in ENGINES] + [m for m in args.method_list if m not in METHODS]
    if bad:
        p.error(f"unknown engine/method {bad}; engines: {', '.join(ENGINES)}; methods: {', '.join(METHODS)}")
    return args


def checkpoint(args: argparse.Namespace) -> Path:
    """The bf16 Llama-shaped checkpoint (written on first use) with the shipped tokenizer."""
    path = Path(args.cache) / (f"llama-h{args.hidden}-l{args.layers}-i{args.intermediate}"
                               + (f"-v{args.vocab}" if args.vocab else ""))
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dist_tune.config import load_config
    from dist_tune.models import load_tokenizer

    tokenizer = load_tokenizer(load_config(None, {"model.name_or_path": "tiny-llama"}))
    heads = args.hidden // 64
    hf_cfg = LlamaConfig(vocab_size=args.vocab or len(tokenizer), hidden_size=args.hidden,
                         num_hidden_layers=args.layers,
                         intermediate_size=args.intermediate, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 8), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def variant(args: argparse.Namespace) -> str:
    return f"{args.shard_unit} units" + (", activation checkpointing" if args.activation_checkpointing else "")


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def data_args(args: argparse.Namespace) -> list[str]:
    return ["--data.path=bundled:text", "--data.format=text", f"--data.max_length={args.max_length}"]


def warm_data_cache(args: argparse.Namespace) -> None:
    """Tokenize the data once before any measured run, so each run (the big one and its tiny-llama baseline
    alike) memory-maps a warm cache: rank 0's preparation would otherwise count against whichever came first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "dist_tune.cli", "prepare", "--model.name_or_path=tiny-llama",
                    *data_args(args)], cwd=ROOT, env=env, capture_output=True, check=True, timeout=args.timeout)


def run(args: argparse.Namespace, model: str, engine: str, method: str, world_size: int) -> dict:
    """One training run under torchrun; its summary.json, or the failure."""
    out = Path(args.cache) / "runs"
    variant_slug = args.shard_unit + "-ac" * args.activation_checkpointing
    name = f"{Path(model).name}-{engine}-{method}-ws{world_size}-{variant_slug}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}",
           "-m", "dist_tune.cli", "train", f"--model.name_or_path={model}", *data_args(args), "--model.dtype=bfloat16",
           "--engine.mixed_precision=bf16",
           "--train.micro_batch_size=1", f"--train.max_steps={args.steps}", "--train.device=cpu",
           f"--train.output_dir={out}", f"--train.run_name={name}", "--train.resume=none", "--log.log_steps=1",
           "--log.wandb.mode=disabled", "--train.eval_max_batches=1", f"--engine.shard_unit={args.shard_unit}",
           f"--engine.activation_checkpointing={args.activation_checkpointing}", *ENGINES[engine], *METHODS[method]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    summary_file = out / name / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        lines = (proc.stderr + proc.stdout).splitlines()
        errors = [line for line in lines if "error:" in line or "Signal" in line] or lines[-1:] or [""]
        return {"error": f"exit {proc.returncode}: {errors[0].strip()}", "seconds": round(time.time() - start, 1)}
    summary = json.loads(summary_file.read_text())
    return {"peak_gib": summary["peak_host_rss_gib_per_rank"],
            "load_peak_gib": summary["load_peak_host_rss_gib_per_rank"], "seconds": round(time.time() - start, 1)}


def verdict(method: str, world_size: int, ratios: list[float]) -> str:
    if method == "full":
        others = max(ratios[1:], default=ratios[0])
        return "yes" if ratios[0] <= 1.1 * others else "no (rank-0 spike)"
    target = TARGETS.get((method, world_size))
    return "-" if target is None else ("yes" if max(ratios) <= target else f"no (> {target})")


def ratios(big: list[float], tiny: list[float], size: int) -> list[float]:
    return [round((b - t) * GIB / size, 3) for b, t in zip(big, tiny)]


def measure(args: argparse.Namespace) -> tuple[dict, str]:
    model = checkpoint(args)
    size = weight_bytes(model)
    warm_data_cache(args)
    rows, lines = [], []
    for engine in args.engine_list:
        for method in args.method_list:
            for ws in args.world_size_list:
                big = run(args, str(model), engine, method, ws)
                base = run(args, "tiny-llama", engine, method, ws)
                row = {"engine": engine, "method": method, "world_size": ws, "run": big, "overhead_run": base}
                if "error" not in big and "error" not in base:
                    row["ratio"] = ratios(big["peak_gib"], base["peak_gib"], size)
                    row["load_ratio"] = ratios(big["load_peak_gib"], base["load_peak_gib"], size)
                    row["meets_target"] = verdict(method, ws, row["ratio"])
                rows.append(row)
                lines.append(table_line(row))
                print(lines[-1], flush=True)
    report = {"checkpoint": str(model), "checkpoint_gib": size / GIB, "cpu": cpu_model(), "commit": git_commit(),
              "load_average": os.getloadavg(), "max_length": args.max_length, "steps": args.steps,
              "vocab": args.vocab or None,
              "shard_unit": args.shard_unit, "activation_checkpointing": args.activation_checkpointing, "rows": rows}
    header = (f"### Host RAM per rank vs checkpoint size (CPU/gloo, bf16), {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n"
              f"Checkpoint {size / GIB:.2f} GiB ({args.hidden} hidden, {args.layers} layers"
              f"{f', {args.vocab} vocabulary' if args.vocab else ''}); load, {args.steps} "
              f"steps at max_length {args.max_length}, final save, {variant(args)}. "
              "Ratio = (peak RSS − same run on tiny-llama) / "
              f"checkpoint bytes, per rank (rank 0 first). {cpu_model()}, commit {git_commit()}, load average "
              f"{os.getloadavg()[0]:.1f}. `python benchmarks/host_memory.py {' '.join(sys.argv[1:])}`\n\n"
              "| engine | method | world size | peak RSS GiB per rank | ratio per rank | target met | ratio at the end "
              "of loading | seconds |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    return report, header + "\n".join(lines) + "\n"


def table_line(row: dict) -> str:
    big = row["run"]
    if "ratio" not in row:
        why = big.get("error") or row["overhead_run"].get("error")
        return f"| {row['engine']} | {row['method']} | {row['world_size']} | failed: {why} | | | | |"
    peaks = ", ".join(f"{p:.2f}" for p in big["peak_gib"])
    ratio, load = (", ".join(f"{r:.2f}" for r in row[key]) for key in ("ratio", "load_ratio"))
    return (f"| {row['engine']} | {row['method']} | {row['world_size']} | {peaks} | {ratio} | "
            f"{row['meets_target']} | {load} | {big['seconds']} |")


def main() -> None:
    args = parse_args()
    report, table = measure(args)
    write_report(report, table, args.json_out, args.results_md)


if __name__ == "__main__":
    main()
