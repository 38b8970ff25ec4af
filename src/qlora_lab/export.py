"""`qlora-lab export --gguf`: one GGUF file that llama.cpp, Ollama and transformers load.

The input is a run (base + adapter, merged in memory by `merge.merge_adapter`, the code path of
`qlora-lab merge`), a merged folder, or a base model. The file holds what llama.cpp needs to run
the model without the Hugging Face folder: the architecture and its hyperparameters, the
tokenizer (vocabulary, merges, special token ids, chat template) and the tensors under llama.cpp's
names (`gguf.get_tensor_name_map`).

Two facts shape the tensors:
- llama.cpp's `llama` architecture applies rotary embeddings to adjacent pairs of a head's
  dimensions (x0, x1), (x2, x3)...; transformers' Llama rotates the first half of the head against
  the second (x0, x_d/2)... The two are the same rotation once each head's rows of q_proj and
  k_proj are interleaved, so we reorder those rows here; transformers' GGUF loader undoes exactly
  this (LlamaTensorProcessor). Qwen2 in llama.cpp rotates halves as transformers does: no reorder.
- 1-D tensors (norms, biases) stay fp32, as llama.cpp keeps them in every file type: they are tiny
  and its kernels for them expect fp32. q8_0 applies to 2-D weights whose rows split into 32-wide
  blocks; any other row length falls back to f16.

The file is written beside the target under a `.tmp-` name, fsynced and renamed: a crash or a
full disk leaves the old file (or none), never half a model under the target name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qlora_lab import adapters, fsio, models, safety
from qlora_lab.config import ModelConfig, QuantConfig, check_path_text
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

TYPES = ("f16", "q8_0")  # --type; f16 is exact up to fp16 rounding, q8_0 about half the size
# transformers model_type -> gguf.MODEL_ARCH name. Mistral is Llama's layout to llama.cpp (its
# converter writes MistralForCausalLM as `llama`); its sliding window is refused where it acts.
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
INTERLEAVE_ROPE = {"llama", "mistral"}  # see the module docstring


@dataclass(frozen=True)
class ExportConfig:
    """gguf: the file to write. Exactly one source: adapter (a run's output dir or adapter dir,
    merged in memory), model_dir (a merged or plain transformers folder) or model (a base: preset,
    local dir or hub id; with adapter it overrides the recorded base).
    type: f16 or q8_0 for the 2-D weights (norms stay fp32). overwrite: replace an existing file.
    device: where the model is loaded and a run merged (auto: CUDA if present); writing is CPU.
    allow_pickle / trust_remote_code: as for merge; a file's contents can never grant them.
    """

    gguf: str
    adapter: str | None = None
    model_dir: str | None = None
    model: str | None = None
    type: str = "f16"
    overwrite: bool = False
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise UserError(f"--type {self.type!r} is not supported — use one of "
                            + ", ".join(TYPES))
        if self.model_dir is not None and (self.adapter, self.model) != (None, None):
            raise UserError("--model-dir is a whole model: pass it without --adapter or --model")
        check_path_text(self.gguf, "--gguf")
        if self.adapter is None and self.model_dir is None and self.model is None:
            raise UserError("nothing to export — pass --adapter DIR (a trained run), --model-dir "
                            "DIR (a merged model) or --model NAME (a base model)")


def check_output_file(out: Path, overwrite: bool) -> None:
    """Checked before any model is loaded: a file path whose folder can be written."""
    if out.is_dir():
        raise UserError(f"--gguf {out} is a directory — pass a file path such as "
                        f"{out / 'model.gguf'}")
    if os.path.lexists(out) and not overwrite:
        raise UserError(f"--gguf {out} already exists — pass --overwrite to replace it, or "
                        "another path (nothing was written)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=fsio.TMP_PREFIX + out.name + ".", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"--gguf {out} cannot be written ({exc.strerror}) — pick another "
                        "path") from None


def _check_architecture(config, source: str) -> str:
    """The model_type, if export can describe it to llama.cpp; else one line saying what can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UserError(f"{source} is a {model_type!r} model, which export cannot write as "
                        f"GGUF yet — supported architectures: {', '.join(ARCHS)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"{source} uses hidden_act {config.hidden_act!r}; llama.cpp's "
                        f"{model_type} runs silu only — it cannot be exported")
    window = getattr(config, "sliding_window", None) if model_type == "mistral" else None
    if getattr(config, "use_sliding_window", False) or (
            window and window < getattr(config, "max_position_embeddings", 0)):
        raise UserError(f"{source} uses sliding-window attention, which llama.cpp's "
                        f"{model_type} does not — it cannot be exported")
    _rope(config, source)  # refuses a rope scaling llama.cpp would not reproduce
    return model_type


