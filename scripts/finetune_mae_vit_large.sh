#!/usr/bin/env bash
# vit_large_patch16_224: fine-tuning an MAE encoder (main_pretrain.py checkpoint or an official file).
# Written by `python scripts/recipes.py wrappers`; the recipe lives in scripts/recipes.py.
# Usage: scripts/finetune_mae_vit_large.sh --data_path DIR --finetune PRETRAIN.pth
#        [--gpus N] [--dry_run] [entry point flags]
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/recipes.py" train vit_large_patch16_224 --task mae_ft "$@"
