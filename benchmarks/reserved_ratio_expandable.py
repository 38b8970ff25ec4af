"""The CUDA allocator's reserved / allocated peak of packed runs under expandable segments (no
new runs).

    python benchmarks/reserved_ratio_expandable.py > benchmarks/results/reserved_ratio_expandable.json

Every training process has used CUDA's expandable segments since commit d719466 (2026-12-01,
train.allocator_defaults). This reads the committed H200 runs of `train`'s packed path made
after it: the fastpath sweep rows of runs 5-19 (each `qlora-lab bench --recipes qlora_lab`
through setup_training) and qlora_lab's rows of the four-recipe and full-rows benches (runs 7
to 11, session 14's two full-rows runs, sessions 15's, 17's and 19's) and of run 15's full-rows
bench, and
reports peak reserved over peak allocated per run. The planner multiplies its allocated estimate by memory.RESERVED_OVER_ALLOCATED_PACKED_EXPANDABLE
for such runs; tests/test_memory.py checks that it covers every ratio here. (The ratio for
packed runs without expandable segments, 1.3, comes from reserved_ratio_fastpath.json: the lab
report of 2026-11-28, before d719466.)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks/results"
SWEEPS = [f"fastpath_sweep_h200_run{n}.json" for n in (
    "5_levers", "6_checkpointing", "7_fused_all", "8_optimizers", "9_adapter_first",
    "10_workers", "11_async", "12_small_micro_batches", "13_no_recompute",
    "15_cuda_graphs", "16_sdpa", "17_liger_loss", "18_fusedce", "19_absmax")]
BENCHES = ["archive/bench_h200_8gib_run7.json",
           "archive/bench_full_rows_h200_8gib_run7_63701ef.json",
           "archive/bench_full_rows_h200_8gib_run8_42530e8.json",
           "archive/bench_h200_8gib_run8.json",
           "archive/bench_full_rows_h200_8gib_run9_0704b95.json",
           "archive/bench_full_rows_h200_8gib_run9_0704b95_rerun.json",
           "archive/bench_h200_8gib_run9.json",
           "archive/bench_full_rows_h200_8gib_run10_799a249.json",
           "archive/bench_h200_8gib_run10.json",
           "archive/bench_full_rows_h200_8gib_run11_46e33b7.json",
           "archive/bench_h200_8gib_run12.json", "bench_full_rows_h200_8gib.json"]


def _point(source: str, name: str, run: dict) -> dict | None:
    alloc, reserved = run.get("peak_allocated_bytes"), run.get("peak_reserved_bytes")
    if not (alloc and reserved):
        return None  # a row that ran out of memory measured no peak
    return {"source": source, "run": name, "peak_allocated_bytes": alloc,
            "peak_reserved_bytes": reserved, "ratio": round(reserved / alloc, 4)}


def main() -> None:
    points = []
    for name in SWEEPS:
        data = json.loads((RESULTS / name).read_text())
        for row in data["rows"]:
            points.append(_point(name, row["variant"], row))
        if "bench_full_rows" in data:  # run 15's bench beside unsloth
            points.append(_point(name, "bench_full_rows: qlora_lab",
                                 data["bench_full_rows"]["recipes"]["qlora_lab"]))
    for name in BENCHES:
        data = json.loads((RESULTS / name).read_text())
        points.append(_point(name, "qlora_lab", data["recipes"]["qlora_lab"]))
    points = [p for p in points if p]
    ratios = [p["ratio"] for p in points]
    print(json.dumps({"command": "python benchmarks/reserved_ratio_expandable.py",
                      "what": __doc__.split("\n\n")[0].replace("\n", " "),
                      "runs": len(points), "min_ratio": min(ratios), "max_ratio": max(ratios),
                      "points": points}, indent=2))


if __name__ == "__main__":
    main()
