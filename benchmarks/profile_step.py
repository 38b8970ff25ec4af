"""Where one training step of qlora-lab's path spends its GPU time: a torch.profiler breakdown.

    python benchmarks/profile_step.py --model DIR --data dolly.jsonl --out profile.json \
        [--set train.micro_batch_size=16 ...]

Builds the run exactly as `qlora-lab train` does (train.setup_training), profiles two steps after
two warm-up steps (then three more under Python's profiler alone: host time by function, and
two under torch's sync debug mode: every place the host waited for the GPU), and writes the
kernels with the most CUDA time plus a breakdown by kind
(4-bit dequantize, matmuls, attention, Liger kernels, elementwise/copies) and the step's wall
time, so a perf change can aim at what dominates. `gpu_idle` (CUDA only) reads the profiled
steps' timeline: how long the GPU ran nothing between kernels, and which host operators ran
during the longest gaps (the step's host work the GPU waits for). Each top kernel also lists
the operator chains
that launched it (innermost op, its parents; with input shapes), so a kernel like a fill or a
copy can be traced to the code that asked for it. The same settings as `bench` (no eval, no
saves, grad_accum 1 unless --set says otherwise, the emulated 8 GiB cap).

`--gpu-only` records the GPU's kernels alone (no host operators, shapes or Python profiler,
whose cost per operator made the profiled steps host-bound where the real ones were not) over
`--active` steps, and reports where the GPU idled: the gaps between kernels, by the kernels on
either side of them (`idle_between`), so the step's host-bound stretches can be placed.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import re
import sys
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch._dynamo  # its counters: how many graphs the compiled layers made
from fixtures import GIB, apply_memory_cap, versions
from transformers import TrainerCallback

from qlora_lab.bench import step_timer
from qlora_lab.config import config_from_dict, parse_overrides
from qlora_lab.train import setup_training

HOST_STEPS = 3  # after the GPU profile: Python's profiler alone (torch.profiler slows Python)
SYNC_STEPS = 2  # then steps under torch's sync debug mode: where the host waits for the GPU

# Substrings of kernel names, first match wins; anything else is "other".
KINDS = [
    ("dequantize 4-bit", ("dequantize", "kDequantize", "kgemm_4bit")),
    # qlora-lab's Triton kernels are named attention_* (since session 27; "fwd", "bwd_dkdv",
    # "bwd_dq" before, which this counted as "other")
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
    """Steps the profiler and runs Python's own profiler over the steps after `host_from` (the
    GPU idled most of a 32-row step: host work decides, and torch.profiler shows only
    operators, not the Python between them). Steps are timed by bench's step_timer (CUDA
    events, no synchronize: a sync per step would put a stall into the steps profiled)."""

    def __init__(self, prof, host_from: int, sync_from: int):
        self.prof, self.host_from, self.sync_from = prof, host_from, sync_from
        self.host = cProfile.Profile()
        self.syncs = SyncSites()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.sync_from:
            if torch.cuda.is_available():
                self.syncs.start()
        elif state.global_step >= self.host_from:
            self.host.enable()

    def on_step_end(self, args, state, control, **kwargs):
        self.host.disable()
        self.syncs.stop()
        self.prof.step()


class SyncSites:
    """Where the host waited for the GPU: torch's sync debug mode warns at every synchronizing
    CUDA call (a `.item()`, a blocking copy, an explicit synchronize); each warning's Python
    stack is recorded, its innermost frames outside torch named. Every such wait drains the
    GPU's queue, and the GPU idles until the host launches work again."""

    def __init__(self):
        self.sites: dict[tuple, int] = defaultdict(int)
        self._saved = None

    def start(self) -> None:
        self._saved = (warnings.showwarning, warnings.filters[:])
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._saved is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self._saved
        self._saved = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and not f.filename.endswith("warnings.py")]
        chain = tuple(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in frames[-4:])
        self.sites[chain[::-1]] += 1

    def report(self, steps: int) -> list[dict]:
        return [{"per_step": round(n / steps, 2), "where": list(chain)}
                for chain, n in sorted(self.sites.items(), key=lambda kv: -kv[1])]


