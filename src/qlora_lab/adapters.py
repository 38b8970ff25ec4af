"""Find an adapter (or merged model) on disk and rebuild what it needs to run.

A run dir written by `train` holds `adapter/` plus the tokenizer and config.yaml; a bare adapter
dir (plain peft) works too. `qlora_lab_base.json` beside the adapter names the base it was trained
on (including presets like `tiny-random`, which have no hub id), its quantization and its prompt
template, so `generate` and `merge` can rebuild exactly that setup and refuse a mismatched base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_lab import models
from qlora_lab.config import ModelConfig, QuantConfig
from qlora_lab.errors import UserError

BASE_INFO_FILE = "qlora_lab_base.json"
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


def read_base_info(directory: Path) -> dict:
    path = directory / BASE_INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupted (not JSON) — re-run train, or delete it and pass "
                        "the base with --model") from None


def resolve_adapter(path: str, model_override: str | None = None) -> AdapterRef:
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
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"adapter dir {adapter_dir} has no adapter_model.safetensors — the run "
                        "did not finish; resume it with qlora-lab train --resume")
    info = read_base_info(adapter_dir)
    try:
        peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON — re-run "
                        "train or restore the file") from None
    base = model_override or info.get("model") or peft_cfg.get("base_model_name_or_path")
    if not base:
        raise UserError(f"adapter {adapter_dir} does not name its base model — pass --model")
    quant = QuantConfig(**info["quant"]) if "quant" in info else QuantConfig()
    tokenizer_dir = next((d for d in (run_dir, adapter_dir)
                          if (d / "tokenizer_config.json").is_file()), None)
    return AdapterRef(adapter_dir, tokenizer_dir, base, quant, info.get("template", "auto"),
                      bool(info.get("trust_remote_code", False)), info.get("fingerprint"))


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
    tokenizer = models.load_tokenizer(str(ref.tokenizer_dir or base_path), ref.trust_remote_code)
    base = models.load_base_model(base_path, model_cfg, quant, device)
    check_base_matches(ref, base.config)
    model = PeftModel.from_pretrained(base, str(ref.adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer, base_path