def _rope(config, source: str) -> tuple[float, str, float]:
    """(theta, scaling type, factor). transformers 5 keeps these in `rope_parameters`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise UserError(f"{source} uses rope scaling {kind!r}; export writes default and linear "
                        "rope only — it cannot be exported")
    return theta, kind, float(params.get("factor", 1.0))


# --- the dense model -----------------------------------------------------------------------------


def _load_dense(cfg: ExportConfig):
    """(model in fp32 on `device`, tokenizer, model_type, a name for the source)."""
    from transformers import AutoConfig, AutoTokenizer

    from qlora_lab.merge import merge_adapter, trained_dtype

    device = models.resolve_device(cfg.device)
    if cfg.adapter:
        ref = adapters.resolve_adapter(cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle,
                                       trust_remote_code=cfg.trust_remote_code)
        base_path = models.resolve_model_path(ref.base_model)
        safety.require_safetensors(Path(base_path), "base model", cfg.allow_pickle)
        with adapters.explain_load_errors(f"base model {ref.base_model}", "pass the base the "
                                          "adapter was trained on with --model"):
            config = AutoConfig.from_pretrained(base_path,
                                                trust_remote_code=ref.trust_remote_code)
        model_type = _check_architecture(config, f"base model {ref.base_model}")
        adapters.check_base_matches(ref, config)
        # NF4 in the dtype training computed in (its block scales depend on it), merged in fp32:
        # the GGUF type is the only rounding after that.
        trained = trained_dtype(ref.adapter_dir) or "auto"
        model = merge_adapter(ref, base_path, device, trained, torch.float32)
        tokenizer_dir, source = str(ref.tokenizer_dir or base_path), str(ref.adapter_dir)
    else:
        name = cfg.model_dir or cfg.model
        given = Path(name).expanduser()
        if cfg.model_dir and ((given / "adapter_config.json").is_file()
                              or (given / "adapter" / "adapter_config.json").is_file()):
            raise UserError(f"model dir {name} holds an adapter, not a model — pass it with "
                            "--adapter (export merges it into its base)")
        if cfg.model_dir and not (given / "config.json").is_file():
            problem = "does not exist" if not given.exists() else "has no config.json"
            raise UserError(f"model dir {name} {problem} — pass a folder written by "
                            "`qlora-lab merge` or save_pretrained, or a run with --adapter")
        # --model-dir is a folder even where its name is also a preset's (`tinyllama`).
        path = str(given) if cfg.model_dir else models.resolve_model_path(name)
        safety.require_safetensors(Path(path), "model dir", cfg.allow_pickle)
        with adapters.explain_load_errors(f"model {name}", "pass a folder written by "
                                          "`qlora-lab merge` or save_pretrained"):
            config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
            model_type = _check_architecture(config, f"model {name}")
            model = models.load_base_model(
                path, ModelConfig(name=name, trust_remote_code=cfg.trust_remote_code,
                                  allow_pickle=cfg.allow_pickle),
                QuantConfig(bits=16, compute_dtype="float32"), device)
        tokenizer_dir, source = path, name
    with adapters.explain_load_errors(f"tokenizer in {tokenizer_dir}", "export needs the "
                                      "tokenizer the model was trained with"):
        # Read as saved (models.load_tokenizer would invent a pad token): the file records what
        # the folder says.
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir,
                                                  trust_remote_code=cfg.trust_remote_code)
    return model.eval(), tokenizer, model_type, source


# --- tensors -------------------------------------------------------------------------------------


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (x_0..x_{d/2-1}, y_0..y_{d/2-1}) to pairs
    (x_0, y_0, x_1, y_1...): transformers' rotate-half rope becomes llama.cpp's pairwise rope."""
    head_dim = weight.shape[0] // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def tensor_plan(model, model_type: str, file_type: str) -> list[tuple[str, str, object, int]]:
    """(llama.cpp name, transformers name, GGML type, heads to interleave or 0) per tensor."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHS[model_type]],
                                     config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    plan = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads a missing output.weight as tied to token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"the model has a tensor {hf_name} that llama.cpp's {model_type} "
                            "layout has no name for — it cannot be exported")
        heads = 0
        if model_type in INTERLEAVE_ROPE and ".attn_q." in name:
            heads = config.num_attention_heads
        elif model_type in INTERLEAVE_ROPE and ".attn_k." in name:
            heads = config.num_key_value_heads or config.num_attention_heads
        plan.append((name, hf_name, storage_type(tuple(tensor.shape), file_type), heads))
    return plan


def encode_tensor(tensor: torch.Tensor, qtype, heads: int) -> np.ndarray:
    """One tensor as the bytes (or fp16/fp32 values) the file stores."""
    import gguf

    array = tensor.detach().to("cpu", torch.float32).numpy()
    if heads:
        array = interleave_rope_rows(array, heads)
    return gguf.quants.quantize(np.ascontiguousarray(array), qtype)


def storage_type(shape: tuple[int, ...], file_type: str):
    """The GGML type a tensor of `shape` is stored in for `--type file_type`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    q8 = GGMLQuantizationType.Q8_0
    if file_type == "q8_0" and shape[-1] % GGML_QUANT_SIZES[q8][0] == 0:
        return q8
    return GGMLQuantizationType.F16


