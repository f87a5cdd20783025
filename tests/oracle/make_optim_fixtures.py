#!/usr/bin/env python3
"""Optimizer oracle fixtures for Graft (PyTorch AdamW and SGD, f32, CPU).

Writes:

    tests/fixtures/optim/adamw.safetensors   torch.optim.AdamW trajectories (plain + `warm.`)
    tests/fixtures/optim/sgd.safetensors     torch.optim.SGD trajectories (plain + `mom.`)
    tests/fixtures/optim/VERSIONS.json

Three f32 parameters of shapes [7, 5], [13], [4, 64] (seed 0, N(0, 1) * 0.1) are
stepped 6 times; before step s every parameter gets a fixed N(0, 1) gradient.
Each run records the initial values, the gradients and the value after every step.

`ref_adamw()` / `ref_sgd()` below are plain numpy f32 re-implementations of the
exact operation sequence torch runs (`_single_tensor_adam` / `_single_tensor_sgd`
and the ATen CPU kernels underneath). The script asserts they reproduce torch bit
for bit before anything is written; they are the spec for Graft's Rust optimizers.
See tests/oracle/README.md ("Optimizer fixtures") for the semantics in prose.

MKL is pinned to its AVX2 code path (MKL_ENABLE_INSTRUCTIONS=AVX2, unless set), because
torch's f32 sqrt is MKL's and MKL's AVX-512 sqrt is not correctly rounded. `--check`
compares without writing (e.g. under ATEN_CPU_CAPABILITY=default or another MKL path).

Usage (from the repository root):
    /work/venv/bin/python tests/oracle/make_optim_fixtures.py
"""

import argparse
import json
import os
import platform
import struct
import sys
from fractions import Fraction
from pathlib import Path

# torch's f32 CPU sqrt is MKL vmsSqrt(VML_HA). MKL's AVX-512 code path for it is not correctly
# rounded (about 0.7% of results are 1 ulp off); its AVX2 path is. Pin MKL to AVX2 (must happen
# before MKL loads) so the fixtures follow a portable spec. Nothing else here uses MKL.
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.optim.adam as torch_adam  # noqa: E402
import torch.optim.sgd as torch_sgd  # noqa: E402
import safetensors  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "optim"

SEED = 0
SHAPES = [(7, 5), (13,), (4, 64)]
STEPS = 6
MAX_FILE_BYTES = 100_000

ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
WARM_LRS = [1e-2 * (s + 1) / 6 for s in range(STEPS)]  # linear warmup, set before step s
WARM_WD = 0.0
SGD = dict(lr=0.1, momentum=0.0, weight_decay=0.0)
MOM = dict(lr=0.1, momentum=0.9, weight_decay=0.01)

F32 = np.float32


# =============================================================================
# f32 helpers
# =============================================================================

def _bits(x):
    return np.asarray(x, F32).view(np.uint32)


def _round_f32(q: Fraction) -> F32:
    """Correctly rounded (nearest, ties to even) f32 of an exact rational."""
    f = F32(float(q))  # within one f32 ulp of the answer
    best = None
    for c in (np.nextafter(f, F32(-np.inf)), f, np.nextafter(f, F32(np.inf))):
        d = abs(Fraction(float(c)) - q)
        if best is None or d < best[0] or (d == best[0] and int(_bits(c)) & 1 == 0):
            best = (d, c)
    return best[1]


def fma32(a, b, c):
    """Elementwise f32 fused multiply-add a*b+c with a single rounding (= Rust f32::mul_add)."""
    a, b, c = np.broadcast_arrays(np.asarray(a, F32), np.asarray(b, F32), np.asarray(c, F32))
    out = np.empty(a.shape, F32)
    for idx in np.ndindex(a.shape):
        out[idx] = _round_f32(
            Fraction(float(a[idx])) * Fraction(float(b[idx])) + Fraction(float(c[idx]))
        )
    return out


def make_madd(fused: bool):
    """a*b + c as ATen computes it: one fused rounding on AVX2/AVX512 builds, two on DEFAULT."""
    if fused:
        return fma32
    return lambda a, b, c: (np.asarray(a, F32) * np.asarray(b, F32)).astype(F32) + np.asarray(c, F32)


