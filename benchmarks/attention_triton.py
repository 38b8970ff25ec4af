"""qlora-lab's Triton varlen attention against FlashAttention-2's, per layer call, on this GPU.

    python benchmarks/attention_triton.py --data .benchdata/dolly_dev.jsonl \
        --out attention_triton_h200.json

Issue #15: FlashAttention-2's varlen kernels (what `varlen` attention runs through torch's
`varlen_attn`) tile rows in 128 x 128 blocks and take ~17 % of a 160-row Dolly step's GPU time
for ~1 % of its arithmetic (attention_layouts_h200.json). `qlora_lab.triton_attention` tiles
in smaller blocks and launches only tiles that hold tokens. This times both on TinyLlama's heads
(32 query, 4 K/V, dim 64), forward and forward + backward, on micro-batches of 160 Dolly rows
laid out as `train` packs them (bins of 1,024 tokens, each bin's padding tail one more row) and
on 32 full rows of 1,024 tokens, for the default tiles and a few others. Each candidate's output
and gradients are compared with FlashAttention-2's and with an fp32 reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from attention_kernels import DIM, HEADS, KV_HEADS, dolly_lengths, timed
from attention_layouts import BIN, bins_layout, bounds_of
from fixtures import write_result

from qlora_lab import triton_attention as ta

# Candidate tiles by head dim (None: tiles_for's default), from --tiles. Session 26's calls
# timed 64 x 64 tiles with 3 stages, 32 x 32 and 128 x 128 with 8 warps (all slower; so were
# one program per query head summing dK/dV atomically, and non-square tiles: 32 x 64 at dim
# 128 computed wrong gradients on the H200's triton 3.6 though exact in the interpreter).
TILES: dict[int, list] = {64: [None], 128: [None]}


def run(op, q, k, v, grad, iters):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def step():
        for t in leaves:
            t.grad = None
        op(*leaves).backward(grad)

    with torch.no_grad():
        fwd = timed(lambda: op(*leaves), iters)
    both = timed(step, iters)
    out = op(*leaves)
    for t in leaves:
        t.grad = None
    out.backward(grad)
    return fwd, both, [out.detach().float()] + [t.grad.float() for t in leaves]


def kernel_ms(op, q, k, v, grad) -> dict:
    """GPU milliseconds per kernel name for one forward + backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    op(*leaves).backward(grad)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op(*leaves).backward(grad)
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name[:60]
            times[name] = times.get(name, 0.0) + e.device_time / 1000.0
    return {k: round(v, 3) for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:8]}


def diff(a, b):
    return round(max(float((x - y).abs().max()) for x, y in zip(a, b)), 5)


def reference(q, k, v, bounds, grad, scale):
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    out = ta.reference(*leaves, bounds, scale)
    out.backward(grad.float())
    return [out.detach()] + [t.grad for t in leaves]


def case(segments: list[int], iters: int, seed: int, heads: int = HEADS,
         kv_heads: int = KV_HEADS, dim: int = DIM) -> dict:
    from qlora_lab import attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = sum(segments)
    q, k, v, grad = (torch.randn(tokens, h, dim, device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for h in (heads, kv_heads, kv_heads, heads))
    bounds = bounds_of(segments)
    scale = dim ** -0.5
    call = attention.plan_kernel(grouped=True, choice="flash")

    def flash(a, b, c):
        return attention._varlen_kernel(a, b, c, bounds, BIN, scale, call)

    result = {"segments": len(segments), "tokens": tokens,
              "heads": [heads, kv_heads, dim]}
    fwd, both, flash_got = run(flash, q, k, v, grad, iters)
    exact = reference(q, k, v, bounds, grad, scale)
    result["flash2_varlen"] = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3),
                               "max_abs_diff_vs_fp32": diff(flash_got, exact),
                               "kernels_ms": kernel_ms(flash, q, k, v, grad)}
    print("flash2_varlen", result["flash2_varlen"], flush=True)
    for tiles in TILES[dim]:
        ta.TILES_OVERRIDE = tiles
        shown = ta.tiles_for(dim)
        name = f"triton_{shown.block}x{shown.block}_w{shown.warps}_s{shown.stages}"
        if hasattr(shown, "fwd_rows"):  # since session 27: the forward's tile rows
            name += f"_r{shown.fwd_rows}"
        try:
            fwd, both, got = run(lambda a, b, c: ta.varlen_attention(a, b, c, bounds, scale),
                                 q, k, v, grad, iters)
            result[name] = {"default": tiles is None, "forward_ms": round(fwd, 3),
                            "forward_backward_ms": round(both, 3),
                            "max_abs_diff_vs_flash2": diff(got, flash_got),
                            "max_abs_diff_vs_fp32": diff(got, exact),
                            "kernels_ms": kernel_ms(
                                lambda a, b, c: ta.varlen_attention(a, b, c, bounds, scale),
                                q, k, v, grad)}
        except Exception as exc:  # noqa: BLE001 - a launch this GPU cannot run is a result
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, result[name], flush=True)
    ta.TILES_OVERRIDE = None
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tiles", default="", help="more tiles to time, as Tiles' fields: "
                        "'64,4,2,128;32' (block, warps, stages, forward rows), for every dim")
    parser.add_argument("--skip-dim128", action="store_true")
    args = parser.parse_args()
    for spec in filter(None, args.tiles.split(";")):
        for dim in TILES:
            TILES[dim].append(ta.Tiles(*(int(x) for x in spec.split(","))))
    started = time.time()
    lengths = dolly_lengths(Path(args.data), args.rows * args.batches)
    cases = {}
    for i in range(args.batches):
        print(f"dolly micro-batch {i}", flush=True)
        cases[f"dolly_bins_{i}"] = case(
            bins_layout(lengths[i * args.rows:(i + 1) * args.rows]), args.iters, i)
    print("full rows", flush=True)
    cases["full_rows_32x1024"] = case([BIN] * 32, args.iters, 7)
    if not args.skip_dim128:
        print("dolly micro-batch 0, heads of 128 (32 query, 8 K/V)", flush=True)
        cases["dolly_bins_0_dim128"] = case(bins_layout(lengths[:args.rows]), args.iters, 0,
                                            32, 8, 128)
    report = {"what": __doc__.splitlines()[0], "command": "python " + " ".join(sys.argv),
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "bin": BIN},
              "cases": cases}
    write_result(args.out, report, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
