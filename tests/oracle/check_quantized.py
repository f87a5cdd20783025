#!/usr/bin/env python3
"""Does transformers + bitsandbytes load `trainer quantize` output and agree with Graft?

Manual check, not run by CI. For a tiny random Llama saved in bf16 and in f32:

  1. `trainer quantize` turns it into a bitsandbytes NF4 (double quant) checkpoint;
  2. the output is compared, tensor by tensor, with what bitsandbytes' `quantize_4bit`
     gives for the original weights, and with what transformers itself saves after
     quantizing the same checkpoint with `BitsAndBytesConfig` (keys, dtypes, shapes,
     bytes, quant-state JSON, config.json's quantization_config);
  3. transformers loads it with `AutoModelForCausalLM.from_pretrained(out,
     device_map="cpu", dtype=torch.float32)` (pre-quantized, no requantization);
     the loaded `Linear4bit` quant states must equal the file, and dequantize to
     exactly what Graft's NF4 spec gives from the file's parts;
  4. logits of a fixed 16-token sequence from transformers (f32, exact dequant path)
     are compared with `trainer logits --model out` (f32).

Exit status 1 when Graft's f32 logits differ from transformers' by a relative L2
error above 1e-4 (or are not finite), or when a quantized tensor Graft wrote is not
bit-identical to bitsandbytes' own; 2 when transformers refuses to load the output.

Exact f32 path: bitsandbytes 0.50.2 on CPU has two quirks (see README.md, "NF4
fixtures", and make_nf4_fixtures.py, which this script imports):
  - on AVX512-BF16 CPUs, `Linear4bit` in eval mode repacks its weight for a bf16
    gemv kernel (bf16 activations and scales): we set `support_avx512bf16_for_cpu =
    False` so it takes the generic path (dequantize, then f32 `F.linear`);
  - the native CPU `dequantize_4bit` indexes absmax per row on AVX-512 when
    in_features % 16 == 0 and in_features % blocksize != 0: we register bnb's own
    pure-torch kernel (`make_nf4_fixtures._flat_dequant_4bit_cpu`) for the exact run.
    (Every in_features here is a multiple of 64, so the quirk does not trigger; the
    script still measures the native kernel against the flat one.)
Two more for a bf16 source (transformers' own bf16 checkpoints behave the same way):
  - it gets `bnb_4bit_compute_dtype: "bfloat16"` (as transformers writes it), which
    makes `Linear4bit` cast activations to bf16: the exact run sets `compute_dtype =
    float32`;
  - transformers 5.24 keeps the unquantized `*.weight` tensors (embeddings, norms,
    lm_head) of a pre-quantized bnb checkpoint in their on-disk dtype even with
    `dtype=torch.float32` (see `upcast_unquantized`), so the model runs in bf16: the
    exact run upcasts them.
The untouched default load + forward is reported for information.

Usage (from the repository root):
    cargo build --release -p graft-trainer && /work/venv/bin/python tests/oracle/check_quantized.py
Options: --trainer PATH (default ./target/release/trainer), --dtypes bf16,f32,
--keep DIR (keep the checkpoints there instead of a temporary directory).
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import safetensors  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
from bitsandbytes.nn import Linear4bit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_nf4_fixtures as nf4  # noqa: E402  (bnb CPU quirks, flat dequant kernel, NF4 table)

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_KEY = "quant_state.bitsandbytes__nf4"
PART_SUFFIXES = ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + STATE_KEY]
REL_L2_LIMIT = 1e-4
SEED = 2026
T = 16

# Every in_features (128, 256) is a multiple of 64 (bnb's bf16 repack needs it).
CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
TORCH_NAME = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


# -----------------------------------------------------------------------------
# small helpers
# -----------------------------------------------------------------------------

def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def bitwise_equal(a, b):
    """Same dtype, shape and bytes (distinguishes -0.0 / 0.0)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)) if a.numel() else True


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p.stdout.strip()


def state_json(t):
    return bytes(t.tolist()).decode("utf-8")


