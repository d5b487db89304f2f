#!/usr/bin/env bash
# 130M WeSaR GPT on one node of 8 GPUs (DP=8), bf16, data preprocessed with
#   megatron-wesar preprocess --input corpus.jsonl --output-prefix data/corpus
# DRY_RUN=1 examples/pretrain_130m.sh plans these arguments on this world, no GPU (launch.sh).
set -euo pipefail
NNODES=${NNODES:-1} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA=${DATA:-data/corpus}
ARGS=(--preset 130m --bf16 --data-path "$DATA" --lr 1e-3 --use-distributed-optimizer
      --metrics-file runs/130m/metrics.jsonl --tensorboard-dir runs/130m/tb
      --save runs/130m/ckpt --save-interval 1000 --load runs/130m/ckpt --eval-interval 500)
source "$(dirname "$0")/launch.sh"
