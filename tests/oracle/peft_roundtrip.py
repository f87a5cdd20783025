#!/usr/bin/env python3
"""Do Graft's LoRA and DoRA adapters interoperate with Hugging Face PEFT, in both directions?

Manual check, not run by CI. On a Hugging Face Llama directory (default: the embedded
default model, trainer/assets/default/model), everything in f32 on CPU:

  1. Graft -> PEFT: `trainer run` trains a LoRA adapter (r=8, alpha=16, all-linear,
     dropout 0, unquantized f32 base, 20 AdamW steps at lr 1e-2 under the embedded
     run.toml's 20 warm-up steps, i.e. the lr ramps from 0 to 9.5e-3, so that every
     lora_B is clearly non-zero). transformers loads the base in float32,
     `PeftModel.from_pretrained` attaches Graft's adapter; its logits on a fixed 12-token
     sequence must equal `trainer logits --adapter`. Also checked: every lora_B is non-zero, the adapter
     changes the logits (so the comparison cannot pass vacuously), PEFT wraps exactly the
     modules the file names and loads every tensor unchanged, and PEFT's own
     `save_pretrained` of the loaded adapter writes the same keys and tensors.
  2. PEFT -> Graft: PEFT creates adapters with random A and B (`init_lora_weights=False`)
     and saves them; `trainer logits --adapter` must equal PEFT's logits. Two adapters:
     r=4, alpha=8 on q_proj, v_proj, down_proj; and rsLoRA r=8, alpha=8 on k_proj,
     o_proj, gate_proj, up_proj.
  3. Merge: `trainer merge --dtype f32` of the adapter from 1; transformers loads the
     merged checkpoint (AutoModelForCausalLM, float32) and its logits must equal those of
     the PeftModel from 1. Its tensors are compared with PEFT's `merge_and_unload()`:
     same keys, non-LoRA tensors bit-identical, merged weights within 1e-5 (rel L2).
  4. Graft DoRA -> PEFT: as 1 with adapter.method="dora" (PEFT's use_dora format: a
     `lora_magnitude_vector` [out] per module next to lora_A / lora_B). Checked: use_dora in
     the file, every lora_B non-zero and every magnitude moved off ||W||_row; PeftModel
     loads it with no missing / unexpected keys, use_dora in the loaded config, DoRA on every
     module, every tensor (magnitudes included) bit-identical; PEFT re-saves it byte-identically;
     the adapter changes the logits; PeftModel's logits equal `trainer logits --adapter`; and
     DoRA is really applied: the same A and B without the magnitudes (a plain LoRA adapter,
     use_dora false) give other logits, in PEFT and in Graft.
  5. PEFT DoRA -> Graft: `get_peft_model(..., use_dora=True)` with PEFT's seeded default init,
     then every lora_B ~ N(0, 0.05) and every magnitude *= 1 + 0.1 N(0, 1) (as
     make_dora_fixtures.py), saved by PEFT; `trainer logits --adapter` must equal PeftModel's
     logits; plus the "changes the logits" and "DoRA is applied" checks. Two adapters: r=4,
     alpha 8 on all seven projections; rsLoRA r=8, alpha 8 on q_proj, v_proj, down_proj.
  6. DoRA merge: as 3 for the adapter from 4 (`trainer merge --dtype f32`; transformers
     loads it; logits vs 4's PeftModel; weights vs PEFT's `merge_and_unload()`).

Logit comparisons pass at a relative L2 error |a-b|/|b| below 1e-4 (Graft's f32 forward
and transformers' differ by f32 rounding order only, ~1e-6). One line per check; exit
status 1 if any check fails.

Usage (from the repository root):
    cargo build --release -p graft-trainer && /work/venv/bin/python tests/oracle/peft_roundtrip.py
Options: --model DIR (default trainer/assets/default/model), --data FILE (messages
JSONL, chatml; default trainer/assets/default/data/train.jsonl), --trainer PATH (default
target/release/trainer), --work DIR (keep the adapters, checkpoints and logits there
instead of a temporary directory), --steps N (default 20).
"""

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
REL_L2_LIMIT = 1e-4          # logits
MERGED_WEIGHT_LIMIT = 1e-5   # merged weights, per tensor
MIN_ADAPTER_EFFECT = 1e-3    # adapted vs base logits must differ at least this much (rel L2)
T = 12
SEED = 2027

