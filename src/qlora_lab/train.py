"""`qlora-lab train`: QLoRA fine-tuning with transformers' Trainer.

Output layout of a run (`train.output_dir`):
    config.yaml         the resolved config; `train --config` on it repeats the run
    adapter/            adapter_model.safetensors + adapter_config.json (plain peft loads it)
                        + qlora_lab_base.json (which base it belongs to)
    tokenizer files     the tokenizer used, with its chat template
    metrics.jsonl       one JSON object per log/eval event
    summary.json        steps, losses, tokens seen, tokens/s, peak memory, wall time
    checkpoints/        checkpoint-N/: adapter, optimizer, scheduler, RNG and data position
    tensorboard/        TensorBoard event files
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import adapters, models
from qlora_lab.config import RunConfig, save_config
from qlora_lab.data import PadCollator, PreparedData, prepare_data
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_MARKER = "config.yaml"  # a dir holding this was written by `train`


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless told to; check the dir is writable."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} is a file — pass a directory to --output-dir")
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if existing and not resume:
        if not overwrite:
            raise UserError(f"output dir {out} is not empty — pass --resume to continue that "
                            "run, --overwrite to replace it, or another --output-dir")
        if not (out / RUN_MARKER).is_file():
            raise UserError(f"output dir {out} holds files that no qlora-lab run wrote; "
                            "--overwrite only replaces earlier runs — pick another --output-dir")
        if _is_main_process():
            shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output dir {out} is not writable ({exc.strerror}) — pick another "
                        "--output-dir") from None


def find_checkpoint(out: Path, resume: str | bool) -> str | None:
    """`--resume` alone means the newest complete checkpoint; a name or path means that one."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume in (None, False):
        return None
    ckpt_root = out / CHECKPOINTS
    if resume is True:
        last = get_last_checkpoint(str(ckpt_root)) if ckpt_root.is_dir() else None
        if last is None:
            raise UserError(f"--resume: no checkpoint in {ckpt_root} — train without --resume "
                            "first (checkpoints are written every train.save_steps steps)")
        return last
    for candidate in (Path(resume), ckpt_root / str(resume)):
        if (candidate / "trainer_state.json").is_file():
            return str(candidate)
    raise UserError(f"--resume {resume}: not a checkpoint (no trainer_state.json) — pass a "
                    f"checkpoint-N folder from {ckpt_root}, or --resume alone for the newest")


def _optimizer_name(cfg: RunConfig, device: str) -> str:
    if cfg.train.optimizer == "auto":
        # bitsandbytes' 8-bit optimizers need CUDA; paging moves optimizer state to host RAM
        # under memory pressure instead of failing with an OOM.
        return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
    if cfg.train.optimizer != "adamw_torch" and device != "cuda":
        raise UserError(f"train.optimizer = {cfg.train.optimizer!r} needs CUDA — use "
                        "'adamw_torch' or 'auto' on CPU")
    return cfg.train.optimizer


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def build_training_args(cfg: RunConfig, out: Path, device: str, dtype: torch.dtype,
                        has_eval: bool, resuming: bool):
    from transformers import TrainingArguments

    t = cfg.train
    report_to = ["tensorboard"] if t.tensorboard and _tensorboard_available() else "none"
    if report_to != "none":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,  # 0 disables clipping
        optim=_optimizer_name(cfg, device),
        bf16=(dtype == torch.bfloat16),
        fp16=(dtype == torch.float16),
        use_cpu=(device == "cpu"),
        # Checkpointing is set up on the model itself (non-reentrant, see models.py).
        gradient_checkpointing=False,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_eval and not resuming,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        report_to=report_to,
        remove_unused_columns=False,  # our rows are already model inputs
        label_names=["labels"],  # peft's forward hides `labels` from Trainer's signature check
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=(device == "cuda"),
        disable_tqdm=False,
    )


