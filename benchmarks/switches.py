"""The effect of each speed/memory switch of dist_tune, one at a time against a baseline, through the real CLI.

    python benchmarks/switches.py                         # every variant; 3 warmup + 20 timed steps each
    python benchmarks/switches.py --repeats 3             # 3 rounds in the order of --variants
    python benchmarks/switches.py --variants baseline,padding_free --steps 5 --json-out /tmp/s.json --results-md ''

Every variant is its own `python -m dist_tune.cli train ...` process (engine single, CPU, fp32 weights), run one
after another: preset small-llama, benchmarks/mixed_data.py's long-tailed instruction file (written to a temp dir,
data.max_length 1024, alpaca template, tokenized-data cache in the temp dir), micro-batch 8, a fixed seed,
train.max_steps = --warmup + --steps, every step logged, no eval, no checkpoints. Everything not listed below is
dist_tune's default.

  baseline                    data.padding_free=false, train.target_logits_only=false (pad to longest, logits
                              at every position)
  every other variant         baseline + the overrides in VARIANTS (one switch, or padding-free + target logits)

Per variant, from the run's metrics.jsonl (one record per step): the median over the timed steps (steps after
--warmup) of `train/tokens_per_s` (non-padding tokens / wall seconds of that step), `train/compute_s` and
`train/data_wait_s`; peak RSS = the last `train/peak_rss_gib` (ru_maxrss, the process lifetime peak); the loss of
the last step; the wall seconds of the whole process. The loss check: the largest relative difference of the
per-step losses from the baseline's, which must stay within LOSS_RTOL for the switches that do not change the
math (all but pack and bf16). With --repeats, each variant's median round (by tokens/s) is reported.

Writes the JSON to --json-out (default benchmarks/results/switches_cpu.json), appends a section to --results-md
(default benchmarks/RESULTS.md), and prints a markdown table and the JSON to stdout.
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

from common import write_report
from memory_per_engine import first_error
from mixed_data import write_mixed_instructions
from throughput_vs_hf import (
    DATA_DESC,
    MIXED_SEED,
    data_line,
    dataset_cache,
    default_threads,
    device_info,
    versions,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH, SEED, LOSS_RTOL = 1024, 42, 1e-4
BASELINE = {"data.padding_free": False, "train.target_logits_only": False, "train.chunked_loss": False}
VARIANTS = {
    "baseline": {},
    "target_logits_only": {"train.target_logits_only": True},
    "padding_free": {"data.padding_free": True},
    "padding_free+target_logits": {"data.padding_free": True, "train.target_logits_only": True},
    "pack": {"data.pack": True},
    "ce_chunk_tokens": {"train.chunked_loss": True, "train.ce_chunk_tokens": 1024},
    "activation_checkpointing": {"engine.activation_checkpointing": True},
    "compile": {"engine.compile": True},
    "eager_attention": {"model.attn_implementation": "eager"},
    "bf16": {"engine.mixed_precision": "bf16"},
    "workers": {"data.num_workers": 2, "data.pin_memory": False},
}
CHANGES_LOSS = {"pack": "different examples per step", "bf16": "bf16 autocast numerics"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} (run in "
                                                                   "this order; put baseline first)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps (compile time falls here)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of --variants (use an odd number); each variant's median round is reported")
    p.add_argument("--preset", default="small-llama", help="dist_tune model preset")
    p.add_argument("--threads", type=int, default=default_threads(), help="OMP_NUM_THREADS of every run")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "switches_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                   help="markdown file a section is appended to ('' = none)")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown or not args.variant_list:
        p.error(f"--variants: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def overrides_for(args: argparse.Namespace, variant: str, data_path: str, out_dir: str, name: str) -> dict:
    return {"model.name_or_path": args.preset, "model.dtype": "float32",
            "data.path": data_path, "data.format": "instruction", "data.prompt_template": "alpaca",
            "data.max_length": MAX_LENGTH, "data.validation_split": 0.0, "data.cache_dir": dataset_cache(data_path),
            "engine.kind": "single", "train.device": "cpu", "train.seed": SEED,
            "train.micro_batch_size": args.micro_batch, "train.max_steps": args.warmup + args.steps,
            "train.eval_steps": "null", "train.output_dir": out_dir, "train.run_name": name, "train.resume": "none",
            "log.log_steps": 1, "log.progress": False, "log.plot": False, "log.jsonl": True,
            "log.wandb.mode": "disabled", "checkpoint.save_steps": "null", "checkpoint.save_final": False,
            **BASELINE, **VARIANTS[variant]}


def read_run(run_dir: Path, warmup: int) -> dict:
    """Per-step medians over the timed steps, peak RSS, losses and the summary of a finished run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "train/loss" in r]
    timed = [r for r in steps if r["step"] > warmup]
    rss = [r["train/peak_rss_gib"] for r in steps if "train/peak_rss_gib" in r]
    return {"tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in timed),
            "compute_s": statistics.median(r["train/compute_s"] for r in timed),
            "data_wait_s": statistics.median(r["train/data_wait_s"] for r in timed),
            "peak_rss_gib": rss[-1] if rss else None, "loss_last": steps[-1]["train/loss"],
            "losses": {r["step"]: r["train/loss"] for r in steps},
            "tokens_per_s_steps": [r["train/tokens_per_s"] for r in timed],
            "summary": json.loads((run_dir / "summary.json").read_text())}


