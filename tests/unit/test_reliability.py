"""Reliability: atomic checkpoints (tmp dir, COMPLETE marker, corrupt state, pruning, a crash inside
engine.save) with a fake engine, and the non-finite-loss policy (skip / stop) on a real tiny single-device run."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import TINY
from dist_tune import checkpoint as ckpt
from dist_tune import cluster, logs
from dist_tune import run as run_mod
from dist_tune import evaluation as evaluation_mod
from dist_tune import trainer as trainer_mod
from dist_tune.cli import main
from dist_tune.config import Config
from dist_tune.errors import TrainingError, UserError
from dist_tune.trainer import Trainer

MODEL = "tiny-llama"


# --- atomic checkpoints with a fake engine -----------------------------------------------------------------------

class FakeEngine:
    """What save_checkpoint/load_checkpoint need: env.rank/world_size, cfg.train.micro_batch_size, barrier(),
    save(dir), load(dir)."""

    def __init__(self, fail_on_save: bool = False):
        self.env = SimpleNamespace(rank=0, world_size=1)
        self.cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=4))
        self.fail_on_save = fail_on_save
        self.payload = b"weights-0"
        self.loaded_from: Path | None = None
        self.barriers = 0

    def barrier(self) -> None:
        self.barriers += 1

    def save(self, ckpt_dir: Path) -> None:
        (ckpt_dir / "engine_state.bin").write_bytes(self.payload[: len(self.payload) // 2])
        if self.fail_on_save:
            raise OSError("disk full while writing engine_state.bin")
        (ckpt_dir / "engine_state.bin").write_bytes(self.payload)

    def load(self, ckpt_dir: Path) -> None:
        self.loaded_from = ckpt_dir
        self.payload = (ckpt_dir / "engine_state.bin").read_bytes()


def save(run_dir: Path, step: int, *, limit: int | None = None, engine: FakeEngine | None = None) -> Path:
    engine = engine or FakeEngine()
    engine.payload = f"weights-{step}".encode()
    return ckpt.save_checkpoint(engine, ckpt.TrainState(step=step, model_name=MODEL), run_dir, limit)


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt.checkpoints_dir(run_dir).iterdir())


def test_save_is_complete_and_leaves_no_tmp(tmp_path):
    path = save(tmp_path, 3)
    assert path == ckpt.step_dir(tmp_path, 3) and ckpt.is_complete(path)
    assert {p.name for p in path.iterdir()} == {"engine_state.bin", "rng_rank0.pt", ckpt.STATE_FILE, ckpt.COMPLETE}
    assert names(tmp_path) == ["step_00000003"]
    assert ckpt.read_state(path) == ckpt.TrainState(step=3, model_name=MODEL, world_size=1)
    assert ckpt.latest_checkpoint(tmp_path) == path


def _leftover_tmp(run_dir: Path, step: int) -> Path:
    """A crash after writing everything but before the rename: even a COMPLETE marker inside does not count."""
    tmp = ckpt.step_dir(run_dir, step).with_name(f"step_{step:08d}.tmp")
    tmp.mkdir(parents=True)
    (tmp / "engine_state.bin").write_bytes(b"partial")
    (tmp / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "model_name": MODEL}))
    (tmp / ckpt.COMPLETE).write_text("ok\n")
    return tmp


def _no_marker(run_dir: Path, step: int) -> Path:
    path = ckpt.step_dir(run_dir, step)
    path.mkdir(parents=True)
    (path / "engine_state.bin").write_bytes(b"partial")
    (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "model_name": MODEL}))
    return path


def _corrupt_state(text: str):
    def make(run_dir: Path, step: int) -> Path:
        path = save(run_dir, step)
        (path / ckpt.STATE_FILE).write_text(text)
        return path
    return make


BROKEN = {
    "tmp_dir": _leftover_tmp,
    "no_complete_marker": _no_marker,
    "truncated_state_json": _corrupt_state('{"step": 6, "epo'),
    "state_json_not_an_object": _corrupt_state("[6, 0, 0]"),
    "state_json_unknown_fields": _corrupt_state('{"step": 6, "optimizer": "adamw"}'),
    "state_json_missing": _corrupt_state(""),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint_is_ignored_with_a_warning_and_resume_falls_back(tmp_path, caplog, kind):
    good = save(tmp_path, 3)
    good_files = digest(good)
    broken = BROKEN[kind](tmp_path, 6)
    with caplog.at_level(logging.WARNING, logger="dist_tune.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) == good
    assert any(broken.name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), caplog.text
    # resume (train.resume=auto) continues from the previous complete checkpoint
    assert ckpt.resume_checkpoint(tmp_path, "auto", MODEL) == good
    engine = FakeEngine()
    state = run_mod.resume_state(engine, ckpt.resume_checkpoint(tmp_path, "auto", MODEL), MODEL)
    assert engine.loaded_from == good and engine.payload == b"weights-3"
    assert state.step == 3
    assert digest(good) == good_files


def test_resume_refuses_an_explicit_broken_checkpoint(tmp_path):
    broken = _no_marker(tmp_path, 6)
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.resume_checkpoint(tmp_path, str(broken), MODEL)


def test_resume_refuses_another_models_checkpoint(tmp_path):
    save(tmp_path, 3)
    with pytest.raises(UserError, match="trained from model 'tiny-llama', not 'small-llama'"):
        ckpt.resume_checkpoint(tmp_path, "auto", "small-llama")
    assert ckpt.resume_checkpoint(tmp_path, "none", "small-llama") is None
    assert ckpt.resume_checkpoint(tmp_path / "fresh", "auto", "small-llama") is None


def test_save_total_limit_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, limit=2)
    assert names(tmp_path) == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("limit", [1, -1])
def test_save_total_limit_never_deletes_the_only_complete_checkpoint(tmp_path, limit):
    only = save(tmp_path, 1, limit=limit)
    _no_marker(tmp_path, 2)
    _leftover_tmp(tmp_path, 3)
    ckpt.prune_checkpoints(tmp_path, limit)
    assert ckpt.is_complete(only) and ckpt.latest_checkpoint(tmp_path) == only
    # a crash in the next save must not cost the one complete checkpoint either
    with pytest.raises(OSError):
        save(tmp_path, 4, limit=limit, engine=FakeEngine(fail_on_save=True))
    assert ckpt.latest_checkpoint(tmp_path) == only
    # the next good save replaces it, and only then is the old one pruned
    newest = save(tmp_path, 5, limit=1)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == [newest.name]


def test_crash_inside_engine_save_keeps_the_previous_checkpoint(tmp_path):
    previous = save(tmp_path, 3, limit=1)
    before = digest(previous)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 6, limit=1, engine=FakeEngine(fail_on_save=True))
    assert digest(previous) == before
    assert not ckpt.step_dir(tmp_path, 6).exists()  # only a .tmp, never a step dir, for the failed save
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == [previous.name]
    assert ckpt.latest_checkpoint(tmp_path) == previous
    # retrying the same step replaces the stale tmp dir and completes
    retried = save(tmp_path, 6, limit=1)
    assert ckpt.is_complete(retried) and (retried / "engine_state.bin").read_bytes() == b"weights-6"
    assert names(tmp_path) == ["step_00000006"]


# --- non-finite losses -----------------------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; the preemption signal handlers a run installs are restored afterwards."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def tiny_cfg(tmp_path: Path, **train) -> Config:
    cfg = Config()
    cfg.model.name_or_path = MODEL
    cfg.data.max_length, cfg.data.prompt_template, cfg.data.cache_dir = 64, "plain", str(tmp_path / "cache")
    cfg.data.validation_split = 0.05
    cfg.train.micro_batch_size, cfg.train.output_dir, cfg.train.run_name = 4, str(tmp_path / "runs"), "nan"
    cfg.train.max_steps, cfg.train.eval_max_batches = 3, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    cfg.log.progress, cfg.log.wandb.mode, cfg.log.log_steps = False, "disabled", 1
    return cfg


class ListMetrics:
    def __init__(self, *args, **kwargs):
        self.rows = []

    def log(self, step, values):
        self.rows.append((step, dict(values)))


def build_trainer(cfg: Config, monkeypatch) -> Trainer:
    """run.build_trainer on the CPU, with metrics kept in a list."""
    monkeypatch.setattr(run_mod.metrics, "MetricsLogger", ListMetrics)
    run_dir = run_mod.resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_mod.build_trainer(cfg, cluster.detect(), torch.device("cpu"), run_dir)


def nan_at(monkeypatch, trainer: Trainer, bad_steps: set[int]) -> list[dict[str, torch.Tensor]]:
    """Make the loss NaN on the given (1-based) steps; returns the parameters after every step."""
    real = trainer_mod.loss_sum

    def poisoned(output, batch, causal):
        summed, count = real(output, batch, causal)
        if trainer.state.step + 1 in bad_steps:
            summed = summed * float("nan")
        return summed, count

    monkeypatch.setattr(trainer_mod, "loss_sum", poisoned)
    snapshots = [{k: v.detach().clone() for k, v in trainer.engine.unwrap().named_parameters()}]
    real_step = trainer.train_step

    def step_and_snapshot(micro, problem=None):
        result = real_step(micro, problem)
        snapshots.append({k: v.detach().clone() for k, v in trainer.engine.unwrap().named_parameters()})
        return result

    monkeypatch.setattr(trainer, "train_step", step_and_snapshot)
    return snapshots


def test_nan_policy_skip_skips_the_update_and_counts_it(tmp_path, monkeypatch, caplog, clean_env):
    trainer = build_trainer(tiny_cfg(tmp_path, nan_policy="skip"), monkeypatch)
    snapshots = nan_at(monkeypatch, trainer, {2})
    with caplog.at_level(logging.WARNING, logger="dist_tune.trainer"):
        summary = trainer.train()
    assert summary["stopped"] == "completed" and summary["steps"] == 3
    assert summary["skipped_steps"] == 1 and trainer.state.skipped_steps == 1
    assert trainer.state.consecutive_bad_steps == 0  # reset by the good step 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 2" in m and "non-finite" in m and "update skipped" in m for m in warnings), warnings
    before, after_bad, after_good = snapshots[1], snapshots[2], snapshots[3]
    for name in before:  # the skipped step changed no parameter (not even weight decay); the next one did
        assert torch.equal(after_bad[name], before[name]), name
        assert torch.isfinite(after_good[name]).all(), name
    assert any(not torch.equal(after_good[n], after_bad[n]) for n in before)
    assert any(not torch.equal(snapshots[1][n], snapshots[0][n]) for n in before)
    adam_steps = {float(s["step"]) for s in trainer.engine.optimizer.state.values()}
    assert adam_steps == {2.0}  # 3 steps, one skipped: the optimizer stepped twice
    losses = {step: values["train/loss"] for step, values in trainer.metrics.rows if "train/loss" in values}
    assert math.isnan(losses[2]) and math.isfinite(losses[1]) and math.isfinite(losses[3])  # logged, not hidden


def test_nan_policy_stop_raises_one_line_training_error(tmp_path, monkeypatch, clean_env):
    trainer = build_trainer(tiny_cfg(tmp_path, nan_policy="stop"), monkeypatch)
    snapshots = nan_at(monkeypatch, trainer, {2})
    with pytest.raises(TrainingError) as exc:
        trainer.train()
    assert isinstance(exc.value, UserError)
    message = str(exc.value)
    assert "\n" not in message and "step 2" in message and "nan_policy=stop" in message and "optim.lr" in message
    assert len(snapshots) == 3  # stopped right after the bad step
    assert all(torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[1])
    assert not (tmp_path / "runs" / "nan" / "checkpoints").exists()


def test_nan_policy_skip_stops_after_max_bad_steps_in_a_row(tmp_path, monkeypatch, clean_env):
    trainer = build_trainer(tiny_cfg(tmp_path, nan_policy="skip", max_bad_steps=2, max_steps=6), monkeypatch)
    nan_at(monkeypatch, trainer, {2, 4, 5, 6})
    with pytest.raises(TrainingError, match="2 consecutive non-finite steps at step 5"):
        trainer.train()
    assert trainer.state.skipped_steps == 3


@pytest.fixture
def cli(capsys, clean_env, monkeypatch):
    """cli(*args) -> (exit code, stdout, stderr) of `dist-tune ARGS` run in this process."""
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def run(*args: str) -> tuple[int, str, str]:
        logs.rank_logging(0)
        logs._handler.stream = sys.stderr
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return (code, *capsys.readouterr())

    yield run
    if logs._handler is not None:
        logs._handler.stream = sys.__stderr__


def test_cli_nan_policy_skip_counts_skipped_steps_in_the_summary(cli, tmp_path):
    """optim.lr=1e30: step 1 blows the weights up, every later gradient is non-finite and is skipped."""
    code, out, err = cli("train", *TINY, "--optim.lr=1e30", "--train.max_steps=4", "--train.nan_policy=skip",
                         f"--train.output_dir={tmp_path}", "--train.run_name=skip", "--checkpoint.save_final=false")
    assert code == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["skipped_steps"] == 3 and summary["stopped"] == "completed"
    assert err.count("update skipped") == 3
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_steps"] == 3


def test_cli_nan_policy_stop_prints_one_error_line(cli, tmp_path):
    code, out, err = cli("train", *TINY, "--optim.lr=1e30", "--train.max_steps=4", "--train.nan_policy=stop",
                         f"--train.output_dir={tmp_path}", "--train.run_name=stop", "--checkpoint.save_steps=1")
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dist-tune: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    assert "non-finite steps at step 2" in errors[0] and "lower optim.lr" in errors[0]
    # the step-1 checkpoint exists; nothing was saved from the bad step
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "stop")] == ["step_00000001"]


def losses_and_evals(trainer: Trainer) -> tuple[dict[int, float], list[int]]:
    rows = trainer.metrics.rows
    return ({step: v["train/loss"] for step, v in rows if "train/loss" in v},
            [step for step, v in rows if "eval/loss" in v])


def test_a_signal_during_evaluation_keeps_the_steps_checkpoint_and_the_resumed_run_matches(
        tmp_path, monkeypatch, clean_env):
    """The step is checkpointed before its evaluation and a signal is heard inside it: SIGUSR1 during step 2's
    evaluation stops the run with step 2 saved (marked to evaluate again); the resumed run evaluates step 2 first,
    then trains steps 3-4 to the uninterrupted run's losses."""
    def cfg(name: str) -> Config:
        c = tiny_cfg(tmp_path / name, max_steps=4, eval_steps=2, eval_max_batches=2)
        c.checkpoint.save_steps = 2
        return c

    reference = build_trainer(cfg("reference"), monkeypatch)
    reference.train()
    expected, expected_evals = losses_and_evals(reference)
    trainer = build_trainer(cfg("run"), monkeypatch)
    real_forward = evaluation_mod.forward

    def forward_then_signal(engine, batch):
        if not engine.model.training and trainer.state.step == 2:
            signal.raise_signal(signal.SIGUSR1)
        return real_forward(engine, batch)

    monkeypatch.setattr(evaluation_mod, "forward", forward_then_signal)
    summary = trainer.train()
    assert summary["stopped"] == "preempted" and summary["steps"] == 2
    assert losses_and_evals(trainer)[1] == []  # the interrupted evaluation logged nothing
    saved = ckpt.latest_checkpoint(trainer.run_dir)
    assert saved.name == "step_00000002" and ckpt.read_state(saved).eval_pending
    monkeypatch.setattr(evaluation_mod, "forward", real_forward)
    resumed = build_trainer(cfg("run"), monkeypatch)
    assert resumed.train()["stopped"] == "completed"
    losses, evals = losses_and_evals(resumed)
    assert evals == expected_evals == [2, 4]
    assert losses == {3: expected[3], 4: expected[4]}
    assert not ckpt.read_state(ckpt.latest_checkpoint(trainer.run_dir)).eval_pending  # rewritten after its eval