# Graft's training run (check 1). Everything else keeps `trainer run --help`'s default.
GRAFT_RUN = {
    "model.quantize": "none",
    "model.compute_dtype": "f32",
    "adapter.method": "lora",
    "adapter.r": "8",
    "adapter.alpha": "16",
    "adapter.dropout": "0",
    "adapter.target_modules": "all-linear",
    "adapter.use_rslora": "false",
    "data.format": "messages",
    "data.template": "chatml",
    "data.eval": "",
    "data.max_seq_len": "64",
    "train.optimizer": "adamw",
    "train.lr": "1e-2",
    "train.scheduler": "constant",
    "train.micro_batch_size": "4",
    "train.seed": "42",
    "output.eval_accuracy": "false",
}

# Graft's DoRA training run (check 4): check 1's run with DoRA instead of LoRA.
GRAFT_DORA_RUN = {**GRAFT_RUN, "adapter.method": "dora"}

# PEFT-made adapters (check 2): name -> LoraConfig kwargs.
PEFT_ADAPTERS = {
    "peft_qvd_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "peft_rslora_r8": dict(r=8, lora_alpha=8, use_rslora=True,
                           target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
}

# PEFT-made DoRA adapters (check 5): name -> LoraConfig kwargs (use_dora=True added). As in
# make_dora_fixtures.py: PEFT's default init (seeded kaiming-uniform A, B = 0, magnitude =
# ||W||_row), then every lora_B ~ N(0, 0.05) and every magnitude *= 1 + 0.1 * N(0, 1).
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_DORA_ADAPTERS = {
    "peft_dora_r4": dict(r=4, lora_alpha=8, target_modules=SEVEN),
    "peft_dora_rslora_r8": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}
LORA_B_STD = 0.05
MAG_PERTURB_STD = 0.1
MAGNITUDE_KEY = ".lora_magnitude_vector"


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
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)) if a.numel() else True


def run(cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return (p.stdout + p.stderr).strip()


def load_dir(d):
    """Every tensor of every *.safetensors file in a directory (sharded or not)."""
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def load_base(model_dir):
    """The base as stored (bf16 or f32 on disk), computed in f32."""
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32, (n, p.dtype)
    return m.eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.unsqueeze(0)).logits[0].float().clone()


def file_key(param_name, adapter_name="default"):
    """PeftModel parameter name -> adapter_model.safetensors key
    ("...q_proj.lora_A.default.weight" -> "...q_proj.lora_A.weight"). DoRA's magnitude also
    loses its ".weight" ("...q_proj.lora_magnitude_vector.default.weight" ->
    "...q_proj.lora_magnitude_vector": PEFT's file keeps the pre-refactor key)."""
    mag = f".lora_magnitude_vector.{adapter_name}.weight"
    if param_name.endswith(mag):
        return param_name[: -len(f".{adapter_name}.weight")]
    tag = f".{adapter_name}."
    assert tag in param_name, param_name
    return param_name.replace(tag, ".")


def lora_params(pm):
    return {file_key(n): p.detach() for n, p in pm.named_parameters() if ".lora_" in n}


def wrapped_modules(pm):
    """Module paths (as in the adapter file, without ".lora_A.weight") PEFT attached LoRA to."""
    return sorted(n for n, m in pm.named_modules() if isinstance(m, LoraLayer))


def scalings(pm):
    return sorted({m.scaling["default"] for m in pm.modules() if isinstance(m, LoraLayer)})


def dora_layers(pm):
    """LoRA layers on which PEFT runs DoRA for the default adapter."""
    return [m for m in pm.modules()
            if isinstance(m, LoraLayer) and m.use_dora.get("default") and "default" in m.lora_magnitude_vector]


def adapter_scaling(cfg):
    """lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)) from an adapter_config.json."""
    r = cfg["r"]
    return cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)


