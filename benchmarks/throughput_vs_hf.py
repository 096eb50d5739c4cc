"""Training throughput of dist_tune vs HF `transformers.Trainer` on the same model, data, batches and machine.

    python benchmarks/throughput_vs_hf.py                  # hf, hf_flat, dt, dt_flat; 3 warmup + 30 timed steps
    python benchmarks/throughput_vs_hf.py --repeats 3      # 3 rounds in the order hf, hf_flat, dt, dt_flat, ...
    python benchmarks/throughput_vs_hf.py --which hf,dt --steps 5 --json-out /tmp/t.json --results-md /tmp/R.md
    python benchmarks/throughput_vs_hf.py --data bundled --precision bf16   # short bundled rows, bf16 autocast

Systems, each run as its own subprocess (`--worker SYSTEM`), one after another in the order of `--which`:

  hf       transformers.Trainer. Model: `dist_tune.models.load_model` (the dist_tune preset, shipped tokenizer,
           same seed → bit-identical init). Data: the rows of `dist_tune.data.build_datasets(cfg, tokenizer)`
           (unpacked, the same data.path file), collated with `DataCollatorForSeq2Seq` (pad to longest, labels
           -100, right padding). Sampler: dist_tune's `ResumableSampler` with the same seed, so hf, hf_flat, dt
           and dt_flat see the SAME micro-batches in the same order (checked: per-step token counts compared).
           AdamW: by default the same torch AdamW(foreach=True) dist_tune builds (`--hf-optim same`);
           `--hf-optim default` keeps HF's own default (adamw_torch_fused). No eval/save/logging/report_to.
  hf_flat  the same with HF's padding-free `DataCollatorWithFlattening`: each micro-batch concatenated into one
           row with position ids restarting per example (no attention_mask; attention stays within an example).
  dt       dist_tune's real code path in-process: `dist_tune.run.train(cfg)` (what `dist-tune train` runs: engine
           single), with `data.padding_free=false`: padding to the longest row of each micro-batch, with Trainer.train_step wrapped for timing.
  dt_all_logits  dt with `train.target_logits_only=false`: logits and softmax at every position, as HF computes
           them (the effect of target-only logits alone).
  dt_pack  the same with `data.pack=true`: whole examples packed greedily into rows of at most max_length tokens,
           position ids restart per example (padding-free; attention stays within an example). A packed
           micro-batch of 8 rows holds several times more examples, so compare tokens/s, not steps/s.
  dt_default  dist_tune with its defaults for the data path (data.padding_free=auto, train.target_logits_only=true):
           what a user gets without setting any speed switch.
  dt_whole_logits  dt_default with `train.chunked_loss=false`: the model's whole logits, then the loss (the
           default computes the LM head and loss chunk by chunk of target positions; at this vocabulary one
           chunk holds a whole micro-batch).
  dt_chunk_256  dt_default with `train.ce_chunk_tokens=256`: the head and loss really run in chunks, each
           chunk's logits recomputed in backward (what a 128k vocabulary gets by default).
  dt_flat  dist_tune with `data.padding_free=true` (and `train.target_logits_only=true`): the same micro-batches
           as dt, concatenated without padding (dist_tune's counterpart of hf_flat).

Data (`--data`): `mixed` (default) is benchmarks/mixed_data.py's deterministic 3000-row instruction file with
long-tailed lengths (bundled instructions plus a log-normal-length corpus context; ≈ 130–1024 tokens, median
≈ 250), written to a temp dir and read by every worker through data.path; max_length 1024. `bundled` is
bundled:instructions (short rows, ≈ 80–135 tokens); max_length 256. Both use the alpaca template with prompt
tokens masked. `--precision fp32|bf16` applies to every system: fp32 weights, with bf16 CPU autocast for bf16
(HF: TrainingArguments(bf16=True); dist_tune: engine.mixed_precision=bf16).

Timing (identical for all systems): wall clock from the end of optimizer step `--warmup` to the end of step
`--warmup + --steps` (HF: TrainerCallback.on_step_end; dist_tune: the return of Trainer.train_step). It covers
everything a steady-state step does (data loading, collation, forward, loss, backward, clipping, AdamW,
scheduler, the trainer's bookkeeping) and excludes process start, imports, tokenization, model build and the
warmup steps. Tokens = non-padding tokens of the micro-batches processed in the timed steps (attention_mask==1,
or every token of a batch without attention_mask; padding is not counted). Threads: torch.set_num_threads(--threads)
in every worker, OMP_NUM_THREADS/MKL_NUM_THREADS set to the same value for all workers.

Writes the JSON to --json-out (default benchmarks/results/throughput_cpu.json), appends a section to
--results-md (default benchmarks/RESULTS.md), and prints a markdown table and the JSON to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, git_commit, write_report

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("hf", "hf_flat", "dt_all_logits", "dt", "dt_flat", "dt_pack", "dt_default", "dt_whole_logits",
           "dt_chunk_256")
LABELS = {"hf": "HF transformers.Trainer (pad to longest)",
          "hf_flat": "HF Trainer + DataCollatorWithFlattening (padding-free)",
          "dt_all_logits": "dist_tune (pad to longest, train.target_logits_only=false)",
          "dt": "dist_tune (pad to longest)", "dt_flat": "dist_tune data.padding_free=true",
          "dt_pack": "dist_tune data.pack=true (packed rows)", "dt_default": "dist_tune defaults",
          "dt_whole_logits": "dist_tune defaults, train.chunked_loss=false",
          "dt_chunk_256": "dist_tune defaults, train.ce_chunk_tokens=256"}
DT_OVERRIDES = {"dt": {"data.padding_free": False},
                "dt_all_logits": {"train.target_logits_only": False, "data.padding_free": False},
                "dt_pack": {"data.pack": True}, "dt_flat": {"data.padding_free": True, "train.target_logits_only": True},
                "dt_default": {}, "dt_whole_logits": {"train.chunked_loss": False},
                "dt_chunk_256": {"train.ce_chunk_tokens": 256}}
SAME_BATCHES = ("hf", "hf_flat", "dt_all_logits", "dt", "dt_flat", "dt_default", "dt_whole_logits", "dt_chunk_256")  # systems fed the same examples per step
DEFAULT_MAX_LENGTH = {"mixed": 1024, "bundled": 256}
BUNDLED = "bundled:instructions"
MIXED_SEED = 0
DATA_DESC = {"mixed": f"mixed: benchmarks/mixed_data.py (seed {MIXED_SEED}), the 3000 bundled instructions in a "
                      "seeded order, each with an `input` context cut from bundled:text to LogNormal(median 120 "
                      "tokens, sigma 0.9) tokens, examples capped at 1024 tokens",
             "bundled": f"bundled: {BUNDLED}"}
LR, WEIGHT_DECAY, BETAS, EPS, MAX_GRAD_NORM, SEED = 3e-4, 0.01, (0.9, 0.999), 1e-8, 1.0, 42


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing starts")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, help="data.max_length (default 1024 for --data mixed, 256 for bundled)")
    p.add_argument("--data", choices=("mixed", "bundled"), default="mixed",
                   help="mixed: generated long-tailed instruction file (benchmarks/mixed_data.py); "
                        "bundled: bundled:instructions")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="every system: fp32, or fp32 weights with bf16 CPU autocast")
    p.add_argument("--preset", default="small-llama", help="dist_tune model preset (dist_tune.models.PRESETS)")
    p.add_argument("--which", default="hf,hf_flat,dt,dt_flat",
                   help=f"comma list of {', '.join(SYSTEMS)} (run in this order)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of --which (use an odd number); each system's median round is reported")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads in every worker")
    p.add_argument("--hf-optim", choices=("same", "default"), default="same",
                   help="same: HF gets torch AdamW(foreach=True) like dist_tune; default: HF's default optim")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "throughput_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"),
                   help="markdown file a section is appended to ('' = none)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--data-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_length is None:
        args.max_length = DEFAULT_MAX_LENGTH[args.data]
    args.systems = [s.strip() for s in args.which.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        p.error(f"--which: unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1 (timing starts at the end of a warmup step)")
    return args


# --------------------------------------------------------------------------------------------- workers
def dt_config(args: argparse.Namespace, overrides: dict, output_dir: str):
    from dist_tune.config import load_config

    return load_config(None, {
        "model.name_or_path": args.preset, "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.path": args.data_path, "data.format": "instruction", "data.prompt_template": "alpaca",
        "data.max_length": args.max_length, "data.validation_split": 0.0,
        "data.num_workers": 0, "data.pin_memory": False, "data.cache_dir": dataset_cache(args.data_path),
        "engine.kind": "single", "engine.mixed_precision": args.precision,
        "optim.name": "adamw", "optim.lr": LR, "optim.weight_decay": WEIGHT_DECAY, "optim.betas": list(BETAS),
        "optim.eps": EPS, "optim.scheduler": "cosine", "optim.warmup_steps": 0, "optim.max_grad_norm": MAX_GRAD_NORM,
        "train.seed": SEED, "train.micro_batch_size": args.micro_batch, "train.grad_accum": 1,
        "train.max_steps": args.warmup + args.steps, "train.eval_steps": None, "train.device": "cpu",
        "train.output_dir": output_dir, "train.run_name": "bench", "train.resume": "none",
        "log.log_steps": 10 ** 9, "log.progress": False, "log.jsonl": True, "log.plot": False,
        "log.wandb.mode": "disabled", "checkpoint.save_steps": None, "checkpoint.save_final": False,
        **overrides,
    })


def dataset_cache(data_path: str) -> str | None:
    """Tokenized-data cache of a generated file: next to it in the driver's temp dir (dropped with it); the
    default cache for bundled data."""
    return None if data_path.startswith("bundled:") else str(Path(data_path).with_suffix(".cache"))


class StepClock:
    """Per optimizer step: wall-clock time at its end, non-padding tokens, padded tokens, examples, loss."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.examples: list[int] = []
        self.losses: list[float] = []
        self.compute: list[float] = []

    def result(self, warmup: int, steps: int) -> dict:
        if len(self.ends) < warmup + steps:
            raise RuntimeError(f"only {len(self.ends)} steps were recorded, expected {warmup + steps}")
        timed = slice(warmup, warmup + steps)
        seconds = self.ends[warmup + steps - 1] - self.ends[warmup - 1]
        tokens, padded, examples = sum(self.tokens[timed]), sum(self.padded[timed]), sum(self.examples[timed])
        return {"timed_steps": steps, "timed_seconds": seconds, "timed_tokens": tokens,
                "timed_padded_tokens": padded, "timed_examples": examples,
                "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds,
                "steps_per_s": steps / seconds, "padding_fraction": 1 - tokens / max(padded, 1),
                "compute_seconds": sum(self.compute[timed]),
                "step_seconds": [b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:warmup + steps])],
                "tokens_per_step": self.tokens, "loss_first": self.losses[0], "loss_last": self.losses[-1],
                "losses": self.losses}


