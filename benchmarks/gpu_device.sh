#!/usr/bin/env bash
# benchmarks/gpu.py on a GPU machine whose python3 has CUDA torch and Lightning but not Hydra, and
# no package index (this workplace's lent machines: the `device` tool). Two steps:
#
#   bash benchmarks/gpu_device.sh --fetch    # here, with PyPI: the pure-Python wheels Hydra needs into .whl/ (~0.5 MB)
#   bash benchmarks/gpu_device.sh [args]     # there (carry .whl): installs them into /tmp/site, runs gpu.py [args],
#                                            # writing gpu.md and gpu.log into $OUT when it is set
#
# e.g. the device tool's run with carry [".whl"] and command `bash benchmarks/gpu_device.sh`, timeout 600 s.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3)  # as the test suite runs them

if [ "${1:-}" = --fetch ]; then
  python3 -m pip wheel -q --no-deps -w .whl "${WHEELS[@]}"  # antlr4 4.9.3 is an sdist on PyPI: built here, pure Python
  ls -l .whl
  exit 0
fi
if ! python3 -c 'import hydra, omegaconf' 2>/dev/null; then
  [ -d .whl ] || { echo "error: no Hydra here and no .whl/: run 'bash benchmarks/gpu_device.sh --fetch' where PyPI is reachable and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
nvidia-smi -L 2>/dev/null || true
# straight into $OUT when set: gpu.py rewrites gpu.md after every section, so a run cut short still returns them
out="${OUT:-benchmarks}"
status=0
python3 benchmarks/gpu.py --out "$out/gpu.md" "$@" 2>&1 | tee "${OUT:-/tmp}/gpu.log" || status=$?
exit "$status"
