"""Peak host RAM of a large-vocabulary causal LM step with and without the chunked LM head and loss.

    python benchmarks/logits_memory.py                     # vocab 128256, seq 2048, micro-batch 4, 2 steps
    python benchmarks/logits_memory.py --vocab 32000 --micro-batch 2

A 2-layer, 64-wide Llama with Llama-3's 128256-token vocabulary (written once to --cache, fp32) trains on the
bundled raw text, packed into rows of --max-length tokens (every position a target), through the real CLI on one
CPU process: `train.chunked_loss=true` (the default: the head and the cross-entropy chunk by chunk of positions)
and `false` (the model's whole logits, then the loss). The logits dominate such a model: micro-batch 4 × 2048
positions × 128256 × 4 bytes = 4.2 GB for the fp32 logits alone, as much again for their gradient. Reported per
variant: peak host RSS (ru_maxrss from summary.json), the median step's seconds, and the losses of both steps,
which must agree (same math, summed in another order).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, git_commit, write_report

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"chunked": "true", "whole logits": "false"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist_tune_logits_memory"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "logits_memory_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    return p.parse_args(argv)


def checkpoint(args: argparse.Namespace) -> Path:
    """The 2-layer 64-wide Llama with a --vocab embedding and head (fp32), with the shipped tokenizer."""
    path = Path(args.cache) / f"llama-h64-l2-v{args.vocab}"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_tune.config import load_config
    from dist_tune.models import load_tokenizer

    tokenizer = load_tokenizer(load_config(None, {"model.name_or_path": "tiny-llama"}))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=args.max_length, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def run(args: argparse.Namespace, model: Path, name: str, chunked: str) -> dict:
    """One `dist-tune train` process; peak RSS, step seconds and losses from its run directory."""
    out = Path(args.cache) / "runs"
    slug = name.replace(" ", "-")
    cmd = [sys.executable, "-m", "dist_tune.cli", "train", f"--model.name_or_path={model}",
           "--data.path=bundled:text", "--data.format=text", "--data.pack=true", f"--data.max_length={args.max_length}",
           "--data.validation_split=0", "--model.dtype=float32", f"--train.micro_batch_size={args.micro_batch}",
           f"--train.max_steps={args.steps}", "--train.device=cpu", f"--train.chunked_loss={chunked}",
           f"--train.output_dir={out}", f"--train.run_name={slug}", "--train.resume=none", "--log.log_steps=1",
           "--log.wandb.mode=disabled", "--checkpoint.save_final=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    summary_file = out / slug / "summary.json"
    if proc.returncode != 0 or not summary_file.is_file():
        lines = (proc.stderr + proc.stdout).splitlines() or [""]
        return {"error": f"exit {proc.returncode}: {lines[-1].strip()}", "seconds": round(time.time() - start, 1)}
    summary = json.loads(summary_file.read_text())
    steps = [json.loads(line) for line in (out / slug / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "train/loss" in m]
    return {"peak_gib": summary["peak_host_rss_gib_per_rank"][0], "losses": [m["train/loss"] for m in steps],
            "step_s": statistics.median(m["train/compute_s"] for m in steps), "seconds": round(time.time() - start, 1)}


def measure(args: argparse.Namespace) -> tuple[dict, str]:
    model = checkpoint(args)
    rows = {name: run(args, model, name, VARIANTS[name]) for name in args.variants.split(",")}
    lines = []
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | |")
        else:
            losses = ", ".join(f"{v:.6f}" for v in row["losses"])
            lines.append(f"| {name} | {row['peak_gib']:.2f} | {row['step_s']:.2f} | {losses} | {row['seconds']} |")
    report = {"cpu": cpu_model(), "commit": git_commit(), "load_average": os.getloadavg(), "vocab": args.vocab,
              "max_length": args.max_length, "micro_batch": args.micro_batch, "steps": args.steps, "rows": rows}
    logits_gb = args.micro_batch * args.max_length * args.vocab * 4 / 1e9
    header = (f"### Logits memory: chunked LM head and loss vs whole logits (CPU, fp32), "
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n"
              f"2-layer 64-wide Llama, vocabulary {args.vocab}, packed raw text at {args.max_length} tokens, "
              f"micro-batch {args.micro_batch} ({logits_gb:.1f} GB of fp32 logits per micro-batch), {args.steps} "
              f"steps, engine single. {cpu_model()}, commit {git_commit()}, load average "
              f"{os.getloadavg()[0]:.1f}. `python benchmarks/logits_memory.py {' '.join(sys.argv[1:])}`\n\n"
              "| loss | peak host RSS GiB | step s (median) | train loss per step | seconds |\n"
              "| --- | --- | --- | --- | --- |\n")
    return report, header + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report, table = measure(args)
    write_report(report, table, args.json_out, args.results_md)


if __name__ == "__main__":
    main()
