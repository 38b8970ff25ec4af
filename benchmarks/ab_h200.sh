#!/usr/bin/env bash
# A/B sweep rows on one H200 machine, two source trees and two transformers side by side (as for
# benchmarks/results/checkpoint_placement_h200.json). Source it on the device, then:
#   row NAME TGZ TFDIR VAR=value ...   (one bench_h200.sh sweep into $OUT/NAME.json)
# TGZ: a tree in .benchdata (git archive REV | gzip > .benchdata/new.tgz); TFDIR: "" for the
# host's transformers, /tmp/tf524 for the wheels in .benchdata/tf524 (pip download --no-deps -d
# .benchdata/tf524 transformers==5.24.0 huggingface-hub==1.33.0), installed here once.
base=$PWD
if [ -d .benchdata/tf524 ] && [ ! -d /tmp/tf524 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tf524 .benchdata/tf524/*.whl
fi
row() {
  local name=$1 tgz=$2 tf=$3; shift 3
  local dir=/tmp/src-${tgz%.tgz}
  if [ ! -d $dir ]; then mkdir -p $dir && tar xzf .benchdata/$tgz -C $dir; fi
  ln -sfn $base/.peer $dir/.peer; ln -sfn $base/.benchdata $dir/.benchdata
  # The commit a tree was archived from (git archive's header), so a row says what it ran: a
  # tgz rebuilt on the device from the device's copy of .git once ran the session's first commit.
  local commit=$(gunzip -c .benchdata/$tgz | git get-tar-commit-id 2>/dev/null)
  echo "=== $name ($tgz = ${commit:-unknown commit}, transformers ${tf:-host}) $(date +%T)"
  (cd $dir && env ${tf:+PYTHONPATH=$tf} "$@" SWEEP_NAME=$name OUT=$OUT bash benchmarks/bench_h200.sh sweep 2>&1 | grep -v "^\s*$" | tail -6)
  # One log for all rows: a device call brings back at most 8 files, and a row's own log would
  # make it two (session 15 lost a row's JSON that way).
  if [ -f "$OUT/$name.log" ]; then
    { echo "=== $name ($tgz = ${commit:-unknown commit})"; cat "$OUT/$name.log"; } >> "$OUT/ab_rows.log"
    rm -f "$OUT/$name.log"
  fi
}
