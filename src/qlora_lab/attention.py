"""Packed rows without a mask: variable-length attention over each bin's row boundaries.

With SDPA, a bin of packed rows needs a (bins x 1 x T x T) block-diagonal mask. transformers
builds it from the restarting position_ids, and a masked SDPA can use neither the FlashAttention
kernel nor `enable_gqa`: it computes every T x T score of the bin (rows attend only to
themselves, so on Dolly rows most of them are masked out) and materializes grouped K/V heads
(`repeat_kv`) and their gradient sums.

`varlen` attention instead hands the kernel each row's start (`cu_seq_lens`, built by the
collator on the CPU from the same position_ids, no host sync on the GPU): torch's own
FlashAttention variable-length kernel (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10)
computes only the scores inside rows, reads grouped K/V heads in place, and needs no mask, so
transformers builds none (a registered attention name without a mask function gets no mask).

It is registered through transformers' public `AttentionInterface`, under its own name; no
library function is replaced. Where the kernel is absent (CPU, older torch) the same function
computes the same attention with SDPA and a block-diagonal mask built from the row starts, so
results never depend on which path ran.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

VARLEN = "qlora_varlen"  # the name registered with transformers' AttentionInterface


def kernel_available() -> bool:
    """torch's FlashAttention varlen kernel: CUDA with torch >= 2.10."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_by(config, bin_tokens: int) -> str | None:
    """Why varlen attention would not compute this model's attention exactly, or None.

    The kernel call below is plain causal attention with a scale. Sliding windows shorter than
    a bin, attention-logit softcapping (Gemma 2), attention dropout, and per-layer attention
    patterns (Gemma 3's local layers) need more than that.
    """
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < bin_tokens:
        return f"its sliding window ({window} tokens) is shorter than a bin ({bin_tokens})"
    if getattr(config, "attn_logit_softcapping", None):
        return "it softcaps attention logits"
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0.0:
        return "it uses attention dropout"
    if getattr(config, "layer_types", None) and any(
            t != "full_attention" for t in config.layer_types):
        return "some of its layers use local attention"
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder"
    return None


def register() -> str:
    """Register `varlen_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    return VARLEN


def row_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative row starts over the flattened bins, then the token count (int32).

    A row starts where position_ids do not continue from the previous token (as transformers'
    find_packed_sequence_indices reads packs) and at each bin's first token. Runs on the CPU
    in the collator, once per micro-batch.
    """
    length = position_ids.shape[1]
    # In numpy, as the collator builds its arrays (data._right_padded): it runs while the GPU
    # waits for the next batch; the whole collation before and after is timed in
    # benchmarks/results/collate_cpu.json.
    flat = position_ids.reshape(-1).numpy()
    starts = np.ones(flat.shape, dtype=bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::length] = True
    bounds = np.append(np.flatnonzero(starts), flat.size).astype(np.int32)
    return torch.from_numpy(bounds)


@dataclass(frozen=True)
class KernelCall:
    """How this process calls a varlen kernel, decided once before training (`plan_kernel`)
    so that compiled layers trace only tensor work: signature inspection and the grouped-heads
    probe would each break the layer's graph. None of it depends on the batch."""

    kernel: Callable  # torch.nn.attention.varlen.varlen_attn, or triton_attention's
    options: tuple[tuple[str, object], ...]  # keyword arguments besides the scale
    takes_scale: bool
    repeat_kv: bool  # give each query head its own K/V copy (this torch cannot group heads)
    triton: bool = False  # qlora-lab's Triton kernels (triton_attention), not torch's


_PLAN: dict[bool, KernelCall] = {}  # torch's kernel, by whether K/V heads are grouped
_CHOSEN: dict[bool, KernelCall] = {}  # what varlen_attention calls, by grouped K/V heads

VarlenKernel = Literal["auto", "triton", "flash"]


