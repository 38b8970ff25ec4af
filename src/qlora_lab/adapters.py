"""Find an adapter (or merged model) on disk and rebuild what it needs to run.

A run dir written by `train` holds `adapter/` plus the tokenizer and config.yaml; a bare adapter
dir (plain peft) works too. `qlora_lab_base.json` beside the adapter names the base it was trained
on (including presets like `tiny-random`, which have no hub id), its quantization and its prompt
template, so `generate` and `merge` can rebuild exactly that setup and refuse a mismatched base.

Everything read here may come from someone else, so it is checked before use: weights must be
safetensors (pickles only with `allow_pickle`), JSON files must hold what we wrote, and a recorded
`trust_remote_code: true` is honoured only when the user passes it too.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import models, safety
from qlora_lab.config import ModelConfig, QuantConfig, config_from_dict
from qlora_lab.errors import UserError

BASE_INFO_FILE = "qlora_lab_base.json"
TEMPLATES = ("auto", "chat", "plain")
FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class AdapterRef:
    """Everything needed to load one trained adapter."""

    adapter_dir: Path
    tokenizer_dir: Path | None  # None: use the base's tokenizer
    base_model: str
    quant: QuantConfig
    template: str
    trust_remote_code: bool
    fingerprint: dict | None
    allow_pickle: bool = False


def fingerprint(config) -> dict:
    """Shape facts an adapter depends on: a wrong base fails these, not deep inside a matmul."""
    return {k: getattr(config, k, None) for k in FINGERPRINT_KEYS}


def write_base_info(target: Path, model_cfg: ModelConfig, quant: QuantConfig, template: str,
                    config, **extra) -> None:
    info = {"model": model_cfg.name, "trust_remote_code": model_cfg.trust_remote_code,
            "quant": {"bits": quant.bits, "quant_type": quant.quant_type,
                      "double_quant": quant.double_quant},
            "template": template, "fingerprint": fingerprint(config), **extra}
    (target / BASE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _read_json_object(path: Path, fix: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path} is corrupted (not valid JSON) — {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is corrupted (expected a JSON object, got "
                        f"{type(value).__name__}) — {fix}")
    return value


def read_base_info(directory: Path) -> dict:
    """`qlora_lab_base.json` of an adapter or merged model ({} if absent), checked field by field."""
    path = directory / BASE_INFO_FILE
    if not path.is_file():
        return {}
    fix = "re-run train (or merge), or delete the file and pass the base with --model"
    info = _read_json_object(path, fix)
    expected = {"model": str, "trust_remote_code": bool, "quant": dict, "template": str,
                "fingerprint": dict}
    for key, kind in expected.items():
        if key in info and not isinstance(info[key], kind):
            raise UserError(f"{path}: {key} = {info[key]!r} must be a {kind.__name__} — {fix}")
    if info.get("template", "auto") not in TEMPLATES:
        raise UserError(f"{path}: template = {info['template']!r} must be one of "
                        f"{', '.join(TEMPLATES)} — {fix}")
    if "quant" in info:
        try:
            config_from_dict({"quant": info["quant"]})
        except UserError as exc:
            raise UserError(f"{path}: {exc} — {fix}") from None
    return info


def _check_adapter_files(adapter_dir: Path, allow_pickle: bool) -> None:
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        safety.require_whole_safetensors(weights, "re-run train, or restore the file from a "
                                         "checkpoint (checkpoints/checkpoint-N/)")
        return
    safety.require_safetensors(adapter_dir, "adapter dir", allow_pickle)
    if not (allow_pickle and (adapter_dir / "adapter_model.bin").is_file()):
        raise UserError(f"adapter dir {adapter_dir} has no adapter_model.safetensors — the run "
                        "did not finish; resume it with qlora-lab train --resume")


def resolve_adapter(path: str, model_override: str | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False) -> AdapterRef:
    """Find and check an adapter; `allow_pickle`/`trust_remote_code` are the user's explicit
    permissions (an adapter's own files can never grant them)."""
    given = Path(path).expanduser()
    if (given / "adapter" / "adapter_config.json").is_file():
        adapter_dir, run_dir = given / "adapter", given
    elif (given / "adapter_config.json").is_file():
        adapter_dir, run_dir = given, given.parent
    elif not given.exists():
        raise UserError(f"adapter dir {path} does not exist — pass a run's --output-dir or its "
                        "adapter/ folder")
    else:
        raise UserError(f"adapter dir {path} has no adapter_config.json — train first "
                        "(qlora-lab train --output-dir DIR) or pass the run's output dir")
    _check_adapter_files(adapter_dir, allow_pickle)
    info = read_base_info(adapter_dir)
    peft_cfg = _read_json_object(adapter_dir / "adapter_config.json",
                                 "re-run train or restore the file")
    base = model_override or info.get("model") or peft_cfg.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        raise UserError(f"adapter {adapter_dir} does not name its base model — pass --model")
    if info.get("trust_remote_code") and not trust_remote_code:
        raise UserError(f"adapter {adapter_dir} was trained with model.trust_remote_code, so "
                        f"loading its base {base} runs code from that model's repo — pass "
                        "--trust-remote-code if you trust it")
    quant = QuantConfig(**info["quant"]) if "quant" in info else QuantConfig()
    tokenizer_dir = next((d for d in (run_dir, adapter_dir)
                          if (d / "tokenizer_config.json").is_file()), None)
    return AdapterRef(adapter_dir, tokenizer_dir, base, quant, info.get("template", "auto"),
                      bool(info.get("trust_remote_code", False)), info.get("fingerprint"),
                      allow_pickle)


def check_base_matches(ref: AdapterRef, config) -> None:
    if not ref.fingerprint:
        return  # a plain peft adapter: peft reports shape mismatches itself
    actual = fingerprint(config)
    for key, expected in ref.fingerprint.items():
        if expected != actual.get(key):
            raise UserError(f"adapter {ref.adapter_dir} was trained on a different base ({key} = "
                            f"{expected}, but {ref.base_model} has {actual.get(key)}) — pass the "
                            "base it was trained on with --model")


def load_adapter_model(ref: AdapterRef, device: str, compute_dtype: str = "auto"):
    """Base (quantized as in training) + the adapter, unmerged, in eval mode; and the tokenizer."""
    from peft import PeftModel

    model_cfg = ModelConfig(name=ref.base_model, trust_remote_code=ref.trust_remote_code)
    quant = QuantConfig(bits=ref.quant.bits, quant_type=ref.quant.quant_type,
                        double_quant=ref.quant.double_quant, compute_dtype=compute_dtype)
    base_path = models.resolve_model_path(ref.base_model)
    safety.require_safetensors(Path(base_path), "base model", ref.allow_pickle)
    with explain_load_errors(f"base model {ref.base_model}", "check the model dir, or pass the "
                             "base the adapter was trained on with --model"):
        tokenizer = models.load_tokenizer(str(ref.tokenizer_dir or base_path),
                                          ref.trust_remote_code)
        base = models.load_base_model(base_path, model_cfg, quant, device)
    check_base_matches(ref, base.config)
    with explain_load_errors(f"adapter {ref.adapter_dir} onto {ref.base_model}",
                             "pass the base it was trained on with --model, or re-run train"):
        model = PeftModel.from_pretrained(base, str(ref.adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer, base_path


@contextlib.contextmanager
def explain_load_errors(what: str, fix: str):
    """Turn a library's failure to read a user's files into one line naming them.

    Used only around single library calls that parse files from anywhere: a config.json that is
    not JSON or has a string where an int belongs, a safetensors file with the wrong shapes, an
    adapter_config.json peft rejects. Those libraries raise a dozen exception types for such
    input (OSError, ValueError, TypeError, SafetensorError, huggingface_hub's validation
    errors...), hence the broad catch; `--debug` still shows the original traceback, since the
    UserError is raised `from` it. Running out of GPU memory is not a bad file and passes through.
    """
    try:
        yield
    except (UserError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())  # libraries put the useful part on line 2
        detail = detail[:300] + ("..." if len(detail) > 300 else "")
        raise UserError(f"could not load {what}: {type(exc).__name__}: {detail} — {fix}") from exc