def _walk(spans: list[tuple]):
    """For each kernel of a sorted timeline ((start, end, ...) in microseconds): the kernel,
    the idle time before it (since every earlier kernel ended; 0 for the first) and its own
    time that no earlier kernel covers. The sums of the two are a window's idle and busy time."""
    end = spans[0][0]
    for kernel in spans:
        s, e = kernel[:2]
        yield kernel, max(0.0, s - end), max(0.0, e - max(s, end))
        end = max(end, e)


def idle_gaps(kernels: list[tuple[float, float]], host_ops: list[tuple[float, float, str]],
              min_gap_us: float = 200.0, top: int = 24) -> dict:
    """When the GPU ran nothing, and what the host was doing then.

    kernels: (start, end) of every kernel, in microseconds; host_ops: (start, end, name) of the
    host's top-level operators on the same clock (the profiler aligns them). A gap is time
    between the end of all kernels so far and the next kernel's start, at least `min_gap_us`
    long; for the `top` longest, the host operators that overlap it, longest overlap first.
    """
    if not kernels:
        return {"window_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps": 0, "longest": []}
    spans = sorted(kernels)
    busy, gaps = 0.0, []
    for (s, _), gap, extension in _walk(spans):
        busy += extension
        if gap >= min_gap_us:
            gaps.append((s - gap, s))
    window = max(e for _, e in spans) - spans[0][0]
    longest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        overlap = defaultdict(float)
        for s, e, name in host_ops:
            if s < b and e > a:
                overlap[name] += min(b, e) - max(a, s)
        longest.append({"us": round(b - a, 1), "host_ops": [
            {"name": n[:120], "us": round(us, 1)}
            for n, us in sorted(overlap.items(), key=lambda kv: -kv[1])[:5]]})
    return {"window_us": round(window, 1), "busy_us": round(busy, 1),
            "idle_us": round(window - busy, 1), "gaps": len(gaps),
            "idle_in_gaps_us": round(sum(b - a for a, b in gaps), 1), "longest": longest}


def _timeline(prof) -> tuple[list, list]:
    """Kernel spans and top-level host operator spans of the profiled steps.

    Top level: directly under the profiler's step range (every operator of a step has that
    parent, so "no parent" found none on the H200: profile_step_h200_160rows_idle.json). The
    ranges the optimizer and compiled graphs draw count as host work here: they say what ran."""
    kernels, host = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            if not _annotation(e):
                kernels.append((e.time_range.start, e.time_range.end))
            continue
        parent = e.cpu_parent
        if e.name.startswith("ProfilerStep") or not (
                parent is None or parent.name.startswith("ProfilerStep")):
            continue
        host.append((e.time_range.start, e.time_range.end, e.name))
    return kernels, host


def _base_name(name: str) -> str:
    """A kernel's name without the compiler's numbering (triton_poi_fused_add_12 -> ..._add)."""
    return re.sub(r"_\d+$", "", name)[:90]


# Where a step's phases begin on the GPU's timeline, by kernel name (first match moves on):
# the embedding's gather starts the forward, the first backward kernel (the loss's, an
# attention backward, SwiGLU's) the backward, the clipping norm or the optimizer's
# multi-tensor kernels the step boundary (optimizer, zero_grad, the next micro-batch). With
# gradient accumulation a micro-batch's forward after another's backward stays "backward":
# read the phases of steps of one micro-batch (bench's and this script's default).
PHASES = {"boundary": ("forward", ("gather", "indexSelect", "embedding")),
          "forward": ("backward", ("bwd", "backward")),
          "backward": ("boundary", ("multi_tensor_apply",))}


