#!/usr/bin/env bash
# 1.3B WeSaR GPT on NNODES nodes x GPUS_PER_NODE GPUs (default 2 x 8): TP=2, sequence parallel,
# bf16, distributed optimizer. Run on every node with NODE_RANK set; MASTER_ADDR is node 0.
# DRY_RUN=1 examples/pretrain_1.3b_multinode.sh plans these arguments on this world, no GPU
# (launch.sh).
set -euo pipefail
NNODES=${NNODES:-2} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA=${DATA:-data/corpus}
ARGS=(--preset 1.3b --bf16 --data-path "$DATA"
      --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --lr 1e-3
      --metrics-file runs/1.3b/metrics.jsonl --save runs/1.3b/ckpt --save-interval 1000
      --load runs/1.3b/ckpt --eval-interval 500)
source "$(dirname "$0")/launch.sh"
