"""Observability: FLOPs/MFU, memory, metric sinks (console, JSONL, W&B), loss plot, run report, rank-aware logging.

Metric keys are namespaced: "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
"train/samples_per_s", "train/mfu", "train/data_wait_s", "train/compute_s", "train/peak_mem_gib"
(or "train/peak_rss_gib" on CPU), and "eval/loss", "eval/perplexity", "eval/accuracy", "eval/f1".
A metric that cannot be measured (e.g. MFU without a known peak) is left out, never logged as 0.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import resource
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from dist_tune.config import Config, WandbConfig
from dist_tune.errors import UserError

log = logging.getLogger("dist_tune")

FLOPS_FORMULA_FULL = "6N+12LHS (full)"
FLOPS_FORMULA_PEFT = "4N+2N_trainable+12LHS (peft)"
PEAK_FLOPS_ENV = "DIST_TUNE_PEAK_FLOPS"
JSONL_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "loss.png"
WANDB_ID_NAME = "wandb_run_id"

# Dense (non-sparse) peak FLOP/s per device; fp32 is the non-tensor-core rate. First substring match wins.
_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("A10G", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
)
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def flops_per_token(*, n_params: int, n_trainable: int, n_layers: int, hidden: int, seq_len: int,
                    full_tuning: bool) -> float:
    """Training FLOPs per token (PaLM / torchtitan), N = n_params (non-embedding by PaLM's convention).

    Full tuning: 6N + 12*L*H*S -- forward 2N, backward 4N (activation + weight gradients), plus attention
    scores/values (QK^T and AV: 4LHS forward, 8LHS backward), S = sequence length.
    PEFT: 4N + 2*N_trainable + 12*L*H*S -- forward 2N and activation gradients 2N over all weights, weight
    gradients 2*N_trainable only (frozen weights need none); attention has no weights, so its term is unchanged.
    """
    attention = 12 * n_layers * hidden * seq_len
    if full_tuning:
        return float(6 * n_params + attention)
    return float(4 * n_params + 2 * n_trainable + attention)


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
    key = _DTYPE_ALIASES.get(dtype, dtype)
    for pattern, peaks in _PEAK_FLOPS:
        if pattern in name:
            return peaks.get(key)
    warn_once(f"unknown GPU {name!r}: MFU is not reported; set {PEAK_FLOPS_ENV} to its peak FLOP/s")
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation in [0, 1]; `tokens_per_s` is the global rate over all `world_size` devices."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated on `device`, or on CPU the host process's peak RSS, in GiB; None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return None


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory under its honest key: "train/peak_mem_gib" (device) or "train/peak_rss_gib" (host RSS)."""
    value = peak_memory_gib(device)
    if value is None:
        return {}
    return {"train/peak_mem_gib" if device.type == "cuda" else "train/peak_rss_gib": value}


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


def wandb_mode(mode: str) -> str:
    """Resolve "auto": "online" when WANDB_API_KEY is set, else "offline"; other modes pass through."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class WandbSink:
    """A W&B run under run_dir/wandb; the run id is kept in run_dir/wandb_run_id so a resumed run continues it."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]):
        self._run = None
        mode = wandb_mode(cfg.mode)
        if mode == "disabled":
            return
        import wandb

        id_file = Path(run_dir) / WANDB_ID_NAME
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._run = wandb.init(
            mode=mode, project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).name,
            tags=cfg.tags, group=cfg.group, dir=str(run_dir), config=config, id=run_id, resume="allow",
            settings=wandb.Settings(console="off"),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


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
    for key, label in (("train/peak_mem_gib", "peak device memory"), ("train/peak_rss_gib", "peak host RSS")):
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
