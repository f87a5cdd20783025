#!/usr/bin/env python3
"""Issue 6's side-by-side benchmark: one LoRA/QLoRA training workload run by
Graft and by its peers (transformers + PEFT + bitsandbytes), each in its own
process, on the same machine; prints tokens/s, peak RSS, MFU and Graft's
ratios.

Setup (once): a venv with benches/peers/requirements.txt, and a release
build of the trainer (`cargo build --release -p graft-trainer`).

    # everything for the 170M-parameter shape: make the model, run the peer
    # QLoRA, the peer bf16 LoRA and Graft, print the table
    python benches/peers/qlora.py bench --shape small --work /tmp/peers \\
        --trainer target/release/trainer --peak-gflops 4300.8 537.6

    # the steps one by one (bench runs these as child processes)
    python benches/peers/qlora.py make  --shape small --out /tmp/peers/small
    python benches/peers/qlora.py peer  --model /tmp/peers/small --mode qlora
    python benches/peers/qlora.py peer  --model /tmp/peers/small --mode lora
    python benches/peers/qlora.py graft --model /tmp/peers/small --trainer target/release/trainer

The workload (issue 6): a Llama with random bf16 weights (N(0, 0.02),
seeded; norms 1), LoRA r=16, alpha 32, dropout 0 on all seven linear
projections (q, k, v, o, gate, up, down), micro-batch 4 x 256 tokens, AdamW
(lr 2e-4, no weight decay), global-norm clipping at 0.3, 2 threads on every
side (torch.set_num_threads, RAYON_NUM_THREADS), no gradient checkpointing.

- peer qlora: the base loaded by transformers with BitsAndBytesConfig (NF4,
  double quantization, bf16 compute), then PEFT's LoRA (its adapter weights
  are f32, PEFT's default autocast_adapter_dtype).
- peer lora: the same with the base in bf16 (no quantization).
- graft: `trainer run --config` with model.quantize = "nf4", compute_dtype
  "bf16", the same adapter and optimizer (the TOML is written next to the
  run: WORK/graft-run.toml).

Data: `make` writes a word-level tokenizer of exactly 32000 tokens (python
`tokenizers`; transformers' AutoTokenizer loads it, as Graft does with the
Rust `tokenizers` crate) and a JSONL of {"text": ...} records of 126
random words. Rendered as Graft renders plain text (BOS, text, EOS), each
record is 128 tokens, so with packing every 256-token row holds two whole
records and every step has 4 x 256 = 1024 tokens, padding-free. The peers
get the same token ids: each record encoded by transformers' tokenizer from
the same rendered string, two records concatenated per row (the usual
"group texts" packing: plain causal attention over the row, where Graft
keeps the two records apart; see the FLOP count for how attention is
counted).

Timing: each system runs --warmup + --steps optimizer steps; tokens/s is
(tokens of the measured steps) / (their summed step times), the warm-up steps
excluded. A peer step is forward (with labels), backward, clip, optimizer
step, zero_grad, timed with perf_counter. Graft's step times come from its
metrics.jsonl (`tokens` / `tokens_per_s` of each step record). Load time is
the peer's from_pretrained + get_peft_model; for Graft, the wall time
outside its training steps (wall time minus `elapsed_s` at the last step:
loading with NF4 quantization, data, planning, and the final adapter and
checkpoint save). Peak RSS is the child's ru_maxrss from os.wait4, i.e.
for that one run (model load included).

FLOPs per token (model FLOPs, the same figure for every system, so the MFU
ratios equal the tokens/s ratios), with P = the weights of all matmuls
(q, k, v, o, gate, up, down of every layer, and lm_head; the embedding is a
lookup), T = 256, c = (T + 1) / 2 the mean causal context, L layers, H heads
of width d, and for LoRA the sum S of (in + out) over the adapted linears:
  forward:  2P + 4 L H d c (q.k and p.v) + 2 r S
  backward: 2P (input gradients only: the frozen base has no weight
            gradient) + 8 L H d c (attention's four backward products)
            + 4 r S (the LoRA input gradient, and A's and B's gradients)
  total:    4P + 12 L H d c + 6 r S.
Norms, activations, softmax, the loss and the optimizer are not counted.
MFU = tokens/s x FLOPs per token / (peak x 1e9), one column per value of
--peak-gflops. For the development machine (2 vCPUs of a Xeon with
AVX512-BF16 and AMX, 2.1 GHz base clock): AMX's bf16 peak is 2 cores x
2.1 GHz x 1024 FLOP/cycle (TDPBF16PS) = 4300.8 GFLOP/s, the machine's bf16
peak; AVX512-BF16's is 2 x 2.1 GHz x 2 ports x 64 FLOP (VDPBF16PS) = 537.6
GFLOP/s. (Which of the two torch's bf16 kernels use here was not checked;
the peers reach 50-60% of the AVX512-BF16 figure.)

`--shape 7b` writes a Llama-2-7B-shaped model (hidden 4096, intermediate
11008, 32 layers, 32 heads, ~13.5 GB in bf16) shard by shard, one tensor in
memory at a time; issue 6's 7B workload is batch 1 x 128 tokens, so bench it
with --batch 1 --seq-len 128.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab
    "small": dict(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16, vocab=32000),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
WORDS_PER_DOC = 126  # + BOS + EOS = 128 tokens: two records per 256-token row


# ---------------------------------------------------------------- make


def tensor_shapes(s):
    h, i, hd = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for layer in range(s["layers"]):
        pre = f"model.layers.{layer}"
        out += [
            (f"{pre}.input_layernorm.weight", (h,)),
            (f"{pre}.self_attn.q_proj.weight", (s["heads"] * hd, h)),
            (f"{pre}.self_attn.k_proj.weight", (s["kv_heads"] * hd, h)),
            (f"{pre}.self_attn.v_proj.weight", (s["kv_heads"] * hd, h)),
            (f"{pre}.self_attn.o_proj.weight", (h, s["heads"] * hd)),
            (f"{pre}.post_attention_layernorm.weight", (h,)),
            (f"{pre}.mlp.gate_proj.weight", (i, h)),
            (f"{pre}.mlp.up_proj.weight", (i, h)),
            (f"{pre}.mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]


def bf16_bytes(a):
    import numpy as np

    # Round-to-nearest-even f32 -> bf16 (no NaNs here).
    u = a.astype(np.float32, copy=False).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def draw_numpy(seed):
    """N(0, 0.02) bf16 bytes of tensor k, from its own numpy seed."""
    import numpy as np

    def draw(k, shape):
        x = np.random.default_rng([seed, k]).standard_normal(shape, dtype=np.float32)
        x *= 0.02
        return bf16_bytes(x)

    return draw


def draw_cuda(seed):
    """The same distribution drawn by torch on the GPU (other values than
    numpy's): a 7B checkpoint in seconds on the GPU machine."""
    import torch

    def draw(k, shape):
        g = torch.Generator(device="cuda").manual_seed(seed * 1_000_003 + k)
        x = torch.randn(shape, generator=g, device="cuda") * 0.02
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()

    return draw


def write_weights(out, s, shard_bytes, draw):
    """Writes safetensors shards of at most shard_bytes (one file when it
    fits), generating one tensor at a time with draw(k, shape)."""
    import numpy as np

    shapes = tensor_shapes(s)
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    index = {}
    total = 0
    for fname, shard in zip(names, shards):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            index[name] = fname
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(out / fname, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for name, shape in shard:
                if name.endswith("norm.weight"):
                    f.write(bf16_bytes(np.ones(shape, np.float32)))
                else:
                    f.write(draw([n for n, _ in shapes].index(name), shape))
        total += off
        print(f"  wrote {fname} ({off / 1e9:.2f} GB)", flush=True)
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
        )


def write_tokenizer(out, vocab_size):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {UNK: 0, BOS: 1, EOS: 2}
    vocab.update({f"w{k}": k for k in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (UNK, BOS, EOS)])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": UNK,
                "model_max_length": 4096,
            },
            indent=1,
        )
    )


