"""Find an adapter (or merged model) on disk and rebuild what it needs to run.

A run dir written by `train` holds `adapter/` plus the tokenizer and config.yaml; a bare adapter
dir (plain peft) works too. `qlora_lab_base.json` beside the adapter names the base it was trained
on (including presets like `tiny-random`, which have no hub id), its quantization and its prompt
template, so `generate` and `merge` can rebuild exactly that setup and refuse a mismatched base.

Everything read here may come from someone else, so it is checked before use: weights must be
safetensors (pickles only with `allow_pickle`), JSON files must hold what we wrote, and a recorded
`trust_remote_code: true` is honoured only when the user passes it too. adapter_config.json is
checked against the tensor shapes in the safetensors header (no weight is read) before the base is
loaded: an edited rank, scale, target list or feature flag would otherwise load silently (peft
re-initialises missing LoRA weights and drops extra ones) or allocate a huge rank first.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import modelcard, models, safety
from qlora_lab.config import (
    MAX_LORA_ALPHA,
    MAX_LORA_RANK,
    ModelConfig,
    QuantConfig,
    config_from_dict,
    load_yaml,
)
from qlora_lab.errors import UserError

BASE_INFO_FILE = "qlora_lab_base.json"
TEMPLATES = ("auto", "chat", "plain", "raw")  # raw: data.RAW, rows trained as written
FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft options `train` never sets. Each changes how the weights apply (DoRA magnitudes, per-module
# ranks, full copies of base modules, skipped layers...) in ways the shape checks below do not
# cover, so an adapter that turns one on did not come from qlora-lab: refuse it, do not guess.
UNSUPPORTED_OPTIONS = ("use_dora", "use_qalora", "lora_bias", "fan_in_fan_out", "rank_pattern",
                       "alpha_pattern", "modules_to_save", "layers_to_transform",
                       "layer_replication", "exclude_modules", "target_parameters",
                       "trainable_token_indices", "alora_invocation_tokens", "use_bdlora",
                       "megatron_config")
LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # what peft's LoraConfig assumes for a missing key


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
                    config, *, run=None, summary: dict | None = None, **extra) -> None:
    """Record the base in `target`; in an adapter folder also make it shareable: the base's hub
    id in adapter_config.json (peft wrote the local path it loaded) and a README.md model card
    built from the run's config and summary (over peft's template card)."""
    info = {"model": model_cfg.name, "trust_remote_code": model_cfg.trust_remote_code,
            "quant": {"bits": quant.bits, "quant_type": quant.quant_type,
                      "double_quant": quant.double_quant},
            "template": template, "fingerprint": fingerprint(config), **extra}
    (target / BASE_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    peft_config = target / ADAPTER_CONFIG
    if not peft_config.is_file():
        return  # a merged model: no adapter to share
    hub_id = modelcard.hub_id(model_cfg.name)
    if hub_id:
        values = json.loads(peft_config.read_text(encoding="utf-8"))
        values["base_model_name_or_path"] = hub_id
        peft_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")
    modelcard.write_model_card(target, model_cfg.name, run, template, summary)


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


def _check_record_matches_run(adapter_dir: Path, info: dict) -> None:
    """In a run dir, the base record must agree with the config.yaml that `train` ran.

    A record edited to claim a 16-bit base would make `generate` apply the adapter to weights it
    never saw; the run's own config is the second witness (a bare adapter dir has none).
    """
    run_config = adapter_dir.parent / "config.yaml"
    if adapter_dir.name != "adapter" or not run_config.is_file() or not info:
        return
    try:
        ran = load_yaml(run_config)
    except UserError:
        return  # a damaged config.yaml is a problem for `train --resume`, not for loading

    def section(values, key: str) -> dict:
        value = values.get(key) if isinstance(values, dict) else None
        return value if isinstance(value, dict) else {}

    # What loading will use: keys missing from the record fall back to QuantConfig's defaults.
    quant = QuantConfig(**info.get("quant", {}))
    recorded = {"model": info.get("model"),
                **{f"quant.{k}": getattr(quant, k) for k in ("bits", "quant_type", "double_quant")}}
    actual = {"model": section(ran, "model").get("name"),
              **{f"quant.{k}": v for k, v in section(ran, "quant").items()}}
    for key, value in recorded.items():
        if value is not None and actual.get(key, value) != value:
            raise UserError(f"adapter {adapter_dir}: {BASE_INFO_FILE} records {key} = {value!r} "
                            f"but the run's {run_config} has {actual[key]!r} — one of them was "
                            f"edited; restore {BASE_INFO_FILE} from the run (re-run train)")


def _config_error(adapter_dir: Path, key: str, value, why: str) -> UserError:
    # "could not load adapter": the same lead as explain_load_errors, for the same kind of fault.
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return UserError(f"could not load adapter {adapter_dir}: {ADAPTER_CONFIG} {key} = {shown} "
                     f"{why} — re-run train, or restore the adapter from its run")


def check_peft_config(adapter_dir: Path, cfg: dict) -> None:
    """adapter_config.json must describe a plain LoRA with a sane rank and scale."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _config_error(adapter_dir, "peft_type", cfg["peft_type"],
                            "is not supported (qlora-lab loads LoRA adapters only)")
    r, alpha = cfg.get("r", PEFT_DEFAULT_R), cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if type(r) is not int or not 0 < r <= MAX_LORA_RANK:
        raise _config_error(adapter_dir, "r", r, f"must be a positive integer <= {MAX_LORA_RANK}")
    if (type(alpha) not in (int, float) or not math.isfinite(alpha)
            or not 0 < alpha <= MAX_LORA_ALPHA):
        raise _config_error(adapter_dir, "lora_alpha", alpha,
                            f"must be a positive number <= {MAX_LORA_ALPHA}")
    for key in UNSUPPORTED_OPTIONS:
        if cfg.get(key):
            raise _config_error(adapter_dir, key, cfg[key], "is a peft option qlora-lab never "
                                "writes and does not support (load it with peft directly)")
    # rsLoRA only changes the scale (alpha / sqrt(r)), which every path reads from peft's layer;
    # a non-boolean would be read as truthy by peft, silently.
    if type(cfg.get("use_rslora", False)) is not bool:
        raise _config_error(adapter_dir, "use_rslora", cfg["use_rslora"], "must be true or false")
    if cfg.get("bias", "none") != "none":
        raise _config_error(adapter_dir, "bias", cfg["bias"], "is not supported (only 'none')")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) and targets
            or isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise _config_error(adapter_dir, "target_modules", targets,
                            "must be a list of module names")


