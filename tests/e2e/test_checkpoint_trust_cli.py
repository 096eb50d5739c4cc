"""Resume and export through the CLI treat a run directory as data someone else may have written: a planted
pickle that runs code is refused before any rank loads it (our RNG files on every engine, DCP's metadata,
DeepSpeed's states), a changed byte is refused by resume and by export, an honest checkpoint of the old format
still resumes, and planted secrets reach no file or log line."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY, RunsCode, dist_tune
from dist_tune.checkpoint import COMPLETE

pytestmark = pytest.mark.slow  # a dozen training runs; the unit tests in test_checkpoint_trust.py are quick

ENGINES = {"single": ([], 1), "fsdp": (["--engine.kind=fsdp"], 2),
           "zero3": (["--engine.kind=deepspeed", "--engine.zero_stage=3"], 2)}
CHECKPOINT = Path("checkpoints/step_00000002")


def train(root: Path, name: str, engine: str, steps: int, check: bool = True, extra=()):
    args, nproc = ENGINES[engine]
    return dist_tune("train", *TINY, f"--train.max_steps={steps}", "--checkpoint.save_steps=2",
                     "--checkpoint.save_final=false", "--train.eval_steps=null", f"--train.output_dir={root}",
                     f"--train.run_name={name}", *args, *extra, nproc=nproc, check=check, timeout=600)


@pytest.fixture(scope="module")
def trained(runs_root):
    """{engine: a run dir with one checkpoint at step 2}, trained once per engine on first use."""
    runs: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            train(runs_root, f"trusted-{engine}", engine, steps=2)
            runs[engine] = runs_root / f"trusted-{engine}"
        return runs[engine]
    return get


def copy_run(trained, engine: str, root: Path, name: str) -> Path:
    return Path(shutil.copytree(trained(engine), root / name))


def refused(proc, line_start: str) -> None:
    """The run stopped with the line on every rank that printed one, and no traceback through dist_tune's code
    (torchrun prints its own when a rank fails)."""
    errors = [text for text in proc.stderr.splitlines() if text.startswith("dist-tune: error:")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all(text.startswith(f"dist-tune: error: {line_start}") for text in errors), proc.stderr[-3000:]
    assert not re.search(r'File ".*dist_tune/', proc.stderr), proc.stderr[-3000:]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_planted_rng_pickle_does_not_run_on_resume(engine, trained, tmp_path):
    run = copy_run(trained, engine, tmp_path, "run")
    marker = tmp_path / "ran"
    torch.save(RunsCode(marker), run / CHECKPOINT / "rng_rank0.pt")
    proc = train(tmp_path, "run", engine, steps=3, check=False)
    refused(proc, f"checkpoint file {run / CHECKPOINT / 'rng_rank0.pt'} holds the global 'posix.system'")
    assert not marker.exists()


@pytest.mark.parametrize("engine, target", [("fsdp", "dcp/.metadata"),
                                            ("zero3", "deepspeed/state/zero_pp_rank_0_mp_rank_00_model_states.pt")])
def test_planted_library_pickles_do_not_run_on_resume_or_export(engine, target, trained, tmp_path):
    run = copy_run(trained, engine, tmp_path, "run")
    marker = tmp_path / "ran"
    file = run / CHECKPOINT / target
    if file.suffix == ".pt":
        torch.save(RunsCode(marker), file)
    else:
        import pickle

        file.write_bytes(pickle.dumps(RunsCode(marker)))
    refused(train(tmp_path, "run", engine, steps=3, check=False),
            f"checkpoint file {file} holds the global 'posix.system'")
    refused(dist_tune("export", str(run), check=False), f"checkpoint file {file} holds the global 'posix.system'")
    assert not marker.exists()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_flipped_byte_is_refused_by_resume_and_export_unless_verification_is_off(engine, trained, tmp_path):
    run = copy_run(trained, engine, tmp_path, "run")
    shard = max((p for p in (run / CHECKPOINT).rglob("*") if p.is_file() and p.suffix in (".pt", ".distcp")),
                key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = f"checkpoint {run / CHECKPOINT}: file {shard} changed since it was written (SHA-256 differs)"
    refused(train(tmp_path, "run", engine, steps=3, check=False), line)
    refused(dist_tune("export", str(run), check=False), line)
    if engine == "single":  # the user who accepts the risk
        out = Path(dist_tune("export", str(run), "--verify=false").stdout.strip().splitlines()[-1])
        assert (out / "model.safetensors").is_file()


def test_an_honest_checkpoint_of_the_old_format_still_resumes(trained, tmp_path):
    """RNG files with NumPy's tuple state and a COMPLETE marker without digests, as written before."""
    run = copy_run(trained, "single", tmp_path, "run")
    state = torch.load(run / CHECKPOINT / "rng_rank0.pt", weights_only=True)
    numpy = state["numpy"]
    state["numpy"] = ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
                      numpy["cached_gaussian"])
    torch.save(state, run / CHECKPOINT / "rng_rank0.pt")
    (run / CHECKPOINT / COMPLETE).write_text("ok\n")
    proc = train(tmp_path, "run", "single", steps=3)
    assert "resumed from" in proc.stderr and "not verified" in proc.stderr


def test_planted_secrets_reach_no_file_and_no_log_line(tmp_path):
    secrets = {"HF_TOKEN": "hf_PLANTEDsecret0123456789", "WANDB_API_KEY": "planted0123456789abcdef0123456789abcdef01"}
    proc = dist_tune("train", *TINY, "--train.max_steps=2", "--checkpoint.save_steps=2", "--log.wandb.mode=offline",
                     f"--train.output_dir={tmp_path}", "--train.run_name=run",
                     env={**os.environ, **secrets})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "metrics.jsonl" for p in files)
    for value in secrets.values():
        assert value not in proc.stdout and value not in proc.stderr
        leaked = [p for p in files if value.encode() in p.read_bytes()]
        assert not leaked, leaked
