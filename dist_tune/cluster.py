"""Where am I running? Rank / world / node / head address from torchrun or Slurm, process-group setup,
and preemption handling (signal -> checkpoint -> requeue -> auto-resume).

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
    (``"2(x3),1"``) or ``SLURM_NTASKS_PER_NODE``; the head address is the first host of the step's
    nodelist (``scontrol show hostnames`` when available, else :func:`expand_nodelist`), and the port
    is ``MASTER_PORT`` or :func:`port_from_job_id`. The batch script itself (no ``SLURM_STEP_ID``)
    is never taken for a rank of a multi-task job: ``python train.py`` written straight into an
    sbatch script with ``--ntasks=2`` runs as a single process instead of hanging for a peer.
``single``
    Anything else: rank 0 of 1.

Preemption protocol (what the trainer does; see :class:`PreemptionHandler`)::

    handler = PreemptionHandler(env)                  # installs: SIGUSR1 + SIGTERM only set a flag
    for step in ...:
        train_step()
        if handler.should_stop():                     # all ranks agree (all-reduce MAX of the flag)
            save_checkpoint()                         # collective; ends with a barrier + COMPLETE marker
            barrier(); destroy_distributed()          # every rank is done writing
            handler.requeue()                         # rank 0, under Slurm: scontrol requeue $SLURM_JOB_ID
            sys.exit(PREEMPTED_EXIT_CODE)             # 0: torchrun must not restart, Slurm must not fail it

``scontrol requeue`` kills the whole job at once (every node) and puts it back in the queue; the
requeued job gets ``SLURM_RESTART_COUNT=1,2,...`` and, with ``train.resume=auto``, continues from the
checkpoint just written. Slurm keeps a requeued job ineligible for ``cred_expire`` seconds (AuthInfo,
default 120 s) before it can start again.

Signal delivery (verified on Slurm 22.05, proctrack/linuxproc; see slurm/preemptible.sbatch):
``--signal=B:USR1@T`` and ``scancel -s USR1 -b`` reach only the batch shell; ``--signal=USR1@T`` and
``scancel -s USR1 JOBID`` reach *every process* of every srun step (torchrun and its workers, even
though torchrun starts workers in new sessions), never the batch shell; ``scancel -f`` reaches both.
torchrun dies on SIGUSR1 (it has no handler for it), so the per-node command ignores USR1 before
``exec torchrun`` and only the workers (which install this handler) act on it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from dist_tune.errors import UserError

logger = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "slurm", "single")
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
PORT_BASE = 10000
PORT_SPAN = 50000
# Exit status of a rank that stopped because of preemption after saving (and, on rank 0, requeueing).
# 0 so that torchrun does not restart the workers and Slurm does not record a failure.
PREEMPTED_EXIT_CODE = 0
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
    # SLURM_JOB_ID when running inside a Slurm job (any launcher), else None: used by requeue().
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

    master_addr = environ.get("MASTER_ADDR")
    if not master_addr:
        nodelist = (
            environ.get("SLURM_STEP_NODELIST")
            or environ.get("SLURM_JOB_NODELIST")
            or environ.get("SLURM_NODELIST")
            or ""
        )
        hosts = hostnames(nodelist, use_scontrol=use_scontrol) if nodelist else []
        if hosts:
            master_addr = resolve_host(hosts[0], use_scontrol=use_scontrol) if resolve else hosts[0]
        else:
            master_addr = DEFAULT_MASTER_ADDR
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


# ----------------------------------------------------------------------------------------------------
# process group

def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def init_distributed(env: ClusterEnv, backend: str | None = None, timeout_minutes: float = 30,
                     *, force: bool = False) -> bool:
    """Create the default process group for `env`. Returns True when a group exists afterwards.

    No-op (False) for the ``single`` launcher unless ``force`` (a world-of-1 group, e.g. for FSDP
    on one device). In every case it starts recording an early SIGUSR1 for the PreemptionHandler
    built later (:func:`capture_early_preemption_signal`). Backend: `backend`, else nccl when CUDA is available, else gloo. Exports
    MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for srun-direct and single
    launches (torchrun already set them), and binds the CUDA device to ``local_rank``.
    """
    import torch
    import torch.distributed as dist

    capture_early_preemption_signal()
    if env.launcher == "single" and not force:
        return False
    if dist.is_initialized():
        return True
    backend = backend or default_backend()
    if env.launcher != "torchrun":
        os.environ.update(env.torch_env())
    else:
        for k, v in env.torch_env().items():
            os.environ.setdefault(k, v)
    if "nccl" in backend and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if env.local_rank >= n:
            raise ClusterEnvError(
                f"local_rank {env.local_rank} but only {n} CUDA devices visible on this node; "
                "launch at most one process per GPU"
            )
        torch.cuda.set_device(env.local_rank)
    logger.info("init_process_group(%s) %s", backend, env.describe())
    timeout = timedelta(minutes=timeout_minutes)
    store = _restart_store(env, timeout)
    dist.init_process_group(
        backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
        **({"store": store} if store is not None else {"init_method": "env://"}),
    )
    return True


def _restart_store(env: ClusterEnv, timeout: timedelta):
    """After a torchrun --max-restarts restart, a store whose keys are fresh; None otherwise (plain env://).

    torchrun workers share the agent's TCPStore, which outlives a restart with the previous attempt's keys
    (the peers' gloo/NCCL addresses) in it, so the restarted group connects to dead peers (pytorch#135712).
    On one node every worker gets the same TORCHELASTIC_RESTART_COUNT, which then namespaces the keys;
    across nodes the count is per agent and may differ, so multi-node restarts are left to torch."""
    import torch.distributed as dist

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if (env.launcher != "torchrun" or env.num_nodes != 1 or restart in ("", "0")
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return None
    client = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_tune/restart_{restart}", client)


def destroy_distributed() -> None:
    """Destroy the default process group if there is one (safe to call twice)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        # Release the GIL for a moment before the caller drops the last references (e.g. DDP's Reducer) to the
        # group: gloo's worker threads free finished work (and with it Python-created tensors, which needs the
        # GIL) after the collective returned, while ~ProcessGroupGloo joins those threads with the GIL held --
        # a rank exiting within the GIL switch interval of its last collective then hangs forever.
        time.sleep(0.1)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# preemption

_early_signal: int | None = None


def _early_handler(signum: int, frame: Any) -> None:
    global _early_signal
    if _early_signal is None:
        _early_signal = signum


def capture_early_preemption_signal(signals: Iterable[int] = (signal.SIGUSR1,)) -> bool:
    """Record a preemption notice (SIGUSR1) that arrives before the trainer installs its
    :class:`PreemptionHandler` (model loading, data preparation), instead of losing it (SIG_IGN,
    inherited from the sbatch templates) or dying of it (default action). The next PreemptionHandler
    picks it up. Only signals still at SIG_DFL/SIG_IGN are taken; SIGTERM is never captured here (a
    process that never builds a handler must still terminate on it). Called by init_distributed()."""
    if threading.current_thread() is not threading.main_thread():
        return False
    taken = False
    for s in signals:
        if signal.getsignal(s) in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(s, _early_handler)
            taken = True
    return taken


class PreemptionHandler:
    """Turns preemption signals into a flag that every rank acts on in the same step.

    The constructor (or ``install()`` when built with ``install=False``) replaces the handlers of
    `signals` (default SIGUSR1 and SIGTERM; add SIGINT with ``handle_sigint=True``, a second Ctrl-C
    then raises KeyboardInterrupt) by one that only records the signal: no I/O, no collectives
    inside a signal handler. ``uninstall()`` restores the previous handlers. The training loop calls
    :meth:`should_stop` once per optimizer step; it all-reduces the flag (MAX) over the default
    process group so that all ranks stop after the same step even if only some received the signal.
    Then the trainer saves a checkpoint, waits for every rank, calls :meth:`requeue` (acts on rank 0
    under Slurm only) and exits with :data:`PREEMPTED_EXIT_CODE` (0).

    Usable as a context manager (installs / restores the previous handlers).
    """

    def __init__(self, env: ClusterEnv | None = None, signals: Iterable[int] | None = None, *,
                 handle_sigint: bool = False, device: Any = None,
                 on_signal: Callable[[int], None] | None = None, install: bool = True) -> None:
        self.env = env
        sigs = list(signals) if signals is not None else [signal.SIGUSR1, signal.SIGTERM]
        if handle_sigint and signal.SIGINT not in sigs:
            sigs.append(signal.SIGINT)
        self.signals = sigs
        self.device = device
        self.on_signal = on_signal
        self._flag = False
        self._signum: int | None = None
        self._agreed = False
        self._previous: dict[int, Any] = {}
        self._installed = False
        self._requeued = False
        if install and threading.current_thread() is threading.main_thread():
            self.install()

    # -- signals
    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._flag and self._signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._flag = True
        if self._signum is None:
            self._signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)

    def install(self) -> PreemptionHandler:
        """Install the handlers (done by the constructor unless install=False); idempotent."""
        if self._installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread")
        global _early_signal
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        self._installed = True
        if _early_signal is not None and _early_signal in self.signals:
            logger.warning("preemption: %s arrived during startup", signal.Signals(_early_signal).name)
            self._handle(_early_signal, None)
        _early_signal = None
        logger.debug("preemption handler installed for %s", [signal.Signals(s).name for s in self.signals])
        return self

    def uninstall(self) -> None:
        if not self._installed:
            return
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def trigger(self, signum: int = signal.SIGUSR1) -> None:
        """Set the flag as if `signum` had arrived (tests, or a trainer-side time limit)."""
        self._handle(signum, None)

    @property
    def received(self) -> bool:
        """This process got a signal (local view; use should_stop() to decide)."""
        return self._flag

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self._signum).name if self._signum is not None else None

    def _device(self, device: Any) -> Any:
        import torch
        import torch.distributed as dist

        device = device if device is not None else self.device
        if device is not None:
            return torch.device(device)
        if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def should_stop(self, device: Any = None) -> bool:
        """True on every rank once any rank got a signal. A collective when a process group with
        more than one rank exists: every rank must call it at the same point (once per step)."""
        if self._agreed:
            return True
        flag = self._flag
        try:
            import torch.distributed as dist

            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        except ImportError:  # pragma: no cover
            distributed = False
        if distributed:
            import torch

            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device(device))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self._agreed = True
            who = f"got {self.signal_name}" if self._flag else "another rank got a signal"
            logger.warning("preemption: %s; stopping after this step to checkpoint and requeue", who)
        return flag

    def requeue(self) -> bool:
        """Rank 0 inside a Slurm job: ``scontrol requeue $SLURM_JOB_ID``. Returns True if requeued.

        Never raises: a failure (no scontrol, job not requeueable, ...) is logged. Call it last,
        after every rank has finished saving: Slurm kills the whole job as soon as it accepts."""
        if self._requeued:
            return True
        env = self.env or detect()
        job = env.slurm_job_id or _job_id(os.environ)
        if not env.is_main:
            return False
        if not job:
            logger.info("preemption: not inside a Slurm job, nothing to requeue")
            return False
        cmd = [shutil.which("scontrol") or "scontrol", "requeue", str(job)]
        logger.warning("preemption: requeueing Slurm job %s: %s", job, " ".join(cmd))
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            logger.error("preemption: %s failed: %s", " ".join(cmd), e)
            return False
        if res.returncode != 0:
            logger.error("preemption: %s exited %s: %s", " ".join(cmd), res.returncode,
                         (res.stderr or res.stdout).strip())
            return False
        self._requeued = True
        return True


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times Slurm has requeued this job (SLURM_RESTART_COUNT), 0 outside Slurm."""
    environ = os.environ if environ is None else environ
    return _int(environ, "SLURM_RESTART_COUNT", default=0) or 0


__all__ = [
    "ClusterEnv", "ClusterEnvError", "LAUNCHERS", "PREEMPTED_EXIT_CODE", "PreemptionHandler",
    "barrier", "capture_early_preemption_signal", "default_backend", "destroy_distributed", "detect", "expand_nodelist", "hostnames",
    "init_distributed", "parse_tasks_per_node", "port_from_job_id", "resolve_host", "restart_count",
]
