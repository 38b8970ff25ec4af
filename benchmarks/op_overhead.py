"""Host time of one call of the fused LoRA's in-place accumulate, per way of defining it.

    python benchmarks/op_overhead.py --out benchmarks/results/op_overhead_cpu.json

A compiled step calls `qlora_lab::accumulate_mm` ~600 times (profile_step_h200_160rows_idle.json)
and each call's Python runs on the host while the GPU may wait. This times, on tiny tensors so
the arithmetic is negligible: the bare `addmm_`, the operator as this repo defines it
(`torch.library.Library`, fusedlora.py), and the same operator declared with `@custom_op` (what
fusedlora.py used before commit 6475a41), each the median of several rounds of many calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from fixtures import hardware_label, per_call_us, versions

import qlora_lab.fusedlora  # noqa: F401  (registers qlora_lab::accumulate_mm)


@torch.library.custom_op("qlora_lab_bench::accumulate_mm", mutates_args=("out",))
def _decorated(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    out.addmm_(a, b)


@_decorated.register_fake
def _(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    out, a, b = torch.zeros(4, 4), torch.randn(4, 2), torch.randn(2, 4)
    ways = {
        "addmm_ (eager, no operator)": lambda: out.addmm_(a, b),
        "torch.library.Library (fusedlora.py since 6475a41)":
            lambda: torch.ops.qlora_lab.accumulate_mm(out, a, b),
        "@torch.library.custom_op (before)":
            lambda: torch.ops.qlora_lab_bench.accumulate_mm(out, a, b),
    }
    report = {
        "command": "python " + " ".join(sys.argv),
        "what": __doc__.splitlines()[0],
        "calls_per_round": args.calls, "rounds": args.rounds,
        "us_per_call": {name: round(per_call_us(call, args.calls, args.rounds), 2)
                        for name, call in ways.items()},
        "hardware": hardware_label(),
        "versions": versions(),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["us_per_call"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