def idle_between(kernels: list[tuple[float, float, str]], steps: int,
                 min_gap_us: float = 20.0, top: int = 30) -> dict:
    """GPU idle on a kernels-only timeline ((start, end, name) in microseconds): the window,
    busy and idle time per step, and the gaps of at least `min_gap_us` summed by the
    (previous, next) kernel pair, largest first. Gaps below it are the launch-to-launch time
    of a busy queue; they are counted in `small_gaps_us_per_step`. `phases`: busy and idle
    time per step in the step's forward, backward and boundary (`PHASES`; a gap counts in
    the phase of the kernel before it, where the GPU ran out of work): the phase whose idle
    is large is where the host, not the GPU, sets the pace."""
    if not kernels:
        return {}
    spans = sorted(kernels)
    busy, small = 0.0, 0.0
    pairs: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])
    phase_time = {p: [0.0, 0.0] for p in PHASES}  # busy, idle

    def phase_of(name: str, phase: str) -> str:
        following, marks = PHASES[phase]
        return following if any(m in name for m in marks) else phase

    last, phase, end = None, "boundary", float("-inf")
    for (s, e, name), gap, extension in _walk(spans):
        if gap > 0:
            phase_time[phase][1] += gap  # the phase the GPU ran out of work in
            if gap >= min_gap_us:
                slot = pairs[(_base_name(last), _base_name(name))]
                slot[0] += gap
                slot[1] += 1
            else:
                small += gap
        phase = phase_of(name, phase)
        busy += extension
        phase_time[phase][0] += extension
        if e >= end:
            end, last = e, name
    window = end - spans[0][0]
    return {"window_ms_per_step": round(window / 1e3 / steps, 2),
            "busy_ms_per_step": round(busy / 1e3 / steps, 2),
            "idle_ms_per_step": round((window - busy) / 1e3 / steps, 2),
            "small_gaps_ms_per_step": round(small / 1e3 / steps, 2),
            "phases": {p: {"busy_ms_per_step": round(b / 1e3 / steps, 2),
                           "idle_ms_per_step": round(i / 1e3 / steps, 2)}
                       for p, (b, i) in phase_time.items()},
            "gaps": [{"after": a, "before": b, "ms_per_step": round(us / 1e3 / steps, 3),
                      "count_per_step": round(n / steps, 1)}
                     for (a, b), (us, n) in sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]]}


def _step_lists(marks: list[tuple[float, int]]) -> tuple[list, list]:
    """Each step's seconds and real tokens from step_timer's marks."""
    pairs = list(itertools.pairwise(marks))
    return ([round(b[0] - a[0], 4) for a, b in pairs], [b[1] - a[1] for a, b in pairs])


def gpu_only(session, timer, args) -> dict:
    """Kernels alone over `args.active` steps after `args.skip_steps` + 1 warm-up step."""
    schedule = torch.profiler.schedule(wait=args.skip_steps, warmup=1, active=args.active,
                                       repeat=1)

    class Step(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            prof.step()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA],
                                schedule=schedule) as prof:
        session.trainer.add_callback(timer)
        session.trainer.add_callback(Step())
        session.trainer.train()
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not _annotation(e)]
    return idle_between(kernels, args.active)