# --- tokenizer -----------------------------------------------------------------------------------

# How llama.cpp splits text before byte-level BPE, by the name it knows each split under
# (tokenizer.ggml.pre). Matched by behaviour on CHECK_TEXT, not by the tokenizer's JSON, so a
# regex spelled differently but splitting alike still matches.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CHECK_TEXT = ("Hello world! It's 2024: I'VE 1234567 apples,\n\n  tabs\tand   spaces. "
              "ÄÖü café 你好 don't 3.14 ...\r\n end")


def _byte_level_splits() -> dict[str, object]:
    from tokenizers import Regex, pre_tokenizers

    def byte_level(use_regex: bool):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)

    def split(regex: str):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                        byte_level(False)])

    return {"gpt-2": byte_level(True),
            "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               byte_level(True)]),
            "llama-bpe": split(LLAMA3_SPLIT), "qwen2": split(QWEN2_SPLIT)}


def _pieces(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer as llama.cpp's metadata describes it."""

    model: str  # "gpt2": byte-level BPE; "llama": sentencepiece-style BPE with byte fallback
    pre: str  # llama.cpp's name for the split before BPE
    tokens: list[str]
    types: list[int]  # gguf.TokenType values
    merges: list[str]
    scores: list[float] | None  # sentencepiece only: llama.cpp merges the best-scored pair first
    special_ids: dict[str, int]  # bos, eos, unk, pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def describe_tokenizer(tokenizer, n_vocab: int, source: str) -> GGUFVocab:
    """Read a fast tokenizer into llama.cpp's terms, or refuse one llama.cpp cannot reproduce."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    bpe = spec.get("model") or {}
    shape = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if bpe.get("type") == "BPE" and not bpe.get("byte_fallback") and "ByteLevel" in shape:
        kind = "gpt2"
    elif bpe.get("type") == "BPE" and bpe.get("byte_fallback") and "\u2581" in shape:
        kind = "llama"
    else:
        raise UserError(f"the tokenizer of {source} ({bpe.get('type', 'not a fast tokenizer')}) "
                        "is not one llama.cpp can reproduce — export supports byte-level BPE "
                        "(SmolLM2, Qwen2, Llama 3) and sentencepiece-style BPE with byte fallback "
                        "(Llama 2, TinyLlama)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"the tokenizer of {source} has ids up to {max(vocab.values())} but the "
                        f"model's vocab_size is {n_vocab} — the folder mixes two models; "
                        "re-run merge or pass the matching tokenizer")
    # Ids the tokenizer never produces (embedding rows padded to a round size) get placeholders.
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for token, index in vocab.items():
        tokens[index], types[index] = token, int(TokenType.NORMAL)
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    for index in tokenizer.all_special_ids:
        types[index] = int(TokenType.CONTROL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    special = {key: getattr(tokenizer, f"{key}_token_id", None)
               for key in ("bos", "eos", "unk", "pad")}
    special = {key: index for key, index in special.items() if index is not None}
    probe = ("a", "a b")
    with_special = [tokenizer(text)["input_ids"] for text in probe]
    plain = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in probe]
    add_bos = "bos" in special and all(w[:1] == [special["bos"]] and w[1:len(p) + 1] == p
                                       for w, p in zip(with_special, plain))
    add_eos = "eos" in special and all(w[-1:] == [special["eos"]] and len(w) > len(p)
                                       for w, p in zip(with_special, plain))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if kind == "gpt2":
        pre, scores, space_prefix = _byte_level_pre(spec, backend, merges, source), None, False
    else:
        # Sentencepiece marks word starts with U+2581; llama.cpp adds one before the text when
        # the tokenizer does (Metaspace with prepend_scheme first/always, or a Prepend normalizer).
        pre = "default"  # llama.cpp splits sentencepiece text on its own
        space_prefix = "Prepend" in shape or re.search(r'"prepend_scheme": "(first|always)"',
                                                        shape) is not None
        for index, token in enumerate(tokens):
            if types[index] == TokenType.NORMAL and len(token) == 6 and token.startswith("<0x"):
                types[index] = int(TokenType.BYTE)
        if "unk" in special:
            types[special["unk"]] = int(TokenType.UNKNOWN)
        scores = _merge_scores(tokens, merges)
    return GGUFVocab(kind, pre, tokens, types, merges, scores, special, add_bos, add_eos,
                     space_prefix, template)


def _byte_level_pre(spec: dict, backend, merges: list[str], source: str) -> str:
    if not merges:
        # gguf cannot store an empty array, and llama.cpp refuses a BPE vocabulary without one.
        raise UserError(f"the tokenizer of {source} has no BPE merges (one token per byte), "
                        "which a GGUF file cannot describe — export a model with a trained "
                        "tokenizer")
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise UserError(f"the tokenizer of {source} normalizes text "
                        f"({spec['normalizer'].get('type')}), which llama.cpp does not — it "
                        "cannot be exported")
    expected = _pieces(backend.pre_tokenizer, CHECK_TEXT)
    for name, candidate in _byte_level_splits().items():
        if _pieces(candidate, CHECK_TEXT) == expected:
            return name
    raise UserError(f"the tokenizer of {source} splits text in a way llama.cpp has no name for "
                    f"— export knows: {', '.join(_byte_level_splits())}")


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Sentencepiece scores that make llama.cpp merge in the tokenizer's merge order.

    llama.cpp merges the adjacent pair whose joined token scores highest; transformers merges the
    pair listed first. A token's score is minus the rank of the first merge that makes it, so
    both pick the same pair. Tokens no merge makes (single characters, bytes, specials) score
    below every merge, so llama.cpp never joins into one that transformers would not.
    """
    rank = {}
    for index, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), index)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


