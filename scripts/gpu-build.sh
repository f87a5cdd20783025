#!/usr/bin/env bash
# Builds, on a machine with cargo, the binaries scripts/gpu-check.sh runs on a
# GPU machine that has no Rust toolchain: they go to .gpu-bin/ (ignored by git;
# carry it to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-bin
test_bin=$(cargo test --release -p graft-kernels --test cuda --no-run 2>&1 | grep -o 'target/release/deps/cuda-[0-9a-f]*' | head -1)
bench_bin=$(cargo bench --bench gpu --no-run 2>&1 | grep -o 'target/release/deps/gpu-[0-9a-f]*' | head -1)
cp "$test_bin" .gpu-bin/cuda-tests
cp "$bench_bin" .gpu-bin/gpu-bench
ls -la .gpu-bin