# =============================================================================
# Reference implementations (the spec)
# =============================================================================

def adamw_scalars(lr: float, beta1: float, beta2: float, step: int):
    """Scalars `_single_tensor_adam` computes in Python (f64) for one step (step is 1-based)."""
    t = float(step)  # state["step"] is an f32 tensor; .item() gives an exact float
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    return step_size, bias_correction2_sqrt


def torch_sqrt(x):
    """torch's f32 sqrt as a black box (see README: MKL vmsSqrt, not correctly rounded)."""
    return torch.from_numpy(np.ascontiguousarray(x, F32)).sqrt().numpy()


def ieee_sqrt(x):
    """Correctly rounded f32 sqrt (= Rust f32::sqrt)."""
    return np.sqrt(np.asarray(x, F32))


def ref_adamw(init, grads, lrs, beta1, beta2, eps, weight_decay, fused, sqrt=ieee_sqrt):
    madd = make_madd(fused)
    params = [x.copy() for x in init]
    exp_avg = [np.zeros_like(x) for x in init]
    exp_avg_sq = [np.zeros_like(x) for x in init]
    steps = []
    for s in range(STEPS):
        lr = lrs[s]
        step_size, bc2_sqrt = adamw_scalars(lr, beta1, beta2, s + 1)
        for i in range(len(params)):
            p, m, v, g = params[i], exp_avg[i], exp_avg_sq[i], grads[s][i]
            if weight_decay != 0:
                p = p * F32(1 - lr * weight_decay)                    # param.mul_(1 - lr*wd)
            m = madd(F32(1 - beta1), g - m, m)                         # exp_avg.lerp_(grad, 1-beta1)
            v = v * F32(beta2)                                         # exp_avg_sq.mul_(beta2)
            v = madd(F32(1 - beta2) * g, g, v)                         # .addcmul_(grad, grad, value=1-beta2)
            denom = sqrt(v) / F32(bc2_sqrt) + F32(eps)                 # (sqrt / bc2_sqrt).add_(eps)
            p = p + (F32(-step_size) * m) / denom                      # param.addcdiv_(m, denom, value=-step_size)
            assert p.dtype == m.dtype == v.dtype == denom.dtype == np.float32
            params[i], exp_avg[i], exp_avg_sq[i] = p, m, v
        steps.append([x.copy() for x in params])
    return steps, exp_avg, exp_avg_sq


def ref_sgd(init, grads, lr, momentum, weight_decay, fused, dampening=0):
    madd = make_madd(fused)
    params = [x.copy() for x in init]
    bufs = [None] * len(init)
    steps = []
    for s in range(STEPS):
        for i in range(len(params)):
            p, g = params[i], grads[s][i]
            if weight_decay != 0:
                g = madd(p, F32(weight_decay), g)                      # grad.add(param, alpha=wd)
            if momentum != 0:
                if bufs[i] is None:
                    bufs[i] = g.copy()                                 # buf = grad.clone()
                else:
                    # buf.mul_(momentum).add_(grad, alpha=1 - dampening); alpha == 1 here
                    bufs[i] = madd(g, F32(1 - dampening), bufs[i] * F32(momentum))
                g = bufs[i]
            p = madd(g, F32(-lr), p)                                   # param.add_(grad, alpha=-lr)
            assert p.dtype == np.float32
            params[i] = p
        steps.append([x.copy() for x in params])
    return steps, bufs


# =============================================================================
# torch runs
# =============================================================================

class PathGuard:
    """Count calls of torch's single-tensor implementations; forbid the foreach/fused ones."""

    def __init__(self):
        self.calls = {}
        self._saved = []

    def __enter__(self):
        for mod, name, allowed in [
            (torch_adam, "_single_tensor_adam", True),
            (torch_adam, "_multi_tensor_adam", False),
            (torch_adam, "_fused_adam", False),
            (torch_sgd, "_single_tensor_sgd", True),
            (torch_sgd, "_multi_tensor_sgd", False),
            (torch_sgd, "_fused_sgd", False),
        ]:
            orig = getattr(mod, name)
            self._saved.append((mod, name, orig))

            def wrapper(*args, _orig=orig, _name=name, _allowed=allowed, **kwargs):
                if not _allowed:
                    raise AssertionError(f"unexpected torch code path {_name}")
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _orig(*args, **kwargs)

            setattr(mod, name, wrapper)
        return self

    def __exit__(self, *exc):
        for mod, name, orig in self._saved:
            setattr(mod, name, orig)


