"""Where am I running? Rank / world / node / head address from torchrun or Slurm (no process group here:
see :mod:`dist_tune.process_group`; preemption: :mod:`dist_tune.preemption`).

Launchers recognised by :func:`detect`, first match wins:

``torchrun``
    ``RANK`` and ``WORLD_SIZE`` are set (torchrun, ``torch.distributed.launch``, deepspeed's launcher,
    or any env:// launch). Uses ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` (node rank),
    ``GROUP_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``. This wins over ``SLURM_*`` variables, so
    torchrun started by ``srun`` inside an sbatch allocation (slurm/multi_node.sbatch) is "torchrun"
    with its node rank taken from ``GROUP_RANK``; the Slurm job id is still recorded for requeue.
``slurm``
    ``srun`` started one process per rank directly (no torchrun): ``SLURM_STEP_ID`` and
    ``SLURM_PROCID`` are set. World size from ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``, node from
    ``SLURM_NODEID``, tasks on this node from ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``
    (``"2(x3),1"``) or ``SLURM_NTASKS_PER_NODE``; the head address is :func:`head_address`, and the port
    is ``MASTER_PORT`` or :func:`port_from_job_id`. The batch script itself (no ``SLURM_STEP_ID``)
    is never taken for a rank of a multi-task job: ``python train.py`` written straight into an
    sbatch script with ``--ntasks=2`` runs as a single process instead of hanging for a peer.
``single``
    Anything else: rank 0 of 1.

``python -m dist_tune.cluster head-address`` prints :func:`head_address` for the sbatch templates, so the
rendezvous host of a torchrun-per-node job is resolved by the same code as that of an srun-direct job.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dist_tune.errors import UserError

logger = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "slurm", "single")
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
PORT_BASE = 10000
PORT_SPAN = 50000
SCONTROL_TIMEOUT_S = 30


class ClusterEnvError(UserError):
    """The launcher environment is inconsistent (e.g. RANK >= WORLD_SIZE)."""


@dataclass(frozen=True)
class ClusterEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"
    # SLURM_JOB_ID when running inside a Slurm job (any launcher), else None: requeue and run-dir lock use it.
    slurm_job_id: str | None = None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ClusterEnvError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ClusterEnvError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ClusterEnvError(
                f"local_rank {self.local_rank} is not in [0, local_world_size={self.local_world_size})"
            )
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise ClusterEnvError(f"node_rank {self.node_rank} is not in [0, num_nodes={self.num_nodes})")
        if not 0 < self.master_port < 65536:
            raise ClusterEnvError(f"master_port {self.master_port} is not a TCP port")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def torch_env(self) -> dict[str, str]:
        """The env:// variables torch.distributed (and deepspeed, HF) read."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "NODE_RANK": str(self.node_rank),
        }

    def describe(self) -> str:
        return (
            f"{self.launcher}: rank {self.rank}/{self.world_size} local {self.local_rank}/{self.local_world_size} "
            f"node {self.node_rank}/{self.num_nodes} master {self.master_addr}:{self.master_port}"
            + (f" slurm job {self.slurm_job_id}" if self.slurm_job_id else "")
        )


# ----------------------------------------------------------------------------------------------------
# Slurm syntax helpers (pure Python, unit-tested)

