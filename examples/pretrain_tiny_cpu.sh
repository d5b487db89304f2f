#!/usr/bin/env bash
# Tiny WeSaR GPT on CPU: 4 gloo ranks, TP=2 x PP=2 with sequence parallelism, embedded corpus.
# DRY_RUN=1 examples/pretrain_tiny_cpu.sh plans these arguments on this world (launch.sh).
set -euo pipefail
NNODES=1 GPUS_PER_NODE=4
ARGS=(--preset tiny --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
      --sequence-parallel --lr 3e-4 --train-iters 200 --eval-interval 50
      --metrics-file runs/tiny_cpu/metrics.jsonl --save runs/tiny_cpu/ckpt --save-interval 100
      --load runs/tiny_cpu/ckpt)
source "$(dirname "$0")/launch.sh"