def _is_targeted(targets: str | list[str], module: str) -> bool:
    """peft's rule (tuners_utils.check_target_module_exists): a string is a regex over the whole
    name, a list entry matches the name or its last dotted parts."""
    if targets == "all-linear":
        return True  # expanded against the base at load time; nothing to check it against here
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None
        except re.error:
            return False
    return any(module == t or module.endswith("." + t) for t in targets)


def _weights_error(adapter_dir: Path, what: str) -> UserError:
    return UserError(f"could not load adapter {adapter_dir}: {ADAPTER_WEIGHTS} {what} — re-run "
                     "train, or restore the adapter from its run")


def check_weights_match_config(adapter_dir: Path, cfg: dict) -> None:
    """Every tensor is a LoRA A/B pair of rank r for a targeted module, and every target has one.

    Only the safetensors header is read, so a bogus r fails here before anything is allocated.
    """
    shapes = safety.tensor_shapes(adapter_dir / ADAPTER_WEIGHTS, "re-run train")
    modules: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        match = LORA_TENSOR.fullmatch(name)
        if match is None:
            raise _weights_error(adapter_dir, f"holds {name}, which is not a LoRA A/B weight "
                                 "(DoRA magnitudes, biases and saved modules are not supported)")
        modules.setdefault(match["module"], {})[match["part"]] = shape
    if not modules:
        raise _weights_error(adapter_dir, "holds no LoRA weights")
    r, targets = cfg.get("r", PEFT_DEFAULT_R), cfg["target_modules"]
    for module, parts in sorted(modules.items()):
        if not _is_targeted(targets, module):
            raise _weights_error(adapter_dir, f"has weights for {module}, which "
                                 f"{ADAPTER_CONFIG} target_modules does not list")
        a, b = parts.get("A"), parts.get("B")
        if (a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r
                or min(a[1], b[0]) < 1):
            raise _weights_error(adapter_dir, f"has lora_A {a} and lora_B {b} for {module}, but "
                                 f"{ADAPTER_CONFIG} r = {r} needs [{r}, in] and [out, {r}]")
    if isinstance(targets, list):
        for target in targets:
            if not any(_is_targeted([target], module) for module in modules):
                raise _weights_error(adapter_dir, f"has no weights for {target}, which "
                                     f"{ADAPTER_CONFIG} target_modules lists")


def check_modules_exist(adapter_dir: Path, base) -> None:
    """Every module the adapter has weights for exists in `base`.

    peft skips adapter weights whose module the base lacks with a warning, so an adapter for a
    deeper model (layers 2-3 of 4 on a 2-layer base) would load half of itself and say nothing
    that a one-line error would. A pickled adapter (--allow-pickle) has no header to read here.
    """
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return
    names = {name for name, _ in base.named_modules()}
    for tensor in safety.tensor_shapes(weights, "re-run train"):
        match = LORA_TENSOR.fullmatch(tensor)
        if match is not None and match["module"] not in names:
            raise UserError(f"could not load adapter {adapter_dir}: {ADAPTER_WEIGHTS} has "
                            f"weights for {match['module']}, which the base model does not "
                            "have — pass the base it was trained on with --model")


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
    _check_record_matches_run(adapter_dir, info)
    peft_cfg = _read_json_object(adapter_dir / ADAPTER_CONFIG, "re-run train or restore the file")
    check_peft_config(adapter_dir, peft_cfg)
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():  # else pickle weights, allowed by the user
        check_weights_match_config(adapter_dir, peft_cfg)
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
            # repr: a record edited to "64" must not read as "64, but it has 64"
            raise UserError(f"adapter {ref.adapter_dir} was trained on a different base ({key} = "
                            f"{expected!r}, but {ref.base_model} has {actual.get(key)!r}) — pass "
                            "the base it was trained on with --model")


def load_adapter_model(ref: AdapterRef, device: str, compute_dtype: str = "auto"):
    """Base (quantized as in training) + the adapter, unmerged, in eval mode; and the tokenizer."""
    from peft import PeftModel

    model_cfg = ModelConfig(name=ref.base_model, trust_remote_code=ref.trust_remote_code,
                            allow_pickle=ref.allow_pickle)
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
    check_modules_exist(ref.adapter_dir, base)
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
