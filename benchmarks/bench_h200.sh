#!/usr/bin/env bash
# The H200 benchmark of issue #5, as run for benchmarks/results/bench_h200_8gib.json:
#   bash benchmarks/bench_h200.sh [sweep|final|small|profile|context|fullrows|gputest|levers|budget|all]
#   (all = sweep, final, small)
# fullrows: ours against unsloth on rows that fill every 1024-token bin (fixtures.py full-rows),
#   FULL="--set k=v ..." for our flags, FULL_RECIPES=qlora_lab for ours alone, FULL_NAME names
#   the result file; PEER_RUNS=3 (here and in `final`) runs each unsloth recipe 3 times for a
#   median (~70 s a run on the full rows; in `final` the two unsloth recipes' extra runs add
#   ~5 minutes, more than a 10-minute call has beside 3 plain runs: run the peers alone then,
#   --recipes unsloth,unsloth_packed, or fewer plain runs); gputest: the CUDA-only tests (pytest -m gpu).
# levers: issue #15's lever rows at 160 rows per micro-batch (fused LoRA, varlen, Flex), 12
#   steps with 5 untimed (compiled layers compile for the first shapes), then a profile of
#   the varlen row; one device call.
# VARIANTS=4,6,7 picks rows of the sweep's ladder (default: all of them).
# CONTEXT_RECIPES=qlora_lab LENGTHS=65536,98304,131072 runs the context search for ours alone.
# One device call allows 10 minutes: run `sweep`, `final` and `small` in calls of their own
# (the sweep's result stays in /tmp on a warm machine; BEST="--set k=v ..." overrides it).
# `final` runs the plain recipe 3 times (bench's median, min and max) beside qlora_lab, unsloth
# (padded) and unsloth_packed, hence its 540 s limit; PLAIN_STEPS=N gives the plain runs fewer
# steps (at 160 rows per step each is 40 micro-batches, 17 s), so the others can run more.
# Needs (offline host): .peer/peer-site.tgz from ../shared/device/peer-site.sh (unsloth,
# bitsandbytes, liger-kernel) and the Dolly sample at .benchdata/dolly_dev.jsonl.
# Model: the TinyLlama-1.1B architecture with random weights (speed and memory do not depend on
# weight values) and a BPE tokenizer trained on the Dolly rows (realistic lengths, no download).
set -uo pipefail
phase=${1:-all}
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
# unsloth's package set (it holds bitsandbytes and liger-kernel too); without it, whatever is
# already on PYTHONPATH (e.g. /tmp/site from .whl/) serves the phases that need no unsloth.
if [ -f .peer/peer-site.tgz ]; then
  mkdir -p /tmp/peer && [ -f /tmp/peer/.done ] || { tar xzf .peer/peer-site.tgz -C /tmp/peer && touch /tmp/peer/.done; }
fi
export PYTHONPATH=/tmp/peer:${PYTHONPATH:+$PYTHONPATH:}$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
       TOKENIZERS_PARALLELISM=false QLORA_LAB_CACHE=/tmp/qlora-cache
DATA=.benchdata/dolly_dev.jsonl MODEL=/tmp/tinyllama-random
python3 benchmarks/fixtures.py tinyllama --out $MODEL --data $DATA  # kept if it exists
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
COMMON=(--model $MODEL --data $DATA --memory-cap 8GiB --set train.grad_accum_steps=1
        --set data.max_seq_len=1024)
if [[ $phase == sweep || $phase == all ]]; then
  # SWEEP_DATA=full sweeps the full-rows fixture (ladder rows 30-32), SWEEP_NAME names the file.
  sdata=$DATA
  if [[ ${SWEEP_DATA:-} == full ]]; then
    sdata=/tmp/dolly_full_rows.jsonl
    python3 benchmarks/fixtures.py full-rows --data $DATA --out $sdata
  fi
  timeout ${SWEEP_TIMEOUT:-540} python3 benchmarks/fastpath_sweep.py --model $MODEL --data $sdata \
    --out "$OUT/${SWEEP_NAME:-fastpath_sweep}.json" --steps ${SWEEP_STEPS:-8} \
    --warmup-steps ${WARMUP:-2} ${VARIANTS:+--variants $VARIANTS} 2>&1 \
    | grep -v "it/s\]\|triton_kernel_wrap.py" | tee "$OUT/${SWEEP_NAME:-fastpath_sweep}.log" | tail -40
  [[ -z ${SWEEP_DATA:-} ]] && cp "$OUT/${SWEEP_NAME:-fastpath_sweep}.json" /tmp/fastpath_sweep.json
