#!/usr/bin/env bash
# Builds, on a machine with cargo, the binaries scripts/gpu-check.sh runs on a
# GPU machine that has no Rust toolchain: they go to .gpu-bin/ (ignored by git;
# carry it to the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-bin
test_bin=$(cargo test --release -p graft-kernels --test cuda --no-run 2>&1 | grep -o 'target/release/deps/cuda-[0-9a-f]*' | head -1)
bench_bin=$(cargo bench --bench gpu --no-run 2>&1 | grep -o 'target/release/deps/gpu-[0-9a-f]*' | head -1)
exec_bin=$(cargo test --release --test gpu_executor --no-run 2>&1 | grep -o 'target/release/deps/gpu_executor-[0-9a-f]*' | head -1)
chain_bin=$(cargo test --release -p graft-engine --test chains --no-run 2>&1 | grep -o 'target/release/deps/chains-[0-9a-f]*' | head -1)
cargo build --release --example gpu_step
cargo build --release -p graft-trainer
cp "$test_bin" .gpu-bin/cuda-tests
cp "$bench_bin" .gpu-bin/gpu-bench
cp "$exec_bin" .gpu-bin/executor-tests
cp "$chain_bin" .gpu-bin/chain-tests
cp target/release/examples/gpu_step .gpu-bin/gpu-step
cp target/release/trainer .gpu-bin/trainer
ls -la .gpu-bin
