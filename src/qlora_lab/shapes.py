"""A model's shape for the planner, from its module tree: what `plan` counts.

A preset's architecture is stored with it (presets.py), so a preset imports no torch. Any other
model is built on the meta device from its config (local config.json, GGUF, or the hub's via
AutoConfig) and counted module by module (`census`); nothing loads weights.
"""

from __future__ import annotations

from pathlib import Path

from qlora_lab import memory
from qlora_lab.config import LoraConfig
from qlora_lab.errors import UserError
from qlora_lab.presets import preset_for


def model_shape(name: str, trust_remote_code: bool = False) -> memory.ModelShape:
    """The architecture of a preset (its stored shapes: no torch), a local model dir, a .gguf
    file or a hub id (counted from the module tree transformers builds, see census)."""
    preset = preset_for(name)
    if preset is not None:
        return memory.ModelShape.from_config(preset.arch)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return census(_gguf_config(path), name, trust_remote_code)
    if (path / "config.json").is_file() or path.exists():
        return census(_local_config(path, trust_remote_code), name, trust_remote_code)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the architecture of {name!r} ({_first_line(exc)}) "
                        "— pass a preset, a local model dir or a reachable hub id") from None
    return census(config, name, trust_remote_code)


def _first_line(exc: BaseException) -> str:
    """The gist of `exc` in one line; a first line that ends in ':' (huggingface_hub's
    validation errors) takes the line that says what failed."""
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not text:
        return type(exc).__name__
    line = text[0] if not text[0].endswith(":") or len(text) < 2 else f"{text[0]} {text[1]}"
    return line[:200]


def _local_config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"model dir {path} has no config.json — pass a folder written by "
                        "save_pretrained, a .gguf file, a hub id or a preset")
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any refusal of the file is the file's fault
        # transformers' config validation raises huggingface_hub's StrictDataclass errors
        # (plain Exceptions) and ZeroDivisionError (0 heads), besides the usual ValueError.
        raise UserError(f"cannot read {path / 'config.json'} ({_first_line(exc)}) — pass a "
                        "config.json that transformers' AutoConfig reads") from None


def _gguf_config(path: Path):
    """A GGUF file's architecture from its metadata alone: the planner dequantizes nothing."""
    from transformers import AutoConfig

    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist — pass the path of a .gguf file")
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001 - gguf's reader fails with struct/Value/Key errors
        raise UserError(f"cannot read {path} as a GGUF model ({_first_line(exc)}) — pass a "
                        "GGUF file written by llama.cpp's converter") from None


# --- counting a model from its module tree ------------------------------------------------------

# Where decoder layers keep their feed-forward block, across transformers' model families.
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe")
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def census(config, name: str, trust_remote_code: bool = False) -> memory.ModelShape:
    """Count `config`'s model as transformers builds it, on the meta device (no memory, no
    weights): quantized/adapted linears, embeddings, head, norms, biases, experts.

    Any config transformers can read gives a shape or one UserError line naming what is not
    modelled; never a traceback.
    """
    import torch
    from transformers import AutoModelForCausalLM

    problem = _size_problem(config)
    if problem:
        raise UserError(f"{name}: its config has {problem} — fix its config.json")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to build is the user's one line
        kind = getattr(config, "model_type", type(config).__name__)
        raise UserError(f"cannot build {name} ({kind}) as a causal LM on the meta device "
                        f"({type(exc).__name__}: {_first_line(exc)}) — the planner counts "
                        "models that AutoModelForCausalLM.from_config builds") from None
    return count_modules(model, name)


SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads")


def _size_problem(config) -> str | None:
    """A size no model can have, which transformers builds anyway into zero-size tensors (and
    the planner would count as a model): 0 or negative widths, heads that do not group."""
    for key in SIZE_KEYS:
        value = getattr(config, key, None)
        if value is None:  # absent from this family, or derived later (GPT-2's n_inner)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{key} = {value!r} (a positive whole number is needed)"
    heads, groups = (getattr(config, "num_attention_heads", None),
                     getattr(config, "num_key_value_heads", None))
    if isinstance(heads, int) and isinstance(groups, int) and heads % groups:
        return (f"num_key_value_heads = {groups}, which does not divide num_attention_heads = "
                f"{heads}")
    return None


