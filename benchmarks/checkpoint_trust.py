"""What checking a checkpoint before loading it costs, on a ~1B-parameter FSDP checkpoint (CPU/gloo, 2 ranks).

    python benchmarks/checkpoint_trust.py            # TinyLlama's 1.1B shape, full tuning: ~11 GB of checkpoint

It trains one step of the host-memory benchmark's checkpoint (benchmarks/host_memory.py, written once to --cache)
with FSDP full tuning at world size 2 and saves a checkpoint (model and AdamW state), then times, in this process:
the pickle check of every file (what every rank does: DCP's metadata and byte items, the RNG files) and each
rank's share of the SHA-256 verification (each rank hashes every second file; they run in parallel). It then
resumes that checkpoint for one more step twice, with `checkpoint.verify` true and false, and reports both wall
times: their difference is what verification adds to a resume, next to the resume itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, git_commit, write_report
from host_memory import checkpoint as write_checkpoint
from memory_per_engine import free_port

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=0)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dist_tune_host_memory"))
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_trust_cpu.json"))
    p.add_argument("--results-md", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    return p.parse_args(argv)


def train(args: argparse.Namespace, model: Path, name: str, *extra: str) -> float:
    """One `dist-tune train` under torchrun (2 ranks, FSDP full, bf16, 2 steps unless `extra` says otherwise);
    its wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dist_tune.cli", "train", f"--model.name_or_path={model}",
           "--data.path=bundled:text", "--data.format=text", "--data.max_length=64", "--data.validation_split=0",
           "--model.dtype=bfloat16",
           "--engine.mixed_precision=bf16", "--engine.kind=fsdp", "--peft.method=full", "--train.micro_batch_size=1",
           "--train.max_steps=2", "--checkpoint.save_final=false", "--train.device=cpu",
           f"--train.output_dir={Path(args.cache) / 'runs'}", f"--train.run_name={name}", "--train.eval_steps=null",
           "--log.wandb.mode=disabled", "--log.progress=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"training failed: {(proc.stderr or proc.stdout).splitlines()[-1]}")
    return time.time() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> tuple[dict, str]:
    from dist_tune import checkpoint as ckpt
    from dist_tune import checkpoint_trust as trust

    model = write_checkpoint(args)
    for old in (Path(args.cache) / "runs").glob("checkpoint-trust*"):
        shutil.rmtree(old)
    first = train(args, model, "checkpoint-trust", "--train.max_steps=1", "--checkpoint.save_steps=1",
                  "--train.resume=none")
    path = ckpt.latest_checkpoint(Path(args.cache) / "runs" / "checkpoint-trust")
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    pickles = timed(lambda: trust.check_pickles(path))
    shares = [timed(lambda r=r: ckpt.checked_share(path, True, r, 2)) for r in range(2)]
    resumed = {verify: train(args, model, f"checkpoint-trust-resume-{verify}", f"--train.resume={path}",
                             f"--checkpoint.verify={str(verify).lower()}", "--checkpoint.save_steps=null")
               for verify in (True, False)}
    report = {"cpu": cpu_model(), "commit": git_commit(), "checkpoint_bytes": size, "files": len(list(path.rglob("*"))),
              "first_run_s": first, "pickle_check_s": pickles, "verify_share_s": shares,
              "resume_s": {"verify": resumed[True], "no_verify": resumed[False]}}
    header = (f"### Checkpoint checks before loading (CPU/gloo, FSDP full, 2 ranks), "
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n\n"
              f"Checkpoint of {args.hidden} hidden × {args.layers} layers (model + AdamW state): {size / 2**30:.2f} GiB "
              f"in {report['files']} files. {cpu_model()}, commit {git_commit()}. "
              f"`python benchmarks/checkpoint_trust.py {' '.join(sys.argv[1:])}`\n\n"
              "| pickle check (every rank) s | SHA-256 share rank 0 / rank 1 s | resume, verify on s | resume, verify "
              "off s |\n| --- | --- | --- | --- |\n")
    line = (f"| {pickles:.2f} | {shares[0]:.2f} / {shares[1]:.2f} | {resumed[True]:.1f} | {resumed[False]:.1f} |\n")
    return report, header + line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report, table = measure(args)
    write_report(report, table, args.json_out, args.results_md)


if __name__ == "__main__":
    main()
