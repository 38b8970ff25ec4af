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

Nothing is lost on a crash: checkpoints appear atomically (checkpoints.py), config.yaml, adapter/
and summary.json are replaced atomically (fsio.py), SIGINT/SIGTERM checkpoint and stop, and a NaN
loss stops before it reaches the weights or a checkpoint (faults.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import resource
import shlex
import shutil
import signal
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import (
    adapters,
    attention,
    checkpoints,
    child,
    fastpath,
    faults,
    fsio,
    fusedlora,
    models,
    rundir,
    safety,
    sources,
)
from qlora_lab.config import (
    RunConfig,
    resolve_compile,
    resolve_optimizer,
    save_config,
    with_compile,
)
from qlora_lab.data import (
    PackedCollator,
    PadCollator,
    PreparedData,
    batch_geometry,
    prepare_data,
    rows_share_bins,
)
from qlora_lab.errors import LossNotFinite, OutOfMemory, TrainingInterrupted, UserError
from qlora_lab.shapes import check_position_limit, learned_position_limit
from qlora_lab.trainer import (
    CHECKPOINTS,
    build_training_args,
    is_write_failure,
    make_callbacks,
    optimizer_name,
    trainer_class,
)

log = logging.getLogger(__name__)


def allocator_defaults() -> None:
    """Set child.CUDA_ALLOCATOR_ENV where the user has not set it and CUDA has not started."""
    if not torch.cuda.is_initialized():
        child.env_defaults(child.CUDA_ALLOCATOR_ENV)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class RunClaim:
    """What `train` knows about its output dir before loading anything (see rundir.py)."""

    out: Path
    replace_run: bool  # --overwrite must clear an earlier run once loading has succeeded
    checkpoint: str | None  # what --resume continues from
    lock: rundir.RunLock | None  # held by rank 0 until the run ends
    created: bool = False  # this run made `out`: a failure before any write removes it again


def claim_output_dir(cfg: RunConfig, resume: str | bool | None, overwrite: bool) -> RunClaim:
    """Check the output dir, lock it, pick the checkpoint and vet a resume; writes nothing.

    Under torchrun/accelerate only rank 0 judges, locks and later writes the output dir: another
    rank could otherwise find rank 0's fresh files and refuse a "non-empty" dir.
    """
    if resume and overwrite:
        raise UserError("--resume continues the run in the output dir and --overwrite replaces "
                        "it — pass one of them")
    out = Path(cfg.train.output_dir).expanduser()  # as Trainer expands it: one folder
    if resume is True and not os.path.lexists(out):
        raise UserError(f"--resume: output dir {out} does not exist — pass the --output-dir of "
                        "the run to continue, or train without --resume")
    replace_run, lock, created = False, None, not os.path.lexists(out)
    if _is_main_process():
        replace_run = rundir.check_output_dir(out, resume=bool(resume), overwrite=overwrite)
        lock = rundir.RunLock(out).acquire()
    try:
        if resume and _is_main_process():
            rundir.check_resume_config(out, cfg)
        checkpoint = rundir.find_checkpoint(out, resume)
        if checkpoint is not None:
            checkpoints.check_layout(Path(checkpoint), int(os.environ.get("WORLD_SIZE", "1")))
            rundir.check_checkpoint_matches(checkpoint, cfg)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return RunClaim(out, replace_run, checkpoint, lock, created and _is_main_process())


def _peak_memory(device: str) -> dict:
    peak = {"peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        peak["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return peak


def _read_metrics(metrics_path: Path) -> list[dict]:
    """Records of metrics.jsonl; a line cut short by a kill is skipped, not fatal."""
    if not metrics_path.is_file():
        return []
    records = []
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _trim_metrics(metrics_path: Path, last_step: int | None) -> None:
    """On resume, forget records of the steps that will run again (None: all of them)."""
    if not metrics_path.is_file():
        return
    kept = [r for r in _read_metrics(metrics_path) if last_step is not None
            and r["step"] <= last_step]
    fsio.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))


def _eval_loss_at(metrics_path: Path, first: bool) -> float | None:
    losses = [r["eval_loss"] for r in _read_metrics(metrics_path) if "eval_loss" in r]
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
    started: float  # perf_counter() when setup began, for wall_seconds
    lock: rundir.RunLock | None = None
    replaced: Path | None = None  # the earlier run --overwrite set aside (rundir.set_aside_run)