def batch_stats(batch: dict) -> tuple[int, int, int]:
    """(non-padding tokens, padded tokens, examples) of one collated micro-batch. Without an attention_mask
    (flattened batches) every token is real; with position_ids, examples are the positions 0 on real tokens."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else ids.numel()
    if "position_ids" not in batch:
        return tokens, ids.numel(), ids.shape[0]
    starts = batch["position_ids"] == 0
    if mask is not None:
        starts &= mask.bool()
    return tokens, ids.numel(), int(starts.sum())


def run_dt(args: argparse.Namespace, workdir: str) -> dict:
    """dist_tune's own entry point, `dist_tune.run.train(cfg)` (what `dist-tune train` runs), with
    Trainer.train_step wrapped to timestamp the end of every optimizer step."""
    from dist_tune import run
    from dist_tune.trainer import Trainer

    cfg = dt_config(args, DT_OVERRIDES[args.worker], workdir)
    clock = StepClock()
    seen: dict = {}
    real_step = Trainer.train_step

    def timed_step(self, micro_batches, problem=None):
        start = time.perf_counter()
        result = real_step(self, micro_batches, problem)
        end = time.perf_counter()
        stats = [batch_stats(b) for b in micro_batches]
        clock.ends.append(end)
        clock.compute.append(end - start)
        clock.tokens.append(sum(s[0] for s in stats))
        clock.padded.append(sum(s[1] for s in stats))
        clock.examples.append(sum(s[2] for s in stats))
        clock.losses.append(result.loss)
        assert clock.tokens[-1] == result.tokens, (clock.tokens[-1], result.tokens)
        seen.update(rows=len(self.batches.loader.dataset), optimizer=self.engine.optimizer)
        return result

    Trainer.train_step = timed_step  # this worker process runs nothing else
    try:
        run.train(cfg)
    finally:
        Trainer.train_step = real_step
    out = clock.result(args.warmup, args.steps)
    out["rows"] = seen["rows"]
    out["optimizer"] = f"{type(seen['optimizer']).__name__} foreach={seen['optimizer'].defaults.get('foreach')}"
    return out


def hf_collator(tokenizer, flat: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if flat:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100, return_tensors="pt")
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")


def run_hf(args: argparse.Namespace, workdir: str) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dist_tune.data.pipeline import build_datasets
    from dist_tune.data.sampler import ResumableSampler
    from dist_tune.models import load_model, load_tokenizer

    cfg = dt_config(args, {}, workdir)
    tokenizer = load_tokenizer(cfg)
    tokenizer.padding_side = "right"  # dist_tune pads right
    train_set, _ = build_datasets(cfg, tokenizer)
    model = load_model(cfg, tokenizer, device="cpu")
    clock = StepClock()
    pending = {"tokens": 0, "padded": 0, "examples": 0, "loss": 0.0, "begin": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            pending["begin"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            end = time.perf_counter()
            clock.ends.append(end)
            clock.compute.append(end - pending["begin"])
            clock.tokens.append(pending["tokens"])
            clock.padded.append(pending["padded"])
            clock.examples.append(pending["examples"])
            clock.losses.append(pending["loss"])
            pending.update(tokens=0, padded=0, examples=0, loss=0.0)

    class BenchTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return ResumableSampler(len(dataset), shuffle=True, seed=SEED, rank=0, world_size=1, drop_last=True)

        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens, padded, examples = batch_stats(inputs)
            pending["tokens"] += tokens
            pending["padded"] += padded
            pending["examples"] += examples
            loss = super().training_step(model, inputs, num_items_in_batch)
            pending["loss"] += float(loss)
            return loss

    targs = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps, learning_rate=LR, weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, lr_scheduler_type="cosine", warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM, seed=SEED, use_cpu=True, bf16=args.precision == "bf16", fp16=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, dataloader_drop_last=True,
        remove_unused_columns=False)
    optim = (torch.optim.AdamW, {"lr": LR, "betas": BETAS, "eps": EPS, "foreach": True}) \
        if args.hf_optim == "same" else None
    trainer = BenchTrainer(model=model, args=targs, train_dataset=train_set, processing_class=tokenizer,
                           data_collator=hf_collator(tokenizer, args.worker == "hf_flat"),
                           callbacks=[Clock()], optimizer_cls_and_kwargs=optim)
    trainer.train()
    out = clock.result(args.warmup, args.steps)
    out["rows"] = len(train_set)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    out["optimizer"] = f"{type(inner).__name__} foreach={inner.defaults.get('foreach')} fused=" \
        f"{inner.defaults.get('fused')} (--hf-optim {args.hf_optim})"
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.worker}-") as workdir:
        out = run_hf(args, workdir) if args.worker.startswith("hf") else run_dt(args, workdir)
    out.update(system=args.worker, torch_threads=torch.get_num_threads())
    Path(args.result_file).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------- driver
def versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers

    import dist_tune

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "dist_tune": f"{dist_tune.__version__} @ {git_commit()}"}


def device_info(threads: int) -> dict:
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": default_threads(),
            "torch_threads": threads, "platform": platform.platform()}


def worker_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


def run_worker(args: argparse.Namespace, system: str, data_path: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-result-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system, "--result-file", str(result_file),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch),
               "--max-length", str(args.max_length), "--preset", args.preset, "--threads", str(args.threads),
               "--hf-optim", args.hf_optim, "--data", args.data, "--data-path", data_path,
               "--precision", args.precision]
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=worker_env(args.threads), capture_output=True, text=True,
                              timeout=args.timeout)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not result_file.exists():
            raise SystemExit(f"worker {system} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        out = json.loads(result_file.read_text())
    out.update(process_wall_seconds=wall, loadavg_1m_before=load_before[0], loadavg_1m_after=os.getloadavg()[0])
    print(f"  {system:8s} {out['tokens_per_s']:10.1f} tokens/s  ({out['timed_tokens']} tokens in "
          f"{out['timed_seconds']:.2f} s; process {wall:.1f} s; load {load_before[0]:.2f})", file=sys.stderr)
    return out


def prepare_data(args: argparse.Namespace, tmp: str) -> tuple[str, dict]:
    """The data.path every worker reads (--data mixed: generated into tmp) and its length statistics."""
    from mixed_data import length_stats, write_mixed_instructions

    path = BUNDLED
    if args.data == "mixed":
        path = str(Path(tmp) / "mixed_instructions.jsonl")
        write_mixed_instructions(path, seed=MIXED_SEED)
    stats = length_stats(path, args.max_length)
    print(f"data {args.data}: tokens per example min {stats['min']}, median {stats['median']:.0f}, mean "
          f"{stats['mean']:.1f}, p90 {stats['p90']:.0f}, max {stats['max']} ({stats['rows']} rows)", file=sys.stderr)
    return path, stats


def run_rounds(args: argparse.Namespace, data_path: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s: [] for s in args.systems}
    for round_ in range(args.repeats):
        print(f"round {round_ + 1}/{args.repeats}", file=sys.stderr)
        for system in args.systems:
            runs[system].append(run_worker(args, system, data_path))
    return runs


def summarise(runs: list[dict]) -> dict:
    """The median round (the lower one of the middle two for an even count, so every column is one real run)."""
    tps = [r["tokens_per_s"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]
    keep = ("timed_steps", "timed_seconds", "timed_tokens", "timed_padded_tokens", "timed_examples",
            "padding_fraction", "examples_per_s", "steps_per_s", "compute_seconds", "rows", "optimizer",
            "loss_first", "loss_last")
    return {"tokens_per_s_median": median_run["tokens_per_s"], "tokens_per_s_runs": tps,
            "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            **{k: median_run[k] for k in keep},
            "step_s_median": sorted(median_run["step_seconds"])[len(median_run["step_seconds"]) // 2],
            "step_s_max": max(median_run["step_seconds"]), "runs": runs}


def same_batches(results: dict) -> bool | None:
    """Whether the systems of SAME_BATCHES that ran saw the same non-padding tokens per step (None if < 2 ran)."""
    steps = [results[s]["runs"][0]["tokens_per_step"] for s in SAME_BATCHES if s in results]
    return all(x == steps[0] for x in steps) if len(steps) > 1 else None


def table_rows(res: dict) -> list[str]:
    base = res.get("hf", {}).get("tokens_per_s_median")
    lines = [("| system | non-pad tokens/s (median) | runs | vs HF | examples/s | steps/s | step s median (max) | "
              "padding | tokens / timed steps | loss step 1 → last |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in res.items():
        ratio = f"{r['tokens_per_s_median'] / base:.2f}×" if base else "n/a"
        runs = ", ".join(f"{v:.0f}" for v in r["tokens_per_s_runs"])
        lines.append(f"| {LABELS[name]} | {r['tokens_per_s_median']:.1f} | {runs} | {ratio} | "
                     f"{r['examples_per_s']:.2f} | {r['steps_per_s']:.3f} | {r['step_s_median']:.3f} "
                     f"({r['step_s_max']:.3f}) | {100 * r['padding_fraction']:.1f}% | {r['timed_tokens']} / "
                     f"{r['timed_steps']} | {r['loss_first']:.4f} → {r['loss_last']:.4f} |")
    return lines


def data_line(s: dict) -> str:
    ls = s["data_lengths"]
    return (f"- data: {s['data_desc']}; alpaca template, prompt tokens masked, max_length {s['max_length']}; "
            f"tokens per example (bos + prompt + output + eos, after truncation): min {ls['min']}, median "
            f"{ls['median']:.0f}, mean {ls['mean']:.1f}, p90 {ls['p90']:.0f}, max {ls['max']} ({ls['rows']} rows)")


def notes(report: dict) -> list[str]:
    """The unit and the identical-batches check, as they apply to the systems that ran."""
    s, res, same = report["settings"], report["results"], report["identical_batches"]
    unit = (f"- unit: non-padding tokens (attention_mask==1; every token of a flattened row) per second over the "
            f"timed steps, wall clock from the end of step {s['warmup']} to the end of step "
            f"{s['warmup'] + s['steps']} (startup, tokenization and model build excluded).")
    if "dt_pack" in res:
        unit += " dt_pack rows hold several examples each, so its steps/s is not comparable; tokens/s is."
    lines = [unit]
    if same is not None:
        lines.append(f"- {', '.join(n for n in SAME_BATCHES if n in res)} saw identical micro-batches: {same}"
                     f"{' (same sampler permutation; per-step token counts equal)' if same else ''}")
    return lines


def markdown(report: dict) -> str:
    s, d, v = report["settings"], report["device"], report["versions"]
    compute = "bf16 CPU autocast" if s["precision"] == "bf16" else "fp32 compute"
    head = [f"### Throughput vs HF Trainer, {report['date']}",
            "",
            (f"- device: {d['cpu']}, {d['usable_cores']} usable cores ({d['logical_cores']} logical), "
             f"torch threads {d['torch_threads']} in every worker; {d['platform']}"),
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            data_line(s),
            f"- precision: {s['precision']} for every system (fp32 weights, {compute})",
            "- systems: " + ", ".join(f"{name} = {LABELS[name]}" for name in s["which"]),
            (f"- settings: preset {s['preset']} (sdpa, seed {SEED}), micro-batch {s['micro_batch']} examples, "
             f"1 process, AdamW lr {LR} wd {WEIGHT_DECAY} (HF optimizer: {s['hf_optim']}), cosine, clip "
             f"{MAX_GRAD_NORM}; {s['warmup']} warmup steps untimed, {s['steps']} timed steps; "
             f"{s['repeats']} round(s) in the order {', '.join(s['which'])}"),
            *notes(report),
            f"- 1-minute load average before the first worker: {report['loadavg_1m_start']:.2f}",
            ""]
    ratio = report.get("ratio_dt_flat_vs_hf_flat")
    tail = [] if ratio is None else [
        "", f"dt_flat vs hf_flat (both padding-free, same micro-batches): {ratio:.2f}× the non-padding tokens/s."]
    return "\n".join(head + table_rows(report["results"]) + tail) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    load_start = os.getloadavg()[0]
    if load_start > 0.25 * default_threads():
        print(f"WARNING: 1-minute load average is {load_start:.2f} on {default_threads()} cores: other processes "
              "compete for the CPU and torch's OpenMP threads slow down erratically; the numbers will not be "
              "representative (the load is recorded in the results)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data_path, lengths = prepare_data(args, tmp)
        runs = run_rounds(args, data_path)
    results = {s: summarise(r) for s, r in runs.items()}
    tps = {s: r["tokens_per_s_median"] for s, r in results.items()}
    report = {
        "benchmark": "throughput_vs_hf", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": device_info(args.threads), "versions": versions(),
        "settings": {"preset": args.preset, "max_length": args.max_length, "micro_batch": args.micro_batch,
                     "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "which": args.systems,
                     "threads": args.threads, "hf_optim": args.hf_optim, "dtype": "fp32",
                     "precision": args.precision, "processes": 1, "data": args.data,
                     "data_desc": DATA_DESC[args.data], "data_lengths": lengths, "template": "alpaca",
                     "seed": SEED},
        "unit": "non-padding tokens per second (attention_mask==1, or every token of a flattened row) over the "
                "timed steps",
        "loadavg_1m_start": load_start, "identical_batches": same_batches(results),
        "results": results,
        "ratio_vs_hf": {s: v / tps["hf"] for s, v in tps.items() if "hf" in tps and s != "hf"},
    }
    if "dt_flat" in tps and "hf_flat" in tps:
        report["ratio_dt_flat_vs_hf_flat"] = tps["dt_flat"] / tps["hf_flat"]
    write_report(report, markdown(report), args.json_out, args.results_md)
    summary = {k: v for k, v in report.items() if k != "results"}
    summary["results"] = {s: {k: v for k, v in r.items() if k != "runs"} for s, r in results.items()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