# --- writing -------------------------------------------------------------------------------------


def _add_metadata(writer, config, model_type: str, file_type: str, name: str, source: str):
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta, scaling, factor = _rope(config, source)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)


def _add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:  # sentencepiece-style too: transformers reads them, llama.cpp the scores
        writer.add_token_merges(vocab.merges)
    for key, index in vocab.special_ids.items():
        getattr(writer, f"add_{key}_token_id")(index)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(path: Path, model, model_type: str, vocab: GGUFVocab, file_type: str,
               name: str, source: str) -> int:
    """Write the file at `path`; return the number of tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHS[model_type]]])
    _add_metadata(writer, model.config, model_type, file_type, name, source)
    _add_vocab(writer, vocab)
    # The header lists every tensor's shape and type first; the data then follows one tensor at
    # a time, so converted copies of the weights never all sit in memory at once.
    plan = tensor_plan(model, model_type, file_type)
    state = model.state_dict()
    for gguf_name, hf_name, qtype, _ in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(state[hf_name].shape), qtype)
        writer.add_tensor_info(gguf_name, byte_shape, np.uint8, int(np.prod(byte_shape)),
                               raw_dtype=qtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, hf_name, qtype, heads in plan:
            writer.write_tensor_data(encode_tensor(state[hf_name], qtype, heads))
        writer.flush()
    finally:
        writer.close()
    return len(plan)


def check_not_an_input(out: Path, cfg: ExportConfig) -> None:
    """--overwrite replaces an earlier export, never what this export reads.

    A new file inside the run or model folder is fine (`--gguf run/model.gguf`), and so is an
    earlier GGUF there; an existing file of another kind inside an input (the adapter's
    weights, the run's config) is the source itself, which the GGUF would destroy.
    """
    if not os.path.lexists(out):
        return
    target = out.resolve()
    for given in (cfg.adapter, cfg.model_dir, cfg.model):
        if not given or not Path(given).expanduser().exists():
            continue  # a preset or hub id: nothing on disk of the user's to protect
        source = Path(given).expanduser().resolve()
        if source.name == "adapter":  # a run's adapter dir: the run's files are inputs too
            source = source.parent
        inside = target == source or source in target.parents
        if inside and not _is_gguf(target):
            raise UserError(f"--gguf {out} is a file of the input {given}, not an earlier "
                            "export — pass another path (nothing was written)")


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def run_export(cfg: ExportConfig) -> dict:
    out = Path(cfg.gguf).expanduser()
    check_not_an_input(out, cfg)
    check_output_file(out, cfg.overwrite)
    model, tokenizer, model_type, source = _load_dense(cfg)
    vocab = describe_tokenizer(tokenizer, model.config.vocab_size, source)
    name = Path(source.rstrip("/")).name or source
    if name == "adapter":
        name = Path(source.rstrip("/")).parent.name  # a run's adapter/ dir: the run's name
    fd, tmp = tempfile.mkstemp(prefix=fsio.TMP_PREFIX + out.name + ".", dir=out.parent)
    os.close(fd)
    try:
        n_tensors = write_gguf(Path(tmp), model, model_type, vocab, cfg.type, name, source)
        os.chmod(tmp, 0o666 & ~fsio.current_umask())  # mkstemp made it 0600
        fsio.commit_file(Path(tmp), out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write --gguf {out} ({exc.strerror or exc}) — nothing was "
                        "written; free some space or pick another path") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    report = {"gguf": str(out), "type": cfg.type, "architecture": model_type,
              "source": source, "tensors": n_tensors, "size_bytes": out.stat().st_size,
              "tokenizer": f"{vocab.model} (pre-tokenizer {vocab.pre})",
              "vocab_size": len(vocab.tokens), "chat_template": vocab.chat_template is not None}
    log.info("wrote %s: %s, %d tensors, %.1f MB", out, cfg.type, n_tensors,
             report["size_bytes"] / 1e6)
    return report
