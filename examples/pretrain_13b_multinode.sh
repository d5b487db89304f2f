#!/usr/bin/env bash
# 13B WeSaR GPT on NNODES nodes x 8 GPUs: TP=8 (within a node), PP=4, sequence parallel, bf16.
# Run on every node with NODE_RANK set; MASTER_ADDR is node 0. (FP8 through Transformer Engine
# is not wired into the driver yet.)
set -euo pipefail
: "${NNODES:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
DATA=${DATA:-data/corpus}
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29500" \
    -m megatron_wesar pretrain --preset 13b --bf16 --data-path "$DATA" \
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel \
    --use-distributed-optimizer --lr 1e-3 \
    --metrics-file runs/13b/metrics.jsonl --save runs/13b/ckpt --save-interval 500 \
    --load runs/13b/ckpt --eval-interval 500 "$@"
