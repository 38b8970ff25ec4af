"""Causal attention inside packed rows, as Triton kernels sized for short rows.

torch's FlashAttention-2 varlen kernels tile every row in 128 x 128 blocks. Dolly's rows average
~170 tokens, so a row is two query blocks, the second mostly empty, and the kernels spend
~17 % of a 160-row step's GPU time on attention that is ~1 % of its arithmetic
(docs/performance.md, session 20). These kernels tile in smaller blocks and launch one program
per block that holds tokens: a table computed on the device before the launch (`_tile_map`)
gives each flat tile index its row and place, so no program starts only to find its row
shorter than the longest, and none searches for its row. The forward packs a K/V head's group
of query heads into one tile (FlashAttention-3's "pack GQA"): each K/V tile it loads serves the
whole group, and its tiles span few tokens, so little of a short row's causal triangle is
computed only to be masked.

Same contract as `torch.nn.attention.varlen.varlen_attn` with a causal mask: q (T, H, D), k and
v (T, H_kv, D) with H a multiple of H_kv (grouped heads are read in place), `bounds` the int32
row starts (R + 1 of them, from 0 to T). Forward keeps the output and the log-sum-exp of each
query's scores; backward computes dK/dV per key block for all query heads of a group at once
(no atomics, no per-head copies), then dQ per query block. Accumulation is fp32 throughout.

The op is a `torch.library.custom_op`, so compiled layers call it as one opaque kernel (like
the fused LoRA's) and checkpointing recomputes it like any other operator. Its name carries a
hash of this file and the kernels' (`OP_TAG`): torch.compile's caches on disk know a custom op
by its name only, so a changed autograd formula under the same name gets the backward traced
from the old one (pytorch/pytorch#144344; session 27 met it as a wrong argument count after an
upgrade of these files).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab.memory import VARLEN_TRITON_MAX_HEAD_DIM

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = VARLEN_TRITON_MAX_HEAD_DIM  # the widest head measured (64 x 64 tiles, dim 128)


def available() -> bool:
    """Triton and a CUDA device (the Triton interpreter runs these kernels on the CPU in tests)."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    """Imported on first use: triton is optional and only these kernels need it."""
    from qlora_lab import _attention_kernels as kernels

    return (kernels.attention_fwd, kernels.attention_bwd_dkdv, kernels.attention_bwd_dq,
            kernels.attention_bwd_delta)


@dataclass(frozen=True)
class Tiles:
    """A launch's tiles and Triton's launch options. Backward: square tiles of `block` queries
    by `block` keys. Forward: tiles of `fwd_rows` (token, query head) pairs, all heads of a
    K/V group for fwd_rows / group tokens (at least one token), by `block` keys."""

    block: int
    warps: int = 4
    stages: int = 2
    fwd_rows: int = 64

    def forward_tokens(self, group: int) -> int:
        """Tokens a forward tile spans: `fwd_rows` over the group rounded up to a power of two
        (a tile has at least 16 rows: tl.dot's least)."""
        return max(1, max(self.fwd_rows, 16) // _pow2(group))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def tiles_for(dim: int) -> Tiles:
    """64 x 64 tiles, 4 warps: a ~170-token row then wastes at most a third of its tiles'
    scores, where FlashAttention-2's 128 x 128 waste half. Measured on an H200 against 32, 128
    and 8 warps at head dim 64, and against 32 at 128 (attention_triton_h200.json); forward
    tiles of 64 (token, head) rows against 128 (attention_triton_h200_s27_tilemap.json).
    `TILES_OVERRIDE` (benchmarks only) replaces it."""
    if TILES_OVERRIDE is not None:
        return TILES_OVERRIDE
    return Tiles(64)


TILES_OVERRIDE: Tiles | None = None


def _block_d(dim: int) -> int:
    return max(16, _pow2(dim))


def _tile_map(bounds: torch.Tensor, block: int, tokens: int) -> torch.Tensor:
    """(tiles, 3) int32 on the rows' device: each tile's row start, row length and first
    position in its row, for tiles of `block` tokens in row order. Its length (the launch
    grid) comes from shapes alone (`_grid_tiles`); the tiles past the last have length 0.
    Computed with torch ops on the device, so no row length is read back to the host (and a
    compiled layer fuses them)."""
    rows = bounds.numel() - 1
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    counts = (lengths + block - 1) // block
    ends = counts.cumsum(0).to(torch.int32)  # one past each row's last tile
    tile = torch.arange(_grid_tiles(tokens, rows, block), device=bounds.device,
                        dtype=torch.int32)
    row = torch.searchsorted(ends, tile, right=True)  # == rows past the last tile
    inside = row < rows
    row = row.clamp(max=rows - 1)  # (no rows: no tokens, and no tiles to index with)
    position = (tile - (ends[row] - counts[row])) * block
    return torch.stack([starts[row], torch.where(inside, lengths[row], 0),
                        torch.where(inside, position, 0)], 1).to(torch.int32)


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs multiply in full fp32 (a TF32 product would round them to 10 bits); 16-bit
    inputs ignore it."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _grid_tiles(tokens: int, rows: int, block: int) -> int:
    """An upper bound on the tiles, from shapes alone: each row needs at most length / block
    tiles plus one partial tile."""
    return tokens // block + rows


def _source_tag() -> str:
    """12 hex digits of the SHA-256 of this module's and its kernels' source."""
    digest = hashlib.sha256()
    for name in (Path(__file__).name, "_attention_kernels.py"):
        digest.update((Path(__file__).with_name(name)).read_bytes())
    return digest.hexdigest()[:12]


OP_TAG = _source_tag()


@torch.library.custom_op(f"qlora_lab::varlen_attention_fwd_{OP_TAG}", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fwd_map: torch.Tensor,
             bwd_map: torch.Tensor, scale: float, block: int, warps: int, stages: int,
             fwd_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    fwd = _kernels()[0]
    tokens, heads, dim = q.shape
    group = heads // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(heads, tokens, device=q.device, dtype=torch.float32)
    if tokens == 0 or fwd_map.shape[0] == 0:
        return out, lse
    fwd[(fwd_map.shape[0], k.shape[1])](
        q, k, v, out, lse, fwd_map, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), GROUP=group, GROUP_P=_pow2(group), D=dim, BLOCK_D=_block_d(dim),
        TOKENS_M=fwd_tokens, BLOCK_N=block,
        PRECISION=_precision(q), num_warps=warps, num_stages=stages)
    return out, lse


@_forward.register_fake
def _(q, k, v, fwd_map, bwd_map, scale, block, warps, stages, fwd_tokens):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op(f"qlora_lab::varlen_attention_bwd_{OP_TAG}", mutates_args=())
def _backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, lse: torch.Tensor, tile_map: torch.Tensor, scale: float,
              block: int, warps: int,
              stages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, dkdv, dq_kernel, delta_kernel = _kernels()
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    grad = grad.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if tokens == 0 or tile_map.shape[0] == 0:
        return dq, dk, dv
    delta = torch.empty(heads, tokens, device=q.device, dtype=torch.float32)
    delta_kernel[(_cdiv(tokens, 128), heads)](
        out, grad, delta, tokens, out.stride(0), out.stride(1), grad.stride(0), grad.stride(1),
        delta.stride(0), D=dim, BLOCK_D=_block_d(dim), BLOCK_T=128)
    common = dict(GROUP=heads // kv_heads, D=dim, BLOCK_D=_block_d(dim), BLOCK_M=block,
                  BLOCK_N=block, PRECISION=_precision(q), num_warps=warps, num_stages=stages)
    # dK/dV per key tile and K/V head, looping over the group's query heads: measured faster
    # than one program per query head summing into the K/V head atomically
    # (benchmarks/results/attention_triton_h200.json).
    grid = tile_map.shape[0]
    dkdv[(grid, kv_heads)](
        q, k, v, grad, lse, delta, dk, dv, tile_map, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), grad.stride(0), grad.stride(1),
        lse.stride(0), dk.stride(0), dk.stride(1), **common)
    dq_kernel[(grid, heads)](
        q, k, v, grad, lse, delta, dq, tile_map, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), grad.stride(0), grad.stride(1),
        lse.stride(0), **common)
    return dq, dk, dv


