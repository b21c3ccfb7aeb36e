#!/usr/bin/env bash
# Multi-node training with torchrun: start the same command on every node.
#
#   # on each of the 2 nodes (host0 is one of them, reachable from all):
#   NNODES=2 MASTER_ADDR=host0 MASTER_PORT=29400 GPUS_PER_NODE=8 \
#       scripts/multinode_train.sh swin_tiny --data_path /data/imagenet \
#       --output_dir /shared/out/swin_tiny_etpp_E200 [--budget E] [--variant ...] [main.py flags]
#
# The default c10d rendezvous (hosted at MASTER_ADDR:MASTER_PORT, job id RDZV_ID or one
# derived from model/variant/budget) assigns node ranks as nodes arrive, so NODE_RANK is not
# needed. RDZV_BACKEND=static with NODE_RANK=0..NNODES-1 uses fixed ranks instead (node 0
# must then be MASTER_ADDR). --output_dir must be on storage every node sees: rank 0 writes
# the checkpoints and every rank reads them back when the run is resumed.
# The recipe's global batch (4096) is kept: update_freq shrinks as NNODES x GPUS_PER_NODE grows.
set -euo pipefail
: "${NNODES:?set NNODES (the number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (a host every node can reach; the rendezvous runs there)}"
: "${MASTER_PORT:?set MASTER_PORT (a free port on MASTER_ADDR)}"
exec "${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/recipes.py" train \
    --rdzv_backend "${RDZV_BACKEND:-c10d}" "$@"
