#!/usr/bin/env bash
# FSDP-QLoRA kill -9 and resume on a 2-GPU host (issue 18): see benchmarks/fsdp_resume.py.
#   bash benchmarks/fsdp_resume.sh [ARGS...]   # writes $OUT/fsdp_resume.json (default
#                                              # OUT=benchmarks/results); ARGS go to the script
# Needs .peer/peer-site.tgz (bitsandbytes; ../shared/device/peer-site.sh) beside the working
# tree; uses .benchdata/dolly_dev.jsonl when present, else the bundled demo data. About 3 minutes
# on 2 x H200; the script's own deadline (--budget-s 420) and this timeout keep it under 10.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -f .peer/peer-site.tgz ] && [ ! -f /tmp/peer/.done ]; then
  mkdir -p /tmp/peer && tar xzf .peer/peer-site.tgz -C /tmp/peer && touch /tmp/peer/.done
fi
export PYTHONPATH=/tmp/peer:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1          # every phase's progress shows up as it happens
export HF_HUB_OFFLINE=1            # nothing is downloaded: model and tokenizer are built here
export TOKENIZERS_PARALLELISM=false QLORA_LAB_CACHE=/tmp/qlora-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no multicast
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# SIGTERM at the limit: the script kills its launch (and every worker) and writes the JSON.
exec timeout --kill-after 20 560 python3 benchmarks/fsdp_resume.py --out "$OUT/fsdp_resume.json" "$@"
