# Sourced by the pretrain_*.sh scripts once they have set ARGS (their `megatron-wesar pretrain`
# arguments), NNODES and GPUS_PER_NODE: runs `pretrain "${ARGS[@]}" "$@"` under torchrun on
# NNODES nodes x GPUS_PER_NODE processes (this node is NODE_RANK, default 0; the rendezvous is
# MASTER_ADDR:MASTER_PORT, default localhost:29500), or with DRY_RUN=1 plans exactly those
# arguments at that world size (`pretrain --dry-run`: no GPU, no Transformer Engine, no
# torch.distributed; PYTHON is the interpreter, default python).
NODE_RANK=${NODE_RANK:-0} MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-29500}
if [[ ${DRY_RUN:-0} == 1 ]]; then
    exec "${PYTHON:-python}" -m megatron_wesar pretrain "${ARGS[@]}" "$@" \
        --dry-run --world-size $((NNODES * GPUS_PER_NODE))
fi
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m megatron_wesar pretrain "${ARGS[@]}" "$@"
