#!/usr/bin/env python3
"""Oracle fixture generator for Graft.

Builds tiny random-init HuggingFace models (llama, mistral, qwen2, gemma), saves
them with `save_pretrained` (safetensors), attaches a PEFT LoRA adapter with
non-zero B matrices, and records reference outputs computed by transformers/peft
in float32 on CPU:

    tests/fixtures/<name>/model/                config.json + *.safetensors
    tests/fixtures/<name>/adapter/              adapter_config.json + adapter_model.safetensors
    tests/fixtures/<name>/expected.safetensors  input_ids, logits_base, logits, loss,
                                                loss_masked, labels_masked, grad.<adapter key>
    tests/fixtures/VERSIONS.json                library versions used

Fully deterministic (CPU, fixed seeds) and re-runnable: each model's fixture
directory is deleted and recreated. No network access is needed (no hub
downloads; models are built from configs).

Usage (from the repository root):
    python3 -m venv .venv
    .venv/bin/pip install -r tests/oracle/requirements.txt
    .venv/bin/python tests/oracle/make_fixtures.py
"""

import json
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import safetensors  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"

T = 16  # sequence length
N_MASKED = 6  # labels[0:6] = -100 for loss_masked
LORA_B_STD = 0.05
# Norm weights / biases are perturbed away from their trivial init (ones / zeros)
# so that e.g. Gemma's (1 + w) convention and Qwen2's q/k/v biases are exercised.
PERTURB_STD = 0.1

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    # Larger than the default 0.02 so attention scores / logits are O(1) and
    # RoPE, masking and LoRA effects are clearly visible in the outputs.
    initializer_range=0.1,
    attn_implementation="eager",
)

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spec_llama():
    cfg = LlamaConfig(
        **COMMON,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # head_dim=16 -> wavelengths 2*pi*10000^(k/8) = 6.28, 19.9, 62.8, ...
            # With 32: high_freq_wavelen=8, low_freq_wavelen=32, so k=0 is kept,
            # k=1 is smoothed (medium band), k>=2 are divided by factor: all
            # three branches of the llama3 formula are exercised.
            "original_max_position_embeddings": 32,
        },
    )
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=SEVEN)
    return dict(name="llama", cls=LlamaForCausalLM, config=cfg, dtype=torch.float32, lora=lora, seed=1001,
                max_shard_size=None)


def spec_mistral():
    cfg = MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=5,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    # f16 model is ~190 KB; 100KB shards -> >= 2 shards + model.safetensors.index.json
    return dict(name="mistral", cls=MistralForCausalLM, config=cfg, dtype=torch.float16, lora=lora, seed=1002,
                max_shard_size="100KB")


def spec_qwen2():
    cfg = Qwen2Config(**COMMON, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                      target_modules="all-linear")
    return dict(name="qwen2", cls=Qwen2ForCausalLM, config=cfg, dtype=torch.bfloat16, lora=lora, seed=1003,
                max_shard_size=None)


def spec_gemma():
    cfg = GemmaConfig(**COMMON, head_dim=32, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=SEVEN)
    return dict(name="gemma", cls=GemmaForCausalLM, config=cfg, dtype=torch.float32, lora=lora, seed=1004,
                max_shard_size=None)


def load_base(spec, model_dir):
    """Reload the base model exactly as saved, then compute in f32."""
    m = spec["cls"].from_pretrained(model_dir, attn_implementation="eager", dtype=spec["dtype"])
    for n, p in m.named_parameters():
        assert p.dtype == spec["dtype"], (n, p.dtype)
    m = m.float().eval()
    assert m.config._attn_implementation == "eager"
    return m


