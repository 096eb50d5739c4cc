"""Metric sinks (console with progress bar, JSONL, W&B) behind MetricsLogger, which writes summary.json, the loss
plot and the run report (report.py) when the run ends. FLOPs/MFU are in flops.py, memory readings in
memory_probe.py, rank-aware logging in logs.py.

Metric keys are namespaced: "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
"train/samples_per_s", "train/mfu", "train/data_wait_s", "train/compute_s", "train/peak_mem_gib" and
"train/peak_reserved_gib" (CUDA) or "train/peak_rss_gib" (CPU), "train/host_rss_gib", and "eval/loss",
"eval/perplexity", "eval/accuracy", "eval/f1".
A metric that cannot be measured (e.g. MFU without a known peak) is left out, never logged as 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from dist_tune.config import Config, WandbConfig
from dist_tune.errors import UserError
from dist_tune.report import JSONL_NAME, SUMMARY_NAME, plot_run, read_jsonl, report

log = logging.getLogger("dist_tune")

WANDB_ID_NAME = "wandb_run_id"
WANDB_INIT_TIMEOUT_S = 10.0  # wandb.init waits this long for the server; its login check can add about 10 s
WANDB_ENV_MODES = ("online", "offline", "disabled", "dryrun", "run", "shared")




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