def magnitude_stats(sd, base_sd, scaling):
    """For every DoRA module of an adapter state dict: rel L2 of m against ||W||_row (the initial
    magnitude) and the range of m / ||W + scaling * B @ A||_row (the factor DoRA applies; 1 everywhere
    would make it plain LoRA). W: the base weight upcast to f32; norms in f64."""
    moved, ratios = {}, []
    for k, m in sd.items():
        if not k.endswith(MAGNITUDE_KEY):
            continue
        pre = k[: -len(MAGNITUDE_KEY)]
        W = base_sd[pre.removeprefix("base_model.model.") + ".weight"].double()
        A, B = sd[pre + ".lora_A.weight"].double(), sd[pre + ".lora_B.weight"].double()
        moved[pre] = rel_l2(m, torch.linalg.norm(W, dim=1))
        ratios.append(m.double() / torch.linalg.norm(W + scaling * (B @ A), dim=1))
    ratios = torch.cat(ratios) if ratios else torch.ones(1, dtype=torch.float64)
    return moved, ratios.min().item(), ratios.max().item()


def peft_load(base, adapter, notes, what):
    """PeftModel.from_pretrained(base, adapter), also returning the load result of the load_adapter
    call inside it (`missing_keys`, filtered by PEFT to this adapter's own keys, and
    `unexpected_keys`), which from_pretrained itself does not return."""
    results = []
    orig = PeftModel.load_adapter

    def spy(self, *a, **kw):
        r = orig(self, *a, **kw)
        results.append(r)
        return r

    PeftModel.load_adapter = spy
    try:
        pm = captured(lambda: PeftModel.from_pretrained(base, adapter), notes, what)
    finally:
        PeftModel.load_adapter = orig
    assert len(results) == 1, len(results)
    return pm.eval(), results[0]


def without_magnitudes(adapter, out):
    """A copy of a DoRA adapter with the magnitudes dropped: the same lora_A / lora_B as a plain
    LoRA adapter (`use_dora` false)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.endswith(MAGNITUDE_KEY)},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


class Checks:
    def __init__(self):
        self.rows = []

    def add(self, name, ok, detail):
        ok = bool(ok)
        self.rows.append((name, ok))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    def logits(self, name, got, ref):
        r = rel_l2(got, ref)
        ok = math.isfinite(r) and r < REL_L2_LIMIT and bool(torch.isfinite(got).all())
        self.add(name, ok, f"rel L2 {r:.3e} (limit {REL_L2_LIMIT:g}), max|diff| {max_abs(got, ref):.3e}")

    def differs(self, name, adapted, base):
        r = rel_l2(adapted, base)
        self.add(name, math.isfinite(r) and r > MIN_ADAPTER_EFFECT,
                 f"rel L2 {r:.3e} (must be > {MIN_ADAPTER_EFFECT:g}), max|diff| {max_abs(adapted, base):.3e}")

    def error(self, name):
        self.rows.append((name, False))
        print(f"FAIL  {name}: raised\n{traceback.format_exc()}", flush=True)


def captured(fn, notes, what):
    """Run fn, recording every Python warning it emits as a note."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    for w in caught:
        msg = str(w.message).strip().splitlines()[0][:300]
        if "kernels" not in msg and "is_gradient_checkpointing" not in msg:
            notes.append(f"{what}: {w.category.__name__}: {msg}")
    return out


# -----------------------------------------------------------------------------
# the checks
# -----------------------------------------------------------------------------

def graft_logits(ctx, name, model_dir, adapter=None):
    out = ctx["work"] / f"logits_{name}.safetensors"
    cmd = [ctx["trainer"], "logits", "--model", model_dir, "--input-ids", ctx["ids_arg"], "--out", out,
           "--dtype", "f32"]
    if adapter is not None:
        cmd += ["--adapter", adapter]
    run(cmd)
    return load_file(str(out))["logits"]


def check_base(ctx, c):
    """Baseline: the two forwards agree without any adapter."""
    ctx["hf_base"] = hf_logits(load_base(ctx["model"]), ctx["ids"])
    c.logits("0 base: trainer logits vs transformers (no adapter)",
             graft_logits(ctx, "graft_base", ctx["model"]), ctx["hf_base"])


