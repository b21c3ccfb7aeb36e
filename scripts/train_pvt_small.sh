#!/usr/bin/env bash
# pvt_small: EfficientTrain++ at budget E (default 200), --variant et or baseline.
# Written by `python scripts/recipes.py wrappers`; the recipe lives in scripts/recipes.py.
# Usage: scripts/train_pvt_small.sh --data_path DIR [--budget E] [--variant etpp|et|baseline]
#        [--replay] [--gpus N] [--dry_run] [main.py flags]
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/recipes.py" train pvt_small "$@"
