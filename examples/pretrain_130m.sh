#!/usr/bin/env bash
# 130M WeSaR GPT on one node of 8 GPUs (DP=8), bf16, data preprocessed with
#   megatron-wesar preprocess --input corpus.jsonl --output-prefix data/corpus
set -euo pipefail
DATA=${DATA:-data/corpus}
torchrun --nproc-per-node 8 -m megatron_wesar pretrain --preset 130m --bf16 \
    --data-path "$DATA" --lr 1e-3 --use-distributed-optimizer \
    --metrics-file runs/130m/metrics.jsonl --tensorboard-dir runs/130m/tb \
    --save runs/130m/ckpt --save-interval 1000 --load runs/130m/ckpt --eval-interval 500 "$@"
