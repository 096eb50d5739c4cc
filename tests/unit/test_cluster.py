"""dist_tune.cluster: launcher detection from env, Slurm syntax parsers, preemption flag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_tune import cluster
from dist_tune.cluster import (
    ClusterEnv,
    ClusterEnvError,
    PreemptionHandler,
    detect,
    expand_nodelist,
    parse_tasks_per_node,
    port_from_job_id,
)


@pytest.fixture(autouse=True)
def _no_scontrol(monkeypatch):
    """Unit tests never talk to a real Slurm (a local test cluster may be up on this machine)."""
    monkeypatch.setattr(cluster, "_scontrol", lambda: None)


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    cluster._early_signal = None
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    cluster._early_signal = None


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


# ------------------------------------------------------------------------------------------ preemption

def test_preemption_flag_from_real_sigusr1():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(ClusterEnv()) as h:
        assert not h.should_stop() and not h.received
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 5
        while not h.received and time.time() < deadline:
            time.sleep(0.01)   # the Python-level handler runs between bytecodes of the main thread
        assert h.received and h.signal_name == "SIGUSR1"
        assert h.should_stop() and h.should_stop()   # sticky
    assert signal.getsignal(signal.SIGUSR1) == before


def test_constructor_installs_and_uninstall_restores():
    before = signal.getsignal(signal.SIGTERM)
    h = PreemptionHandler()          # how the trainer builds it: installed at once
    try:
        assert signal.getsignal(signal.SIGTERM) == h._handle
        h.install()                  # idempotent: does not lose the original handler
    finally:
        h.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before
    h2 = PreemptionHandler(install=False)
    assert signal.getsignal(signal.SIGUSR1) != h2._handle


def test_preemption_flag_from_sigterm_does_not_kill():
    with PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert h.should_stop() and h.signal_name == "SIGTERM"


def test_early_sigusr1_is_kept_for_the_handler():
    """USR1 during model loading (before the trainer builds its handler) is neither lost nor fatal."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)      # as inherited from the sbatch templates
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert cluster.capture_early_preemption_signal()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # SIGTERM is never captured early
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    h = PreemptionHandler()
    try:
        assert h.received and h.signal_name == "SIGUSR1" and h.should_stop()
    finally:
        h.uninstall()
    h2 = PreemptionHandler()                                      # consumed once
    assert not h2.received
    h2.uninstall()
    # a handler someone else installed is left alone
    mine = lambda s, f: None  # noqa: E731
    signal.signal(signal.SIGUSR1, mine)
    assert not cluster.capture_early_preemption_signal()
    assert signal.getsignal(signal.SIGUSR1) is mine


def test_preemption_sigint_optional():
    with PreemptionHandler() as h:
        assert signal.SIGINT not in h.signals
    with PreemptionHandler(handle_sigint=True) as h:
        h.trigger(signal.SIGINT)
        assert h.should_stop()
        with pytest.raises(KeyboardInterrupt):
            h.trigger(signal.SIGINT)   # second Ctrl-C: really stop


def test_preemption_should_stop_single_process_group():
    """With a (world-of-1, gloo) process group should_stop() goes through the all-reduce path."""
    import torch.distributed as dist

    env = ClusterEnv(master_port=cluster.port_from_job_id(os.getpid() % 40000 + 5000))
    assert cluster.init_distributed(env, force=True)
    try:
        h = PreemptionHandler(env, install=False)
        assert not h.should_stop(device="cpu")
        h.trigger()
        assert h.should_stop()
        assert dist.is_initialized()
    finally:
        cluster.destroy_distributed()
    assert not dist.is_initialized()
    cluster.destroy_distributed()  # twice is fine


def test_init_distributed_single_is_noop():
    assert cluster.init_distributed(ClusterEnv()) is False


def test_requeue(monkeypatch, caplog):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cluster.subprocess, "run", fake_run)
    # not in slurm
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOBID", raising=False)
    assert PreemptionHandler(ClusterEnv(), install=False).requeue() is False and calls == []
    # not rank 0
    assert PreemptionHandler(ClusterEnv(rank=1, world_size=2, slurm_job_id="42"), install=False).requeue() is False
    assert calls == []
    # rank 0 in slurm
    assert PreemptionHandler(ClusterEnv(world_size=2, slurm_job_id="42"), install=False).requeue() is True
    assert calls[-1][1:] == ["requeue", "42"]


def test_requeue_failure_is_logged_not_raised(monkeypatch, caplog):
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "scontrol: error: Requested operation is presently disabled")

    monkeypatch.setattr(cluster.subprocess, "run", failing)
    assert PreemptionHandler(ClusterEnv(slurm_job_id="42"), install=False).requeue() is False
    assert "presently disabled" in caplog.text

    def missing(cmd, **kw):
        raise FileNotFoundError(cmd[0])

    monkeypatch.setattr(cluster.subprocess, "run", missing)
    assert PreemptionHandler(ClusterEnv(slurm_job_id="42"), install=False).requeue() is False


def test_restart_count():
    assert cluster.restart_count({}) == 0
    assert cluster.restart_count({"SLURM_RESTART_COUNT": "2"}) == 2


_TWO_RANK_SCRIPT = r"""
import os, signal, sys, time
from dist_tune import cluster
env = cluster.detect()
cluster.init_distributed(env, backend="gloo", timeout_minutes=1)
h = cluster.PreemptionHandler(env)
if env.rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
stops = [h.should_stop() for _ in range(2)]
print(f"rank{env.rank} received={h.received} stops={stops}", flush=True)
cluster.destroy_distributed()
"""


def test_should_stop_agrees_across_two_ranks(tmp_path):
    """Only rank 1 gets SIGUSR1; both ranks see should_stop() True in the same step (gloo, 2 procs)."""
    script = tmp_path / "two.py"
    script.write_text(_TWO_RANK_SCRIPT)
    port = 20000 + os.getpid() % 20000
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    procs = []
    for r in range(2):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "rank0 received=False stops=[True, True]" in outs[0], outs
    assert "rank1 received=True stops=[True, True]" in outs[1], outs


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


@pytest.mark.parametrize("name", ["single_node", "multi_node", "preemptible", "cpu_debug"])
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
        assert "NCCL_SOCKET_IFNAME" in text and "NCCL_IB_HCA" in text
        assert "scontrol show hostnames" in text and "SLURM_NODEID" in text
