#!/usr/bin/env bash
# Two source trees of qlora-lab A/B'd on one H200 (capped at 8 GiB), as for session 27's
# tilemap_ab_h200_*.json, tile_order_ab_h200_*.json and attention_triton_h200_s27_*.json:
#   git archive OLD_REV src | tar -x -C .benchdata/old     (the tree to compare against)
#   ORDER="new old new" OUT=... bash benchmarks/ab_trees_h200.sh
# For each tree: the attention kernels alone (attention_triton.py, 160-row Dolly micro-batches
# and full rows), then in ORDER one 16-step `bench` of ours each (160 rows a step, compiled,
# varlen attention; 2 untimed), each its own process, on the same machine: machine to machine
# the same steps vary by several percent, so only rows of one call compare. Every result file
# gets a "tree" field (the commit each tree was archived from, when git can tell).
# Needs .peer/peer-site.tgz (bitsandbytes, liger-kernel) and .benchdata/dolly_dev.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/ab-trees}; mkdir -p "$OUT"
mkdir -p /tmp/peer && { [ -f /tmp/peer/.done ] || { tar xzf .peer/peer-site.tgz -C /tmp/peer && touch /tmp/peer/.done; }; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false QLORA_LAB_CACHE=/tmp/qlora-cache
declare -A TREE=([new]=$PWD/src [old]=$PWD/.benchdata/old/src)
declare -A REV=([new]=$(git rev-parse --short HEAD 2>/dev/null)
                [old]=${OLD_REV:-unknown})
path() { echo /tmp/peer:${TREE[$1]}:$PWD/benchmarks; }
PYTHONPATH=$(path new) python3 benchmarks/fixtures.py tinyllama --out /tmp/tinyllama-random \
  --data .benchdata/dolly_dev.jsonl > /dev/null 2>&1
tag() {  # tag FILE TREE: record which tree a result ran
  python3 - "$1" "$2" "${REV[$2]}" <<'PY'
import json, sys
path, tree, rev = sys.argv[1:]
d = json.load(open(path)); d["tree"] = {"name": tree, "commit": rev}
json.dump(d, open(path, "w"), indent=2)
PY
}
for t in new old; do
  (cd benchmarks && PYTHONPATH=$(path $t) timeout 150 python3 attention_triton.py \
    --data ../.benchdata/dolly_dev.jsonl --out $OUT/attention_triton_$t.json --iters 30 \
    --batches ${BATCHES:-2} --skip-dim128 ${TILES:+--tiles "$TILES"} 2>&1 | grep "^triton" | cut -c1-300)
  tag $OUT/attention_triton_$t.json $t
done
n=0
for t in ${ORDER:-new old new}; do
  n=$((n+1)); name=${n}_$t
  PYTHONPATH=$(path $t) timeout 150 python3 -m qlora_lab bench --model /tmp/tinyllama-random \
    --data .benchdata/dolly_dev.jsonl --memory-cap 8GiB --set data.max_seq_len=1024 \
    --set train.grad_accum_steps=1 --set train.micro_batch_size=160 --set train.compile=true \
    --set model.attn_implementation=varlen --warmup-steps 2 --steps 16 --recipes qlora_lab \
    --output-dir /tmp/ab-$name > $OUT/ab_$name.log 2>&1
  cp /tmp/ab-$name/bench.json $OUT/ab_$name.json && tag $OUT/ab_$name.json $t
  python3 -c "import json;d=json.load(open('$OUT/ab_$name.json'))['recipes']['qlora_lab'];print('$name', round(d['real_tokens_per_s']), round(d['peak_allocated_bytes']/2**30,2), d['loss_check']['abs_diff'])" \
    || tail -5 $OUT/ab_$name.log
done
