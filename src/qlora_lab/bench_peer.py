"""The peer recipe for `qlora-lab bench`: unsloth, run in its own process.

unsloth reassigns transformers' and peft's methods when it is imported, so it must never share
a process with our recipes; `bench` starts `python -m qlora_lab.bench_peer SPEC RESULT`.
Settings are unsloth's own recommended ones: its FastLanguageModel loader (4-bit), LoRA on all 7
projections with dropout 0 and bias "none", its "unsloth" gradient checkpointing (activations
offloaded to host memory), padded batches (unsloth's attention does not separate packed rows
without flash-attention's varlen kernels, which are not installed on the measured host), and the
same optimizer, rows, steps, seed and memory cap as ours.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def _trainer(run, model, train_rows, collator, out: Path):
    from transformers import Trainer

    from qlora_lab.train import build_training_args

    args = build_training_args(run, out, "cuda", __import__("torch").bfloat16, has_eval=False,
                               resuming=False)
    return Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator)


def throughput(cfg, micro_batch: int) -> dict:
    """Train the bench's steps on the bench's rows, padded, at `micro_batch` rows."""
    import dataclasses

    import torch

    from qlora_lab import bench
    from qlora_lab.data import PadCollator, prepare_data

    run = bench.bench_run_config(cfg, "unsloth")
    run = dataclasses.replace(run, train=dataclasses.replace(
        run.train, micro_batch_size=micro_batch, packing=False, fused_loss=False, liger="off"))
    bench._apply_memory_cap(cfg.memory_cap_bytes, "cuda")
    model, tokenizer = _load(run, run.data.max_seq_len)
    data = prepare_data(run.data, tokenizer, run.train.seed)
    out = Path(run.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = _trainer(run, model, data.train, PadCollator(tokenizer.pad_token_id), out)
    timer = bench._step_timer("cuda")
    trainer.add_callback(timer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = bench._measure(cfg, "unsloth", timer.marks, model, "cuda", micro_batch, run)
    result["versions"] = {"unsloth": _version("unsloth")}
    return result


def max_context(cfg, lengths: list[int]) -> dict:
    """Longest single row (micro-batch 1) that trains two steps under the cap, shortest first."""
    from qlora_lab import bench

    bench._apply_memory_cap(cfg.memory_cap_bytes, "cuda")
    run = bench.bench_run_config(cfg, "unsloth-context")
    model, tokenizer = _load(run, max(lengths))
    return bench.search_max_context(
        lambda rows, out: _trainer(bench.context_run(run, out), model, rows,
                                   bench.context_collator(), out),
        lengths, Path(run.train.output_dir), tokenizer.vocab_size)


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _worker(spec_path: str, result_path: str) -> int:
    from qlora_lab.bench import BenchConfig
    from qlora_lab.config import config_from_dict

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = BenchConfig(run=config_from_dict(spec["run"]), **spec["bench"])
    started = time.perf_counter()
    try:
        if spec["mode"] == "max_context":
            result = max_context(cfg, spec["lengths"])
        else:
            result = throughput(cfg, spec["micro_batch"])
        code = 0
    except Exception as exc:  # the peer's failure is reported in bench.json, not fatal
        result, code = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}, 1
    result["wall_seconds"] = time.perf_counter() - started
    Path(result_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
