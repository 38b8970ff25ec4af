"""The CUDA allocator's reserved / allocated peak on the fast path (no new runs).

    python benchmarks/reserved_ratio_fastpath.py > benchmarks/results/reserved_ratio_fastpath.json

Reads every CUDA training run of the committed H200 lab report (reports/lab-h200/report.json:
feasibility, throughput, stability and fine-tune runs, all trained by `train`'s packed path in
their own process) and reports peak reserved over peak allocated per run. The planner's budget
search multiplies its allocated estimate by memory.RESERVED_OVER_ALLOCATED_PACKED for packed
runs; tests/test_memory.py checks that it covers every ratio here.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "reports/lab-h200/report.json"


def main() -> None:
    report = json.loads(REPORT.read_text())
    rows = []
    for run_id, run in sorted(report["runs"].items()):
        alloc, reserved = run.get("peak_allocated_bytes"), run.get("peak_reserved_bytes")
        if alloc and reserved:
            rows.append({"run": run_id, "peak_allocated_bytes": alloc,
                         "peak_reserved_bytes": reserved, "ratio": round(reserved / alloc, 4)})
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"command": "python benchmarks/reserved_ratio_fastpath.py",
                      "source": "reports/lab-h200/report.json", "hardware": report.get("hardware"),
                      "runs": len(rows), "min_ratio": min(ratios), "max_ratio": max(ratios),
                      "points": rows}, indent=2))


if __name__ == "__main__":
    main()
