#!/usr/bin/env bash
# Install muonlab (editable) and whatever it needs that is missing, into the active virtualenv /
# conda env, or else into ./.venv. A torch that is already installed (e.g. your CUDA build) is kept;
# without one, a machine without CUDA gets the CPU wheel torch==2.13.0 (an unpinned torch would pull
# gigabytes of CUDA wheels) and a CUDA machine gets pip's default CUDA build.
#   scripts/install.sh          runtime dependencies
#   scripts/install.sh dev      + test tools
# Re-running is cheap: a stamp in the environment (keyed on pyproject.toml) skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=${1:-}

python=$(scripts/python.sh)
if [ "$python" = .venv/bin/python ] && [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

prefix=$("$python" -c 'import sys; print(sys.prefix)')
key=$(sha256sum pyproject.toml | cut -c1-12)
stamp="$prefix/.muonlab-install-$key-${extra:-base}"
# the dev install includes the runtime one
if [ -f "$stamp" ] || { [ -z "$extra" ] && [ -f "$prefix/.muonlab-install-$key-dev" ]; }; then
  exit 0
fi

torch_ok=$("$python" - <<'PY' 2>/dev/null || true
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print("yes" if (major, minor) >= (2, 5) else "old")
PY
)
if [ "$torch_ok" = yes ]; then
  echo "[install] keeping installed torch $("$python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] CUDA machine without torch>=2.5: installing pip's default (CUDA) torch"
  "$python" -m pip install 'torch>=2.5'
else
  echo "[install] no CUDA here: installing the CPU wheel torch==2.13.0"
  "$python" -m pip install torch==2.13.0
fi

spec="."
[ -n "$extra" ] && spec=".[$extra]"
echo "[install] pip install -e '$spec'"
"$python" -m pip install -q -e "$spec"
find "$prefix" -maxdepth 1 -name '.muonlab-install-*' ! -name ".muonlab-install-$key-*" -delete
touch "$stamp"
echo "[install] done ($python)"