def write_data(out, vocab_size, docs, seed):
    import numpy as np

    rng = np.random.default_rng([seed, 1 << 20])
    with open(out / "train.jsonl", "w") as f:
        for _ in range(docs):
            ids = rng.integers(3, vocab_size, WORDS_PER_DOC)
            f.write(json.dumps({"text": " ".join(f"w{k}" for k in ids)}) + "\n")


def cmd_make(a):
    s = SHAPES[a.shape]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    hd = s["hidden"] // s["heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": hd,
        "vocab_size": s["vocab"],
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, s["vocab"])
    write_data(out, s["vocab"], a.docs, a.seed)
    draw = draw_cuda(a.seed) if a.gpu else draw_numpy(a.seed)
    write_weights(out, s, int(a.shard_gb * 1e9), draw)
    n = sum(int(_prod(sh)) for _, sh in tensor_shapes(s))
    print(f"made {out}: {a.shape}, {n / 1e6:.1f}M parameters, {a.docs} records, {time.time() - t:.1f} s")


def _prod(shape):
    p = 1
    for d in shape:
        p *= d
    return p


# ---------------------------------------------------------------- FLOPs


def flops_per_token(model_dir, seq_len, r=16):
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // nh
    linears = [(h, nh * d), (h, nkv * d), (h, nkv * d), (nh * d, h), (h, i), (h, i), (i, h)]
    P = L * sum(a * b for a, b in linears) + h * V
    S = L * sum(a + b for a, b in linears)
    ctx = (seq_len + 1) / 2
    return 4 * P + 12 * L * nh * d * ctx + 6 * r * S