def count_modules(model, name: str) -> memory.ModelShape:
    """The ModelShape of a built model (meta or real), as `train` quantizes and adapts it.

    bitsandbytes 4-bit replaces every nn.Linear and GPT-2 Conv1D except the output embedding
    (transformers' replace_with_bnb_linear, get_keys_to_not_convert), and peft's `all-linear`
    adapts the same layers; everything else keeps the compute dtype.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    config = model.config
    head = model.get_output_embeddings()
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    counts = dict.fromkeys(("bias", "embedding", "head", "norm", "frozen", "expert", "fp32",
                            "subclass"), 0)
    linears: dict[tuple[int, int], int] = {}
    named: dict[tuple[str, int, int], int] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        # A tied head shares the embedding's parameter, met first: it adds nothing.
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        numel = sum(p.numel() for p in params)
        if module is head:
            counts["head"] += numel
        elif any(_matches(mod_name, key) for key in keep_fp32):
            counts["fp32"] += numel
        elif isinstance(module, (nn.Linear, Conv1D)):
            shape = (tuple(module.weight.shape) if isinstance(module, Conv1D)
                     else (module.in_features, module.out_features))
            linears[shape] = linears.get(shape, 0) + 1
            # transformers quantizes exact nn.Linear and Conv1D only (replace_with_bnb_linear).
            counts["subclass"] += not isinstance(module, Conv1D) and type(module) is not nn.Linear
            key = (mod_name.rsplit(".", 1)[-1], *shape)
            named[key] = named.get(key, 0) + 1
            counts["bias"] += module.bias.numel() if module.bias is not None else 0
        elif isinstance(module, nn.Embedding):
            counts["embedding"] += numel
        elif _is_norm(module):
            counts["norm"] += numel
        elif all(p.dim() == 3 for p in params):  # fused routed experts: (experts, out, in)
            counts["frozen"] += numel
            counts["expert"] += numel
        elif "router" in type(module).__name__.lower() or mod_name.endswith(".gate"):
            counts["frozen"] += numel
        else:
            kinds = ", ".join(f"{n} {tuple(p.shape)}" for n, p in
                              module.named_parameters(recurse=False))
            raise UserError(f"{name}: module {mod_name} ({type(module).__name__}: {kinds}) "
                            "holds weights the planner does not model (not a linear, "
                            "embedding, norm or MoE expert) — measure this model with "
                            "`qlora-lab bench` instead")
    layer = _layer_shape(model, name)
    vocab = head.weight.shape[0] if head is not None else config.vocab_size
    hidden = config.hidden_size
    return memory.ModelShape(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_num_layers(model, name),
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None)
        or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or hidden // config.num_attention_heads,
        tie_word_embeddings=head is not None and counts["head"] == 0,
        linears=tuple((a, b, n) for (a, b), n in sorted(linears.items())),
        linear_bias_params=counts["bias"], embedding_params=counts["embedding"],
        head_params=counts["head"], norm_params=counts["norm"], frozen_params=counts["frozen"],
        expert_params=counts["expert"], fp32_params=counts["fp32"],
        residual_scaled=memory.residual_scaled(config),
        linear_names=tuple((k, a, b, n) for (k, a, b), n in sorted(named.items())),
        position_limit=learned_position_limit(model),
        sdpa=getattr(type(model), "_supports_sdpa", True) is not False,
        unquantized_linears=counts["subclass"],
        source="meta-device module tree", **layer)


def learned_position_limit(model) -> int | None:
    """The longest row a model with a learned position table can read (GPT-2's `wpe`, OPT's
    `embed_positions`): past it the table's lookup fails (an IndexError on CPU, a device assert
    on CUDA). None when positions are computed (RoPE, ALiBi), where a longer row runs.

    A table is an embedding other than the token embeddings named for positions; its limit is
    the config's max_position_embeddings (OPT's table has two rows of offset), else its size.
    """
    from torch import nn

    tokens = model.get_input_embeddings()
    tables = [m for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) and m is not tokens
              and ("pos" in name.rsplit(".", 1)[-1].lower() or name.endswith("wpe"))]
    if not tables:
        return None
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return min(limit, *(t.num_embeddings for t in tables))
    return min(t.num_embeddings for t in tables)


def check_position_limit(limit: int | None, max_seq_len: int, name: str) -> None:
    """Refuse `data.max_seq_len` past a learned position table, in one line."""
    if limit is not None and limit < 1:
        raise UserError(f"{name}: its learned position table has no rows (its config's "
                        "max_position_embeddings or n_positions) — fix its config.json")
    if limit is not None and max_seq_len > limit:
        raise UserError(f"data.max_seq_len = {max_seq_len} is past the {limit} positions "
                        f"{name} has learned (its config's max_position_embeddings) — set "
                        f"data.max_seq_len to {limit} or less")


def adapting(shape: memory.ModelShape, lora: LoraConfig, name: str) -> memory.ModelShape:
    """`shape` with LoRA only where `lora.target_modules` puts it (as models.attach_lora
    reads the names), refused in `train`'s words when a name matches no linear layer."""
    targets = lora.target_names()
    if targets is None or not shape.linear_names:
        return shape
    known = {n for n, _, _, _ in shape.linear_names}
    check_targets_exist(targets, known, name)
    return shape.adapting(targets)


