"""Predict peak CUDA memory of a QLoRA training step from the architecture alone (no weights).

`estimate_peak_memory` adds up named terms, each derived below for transformers' Llama-style
decoder (Llama, Mistral, Qwen2, SmolLM2, TinyLlama) trained by `qlora-lab train`: bitsandbytes
4-bit (or 16-bit) base, peft LoRA on every linear projection, autocast in the compute dtype,
non-reentrant checkpointing of each decoder layer, and transformers' default loss (logits
upcast to fp32, then cross-entropy). Notation: N = micro_batch x seq_len tokens, H hidden size,
I intermediate size, KV = num_key_value_heads x head_dim, V vocab, L layers, r LoRA rank,
a = bytes of the compute dtype (2 for bf16/fp16).

Excluded: the CUDA context (outside the PyTorch allocator, roughly 0.3-0.6 GiB per process),
and paged optimizer state, which bitsandbytes allocates as CUDA
managed memory outside PyTorch's allocator and pages to host RAM under pressure.

Measured against real runs in benchmarks/results/memory_validation.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GIB = 2**30
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize: one absmax per 64 weights
DQ_BLOCK = 256  # double quantization: one fp32 absmax per 256 (uint8-quantized) absmaxes
# PyTorch's caching allocator rounds and splits blocks, so the reserved peak exceeds the
# allocated peak: 1.04-1.49x in the validation runs (largest with checkpointing at mid-size
# micro-batches). The budget search compares the *reserved* estimate with the budget.
RESERVED_OVER_ALLOCATED = 1.5
# With packing every micro-batch has the same shape, so freed blocks are reused as they are and
# the allocator holds less slack: 1.03-1.28x on the fast path (TinyLlama, 4 to 32 packed bins,
# H200; benchmarks/results/reserved_ratio_fastpath.json).
RESERVED_OVER_ALLOCATED_PACKED = 1.3
# Allocations no term above names (cuBLAS workspaces taken through PyTorch's allocator, rotary
# caches, bitsandbytes' quant-state tensors): the median unexplained residual of the validation
# runs, 55 MiB, nearly constant across models and sizes.
UNNAMED_BYTES = 55 * 2**20


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts memory depends on (from a preset or a config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"),
                   num_hidden_layers=get("num_hidden_layers"),
                   num_attention_heads=get("num_attention_heads"),
                   num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   head_dim=get("head_dim") or 0)

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 projections of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h),
                (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        return self.num_hidden_layers * sum(a * b for a, b in self.linear_shapes())


@dataclass(frozen=True)
class StepShape:
    """The training choices memory depends on."""

    micro_batch_size: int
    seq_len: int
    bits: int = 4
    double_quant: bool = True
    compute_bytes: int = 2
    lora_r: int = 16
    lora_bytes: int = 2
    lora_dropout: bool = True
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    gpus: int = 1
    strategy: str = "ddp"  # or "fsdp"
    # The fast path (fastpath.py). Defaults describe the plain path the coefficients were
    # fitted on; plan.step_shape fills them from a run config.
    fused_loss: bool = False
    loss_chunk_tokens: int = 4096
    activation_offload: bool = False
    mlp_tile_tokens: int = 8192
    checkpoint_every: int = 1  # selective checkpointing: every n-th layer
    packed: bool = False  # rows packed into fixed-length bins (train.packing)
    compiled: bool = False  # decoder layers torch.compiled (train.compile)

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    derivation: str


@dataclass(frozen=True)
class MemoryPlan:
    terms: tuple[MemoryTerm, ...]
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    excluded: str = ("the CUDA context (~0.3-0.6 GiB per process, outside PyTorch's allocator); "
                     "paged optimizer state (CUDA managed memory, outside PyTorch's allocator)")

    def as_dict(self) -> dict:
        return {"terms": [asdict(t) for t in self.terms],
                "peak_allocated_bytes": self.peak_allocated_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes, "excluded": self.excluded}


def _weight_terms(m: ModelShape, s: StepShape) -> list[MemoryTerm]:
    lin = m.linear_params()
    embed = m.vocab_size * m.hidden_size
    head = 0 if m.tie_word_embeddings else embed
    norms = (2 * m.num_hidden_layers + 1) * m.hidden_size
    if s.bits == 4:
        packed = lin // 2  # two 4-bit codes per byte
        if s.double_quant:
            # absmax quantized to uint8 (1 B per 64 weights) + fp32 second-level absmax per
            # 256 blocks, + a small fp32 offset/code per layer (ignored).
            consts = lin // NF4_BLOCK + 4 * lin // (NF4_BLOCK * DQ_BLOCK)
        else:
            consts = 4 * lin // NF4_BLOCK  # one fp32 absmax per 64 weights
        quant = [MemoryTerm("quantized_linear_weights", packed + consts,
                            f"{lin:,} projection weights x 0.5 B (NF4) + absmax constants")]
    else:
        quant = [MemoryTerm("linear_weights_16bit", lin * s.compute_bytes,
                            f"{lin:,} projection weights x {s.compute_bytes} B")]
    other = (embed + head + norms) * s.compute_bytes
    return quant + [MemoryTerm("embeddings_lm_head_norms", other,
                               "(V x H embeddings" + ("" if head == 0 else " + V x H lm_head")
                               + f" + norms) x {s.compute_bytes} B, not upcast to fp32")]


def _lora_terms(m: ModelShape, s: StepShape) -> list[MemoryTerm]:
    params = m.num_hidden_layers * sum(s.lora_r * (a + b) for a, b in m.linear_shapes())
    weights = params * s.lora_bytes
    grads = params * s.lora_bytes  # gradients take the parameter dtype
    if s.optimizer == "adamw_torch":
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter dtype.
        state, where = 2 * params * s.lora_bytes, "2 states x param dtype"
    elif s.optimizer == "adamw_8bit":
        state, where = 2 * params, "2 states x 1 B (blockwise 8-bit)"
    else:
        state, where = 0, "paged: CUDA managed memory, outside PyTorch's allocator"
    return [MemoryTerm("lora_weights", weights, f"{params:,} LoRA params x {s.lora_bytes} B"),
            MemoryTerm("lora_grads", grads, f"{params:,} x {s.lora_bytes} B"),
            MemoryTerm("optimizer_state", state, where)]


# Fitted per-token activation coefficients (bytes), from the first validation run on an H200
# (benchmarks/results/memory_validation.json, "calibration"): the tensor-by-tensor count in
# layer_activation_bytes_per_token's docstring over-counts H terms (PyTorch saves fewer copies
# than the naive count) and under-counts I terms; these are the measured values.
LAYER_BYTES_PER_H = 31.25
LAYER_BYTES_PER_I = 9.1
LOSS_BYTES_PER_V = 12.0
HEAD_BYTES_PER_H = 6.5


def layer_activation_bytes_per_token(m: ModelShape, s: StepShape) -> float:
    """Bytes one decoder layer keeps for backward, per token, without checkpointing.

    What is kept (bf16 unless noted): the two RMSNorms' fp32 inputs; the normed inputs of the
    q/k/v and gate/up projections; RoPE'd q and k; SDPA's q, k, v, output and fp32 logsumexp;
    gate and up outputs, SiLU output and their product (all of size I); and, with LoRA dropout,
    each adapter's dropped-out input and mask. Counted naively that is ~52H + 11I; measured with
    bf16 autocast and dropout 0.05 it is 31.25H + 9.1I (fitted on TinyLlama, SmolLM2-135M and a
    Qwen2-0.5B shape; within 2 % on each). Without dropout the true value is lower, so the
    estimate errs on the safe side.
    """
    scale = s.compute_bytes / 2  # coefficients were measured in bf16
    return scale * (LAYER_BYTES_PER_H * m.hidden_size + LAYER_BYTES_PER_I * m.intermediate_size)


def _activation_terms(m: ModelShape, s: StepShape) -> list[MemoryTerm]:
    n, a, L = s.tokens, s.compute_bytes, m.num_hidden_layers
    per_layer = int(layer_activation_bytes_per_token(m, s) * n)
    # On the fast path (fused_loss stands for it) the MLP runs in tiles above 2 tiles' worth of
    # tokens, so a recomputed layer holds only one tile of its (9.1I bytes/token) activations.
    # Compiled layers are not counted as tiled: at 32 x 1,024 tokens they peaked at 6.23 GiB
    # against eager's 5.20 (benchmarks/results/fastpath_sweep_h200_run3.json).
    tiled = ((s.fused_loss or s.activation_offload) and not s.compiled
             and n > 2 * s.mlp_tile_tokens)
    mlp_tokens = s.mlp_tile_tokens if tiled else n
    recomputed = int(a / 2 * (LAYER_BYTES_PER_H * m.hidden_size * n
                              + LAYER_BYTES_PER_I * m.intermediate_size * mlp_tokens))
    recomputed_note = ("one layer rebuilt in backward: 31.25H per token, + 9.1I per token "
                       + (f"of one {s.mlp_tile_tokens}-token MLP tile" if tiled
                          else "(MLP not tiled at this length)"))
    if s.activation_offload:
        # Layer inputs wait in host memory; on the GPU: the input being copied back plus the
        # one in use.
        return [MemoryTerm("offloaded_layer_inputs", 2 * n * m.hidden_size * a,
                           f"2 x N x H x {a} B on the GPU; L x N x H x {a} B in pinned host "
                           "memory"),
                MemoryTerm("recomputed_layer", recomputed, recomputed_note)]
    if s.gradient_checkpointing and s.checkpoint_every > 1:
        # transformers checkpoints layers 0, n, 2n, ...; the others keep all their activations.
        ckpt_layers = -(-L // s.checkpoint_every)
        return [MemoryTerm("checkpointed_layer_inputs", ckpt_layers * n * m.hidden_size * a,
                           f"{ckpt_layers} of {L} layers checkpointed (every "
                           f"{s.checkpoint_every}): their inputs, N x H x {a} B each"),
                MemoryTerm("layer_activations", (L - ckpt_layers) * per_layer,
                           f"{L - ckpt_layers} layers not checkpointed: (31.25H + 9.1I) bytes "
                           "per token each"),
                MemoryTerm("recomputed_layer", recomputed, recomputed_note)]
    if s.gradient_checkpointing:
        kept = L * n * m.hidden_size * a
        return [MemoryTerm("checkpointed_layer_inputs", kept,
                           f"L x N x H x {a} B: each layer's input, kept for recomputation"),
                MemoryTerm("recomputed_layer", recomputed, recomputed_note)]
    return [MemoryTerm("layer_activations", L * per_layer,
                       "L x (31.25H + 9.1I) bytes per token (see layer_activation_bytes_per_token)")]


def _loss_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    n = s.tokens
    if s.fused_loss:
        # fastpath.SupervisedHeadLoss: the supervised positions' states (all of them, at worst)
        # are gathered, then the head and loss run on chunks of loss_chunk_tokens, each
        # checkpointed: one chunk's fp32 logits and their gradient exist at a time. With Liger
        # the chunks are smaller still, so this bounds both (measured on an H200, TinyLlama
        # 4 x 1024: 2.15 GiB without Liger, 1.67 GiB with, against 2.19 GiB predicted).
        chunk = min(n, s.loss_chunk_tokens)
        return MemoryTerm("supervised_head_loss",
                          int(8 * chunk * m.vocab_size + s.compute_bytes * n * m.hidden_size
                              + HEAD_BYTES_PER_H * n * m.hidden_size),
                          f"{chunk} tokens x V x 8 B (one chunk's fp32 logits + gradient) + "
                          f"N x H x {s.compute_bytes} B (gathered states) + N x H x 6.5 B "
                          "(final norm)")
    # transformers upcasts the logits to fp32 for the loss: at the peak (start of backward) the
    # fp32 logits (4NV), the log-softmax output kept for backward (4NV) and the fp32 gradient
    # (4NV) coexist; the compute-dtype logits are already freed. Measured: 11.9-12.1 B per N x V.
    # The final RMSNorm keeps its fp32 input and output for backward (~6.5 B x N x H measured).
    return MemoryTerm("logits_and_loss",
                      int(LOSS_BYTES_PER_V * n * m.vocab_size + HEAD_BYTES_PER_H * n * m.hidden_size),
                      "N x V x 12 B (fp32 logits + log-softmax + gradient) + N x H x 6.5 B "
                      "(final norm)")


def _workspace_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    if s.bits != 4:
        return MemoryTerm("dequant_workspace", 0, "16-bit base: no dequantization")
    biggest = max(a * b for a, b in m.linear_shapes())
    # bitsandbytes dequantizes one projection to the compute dtype per matmul (and again in
    # backward for the input gradient); two can be alive at once around a layer boundary.
    return MemoryTerm("dequant_workspace", 2 * biggest * s.compute_bytes,
                      "2 x largest projection dequantized to the compute dtype")


def _distributed_terms(m: ModelShape, s: StepShape, static: list[MemoryTerm]
                       ) -> tuple[list[MemoryTerm], list[MemoryTerm]]:
    """Per-GPU changes under data parallelism (micro-batch and activations are per GPU).

    DDP keeps a full replica and adds flat gradient buckets the size of the trainable (LoRA)
    gradients: measured on 2 H200s, +0.02 GiB per GPU over one GPU for TinyLlama r=16
    (benchmarks/results/ddp_scaling.json), the size of its LoRA gradients.
    FSDP is modelled as `train` runs it (configs/accelerate_fsdp.yaml; not validated on GPUs yet):
    FSDP1, FULL_SHARD, flat parameters, one unit per decoder layer plus one per LoRA linear
    (peft's wrap policy), a root unit holding embeddings, lm_head and the final norm.
    """
    if s.gpus <= 1:
        return static, []
    if s.strategy == "ddp":
        grads = next(t.bytes for t in static if t.name == "lora_grads")
        return static, [MemoryTerm("ddp_gradient_buckets", grads,
                                   "flat all-reduce buckets = trainable gradient bytes")]
    return _fsdp_terms(m, s, static)


def _fsdp_terms(m: ModelShape, s: StepShape, static: list[MemoryTerm]
                ) -> tuple[list[MemoryTerm], list[MemoryTerm]]:
    g = s.gpus
    lora_params = next(t.bytes for t in static if t.name == "lora_weights") // s.lora_bytes
    lin = m.linear_params()
    consts = 0
    if s.bits == 4:
        packed = lin // 2
        consts = next(t.bytes for t in static if t.name == "quantized_linear_weights") - packed
    terms = []
    for t in static:
        if t.name == "quantized_linear_weights":
            # The packed codes are parameters (stored in the compute dtype, same bytes) and
            # shard; absmax and double-quant constants live in each layer's quant_state, which
            # is not a parameter, so every GPU keeps all of them.
            terms.append(MemoryTerm(t.name, packed // g + consts,
                                    f"{lin:,} weights x 0.5 B / {g} GPUs + absmax constants "
                                    "(quant_state, not sharded)"))
        elif t.name == "embeddings_lm_head_norms":
            # The root unit is not resharded between forward and backward (FSDP keeps it whole
            # for the backward that follows at once): its shard plus the gathered copy.
            terms.append(MemoryTerm(t.name, t.bytes + t.bytes // g,
                                    t.derivation + f"; root FSDP unit: gathered through "
                                    f"forward and backward, plus its 1/{g} shard"))
        elif t.name == "lora_weights":
            # accelerate keeps trainable flat parameters in fp32 under bf16/fp16 mixed precision.
            terms.append(MemoryTerm(t.name, 4 * lora_params // g,
                                    f"{lora_params:,} LoRA params x 4 B (fp32 master) / {g}"))
        elif t.name == "lora_grads":
            terms.append(MemoryTerm(t.name, 4 * lora_params // g,
                                    f"{lora_params:,} x 4 B / {g}: sharded fp32 gradients"))
        elif t.name == "optimizer_state":
            # Under FSDP `auto` is torch AdamW (paged 8-bit state fails to save there).
            state = 2 * 4 * lora_params // g if s.optimizer == "adamw_torch" else t.bytes // g
            terms.append(MemoryTerm(t.name, state, t.derivation + f", fp32, sharded / {g}"))
        else:
            terms.append(MemoryTerm(t.name, t.bytes // g, t.derivation + f", sharded / {g}"))
    layer_bytes = sum(a * b for a, b in m.linear_shapes())
    layer_bytes = layer_bytes // 2 if s.bits == 4 else layer_bytes * s.compute_bytes
    return terms, [MemoryTerm("fsdp_gathered_layer", 2 * layer_bytes,
                              "one decoder layer's weights all-gathered, plus the next one "
                              "prefetched (BACKWARD_PRE)")]


def estimate_peak_memory(model: ModelShape, step: StepShape) -> MemoryPlan:
    """Peak PyTorch-allocated bytes of one training step (per GPU), as named, derived terms."""
    static, extra = _distributed_terms(model, step,
                                       _weight_terms(model, step) + _lora_terms(model, step))
    static = static + extra
    act = _activation_terms(model, step)
    loss = _loss_term(model, step)
    work = _workspace_term(model, step)
    if step.gradient_checkpointing:
        # The loss peak (end of forward / start of backward) and the recompute peak of one layer
        # do not overlap: take the larger, on top of the kept layer inputs.
        transient = max(loss.bytes, act[1].bytes + work.bytes)
        peak = sum(t.bytes for t in static) + act[0].bytes + transient
    else:
        peak = sum(t.bytes for t in static) + act[0].bytes + max(loss.bytes, work.bytes)
    other = MemoryTerm("unnamed_allocations", UNNAMED_BYTES,
                       "cuBLAS workspaces, rotary caches, quant-state tensors (measured median)")
    peak += other.bytes
    terms = tuple(static + act + [loss, work, other])
    ratio = RESERVED_OVER_ALLOCATED_PACKED if step.packed else RESERVED_OVER_ALLOCATED
    return MemoryPlan(terms, int(peak), int(peak * ratio))


# --- fitting a run to a budget -------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """'8GiB', '7.5GB', '8000MiB', '8g' -> bytes (GB/GiB both read as binary, as GPUs are sold)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read {text!r} as a size — write e.g. 8GiB or 7500MiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


@dataclass(frozen=True)
class Candidate:
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    peak_allocated_bytes: int
    predicted_tokens_per_s: float
    fits: bool
    checkpoint_every: int = 1
    activation_offload: bool = False

    @property
    def activation_strategy(self) -> str:
        if not self.gradient_checkpointing:
            return "none"
        if self.activation_offload:
            return "checkpointing, inputs offloaded to host"
        if self.checkpoint_every > 1:
            return f"checkpointing every {self.checkpoint_every} layers"
        return "checkpointing"


def predicted_throughput(model: ModelShape, step: StepShape, flops_per_s: float = 200e12,
                         step_overhead_s: float = 0.35) -> float:
    """A simple, documented cost model for ranking configs (not a benchmark).

    Time per micro-batch = fixed overhead (kernel launches of ~150 quantized LoRA layers, which
    dominate at small batches: measured ~0.35-0.6 s per micro-batch on an H200 with the plain
    stack) + 6 x params x tokens / achievable FLOP/s, x 4/3 when checkpointing recomputes the
    forward.
    """
    params = model.linear_params() + model.vocab_size * model.hidden_size
    compute = 6 * params * step.tokens / flops_per_s
    if step.gradient_checkpointing:
        # The recomputed forward (2 of the 6 FLOPs per parameter) of the checkpointed layers.
        ckpt_share = (-(-model.num_hidden_layers // step.checkpoint_every)
                      / model.num_hidden_layers)
        compute *= 1 + ckpt_share / 3
    if step.activation_offload:
        # Each layer input crosses PCIe twice (~25 GB/s each way on a typical card), on the
        # compute stream.
        compute += 2 * model.num_hidden_layers * step.tokens * model.hidden_size * 2 / 25e9
    return step.tokens / (step_overhead_s + compute)


# Activation strategies the budget search tries, cheapest in time first:
# (gradient_checkpointing, checkpoint_every, activation_offload).
STRATEGIES = ((False, 1, False), (True, 4, False), (True, 2, False), (True, 1, False),
              (True, 1, True))


def fit_to_budget(model: ModelShape, base: StepShape, budget_bytes: int,
                  micro_batches=(1, 2, 4, 8, 16, 32), optimizers=("paged_adamw_8bit",)
                  ) -> tuple[Candidate | None, list[Candidate]]:
    """Search micro-batch x checkpointing x optimizer at the needed sequence length.

    The budget is compared with the predicted *reserved* peak (what the card must hold), so the
    allocator's overhead is inside the budget too. Returns the fastest feasible candidate.
    """
    cands = _candidates(model, base, budget_bytes, micro_batches, optimizers, offload=False)
    if not any(c.fits for c in cands) and base.fused_loss:
        # Offloading checkpoints to host memory is the last resort: it was measured for long
        # rows (98,304 tokens in 8 GiB), not for speed, so it is chosen only when nothing else
        # fits.
        cands += _candidates(model, base, budget_bytes, micro_batches, optimizers, offload=True)
    feasible = [c for c in cands if c.fits]
    best = max(feasible, key=lambda c: c.predicted_tokens_per_s, default=None)
    return best, cands


def _candidates(model: ModelShape, base: StepShape, budget_bytes: int, micro_batches,
                optimizers, offload: bool) -> list[Candidate]:
    cands = []
    for mb in micro_batches:
        for ckpt, every, strategy_offload in STRATEGIES:
            if strategy_offload != offload:
                continue
            for opt in optimizers:
                step = replace(base, micro_batch_size=mb, gradient_checkpointing=ckpt,
                               optimizer=opt, checkpoint_every=every,
                               activation_offload=offload)
                plan = estimate_peak_memory(model, step)
                cands.append(Candidate(mb, step.seq_len, ckpt, opt, plan.peak_allocated_bytes,
                                       predicted_throughput(model, step),
                                       plan.peak_reserved_bytes <= budget_bytes, every,
                                       offload))
    return cands


def shorter_seq_fallback(model: ModelShape, base: StepShape, budget_bytes: int):
    """When nothing fits at the needed length, the longest power-of-two length that does."""
    seq = base.seq_len
    while seq > 64:
        seq //= 2
        best, _ = fit_to_budget(model, replace(base, seq_len=seq), budget_bytes)
        if best is not None:
            return best
    return None
