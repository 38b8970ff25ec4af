#!/usr/bin/env bash
# FSDP-QLoRA benchmark on a 2-GPU host (offline): see benchmarks/fsdp_qlora.py.
#   bash benchmarks/fsdp_qlora.sh        # writes $OUT/fsdp_qlora.json (default OUT=benchmarks/results)
# Needs .whl/ (the bitsandbytes wheel, from ../shared/device/wheels.sh) beside the working tree;
# uses .benchdata/dolly_dev.jsonl when present, else the bundled demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ! python3 -c "import bitsandbytes" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/bitsandbytes-*.whl
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1          # every phase's progress shows up as it happens
export HF_HUB_OFFLINE=1            # nothing is downloaded: model and tokenizer are built here
export NCCL_NVLS_ENABLE=0          # NVLink multicast stays off on this host
export TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec python3 benchmarks/fsdp_qlora.py --out "$OUT/fsdp_qlora.json" "$@"
