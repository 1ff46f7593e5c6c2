#!/usr/bin/env bash
# Single-node training: one process per GPU (or NPROC CPU processes on a machine without GPUs).
#   bash launch/train_torchrun.sh configs/train/pretrain-1.5b-100bt.yaml [key.sub=value ...]
# Environment: NPROC (default: the number of GPUs, else 2), MASTER_PORT (default 29500),
# RATPLUS_VENV (default .venv; created on first use).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
config=${1:?usage: train_torchrun.sh CONFIG [key.sub=value ...]}
shift
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
nproc=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node "$nproc" --master-port "${MASTER_PORT:-29500}" \
    -m ratplus_mega.cli train --config "$config" "$@"
