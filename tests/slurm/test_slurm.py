"""Real Slurm jobs on the local two-node cluster (tests/slurm/cluster.sh): the sbatch templates in slurm/
run dist-tune across two "nodes" (two slurmd on this host), and a preempted job resumes exactly.

    tests/slurm/cluster.sh start && pytest -m slurm tests/slurm        # or: DT_SLURM=1 pytest tests/slurm
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
            "OUT_OF_MEMORY"}
TINY = ["--config=demo", "--model.name_or_path=tiny-llama", "--eval.generate_samples=0"]  # the demo recipe, 2 layers, no generation
JOB_TIMEOUT_S = 420


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment (sbatch exports it to the job: PATH, python) without launcher variables
    from an enclosing torchrun/Slurm job."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID", "NPROC_PER_NODE", "GPUS_PER_NODE")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    env.update(extra)
    return env


# The templates ask for whole GPU nodes (--exclusive, --cpus-per-task=32, --mem=0); the test "nodes" share 2 cores
# and two jobs run at once, so the command line (which wins over #SBATCH lines) shrinks them.
SMALL_NODES = ["--cpus-per-task=1", "--oversubscribe"]


def submit(script: Path, args: list[str], out_dir: Path, *, nodes: int = 2, sbatch_args: tuple[str, ...] = (),
           **env: str) -> str:
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", *SMALL_NODES, *sbatch_args, f"--output={out_dir}/%x-%j.out",
           str(script), *args]
    res = subprocess.run(cmd, cwd=REPO, env=job_env(**env), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(cmd)} failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def job_info(jid: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout)) if res.returncode == 0 else {}


def job_output(out_dir: Path, jid: str) -> str:
    files = sorted(out_dir.glob(f"*-{jid}.out"))
    return "\n".join(f.read_text(errors="replace") for f in files)


def wait_job(jid: str, out_dir: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(jid)
        if info.get("JobState") in TERMINAL:
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", jid], timeout=30)
            pytest.fail(f"job {jid} not finished after {timeout:.0f}s (state {info.get('JobState')}):\n"
                        f"{job_output(out_dir, jid)[-6000:]}")
        time.sleep(1)


def assert_completed(info: dict[str, str], out_dir: Path, jid: str) -> str:
    out = job_output(out_dir, jid)
    assert info.get("JobState") == "COMPLETED", f"job {jid}: {info.get('JobState')} {info.get('ExitCode')}\n{out[-8000:]}"
    return out


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    assert path.is_file(), f"no {path}"
    return json.loads(path.read_text())


def _two_node_run(tmp_path: Path, engine_args: list[str], nproc: int = 1) -> str:
    """The job's output, after checking that it ran one torchrun per node with `nproc` workers each and trained."""
    run_dir = tmp_path / "run"
    args = [*TINY, "--train.max_steps=6", f"--train.output_dir={tmp_path}", "--train.run_name=run", *engine_args]
    t0 = time.monotonic()
    jid = submit(SLURM_DIR / "multi_node.sbatch", args, tmp_path, NPROC_PER_NODE=str(nproc))
    info = wait_job(jid, tmp_path)
    out = assert_completed(info, tmp_path, jid)
    print(f"job {jid} {engine_args}: {time.monotonic() - t0:.1f}s")
    # one torchrun per node, each with `nproc` workers -> world size 2 × nproc over node1 and node2
    assert re.search(rf"\[node 0 node1\] exec .*--nnodes=2 .*--nproc-per-node={nproc} ", out), out[-4000:]
    assert re.search(r"\[node 1 node2\] exec .*--rdzv-backend=c10d ", out), out[-4000:]
    summary = read_summary(run_dir)
    assert summary["steps"] == 6
    assert math.isfinite(summary["final_train_loss"])
    return out


def test_multi_node_fsdp(slurm_cluster, tmp_path):
    _two_node_run(tmp_path, ["--engine.kind=fsdp"])


def test_multi_node_deepspeed_zero3(slurm_cluster, tmp_path):
    _two_node_run(tmp_path, ["--engine.kind=deepspeed", "--engine.zero_stage=3"])


def test_multi_node_hsdp_shards_within_each_node_and_prepares_the_data_once(slurm_cluster, tmp_path):
    """The 70B recipe's layout at small scale: 2 nodes × 2 ranks with replicate_degree 2, so each node's torchrun
    (ranks 0-1, ranks 2-3) holds one replica sharded over its 2 ranks. The nodes share the data cache directory,
    so rank 0 alone tokenizes; the 3 other ranks memory-map its files."""
    out = _two_node_run(tmp_path, ["--engine.kind=fsdp", "--engine.replicate_degree=2",
                                   f"--data.cache_dir={tmp_path / 'cache'}"], nproc=2)
    assert "FSDP mesh {'replicate': 2, 'shard': 2}" in out, out[-4000:]
    prepared = [line for line in out.splitlines() if "data from 'bundled:instructions': prepared " in line]
    assert len(prepared) == 2 and all("[rank 0]" in line for line in prepared), prepared  # train and validation
    assert "[rank 0] this rank prepares the data for the job (every rank sees the cache directory" in out
    reused = [line for line in out.splitlines() if "using the data rank 0 prepared in" in line]
    assert sorted(line.split("[rank ")[1][0] for line in reused) == ["1", "2", "3"], reused


