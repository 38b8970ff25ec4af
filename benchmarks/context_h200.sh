#!/usr/bin/env bash
# Longest trainable row at micro-batch 1 under an emulated 8 GiB cap, ours only (unsloth's was
# measured by `bench_h200.sh context`): writes $OUT/bench_context_h200_8gib.json.
# Needs bitsandbytes and liger-kernel on PYTHONPATH, the Dolly sample in .benchdata/.
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false QLORA_LAB_CACHE=/tmp/qlora-cache
DATA=.benchdata/dolly_dev.jsonl MODEL=/tmp/tinyllama-random
[ -f $MODEL/config.json ] || python3 -c "
import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from gpu_train import build_base; build_base(Path('$DATA'), Path('$MODEL'))"
python3 -m qlora_lab bench --model $MODEL --data $DATA --memory-cap 8GiB --steps 3 \
  --set train.grad_accum_steps=1 --set data.max_seq_len=1024 --set lora.dropout=0.0 \
  --recipes qlora_lab --context-lengths ${LENGTHS:-65536,98304,131072} \
  --output-dir /tmp/bench-context-ours 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tail -15
cp /tmp/bench-context-ours/bench.json "$OUT/bench_context_ours_h200_8gib.json"
