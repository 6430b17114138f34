#!/bin/bash
# Submit one training run to SLURM without Hydra's launcher; any train.py overrides follow:
#   sbatch scripts/sbatch_train.sh optim=muon_nsr model=llama_1b data=c4 trainer=fsdp
#   sbatch --nodes=4 scripts/sbatch_train.sh trainer=fsdp model=llama_1b data=c4      # 4 nodes x 8 GPUs
# SLURM starts one task per GPU (srun); Lightning joins them. The run dir is fixed by the job id,
# so a requeued job (preemption, `scontrol requeue`, USR2 two minutes before the time limit)
# resumes from its own last checkpoint and appends to the same metrics.csv.
#SBATCH --job-name=muonlab
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f .venv/bin/activate ] && source .venv/bin/activate
srun python train.py trainer.devices="$SLURM_NTASKS_PER_NODE" trainer.num_nodes="$SLURM_JOB_NUM_NODES" \
    run_dir="${MUONLAB_RUN_DIR:-runs/slurm/$SLURM_JOB_ID}" "$@"