def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside of [...] brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {s!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {s!r}")
    parts.append("".join(cur))
    return parts


def _expand_range_list(body: str) -> list[str]:
    """'1-3,07,10-11' -> ['1','2','3','07','10','11'] (zero padding kept, as Slurm does)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty range in [{body}]")
        if "-" in item:
            lo, _, hi = item.partition("-")
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"bad range {item!r}")
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"descending range {item!r}")
            out.extend(str(i).zfill(width) for i in range(a, b + 1))
        else:
            if not item.isdigit():
                raise ValueError(f"bad range item {item!r}")
            out.append(item)
    return out


def _expand_host_expr(expr: str) -> list[str]:
    """Expand one host expression that may contain several bracket groups: 'rack[1-2]-n[01-02]'."""
    m = re.search(r"\[([^\[\]]*)\]", expr)
    if not m:
        return [expr]
    prefix, suffix = expr[: m.start()], expr[m.end():]
    return [h for v in _expand_range_list(m.group(1)) for h in _expand_host_expr(prefix + v + suffix)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm hostlist syntax like ``scontrol show hostnames`` does.

    >>> expand_nodelist("node[1-3,7],gpu01")
    ['node1', 'node2', 'node3', 'node7', 'gpu01']
    >>> expand_nodelist("gpu-a[08-10]")
    ['gpu-a08', 'gpu-a09', 'gpu-a10']
    """
    nodelist = (nodelist or "").strip()
    if not nodelist or nodelist == "(null)":
        return []
    hosts: list[str] = []
    for expr in _split_top_level(nodelist):
        expr = expr.strip()
        if not expr:
            continue
        hosts.extend(_expand_host_expr(expr))
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE / SLURM_JOB_CPUS_PER_NODE syntax: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise ValueError(f"bad tasks-per-node spec {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def port_from_job_id(job_id: str | int) -> int:
    """A per-job rendezvous port in [10000, 60000): 10000 + job_id % 50000 (same on every node)."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise ValueError(f"job id {job_id!r} has no digits")
    return PORT_BASE + int(digits) % PORT_SPAN


def _scontrol() -> str | None:
    return shutil.which("scontrol")


def hostnames(nodelist: str, *, use_scontrol: bool = True) -> list[str]:
    """Hosts of a nodelist: ``scontrol show hostnames`` when available, else :func:`expand_nodelist`."""
    exe = _scontrol() if use_scontrol else None
    if exe:
        try:
            out = subprocess.run(
                [exe, "show", "hostnames", nodelist],
                capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S, check=True,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError) as e:
            logger.debug("scontrol show hostnames %s failed (%s); parsing it myself", nodelist, e)
    return expand_nodelist(nodelist)


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except (OSError, UnicodeError):
        return False


def resolve_host(name: str, *, use_scontrol: bool = True) -> str:
    """An address to reach host `name`: the name itself when it resolves (DNS or /etc/hosts), else the
    node's ``NodeAddr`` from ``scontrol show node NAME`` (Slurm node names need not be DNS names),
    else the name unchanged (the caller's connect error will then name it)."""
    if _resolves(name):
        return name
    exe = _scontrol() if use_scontrol else None
    if exe:
        try:
            out = subprocess.run(
                [exe, "show", "node", name], capture_output=True, text=True,
                timeout=SCONTROL_TIMEOUT_S, check=True,
            ).stdout
            m = re.search(r"\bNodeAddr=(\S+)", out)
            if m and m.group(1) not in ("(null)", ""):
                return m.group(1)
        except (OSError, subprocess.SubprocessError) as e:
            logger.debug("scontrol show node %s failed: %s", name, e)
    logger.warning("cannot resolve head node %r (no DNS entry, no Slurm NodeAddr); using it as is", name)
    return name


# ----------------------------------------------------------------------------------------------------
# detection

def _int(environ: Mapping[str, str], *keys: str, default: int | None = None) -> int | None:
    for k in keys:
        v = environ.get(k)
        if v is not None and str(v).strip() != "":
            try:
                return int(str(v).strip())
            except ValueError as e:
                raise ClusterEnvError(f"environment variable {k}={v!r} is not an integer") from e
    return default


def _job_id(environ: Mapping[str, str]) -> str | None:
    return environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or None


def _master_port(environ: Mapping[str, str]) -> int:
    port = _int(environ, "MASTER_PORT")
    if port is not None:
        return port
    job = _job_id(environ)
    return port_from_job_id(job) if job else DEFAULT_MASTER_PORT


def _detect_torchrun(environ: Mapping[str, str]) -> ClusterEnv:
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    local_rank = _int(environ, "LOCAL_RANK", default=0)
    local_world = _int(environ, "LOCAL_WORLD_SIZE")
    if local_world is None:
        # plain env:// launch without LOCAL_WORLD_SIZE: all ranks on this node, or Slurm's count
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE", default=world)
        if local_world is None or local_world <= local_rank:
            local_world = world
    num_nodes = _int(environ, "GROUP_WORLD_SIZE")
    if num_nodes is None:
        num_nodes = max(1, world // max(1, local_world))
    node_rank = _int(environ, "GROUP_RANK", "NODE_RANK")
    if node_rank is None:
        node_rank = rank // max(1, local_world)
    return ClusterEnv(
        rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes,
        master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_master_port(environ),
        launcher="torchrun", slurm_job_id=_job_id(environ),
    )


def head_address(environ: Mapping[str, str], *, resolve: bool = True, use_scontrol: bool = True) -> str:
    """The first host of the step's (else the job's) nodelist, resolved by :func:`resolve_host` unless
    `resolve` is off; 127.0.0.1 outside Slurm."""
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST") or "")
    hosts = hostnames(nodelist, use_scontrol=use_scontrol) if nodelist else []
    if not hosts:
        return DEFAULT_MASTER_ADDR
    return resolve_host(hosts[0], use_scontrol=use_scontrol) if resolve else hosts[0]


def _detect_srun(environ: Mapping[str, str], *, resolve: bool, use_scontrol: bool) -> ClusterEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world is None:
        raise ClusterEnvError("srun task without SLURM_NTASKS/SLURM_STEP_NUM_TASKS")
    local_rank = _int(environ, "SLURM_LOCALID", default=0)
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    num_nodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)

    local_world = None
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = parse_tasks_per_node(spec)
        if node_rank < len(counts):
            local_world = counts[node_rank]
    if local_world is None:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    if local_world is None:
        local_world = max(1, world // max(1, num_nodes))

    master_addr = environ.get("MASTER_ADDR") or head_address(environ, resolve=resolve, use_scontrol=use_scontrol)
    return ClusterEnv(
        rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes, master_addr=master_addr,
        master_port=_master_port(environ), launcher="slurm", slurm_job_id=_job_id(environ),
    )


def detect(environ: Mapping[str, str] | None = None, *, resolve: bool = True,
           use_scontrol: bool = True) -> ClusterEnv:
    """Read the launcher's environment (``os.environ`` by default). See the module doc for the rules.

    ``resolve``: turn the Slurm head node name into a reachable address (:func:`resolve_host`).
    ``use_scontrol``: allow calling ``scontrol`` (hostnames / NodeAddr); off, the pure-Python parser is used.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RANK") is not None and environ.get("WORLD_SIZE") is not None:
        return _detect_torchrun(environ)
    in_step = environ.get("SLURM_STEP_ID") is not None or environ.get("SLURM_STEPID") is not None
    if in_step and environ.get("SLURM_PROCID") is not None:
        return _detect_srun(environ, resolve=resolve, use_scontrol=use_scontrol)
    ntasks = _int(environ, "SLURM_NTASKS", default=1)
    if environ.get("SLURM_PROCID") is not None and ntasks and ntasks > 1:
        logger.warning(
            "SLURM_NTASKS=%s but this is the batch script, not an srun task: running as a single process "
            "(start one task per rank with srun, or torchrun per node)", ntasks,
        )
    return ClusterEnv(
        master_addr=environ.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_int(environ, "MASTER_PORT", default=DEFAULT_MASTER_PORT),
        launcher="single", slurm_job_id=_job_id(environ),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m dist_tune.cluster head-address``: print this Slurm job's rendezvous address."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["head-address"]:
        print("usage: python -m dist_tune.cluster head-address", file=sys.stderr)
        return 2
    print(head_address(os.environ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