def run_variant(args: argparse.Namespace, variant: str, data_path: str, root: Path, round_: int) -> dict:
    name = f"{variant}-r{round_}"
    overrides = overrides_for(args, variant, data_path, str(root), name)
    cmd = [sys.executable, "-m", "dist_tune.cli", "train", *(f"--{k}={v}" for k, v in overrides.items())]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=worker_env(args.threads), capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - start
    run_dir = root / name
    if proc.returncode != 0 or not (run_dir / "summary.json").is_file():
        reason = first_error(proc.stderr) or f"exit {proc.returncode}"
        print(f"  {variant:26s} FAILED ({wall:.0f} s): {reason}\n    command: {' '.join(cmd)}", file=sys.stderr)
        return {"variant": variant, "failed": reason, "wall_s": wall, "stderr_tail": proc.stderr[-4000:]}
    out = {"variant": variant, **read_run(run_dir, args.warmup), "wall_s": wall, "loadavg_1m_before": load_before}
    print(f"  {variant:26s} {out['tokens_per_s']:9.1f} tokens/s  compute {out['compute_s']:.3f} s  data wait "
          f"{out['data_wait_s']:.4f} s  loss {out['loss_last']:.4f}  ({wall:.1f} s; load {load_before:.2f})",
          file=sys.stderr)
    return out


