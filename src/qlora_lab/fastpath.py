"""The fast path: what `train` does beyond a plain HF + peft QLoRA step, each piece measured.

Everything here acts on one model instance (its modules are swapped or wrapped); no library
class or function is reassigned, so a plain model loaded in the same process is untouched.

- `SupervisedHeadLoss`: the LM head and cross-entropy run only at supervised (answer) positions,
  in chunks, the gradient computed in the forward pass, so the (tokens x vocab) fp32 logits
  tensor never exists: Liger's fused linear cross-entropy, or fusedce's, which never waits for
  the GPU (TrainConfig.liger_for_loss picks).
- `FusedSwiGLU`: the MLP's SiLU(gate) * up through Liger's Triton kernel (one kernel, and it
  saves two inputs instead of three activations); above `tile_tokens` tokens it runs the MLP in
  sequence tiles, each recomputed in backward, so a long row never holds the full
  (tokens x intermediate) activations.
- Liger RMSNorm for the model's RMSNorm modules.
  (With compiled layers, `train.liger: auto` keeps neither Liger swap: the compiler fuses the
  model's own norm and SiLU-mul with the work around them; TrainConfig.liger_in_layers.)
- `offloaded_checkpoint`: activation checkpointing whose saved layer inputs live in pinned host
  memory (long contexts); the GPU then holds only one layer's activations at a time.
- `compile_settings`: what the compiled layers compile with while training.

Packing (rows laid end to end with restarting position_ids) lives in data.py.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from qlora_lab import fusedlora
from qlora_lab.data import IGNORE_INDEX
from qlora_lab.errors import UserError
from qlora_lab.fusedce import linear_cross_entropy
from qlora_lab.memory import head_loss_chunk_tokens

log = logging.getLogger(__name__)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_liger(setting: str, device: str) -> bool:
    """Whether Liger runs at all (`auto`, `loss`: when on CUDA and installed; `on` insists,
    `off` never); TrainConfig.liger_in_layers says where."""
    if setting == "off":
        return False
    usable = device == "cuda" and liger_installed()
    if setting == "on" and not usable:
        why = "needs CUDA" if device != "cuda" else "is not installed"
        raise UserError(f"train.liger = 'on' but liger-kernel {why} — `pip install "
                        "liger-kernel` on a CUDA machine, or set train.liger to 'auto'")
    return usable


# --- loss ---------------------------------------------------------------------------------------


class FinalHiddenStates:
    """Catch the decoder's output: the final (normed) states the LM head reads.

    A forward hook on this model's own decoder (`get_decoder()`: LlamaModel, GPT2Model, ...),
    whose `last_hidden_state` is what every transformers causal LM hands its head, whatever
    its final norm is named (`norm`, `ln_f`, `final_layer_norm`) or whether it has one. Asking
    the model for `output_hidden_states` instead would keep every layer's output on the GPU,
    which undoes activation offload (it ran out of memory with it: the qlora_lab rows of
    benchmarks/results/bench_context_h200_8gib_run1.json).
    """

    def __init__(self, model: nn.Module):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if decoder is None or decoder is model:
            raise UserError("train.fused_loss reads the decoder's output before the LM head, "
                            f"and {type(model).__name__} has no separate decoder module "
                            "(get_decoder()) — set train.fused_loss to false")
        self.states: torch.Tensor | None = None
        decoder.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        states = getattr(output, "last_hidden_state", None)
        self.states = states if states is not None else output[0]

    def take(self) -> torch.Tensor:
        states, self.states = self.states, None
        if states is None:
            raise RuntimeError("the decoder did not run in this forward pass")
        return states


class SupervisedHeadLoss:
    """Causal-LM cross-entropy from the final hidden states, computed where labels are supervised.

    Returns (sum of token losses, number of supervised tokens); the caller normalizes, exactly
    as transformers' ForCausalLMLoss does (sum / num_items_in_batch under gradient accumulation,
    else the mean). Dolly answers are ~60 % of a row's tokens, so skipping prompt positions
    also skips ~40 % of the head's matmul.

    The head and loss run as one chunked function that computes the states' gradient in the
    forward pass: Liger's fused linear cross-entropy (`use_liger`), or fusedce's, which never
    waits for the GPU, its chunk's softmax compiled with `compiled`. Where the collator
    gathered the supervised positions on the host (`positions`,
    data.supervised_positions) the step waits for nothing here; otherwise finding them is one
    wait, as in transformers' own loss.
    """

    def __init__(self, lm_head: nn.Module, use_liger: bool, chunk_tokens: int | None = None,
                 logits: LogitTransform | None = None, compiled: bool = False):
        self.lm_head = lm_head
        # The planner's chunk (memory.head_loss_chunk_tokens): it models exactly this size.
        self.chunk_tokens = chunk_tokens or head_loss_chunk_tokens(lm_head.weight.shape[0])
        self.logits = logits or LogitTransform()
        self.compiled = compiled
        self._liger = None
        if use_liger:
            from liger_kernel.transformers.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyLoss,
            )

            self._liger = LigerFusedLinearCrossEntropyLoss(
                ignore_index=IGNORE_INDEX, reduction="sum", softcap=self.logits.softcap)

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        # Position t predicts token t+1: drop the last position and the first label.
        targets = labels[:, 1:].reshape(-1)
        if positions is None:
            positions = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # a wait for the GPU
        positions = positions.to(hidden.device, non_blocking=True)
        count = int(positions.numel())  # a shape: known on the host
        if count == 0:
            # Still touch the graph so every rank runs the same backward under DDP.
            return hidden.sum() * 0.0, 0
        weight = self.lm_head.weight
        # The final norm may hand back fp32 states over a 16-bit head (mixed precision).
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
        if self.logits.scale != 1.0:
            # (s x h) W^T = s x (h W^T): the model's logit scale, applied before the head.
            states = states * self.logits.scale
        states = states.to(weight.dtype)
        targets = targets.index_select(0, positions.to(targets.device))
        bias = getattr(self.lm_head, "bias", None)
        if self._liger is not None:
            return self._liger(weight, states, targets, bias), count
        return linear_cross_entropy(states, weight, bias, targets, self.chunk_tokens,
                                    self.logits.softcap, compiled=self.compiled), count


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its head's output before the loss, so the fused loss does it too.

    scale: logits are multiplied by it (Cohere's `logit_scale`; Granite divides by
        `logits_scaling`). softcap: Gemma 2's `final_logit_softcapping`, tanh(z / c) x c.
    """

    scale: float = 1.0
    softcap: float | None = None


