"""The peer recipes for `qlora-lab bench`: unsloth, padded and packed, each in its own process.

unsloth reassigns transformers' and peft's methods when it is imported, so it must never share
a process with our recipes; `bench` runs `run` below through child.run_child. Settings are
unsloth's own recommended ones: its FastLanguageModel loader (4-bit), LoRA on all 7 projections
with dropout 0 and bias "none", its "unsloth" gradient checkpointing (activations offloaded to
host memory), and the same optimizer, rows, steps, seed and memory cap as ours.

- `unsloth`: padded batches of `peer_micro_batch_size` rows (transformers' Trainer),
  accumulated to the rows of qlora-lab's optimizer step.
- `unsloth_packed`: unsloth's own sample packing, as its docs recommend: TRL's SFTTrainer with
  `SFTConfig(packing=True, padding_free=True)`, `peer_micro_batch_size` bins of max_seq_len
  tokens per micro-batch, flattened into one row with sequence boundaries. Its attention keeps
  rows apart with flash-attn's or xformers' variable-length kernels; without either it falls
  back to slower per-segment attention, and the entry's `host_lacks` names them.

Nothing here imports unsloth at module level: the spec-building pieces (`sft_rows`,
`packed_sft_config`, `attention_kernels`) run and are tested without it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
from pathlib import Path

from qlora_lab import bench
from qlora_lab.data import IGNORE_INDEX

log = logging.getLogger(__name__)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Variable-length attention kernels unsloth's packed path can use: (module, function, dist).
VARLEN_KERNELS = {"flash_attn": ("flash_attn", "flash_attn_varlen_func", "flash-attn"),
                  "xformers": ("xformers.ops", "memory_efficient_attention", "xformers")}


def run(given: dict) -> dict:
    """A peer process (child.run_child's target): one unsloth recipe, measured."""
    cfg = bench.bench_config(given)
    if given["mode"] == "max_context":
        return max_context(cfg, given["lengths"])
    return throughput(cfg, given["micro_batch"], packed=given["packed"])


# --- the spec: what unsloth is given (no unsloth needed) ----------------------------------------


def sft_rows(examples: list[dict]) -> list[dict]:
    """Our tokenized rows as TRL reads pre-tokenized ones: the loss mask as `completion_mask`
    (with completion_only_loss, TRL masks the rest, as our labels do)."""
    return [{"input_ids": ex["input_ids"],
             "completion_mask": [int(label != IGNORE_INDEX) for label in ex["labels"]]}
            for ex in examples]


def packed_sft_config(args, max_seq_len: int):
    """TRL's SFTConfig for unsloth's packed recipe, from our TrainingArguments `args`.

    Everything the other recipes are given (optimizer, steps, seed, precision) carries over as
    TRL's SFTTrainer itself converts TrainingArguments; on top, packing into bins of max_seq_len
    tokens, padding-free batches, loss on the answer only.
    """
    from trl import SFTConfig

    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict hides it
    values.pop("push_to_hub_token", None)  # transformers < 5 only
    values.update(packing=True, padding_free=True, max_length=max_seq_len,
                  completion_only_loss=True,
                  # A padding-free batch holds no padding, and no attention mask to count by.
                  include_num_input_tokens_seen="all")
    return SFTConfig(**values)


def attention_kernels() -> dict:
    """Which variable-length attention kernels import here (version, or None), and, when none
    does, `host_lacks`: the packed path then runs without the kernels it is fastest with."""
    found = {name: _probe(*where) for name, where in VARLEN_KERNELS.items()}
    return {"attention_kernels": found,
            "host_lacks": [] if any(found.values()) else sorted(found)}


def _probe(module: str, function: str, dist: str) -> str | None:
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        return None
    try:  # a build for another torch or CUDA fails only here, at import or lookup
        getattr(importlib.import_module(module), function)
        return importlib.metadata.version(dist)
    except Exception as exc:  # noqa: BLE001 -- any failure means the kernel is unusable
        log.warning("%s is installed but unusable: %s", module, exc)
        return None


# --- unsloth, in its own process ----------------------------------------------------------------


def _load(run, max_seq_len: int):
    import torch
    import unsloth  # noqa: F401  (must come first: it patches transformers at import)
    from unsloth import FastLanguageModel

    from qlora_lab import models

    path = models.resolve_model_path(run.model.name)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=max_seq_len, dtype=torch.bfloat16, load_in_4bit=True,
        local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=run.lora.r, lora_alpha=run.lora.alpha, lora_dropout=0.0, bias="none",
        target_modules=PROJECTIONS, use_gradient_checkpointing="unsloth",
        random_state=run.train.seed)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _args(run, out: Path):
    import torch

    from qlora_lab.train import build_training_args

    return build_training_args(run, out, "cuda", torch.bfloat16, has_eval=False, resuming=False)


def _trainer(run, model, train_rows, collator, out: Path):
    from transformers import Trainer

    return Trainer(model=model, args=_args(run, out), train_dataset=train_rows,
                   data_collator=collator)


def _packed_trainer(run, model, tokenizer, train_rows, out: Path):
    from datasets import Dataset
    from trl import SFTTrainer  # after unsloth's import: its patched SFTTrainer

    return SFTTrainer(model=model, args=packed_sft_config(_args(run, out), run.data.max_seq_len),
                      train_dataset=Dataset.from_list(sft_rows(train_rows)),
                      processing_class=tokenizer)


def throughput(cfg, micro_batch: int, packed: bool) -> dict:
    """Train the bench's steps on the bench's rows at `micro_batch` rows (padded) or bins
    (packed) per micro-batch."""
    import torch

    from qlora_lab.data import PadCollator, prepare_data

    recipe = "unsloth_packed" if packed else "unsloth"
    run = bench.bench_run_config(cfg, recipe)
    # Padded, an optimizer step holds the rows of ours (accumulating micro-batches), as the plain
    # recipe's does: Trainer's per-step work (optimizer, its sync) is then spread over the same
    # rows. Packed, TRL packs the whole dataset into bins first and a micro-batch is
    # `micro_batch` bins (on the Dolly sample, 32 bins hold about the rows of our 160-row
    # step), so it steps once per micro-batch.
    rows_per_step = run.train.micro_batch_size * run.train.grad_accum_steps
    accum = 1 if packed else max(1, rows_per_step // micro_batch)
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, micro_batch_size=micro_batch, grad_accum_steps=accum, packing=False,
        fused_loss=False, liger="off"))
    model, tokenizer = _load(run, run.data.max_seq_len)
    data = prepare_data(run.data, tokenizer, run.train.seed)
    out = Path(run.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if packed:
        trainer = _packed_trainer(run, model, tokenizer, data.train, out)
    else:
        trainer = _trainer(run, model, data.train, PadCollator(tokenizer.pad_token_id), out)
    timer = bench.step_timer("cuda")
    trainer.add_callback(timer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = bench.measurement(cfg, recipe, timer.marks, model, "cuda", micro_batch, run)
    if packed:
        result.update(attention_kernels(), micro_batch_unit=f"bins of {run.data.max_seq_len} "
                      "tokens")
    return result


def max_context(cfg, lengths: list[int]) -> dict:
    """Longest single row (micro-batch 1) that trains two steps under the cap, shortest first."""
    run = bench.bench_run_config(cfg, "unsloth-context")
    model, tokenizer = _load(run, max(lengths))
    return bench.search_max_context(
        lambda rows, out: _trainer(bench.context_run(run, out), model, rows,
                                   bench.context_collator(), out),
        lengths, Path(run.train.output_dir), tokenizer.vocab_size)
