"""Trainer wiring for `train`: TrainingArguments, callbacks and qlora-lab's Trainer subclass.

The subclass adds, each in a few lines that delegate to Trainer: atomic checkpoints
(checkpoints.py), the NaN/inf guard (faults.py), real-token counts for packed batches, the
fast path's loss at supervised positions (fastpath.py) and a token-weighted eval loss.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora_lab import checkpoints, faults, models
from qlora_lab.config import RunConfig, resolve_optimizer
from qlora_lab.data import IGNORE_INDEX, SUPERVISED_POSITIONS
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# What the collators add for the trainer (data.py), never passed to the model.
BATCH_ONLY_KEYS = ("labels", "num_real_tokens", SUPERVISED_POSITIONS)


def optimizer_name(cfg: RunConfig, device: str) -> str:
    return resolve_optimizer(cfg.train.optimizer, device == "cuda", fsdp=models.fsdp_active())


def trainer_optim(cfg: RunConfig, device: str) -> str:
    """Trainer's `optim` for the run: `train.optimizer` resolved (optimizer_name), and
    torch's AdamW runs as its fused kernel (one launch for all adapter tensors, no wait for the
    GPU; the foreach kernels compute the same update): its step can also be skipped on the
    device, which is what lets the NaN/inf guard read each step's loss without waiting
    (faults.NonFiniteLossGuard). Under FSDP it stays the foreach implementation, which FSDP's
    flat parameters were tested with.
    """
    name = optimizer_name(cfg, device)
    if name == "adamw_torch" and not models.fsdp_active():
        return "adamw_torch_fused"
    return name


def _tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _report_to(t) -> list[str]:
    """Trainer's `report_to`: TensorBoard when asked and installed, plus `train.report_to`."""
    from transformers.integrations import get_available_reporting_integrations

    names = [n.strip() for n in t.report_to.split(",") if n.strip()]
    available = set(get_available_reporting_integrations())
    missing = [n for n in names if n not in available]
    if missing:
        raise UserError(f"config key train.report_to = {t.report_to!r:.80}: {', '.join(missing)} "
                        "is not installed — install it, or remove it from train.report_to "
                        f"(installed: {', '.join(sorted(available)) or 'none'})")
    if t.tensorboard and "tensorboard" not in names:
        if _tensorboard_available():
            names.insert(0, "tensorboard")
        else:
            # Said once per run: the numbers are in metrics.jsonl either way.
            log.warning("train.tensorboard is on but the tensorboard package is not installed: "
                        "no TensorBoard logs this run (metrics.jsonl has the same numbers) — "
                        "pip install tensorboard, or set train.tensorboard: false")
    return names


def build_training_args(cfg: RunConfig, out: Path, device: str, dtype: torch.dtype,
                        has_eval: bool, resuming: bool):
    from transformers import TrainingArguments

    t = cfg.train
    if t.data_workers:
        # The workers fork after the tokenizer ran; Rust tokenizers then warn in every worker
        # that they disable their own threads. The workers never tokenize.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report_to = _report_to(t)
    if "tensorboard" in report_to:
        # Assigned, not setdefault: a second run in the same process must not log into the
        # first run's dir. Every output of a run stays inside its output dir.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    args = TrainingArguments(
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
        optim=trainer_optim(cfg, device),
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
        report_to=report_to or "none",
        remove_unused_columns=False,  # our rows are already model inputs
        label_names=["labels"],  # peft's forward hides `labels` from Trainer's signature check
        # Packed batches carry no attention_mask to count by; the trainer counts them itself.
        include_num_input_tokens_seen="no" if t.packing else "non_padding",
        dataloader_pin_memory=(device == "cuda"),
        # Batches go to the GPU without waiting for it (from pinned memory). A blocking copy
        # waits for all queued work first: each step's batch then stalled the GPU while the
        # host started the step.
        accelerator_config={"non_blocking": device == "cuda"},
        # Trainer's NaN filter reads every micro-batch's loss on the host (a wait for the GPU);
        # a non-finite loss stops the run anyway (faults.NonFiniteLossGuard).
        logging_nan_inf_filter=False,
        dataloader_num_workers=t.data_workers,
        dataloader_persistent_workers=t.data_workers > 0,
        disable_tqdm=False,
    )
    if device == "cuda" and args.n_gpu > 1:
        # A plain process that sees several GPUs would make Trainer wrap the 4-bit model in
        # nn.DataParallel (its fallback when not launched distributed), which replicates the
        # quantized weights per step and, measured on 2 H200s, trained no faster than one GPU.
        # Multi-GPU goes through torchrun/accelerate (DDP); a plain process uses its own GPU.
        log.warning("%d GPUs visible but not launched distributed: training on one; use "
                    "`torchrun --nproc-per-node N -m qlora_lab train ...` for all of them",
                    args.n_gpu)
        args._n_gpu = 1  # TrainingArguments has no public switch for this
    return args


