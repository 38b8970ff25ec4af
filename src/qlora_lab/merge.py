"""`qlora-lab merge`: fold the adapter into a dense copy of the base that plain transformers loads.

The adapter learned to correct the *quantized* base, so we merge it into the NF4 weights
dequantized to the compute dtype, never into the original 16-bit checkpoint (which the adapter
never saw) and never into 4-bit weights (re-quantizing W + BA would round the update away).
The merged model's logits are compared with base + adapter (unmerged) on a probe prompt.

The merged weights are saved in `--dtype`: by default the compute dtype the adapter was trained
in (bf16 for a GPU run, so a 135M model is 270 MB, not the 540 MB of fp32). The base is quantized
in that training dtype whatever `--dtype` says, because NF4's block scales are computed from the
weights in the dtype they were loaded in: only then are they the weights training saw.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import adapters, fsio, models
from qlora_lab.config import ModelConfig, QuantConfig
from qlora_lab.data import render_prompt, resolve_template
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

PROBE_PROMPT = "Explain in one sentence why the sky is blue."
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype -> torch's name


@dataclass(frozen=True)
class MergeConfig:
    """adapter: a run's output dir or adapter dir. output_dir: must not exist or be empty.
    model: override the base recorded with the adapter. device: where the merge runs.
    dtype: bf16, fp16 or fp32 for the merged weights; None = the compute dtype of training.
    allow_pickle: accept pickle weights (.bin) where safetensors are missing; they can run code.
    trust_remote_code: let a base recorded with trust_remote_code run its repo's code.
    """

    adapter: str
    output_dir: str
    model: str | None = None
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r} is not supported — use one of "
                            + ", ".join(DTYPES))


def trained_dtype(adapter_dir: Path) -> str | None:
    """The compute dtype (torch's name) the adapter was trained in, if a record says so: its
    qlora_lab_base.json, or the run's summary.json (runs trained before the record existed)."""
    recorded = adapters.read_base_info(adapter_dir).get("compute_dtype")
    summary = adapter_dir.parent / "summary.json"
    if recorded is None and adapter_dir.name == "adapter" and summary.is_file():
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")).get("compute_dtype")
        except (OSError, ValueError, AttributeError):
            recorded = None  # a damaged summary says nothing; the device default applies
    return recorded if recorded in DTYPES.values() else None


def _merge_dtype(base: torch.dtype, target: torch.dtype) -> torch.dtype:
    """Where to merge so that W + BA is rounded once, into `target`.

    In `target` itself when the base converts to it exactly (it is at least as precise: bf16 to
    fp16 or fp32); else in the base's dtype, cast afterwards. Casting an fp32 base to bf16 first
    would round W, then W + BA again: twice the error (on SmolLM2, in the largest logit
    difference from the fp32 merge).
    """
    return target if torch.finfo(target).eps <= torch.finfo(base).eps else base


@torch.inference_mode()
def _probe_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids.to(model.device)).logits.float().cpu()


def _dequantized_base(ref: adapters.AdapterRef, base_path: str, device: str,
                      load_dtype: str = "auto"):
    """The base as training saw it, dense, in `load_dtype` (the training compute dtype)."""
    model_cfg = ModelConfig(name=ref.base_model, trust_remote_code=ref.trust_remote_code,
                            allow_pickle=ref.allow_pickle)
    quant = QuantConfig(bits=ref.quant.bits, quant_type=ref.quant.quant_type,
                        double_quant=ref.quant.double_quant, compute_dtype=load_dtype)
    base = models.load_base_model(base_path, model_cfg, quant, device)
    if ref.quant.bits == 4:
        # Exactly the weights training saw: NF4 dequantized to the compute dtype.
        base = base.dequantize()
    return base


