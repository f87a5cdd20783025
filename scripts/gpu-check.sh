#!/usr/bin/env bash
# The one-shot GPU check: every GPU test against the CPU reference, then the
# criterion GPU benches against cuBLAS, then compute-sanitizer over the tests,
# with the full log under OUTDIR and a short summary printed last.
#
#   scripts/gpu-check.sh OUTDIR
#
# Builds with cargo when the machine has it; otherwise runs the binaries that
# scripts/gpu-build.sh left in .gpu-bin/ (GPU machines here have no Rust).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$out"

# NVRTC and cuBLAS from the CUDA toolkit, else from pip's nvidia-* wheels.
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia/cu13/lib"))' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export GRAFT_REQUIRE_NVRTC=1 GRAFT_CACHE_DIR="${GRAFT_CACHE_DIR:-$out/cache}"

if command -v cargo >/dev/null; then
  scripts/gpu-build.sh > "$out/build.log" 2>&1 || { echo "build failed: see $out/build.log"; exit 1; }
fi
[ -x .gpu-bin/cuda-tests ] && [ -x .gpu-bin/gpu-bench ] || { echo "no .gpu-bin/: run scripts/gpu-build.sh first"; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

echo "== GPU tests"
.gpu-bin/cuda-tests --test-threads=1 --nocapture > "$out/tests.log" 2>&1
tests_rc=$?
grep -E "rel L2|SKIPPED|test result|panicked|FAILED" "$out/tests.log"

echo "== GPU benches (criterion)"
.gpu-bin/gpu-bench --bench --measurement-time 2 > "$out/bench.log" 2>&1
bench_rc=$?
grep -E "^GPU:|^\|" "$out/bench.log"

# compute-sanitizer, where the machine has it: memcheck over every GPU test,
# racecheck over the kernels that share tiles between warps through shared
# memory. A sanitizer's own failure to start is reported, not counted.
san_rc=0
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer"
  # tool:test-name filter ("match" is in the name of every test that launches a kernel).
  for run in memcheck:match racecheck:attention racecheck:nf4_gemm_epilogue; do
    tool=${run%%:*} filter=${run#*:}
    log="$out/sanitize-$tool-$filter.log"
    timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 .gpu-bin/cuda-tests "$filter" --test-threads=1 > "$log" 2>&1
    rc=$?
    echo "$tool on '$filter': rc=$rc, $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)"
    [ $rc -eq 9 ] && san_rc=9
  done
fi

echo "tests rc=$tests_rc bench rc=$bench_rc sanitizer rc=$san_rc (logs in $out)"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $san_rc -eq 0 ]