def make_callbacks(out: Path):
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class StderrProgress(ProgressCallback):
        """Trainer's progress bar, with its log lines on stderr: stdout carries only results
        (the final JSON summary), so `qlora-lab train ... | jq` works."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{v:.4g}" if isinstance(v, float) else v
                         for k, v in logs.items() if k != "total_flos"}
                self.training_bar.write(str(shown), file=sys.stderr)

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

    return MetricsJsonl(), Throughput(), faults.StopOnSignal(), StderrProgress()


# How a full disk, a quota, a file-size limit or a read-only mount reads once torch's zip
# writer or safetensors has wrapped the OSError (their messages carry the OS's words).
# Rust writers (tokenizers, safetensors) name only the errno: "(os error 28)" is ENOSPC.
WRITE_FAILURE_TEXT = ("file write failed", "no space left", "os error 28", "os error 122",
                      "file too large", "quota exceeded",
                      "read-only file system", "unexpected pos", "input/output error")
WRITE_FAILURE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in WRITE_FAILURE_ERRNOS
    text = str(exc).lower()
    return any(words in text for words in WRITE_FAILURE_TEXT)


def _checkpoint_write_failed(root: Path, step: int, exc: BaseException) -> UserError:
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:120]
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    run = root.parent
    return UserError(f"could not write checkpoint {root / checkpoints.name_for(step)} ({reason}; "
                     f"{free}); earlier checkpoints are intact and the partial one was removed — "
                     f"free disk space, then continue with: qlora-lab train --output-dir "
                     f"{shlex.quote(str(run))} --resume")


# --- eval loss ----------------------------------------------------------------------------------


def summed_token_loss(model, inputs: dict, head_loss=None) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropy over the supervised tokens of one batch, their number).

    Padded batches (attention_mask) and packed or flattened ones (position_ids restarting at
    each row, no mask) alike: what counts is decided by the labels alone, where prompt,
    padding and each packed row's first token are IGNORE_INDEX. Logits at t predict label t+1.
    With `head_loss` (fastpath.SupervisedHeadLoss, FinalHiddenStates) the head runs only at
    supervised positions, as in training; without it (fused_loss off, FSDP) from the logits.
    """
    labels = inputs["labels"]
    positions = inputs.get(SUPERVISED_POSITIONS)
    inputs = {k: v for k, v in inputs.items() if k not in BATCH_ONLY_KEYS}
    if head_loss is not None:
        model(**inputs, logits_to_keep=1)
        loss_fn, final_states = head_loss
        return loss_fn(final_states.take(), labels, positions)
    logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((targets != IGNORE_INDEX).sum())


