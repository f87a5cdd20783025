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
for b in cuda-tests gpu-bench executor-tests chain-tests gpu-step trainer; do
  [ -x .gpu-bin/$b ] || { echo "no .gpu-bin/$b: run scripts/gpu-build.sh first"; exit 1; }
done

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

echo "== GPU tests"
.gpu-bin/cuda-tests --test-threads=1 --nocapture > "$out/tests.log" 2>&1
tests_rc=$?
grep -E "SKIPPED|test result|panicked|FAILED|values differ" "$out/tests.log"

echo "== GPU executor against the CPU executor (QLoRA and QDoRA steps, the eval loss; random elementwise chains)"
.gpu-bin/executor-tests --test-threads=1 --nocapture > "$out/executor.log" 2>&1
exec_rc=$?
.gpu-bin/chain-tests gpu_ --nocapture >> "$out/executor.log" 2>&1 || exec_rc=$?
grep -E "worst|loss GPU|eval loss|chains:|SKIPPED|test result|panicked" "$out/executor.log"

echo "== the embedded default trained on the GPU (trainer run --device gpu)"
rm -rf "$out/default-run"
.gpu-bin/trainer run --device gpu --set output.dir="$out/default-run" > "$out/default.log" 2>&1
default_rc=$?
grep -E "device|exact match|step 260|error" "$out/default.log"
rm -rf "$out/default-run"

# resume_check NAME FILE SETTINGS..: a run on the GPU, the same stopped
# after 3 steps and resumed, and the same on the CPU; the resumed run must
# give the same losses and the same bytes of FILE (under the output dir).
resume_rc=0
losses() { python3 -c 'import json,sys; print([r["loss"] for r in map(json.loads, open(sys.argv[1])) if "loss" in r])' "$1/metrics.jsonl"; }
resume_check() {
  local name=$1 file=$2; shift 2
  local r="$out/resume-$name" log="$out/resume-$name.log"
  rm -rf "$r"
  .gpu-bin/trainer run --device gpu "$@" --set output.dir="$r/whole" > "$log" 2>&1 || resume_rc=1
  .gpu-bin/trainer run --device gpu "$@" --set output.dir="$r/stopped" --stop-after 3 >> "$log" 2>&1
  .gpu-bin/trainer run --device gpu "$@" --set output.dir="$r/stopped" --resume >> "$log" 2>&1 || resume_rc=1
  .gpu-bin/trainer run --device cpu "$@" --set output.dir="$r/cpu" >> "$log" 2>&1 || resume_rc=1
  grep -E "^device|step 6/6|error" "$log"
  echo "$name losses: whole $(losses "$r/whole"); resumed $(losses "$r/stopped"); CPU $(losses "$r/cpu")"
  if [ "$(losses "$r/whole")" = "$(losses "$r/stopped")" ] && cmp -s "$r/whole/$file" "$r/stopped/$file"; then
    echo "$name resumed run: the same losses and bits of $file"
  else
    echo "$name resumed run DIFFERS from the whole run"; resume_rc=1
  fi
  rm -rf "$r"
}
common=(--set output.eval_accuracy=false --set train.max_steps=6 --set train.warmup_steps=0
        --set output.save_steps=2 --set output.log_steps=1)
echo "== trainer run --device gpu: AdamW on the device with grad_accum 2 and clipping; a stopped run resumed to the same bits"
resume_check adamw adapter/adapter_model.safetensors "${common[@]}" --set train.grad_accum=2 \
  --set train.max_grad_norm=0.05 --set train.max_grad_value=0.002
echo "== trainer run --device gpu: QLoRA under f32 compute (NF4 weights dequantized to f32); stopped and resumed"
resume_check qlora-f32 adapter/adapter_model.safetensors "${common[@]}" --set model.compute_dtype=f32
echo "== trainer run --device gpu: full fine-tuning, LOMO and AdaLomo (two-pass clipping) fused on the device; stopped and resumed"
full=(--set adapter.method=full --set model.quantize=none --set model.compute_dtype=f32 --set train.max_grad_norm=1.0)
resume_check lomo model/model.safetensors "${common[@]}" "${full[@]}" --set train.optimizer=lomo --set train.lr=0.05
resume_check adalomo model/model.safetensors "${common[@]}" "${full[@]}" --set train.optimizer=adalomo --set train.lr=0.01

echo "== Llama-2-7B-shaped QLoRA step (batch 1 x 2048, r=16 all linear; with and without recomputation)"
.gpu-bin/gpu-step 2048 32 2 > "$out/step7b.log" 2>&1
step_rc=$?
cat "$out/step7b.log"
echo "== the same step with DoRA (QDoRA), per-layer recomputation"
.gpu-bin/gpu-step 2048 32 1 dora > "$out/step7b-dora.log" 2>&1 || step_rc=$?
grep -E "DoRA|tokens/s" "$out/step7b-dora.log"
echo "== full fine-tuning of the same shape in f32 (4 layers), LOMO fused into the backward pass on the device"
.gpu-bin/gpu-step 2048 4 1 lomo > "$out/step-lomo.log" 2>&1 || step_rc=$?
grep -E "lomo|tokens/s|Error" "$out/step-lomo.log"

echo "== GPU benches (criterion)"
.gpu-bin/gpu-bench --bench --measurement-time 1 > "$out/bench.log" 2>&1
bench_rc=$?
grep -E "^GPU:|^\|" "$out/bench.log"

# compute-sanitizer, where the machine has it: memcheck over every GPU test,
# racecheck over the kernels that share tiles between warps through shared
# memory. A sanitizer's own failure to start is reported, not counted.
san_rc=0
if command -v compute-sanitizer >/dev/null; then
  echo "== compute-sanitizer"
  # ("match" is in the name of every kernel test that launches a kernel.)
  # tool:binary:filter; the executor's test runs whole training steps.
  for run in memcheck:cuda-tests:match racecheck:cuda-tests:attention \
             racecheck:cuda-tests:nf4_gemm_epilogue \
             memcheck:executor-tests:gpu_step \
             memcheck:chain-tests:gpu_; do
    IFS=: read -r tool bin filter <<< "$run"
    log="$out/sanitize-$tool-$bin-$filter.log"
    timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 ".gpu-bin/$bin" "$filter" --test-threads=1 > "$log" 2>&1
    rc=$?
    echo "$tool on $bin '$filter': rc=$rc, $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)"
    [ $rc -eq 9 ] && san_rc=9
  done
fi

echo "tests rc=$tests_rc executor rc=$exec_rc bench rc=$bench_rc default rc=$default_rc resume rc=$resume_rc 7B step rc=$step_rc sanitizer rc=$san_rc (logs in $out)"
[ $tests_rc -eq 0 ] && [ $exec_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $default_rc -eq 0 ] && [ $resume_rc -eq 0 ] && [ $step_rc -eq 0 ] && [ $san_rc -eq 0 ]