def setup_training(cfg: RunConfig, resume: str | bool | None = None,
                   overwrite: bool = False, claim: RunClaim | None = None) -> TrainingSession:
    """Check paths, load data and model, attach LoRA and build the Trainer; train nothing yet.

    Everything that can fail on a user's input runs before the first write to the output dir.
    """
    claim = claim or claim_output_dir(cfg, resume, overwrite)
    try:
        return _setup(cfg, resume, claim)
    except BaseException:
        if claim.lock is not None:
            claim.lock.release()
        raise


def _setup(cfg: RunConfig, resume, claim: RunClaim) -> TrainingSession:
    from transformers import set_seed

    started = time.perf_counter()
    allocator_defaults()
    out, checkpoint = claim.out, claim.checkpoint
    device = models.resolve_device(cfg.train.device)
    dtype = models.resolve_compute_dtype(cfg.quant, device)
    optimizer_name(cfg, device)  # a CUDA-only optimizer on CPU fails here, not after loading
    if cfg.train.cuda_graphs and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DDP's and FSDP's gradient hooks were never run beside the graphs' gradient copy.
        raise UserError("train.cuda_graphs = true is for one process (WORLD_SIZE is "
                        f"{os.environ['WORLD_SIZE']}) — set it false for multi-GPU runs")
    if cfg.train.cuda_graphs and device != "cuda":
        raise UserError("train.cuda_graphs = true needs CUDA — set it false on CPU")
    written = cfg  # the run folder keeps the setting as given: `auto` resolves where it resumes
    cfg = with_compile(cfg, resolve_compile(cfg.train, compiler_has_gpu(device),
                                            int(os.environ.get("WORLD_SIZE", "1"))))
    if written.train.compile == "auto":
        log.info("train.compile: auto -> %s", "on (decoder layers compiled)" if cfg.train.compile
                 else "off (on for one process on CUDA with triton, without activation_offload)")

    sources.check_local_files(cfg.data)  # a wrong data path first, before the model
    model_path = models.resolve_model_path(cfg.model.name)
    safety.require_safetensors(Path(model_path), "base model", cfg.model.allow_pickle,
                               allow_hint="set model.allow_pickle: true")
    base_problem = (f"base model {cfg.model.name}",
                    "check the folder (config.json, *.safetensors), or pick another --model")
    with adapters.explain_load_errors(*base_problem):
        tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    log.info("data: %s", data.stats)

    # Seed after resolve_model_path: building a base into the cache (tiny-random) reseeds torch,
    # and the LoRA init must not depend on whether that cache already existed.
    set_seed(cfg.train.seed)
    with adapters.explain_load_errors(*base_problem):
        model = models.load_base_model(model_path, cfg.model, cfg.quant, device)
    # A learned position table (GPT-2's) fails on the first row longer than it, mid-run.
    check_position_limit(learned_position_limit(model), cfg.data.max_seq_len, cfg.model.name)
    if cfg.model.attn_implementation == "varlen":
        attention.use_varlen(model, cfg.data.max_seq_len, cfg.train.packing,
                             cfg.model.varlen_kernel)
        if min(len(e["input_ids"]) for rows in (data.train, data.eval)
               for e in rows) >= cfg.data.max_seq_len:
            # Each bin then holds one row and no padding: SDPA attends to it with no mask (a
            # shorter row's padding tail restarts positions, and transformers builds one).
            log.info("attention: every row fills its bin (data.max_seq_len tokens), so sdpa "
                     "(the default model.attn_implementation) needs no mask for them; on such "
                     "rows (1,024 tokens, an H200) it trained 3 %% faster than varlen "
                     "(docs/performance.md)")
    use_liger = fastpath.resolve_liger(cfg.train.liger, device)
    # Before LoRA: same module names either way.
    fastpath.apply_fast_modules(model, cfg.train.liger_in_layers(use_liger),
                                joint_lora=cfg.train.joint_lora)
    models.prepare_for_training(model, cfg.train.gradient_checkpointing,
                                cfg.train.checkpoint_every)
    if cfg.train.activation_offload:
        fastpath.enable_offloaded_checkpointing(model, cfg.train.checkpoint_every)
    head_loss = None
    # FSDP flattens lm_head's weight into shards: there, only the model's own loss sees it whole.
    if cfg.train.fused_loss and not models.fsdp_active():
        head_loss = (fastpath.SupervisedHeadLoss(model.get_output_embeddings(),
                                                 cfg.train.liger_for_loss(use_liger),
                                                 logits=fastpath.logit_transform(model.config),
                                                 compiled=cfg.train.compile and device == "cuda"),
                     fastpath.FinalHiddenStates(model))
    model = models.attach_lora(model, cfg.lora, fused=cfg.train.fused_lora)
    if cfg.train.fused_lora and cfg.train.joint_lora and (
            not cfg.train.compile or fastpath.compiled_layers_take_projection_groups()):
        log.info("train.joint_lora: %d attention q/k/v groups as one function each",
                 fusedlora.group_projections(model))
    if cfg.train.compile:
        # transformers' own checkpointing only: the offloaded and the reentrant (FSDP)
        # checkpoint functions stay where transformers calls them.
        plain_checkpointing = (cfg.train.gradient_checkpointing and not cfg.train.activation_offload
                               and not models.fsdp_active())
        log.info("compiling %d decoder layers",
                 fastpath.compile_decoder_layers(model, checkpointing=plain_checkpointing))
    if cfg.train.cuda_graphs:
        fastpath.keep_grads_out_of_graph_pool(model)
    train_rows, eval_rows, collator = _batching(cfg, data, tokenizer)
    rows = checkpoints.rows_fingerprint(data.train)
    if checkpoint is not None:
        checkpoints.check_rows(Path(checkpoint), rows)  # before anything is written
    args = build_training_args(cfg, out, device, dtype, has_eval=bool(data.eval),
                               resuming=checkpoint is not None)

    replaced = None
    if _is_main_process():
        # Leftovers of a killed run first (a run it had set aside included), then the earlier
        # run aside, so that the new run's failure before its first checkpoint can return it.
        stale = fsio.remove_stale(out)
        if claim.replace_run:
            replaced = rundir.set_aside_run(out)
    try:
        if _is_main_process():
            rundir.write_marker(out)  # first: from here on the folder is this run's to replace
            for path in stale + fsio.remove_stale(out / CHECKPOINTS):
                log.info("removed %s, left behind by a killed run", path)
            if resume:
                _trim_metrics(out / "metrics.jsonl",
                              checkpoints.global_step(Path(checkpoint)) if checkpoint else None)
            _write_config(written, out)
            rundir.write_marker(out, tokenizer.save_pretrained(out))
        callbacks = make_callbacks(out)
        trainer = trainer_class()(model=model, args=args, train_dataset=train_rows,
                                   eval_dataset=eval_rows or None, data_collator=collator,
                                   callbacks=list(callbacks), head_loss=head_loss,
                                   cuda_graphs=cfg.train.cuda_graphs, rows_fingerprint=rows)
    except BaseException:
        if replaced is not None:
            rundir.restore_run(out, replaced)
        raise
    if trainer.is_fsdp_enabled:
        # Trainer applies peft's wrap policy and the quant-storage precision only when training
        # starts; an evaluation before that (eval_on_start) would wrap the model without them.
        from transformers.integrations.fsdp import update_fsdp_plugin_peft
        update_fsdp_plugin_peft(model, trainer.accelerator)
    return TrainingSession(cfg, out, trainer, model, tokenizer, data, device, dtype, checkpoint,
                           callbacks, started, claim.lock, replaced)