fi
if [[ $phase == final || $phase == all ]]; then
  best=${BEST:-$(python3 -c "import json; b=json.load(open('/tmp/fastpath_sweep.json'))['best']; print(' '.join('--set '+s for s in b['set']))" 2>/dev/null)}
  echo "final bench with: $best"
  timeout ${FINAL_TIMEOUT:-540} python3 -m qlora_lab bench "${COMMON[@]}" $best --steps ${FINAL_STEPS:-12} \
    --warmup-steps ${WARMUP:-2} ${PLAIN_STEPS:+--plain-steps $PLAIN_STEPS} ${PEER_RUNS:+--peer-runs $PEER_RUNS} \
    --recipes plain,qlora_lab,unsloth,unsloth_packed --output-dir /tmp/bench-final 2>&1 | grep -v "it/s\]" | tail -30
  cp /tmp/bench-final/bench.json "$OUT/bench_h200_8gib.json"; cp /tmp/bench-final/bench.md "$OUT/bench_h200_8gib.md"
fi
if [[ $phase == small || $phase == all ]]; then
  # Peak memory of one 2,048-token row per step (the micro-batch 1 x 2048 target).
  timeout 120 python3 -m qlora_lab bench --model $MODEL --data $DATA --memory-cap 8GiB --steps 4 \
    --recipes qlora_lab --set train.grad_accum_steps=1 --set data.max_seq_len=2048 \
    --set train.micro_batch_size=1 --output-dir /tmp/bench-small 2>&1 | grep -v "it/s\]" | tail -8
  cp /tmp/bench-small/bench.json "$OUT/bench_1x2048_h200_8gib.json"
  # The same with checkpointed layer inputs kept in host memory (the planner's last resort).
  timeout 120 python3 -m qlora_lab bench --model $MODEL --data $DATA --memory-cap 8GiB --steps 4 \
    --recipes qlora_lab --set train.grad_accum_steps=1 --set data.max_seq_len=2048 \
    --set train.micro_batch_size=1 --set train.activation_offload=true \
    --output-dir /tmp/bench-small-offload 2>&1 | grep -v "it/s\]" | tail -8
  cp /tmp/bench-small-offload/bench.json "$OUT/bench_1x2048_offload_h200_8gib.json"
fi
if [[ $phase == budget ]]; then
  # `train --budget 8GiB` on the bench's rows and step (160 rows, compiled, varlen), run under the
  # 8 GiB cap it planned for: the planner's choice and prediction (the log's "planner:" line)
  # beside the peak train measured (summary.json). The cap starts CUDA, so the allocator setting
  # train would make is made here.
  rm -rf /tmp/budget-run
  PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} \
    timeout ${BUDGET_TIMEOUT:-300} python3 -c "
import sys, torch
torch.cuda.set_per_process_memory_fraction(8 * 2**30 / torch.cuda.get_device_properties(0).total_memory)
from qlora_lab.cli import main
sys.exit(main(sys.argv[1:]))" train --model $MODEL --data $DATA --budget 8GiB \
    --output-dir /tmp/budget-run --set train.micro_batch_size=160 --set train.grad_accum_steps=1 \
    --set data.max_seq_len=1024 --set train.compile=true --set model.attn_implementation=varlen \
    --set train.max_steps=${BUDGET_STEPS:-10} --set data.eval_fraction=0 --set train.save_steps=1000 \
    2>&1 | grep -v "it/s\]" | tee "$OUT/train_budget.log" | tail -12
  cp /tmp/budget-run/summary.json "$OUT/train_budget_summary.json"
fi
if [[ $phase == levers ]]; then
  # Each compilation's cause (dynamo's recompile log) goes to levers.log with the rest.
  TORCH_LOGS=recompiles timeout ${SWEEP_TIMEOUT:-400} python3 benchmarks/fastpath_sweep.py \
    --model $MODEL --data $DATA --out "$OUT/fastpath_sweep_levers.json" --steps ${SWEEP_STEPS:-12} \
    --warmup-steps ${WARMUP:-5} --variants ${VARIANTS:-13,14,15} 2>&1 | grep -v "it/s\]" \
    > "$OUT/levers.log"; grep -c "Recompiling function" "$OUT/levers.log"; tail -12 "$OUT/levers.log"
  timeout ${PROFILE_TIMEOUT:-200} python3 benchmarks/profile_step.py --model $MODEL --data $DATA \
    --set train.micro_batch_size=160 --set train.compile=true \
    --set model.attn_implementation=varlen --skip-steps 4 \
    --out "$OUT/profile_step_h200_160rows.json" 2>&1 \
    | grep -v "it/s\]" | tail -30
