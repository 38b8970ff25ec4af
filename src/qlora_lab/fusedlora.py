"""A LoRA projection over a 4-bit base as one autograd function, for every targeted projection.

peft computes a LoRA layer as modules in a row: the 4-bit base (bitsandbytes' MatMul4Bit), a
defensive clone of its output, lora_A, lora_B, a multiply by the scale and an add. Each is a
pass over the (tokens x out) output in forward, and backward adds a scaled copy of the incoming
gradient and one more (tokens x in) sum. At a large micro-batch those passes, not the matmuls,
are what the GPU waits on.

`LoraLinear4bit` computes the same y = x W^T + s (x A^T) B^T as the rank-r product written
once and the base matmul accumulating onto it (addmm), the scale folded into B (r x out, not
tokens x out); backward is dx = dy W + (dy sB) A the same way, and the adapter gradients
from the saved input and the small (tokens x r) product. The base weight is dequantized in
forward and again in backward, as bitsandbytes does, so nothing weight-sized is kept.

The technique is unsloth's fast LoRA (dequantize, then fold the adapter's matmuls into the
base's), written here from the math above; no code is copied. The layers stay peft's: peft
builds them as `fused_layer_class()`, a subclass of its 4-bit LoRA layer whose forward calls
this function, so adapter files, merging and every peft API are unchanged, and a layer peft
would compute differently (dropout, DoRA, several adapters, merged, disabled, a bias on
lora_B) goes through peft's own forward (`fusable`).

Each layer also keeps its weight's block scales (absmax) dequantized to fp32, once: with
double quantization (`quant.double_quant`, the default) bitsandbytes stores them as 8-bit
codes and dequantizes them on every call, two more kernels and two more host calls per
dequantize, three dequantizes per projection a step. The weights are frozen, so the result
never changes; it costs 4 B per 64 weights (~62 MB for TinyLlama, in the planner's
`absmax_fp32_cache` term).

Projections that read the same input (an MLP's gate and up, attention's q, k and v) run as one
function with `train.joint_lora`: `LoraJoint4bit` folds each adapter into its base matmul along
K ([x | x A^T | 0] [W | sB | 0]^T), so no product is written and read back at all, and x A^T is
one matmul for the group. fastpath.FusedSwiGLU calls it for gate and up; attention modules call
q, k and v one by one, so those three share a `ProjectionGroup` that computes them together on
the first call (`group_projections`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qlora_lab.memory import rank_columns


def fusable(module: nn.Module) -> bool:
    """Whether `module` is a peft LoRA layer over a bitsandbytes 4-bit Linear that this
    function computes exactly: one active adapter, enabled, unmerged, no dropout, plain LoRA."""
    base = getattr(module, "base_layer", None)
    weight = getattr(base, "weight", None)
    if getattr(weight, "quant_state", None) is None or not hasattr(module, "lora_A"):
        return False
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or module.lora_B[name].bias is not None:
        return False
    if getattr(module, "lora_variant", {}).get(name) is not None:  # DoRA and other variants
        return False
    if module.use_dora.get(name, False):
        return False
    return isinstance(module.lora_dropout[name], nn.Identity)


def applies(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module(x)` may go through LoraLinear4bit: `fusable(module)`, and one dtype
    serves all of it.

    peft computes the base in bitsandbytes' compute dtype and the adapter in autocast's (or
    the adapter weights') dtype, then adds them; the fused function computes both in one. They
    agree when x, the base's compute dtype and autocast's dtype (if on) are the same: training
    on a GPU (all bf16) and on CPU (all fp32). Mixed setups keep peft's arithmetic.
    """
    return (fusable(module) and _compute_dtype(x) == x.dtype
            and getattr(module.base_layer, "compute_dtype", None) in (None, x.dtype))


