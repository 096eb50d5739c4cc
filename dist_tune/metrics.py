"""Observability: FLOPs/MFU, memory, metric sinks (console, JSONL, W&B), loss plot, run report, rank-aware logging.

Metric keys are namespaced: "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
"train/samples_per_s", "train/mfu", "train/data_wait_s", "train/compute_s", "train/peak_mem_gib" and
"train/peak_reserved_gib" (CUDA) or "train/peak_rss_gib" (CPU), "train/host_rss_gib", and "eval/loss",
"eval/perplexity", "eval/accuracy", "eval/f1".
A metric that cannot be measured (e.g. MFU without a known peak) is left out, never logged as 0.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from dist_tune.config import Config, WandbConfig, qlora_compute_dtype
from dist_tune.errors import UserError

log = logging.getLogger("dist_tune")

FLOPS_FORMULA_FULL = "6*N_body + 6*N_head*(logit positions/token) + 12*L*H*S (full)"
FLOPS_FORMULA_PEFT = ("4*N_body + 2*N_body_trainable + (4*N_head + 2*N_head_trainable)*(logit positions/token)"
                      " + 12*L*H*S (peft)")
PEAK_FLOPS_ENV = "DIST_TUNE_PEAK_FLOPS"
JSONL_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "loss.png"
WANDB_ID_NAME = "wandb_run_id"
WANDB_INIT_TIMEOUT_S = 10.0  # wandb.init waits this long for the server; its login check can add about 10 s
WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")
GIB = 2**30

# Dense (non-sparse) peak FLOP/s per device; fp32 is the non-tensor-core rate. The longest matching name wins.
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
)
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True)
class FlopsModel:
    """What the training FLOPs of one token depend on (PaLM / torchtitan accounting).

    body: parameters applied at every token; an untied input embedding is a lookup and is left out.
    head: the LM head, applied only where logits are computed (a tied embedding is counted once, here).
    Per token: forward 2N and activation gradients 2N over all weights, weight gradients 2N over trainable ones
    only (frozen peft weights need none), plus attention scores/values 12·L·H·S (QK^T and AV: 4LHS forward,
    8LHS backward; no weights), S the mean example length (padding-free rows keep examples apart).
    """
    body: int
    body_trainable: int
    head: int
    head_trainable: int
    n_layers: int
    hidden: int

    def per_token(self, seq_len: float, logit_positions_per_token: float) -> float:
        body = 4 * self.body + 2 * self.body_trainable
        head = (4 * self.head + 2 * self.head_trainable) * logit_positions_per_token
        return float(body + head + 12 * self.n_layers * self.hidden * seq_len)


def compute_dtype(cfg: Config) -> str:
    """The dtype the matmuls run in: engine.mixed_precision when bf16/fp16, else model.dtype, or for a QLoRA
    base its compute dtype (config.qlora_compute_dtype)."""
    if cfg.engine.mixed_precision in ("bf16", "fp16"):
        return cfg.engine.mixed_precision
    dtype = qlora_compute_dtype(cfg) if cfg.peft.load_in_4bit else cfg.model.dtype
    return _DTYPE_ALIASES.get(dtype, dtype)


def peak_flops_per_device(device: torch.device, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device for `dtype` ("bf16"/"bfloat16", "fp16", "fp32"), or None if unknown.

    The DIST_TUNE_PEAK_FLOPS environment variable (FLOP/s per device) overrides the table, on any device.
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise UserError(f"{PEAK_FLOPS_ENV}={override!r} is not a number; set it to FLOP/s per device, e.g. 989e12") from None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [(pattern, peaks) for pattern, peaks in _PEAK_FLOPS if pattern in name]
    if not matches:
        warn_once(f"unknown GPU {name!r}: MFU is not reported; set {PEAK_FLOPS_ENV} to its peak FLOP/s")
        return None
    _, peaks = max(matches, key=lambda match: len(match[0]))
    return peaks.get(_DTYPE_ALIASES.get(dtype, dtype))


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]; `tokens_per_s` is the global rate over all `world_size` devices."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def host_rss_gib() -> float | None:
    """This process's current resident set size in GiB (Linux /proc/self/statm), or None where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / GIB


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Memory under honest keys: on CUDA the peak allocated and reserved since the last reset_peak_memory
    ("train/peak_mem_gib", "train/peak_reserved_gib"), on CPU the process's lifetime peak RSS
    ("train/peak_rss_gib"), and everywhere the current host RSS ("train/host_rss_gib"), which offload fills."""
    out = {}
    if device.type == "cuda":
        out["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["train/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    elif device.type == "cpu":
        out["train/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    rss = host_rss_gib()
    if rss is not None:
        out["train/host_rss_gib"] = rss
    return out


def peak_host_rss_per_rank() -> list[float]:
    """Every rank's lifetime peak host RSS in GiB (ru_maxrss: model load, training and final save included), in
    rank order. Collective."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    if not (dist.is_available() and dist.is_initialized()):
        return [peak]
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    return peaks


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on CUDA (ru_maxrss on CPU cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_base_record_factory = logging.getLogRecordFactory()
_handler: logging.Handler | None = None


def rank_logging(rank: int) -> None:
    """Prefix every log record with "[rank N]" and log to stderr: INFO on rank 0, WARNING and above elsewhere."""
    global _handler

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = _base_record_factory(*args, **kwargs)
        record.msg = f"[rank {rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(_handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


@functools.cache
def warn_once(msg: str) -> None:
    """Log `msg` as a warning the first time it is seen in this process."""
    log.warning(msg)


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per call ({"step", "time", **metrics}) and flushes it."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _env_wandb_mode() -> str | None:
    """WANDB_MODE, or None when unset; an empty value counts as unset and is removed (wandb rejects it)."""
    value = os.environ.get("WANDB_MODE")
    if value == "":
        del os.environ["WANDB_MODE"]
        return None
    if value is not None and value not in WANDB_ENV_MODES:
        raise UserError(f"WANDB_MODE={value!r} is not a W&B mode; set it to online, offline or disabled, or unset it")
    return value


def wandb_mode(mode: str) -> str:
    """Resolve "auto": WANDB_MODE when set, else "online" when WANDB_API_KEY is set, else "offline"; other modes
    pass through."""
    env = _env_wandb_mode()
    if mode != "auto":
        return mode
    return env or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _init_wandb(mode: str, **kwargs: Any):
    import wandb

    return wandb.init(mode=mode, settings=wandb.Settings(console="off", init_timeout=WANDB_INIT_TIMEOUT_S), **kwargs)


def start_wandb_run(mode: str, **kwargs: Any):
    """wandb.init(mode, **kwargs), never fatal: a run that cannot start online (no network, server down, bad key)
    falls back to offline within about WANDB_INIT_TIMEOUT_S + 10 s, with one warning giving the `wandb sync`
    command; one that cannot start at all gives a warning and None."""
    try:
        return _init_wandb(mode, **kwargs)
    except Exception as error:
        reason = _one_line(error)
    if mode != "offline":
        try:
            import wandb

            wandb.teardown()  # the failed run's service still holds its id
            run = _init_wandb("offline", **kwargs)
        except Exception as error:
            reason += f"; offline: {_one_line(error)}"
        else:
            log.warning("W&B unreachable (%s); logging offline instead, upload later with `wandb sync %s`",
                        reason, Path(run.dir).parent)
            return run
    log.warning("W&B could not start (%s); continuing without W&B", reason)
    return None


class WandbSink:
    """A W&B run under run_dir/wandb; the run id is kept in run_dir/wandb_run_id so a resumed run continues it.

    W&B never stops training: see start_wandb_run; a failing log call turns the sink off with one warning."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]):
        self._run = None
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return
        id_file = Path(run_dir) / WANDB_ID_NAME
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._run = start_wandb_run(
            mode, project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).name, tags=cfg.tags,
            group=cfg.group, dir=str(run_dir), config=config, id=run_id, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics, step=step)
        except Exception as error:
            log.warning("W&B logging failed at step %d (%s); continuing without W&B", step, _one_line(error))
            run, self._run = self._run, None
            with contextlib.suppress(Exception):
                run.finish()

    def close(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as error:
            log.warning("W&B could not finish its run (%s); its files are under %s", _one_line(error),
                        Path(run.dir).parent)


_POSTFIX = (("train/loss", "loss"), ("train/lr", "lr"), ("train/tokens_per_s", "tok/s"))


def _format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    return f"step {step}/{total} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class ConsoleSink:
    """A tqdm bar over optimizer steps (postfix loss, lr, tok/s; ETA from tqdm) with eval lines written above it.

    Disabled (no bar, e.g. batch jobs), every logged step is printed as one line instead.
    """

    def __init__(self, total_steps: int, enabled: bool, *, initial: int = 0):
        self._total = total_steps
        self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True) if enabled else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is None:
            tqdm.write(_format_line(step, self._total, metrics))
            return
        self._bar.update(max(step - self._bar.n, 0))
        postfix = {label: f"{metrics[key]:.4g}" for key, label in _POSTFIX if key in metrics}
        if postfix:
            self._bar.set_postfix(postfix)
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            self._bar.write(_format_line(step, self._total, evals))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; blank or torn lines (a crash mid-write) are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def _rewind_jsonl(path: Path, start_step: int) -> None:
    """Drop records logged after `start_step` (work lost since the checkpoint we resume from) and torn lines."""
    if path.exists():
        kept = [r for r in read_jsonl(path) if r["step"] <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


class MetricsLogger:
    """Fans metrics out to the configured sinks on rank 0; a no-op on other ranks."""

    def __init__(self, cfg: Config, run_dir: Path, *, rank: int, total_steps: int, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self._cfg = cfg.log
        self._sinks: list[Sink] = []
        self._open = rank == 0
        if not self._open:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.log.jsonl:
            path = self.run_dir / JSONL_NAME
            _rewind_jsonl(path, start_step)
            self._sinks.append(JsonlSink(path))
        if wandb_mode(cfg.log.wandb.mode) != "disabled":
            self._sinks.append(WandbSink(cfg.log.wandb, self.run_dir, cfg.to_dict()))
        self._sinks.append(ConsoleSink(total_steps, cfg.log.progress, initial=start_step))  # last: ETA clock starts now

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log floats (tensors/numpy scalars are converted); None values are dropped, meaning "not measured"."""
        if not self._sinks:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        for sink in self._sinks:
            sink.log(step, clean)

    def close(self, summary: dict[str, Any]) -> None:
        """Close sinks, write summary.json, then (from metrics.jsonl) render loss.png and print the run report."""
        if not self._open:
            return
        self._open = False
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()
        (self.run_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if self._cfg.jsonl:
            if self._cfg.plot:
                plot_run(self.run_dir)
            tqdm.write(report(self.run_dir))


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def _load_records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / JSONL_NAME
    if not path.is_file():
        raise UserError(f"'{path}' not found; pass a run directory written with log.jsonl=true")
    return read_jsonl(path)


def plot_run(run_dir: Path) -> Path:
    """Render run_dir/loss.png from metrics.jsonl: train and eval loss vs step, and lr vs step below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = _load_records(run_dir)
    fig = Figure(figsize=(8, 6), tight_layout=True)
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    loss_ax.plot(*_series(records, "train/loss"), label="train loss")
    loss_ax.plot(*_series(records, "eval/loss"), "o-", label="eval loss")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(Path(run_dir).name)
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(*_series(records, "train/lr"), color="tab:green")
    lr_ax.set_ylabel("lr")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    out = Path(run_dir) / PLOT_NAME
    fig.savefig(out, dpi=100)
    return out


_LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _last_best(records: list[dict[str, Any]], key: str) -> str | None:
    best = min if any(word in key for word in _LOWER_IS_BETTER) else max
    steps, values = _series(records, key)
    finite = [(v, s) for s, v in zip(steps, values) if math.isfinite(v)]
    if not finite:
        return None
    top_v, top_s = best(finite, key=lambda p: p[0])
    return f"last {_fmt(values[-1])} (step {steps[-1]}), best {_fmt(top_v)} (step {top_s})"


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s"


_MEMORY_LABELS = (("train/peak_mem_gib", "peak device memory allocated"),
                  ("train/peak_reserved_gib", "peak device memory reserved"),
                  ("train/peak_rss_gib", "peak host RSS"), ("train/host_rss_gib", "max logged host RSS"))


def report(run_dir: Path) -> str:
    """A readable summary table of a finished or interrupted run from metrics.jsonl (+ summary.json if present)."""
    run_dir = Path(run_dir)
    records = _load_records(run_dir)
    summary_path = run_dir / SUMMARY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    status = "finished" if summary is not None else "interrupted or running (no summary.json)"
    if not records:
        return f"run {run_dir} ({status}): no metrics logged"
    rows: list[tuple[str, str | None]] = [
        ("steps done", str(max(r["step"] for r in records))),
        ("train loss", _last_best(records, "train/loss")),
        ("eval loss", _last_best(records, "eval/loss")),
    ]
    for key in sorted({k for r in records for k in r if k.startswith("eval/") and k != "eval/loss"}):
        rows.append((key, _last_best(records, key)))
    lr, tps, mfus = (_series(records, k)[1] for k in ("train/lr", "train/tokens_per_s", "train/mfu"))
    rows += [
        ("final lr", _fmt(lr[-1]) if lr else None),
        ("mean tokens/s", _fmt(sum(tps) / len(tps)) if tps else None),
        ("mean MFU", f"{100 * sum(mfus) / len(mfus):.2f}%" if mfus else "n/a (peak FLOPs unknown)"),
    ]
    for key, label in _MEMORY_LABELS:
        values = _series(records, key)[1]
        if values:
            rows.append((label, f"{max(values):.2f} GiB"))
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    rows.append(("wall time (logged)", _duration(times[-1] - times[0]) if times else None))
    rows += [(k, str(v)) for k, v in (summary or {}).items() if isinstance(v, (str, int, float, bool))]
    width = max(len(label) for label, _ in rows)
    lines = [f"run {run_dir} ({status})"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows if value is not None]
    return "\n".join(lines)
