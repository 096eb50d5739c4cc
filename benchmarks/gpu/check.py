"""Prepared GPU check: runs each step in its own processes with a time limit, records every step as ok, skipped
or failed (with the tail of its log) and rewrites OUT/results.json and OUT/results.md after each one.
Start it through check.sh, which sets up the environment; `--help` lists the options."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, cpu_model, git_commit  # noqa: E402

PYTHON = sys.executable
TASKS = str(Path(__file__).with_name("tasks.py"))
PARITY_STEPS = 10
PARITY_RTOL = 1e-2
MFU_TARGET = 0.45
TAIL_LINES = 25
PROMPT = "Name three primary colors."


@dataclasses.dataclass(frozen=True)
class Profile:
    """Model shapes, sequence lengths and step counts of one mode of the check."""

    cuda: bool
    preset: str  # throughput, parity, padding-free and generation runs
    big_preset: str  # LoRA / QLoRA peak memory
    seq: int
    micro_batch: int
    steps: int  # per throughput/parity run; the first `warmup` are left out of tokens/s and MFU
    warmup: int
    mixed_rows: int
    mixed_median: int
    mixed_seq: int
    mixed_micro_batch: int
    mixed_steps: int
    memory_steps: int
    budget_s: float
    allowance_s: dict[str, float]


GPU = Profile(cuda=True, preset="llama-3.2-1b", big_preset="llama-3-8b", seq=2048, micro_batch=4, steps=20,
              warmup=5, mixed_rows=1000, mixed_median=120, mixed_seq=1024, mixed_micro_batch=8, mixed_steps=20,
              memory_steps=4, budget_s=470,
              allowance_s={"environment": 60, "gpu_tests": 120, "throughput": 120, "engine_parity": 180,
                           "padding_free": 150, "lora_memory": 150, "sharded_lora_memory": 180,
                           "chunked_loss_memory": 150, "qlora_memory": 150,
                           "generation": 60})
DRY = Profile(cuda=False, preset="tiny-llama", big_preset="tiny-llama", seq=128, micro_batch=4, steps=PARITY_STEPS,
              warmup=2, mixed_rows=200, mixed_median=40, mixed_seq=256, mixed_micro_batch=4, mixed_steps=6,
              memory_steps=3, budget_s=900,
              allowance_s={"environment": 60, "gpu_tests": 180, "throughput": 120, "engine_parity": 240,
                           "padding_free": 180, "lora_memory": 120, "sharded_lora_memory": 180,
                           "chunked_loss_memory": 120, "qlora_memory": 60,
                           "generation": 60})


class StepError(Exception):
    """A step's command failed or ran out of time; the message ends with the tail of its log."""


class Skip(Exception):
    """The step cannot run here; the message is the reason."""


@dataclasses.dataclass
class Run:
    """What a finished training run measured, from its metrics.jsonl (steps after the warmup for rates)."""

    losses: list[float]
    tokens_per_s: float
    mfu: float | None
    peaks: dict[str, float]