def _make_callbacks(out: Path):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Append every log/eval event to metrics.jsonl (machine-readable twin of TensorBoard)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "time": round(time.time(), 3), **logs}
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")

    class Throughput(TrainerCallback):
        """Tokens and time of this session only, so a resumed run reports its own speed.

        The time includes periodic evaluation; benchmarks that need pure step time use bench.
        """

        start_tokens = 0
        start_time = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            # Called after a checkpoint's state is restored, so this is the resumed count.
            self.start_tokens = state.num_input_tokens_seen
            self.start_time = time.perf_counter()

    return MetricsJsonl(), Throughput()


def _peak_memory(device: str) -> dict:
    peak = {"peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        peak["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return peak


def _eval_loss_at(metrics_path: Path, first: bool) -> float | None:
    if not metrics_path.is_file():
        return None
    losses = [r["eval_loss"] for r in map(json.loads, metrics_path.read_text().splitlines())
              if "eval_loss" in r]
    if not losses:
        return None
    return losses[0] if first else losses[-1]


@dataclass
class TrainingSession:
    """A wired-up Trainer and what it was built from (tests inspect the model through this)."""

    cfg: RunConfig
    out: Path
    trainer: object
    model: object
    tokenizer: object
    data: PreparedData
    device: str
    dtype: torch.dtype
    checkpoint: str | None
    callbacks: tuple


def setup_training(cfg: RunConfig, resume: str | bool | None = None,
                   overwrite: bool = False) -> TrainingSession:
    """Check paths, load data and model, attach LoRA and build the Trainer; train nothing yet."""
    from transformers import Trainer, set_seed

    out = Path(cfg.train.output_dir)
    prepare_output_dir(out, resume=bool(resume), overwrite=overwrite)
    checkpoint = find_checkpoint(out, resume)
    device = models.resolve_device(cfg.train.device)
    dtype = models.resolve_compute_dtype(cfg.quant, device)
    set_seed(cfg.train.seed)

    model_path = models.resolve_model_path(cfg.model.name)
    tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    log.info("data: %s", data.stats)

    model = models.load_base_model(model_path, cfg.model, cfg.quant, device)
    models.prepare_for_training(model, cfg.train.gradient_checkpointing)
    model = models.attach_lora(model, cfg.lora)

    if _is_main_process():
        save_config(cfg, out / RUN_MARKER)
        tokenizer.save_pretrained(out)
    args = build_training_args(cfg, out, device, dtype, has_eval=bool(data.eval),
                               resuming=checkpoint is not None)
    callbacks = _make_callbacks(out)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      eval_dataset=data.eval or None,
                      data_collator=PadCollator(tokenizer.pad_token_id),
                      callbacks=list(callbacks))
    return TrainingSession(cfg, out, trainer, model, tokenizer, data, device, dtype, checkpoint,
                           callbacks)


def run_train(cfg: RunConfig, resume: str | bool | None = None, overwrite: bool = False) -> dict:
    """Fine-tune `cfg.model` on `cfg.data`; returns the summary also written to summary.json."""
    wall_start = time.perf_counter()
    session = setup_training(cfg, resume, overwrite)
    trainer, out, device = session.trainer, session.out, session.device
    speed_cb = session.callbacks[1]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train(resume_from_checkpoint=session.checkpoint)
    train_seconds = time.perf_counter() - speed_cb.start_time
    tokens_this_session = trainer.state.num_input_tokens_seen - speed_cb.start_tokens

    eval_loss = trainer.evaluate()["eval_loss"] if session.data.eval else None
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss_before": _eval_loss_at(out / "metrics.jsonl", first=True),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_s": tokens_this_session / train_seconds if train_seconds > 0 else None,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "resumed_from": session.checkpoint,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "compute_dtype": str(session.dtype).removeprefix("torch."),
        "data": session.data.stats,
        **_peak_memory(device),
    }
    if trainer.is_world_process_zero():
        adapter_dir = out / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        adapters.write_base_info(adapter_dir, cfg.model, cfg.quant, session.data.template,
                                 session.model.base_model.config)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
