#!/usr/bin/env bash
# Tiny WeSaR GPT on CPU: 4 gloo ranks, TP=2 x PP=2 with sequence parallelism, embedded corpus.
set -euo pipefail
torchrun --standalone --nproc-per-node 4 -m megatron_wesar pretrain --preset tiny \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
    --lr 3e-4 --train-iters 200 --eval-interval 50 \
    --metrics-file runs/tiny_cpu/metrics.jsonl --save runs/tiny_cpu/ckpt --save-interval 100 \
    --load runs/tiny_cpu/ckpt "$@"
