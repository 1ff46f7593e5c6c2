#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher over a hostfile ("host slots=N" per line); the launcher
# starts one process per slot on every host over ssh, so the repository and .venv must be at the same path
# on every node (a shared filesystem).
#   HOSTFILE=hosts.txt bash launch/train_deepspeed_multinode.sh configs/train/pretrain-2.6b-200bt.yaml
# Environment: HOSTFILE (required), MASTER_ADDR (default: the first host), MASTER_PORT (default 29500),
# NCCL_* as your cluster needs (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
config=${1:?usage: train_deepspeed_multinode.sh CONFIG [key.sub=value ...]}
shift
hostfile=${HOSTFILE:?set HOSTFILE to a deepspeed hostfile}
master=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}
extra=()
# One host needs no ssh: the launcher then starts the ranks itself, but still probes ssh unless told not to.
if [ "$(awk 'NF && $1 !~ /^#/' "$hostfile" | wc -l)" -eq 1 ]; then extra+=(--no_ssh_check); fi
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" "${extra[@]}" \
    --module ratplus_mega.cli train --config "$config" "$@"