fi
if [[ $phase == fullrows ]]; then
  # Same work for both: every row is 1024 tokens, so packing packs nothing and padding pads
  # nothing; 32 rows per micro-batch each (issue #15's full-rows goal).
  FULLDATA=/tmp/dolly_full_rows.jsonl
  python3 benchmarks/fixtures.py full-rows --data $DATA --out $FULLDATA
  timeout ${FULL_TIMEOUT:-300} python3 -m qlora_lab bench --model $MODEL --data $FULLDATA \
    --memory-cap 8GiB --set train.grad_accum_steps=1 --set data.max_seq_len=1024 \
    --set train.micro_batch_size=32 --peer-micro-batch 32 ${FULL:-} --steps ${FULL_STEPS:-8} --warmup-steps ${WARMUP:-2} \
    ${PEER_RUNS:+--peer-runs $PEER_RUNS} \
    --recipes ${FULL_RECIPES:-qlora_lab,unsloth} --output-dir /tmp/bench-full 2>&1 | grep -v "it/s\]" | tail -12
  cp /tmp/bench-full/bench.json "$OUT/${FULL_NAME:-bench_full_rows_h200_8gib}.json"
  cp /tmp/bench-full/bench.md "$OUT/${FULL_NAME:-bench_full_rows_h200_8gib}.md"
fi
if [[ $phase == gputest ]]; then
  python3 -m pytest --version >/dev/null 2>&1 && \
    timeout ${GPUTEST_TIMEOUT:-120} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider \
      --continue-on-collection-errors 2>&1 | tail -8 \
    || echo "gputest: failures above, or no pytest on this host"
  # (a test module whose imports the host lacks, e.g. rouge_score, is reported and skipped)
fi
if [[ $phase == profile ]]; then
  # Where a step of the best config spends GPU time (PROFILE="--set k=v ..." overrides it).
  # PROFILE_DATA=full profiles the full-rows fixture; PROFILE_NAME names the result file.
  # GPU_ONLY=1: the kernels alone (profile_step.py --gpu-only: idle by kernel pair and by the
  # step's phase) over ACTIVE steps (8), under the script's 8 GiB cap (its default).
  # PROFILE, else BEST (as `final` reads it), else the best row of this machine's last sweep;
  # with none of them it profiles train's defaults, and says so.
  best=${PROFILE:-${BEST:-$(python3 -c "import json; b=json.load(open('/tmp/fastpath_sweep.json'))['best']; print(' '.join('--set '+s for s in b['set']))" 2>/dev/null)}}
  [[ -z $best ]] && echo "profile: no PROFILE, BEST or sweep best: profiling train's defaults"
  pdata=$DATA
  if [[ ${PROFILE_DATA:-} == full ]]; then
    pdata=/tmp/dolly_full_rows.jsonl
    python3 benchmarks/fixtures.py full-rows --data $DATA --out $pdata
  fi
  only=()
  [[ -n ${GPU_ONLY:-} ]] && only=(--gpu-only --active ${ACTIVE:-8})
  timeout ${PROFILE_TIMEOUT:-150} python3 benchmarks/profile_step.py --model $MODEL --data $pdata $best \
    ${only[@]+"${only[@]}"} --skip-steps ${SKIP_STEPS:-4} --out "$OUT/${PROFILE_NAME:-profile_step_h200}.json" 2>&1 \
    | grep -v "it/s\]" | tail -30
fi
if [[ $phase == context ]]; then
  timeout 400 python3 -m qlora_lab bench "${COMMON[@]}" --set lora.dropout=0.0 --steps 3 \
    --recipes ${CONTEXT_RECIPES:-qlora_lab,unsloth} \
    --context-lengths ${LENGTHS:-32768,49152,65536,98304,131072} \
    --output-dir /tmp/bench-context 2>&1 | grep -v "it/s\]" | tail -30
  cp /tmp/bench-context/bench.json "$OUT/bench_context_h200_8gib.json"
fi