ERROR_LINE = re.compile(r"^((FAILED|ERROR) tests/|(E\s+)?[\w.]*(Error|Exception)\b(?<!ChildFailedError))")


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def key_line(text: str) -> str:
    """The line naming what went wrong: dist-tune's one-line error, else the last exception or failed-test line,
    else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cli_errors = [line for line in lines if line.startswith("dist-tune: error:")]
    exceptions = [line for line in lines if ERROR_LINE.match(line)]
    return (cli_errors or exceptions or lines or [""])[-1]


def median_after(records: list[dict], key: str, warmup: int) -> float | None:
    values = [r[key] for r in records if key in r]
    steady = values[warmup:] or values
    return statistics.median(steady) if steady else None


def read_run(run_dir: Path, warmup: int) -> Run:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/loss" in r]
    peaks = {k: max(r[k] for r in train if k in r) for k in sorted({k for r in train for k in r})
             if k.startswith("train/peak_")}
    return Run(losses=[r["train/loss"] for r in train], tokens_per_s=median_after(train, "train/tokens_per_s", warmup),
               mfu=median_after(train, "train/mfu", warmup), peaks=peaks)


def max_rel_diff(got: list[float], expected: list[float]) -> float:
    return max(abs(g - e) / abs(e) for g, e in zip(got, expected, strict=True))


def one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


class Check:
    """State shared by the steps: the profile, output and scratch folders, time limits and finished runs."""

    def __init__(self, profile: Profile, out: Path, scratch: Path):
        self.profile, self.out, self.scratch = profile, out, scratch
        self.deadline = time.monotonic() + profile.budget_s
        self.step_deadline = self.deadline
        self.runs: dict[str, Path | StepError] = {}
        self.files: dict[str, Path] = {}
        self.report = {"dry_run": not profile.cuda, "git_commit": git_commit(), "cpu": cpu_model(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}
        (out / "logs").mkdir(parents=True, exist_ok=True)

    # --- processes ------------------------------------------------------------
    def time_left(self) -> float:
        return min(self.deadline, self.step_deadline) - time.monotonic()

    def sh(self, cmd: list[str], log: str, ok_codes: tuple[int, ...] = (0,)) -> tuple[int, str]:
        """Run cmd in its own process group within the time left; (exit code, stdout); stderr goes to logs/LOG.log."""
        timeout = self.time_left()
        if timeout < 5:
            raise StepError(f"no time left for {log} (check budget {self.profile.budget_s:.0f} s)")
        err = self.out / "logs" / f"{log}.log"
        with open(err, "w") as stderr:
            stderr.write("$ " + " ".join(cmd) + "\n")
            stderr.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                    start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout)
                failure = None if proc.returncode in ok_codes else f"exited {proc.returncode}"
            except subprocess.TimeoutExpired:
                stop(proc)
                stdout, failure = "", f"timed out after {timeout:.0f} s"
        if failure:
            output = err.read_text(errors="replace") + stdout
            raise StepError(f"{log} {failure}: {key_line(output)}\n{tail(output)}")
        return proc.returncode, stdout

    def task(self, *args: str) -> dict:
        return json.loads(self.sh([PYTHON, TASKS, *args], f"task-{args[0]}")[1].strip().splitlines()[-1])

    def train(self, name: str, args: list[str], nproc: int = 0) -> Path:
        """`python3 -m dist_tune.cli train` once per name (under torchrun with nproc > 0); later calls reuse it."""
        if name not in self.runs:
            launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
                else [PYTHON]
            run_dir = self.scratch / "runs" / name
            try:
                self.sh([*launcher, "-m", "dist_tune.cli", "train", *args, f"--train.output_dir={run_dir.parent}",
                         f"--train.run_name={name}"], f"train-{name}")
                self.runs[name] = run_dir
                keep_metrics(run_dir, self.out / "runs" / name)
            except StepError as exc:
                self.runs[name] = exc
        if isinstance(self.runs[name], StepError):
            raise self.runs[name]
        return self.runs[name]

    # --- inputs ---------------------------------------------------------------
    def data_file(self, kind: str, seq: int | None = None) -> Path:
        """The dense long-text rows (of at least `seq` tokens, default the profile's) or the mixed-length
        instruction rows, written once."""
        seq = seq or self.profile.seq
        kind = f"{kind}-{seq}" if kind == "long-text" else kind
        if kind not in self.files:
            path = self.scratch / f"{kind}.jsonl"
            p = self.profile
            if kind.startswith("long-text"):
                self.task("long-text", str(path), str(p.micro_batch * (p.steps + 1)), str(seq + 64))
            else:
                self.task("mixed-data", str(path), str(p.mixed_rows), str(p.mixed_median), str(p.mixed_seq))
            self.files[kind] = path
        return self.files[kind]

    def base_model(self) -> Path:
        if "base" not in self.files:
            path = self.scratch / f"{self.profile.big_preset}-bf16"
            self.task("save-base", self.profile.big_preset, str(path))
            self.files["base"] = path
        return self.files["base"]

    def common_args(self) -> list[str]:
        return ["--log.progress=false", "--log.wandb.mode=disabled", "--log.log_steps=1", "--log.plot=false",
                "--checkpoint.save_steps=null", "--checkpoint.save_final=false", "--data.validation_split=0",
                "--optim.scheduler=constant", "--optim.warmup_steps=0", "--optim.lr=1e-4", "--train.seed=0",
                "--engine.mixed_precision=bf16", f"--data.cache_dir={self.scratch / 'cache'}"]

    def dense_args(self) -> list[str]:
        """Full tuning on rows that all fill data.max_length: no padding, plain causal attention."""
        p = self.profile
        return [*self.common_args(), f"--model.name_or_path={p.preset}", "--model.dtype=float32",
                f"--data.path={self.data_file('long-text')}", "--data.format=text", f"--data.max_length={p.seq}",
                "--data.pack=false", "--data.padding_free=false", f"--train.micro_batch_size={p.micro_batch}",
                f"--train.max_steps={p.steps}"]

    def mixed_args(self, padding_free: bool) -> list[str]:
        p = self.profile
        return [*self.common_args(), f"--model.name_or_path={p.preset}", "--model.dtype=float32",
                f"--data.path={self.data_file('mixed')}", "--data.format=instruction",
                "--data.prompt_template=alpaca", f"--data.max_length={p.mixed_seq}", "--data.pack=false",
                f"--data.padding_free={str(padding_free).lower()}", f"--train.micro_batch_size={p.mixed_micro_batch}",
                f"--train.max_steps={p.mixed_steps}"]

    def memory_args(self, qlora: bool, seq: int | None = None) -> list[str]:
        p = self.profile
        seq = seq or p.seq
        return [*self.common_args(), f"--model.name_or_path={self.base_model()}", "--model.dtype=bfloat16",
                "--peft.method=lora", f"--peft.load_in_4bit={str(qlora).lower()}",
                "--engine.activation_checkpointing=true", f"--data.path={self.data_file('long-text', seq)}",
                "--data.format=text", f"--data.max_length={seq}", "--data.pack=false", "--data.padding_free=false",
                "--train.micro_batch_size=1", f"--train.max_steps={p.memory_steps}"]

    # --- steps ----------------------------------------------------------------
    def step(self, name: str, fn) -> dict:
        """Run one step within its allowance; any error becomes a failed record, never an abort."""
        start = time.monotonic()
        self.step_deadline = start + self.profile.allowance_s[name]
        print(f"== {name}", flush=True)
        try:
            if self.deadline - start < 5:
                raise Skip(f"the check's budget of {self.profile.budget_s:.0f} s was spent before this step")
            result = fn(self)
        except Skip as exc:
            result = {"status": "skipped", "reason": str(exc)}
        except StepError as exc:
            result = {"status": "failed", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a broken step must not stop the others
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result = {"status": "ok", **result, "seconds": round(time.monotonic() - start, 1)}
        self.report["steps"][name] = result
        write_results(self.out, self.report)
        print(f"   {result['status']}: {row_text(result)} ({result['seconds']} s)", flush=True)
        return result


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun and its workers), SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def keep_metrics(run_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "summary.json", "config.yaml"):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, dest / name)


# --- the steps, in order -------------------------------------------------------------------------------------
def environment(c: Check) -> dict:
    info = c.task("probe")
    versions = c.report["versions"] = info.pop("versions")
    c.report["gpu"] = info["gpu"]
    for name, version in versions.items():
        print(f"   {name:<16} {version or 'not installed'}")
    print(f"   {'gpu':<16} {info['gpu'] or 'none'}")
    problems = info["problems"]
    if c.profile.cuda and not info["cuda_available"]:
        problems.append("torch sees no CUDA device; run check.sh --dry-run on a machine without a GPU")
    for problem in problems:
        print(f"   PROBLEM: {problem}")
    status = "failed" if problems else "ok"
    summary = "; ".join(problems) or f"{info['gpu'] or 'CPU'}, torch {versions['torch']}"
    return {"status": status, **info, "summary": summary}


def gpu_tests(c: Check) -> dict:
    code, out = c.sh([PYTHON, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], "gpu-tests",
                     ok_codes=(0, 5))
    if code == 5:
        raise Skip("no tests are marked gpu")
    return {"summary": out.strip().splitlines()[-1]}


def throughput(c: Check) -> dict:
    if not c.profile.cuda:
        raise Skip("no CUDA")
    run = read_run(c.train("single", c.dense_args()), c.profile.warmup)
    mfu = f"MFU {100 * run.mfu:.1f} % (target ≥ {100 * MFU_TARGET:.0f} %)" if run.mfu is not None else "MFU n/a"
    return {"tokens_per_s": run.tokens_per_s, "mfu": run.mfu, "mfu_target_met": run.mfu is not None and
            run.mfu >= MFU_TARGET, "peaks_gib": run.peaks,
            "summary": f"{c.profile.preset} seq {c.profile.seq}: {run.tokens_per_s:,.0f} tokens/s, {mfu}"}


PARITY_ENGINES = {"fsdp": ["--engine.kind=fsdp"], "zero3": ["--engine.kind=deepspeed", "--engine.zero_stage=3"]}


def compare_engine(c: Check, name: str, single: Run) -> dict:
    """One engine at world size 1 against the single-device run: loss agreement and tokens/s overhead."""
    try:
        run = read_run(c.train(name, c.dense_args() + PARITY_ENGINES[name], nproc=1), c.profile.warmup)
    except StepError as exc:
        return {"agree": False, "error": str(exc), "line": f"{name}: {str(exc).splitlines()[0]}"}
    diff = max_rel_diff(run.losses[:PARITY_STEPS], single.losses[:PARITY_STEPS])
    overhead = 100 * (1 - run.tokens_per_s / single.tokens_per_s)
    verdict = "ok" if diff <= PARITY_RTOL else f"> {PARITY_RTOL:g}"
    return {"losses": run.losses[:PARITY_STEPS], "max_rel_diff": diff, "agree": diff <= PARITY_RTOL,
            "tokens_per_s": run.tokens_per_s, "overhead_pct": overhead,
            "line": f"{name}: loss rel diff {diff:.1e} ({verdict}), overhead {overhead:+.1f} % tokens/s"}


def engine_parity(c: Check) -> dict:
    single = read_run(c.train("single", c.dense_args()), c.profile.warmup)
    engines = {name: compare_engine(c, name, single) for name in PARITY_ENGINES}
    summary = f"first {PARITY_STEPS} losses vs single: " + "; ".join(e.pop("line") for e in engines.values())
    return {"status": "ok" if all(e["agree"] for e in engines.values()) else "failed",
            "single": {"losses": single.losses[:PARITY_STEPS], "tokens_per_s": single.tokens_per_s}, **engines,
            "summary": summary}


def padding_free_run(c: Check) -> Path:
    """The padding-free run; it keeps its final model for `generation`."""
    return c.train("padding_free", c.mixed_args(True) + ["--checkpoint.save_final=true"])


def padding_free(c: Check) -> dict:
    padded = read_run(c.train("padded", c.mixed_args(False)), c.profile.warmup)
    free = read_run(padding_free_run(c), c.profile.warmup)
    speedup = free.tokens_per_s / padded.tokens_per_s
    return {"padded_tokens_per_s": padded.tokens_per_s, "padding_free_tokens_per_s": free.tokens_per_s,
            "speedup": speedup, "first_loss": {"padded": padded.losses[0], "padding_free": free.losses[0]},
            "summary": f"{free.tokens_per_s:,.0f} vs {padded.tokens_per_s:,.0f} non-padding tokens/s "
                       f"({speedup:.2f}×), first loss {free.losses[0]:.4f} vs {padded.losses[0]:.4f}"}


def peaks_text(peaks: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('train/')} {v:.2f}" for k, v in peaks.items()) or "no peak logged"


def peak_summary(c: Check, run: Run, method: str) -> dict:
    return {"peaks_gib": run.peaks,
            "summary": f"{method} on {c.profile.big_preset} shape, micro-batch 1, seq {c.profile.seq}, activation "
                       f"checkpointing: {peaks_text(run.peaks)} GiB"}


def lora_memory(c: Check) -> dict:
    return peak_summary(c, read_run(c.train("lora", c.memory_args(qlora=False)), 0), "LoRA")


def sharded_lora_memory(c: Check) -> dict:
    """The LoRA memory run under FSDP and ZeRO-3 at world size 1 (issue 13's record: sharded load, gathered units,
    host RSS); an engine that fails is recorded with its error line and the other still runs."""
    peaks: dict[str, dict] = {}
    for name, engine in PARITY_ENGINES.items():
        try:
            peaks[name] = read_run(c.train(f"lora_{name}", c.memory_args(qlora=False) + engine, nproc=1), 0).peaks
        except StepError as exc:
            peaks[name] = {"error": key_line(str(exc))}
    lines = [f"{name}: {p.get('error') or peaks_text(p)}" for name, p in peaks.items()]
    return {"status": "failed" if any("error" in p for p in peaks.values()) else "ok", "peaks_gib": peaks,
            "summary": f"LoRA on {c.profile.big_preset} shape, world size 1: " + "; ".join(lines) + " GiB"}


def chunked_loss_memory(c: Check) -> dict:
    """One LoRA step on the big shape at 4 × the profile's sequence length (8192 on the GPU: 4.2 GB of fp32
    logits at Llama-3's vocabulary) with the LM head and loss chunked (the default) and with the whole logits."""
    seq = 4 * c.profile.seq
    peaks: dict[str, dict] = {}
    for name, chunked in (("chunked", "true"), ("whole_logits", "false")):
        args = c.memory_args(qlora=False, seq=seq) + [f"--train.chunked_loss={chunked}", "--train.max_steps=1"]
        try:
            peaks[name] = read_run(c.train(f"loss_{name}", args), 0).peaks
        except StepError as exc:
            peaks[name] = {"error": key_line(str(exc))}
    lines = [f"{name}: {p.get('error') or peaks_text(p)}" for name, p in peaks.items()]
    return {"status": "failed" if any("error" in p for p in peaks.values()) else "ok", "seq": seq,
            "peaks_gib": peaks,
            "summary": f"LoRA on {c.profile.big_preset} shape, seq {seq}, one step: " + "; ".join(lines) + " GiB"}


def qlora_memory(c: Check) -> dict:
    if not c.profile.cuda:
        raise Skip("no CUDA")
    try:
        c.sh([PYTHON, "-c", "import bitsandbytes"], "import-bitsandbytes")
    except StepError as exc:
        raise Skip(f"bitsandbytes is not importable: {key_line(str(exc))}") from None
    return peak_summary(c, read_run(c.train("qlora", c.memory_args(qlora=True)), 0), "QLoRA")


def generation(c: Check) -> dict:
    run = padding_free_run(c)
    start = time.monotonic()
    _, out = c.sh([PYTHON, "-m", "dist_tune.cli", "generate", str(run), "--prompt", PROMPT, "--max_new_tokens", "32"],
                  "generate")
    seconds = time.monotonic() - start
    return {"prompt": PROMPT, "text": out.strip(), "generate_s": seconds,
            "summary": f"32 new tokens in {seconds:.1f} s: {out.strip()[:60]!r}"}


STEPS = {"environment": environment, "gpu_tests": gpu_tests, "throughput": throughput,
         "engine_parity": engine_parity, "padding_free": padding_free, "lora_memory": lora_memory,
         "sharded_lora_memory": sharded_lora_memory, "chunked_loss_memory": chunked_loss_memory,
         "qlora_memory": qlora_memory, "generation": generation}


# --- report --------------------------------------------------------------------------------------------------
def row_text(result: dict) -> str:
    return one_line(result.get("summary") or result.get("reason") or result.get("error", "").split("\n")[0])


def results_table(report: dict) -> str:
    where = report.get("gpu") or "CPU dry run"
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items() if v)
    lines = [f"# GPU check: {where}", "", f"{report['started']}, commit {report['git_commit']}; {versions}", "",
             "| step | status | result | s |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {r['status']} | {row_text(r)} | {r['seconds']} |" for name, r in report["steps"].items()]
    return "\n".join(lines) + "\n"


