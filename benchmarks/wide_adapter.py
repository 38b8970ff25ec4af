"""LoRA adapters folded into the base matmul along K, padded to a full tile, in compiled code.

    python benchmarks/wide_adapter.py --out wide_adapter_h200.json

Issue #15, session 21. Session 20 (adapter_matmuls_h200.json) timed [x | x A^T] [W | sB]^T at
K = in + 16 and found it no faster than fusedlora's product-then-accumulate: cuBLAS ran K =
2,064 19 % slower than K = 2,048. This times the same fold with K padded to a multiple of 64
(the rank columns, then zeros), first as bare matmuls, then as compiled forward + backward of
the groups a decoder layer has, with the producer of x in the same compiled code (so inductor
can write x straight into the wide buffer):
- `gate_up`: RMSNorm -> gate and up -> silu(gate) * up; `wide` shares one wide x (two rank
  slots of 16) between both projections;
- `qkv`: RMSNorm -> q, k, v; `wide` shares one wide x (three slots);
- `down`: silu(gate) * up -> down; `wide` K = 5,632 + 64.
Each group runs `product` (what fusedlora.LoraLinear4bit computes: x A^T, (x A^T)(sB)^T, then
x W^T accumulated onto it; backward dy sB, then (dy sB) A with dy W accumulated), `wide`
(forward [x | x A^T | 0] W'^T with W' = [W | sB in its slot | 0]; backward dy W' gives the
base gradient and dy sB in one matmul, accumulated over the group, then the adapters' part of
dx added once for the group), `wide_fwd` (the wide forward, product backward) and, for q/k/v,
`wide_each` (each projection its own wide x, as without a joint q/k/v call). Weights are
bf16 (the 4-bit dequantize is the same in every variant and left out). The decoder layer runs
each forward twice (checkpointed) and each backward once: `train_ms` = 2 forward + backward.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch
from attention_kernels import timed
from fixtures import write_result

from qlora_lab.fusedlora import _accumulate
from qlora_lab.memory import rank_columns

TOKENS, HIDDEN, INTER, KV, RANK, SCALE = 29_696, 2048, 5632, 256, 16, 2.0


def rand(*shape, scale=1.0, grad=False):
    t = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale
    return t.requires_grad_(grad)


class Product(torch.autograd.Function):
    """fusedlora.LoraLinear4bit's arithmetic on a bf16 base."""

    @staticmethod
    def forward(ctx, x, w, a, b):
        xa = x @ a.t()
        out = xa @ (b * SCALE).t()
        _accumulate(out, x, w.t())
        ctx.save_for_backward(x, xa, w, a, b)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, xa, w, a, b = ctx.saved_tensors
        dxa = dy @ (b * SCALE)
        dx = dxa @ a
        _accumulate(dx, dy, w)
        return dx, None, dxa.t() @ x, dy.t() @ (xa * SCALE)


