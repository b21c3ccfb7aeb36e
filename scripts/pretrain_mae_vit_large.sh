#!/usr/bin/env bash
# mae_vit_large_patch16: MAE pre-training, EfficientTrain++ at E=400 equivalent epochs (default) or
# --variant baseline (1600 epochs), --target pixel (default) or hog.
# Written by `python scripts/recipes.py wrappers`; the recipe lives in scripts/recipes.py.
# Usage: scripts/pretrain_mae_vit_large.sh --data_path DIR [--variant etpp|baseline] [--target pixel|hog] [--budget E]
#        [--gpus N] [--dry_run] [entry point flags]
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/recipes.py" train mae_vit_large_patch16 --task mae "$@"