def normalize_adapter_dir(adapter_dir):
    """Make the adapter dir byte-reproducible: PEFT stores target_modules from a
    Python set (hash-seed dependent order), records an absolute base-model path
    and writes a boilerplate README.md."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    # PEFT records the absolute local path of the base model; store a repo-relative one.
    cfg["base_model_name_or_path"] = (adapter_dir.parent / "model").relative_to(REPO_ROOT).as_posix()
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()


def adapter_key(param_name):
    # PEFT saves without the adapter name: "...lora_A.default.weight" -> "...lora_A.weight"
    assert ".default." in param_name, param_name
    return param_name.replace(".default.", ".")


def build(spec):
    name = spec["name"]
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    model_dir, adapter_dir = out / "model", out / "adapter"
    out.mkdir(parents=True)

    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])

    # ---- base model: random init, perturb norms/biases, save in target dtype ----
    model = spec["cls"](spec["config"]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen) * PERTURB_STD)
    model = model.to(spec["dtype"])
    save_kwargs = {}
    if spec["max_shard_size"] is not None:
        save_kwargs["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(model_dir, **save_kwargs)
    del model

    if spec["max_shard_size"] is not None:
        shards = sorted(model_dir.glob("*.safetensors"))
        assert len(shards) >= 2, shards
        assert (model_dir / "model.safetensors.index.json").exists()

    input_ids = torch.randint(1, spec["config"].vocab_size, (T,), generator=gen)
    ids = input_ids.unsqueeze(0)
    labels_masked = input_ids.clone()
    labels_masked[:N_MASKED] = -100

    # ---- base logits ----
    base = load_base(spec, model_dir)
    with torch.no_grad():
        logits_base = base(input_ids=ids).logits[0].float().clone()

    # ---- PEFT model ----
    pm = get_peft_model(base, spec["lora"])
    lora_params = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert all(p.requires_grad for p in lora_params.values())
    with torch.no_grad():
        for n in sorted(lora_params):
            if "lora_B" in n:
                p = lora_params[n]
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
    pm.eval()
    pm.save_pretrained(adapter_dir)
    normalize_adapter_dir(adapter_dir)

    out_logits = pm(input_ids=ids, labels=ids)
    logits = out_logits.logits[0].detach().float().clone()
    loss = out_logits.loss
    loss.backward()
    grads = {}
    for n, p in lora_params.items():
        assert p.grad is not None, n
        grads["grad." + adapter_key(n)] = p.grad.detach().float().clone()
    pm.zero_grad(set_to_none=True)

    with torch.no_grad():
        loss_masked = pm(input_ids=ids, labels=labels_masked.unsqueeze(0)).loss

    # sanity: loss equals a manual mean CE over the counted (shifted) tokens
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(logits[:-1], input_ids[1:], reduction="mean")
        assert torch.allclose(ce, loss.detach(), atol=1e-6), (ce, loss)
        ce_m = torch.nn.functional.cross_entropy(logits[N_MASKED - 1:-1], input_ids[N_MASKED:], reduction="mean")
        assert torch.allclose(ce_m, loss_masked, atol=1e-6), (ce_m, loss_masked)

    # saved adapter keys must match the grad keys exactly
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert set("grad." + k for k in saved) == set(grads), (sorted(saved), sorted(grads))
    for n, p in lora_params.items():
        assert torch.equal(saved[adapter_key(n)], p.detach()), n

    # ---- reload check: fresh base from disk + PeftModel.from_pretrained ----
    del pm, base
    fresh = load_base(spec, model_dir)
    reloaded = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    with torch.no_grad():
        logits2 = reloaded(input_ids=ids).logits[0].float()
    assert torch.allclose(logits2, logits, atol=1e-6, rtol=0), (logits2 - logits).abs().max()
    del reloaded, fresh

    # adapter must actually change the output
    assert (logits - logits_base).abs().max() > 1e-3

    expected = {
        "input_ids": input_ids.to(torch.int32).contiguous(),
        "logits_base": logits_base.contiguous(),
        "logits": logits.contiguous(),
        "loss": loss.detach().float().reshape(1).contiguous(),
        "loss_masked": loss_masked.float().reshape(1).contiguous(),
        "labels_masked": labels_masked.to(torch.int32).contiguous(),
    }
    expected.update({k: v.contiguous() for k, v in grads.items()})
    save_file(expected, str(out / "expected.safetensors"),
              # a single metadata key: safetensors writes metadata in HashMap order
              metadata={"generator": "tests/oracle/make_fixtures.py"})
    print(f"{name}: loss={loss.item():.6f} loss_masked={loss_masked.item():.6f} "
          f"lora_tensors={len(grads)} max|logits-logits_base|={(logits - logits_base).abs().max():.4f}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for spec_fn in (spec_llama, spec_mistral, spec_qwen2, spec_gemma):
        build(spec_fn())
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }
    (FIXTURES / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(json.dumps(versions))


if __name__ == "__main__":
    sys.exit(main())
