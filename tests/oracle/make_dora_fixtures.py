#!/usr/bin/env python3
"""DoRA / QDoRA oracle fixtures for Graft (PEFT `LoraConfig(use_dora=True)`, CPU, f32).

Writes (run by hand, never by CI):

    tests/fixtures/dora/adapter/                 PEFT DoRA adapter on tests/fixtures/llama/model
                                                 (adapter_config.json + adapter_model.safetensors)
    tests/fixtures/dora/expected.safetensors     f32 base: input_ids, labels_masked, logits_base, logits,
                                                 loss, loss_masked, grad.<adapter key>,
                                                 magnitude_init.<magnitude key>, weight_norm.<module>,
                                                 merged.<weight> (merge_and_unload)
    tests/fixtures/dora/expected_nf4.safetensors the same adapter on the NF4-quantized base (bitsandbytes
                                                 Linear4bit, nf4, double quant, blocksize 64): the same
                                                 names, without merged.*
    tests/fixtures/dora/VERSIONS.json

The base model is the committed tests/fixtures/llama/model (f32); for QDoRA transformers quantizes
it while loading (`BitsAndBytesConfig`), exactly what Graft's quantize-on-load does.

`dora_forward()` / `dora_weight_norm()` / `dora_merge()` below are a plain torch re-implementation of
what PEFT 0.21.2 computes for a DoRA linear layer (tuners/lora/variants.py DoraLinearVariant,
tuners/lora/dora.py DoraLinearLayer). They are the spec Graft follows; the script asserts that they
reproduce PEFT (logits, loss, every gradient, the merged weights), on a toy layer with a bias and a
dropout mask, on the f32 Llama and on the NF4 Llama, before anything is written. See
tests/oracle/README.md ("DoRA fixtures").

Usage (from the repository root):
    .venv/bin/python tests/oracle/make_dora_fixtures.py
"""

import hashlib
import json
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import transformers  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (tiny Llama conventions: T, N_MASKED, SEVEN, load_base)
import make_nf4_fixtures as nf4  # noqa: E402  (NF4 spec + bnb CPU quirk work-arounds)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
DORA_DIR = FIXTURES / "dora"
LLAMA_MODEL = FIXTURES / "llama" / "model"
GENERATOR = "tests/oracle/make_dora_fixtures.py"

SEED = 1006                 # llama 1001 ... gemma 1004, llama_nf4 1005
R, ALPHA = 4, 8
SCALING = ALPHA / R         # 2.0 (no rsLoRA)
LORA_B_STD = mf.LORA_B_STD  # 0.05, as in the LoRA fixtures
MAG_PERTURB_STD = 0.1       # magnitude *= 1 + 0.1 * randn
BLOCKSIZE = 64
MERGED = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def dora_config(**kw):
    args = dict(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=mf.SEVEN,
                use_dora=True)
    args.update(kw)
    return LoraConfig(**args)


# =============================================================================
# Spec: DoRA linear layer as PEFT 0.21.2 computes it (fan_in_fan_out=False)
# =============================================================================
# W [out, in] base weight (for a 4-bit base: the dequantized weight), b [out] or None,
# A [r, in], B [out, r], m [out] magnitude, scaling = lora_alpha / r (alpha / sqrt(r) with rsLoRA).

def dora_weight_norm(W, A, B, scaling):
    """||W + scaling * (B @ A)||_2 of every output row: shape [out]. A constant: PEFT computes it
    from lora_weight.detach() and detaches the result, so no gradient flows through it."""
    with torch.no_grad():
        return torch.linalg.norm(W + scaling * (B @ A), dim=1)


def dora_forward(x, W, b, A, B, m, scaling, dropout=None):
    """Output of a DoRA linear layer, x [..., in] -> [..., out].

    dropout=None: no LoRA dropout, or eval mode (PEFT: lora_dropout is nn.Identity, or not training):
        y = (m / n) * (W x + scaling * B A x) + b
    dropout=f (training with lora_dropout > 0): the base output keeps the undropped x,
        y = W x + b + (m / n - 1) * (W f(x)) + (m / n) * scaling * B A f(x)
    with n = dora_weight_norm(W, A, B, scaling) (constant). The bias is never scaled by m / n.
    """
    s = m / dora_weight_norm(W, A, B, scaling)
    if dropout is None:
        y = s * (F.linear(x, W) + scaling * F.linear(F.linear(x, A), B))
        return y if b is None else y + b
    xd = dropout(x)
    return F.linear(x, W, b) + (s - 1) * F.linear(xd, W) + s * scaling * F.linear(F.linear(xd, A), B)


