"""Session fixture for tests/slurm: a running local Slurm cluster (tests/slurm/cluster.sh).

DT_SLURM=1   install slurm-wlm/munge if missing (tests/slurm/install.sh), start the cluster for the
             session and stop it at the end (unless it was already up: then it is left running).
otherwise    use a cluster that is already up; skip with the reason when there is none.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STATE_DIR = Path(os.environ.get("DT_SLURM_DIR", "/tmp/dist_tune_slurm"))


def _conf() -> str:
    return os.environ.get("SLURM_CONF") or str(STATE_DIR / "slurm.conf")


def _cluster_up(conf: str) -> tuple[bool, str]:
    if not shutil.which("sinfo"):
        return False, "sinfo not found (Slurm not installed: tests/slurm/install.sh, or run with DT_SLURM=1)"
    if not Path(conf).is_file():
        return False, f"no slurm.conf at {conf}: start the test cluster with tests/slurm/cluster.sh start (or DT_SLURM=1)"
    try:
        out = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %t"], env=dict(os.environ, SLURM_CONF=conf),
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"sinfo failed: {e}"
    if out.returncode != 0:
        return False, f"Slurm cluster not up (sinfo: {out.stderr.strip()[:200]})"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    usable = [n for n, s in states.items() if s.rstrip("*") in ("idle", "mix", "alloc")]
    if len(usable) < 2:
        return False, f"need 2 usable nodes, sinfo says {states}"
    return True, ""


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields the SLURM_CONF path of a running 2-node cluster; sets SLURM_CONF for the session."""
    conf = _conf()
    started = False
    if os.environ.get("DT_SLURM") == "1":
        up, _ = _cluster_up(conf)
        if not up:
            if not shutil.which("sinfo"):
                subprocess.run([str(HERE / "install.sh")], check=True, timeout=900)
            res = subprocess.run([str(HERE / "cluster.sh"), "start"], capture_output=True, text=True, timeout=180)
            if res.returncode != 0:
                pytest.fail(f"tests/slurm/cluster.sh start failed:\n{res.stdout}\n{res.stderr}")
            started = True
    up, why = _cluster_up(conf)
    if not up:
        pytest.skip(why)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if started:
            subprocess.run([str(HERE / "cluster.sh"), "stop"], timeout=180)
