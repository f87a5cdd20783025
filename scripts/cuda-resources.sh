#!/usr/bin/env bash
# Registers, shared memory and spills of every CUDA kernel for sm_90, from
# ptxas (pip's nvidia-cuda-nvcc) on the PTX that NVRTC (pip's
# nvidia-cuda-nvrtc) makes of kernels/cuda/*.cu. No GPU needed. Writes
# docs/CUDA_RESOURCES.md; spills in the NF4 GEMM or the bf16 (tensor-core)
# attention kernels are a bug. The f32 attention kernels (the f32-compute
# twin, CUDA cores) are reported, not failed: ptxas keeps attn_f32_dkdv at 32
# registers for d = 32 and 64 and spills 4-8 bytes there (unrolling the
# warps' final sum did not change it).
set -euo pipefail
cd "$(dirname "$0")/.."
tools=.ci/cuda-tools
if [ ! -x "$tools/nvidia/cu13/bin/ptxas" ]; then
  python3 -m pip install --quiet --target "$tools" nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88
fi
export LD_LIBRARY_PATH="$PWD/$tools/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
ptx_dir=$(mktemp -d)
GRAFT_REQUIRE_NVRTC=1 GRAFT_PTX_DIR="$ptx_dir" cargo test -q -p graft-kernels --test cuda every_source_compiles >/dev/null
{
  echo "# CUDA kernel resources (sm_90)"
  echo
  echo "Made by \`scripts/cuda-resources.sh\`: NVRTC $(ls $tools/nvidia/cu13/lib/libnvrtc.so.* | head -1 | sed 's/.*so\.//') PTX, ptxas from nvidia-cuda-nvcc 13.0.88."
  echo "Shared memory here is the static part only; the NF4 GEMM's and attention's are dynamic (SMEM_BYTES in kernels/cuda/nf4_gemm.cu, attn_smem_bytes in kernels/cuda/attention.cu: 15,360 to 70,400 bytes by kernel and head dim; passed at launch by kernels/src/cuda/{nf4,attention}.rs)."
  echo
  echo "| kernel | registers | shared memory (bytes) | spill stores (bytes) | spill loads (bytes) | stack frame (bytes) |"
  echo "|---|---|---|---|---|---|"
  for f in "$ptx_dir"/*.sm_90.ptx; do
    "$tools/nvidia/cu13/bin/ptxas" -v --gpu-name sm_90 "$f" -o /dev/null 2>&1 | awk '
      /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART+1, RLENGTH-2) }
      /bytes stack frame/ { split($0, a, " "); frame = a[1]; st = a[5]; ld = a[9] }
      /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART+5, RLENGTH-15);
        smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH-11);
        printf "| %s | %s | %s | %s | %s | %s |\n", name, regs, smem, st, ld, frame }'
  done
} > docs/CUDA_RESOURCES.md
rm -rf "$ptx_dir"
cat docs/CUDA_RESOURCES.md
if grep -E "^\| (nf4_gemm|attn_(fwd|dq|dkdv|cached)_)" docs/CUDA_RESOURCES.md | awk -F'|' '$5+0 > 0 || $6+0 > 0 { bad = 1 } END { exit !bad }'; then
  echo "error: the NF4 GEMM or an attention kernel spills registers" >&2
  exit 1
fi
