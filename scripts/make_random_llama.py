#!/usr/bin/env python3
"""Writes a random Llama checkpoint (config.json + model.safetensors, bf16)
for memory and speed measurements: no transformers needed, one tensor in
memory at a time.

    python3 scripts/make_random_llama.py OUT --hidden 2048 --intermediate 5632 --layers 10 --vocab 32000

Needs numpy and safetensors (pip). Values are N(0, 0.02) like transformers'
default init, so quantization sees realistic blocks.
"""
import argparse
import json
import struct
from pathlib import Path

import numpy as np


def bf16_bytes(a: np.ndarray) -> bytes:
    # Round-to-nearest-even f32 -> bf16.
    u = a.astype(np.float32).view(np.uint32)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return u.tobytes()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    h, i, hd = a.hidden, a.intermediate, a.hidden // a.heads
    shapes = [("model.embed_tokens.weight", (a.vocab, h))]
    for l in range(a.layers):
        pre = f"model.layers.{l}"
        shapes += [
            (f"{pre}.input_layernorm.weight", (h,)),
            (f"{pre}.post_attention_layernorm.weight", (h,)),
            (f"{pre}.self_attn.q_proj.weight", (a.heads * hd, h)),
            (f"{pre}.self_attn.k_proj.weight", (a.kv_heads * hd, h)),
            (f"{pre}.self_attn.v_proj.weight", (a.kv_heads * hd, h)),
            (f"{pre}.self_attn.o_proj.weight", (h, a.heads * hd)),
            (f"{pre}.mlp.gate_proj.weight", (i, h)),
            (f"{pre}.mlp.up_proj.weight", (i, h)),
            (f"{pre}.mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (a.vocab, h))]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(a.seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape in shapes:
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                x = np.ones(shape, np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32) * 0.02
            f.write(bf16_bytes(x))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": i, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": hd,
        "vocab_size": a.vocab, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    params = sum(int(np.prod(s)) for _, s in shapes)
    print(f"wrote {out} ({params / 1e6:.0f}M parameters, {off / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
