"""`dist-tune train --dry_run` through the CLI entry (in-process): the plan's lines for one process, for a torchrun
or planned NNODES × NPROC_PER_NODE world set only in the environment, and that it loads no weights and writes
nothing."""
from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from dist_tune import logs
from dist_tune.checkpoint import COMPLETE, STATE_FILE, TrainState, step_dir
from dist_tune.cli import main, resolve_recipe
from dist_tune.config import load_config
from dist_tune.errors import UserError
from dist_tune.estimate import estimate
from dist_tune.models import load_tokenizer, model_config
from dist_tune.plan import Layout, layout

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "NNODES", "NPROC_PER_NODE", "SLURM_NNODES",
               "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "WANDB_API_KEY", "WANDB_MODE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    factory, level = logging.getLogRecordFactory(), logging.getLogger().level
    yield
    logging.setLogRecordFactory(factory)  # main() installs the CLI's rank logging: undo it
    logging.getLogger().setLevel(level)
    if logs._handler is not None:
        logs._handler.stream = sys.__stderr__


def dry_run(tmp_path: Path, capsys, *args: str) -> dict[str, str]:
    """The plan's `label: value` rows (config rows joined) of `dist-tune train ARGS --dry_run`; checks that nothing
    under tmp_path (output_dir, data cache) was created or changed."""
    before = tree(tmp_path)
    main(["train", *args, f"--train.output_dir={tmp_path / 'runs'}", f"--data.cache_dir={tmp_path / 'cache'}",
          "--dry_run"])
    out = capsys.readouterr().out
    assert out.startswith("dry run: the plan below; no weights loaded, nothing written\n"), out
    rows: dict[str, str] = {}
    label = None
    for line in out.splitlines()[1:]:
        match = re.match(r"(\S[^:]*): +(.*)", line)
        if match:
            label, value = match.groups()
            rows[label] = value
        else:
            rows[label] += "\n" + line.strip()
    assert tree(tmp_path) == before
    return rows


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_single_process_plan_of_the_demo(tmp_path, capsys):
    rows = dry_run(tmp_path, capsys, "demo", "--train.run_name=demo-run")
    assert rows["world size"].startswith("1 = 1 node(s) × 1 process(es) per node (no launcher")
    assert rows["global batch"] == "16 sequences = micro 16 × accumulation 1 × data-parallel 1"
    assert rows["tokens per step"] == "at most 1,536 (global batch × data.max_length=96)"
    assert rows["data"] == "bundled:instructions: 3,000 rows, 2,850 for training, 150 held out by data.validation_split"
    assert rows["steps"] == "1,200 (train.max_steps) = 6.74 epochs of 178 steps"  # 2850 // 16 micro-batches
    e = estimate(load_config(resolve_recipe("demo"), {}), 1)
    assert rows["memory per GPU"].startswith(f"{e.total_gib:.2f} GiB (weights")
    assert rows["memory per node"] == f"1 × {e.total_gib:.2f} = {e.total_gib:.2f} GiB of GPU memory"
    assert rows["run dir"] == str(tmp_path / "runs" / "demo-run")
    assert rows["checkpoints"] == "every 600 steps and the last under checkpoints/ (keep 2); final model in final/"
    assert rows["W&B"] == "offline (log.wandb.mode=auto and no WANDB_API_KEY), project dist_tune"
    assert "optim.lr = 0.0007 (recipe demo)" in rows["config"].splitlines()