def compiler_has_gpu(device: str) -> bool:
    """Whether torch.compile's GPU code generator serves this device: CUDA of compute
    capability 7.0 or newer (triton's floor; older cards fail at the first compiled call)."""
    return device == "cuda" and torch.cuda.get_device_capability() >= (7, 0)


def _batching(cfg: RunConfig, data: PreparedData, tokenizer):
    """Training and eval rows plus the collator: each micro-batch's rows packed, or padded.

    Either way a micro-batch is `train.micro_batch_size` rows, so rows, tokens and steps per
    epoch do not depend on packing; they are logged here and kept in summary.json.
    """
    t = cfg.train
    geometry = batch_geometry(data.train, t.micro_batch_size, t.grad_accum_steps,
                              int(os.environ.get("WORLD_SIZE", "1")))
    data.stats.update(geometry)
    log.info("batch: %d rows per optimizer step (%d x %d accumulation x %s processes), ~%d "
             "tokens per step, %d steps per epoch", geometry["rows_per_step"], t.micro_batch_size,
             t.grad_accum_steps, os.environ.get("WORLD_SIZE", "1"), geometry["tokens_per_step"],
             geometry["steps_per_epoch"])
    return data.train, data.eval, collator_for(cfg, tokenizer.pad_token_id)


def collator_for(cfg: RunConfig, pad_token_id: int):
    """Packed bins of `data.max_seq_len` tokens per micro-batch, or padded rows; with the
    supervised positions for the fused head loss (where train builds one). `cfg` with
    `train.compile` resolved (config.with_compile): compiled layers get full-length bins."""
    positions = cfg.train.fused_loss and not models.fsdp_active()
    if not cfg.train.packing:
        return PadCollator(pad_token_id, positions=positions)
    bin_tokens = cfg.data.max_seq_len
    # Compiled layers want few shapes: pad every bin to the full length.
    multiple = bin_tokens if cfg.train.compiled() else 1
    # FlashAttention-2 sees row boundaries only in a batch of one row (PackedCollator.flatten).
    flatten = cfg.model.attn_implementation == "flash_attention_2"
    return PackedCollator(pad_token_id, bin_tokens, pad_to_multiple_of=multiple, flatten=flatten,
                          row_bounds=cfg.model.attn_implementation == "varlen",
                          positions=positions)


