#!/usr/bin/env bash
# 13B WeSaR GPT in FP8 through Transformer Engine (hybrid: e4m3 forward, e5m2 gradients; the
# delayed-scaling recipe with Megatron-LM's usual amax settings) on NNODES nodes x GPUS_PER_NODE
# GPUs (default 4 x 8 H100): TP=8 (within a node), PP=4, sequence parallel, distributed
# optimizer. Run it on every node (NODE_RANK 0..NNODES-1, MASTER_ADDR / MASTER_PORT the
# rendezvous on node 0), or through Slurm: sbatch examples/pretrain_13b_fp8.sbatch.
# DRY_RUN=1 examples/pretrain_13b_fp8.sh plans these arguments on this world with no GPU and no
# Transformer Engine (launch.sh).
set -euo pipefail
NNODES=${NNODES:-4} GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA=${DATA:-data/corpus}
ARGS=(--preset 13b --bf16 --data-path "$DATA"
      --transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe delayed
      --fp8-amax-history-len 1024 --fp8-amax-compute-algo max
      --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --sequence-parallel
      --use-distributed-optimizer --lr 1e-3
      --metrics-file runs/13b_fp8/metrics.jsonl --save runs/13b_fp8/ckpt --save-interval 500
      --load runs/13b_fp8/ckpt --eval-interval 500)
source "$(dirname "$0")/launch.sh"
