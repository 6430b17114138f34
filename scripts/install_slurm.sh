#!/usr/bin/env bash
# Debian's slurm-wlm and munge for the real-SLURM test (tests/test_slurm.py starts and stops its own
# one-node cluster). Best effort: without root or apt the test is skipped, with its reason.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: slurmctld/munged missing and not installable here (needs root and apt-get); the SLURM test will be skipped"
  exit 0
fi
echo "installing slurm-wlm and munge for the SLURM test (apt-get, ~30 s)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