def dora_merge(W, A, B, m, scaling):
    """merge_and_unload(): W' = (m / ||W + dW||_row)[:, None] * (W + dW), dW = scaling * (B @ A).
    (The bias, if any, is left unchanged.)"""
    dW = scaling * (B @ A)
    return (m / torch.linalg.norm(W + dW, dim=1))[:, None] * (W + dW)


class DoraRef(nn.Module):
    """A target linear layer replaced by the spec; A, B and m are the trainable parameters.
    (norm_grad=True only measures how much the detach matters: the norm then keeps its gradient.)"""

    def __init__(self, W, b, A, B, m, scaling, dropout=None, norm_grad=False):
        super().__init__()
        self.norm_grad = norm_grad
        self.register_buffer("W", W.detach().clone())
        self.register_buffer("b", None if b is None else b.detach().clone())
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        self.m = nn.Parameter(m.detach().clone())
        self.scaling = scaling
        self.dropout = dropout

    def forward(self, x):
        if self.norm_grad:
            n = torch.linalg.norm(self.W + self.scaling * (self.B @ self.A), dim=1)
            y = (self.m / n) * (F.linear(x, self.W) + self.scaling * F.linear(F.linear(x, self.A), self.B))
            return y if self.b is None else y + self.b
        return dora_forward(x, self.W, self.b, self.A, self.B, self.m, self.scaling,
                            self.dropout if self.training else None)


# =============================================================================
# Helpers
# =============================================================================

def adapter_key(param_name):
    """PEFT parameter name -> key in adapter_model.safetensors. The adapter name is dropped, and for the
    magnitude also '.weight' (PEFT keeps the pre-refactor key: LoraModel._get_adapter_state_dict)."""
    if param_name.endswith(".lora_magnitude_vector.default.weight"):
        return param_name[: -len(".default.weight")]
    assert ".default." in param_name, param_name
    return param_name.replace(".default.", ".")


def module_of(key):
    """adapter key -> module path in the base model ('model.layers.0.self_attn.q_proj')."""
    p = key[len("base_model.model."):]
    for suf in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
        if p.endswith(suf):
            return p[: -len(suf)]
    raise ValueError(key)


def rel_l2(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm()).item()


def check_close(name, got, want, tol, report=None):
    e = rel_l2(got, want)
    mx = (got.double() - want.double()).abs().max().item()
    assert torch.isfinite(got).all() and e < tol, f"{name}: rel L2 {e:.3e} (max abs {mx:.3e}) >= {tol:g}"
    if report is not None:
        report.append((name, e, mx))
    return e


def set_module(model, path, new):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def linear4bit_modules(model):
    return [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]