def logit_transform(config) -> LogitTransform:
    """Read the logit scaling and softcapping a transformers config declares."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    divisor = getattr(config, "logits_scaling", None)
    if divisor:
        scale /= float(divisor)
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


# --- MLP and norms ------------------------------------------------------------------------------


class FusedSwiGLU(nn.Module):
    """A Llama-style MLP (down(silu(gate(x)) * up(x))) over the model's own projections.

    The projections are the original modules (4-bit, with LoRA once attached), kept under their
    original names, so adapter files are identical to the plain path's.
    """

    def __init__(self, mlp: nn.Module, use_liger: bool, tile_tokens: int,
                 joint_lora: bool = True):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.use_liger = use_liger
        self.tile_tokens = tile_tokens
        self.joint_lora = joint_lora

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        # With train.fused_lora the projections are fusedlora's layers (models.attach_lora);
        # with train.joint_lora gate and up, which read the same x, are one function.
        if self.joint_lora:
            gate, up = fusedlora.project_together((self.gate_proj, self.up_proj), x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        if self.use_liger:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return self.down_proj(LigerSiLUMulFunction.apply(gate, up))
        return self.down_proj(self.act_fn(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[:-1].numel()
        # Not in compiled layers: a micro-batch's last tile has a new length every batch, and
        # each new length recompiled the layer (160 rows per micro-batch ran 5 s a step:
        # benchmarks/results/fastpath_sweep_h200_run4.json). The planner counts compiled
        # layers untiled (memory._mlp_tiled). is_compiling() comes first: comparing the token
        # count inside a trace leaves a guard on it, and a batch on the other side of the
        # threshold compiled every layer again (13 s at step 8 of the H200's 160-row runs).
        if (torch.compiler.is_compiling() or not (self.training and torch.is_grad_enabled())
                or tokens <= 2 * self.tile_tokens):
            return self._mlp(x)
        # Long rows: the MLP holds 3 x intermediate (5.5x hidden for TinyLlama) activations per
        # token, the largest share of a layer. Tiles along the sequence, each recomputed in
        # backward, keep one tile's worth alive.
        flat = x.reshape(-1, x.shape[-1])
        outs = [checkpoint(self._mlp, tile, use_reentrant=False)
                for tile in flat.split(self.tile_tokens)]
        return torch.cat(outs).view(*x.shape[:-1], -1)


def _is_swiglu_mlp(module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    return all(hasattr(module, n) for n in names) and type(module).__name__.endswith("MLP")


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and getattr(module, "weight", None) is not None)


def apply_fast_modules(model: nn.Module, use_liger: bool, tile_tokens: int = 8192,
                       joint_lora: bool = True) -> dict:
    """Swap this model's MLPs (and, with Liger, its RMSNorms) in place; returns counts.

    Call before attaching LoRA: peft then finds the same projections under the same names.
    `joint_lora`: the MLPs compute gate and up as one function where fused LoRA applies.
    """
    swapped = {"mlp": 0, "rms_norm": 0}
    act = getattr(model.config, "hidden_act", None)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_swiglu_mlp(child) and act in ("silu", "swish"):
                setattr(parent, name, FusedSwiGLU(child, use_liger, tile_tokens, joint_lora))
                swapped["mlp"] += 1
            elif use_liger and _is_rms_norm(child):
                setattr(parent, name, _liger_rms_norm(child))
                swapped["rms_norm"] += 1
    log.info("fast path: %s (liger: %s)", swapped, use_liger)
    return swapped


def _liger_rms_norm(norm: nn.Module) -> nn.Module:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    new = LigerRMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon, casting_mode="llama")
    new.weight = norm.weight  # the same frozen parameter, not a copy
    return new


# --- compilation ------------------------------------------------------------------------------


def compile_decoder_layers(model: nn.Module, checkpointing: bool = False) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile); returns how many.

    Per layer, not the whole model: the packed-sequence mask is built from data-dependent
    control flow in transformers' masking code, and the loss gathers supervised positions;
    both would break a whole-model graph, neither runs inside a layer. All layers share one
    shape, so one compilation serves them all. (`dynamic=True`, to compile once for every
    number of bins, failed on the H200 with an assertion inside dynamo: not used.)

    `checkpointing`: the layers are checkpointed by transformers' own non-reentrant
    checkpointing (not offloaded, not reentrant); see `place_checkpoints`.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    if checkpointing:
        log.info("checkpointing %s the compiled layers", place_checkpoints(model))
    # Dynamo guards on whether a layer's input requires grad, and every layer's input but the
    # first (the frozen embeddings' output) follows the grad mode. peft's hook (with gradient
    # checkpointing) marks that output as requiring grad even under no_grad, and without
    # checkpointing nothing marks it: either way the first layer needed a graph of its own for
    # each shape (eval or train), each compile tens of seconds on a GPU. This hook runs after
    # peft's and makes the first layer's input like the others'; in training that costs one
    # more input gradient, for one layer.
    model.get_input_embeddings().register_forward_hook(_input_follows_grad_mode)
    return len(layers)


def checkpoints_outside_compiled_layers() -> bool:
    """Whether this transformers checkpoints a layer around its whole call (`__call__`),
    outside what `nn.Module.compile` compiles, rather than inside `forward` (transformers 5.24
    moved it into `forward`, so module hooks stay outside the recomputation)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" in GradientCheckpointingLayer.__dict__