@_backward.register_fake
def _(grad, q, k, v, out, lse, tile_map, scale, block, warps, stages):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, _, bwd_map, *launch = inputs
    ctx.launch = launch[:4]  # scale, block, warps, stages
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bwd_map)


def _grad(ctx, grad_out, grad_lse):
    dq, dk, dv = _backward(grad_out, *ctx.saved_tensors, *ctx.launch)
    return dq, dk, dv, None, None, None, None, None, None, None


_forward.register_autograd(_grad, setup_context=_setup)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention inside each row of `bounds`: q (T, H, D), k/v (T, H_kv, D) -> (T, H, D).
    q, k and v must share a token stride layout with the head dim contiguous."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} K/V heads")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    bounds = bounds.to(torch.int32)
    t = tiles_for(q.shape[-1])
    tokens = q.shape[0]
    fwd_tokens = t.forward_tokens(q.shape[1] // k.shape[1])
    # Plain torch ops, outside the custom op: in a compiled layer the compiler fuses them.
    fwd_map = _tile_map(bounds, fwd_tokens, tokens)
    bwd_map = _tile_map(bounds, t.block, tokens)
    return _forward(q, k, v, fwd_map, bwd_map, scale, t.block, t.warps, t.stages,
                    fwd_tokens)[0]


def reference(q, k, v, bounds, scale=None) -> torch.Tensor:
    """The same attention in fp32, one row at a time (for tests and benchmarks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    outs = []
    edges = bounds.tolist()
    for a, b in zip(edges[:-1], edges[1:]):
        qi = q[a:b].float().transpose(0, 1)
        ki = k[a:b].float().repeat_interleave(group, 1).transpose(0, 1)
        vi = v[a:b].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
        outs.append((scores.softmax(-1) @ vi).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)