def check_targets_exist(targets: list[str], known: set[str], name: str) -> None:
    """Every `lora.target_modules` name is a linear layer's last name component (train and
    plan refuse the same names in the same words)."""
    missing = sorted(set(targets) - known)
    if missing:
        raise UserError(f"config key lora.target_modules names {', '.join(missing)[:200]}, "
                        f"which match no linear layer of {name} — use 'all-linear' or names "
                        f"from: {', '.join(sorted(known))[:300]}")


def unquantized_base_error(name: str, kinds: str) -> UserError:
    """A 4-bit run over a base whose linear layers bitsandbytes' replacement skips (it takes
    exact nn.Linear and Conv1D only): train and plan refuse it in the same words."""
    return UserError(f"model {name}: bitsandbytes quantizes none of its linear layers "
                     f"({kinds}), so quant.bits = 4 would train a 16-bit base — set quant.bits "
                     "to 16 for plain LoRA on it")


def _matches(module_name: str, key: str) -> bool:
    return module_name == key or module_name.endswith("." + key) or f"{key}." in module_name


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _num_layers(model, name: str) -> int:
    layers = _decoder_layers(model)
    if not layers:
        raise UserError(f"{name}: {type(model).__name__} has no decoder layers that transformers "
                        "can checkpoint (GradientCheckpointingLayer) — the planner models "
                        "decoder-only causal LMs")
    return len(layers)


