#!/usr/bin/env bash
# The CPU-scale reproduction of README "Reproducing the papers", stage by stage:
#   bash scripts/cpu_repro.sh lr      # lr sweep (3-5 points) of all seventeen optimizers at seed 1337 (~75 min, 2 cores)
#   bash scripts/cpu_repro.sh seeds   # seeds 1338, 1339 at each best lr (configs/tuning/cpu_repro/) (~45 min)
#   bash scripts/cpu_repro.sh table   # the speedup tables of both stages into results/cpu_repro/
# Runs already finished are skipped on a rerun (train.py resumes or reports them done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MATRIX_OPTIMS=muon,mars_m,mars_m_exact,muon_nsr,muon_vs,muon2,muon2_f,pre_polar,post_polar,polar_only,normuon,adamuon,muon_clip,dion,muon_cautious,muon_split_heads
ALL_OPTIMS=adamw,$MATRIX_OPTIMS
RUNS=runs/cpu_repro

case "${1:-}" in
  lr)
    $PY train.py -m experiment=cpu_repro optim=adamw optim.lr=1e-3,2e-3,4e-3 hydra.sweep.dir=$RUNS/lr
    $PY train.py -m experiment=cpu_repro optim=$MATRIX_OPTIMS optim.lr=6e-3,1.2e-2,2.4e-2 hydra.sweep.dir=$RUNS/lr
    # these three were best at the grid's top: one more point above it
    $PY train.py -m experiment=cpu_repro optim=muon_vs,post_polar,polar_only optim.lr=4.8e-2 hydra.sweep.dir=$RUNS/lr
    # post_polar was best at 4.8e-2 too: one more above that
    $PY train.py -m experiment=cpu_repro optim=post_polar optim.lr=9.6e-2 hydra.sweep.dir=$RUNS/lr
    ;;
  seeds)
    $PY train.py -m experiment=cpu_repro optim=$ALL_OPTIMS seed=1338,1339 hydra.sweep.dir=$RUNS/seeds
    ;;
  table)
    mkdir -p results/cpu_repro
    $PY scripts/speedup_table.py $RUNS/lr --baseline muon --out results/cpu_repro/lr_sweep
    best=()  # seed 1337 of each best lr comes from the lr sweep
    for optim in ${ALL_OPTIMS//,/ }; do
      lr=$($PY -c "import yaml; print(yaml.safe_load(open('configs/tuning/cpu_repro/$optim.yaml'))['optim']['lr'])")
      best+=("$RUNS/lr/${optim}_lr${lr}_seed1337")
    done
    $PY scripts/speedup_table.py $RUNS/seeds "${best[@]}" --baseline muon --out results/cpu_repro/speedup_table
    ;;
  *)
    echo "usage: bash scripts/cpu_repro.sh lr|seeds|table" >&2; exit 2 ;;
esac
