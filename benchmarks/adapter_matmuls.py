"""What a LoRA projection's matmuls cost at a 160-row micro-batch, and what each way of
folding the adapter into the base matmul would save.

    python benchmarks/adapter_matmuls.py --out adapter_matmuls_h200.json

Issue #15: the adapters' rank-16 matmuls are >= 12.7 % of a 160-row step's GPU time on the
H200 (profile_step_h200_160rows_absmax.json), bound by reading and writing token-wide tensors.
For TinyLlama's projections (bf16, N = 29,696 tokens: 29 bins of 1,024, rank 16) this times:
- `base_only`: x W^T alone, the floor;
- `fused_lora`: what fusedlora.LoraLinear4bit runs (x A^T, the product (x A^T) (sB)^T written,
  then x W^T accumulated onto it by cuBLAS);
- `k_concat_copy`: [x | x A^T] [W | sB]^T, x copied into the wider buffer first;
- `k_concat_in_place`: the same with x already in the wider buffer (as if the norm that makes
  x wrote it there): only x A^T is written into the last columns;
and the input gradient the same ways (dy W alone; (dy sB) A then dy W accumulated), and q, k
and v as one matmul over stacked weights against three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from attention_kernels import timed
from fixtures import write_result

TOKENS, HIDDEN, RANK = 29_696, 2048, 16
PROJECTIONS = {"q/o (2048 -> 2048)": (2048, 2048), "k/v (2048 -> 256)": (2048, 256),
               "gate/up (2048 -> 5632)": (2048, 5632), "down (5632 -> 2048)": (5632, 2048)}


def rand(*shape, scale=1.0):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale


def projection(d_in: int, d_out: int, iters: int) -> dict:
    x, dy = rand(TOKENS, d_in), rand(TOKENS, d_out)
    w, a, b = rand(d_out, d_in, scale=0.02), rand(RANK, d_in, scale=0.02), rand(d_out, RANK)
    wide_w = torch.cat([w, b], 1)
    wide_x = torch.empty(TOKENS, d_in + RANK, device="cuda", dtype=torch.bfloat16)
    wide_x[:, :d_in] = x

    def fused_lora():
        xa = x @ a.t()
        out = xa @ b.t()
        out.addmm_(x, w.t())
        return out

    def k_concat_copy():
        xa = x @ a.t()
        return torch.cat([x, xa], 1) @ wide_w.t()

    def k_concat_in_place():
        wide_x[:, d_in:].copy_(wide_x[:, :d_in] @ a.t())
        return wide_x @ wide_w.t()

    def grad_fused():
        dxa = dy @ b
        gx = dxa @ a
        gx.addmm_(dy, w)
        return gx

    ref = fused_lora().float()
    out = {"d_in": d_in, "d_out": d_out, "tokens": TOKENS, "rank": RANK,
           "forward_ms": {"base_only": timed(lambda: x @ w.t(), iters),
                          "fused_lora": timed(fused_lora, iters),
                          "k_concat_copy": timed(k_concat_copy, iters),
                          "k_concat_in_place": timed(k_concat_in_place, iters)},
           "input_grad_ms": {"base_only": timed(lambda: dy @ w, iters),
                             "fused_lora": timed(grad_fused, iters),
                             "dy_sB_alone": timed(lambda: dy @ b, iters),
                             "dxa_A_alone": timed(lambda: (dy[:, :RANK] @ a), iters)},
           "adapter_grads_ms": {"dA = dxa^T x": timed(lambda: dy[:, :RANK].t() @ x, iters),
                                "dB = dy^T xa": timed(lambda: dy.t() @ x[:, :RANK], iters)},
           "max_rel_diff_k_concat": float((k_concat_in_place().float() - ref).abs().max()
                                           / ref.abs().max())}
    for group in ("forward_ms", "input_grad_ms", "adapter_grads_ms"):
        out[group] = {k: round(v, 3) for k, v in out[group].items()}
    print(json.dumps(out), flush=True)
    return out


def qkv(iters: int) -> dict:
    x = rand(TOKENS, HIDDEN)
    ws = [rand(2048, HIDDEN), rand(256, HIDDEN), rand(256, HIDDEN)]
    stacked = torch.cat(ws)
    a_s = [rand(RANK, HIDDEN) for _ in range(3)]
    a_stacked = torch.cat(a_s)
    out = {"three_matmuls_ms": timed(lambda: [x @ w.t() for w in ws], iters),
           "one_stacked_ms": timed(lambda: x @ stacked.t(), iters),
           "three_x_A_ms": timed(lambda: [x @ a.t() for a in a_s], iters),
           "one_stacked_x_A_ms": timed(lambda: x @ a_stacked.t(), iters)}
    out = {k: round(v, 3) for k, v in out.items()}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    started = time.time()
    report = {"what": __doc__.splitlines()[0], "command": "python " + " ".join(sys.argv),
              "projections": {name: projection(*dims, args.iters)
                              for name, dims in PROJECTIONS.items()},
              "qkv": qkv(args.iters)}
    write_result(args.out, report, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