def graft_train(ctx, notes, name, config):
    """`trainer run` with `config` (plus model, data, output dir and steps); returns the adapter dir."""
    run_dir = ctx["work"] / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    sets = {**config, "model.path": str(ctx["model"]), "data.train": str(ctx["data"]),
            "output.dir": str(run_dir), "train.max_steps": str(ctx["steps"])}
    cmd = [ctx["trainer"], "run"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    out = run(cmd)
    notes.append(f"trainer run ({sets['adapter.method']}): " + out.splitlines()[-1])
    return run_dir / "adapter"


def check_graft_to_peft(ctx, c, notes):
    adapter = graft_train(ctx, notes, "graft_run", GRAFT_RUN)
    ctx["graft_adapter"] = adapter
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ctx["graft_adapter_config"] = cfg
    sd = load_file(str(adapter / "adapter_model.safetensors"))

    b_norms = {k: v.float().norm().item() for k, v in sd.items() if ".lora_B." in k}
    c.add("1 graft->peft: every lora_B of Graft's adapter is non-zero",
          b_norms and min(b_norms.values()) > 0,
          f"{len(b_norms)} lora_B tensors, min |B|_F {min(b_norms.values(), default=0):.3e}, "
          f"max {max(b_norms.values(), default=0):.3e}")

    base = load_base(ctx["model"])
    pm = captured(lambda: PeftModel.from_pretrained(base, adapter), notes,
                  "PeftModel.from_pretrained(Graft adapter)").eval()
    ctx["peft_graft"] = pm
    loaded = lora_params(pm)
    modules = wrapped_modules(pm)
    file_modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    same_keys = set(loaded) == set(sd)
    same_vals = same_keys and all(bitwise_equal(loaded[k].float(), sd[k].float()) for k in sd)
    c.add("1 graft->peft: PEFT wraps the modules Graft trained and loads every tensor unchanged",
          same_keys and same_vals and modules == file_modules,
          f"{len(modules)} LoRA modules (file: {len(file_modules)}), {len(sd)} tensors, "
          f"key sets equal {same_keys}, values bit-identical {same_vals}; "
          f"PEFT scaling (alpha/r) {scalings(pm)}")
    if not same_keys:
        notes.append(f"only in Graft's file: {sorted(set(sd) - set(loaded))[:4]}; "
                     f"only in PEFT: {sorted(set(loaded) - set(sd))[:4]}")

    resaved = ctx["work"] / "graft_adapter_resaved_by_peft"
    if resaved.exists():
        shutil.rmtree(resaved)
    captured(lambda: pm.save_pretrained(resaved), notes, "PeftModel.save_pretrained")
    sd2 = load_file(str(resaved / "adapter_model.safetensors"))
    same = set(sd2) == set(sd) and all(bitwise_equal(sd2[k], sd[k]) for k in sd)
    c.add("1 graft->peft: PEFT's save_pretrained of the loaded adapter == Graft's file",
          same, f"{len(sd2)} vs {len(sd)} tensors, same keys/dtypes/shapes/bytes {same}")
    cfg2 = json.loads((resaved / "adapter_config.json").read_text())
    ctx["peft_resaved_config"] = cfg2

    ctx["peft_graft_logits"] = hf_logits(pm, ctx["ids"])
    c.differs("1 graft->peft: the adapter changes the logits (PeftModel vs base)",
              ctx["peft_graft_logits"], ctx["hf_base"])
    ctx["graft_adapter_logits"] = graft_logits(ctx, "graft_adapter", ctx["model"], adapter)
    c.logits("1 graft->peft: PeftModel(Graft adapter) vs trainer logits --adapter",
             ctx["graft_adapter_logits"], ctx["peft_graft_logits"])


def check_peft_to_graft(ctx, c, notes, name, kwargs):
    torch.manual_seed(SEED + len(name))
    base = load_base(ctx["model"])
    lcfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, init_lora_weights=False, **kwargs)
    pm = get_peft_model(base, lcfg).eval()
    adapter = ctx["work"] / name
    if adapter.exists():
        shutil.rmtree(adapter)
    pm.save_pretrained(adapter)
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    desc = (f"r={kwargs['r']} alpha={kwargs['lora_alpha']}{' rslora' if kwargs.get('use_rslora') else ''} "
            f"{'/'.join(kwargs['target_modules'])}")
    ref = hf_logits(pm, ctx["ids"])
    c.differs(f"2 peft->graft [{desc}]: the adapter changes the logits (PeftModel vs base)", ref, ctx["hf_base"])
    c.logits(f"2 peft->graft [{desc}]: trainer logits --adapter vs PeftModel ({len(sd)} tensors, "
             f"scaling {scalings(pm)})",
             graft_logits(ctx, name, ctx["model"], adapter), ref)
    ctx.setdefault("peft_configs", {})[name] = json.loads((adapter / "adapter_config.json").read_text())


