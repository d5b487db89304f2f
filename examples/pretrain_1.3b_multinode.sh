#!/usr/bin/env bash
# 1.3B WeSaR GPT on NNODES nodes x 8 GPUs: TP=2, sequence parallel, bf16, distributed optimizer.
# Run on every node with NODE_RANK set; MASTER_ADDR is node 0.
set -euo pipefail
: "${NNODES:?}" "${NODE_RANK:?}" "${MASTER_ADDR:?}"
DATA=${DATA:-data/corpus}
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node 8 \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:29500" \
    -m megatron_wesar pretrain --preset 1.3b --bf16 --data-path "$DATA" \
    --tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer --lr 1e-3 \
    --metrics-file runs/1.3b/metrics.jsonl --save runs/1.3b/ckpt --save-interval 1000 \
    --load runs/1.3b/ckpt --eval-interval 500 "$@"
