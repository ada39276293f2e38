#!/usr/bin/env bash
# The checks that need a CUDA machine, in one run (each step bounded, a failure does not stop the rest;
# the limits sum to 450 s, so the suite stays under 8 minutes with the install):
#   1. the compiled Triton kernels (the persistent grouped GEMM included) and the whole MoELayer on
#      CUDA against the CPU torch path; CUDA-graph capture of the layer and of the persistent GEMM,
#      replay vs eager; the all-to-all-v splits copied into pinned memory behind an event (tests);
#   2. benchmarks/kernels.py: grouped GEMM (persistent, Triton) vs dense, the per-expert loop and
#      torch._grouped_mm (bf16; E=8 balanced and Zipf, E=64 fine-grained), and what `auto` picks;
#   3. benchmarks/layer_gpu.py: MoELayer fwd+bwd vs the dense FFN of equal active FLOPs, and the
#      fixed overhead at T=256 eager and with CUDA-graph replay;
#   4. benchmarks/ep.py on the host's cores (gloo ranks with spare cores: the overlap figure that a
#      2-core machine cannot give).
# Usage: benchmarks/gpu_suite.sh [LOGDIR]    (needs torch with CUDA and triton; installs moesys --no-deps)
set -u
LOG=${1:-gpu_suite_logs}
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s): $*"
  local t0=$SECONDS
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 60 "$LOG/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
python3 -c "import moesys" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOG/install.log" 2>&1 \
  || { cat "$LOG/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cpus', __import__('os').cpu_count())"
step tests 170 python3 -m pytest -q -s -p no:cacheprovider tests/kernels/test_gpu_compiled.py tests/kernels/test_cuda_graph.py tests/parallel/test_alltoallv_overlap.py
step kernels 110 python3 benchmarks/kernels.py --iters 5
step layer_gpu 90 python3 benchmarks/layer_gpu.py --rounds 3 --steps 3
step ep 80 python3 benchmarks/ep.py --worlds 2 4 --tokens 2048 --hidden 512 --ffn 1024 --rounds 2 --steps 2