def run_rounds(args: argparse.Namespace, data_path: str, root: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    for round_ in range(args.repeats):
        print(f"round {round_ + 1}/{args.repeats}", file=sys.stderr)
        for variant in args.variant_list:
            runs[variant].append(run_variant(args, variant, data_path, root, round_))
    return runs


def summarise(runs: list[dict]) -> dict:
    """The median successful round by tokens/s (the lower middle one for an even count), or the failure."""
    ok = sorted((r for r in runs if "failed" not in r), key=lambda r: r["tokens_per_s"])
    if not ok:
        return runs[-1]
    return {**ok[(len(ok) - 1) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs if "failed" not in r],
            "failed_rounds": sum("failed" in r for r in runs)}


def loss_check(result: dict, base: dict | None) -> dict | None:
    """Largest relative per-step loss difference from the baseline, and whether it is within LOSS_RTOL."""
    if base is None or "failed" in base or "failed" in result or result is base:
        return None
    common = sorted(set(result["losses"]) & set(base["losses"]))
    rel = max(abs(result["losses"][s] - base["losses"][s]) / abs(base["losses"][s]) for s in common)
    return {"max_rel_diff": rel, "expected_same": result["variant"] not in CHANGES_LOSS,
            "ok": rel <= LOSS_RTOL if result["variant"] not in CHANGES_LOSS else None}


def check_text(check: dict | None, variant: str) -> str:
    if check is None:
        return "—"
    if not check["expected_same"]:
        return f"{check['max_rel_diff']:.1e} (n/a: {CHANGES_LOSS[variant]})"
    return f"{check['max_rel_diff']:.1e} {'ok' if check['ok'] else 'FAIL'}"


def table_rows(results: dict) -> list[str]:
    base = results.get("baseline", {}).get("tokens_per_s")
    lines = [("| variant | change vs baseline | non-pad tokens/s (median step) | runs | vs baseline | compute s/step "
              "| data wait s/step | peak RSS GiB | loss last step | loss max rel. diff vs baseline | process s |"),
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, r in results.items():
        change = ", ".join(f"`{k}={v}`" for k, v in VARIANTS[name].items()) or "—"
        if "failed" in r:
            lines.append(f"| {name} | {change} | FAILED: {r['failed'].replace('|', '/')} | | | | | | | | "
                         f"{r['wall_s']:.0f} |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "n/a"
        rss = "n/a" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        runs = ", ".join(f"{v:.0f}" for v in r["tokens_per_s_runs"])
        lines.append(f"| {name} | {change} | {r['tokens_per_s']:.1f} | {runs} | {ratio} | {r['compute_s']:.3f} | "
                     f"{r['data_wait_s']:.4f} | {rss} | {r['loss_last']:.5f} | {check_text(r['loss_check'], name)} | "
                     f"{r['wall_s']:.1f} |")
    return lines


def notes(report: dict) -> list[str]:
    """What the columns mean, and the caveats of the variants that ran."""
    s, variants = report["settings"], report["settings"]["variants"]
    lines = [(f"- unit: `train/tokens_per_s` of metrics.jsonl, non-padding tokens / wall seconds of one step "
              f"(data wait, forward, backward, optimizer, logging), median over steps {s['warmup'] + 1}–"
              f"{s['warmup'] + s['steps']}; compute / data wait: medians of `train/compute_s` / "
              "`train/data_wait_s`; peak RSS: the last `train/peak_rss_gib` (process lifetime ru_maxrss); process "
              "s: wall seconds of the whole CLI process (start, imports, data, model build, all steps); the first "
              "run with given data.* settings (baseline, padding_free, pack) also tokenizes into data.cache_dir, "
              "later runs with the same settings read that cache"),
             (f"- loss check: largest relative difference of the per-step losses from the baseline's; switches "
              f"that keep the math must stay within {LOSS_RTOL:.0e} (pack and bf16 are shown, not checked)")]
    if "pack" in variants:
        lines.append("- pack: rows of up to max_length tokens hold several examples, so a step trains on different "
                     "(more) examples than the baseline's: compare tokens/s only, not steps, compute s or loss")
    if "compile" in variants:
        lines.append(f"- compile: torch.compile of each decoder block; compilation happens in the {s['warmup']} "
                     "untimed warmup steps (and in the process time); micro-batches padded to their longest row "
                     "change shape every step, so a recompile for a new shape can still fall in a timed step")
    if "workers" in variants:
        lines.append("- workers: 2 DataLoader worker processes; data.pin_memory=false because pinned memory only "
                     "speeds up host-to-GPU copies and means nothing on a CPU-only run; its peak RSS is the training "
                     "process alone (ru_maxrss of RUSAGE_SELF), without the workers")
    return lines


def markdown(report: dict) -> str:
    s, d, v = report["settings"], report["device"], report["versions"]
    head = [f"### Speed/memory switches, one at a time vs baseline (CPU, engine single), {report['date']}",
            "",
            (f"- device: {d['cpu']}, {d['usable_cores']} usable cores ({d['logical_cores']} logical), "
             f"OMP_NUM_THREADS={d['torch_threads']} for every run; {d['platform']}"),
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            data_line(s),
            (f"- settings: preset {s['preset']} (fp32 weights), engine single, train.device cpu, micro-batch "
             f"{s['micro_batch']}, seed {SEED}, dist_tune's default optimizer and schedule; {s['warmup']} warmup "
             f"steps untimed + {s['steps']} timed steps; each variant a separate `dist-tune train` process; "
             f"{s['repeats']} round(s) in the order {', '.join(s['variants'])}; baseline = "
             + ", ".join(f"`{k}={val}`" for k, val in BASELINE.items())),
            *notes(report),
            f"- 1-minute load average before the first run: {report['loadavg_1m_start']:.2f}",
            ""]
    return "\n".join(head + table_rows(report["results"])) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    if load_start > 0.25 * default_threads():
        print(f"WARNING: 1-minute load average is {load_start:.2f} on {default_threads()} cores: the numbers will "
              "not be representative (the load is recorded in the results)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-switches-") as tmp:
        data_path = str(Path(tmp) / "mixed_instructions.jsonl")
        lengths = write_mixed_instructions(data_path, seed=MIXED_SEED, max_tokens=MAX_LENGTH)
        runs = run_rounds(args, data_path, Path(tmp) / "runs")
    results = {v: summarise(r) for v, r in runs.items()}
    for r in results.values():
        r["loss_check"] = loss_check(r, results.get("baseline"))
    report = {
        "benchmark": "switches", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device_info(args.threads), "versions": versions(),
        "settings": {"preset": args.preset, "max_length": MAX_LENGTH, "micro_batch": args.micro_batch,
                     "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
                     "variants": args.variant_list, "threads": args.threads, "seed": SEED, "baseline": BASELINE,
                     "data": "mixed", "data_desc": DATA_DESC["mixed"], "data_lengths": lengths,
                     "template": "alpaca", "loss_rtol": LOSS_RTOL},
        "unit": "median over the timed steps of train/tokens_per_s (non-padding tokens / step wall seconds)",
        "loadavg_1m_start": load_start,
        "results": results,
    }
    write_report(report, markdown(report), args.json_out, args.results_md)
    print(json.dumps({**report, "results": {v: {k: x for k, x in r.items() if k not in ("losses", "summary")}
                                            for v, r in results.items()}}, indent=2))
    for name, r in results.items():
        if r.get("loss_check") and r["loss_check"]["expected_same"]:
            print(f"loss check {name}: max rel. diff vs baseline {r['loss_check']['max_rel_diff']:.2e} "
                  f"(tolerance {LOSS_RTOL:.0e}): {'ok' if r['loss_check']['ok'] else 'FAIL'}", file=sys.stderr)
    failed = [v for v, r in results.items() if "failed" in r]
    if failed:
        print(f"FAILED variants: {', '.join(failed)} (see the table and stderr_tail in the JSON)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