def normalize_adapter_dir(adapter_dir):
    """As make_fixtures.normalize_adapter_dir, but the base model is the llama fixture."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = LLAMA_MODEL.relative_to(REPO_ROOT).as_posix()
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()


def peft_step(pm, ids, labels_masked):
    """Train-mode forward + backward with labels = ids; then the masked loss. Returns
    (logits [T, V], loss [1], loss_masked [1], {grad.<key>: tensor})."""
    pm.train()
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(params) == 3 * 14, sorted(params)
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for n, p in params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        grads["grad." + adapter_key(n)] = p.grad.detach().float().clone()
    pm.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss_masked = pm(input_ids=ids, labels=labels_masked.unsqueeze(0)).loss
    return out.logits[0].detach().float().clone(), out.loss.detach().reshape(1), loss_masked.reshape(1), grads


def check_ce(logits, input_ids, loss, loss_masked):
    with torch.no_grad():
        ce = F.cross_entropy(logits[:-1], input_ids[1:], reduction="mean")
        assert torch.allclose(ce, loss[0], atol=1e-6), (ce, loss)
        ce_m = F.cross_entropy(logits[mf.N_MASKED - 1:-1], input_ids[mf.N_MASKED:], reduction="mean")
        assert torch.allclose(ce_m, loss_masked[0], atol=1e-6), (ce_m, loss_masked)


def reference_step(weights, adapter, ids, labels_masked, plain_lora=False, norm_grad=False):
    """The spec on a plain f32 Llama: the llama fixture with linear weights `weights` (module path ->
    W) and every target linear replaced by DoraRef. Returns (logits, loss, loss_masked, grads by
    adapter key, weight norms by module)."""
    ref = mf.load_base(mf.spec_llama(), LLAMA_MODEL)
    for p in ref.parameters():
        p.requires_grad_(False)
    mods, norms = {}, {}
    for mod, W in weights.items():
        pre = "base_model.model." + mod
        A, B, m = adapter[pre + ".lora_A.weight"], adapter[pre + ".lora_B.weight"], adapter[pre + ".lora_magnitude_vector"]
        lin = ref.get_submodule(mod)
        assert isinstance(lin, nn.Linear) and lin.bias is None and lin.weight.shape == W.shape
        norms[mod] = dora_weight_norm(W, A, B, SCALING)
        if plain_lora:            # m = n: DoRA reduces to plain LoRA
            m = norms[mod]
        mods[mod] = DoraRef(W, None, A, B, m, SCALING, norm_grad=norm_grad)
        set_module(ref, mod, mods[mod])
    ref.train()
    out = ref(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {}
    for mod, d in mods.items():
        pre = "base_model.model." + mod
        grads["grad." + pre + ".lora_A.weight"] = d.A.grad.detach().clone()
        grads["grad." + pre + ".lora_B.weight"] = d.B.grad.detach().clone()
        grads["grad." + pre + ".lora_magnitude_vector"] = d.m.grad.detach().clone()
    with torch.no_grad():
        loss_masked = ref(input_ids=ids, labels=labels_masked.unsqueeze(0)).loss
    return out.logits[0].detach().clone(), out.loss.detach().reshape(1), loss_masked.reshape(1), grads, norms


def compare_with_reference(tag, got, ref, report):
    logits, loss, loss_masked, grads = got
    r_logits, r_loss, r_loss_masked, r_grads, _ = ref
    check_close(f"{tag} logits", r_logits, logits, 1e-6, report)
    check_close(f"{tag} loss", r_loss, loss, 1e-6, report)
    check_close(f"{tag} loss_masked", r_loss_masked, loss_masked, 1e-6, report)
    assert set(r_grads) == set(grads)
    worst = {}
    for k in sorted(grads):
        kind = k.rsplit(".", 2)[-2] if k.endswith(".weight") else "lora_magnitude_vector"
        e = check_close(k, r_grads[k], grads[k], 1e-5)
        worst[kind] = max(worst.get(kind, 0.0), e)
    for kind, e in sorted(worst.items()):
        report.append((f"{tag} grads {kind} (worst of 14)", e, float("nan")))


# =============================================================================
# 0. Toy layer with a bias: bias and dropout handling of PEFT's DoRA forward
# =============================================================================

class FixedMask(nn.Module):
    """A LoRA 'dropout' with a fixed mask. Not an nn.Identity, so PEFT takes its dropout branch."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10, bias=True)

    def forward(self, x):
        return self.lin(x)