def _write_config(cfg: RunConfig, out: Path) -> None:
    save_config(cfg, out / rundir.CONFIG)  # atomic: --resume never reads a truncated config


def oom_advice(cfg: RunConfig) -> str:
    """What to change after a CUDA out-of-memory error, as `--set` flags, most effective first.

    On CUDA the memory planner names the nearest configuration its estimate says fits this
    card; the rules of thumb below are the fallback. Batch geometry changes cannot resume an
    existing checkpoint exactly (the data position is counted in micro-batches), hence "again
    with --overwrite".
    """
    if torch.cuda.is_available():
        from qlora_lab.plan import nearest_fit_advice

        # What this process may use: the card's memory, or less under an emulated cap.
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda *_: 1.0)()
        advice = nearest_fit_advice(cfg, int(total * fraction))
        if advice:
            return advice + ", then run again with --overwrite"
    t, options = cfg.train, []
    if t.micro_batch_size > 1:
        smaller = t.micro_batch_size // 2
        accum = math.ceil(t.micro_batch_size * t.grad_accum_steps / smaller)
        options.append(f"--set train.micro_batch_size={smaller} "
                       f"--set train.grad_accum_steps={accum} (same rows per step)")
    if not t.gradient_checkpointing:
        options.append("--set train.gradient_checkpointing=true")
    if cfg.data.max_seq_len > 256:
        options.append(f"--set data.max_seq_len={cfg.data.max_seq_len // 2}")
    if cfg.quant.bits != 4:
        options.append("--set quant.bits=4")
    if resolve_optimizer(t.optimizer, True) in ("adamw_torch", "paged_adamw_32bit"):
        options.append("--set train.optimizer=paged_adamw_8bit")
    if not options:
        return ("it is already at the smallest settings qlora-lab knows — use a smaller base "
                "model or a GPU with more memory")
    return "try " + ", or ".join(options[:3]) + ", then run again with --overwrite"


def _oom_detail(exc: BaseException) -> str:
    found = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(exc))
    return found.group(0) if found else "CUDA out of memory"


def _non_finite_message(exc: faults.NonFiniteLoss, session: TrainingSession) -> str:
    last = checkpoints.newest_usable(session.out / CHECKPOINTS)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written"
    t = session.cfg.train
    hint = f"lower train.learning_rate (now {t.learning_rate:g})"
    if session.dtype == torch.float16:
        hint += ", or set quant.compute_dtype to bfloat16/float32 (fp16 overflows easily)"
    return (f"training loss became {exc.value} at step {exc.step}; stopped before it changed "
            f"any weights, {kept} — {hint}, check the data, then run again with --overwrite")


def _interrupted_message(session: TrainingSession, stopper: faults.StopOnSignal) -> str:
    state, out = session.trainer.state, session.out
    ckpt = out / CHECKPOINTS / checkpoints.name_for(state.global_step)
    return (f"stopped by {stopper.signal_name} at step {state.global_step} of {state.max_steps}; "
            f"checkpoint saved in {ckpt} — continue with: qlora-lab train --output-dir "
            f"{shlex.quote(str(out))} --resume")


def budget_rows(cfg: RunConfig) -> tuple[list[int], bool]:
    """The run's training rows as the budget search reads them: each row's tokens, and whether
    rows share bins (data.rows_share_bins). Reads and tokenizes the data as setup does."""
    model_path = models.resolve_model_path(cfg.model.name)
    with adapters.explain_load_errors(f"base model {cfg.model.name}",
                                      "check the folder (config.json, *.safetensors), or pick "
                                      "another --model"):
        tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    short = rows_share_bins(data.train, cfg.data.max_seq_len, cfg.train.packing)
    return [len(e["input_ids"]) for e in data.train], short