def spec_dequant(parts, numel):
    """Graft's NF4 dequantization from a file's parts, vectorized (every numpy f32 op
    rounds once, no FMA): absmax_i = f32(f32(code8[q_i] * nested[i/256]) + offset),
    y_j = f32(nf4[c_j] * absmax[j / blocksize]) (flat blocks over the row-major tensor)."""
    st = json.loads(state_json(parts["state"]))
    bs, nbs = st["blocksize"], st["nested_blocksize"]
    offset = np.float32(st["nested_offset"])
    q8 = parts["absmax"].numpy().astype(np.int64)
    nested = parts["nested_absmax"].numpy()
    code8 = parts["nested_quant_map"].numpy()
    nb = q8.shape[0]
    absmax = (code8[q8] * nested[np.arange(nb) // nbs]).astype(np.float32) + offset
    packed = parts["packed"].numpy().reshape(-1)
    codes = np.empty(packed.size * 2, np.int64)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    nf4_table = parts["quant_map"].numpy()
    y = nf4_table[codes[:numel]] * absmax[np.arange(numel) // bs]
    assert y.dtype == np.float32 and absmax.dtype == np.float32
    return torch.from_numpy(y.reshape(st["shape"]))


def file_parts(sd, w):
    return {"packed": sd[w], "absmax": sd[w + ".absmax"], "quant_map": sd[w + ".quant_map"],
            "nested_absmax": sd[w + ".nested_absmax"], "nested_quant_map": sd[w + ".nested_quant_map"],
            "state": sd[w + "." + STATE_KEY]}


def linear_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def dequant_f32(m):
    """bitsandbytes.functional.dequantize_4bit of a loaded Linear4bit, in f32 whatever
    quant_state.dtype says (bfloat16 for a bf16 source): nested absmax via
    dequantize_blockwise + offset, then the dequantize_4bit op (native CPU kernel, or
    the flat kernel once registered)."""
    qs = m.weight.quant_state
    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2)
    absmax += qs.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(m.weight.data, absmax.float(), qs.blocksize,
                                                          qs.quant_type, qs.shape, torch.float32)


def upcast_unquantized(model):
    """transformers 5.24 ignores dtype=torch.float32 for the unquantized `*.weight` tensors of
    a pre-quantized bnb checkpoint: the Bnb4bitDeserialize converter's source pattern
    "weight" matches every `*.weight` key (embeddings, norms, lm_head too), and
    HfQuantizer.get_new_dtype returns None for converters that hold a quantizer op, so
    those tensors keep their on-disk dtype (bf16 here) and the forward runs in bf16.
    Upcast them (exactly) to f32 for the exact comparison."""
    for p in model.parameters():
        if not isinstance(p, bitsandbytes.nn.Params4bit) and p.is_floating_point():
            p.data = p.data.float()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.unsqueeze(0)).logits[0].float().clone()


# -----------------------------------------------------------------------------
# phase 1 (bnb's native CPU kernels still registered)
# -----------------------------------------------------------------------------

def build_source(tag, dtype, root):
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):          # away from the trivial all-ones init
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    src = root / f"{tag}_src"
    model.to(dtype).save_pretrained(src)
    ids = torch.randint(1, CONFIG["vocab_size"], (T,), generator=torch.Generator().manual_seed(SEED + 1))
    return src, ids


def compare_with_bnb(orig, graft_sd, linears, field_ok, problems):
    """Requantize each original weight with bnb.functional.quantize_4bit (as stored on disk:
    bnb upcasts bf16 to f32 first) and compare every field with Graft's file."""
    for w in linears:
        x = orig[w]
        packed, st = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True,
                                        quant_storage=torch.uint8)
        ref = st.as_dict(packed=True)
        try:
            g = file_parts(graft_sd, w)
        except KeyError as e:
            problems.append(f"{w}: Graft's file has no tensor {e}")
            continue
        gj = json.loads(state_json(g["state"]))
        rj = json.loads(state_json(ref[STATE_KEY]))
        checks = {
            "packed (weight)": bitwise_equal(g["packed"], packed),
            "absmax (u8 codes)": bitwise_equal(g["absmax"], ref["absmax"]),
            "nested_absmax": bitwise_equal(g["nested_absmax"], ref["nested_absmax"]),
            "nested_quant_map": bitwise_equal(g["nested_quant_map"], ref["nested_quant_map"]),
            "quant_map": bitwise_equal(g["quant_map"], ref["quant_map"]),
            "nested_offset (f32)": np.float32(gj["nested_offset"]).tobytes() == st.offset.numpy().tobytes(),
            "state JSON (parsed)": gj == {**rj, "shape": list(rj["shape"])},
            "state JSON (bytes)": bitwise_equal(g["state"], ref[STATE_KEY]),
        }
        for k, ok in checks.items():
            field_ok.setdefault(k, []).append(ok)
            if not ok and k != "state JSON (bytes)":
                problems.append(f"{w}: {k} differs from bitsandbytes.functional.quantize_4bit")
        if not checks["state JSON (bytes)"]:
            field_ok.setdefault("_json_example", (state_json(g["state"]), state_json(ref[STATE_KEY])))


