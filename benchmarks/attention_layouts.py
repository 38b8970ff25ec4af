"""Varlen attention over a packed micro-batch: what the layout and the kernel's grid cost.

    python benchmarks/attention_layouts.py --data .benchdata/dolly_dev.jsonl \
        --out attention_layouts_h200.json

Issue #15: FlashAttention-2's varlen kernels take ~17 % of a 160-row step's GPU time on the
H200 (profile_step_h200_160rows_absmax.json: forward 0.65 ms and backward 1.6 ms a layer call)
for attention that is ~1 % of the step's arithmetic (Dolly rows average ~170 tokens). The
kernel's grid is (ceil(max_seqlen / 128), rows, heads): `train` passes the bin length (1,024) as
the longest row, so for a 170-token row 6 of its 8 blocks start, find nothing to do and exit,
and a bin's padding tail is a "row" attended like the others. This times, on TinyLlama's heads
(32 query, 4 K/V, dim 64) and a micro-batch of Dolly rows as `train` packs them:
- `bins_max_bin`: what `train` runs (the packed bins, flattened; longest = the bin length);
- `bins_max_row`: the same call with the longest segment's length instead;
- `sorted_one_call`: the rows end to end, longest first, no bins and no padding, one call;
- `sorted_buckets_*`: that layout, one call per group of rows of similar length, each with its
  own longest row (the outputs, and in backward the gradients, concatenated: that copy is timed);
- `flex_doc_mask`, `flex_doc_mask_64`: FlexAttention (compiled) over the bins' tokens with a
  document mask, in its default blocks and in 64 x 64 ones.
Outputs are checked against the reference of the same layout (`max_abs_diff`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from attention_kernels import DIM, HEADS, KV_HEADS, dolly_lengths, flash2, timed
from fixtures import write_result

BIN = 1024
SCALE = DIM ** -0.5


def bins_layout(lengths: list[int]) -> list[int]:
    """Segment lengths of the flattened bins as the packed collator lays them: each bin's rows,
    then its padding tail as one more segment."""
    from qlora_lab.data import bin_members

    segments = []
    for members in bin_members(lengths, BIN):
        used = 0
        for i in sorted(members):
            segments.append(lengths[i])
            used += lengths[i]
        if used < BIN:
            segments.append(BIN - used)
    return segments


def bounds_of(segments: list[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(segments).cumsum(0)), dtype=torch.int32,
                        device="cuda")


def inputs(tokens: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(tokens, HEADS, DIM), (tokens, KV_HEADS, DIM), (tokens, KV_HEADS, DIM),
              (tokens, HEADS, DIM)]
    return [torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]


def one_call(segments: list[int], longest: int):
    bounds = bounds_of(segments)
    return lambda q, k, v: flash2(q, k, v, bounds, longest)


def bucketed(segments: list[int], edges: list[int]):
    """Segments (already sorted longest first) grouped by the smallest edge that holds them;
    one kernel call per group over its contiguous tokens."""
    groups = []  # (first token, last token, bounds from 0, longest)
    start = 0
    i = 0
    while i < len(segments):
        edge = min(e for e in edges if e >= segments[i])
        j = i
        while j < len(segments) and min(e for e in edges if e >= segments[j]) == edge:
            j += 1
        part = segments[i:j]
        groups.append((start, start + sum(part), bounds_of(part), max(part)))
        start += sum(part)
        i = j
    return groups


class Buckets:
    """Forward over each group's slice, outputs concatenated; backward the same per group with
    the gradients concatenated, as one op in training would return them."""

    def __init__(self, groups):
        self.groups = groups

    def forward(self, q, k, v):
        self.parts = []
        outs = []
        for s, e, b, m in self.groups:
            leaves = [t[s:e].detach().requires_grad_(True) for t in (q, k, v)]
            out = flash2(*leaves, b, m)
            self.parts.append((leaves, out))
            outs.append(out)
        return torch.cat(outs)

    def backward(self, grad):
        for (s, e, _, _), (leaves, out) in zip(self.groups, self.parts):
            out.backward(grad[s:e])
        return [torch.cat([leaves[i].grad for leaves, _ in self.parts]) for i in range(3)]


def time_plain(op, q, k, v, grad, iters):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def step():
        for t in leaves:
            t.grad = None
        op(*leaves).backward(grad)
        return [t.grad for t in leaves]

    out = op(*leaves).detach()
    grads = step()
    return (timed(lambda: op(*leaves), iters), timed(step, iters),
            [out.float()] + [g.float() for g in grads])


def time_buckets(groups, q, k, v, grad, iters):
    b = Buckets(groups)

    def step():
        b.forward(q, k, v)
        return b.backward(grad)

    with torch.no_grad():
        fwd = timed(lambda: Buckets(groups).forward(q, k, v), iters)
    out = b.forward(q, k, v).detach()
    grads = b.backward(grad)
    return fwd, timed(step, iters), [out.float()] + [g.float() for g in grads]


def flex_case(segments, q, k, v, grad, iters, block: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(segments), device="cuda"),
                                  torch.tensor(segments, device="cuda"))
    tokens = doc.numel()

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    made = time.time()
    sizes = {} if block is None else {"BLOCK_SIZE": block}
    options = None if block is None else {"BLOCK_M": block, "BLOCK_N": block}
    block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device="cuda", **sizes)
    torch.cuda.synchronize()
    mask_s = time.time() - made
    flex = torch.compile(flex_attention)

    def op(a, b, c):
        out = flex(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None],
                   block_mask=block_mask, scale=SCALE, enable_gqa=True,
                   kernel_options=options)
        return out[0].transpose(0, 1)

    fwd, both, got = time_plain(op, q, k, v, grad, iters)
    return fwd, both, got, mask_s


def diff(a, b):
    return round(max(float((x - y).abs().max()) for x, y in zip(a, b)), 4)


def case(lengths: list[int], iters: int) -> dict:
    result = {"rows": len(lengths), "real_tokens": sum(lengths),
              "longest_row": max(lengths)}
    segments = bins_layout(lengths)
    result["bins"] = sum(segments) // BIN
    result["longest_segment"] = max(segments)
    q, k, v, grad = inputs(sum(segments), 0)
    ref = None
    for name, longest in (("bins_max_bin", BIN), ("bins_max_row", max(segments))):
        fwd, both, got = time_plain(one_call(segments, longest), q, k, v, grad, iters)
        ref = ref or got
        result[name] = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3),
                        "max_abs_diff": diff(got, ref)}
        print(name, result[name], flush=True)
    for name, block in (("flex_doc_mask", None), ("flex_doc_mask_64", 64)):
        try:
            fwd, both, got, mask_s = flex_case(segments, q, k, v, grad, iters, block)
            result[name] = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3),
                            "block_mask_s": round(mask_s, 3), "max_abs_diff": diff(got, ref)}
        except Exception as exc:  # noqa: BLE001 - a kernel this host cannot run is a result
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(name, result[name], flush=True)

    rows = sorted(lengths, reverse=True)
    q, k, v, grad = inputs(sum(rows), 1)
    fwd, both, ref = time_plain(one_call(rows, max(rows)), q, k, v, grad, iters)
    result["sorted_one_call"] = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3)}
    print("sorted_one_call", result["sorted_one_call"], flush=True)
    for name, edges in (("sorted_buckets_4", [128, 256, 512, BIN]),
                        ("sorted_buckets_8", [64, 128, 192, 256, 384, 512, 768, BIN]),
                        ("sorted_buckets_128s", list(range(128, BIN + 1, 128)))):
        groups = bucketed(rows, edges)
        fwd, both, got = time_buckets(groups, q, k, v, grad, iters)
        result[name] = {"edges": edges, "calls": len(groups), "forward_ms": round(fwd, 3),
                        "forward_backward_ms": round(both, 3), "max_abs_diff": diff(got, ref)}
        print(name, result[name], flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    started = time.time()
    lengths = dolly_lengths(Path(args.data), args.rows * args.batches)
    report = {"what": __doc__.splitlines()[0], "command": "python " + " ".join(sys.argv),
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "bin": BIN},
              "micro_batches": [case(lengths[i * args.rows:(i + 1) * args.rows], args.iters)
                                for i in range(args.batches)]}
    write_result(args.out, report, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
