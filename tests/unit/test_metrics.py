"""Metrics: FLOPs/MFU arithmetic, memory, JSONL/W&B(offline)/plot/report outputs, W&B failures, resume, rank logging."""
from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import read_wandb_log
from dist_tune import flops, logs
from dist_tune.config import Config
from dist_tune.errors import UserError
from dist_tune.flops import FLOPS_FORMULA_FULL, FLOPS_FORMULA_PEFT, FlopsModel, compute_dtype, mfu, peak_flops_per_device
from dist_tune.memory_probe import GIB, host_rss_gib, memory_metrics, reset_peak_memory
from dist_tune.metrics import JsonlSink, MetricsLogger, WandbSink, wandb_mode
from dist_tune.report import plot_run, read_jsonl, report
from dist_tune.run import flops_formula, flops_model, mfu_function
from dist_tune.forward import logit_positions

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
            "train/data_wait_s": 0.01, "train/compute_s": 0.2, "train/peak_rss_gib": 1.25,
            "train/host_rss_gib": 1.0 + 0.01 * step}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One offline-W&B run with a fake API key and an empty WANDB_MODE (which wandb itself rejects) in the env:
    6 train steps, eval at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("run") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", SECRET)
        mp.setenv("WANDB_MODE", "")
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


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    """1 layer, hidden 8, MLP 16, 2 heads of 4 (1 kv head), vocab 10. Parameters: q 64, k 32, v 32, o 64,
    gate/up/down 128 each, 2 layer norms 8 each, final norm 8: body 600; embedding 80, LM head 80."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=10,
                                        tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [False, True])
def test_flops_model_counts_the_head_at_logit_positions_and_no_input_embedding(tied):
    flops = flops_model(tiny_llama(tied))
    # untied: 760 parameters, the 80-parameter embedding is a lookup; tied: 680, its one 80 counted as the head
    assert flops == FlopsModel(body=600, body_trainable=600, head=80, head_trainable=80, n_layers=1, hidden=8)
    # S=5, half the tokens get logits: 6*600 + 6*80*0.5 + 12*1*8*5 = 3600 + 240 + 480
    assert flops.per_token(5, 0.5) == 4320
    assert flops.per_token(5, 1.0) == 4560  # all logits: + 6*80*0.5


def test_flops_model_lora_needs_no_weight_gradients_for_frozen_weights():
    model = get_peft_model(tiny_llama(tied=False), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    flops = flops_model(model)
    # LoRA q: A 2x8 + B 8x2 = 32, v: A 2x8 + B 4x2 = 24 -> 56 trainable, all body
    assert flops == FlopsModel(body=656, body_trainable=56, head=80, head_trainable=0, n_layers=1, hidden=8)
    # 4*656 + 2*56 + 4*80*0.5 + 12*1*8*5 = 2624 + 112 + 160 + 480
    assert flops.per_token(5, 0.5) == 3376


def test_flops_formula_labels():
    cfg = Config()
    assert flops_formula(cfg) == FLOPS_FORMULA_FULL == "6*N_body + 6*N_head*(logit positions/token) + 12*L*H*S (full)"
    cfg.peft.method = "lora"
    assert flops_formula(cfg) == FLOPS_FORMULA_PEFT
    assert FLOPS_FORMULA_PEFT.startswith("4*N_body + 2*N_body_trainable + (4*N_head + 2*N_head_trainable)")


def test_logit_positions_counts_real_tokens_where_logits_are_computed():
    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    assert logit_positions(padded) == 5
    assert logit_positions({**padded, "logits_to_keep": torch.tensor([1, 2])}) == 3  # row 2's position 2 is padding
    flat = {"attention_mask": torch.ones(1, 7, dtype=torch.long), "logits_to_keep": torch.tensor([0, 1, 4, 5])}
    assert logit_positions(flat) == 4


def test_mfu():
    # 2 devices at 1e12 peak, 1e4 tok/s * 1e8 FLOP/tok = 1e12 FLOP/s achieved -> 0.5
    assert mfu(1e4, 1e8, 1e12, 2) == pytest.approx(0.5)
    assert mfu(1e4, 1e8, None, 2) is None


@pytest.mark.parametrize("mixed_precision, dtype, qlora, expected", [
    ("fp32", "bfloat16", False, "bf16"),  # bf16 weights compute in bf16 whatever engine.mixed_precision says
    ("fp32", "float32", False, "fp32"),
    ("bf16", "float32", False, "bf16"),
    ("fp16", "bfloat16", False, "fp16"),
    ("fp32", "float32", True, "bf16"),  # QLoRA's compute dtype
    ("fp32", "float16", True, "fp16"),
])
def test_compute_dtype(mixed_precision, dtype, qlora, expected):
    cfg = Config()
    cfg.engine.mixed_precision, cfg.model.dtype, cfg.peft.load_in_4bit = mixed_precision, dtype, qlora
    assert compute_dtype(cfg) == expected


def test_mfu_function_uses_the_compute_dtype_peak(monkeypatch):
    monkeypatch.delenv(flops.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    cfg = Config()
    cfg.model.dtype, cfg.engine.mixed_precision = "bfloat16", "fp32"
    engine = SimpleNamespace(device=torch.device("cuda"), env=SimpleNamespace(world_size=2))
    compute = mfu_function(cfg, tiny_llama(tied=False), engine)
    # 1e12 tok/s * 4320 FLOP/tok over 2 NVL cards at their bf16 835e12 (not the fp32 60e12, not SXM's 989e12)
    assert compute(1e12, 5, 0.5) == pytest.approx(1e12 * 4320 / (2 * 835e12))


def test_peak_flops_table_and_override(monkeypatch):
    monkeypatch.delenv(flops.PEAK_FLOPS_ENV, raising=False)
    assert peak_flops_per_device(torch.device("cpu"), "bf16") is None
    names = {"NVIDIA H100 80GB HBM3": (989e12, 67e12), "NVIDIA H100 PCIe": (756e12, 51e12),
             "NVIDIA H100 NVL": (835e12, 60e12), "NVIDIA H200": (989e12, 67e12), "NVIDIA H200 NVL": (835e12, 60e12),
             "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12), "NVIDIA L40S": (362e12, 91.6e12),
             "NVIDIA A10G": (125e12, 31.2e12)}
    for name, (bf16, fp32) in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops_per_device(torch.device("cuda"), "bfloat16") == bf16, name
        assert peak_flops_per_device(torch.device("cuda"), "fp32") == fp32, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_flops_per_device(torch.device("cuda"), "bf16") is None
    monkeypatch.setenv(flops.PEAK_FLOPS_ENV, "1.5e12")
    assert peak_flops_per_device(torch.device("cpu"), "fp32") == 1.5e12


def test_wandb_mode_auto(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"


def test_empty_wandb_mode_counts_as_unset(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "")
    assert wandb_mode("auto") == "offline"
    assert "WANDB_MODE" not in os.environ  # removed, so wandb.Settings never sees it
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(UserError, match="^WANDB_MODE='bogus' is not a W&B mode; set it to online, offline or "
                                        "disabled, or unset it$"):
        wandb_mode("offline")


def test_memory_metrics_cpu_is_labelled_rss():
    out = memory_metrics(torch.device("cpu"))
    assert list(out) == ["train/peak_rss_gib", "train/host_rss_gib"]
    assert out["train/peak_rss_gib"] > 0.1 and out["train/host_rss_gib"] > 0.1  # torch alone is more


def test_host_rss_is_current_not_lifetime_peak():
    before = host_rss_gib()
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    assert host_rss_gib() - before == pytest.approx(0.25, abs=0.05)
    del block
    assert host_rss_gib() - before < 0.05


def test_memory_metrics_cuda_peaks_per_window(monkeypatch):
    peaks = {"allocated": 3 * GIB, "reserved": 4 * GIB}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peaks["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peaks.update(allocated=GIB,
                                                                                               reserved=2 * GIB))
    cuda = torch.device("cuda")
    first = memory_metrics(cuda)
    assert (first["train/peak_mem_gib"], first["train/peak_reserved_gib"]) == (3.0, 4.0)
    assert set(first) == {"train/peak_mem_gib", "train/peak_reserved_gib", "train/host_rss_gib"}
    reset_peak_memory(cuda)
    second = memory_metrics(cuda)
    assert (second["train/peak_mem_gib"], second["train/peak_reserved_gib"]) == (1.0, 2.0)


def test_report_labels_gpu_memory(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    for step, (allocated, reserved) in enumerate([(3.0, 4.0), (1.0, 2.0)], start=1):
        sink.log(step, {"train/loss": 1.0, "train/peak_mem_gib": allocated, "train/peak_reserved_gib": reserved,
                        "train/host_rss_gib": 5.5})
    sink.close()
    text = report(tmp_path)
    assert "peak device memory allocated  3.00 GiB" in text
    assert "peak device memory reserved   4.00 GiB" in text
    assert "max logged host RSS           5.50 GiB" in text


def test_wandb_that_cannot_start_online_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """The fast twin of tests/e2e/test_wandb_unreachable.py: online init fails, an offline run is written."""
    import wandb

    real_init = wandb.init

    def init(mode, **kwargs):
        if mode != "offline":
            raise wandb.errors.CommError("Timed out while retrying: connection refused\nConsider increasing ...")
        return real_init(mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="dist_tune"):
        logger = MetricsLogger(make_cfg(wandb="online", progress=False), run_dir, rank=0, total_steps=2)
        logger.log(1, train_metrics(1))
        logger.close({})
    (offline,) = run_dir.glob("wandb/offline-run-*")
    assert [r.getMessage() for r in caplog.records] == [
        "W&B unreachable (CommError: Timed out while retrying: connection refused); logging offline instead, "
        f"upload later with `wandb sync {offline}`"]
    assert read_wandb_log(next(offline.glob("run-*.wandb")))


def test_wandb_log_failure_mid_run_turns_wandb_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    logger = MetricsLogger(make_cfg(progress=False), tmp_path / "run", rank=0, total_steps=4)
    (wandb_sink,) = [s for s in logger._sinks if isinstance(s, WandbSink)]
    calls = []

    def failing_log(metrics, step):
        calls.append(step)
        if step >= 2:
            raise ConnectionError("wandb-core went away\nsecond line")

    monkeypatch.setattr(wandb_sink._run, "log", failing_log)
    with caplog.at_level(logging.WARNING, logger="dist_tune"):
        for step in range(1, 5):
            logger.log(step, train_metrics(step))
        logger.close({"total_steps": 4})
    assert calls == [1, 2]  # off after the failure
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["W&B logging failed at step 2 (ConnectionError: wandb-core went away); continuing without W&B"]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == {"total_steps": 4}


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
    assert "max logged host RSS  1.06 GiB" in text


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
        logs.rank_logging(3)
        assert root.level == logging.WARNING
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                logs.warn_once("only once please")
            logging.getLogger("other.lib").warning("hello %s", "there")
        messages = [r.getMessage() for r in caplog.records]
        assert messages == ["[rank 3] only once please", "[rank 3] hello there"]
    finally:
        logging.setLogRecordFactory(factory)
        root.removeHandler(logs._handler)
        logs._handler = None
        root.setLevel(level)
