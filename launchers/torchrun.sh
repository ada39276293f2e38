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
#   Elastic: restart every rank up to 3 times when one dies, continuing from the latest checkpoint
#   (needs a fixed trainer.out_dir; trainer.resume=auto is added):
#     launchers/torchrun.sh --nproc 2 --max-restarts 3 -- trainer.out_dir=runs/a
#   Everything after `--` is a Hydra override of moesys-train (see configs/schema.py).
#   SIGTERM/SIGINT to torchrun reach every rank: they stop at the next step boundary (SIGTERM after
#   a checkpoint; torchrun waits 30 s before SIGKILL) and exit 143/130.
#
# Equivalent raw command:
#   torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=$NPROC --max-restarts=$MAX_RESTARTS \
#            --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT -m moesys.train <overrides>
set -euo pipefail

NNODES=1
NODE_RANK=0
NPROC=""
MAX_RESTARTS="${MAX_RESTARTS:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --node_rank) NODE_RANK="$2"; shift 2 ;;
    --nproc|--nproc_per_node) NPROC="$2"; shift 2 ;;
    --max-restarts|--max_restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
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
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "torchrun.sh: --max-restarts must be a whole number >= 0, got '$MAX_RESTARTS'" >&2
  exit 2
fi
if [[ "$MAX_RESTARTS" -gt 0 ]]; then
  # a restarted rank must find the run it continues: a fixed out_dir, resumed from its latest checkpoint
  # (a loop, not `printf | grep -q`: under pipefail grep's early exit can SIGPIPE printf and fail the test)
  HAS_OUT_DIR=0
  HAS_RESUME=0
  for arg in "$@"; do
    case "$arg" in
      trainer.out_dir=*|+trainer.out_dir=*|++trainer.out_dir=*) HAS_OUT_DIR=1 ;;
      trainer.resume=*|+trainer.resume=*|++trainer.resume=*) HAS_RESUME=1 ;;
    esac
  done
  if [[ "$HAS_OUT_DIR" -eq 0 ]]; then
    echo "torchrun.sh: --max-restarts $MAX_RESTARTS needs trainer.out_dir=DIR among the overrides (the restarted ranks resume from DIR/checkpoints)" >&2
    exit 2
  fi
  if [[ "$HAS_RESUME" -eq 0 ]]; then
    set -- "$@" trainer.resume=auto
  fi
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

exec torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" --max-restarts="$MAX_RESTARTS" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-moesys}" \
  -m moesys.train "$@"
