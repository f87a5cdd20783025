#!/usr/bin/env python3
"""The peers' GEMMs at the shapes of `cargo bench --bench gemm`: numpy's
(OpenBLAS) f32 matmul, and torch's f32 and bf16 matmuls when torch is
installed (benches/peers/requirements.txt).

Run: OPENBLAS_NUM_THREADS=2 /work/venv/bin/python benches/peers/numpy_gemm.py
(the thread counts are set here too, before numpy and torch load, so a bare
run compares like with like). Prints the median of 10 timed runs per shape,
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


def timed(f) -> float:
    """Median seconds of 10 runs of f after 2 warm-ups."""
    for _ in range(2):
        f()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def torch_gemms() -> None:
    try:
        import torch
    except ImportError:
        print("torch not installed: skipping its GEMMs")
        return
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    for m, k, n, tb in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            a = (torch.rand((m, k), generator=g) * 2 - 1).to(dtype)
            b = (torch.rand((n, k) if tb else (k, n), generator=g) * 2 - 1).to(dtype)
            op_b = b.t() if tb else b
            out = torch.empty((m, n), dtype=dtype)
            med = timed(lambda: torch.matmul(a, op_b, out=out))
            layout = "a·bᵀ" if tb else "a·b"
            name = str(dtype).removeprefix("torch.")
            print(f"torch {name} {m}x{k}x{n} {layout}: median {med * 1e3:.2f} ms, {2 * m * k * n / med / 1e9:.1f} GFLOP/s")


def main() -> None:
    print(f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    rng = np.random.default_rng(0)
    for m, k, n, tb in SHAPES:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        # b is stored [n, k] when transposed, as Graft's weights are.
        b = rng.uniform(-1, 1, (n, k) if tb else (k, n)).astype(np.float32)
        op_b = b.T if tb else b
        out = np.empty((m, n), np.float32)
        med = timed(lambda: np.matmul(a, op_b, out=out))
        layout = "a·bᵀ" if tb else "a·b"
        print(f"numpy f32 {m}x{k}x{n} {layout}: median {med * 1e3:.2f} ms, {2 * m * k * n / med / 1e9:.1f} GFLOP/s")
    torch_gemms()


if __name__ == "__main__":
    main()