def compiler_recomputes_autograd_functions(version: str | None = None) -> bool:
    """Whether this torch's compiler recomputes what a custom autograd function computes
    inside a checkpointed region (torch >= 2.12), or saves it all for backward (2.11).

    torch 2.11 tagged for recomputation only the operators it traced directly in the region;
    the fused LoRA projections and Liger's kernels are autograd functions, whose operators
    kept no tag, so the compiled forward saved their outputs: every projection, norm and
    attention output of every layer, as if nothing were checkpointed. On the H200 (torch
    2.11) 64 rows a micro-batch ran out of 8 GiB that way, where checkpointed around the
    compiled call 160 rows took 5.56 GiB (benchmarks/results/checkpoint_placement_h200.json).
    torch 2.12 checkpoints compiled regions through its selective-checkpointing path, which
    tags every operator, those of autograd functions included.
    """
    from packaging.version import Version

    return Version(version or torch.__version__).release[:2] >= (2, 12)


def place_checkpoints(model: nn.Module, inside: bool = True,
                      tag_every_op: bool | None = None) -> str:
    """Put each compiled layer's checkpoint inside its compiled code (or `inside=False`:
    around it); returns where, as `train` logs it.

    Inside, AOTAutograd's partitioner compiles the recomputation into the backward graph and
    keeps only what backward reads: six projections of seven (down_proj's output is the
    layer's output, which backward never reads) and the recomputed elementwise work fused with
    the backward's kernels (tests/test_fastpath.py::
    test_compiled_checkpointed_layers_recompute_in_backward_graph). Around, the whole
    compiled forward runs again before the backward, all seven projections.

    `tag_every_op` (default: where `compiler_recomputes_autograd_functions` is false, torch
    2.11): the checkpoint passes a selective-checkpointing context whose policy recomputes
    every operator. torch 2.11's compiler tags a region's operators for recomputation from
    that context as each is dispatched, which reaches those inside autograd functions (the
    fused LoRA, Liger's kernels), where a plain checkpoint tagged only the operators it traced
    directly and the compiled forward kept every activation (out of 8 GiB on the H200:
    benchmarks/results/checkpoint_placement_h200.json). torch >= 2.12 takes that path for a
    plain checkpoint itself. The test above runs it on the CPU with torch 2.11 and 2.13.

    Where transformers puts the checkpoint (`checkpoints_outside_compiled_layers`) decides
    the checkpoint function, which goes where transformers' `_set_gradient_checkpointing`
    puts its own, each layer's `_gradient_checkpointing_func`; the layers' on/off flags
    (`every_n_layers`) stay. transformers < 5.24 checkpoints around the compiled call: inside
    needs the checkpoint function compiled (dynamo inlines the layer's compiled call it
    meets). transformers >= 5.24 checkpoints inside `forward`, within the compiled call:
    around needs a checkpoint function the compiler steps out of (`torch.compiler.disable`),
    which calls the layer's forward compiled on its own.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if tag_every_op is None:
        tag_every_op = not compiler_recomputes_autograd_functions()
    if tag_every_op:
        logging.getLogger("torch._higher_order_ops.wrap").addFilter(_known_context_warning)
    plain = _checkpoint_tagging_every_op if tag_every_op else _checkpoint
    if checkpoints_outside_compiled_layers():
        function = _compiled(plain) if inside else _checkpoint
    else:
        function = plain if inside else _checkpoint_around_compiled
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._gradient_checkpointing_func = function
    if not inside:
        return "around"
    return "inside (every operator tagged for recomputation)" if tag_every_op else "inside"


def _checkpoint(function, *args):
    return checkpoint(function, *args, use_reentrant=False)


def _recompute(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_every_op():
    return create_selective_checkpoint_contexts(_recompute)


def _known_context_warning(record: logging.LogRecord) -> bool:
    """Drop torch's warning that a compiled checkpoint with a context may misbehave with
    in-place operators. The region's one in-place operator is the fused LoRA's accumulate
    into the output it has just allocated (fusedlora._accumulate), which the compiled graph
    functionalizes; the test above holds the compiled step's loss and gradients to the
    uncompiled one's under this context. Other torch warnings pass."""
    return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