def dora_applied(ctx, c, tag, name, adapter, peft_dora_logits, graft_dora_logits):
    """DoRA is really applied: the same lora_A / lora_B without the magnitudes (a plain LoRA adapter)
    give other logits, in PEFT and in Graft."""
    stripped = without_magnitudes(adapter, ctx["work"] / f"{name}_no_magnitudes")
    peft_lora = hf_logits(PeftModel.from_pretrained(load_base(ctx["model"]), stripped).eval(), ctx["ids"])
    graft_lora = graft_logits(ctx, stripped.name, ctx["model"], stripped)
    rp, rg = rel_l2(peft_dora_logits, peft_lora), rel_l2(graft_dora_logits, graft_lora)
    c.add(f"{tag}: DoRA is applied: the logits differ from those of the same A, B without magnitudes (plain LoRA)",
          all(math.isfinite(r) and r > MIN_ADAPTER_EFFECT for r in (rp, rg)),
          f"PeftModel rel L2 {rp:.3e}, trainer logits --adapter rel L2 {rg:.3e} (must be > {MIN_ADAPTER_EFFECT:g}); "
          f"without magnitudes, trainer vs PeftModel rel L2 {rel_l2(graft_lora, peft_lora):.3e}")


def check_graft_dora_to_peft(ctx, c, notes):
    adapter = graft_train(ctx, notes, "graft_dora_run", GRAFT_DORA_RUN)
    ctx["graft_dora_adapter"] = adapter
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ctx["graft_dora_adapter_config"] = cfg
    sd = load_file(str(adapter / "adapter_model.safetensors"))

    base_sd = {k: v.float() for k, v in load_dir(ctx["model"]).items()}
    b_norms = {k: v.float().norm().item() for k, v in sd.items() if ".lora_B." in k}
    mags = [k for k in sd if k.endswith(MAGNITUDE_KEY)]
    moved, lo, hi = magnitude_stats(sd, base_sd, adapter_scaling(cfg))
    c.add("4 graft dora->peft: Graft's DoRA adapter: use_dora, a magnitude per module, every lora_B non-zero, "
          "every magnitude moved off ||W||_row",
          cfg.get("use_dora") is True and b_norms and len(mags) == len(b_norms)
          and min(b_norms.values()) > 0 and min(moved.values(), default=0) > MIN_ADAPTER_EFFECT,
          f"use_dora {cfg.get('use_dora')!r}, {len(b_norms)} lora_B "
          f"(min |B|_F {min(b_norms.values(), default=0):.3e}), "
          f"{len(mags)} magnitudes: rel L2 vs ||W||_row min {min(moved.values(), default=0):.3e} "
          f"max {max(moved.values(), default=0):.3e} (must be > {MIN_ADAPTER_EFFECT:g}); "
          f"m / ||W + s B A||_row in [{lo:.3f}, {hi:.3f}]")

    pm, res = peft_load(load_base(ctx["model"]), adapter, notes, "PeftModel.from_pretrained(Graft DoRA adapter)")
    ctx["peft_graft_dora"] = pm
    loaded = lora_params(pm)
    modules = wrapped_modules(pm)
    file_modules = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    layers = dora_layers(pm)
    use_dora = pm.peft_config["default"].use_dora
    same_keys = set(loaded) == set(sd)
    same_vals = same_keys and all(bitwise_equal(loaded[k], sd[k]) for k in sd)
    mags_same = same_keys and all(bitwise_equal(loaded[k], sd[k]) for k in mags)
    c.add("4 graft dora->peft: PeftModel.from_pretrained loads Graft's DoRA adapter: no missing/unexpected keys, "
          "use_dora, every tensor (magnitudes included) bit-identical",
          not res.missing_keys and not res.unexpected_keys and use_dora is True and len(layers) == len(modules)
          and modules == file_modules and same_keys and same_vals and mags_same and len(mags) == len(modules),
          f"missing {res.missing_keys[:4]}, unexpected {res.unexpected_keys[:4]}; loaded config use_dora {use_dora!r}; "
          f"{len(layers)} DoRA layers of {len(modules)} LoRA modules (file: {len(file_modules)}); {len(sd)} tensors, "
          f"key sets equal {same_keys}, values bit-identical {same_vals}, {len(mags)} magnitudes bit-identical "
          f"{mags_same}; PEFT scaling {scalings(pm)}")
    if not same_keys:
        notes.append(f"DoRA: only in Graft's file: {sorted(set(sd) - set(loaded))[:4]}; "
                     f"only in PEFT: {sorted(set(loaded) - set(sd))[:4]}")

    resaved = ctx["work"] / "graft_dora_adapter_resaved_by_peft"
    if resaved.exists():
        shutil.rmtree(resaved)
    captured(lambda: pm.save_pretrained(resaved), notes, "PeftModel.save_pretrained (DoRA)")
    sd2 = load_file(str(resaved / "adapter_model.safetensors"))
    same = set(sd2) == set(sd) and all(bitwise_equal(sd2[k], sd[k]) for k in sd)
    c.add("4 graft dora->peft: PEFT's save_pretrained of the loaded DoRA adapter == Graft's file",
          same, f"{len(sd2)} vs {len(sd)} tensors, same keys/dtypes/shapes/bytes {same}")
    ctx["peft_resaved_dora_config"] = json.loads((resaved / "adapter_config.json").read_text())

    ctx["peft_graft_dora_logits"] = hf_logits(pm, ctx["ids"])
    c.differs("4 graft dora->peft: the adapter changes the logits (PeftModel vs base)",
              ctx["peft_graft_dora_logits"], ctx["hf_base"])
    ctx["graft_dora_adapter_logits"] = graft_logits(ctx, "graft_dora_adapter", ctx["model"], adapter)
    c.logits("4 graft dora->peft: PeftModel(Graft DoRA adapter) vs trainer logits --adapter",
             ctx["graft_dora_adapter_logits"], ctx["peft_graft_dora_logits"])
    dora_applied(ctx, c, "4 graft dora->peft", "graft_dora_adapter", adapter,
                 ctx["peft_graft_dora_logits"], ctx["graft_dora_adapter_logits"])


