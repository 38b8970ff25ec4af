"""Where one training step of qlora-lab's path spends its GPU time: a torch.profiler breakdown.

    python benchmarks/profile_step.py --model DIR --data dolly.jsonl --out profile.json \
        [--set train.micro_batch_size=16 ...]

Builds the run exactly as `qlora-lab train` does (train.setup_training), profiles two steps after
two warm-up steps (then three more under Python's profiler alone: host time by function), and writes the kernels with the most CUDA time plus a breakdown by kind
(4-bit dequantize, matmuls, attention, Liger kernels, elementwise/copies) and the step's wall
time, so a perf change can aim at what dominates. Each top kernel also lists the operator chains
that launched it (innermost op, its parents; with input shapes), so a kernel like a fill or a
copy can be traced to the code that asked for it. The same settings as `bench` (no eval, no
saves, grad_accum 1 unless --set says otherwise, the emulated 8 GiB cap).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch._dynamo  # its counters: how many graphs the compiled layers made
from fixtures import GIB, apply_memory_cap, versions
from transformers import TrainerCallback

from qlora_lab.config import config_from_dict, parse_overrides
from qlora_lab.train import setup_training

HOST_STEPS = 3  # after the GPU profile: Python's profiler alone (torch.profiler slows Python)

# Substrings of kernel names, first match wins; anything else is "other".
KINDS = [
    ("dequantize 4-bit", ("dequantize", "kDequantize", "kgemm_4bit")),
    ("attention", ("flash", "fmha", "attention", "efficient_attention", "softmax")),
    ("triton: Liger + compiled", ("liger", "_rms_norm", "swiglu", "cross_entropy", "triton")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("copy / cast", ("copy", "Copy", "cast", "to_copy", "memcpy", "Memcpy")),
    ("elementwise / reduce", ("elementwise", "vectorized", "reduce", "Reduce", "fill")),
]


def kind_of(name: str) -> str:
    for kind, marks in KINDS:
        if any(m in name for m in marks):
            return kind
    return "other"


class _Stepper(TrainerCallback):
    """Steps the profiler, times each step, and runs Python's own profiler over the steps after
    `host_from` (the GPU idled most of a 32-row step: host work decides, and torch.profiler
    shows only operators, not the Python between them)."""

    def __init__(self, prof, host_from: int):
        self.prof, self.marks, self.host_from = prof, [], host_from
        self.host = cProfile.Profile()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.host_from:
            self.host.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.host.disable()
        self.marks.append(time.perf_counter())
        self.prof.step()


def _host_top(host: cProfile.Profile, steps: int, top: int) -> list[dict]:
    """Python functions by their own time per step (tottime), with cumulative time."""
    stats = pstats.Stats(host).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "self_ms_per_step":
             round(tt * 1e3 / steps, 2), "cum_ms_per_step": round(ct * 1e3 / steps, 2),
             "calls_per_step": round(nc / steps, 1)}
            for (file, line, name), (_, nc, tt, ct, _) in rows]


def _annotation(event) -> bool:
    """A range drawn on the GPU timeline, not a kernel: the profiler's step ("ProfilerStep#N"),
    the optimizer's ("Optimizer.step#AdamW.step") and each compiled graph's call ("## Call
    CompiledFxGraph ... ##"). Counted as kernels they covered the kernels they contain: the
    32-row profile of fastpath_sweep_h200_run4.json's first call read 0.62 s of GPU work per
    step where its kernels took 0.10 s."""
    name = event.key
    return (getattr(event, "is_user_annotation", False) or name.startswith(("## ", "ProfilerStep"))
            or "#" in name)


def _launchers(prof, names: set[str], per_kernel: int = 4) -> dict[str, list[dict]]:
    """For each kernel name: the op chains (innermost first, 4 deep) that launched it, by time."""
    chains: dict[str, dict[tuple, list]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for event in prof.events():
        for kernel in getattr(event, "kernels", []) or []:
            if kernel.name not in names:
                continue
            chain, op = [], event
            while op is not None and len(chain) < 4:
                shapes = str(getattr(op, "input_shapes", "") or "")[:80]
                chain.append(f"{op.name} {shapes}".strip())
                op = op.cpu_parent
            slot = chains[kernel.name][tuple(chain)]
            slot[0] += kernel.duration
            slot[1] += 1
    return {name: [{"chain": list(chain), "us": round(us), "calls": calls}
                   for chain, (us, calls) in sorted(found.items(), key=lambda kv: -kv[1][0])
                   [:per_kernel]]
            for name, found in chains.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--memory-cap-gib", type=float, default=8.0)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--skip-steps", type=int, default=1,
                        help="steps before the profiler's warm-up step (compiled layers compile "
                             "for the first shape, then with a dynamic bin count: skip 2 or more)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()  # on CPU it runs too (a smoke test of the script)
    if cuda:
        apply_memory_cap(int(args.memory_cap_gib * GIB))

    wait, warmup, active = args.skip_steps, 1, 2
    base = {"model": {"name": args.model},
            "data": {"source": args.data, "eval_fraction": 0.0, "max_seq_len": 1024},
            "train": {"output_dir": "/tmp/profile-step",
                      "max_steps": wait + warmup + active + 1 + HOST_STEPS,
                      "save_steps": 1000, "grad_accum_steps": 1, "tensorboard": False}}
    cfg = config_from_dict(parse_overrides(args.set), config_from_dict(base))
    session = setup_training(cfg, overwrite=True)
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active,
                                         repeat=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA],
                                schedule=schedule, record_shapes=True) as prof:
        stepper = _Stepper(prof, host_from=wait + warmup + active)
        session.trainer.add_callback(stepper)
        session.trainer.train()
    # Wall time of every step after the first (the profiled ones are slowed by the profiler).
    steps_s = [round(b - a, 4) for a, b in zip(stepper.marks, stepper.marks[1:])]

    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind and not _annotation(e)]
    device_us = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total, e.count)
                 for e in events]
    device_us.sort(key=lambda t: -t[1])
    total_us = sum(t[1] for t in device_us) or 1.0
    by_kind = defaultdict(float)
    for name, us, _ in device_us:
        by_kind[kind_of(name)] += us
    launches = sum(c for _, _, c in device_us)
    launchers = _launchers(prof, {n for n, _, _ in device_us[:args.top]}) if cuda else {}
    report = {
        "command": " ".join(sys.argv),
        "settings": args.set,
        "profiled_steps": active,
        "step_seconds": steps_s,
        "gpu_busy_seconds_per_step": total_us / 1e6 / active,
        "kernel_launches_per_step": launches / active,
        "by_kind_share": {k: round(v / total_us, 4) for k, v in
                          sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "kind": kind_of(n), "ms_per_step": us / 1e3 / active,
                         "share": round(us / total_us, 4), "calls_per_step": c / active,
                         "launched_by": launchers.get(n, [])}
                        for n, us, c in device_us[:args.top]],
        "host_profiled_steps": HOST_STEPS,
        "host_top_self_time": _host_top(stepper.host, HOST_STEPS, args.top),
        "compiled_graphs": dict(torch._dynamo.utils.counters["stats"]),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": versions(),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("step_seconds", "gpu_busy_seconds_per_step",
                                             "kernel_launches_per_step", "by_kind_share")},
                     indent=1))
    for h in report["host_top_self_time"][:12]:
        print(f"host {h['self_ms_per_step']:8.2f} ms self {h['cum_ms_per_step']:8.2f} ms cum "
              f"{h['calls_per_step']:8.0f}x {h['function']}")
    for k in report["top_kernels"][:15]:
        print(f"{k['ms_per_step']:8.2f} ms {k['calls_per_step']:6.0f}x {k['kind']:22s} "
              f"{k['name'][:90]}")
        for who in k["launched_by"][:2]:
            print(f"{'':12s}<- {who['us'] / 1e3 / active:7.2f} ms {' <- '.join(who['chain'])[:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
