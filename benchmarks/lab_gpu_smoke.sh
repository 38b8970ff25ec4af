#!/usr/bin/env bash
# A reduced `lab` run of the GPU code path on one H200 (produced reports/lab-h200-smoke/):
#   OUT=/some/dir bash benchmarks/lab_gpu_smoke.sh      # from the repo root, ~3 min
# Sections 1-2 on a random-weight TinyLlama-1.1B, sections 3-5 on the tiny random model, few
# steps, one seed: it shows the GPU path runs end to end, not what a real model does. The full
# report is benchmarks/lab_h200.sh. Needs .whl/ (bitsandbytes, liger-kernel wheels).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false QLORA_LAB_CACHE=/tmp/qc
python3 - <<'PY'
import torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from qlora_lab.models import PRESETS, build_byte_tokenizer
target = Path("/tmp/tl")
tok = build_byte_tokenizer()
arch = dict(PRESETS["tinyllama"].arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
with torch.device("cuda"):
    m = LlamaForCausalLM(LlamaConfig(**arch)).to(torch.bfloat16)
m.save_pretrained(target); tok.save_pretrained(target)
PY
timeout 330 python3 - <<'PY' 2>&1 | grep -v "it/s\]\|Warning\|warnings.warn" | tail -60
import logging, json
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from qlora_lab.lab import lab_config, run_lab
GIB = 1024**3
cfg = lab_config(output_dir="/tmp/labsmoke", model="tiny-random", speed_model="/tmp/tl",
    seq_lens=(1024, 2048), micro_batches=(1, 4, 16), ranks=(16,), measure_configs=2,
    measure_steps=2, budgets_bytes=(4 * GIB, 8 * GIB), throughput_steps=4,
    learning_rates=(1e-3, 1e-2), quant_variants=("nf4", "16bit"), seeds=(0,),
    stability_steps=4, quality_steps=4, eval_rows=4, repeats=1, command="bash benchmarks/lab_gpu_smoke.sh")
r = run_lab(cfg)
print("STAGES", r.get("stage_seconds"))
PY
cd /tmp/labsmoke && tar czf $OUT/labsmoke.tgz report.* *.png 2>/dev/null; ls /tmp/labsmoke