def test_torchrun_environment_gives_world_mesh_and_node_memory(tmp_path, capsys, monkeypatch):
    """The variables torchrun sets on rank 0 of a 2-node × 8-process job; no process group is started."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                       "GROUP_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    rows = dry_run(tmp_path, capsys, "demo", "--engine.kind=fsdp", "--train.max_steps=null", "--train.epochs=2",
                   "--train.grad_accum=2", "--train.micro_batch_size=4")
    assert rows["world size"] == "16 = 2 node(s) × 8 process(es) per node (torchrun environment)"
    assert rows["mesh"] == ("data-parallel 16, engine fsdp: weights, gradients and optimizer states sharded over "
                            "all 16 ranks")
    assert rows["global batch"] == "128 sequences = micro 4 × accumulation 2 × data-parallel 16"
    assert rows["tokens per step"] == "at most 12,288 (global batch × data.max_length=96)"
    assert rows["steps"] == "44 = 22 steps per epoch × train.epochs=2"  # 2850 rows // 16 ranks // 4 // 2
    e = estimate(load_config(resolve_recipe("demo"), {"engine.kind": "fsdp", "train.grad_accum": 2,
                                                      "train.micro_batch_size": 4}), 16)
    assert rows["memory per node"] == f"8 × {e.total_gib:.2f} = {8 * e.total_gib:.2f} GiB of GPU memory"
    assert rows["host RAM"] == (f"per node {e.host.load_gib:.2f} GiB to load the model, {e.host.save_gib:.2f} GiB "
                                "to save it")
    assert rows["W&B"] == "online (WANDB_API_KEY is set), project dist_tune"


@pytest.mark.parametrize("engine, mesh", [
    (["--engine.kind=fsdp"], "data-parallel 8, engine fsdp (HSDP): weights, gradients and optimizer states sharded "
                             "within 2 groups of 4 ranks and replicated across them"),
    (["--engine.kind=deepspeed", "--engine.zero_stage=3"],
     "data-parallel 8, engine deepspeed ZeRO-3: weights, gradients and optimizer states sharded over all 8 ranks, "
     "the weights also within groups of 4 ranks (hpZ)"),
])
def test_hierarchical_sharding_is_planned_per_group(tmp_path, capsys, monkeypatch, engine, mesh):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    rows = dry_run(tmp_path, capsys, "demo", *engine, "--engine.replicate_degree=2")
    assert rows["mesh"] == mesh


def test_other_ranks_print_nothing(tmp_path, capsys, monkeypatch):
    for key, value in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}.items():
        monkeypatch.setenv(key, value)
    main(["train", "demo", f"--train.output_dir={tmp_path}", "--engine.kind=fsdp", "--dry_run"])
    assert capsys.readouterr().out == ""


def test_planned_job_from_nnodes_and_nproc_per_node_on_a_login_node(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rows = dry_run(tmp_path, capsys, "demo", "--engine.kind=deepspeed", "--engine.zero_stage=2",
                   "--engine.offload_optimizer=true")
    assert rows["world size"] == "8 = 2 node(s) × 4 process(es) per node (NNODES × NPROC_PER_NODE)"
    assert rows["mesh"] == ("data-parallel 8, engine deepspeed ZeRO-2: gradients and optimizer states sharded over "
                            "all 8 ranks")
    assert rows["steps"] == "1,200 (train.max_steps) = 54.55 epochs of 22 steps"  # 2850 // 8 // 16
    assert re.fullmatch(r"4 × [\d.]+ = [\d.]+ GiB of GPU memory; offloaded to host 4 × [\d.]+ = [\d.]+ GiB",
                        rows["memory per node"]), rows["memory per node"]
    assert rows["W&B"] == "disabled (WANDB_MODE=disabled), project dist_tune"


def test_single_engine_in_several_processes_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["train", "demo", f"--train.output_dir={tmp_path}", "--dry_run"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("dist-tune: error: engine.kind=single cannot run in 2 processes; use ddp, fsdp "
                                       "or deepspeed\n")


def test_hub_data_is_not_counted(tmp_path, capsys):
    rows = dry_run(tmp_path, capsys, "llama3-8b-lora-fsdp", "--engine.kind=ddp")
    assert rows["data"] == "hf:tatsu-lab/alpaca: not counted (hub)"
    assert rows["steps"] == ("unknown: train.epochs=3 of hf:tatsu-lab/alpaca is not downloaded or counted by a dry "
                             "run; set train.max_steps to fix the count")
    rows = dry_run(tmp_path, capsys, "llama3-8b-lora-fsdp", "--engine.kind=ddp", "--train.max_steps=500")
    assert rows["steps"] == "500 (train.max_steps); epochs unknown: hf:tatsu-lab/alpaca is not downloaded or counted " \
                            "by a dry run"
    base, adapter = 8_030_261_248, 41_943_040  # Llama-3.1-8B; LoRA r=16 on every linear layer
    weights = (2 * base + 4 * adapter) / 1024 ** 3  # replicated by DDP: the whole bf16 base and fp32 adapter per GPU
    assert f"(weights {weights:.2f}, gradients" in rows["memory per GPU"]


def test_weights_are_never_read(tmp_path, capsys):
    """A model directory whose weights file is garbage plans fine: the dry run reads config.json only."""
    cfg = load_config(None, {"model.name_or_path": "tiny-llama"})
    tokenizer = load_tokenizer(cfg)
    model_dir = tmp_path / "model"
    model_config(cfg, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    rows = dry_run(tmp_path, capsys, f"--model.name_or_path={model_dir}", "--train.run_name=r")
    e = estimate(load_config(None, {"model.name_or_path": str(model_dir)}), 1)
    assert e.params == 298_048 and rows["memory per GPU"].startswith(f"{e.total_gib:.2f} GiB")
    assert rows["steps"] == "337 = 337 steps per epoch × train.epochs=1"  # library defaults: 2700 rows // 8


def test_resume_point_is_shown(tmp_path, capsys):
    checkpoint = step_dir(tmp_path / "runs" / "r", 40)
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps(asdict(TrainState(step=40, model_name="small-llama"))))
    (checkpoint / COMPLETE).touch()
    rows = dry_run(tmp_path, capsys, "demo", "--train.run_name=r")
    assert rows["checkpoints"].endswith(f"; resumes from {checkpoint}")


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2",
      "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]"},
     Layout(16, 2, 8, "slurm environment")),  # srun starting one task per GPU
    ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "4", "NPROC_PER_NODE": "8"},
     Layout(32, 4, 8, "NNODES × NPROC_PER_NODE")),  # the sbatch script itself, before srun
    ({"NPROC_PER_NODE": "2"}, Layout(2, 1, 2, "NNODES × NPROC_PER_NODE")),
])
def test_layout_from_the_environment(environ, expected):
    assert layout(environ) == expected


def test_elastic_nnodes_is_refused_with_the_fix():
    with pytest.raises(UserError, match=r"^NNODES='1:4' is not a positive number; set NNODES and NPROC_PER_NODE"):
        layout({"NNODES": "1:4"})


def test_too_little_data_for_the_job_is_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(20)))
    with pytest.raises(SystemExit):
        main(["train", f"--data.path={data}", "--engine.kind=ddp", "--train.micro_batch_size=4", "--dry_run"])
    assert capsys.readouterr().err == ("dist-tune: error: the training set gives 0 micro-batches per rank, "
                                       "fewer than train.grad_accum=1; use more data or a smaller batch\n")


def test_memory_of_a_model_that_cannot_be_read_offline_is_unknown(tmp_path, capsys):
    rows = dry_run(tmp_path, capsys, "--model.name_or_path=some-org/unlisted-model")
    memory = rows["memory per GPU"]
    assert memory.startswith("unknown: ") and "some-org/unlisted-model" in memory, memory  # the reason, one line
    assert "memory per node" not in rows


def test_a_data_mixture_is_not_counted(tmp_path, capsys):
    config = tmp_path / "mix.yaml"
    config.write_text("data:\n  sources:\n    - {path: bundled:instructions, weight: 3}\n    - {path: bundled:text, "
                      "format: text}\ntrain:\n  max_steps: 40\n")
    rows = dry_run(tmp_path, capsys, str(config))
    assert rows["data"] == "a mixture of 2 data.sources: not counted"
    assert rows["steps"] == "40 (train.max_steps); epochs unknown: a mixture of 2 data.sources is not downloaded or " \
                            "counted by a dry run"