def _checkpoint_tagging_every_op(function, *args):
    return checkpoint(function, *args, use_reentrant=False, context_fn=_recompute_every_op)


@functools.cache
def _compiled(function):
    return torch.compile(function)


def _call(function, *args):
    return function(*args)


@torch.compiler.disable
def _checkpoint_around_compiled(function, *args):
    return checkpoint(_compiled(_call), function, *args, use_reentrant=False)


@contextmanager
def compile_settings(cuda_graphs: bool = False):
    """Compiler settings for training the compiled layers (Trainer.train runs inside this).

    No common-subexpression elimination over a layer's joint forward-backward graph: the fused
    LoRA function dequantizes each 4-bit weight in forward and again in backward (to keep
    nothing weight-sized), and CSE merged the two into one, whose bf16 output the graph then
    saved for backward: every layer's full weights, 1.8 GiB for TinyLlama (969M weights x 2 B)
    without checkpointing. Without it the graph saves the 4-bit weight only
    (tests/test_fastpath.py::test_compiled_layers_save_no_dequantized_weight). A scoped
    setting, not a global one: read by every compilation inside the block, recompiles too.

    Side effects in a checkpointed region's forward are not replayed in its recomputation
    (`GROUP_SIDE_EFFECTS`, where this torch has the setting): fusedlora.ProjectionGroup's.

    With `cuda_graphs` (train.cuda_graphs) inductor wraps each graph compiled in the block in
    its CUDA graph trees, as torch.compile's `reduce-overhead` mode does; inductor reads the
    setting when it compiles a graph, so graphs compiled outside (or under `without_cuda_graphs`)
    run without.
    """
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    side_effects = ({GROUP_SIDE_EFFECTS: True} if compiled_layers_take_projection_groups()
                    else {})
    with functorch_config.patch(cse=False), dynamo_config.patch(side_effects), \
            inductor_config.patch({"triton.cudagraphs": cuda_graphs}):
        yield