def triton_runs(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why qlora-lab's Triton varlen kernels cannot run here, or None."""
    from qlora_lab import triton_attention

    if not triton_attention.available():
        return "it needs triton and a CUDA GPU"
    if head_dim > triton_attention.MAX_HEAD_DIM:
        return (f"its head dim ({head_dim}) is over {triton_attention.MAX_HEAD_DIM}, the widest "
                "it has tiles for")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        return "bf16 matmuls in Triton need a GPU of compute capability 8.0 or newer"
    return None


def plan_kernel(grouped: bool, choice: VarlenKernel = "flash", head_dim: int = 64,
                dtype: torch.dtype = torch.bfloat16) -> KernelCall | None:
    """Decide (once per process) how to call the kernel; None where there is none (CPU).

    `choice`: `triton` = qlora-lab's Triton kernels (an error where they cannot run), `flash`
    = torch's FlashAttention-2 varlen kernel, `auto` = Triton where it runs, else flash."""
    if choice in ("auto", "triton"):
        why = triton_runs(head_dim, dtype)
        if why is None:
            from qlora_lab import triton_attention

            return KernelCall(triton_attention.varlen_attention, (), True, False, triton=True)
        if choice == "triton":
            raise UserError(f"model.varlen_kernel = 'triton' cannot run here: {why} — set "
                            "model.varlen_kernel to auto or flash")
    if not kernel_available():
        return None
    if grouped not in _PLAN:
        from torch.nn.attention.varlen import varlen_attn

        params = set(inspect.signature(varlen_attn).parameters)
        options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        repeat = False
        if grouped:
            if "enable_gqa" in params:
                options["enable_gqa"] = True
            else:
                repeat = not _reads_grouped_heads(varlen_attn, options)
        _PLAN[grouped] = KernelCall(varlen_attn, tuple(options.items()), "scale" in params,
                                    repeat)
    return _PLAN[grouped]


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, s_aux=None, **kwargs):
    """Causal attention inside each packed row; transformers' attention-function contract.

    query (bins, heads, T, dim), key/value (bins, kv_heads, T, dim) -> ((bins, T, heads, dim),
    None). `cu_seq_lens_q` comes from the collator through the model's forward kwargs (the
    name transformers' flash-attention path uses).
    """
    if cu_seq_lens_q is None:
        raise UserError("varlen attention needs packed batches with row bounds (the packed "
                        "collator adds them) — set model.attn_implementation to sdpa for this "
                        "model or command")
    if sliding_window is not None or softcap is not None or s_aux is not None or dropout:
        # unsupported_by() keeps such models off this path; a new model type could still ask.
        raise UserError(f"varlen attention cannot compute {type(module).__name__}'s attention "
                        "(sliding window, softcap, sinks or dropout) — set "
                        "model.attn_implementation to sdpa")
    bins, heads, length, dim = query.shape
    bounds = cu_seq_lens_q.to(query.device)
    call = _CHOSEN.get(key.shape[1] != query.shape[1])
    if call is None or not query.is_cuda:
        return _masked_sdpa(query, key, value, bounds, scaling), None
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(bins * length, heads, dim)
    k = key.transpose(1, 2).reshape(bins * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(bins * length, kv_heads, dim)
    # The bin length bounds every row and stays one number for all batches (the kernel uses
    # it only to size its grid), so compiled layers see no new constant per batch.
    out = _varlen_kernel(q, k, v, bounds, length, scaling, call)
    return out.view(bins, length, heads, dim), None


def _varlen_kernel(q, k, v, bounds, longest: int, scaling, call: KernelCall):
    if call.triton:  # launches only the tiles that hold tokens: no longest row needed
        return call.kernel(q, k, v, bounds, scaling)
    kwargs = dict(call.options)
    if call.takes_scale:
        kwargs["scale"] = scaling
    if call.repeat_kv:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return call.kernel(q, k, v, bounds, bounds, longest, longest, **kwargs)


def _reads_grouped_heads(varlen_attn, kwargs) -> bool:
    """Whether this torch's varlen_attn (no `enable_gqa` argument: torch 2.10/2.11) computes
    grouped-query attention from fewer K/V heads correctly. FlashAttention's kernel does; the
    wrapper may not pass them through. Checked on a tiny input against the repeated-heads call,
    so a wrong answer can never reach training."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(16, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(16, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(16, 2, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    bounds = torch.tensor([0, 9, 16], device="cuda", dtype=torch.int32)
    try:
        grouped = varlen_attn(q, k, v, bounds, bounds, 9, 9, **kwargs)
        full = varlen_attn(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                           bounds, bounds, 9, 9, **kwargs)
    except (RuntimeError, ValueError):
        return False
    return bool(torch.allclose(grouped, full, atol=1e-2, rtol=0))


def _masked_sdpa(query, key, value, bounds, scaling):
    """The same attention with SDPA and a block-diagonal causal mask per bin (rows never cross
    bins), for machines without the kernel; returns (bins, T, heads, dim)."""
    bins, _, length, _ = query.shape
    # Each token's row: how many row starts lie at or before it (no data-dependent shapes, so
    # compiled layers trace it whole).
    tokens = torch.arange(bins * length, device=query.device)
    row = (torch.searchsorted(bounds[1:].contiguous(), tokens, right=True)).view(bins, length)
    pos = torch.arange(length, device=query.device)
    mask = (row[:, :, None] == row[:, None, :]) & (pos[:, None] >= pos[None, :])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None],
                                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


def use_varlen(model, bin_tokens: int, packing: bool, kernel: VarlenKernel = "auto") -> None:
    """Switch a loaded model's attention to `varlen_attention` for training, or say why not.

    Loading uses SDPA (what every other command runs); only training's packed batches carry
    row bounds, so only `train` switches.
    """
    if not packing:
        raise UserError("model.attn_implementation = 'varlen' needs packed rows — set "
                        "train.packing to true, or model.attn_implementation to sdpa")
    why = unsupported_by(model.config, bin_tokens)
    if why:
        raise UserError(f"model.attn_implementation = 'varlen' cannot run this model: {why} — "
                        "set model.attn_implementation to sdpa")
    heads = model.config.num_attention_heads
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // heads
    grouped = getattr(model.config, "num_key_value_heads", heads) != heads
    if next(model.parameters()).is_cuda:
        call = choose_kernel(grouped, kernel, head_dim, model.dtype)
        if call is not None:
            log.info("attention: varlen through %s", "qlora-lab's Triton kernels" if call.triton
                     else "torch's FlashAttention-2 varlen kernel")
    elif kernel == "triton":
        plan_kernel(grouped, kernel, head_dim, model.dtype)  # asked for, cannot run: refused
    model.set_attn_implementation(register())


def choose_kernel(grouped: bool, choice: VarlenKernel, head_dim: int,
                  dtype: torch.dtype) -> KernelCall | None:
    """Plan the kernel (`plan_kernel`) and make it the one `varlen_attention` calls for
    layers with (or without) grouped K/V heads; None: no kernel here, masked SDPA instead."""
    call = plan_kernel(grouped, choice, head_dim, dtype)
    if call is None:
        _CHOSEN.pop(grouped, None)
    else:
        _CHOSEN[grouped] = call
    return call


@contextmanager
def sdpa_instead(model):
    """Within the block the model runs SDPA (padded batches carry no row bounds); then varlen
    again. For reference computations on padded rows (bench's loss check)."""
    varlen = model.config._attn_implementation == VARLEN
    if varlen:
        model.set_attn_implementation("sdpa")
    try:
        yield model
    finally:
        if varlen:
            model.set_attn_implementation(VARLEN)