def make_data():
    torch.manual_seed(SEED)
    init = [torch.randn(shape, dtype=torch.float32) * 0.1 for shape in SHAPES]
    grads = [[torch.randn(shape, dtype=torch.float32) for shape in SHAPES] for _ in range(STEPS)]
    return init, grads


def run_torch(make_opt, init, grads, lrs=None):
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make_opt(params)
    steps = []
    with PathGuard() as guard:
        for s in range(STEPS):
            if lrs is not None:
                for group in opt.param_groups:
                    group["lr"] = lrs[s]
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()
            steps.append([p.detach().clone() for p in params])
    for p, g in zip(params, grads[-1]):
        assert torch.equal(p.grad, g), "the optimizer must not modify .grad"
    return steps, opt, params, guard.calls


# =============================================================================
# checks and output
# =============================================================================

def assert_bits_equal(name, got_torch, want_np):
    got = got_torch.numpy()
    assert got.dtype == np.float32 and got.shape == want_np.shape, name
    if not np.array_equal(_bits(got), _bits(want_np)):
        bad = int((_bits(got) != _bits(want_np)).sum())
        raise AssertionError(f"{name}: reference differs from torch in {bad}/{got.size} elements")


def compare_variant(steps_a, steps_b):
    """(differing elements, total elements, max abs diff, max ulp diff) over all recorded steps."""
    n, total, mx, ulp = 0, 0, 0.0, 0
    for sa, sb in zip(steps_a, steps_b):
        for a, b in zip(sa, sb):
            n += int((_bits(a) != _bits(b)).sum())
            total += a.size
            mx = max(mx, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
            ia, ib = a.view(np.int32).astype(np.int64), b.view(np.int32).astype(np.int64)
            ulp = max(ulp, int(np.max(np.abs(ia - ib))))
    return n, total, mx, ulp


def put_trajectory(tensors, prefix, init, grads, steps):
    for i in range(len(SHAPES)):
        tensors[f"{prefix}p{i}.init"] = init[i].clone().contiguous()
        for s in range(STEPS):
            tensors[f"{prefix}p{i}.grad{s}"] = grads[s][i].clone().contiguous()
            tensors[f"{prefix}p{i}.step{s}"] = steps[s][i].clone().contiguous()


def canonicalize_header(path):
    """save_file writes `__metadata__` in hash-map order, so reruns are not byte-identical.
    Rewrite the header JSON with sorted metadata keys and the tensors in data order; the
    header keeps its length (same characters, space padding), so the data is untouched."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    out = {"__metadata__": {k: meta[k] for k in sorted(meta)}}
    for k in sorted(header, key=lambda k: (header[k]["data_offsets"][0], k)):
        out[k] = header[k]
    h = json.dumps(out, separators=(",", ":")).encode()
    assert len(h) <= n, (len(h), n)
    h += b" " * (n - len(h))
    path.write_bytes(raw[:8] + h + raw[8 + n:])
    os.chmod(path, 0o644)


def write(path, tensors, metadata, check_only=False):
    if check_only:
        return None
    save_file(tensors, str(path), metadata=metadata)
    canonicalize_header(path)
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == metadata
    for k, v in tensors.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v), k
    size = path.stat().st_size
    assert size < MAX_FILE_BYTES, f"{path} is {size} bytes"
    return size


def jdump(x):
    return json.dumps(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="run torch and the reference and compare, but write nothing")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    capability = torch.backends.cpu.get_cpu_capability()
    # ATen's vectorized kernels (and the GCC-contracted scalar tails) fuse a*b+c on AVX2/AVX512
    # builds; the DEFAULT capability rounds the product and the sum separately.
    fused = capability != "DEFAULT"
    mkl_isa = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "")

    init, grads = make_data()
    init_np = [x.numpy().copy() for x in init]
    grads_np = [[g.numpy().copy() for g in gs] for gs in grads]
    beta1, beta2 = ADAMW["betas"]
    eps = ADAMW["eps"]
    if not args.check:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
    report = {}

    # ---------------- AdamW ----------------
    common_adamw = dict(betas=(beta1, beta2), eps=eps, amsgrad=False, maximize=False,
                        foreach=False, capturable=False, differentiable=False, fused=False)
    runs = {
        "": dict(lrs=[ADAMW["lr"]] * STEPS, wd=ADAMW["weight_decay"], set_lr=False),
        "warm.": dict(lrs=WARM_LRS, wd=WARM_WD, set_lr=True),
    }
    tensors = {}
    meta = {
        "optimizer": "torch.optim.AdamW",
        "code_path": "torch.optim.adam._single_tensor_adam",
        "seed": str(SEED), "steps": str(STEPS), "shapes": jdump([list(s) for s in SHAPES]),
        "fma": jdump(fused), "sqrt": "ieee", "cpu_capability": capability,
        "mkl_enable_instructions": mkl_isa, "torch": torch.__version__,
    }
    for prefix, cfg in runs.items():
        steps, opt, params, calls = run_torch(
            lambda ps, cfg=cfg: torch.optim.AdamW(ps, lr=cfg["lrs"][0], weight_decay=cfg["wd"],
                                                  **common_adamw),
            init, grads, lrs=cfg["lrs"] if cfg["set_lr"] else None)
        assert calls == {"_single_tensor_adam": STEPS}, calls
        group = opt.param_groups[0]
        assert group["decoupled_weight_decay"] is True and group["amsgrad"] is False
        assert group["foreach"] is False and group["fused"] is False
        state0 = opt.state[params[0]]
        assert float(state0["step"]) == STEPS and state0["step"].dtype == torch.float32

        # 1. every operation but sqrt: the reference with torch's own sqrt must match bit for bit
        t_steps, ref_m, ref_v = ref_adamw(init_np, grads_np, cfg["lrs"], beta1, beta2, eps,
                                          cfg["wd"], fused, sqrt=torch_sqrt)
        for s in range(STEPS):
            for i in range(len(SHAPES)):
                assert_bits_equal(f"adamw {prefix}p{i}.step{s}", steps[s][i], t_steps[s][i])
        for i, p in enumerate(params):
            assert_bits_equal(f"adamw {prefix}p{i}.exp_avg", opt.state[p]["exp_avg"], ref_m[i])
            assert_bits_equal(f"adamw {prefix}p{i}.exp_avg_sq", opt.state[p]["exp_avg_sq"], ref_v[i])
        # 2. the spec (correctly rounded sqrt); exp_avg / exp_avg_sq never depend on sqrt
        ref_steps = ref_adamw(init_np, grads_np, cfg["lrs"], beta1, beta2, eps, cfg["wd"], fused)[0]
        diff = compare_variant(t_steps, ref_steps)
        report[f"adamw {prefix or 'plain'}: torch vs reference with IEEE sqrt"] = diff
        if diff[0] and not args.check:
            raise AssertionError(
                f"torch's sqrt is not correctly rounded here (MKL_ENABLE_INSTRUCTIONS="
                f"{os.environ.get('MKL_ENABLE_INSTRUCTIONS')}); {diff[0]} values differ. "
                "See tests/oracle/README.md (Optimizer fixtures).")
        # 3. informational: a reimplementation with the other multiply-add rounding
        o_steps = ref_adamw(init_np, grads_np, cfg["lrs"], beta1, beta2, eps, cfg["wd"], not fused)[0]
        report[f"adamw {prefix or 'plain'}: torch vs reference with fma={not fused}"] = \
            compare_variant(t_steps, o_steps)

        put_trajectory(tensors, prefix, init, grads, steps)
        tensors[f"{prefix}p0.exp_avg"] = state0["exp_avg"].clone()
        tensors[f"{prefix}p0.exp_avg_sq"] = state0["exp_avg_sq"].clone()
        scal = [adamw_scalars(cfg["lrs"][s], beta1, beta2, s + 1) for s in range(STEPS)]
        meta.update({
            f"{prefix}lr": jdump(cfg["lrs"]) if cfg["set_lr"] else repr(cfg["lrs"][0]),
            f"{prefix}beta1": repr(beta1), f"{prefix}beta2": repr(beta2), f"{prefix}eps": repr(eps),
            f"{prefix}weight_decay": repr(cfg["wd"]),
            f"{prefix}amsgrad": "false", f"{prefix}maximize": "false",
            f"{prefix}foreach": "false", f"{prefix}fused": "false",
            # f64 values torch computes in Python; each is rounded to f32 where it meets a tensor
            f"{prefix}step_size": jdump([x[0] for x in scal]),
            f"{prefix}bias_correction2_sqrt": jdump([x[1] for x in scal]),
        })
    sizes = {"adamw.safetensors": write(OUT_DIR / "adamw.safetensors", tensors, meta, args.check)}

    # ---------------- SGD ----------------
    runs = {"": SGD, "mom.": MOM}
    tensors = {}
    meta = {
        "optimizer": "torch.optim.SGD",
        "code_path": "torch.optim.sgd._single_tensor_sgd",
        "seed": str(SEED), "steps": str(STEPS), "shapes": jdump([list(s) for s in SHAPES]),
        "fma": jdump(fused), "cpu_capability": capability,
        "mkl_enable_instructions": mkl_isa, "torch": torch.__version__,
    }
    for prefix, cfg in runs.items():
        steps, opt, params, calls = run_torch(
            lambda ps, cfg=cfg: torch.optim.SGD(ps, lr=cfg["lr"], momentum=cfg["momentum"],
                                                weight_decay=cfg["weight_decay"], dampening=0,
                                                nesterov=False, maximize=False, foreach=False,
                                                fused=False),
            init, grads)
        assert calls == {"_single_tensor_sgd": STEPS}, calls
        group = opt.param_groups[0]
        assert group["foreach"] is False and group["fused"] is False and group["dampening"] == 0
        ref_steps, ref_bufs = ref_sgd(init_np, grads_np, cfg["lr"], cfg["momentum"],
                                      cfg["weight_decay"], fused)
        for s in range(STEPS):
            for i in range(len(SHAPES)):
                assert_bits_equal(f"sgd {prefix}p{i}.step{s}", steps[s][i], ref_steps[s][i])
        if cfg["momentum"] != 0:
            for i, p in enumerate(params):
                assert_bits_equal(f"sgd {prefix}p{i}.momentum_buffer",
                                  opt.state[p]["momentum_buffer"], ref_bufs[i])
        other = ref_sgd(init_np, grads_np, cfg["lr"], cfg["momentum"], cfg["weight_decay"], not fused)[0]
        report[f"sgd {prefix or 'plain'}: torch vs reference with fma={not fused}"] = \
            compare_variant(ref_steps, other)

        put_trajectory(tensors, prefix, init, grads, steps)
        if cfg["momentum"] != 0:
            tensors[f"{prefix}p0.momentum_buffer"] = opt.state[params[0]]["momentum_buffer"].clone()
        meta.update({
            f"{prefix}lr": repr(cfg["lr"]), f"{prefix}momentum": repr(cfg["momentum"]),
            f"{prefix}dampening": "0", f"{prefix}weight_decay": repr(cfg["weight_decay"]),
            f"{prefix}nesterov": "false", f"{prefix}maximize": "false",
            f"{prefix}foreach": "false", f"{prefix}fused": "false",
        })
    sizes["sgd.safetensors"] = write(OUT_DIR / "sgd.safetensors", tensors, meta, args.check)

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "cpu_capability": capability,
        "fma": fused,
        "mkl_enable_instructions": mkl_isa,
        "adamw_code_path": "torch.optim.adam._single_tensor_adam (foreach=False, fused=False)",
        "sgd_code_path": "torch.optim.sgd._single_tensor_sgd (foreach=False, fused=False)",
    }
    if not args.check:
        (OUT_DIR / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")

    print(f"cpu capability {capability}, fma={fused}, MKL_ENABLE_INSTRUCTIONS={mkl_isa}: "
          "checks passed")
    for name, size in sizes.items():
        print(f"  {name}: {'not written (--check)' if size is None else f'{size} bytes'}")
    for k, (n, total, mx, ulp) in report.items():
        print(f"  {k}: {n}/{total} step values differ, max abs {mx:.3g}, max {ulp} ulp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