# ---------------------------------------------------------------- peers


def token_rows(model_dir, tokenizer, rows_needed, seq_len):
    """Rows of seq_len ids: the records rendered as Graft renders text
    (BOS + text + EOS), encoded, concatenated and cut into rows."""
    stream, rows = [], []
    with open(Path(model_dir) / "train.jsonl") as f:
        for line in f:
            text = BOS + json.loads(line)["text"] + EOS
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            while len(stream) >= seq_len:
                rows.append(stream[:seq_len])
                stream = stream[seq_len:]
            if len(rows) >= rows_needed:
                return rows
    raise SystemExit(f"{model_dir}/train.jsonl has too few tokens for {rows_needed} rows of {seq_len}")


def cmd_peer(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    t0 = time.perf_counter()
    kw = dict(dtype=torch.bfloat16, device_map="cpu")
    if a.mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw)
    model.config.use_cache = False
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(a.model)
    assert len(tok) == model.config.vocab_size, (len(tok), model.config.vocab_size)
    model.print_trainable_parameters()
    n_steps = a.warmup + a.steps
    rows = torch.tensor(token_rows(a.model, tok, n_steps * a.batch, a.seq_len))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    model.train()
    times, losses = [], []
    for step in range(n_steps):
        x = rows[step * a.batch : (step + 1) * a.batch]
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        times.append(dt)
        losses.append(loss.item())
        print(f"peer {a.mode} step {step + 1}/{n_steps}: loss {loss.item():.4f}, {dt:.2f} s, {x.numel() / dt:.0f} tok/s", flush=True)
    meas = times[a.warmup :]
    res = dict(
        system=f"HF+PEFT {'+bnb NF4 QLoRA' if a.mode == 'qlora' else 'bf16 LoRA'}",
        tokens_per_s=a.steps * a.batch * a.seq_len / sum(meas),
        step_times=times,
        losses=losses,
        load_s=load_s,
        measured_steps=a.steps,
        warmup=a.warmup,
    )
    Path(a.result).write_text(json.dumps(res)) if a.result else print(json.dumps(res))


# ---------------------------------------------------------------- graft


def graft_toml(a, run_dir):
    return f"""# Written by benches/peers/qlora.py: issue 6's workload for Graft.
[model]
path = "{Path(a.model).resolve()}"
quantize = "nf4"
compute_dtype = "bf16"

[adapter]
method = "lora"
r = 16
alpha = 32.0
dropout = 0.0
target_modules = "all-linear"

[data]
train = "{(Path(a.model) / 'train.jsonl').resolve()}"
eval = ""
format = "text"
max_seq_len = {a.seq_len}
packing = true

[train]
optimizer = "adamw"
lr = 2e-4
weight_decay = 0.0
max_grad_norm = 0.3
epochs = 1
max_steps = {a.warmup + a.steps}
micro_batch_size = {a.batch}
grad_accum = 1

[output]
dir = "{run_dir}"
log_steps = 1
eval_steps = 0
save_steps = 0
save_total_limit = 1
"""


