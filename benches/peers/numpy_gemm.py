#!/usr/bin/env python3
"""numpy's (OpenBLAS) f32 matmul at the shapes of `cargo bench --bench gemm`.

Run: OPENBLAS_NUM_THREADS=2 /work/venv/bin/python benches/peers/numpy_gemm.py
(the thread count is set here too, before numpy loads, so a bare run
compares like with like). Prints the median of 10 timed runs per shape,
after 2 warm-up runs, as GFLOP/s (2·m·k·n per product).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import time  # noqa: E402

import numpy as np  # noqa: E402

SHAPES = [  # (m, k, n, b transposed): as benches/gemm.rs
    (128, 256, 256, False),
    (512, 4096, 4096, False),
    (512, 4096, 4096, True),
    (2048, 2048, 2048, False),
]


def main() -> None:
    print(f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    rng = np.random.default_rng(0)
    for m, k, n, tb in SHAPES:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        # b is stored [n, k] when transposed, as Graft's weights are.
        b = rng.uniform(-1, 1, (n, k) if tb else (k, n)).astype(np.float32)
        op_b = b.T if tb else b
        out = np.empty((m, n), np.float32)
        for _ in range(2):
            np.matmul(a, op_b, out=out)
        times = []
        for _ in range(10):
            t = time.perf_counter()
            np.matmul(a, op_b, out=out)
            times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        layout = "a·bᵀ" if tb else "a·b"
        print(f"{m}x{k}x{n} {layout}: median {med * 1e3:.2f} ms, {2 * m * k * n / med / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