def check_toy(report):
    torch.manual_seed(SEED + 1)
    g = torch.Generator().manual_seed(SEED + 1)
    toy = Toy()
    with torch.no_grad():
        toy.lin.bias.copy_(torch.randn(10, generator=g))
    x = torch.randn(3, 5, 12, generator=g)
    mask = (torch.rand(12 * 5 * 3, generator=g).reshape(3, 5, 12) > 0.3).float() / 0.7
    for dropout in (0.0, 0.3):
        cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["lin"], use_dora=True,
                         init_lora_weights=False)
        pm = get_peft_model(Toy(), cfg)
        layer = pm.base_model.model.lin
        with torch.no_grad():
            layer.base_layer.weight.copy_(toy.lin.weight)
            layer.base_layer.bias.copy_(toy.lin.bias)
            layer.lora_magnitude_vector["default"].weight.mul_(1 + MAG_PERTURB_STD * torch.randn(10, generator=g))
        if dropout > 0:
            assert isinstance(layer.lora_dropout["default"], nn.Dropout)
            layer.lora_dropout["default"] = FixedMask(mask)
        else:
            assert isinstance(layer.lora_dropout["default"], nn.Identity)
        W, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        m = layer.lora_magnitude_vector["default"].weight.detach()
        assert not torch.allclose(m, dora_weight_norm(W, A, B, SCALING))
        for training in (True, False):
            pm.train(training)
            pm.zero_grad(set_to_none=True)
            y = pm(x)
            (y * torch.linspace(-1, 1, 10)).sum().backward()
            ref = DoraRef(W, b, A, B, m, SCALING, FixedMask(mask) if dropout > 0 else None).train(training)
            y_ref = ref(x)
            (y_ref * torch.linspace(-1, 1, 10)).sum().backward()
            tag = f"toy dropout={dropout} {'train' if training else 'eval'}"
            check_close(f"{tag} output", y_ref.detach(), y.detach(), 1e-6, report)
            for name, p, q in (("A", layer.lora_A["default"].weight, ref.A),
                               ("B", layer.lora_B["default"].weight, ref.B),
                               ("m", layer.lora_magnitude_vector["default"].weight, ref.m)):
                check_close(f"{tag} grad {name}", q.grad, p.grad, 1e-5, report if name == "m" else None)
            if dropout > 0 and training:
                # the dropout branch really differs from the no-dropout formula, and from the naive
                # "everything of the dropped x" form s * (W f(x) + scaling B A f(x)) + b
                with torch.no_grad():
                    nodrop = dora_forward(x, W, b, A, B, m, SCALING)
                    s = m / dora_weight_norm(W, A, B, SCALING)
                    naive = s * (F.linear(x * mask, W) + SCALING * F.linear(F.linear(x * mask, A), B)) + b
                assert rel_l2(nodrop, y.detach()) > 1e-2 and rel_l2(naive, y.detach()) > 1e-2
        # bias is added unscaled: the output at x = 0 is exactly b (A, B, W contribute nothing)
        pm.eval()
        with torch.no_grad():
            assert torch.equal(pm(torch.zeros(1, 12)), b.reshape(1, 10))


# =============================================================================
# 1./2./4. f32 base
# =============================================================================