def cmd_graft(a):
    """Runs the trainer (as this process's child) and writes the result."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = (work / "graft-run").resolve()
    if run_dir.exists():
        shutil.rmtree(run_dir)  # this script's own earlier run
    cfg = work / "graft-run.toml"
    cfg.write_text(graft_toml(a, run_dir))
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    cmd = [a.trainer, "run", "--config", str(cfg)]
    print("$ RAYON_NUM_THREADS=%d %s" % (a.threads, " ".join(cmd)), flush=True)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    res = dict(
        system="Graft NF4 QLoRA", rc=p.returncode, wall_s=wall, rss_kb=ru.ru_maxrss, cpu_s=ru.ru_utime + ru.ru_stime
    )
    recs = []
    mpath = run_dir / "metrics.jsonl"
    if mpath.exists():
        recs = [json.loads(l) for l in mpath.read_text().splitlines() if l.strip()]
    steps = [r for r in recs if "tokens_per_s" in r]
    if steps:
        times = [r["tokens"] / r["tokens_per_s"] for r in steps]
        meas = steps[a.warmup :]
        mt = times[a.warmup :]
        res.update(
            step_times=times,
            step_tokens=[r["tokens"] for r in steps],
            losses=[r["loss"] for r in steps],
            measured_steps=len(meas),
            warmup=a.warmup,
            tokens_per_s=sum(r["tokens"] for r in meas) / sum(mt) if meas else None,
            load_s=wall - steps[-1]["elapsed_s"],
        )
    Path(a.result).write_text(json.dumps(res)) if a.result else print(json.dumps(res))
    if p.returncode != 0:
        sys.exit(p.returncode)


# ---------------------------------------------------------------- bench


def run_child(argv, result):
    """Runs this script's subcommand in a child process; returns its result
    with the child's own peak RSS."""
    if result.exists():
        result.unlink()
    cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--result", str(result)]
    print("\n$ " + " ".join(cmd), flush=True)
    load0, t = os.getloadavg()[0], time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, ru = os.wait4(p.pid, 0)
    wall, load1 = time.perf_counter() - t, os.getloadavg()[0]
    rc = os.waitstatus_to_exitcode(status)
    res = json.loads(result.read_text()) if result.exists() else {}
    res.setdefault("rc", rc)
    if rc != 0:
        res["rc"] = rc
    # The graft subcommand measures its trainer child itself (ru_maxrss of
    # the trainer, not of the python wrapper).
    res.setdefault("rss_kb", ru.ru_maxrss)
    res.setdefault("cpu_s", ru.ru_utime + ru.ru_stime)
    res.setdefault("wall_s", wall)
    res["loadavg"] = (load0, load1)
    return res


