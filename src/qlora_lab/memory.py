"""Predict peak CUDA memory of a `qlora-lab train` step from the architecture alone (no weights).

`estimate_peak_memory` adds up named terms, each derived below for the path `train` runs
(train.setup_training): a bitsandbytes 4-bit (or 16-bit) base, peft LoRA on every linear layer
but the LM head (`all-linear`), fp32 adapter weights under bf16 autocast (lora.weight_dtype),
the fast path of fastpath.py (fused SwiGLU with MLP tiling, Liger RMSNorm and Liger's fused
linear cross-entropy on CUDA, or the chunked SupervisedHeadLoss without Liger), packed bins,
and full, selective or offloaded non-reentrant checkpointing of the decoder layers.

Notation: N = tokens of one micro-batch (micro_batch_size rows x seq_len, every row at full
length: the worst case packing can produce), H hidden size, q / kv the query / key-value widths
(heads x head_dim), I the MLP width, V vocabulary, L layers, r LoRA rank, a = bytes of the compute
dtype (2 for bf16). Activation terms count, tensor by tensor, what autograd saves for backward;
each is named in `layer_saved_bytes_per_token`'s docstring.

Excluded: the CUDA context (outside PyTorch's allocator, roughly 0.3-0.6 GiB per process) and
paged optimizer state, which bitsandbytes allocates as CUDA managed memory outside PyTorch's
allocator and pages to host RAM under pressure.

Measured against real runs of `train`'s own setup: benchmarks/memory_validation_v2.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from qlora_lab.errors import UserError

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
# Allocations no term names (cuBLAS workspaces taken through PyTorch's allocator, rotary
# caches, bitsandbytes' quant-state tensors): the median unexplained residual of the first
# validation runs, 55 MiB, nearly constant across models and sizes.
UNNAMED_BYTES = 55 * 2**20
# The plain path's loss (transformers' ForCausalLMLoss on full logits): at the start of backward
# the fp32 logits, the log-softmax kept for backward and its fp32 gradient coexist; measured
# 11.9-12.1 B per N x V (benchmarks/results/memory_validation.json).
LOSS_BYTES_PER_V = 12.0
# How the decoder's norms run, per token and per norm, in bytes per hidden unit (a = 2):
# Liger's RMSNorm keeps its input and output (a + a); transformers' RMSNorm keeps an fp32 copy
# of its input and its output (4 + a); LayerNorm under autocast runs in fp32 (input copy, output)
# and the next matmul keeps a 16-bit cast of it (4 + 4 + a).
NORM_KINDS = ("rms", "rms_fp32", "layer")
MLP_KINDS = ("swiglu", "gated", "plain", "moe")


@dataclass(frozen=True)
class ModelShape:
    """The architecture facts memory depends on.

    The first eight fields are a Llama-style config's; the rest default to what such a config
    implies and are filled from the real module tree by plan.census (any architecture
    transformers builds) when they differ.

    linears: (in_features, out_features, count) of every linear layer 4-bit quantization and
        LoRA apply to (all nn.Linear and GPT-2 Conv1D but the LM head), over the whole model.
    linear_bias_params: their biases (e.g. Qwen2's q/k/v bias), kept in the compute dtype.
    embedding_params / head_params / norm_params: input (and position) embeddings, an untied
        LM head (0 when tied), every norm weight and bias; all in the compute dtype.
    frozen_params: other weights, neither quantized nor adapted (MoE experts, routers).
    expert_params: the part of frozen_params that is routed experts (for throughput).
    fp32_params: weights transformers keeps in fp32 (`_keep_in_fp32_modules`).
    mlp: "swiglu" (gate/up/down with SiLU: the fast path's FusedSwiGLU takes it), "gated" (any
        other gated MLP: fused gate_up, GeLU), "plain" (up, activation, down) or "moe".
    norm_kind: "rms" (Liger swaps it on CUDA), "rms_fp32" (computes in fp32, not swapped:
        Gemma), "layer" (LayerNorm). norms_per_layer counts the hidden-size norms of a layer.
    final_norm: the decoder has a final `norm` module (the fused loss reads its output).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool = False
    head_dim: int = 0
    linears: tuple[tuple[int, int, int], ...] = ()
    linear_bias_params: int = 0
    embedding_params: int = -1
    head_params: int = -1
    norm_params: int = -1
    frozen_params: int = 0
    expert_params: int = 0
    fp32_params: int = 0
    mlp: str = "swiglu"
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    norms_per_layer: int = 2
    norm_kind: str = "rms"
    qk_norm: bool = False
    final_norm: bool = True
    source: str = "config arithmetic"

    def __post_init__(self) -> None:
        h, layers = self.hidden_size, self.num_hidden_layers
        if not self.head_dim:
            object.__setattr__(self, "head_dim", h // self.num_attention_heads)
        if not self.linears:
            i, q, kv = self.intermediate_size, self.q_dim, self.kv_dim
            # q, k, v, o projections; gate, up, down.
            counts = _count([(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)], layers)
            object.__setattr__(self, "linears",
                               tuple((a, b, n) for (a, b), n in sorted(counts.items())))
        defaults = {"embedding_params": self.vocab_size * h,
                    "head_params": 0 if self.tie_word_embeddings else self.vocab_size * h,
                    "norm_params": (self.norms_per_layer * layers + 1) * h}
        for name, value in defaults.items():
            if getattr(self, name) < 0:
                object.__setattr__(self, name, value)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """A Llama-style decoder (Llama, Mistral, Qwen2/3, SmolLM2, TinyLlama) by arithmetic.

        Presets are planned this way, without torch; tests/test_plan.py checks the counts
        against the module tree transformers builds for each family this accepts.
        """
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        h, layers = get("hidden_size"), get("num_hidden_layers")
        heads = get("num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or h // heads
        model_type = get("model_type", "llama")
        # Qwen2 has q/k/v biases by design; Llama-family configs switch them with attention_bias.
        qkv_bias = model_type == "qwen2" or bool(get("attention_bias", False))
        bias = layers * (heads + 2 * kv_heads) * head_dim if qkv_bias else 0
        if get("mlp_bias", False):
            bias += layers * (2 * get("intermediate_size") + h)
        return cls(vocab_size=get("vocab_size"), hidden_size=h,
                   intermediate_size=get("intermediate_size"), num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                   tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   head_dim=head_dim, linear_bias_params=bias,
                   qk_norm=model_type == "qwen3",
                   norm_params=(2 * layers + 1) * h
                   + (2 * layers * head_dim if model_type == "qwen3" else 0))

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    def linear_params(self) -> int:
        return sum(a * b * n for a, b, n in self.linears)

    def lora_params(self, r: int) -> int:
        return sum(r * (a + b) * n for a, b, n in self.linears)

    def largest_linear(self) -> int:
        return max(a * b for a, b, _ in self.linears)

    def layer_linear_inputs(self) -> float:
        """Sum of in_features over one layer's adapted linears (LoRA dropout copies these)."""
        return sum(a * n for a, _, n in self.linears) / self.num_hidden_layers

    def active_params(self) -> float:
        """Parameters one token runs through (routed experts: the active share)."""
        share = self.experts_per_token / self.num_experts if self.num_experts else 0.0
        return (self.linear_params() + self.frozen_params - self.expert_params
                + self.expert_params * share + self.vocab_size * self.hidden_size)


def _count(shapes: list[tuple[int, int]], layers: int) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + layers
    return counts


@dataclass(frozen=True)
class StepShape:
    """The training choices memory depends on.

    Defaults describe the plain path (no fast path); plan.step_shape fills every field from a
    run config, as `train` will run it.
    """

    micro_batch_size: int
    seq_len: int
    bits: int = 4
    double_quant: bool = True
    compute_bytes: int = 2
    lora_r: int = 16
    lora_bytes: int = 4  # fp32 adapters (lora.weight_dtype float32, the default); 2 = compute
    lora_dropout: bool = True
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    gpus: int = 1
    strategy: str = "ddp"  # or "fsdp"
    fused_loss: bool = False  # loss from the final hidden states (fastpath.SupervisedHeadLoss)
    loss_chunk_tokens: int = 4096  # its chunk without Liger
    liger: bool = False  # Liger kernels: RMSNorm, SwiGLU, fused linear cross-entropy
    activation_offload: bool = False
    mlp_tile_tokens: int = 8192
    checkpoint_every: int = 1  # selective checkpointing: every n-th layer
    packed: bool = False  # rows packed into fixed-length bins (train.packing)
    compiled: bool = False  # decoder layers torch.compiled (train.compile)
    attn_implementation: str = "sdpa"
    # Rows shorter than their bin (real data): SDPA/eager then get a block-diagonal (packed) or
    # padding mask and run GQA by repeating k/v. False: every row fills its bin (validation).
    short_rows: bool = True

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
    peak_phase: str = ""

    def as_dict(self) -> dict:
        return {"terms": [asdict(t) for t in self.terms],
                "peak_allocated_bytes": self.peak_allocated_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes, "peak_phase": self.peak_phase,
                "excluded": self.excluded}


# --- weights and adapters ---------------------------------------------------------------------


def _weight_terms(m: ModelShape, s: StepShape) -> list[MemoryTerm]:
    lin = m.linear_params()
    if s.bits == 4:
        packed = lin // 2  # two 4-bit codes per byte
        if s.double_quant:
            # absmax quantized to uint8 (1 B per 64 weights) + fp32 second-level absmax per
            # 256 blocks, + a small fp32 offset/code per layer (ignored).
            consts = lin // NF4_BLOCK + 4 * lin // (NF4_BLOCK * DQ_BLOCK)
        else:
            consts = 4 * lin // NF4_BLOCK  # one fp32 absmax per 64 weights
        quant = MemoryTerm("quantized_linear_weights", packed + consts,
                           f"{lin:,} linear weights x 0.5 B (NF4) + absmax constants")
    else:
        quant = MemoryTerm("linear_weights_16bit", lin * s.compute_bytes,
                           f"{lin:,} linear weights x {s.compute_bytes} B")
    a = s.compute_bytes
    other = m.embedding_params + m.head_params + m.norm_params + m.linear_bias_params
    terms = [quant, MemoryTerm(
        "embeddings_lm_head_norms", other * a,
        f"({m.embedding_params:,} embedding" + (" + untied lm_head" if m.head_params else
                                                 ", lm_head tied to it")
        + f" + {m.norm_params:,} norm + {m.linear_bias_params:,} bias params) x {a} B")]
    if m.frozen_params or m.fp32_params:
        terms.append(MemoryTerm(
            "frozen_16bit_weights", m.frozen_params * a + m.fp32_params * 4,
            f"{m.frozen_params:,} params neither quantized nor adapted (MoE experts: all of "
            f"them, routers) x {a} B + {m.fp32_params:,} kept in fp32 x 4 B"))
    return terms


def _lora_terms(m: ModelShape, s: StepShape) -> list[MemoryTerm]:
    params = m.lora_params(s.lora_r)
    weights = params * s.lora_bytes
    grads = params * s.lora_bytes  # gradients take the parameter dtype (fp32 for fp32 masters)
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


# --- activations --------------------------------------------------------------------------------


def _norm_bytes(m: ModelShape, s: StepShape) -> float:
    """Bytes per hidden unit one norm keeps, besides its input (see NORM_KINDS)."""
    a = s.compute_bytes
    if m.norm_kind == "rms":
        return a if s.liger else 4 + a
    if m.norm_kind == "rms_fp32":
        return 4 + a
    return 4 + 4 + a


def _keeps_norm_input(m: ModelShape, s: StepShape) -> bool:
    return m.norm_kind == "rms" and s.liger  # Liger's RMSNorm saves X itself


def _masked(s: StepShape) -> bool:
    """SDPA/eager get an explicit mask: several rows per micro-batch, shorter than their bins
    (packed bins restart positions, padded rows have padding). One row alone fills its bin."""
    return (s.short_rows and s.micro_batch_size > 1
            and s.attn_implementation != "flash_attention_2")


def mlp_saved_bytes_per_token(m: ModelShape, s: StepShape) -> float:
    """What one layer's MLP keeps for backward, per token (its input aside).

    swiglu, through fastpath.FusedSwiGLU: gate and up outputs and their product (3I; Liger's
    SiLU-mul saves its two inputs), + silu(gate) without Liger (4I). Other gated MLPs: gate,
    activation, up, product (4I; a fused gate_up output is one tensor of 2I). Plain MLPs: up
    output, the activation's intermediates and output (~5I, GPT-2's tanh GeLU). MoE, per routed
    slot (top-k per token): the gathered input, gate_up output, activation, product and the
    expert output before weighting (2H + 4I_e), + the router's logits and fp32 softmax (10 B per
    expert) + a shared expert as a gated MLP.
    """
    a = s.compute_bytes
    if m.mlp == "swiglu":
        return a * m.intermediate_size * (3 if s.liger else 4)
    if m.mlp == "gated":
        return a * m.intermediate_size * 4
    if m.mlp == "plain":
        return a * m.intermediate_size * 5
    slots = m.experts_per_token * (2 * a * m.hidden_size + 4 * a * m.expert_intermediate_size)
    return slots + 10 * m.num_experts + 4 * a * m.shared_intermediate_size


def attention_saved_bytes_per_token(m: ModelShape, s: StepShape) -> float:
    """What one layer's attention keeps (its normed input aside), per token.

    RoPE'd q and k, v (SDPA/flash keep all three), the attention output, its transposed copy
    (o_proj's input) and the fp32 log-sum-exp per head. With an explicit mask, transformers runs
    GQA by repeating k/v to every query head (transformers' use_gqa_in_sdpa), so k and v are
    q-wide; eager attention also keeps the fp32 and 16-bit probabilities (heads x seq_len each).
    Per-head q/k norms (Qwen3) keep their inputs.
    """
    a = s.compute_bytes
    kv = m.q_dim if _masked(s) and m.num_key_value_heads < m.num_attention_heads else m.kv_dim
    saved = a * (3 * m.q_dim + 2 * kv) + 4 * m.num_attention_heads
    if m.qk_norm:
        saved += (m.q_dim + m.kv_dim) * (a if m.norm_kind == "rms" and s.liger else 4)
    if s.attn_implementation == "eager":
        saved += (4 + a) * m.num_attention_heads * s.seq_len
    return saved


def layer_saved_bytes_per_token(m: ModelShape, s: StepShape, mlp_tokens_share: float = 1.0
                                ) -> float:
    """Bytes one decoder layer keeps for backward, per token, without checkpointing.

    Its norms (`norms_per_layer`, see NORM_KINDS; with Liger the residual sum each norm reads
    is kept too), attention (attention_saved_bytes_per_token), MLP (mlp_saved_bytes_per_token,
    scaled by the share of tokens held at once when the MLP runs in tiles), and per LoRA
    adapter its A output (r) and, with dropout, its dropped-out input and mask (a + 1 bytes per
    input feature). The layer's own input is counted by the caller (it is the checkpoint).
    """
    a = s.compute_bytes
    h = m.hidden_size
    norms = m.norms_per_layer * h * _norm_bytes(m, s)
    if _keeps_norm_input(m, s):
        norms += (m.norms_per_layer - 1) * a * h  # the residual sums the later norms read
    adapters = sum(n for _, _, n in m.linears) / m.num_hidden_layers
    lora = a * s.lora_r * adapters
    if s.lora_dropout:
        lora += (a + 1) * m.layer_linear_inputs()
    return (norms + attention_saved_bytes_per_token(m, s)
            + mlp_saved_bytes_per_token(m, s) * mlp_tokens_share + lora)


def layer_backward_bytes_per_token(m: ModelShape, s: StepShape, mlp_tokens_share: float = 1.0
                                   ) -> float:
    """What one layer holds at the worst moment of its backward, per token: its saved tensors
    plus the gradients alive then, whichever of two moments is larger.

    In the MLP's backward: the gradient arriving at the layer's output and the one it sends on
    (a x H each) and the MLP's widest gradient (a x I; routed: per slot). In attention's
    backward, the MLP's tensors already freed: the same two a x H, the output's gradient
    (a x q), dq, dk, dv (a x (q + 2 kv)) and FlashAttention's fp32 dq accumulator (4 x q)
    with its fp32 row sums (4 per head).
    """
    a, h = s.compute_bytes, m.hidden_size
    saved = layer_saved_bytes_per_token(m, s, mlp_tokens_share)
    width = (m.experts_per_token * m.expert_intermediate_size + m.shared_intermediate_size
             if m.mlp == "moe" else m.intermediate_size)
    in_mlp = saved + 2 * a * h + a * width * mlp_tokens_share
    in_attention = (saved - mlp_saved_bytes_per_token(m, s) * mlp_tokens_share + 2 * a * h
                    + a * (2 * m.q_dim + 2 * m.kv_dim) + 4 * m.q_dim
                    + 4 * m.num_attention_heads)
    return max(in_mlp, in_attention)


def _mlp_tiled(m: ModelShape, s: StepShape) -> bool:
    # fastpath.FusedSwiGLU runs the MLP in tiles above 2 tiles' worth of tokens, each tile
    # checkpointed, in eager layers. Compiled layers are not counted as tiled: at 32 x 1,024
    # tokens they peaked at 6.23 GiB against eager's 5.20 (fastpath_sweep_h200_run3.json).
    return m.mlp == "swiglu" and not s.compiled and s.tokens > 2 * s.mlp_tile_tokens


def _activation_terms(m: ModelShape, s: StepShape) -> tuple[list[MemoryTerm], MemoryTerm]:
    """(terms kept from forward into backward, the transient of one layer's backward)."""
    n, a, layers, h = s.tokens, s.compute_bytes, m.num_hidden_layers, m.hidden_size
    share = s.mlp_tile_tokens / n if _mlp_tiled(m, s) else 1.0
    tile_note = (f"; MLP in {s.mlp_tile_tokens}-token tiles, one tile's activations at a time"
                 if share < 1 else "")
    per_layer = layer_saved_bytes_per_token(m, s, share)
    kept_input = a * h if _keeps_norm_input(m, s) else 0  # a kept layer's input, saved by its norm
    in_backward = layer_backward_bytes_per_token(m, s, share)
    recomputed = MemoryTerm("recomputed_layer", int(in_backward * n),
                            f"one layer rebuilt in backward: {per_layer:,.0f} B/token saved, "
                            f"{in_backward:,.0f} with its gradients" + tile_note)
    if not s.gradient_checkpointing:
        kept = MemoryTerm("layer_activations", int(layers * (per_layer + kept_input) * n),
                          f"L x N x {per_layer + kept_input:,.0f} B (each layer's saved "
                          "tensors, see layer_saved_bytes_per_token)" + tile_note)
        backward = MemoryTerm("layer_backward", int((in_backward - per_layer) * n),
                              "one layer's gradients (its saved tensors are counted above)")
        return [kept, _lora_cast_term(m, s, layers)], backward
    if s.activation_offload:
        # Layer inputs wait in host memory; on the GPU: the input being copied back plus the
        # one in use. fastpath._OffloadedCheckpoint rebuilds the whole layer, its output too
        # (non-reentrant checkpointing stops at the last saved tensor).
        offloaded = replace(recomputed, bytes=recomputed.bytes + a * h * n,
                            derivation=recomputed.derivation + f" + its output (N x H x {a} B)")
        return [MemoryTerm("offloaded_layer_inputs", 2 * n * h * a,
                           f"2 x N x H x {a} B on the GPU; L x N x H x {a} B in pinned host "
                           "memory")], offloaded
    ckpt = -(-layers // s.checkpoint_every)  # transformers checkpoints layers 0, k, 2k, ...
    terms = [MemoryTerm("checkpointed_layer_inputs", ckpt * n * h * a,
                        f"{ckpt} of {layers} layers checkpointed: each one's input, N x H x "
                        f"{a} B")]
    if ckpt < layers:
        terms += [MemoryTerm("layer_activations", int((layers - ckpt) * (per_layer + kept_input)
                                                      * n),
                             f"{layers - ckpt} layers not checkpointed (every "
                             f"{s.checkpoint_every}): N x {per_layer + kept_input:,.0f} B each"
                             + tile_note),
                  _lora_cast_term(m, s, layers - ckpt)]
    return terms, recomputed


def _lora_cast_term(m: ModelShape, s: StepShape, layers: int) -> MemoryTerm:
    # fp32 adapters under bf16 autocast: each matmul keeps the 16-bit cast of its weight for
    # backward (checkpointed layers rebuild theirs one layer at a time).
    extra = m.lora_params(s.lora_r) * s.compute_bytes * layers // m.num_hidden_layers
    if s.lora_bytes <= s.compute_bytes:
        extra = 0
    return MemoryTerm("lora_autocast_casts", extra,
                      f"16-bit casts of {layers} layers' fp32 adapters, kept for backward")


def _loss_chunk_rows(m: ModelShape, n: int) -> int:
    """Liger's fused linear cross-entropy chunk: ceil(N / ceil(V / H)) rounded up to a power of
    two, at most N (liger_kernel/ops/fused_linear_cross_entropy.py, 0.8.5), so one chunk's
    logits hold about N x H elements whatever the vocabulary."""
    inc = -(-m.vocab_size // m.hidden_size)
    rows = -(-n // inc)
    return min(n, 1 << (rows - 1).bit_length())


def _loss_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    n, a, h, v = s.tokens, s.compute_bytes, m.hidden_size, m.vocab_size
    if s.fused_loss and not m.final_norm:
        # As train refuses it (fastpath.FinalHiddenStates reads the decoder's final `norm`).
        raise UserError("train.fused_loss needs a decoder with a final `norm` module and this "
                        "model has none — set train.fused_loss to false")
    # The final norm: its output (what the head reads) and, per its kind, its fp32 input copy;
    # the last layer's output it reads is kept by Liger's norm.
    final = n * h * (_norm_bytes(m, s) + (a if _keeps_norm_input(m, s) else 0))
    if s.fused_loss and s.liger:
        # fastpath.SupervisedHeadLoss -> LigerFusedLinearCrossEntropyFunction: every position
        # supervised at worst; the gathered states, the input gradient it computes in forward,
        # one chunk's 16-bit logits (overwritten in place by their gradient), fp32 losses.
        rows = _loss_chunk_rows(m, n)
        return MemoryTerm("fused_linear_cross_entropy",
                          int(final + 2 * a * n * h + a * rows * v + 4 * n),
                          f"Liger: {rows:,}-token chunks x V x {a} B (never N x V) + N x H x "
                          f"{2 * a} B (states, their gradient) + final norm")
    if s.fused_loss:
        # Without Liger: the states, their gradient, and one checkpointed chunk rebuilt in
        # backward: 16-bit and fp32 logits, the log-softmax and its gradient (12 B x V).
        rows = min(n, s.loss_chunk_tokens)
        return MemoryTerm("supervised_head_loss",
                          int(final + 2 * a * n * h + 12 * rows * v),
                          f"{rows:,}-token chunks x V x 12 B + N x H x {2 * a} B (states, "
                          "their gradient) + final norm")
    return MemoryTerm("logits_and_loss", int(final + LOSS_BYTES_PER_V * n * v),
                      "N x V x 12 B (fp32 logits + log-softmax + gradient) + final norm")


def _mask_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    if not _masked(s):
        return MemoryTerm("attention_mask", 0, "no explicit mask (full rows or FlashAttention)")
    # transformers builds a (B, 1, S, S) boolean mask once per step; SDPA converts it to the
    # query dtype in the layer that runs (one layer at a time in backward).
    b, t = s.micro_batch_size, s.seq_len
    return MemoryTerm("attention_mask", b * t * t * (1 + s.compute_bytes),
                      "B x S x S boolean block-diagonal mask + its 16-bit copy in one layer")


def _workspace_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    if s.bits != 4:
        return MemoryTerm("dequant_workspace", 0, "16-bit base: no dequantization")
    # bitsandbytes dequantizes one weight to the compute dtype per matmul (and again in
    # backward for the input gradient); two can be alive at once around a layer boundary.
    return MemoryTerm("dequant_workspace", 2 * m.largest_linear() * s.compute_bytes,
                      "2 x largest linear weight dequantized to the compute dtype")


# --- data parallelism ---------------------------------------------------------------------------


def _distributed_terms(m: ModelShape, s: StepShape, static: list[MemoryTerm]
                       ) -> tuple[list[MemoryTerm], list[MemoryTerm]]:
    """Per-GPU changes under data parallelism (micro-batch and activations are per GPU).

    DDP keeps a full replica and adds flat gradient buckets the size of the trainable (LoRA)
    gradients: measured on 2 H200s, +0.02 GiB per GPU over one GPU for TinyLlama r=16
    (benchmarks/results/ddp_scaling.json), the size of its LoRA gradients.
    FSDP is modelled as `train` runs it (configs/accelerate_fsdp.yaml): FSDP1, FULL_SHARD, flat
    parameters, one unit per decoder layer plus one per LoRA linear (peft's wrap policy), a root
    unit holding embeddings, lm_head and the final norm.
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
    lora_params = m.lora_params(s.lora_r)
    lin = m.linear_params()
    packed = lin // 2
    terms = []
    for t in static:
        if t.name == "quantized_linear_weights":
            # The packed codes are parameters (stored in the compute dtype, same bytes) and
            # shard; absmax and double-quant constants live in each layer's quant_state, which
            # is not a parameter, so every GPU keeps all of them.
            terms.append(MemoryTerm(t.name, packed // g + t.bytes - packed,
                                    f"{lin:,} weights x 0.5 B / {g} GPUs + absmax constants "
                                    "(quant_state, not sharded)"))
        elif t.name == "embeddings_lm_head_norms":
            # The root unit is not resharded between forward and backward (FSDP keeps it whole
            # for the backward that follows at once): its shard plus the gathered copy.
            terms.append(MemoryTerm(t.name, t.bytes + t.bytes // g,
                                    t.derivation + f"; root FSDP unit: gathered through "
                                    f"forward and backward, plus its 1/{g} shard"))
        elif t.name in ("lora_weights", "lora_grads"):
            # accelerate keeps trainable flat parameters (and so their gradients) in fp32.
            terms.append(MemoryTerm(t.name, 4 * lora_params // g,
                                    f"{lora_params:,} LoRA params x 4 B (fp32) / {g} GPUs"))
        elif t.name == "optimizer_state":
            # Under FSDP `auto` is torch AdamW (paged 8-bit state fails to save there).
            state = 2 * 4 * lora_params // g if s.optimizer == "adamw_torch" else t.bytes // g
            terms.append(MemoryTerm(t.name, state, t.derivation + f", fp32, sharded / {g}"))
        else:
            terms.append(MemoryTerm(t.name, t.bytes // g, t.derivation + f", sharded / {g}"))
    layer = lin // m.num_hidden_layers
    layer_bytes = layer // 2 if s.bits == 4 else layer * s.compute_bytes
    return terms, [MemoryTerm("fsdp_gathered_layer", 2 * layer_bytes,
                              "one decoder layer's weights all-gathered, plus the next one "
                              "prefetched (BACKWARD_PRE)")]


# --- the estimate -------------------------------------------------------------------------------


def estimate_peak_memory(model: ModelShape, step: StepShape) -> MemoryPlan:
    """Peak PyTorch-allocated bytes of one training step (per GPU), as named, derived terms.

    The step's peak is the larger of two moments, on top of the weights, adapters and what
    forward keeps for backward: the end of forward, when the loss runs; and one layer's
    backward, when checkpointing rebuilds it (plus bitsandbytes' dequantized weights).
    """
    static, extra = _distributed_terms(model, step,
                                       _weight_terms(model, step) + _lora_terms(model, step))
    static = static + extra
    kept, layer_backward = _activation_terms(model, step)
    mask = _mask_term(model, step)
    loss = _loss_term(model, step)
    work = _workspace_term(model, step)
    backward = layer_backward.bytes + work.bytes
    phase = "loss (end of forward)" if loss.bytes >= backward else "one layer's backward"
    other = MemoryTerm("unnamed_allocations", UNNAMED_BYTES,
                       "cuBLAS workspaces, rotary caches, quant-state tensors (measured median)")
    peak = (sum(t.bytes for t in static + kept) + mask.bytes + max(loss.bytes, backward)
            + other.bytes)
    terms = tuple(static + kept + [mask, loss, layer_backward, work, other])
    ratio = RESERVED_OVER_ALLOCATED_PACKED if step.packed else RESERVED_OVER_ALLOCATED
    return MemoryPlan(terms, int(peak), int(peak * ratio), peak_phase=phase)


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
    stack) + 6 x active params x tokens / achievable FLOP/s, x 4/3 when checkpointing recomputes
    the forward.
    """
    compute = 6 * model.active_params() * step.tokens / flops_per_s
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
