"""dist_tune.cluster: launcher detection from env, Slurm syntax parsers, head address; launch/ and slurm/ scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_tune import cluster
from dist_tune.cluster import (
    ClusterEnv,
    ClusterEnvError,
    detect,
    expand_nodelist,
    parse_tasks_per_node,
    port_from_job_id,
)


@pytest.fixture(autouse=True)
def _no_scontrol(monkeypatch):
    """Unit tests never talk to a real Slurm (a local test cluster may be up on this machine)."""
    monkeypatch.setattr(cluster, "_scontrol", lambda: None)


def _detect(env: dict[str, str], **kw) -> ClusterEnv:
    kw.setdefault("resolve", False)
    return detect(env, **kw)


# ------------------------------------------------------------------------------------------ torchrun

TORCHRUN_2x2_RANK3 = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3",
    "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc",
}


def test_torchrun_multinode():
    e = _detect(TORCHRUN_2x2_RANK3)
    assert e == ClusterEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                           num_nodes=2, master_addr="10.0.0.5", master_port=29400, launcher="torchrun")
    assert e.is_distributed and not e.is_main and not e.is_local_main


def test_torchrun_standalone_rank0():
    e = _detect({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                 "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
    assert (e.launcher, e.rank, e.world_size, e.num_nodes, e.node_rank) == ("torchrun", 0, 2, 1, 0)
    assert e.is_main and e.is_distributed


def test_torchrun_without_group_vars_derives_node_rank():
    e = _detect({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (e.node_rank, e.num_nodes) == (1, 2)


def test_torchrun_world_one_is_not_distributed():
    e = _detect({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    assert e.launcher == "torchrun" and not e.is_distributed and e.master_port == 29500


def test_torchrun_inconsistent_rank_is_an_error():
    with pytest.raises(ClusterEnvError, match="rank 4"):
        _detect({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ClusterEnvError, match="not an integer"):
        _detect({"RANK": "x", "WORLD_SIZE": "4"})


# ------------------------------------------------------------------------------------- srun-direct

def _srun_env(**over) -> dict[str, str]:
    """Task 5 of `srun -N3 --ntasks-per-node=2` (what slurmd exports to each task)."""
    env = {
        "SLURM_JOB_ID": "123456", "SLURM_JOBID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_NTASKS": "6", "SLURM_NPROCS": "6", "SLURM_NNODES": "3", "SLURM_JOB_NUM_NODES": "3",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x3)",
        "SLURM_JOB_NODELIST": "gpu-a[07-08],gpu-b01", "SLURM_NODELIST": "gpu-a[07-08],gpu-b01",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_srun_multinode():
    e = _detect(_srun_env())
    assert e == ClusterEnv(rank=5, local_rank=1, world_size=6, local_world_size=2, node_rank=2,
                           num_nodes=3, master_addr="gpu-a07", master_port=10000 + 123456 % 50000,
                           launcher="slurm", slurm_job_id="123456")


def test_srun_uneven_tasks_per_node():
    # srun -n 5 over 2 nodes: "3,2"; this task is on the second node
    e = _detect(_srun_env(SLURM_NTASKS="5", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE=None,
                          SLURM_TASKS_PER_NODE="3,2", SLURM_PROCID="4", SLURM_NODEID="1", SLURM_LOCALID="1",
                          SLURM_JOB_NODELIST="n[1-2]"))
    assert (e.world_size, e.local_world_size, e.node_rank, e.num_nodes, e.master_addr) == (5, 2, 1, 2, "n1")


def test_srun_tasks_per_node_repeat_format():
    e = _detect(_srun_env(SLURM_NTASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="4(x2),1",
                          SLURM_NTASKS="9", SLURM_PROCID="8", SLURM_NODEID="2", SLURM_LOCALID="0"))
    assert e.local_world_size == 1
    e = _detect(_srun_env(SLURM_NTASKS_PER_NODE=None, SLURM_TASKS_PER_NODE="4(x2),1",
                          SLURM_NTASKS="9", SLURM_PROCID="6", SLURM_NODEID="1", SLURM_LOCALID="2"))
    assert e.local_world_size == 4


def test_srun_step_variables_win_over_job_variables():
    # a 2-task step inside a 4-node allocation
    e = _detect(_srun_env(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="1(x2)",
                          SLURM_STEP_NODELIST="gpu[3-4]", SLURM_JOB_NODELIST="gpu[1-4]",
                          SLURM_NTASKS="8", SLURM_NNODES="4", SLURM_TASKS_PER_NODE="2(x4)",
                          SLURM_PROCID="1", SLURM_NODEID="1", SLURM_LOCALID="0"))
    assert (e.world_size, e.num_nodes, e.local_world_size, e.master_addr) == (2, 2, 1, "gpu3")


def test_srun_single_node_no_tasks_per_node_vars():
    e = _detect(_srun_env(SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE=None,
                          SLURM_TASKS_PER_NODE=None, SLURM_PROCID="1", SLURM_NODEID="0", SLURM_LOCALID="1",
                          SLURM_JOB_NODELIST="node1"))
    assert (e.world_size, e.local_world_size, e.num_nodes, e.master_addr) == (2, 2, 1, "node1")


def test_srun_master_addr_and_port_from_env_win():
    e = _detect(_srun_env(MASTER_ADDR="10.1.2.3", MASTER_PORT="23456"))
    assert (e.master_addr, e.master_port) == ("10.1.2.3", 23456)


def test_srun_master_addr_uses_scontrol_hostnames(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="ctl-node\nother\n", stderr="")

    monkeypatch.setattr(cluster, "_scontrol", lambda: "/usr/bin/scontrol")
    monkeypatch.setattr(cluster.subprocess, "run", fake_run)
    e = _detect(_srun_env())
    assert e.master_addr == "ctl-node"
    assert calls == [["/usr/bin/scontrol", "show", "hostnames", "gpu-a[07-08],gpu-b01"]]


def test_srun_master_addr_resolved_via_nodeaddr(monkeypatch):
    def fake_run(cmd, **kw):
        if cmd[1:3] == ["show", "hostnames"]:
            return subprocess.CompletedProcess(cmd, 0, stdout="zz-unresolvable-node-1\n", stderr="")
        assert cmd[1:] == ["show", "node", "zz-unresolvable-node-1"]
        return subprocess.CompletedProcess(
            cmd, 0, stdout="NodeName=zz-unresolvable-node-1 Arch=x86_64\n   NodeAddr=10.9.8.7 NodeHostName=x\n", stderr="")

    monkeypatch.setattr(cluster, "_scontrol", lambda: "/usr/bin/scontrol")
    monkeypatch.setattr(cluster.subprocess, "run", fake_run)
    monkeypatch.setattr(cluster, "_resolves", lambda name: False)
    assert detect(_srun_env(), resolve=True).master_addr == "10.9.8.7"


def test_resolve_host():
    assert cluster.resolve_host("localhost") == "localhost"
    # unresolvable and no scontrol (fixture): returned unchanged
    assert cluster.resolve_host("zz-no-such-host.invalid") == "zz-no-such-host.invalid"


def test_head_address_is_the_first_node_of_the_step_else_the_job():
    assert cluster.head_address({"SLURM_JOB_NODELIST": "gpu[07-08],x1"}, resolve=False) == "gpu07"
    assert cluster.head_address({"SLURM_STEP_NODELIST": "gpu08", "SLURM_JOB_NODELIST": "gpu[07-08]"},
                                resolve=False) == "gpu08"
    assert cluster.head_address({}) == "127.0.0.1"


def test_head_address_command_prints_the_resolved_first_node():
    """What slurm/multi_node.sbatch and preemptible.sbatch run in the batch shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run = subprocess.run([sys.executable, "-m", "dist_tune.cluster", "head-address"], capture_output=True, text=True,
                         env={**env, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost,gpu[1-2]"}, timeout=60)
    assert (run.returncode, run.stdout) == (0, "localhost\n"), run.stderr
    run = subprocess.run([sys.executable, "-m", "dist_tune.cluster"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage: python -m dist_tune.cluster head-address" in run.stderr


def test_batch_script_is_not_a_rank(caplog):
    # python run straight from an sbatch script with --ntasks=2: no SLURM_STEP_ID -> single, with a warning
    env = _srun_env(SLURM_STEP_ID=None, SLURM_STEPID=None, SLURM_PROCID="0", SLURM_NTASKS="2")
    e = _detect(env)
    assert e.launcher == "single" and e.world_size == 1 and e.slurm_job_id == "123456"
    assert "not an srun task" in caplog.text


# ------------------------------------------------------------------------------------------- mixed

def test_torchrun_inside_slurm_allocation_wins():
    env = _srun_env(SLURM_PROCID="0", SLURM_NODEID="0", SLURM_NTASKS="2", SLURM_NNODES="2",
                    SLURM_TASKS_PER_NODE="1(x2)", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="node[1-2]")
    # torchrun on the second node of `srun --ntasks-per-node=1 torchrun --nproc-per-node 2`; c10d gave it
    # GROUP_RANK 1 even though slurm says node 0 of the step here
    env.update({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node2", "MASTER_PORT": "41000"})
    e = _detect(env)
    assert e == ClusterEnv(rank=2, local_rank=0, world_size=4, local_world_size=2, node_rank=1, num_nodes=2,
                           master_addr="node2", master_port=41000, launcher="torchrun", slurm_job_id="123456")


# ------------------------------------------------------------------------------------------- single

def test_single_empty_env():
    e = _detect({})
    assert e == ClusterEnv()
    assert (e.launcher, e.rank, e.world_size, e.is_distributed, e.is_main) == ("single", 0, 1, False, True)


def test_single_in_salloc_shell_keeps_job_id():
    e = _detect({"SLURM_JOB_ID": "77", "SLURM_NNODES": "1"})
    assert e.launcher == "single" and e.slurm_job_id == "77"


def test_detect_defaults_to_os_environ(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert detect().rank == 1


def test_clusterenv_validation():
    with pytest.raises(ClusterEnvError):
        ClusterEnv(launcher="mpi")
    with pytest.raises(ClusterEnvError):
        ClusterEnv(local_rank=2, local_world_size=2)
    with pytest.raises(ClusterEnvError):
        ClusterEnv(master_port=70000)
    assert ClusterEnv(rank=1, world_size=2, local_rank=1, local_world_size=2).torch_env()["LOCAL_RANK"] == "1"


# ------------------------------------------------------------------------------------------ parsers

@pytest.mark.parametrize("nodelist, expected", [
    ("node1", ["node1"]),
    ("node[1-3,7],gpu01", ["node1", "node2", "node3", "node7", "gpu01"]),
    ("gpu-a[08-11]", ["gpu-a08", "gpu-a09", "gpu-a10", "gpu-a11"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1-2],b[3],c", ["a1", "a2", "b3", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("host.example.com,h2", ["host.example.com", "h2"]),
    ("", []),
    ("(null)", []),
])
def test_expand_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[3-1]", "node[a-b]", "node[]"])
def test_expand_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


@pytest.mark.parametrize("spec, expected", [
    ("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("1,4(x2)", [1, 4, 4]), ("", []),
])
def test_parse_tasks_per_node(spec, expected):
    assert parse_tasks_per_node(spec) == expected


def test_parse_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(3)")


def test_master_port_derivation():
    assert port_from_job_id("123456") == 10000 + 123456 % 50000 == 33456
    assert port_from_job_id(7) == 10007
    assert port_from_job_id(49999) == 59999 and port_from_job_id(50000) == 10000
    for j in range(0, 10 ** 6, 9973):
        assert 10000 <= port_from_job_id(j) < 60000
    # the same port on every node of a job, whatever the rank
    a = _detect(_srun_env(SLURM_PROCID="0", SLURM_NODEID="0", SLURM_LOCALID="0"))
    b = _detect(_srun_env())
    assert a.master_port == b.master_port == 33456
    # no job id, no MASTER_PORT: torch's default
    assert _detect({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).master_port == 29500


# ------------------------------------------------------------------------- launch/ and slurm/ scripts

REPO = Path(__file__).resolve().parents[2]


def _dry(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "RDZV_HOST", "RDZV_PORT", "RDZV_ID",
                         "RDZV_IS_HOST", "MAX_RESTARTS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    return subprocess.run(["bash", str(REPO / script), *args], env={**base, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=30)


def test_torchrun_local_dry_run():
    r = _dry("launch/torchrun_local.sh", "cfg.yaml", "--engine.kind=ddp", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 0, r.stderr
    assert "--standalone --nnodes=1 --nproc-per-node=2 --max-restarts=0 -m dist_tune.cli train cfg.yaml --engine.kind=ddp" in r.stdout
    r = _dry("launch/torchrun_local.sh", "4", "--train.max_steps=3", MAX_RESTARTS="2", CUDA_VISIBLE_DEVICES="")
    assert "--nproc-per-node=4 --max-restarts=2 -m dist_tune.cli train --train.max_steps=3" in r.stdout
    r = _dry("launch/torchrun_local.sh", "cfg.yaml", CUDA_VISIBLE_DEVICES="0,1,2")
    assert "--nproc-per-node=3 " in r.stdout


def test_torchrun_multinode_dry_run():
    r = _dry("launch/torchrun_multinode.sh", "cfg.yaml")
    assert r.returncode == 2 and "NNODES" in r.stderr
    r = _dry("launch/torchrun_multinode.sh", "cfg.yaml", "--train.run_name=a b", NNODES="2", RDZV_HOST="10.0.0.1",
             NPROC_PER_NODE="8", NODE_RANK="0", SLURM_JOB_ID="99")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for piece in ("--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=99",
                  "--node-rank=0", "--rdzv-conf=is_host=1", "-m dist_tune.cli train cfg.yaml --train.run_name=a\\ b"):
        assert piece in out, out
    r = _dry("launch/torchrun_multinode.sh", NNODES="1:4", RDZV_HOST="h", RDZV_PORT="1234", NPROC_PER_NODE="1")
    assert "--nnodes=1:4" in r.stdout and "h:1234" in r.stdout and "is_host" not in r.stdout


GPU_TEMPLATES = ["single_node", "multi_node", "preemptible"]


@pytest.mark.parametrize("name", [*GPU_TEMPLATES, "cpu_debug"])
def test_sbatch_templates_parse_and_document_usage(name):
    path = REPO / "slurm" / f"{name}.sbatch"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "sbatch" in text.split("#SBATCH")[0] and f"slurm/{name}.sbatch" in text
    assert '"$@"' in text                 # config + overrides pass through
    if name == "preemptible":
        for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append"):
            assert line in text
    if name in ("multi_node", "preemptible"):
        assert "NCCL_SOCKET_IFNAME" in text and "NCCL_IB_HCA" in text and "SLURM_NODEID" in text
        assert '"$PYTHON" -m dist_tune.cluster head-address' in text and "scontrol show node" not in text
    if name in GPU_TEMPLATES:   # whole GPU nodes by default; the GPU count from launch/common.sh
        for line in ("#SBATCH --cpus-per-task=32\n", "#SBATCH --mem=0\n", "#SBATCH --exclusive\n"):
            assert line in text
        assert 'source "$ROOT/launch/common.sh"' in text and "$(gpu_count)" in text
        assert "SLURM_GPUS_ON_NODE" not in text
    else:
        assert "#SBATCH --cpus-per-task=1\n" in text and "--exclusive" not in text and "--mem" not in text


def _fake_slurm(tmp_path: Path, **env: str) -> dict[str, str]:
    """A batch shell's environment on a node with 4 visible GPUs and 32 CPUs, with `srun` printing its environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $1 NPROC=$NPROC_PER_NODE HEAD=$HEAD_ADDR:$RDZV_PORT '
                                  'OMP=$OMP_NUM_THREADS"\n')
    (bin_dir / "srun").chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("NPROC_PER_NODE", "GPUS_PER_NODE", "OMP_NUM_THREADS")}
    return {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_ID": "123", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "localhost,gpu2",
            "SLURM_CPUS_PER_TASK": "32", "CUDA_VISIBLE_DEVICES": "0,1,2,3", **env}


def test_multi_node_sbatch_takes_gpus_from_gpu_count_and_head_from_dist_tune(tmp_path):
    r = subprocess.run(["bash", str(REPO / "slurm/multi_node.sbatch"), "cfg.yaml"], env=_fake_slurm(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "srun --nodes=2 NPROC=4 HEAD=localhost:10123 OMP=8" in r.stdout, r.stdout


def test_single_node_sbatch_without_launch_dir_says_how_to_fix(tmp_path):
    r = subprocess.run(["bash", str(REPO / "slurm/single_node.sbatch")], capture_output=True, text=True, timeout=60,
                       env=_fake_slurm(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path)))
    assert r.returncode == 2
    assert f"no launch/common.sh under {tmp_path}: submit from the dist_tune checkout or set DIST_TUNE_ROOT" in r.stderr
