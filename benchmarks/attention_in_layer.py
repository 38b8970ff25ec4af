"""SDPA's backends inside one compiled decoder layer on full rows: which kernel runs, and its time.

    python benchmarks/attention_in_layer.py --out attention_in_layer_h200.json

Issue #15, session 14: on 32 full rows of 1,024 tokens cuDNN's attention ran forward + backward
1.6x faster than FlashAttention-2 alone (attention_kernels_h200.json), but SDPA trying cuDNN
first in training gained nothing end to end (fastpath_sweep_h200_run16_sdpa.json), and which
kernel the compiled layers ran was not checked. This compiles one TinyLlama-shaped decoder
layer (transformers' own, SDPA, bf16, no quantization: the attention call is what differs) and
runs forward + backward on (32, 1024) tokens under each backend order, with the profiler's
attention kernels and their time per layer call; then the same layer with an attention
function that calls cuDNN's operator itself (`_train_cudnn_attention` rows: what session 20's
`train.cudnn_attention` did, reverted after its end-to-end A/B).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from attention_kernels import timed
from fixtures import write_result

ROWS, LENGTH = 32, 1024


def layer_and_inputs(attn: str = "sdpa"):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                         num_key_value_heads=4, num_hidden_layers=1, vocab_size=32000,
                         max_position_embeddings=2048)
    config._attn_implementation = attn
    layer = LlamaDecoderLayer(config, 0).cuda().to(torch.bfloat16)
    rotary = LlamaRotaryEmbedding(config).cuda()
    hidden = torch.randn(ROWS, LENGTH, 2048, device="cuda", dtype=torch.bfloat16,
                         requires_grad=True)
    positions = torch.arange(LENGTH, device="cuda")[None].expand(ROWS, -1)
    cos, sin = rotary(hidden, positions)
    return layer, hidden, positions, (cos.to(torch.bfloat16), sin.to(torch.bfloat16))


CUDNN_OP = "bench_cudnn_op"


def cudnn_op_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       **kwargs):
    """Causal attention through torch's cuDNN operator (no mask here: full rows)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, torch.is_grad_enabled(), 0.0, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


def attention_kernels(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        name = event.key
        if any(s in name.lower() for s in ("flash", "cudnn", "fmha", "attention", "sdpa")):
            kernels[name[:120]] = round(event.device_time_total / 1000, 3)
    return kernels


def run(order, compiled: bool, iters: int, attn: str = "sdpa") -> dict:
    from torch.nn.attention import sdpa_kernel

    torch._dynamo.reset()
    layer, hidden, positions, emb = layer_and_inputs(attn)
    fn = torch.compile(layer) if compiled else layer
    grad = torch.randn_like(hidden)

    def step():
        hidden.grad = None
        out = fn(hidden, position_ids=positions, position_embeddings=emb)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    try:
        with sdpa_kernel(order, set_priority=True):
            step()
            return {"forward_backward_ms": round(timed(step, iters), 3),
                    "attention_kernels_ms": attention_kernels(step)}
    except Exception as exc:  # noqa: BLE001 - a backend this host lacks is a result
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def main() -> int:
    from torch.nn.attention import SDPBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    started = time.time()
    orders = {"flash_first": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION],
              "cudnn_first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}
    results = {}
    for compiled in (False, True):
        for name, order in orders.items():
            key = f"{'compiled' if compiled else 'eager'}_{name}"
            results[key] = run(order, compiled, args.iters)
            print(key, results[key], flush=True)
    # cuDNN's operator called from the attention function (what session 20's
    # train.cudnn_attention did before it was reverted: benchmarks/results/
    # fastpath_sweep_h200_run22_cudnn.json).
    from transformers import AttentionInterface

    AttentionInterface.register(CUDNN_OP, cudnn_op_attention)
    for compiled in (False, True):
        key = f"{'compiled' if compiled else 'eager'}_train_cudnn_attention"
        results[key] = run(orders["flash_first"], compiled, args.iters, CUDNN_OP)
        print(key, results[key], flush=True)
    report = {"what": __doc__.splitlines()[0], "command": "python " + " ".join(sys.argv),
              "rows": ROWS, "length": LENGTH, "results": results}
    write_result(args.out, report, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