def test_prepare_job_then_a_dependent_training_job_that_reuses_its_data(slurm_cluster, tmp_path):
    """README's chain: slurm/prepare.sbatch on a CPU node, then the training job with --dependency=afterok: no rank
    of the training job tokenizes."""
    data = [f"--data.cache_dir={tmp_path / 'cache'}", "--data.path=bundled:text", "--data.format=text",
            "--data.pack=true", "--data.max_length=64"]
    prep = submit(SLURM_DIR / "prepare.sbatch", [*TINY, *data], tmp_path, nodes=1, sbatch_args=("--mem=0",))
    args = [*TINY, *data, "--engine.kind=ddp", "--train.max_steps=2", f"--train.output_dir={tmp_path}",
            "--train.run_name=run"]
    train = submit(SLURM_DIR / "multi_node.sbatch", args, tmp_path, sbatch_args=(f"--dependency=afterok:{prep}",),
                   NPROC_PER_NODE="1")
    report = json.loads(assert_completed(wait_job(prep, tmp_path), tmp_path, prep).strip().splitlines()[-1])
    out = assert_completed(wait_job(train, tmp_path), tmp_path, train)
    assert report["train_tokens"] > 0 and report["train_rows"] == math.ceil(report["train_tokens"] / 64)
    assert "data from 'bundled:text': prepared " not in out and "Tokenizing" not in out, out[-4000:]
    assert "[rank 0] data from 'bundled:text': " in out and "prepared earlier, memory-mapped from" in out
    assert "[rank 1] using the data rank 0 prepared in" in out, out[-4000:]
    assert read_summary(tmp_path / "run")["steps"] == 2


def test_preemption_requeue_resumes_exactly(slurm_cluster, tmp_path):
    """USR1 to the batch shell once the first checkpoint exists -> forwarded to every rank -> checkpoint,
    `scontrol requeue` -> the same job id runs again (Restarts=1) with train.resume=auto -> the final loss
    equals that of an uninterrupted run of the same config."""
    common = [*TINY, "--engine.kind=fsdp", "--train.max_steps=30", "--checkpoint.save_steps=2",
              f"--train.output_dir={tmp_path}"]
    script = SLURM_DIR / "preemptible.sbatch"
    ref = submit(script, [*common, "--train.run_name=reference"], tmp_path, NPROC_PER_NODE="1")
    pre = submit(script, [*common, "--train.run_name=preempted"], tmp_path, NPROC_PER_NODE="1")
    run_dir = tmp_path / "preempted"

    # signal as soon as the first complete checkpoint exists
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any((run_dir / "checkpoints").glob("step_*/COMPLETE")):
        info = job_info(pre)
        if info.get("JobState") in TERMINAL:
            pytest.fail(f"job {pre} ended before its first checkpoint:\n{job_output(tmp_path, pre)[-6000:]}")
        if time.monotonic() > deadline:
            subprocess.run(["scancel", pre, ref], timeout=30)
            pytest.fail(f"no checkpoint in {run_dir} after {JOB_TIMEOUT_S}s:\n{job_output(tmp_path, pre)[-6000:]}")
        time.sleep(0.2)
    first = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
    res = subprocess.run(["scancel", "--signal=USR1", "--batch", pre], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr

    info = wait_job(pre, tmp_path)
    out = assert_completed(info, tmp_path, pre)
    ref_info = wait_job(ref, tmp_path)
    assert_completed(ref_info, tmp_path, ref)

    # it was requeued once and ran again under the same job id
    assert info.get("Restarts") == "1", f"Restarts={info.get('Restarts')} (checkpoints at signal: {first})\n{out[-6000:]}"
    assert ref_info.get("Restarts") == "0"
    assert "batch shell got USR1: forwarding to the step" in out, out[-6000:]
    assert re.search(r"attempt 1\] start: SLURM_RESTART_COUNT=1", out), out[-6000:]
    assert "got SIGUSR1; stopping after this step" in out, out[-6000:]
    assert "requeueing Slurm job" in out, out[-6000:]

    pre_summary, ref_summary = read_summary(run_dir), read_summary(tmp_path / "reference")
    assert pre_summary["steps"] == ref_summary["steps"] == 30
    assert pre_summary["final_train_loss"] == pytest.approx(ref_summary["final_train_loss"], rel=1e-5), (
        pre_summary, ref_summary)
