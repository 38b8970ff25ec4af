"""Attention kernels for packed rows on this GPU: forward + backward time per layer call.

    python benchmarks/attention_kernels.py --data .benchdata/dolly_dev.jsonl \
        --out attention_kernels_h200.json

Issue #15: attention was 16 % of the GPU time of a 160-row step on the H200
(profile_step_h200_160rows_inside.json), through FlashAttention-2's varlen kernel (torch's
`varlen_attn`, grouped K/V heads read in place). This times, on the same shapes (TinyLlama's 32
query heads, 4 K/V heads, head dim 64; one micro-batch of 160 Dolly rows laid end to end, and
32 full 1,024-token rows), the candidates this host has:
- `flash2_varlen`: what `train` runs (attention._varlen_kernel through attention.plan_kernel);
- `cudnn_varlen_gqa` and `cudnn_varlen_repeat_kv`: cuDNN's ragged attention
  (torch.ops.aten._cudnn_attention_forward/backward, the path torch's varlen_attn has for cuDNN
  but leaves off), given the grouped K/V heads as they are, or repeated to 32 heads with their
  gradients summed back (the repeat and the sum timed with it);
- full rows only: SDPA on dense (rows, heads, 1024, 64): FlashAttention-2, and cuDNN with
  grouped heads and with repeated ones.
The first candidate of each case is the reference: the others' outputs and gradients are
compared with it (`max_abs_diff_vs_first`). A candidate that fails records its error.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from fixtures import bpe_tokenizer, write_result

HEADS, KV_HEADS, DIM = 32, 4, 64


def dolly_lengths(data: Path, rows: int) -> list[int]:
    """Token counts of `rows` Dolly rows as the H200 bench's `train` prepares them (its BPE,
    template and clipping), in the order prepare_data leaves them."""
    from qlora_lab.config import config_from_dict
    from qlora_lab.data import prepare_data

    cfg = config_from_dict({"data": {"source": str(data), "max_seq_len": 1024,
                                     "eval_fraction": 0.0}})
    examples = prepare_data(cfg.data, bpe_tokenizer(data), 42).train
    return [len(e["input_ids"]) for e in examples[:rows]]


def timed(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters calls, after 3 untimed (CUDA events; the host's
    clock where there is no CUDA, for scripts' CPU smoke tests)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def flash2(q, k, v, bounds, longest):
    from qlora_lab import attention

    call = attention.plan_kernel(grouped=True)
    return attention._varlen_kernel(q, k, v, bounds, longest, DIM ** -0.5, call)


class CudnnVarlen(torch.autograd.Function):
    """cuDNN's ragged attention; `repeat`: K/V repeated to every query head (gradients summed
    back), else grouped heads passed as they are."""

    @staticmethod
    def forward(ctx, q, k, v, bounds, longest, repeat):
        group = q.shape[1] // k.shape[1] if repeat else 1
        if repeat:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        res = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, bounds, bounds, longest, longest, True, 0.0, True, False,
            scale=DIM ** -0.5)
        out, lse, seed, offset = res[0], res[1], res[6], res[7]
        ctx.save_for_backward(q, k, v, out, lse, bounds, seed, offset)
        ctx.longest, ctx.group = longest, group
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, bounds, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seed, offset, torch.empty(0, device=q.device),
            bounds, bounds, ctx.longest, ctx.longest, 0.0, True, scale=DIM ** -0.5)
        if ctx.group > 1:
            t, h, d = dk.shape
            dk = dk.view(t, h // ctx.group, ctx.group, d).sum(2)
            dv = dv.view(t, h // ctx.group, ctx.group, d).sum(2)
        return dq, dk, dv, None, None, None


def packed_case(lengths: list[int], iters: int) -> dict:
    tokens = sum(lengths)
    bounds = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32,
                          device="cuda")
    longest = 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(tokens, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    grad = torch.randn(tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    ops = {"flash2_varlen": lambda a, b, c: flash2(a, b, c, bounds, longest),
           "cudnn_varlen_gqa": lambda a, b, c: CudnnVarlen.apply(a, b, c, bounds, longest, False),
           "cudnn_varlen_repeat_kv": lambda a, b, c: CudnnVarlen.apply(a, b, c, bounds, longest,
                                                                      True)}
    return {"tokens": tokens, "rows": len(lengths), **_compare(ops, q, k, v, grad, iters)}


def full_case(rows: int, iters: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    length = 1024
    lengths = [length] * rows
    result = packed_case(lengths, iters)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(rows, HEADS, length, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(rows, KV_HEADS, length, DIM, device="cuda", dtype=torch.bfloat16,
                    generator=gen)
    v = torch.randn_like(k)
    grad = torch.randn_like(q)

    def sdpa(backend, gqa):
        def run(a, b, c):
            if not gqa:
                group = a.shape[1] // b.shape[1]
                b, c = b.repeat_interleave(group, dim=1), c.repeat_interleave(group, dim=1)
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(
                    a, b, c, is_causal=True, enable_gqa=gqa)
        return run

    dense = {"sdpa_flash_dense": sdpa(SDPBackend.FLASH_ATTENTION, True),
             "sdpa_cudnn_dense_repeat_kv": sdpa(SDPBackend.CUDNN_ATTENTION, False),
             "sdpa_cudnn_dense_gqa": sdpa(SDPBackend.CUDNN_ATTENTION, True)}
    result["dense"] = _compare(dense, q, k, v, grad, iters)
    return result


def _compare(ops: dict, q, k, v, grad, iters: int) -> dict:
    out = {}
    reference = None
    for name, op in ops.items():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        try:
            y = op(*leaves)
            y.backward(grad)
            got = [y.detach().float()] + [t.grad.float() for t in leaves]
            if reference is None:
                reference = got
                error = 0.0
            else:
                error = max(float((a - b).abs().max()) for a, b in zip(got, reference))

            def step():
                for t in leaves:
                    t.grad = None
                op(*leaves).backward(grad)

            fwd = timed(lambda: op(*leaves), iters)
            both = timed(step, iters)
            out[name] = {"forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3),
                         "max_abs_diff_vs_first": round(error, 4)}
        except Exception as exc:  # noqa: BLE001 - a backend this host lacks is a result
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        print(name, out[name], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    started = time.time()
    report = {"what": __doc__.splitlines()[0], "command": "python " + " ".join(sys.argv),
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM},
              "dolly_160_rows": packed_case(dolly_lengths(Path(args.data), args.rows), args.iters),
              "full_rows_32": full_case(32, args.iters)}
    write_result(args.out, report, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