def build_f32(input_ids, labels_masked, report, notes):
    ids = input_ids.unsqueeze(0)
    adapter_dir = DORA_DIR / "adapter"

    base = mf.load_base(mf.spec_llama(), LLAMA_MODEL)
    modules = [f"model.layers.{i}.{'self_attn' if p in mf.SEVEN[:4] else 'mlp'}.{p}"
               for i in range(2) for p in mf.SEVEN]
    weights = {mod: base.get_submodule(mod).weight.detach().clone() for mod in modules}
    with torch.no_grad():
        logits_base = base(input_ids=ids).logits[0].float().clone()

    torch.manual_seed(SEED)                         # lora_A: PEFT's kaiming-uniform init
    gen = torch.Generator().manual_seed(SEED + 2)   # lora_B and the magnitude perturbation
    pm = get_peft_model(base, dora_config())
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(params) == 42 and all("lora_" in n for n in params), sorted(params)

    # PEFT's initial magnitude: row norms of W + scaling * B @ A with B = 0, i.e. ||W||_row
    magnitude_init = {}
    for n, p in params.items():
        if "lora_magnitude_vector" in n:
            k = adapter_key(n)
            W = weights[module_of(k)]
            assert torch.equal(p.detach(), torch.linalg.norm(W, dim=1)), k
            assert torch.equal(p.detach(), dora_weight_norm(W, params[n.replace("lora_magnitude_vector", "lora_A")],
                                                            torch.zeros(W.shape[0], R), SCALING)), k
            magnitude_init["magnitude_init." + k] = p.detach().clone()
        if "lora_B" in n:
            assert p.abs().max() == 0, n

    with torch.no_grad():
        for n in sorted(params):
            p = params[n]
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + MAG_PERTURB_STD * torch.randn(p.shape, generator=gen))

    pm.save_pretrained(adapter_dir)
    normalize_adapter_dir(adapter_dir)
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert set(saved) == {adapter_key(n) for n in params}, sorted(saved)
    for n, p in params.items():
        assert torch.equal(saved[adapter_key(n)], p.detach()), n
        assert saved[adapter_key(n)].dtype == torch.float32

    # the weight norms PEFT's forward uses (its own get_weight_norm / get_lora_weight)
    weight_norm = {}
    for mod in weights:
        layer = pm.base_model.model.get_submodule(mod)
        dl = layer.lora_magnitude_vector["default"]
        lw = dl.get_lora_weight(lora_A=layer.lora_A["default"], lora_B=layer.lora_B["default"]).detach()
        n_peft = dl.get_weight_norm(weight=layer.base_layer.weight, lora_weight=lw, scaling=layer.scaling["default"])
        assert layer.scaling["default"] == SCALING
        pre = "base_model.model." + mod
        check_close(f"weight_norm {mod}", dora_weight_norm(weights[mod], saved[pre + ".lora_A.weight"],
                                                          saved[pre + ".lora_B.weight"], SCALING), n_peft, 1e-7)
        weight_norm["weight_norm." + pre] = n_peft.detach().clone()
        s = saved[pre + ".lora_magnitude_vector"] / n_peft
        assert (s - 1).abs().max() > 0.05, (mod, s)    # the magnitude is not at its init

    logits, loss, loss_masked, grads = peft_step(pm, ids, labels_masked)
    check_ce(logits, input_ids, loss, loss_masked)
    assert set(grads) == {"grad." + k for k in saved}

    # the spec reproduces PEFT
    ref = reference_step(weights, saved, ids, labels_masked)
    compare_with_reference("f32", (logits, loss, loss_masked, grads), ref, report)
    for mod, n_ref in ref[4].items():
        check_close(f"ref weight_norm {mod}", n_ref, weight_norm["weight_norm.base_model.model." + mod], 1e-7)

    # all three parameters matter: base vs adapter, plain LoRA (m = n) vs DoRA
    lora_logits = reference_step(weights, saved, ids, labels_masked, plain_lora=True)[0]
    notes.append(f"f32: rel L2(logits, logits_base) = {rel_l2(logits, logits_base):.4g}, "
                 f"rel L2(logits, same A/B with m = n, i.e. plain LoRA) = {rel_l2(logits, lora_logits):.4g}")
    assert rel_l2(logits, logits_base) > 1e-2 and rel_l2(logits, lora_logits) > 1e-2
    # the norm's detach matters for the A / B gradients (not for logits or the magnitude gradient)
    ng = reference_step(weights, saved, ids, labels_masked, norm_grad=True)
    assert torch.equal(ng[0], ref[0])
    worst = {}
    for k, v in ng[3].items():
        kind = "m" if k.endswith("lora_magnitude_vector") else k.rsplit(".", 2)[-2]
        worst[kind] = max(worst.get(kind, 0.0), rel_l2(v, grads[k]))
    notes.append("f32: gradients with a NON-detached norm differ from PEFT by rel L2 up to "
                 + ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())))
    assert worst["lora_A"] > 1e-3 and worst["lora_B"] > 1e-3

    # eval mode gives the same logits (dropout 0)
    pm.eval()
    with torch.no_grad():
        logits_eval = pm(input_ids=ids).logits[0]
    assert torch.equal(logits_eval, logits), (logits_eval - logits).abs().max()

    # merge_and_unload (PEFT default safe_merge=False -> DoraLinearVariant.merge_unsafe)
    merged_model = pm.merge_and_unload()
    merged = {}
    for mod, W in weights.items():
        pre = "base_model.model." + mod
        got = merged_model.get_submodule(mod).weight.detach()
        assert isinstance(merged_model.get_submodule(mod), nn.Linear)
        check_close(f"merged {mod}", dora_merge(W, saved[pre + ".lora_A.weight"], saved[pre + ".lora_B.weight"],
                                                saved[pre + ".lora_magnitude_vector"], SCALING), got, 1e-6,
                    report if mod in MERGED else None)
        if mod in MERGED:
            merged[f"merged.{mod}.weight"] = got.clone()
    with torch.no_grad():
        logits_merged = merged_model(input_ids=ids).logits[0]
    check_close("f32 merged model logits vs adapter logits", logits_merged, logits, 1e-5, report)
    del pm, merged_model, base

    # reload: fresh base + PeftModel.from_pretrained gives the same logits
    fresh = mf.load_base(mf.spec_llama(), LLAMA_MODEL)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    for n, p in reloaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.detach(), saved[adapter_key(n)]), n
    with torch.no_grad():
        logits2 = reloaded(input_ids=ids).logits[0]
    assert torch.allclose(logits2, logits, atol=1e-6, rtol=0), (logits2 - logits).abs().max()
    del reloaded, fresh

    expected = {
        "input_ids": input_ids.to(torch.int32),
        "labels_masked": labels_masked.to(torch.int32),
        "logits_base": logits_base,
        "logits": logits,
        "loss": loss.float(),
        "loss_masked": loss_masked.float(),
        **grads, **magnitude_init, **weight_norm, **merged,
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, str(DORA_DIR / "expected.safetensors"),
              metadata={"generator": GENERATOR})
    print(f"f32: loss={loss.item():.6f} loss_masked={loss_masked.item():.6f} tensors={len(expected)}")
    return weights, saved, logits


