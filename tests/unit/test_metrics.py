"""Metrics: FLOPs/MFU arithmetic, JSONL/W&B(offline)/plot/report outputs, resume, rank logging."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import read_wandb_log
from dist_tune import metrics
from dist_tune.config import Config
from dist_tune.metrics import (
    FLOPS_FORMULA_FULL,
    FLOPS_FORMULA_PEFT,
    JsonlSink,
    MetricsLogger,
    flops_per_token,
    memory_metrics,
    mfu,
    peak_flops_per_device,
    plot_run,
    read_jsonl,
    report,
    wandb_mode,
)

SECRET = "dt-secret-XYZ"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_cfg(wandb: str = "offline", progress: bool = True) -> Config:
    cfg = Config()
    cfg.log.wandb.mode = wandb
    cfg.log.wandb.tags = ["unit"]
    cfg.log.wandb.group = "g1"
    cfg.log.progress = progress
    return cfg


def train_metrics(step: int) -> dict:
    return {"train/loss": 3.0 - 0.25 * step, "train/lr": 1e-3 / step, "train/grad_norm": 1.5,
            "train/tokens_per_s": 1000.0 + step, "train/samples_per_s": 4.0, "train/mfu": None,
            "train/data_wait_s": 0.01, "train/compute_s": 0.2, "train/peak_rss_gib": 1.25}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One offline-W&B run with a fake API key in the env: 6 train steps, eval at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("run") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", SECRET)
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DISABLE_GIT", "true")
        mp.setenv("WANDB__SERVICE_WAIT", "30")
        logger = MetricsLogger(make_cfg(), run_dir, rank=0, total_steps=6)
        for step in range(1, 7):
            logger.log(step, train_metrics(step))
            if step % 3 == 0:
                logger.log(step, {"eval/loss": 2.5 - 0.1 * step, "eval/perplexity": 10.0 - step, "eval/accuracy": 0.1 * step})
        logger.close({"total_steps": 6, "flops_formula": FLOPS_FORMULA_FULL})
    return run_dir


def test_flops_per_token_full_and_peft():
    # N=1e6, L=2, H=64, S=128: attention 12*2*64*128 = 196_608
    # full: 6*1e6 + 196_608 = 6_196_608
    kw = dict(n_params=1_000_000, n_layers=2, hidden=64, seq_len=128)
    assert flops_per_token(**kw, n_trainable=1_000_000, full_tuning=True) == 6_196_608
    # peft, N_trainable=10_000: 4*1e6 + 2*1e4 + 196_608 = 4_000_000 + 20_000 + 196_608 = 4_216_608
    assert flops_per_token(**kw, n_trainable=10_000, full_tuning=False) == 4_216_608
    # peft with everything trainable degenerates to the full formula
    assert flops_per_token(**kw, n_trainable=1_000_000, full_tuning=False) == 6_196_608
    assert "6N" in FLOPS_FORMULA_FULL and "4N" in FLOPS_FORMULA_PEFT


def test_mfu():
    # 2 devices at 1e12 peak, 1e4 tok/s * 1e8 FLOP/tok = 1e12 FLOP/s achieved -> 0.5
    assert mfu(1e4, 1e8, 1e12, 2) == pytest.approx(0.5)
    assert mfu(1e4, 1e8, None, 2) is None


def test_peak_flops_table_and_override(monkeypatch):
    monkeypatch.delenv(metrics.PEAK_FLOPS_ENV, raising=False)
    assert peak_flops_per_device(torch.device("cpu"), "bf16") is None
    names = {"NVIDIA H100 80GB HBM3": (989e12, 67e12), "NVIDIA H100 PCIe": (756e12, 51e12),
             "NVIDIA H200": (989e12, 67e12), "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
             "NVIDIA L40S": (362e12, 91.6e12), "NVIDIA A10G": (125e12, 31.2e12)}
    for name, (bf16, fp32) in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops_per_device(torch.device("cuda"), "bfloat16") == bf16
        assert peak_flops_per_device(torch.device("cuda"), "fp32") == fp32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_flops_per_device(torch.device("cuda"), "bf16") is None
    monkeypatch.setenv(metrics.PEAK_FLOPS_ENV, "1.5e12")
    assert peak_flops_per_device(torch.device("cpu"), "fp32") == 1.5e12


def test_wandb_mode_auto(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_memory_metrics_cpu_is_labelled_rss():
    out = memory_metrics(torch.device("cpu"))
    assert list(out) == ["train/peak_rss_gib"] and out["train/peak_rss_gib"] > 0


def test_jsonl_contents(finished_run):
    records = read_jsonl(finished_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5, 6, 6]
    first = records[0]
    assert first["train/loss"] == 2.75 and first["train/lr"] == 1e-3 and isinstance(first["time"], float)
    assert "train/mfu" not in first  # unmeasured: absent, not 0
    assert records[3] == {"step": 3, "time": records[3]["time"], "eval/loss": pytest.approx(2.2),
                          "eval/perplexity": 7.0, "eval/accuracy": pytest.approx(0.3)}


def test_wandb_offline_run_contents(finished_run):
    (run_path,) = (finished_run / "wandb").glob("offline-run-*")
    run_id = (finished_run / "wandb_run_id").read_text()
    assert run_path.name.endswith(run_id)
    records = read_wandb_log(run_path / f"run-{run_id}.wandb")
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, list(run.tags), run.run_group) == ("dist_tune", "demo", ["unit"], "g1")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["log"]["wandb"]["mode"] == "offline" and config["optim"]["lr"] == 3e-4
    # history keys arrive as nested_key path segments ("train", "loss"), "_step" etc. as plain key
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    train = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in train] == [1, 2, 3, 4, 5, 6]
    assert train[0]["train/loss"] == 2.75 and "train/mfu" not in train[0]
    assert [h["eval/loss"] for h in history if "eval/loss" in h] == pytest.approx([2.2, 1.9])


def test_api_key_never_written(finished_run):
    files = [p for p in finished_run.rglob("*") if p.is_file()]
    assert len(files) > 5
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_plot_and_summary(finished_run):
    png = (finished_run / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert json.loads((finished_run / "summary.json").read_text())["total_steps"] == 6


def test_report_finished(finished_run):
    text = report(finished_run)
    assert "(finished)" in text and FLOPS_FORMULA_FULL in text
    assert "last 1.5 (step 6), best 1.5 (step 6)" in text  # train loss 3 - 0.25*6
    assert "eval/accuracy" in text and "n/a (peak FLOPs unknown)" in text and "peak host RSS" in text


def test_partial_run_report_then_resume(tmp_path):
    run_dir = tmp_path / "partial"
    run_dir.mkdir()
    sink = JsonlSink(run_dir / "metrics.jsonl")
    for step in range(1, 5):
        sink.log(step, {**train_metrics(step), "train/mfu": 0.25})
    sink.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # torn last line: killed mid-write
    text = report(run_dir)
    assert "interrupted" in text and "steps done" in text and "25.00%" in text
    assert "last 2 (step 4), best 2 (step 4)" in text
    assert plot_run(run_dir).read_bytes().startswith(PNG_MAGIC)

    # resume from a step-2 checkpoint: steps 3-4 (and the torn line) are dropped, new steps appended
    logger = MetricsLogger(make_cfg(wandb="disabled", progress=False), run_dir, rank=0, total_steps=6, start_step=2)
    for step in range(3, 7):
        logger.log(step, {"train/loss": 1.0, "train/lr": 1e-4})
    logger.close({"resumed_from": 2})
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["train/loss"] for r in records[2:]] == [1.0] * 4
    assert "(finished)" in report(run_dir)


def test_nonzero_rank_is_noop(tmp_path):
    logger = MetricsLogger(make_cfg(), tmp_path / "r1", rank=1, total_steps=3)
    logger.log(1, {"train/loss": 1.0})
    logger.close({})
    assert not (tmp_path / "r1").exists()


def test_rank_logging_and_warn_once(caplog):
    root = logging.getLogger()
    level, factory = root.level, logging.getLogRecordFactory()
    try:
        metrics.rank_logging(3)
        assert root.level == logging.WARNING
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                metrics.warn_once("only once please")
            logging.getLogger("other.lib").warning("hello %s", "there")
        messages = [r.getMessage() for r in caplog.records]
        assert messages == ["[rank 3] only once please", "[rank 3] hello there"]
    finally:
        logging.setLogRecordFactory(factory)
        root.removeHandler(metrics._handler)
        metrics._handler = None
        root.setLevel(level)
