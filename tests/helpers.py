"""Shared helpers: run the real CLI (optionally under torchrun with 2 gloo ranks) and read its outputs."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Overrides that shrink a run to a 2-layer, 64-wide Llama on short plain-template prompts.
TINY_OVERRIDES = ["--model.name_or_path=tiny-llama", "--data.max_length=64", "--data.prompt_template=plain",
                  "--train.micro_batch_size=4", "--optim.warmup_steps=0", "--checkpoint.save_steps=null",
                  "--log.progress=false", "--log.wandb.mode=disabled", "--train.eval_max_batches=2",
                  "--eval.generate_samples=0"]
# The packaged demo recipe (`--config=demo`, the positional CONFIG of `dist-tune train`) with those overrides.
TINY = ["--config=demo", *TINY_OVERRIDES]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def seeded(args: tuple[str, ...]) -> tuple[str, ...]:
    """`train` args with --train.seed=$DT_TEST_SEED added when that is set and the args name no seed: reruns the
    tests that assert a learned quality under other seeds (see README, "Set up")."""
    seed = os.environ.get("DT_TEST_SEED")
    if not seed or args[:1] != ("train",) or any(a.startswith("--train.seed=") for a in args):
        return args
    return (*args, f"--train.seed={seed}")


def seed_overrides() -> dict:
    """{"train.seed": $DT_TEST_SEED} when that is set: a model a test builds in-process to compare with a CLI
    run's (its random init) then has the run's seed."""
    seed = os.environ.get("DT_TEST_SEED")
    return {"train.seed": int(seed)} if seed else {}


def dist_tune(*args: str, nproc: int = 1, env: dict | None = None, timeout: int = 900,
              check: bool = True, torchrun_args: tuple[str, ...] | list[str] = ()) -> subprocess.CompletedProcess:
    """Run `dist-tune ARGS` (under torchrun when nproc > 1, with extra `torchrun_args` such as
    --max-restarts=1) and return the finished process."""
    args = seeded(args)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", *torchrun_args,
               "-m", "dist_tune.cli", *args]
    else:
        cmd = [sys.executable, "-m", "dist_tune.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row[key] for row in rows if key in row}


def read_wandb_log(path: Path) -> list:
    """Records of a .wandb transaction log: 7-byte file header (":W&B", key, version), then LevelDB-log
    style 32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last),
    each record a serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} from the offline W&B run(s) under run_dir/wandb."""
    history: dict[int, dict[str, float]] = {}
    for log in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in read_wandb_log(log):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            history.setdefault(int(row.pop("_step")), {}).update(row)
    return history


def hub_snapshot(cache: Path, repo_id: str, commit: str = "a" * 40, ref: str = "main") -> Path:
    """The snapshot directory of repo_id at `commit` in a hub cache laid out as `hf download` writes it, with
    refs/`ref` naming that commit; save_pretrained a model into it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


class RunsCode:
    """What a hostile writer of a run directory plants: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
