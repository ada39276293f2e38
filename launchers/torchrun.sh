#!/usr/bin/env bash
# moesys-train under torchrun: one node or many (NCCL on GPUs, gloo on CPU; chosen automatically).
#
#   Single node, 8 GPUs, experts over all 8:
#     launchers/torchrun.sh --nproc 8 -- parallel.ep=8 preset=gpu_small
#   Single node on CPU, 4 gloo ranks:
#     launchers/torchrun.sh --nproc 4 -- parallel.ep=4
#   Two nodes x 8 GPUs (run on each node; node 0's address is the rendezvous endpoint):
#     MASTER_ADDR=node0.example MASTER_PORT=29500 launchers/torchrun.sh --nnodes 2 --node_rank 0 --nproc 8 -- parallel.ep=16
#     MASTER_ADDR=node0.example MASTER_PORT=29500 launchers/torchrun.sh --nnodes 2 --node_rank 1 --nproc 8 -- parallel.ep=16
#   Everything after `--` is a Hydra override of moesys-train (see configs/schema.py).
#
# Equivalent raw command:
#   torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=$NPROC \
#            --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT -m moesys.train <overrides>
set -euo pipefail

NNODES=1
NODE_RANK=0
NPROC=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --node_rank) NODE_RANK="$2"; shift 2 ;;
    --nproc|--nproc_per_node) NPROC="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) break ;;
  esac
done

if [[ -z "$NPROC" ]]; then
  # one rank per GPU when there are GPUs, else 2 CPU ranks
  NPROC=$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [[ "$NNODES" -gt 1 && -z "${MASTER_ADDR:-}" ]]; then
  echo "torchrun.sh: --nnodes $NNODES needs MASTER_ADDR set to node 0's address (reachable from every node)" >&2
  exit 2
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

exec torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-moesys}" \
  -m moesys.train "$@"