def compare_with_transformers_save(src, dtype, graft_dir, graft_sd, root, tag, info):
    """transformers quantizes the same source itself (BitsAndBytesConfig) and saves it;
    Graft's file should hold the same keys, dtypes, shapes and bytes."""
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    hf_dir = root / f"{tag}_hf_quantized"
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, device_map="cpu", dtype=dtype,
                                             attn_implementation="eager")
    m.save_pretrained(hf_dir)
    hf_sd = load_file(str(hf_dir / "model.safetensors"))
    only_graft = sorted(set(graft_sd) - set(hf_sd))
    only_hf = sorted(set(hf_sd) - set(graft_sd))
    diff = {"tensors (dtype, shape or bytes)": [], "quant-state JSON (parsed)": [],
            "quant-state JSON (bytes only: formatting)": []}
    for k in sorted(set(graft_sd) & set(hf_sd)):
        a, b = graft_sd[k], hf_sd[k]
        if k.endswith(STATE_KEY):
            if json.loads(state_json(a)) != json.loads(state_json(b)):
                diff["quant-state JSON (parsed)"].append(k)
            elif not bitwise_equal(a, b):
                diff["quant-state JSON (bytes only: formatting)"].append(k)
        elif not bitwise_equal(a, b):
            diff["tensors (dtype, shape or bytes)"].append(
                f"{k}: graft {a.dtype}{list(a.shape)} vs transformers {b.dtype}{list(b.shape)}")
    gq = json.loads((graft_dir / "config.json").read_text())["quantization_config"]
    hq = json.loads((hf_dir / "config.json").read_text())["quantization_config"]
    qc_diff = {k: (gq.get(k, "<absent>"), hq.get(k, "<absent>")) for k in sorted(set(gq) | set(hq))
               if gq.get(k, "<absent>") != hq.get(k, "<absent>")}
    with safe_open(str(graft_dir / "model.safetensors"), "pt") as f:
        gmeta = f.metadata()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        hmeta = f.metadata()
    info.update(tf_only_graft=only_graft, tf_only_hf=only_hf, tf_diff=diff, tf_qc_diff=qc_diff,
                tf_common=len(set(graft_sd) & set(hf_sd)), tf_meta=(gmeta, hmeta))


def load_quantized(qdir):
    """The load under test: pre-quantized NF4 weights, nothing requantized."""
    model, loading = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu", dtype=torch.float32,
                                                          attn_implementation="eager", output_loading_info=True)
    return model.eval(), loading