def write_results(out: Path, report: dict) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(results_table(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepared GPU check of dist_tune (see benchmarks/README.md).")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, logs/, runs/")
    parser.add_argument("--dry-run", action="store_true", help="tiny-llama on the CPU: the same steps, in CI")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset (environment always runs)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check (GPU 470, dry run 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (run dirs, data, base model)")
    args = parser.parse_args(argv)
    profile = DRY if args.dry_run else GPU
    if args.budget:
        profile = dataclasses.replace(profile, budget_s=args.budget)
    wanted = ["environment", *(s for s in args.steps.split(",") if s and s != "environment")]
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    scratch = Path(tempfile.mkdtemp(prefix="dist_tune_gpu_check_"))
    check = Check(profile, args.out, scratch)
    start = time.monotonic()
    try:
        for name in wanted:
            result = check.step(name, STEPS[name])
            if name == "environment" and profile.cuda and not result.get("cuda_available"):
                break
    finally:
        check.report["wall_s"] = round(time.monotonic() - start, 1)
        write_results(args.out, check.report)
        if args.keep:
            print(f"scratch kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + results_table(check.report))
    print(f"results in {args.out}/results.json and results.md; logs in {args.out}/logs/")
    return int(any(r["status"] == "failed" for r in check.report["steps"].values()))


if __name__ == "__main__":
    sys.exit(main())