def check_peft_dora_to_graft(ctx, c, notes, name, kwargs):
    torch.manual_seed(SEED + len(name))                          # lora_A: PEFT's kaiming-uniform init
    gen = torch.Generator().manual_seed(SEED + len(name) + 1)    # lora_B and the magnitude perturbation
    base = load_base(ctx["model"])
    lcfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, use_dora=True, **kwargs)
    pm = get_peft_model(base, lcfg).eval()
    params = {n: p for n, p in pm.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for n in sorted(params):
            p = params[n]
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
            elif MAGNITUDE_KEY in n:
                p.mul_(1 + MAG_PERTURB_STD * torch.randn(p.shape, generator=gen))
    adapter = ctx["work"] / name
    if adapter.exists():
        shutil.rmtree(adapter)
    pm.save_pretrained(adapter)
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    ctx.setdefault("peft_configs", {})[name] = cfg
    assert cfg["use_dora"] is True and set(sd) == {file_key(n) for n in params}, sorted(sd)[:4]
    base_sd = {k: v.float() for k, v in load_dir(ctx["model"]).items()}
    _, lo, hi = magnitude_stats(sd, base_sd, adapter_scaling(cfg))
    desc = (f"r={kwargs['r']} alpha={kwargs['lora_alpha']}{' rslora' if kwargs.get('use_rslora') else ''} "
            f"{'/'.join(kwargs['target_modules'])}")
    ref = hf_logits(pm, ctx["ids"])
    c.differs(f"5 peft dora->graft [{desc}]: the adapter changes the logits (PeftModel vs base)", ref, ctx["hf_base"])
    got = graft_logits(ctx, name, ctx["model"], adapter)
    c.logits(f"5 peft dora->graft [{desc}]: trainer logits --adapter vs PeftModel ({len(sd)} tensors, "
             f"{len(dora_layers(pm))} DoRA layers, scaling {scalings(pm)}, m / ||W + s B A||_row in "
             f"[{lo:.3f}, {hi:.3f}])", got, ref)
    dora_applied(ctx, c, f"5 peft dora->graft [{desc}]", name, adapter, ref, got)


def check_merge(ctx, c, notes, tag="3 merge", key="graft", what="Graft adapter"):
    """`trainer merge --dtype f32` of ctx[f"{key}_adapter"] (check 1's LoRA or check 4's DoRA
    adapter) vs the PeftModel ctx[f"peft_{key}"] that loaded it and its merge_and_unload()."""
    adapter, pm = ctx[f"{key}_adapter"], ctx[f"peft_{key}"]
    peft_logits, adapter_logits = ctx[f"peft_{key}_logits"], ctx[f"{key}_adapter_logits"]
    merged = ctx["work"] / f"{key}_merged"
    if merged.exists():
        shutil.rmtree(merged)
    out = run([ctx["trainer"], "merge", "--model", ctx["model"], "--adapter", adapter,
               "--out", merged, "--dtype", "f32"])
    notes.append(f"trainer merge ({key}): " + " ".join(out.splitlines()[-1:]))
    notes.append(f"merged checkpoint files ({key}): {sorted(p.name for p in merged.iterdir())}")

    m, info = captured(lambda: AutoModelForCausalLM.from_pretrained(
        merged, dtype=torch.float32, attn_implementation="eager", output_loading_info=True),
        notes, "from_pretrained(merged)")
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    stored = sorted({str(v.dtype) for v in load_dir(merged).values()})
    c.add(f"{tag}: transformers loads trainer merge's output (no missing/unexpected/mismatched keys)",
          not problems, f"loading info {problems or 'clean'}; stored dtypes {stored}; "
          f"config dtype {json.loads((merged / 'config.json').read_text()).get('dtype', '<absent>')}")
    c.logits(f"{tag}: transformers(merged checkpoint) vs PeftModel({what})",
             hf_logits(m.eval(), ctx["ids"]), peft_logits)
    c.logits(f"{tag}: trainer logits (merged checkpoint) vs trainer logits --adapter",
             graft_logits(ctx, f"{key}_merged", merged), adapter_logits)

    # PEFT's merge_and_unload() (in place on the PeftModel: runs last)
    ref = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    got = load_dir(merged)
    lora_targets = {k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") + ".weight"
                    for k in load_file(str(adapter / "adapter_model.safetensors"))}
    same_keys = set(got) == set(ref)
    untouched = [k for k in ref if k not in lora_targets]
    untouched_ok = same_keys and all(bitwise_equal(got[k], ref[k]) for k in untouched)
    errs = {k: rel_l2(got[k], ref[k]) for k in lora_targets if k in got and k in ref}
    worst = max(errs, key=errs.get) if errs else None
    ok = (same_keys and untouched_ok and len(errs) == len(lora_targets)
          and all(math.isfinite(e) and e < MERGED_WEIGHT_LIMIT for e in errs.values()))
    c.add(f"{tag}: trainer merge weights vs PEFT merge_and_unload()", ok,
          f"keys equal {same_keys} ({len(got)} vs {len(ref)}); {len(untouched)} untouched tensors bit-identical "
          f"{untouched_ok}; {len(errs)} merged weights: max rel L2 {errs[worst] if worst else float('nan'):.3e} "
          f"({worst}; limit {MERGED_WEIGHT_LIMIT:g}), "
          f"{sum(bitwise_equal(got[k], ref[k]) for k in errs)} bit-identical")
    if not same_keys:
        notes.append(f"only in trainer merge: {sorted(set(got) - set(ref))[:4]}; "
                     f"only in merge_and_unload: {sorted(set(ref) - set(got))[:4]}")


def sorted_list(v):
    """PEFT saves target_modules from a Python set (order depends on the hash seed)."""
    return sorted(v) if isinstance(v, list) else v


def config_notes(ctx, notes):
    """How Graft's adapter_config.json (LoRA, DoRA) compares with the fields PEFT knows and writes."""
    known = set(LoraConfig.__dataclass_fields__)
    for what, gkey, pkey in (("", "graft_adapter_config", "peft_resaved_config"),
                             (" (DoRA)", "graft_dora_adapter_config", "peft_resaved_dora_config")):
        g = ctx.get(gkey)
        if g is None:
            continue
        notes.append(f"Graft adapter_config.json{what} fields unknown to LoraConfig: "
                     f"{sorted(set(g) - known) or 'none'}")
        p = ctx.get(pkey)
        if p is not None:
            missing = sorted(set(p) - set(g))
            notes.append(f"fields PEFT writes that Graft's adapter_config.json{what} omits ({len(missing)}): {missing}")
            diff = {k: (g[k], sorted_list(p[k])) for k in sorted(set(g) & set(p)) if g[k] != p[k]}
            notes.append(f"fields Graft writes{what} that PEFT re-saves differently (graft, peft): {diff or 'none'}")
    for name, cfg in ctx.get("peft_configs", {}).items():
        notes.append(f"{name} adapter_config.json as PEFT wrote it: target_modules "
                     f"{sorted_list(cfg.get('target_modules'))}, r {cfg.get('r')}, lora_alpha {cfg.get('lora_alpha')}, "
                     f"use_rslora {cfg.get('use_rslora')}, use_dora {cfg.get('use_dora')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO_ROOT / "trainer" / "assets" / "default" / "model"))
    ap.add_argument("--data", default=str(REPO_ROOT / "trainer" / "assets" / "default" / "data" / "train.jsonl"))
    ap.add_argument("--trainer", default=str(REPO_ROOT / "target" / "release" / "trainer"))
    ap.add_argument("--work", help="directory to keep the adapters, checkpoints and logits in "
                                   "(default: a temporary one)")
    ap.add_argument("--steps", type=int, default=20, help="Graft training steps for checks 1 and 4")
    args = ap.parse_args()
    trainer = Path(args.trainer).resolve()
    if not trainer.is_file():
        sys.exit(f"{trainer} not found: cargo build --release -p graft-trainer")
    model, data = Path(args.model).resolve(), Path(args.data).resolve()
    try:
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"{model}: no usable config.json ({type(e).__name__}: {e}); pass --model DIR")
    if not data.is_file() or data.stat().st_size == 0:
        sys.exit(f"{data}: missing or empty; pass --data FILE")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    # PEFT 0.21.2 calls transformers' deprecated `is_gradient_checkpointing` (unrelated to Graft)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    transformers.utils.logging.disable_progress_bar()

    ids = torch.randint(1, vocab, (T,), generator=torch.Generator().manual_seed(SEED))
    print(f"model {model}\ndata {data}\ntrainer {trainer}\ninput ids ({T}, vocab {vocab}): {ids.tolist()}", flush=True)

    c, notes = Checks(), []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = {"trainer": trainer, "model": model, "data": data, "work": work, "steps": args.steps,
               "ids": ids, "ids_arg": ",".join(str(i) for i in ids.tolist())}
        try:
            check_base(ctx, c)
        except Exception:
            c.error("0 base")
        try:
            check_graft_to_peft(ctx, c, notes)
        except Exception:
            c.error("1 graft->peft")
        for name, kwargs in PEFT_ADAPTERS.items():
            try:
                check_peft_to_graft(ctx, c, notes, name, kwargs)
            except Exception:
                c.error(f"2 peft->graft [{name}]")
        if "peft_graft" in ctx:
            try:
                check_merge(ctx, c, notes)
            except Exception:
                c.error("3 merge")
        else:
            c.add("3 merge", False, "skipped: check 1 did not produce a PeftModel")
        try:
            check_graft_dora_to_peft(ctx, c, notes)
        except Exception:
            c.error("4 graft dora->peft")
        for name, kwargs in PEFT_DORA_ADAPTERS.items():
            try:
                check_peft_dora_to_graft(ctx, c, notes, name, kwargs)
            except Exception:
                c.error(f"5 peft dora->graft [{name}]")
        if "peft_graft_dora_logits" in ctx:
            try:
                check_merge(ctx, c, notes, tag="6 dora merge", key="graft_dora", what="Graft DoRA adapter")
            except Exception:
                c.error("6 dora merge")
        else:
            c.add("6 dora merge", False, "skipped: check 4 did not produce a PeftModel and its logits")
        config_notes(ctx, notes)

    print()
    for n in notes:
        print("note:", n)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__}
    print(json.dumps(versions))
    failed = [n for n, ok in c.rows if not ok]
    print(f"RESULT: {'FAIL' if failed else 'PASS'} ({len(c.rows) - len(failed)}/{len(c.rows)} checks passed)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