def _host_top(host: cProfile.Profile, steps: int, top: int) -> list[dict]:
    """Python functions by their own time per step (tottime), with cumulative time."""
    stats = pstats.Stats(host).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    def where(key) -> str:
        file, line, name = key
        return f"{Path(file).name}:{line}({name})"

    # Each function's heaviest callers too: a function called thousands of times a step (a
    # module walk, say) is only actionable once the code asking for it is known.
    return [{"function": where(key), "self_ms_per_step":
             round(tt * 1e3 / steps, 2), "cum_ms_per_step": round(ct * 1e3 / steps, 2),
             "calls_per_step": round(nc / steps, 1),
             "callers": [{"caller": where(c), "calls_per_step": round(v[1] / steps, 1),
                          "cum_ms_per_step": round(v[3] * 1e3 / steps, 2)}
                         for c, v in sorted(callers.items(), key=lambda kv: -kv[1][3])[:3]]}
            for key, (_, nc, tt, ct, callers) in rows]


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
    parser.add_argument("--gpu-only", action="store_true",
                        help="kernels alone, no host profiling: where the GPU idles")
    parser.add_argument("--active", type=int, default=2, help="steps profiled (--gpu-only)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()  # on CPU it runs too (a smoke test of the script)
    if args.gpu_only and not cuda:
        parser.error("--gpu-only records CUDA kernels, and this machine has no CUDA device")
    if cuda:
        # The allocator `train` runs with (train.allocator_defaults): the cap below starts
        # CUDA, after which train can no longer set it. Without it the full-rows profile ran
        # out of the 8 GiB cap with 1.6 GiB reserved but unallocated (session 20).
        from qlora_lab.train import allocator_defaults

        allocator_defaults()
        apply_memory_cap(int(args.memory_cap_gib * GIB))

    wait, warmup, active = args.skip_steps, 1, (args.active if args.gpu_only else 2)
    after = 0 if args.gpu_only else 1 + HOST_STEPS + SYNC_STEPS
    base = {"model": {"name": args.model},
            "data": {"source": args.data, "eval_fraction": 0.0, "max_seq_len": 1024},
            "train": {"output_dir": "/tmp/profile-step",
                      "max_steps": wait + warmup + active + after,
                      "save_steps": 1000, "grad_accum_steps": 1, "tensorboard": False}}
    cfg = config_from_dict(parse_overrides(args.set), config_from_dict(base))
    session = setup_training(cfg, overwrite=True)
    timer = step_timer("cuda" if cuda else "cpu")
    if args.gpu_only:
        idle = gpu_only(session, timer, args)
        steps_s, steps_tokens = _step_lists(timer.marks)
        report = {"command": " ".join(sys.argv), "settings": args.set, "profiled_steps": active,
                  "step_seconds": steps_s, "step_real_tokens": steps_tokens, "gpu_idle": idle,
                  "gpu": torch.cuda.get_device_name(), "versions": versions()}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({k: v for k, v in idle.items() if k != "gaps"}))  # phases too
        for g in idle.get("gaps", [])[:20]:
            print(f"{g['ms_per_step']:8.3f} ms {g['count_per_step']:6.1f}x  {g['after'][:60]} -> "
                  f"{g['before'][:60]}")
        return 0
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active,
                                         repeat=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA],
                                schedule=schedule, record_shapes=True) as prof:
        host_from = wait + warmup + active
        stepper = _Stepper(prof, host_from=host_from, sync_from=host_from + 1 + HOST_STEPS)
        session.trainer.add_callback(timer)
        session.trainer.add_callback(stepper)
        session.trainer.train()
    # Every step's time (the profiled ones are slowed by the profiler, the last three by
    # Python's), and its real tokens.
    steps_s, steps_tokens = _step_lists(timer.marks)

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
        "step_real_tokens": steps_tokens,
        "gpu_busy_seconds_per_step": total_us / 1e6 / active,
        # Over the profiled steps: kernel time on the GPU's timeline against the window they
        # span, the gaps between kernels, and the host's operators during the longest gaps.
        "gpu_idle": idle_gaps(*_timeline(prof)) if cuda else None,
        "kernel_launches_per_step": launches / active,
        "by_kind_share": {k: round(v / total_us, 4) for k, v in
                          sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "kind": kind_of(n), "ms_per_step": us / 1e3 / active,
                         "share": round(us / total_us, 4), "calls_per_step": c / active,
                         "launched_by": launchers.get(n, [])}
                        for n, us, c in device_us[:args.top]],
        "host_profiled_steps": HOST_STEPS,
        "host_top_self_time": _host_top(stepper.host, HOST_STEPS, args.top),
        "sync_steps": SYNC_STEPS,
        # Each place the host waited for the GPU in those steps, innermost frame first.
        "host_waits": stepper.syncs.report(SYNC_STEPS) if cuda else None,
        "compiled_graphs": dict(torch._dynamo.utils.counters["stats"]),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": versions(),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("step_seconds", "gpu_busy_seconds_per_step",
                                             "kernel_launches_per_step", "by_kind_share",
                                             "gpu_idle")},
                     indent=1))
    for h in report["host_top_self_time"][:12]:
        print(f"host {h['self_ms_per_step']:8.2f} ms self {h['cum_ms_per_step']:8.2f} ms cum "
              f"{h['calls_per_step']:8.0f}x {h['function']}")
    for w in report["host_waits"] or []:
        print(f"wait {w['per_step']:6.2f}x/step {' <- '.join(w['where'])[:220]}")
    for k in report["top_kernels"][:15]:
        print(f"{k['ms_per_step']:8.2f} ms {k['calls_per_step']:6.0f}x {k['kind']:22s} "
              f"{k['name'][:90]}")
        for who in k["launched_by"][:2]:
            print(f"{'':12s}<- {who['us'] / 1e3 / active:7.2f} ms {' <- '.join(who['chain'])[:200]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
