#!/usr/bin/env bash
# SLURM: one task per GPU; every task runs main.py, whose utils.init_distributed_mode reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. Resources come from sbatch's command line
# (nothing is fixed here); submit from the repository root:
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=10 \
#       scripts/slurm_train.sh swin_tiny --data_path /data/imagenet \
#       --output_dir /shared/out/swin_tiny_etpp_E200 [--budget E] [--variant ...] [main.py flags]
#
# Use --gpus-per-node (every task sees all GPUs of its node; task i uses GPU SLURM_LOCALID),
# not --gpus-per-task. MASTER_ADDR is the first node of the allocation; MASTER_PORT is
# $MASTER_PORT if exported, else derived from the job id so that jobs sharing a node differ.
# Requeued or resubmitted jobs with the same --output_dir resume from the newest checkpoint.
#SBATCH --job-name=efficienttrain
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run this through sbatch or inside an salloc allocation}"
# sbatch runs a copy of this file from its spool directory, so look for the repository
# next to the script first and in the submission directory second.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ ! -f "$here/recipes.py" ]]; then
    here="${SLURM_SUBMIT_DIR:-$PWD}/scripts"
fi
if [[ ! -f "$here/recipes.py" ]]; then
    echo "slurm_train.sh: $here/recipes.py not found: submit from the repository root" >&2
    exit 2
fi
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
MASTER_PORT="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}"
export MASTER_ADDR MASTER_PORT
echo "slurm_train.sh: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT tasks=${SLURM_NTASKS:-1}"
exec srun --kill-on-bad-exit=1 "${PYTHON:-python}" "$here/recipes.py" train --launcher slurm "$@"
