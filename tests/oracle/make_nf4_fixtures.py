#!/usr/bin/env python3
"""NF4 / double-quantization oracle fixtures for Graft (bitsandbytes on CPU).

Writes:

    tests/fixtures/nf4/<case>.safetensors     bnb quantize_4bit / dequantize_4bit results
    tests/fixtures/nf4/dynamic_map.safetensors create_dynamic_map(signed=True)
    tests/fixtures/nf4/torch_mean.safetensors  f32 vectors with torch's .sum()/.mean()
    tests/fixtures/nf4/VERSIONS.json
    tests/fixtures/llama_nf4/model/            tiny Llama saved by transformers with
                                               BitsAndBytesConfig(load_in_4bit, nf4, double quant)
    tests/fixtures/llama_nf4/expected.safetensors  input_ids, logits

`reimplement()` below is a plain scalar re-implementation of what bitsandbytes
does on CPU (4-bit NF4 quantization, nested 8-bit quantization of the absmax,
dequantization). It is the spec the Rust code follows; the script asserts that
it reproduces bitsandbytes bit for bit on every case before writing anything.
See tests/oracle/README.md ("NF4 fixtures") for the semantics in prose.

Usage (from the repository root):
    .venv/bin/python tests/oracle/make_nf4_fixtures.py
"""

import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import safetensors  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import transformers  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (same tiny Llama config as tests/fixtures/llama)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
NF4_DIR = FIXTURES / "nf4"
LLAMA_NF4_DIR = FIXTURES / "llama_nf4"

F32 = np.float32

# =============================================================================
# Spec: scalar re-implementation of bitsandbytes 0.50.2 NF4 + double quant (CPU)
# =============================================================================
# All arithmetic is IEEE f32 with round-to-nearest-even: every numpy.float32
# operation below rounds exactly once, like one f32 instruction in Rust.
# Only fma_f32() is a fused multiply-add (one rounding), i.e. Rust f32::mul_add.

# bitsandbytes.functional.get_4bit_type("nf4"): python floats -> f32, then
# divided by max|v| (= 1.0, so unchanged). Index = 4-bit code.
NF4_CODE = [F32(v) for v in (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)]

NESTED_BLOCKSIZE = 256          # quantize_4bit(compress_statistics=True) hardcodes 256
ABSMAX_MIN = F32(1e-38)         # clamp(min=1e-38) on an f32 tensor: a subnormal, 0x006ce3ee


def round_to_f32(x: Fraction) -> np.float32:
    """Correctly rounded (nearest, ties to even) f32 of an exact rational."""
    c = F32(float(x))  # float(Fraction) is correctly rounded to f64; fix up double rounding below
    best, best_d = c, abs(Fraction(float(c)) - x)
    for d in (np.nextafter(c, F32(np.inf)), np.nextafter(c, F32(-np.inf))):
        dd = abs(Fraction(float(d)) - x)
        if dd < best_d or (dd == best_d and (int(d.view(np.uint32)) & 1) == 0):
            best, best_d = d, dd
    return F32(best)


def fma_f32(a, b, c) -> np.float32:
    """f32 fused multiply-add a*b+c with a single rounding (Rust: a.mul_add(b, c))."""
    return round_to_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def clamp_pm1(v):
    """torch.clamp(v, -1, 1) / std::clamp(v, -1.0f, 1.0f) (no NaNs here)."""
    if v < F32(-1.0):
        return F32(-1.0)
    if v > F32(1.0):
        return F32(1.0)
    return v


def nf4_bounds():
    """backends/default/ops.py: midpoints = (code[:-1] + code[1:]) / 2, in f32."""
    return [F32(F32(NF4_CODE[i] + NF4_CODE[i + 1]) / F32(2.0)) for i in range(15)]


def nf4_bucketize(s, bounds):
    """torch.bucketize(s, bounds, right=False): the number of bounds strictly below s.
    A value exactly on a midpoint goes to the LOWER code."""
    q = 0
    for b in bounds:
        if b < s:
            q += 1
    return q


def linspace_f32(start, end, steps):
    """torch.linspace(start, end, steps, dtype=float32) on CPU (torch 2.15): step in f32,
    first half fma(step, i, start), second half fma(-step, steps-1-i, end)."""
    s, e = F32(start), F32(end)
    step = F32(F32(e - s) / F32(steps - 1))
    half = steps // 2
    out = []
    for i in range(steps):
        if i < half:
            out.append(fma_f32(step, F32(i), s))
        else:
            out.append(fma_f32(-step, F32(steps - i - 1), e))
    return out


def dynamic_map_signed():
    """bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)."""
    data = []
    for i in range(7):
        n = 2 ** i + 1                                   # 2, 3, 5, ..., 65 boundaries
        b = linspace_f32(0.1, 1.0, n)
        means = [F32(F32(b[j] + b[j + 1]) / F32(2.0)) for j in range(n - 1)]
        scale = F32(10.0 ** (-6 + i))                    # python float scalar -> f32 multiply
        data += [F32(scale * m) for m in means]
        data += [F32(-scale * m) for m in means]
    data += [F32(0.0), F32(1.0)]
    assert len(data) == 256
    return sorted(data)                                  # code[0] = -0.99296875, code[255] = 1.0