def phase1(tag, dtype, root, trainer):
    info = {"tag": tag, "dtype": dtype, "problems": [], "field_ok": {}}
    src, ids = build_source(tag, dtype, root)
    qdir = root / f"{tag}_nf4"
    info["quantize_stdout"] = run([trainer, "quantize", "--model", src, "--out", qdir])
    orig = load_file(str(src / "model.safetensors"))
    graft_sd = load_file(str(qdir / "model.safetensors"))
    linears = sorted(k[: -len(".absmax")] for k in graft_sd if k.endswith(".weight.absmax"))
    info.update(src=src, qdir=qdir, ids=ids, orig=orig, graft_sd=graft_sd, linears=linears)
    if len(linears) != 7 * CONFIG["num_hidden_layers"]:
        info["problems"].append(f"expected {7 * CONFIG['num_hidden_layers']} quantized linears, found {len(linears)}")

    compare_with_bnb(orig, graft_sd, linears, info["field_ok"], info["problems"])
    for k in graft_sd:                                 # embeddings, norms, lm_head: kept as stored
        if not any(k == w or k.startswith(w + ".") for w in linears):
            if not bitwise_equal(graft_sd[k], orig[k]):
                info["problems"].append(f"kept tensor {k} differs from the source")
    try:
        compare_with_transformers_save(src, dtype, qdir, graft_sd, root, tag, info)
    except Exception:
        info["tf_error"] = traceback.format_exc()

    # ---- transformers loads Graft's output ----
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, loading = load_quantized(qdir)
    except Exception:
        info["load_error"] = traceback.format_exc()
        return info
    info["loading"] = {k: sorted(map(str, v)) for k, v in loading.items() if v}
    info["load_warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                    if "kernels" not in str(w.message)})
    if info["loading"]:
        info["problems"].append(f"from_pretrained loading info not empty: {info['loading']}")
    mods = linear_modules(model)
    info["n_linear4bit"] = len(mods)
    info["compute_dtype_loaded"] = sorted({str(m.compute_dtype) for m in mods.values()})
    info["qs_dtype_loaded"] = sorted({str(m.weight.quant_state.dtype) for m in mods.values()})
    if sorted(n + ".weight" for n in mods) != linears:
        info["problems"].append("Linear4bit modules do not match the quantized weights in the file")

    # loaded quant states == file; dequantization == Graft's spec (native kernel and flat kernel)
    load_ok, native_max, native_exact = True, 0.0, True
    deq_spec = {}
    for n, m in mods.items():
        w = n + ".weight"
        qs = m.weight.quant_state
        if qs is None or any(w + suf not in graft_sd for suf in PART_SUFFIXES):
            load_ok = False
            info["problems"].append(f"{w}: no quant state after loading, or parts missing from the file")
            continue
        g = file_parts(graft_sd, w)
        gj = json.loads(state_json(g["state"]))
        same = (bitwise_equal(m.weight.data.view(torch.uint8), g["packed"])
                and bitwise_equal(qs.absmax, g["absmax"]) and bitwise_equal(qs.code, g["quant_map"])
                and bitwise_equal(qs.state2.absmax, g["nested_absmax"])
                and bitwise_equal(qs.state2.code, g["nested_quant_map"])
                and qs.offset.dtype == torch.float32
                and qs.offset.numpy().tobytes() == np.float32(gj["nested_offset"]).tobytes()
                and list(qs.shape) == gj["shape"] and qs.blocksize == gj["blocksize"]
                and qs.state2.blocksize == 256 and qs.quant_type == "nf4" and qs.nested)
        if not same:
            load_ok = False
            info["problems"].append(f"{w}: loaded quant state differs from the file")
        spec = spec_dequant(g, qs.shape.numel())
        deq_spec[w] = spec
        native = dequant_f32(m)
        native_max = max(native_max, max_abs(native, spec))
        native_exact &= bitwise_equal(native, spec)
    info.update(qs_equal_file=load_ok, native_dequant_max=native_max, native_dequant_exact=native_exact,
                deq_spec=deq_spec)
    kept_dtypes = set()
    for n, p in model.named_parameters():               # unquantized params: values as stored
        if n in orig and not isinstance(p, bitsandbytes.nn.Params4bit):
            kept_dtypes.add(str(p.dtype))
            if not bitwise_equal(p.data.float(), orig[n].float()):
                info["problems"].append(f"loaded {n} differs from the source")
    info["kept_dtype_loaded"] = sorted(kept_dtypes)

    # default eval forward, untouched (AVX512-BF16 repack + compute_dtype from config)
    try:
        info["logits_default"] = hf_logits(load_quantized(qdir)[0], ids)
    except Exception as e:
        info["logits_default"] = None
        info["default_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return info


# -----------------------------------------------------------------------------
# phase 2 (flat dequant kernel registered)
# -----------------------------------------------------------------------------

def phase2(info, trainer, root):
    tag, ids, qdir, src = info["tag"], info["ids"], info["qdir"], info["src"]
    ids_arg = ",".join(str(i) for i in ids.tolist())

    # dequantization through the loaded states, exact path, in f32
    model, _ = load_quantized(qdir)
    mods = linear_modules(model)
    flat_exact = True
    for n, m in mods.items():
        flat_exact &= bitwise_equal(dequant_f32(m), info["deq_spec"][n + ".weight"])
    info["flat_dequant_exact"] = flat_exact
    if not flat_exact:
        info["problems"].append("loaded quant states do not dequantize (flat kernel) to Graft's spec values")

    # exact-path forward
    for m in mods.values():
        m.support_avx512bf16_for_cpu = False           # generic path: dequantize + f32 F.linear
        m.compute_dtype = torch.float32                # a bf16 source's config says bfloat16
    upcast_unquantized(model)
    logits_hf = hf_logits(model, ids)

    # plain f32 Llama with Graft-spec dequantized weights
    plain = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
    sd = {k: v.float() for k, v in info["orig"].items()}
    sd.update(info["deq_spec"])
    plain.load_state_dict(sd)
    logits_plain = hf_logits(plain, ids)

    # unquantized reference
    unq = AutoModelForCausalLM.from_pretrained(src, device_map="cpu", dtype=torch.float32,
                                               attn_implementation="eager").eval()
    logits_unq = hf_logits(unq, ids)

    # Graft
    def graft(model_dir, name, dtype="f32"):
        out = root / f"{tag}_{name}.safetensors"
        run([trainer, "logits", "--model", model_dir, "--input-ids", ids_arg, "--out", out, "--dtype", dtype])
        return load_file(str(out))["logits"]

    g_q = graft(qdir, "graft_nf4")
    g_unq = graft(src, "graft_src")
    g_q_bf16 = graft(qdir, "graft_nf4_bf16", "bf16") if info["dtype"] == torch.bfloat16 else None
    info.update(logits_hf=logits_hf, logits_plain=logits_plain, logits_unq=logits_unq, g_q=g_q, g_unq=g_unq,
                g_q_bf16=g_q_bf16)


# -----------------------------------------------------------------------------
# report
# -----------------------------------------------------------------------------

def report(infos):
    rows, failed = [], False
    for info in infos:
        tag = info["tag"]
        print(f"\n=== {tag} source ({TORCH_NAME[info['dtype']]}) ===")
        print("trainer quantize:", info["quantize_stdout"])
        fo = info["field_ok"]
        print("Graft output vs bitsandbytes.functional.quantize_4bit(original weight), over "
              f"{len(info['linears'])} linear weights:")
        for k, v in fo.items():
            if not k.startswith("_"):
                print(f"  {k:22s} {'bit-identical' if all(v) else f'DIFFERS in {v.count(False)}/{len(v)}'}")
        if "_json_example" in fo:
            print("  quant-state JSON, Graft:        ", fo["_json_example"][0])
            print("  quant-state JSON, bitsandbytes: ", fo["_json_example"][1])
        if "tf_error" in info:
            print("transformers' own quantization of the source failed (comparison skipped):\n" + info["tf_error"])
        else:
            print(f"Graft output vs transformers' own save_pretrained after BitsAndBytesConfig quantization: "
                  f"{info['tf_common']} common keys; only in Graft: {info['tf_only_graft'] or 'none'}; "
                  f"only in transformers': {info['tf_only_hf'] or 'none'}")
            for k, v in info["tf_diff"].items():
                print(f"  differing {k}: {len(v)}" + (f" e.g. {v[:2]}" if v else ""))
            print(f"  config.json quantization_config differences (graft, transformers): {info['tf_qc_diff'] or 'none'}")
            print(f"  safetensors metadata (graft, transformers): {info['tf_meta']}")
            if info["tf_only_graft"] or info["tf_only_hf"] or any(
                    v for k, v in info["tf_diff"].items() if "formatting" not in k):
                info["problems"].append("Graft's output differs from transformers' own save (see above)")
        if "load_error" in info:
            print("TRANSFORMERS REFUSED TO LOAD the output:\n" + info["load_error"])
            failed = True
            rows.append((tag, "from_pretrained", "FAILED", "", ""))
            continue
        print(f"transformers loaded {info['n_linear4bit']} Linear4bit modules; loading info: "
              f"{info['loading'] or 'no missing/unexpected/mismatched keys'}; compute_dtype {info['compute_dtype_loaded']}, "
              f"quant_state.dtype {info['qs_dtype_loaded']}; unquantized params loaded as {info['kept_dtype_loaded']} "
              f"(asked for float32)")
        for w in info["load_warnings"]:
            print("  warning:", w)
        print(f"loaded quant states == file parts: {info['qs_equal_file']}")
        print("dequantize_4bit (flat kernel) of loaded states == Graft spec dequant:",
              info.get("flat_dequant_exact", "not run"))
        print(f"dequantize_4bit (native CPU kernel) vs Graft spec: bit-identical {info['native_dequant_exact']}, "
              f"max|diff| {info['native_dequant_max']:.3g}")
        if info.get("default_error"):
            print("default eval forward (bf16 repack) failed:", info["default_error"])
        for p in info["problems"]:
            print("PROBLEM:", p)
        failed |= bool(info["problems"])
        if "phase2_error" in info:
            print("transformers loaded the output, but the forward/dequant check failed:\n" + info["phase2_error"])
            failed = True
            rows.append((tag, "forward / dequant of the loaded model", "FAILED", "", ""))
            continue

        hf, g = info["logits_hf"], info["g_q"]
        r, a = rel_l2(g, hf), max_abs(g, hf)
        ok = math.isfinite(r) and r <= REL_L2_LIMIT and bool(torch.isfinite(g).all())
        failed |= not ok
        rows.append((tag, "Graft nf4 f32 vs HF nf4 f32 (exact path)", f"{r:.3e}", f"{a:.3e}", "PASS" if ok else "FAIL"))
        rows.append((tag, "HF nf4 exact path vs plain f32 Llama w/ spec dequant", f"{rel_l2(hf, info['logits_plain']):.3e}",
                     f"{max_abs(hf, info['logits_plain']):.3e}",
                     "bit-identical" if bitwise_equal(hf, info["logits_plain"]) else "info"))
        if info["logits_default"] is not None:
            d = info["logits_default"]
            rows.append((tag, "HF nf4 default load+forward vs HF exact", f"{rel_l2(d, hf):.3e}",
                         f"{max_abs(d, hf):.3e}", "info"))
        if info["g_q_bf16"] is not None:
            gb = info["g_q_bf16"]
            rows.append((tag, "Graft nf4 --dtype bf16 vs HF nf4 exact", f"{rel_l2(gb, hf):.3e}",
                         f"{max_abs(gb, hf):.3e}", "info"))
            if info["logits_default"] is not None:
                rows.append((tag, "Graft nf4 --dtype bf16 vs HF nf4 default load+forward",
                             f"{rel_l2(gb, info['logits_default']):.3e}",
                             f"{max_abs(gb, info['logits_default']):.3e}", "info"))
        rows.append((tag, "Graft unquantized f32 vs HF unquantized f32", f"{rel_l2(info['g_unq'], info['logits_unq']):.3e}",
                     f"{max_abs(info['g_unq'], info['logits_unq']):.3e}", "info"))
        rows.append((tag, "HF nf4 exact vs HF unquantized (quantization error)", f"{rel_l2(hf, info['logits_unq']):.3e}",
                     f"{max_abs(hf, info['logits_unq']):.3e}", "info"))
        fields = [k for k in info["field_ok"] if not k.startswith("_")]
        same_fields = [k for k in fields if all(info["field_ok"][k])]
        rows.append((tag, "quantized fields bit-identical to bnb quantize_4bit", f"{len(same_fields)}/{len(fields)}", "",
                     ("PASS" if not any(k not in same_fields and k != "state JSON (bytes)" for k in fields) else "FAIL")
                     + ("" if "state JSON (bytes)" in same_fields else " (JSON bytes: formatting only)")))

    print("\n=== summary (logits: 16 tokens x 256 vocab; rel L2 = |a-b|/|b|; 'HF' = transformers + bitsandbytes;"
          "\n    'exact path' = f32 params, compute_dtype f32, no bf16 repack, flat dequant kernel;"
          "\n    'default load+forward' = from_pretrained(dtype=float32) as is, on this CPU) ===")
    w = max(len(r[1]) for r in rows)
    print(f"{'src':4s}  {'comparison':{w}s}  {'rel L2':>10s}  {'max|diff|':>10s}  result")
    for tag, what, r, a, res in rows:
        print(f"{tag:4s}  {what:{w}s}  {r:>10s}  {a:>10s}  {res}")
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    print(json.dumps(versions))
    print("RESULT:", "FAIL" if failed else "PASS")
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trainer", default=str(REPO_ROOT / "target" / "release" / "trainer"))
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--keep", help="directory to keep the checkpoints in (default: a temporary one)")
    args = ap.parse_args()
    trainer = Path(args.trainer).resolve()
    if not trainer.is_file():
        sys.exit(f"{trainer} not found: cargo build --release -p graft-trainer")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        infos = [phase1(tag, DTYPES[tag], root, trainer) for tag in args.dtypes.split(",")]
        # From here on bnb's pure-torch (flat-block) kernel replaces the native CPU
        # dequantize_4bit (see the docstring); phase 1 measured the native one.
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", nf4._flat_dequant_4bit_cpu)
        for info in infos:
            if "load_error" not in info:
                try:
                    phase2(info, trainer, root)
                except Exception:
                    info["phase2_error"] = traceback.format_exc()
        failed = report(infos)
    if any("load_error" in i for i in infos):
        sys.exit(2)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