def pad_for_shards(rows, shard_rows: int):
    """`rows` plus copies of its first row that supervise nothing, to a multiple of `shard_rows`.

    Under DDP/FSDP accelerate evens out the last eval batch by handing the short ranks rows from
    the start of the set again, and Trainer drops their per-batch losses afterwards by position
    (gather_for_metrics). Sums that are all-reduced cannot be trimmed that way, so the set is
    filled up here instead: every rank runs the same number of batches (FSDP needs all of them
    in each forward) and no answer token counts twice. Only lists (what prepare_data makes).
    """
    missing = -len(rows) % shard_rows if isinstance(rows, list) and rows else 0
    if not missing:
        return rows
    filler = {**rows[0], "labels": [IGNORE_INDEX] * len(rows[0]["labels"])}
    return rows + [filler] * missing


def trainer_class():
    """Trainer plus qlora-lab's overrides; each is a few lines that delegate.

    - `_save_checkpoint`: Trainer writes `checkpoint-N` file by file. We point it at a hidden
      staging dir and publish the finished checkpoint with one rename (checkpoints.publish).
      Trainer has no public hook for where a checkpoint goes; overriding `_save_checkpoint` and
      `_get_output_dir` in a subclass (checked against transformers 5.17 and 5.24) is the
      smallest seam, and no library code is patched.
    - `save_model`, `_save_optimizer_and_scheduler`, `_load_from_checkpoint`,
      `_load_optimizer_and_scheduler` (FSDP only): a checkpoint's adapter is gathered and picked
      by name into adapter_model.safetensors (checkpoints.save_fsdp_adapter), because
      accelerate's adapter-only FSDP save picks nothing under peft 0.21 (huggingface/peft#3490);
      the optimizer is saved by accelerate's save_fsdp_optimizer, as in Trainer, and loaded by
      checkpoints.load_fsdp_optimizer (accelerate's loader reads no moments into a fresh
      optimizer). Without FSDP these defer to Trainer unchanged.
    - `train`: Trainer's, inside `fastpath.compile_settings()`, so every layer compiled while
      training (recompiles too) compiles with them; with `cuda_graphs` (train.cuda_graphs) the
      training graphs replay as CUDA graphs, evaluation's (`evaluation_loop`) never do.
      `evaluate` called on its own runs inside them too (without CUDA graphs).
    - `training_step`: report each loss to the NaN/inf guard (faults.NonFiniteLossGuard), and
      count the real tokens of packed batches (they have no attention_mask for Trainer to sum).
    - `compute_loss` (Trainer's documented override point): with `head_loss`, the loss comes
      from the final hidden states at supervised positions only (fastpath.SupervisedHeadLoss),
      normalized as transformers' ForCausalLMLoss normalizes, so gradients match the plain path.
    - `evaluation_loop` + `prediction_step`: the eval loss is the sum of the answer tokens'
      cross-entropy over the whole eval set divided by their number. Trainer's own loop averages
      one mean loss per batch (each repeated batch-size times), which weights batches, not
      tokens: the same rows scored differently at eval micro-batch 1 and 4 (issue #13). Sum and
      count are all-reduced across processes;
      `get_eval_dataloader` fills the set up so no rank counts a row twice (pad_for_shards).
      Trainer's `evaluate` still logs the result, with eval_runtime, and runs the callbacks.
    """
    from transformers import Trainer

    class QloraTrainer(Trainer):
        _staging_dir: Path | None = None

        def __init__(self, *args, head_loss=None, cuda_graphs: bool = False,
                     rows_fingerprint: str | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            from transformers.trainer_callback import ProgressCallback

            # Trainer adds its own progress bar; ours (make_callbacks) is the same bar with its
            # log lines on stderr, so keep one.
            if any(isinstance(cb, ProgressCallback) and type(cb) is not ProgressCallback
                   for cb in self.callback_handler.callbacks):
                stock = [cb for cb in self.callback_handler.callbacks
                         if type(cb) is ProgressCallback]
                for cb in stock:
                    self.callback_handler.callbacks.remove(cb)
            self.head_loss = head_loss
            self.cuda_graphs = cuda_graphs
            self.rows_fingerprint = rows_fingerprint  # recorded in each checkpoint's layout
            self.loss_guard = faults.NonFiniteLossGuard()
            self.add_callback(self.loss_guard)

        def train(self, *args, **kwargs):
            # Whatever compiles during training compiles with these settings (fastpath.py).
            from qlora_lab.fastpath import compile_settings

            with compile_settings(self.cuda_graphs):
                return super().train(*args, **kwargs)

        def evaluate(self, *args, **kwargs):
            # Called on its own too (after training): the compiled layers then compile (or
            # run) with training's settings as well, without CUDA graphs.
            from qlora_lab.fastpath import compile_settings

            with compile_settings():
                return super().evaluate(*args, **kwargs)

        def _save_checkpoint(self, model, trial):
            root, step = Path(self.args.output_dir), self.state.global_step
            if self.args.should_save:
                checkpoints.prepare_staging(root, step)
            # Under DDP every rank writes its RNG state into the staging dir: it must exist
            # before they start, and be complete before rank 0 publishes it.
            self.accelerator.wait_for_everyone()
            self._staging_dir = checkpoints.staging_dir(root, step)
            try:
                super()._save_checkpoint(model, trial)
            except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as either
                shutil.rmtree(self._staging_dir, ignore_errors=True)
                if not is_write_failure(exc):
                    raise  # not the disk: a bug, whose traceback is the useful part
                raise _checkpoint_write_failed(root, step, exc) from None
            finally:
                self._staging_dir = None
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                checkpoints.write_layout(checkpoints.staging_dir(root, step)
                                         / checkpoints.name_for(step), self.args.world_size,
                                         self.rows_fingerprint)
                published = checkpoints.publish(root, step)
                # Trainer's own rotation ran inside the staging dir, where it had nothing to do.
                checkpoints.prune(root, self.args.save_total_limit, published)

        def _get_output_dir(self, trial):
            if self._staging_dir is not None:
                return str(self._staging_dir)
            return super()._get_output_dir(trial)

        # --- FSDP checkpoints: the adapter by name (see the class docstring) -------------------

        def _fsdp_wrapped(self):
            """The FSDP1 root once training has wrapped the model, else None (not FSDP yet)."""
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return self.model if self.is_fsdp_enabled and isinstance(self.model, FSDP) else None

        def save_model(self, output_dir=None, _internal_call=False):
            wrapped = self._fsdp_wrapped()
            if wrapped is None:
                return super().save_model(output_dir, _internal_call)
            checkpoints.save_fsdp_adapter(wrapped, Path(output_dir or self.args.output_dir),
                                          write=self.args.should_save)
            return None

        def _save_optimizer_and_scheduler(self, output_dir):
            wrapped = self._fsdp_wrapped()
            if wrapped is None:
                return super()._save_optimizer_and_scheduler(output_dir)
            # Trainer's own FSDP branch also writes accelerate's adapter shards, empty under
            # peft 0.21; the adapter is already in adapter_model.safetensors (save_model).
            from accelerate.utils import save_fsdp_optimizer
            from transformers.trainer import SCHEDULER_NAME

            save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator,
                                self.optimizer, wrapped, output_dir)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            wrapped = model if model is not None else self.model
            adapter = Path(resume_from_checkpoint) / checkpoints.ADAPTER_FILE
            if self._fsdp_wrapped() is None or not adapter.is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            # Trainer would look for accelerate's adapter shards (empty under peft 0.21); the
            # optimizer follows in _load_optimizer_and_scheduler.
            checkpoints.load_fsdp_adapter(wrapped, Path(resume_from_checkpoint))
            return None

        def _load_optimizer_and_scheduler(self, checkpoint):
            wrapped = self._fsdp_wrapped()
            if (checkpoint is None or wrapped is None
                    or not (Path(checkpoint) / checkpoints.FSDP_OPTIMIZER_DIR).is_dir()):
                return super()._load_optimizer_and_scheduler(checkpoint)
            # accelerate's load_fsdp_optimizer would read no moments into this fresh optimizer
            # (see checkpoints.load_fsdp_optimizer); the scheduler as Trainer loads it.
            from transformers.trainer import SCHEDULER_NAME

            checkpoints.load_fsdp_optimizer(wrapped, getattr(self.optimizer, "optimizer",
                                                             self.optimizer), Path(checkpoint))
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME,
                                                         weights_only=True))
            return None

        _flops_per_token: int | None = None

        def floating_point_ops(self, inputs) -> int:
            # Trainer counts the model's parameters again for every micro-batch, a walk over
            # every module and parameter while the GPU waits after the step's loss sync; the
            # count never changes, so keep it.
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs:
                return super().floating_point_ops(inputs)
            if self._flops_per_token is None:
                self._flops_per_token = super().floating_point_ops({main: torch.zeros(1)})
            return self._flops_per_token * inputs[main].numel()

        def training_step(self, model, inputs, *args, **kwargs):
            real = inputs.get("num_real_tokens")
            if real is not None:
                if self.accelerator.num_processes > 1:  # every rank's count, through the GPU
                    real = self.accelerator.gather(
                        torch.as_tensor(real, device=self.args.device).reshape(1)).sum()
                # Else the collator's count, a Python int (never moved to the GPU): no wait.
                self.state.num_input_tokens_seen += int(real)
            loss = super().training_step(model, inputs, *args, **kwargs)
            self.loss_guard.observe(loss)
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            positions = inputs.get(SUPERVISED_POSITIONS)
            inputs = {k: v for k, v in inputs.items()
                      if k not in BATCH_ONLY_KEYS or k == "labels"}
            if self.head_loss is None or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            # Through the (possibly DDP-wrapped) model, so gradient sync hooks run; logits for
            # one position only: the loss reads the final norm's output (caught by a hook).
            outputs = model(**inputs, logits_to_keep=1)
            head_loss, final_states = self.head_loss
            total, count = head_loss(final_states.take(), labels, positions)
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does
            else:
                loss = total / max(count, 1)
            return (loss, outputs) if return_outputs else loss

        # --- token-weighted eval loss (see the class docstring) --------------------------------

        _eval_sums: list | None = None  # [sum of token losses (tensor), token count], or None

        def get_eval_dataloader(self, eval_dataset=None):
            rows = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) \
                else eval_dataset if eval_dataset is not None else self.eval_dataset
            if rows is None or self.args.world_size == 1:
                return super().get_eval_dataloader(eval_dataset)
            return super().get_eval_dataloader(
                pad_for_shards(rows, self.args.eval_batch_size * self.args.world_size))

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                            ignore_keys=None, metric_key_prefix="eval"):
            from qlora_lab.fastpath import without_cuda_graphs

            self._eval_sums = [torch.zeros((), dtype=torch.float64, device=self.args.device), 0]
            try:
                with without_cuda_graphs():
                    output = super().evaluation_loop(dataloader, description,
                                                     prediction_loss_only, ignore_keys,
                                                     metric_key_prefix)
                total, count = self._eval_sums
            finally:
                self._eval_sums = None
            # Every rank gets here (the same batches, see get_eval_dataloader): one all-reduce.
            sums = torch.stack([total, total.new_tensor(count)])
            total, count = self.accelerator.reduce(sums, reduction="sum").tolist()
            key = f"{metric_key_prefix}_loss"
            if count > 0:
                output.metrics[key] = total / count
            elif key not in output.metrics:
                output.metrics[key] = float("nan")  # every answer truncated away
            return output

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if (self._eval_sums is None or not prediction_loss_only
                    or inputs.get("labels") is None):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                total, count = summed_token_loss(model, inputs, self.head_loss)
            self._eval_sums[0] += total.detach().double()
            self._eval_sums[1] += count
            return None, None, None  # no per-batch loss for Trainer to average

    return QloraTrainer