def merge_adapter(ref: adapters.AdapterRef, base_path: str, device: str,
                  load_dtype: str = "auto", dtype: torch.dtype | None = None):
    """The adapter folded into the base as training saw it, in `dtype` (None: `load_dtype`), in
    eval mode. Shared by `merge` (which saves it) and `export` (which writes it as GGUF)."""
    from peft import PeftModel

    dense = _dequantized_base(ref, base_path, device, load_dtype)
    adapters.check_modules_exist(ref.adapter_dir, dense)
    if dtype is not None:
        dense = dense.to(_merge_dtype(dense.dtype, dtype))
    with adapters.explain_load_errors(f"adapter {ref.adapter_dir} onto {ref.base_model}",
                                      "pass the base it was trained on with --model, or re-run "
                                      "train"):
        merged = PeftModel.from_pretrained(dense, str(ref.adapter_dir)).merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    return merged.eval()


def _check_output_dir(out: Path) -> None:
    """A new or empty dir whose parent can be written; checked before any model is loaded.

    Publishing renames the finished model onto `out`, which would replace a symlink there with a
    real dir, quietly not where the link pointed: refuse, and name the real path to pass instead.
    """
    if out.is_symlink():
        raise UserError(f"output dir {out} is a symlink (to {os.path.realpath(out)}), which "
                        "merge would replace with a new dir — pass the real path as --output-dir")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output dir {out} already exists and is not empty — pass a new "
                        "--output-dir (nothing was overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=fsio.TMP_PREFIX + out.name, dir=out.parent)).rmdir()
    except OSError as exc:
        raise UserError(f"output dir {out} cannot be created ({exc.strerror}) — pick another "
                        "--output-dir") from None


def run_merge(cfg: MergeConfig) -> dict:
    out = Path(cfg.output_dir)
    _check_output_dir(out)
    device = models.resolve_device(cfg.device)
    ref = adapters.resolve_adapter(cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle,
                                   trust_remote_code=cfg.trust_remote_code)

    trained = trained_dtype(ref.adapter_dir)
    load_dtype = trained or "auto"
    dtype = getattr(torch, DTYPES[cfg.dtype]) if cfg.dtype else None

    unmerged, tokenizer, base_path = adapters.load_adapter_model(ref, device)
    # The reference must compute as training did: bitsandbytes' CPU inference kernel (which an
    # eval-mode forward would switch to) rounds through bf16 and would blur the comparison.
    models.keep_cpu_4bit_layout(unmerged)
    template = resolve_template(ref.template, tokenizer)
    probe_text = render_prompt([{"role": "user", "content": PROBE_PROMPT}], tokenizer, template)
    probe_ids = tokenizer(probe_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    reference = _probe_logits(unmerged, probe_ids)
    del unmerged  # free it before the dense copy is built

    merged = merge_adapter(ref, base_path, device, load_dtype, dtype)
    max_diff = (reference - _probe_logits(merged, probe_ids)).abs().max().item()

    # Built in a temp dir beside the target, fsynced and renamed: a crash never leaves half a
    # model under the target name. The target was new or empty when checked, minutes ago; what
    # appeared there since is not ours to replace (replace=False).
    with fsio.staged_dir(out, replace=False) as tmp:
        merged.config.use_cache = True
        if not ref.trust_remote_code and getattr(merged.config, "auto_map", None):
            # transformers' own classes built these weights, not the base's repo code: its
            # auto_map, kept, would send a trust_remote_code load of the merged folder to code
            # the folder does not hold (or to the repo the map names).
            del merged.config.auto_map
        merged.save_pretrained(tmp)  # safetensors: transformers 5 writes nothing else
        tokenizer.save_pretrained(tmp)
        adapters.write_base_info(tmp, ModelConfig(name=ref.base_model), QuantConfig(bits=16),
                                 template, merged.config, merged_from=str(ref.adapter_dir),
                                 trained_quant=ref.quant.__dict__)
        report = {"output_dir": str(out), "base_model": ref.base_model,
                  "dtype": str(merged.dtype).removeprefix("torch."),
                  "dtype_from": ("--dtype" if cfg.dtype else "training" if trained
                                 else "device default (no record of training's dtype)"),
                  "probe_prompt": PROBE_PROMPT, "max_abs_logit_diff": max_diff,
                  "max_abs_logit": reference.abs().max().item()}
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
