#!/usr/bin/env bash
# Install the Slurm + munge packages needed by tests/slurm/cluster.sh (Debian/Ubuntu, as root).
# Idempotent: when every binary is already present it returns at once without touching apt.
set -euo pipefail

slurm_version() { dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null || slurmd -V 2>/dev/null || echo unknown; }

need=(sinfo sbatch srun scontrol scancel squeue slurmctld slurmd munged munge unmunge)
missing=()
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install.sh: slurm-wlm and munge already installed (slurm-wlm $(slurm_version))"
    exit 0
fi
echo "install.sh: missing ${missing[*]}; installing slurm-wlm munge"

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "install.sh: need root or sudo to apt-get install" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "install.sh: installed slurm-wlm $(slurm_version)"
