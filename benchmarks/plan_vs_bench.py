"""The planner against the peaks `bench` measured for qlora_lab, with no GPU: re-predict each
bench.json's own config and compare.

    python benchmarks/plan_vs_bench.py benchmarks/results/bench_full_rows_h200_8gib.json \
        benchmarks/results/bench_h200_8gib.json --out benchmarks/results/plan_vs_bench_h200.json

Each file records the resolved run config it trained (`config`) and, per step, the real tokens.
The planner's N is sequences x max_seq_len: for full rows that is exact (a row is a bin). For
packed Dolly rows `plan` reads no data and plans every row as a full bin, so this also plans the
fewest bins the largest recorded step can have held (its real tokens / bin size, rounded up), a
lower bound on that step's bins: a prediction at it that still exceeds the measured peak means
the planner, given the true bins, bounds the run from above. Whether rows share bins (SDPA
then gets a mask) is read from the steps' real tokens: full rows fill whole bins. The GPU host
had liger-kernel, so each file's `train.liger` is planned with it installed; the model was the
TinyLlama architecture (the `tinyllama` preset's shapes) with random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from fixtures import git_head

from qlora_lab.config import config_from_dict
from qlora_lab.memory import GIB, estimate_peak_memory
from qlora_lab.plan import step_shape
from qlora_lab.shapes import model_shape


def rescore(path: Path) -> dict:
    bench = json.loads(path.read_text())
    measured = bench["recipes"]["qlora_lab"]
    values = bench["config"]
    values["model"]["name"] = "tinyllama"
    # A run's resolved config names every setting of its day: one it lacks came later, and
    # the run had that setting's old behaviour (train.joint_lora: gate and up each alone).
    values["train"].setdefault("joint_lora", False)
    run = config_from_dict(values)
    shape = model_shape("tinyllama")
    bin_tokens = run.data.max_seq_len
    # The H200 had liger-kernel and triton: `train.compile: auto` resolved on, as train ran it.
    # Whether rows share bins (a mask for SDPA), as `train --budget` reads it from the data
    # (data.rows_share_bins): a step whose real tokens fill whole bins held full rows only.
    short = any(t % bin_tokens for t in measured["step_real_tokens"])
    step = dataclasses.replace(step_shape(run, liger_installed=True, triton_installed=True), short_rows=short)
    fewest_bins = math.ceil(max(measured["step_real_tokens"]) / bin_tokens)
    rows = {"as_planned": step}
    if fewest_bins < step.micro_batch_size:
        # `micro_batch_size` counts rows; these rows packed into fewer bins than rows.
        rows[f"at {fewest_bins} bins"] = dataclasses.replace(step, micro_batch_size=fewest_bins)
    entry = {"file": str(path), "command": bench.get("command"),
             "measured_peak_allocated_gib": measured["peak_allocated_bytes"] / GIB,
             "measured_peak_reserved_gib": measured["peak_reserved_bytes"] / GIB,
             "micro_batch_rows": step.micro_batch_size, "bin_tokens": bin_tokens,
             "fewest_bins_of_largest_step": fewest_bins, "predictions": {}}
    for name, s in rows.items():
        plan = estimate_peak_memory(shape, s)
        entry["predictions"][name] = {
            "sequences": s.micro_batch_size,
            "peak_allocated_gib": plan.peak_allocated_bytes / GIB,
            "peak_reserved_gib": plan.peak_reserved_bytes / GIB,
            "allocated_error": plan.peak_allocated_bytes / measured["peak_allocated_bytes"] - 1,
            "reserved_error": plan.peak_reserved_bytes / measured["peak_reserved_bytes"] - 1}
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"what": __doc__.split("\n\n")[0], "planner_commit": git_head()[0],
              "entries": [rescore(f) for f in args.files]}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for e in report["entries"]:
        for name, p in e["predictions"].items():
            print(f"{Path(e['file']).name} {name}: predicted {p['peak_allocated_gib']:.2f} GiB "
                  f"allocated vs {e['measured_peak_allocated_gib']:.2f} measured "
                  f"({p['allocated_error']:+.1%}); reserved {p['peak_reserved_gib']:.2f} vs "
                  f"{e['measured_peak_reserved_gib']:.2f} ({p['reserved_error']:+.1%})")


if __name__ == "__main__":
    main()
