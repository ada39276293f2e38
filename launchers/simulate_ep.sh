#!/usr/bin/env bash
# Simulated expert parallelism: N gloo ranks on this machine (CPU or one GPU).
#
#   launchers/simulate_ep.sh 4 benchmarks/ep.py --worlds 4          # 4 ranks run the script
#   launchers/simulate_ep.sh 2 my_script.py --steps 10
# which runs exactly:
#   python -m moesys.parallel.simulate 4 benchmarks/ep.py --worlds 4
# with MOESYS_BACKEND=gloo and OMP_NUM_THREADS=1 (the ranks share the cores). Like
# `torchrun --standalone --nproc_per_node 4`, it sets RANK, WORLD_SIZE, LOCAL_RANK,
# LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT and the script calls
# torch.distributed.init_process_group("gloo") itself; unlike it, nothing listens outside this
# machine (the rendezvous store on 127.0.0.1, gloo on the loopback interface). For simulated nodes
# set LOCAL_WORLD_SIZE-aware groups with moesys.parallel.ParallelDims.build(ep=N, local_world_size=K).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 N script.py [script args...]" >&2
  exit 2
fi
N="$1"; shift
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "simulate_ep.sh: N must be a positive integer, got '$N'" >&2
  exit 2
fi
export MOESYS_BACKEND=gloo
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m moesys.parallel.simulate "$N" "$@"