def _fused(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    name = module.active_adapters[0]
    base = module.base_layer
    absmax = getattr(module, ABSMAX, None)  # None: bitsandbytes' own dequantize
    return LoraLinear4bit.apply(x, base.weight, base.bias, module.lora_A[name].weight,
                                module.lora_B[name].weight, float(module.scaling[name]), absmax)


# The fp32 block scales of a double-quantized layer (a non-persistent buffer: it follows the
# layer across devices and is never saved, so adapter files are unchanged).
ABSMAX = "absmax_fp32"


def flat_absmax(weight: torch.Tensor) -> torch.Tensor | None:
    """The fp32 block scales of a double-quantized 4-bit weight, computed as
    bitsandbytes' dequantize_4bit computes them on each call; None where they are stored
    in fp32 already."""
    state = getattr(weight, "quant_state", None)
    if state is None or not state.nested or weight.device.type == "meta":
        return None
    import bitsandbytes.functional as bnbf

    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


@functools.cache
def fused_layer_class() -> type[nn.Module] | None:
    """peft's LoRA layer over a 4-bit Linear, computing its forward with LoraLinear4bit.

    A subclass, so it is that layer for peft: the same parameters under the same names (adapter
    files load with plain peft into plain peft layers), and merging, unloading, disabling and
    switching adapters work as they do there. Only `forward` differs, and only where
    `applies`; any other call (extra arguments such as peft's per-row `adapter_names`, dropout,
    DoRA, mixed dtypes) is peft's own forward. Because attention modules call their projections
    directly, this reaches q/k/v/o as well as the MLP. None where peft has no 4-bit LoRA layer
    (bitsandbytes missing).
    """
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None

    class FusedLoraLinear4bit(Linear4bit):
        # What project_together checks: a compiled layer traces that call, and dynamo breaks
        # the graph on fused_layer_class() (its class statement), not on an attribute.
        qlora_lab_fused = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.keep_absmax()

        def keep_absmax(self) -> None:
            """(Re)compute the fp32 block scales from the base weight as it is now. Not
            under FSDP, which shards and moves the weights after the layers are built."""
            from qlora_lab.models import fsdp_active

            absmax = None if fsdp_active() else flat_absmax(self.get_base_layer().weight)
            self.register_buffer(ABSMAX, absmax, persistent=False)

        # peft's merge and unmerge re-quantize the base weight into a new one (new scales).
        def merge(self, *args, **kwargs) -> None:
            super().merge(*args, **kwargs)
            self.keep_absmax()

        def unmerge(self, *args, **kwargs) -> None:
            super().unmerge(*args, **kwargs)
            self.keep_absmax()

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            member = getattr(self, GROUP, None)  # (its ProjectionGroup, its index there)
            if member is not None and not (args or kwargs):
                return member[0].output(member[1], x)
            return self.forward_alone(x, *args, **kwargs)

        def forward_alone(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if args or kwargs or not applies(self, x):
                return super().forward(x, *args, **kwargs)
            return _fused(self, x)

    return FusedLoraLinear4bit


def use_fused_layers(peft_config) -> bool:
    """Make `get_peft_model(model, peft_config)` build `fused_layer_class()` layers over
    bitsandbytes 4-bit Linears; returns whether it will.

    Through peft's LoraConfig._register_custom_module, its API for custom LoRA layer types
    (experimental upstream, hence the check): peft builds the layers itself, nothing of peft's
    is replaced. The mapping is not part of the saved adapter_config.json.
    """
    cls = fused_layer_class()
    register = getattr(peft_config, "_register_custom_module", None)
    if cls is None or register is None:
        return False
    import bitsandbytes as bnb

    register({bnb.nn.Linear4bit: cls})
    return True


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What peft + autocast compute in: the autocast dtype where autocast is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: t itself where it is already. Tensor.to returns t then too, but through
    the dispatcher: uncompiled, the fused functions made ~7,100 such calls a step at 32 full
    rows on the H200 (benchmarks/results/profile_step_h200_full_rows_eager.json), host time
    in a path the host bounds."""
    return t if t.dtype == dtype else t.to(dtype)


def _dequantize(weight: torch.Tensor, absmax: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight in `dtype`. Given the fp32 block scales (`flat_absmax`), bitsandbytes'
    operator, which its dequantize_4bit calls after dequantizing nested scales; else that
    function."""
    state = weight.quant_state
    if absmax is None:
        import bitsandbytes.functional as bnbf

        return _as(bnbf.dequantize_4bit(weight, state), dtype)
    out = torch.ops.bitsandbytes.dequantize_4bit.default(
        weight, absmax, state.blocksize, state.quant_type, state.shape, state.dtype)
    return _as(out, dtype)


# The in-place accumulate as an operator a compiled graph can call (see `_accumulate`). Defined
# with torch.library.Library rather than the @custom_op decorator: a compiled step calls it ~600
# times, and the decorator's dispatch runs three Python wrappers per call (autograd, version
# bump, then the kernel): 24.8 us a call against 3.0 us here on this repo's CPU host
# (benchmarks/results/op_overhead_cpu.json).
# Compiled graphs run it without autograd, and nothing outside them calls it.
_LIB = torch.library.Library("qlora_lab", "DEF")
_LIB.define("accumulate_mm(Tensor(a!) out, Tensor a, Tensor b) -> ()")


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    out.addmm_(a, b)


_LIB.impl("accumulate_mm", _accumulate_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("qlora_lab::accumulate_mm")
def _(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    return None


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place.

    Eagerly that is addmm_. A compiled graph is functional: inductor turns addmm_ into an
    out-of-place addmm, which cuBLAS computes by first copying `out` into a new buffer (the
    H200 profile's largest copy, ~20 ms a step at 160 rows: benchmarks/results/
    profile_step_h200_160rows.json). As an operator that declares the mutation, inductor
    keeps it in place (it re-inplaces a mutated input nothing else reads), and no copy is made.
    """
    if torch.compiler.is_compiling():
        torch.ops.qlora_lab.accumulate_mm(out, a, b)
    else:
        out.addmm_(a, b)


class LoraLinear4bit(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W 4-bit; gradients for x, A and B (never W)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, absmax):
        dtype = _compute_dtype(x)
        kind = x.device.type
        with torch.autocast(kind, enabled=False):
            flat = _as(x.reshape(-1, x.shape[-1]), dtype)
            a = _as(lora_a, dtype)
            b_scaled = _as(lora_b * scale, dtype)  # scale folded into B: r x out, not N x out
            w = _dequantize(weight, absmax, dtype)
            xa = flat @ a.t()
            # The adapter's product first, then the base matmul accumulates onto it: cuBLAS
            # reads the addend in the big matmul's epilogue, under its compute. The other order
            # made the adapter's rank-r addmm a separate read and write of the whole output,
            # 49 ms of a 0.43 s step at 160 rows (profile_step_h200_160rows_idle.json).
            if bias is None:
                out = xa @ b_scaled.t()
            else:
                out = torch.addmm(_as(bias, dtype), xa, b_scaled.t())
            _accumulate(out, flat, w.t())
        ctx.save_for_backward(flat, xa, weight, lora_a, lora_b, absmax)
        ctx.scale, ctx.dtype, ctx.kind = scale, dtype, kind
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, xa, weight, lora_a, lora_b, absmax = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        with torch.autocast(ctx.kind, enabled=False):
            dy = _as(grad_out.reshape(-1, grad_out.shape[-1]), dtype)
            a = _as(lora_a, dtype)
            b_scaled = _as(lora_b * scale, dtype)
            dxa = dy @ b_scaled  # N x r: the gradient reaching A's output
            grad_x = grad_a = grad_b = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = dxa @ a  # the adapter's part first, as in forward
                _accumulate(grad_x, dy, _dequantize(weight, absmax, dtype))
                grad_x = _as(grad_x.view(*grad_out.shape[:-1], flat.shape[-1]), ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_a = _as(dxa.t() @ flat, lora_a.dtype)
            if ctx.needs_input_grad[4]:
                grad_b = _as(dy.t() @ (xa * scale), lora_b.dtype)  # N x r scaled, not N x out
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = dy.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


# --- projections that read one input, as one function ---------------------------------------


def project_together(modules, x: torch.Tensor) -> list[torch.Tensor]:
    """Each module's output for the same input x (gate and up of an MLP).

    Where every module is a fused layer (`fused_layer_class`) that `applies` to x: one
    LoraJoint4bit call; else each module's own forward.
    """
    if not all(getattr(m, "qlora_lab_fused", False) and applies(m, x) for m in modules):
        return [m.forward_alone(x) if hasattr(m, "forward_alone") else m(x) for m in modules]
    per = []
    for m in modules:
        name = m.active_adapters[0]
        per += [m.base_layer.weight, getattr(m, ABSMAX, None), m.lora_A[name].weight,
                m.lora_B[name].weight, float(m.scaling[name]), m.base_layer.bias]
    return list(LoraJoint4bit.apply(x, len(modules), *per))


# Where a fused layer keeps its ProjectionGroup and its index there (a plain attribute: not a
# submodule, so the group's other members are not registered twice in the model's tree).
GROUP = "_qlora_lab_group"
QKV = ("q_proj", "k_proj", "v_proj")


class ProjectionGroup:
    """Projections that a module calls one after another on the same input: an attention
    module's q, k and v, which transformers' attention calls each on the hidden states.

    The first member called computes every member's output in one LoraJoint4bit call and
    keeps the others' outputs with that input; a member called next with the same tensor gets
    its kept output. A member called with a different tensor (cross-attention: k and v read
    another sequence) drops what was kept and the group stops: each member alone from then on.
    """

    def __init__(self, modules):
        self.modules = tuple(modules)
        self.kept: list = [None] * len(self.modules)  # (input, output) per member
        self.on = True

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        kept = self.kept[index]
        if kept is not None:
            self.kept[index] = None
            if kept[0] is x:
                return kept[1]
            self.kept = [None] * len(self.modules)
            self.on = False
        if not self.on:
            return self.modules[index].forward_alone(x)
        outs = project_together(self.modules, x)
        for i, out in enumerate(outs):
            if i != index:
                self.kept[i] = (x, out)
        return outs[index]


def group_projections(model: nn.Module) -> int:
    """Give each module's q, k and v projections a ProjectionGroup where all three are fused
    layers (train.joint_lora); returns how many groups."""
    count = 0
    for parent in model.modules():
        members = [getattr(parent, n, None) for n in QKV]
        if all(getattr(m, "qlora_lab_fused", False) for m in members):
            group = ProjectionGroup(members)
            for i, m in enumerate(members):
                setattr(m, GROUP, (group, i))
            count += 1
    return count


class LoraJoint4bit(torch.autograd.Function):
    """y_p = x W_p^T + b_p + s_p (x A_p^T) B_p^T for projections p that read the same x, W_p
    4-bit; gradients for x and every A_p, B_p (and bias, were it trained).

    Forward folds each adapter into its base matmul along K: x A^T for all the adapters at
    once (A stacked), then per projection one matmul [x | x A^T | 0] [W_p | s_p B_p in its
    columns | 0]^T. No (tokens x out) product is written and read back, which is what
    LoraLinear4bit's accumulate costs; the adapter's sum is taken in the matmul's fp32
    accumulator with the base's. The zero columns pad K to a whole tile (memory.rank_columns).
    That form is for compiled code, which builds the wide operands inside its fused kernels;
    uncompiled, each projection accumulates onto its adapter's product (LoraLinear4bit's
    form, the shared x A^T sliced), since eager concatenation copies x and every weight.

    Backward is LoraLinear4bit's, shared: dy_p sB_p for each projection, side by side, times
    the stacked A in one matmul, and each dy_p W_p accumulated onto it (one dx for the group).
    """

    @staticmethod
    def forward(ctx, x, count, *per):
        dtype = _compute_dtype(x)
        kind = x.device.type
        weights, absmaxes, las, lbs, scales, biases = (per[i::6] for i in range(6))
        ranks = [a.shape[0] for a in las]
        with torch.autocast(kind, enabled=False):
            flat = _as(x.reshape(-1, x.shape[-1]), dtype)
            a = torch.cat([_as(la, dtype) for la in las])
            xa = flat @ a.t()
            # Compiled, the wide operands are built inside the graph, fused with the kernels that
            # produce x and dequantize W. Uncompiled, each cat is a copy of x and of every
            # dequantized weight per call (24 ms a step of CatArrayBatchedCopy at 32 full rows
            # on the H200, profile_step_h200_full_rows_eager.json): there each projection
            # accumulates onto its adapter's product as LoraLinear4bit does, x A^T still shared.
            wide = torch.compiler.is_compiling()
            if wide:
                width = rank_columns(a.shape[0])
                wide_x = torch.cat([flat, xa, flat.new_zeros(flat.shape[0],
                                                             width - a.shape[0])], 1)
            outs, at = [], 0
            for weight, absmax, lb, scale, rank, bias in zip(weights, absmaxes, lbs, scales,
                                                             ranks, biases):
                w = _dequantize(weight, absmax, dtype)
                b_scaled = _as(lb * scale, dtype)
                if wide:
                    wide_w = torch.cat([w, w.new_zeros(w.shape[0], at), b_scaled,
                                        w.new_zeros(w.shape[0], width - at - rank)], 1)
                    out = (wide_x @ wide_w.t() if bias is None
                           else torch.addmm(_as(bias, dtype), wide_x, wide_w.t()))
                else:
                    xa_p = xa[:, at:at + rank]
                    out = (xa_p @ b_scaled.t() if bias is None
                           else torch.addmm(_as(bias, dtype), xa_p, b_scaled.t()))
                    _accumulate(out, flat, w.t())
                outs.append(out.view(*x.shape[:-1], w.shape[0]))
                at += rank
        # x and the r-wide products, not the wide buffer: its zero columns would be kept too.
        ctx.save_for_backward(flat, xa, *weights, *absmaxes, *las, *lbs)
        ctx.count, ctx.scales, ctx.ranks = count, scales, ranks
        ctx.has_bias = [b is not None for b in biases]
        ctx.dtype, ctx.kind, ctx.x_dtype, ctx.d_in = dtype, kind, x.dtype, x.shape[-1]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        n, dtype, d_in = ctx.count, ctx.dtype, ctx.d_in
        flat, xa, *rest = ctx.saved_tensors
        weights, absmaxes, las, lbs = (rest[i * n:(i + 1) * n] for i in range(4))
        grad_a, grad_b = [None] * n, [None] * n
        with torch.autocast(ctx.kind, enabled=False):
            dys = [_as(g.reshape(-1, g.shape[-1]), dtype) for g in grads]
            b_scaled = [_as(lb * s, dtype) for lb, s in zip(lbs, ctx.scales)]
            dxa = torch.cat([dy @ b for dy, b in zip(dys, b_scaled)], 1)  # N x (sum of ranks)
            grad_x = None
            if ctx.needs_input_grad[0]:
                a = torch.cat([_as(la, dtype) for la in las])
                grad_x = dxa @ a  # the adapters' part first, as LoraLinear4bit does
                for dy, weight, absmax in zip(dys, weights, absmaxes):
                    _accumulate(grad_x, dy, _dequantize(weight, absmax, dtype))
                grad_x = _as(grad_x.view(*grads[0].shape[:-1], d_in), ctx.x_dtype)
            if any(ctx.needs_input_grad[4::6]):
                grad_a = [_as(g, la.dtype) for g, la in
                          zip((dxa.t() @ flat).split(ctx.ranks), las)]  # all A's at once
            grad_bias = [None] * n
            for i, xa_i in enumerate(xa.split(ctx.ranks, 1)):
                if ctx.needs_input_grad[2 + 6 * i + 3]:
                    grad_b[i] = _as(dys[i].t() @ (xa_i * ctx.scales[i]), lbs[i].dtype)
                if ctx.has_bias[i] and ctx.needs_input_grad[2 + 6 * i + 5]:
                    grad_bias[i] = dys[i].sum(0)
        out = [grad_x, None]
        for i in range(n):
            out += [None, None, grad_a[i], grad_b[i], None, grad_bias[i]]
        return tuple(out)
