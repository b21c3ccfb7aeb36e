#!/usr/bin/env bash
# Evaluate a checkpoint (a released one or your own) with main.py --eval true, in fp32.
# Usage: scripts/eval.sh MODEL CHECKPOINT --data_path DIR [--ema] [--input_size 224]
#            [--batch_size 128] [--gpus N] [--dry_run] [main.py flags]
# --ema evaluates the checkpoint's 'model_ema' entry instead of 'model'. With more than one
# GPU the evaluation is sharded exactly (every image counted once), so the numbers do not
# depend on the GPU count.
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/recipes.py" eval "$@"
