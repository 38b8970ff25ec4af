"""The layer's matmul shapes under cuBLAS and under inductor's autotuned Triton GEMMs.

    python benchmarks/autotune_mm.py --out autotune_mm_h200.json [--tokens 29696]

Issue #15. cuBLAS runs the MLP's 2,048 -> 5,632 matmul ~20 % slower at any K other than 2,048
(K + 16, + 64, + 128: 1.04-1.06 ms against 0.88 at 29,696 tokens on the H200,
wide_adapter_h200.json), and the gate/up projections with their adapters folded along K
(fusedlora.LoraJoint4bit, K = 2,048 + 64) are the step's largest kernel (25 % of its GPU time,
profile_step_h200_160rows_s27.json). Inductor's max-autotune benchmarks its Triton GEMM
templates against cuBLAS for each matmul it compiles and keeps the fastest; qlora-lab has never
compiled with it. This times, per shape (M tokens x K -> N, as `x @ w.t()`, bf16): cuBLAS
eagerly, the default compile (cuBLAS through inductor) and the max-autotune compile, and how
long that compile took. A shape where the autotuned GEMM is faster is worth an end-to-end A/B
(`TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 qlora-lab bench ...`: inductor reads its settings from the
environment); one where it is not closes the question for this host.

On a machine without CUDA it runs small shapes on the CPU for a smoke test (inductor's CPU
templates, not the GPU's), unless --tokens is given.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from attention_kernels import timed
from fixtures import write_result

# (name, K, N): the layer's matmuls as the compiled layers run them (TinyLlama's shape).
SHAPES = [
    ("gate/up base", 2048, 5632),
    ("gate/up joint (K + 64)", 2048 + 64, 5632),
    ("gate/up joint (K + 128)", 2048 + 128, 5632),
    ("q/o joint (K + 64)", 2048 + 64, 2048),
    ("down base", 5632, 2048),
]


def measure(tokens: int, k: int, n: int, iters: int, device: str) -> dict:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5

    def matmul(a, b):
        return a @ b.t()

    row = {"eager_ms": round(timed(lambda: matmul(x, w), iters), 4)}
    reference = matmul(x, w).float()
    for mode in ("default", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        compiled = torch.compile(matmul, mode=None if mode == "default" else mode)
        began = time.perf_counter()
        out = compiled(x, w)
        if cuda:
            torch.cuda.synchronize()
        row[f"{mode}_compile_s"] = round(time.perf_counter() - began, 1)
        row[f"{mode}_ms"] = round(timed(lambda: compiled(x, w), iters), 4)
        row[f"{mode}_max_rel_diff"] = float((out.float() - reference).abs().max()
                                            / reference.abs().max())
    flops = 2 * tokens * k * n
    row["tflops"] = {key.removesuffix("_ms"): round(flops / (row[key] * 1e-3) / 1e12, 1)
                     for key in list(row) if key.endswith("_ms")}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=0,
                        help="M (29,696 = 29 bins of 1,024: a 160-row Dolly micro-batch)")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    started = time.time()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokens = args.tokens or (29_696 if cuda else 256)
    scale = 1 if cuda else 16  # CPU smoke test: the shapes shrunk
    shapes = {}
    for name, k, n in SHAPES:
        shapes[name] = {"tokens": tokens, "k": k // scale, "n": n // scale,
                        **measure(tokens, k // scale, n // scale, args.iters, device)}
        print(name, shapes[name], file=sys.stderr)
    write_result(args.out, {"what": __doc__.splitlines()[0], "command": " ".join(sys.argv),
                            "device": device, "shapes": shapes}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