def cmd_bench(a):
    work = Path(a.work)
    model = Path(a.model) if a.model else work / a.shape
    if not (model / "config.json").exists():
        steps = max(a.steps, a.peer_steps or 0) + max(a.warmup, a.peer_warmup or 0)
        docs = a.batch * (a.seq_len // 128) * (steps + 8)
        run = [sys.executable, os.path.abspath(__file__), "make", "--shape", a.shape, "--out", str(model), "--docs", str(max(docs, 512))]
        print("$ " + " ".join(run), flush=True)
        subprocess.run(run, check=True)
    common = ["--model", str(model), "--batch", str(a.batch), "--seq-len", str(a.seq_len), "--threads", str(a.threads)]
    peer_steps = ["--steps", str(a.peer_steps or a.steps), "--warmup", str(a.peer_warmup if a.peer_warmup is not None else a.warmup)]
    results = []
    for what in a.systems.split(","):
        if what in ("qlora", "lora"):
            results.append(run_child(["peer", "--mode", what] + common + peer_steps, work / f"peer-{what}.json"))
            results[-1].setdefault("system", f"HF+PEFT {what}")
        elif what == "graft":
            argv = ["graft", "--trainer", a.trainer, "--work", str(work), "--steps", str(a.steps), "--warmup", str(a.warmup)] + common
            results.append(run_child(argv, work / "graft.json"))
            results[-1].setdefault("system", "Graft NF4 QLoRA")
        else:
            raise SystemExit(f"--systems: unknown {what!r} (qlora, lora, graft)")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print_table(a, model, results)


def print_table(a, model, results):
    fpt = flops_per_token(model, a.seq_len)
    print(f"\nmodel {model} ({a.shape}), batch {a.batch} x {a.seq_len}, LoRA r=16 all 7 linears, AdamW, {a.threads} threads")
    print(f"FLOPs per token {fpt / 1e6:.1f} M (4P + 12LHdc + 6rS)")
    mfu_h = "".join(f" {'MFU@%g' % g:>10}" for g in a.peak_gflops)
    hdr = f"{'system':<26} {'steps':>9} {'tokens/s':>9} {'s/step':>8} {'peak RSS':>10} {'load s':>7}{mfu_h} {'cpu/wall':>8} {'loadavg':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        tps = r.get("tokens_per_s")
        mfu = "".join(f" {f'{100 * tps * fpt / (g * 1e9):.1f}%' if tps else 'n/a':>10}" for g in a.peak_gflops)
        steps = f"{r.get('warmup', '?')}+{r.get('measured_steps', '?')}"
        sps = f"{a.batch * a.seq_len / tps:.2f}" if tps else "n/a"
        load = f"{r['load_s']:.1f}" if r.get("load_s") is not None else "n/a"
        tpss = f"{tps:.1f}" if tps else f"rc={r.get('rc')}"
        busy = f"{r['cpu_s'] / r['wall_s']:.2f}" if r.get("wall_s") else "n/a"
        la = "%.1f-%.1f" % tuple(r["loadavg"]) if r.get("loadavg") else "n/a"
        print(f"{r['system']:<26} {steps:>9} {tpss:>9} {sps:>8} {r['rss_kb'] / 1024:>7.0f} MB {load:>7}{mfu} {busy:>8} {la:>9}")
    print(
        "cpu/wall: the run's CPU seconds per wall second (about --threads when it had the cores to itself);"
        " loadavg: the 1-minute load average before and after it (other work on the machine shows here)"
    )
    # Graft run more than once (first and last, to see the machine's drift):
    # the peers are compared with its mean tokens/s and its highest peak RSS.
    graft = [r for r in results if r["system"].startswith("Graft") and r.get("tokens_per_s")]
    if graft:
        g_tps = sum(r["tokens_per_s"] for r in graft) / len(graft)
        g_rss = max(r["rss_kb"] for r in graft)
        who = "Graft" if len(graft) == 1 else f"Graft (mean of {len(graft)} runs)"
        for r in results:
            if r["system"].startswith("Graft") or not r.get("tokens_per_s"):
                continue
            target = 2.0 if "QLoRA" in r["system"] else 1.5
            ratio = g_tps / r["tokens_per_s"]
            rss = g_rss / r["rss_kb"]
            print(
                f"{who} vs {r['system']}: {ratio:.3f}x tokens/s (target >= {target}x: {'met' if ratio >= target else 'NOT met'}), "
                f"peak RSS {rss:.3f}x ({'lower' if rss < 1 else 'NOT lower'})"
            )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def run_args(q, steps=4, warmup=1):
        q.add_argument("--batch", type=int, default=4)
        q.add_argument("--seq-len", type=int, default=256)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--steps", type=int, default=steps, help="measured steps (after the warm-up)")
        q.add_argument("--warmup", type=int, default=warmup, help="warm-up steps, not measured")

    m = sub.add_parser("make", help="write a random Llama, tokenizer and JSONL")
    m.add_argument("--shape", choices=SHAPES, default="small")
    m.add_argument("--out", required=True)
    m.add_argument("--docs", type=int, default=512, help="records of 128 tokens (two per row)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shard-gb", type=float, default=2.0)
    m.add_argument("--gpu", action="store_true", help="draw the weights with torch on the GPU (fast; other values)")

    q = sub.add_parser("peer", help="one transformers + PEFT run")
    q.add_argument("--model", required=True)
    q.add_argument("--mode", choices=["qlora", "lora"], required=True)
    q.add_argument("--result", help="write the result JSON here (else print it)")
    run_args(q, steps=8, warmup=2)

    g = sub.add_parser("graft", help="one Graft run")
    g.add_argument("--model", required=True)
    g.add_argument("--trainer", default="target/release/trainer")
    g.add_argument("--work", default="/tmp/peers", help="the run's TOML and output directory go here")
    g.add_argument("--result")
    run_args(g)

    b = sub.add_parser("bench", help="make (if needed) and run everything, print the table")
    b.add_argument("--shape", choices=SHAPES, default="small")
    b.add_argument("--work", default="/tmp/peers")
    b.add_argument("--model", help="an existing model directory made by `make` (default WORK/SHAPE)")
    b.add_argument("--trainer", default="target/release/trainer")
    b.add_argument("--systems", default="qlora,lora,graft", help="comma-separated, run in this order")
    b.add_argument("--peer-steps", type=int, help="measured steps for the peers (default --steps)")
    b.add_argument("--peer-warmup", type=int, help="warm-up steps for the peers (default --warmup)")
    b.add_argument("--peak-gflops", type=float, nargs="+", default=[], help="bf16 peak(s) of the machine in GFLOP/s: one MFU column each")
    run_args(b)

    a = p.parse_args()
    {"make": cmd_make, "peer": cmd_peer, "graft": cmd_graft, "bench": cmd_bench}[a.cmd](a)


if __name__ == "__main__":
    main()