def _layer_shape(model, name: str) -> dict:
    """What the activation terms need from the decoder layers: MLP kind and widths, norms.

    Layers that differ (dense and MoE layers mixed) are planned as the widest of them.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from qlora_lab.fastpath import _is_rms_norm, _is_swiglu_mlp

    config = model.config
    _num_layers(model, name)  # a model without decoder layers is refused here
    shapes = []
    for layer in _decoder_layers(model):
        children = dict(layer.named_children())
        if not any(n in children for n in ATTENTION_NAMES):
            raise UserError(f"{name}: decoder layer {type(layer).__name__} has no attention "
                            f"module (children: {', '.join(children)[:120]}) — the planner "
                            "models attention decoders (no state-space or linear-attention "
                            "layers)")
        mlp = next((children[n] for n in MLP_NAMES if n in children), None)
        direct = [c for c in children.values() if isinstance(c, (nn.Linear, Conv1D))]
        if mlp is None and len(direct) != 2:
            raise UserError(f"{name}: decoder layer {type(layer).__name__} has no feed-forward "
                            f"block named {' / '.join(MLP_NAMES)} — not modelled")
        norms = [m for m in children.values()
                 if _is_norm(m) and getattr(m, "weight", None) is not None
                 and m.weight.numel() == config.hidden_size]
        kind = ("rms" if norms and all(_is_rms_norm(m) for m in norms) else
                "layer" if norms and "layernorm" in type(norms[0]).__name__.lower() else
                "rms_fp32")
        attention = next(children[n] for n in ATTENTION_NAMES if n in children)
        shape = {"norms_per_layer": max(1, len(norms)), "norm_kind": kind,
                 "qk_norm": any(_is_norm(m) for m in attention.modules()),
                 "fused_qkv": _fused_qkv(attention, config),
                 # OPT keeps its two MLP linears (fc1, fc2) in the layer itself: a plain MLP.
                 **(_mlp_shape(mlp, config, name, _is_swiglu_mlp) if mlp is not None else
                    {"mlp": "plain", "intermediate_size": max(_width(c) for c in direct)})}
        shapes.append(shape)
    widest = max(shapes, key=lambda s: (s["mlp"] == "moe", s["intermediate_size"]))
    # The decoder's own last norm (Llama's `norm`, GPT-2's `ln_f`), a direct child of it.
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    final = any(_is_norm(child) for child in decoder.children())
    return {**widest, "final_norm": final,
            "sliding_window": memory.sliding_window(config)}


def _width(module) -> int:
    """A linear layer's output width (GPT-2's Conv1D stores its weight as in x out)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.shape[1] if isinstance(module, Conv1D) else module.out_features


def _fused_qkv(attention, config) -> bool:
    """q, k and v come out of one projection (Phi-3's qkv_proj, GPT-2's c_attn)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    fused = (heads + 2 * kv_heads) * head_dim
    for module in attention.modules():
        if isinstance(module, nn.Linear) and module.out_features == fused:
            return True
        if isinstance(module, Conv1D) and module.weight.shape[1] == fused:
            return True
    return False


def _mlp_shape(mlp, config, name: str, is_swiglu) -> dict:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    children = dict(mlp.named_children())
    experts = children.get("experts")
    if experts is not None:
        return _moe_shape(mlp, experts, config, name)

    act = getattr(config, "hidden_act", None)
    if is_swiglu(mlp) and act in ("silu", "swish"):
        return {"mlp": "swiglu", "intermediate_size": mlp.gate_proj.out_features}
    if "gate_proj" in children or "gate_up_proj" in children:
        return {"mlp": "gated", "intermediate_size": children["down_proj"].in_features}
    linear = [m for m in children.values() if isinstance(m, (nn.Linear, Conv1D))]
    if len(linear) == 2:
        return {"mlp": "plain", "intermediate_size": max(_width(m) for m in linear)}
    raise UserError(f"{name}: feed-forward block {type(mlp).__name__} (children: "
                    f"{', '.join(children)[:120]}) is not modelled — the planner knows "
                    "gated (SwiGLU/GeGLU), plain two-layer and MoE blocks")


def _moe_shape(mlp, experts, config, name: str) -> dict:
    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
    if not top_k:
        raise UserError(f"{name}: MoE block {type(mlp).__name__} but the config names no "
                        "num_experts_per_tok — not modelled")
    weights = list(experts.parameters())
    if weights and weights[0].dim() == 3:  # fused: (experts, 2 x I or I, H)
        count = weights[0].shape[0]
        per_expert = getattr(config, "moe_intermediate_size", None) or min(
            min(p.shape[1:]) for p in weights)
    else:  # a ModuleList of MLPs (their linears are quantized and adapted like any other)
        count = len(experts)
        per_expert = getattr(config, "moe_intermediate_size", None) or max(
            m.out_features for m in experts[0].modules() if hasattr(m, "out_features"))
    # An always-active shared expert (Qwen2-MoE, DeepSeek): a dense MLP beside the routed ones.
    shared = sum(child.down_proj.in_features for child_name, child in mlp.named_children()
                 if child_name.startswith("shared_expert") and hasattr(child, "down_proj"))
    return {"mlp": "moe", "intermediate_size": per_expert * top_k + shared,
            "num_experts": count, "experts_per_token": top_k,
            "expert_intermediate_size": per_expert, "shared_intermediate_size": shared}
