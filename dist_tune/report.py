"""What a run leaves to read: its metrics.jsonl records, the loss plot (loss.png) and the run report printed at
the end and by `dist-tune report`."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dist_tune.errors import UserError

JSONL_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "loss.png"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; blank or torn lines (a crash mid-write) are skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


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