class Wide(torch.autograd.Function):
    """A group of projections over one x: forward [x | x A^T | 0] W'^T, one matmul each.

    `wide_backward`: dy W' for every projection accumulated into one (tokens x in + pad)
    gradient whose slot columns are dy sB; else each projection's dy sB and dy W as Product."""

    @staticmethod
    def forward(ctx, x, a_stack, wide_backward, *wb):
        ws, bs = wb[0::2], wb[1::2]
        tokens, d_in = x.shape
        rank_total = a_stack.shape[0]
        pad = rank_columns(rank_total)
        xa = x @ a_stack.t()
        xw = torch.cat([x, xa, x.new_zeros(tokens, pad - rank_total)], 1)
        outs, wides, at = [], [], 0
        for w, b in zip(ws, bs):
            r = b.shape[1]
            wide = torch.cat([w, w.new_zeros(w.shape[0], at), b * SCALE,
                              w.new_zeros(w.shape[0], pad - at - r)], 1)
            outs.append(xw @ wide.t())
            wides.append(wide)
            at += r
        ctx.wide_backward = wide_backward
        ctx.d_in, ctx.ranks = d_in, [b.shape[1] for b in bs]
        ctx.save_for_backward(xw, a_stack, *ws, *bs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        xw, a_stack, *wb = ctx.saved_tensors
        n = len(dys)
        ws, bs = wb[:n], wb[n:]
        d_in, rank_total = ctx.d_in, a_stack.shape[0]
        pad = rank_columns(rank_total)
        x, xa = xw[:, :d_in], xw[:, d_in:d_in + rank_total]
        grads_b, at = [], 0
        if ctx.wide_backward:
            dxw = None
            for dy, w, b in zip(dys, ws, bs):
                r = b.shape[1]
                wide = torch.cat([w, w.new_zeros(w.shape[0], at), b * SCALE,
                                  w.new_zeros(w.shape[0], pad - at - r)], 1)
                if dxw is None:
                    dxw = dy @ wide
                else:
                    _accumulate(dxw, dy, wide)
                grads_b.append(dy.t() @ (xa[:, at:at + r] * SCALE))
                at += r
            dxa = dxw[:, d_in:d_in + rank_total]
            dx = torch.addmm(dxw[:, :d_in], dxa, a_stack)
        else:
            dxa = torch.cat([dy @ (b * SCALE) for dy, b in zip(dys, bs)], 1)
            dx = dxa @ a_stack
            for dy, w, b in zip(dys, ws, bs):
                r = b.shape[1]
                _accumulate(dx, dy, w)
                grads_b.append(dy.t() @ (xa[:, at:at + r] * SCALE))
                at += r
        grad_a = dxa.t() @ x
        out = [dx, grad_a, None]
        for gb in grads_b:
            out += [None, gb]
        return tuple(out)


def _only(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def rms_norm(h, gamma):
    var = h.float().pow(2).mean(-1, keepdim=True)
    return (h.float() * torch.rsqrt(var + 1e-5)).to(h.dtype) * gamma


def group_case(name: str, variant: str):
    """(compiled function of the group's input, its input, parameters it differentiates)."""
    torch._dynamo.reset()  # each case is its own `run`: no recompile limit across cases
    if name == "down":
        d_in, outs = INTER, [HIDDEN]
    elif name == "gate_up":
        d_in, outs = HIDDEN, [INTER, INTER]
    else:
        d_in, outs = HIDDEN, [HIDDEN, KV, KV]
    ws = [rand(n, d_in, scale=0.02) for n in outs]
    as_ = [rand(RANK, d_in, scale=0.02, grad=True) for _ in outs]
    bs = [rand(n, RANK, scale=0.02, grad=True) for n in outs]
    gamma = rand(d_in, scale=0.1) + 1
    if name == "down":
        inputs = [rand(TOKENS, INTER, grad=True), rand(TOKENS, INTER, grad=True)]
    else:
        inputs = [rand(TOKENS, d_in, grad=True)]

    def producer(*xs):
        if name == "down":
            return torch.nn.functional.silu(xs[0]) * xs[1]
        return rms_norm(xs[0], gamma)

    def consumer(ys):
        if name == "gate_up":
            return torch.nn.functional.silu(ys[0]) * ys[1]
        return ys[0] if len(ys) == 1 else torch.cat(ys, 1)

    def run(*xs):
        x = producer(*xs)
        if variant == "product":
            ys = [Product.apply(x, w, a, b) for w, a, b in zip(ws, as_, bs)]
        elif variant == "wide_each":  # each projection its own wide x
            ys = [_only(Wide.apply(x, a, True, w, b)) for w, a, b in zip(ws, as_, bs)]
        else:
            wb = [t for pair in zip(ws, bs) for t in pair]
            ys = Wide.apply(x, torch.cat(as_), variant == "wide", *wb)
        return consumer(ys)

    return torch.compile(run, fullgraph=True, dynamic=False), inputs, as_ + bs


def measure(fn, inputs, params, iters: int) -> tuple[dict, torch.Tensor, list]:
    """One case's timings, its output and its gradients (inputs first, then parameters)."""
    out = fn(*inputs)
    grad_out = torch.randn_like(out)

    def step():
        fn(*inputs).backward(grad_out)

    def forward():  # with the graph built, as the recomputation inside backward runs it
        fn(*inputs)

    step()
    grads = [p.grad.float().clone() for p in list(inputs) + params]
    for p in list(inputs) + params:
        p.grad = None
    fwd_ms, step_ms = timed(forward, iters), timed(step, iters)
    return ({"forward_ms": round(fwd_ms, 3), "forward_backward_ms": round(step_ms, 3),
             "train_ms": round(fwd_ms + step_ms, 3)}, out.float(), grads)


def group(name: str, iters: int) -> dict:
    result, ref = {}, None
    variants = ("product", "wide", "wide_fwd") + (("wide_each",) if name == "qkv" else ())
    for variant in variants:
        torch.manual_seed(0)  # the same weights and inputs for every variant
        row, out, grads = measure(*group_case(name, variant), iters)
        if ref is None:
            ref = (out, grads)
        else:
            row["max_rel_diff_out"] = float((out - ref[0]).abs().max() / ref[0].abs().max())
            row["max_rel_diff_grads"] = max(float((g - r).abs().max() / r.abs().max())
                                            for g, r in zip(grads, ref[1]))
        result[variant] = row
        print(name, variant, json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return result


def bare(iters: int) -> dict:
    out = {}
    for d_in, d_out in ((2048, 2048), (2048, 256), (2048, 5632), (5632, 2048)):
        row = {}
        dy = rand(TOKENS, d_out)
        for extra in (0, 16, 64, 128):
            x, w = rand(TOKENS, d_in + extra), rand(d_out, d_in + extra, scale=0.02)
            row[f"K+{extra}"] = round(timed(functools.partial(torch.mm, x, w.t()), iters), 3)
            row[f"dgrad N+{extra}"] = round(timed(functools.partial(torch.mm, dy, w), iters), 3)
        out[f"{d_in}->{d_out}"] = row
        print(d_in, d_out, json.dumps(row), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    started = time.time()
    report = {"what": __doc__.splitlines()[0], "command": "python " + " ".join(sys.argv),
              "tokens": TOKENS, "rank": RANK, "bare_matmuls_ms": bare(args.iters),
              "groups": {name: group(name, args.iters) for name in ("gate_up", "qkv", "down")}}
    write_result(args.out, report, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
