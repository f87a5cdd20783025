#!/usr/bin/env bash
# `trainer run` end to end on a GPU with a Llama-2-7B-shaped checkpoint
# (hidden 4096, intermediate 11008, 32 layers, vocab 32000; random bf16
# weights drawn on the GPU by benches/peers/qlora.py), as a user runs it:
# load and quantize to NF4, QLoRA r=16 on all linear layers, batch 1 x 2048
# tokens with recomputation, AdamW on the device, a checkpoint, the eval
# loss and held-out exact match (generation with the KV cache on the GPU).
# Prints the trainer's log lines, the wall time, the process's peak RSS and
# the GPU's peak memory (nvidia-smi, every 200 ms); full logs under OUTDIR.
#
#   scripts/gpu-trainer-7b.sh OUTDIR
#
# Runs the `trainer` that scripts/gpu-build.sh left in .gpu-bin/ (GPU
# machines here have no Rust); needs python3 with torch, numpy and
# tokenizers (the GPU machine's image has them). About 13.5 GB of disk.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-trainer-7b.sh OUTDIR}
work=${WORK:-/tmp/graft-7b}
mkdir -p "$out" "$work"
for d in /usr/local/cuda/lib64 $(python3 -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia/cu13/lib"))' 2>/dev/null); do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export GRAFT_CACHE_DIR="${GRAFT_CACHE_DIR:-$out/cache}"
[ -x .gpu-bin/trainer ] || { echo "no .gpu-bin/trainer: run scripts/gpu-build.sh first"; exit 1; }

echo "== the checkpoint (weights drawn on the GPU)"
python3 benches/peers/qlora.py make --shape 7b --out "$work/model" --docs 8 --gpu > "$out/make.log" 2>&1 ||
  { cat "$out/make.log"; exit 1; }
tail -1 "$out/make.log"

# Alpaca records over the tokenizer's words: a 200-word instruction and a
# 40-word answer to train on (about 7 records a 2048-token row); held out,
# 4 records whose 6-word answers the generator must produce.
python3 - "$work" <<'EOF'
import json, random, sys
work = sys.argv[1]
r = random.Random(0)
words = lambda n: " ".join(f"w{r.randrange(3, 32000)}" for _ in range(n))
for name, n, answer in [("train", 256, 40), ("eval", 4, 6)]:
    with open(f"{work}/{name}.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"instruction": words(200), "input": "", "output": words(answer)}) + "\n")
EOF
cat > "$work/run.toml" <<EOF
[model]
path = "$work/model"
quantize = "nf4"
compute_dtype = "bf16"

[adapter]
method = "lora"
r = 16
alpha = 32.0
dropout = 0.05
target_modules = "all-linear"

[data]
train = "$work/train.jsonl"
eval = "$work/eval.jsonl"
format = "alpaca"
template = "alpaca"
max_seq_len = 2048
packing = true

[train]
lr = 2e-4
max_steps = 20
micro_batch_size = 1
gradient_checkpointing = true
device = "gpu"

[output]
dir = "$work/run"
log_steps = 1
eval_accuracy = true
save_steps = 10
save_total_limit = 1
EOF

echo "== trainer run --config run.toml"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/gpu-memory.csv" 2>/dev/null &
smi=$!
base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
t0=$(date +%s.%N)
python3 - "$out/rss.txt" .gpu-bin/trainer run --config "$work/run.toml" > "$out/run.log" 2>&1 <<'EOF'
import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
EOF
rc=$?
t1=$(date +%s.%N)
kill $smi 2>/dev/null
grep -vE "^step ([2-9]|1[0-9])/20  loss" "$out/run.log" | grep -v "^  "
peak=$(sort -n "$out/gpu-memory.csv" | tail -1)
echo "wall $(python3 -c "print(f'{$t1 - $t0:.1f}')") s; peak RSS $(( $(cat "$out/rss.txt" 2>/dev/null || echo 0) / 1024 )) MiB; GPU memory used: ${base:-?} MiB before, ${peak:-?} MiB at most during the run (nvidia-smi)"
ls -la "$work/run/adapter" 2>/dev/null
echo "trainer rc=$rc"
exit $rc
