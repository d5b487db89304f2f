#!/usr/bin/env bash
# 13B WeSaR GPT in bf16 on megatron-core's local layers (no Transformer Engine needed) on NNODES
# nodes x GPUS_PER_NODE GPUs (default 4 x 8): TP=8 (within a node), PP=4, sequence parallel,
# distributed optimizer. Run on every node with NODE_RANK set; MASTER_ADDR is node 0. FP8
# through Transformer Engine: pretrain_13b_fp8.sh.
# DRY_RUN=1 examples/pretrain_13b_multinode.sh plans these arguments on this world, no GPU
# (launch.sh).
set -euo pipefail
NNODES=${NNODES:-4} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA=${DATA:-data/corpus}
ARGS=(--preset 13b --bf16 --data-path "$DATA"
      --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel
      --use-distributed-optimizer --lr 1e-3
      --metrics-file runs/13b/metrics.jsonl --save runs/13b/ckpt --save-interval 500
      --load runs/13b/ckpt --eval-interval 500)
source "$(dirname "$0")/launch.sh"