# =============================================================================
# 3. NF4 base (QDoRA)
# =============================================================================

def load_nf4_base():
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    m = LlamaForCausalLM.from_pretrained(LLAMA_MODEL, quantization_config=qcfg, device_map="cpu",
                                         dtype=torch.float32, attn_implementation="eager")
    lin4 = linear4bit_modules(m)
    assert len(lin4) == 14
    for l in lin4:
        # no AVX512-BF16 repack (eval-mode only, but it rewrites weight.data in place)
        l.support_avx512bf16_for_cpu = False
        assert l.weight.quant_state.blocksize == BLOCKSIZE and l.weight.quant_state.nested
        assert l.compute_dtype == torch.float32
    for n, p in m.named_parameters():
        if p.__class__.__name__ != "Params4bit":
            assert p.dtype == torch.float32, n
    return m.eval()


def build_nf4(weights_f32, adapter, logits_f32, input_ids, labels_masked, report, notes):
    ids = input_ids.unsqueeze(0)
    adapter_dir = DORA_DIR / "adapter"

    # ---- the spec: W = dequant(NF4(W_f32)) (make_nf4_fixtures.reimplement, flat blocks) ----
    deq = {mod: torch.from_numpy(nf4.reimplement(W.reshape(-1).numpy(), BLOCKSIZE)["dequant"]).reshape(W.shape)
           for mod, W in weights_f32.items()}
    buggy = [mod for mod, W in weights_f32.items() if nf4.native_avx512_rowwise_dequant_applies(tuple(W.shape), BLOCKSIZE)]

    # ---- first, what bitsandbytes' native CPU dequantize_4bit gives (notes only) ----
    qm = load_nf4_base()
    native_ok = True
    for mod in weights_f32:
        w = qm.get_submodule(mod).weight
        d = bnbF.dequantize_4bit(w.data, w.quant_state)
        if not torch.equal(d, deq[mod]):
            native_ok = False
            assert mod in buggy, mod
            notes.append(f"nf4: native CPU dequantize_4bit of {mod} {list(d.shape)} differs from the flat-block "
                         f"spec by up to {(d - deq[mod]).abs().max().item():.4g} (AVX-512 row-wise absmax quirk)")
    torch.manual_seed(SEED)
    pm_native_init = get_peft_model(qm, dora_config())
    for mod in buggy:
        mag = pm_native_init.base_model.model.get_submodule(mod).lora_magnitude_vector["default"].weight.detach()
        notes.append(f"nf4: with the native kernel, PEFT's magnitude init of {mod} is off by up to "
                     f"{(mag - torch.linalg.norm(deq[mod], dim=1)).abs().max().item():.4g}")
    del pm_native_init, qm
    qm = load_nf4_base()
    pm = PeftModel.from_pretrained(qm, adapter_dir, is_trainable=True)
    native = peft_step(pm, ids, labels_masked)
    del pm, qm

    # ---- bnb's own pure-torch flat-block kernel for every dequantize_4bit from here on ----
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", nf4._flat_dequant_4bit_cpu)

    qm = load_nf4_base()
    for mod, W in weights_f32.items():
        w = qm.get_submodule(mod).weight
        qs = w.quant_state
        ref = nf4.reimplement(W.reshape(-1).numpy(), BLOCKSIZE)
        # bitsandbytes quantized the f32 fixture weight exactly as the NF4 spec (Graft's quantize-on-load)
        nf4.assert_same(f"{mod} packed", ref["packed"], w.data.reshape(-1).numpy())
        nf4.assert_same(f"{mod} absmax", ref["absmax"], qs.absmax.numpy())
        nf4.assert_same(f"{mod} nested_absmax", ref["nested_absmax"], qs.state2.absmax.numpy())
        nf4.assert_same(f"{mod} offset", ref["offset"], qs.offset.reshape(1).numpy())
        assert list(qs.shape) == list(W.shape)
        assert torch.equal(bnbF.dequantize_4bit(w.data, qs), deq[mod]), mod
    with torch.no_grad():
        logits_base = qm(input_ids=ids).logits[0].float().clone()
    # PEFT's magnitude init on a 4-bit base: row norms of the dequantized weight
    torch.manual_seed(SEED)
    pm_init = get_peft_model(qm, dora_config())
    magnitude_init = {}
    for mod in weights_f32:
        mag = pm_init.base_model.model.get_submodule(mod).lora_magnitude_vector["default"].weight.detach()
        assert torch.equal(mag, torch.linalg.norm(deq[mod], dim=1)), mod
        magnitude_init[f"magnitude_init.base_model.model.{mod}.lora_magnitude_vector"] = mag.clone()
    del pm_init, qm

    qm = load_nf4_base()
    pm = PeftModel.from_pretrained(qm, adapter_dir, is_trainable=True)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.detach(), adapter[adapter_key(n)]), n
    weight_norm = {}
    for mod in weights_f32:
        layer = pm.base_model.model.get_submodule(mod)
        assert isinstance(layer.base_layer, bitsandbytes.nn.Linear4bit)
        dl = layer.lora_magnitude_vector["default"]
        lw = dl.get_lora_weight(lora_A=layer.lora_A["default"], lora_B=layer.lora_B["default"]).detach()
        n_peft = dl.get_weight_norm(weight=peft.utils.integrations.dequantize_module_weight(layer.base_layer),
                                    lora_weight=lw, scaling=layer.scaling["default"])
        weight_norm[f"weight_norm.base_model.model.{mod}"] = n_peft.detach().clone()
    logits, loss, loss_masked, grads = peft_step(pm, ids, labels_masked)
    check_ce(logits, input_ids, loss, loss_masked)
    del pm, qm

    # ---- the spec on a plain f32 Llama with the dequantized weights reproduces it ----
    ref = reference_step(deq, adapter, ids, labels_masked)
    compare_with_reference("nf4", (logits, loss, loss_masked, grads), ref, report)
    for mod, n_ref in ref[4].items():
        check_close(f"nf4 ref weight_norm {mod}", n_ref, weight_norm[f"weight_norm.base_model.model.{mod}"], 1e-7)

    notes.append(f"nf4: rel L2(logits nf4, logits f32) = {rel_l2(logits, logits_f32):.4g} (quantization error)")
    assert rel_l2(logits, logits_f32) > 1e-3
    if native_ok:
        notes.append("nf4: the native CPU kernel dequantizes every weight correctly on this CPU")
    else:
        notes.append(f"nf4: PEFT QDoRA with the native CPU kernel: rel L2(logits) = {rel_l2(native[0], logits):.4g}, "
                     f"loss {native[1].item():.6f} vs {loss.item():.6f} (fixture uses the flat kernel)")

    expected = {
        "input_ids": input_ids.to(torch.int32),
        "labels_masked": labels_masked.to(torch.int32),
        "logits_base": logits_base,
        "logits": logits,
        "loss": loss.float(),
        "loss_masked": loss_masked.float(),
        **grads, **magnitude_init, **weight_norm,
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, str(DORA_DIR / "expected_nf4.safetensors"),
              metadata={"generator": GENERATOR})
    print(f"nf4: loss={loss.item():.6f} loss_masked={loss_masked.item():.6f} tensors={len(expected)}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if DORA_DIR.exists():
        shutil.rmtree(DORA_DIR)
    DORA_DIR.mkdir(parents=True)
    report, notes = [], []

    check_toy(report)

    gen = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(1, 256, (mf.T,), generator=gen)
    labels_masked = input_ids.clone()
    labels_masked[:mf.N_MASKED] = -100

    weights, adapter, logits_f32 = build_f32(input_ids, labels_masked, report, notes)
    build_nf4(weights, adapter, logits_f32, input_ids, labels_masked, report, notes)

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    (DORA_DIR / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")

    print("spec (dora_forward / dora_merge) vs PEFT:")
    for name, e, mx in report:
        print(f"  {name}: rel L2 {e:.3e}" + ("" if mx != mx else f", max abs {mx:.3e}"))
    for line in notes:
        print(line)
    total = 0
    for p in sorted(DORA_DIR.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.relative_to(REPO_ROOT)}  {p.stat().st_size} bytes  "
                  f"sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}")
    print(f"  total {total} bytes")
    assert total < 1_000_000
    print(json.dumps(versions))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*kernels.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    main()