# fusedlora.ProjectionGroup keeps q's siblings' outputs between calls: Python state the
# compiler sees mutated inside a checkpointed region. Its net effect on a layer's forward is
# nil (every kept output is taken by its member before the layer returns), so nothing needs
# replaying when backward recomputes the layer; without this setting dynamo breaks the graph
# there and the layer runs uncompiled.
GROUP_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def compiled_layers_take_projection_groups() -> bool:
    """Whether this torch compiles a checkpointed layer whose q/k/v form a ProjectionGroup."""
    import torch._dynamo.config as dynamo_config

    return hasattr(dynamo_config, GROUP_SIDE_EFFECTS)


@contextmanager
def without_cuda_graphs():
    """Graphs compiled in this block run without CUDA graphs (evaluation inside training).

    CUDA graph trees start a new generation at each compiled call that has no backward pending,
    which under no_grad is every layer: the previous layer's output, this layer's input, would
    be overwritten by the replay that reads it. Eval graphs (no grad) compile apart from the
    training graphs (dynamo guards on the grad mode), so they compile here without graphs.
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": False}):
        yield


def keep_grads_out_of_graph_pool(model: nn.Module) -> int:
    """With CUDA graphs: the first gradient of each trainable parameter is copied out of the
    graphs' memory pool before autograd stores it as `.grad`; returns how many parameters.

    Autograd keeps the first gradient tensor it gets for a parameter as its `.grad`. A backward
    graph's output lives in CUDA graph trees' pool, and the next micro-batch's replay
    overwrites it: with gradient accumulation the sum was lost (pytorch/pytorch#169545; on
    the H200: "accessing tensor output of CUDAGraphs that has been overwritten" at the LoRA
    gradient). The copy is made once per optimizer step, when `.grad` is None (Trainer sets
    them to None after each step); later micro-batches add into it in place.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.register_hook(functools.partial(_own_first_grad, param))
    return len(params)


def _own_first_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad.clone() if param.grad is None else grad


def _input_follows_grad_mode(module, args, output):
    wanted = torch.is_grad_enabled()
    if output.requires_grad != wanted and output.grad_fn is None:  # never on a trained output
        output.requires_grad_(wanted)


# --- activation offload ------------------------------------------------------------------------


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a decoder layer without keeping its activations; keep its input in host memory.

    Backward copies the input back, recomputes the layer with grad and backpropagates through
    it (as reentrant checkpointing does), restoring the RNG state so dropout masks match.
    """

    @staticmethod
    def forward(ctx, run, hidden, *rest):
        ctx.run, ctx.rest, ctx.device = run, rest, hidden.device
        # Backward runs outside the forward's autocast region: record it to recompute alike (as
        # torch.utils.checkpoint does), or the rebuilt layer runs in fp32 and differs.
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        stash = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu",
                            pin_memory=hidden.is_cuda)
        stash.copy_(hidden, non_blocking=True)
        ctx.stash = stash
        with torch.no_grad():
            return run(hidden, *rest)

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.stash.to(ctx.device, non_blocking=True).requires_grad_(True)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            kind, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden, *ctx.rest)
        torch.autograd.backward(out, grad_out)
        ctx.stash = None
        return (None, hidden.grad) + (None,) * len(ctx.rest)


def offloaded_checkpoint(function, hidden, *args, **kwargs):
    """Drop-in for torch.utils.checkpoint.checkpoint as transformers' checkpointing calls it."""
    kwargs.pop("use_reentrant", None)
    if kwargs:
        raise TypeError(f"offloaded_checkpoint got unexpected keyword arguments {sorted(kwargs)}")
    return _OffloadedCheckpoint.apply(function, hidden, *args)


def enable_offloaded_checkpointing(model: nn.Module, every_n_layers: int = 1) -> None:
    """Checkpoint decoder layers with their saved inputs in host memory.

    transformers >= 5.17 offers the same strategy as `gradient_checkpointing_enable(offload=True)`
    (torch's save_on_cpu around each checkpoint). This one is what the 98,304-token measurement
    under 8 GiB used (benchmarks/results/archive/bench_context_ours_h200_8gib.json); it stays
    until a side-by-side run shows the library's is as good. `_set_gradient_checkpointing`
    (PreTrainedModel, stable since 4.35) is the hook `gradient_checkpointing_enable` itself uses
    to install a checkpoint function.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint,
                                      every_n_layers=every_n_layers)