def torch_sum_f32(x):
    """torch.sum of a contiguous 1-D f32 CPU tensor, single thread (ATen cascade_sum,
    SumKernel.cpp). The sum kernel is not built for AVX-512, so Vectorized<float> has
    8 lanes on x86 (AVX2 or default build). Above 32768 elements with more than one
    torch thread, torch splits the range across threads and this no longer applies."""
    n = len(x)
    lanes = 8 if n >= 8 else 1                           # vectorized_inner_sum vs scalar_inner_sum
    nvec = n // lanes

    def vec(i):                                          # lanes-wide load of "row" i
        return [x[i * lanes + l] for l in range(lanes)]

    def vadd(a, b):
        return [F32(a[l] + b[l]) for l in range(lanes)]

    zero = [F32(0.0)] * lanes
    # row_sum: view the nvec vectors as (nvec/4, 4) and run multi_row_sum over 4 "rows"
    size = nvec // 4
    level_power = max(4, ((size - 1).bit_length() if size > 1 else 0) // 4)   # CeilLog2(size)/4
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = [[zero for _ in range(4)] for _ in range(4)]   # acc[level][row]
    i = 0
    while i + level_step <= size:
        for _ in range(level_step):
            for k in range(4):
                acc[0][k] = vadd(acc[0][k], vec(i * 4 + k))
            i += 1
        for j in range(1, 4):
            for k in range(4):
                acc[j][k] = vadd(acc[j][k], acc[j - 1][k])
                acc[j - 1][k] = zero
            if (i & (level_mask << (j * level_power))) != 0:
                break
    while i < size:
        for k in range(4):
            acc[0][k] = vadd(acc[0][k], vec(i * 4 + k))
        i += 1
    for j in range(1, 4):
        for k in range(4):
            acc[0][k] = vadd(acc[0][k], acc[j][k])
    part = acc[0]
    for v in range(size * 4, nvec):                      # leftover vectors
        part[0] = vadd(part[0], vec(v))
    for k in range(1, 4):
        part[0] = vadd(part[0], part[k])
    if lanes == 1:
        return F32(F32(0.0) + part[0][0])
    final = F32(0.0)
    for k in range(nvec * lanes, n):                     # scalar tail first ...
        final = F32(final + x[k])
    for l in range(lanes):                               # ... then the 8 lanes in order
        final = F32(final + part[0][l])
    return F32(F32(0.0) + final)                         # output pre-filled with 0, then +=


def torch_mean_f32(x):
    """Tensor.mean() on CPU = sum(...).div_(numel), division in f32."""
    return F32(torch_sum_f32(x) / F32(len(x)))


_LUT_CACHE = {}


def build_quantize_lut(code):
    """libbitsandbytes_cpu.so build_quantize_lut: 65536 bins over [-1, 1]; each bin maps to
    the first code index whose upper midpoint is >= the bin's value."""
    key = tuple(float(c) for c in code)
    if key in _LUT_CACHE:
        return _LUT_CACHE[key]
    mid = [F32(F32(code[i] + code[i + 1]) * F32(0.5)) for i in range(255)]
    lut = [0] * 65536
    idx = 0
    for i in range(65536):
        val = F32(F32(F32(2 * i) / F32(65535.0)) - F32(1.0))
        while idx < 255 and mid[idx] < val:
            idx += 1
        lut[i] = idx
    _LUT_CACHE[key] = lut
    return lut


def quantize_blockwise_cpu(a, code, blocksize):
    """torch.ops.bitsandbytes.quantize_blockwise on CPU, f32 input (native
    cquantize_blockwise_cpu_fp32 -> quantize_cpu_impl<float>). Returns (q u8 list, absmax list).
    NOT nearest-code: the scaled value is binned into 65536 LUT cells."""
    lut = build_quantize_lut(code)
    n = len(a)
    q = [0] * n
    absmax = []
    for b0 in range(0, n, blocksize):
        b1 = min(b0 + blocksize, n)
        am = F32(-np.inf)
        for i in range(b0, b1):
            v = abs(a[i])
            am = v if am < v else am                     # std::max(am, |a|)
        am = F32(max(F32(0.0), am))
        absmax.append(am)
        if am == F32(0.0):
            continue                                     # whole block -> code index 0
        inv = F32(F32(1.0) / am)                         # reciprocal, then multiply
        for i in range(b0, b1):
            t = clamp_pm1(F32(a[i] * inv))
            t = F32(F32(t + F32(1.0)) * F32(0.5))
            y = fma_f32(t, F32(65535.0), F32(0.5))      # compiler-contracted FMA
            q[i] = lut[int(y) & 0xFFFF]                  # truncation toward zero, y >= 0.5
    return q, absmax


def quantize_4bit_nf4(x, blocksize):
    """torch.ops.bitsandbytes.quantize_4bit on CPU = the pure-torch 'default' kernel
    (backends/default/ops.py). Returns (packed u8 list, absmax f32 list, codes list)."""
    bounds = nf4_bounds()
    n = len(x)
    full_blocks = n // blocksize
    rem = n % blocksize
    absmax = []
    q = []
    for b in range(full_blocks):
        blk = x[b * blocksize:(b + 1) * blocksize]
        am = F32(0.0)
        for v in blk:
            am = max(am, abs(v))
        absmax.append(am)                                # stored UNclamped (0 for a zero block)
        scale = F32(F32(1.0) / max(am, ABSMAX_MIN))      # full blocks: x * (1/absmax)
        for v in blk:
            q.append(nf4_bucketize(clamp_pm1(F32(v * scale)), bounds))
    if rem:
        tail = x[full_blocks * blocksize:]
        am = F32(0.0)
        for v in tail:
            am = max(am, abs(v))
        am = max(am, ABSMAX_MIN)                         # partial block: stored CLAMPED
        absmax.append(am)
        for v in tail:
            q.append(nf4_bucketize(clamp_pm1(F32(v / am)), bounds))   # partial block: x / absmax
    if n % 2:
        q.append(nf4_bucketize(F32(0.0), bounds))        # pad with scaled 0.0 -> code 7
    packed = [(q[2 * k] << 4) | q[2 * k + 1] for k in range(len(q) // 2)]
    return packed, absmax, q


def reimplement(x, blocksize):
    """Everything Graft needs, from a flat f32 input (row-major order of the tensor).

    Returns a dict of numpy arrays:
      packed        u8 [(n+1)//2]   byte k = code[2k] << 4 | code[2k+1] (odd n: low nibble 7)
      absmax_f32    f32 [nb]        per-block absmax before double quantization
      offset        f32 [1]         torch mean of absmax_f32
      absmax        u8 [nb]         nested 8-bit codes of (absmax_f32 - offset)
      nested_absmax f32 [ceil(nb/256)]
      nested_quant_map f32 [256]    create_dynamic_map(signed=True), unmodified
      dequant       f32 [n]         dequantize_4bit with the nested state (flat blocks)
      dequant_plain f32 [n]         dequantize_4bit with absmax_f32 (compress_statistics=False)
    """
    x = [F32(v) for v in x]
    n = len(x)
    packed, absmax_f32, _ = quantize_4bit_nf4(x, blocksize)
    nb = len(absmax_f32)

    # ---- double quantization (quantize_4bit, compress_statistics=True) ----
    offset = torch_mean_f32(absmax_f32)
    centered = [F32(a - offset) for a in absmax_f32]
    dyn = dynamic_map_signed()
    q8, nested_absmax = quantize_blockwise_cpu(centered, dyn, NESTED_BLOCKSIZE)

    # ---- dequantization ----
    absmax_dq = [F32(F32(dyn[q8[i]] * nested_absmax[i // NESTED_BLOCKSIZE]) + offset) for i in range(nb)]
    dequant, dequant_plain = [], []
    for j in range(n):
        byte = packed[j // 2]
        c = (byte >> 4) if j % 2 == 0 else (byte & 0xF)
        dequant.append(F32(NF4_CODE[c] * absmax_dq[j // blocksize]))
        dequant_plain.append(F32(NF4_CODE[c] * absmax_f32[j // blocksize]))

    return {
        "packed": np.array(packed, np.uint8),
        "absmax_f32": np.array(absmax_f32, np.float32),
        "offset": np.array([offset], np.float32),
        "absmax": np.array(q8, np.uint8),
        "nested_absmax": np.array(nested_absmax, np.float32),
        "nested_quant_map": np.array(dyn, np.float32),
        "dequant": np.array(dequant, np.float32),
        "dequant_plain": np.array(dequant_plain, np.float32),
    }


# =============================================================================
# Helpers
# =============================================================================

def bits(a):
    """Bit pattern view for exact comparison (distinguishes -0.0 / 0.0, NaN payloads)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint32) if a.dtype == np.float32 else a


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


def assert_same(name, a, b):
    a, b = np.asarray(a), np.asarray(b)
    if not same(a, b):
        diff = np.nonzero(bits(a.reshape(-1)) != bits(b.reshape(-1)))[0] if a.shape == b.shape else None
        raise AssertionError(f"{name}: mismatch shapes {a.shape}/{b.shape} dtypes {a.dtype}/{b.dtype}; "
                             f"first differing flat indices {None if diff is None else diff[:10]}")


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32"}


def write_safetensors(path, tensors, metadata):
    """Byte-deterministic safetensors writer (the safetensors package writes metadata in
    hash-map order). 4-byte dtypes first, then u8, each group by name, so every tensor's
    data is aligned to its element size; header padded with spaces to a multiple of 8."""
    names = sorted(tensors, key=lambda k: (-np.asarray(tensors[k]).dtype.itemsize, k))
    header = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, off = [], 0
    for k in names:
        a = np.ascontiguousarray(np.asarray(tensors[k]))
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[k] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    # round-trip through the official reader
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors), path
    for k, v in tensors.items():
        assert_same(f"{path.name}:{k}", loaded[k].numpy(), np.asarray(v))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == header["__metadata__"], path


def native_avx512_rowwise_dequant_applies(shape, blocksize):
    """bnb 0.50.2 cpu dequantize_4bit uses the native kernel unless shape[-1] is odd (or
    AVX-512 with blocksize >= 2048). Inside the native kernel, the AVX-512 branch (taken when
    the CPU has AVX-512F, shape[-1] % 16 == 0 and blocksize >= 16) indexes absmax per ROW:
    absmax[row * (n // blocksize) + col // blocksize], which is wrong when n % blocksize != 0."""
    n = shape[-1]
    return (torch.backends.cpu.get_cpu_capability() == "AVX512" and n % 2 == 0 and n % 16 == 0
            and blocksize >= 16 and n % blocksize != 0 and blocksize < 2048)


def rowwise_bug_dequant(packed, absmax, shape, blocksize):
    m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    n = shape[-1]
    out = np.empty(m * n, np.float32)
    for r in range(m):
        for c in range(n):
            j = r * n + c
            byte = int(packed[j // 2])
            code = (byte >> 4) if j % 2 == 0 else (byte & 0xF)
            out[j] = F32(NF4_CODE[code] * absmax[r * (n // blocksize) + c // blocksize])
    return out


def default_dequant_4bit(packed_t, absmax_t, blocksize, shape):
    """bnb's own pure-torch kernel (what the CPU op falls back to for odd shapes), eager."""
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(packed_t.reshape(-1), absmax_t, _get_4bit_code("nf4", packed_t.device), blocksize,
              tuple(shape), torch.float32)


# =============================================================================
# Cases
# =============================================================================

def _g(seed):
    return torch.Generator().manual_seed(seed)


def special_input():
    """[266]: zero block, two constant blocks, a random block, then a partial all-zero block."""
    g = _g(7)
    return torch.cat([
        torch.zeros(64),
        torch.full((64,), 0.3),
        torch.full((64,), -0.7),
        torch.randn(64, generator=g),
        torch.zeros(10),
    ])


def ties_input():
    """Values whose scaled value is exactly an NF4 midpoint (and its f32 neighbours)."""
    bounds = nf4_bounds()
    vals = []

    def add_block(am, xs):
        blk = [F32(am)] + xs
        assert len(blk) <= 64
        vals.extend(blk)
        return len(blk)

    # block 0: absmax 1 -> scaled == x exactly
    xs = []
    for b in bounds:
        xs += [b, np.nextafter(b, F32(np.inf)), np.nextafter(b, F32(-np.inf))]
    xs += [F32(-1.0)] * (63 - len(xs))
    add_block(1.0, xs)
    # block 1: absmax 0.5 (power of two: x * (1/0.5) is exact)
    add_block(0.5, [F32(v * F32(0.5)) for v in xs])

    def around(b, scaled):
        """Largest x with scaled(x) < b, the x with scaled(x) == b when one exists (not every
        midpoint is reachable for a given absmax), and the smallest x with scaled(x) > b."""
        x = F32(b * F32(3.0))
        while scaled(x) >= b:
            x = np.nextafter(x, F32(-np.inf))
        out = [x]
        x = np.nextafter(x, F32(np.inf))
        while scaled(x) == b:
            if len(out) == 1:
                out.append(x)
            x = np.nextafter(x, F32(np.inf))
        return out + [x]

    # block 2: absmax 3, full block: scaled = x * f32(1/3) (reciprocal multiply)
    inv3 = F32(F32(1.0) / F32(3.0))
    xs3 = []
    for b in bounds:
        xs3 += around(b, lambda x: F32(x * inv3))
    xs3 += [F32(0.0)] * (63 - len(xs3))
    add_block(3.0, xs3)

    # partial last block: absmax 3, scaled = x / 3 (division)
    xs4 = []
    for b in bounds:
        xs4 += around(b, lambda x: F32(x / F32(3.0)))
    n4 = add_block(3.0, xs4)
    assert n4 % 64 != 0
    return torch.tensor(np.array(vals, np.float32))


# Block absmax values (f32 bit patterns) found by a search so that, after the offset
# subtraction, one nested code differs between c * (1/amax) (what bnb does) and c / amax.
DISCRIMINATING_ABSMAX = [
    0x40000000, 0x3e5dfb12, 0x3e7f3c47, 0x3eb4b0a4, 0x3e5df224, 0x3f0907cb, 0x3e9ad847,
    0x3e61c282, 0x3f1a8d7e, 0x3eeb0ed5, 0x3ea7eb6c, 0x3ea730e8, 0x3f17ab90]


def _nested_codes_alt(absmax, use_division):
    """Nested codes with the 1/amax multiply optionally replaced by a division (test only)."""
    dyn = dynamic_map_signed()
    lut = build_quantize_lut(dyn)
    off = torch_mean_f32(absmax)
    c = [F32(a - off) for a in absmax]
    am = F32(max(abs(v) for v in c))
    inv = F32(F32(1.0) / am)
    out = []
    for v in c:
        t = clamp_pm1(F32(v / am) if use_division else F32(v * inv))
        t = F32(F32(t + F32(1.0)) * F32(0.5))
        out.append(lut[int(fma_f32(t, F32(65535.0), F32(0.5))) & 0xFFFF])
    return out


def discriminating_input():
    """[12*64 + 40]: inputs where reciprocal-multiply and division give different codes,
    in the 4-bit stage (full blocks multiply, the partial block divides) and in the nested
    stage. Asserts that each stage really discriminates."""
    rng = np.random.default_rng(30)
    bounds = nf4_bounds()
    absmax = [np.array([b], np.uint32).view(np.float32)[0] for b in DISCRIMINATING_ABSMAX]
    vals = []
    n_disc4 = 0
    for j, am in enumerate(absmax):
        length = 64 if j < len(absmax) - 1 else 40
        partial = length < 64
        inv = F32(F32(1.0) / am)
        blk = [am]
        tries = 0
        while len(blk) < 1 + 6 and tries < 300:       # up to 6 discriminating values per block
            tries += 1
            b = bounds[int(rng.integers(15))]
            x = F32(b * am)
            for d in range(-4, 5):
                xx = x
                for _ in range(abs(d)):
                    xx = np.nextafter(xx, F32(np.inf) if d > 0 else F32(-np.inf))
                q_mul = nf4_bucketize(clamp_pm1(F32(xx * inv)), bounds)
                q_div = nf4_bucketize(clamp_pm1(F32(xx / am)), bounds)
                if q_mul != q_div:
                    blk.append(xx)
                    n_disc4 += 1
                    break
        # (some absmax values, e.g. powers of two, admit no discriminating value)
        blk += [F32(v) for v in (rng.uniform(-0.5, 0.5, length - len(blk)) * am).astype(np.float32)]
        vals += blk
        assert max(abs(v) for v in blk) == am
    assert n_disc4 >= 24, n_disc4
    assert _nested_codes_alt(absmax, False) != _nested_codes_alt(absmax, True)
    return torch.tensor(np.array(vals, np.float32))


def uniform_absmax_input():
    """[8, 64]: every block has absmax exactly 0.5 -> absmax - offset == 0 everywhere,
    so the single nested block takes the native kernel's all-zero branch."""
    g = _g(8)
    x = (torch.rand(8, 64, generator=g) - 0.5) * 0.9
    x[:, 5] = 0.5
    x[::2, 5] = -0.5
    return x


CASES = [
    # name, shape, blocksize, input factory
    ("r64x64_bs64", (64, 64), 64, lambda: torch.randn(64, 64, generator=_g(1)) * 0.05),
    ("r64x64_bs128", (64, 64), 128, lambda: torch.randn(64, 64, generator=_g(2)) * 0.05),
    ("r64x64_bs32", (64, 64), 32, lambda: torch.randn(64, 64, generator=_g(3)) * 0.05),
    ("r33x17_bs64", (33, 17), 64, lambda: torch.randn(33, 17, generator=_g(4))),
    ("r33x17_bs128", (33, 17), 128, lambda: torch.randn(33, 17, generator=_g(5)) * 3.0),
    ("r33x17_bs32", (33, 17), 32, lambda: torch.rand(33, 17, generator=_g(6)) * 2 - 1),
    ("r7_bs64", (7,), 64, lambda: torch.randn(7, generator=_g(9))),
    ("r300x97_bs64", (300, 97), 64, lambda: torch.randn(300, 97, generator=_g(10)) * 0.02),
    ("r1x8389_bs64", (1, 8389), 64, lambda: torch.randn(1, 8389, generator=_g(11)) * 0.1),
    ("r1x8389_bs32", (1, 8389), 32, lambda: torch.randn(1, 8389, generator=_g(12)) * 0.1),
    ("r12x80_bs64", (12, 80), 64, lambda: torch.randn(12, 80, generator=_g(13)) * 0.05),
    ("special_bs64", (266,), 64, special_input),
    ("ties_bs64", None, 64, ties_input),
    ("uniform_absmax_bs64", (8, 64), 64, uniform_absmax_input),
    ("recip_vs_div_bs64", (808,), 64, discriminating_input),
]


def run_case(name, shape, blocksize, factory, notes):
    x = factory().float().contiguous()
    if shape is None:
        shape = tuple(x.shape)
    assert tuple(x.shape) == tuple(shape), (name, x.shape, shape)
    n = x.numel()
    nb = -(-n // blocksize)

    # raw op: packed + absmax before any double quantization
    raw_packed, raw_absmax = torch.ops.bitsandbytes.quantize_4bit.default(x, blocksize, "nf4", torch.uint8)

    fresh_map = bnbF.create_dynamic_map(signed=True).clone()
    cached_before = bnbF.name2qmap.get("dynamic")
    cached_before = None if cached_before is None else cached_before.clone()

    packed, st = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=True,
                                    quant_storage=torch.uint8)
    # the native CPU kernel does not write code[0] (older builds set it to -1.0)
    assert torch.equal(st.state2.code, fresh_map), name
    assert torch.equal(bnbF.name2qmap["dynamic"], fresh_map), name
    if cached_before is not None:
        assert torch.equal(cached_before, fresh_map)
    assert st.state2.blocksize == NESTED_BLOCKSIZE and st.blocksize == blocksize and st.nested
    dequant_bnb = bnbF.dequantize_4bit(packed, st)

    packed_p, st_p = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False,
                                        quant_storage=torch.uint8)
    dequant_plain_bnb = bnbF.dequantize_4bit(packed_p, st_p)

    assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((n + 1) // 2, 1), (name, packed.shape)
    assert torch.equal(packed, raw_packed) and torch.equal(packed_p, raw_packed), name
    assert torch.equal(st_p.absmax, raw_absmax), name
    # quirk: for a 1-D shape with even n, the native CPU kernel returns shape [1, n]
    for t in (dequant_bnb, dequant_plain_bnb):
        assert tuple(t.shape) == tuple(shape) or (len(shape) == 1 and tuple(t.shape) == (1, shape[0])), \
            (name, t.shape)

    ref = reimplement(x.reshape(-1).numpy(), blocksize)

    assert_same(f"{name} packed", ref["packed"], packed.reshape(-1).numpy())
    assert_same(f"{name} absmax_f32", ref["absmax_f32"], raw_absmax.numpy())
    assert_same(f"{name} offset", ref["offset"], st.offset.reshape(1).numpy())
    assert_same(f"{name} absmax(q8)", ref["absmax"], st.absmax.numpy())
    assert_same(f"{name} nested_absmax", ref["nested_absmax"], st.state2.absmax.numpy())
    assert_same(f"{name} nested_quant_map", ref["nested_quant_map"], st.state2.code.numpy())
    assert_same(f"{name} quant_map", np.array(NF4_CODE, np.float32), st.code.numpy())

    # flat-block dequant from bnb's own pure-torch kernel, with the nested absmax bnb computes
    absmax_dq_bnb = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    flat_dq = default_dequant_4bit(packed, absmax_dq_bnb, blocksize, shape)
    flat_dq_plain = default_dequant_4bit(packed, raw_absmax, blocksize, shape)
    assert_same(f"{name} dequant(default kernel)", ref["dequant"], flat_dq.reshape(-1).numpy())
    assert_same(f"{name} dequant_plain(default kernel)", ref["dequant_plain"], flat_dq_plain.reshape(-1).numpy())

    if native_avx512_rowwise_dequant_applies(shape, blocksize):
        # bnb's CPU dequantize_4bit is wrong here: document exactly how, store the flat result.
        bug = rowwise_bug_dequant(ref["packed"], absmax_dq_bnb.numpy(), shape, blocksize)
        assert_same(f"{name} native dequant == row-wise bug", bug, dequant_bnb.reshape(-1).numpy())
        assert not same(bug, ref["dequant"])
        dequant_source = "bnb default torch kernel (native CPU kernel mis-indexes absmax for this shape)"
        notes.append(f"{name}: native CPU dequantize_4bit differs from flat semantics by up to "
                     f"{(dequant_bnb - flat_dq).abs().max().item():.4g}; stored the flat result")
    else:
        assert_same(f"{name} dequant", ref["dequant"], dequant_bnb.reshape(-1).numpy())
        assert_same(f"{name} dequant_plain", ref["dequant_plain"], dequant_plain_bnb.reshape(-1).numpy())
        dequant_source = "bitsandbytes.functional.dequantize_4bit"

    tensors = {
        "input": x.numpy(),
        "packed": packed.numpy(),
        "absmax": st.absmax.numpy(),
        "nested_absmax": st.state2.absmax.numpy(),
        "offset": st.offset.reshape(1).numpy(),
        "nested_quant_map": st.state2.code.numpy(),
        "quant_map": st.code.numpy(),
        "dequant": ref["dequant"].reshape(shape),
        "absmax_f32": raw_absmax.numpy(),
        "absmax_plain": st_p.absmax.numpy(),
        "packed_plain": packed_p.numpy(),
        "dequant_plain": ref["dequant_plain"].reshape(shape),
    }
    meta = {
        "case": name,
        "shape": json.dumps(list(shape)),
        "numel": n,
        "blocksize": blocksize,
        "num_blocks": nb,
        "nested_blocksize": NESTED_BLOCKSIZE,
        "num_nested_blocks": -(-nb // NESTED_BLOCKSIZE),
        "quant_type": "nf4",
        "quant_storage": "uint8",
        "dequant_source": dequant_source,
        "generator": "tests/oracle/make_nf4_fixtures.py",
    }
    write_safetensors(NF4_DIR / f"{name}.safetensors", tensors, meta)
    print(f"{name}: shape={list(shape)} bs={blocksize} blocks={nb} offset={st.offset.item():.9g} "
          f"max|x-dq|={np.abs(x.reshape(-1).numpy() - ref['dequant']).max():.4g}")


def write_dynamic_map():
    m = bnbF.create_dynamic_map(signed=True)
    assert_same("dynamic map reimplementation", np.array(dynamic_map_signed(), np.float32), m.numpy())
    write_safetensors(NF4_DIR / "dynamic_map.safetensors", {"dynamic_map": m.numpy()},
                      {"function": "bitsandbytes.functional.create_dynamic_map(signed=True)",
                       "generator": "tests/oracle/make_nf4_fixtures.py"})


def write_torch_mean():
    """f32 vectors with torch's sum and mean (the double-quant offset is absmax.mean())."""
    tensors = {}
    lengths = [1, 3, 7, 8, 15, 64, 100, 131, 455, 1000, 4097, 5000, 12345]
    g = _g(20)
    for n in lengths:
        v = (torch.rand(n, generator=g) * 0.3 + 0.01).float()
        s, m = v.sum(), v.mean()
        assert_same(f"sum n={n}", np.array([torch_sum_f32(list(v.numpy()))], np.float32), s.reshape(1).numpy())
        assert_same(f"mean n={n}", np.array([torch_mean_f32(list(v.numpy()))], np.float32), m.reshape(1).numpy())
        tensors[f"x{n}"] = v.numpy()
        tensors[f"sum{n}"] = s.reshape(1).numpy()
        tensors[f"mean{n}"] = m.reshape(1).numpy()
    write_safetensors(NF4_DIR / "torch_mean.safetensors", tensors,
                      {"lengths": json.dumps(lengths), "generator": "tests/oracle/make_nf4_fixtures.py"})


def check_mean_methods():
    """Empirical: which summation does torch's f32 mean match? (printed, not stored)"""
    g = _g(21)
    counts = {"sequential_f32": 0, "f64_rounded": 0, "cascade_8_lanes": 0}
    trials = 0
    for n in [300, 1000, 5000, 5000, 5000, 20000]:
        for _ in range(3):
            v = (torch.rand(n, generator=g) * 2 + 0.5).float()
            m = v.mean().numpy()
            a = v.numpy()
            seq = F32(0.0)
            for t in a:
                seq = F32(seq + t)
            counts["sequential_f32"] += int(F32(seq / F32(n)) == m)
            counts["f64_rounded"] += int(F32(a.astype(np.float64).sum() / n) == m)
            counts["cascade_8_lanes"] += int(torch_mean_f32(list(a)) == m)
            trials += 1
    assert counts["cascade_8_lanes"] == trials, counts
    return {"trials": trials, **counts}


# =============================================================================
# transformers: tiny Llama quantized with BitsAndBytesConfig
# =============================================================================

def _flat_dequant_4bit_cpu(A, absmax, blocksize, quant_type, shape, dtype):
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, tuple(shape), dtype)


def build_llama_nf4(notes):
    if LLAMA_NF4_DIR.exists():
        shutil.rmtree(LLAMA_NF4_DIR)
    model_dir = LLAMA_NF4_DIR / "model"
    LLAMA_NF4_DIR.mkdir(parents=True)

    spec = mf.spec_llama()
    seed = 1005
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = LlamaForCausalLM(spec["config"]).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * mf.PERTURB_STD)
    orig = {k: v.detach().clone() for k, v in base.state_dict().items()}
    input_ids = torch.randint(1, spec["config"].vocab_size, (mf.T,), generator=gen)
    ids = input_ids.unsqueeze(0)

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        qm = LlamaForCausalLM.from_pretrained(tmp, quantization_config=qcfg, device_map="cpu",
                                              dtype=torch.float32, attn_implementation="eager").eval()
    qm.save_pretrained(model_dir)

    # ---- saved tensors must be exactly the spec applied to the original f32 weights ----
    saved = load_file(str(model_dir / "model.safetensors"))
    linears = sorted(k[: -len(".weight.absmax")] for k in saved if k.endswith(".weight.absmax"))
    assert len(linears) == 2 * 7, linears
    for name in linears:
        w = orig[name + ".weight"]
        ref = reimplement(w.reshape(-1).numpy(), 64)
        assert_same(name + " weight", ref["packed"], saved[name + ".weight"].reshape(-1).numpy())
        assert tuple(saved[name + ".weight"].shape) == ((w.numel() + 1) // 2, 1)
        assert_same(name + " absmax", ref["absmax"], saved[name + ".weight.absmax"].numpy())
        assert_same(name + " nested_absmax", ref["nested_absmax"], saved[name + ".weight.nested_absmax"].numpy())
        assert_same(name + " nested_quant_map", ref["nested_quant_map"],
                    saved[name + ".weight.nested_quant_map"].numpy())
        assert_same(name + " quant_map", np.array(NF4_CODE, np.float32), saved[name + ".weight.quant_map"].numpy())
        qs = json.loads(bytes(saved[name + ".weight.quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8"))
        assert qs["shape"] == list(w.shape) and qs["blocksize"] == 64 and qs["nested_blocksize"] == 256, qs
        assert F32(qs["nested_offset"]) == ref["offset"][0], (qs, ref["offset"])
    for k, v in saved.items():
        if not any(k.startswith(l + ".weight") for l in linears):
            assert torch.equal(v, orig[k]), k          # embeddings, norms, lm_head stay f32

    # ---- reference: plain f32 model with the spec-dequantized weights ----
    deq_sd = dict(orig)
    for name in linears:
        w = orig[name + ".weight"]
        deq_sd[name + ".weight"] = torch.from_numpy(reimplement(w.reshape(-1).numpy(), 64)["dequant"]).reshape(w.shape)
    plain = LlamaForCausalLM(spec["config"]).eval()
    plain.load_state_dict(deq_sd)
    with torch.no_grad():
        logits_ref = plain(input_ids=ids).logits[0].float().clone()

    # ---- the quantized model itself, reloaded from disk ----
    qm2 = LlamaForCausalLM.from_pretrained(model_dir, device_map="cpu", attn_implementation="eager").eval()
    lin4 = [m for m in qm2.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(lin4) == 14
    bf16_path_note = None
    try:
        with torch.no_grad():
            logits_bf16_path = qm2(input_ids=ids).logits[0].float().clone()  # AVX512-BF16 repack path (if any)
    except RuntimeError as e:   # the repack needs in_features % blocksize == 0 (down_proj: 96 % 64 != 0)
        logits_bf16_path = None
        bf16_path_note = f"default eval forward failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    qm3 = LlamaForCausalLM.from_pretrained(model_dir, device_map="cpu", attn_implementation="eager").eval()
    for m in qm3.modules():
        if isinstance(m, bitsandbytes.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False   # generic path: dequantize_4bit + f32 F.linear
    with torch.no_grad():
        logits_native = qm3(input_ids=ids).logits[0].float().clone()
    # bnb's CPU kernel mis-indexes absmax for down_proj ([64, 96]: 96 % 16 == 0, 96 % 64 != 0)
    # on AVX-512 CPUs; swap in bnb's own pure-torch kernel (what it uses for odd shapes).
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", _flat_dequant_4bit_cpu)
    with torch.no_grad():
        logits = qm3(input_ids=ids).logits[0].float().clone()
    assert torch.equal(logits, logits_ref), (logits - logits_ref).abs().max()

    notes.append(f"llama_nf4: max|logits(native CPU kernel) - logits| = {(logits_native - logits).abs().max().item():.4g}")
    if logits_bf16_path is None:
        notes.append(f"llama_nf4: {bf16_path_note}")
    else:
        notes.append(f"llama_nf4: max|logits(default eval path, bf16 repack on AVX512-BF16 CPUs) - logits| = "
                     f"{(logits_bf16_path - logits).abs().max().item():.4g}")
    base.eval()
    with torch.no_grad():
        logits_f32 = base(input_ids=ids).logits[0].float()
    notes.append(f"llama_nf4: max|logits(unquantized f32) - logits| = {(logits_f32 - logits).abs().max().item():.4g}")

    save_file({"input_ids": input_ids.to(torch.int32).contiguous(), "logits": logits.contiguous()},
              str(LLAMA_NF4_DIR / "expected.safetensors"),
              metadata={"generator": "tests/oracle/make_nf4_fixtures.py"})

    name = "model.layers.0.mlp.down_proj"
    summary = {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in saved.items() if k.startswith(name)}
    qs = bytes(saved[name + ".weight.quant_state.bitsandbytes__nf4"].tolist()).decode("utf-8")
    cfg = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    print("llama_nf4 saved tensors for", name, json.dumps(summary, indent=1))
    print("llama_nf4 quant_state JSON:", qs)
    print("llama_nf4 config.json quantization_config:", json.dumps(cfg, sort_keys=True))


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if NF4_DIR.exists():
        shutil.rmtree(NF4_DIR)
    NF4_DIR.mkdir(parents=True)
    notes = []

    write_dynamic_map()
    write_torch_mean()
    notes.append(f"torch f32 mean vs summation methods: {check_mean_methods()}")
    for name, shape, bs, factory in CASES:
        run_case(name, shape, bs, factory, notes)
    build_llama_nf4(notes)

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    (NF4_DIR / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    for line in notes:
        print(line)
    print(json.dumps(versions))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*kernels.*")
    main()