def fit_to_card(cfg: RunConfig, budget_bytes: int, rows: tuple[list[int], bool] | None = None):
    """`train --budget`: the planner's fastest config for this card, told how the run's rows
    pack (budget_rows; pass them to fit several budgets to one read): whether they share bins
    (their masks decide what selective checkpointing keeps) and, packed, the bins a
    micro-batch of them fills. The model itself is never loaded here."""
    from qlora_lab.plan import fit_config

    lengths, short = rows if rows is not None else budget_rows(cfg)
    bins = packed_bins(cfg, lengths) if cfg.train.packing else None
    fitted, best, _ = fit_config(cfg, budget_bytes, short_rows=short, bins=bins)
    return fitted, best, short


def packed_bins(cfg: RunConfig, lengths: list[int]):
    """rows -> the most bins a packed micro-batch of that many of these rows fills, among four
    times as many random micro-batches as the run draws (at least 256): what the planner must
    fit, where counting each row as a full bin predicted 4.9x the memory of 160 Dolly rows
    (docs/planner.md)."""
    from qlora_lab.data import worst_micro_batch_bins

    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps

    @functools.cache  # the budget search asks again for the offload fallback
    def bins(rows: int) -> int:
        if cfg.train.max_steps:
            drawn = cfg.train.max_steps * -(-rows_per_step // rows)
        else:
            drawn = math.ceil(cfg.train.epochs * len(lengths) / rows)
        return worst_micro_batch_bins(lengths, rows, cfg.data.max_seq_len,
                                      draws=max(256, 4 * drawn), seed=cfg.train.seed)

    return bins


def run_train(cfg: RunConfig, resume: str | bool | None = None, overwrite: bool = False) -> dict:
    """Fine-tune `cfg.model` on `cfg.data`; returns the summary also written to summary.json."""
    claim = claim_output_dir(cfg, resume, overwrite)
    try:
        finished = rundir.finished_summary(claim.out, claim.checkpoint)
        if finished is not None:
            log.warning("%s already finished at step %d; nothing to train or rewrite (its "
                        "adapter is in %s) — pass --overwrite to train it again", claim.out,
                        finished["steps"], claim.out / "adapter")
            return finished
        return _replacing(setup_training(cfg, resume, overwrite, claim))
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(f"CUDA out of memory ({_oom_detail(exc)}) with micro_batch_size "
                          f"{cfg.train.micro_batch_size} x max_seq_len {cfg.data.max_seq_len} — "
                          f"{oom_advice(cfg)}") from None
    except (UserError, TrainingInterrupted):
        raise
    except Exception as exc:
        # A full disk, quota, size limit or read-only mount; the tokenizer's and safetensors'
        # writers report it as their own exception types, naming only "os error 28".
        if not is_write_failure(exc):
            raise
        raise UserError(_write_failure_message(exc, claim.out)) from None
    finally:
        if claim.lock is not None:
            claim.lock.release()
        if (claim.created and claim.out.is_dir()
                and {p.name for p in claim.out.iterdir()} <= {rundir.LOCK}):
            # A mistake found before the first write leaves no empty folder behind.
            (claim.out / rundir.LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                claim.out.rmdir()


def _replacing(session: TrainingSession) -> dict:
    """Train; under --overwrite, drop the earlier run once this one has something to keep.

    A failure before this run's first checkpoint puts the earlier run back, as if the command
    had never run. Once this run has a checkpoint (or was stopped by a signal, which writes one)
    it is the one to resume, and the earlier run goes.
    """
    if session.replaced is None:
        return train_session(session)
    try:
        summary = train_session(session)
    except TrainingInterrupted:
        shutil.rmtree(session.replaced, ignore_errors=True)
        raise
    except BaseException:
        if checkpoints.list_all(session.out / CHECKPOINTS):
            shutil.rmtree(session.replaced, ignore_errors=True)
        else:
            rundir.restore_run(session.out, session.replaced)
            log.warning("the earlier run in %s was put back: this one failed before its first "
                        "checkpoint", session.out)
        raise
    shutil.rmtree(session.replaced, ignore_errors=True)
    return summary


def _write_failure_message(exc: Exception, out: Path) -> str:
    where = getattr(exc, "filename", None) or out
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0][:120]
    return (f"could not write {where} ({reason}); nothing finished was lost, and what was "
            f"half-written is removed at the next start — free space, then continue with: "
            f"qlora-lab train --output-dir {shlex.quote(str(out))} --resume")


def _final_eval_loss(trainer) -> float:
    # The periodic evaluation often just ran at the last step; running it again would only cost
    # time. log_history is the same on every rank, so under DDP all ranks agree to skip or not.
    state = trainer.state
    evals = [r for r in state.log_history if "eval_loss" in r]
    if evals and evals[-1].get("step") == state.global_step:
        return evals[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _take_final_checkpoint(session: TrainingSession):
    """The run's last checkpoint as its result: a run killed after writing it, before its adapter.

    Trainer resumed there would train one step past max_steps (it checks the limit only after a
    step). The checkpoint holds the final adapter weights and trainer state: loading them
    (peft's own loader) gives what the uninterrupted run would have written.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    checkpoint = Path(session.checkpoint)
    weights = load_file(checkpoint / checkpoints.ADAPTER_FILE)
    loaded = set_peft_model_state_dict(session.model, weights)
    if getattr(loaded, "unexpected_keys", None):
        raise UserError(f"--resume: {checkpoint} holds adapter weights this model does not have "
                        f"({loaded.unexpected_keys[0]}) — resume it with the config it was "
                        "written with")
    session.trainer.state = TrainerState.load_from_json(str(checkpoint / checkpoints.STATE_FILE))
    log.info("%s is the run's last step (%d): its adapter is written from it, nothing trained",
             checkpoint, session.trainer.state.global_step)
    losses = [r["loss"] for r in session.trainer.state.log_history if "loss" in r]
    # The mean logged loss: Trainer's training_loss of a run logged every step.
    return types.SimpleNamespace(training_loss=sum(losses) / len(losses) if losses else None)


def train_session(session: TrainingSession) -> dict:
    """Train a set-up session to the end, then write the adapter and summary.json."""
    cfg, trainer, out, device = session.cfg, session.trainer, session.out, session.device
    speed_cb, stopper = session.callbacks[1], session.callbacks[2]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # (Under FSDP the weights are loaded into the wrapped model by Trainer alone.)
    if rundir.checkpoint_is_final(session.checkpoint) and not trainer.is_fsdp_enabled:
        result = _take_final_checkpoint(session)
        speed_cb.start_time, speed_cb.start_tokens = (time.perf_counter(),
                                                      trainer.state.num_input_tokens_seen)
    else:
        try:
            with stopper.installed():
                result = trainer.train(resume_from_checkpoint=session.checkpoint)
        except faults.NonFiniteLoss as exc:
            raise LossNotFinite(_non_finite_message(exc, session)) from None
    if stopper.stopped_at_step is not None and trainer.state.global_step < trainer.state.max_steps:
        signum = getattr(signal, stopper.signal_name)
        raise TrainingInterrupted(_interrupted_message(session, stopper), 128 + signum)
    train_seconds = time.perf_counter() - speed_cb.start_time
    tokens_this_session = trainer.state.num_input_tokens_seen - speed_cb.start_tokens

    eval_loss = _final_eval_loss(trainer) if session.data.eval else None
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss_before": _eval_loss_at(out / "metrics.jsonl", first=True),
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_s": tokens_this_session / train_seconds if train_seconds > 0 else None,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - session.started,
        "resumed_from": session.checkpoint,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "compute_dtype": str(session.dtype).removeprefix("torch."),
        **{key: session.data.stats[key]
           for key in ("rows_per_step", "tokens_per_step", "steps_per_epoch")},
        "data": session.data.stats,
        **_peak_memory(device),
    }
    # Under FSDP trainer.model is the sharded wrapper: every rank joins the gather (a
    # collective) and rank 0 saves the adapter from the full state dict.
    full_state = (trainer.accelerator.get_state_dict(trainer.model)
                  if trainer.is_fsdp_enabled else None)
    if trainer.is_world_process_zero():
        with fsio.staged_dir(out / "adapter") as adapter_dir:
            checkpoints.save_adapter(session.model, adapter_dir, full_state)
            adapters.write_base_info(adapter_dir, cfg.model, cfg.quant, session.data.template,
                                     session.model.base_model.config, run=cfg, summary=summary,
                                     compute_dtype=summary["compute_dtype"])
        fsio.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
