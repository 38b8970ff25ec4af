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

from collections.abc import Mapping, Sequence
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
# Under CUDA's expandable segments (every `train` process since commit d719466, unless the user
# set the allocator's config) a segment grows in place instead of a new block being cached
# beside the old: 1.015-1.089x over 35 packed H200 runs (benchmarks/results/
# reserved_ratio_expandable.json), the ratio above measured without. 1.15 keeps a margin for
# what those runs did not vary (all TinyLlama's shape, mostly compiled).
RESERVED_OVER_ALLOCATED_PACKED_EXPANDABLE = 1.15
# Allocations no term names, nearly constant across models and sizes. At the peak of the
# TinyLlama and Qwen2.5 steps the allocator's trace shows two 32 MiB blocks that live through
# the whole step (one from the rotary embedding's first call, one from bitsandbytes' first
# dequantization) and small bits (quant-state tensors, loss scalars). Fitted on the fit
# families only: the median of (measured - every named term) over the 24 fit rows of
# benchmarks/results/memory_validation_v2.json, 67.4 MiB (the middle half of them lie within
# 62-83 MiB).
UNNAMED_BYTES = 67 * 2**20
# The plain path's loss (transformers' ForCausalLMLoss on full logits): at the start of backward
# the fp32 logits, the log-softmax kept for backward and its fp32 gradient coexist; measured
# 11.9-12.1 B per N x V (benchmarks/results/archive/memory_validation.json).
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
    implies and are filled from the real module tree by shapes.census (any architecture
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
    final_norm: the decoder ends in a norm (Llama's `norm`, GPT-2's `ln_f`); its output is what
        the head reads.
    fused_qkv: q, k and v come from one projection (Phi-3's qkv_proj, GPT-2's c_attn), so the
        v that attention keeps is a view that keeps the whole projection output alive.
    sliding_window: the window of sliding-window attention layers (0: none); from that length
        on transformers hands SDPA an explicit mask.
    residual_scaled: the layers scale each branch before the residual add (Granite's
        residual_multiplier), so backward holds the scaled gradient beside the unscaled one.
    linear_names: (last name component, in_features, out_features, count) of the same linears,
        for `lora.target_modules` by name (empty: names unknown).
    adapted_names: the linears LoRA adapts, by name (`adapted`: as `linears` counts them); None:
        all of them (`all-linear`). Only the adapters' own terms read them: every linear is
        quantized either way.
    sdpa: transformers has an SDPA path for the architecture; without one (Gemma 2, Bloom)
        `sdpa` loads as eager attention (models.attention_for) and is planned so.
    unquantized_linears: linears of a subclass of nn.Linear (Falcon's FalconLinear), which
        transformers' bitsandbytes replacement (exact nn.Linear and Conv1D only) leaves 16-bit.
    position_limit: the rows a learned position table can index (GPT-2's n_positions); None
        when positions are computed (RoPE, ALiBi) and a longer row still runs.
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
    fused_qkv: bool = False
    sliding_window: int = 0
    residual_scaled: bool = False
    linear_names: tuple[tuple[str, int, int, int], ...] = ()
    adapted_names: tuple[str, ...] | None = None
    position_limit: int | None = None
    sdpa: bool = True
    unquantized_linears: int = 0
    source: str = "config arithmetic"

    def __post_init__(self) -> None:
        h, layers = self.hidden_size, self.num_hidden_layers
        if not self.head_dim:
            object.__setattr__(self, "head_dim", h // self.num_attention_heads)
        if not self.linears:
            i, q, kv = self.intermediate_size, self.q_dim, self.kv_dim
            # q, k, v, o projections; gate, up, down.
            named = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                     "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
            counts = _count(list(named.values()), layers)
            object.__setattr__(self, "linears",
                               tuple((a, b, n) for (a, b), n in sorted(counts.items())))
            if not self.linear_names:
                object.__setattr__(self, "linear_names",
                                   tuple((k, a, b, layers) for k, (a, b) in named.items()))
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
        get = _getter(config)
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
                   qk_norm=model_type == "qwen3", sliding_window=sliding_window(config),
                   residual_scaled=residual_scaled(config),
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

    @property
    def adapted_linears(self) -> tuple[tuple[int, int, int], ...]:
        return self.linears if self.adapted is None else self.adapted

    @property
    def adapted(self) -> tuple[tuple[int, int, int], ...] | None:
        """The adapted linears as `linears` counts them; None: all of them."""
        if self.adapted_names is None:
            return None
        counts: dict[tuple[int, int], int] = {}
        for name, a, b, n in self.linear_names:
            if name in self.adapted_names:
                counts[(a, b)] = counts.get((a, b), 0) + n
        return tuple((a, b, n) for (a, b), n in sorted(counts.items()))

    def adapting(self, names: Sequence[str]) -> ModelShape:
        """This shape with LoRA on the linears whose last name component is in `names` (as
        peft matches a list of target modules; shapes.adapting checks the names exist)."""
        return replace(self, adapted_names=tuple(sorted(set(names))))

    def adapts(self, *names: str) -> bool:
        """Whether LoRA is on every linear named so (all-linear: on all of them)."""
        return self.adapted_names is None or set(names) <= set(self.adapted_names)

    def lora_params(self, r: int) -> int:
        return sum(r * (a + b) * n for a, b, n in self.adapted_linears)

    def largest_linear(self) -> int:
        return max(a * b for a, b, _ in self.linears)

    def layer_linear_inputs(self) -> float:
        """Sum of in_features over one layer's adapted linears (LoRA dropout copies these)."""
        return sum(a * n for a, _, n in self.adapted_linears) / self.num_hidden_layers

    def active_params(self) -> float:
        """Parameters one token runs through (routed experts: the active share)."""
        share = self.experts_per_token / self.num_experts if self.num_experts else 0.0
        return (self.linear_params() + self.frozen_params - self.expert_params
                + self.expert_params * share + self.vocab_size * self.hidden_size)


def _getter(config):
    """`get(key, default)` over a config object or its dict."""
    return config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)


def residual_scaled(config) -> bool:
    """Whether the config scales the residual branches (Granite's residual_multiplier)."""
    get = _getter(config)
    return get("residual_multiplier", None) not in (None, 1, 1.0)


def sliding_window(config) -> int:
    """The window of a config's sliding-window attention layers, 0 when no layer slides
    (Qwen2 names a window but, with use_sliding_window off, uses it in no layer)."""
    get = _getter(config)
    window = get("sliding_window") or 0
    layer_types = get("layer_types") or ()
    if (layer_types and "sliding_attention" not in layer_types) or get("use_sliding_window",
                                                                        True) is False:
        return 0
    return int(window)


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
    # train.fused_lora: fusedlora's layers compute the 4-bit projections (no clone of the base
    # output, one input gradient) and keep the block scales in fp32
    fused_lora: bool = False
    # train.joint_lora: gate/up and q/k/v as one function each over a wide input
    # (fusedlora.LoraJoint4bit)
    joint_lora: bool = False
    liger: bool = False  # Liger's kernels in the layers and the final norm: RMSNorm, SwiGLU
    # Liger's fused linear cross-entropy for the head's loss; None = as `liger` (compiled
    # layers keep the compiler's norm and SwiGLU but the head's loss stays Liger's).
    liger_loss: bool | None = None
    activation_offload: bool = False
    mlp_tile_tokens: int = 8192
    checkpoint_every: int = 1  # selective checkpointing: every n-th layer
    packed: bool = False  # rows packed into fixed-length bins (train.packing)
    compiled: bool = False  # decoder layers torch.compiled (train.compile)
    attn_implementation: str = "sdpa"
    # varlen through qlora-lab's Triton kernels (model.varlen_kernel, where triton runs) rather
    # than FlashAttention-2's: backward allocates no fp32 dQ accumulator and no per-query-head
    # dK/dV. Heads wider than VARLEN_TRITON_MAX_HEAD_DIM keep FlashAttention-2's.
    varlen_triton: bool = False
    # Rows shorter than their bin (real data): SDPA/eager then get a block-diagonal (packed) or
    # padding mask and run GQA by repeating k/v. False: every row fills its bin (validation).
    short_rows: bool = True
    # CUDA's caching allocator with expandable segments (train's default; see
    # expandable_segments): packed runs then reserve less beyond what they allocate.
    expandable_segments: bool = False

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def head_liger(self) -> bool:
        return self.liger if self.liger_loss is None else self.liger_loss


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
    excluded: str = "the CUDA context (~0.3-0.6 GiB per process, outside PyTorch's allocator)"
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
    terms = [quant]
    # Every fused layer keeps them, with dropout too (its forward then falls back to peft's).
    if s.bits == 4 and s.double_quant and s.fused_lora and s.strategy != "fsdp":
        terms.append(MemoryTerm(
            "absmax_fp32_cache", 4 * lin // NF4_BLOCK,
            f"fused LoRA layers keep the block scales dequantized: {lin:,} / {NF4_BLOCK} x 4 B"))
    terms += [MemoryTerm(
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
    state, where = _optimizer_state(m, s)
    return [MemoryTerm("lora_weights", weights, f"{params:,} LoRA params x {s.lora_bytes} B"),
            MemoryTerm("lora_grads", grads, f"{params:,} x {s.lora_bytes} B"),
            MemoryTerm("optimizer_state", state, where)]


def _lora_tensor_sizes(m: ModelShape, r: int) -> list[tuple[int, int]]:
    """(elements, count) of every LoRA tensor: A is r x in, B is out x r, per adapted linear."""
    return ([(r * i, n) for i, _, n in m.adapted_linears]
            + [(o * r, n) for _, o, n in m.adapted_linears])


def _optimizer_state(m: ModelShape, s: StepShape) -> tuple[int, str]:
    """Optimizer state inside PyTorch's allocator (a paged state lives outside it).

    bitsandbytes' 8-bit Adam (optim/optimizer.py, 0.50): tensors under `min_8bit_size` (4,096
    elements) keep two fp32 states; larger ones two uint8 states plus an fp32 absmax per
    256-element block each. A paged optimizer pages only tensors of >= 1e5 elements
    (get_state_buffer); smaller states and every absmax stay in the allocator. Each tensor is
    its own allocation, rounded up to 512 B. A TinyLlama step's allocations at its peak add up
    to these (benchmarks/results/memory_anatomy_h200.json).
    """
    if s.optimizer == "adamw_torch":
        # torch AdamW keeps exp_avg and exp_avg_sq in the parameter dtype.
        return 2 * m.lora_params(s.lora_r) * s.lora_bytes, "2 states x param dtype"
    paged = s.optimizer != "adamw_8bit"
    total = 0
    for numel, count in _lora_tensor_sizes(m, s.lora_r):
        if numel < 4096:
            per = 2 * _alloc(4 * numel)
        else:
            blocks = -(-numel // 256)
            per = 2 * _alloc(4 * blocks) + (0 if paged and numel >= 100_000
                                             else 2 * _alloc(numel))
        total += per * count
    where = ("8-bit states of tensors under 1e5 elements, fp32 under 4,096, and every absmax "
             "(larger states are paged outside PyTorch's allocator)" if paged
             else "2 states x 1 B (blockwise 8-bit) + absmax; fp32 under 4,096 elements")
    return total, where


def _alloc(nbytes: int) -> int:
    return -(-nbytes // 512) * 512  # PyTorch's caching allocator rounds every block to 512 B


# --- activations --------------------------------------------------------------------------------
#
# What each tensor below is was read off the allocator's trace at the peak of real steps
# (`memory_validation_v2.py --anatomy` on the fit families TinyLlama, SmolLM2 and Qwen2.5:
# benchmarks/results/memory_anatomy_h200.json), then written down from the code that allocates
# it, so it carries to shapes never measured.


def _lora_copies_inputs(s: StepShape, autocast: bool = True) -> bool:
    """peft's LoRA keeps a cast copy of each adapted linear's input instead of the input itself.

    peft's plain (16-bit base) Linear casts its input to the adapters' dtype whatever autocast
    says, and autocast casts it back for the matmul: lora_A keeps that 16-bit copy. Its 4-bit
    Linear casts only outside autocast (the offloaded recomputation), and lora_A keeps the fp32
    input. Nothing else keeps a projection's input (the frozen base needs only its weight), so
    the originals are freed: the norms' outputs and the down projection's input.
    """
    return s.lora_bytes > s.compute_bytes and (s.bits != 4 or not autocast)


def _fused_lora(s: StepShape) -> bool:
    """fusedlora.LoraLinear4bit computes every projection (fusedlora.fusable: a 4-bit base, no
    dropout). It writes a projection's output once (peft clones the base's output and adds the
    adapter's as a third tensor) and its input gradient once (peft: the base's, the adapter's
    and their sum), and casts fp32 adapters inside, keeping no 16-bit copy of them."""
    return s.fused_lora and s.bits == 4 and not s.lora_dropout and s.strategy != "fsdp"


def rank_columns(rank_total: int) -> int:
    """The width fusedlora.LoraJoint4bit gives a group's adapter columns beside x: a multiple
    of 64. cuBLAS ran K = 2,048 + 16 19 % slower than 2,048 on an H200 (benchmarks/results/
    adapter_matmuls_h200.json); the zero columns keep the extra K a whole tile."""
    return -(-rank_total // 64) * 64


def joint_input_bytes_per_token(m: ModelShape, s: StepShape) -> float:
    """fusedlora.LoraJoint4bit's wide inputs [x | x A^T | 0] (H + the group's adapter
    columns, padded to 64) where it computes projections that read one input
    (train.joint_lora): an MLP's gate and up (fastpath.FusedSwiGLU) and attention's separate
    q, k and v (fusedlora.ProjectionGroup); 0 elsewhere. Compiled, each is alive at the layer's
    worst moment: on the H200 each group raised the peak by one (tokens x (2,048 + 64)) bf16
    tensor, +0.12 GiB at 160 Dolly rows and +0.13 GiB at 32 full rows (TinyLlama; benchmarks/
    results/fastpath_sweep_h200_run23_joint*.json, run24_joint_qkv*.json). Eagerly a wide input
    lives only while its group is computed, before the layer's worst moment."""
    if not (s.joint_lora and s.compiled and _fused_lora(s)):
        return 0.0
    # A group forms only where all its projections are adapted (fusedlora.project_together,
    # group_projections).
    groups = (([2] if m.mlp == "swiglu" and m.adapts("gate_proj", "up_proj") else [])
              + ([] if m.fused_qkv or not m.adapts("q_proj", "k_proj", "v_proj") else [3]))
    return sum(s.compute_bytes * (m.hidden_size + rank_columns(n * s.lora_r)) for n in groups)


def _fused_lora_into_liger_swiglu(m: ModelShape, s: StepShape) -> bool:
    # fastpath.FusedSwiGLU with Liger's SiLU-mul over fused LoRA projections: gate and up are
    # written once each, and Liger writes their gradients over its saved inputs.
    return _fused_lora(s) and m.mlp == "swiglu" and s.liger


def norms_saved_bytes_per_token(m: ModelShape, s: StepShape, autocast: bool = True) -> float:
    """What a layer's hidden-size norms keep, per token, the layer's own input aside.

    The outputs of the two norms that feed projections (attention's and the MLP's) are kept by
    those projections' LoRA (a x H each; not when LoRA keeps copies, _lora_copies_inputs);
    Gemma's post-norms feed a residual add, which keeps nothing. Liger's RMSNorm keeps its
    input X (the residual sums after the first norm); an fp32-computing RMSNorm keeps an fp32
    copy of its input (4 x H); LayerNorm under autocast an fp32 input and output (8 x H).
    """
    a, h, norms = s.compute_bytes, m.hidden_size, m.norms_per_layer
    fed = 0 if _lora_copies_inputs(s, autocast) else min(2, norms)
    if m.norm_kind == "rms" and s.liger:
        return (fed + norms - 1) * a * h
    per_norm = 8 if m.norm_kind == "layer" else 4
    return norms * per_norm * h + fed * a * h


def _final_norm_bytes(m: ModelShape, s: StepShape) -> float:
    """The final norm, per hidden unit: its output (what the head reads) and what its kind
    keeps of its input (Liger: the last layer's output itself)."""
    a = s.compute_bytes
    if not m.final_norm:
        return a  # the decoder's output, read as is
    if m.norm_kind == "rms":
        return a + a if s.liger else 4 + a
    return (4 if m.norm_kind == "rms_fp32" else 8) + a


def _keeps_norm_input(m: ModelShape, s: StepShape) -> bool:
    return m.norm_kind == "rms" and s.liger  # Liger's RMSNorm saves X itself


def _masked(m: ModelShape, s: StepShape) -> bool:
    """SDPA/eager get an explicit mask: several rows per micro-batch, shorter than their bins
    (packed bins restart positions, padded rows have padding), or rows as long as a sliding
    window (transformers' _ignore_causal_mask_sdpa then cannot fall back to is_causal)."""
    if s.attn_implementation in ("flash_attention_2", "varlen", "flex_attention"):
        return False  # row bounds or a block mask: no dense mask, GQA reads K/V in place
    return ((s.short_rows and s.micro_batch_size > 1)
            or 0 < m.sliding_window <= s.seq_len)


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

    RoPE'd q and k, v, and the attention output, which o_proj reads as it is (SDPA's output is
    already laid out as (tokens, heads x dim): transformers' .contiguous() copies nothing), +
    the fp32 log-sum-exp per head. A fused q/k/v projection's output stays whole behind the v
    view. With an explicit mask transformers runs GQA by repeating k/v to every query head
    (repeat_kv), so k and v are q-wide copies. Eager attention also keeps the fp32 and 16-bit
    probabilities (heads x seq_len each). Per-head q/k norms (Qwen3) keep their inputs.
    """
    a, q, kv = s.compute_bytes, m.q_dim, m.kv_dim
    if _masked(m, s) and m.num_key_value_heads < m.num_attention_heads:
        saved = a * 4 * q
    elif m.fused_qkv:
        saved = a * (3 * q + 3 * kv)
    else:
        saved = a * (2 * q + 2 * kv)
    saved += 4 * m.num_attention_heads
    if m.qk_norm:
        saved += (q + kv) * (a if m.norm_kind == "rms" and s.liger else 4)
    if s.attn_implementation == "eager":
        saved += (4 + a) * m.num_attention_heads * s.seq_len
    return saved


def lora_saved_bytes_per_token(m: ModelShape, s: StepShape, autocast: bool = True) -> float:
    """What one layer's adapters keep beyond their inputs, per token.

    Each adapter's A output (r), and with dropout its dropped-out input and mask (a + 1 per
    input feature), and where LoRA copies its inputs (_lora_copies_inputs) that copy: 16-bit
    under autocast, fp32 outside it (the offloaded recomputation).
    """
    a = s.compute_bytes
    adapters = sum(n for _, _, n in m.adapted_linears) / m.num_hidden_layers
    inputs = m.layer_linear_inputs()
    copy = (s.lora_bytes if not autocast else a) if _lora_copies_inputs(s, autocast) else 0
    kept = (4 if copy == 4 else a) * s.lora_r * adapters + copy * inputs
    if s.lora_dropout:
        kept += (a + 1) * inputs
    return kept


def layer_saved_bytes_per_token(m: ModelShape, s: StepShape, mlp_tokens_share: float = 1.0,
                                autocast: bool = True) -> float:
    """Bytes one decoder layer keeps for backward, per token, its own input aside.

    Norms, attention, MLP (scaled by the share of tokens held at once: 0 in a layer whose MLP
    runs in checkpointed tiles, one tile's share while a tile is rebuilt) and adapters.
    """
    return (norms_saved_bytes_per_token(m, s, autocast) + attention_saved_bytes_per_token(m, s)
            + _mlp_kept(m, s, autocast) * mlp_tokens_share
            + lora_saved_bytes_per_token(m, s, autocast))


def _mlp_kept(m: ModelShape, s: StepShape, autocast: bool = True) -> float:
    # The down projection's input is kept by its LoRA alone: a copy replaces it where LoRA
    # copies its inputs.
    mlp = mlp_saved_bytes_per_token(m, s)
    if _lora_copies_inputs(s, autocast) and m.mlp != "moe":
        mlp -= s.compute_bytes * m.intermediate_size
    return mlp


def layer_backward_bytes_per_token(m: ModelShape, s: StepShape, mlp_tokens_share: float = 1.0,
                                   autocast: bool = True) -> float:
    """What one layer holds at the worst moment of its backward (or of its recomputation), per
    token: its saved tensors plus what is alive then, whichever moment is largest.

    The MLP's backward, at the down projection: its input is freed once lora_A's gradient is
    taken; that input gradient, the 4-bit base's and their sum (3 x a x I: routed, per slot)
    coexist with the gradient arriving at the layer's output (a x H). Fused LoRA (_fused_lora)
    writes one input gradient (a x I); Liger's SiLU-mul then writes its two gradients over its
    saved inputs, so nothing wider follows. Without Liger, SiLU(gate) x up's autograd backward
    holds the product's gradient and two more (+ 2 x a x I net, as peft's down projection).
    Attention's backward (SDPA's), the MLP's tensors, its norm's output and the residual sum
    freed: the residual's gradient (a x H), the output's gradient (a x q), dq, dk, dv
    (a x (q + 2 kv)), FlashAttention's fp32 dq accumulator (4 x q) and row sums, and under GQA
    dk and dv per query head before they are summed per key-value head (2 x a x q).
    With the MLP in tiles, the end of its backward: the tiles' input gradients and their
    concatenation (2 x a x H) beside the arriving one. Where LoRA copies its inputs, the down
    projection's forward (or recomputation), its input and the MLP's still referenced: on a
    16-bit base the fp32 copy of the widest input (4 x I) while lora_A takes its 16-bit cast;
    outside autocast (offload) the adapters' fp32 output and its scaled copy (2 x 4 x H); either
    way + the base output and the arriving gradient (2 x a x H).
    """
    a, h = s.compute_bytes, m.hidden_size
    saved = layer_saved_bytes_per_token(m, s, mlp_tokens_share, autocast)
    mlp = _mlp_kept(m, s, autocast) * mlp_tokens_share
    if m.mlp == "moe":
        width = m.experts_per_token * m.expert_intermediate_size + m.shared_intermediate_size
        in_mlp = saved + 2 * a * h + a * width * mlp_tokens_share
    elif _lora_copies_inputs(s, autocast) and not autocast:
        # the fp32 copy of the down projection's input is freed as its gradients arrive
        in_mlp = saved + a * h + a * m.intermediate_size * mlp_tokens_share
    elif _fused_lora_into_liger_swiglu(m, s):
        in_mlp = saved + a * h + a * m.intermediate_size * mlp_tokens_share
    else:
        in_mlp = saved + a * h + 2 * a * m.intermediate_size * mlp_tokens_share
    in_mlp += joint_input_bytes_per_token(m, s)
    if s.lora_dropout and m.mlp != "moe":
        # the down projection's dropped-out input and mask go with its input
        in_mlp -= (a + 1) * m.intermediate_size * mlp_tokens_share
    kv_grads = 2 * m.kv_dim
    triton = (s.varlen_triton and s.attn_implementation == "varlen"
              and m.head_dim <= VARLEN_TRITON_MAX_HEAD_DIM)
    if m.num_key_value_heads < m.num_attention_heads and not triton:
        kv_grads += 2 * m.q_dim  # dk, dv per query head first (FlashAttention's dk/dv_expanded)
    dq_accumulator = 0 if triton else 4 * m.q_dim  # FlashAttention-2's, in fp32
    in_attention = (saved - mlp - a * h * _attention_norms_freed(m, s, autocast)
                    + a * h + a * (2 * m.q_dim + kv_grads) + dq_accumulator
                    + 4 * m.num_attention_heads)
    if m.residual_scaled:
        # The branch's gradient is the arriving one times the multiplier, a new a x H beside
        # it; with fused LoRA a second one is alive at the worst moment. Both measured on
        # TinyLlama built as a Granite model (memory_validation_v2.py --diagnose: +1.00 and
        # +2.00 x N x H x a over TinyLlama, peft's and fused LoRA, 16 x 1,024 tokens); the
        # allocator's trace that would name the second one breaks on torch 2.11 here.
        extra = (2 if _fused_lora(s) else 1) * a * h
        in_mlp, in_attention = in_mlp + extra, in_attention + extra
    moments = [in_mlp, in_attention]
    if mlp_tokens_share < 1:
        # Tiled: every tile's input gradient waits for the last tile, then all are concatenated
        # (the split's backward), beside the gradient arriving at the layer's output.
        moments.append(saved - mlp + 3 * a * h)
    if _lora_copies_inputs(s, autocast):
        # Forward (or recomputation) at the down projection: the MLP's input and the down
        # projection's input are still referenced by the running code.
        refs = a * h + a * m.intermediate_size * mlp_tokens_share
        if not autocast:
            moments.append(saved + refs + 2 * a * h + 2 * 4 * h)
        else:
            widest = max(i for i, _, _ in m.adapted_linears)
            share = mlp_tokens_share if widest == m.intermediate_size else 1.0
            moments.append(saved + refs + 4 * widest * share + 2 * a * h)
    return max(moments)


VARLEN_TRITON_MAX_HEAD_DIM = 128  # triton_attention.MAX_HEAD_DIM (memory imports no torch)


def _attention_norms_freed(m: ModelShape, s: StepShape, autocast: bool) -> float:
    """How many a x H tensors of norms_saved_bytes_per_token are gone by attention's backward:
    the MLP norm's output (when LoRA keeps it) and, with Liger, the residual sum it kept."""
    fed = 0 if _lora_copies_inputs(s, autocast) else 1
    return fed + (1 if _keeps_norm_input(m, s) and m.norms_per_layer > 1 else 0)


def offload_forward_bytes_per_token(m: ModelShape, s: StepShape) -> float:
    """One layer's forward under fastpath._OffloadedCheckpoint, per token, beyond its input.

    It runs under no_grad, where fastpath.FusedSwiGLU does not tile: the whole MLP is alive at
    once. At the up projection: the attention's residual sum and the MLP's input (2 x a x H),
    the gate output, and the up projection's base output, its clone (peft's 4-bit Linear
    clones it) and the LoRA branch being added (4 x a x I in all). This, not backward, is the
    peak for long rows (benchmarks/results/archive/bench_context_ours_h200_8gib.json). Fused
    LoRA writes the up projection's output once: the peak moves to Liger's SiLU-mul, gate, up
    and their product (3 x a x I); without Liger SiLU(gate) is a fourth.
    """
    a = s.compute_bytes
    wide = 3 if _fused_lora_into_liger_swiglu(m, s) else 4
    return 2 * a * m.hidden_size + wide * a * m.intermediate_size


def _mlp_tiled(m: ModelShape, s: StepShape) -> bool:
    # fastpath.FusedSwiGLU runs the MLP in tiles above 2 tiles' worth of tokens, each tile
    # checkpointed, in eager layers. Compiled layers are not counted as tiled: at 32 x 1,024
    # tokens they peaked at 6.23 GiB against eager's 5.20 (fastpath_sweep_h200_run3.json).
    return m.mlp == "swiglu" and not s.compiled and s.tokens > 2 * s.mlp_tile_tokens


@dataclass(frozen=True)
class _Activations:
    kept: list[MemoryTerm]  # from forward into backward, all layers
    backward: MemoryTerm  # on top of `kept` at the worst moment of backward
    freed_per_layer: int  # what each layer's backward releases (for when the gradients peak)
    forward: int = 0  # on top of `kept` at the worst moment of forward, where it can beat both


def _activation_terms(m: ModelShape, s: StepShape) -> _Activations:
    """What forward keeps for backward and the worst moment of backward, per strategy.

    Backward frees as it goes (a layer's checkpointed input or its activations) while the LoRA
    gradients of the layers done accumulate, so the worst moment is the first layer backward
    meets (the last layer), unless the gradients grow faster than activations shrink
    (see _gradients_at_peak). Non-reentrant checkpointing rebuilds that layer on top of the
    checkpointed inputs; a layer that kept its activations adds only its gradients.
    """
    n, a, layers, h = s.tokens, s.compute_bytes, m.num_hidden_layers, m.hidden_size
    tiled = _mlp_tiled(m, s)
    share = s.mlp_tile_tokens / n if tiled else 1.0  # a rebuilt tile's share of the tokens
    kept_share = 0.0 if tiled else 1.0  # tiles are checkpointed: a layer keeps no MLP tensors
    tile_note = (f"; MLP in {s.mlp_tile_tokens}-token checkpointed tiles, one rebuilt at a time"
                 if tiled else "")
    kept_input = a * h if _keeps_norm_input(m, s) else 0  # a kept layer's input, saved by its norm
    per_layer = layer_saved_bytes_per_token(m, s, kept_share) + kept_input
    if s.gradient_checkpointing and s.activation_offload:
        # Layer inputs wait in pinned host memory; on the GPU: the input copied back and the
        # embeddings' output (held by the autograd graph). fastpath._OffloadedCheckpoint
        # rebuilds the layer in backward under the forward's autocast (as torch's checkpoint
        # does), so its worst moment is a checkpointed layer's.
        worst = layer_backward_bytes_per_token(m, s, share)
        return _Activations(
            # A third N x H x a: the gradient handed down from the layer above while this one
            # is rebuilt (fitted on the fit families' offload rows, 1.0-1.3 of them, and
            # derived as that gradient; memory_validation_v2.json).
            [MemoryTerm("offloaded_layer_inputs", 3 * n * h * a,
                        f"3 x N x H x {a} B on the GPU (input copied back, embeddings' output, "
                        f"incoming gradient); L x N x H x {a} B in pinned host memory")],
            MemoryTerm("recomputed_layer", int(worst * n),
                       f"one layer rebuilt from its offloaded input: {worst:,.0f} "
                       "B/token at its worst moment" + tile_note), 0,
            int(offload_forward_bytes_per_token(m, s) * n))
    worst = layer_backward_bytes_per_token(m, s, share)
    if not s.gradient_checkpointing:
        return _Activations(
            [MemoryTerm("layer_activations", int(layers * per_layer * n),
                        f"L x N x {per_layer:,.0f} B (each layer's saved tensors, see "
                        "layer_saved_bytes_per_token)" + tile_note),
             _lora_cast_term(m, s, layers)],
            MemoryTerm("layer_backward", int((worst - per_layer + kept_input) * n),
                       "the last layer's gradients (its saved tensors are counted above)"),
            int(per_layer * n))
    ckpt = -(-layers // s.checkpoint_every)  # transformers checkpoints layers 0, k, 2k, ...
    kept = [MemoryTerm("checkpointed_layer_inputs", ckpt * n * h * a,
                       f"{ckpt} of {layers} layers checkpointed: each one's input, N x H x "
                       f"{a} B")]
    if ckpt < layers:
        kept += [MemoryTerm("layer_activations", int((layers - ckpt) * per_layer * n),
                            f"{layers - ckpt} layers not checkpointed (every "
                            f"{s.checkpoint_every}): N x {per_layer:,.0f} B each" + tile_note),
                 _lora_cast_term(m, s, layers - ckpt)]
    if (layers - 1) % s.checkpoint_every == 0:
        backward = MemoryTerm("recomputed_layer", int(worst * n),
                              f"the last layer rebuilt in backward: {worst:,.0f} B/token at its "
                              "worst moment" + tile_note)
    else:  # the last layer kept its activations: backward adds its gradients only
        backward = MemoryTerm("layer_backward", int((worst - per_layer + kept_input) * n),
                              "the last layer (not checkpointed): its gradients")
    return _Activations(kept, backward, n * h * a)


def _lora_cast_term(m: ModelShape, s: StepShape, layers: int) -> MemoryTerm:
    # fp32 adapters under bf16 autocast: each matmul keeps the 16-bit cast of its weight for
    # backward (checkpointed layers rebuild theirs one layer at a time).
    # Fused LoRA casts them inside its autograd function and keeps only the fp32 weights.
    extra = m.lora_params(s.lora_r) * s.compute_bytes * layers // m.num_hidden_layers
    if s.lora_bytes <= s.compute_bytes or _fused_lora(s):
        extra = 0
    return MemoryTerm("lora_autocast_casts", extra,
                      f"16-bit casts of {layers} layers' fp32 adapters, kept for backward")


def _gradients_at_peak(m: ModelShape, s: StepShape, grads: int, freed_per_layer: int) -> int:
    """LoRA gradients alive at backward's worst moment.

    The Trainer frees them after every optimizer step (zero_grad(set_to_none=True)), so
    backward allocates them layer by layer: at the first layer's backward one layer's worth
    exists. If a layer's gradients outweigh what its backward frees (large r, few tokens, or
    offloaded inputs), the worst moment moves to the end of backward, where all exist.
    """
    layers = m.num_hidden_layers
    per_layer = grads // layers
    return per_layer + (layers - 1) * max(0, per_layer - freed_per_layer)


# Without Liger, fastpath.SupervisedHeadLoss runs the head (fusedce.py) in chunks of this many
# logits, so a 256k vocabulary gets 128-token chunks where a 32k one gets 1,024: one chunk's
# logits, their fp32 copy and their gradient stay under 256 MiB whatever the vocabulary, and a
# chunk's matmul (1,024 x 2,048 x 32k for TinyLlama) is still large enough to run at speed.
HEAD_LOSS_CHUNK_LOGITS = 1 << 25


def head_loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the chunked (non-Liger) supervised head loss."""
    return max(64, min(4096, HEAD_LOSS_CHUNK_LOGITS // max(1, vocab_size)))


def _head_loss_chunk_bytes(compute_bytes: int, compiled: bool) -> int:
    """Bytes per logit of one fusedce chunk at its peak: the head's logits, then (eagerly)
    their fp32 copy, whose softmax becomes the gradient in place and is cast back (no copy
    for fp32 logits); compiled, one kernel reads the logits and writes the gradient."""
    if compiled:
        return 2 * compute_bytes
    return compute_bytes if compute_bytes == 4 else 2 * compute_bytes + 4


def _loss_chunk_rows(m: ModelShape, n: int) -> int:
    """Liger's fused linear cross-entropy chunk: ceil(N / ceil(V / H)) rounded up to a power of
    two, at most N (liger_kernel/ops/fused_linear_cross_entropy.py, 0.8.5), so one chunk's
    logits hold about N x H elements whatever the vocabulary."""
    inc = -(-m.vocab_size // m.hidden_size)
    rows = -(-n // inc)
    return min(n, 1 << (rows - 1).bit_length())


def _loss_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    n, a, h, v = s.tokens, s.compute_bytes, m.hidden_size, m.vocab_size
    # The final norm: its output (what the head reads) and, per its kind, its fp32 input copy;
    # the last layer's output it reads is kept by Liger's norm.
    final = n * h * _final_norm_bytes(m, s)
    if s.fused_loss and s.head_liger:
        # fastpath.SupervisedHeadLoss -> LigerFusedLinearCrossEntropyFunction: every position
        # supervised at worst; the gathered states, the input gradient it computes in forward,
        # one chunk's 16-bit logits (overwritten in place by their gradient), fp32 losses.
        rows = _loss_chunk_rows(m, n)
        return MemoryTerm("fused_linear_cross_entropy",
                          int(final + 2 * a * n * h + a * rows * v + 4 * n),
                          f"Liger: {rows:,}-token chunks x V x {a} B (never N x V) + N x H x "
                          f"{2 * a} B (states, their gradient) + final norm")
    if s.fused_loss:
        # fusedce.LinearCrossEntropy: the gathered states, the gradient it computes in forward,
        # and one chunk's logits and gradient at a time.
        rows = min(n, head_loss_chunk_tokens(v))
        per = _head_loss_chunk_bytes(a, s.compiled)
        return MemoryTerm("supervised_head_loss",
                          int(final + 2 * a * n * h + per * rows * v),
                          f"{rows:,}-token chunks x V x {per} B + N x H x {2 * a} B (states, "
                          "their gradient) + final norm")
    return MemoryTerm("logits_and_loss", int(final + LOSS_BYTES_PER_V * n * v),
                      "N x V x 12 B (fp32 logits + log-softmax + gradient) + final norm")


def _mask_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    if not _masked(m, s):
        return MemoryTerm("attention_mask", 0, "no explicit mask (full rows or FlashAttention)")
    # transformers builds a (B, 1, S, S) boolean mask once per step; SDPA converts it to the
    # query dtype in every layer, and a layer that keeps its activations keeps that copy for
    # backward (a checkpointed one only while it is rebuilt).
    b, t = s.micro_batch_size, s.seq_len
    copies = 1 + _kept_layers(m, s)
    return MemoryTerm("attention_mask", b * t * t * (1 + s.compute_bytes * copies),
                      "B x S x S boolean mask (block-diagonal or sliding window) + its 16-bit "
                      f"copy in {copies} layer(s): the one that runs, those keeping activations")


def _kept_layers(m: ModelShape, s: StepShape) -> int:
    """Decoder layers that keep their activations (not checkpointed)."""
    layers = m.num_hidden_layers
    if not s.gradient_checkpointing:
        return layers
    if s.activation_offload:
        return 0
    return layers - -(-layers // s.checkpoint_every)


def _workspace_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    if s.bits != 4:
        return MemoryTerm("dequant_workspace", 0, "16-bit base: no dequantization")
    # bitsandbytes dequantizes one weight to the compute dtype inside each matmul and frees it
    # before the gradients of that matmul are summed, which is backward's worst moment; it adds
    # to the peak only where it outweighs the I-wide gradients it replaces (a handful of tokens).
    weight = m.largest_linear() * s.compute_bytes
    if _fused_lora(s):
        # fusedlora dequantizes the weight beside the input gradient it accumulates onto (the
        # gradient is written first), so the weight adds to backward's worst moment whole.
        return MemoryTerm("dequant_workspace", weight,
                          "largest weight dequantized beside the input gradient (fused LoRA)")
    gradients = 2 * s.compute_bytes * m.intermediate_size * s.tokens
    return MemoryTerm("dequant_workspace", max(0, weight - gradients),
                      "largest weight dequantized, beyond the 2 x N x I x a B of gradients "
                      "alive instead at the peak")


def _unnamed_term(m: ModelShape, s: StepShape) -> MemoryTerm:
    # RoPE's cos and sin tables (N x head_dim each, compute dtype), built once per step by the
    # model, + what no term names (UNNAMED_BYTES).
    rotary = 2 * s.tokens * m.head_dim * s.compute_bytes
    return MemoryTerm("unnamed_allocations", UNNAMED_BYTES + rotary,
                      f"RoPE cos/sin (2 x N x {m.head_dim} x {s.compute_bytes} B) + "
                      f"{UNNAMED_BYTES / 2**20:.0f} MiB unnamed (fitted, see UNNAMED_BYTES)")


# --- data parallelism ---------------------------------------------------------------------------


def _distributed_terms(m: ModelShape, s: StepShape, static: list[MemoryTerm]
                       ) -> tuple[list[MemoryTerm], list[MemoryTerm]]:
    """Per-GPU changes under data parallelism (micro-batch and activations are per GPU).

    DDP keeps a full replica and adds flat gradient buckets the size of the trainable (LoRA)
    gradients: what two GPUs added per GPU over one (benchmarks/results/ddp_scaling.json).
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

    The step's peak is the larger of two moments, on top of the weights, adapters, optimizer
    state and what forward keeps for backward: the end of forward, when the loss runs (no LoRA
    gradient exists yet); and backward's worst moment (see _activation_terms), with the LoRA
    gradients alive then.
    """
    if step.attn_implementation == "sdpa" and not model.sdpa:
        step = replace(step, attn_implementation="eager")  # as models.attention_for loads it
    static, extra = _distributed_terms(model, step,
                                       _weight_terms(model, step) + _lora_terms(model, step))
    act = _activation_terms(model, step)
    if step.gpus <= 1 or step.strategy == "ddp":
        grads = next(t for t in static if t.name == "lora_grads")
        alive = _gradients_at_peak(model, step, grads.bytes, act.freed_per_layer)
        static = [replace(grads, bytes=alive, derivation=grads.derivation + f"; {alive:,} B "
                          "at backward's worst moment (allocated layer by layer; net of the "
                          "activations freed before it, see _gradients_at_peak)")
                  if t is grads else t for t in static]
    static = static + extra
    mask = _mask_term(model, step)
    loss = _loss_term(model, step)
    work = _workspace_term(model, step)
    grads_alive = next(t.bytes for t in static if t.name == "lora_grads")
    backward = act.backward.bytes + work.bytes
    at_loss = loss.bytes - grads_alive  # no LoRA gradient exists at the end of forward
    at_forward = act.forward - grads_alive
    phase = max((at_loss, "loss (end of forward)"), (backward, "one layer's backward"),
                (at_forward, "one layer's forward (offloaded, untiled MLP)"))[1]
    other = _unnamed_term(model, step)
    peak = (sum(t.bytes for t in static + act.kept) + mask.bytes
            + max(at_loss, backward, at_forward) + other.bytes)
    extra_terms = [MemoryTerm("offloaded_forward", act.forward,
                              "one layer's forward under no_grad: MLP untiled (see "
                              "offload_forward_bytes_per_token)")] if act.forward else []
    terms = tuple(static + act.kept + [mask, loss, act.backward] + extra_terms + [work, other])
    ratio = RESERVED_OVER_ALLOCATED
    if step.packed:
        ratio = (RESERVED_OVER_ALLOCATED_PACKED_EXPANDABLE if step.expandable_segments
                 else RESERVED_OVER_ALLOCATED_PACKED)
    excluded = MemoryPlan.excluded
    if step.optimizer.startswith("paged_"):
        excluded += "; paged optimizer state (CUDA managed memory, outside PyTorch's allocator)"
    return MemoryPlan(terms, int(peak), int(peak * ratio), excluded=excluded, peak_phase=phase)


# --- sizes --------------------------------------------------------------------------------------


def expandable_segments(env: Mapping[str, str]) -> bool:
    """Whether a `train` process started with this environment runs CUDA's allocator with
    expandable segments: train sets it (child.CUDA_ALLOCATOR_ENV) unless the user has set the
    allocator's config, which then decides."""
    confs = [env.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")]
    confs = [c for c in confs if c is not None]
    if not confs:
        return True
    return any("expandable_segments:true" in c.replace(" ", "").lower() for c in confs)


def parse_bytes(text: str) -> int:
    """'8GiB', '7.5GB', '8000MiB', '8g' -> bytes (GB/GiB both read as binary, as GPUs are sold)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?b?)|(b))\s*", text.lower())
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    if not match:
        # A bare number is refused, not read as bytes: `--budget 8` meant 8 GiB, surely.
        raise ValueError(f"cannot read {shown} as a size — write it with a unit, e.g. 8GiB "
                         "or 7500MiB")
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}.get(match.group(2), 1)
    size = float(match.group(1)) * scale
    if not size >= 1:
        raise ValueError(f"{shown} is no memory at all — pass a positive size, e.g. 8GiB")
    if size > 2**60:  # an exabyte: past any card, and short of float-to-int overflow
        raise ValueError(f"{shown} is larger than any memory — write e.g. 8GiB or 80GiB")
    return int(size)
