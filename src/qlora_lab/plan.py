"""`qlora-lab plan`: print the predicted peak memory of a run, and fit a run to a VRAM budget.

The model's shape comes from shapes.py (its module tree, never its weights), the step's from the
run config (`step_shape`, as `train` will run it), and memory.py adds up one step's bytes; the
budget search here tries micro-batch x activation strategy against those sums.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qlora_lab import memory
from qlora_lab.config import (
    RunConfig,
    resolve_compile,
    resolve_optimizer,
    save_config,
    with_compile,
)
from qlora_lab.errors import NothingFits, UserError
from qlora_lab.memory import ModelShape, StepShape, estimate_peak_memory
from qlora_lab.shapes import (
    adapting,
    check_position_limit,
    model_shape,
    unquantized_base_error,
)


@dataclass(frozen=True)
class PlanConfig:
    """run: the training config to plan. budget: e.g. '8GiB' (None = just print the estimate).
    output: where to write the fitted config as YAML; an existing file is replaced only with
    overwrite. as_json: machine-readable output.
    """

    run: RunConfig
    gpus: int = 1
    strategy: str = "ddp"
    budget: str | None = None
    output: str | None = None
    overwrite: bool = False
    as_json: bool = False


def step_shape(cfg: RunConfig, device_is_gpu: bool = True, gpus: int = 1,
               strategy: str = "ddp", liger_installed: bool | None = None,
               triton_installed: bool | None = None) -> memory.StepShape:
    """The step `train` runs for `cfg` on a GPU (fastpath: what is swapped, fused, tiled).

    `liger_installed`, `triton_installed`: whether liger-kernel and triton are there where
    train runs (None: as on this host), for planning another host's runs
    (benchmarks/plan_vs_bench.py plans the H200's). `train.compile: auto` resolves as train
    resolves it (config.resolve_compile), with a GPU of compute capability 7.0 or newer."""
    cfg = with_compile(cfg, resolve_compile(cfg.train, device_is_gpu, gpus, triton_installed))
    compute = 4 if cfg.quant.compute_dtype == "float32" else 2
    optimizer = resolve_optimizer(cfg.train.optimizer, device_is_gpu,
                                  fsdp=gpus > 1 and strategy == "fsdp")
    liger = device_is_gpu and _liger_used(cfg.train.liger, liger_installed)
    return memory.StepShape(
        micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.max_seq_len,
        bits=cfg.quant.bits, double_quant=cfg.quant.double_quant, compute_bytes=compute,
        lora_r=cfg.lora.r, lora_bytes=4 if cfg.lora.weight_dtype == "float32" else compute,
        lora_dropout=cfg.lora.dropout > 0, optimizer=optimizer,
        gradient_checkpointing=cfg.train.gradient_checkpointing, gpus=gpus, strategy=strategy,
        # Under FSDP train falls back to the model's own loss (lm_head is sharded there).
        fused_loss=cfg.train.fused_loss and not (gpus > 1 and strategy == "fsdp"),
        fused_lora=cfg.train.fused_lora, joint_lora=cfg.train.joint_lora,
        liger=cfg.train.liger_in_layers(liger),
        liger_loss=cfg.train.liger_for_loss(liger),
        activation_offload=cfg.train.activation_offload,
        checkpoint_every=cfg.train.checkpoint_every, packed=cfg.train.packing,
        compiled=cfg.train.compile, attn_implementation=cfg.model.attn_implementation,
        varlen_triton=(device_is_gpu and cfg.model.varlen_kernel != "flash"
                       and _triton_there(triton_installed)),
        expandable_segments=memory.expandable_segments(os.environ))


def _triton_there(installed: bool | None) -> bool:
    """As attention.triton_runs decides on CUDA (head dims are the memory model's part)."""
    import importlib.util

    return installed if installed is not None else importlib.util.find_spec("triton") is not None


def _liger_text(step: memory.StepShape) -> str:
    if step.liger:
        return "Liger on"
    return "Liger for the loss" if step.fused_loss and step.head_liger else "Liger off"


def _liger_used(setting: str, installed: bool | None = None) -> bool:
    """As fastpath.resolve_liger decides on CUDA: `auto` and `loss` = when liger-kernel is
    installed.

    `plan` runs where `train` will (or is told with --set train.liger=on/off), and asks
    importlib rather than importing it, so planning stays free of torch.
    """
    import importlib.util

    if setting == "off":
        return False
    if installed is None:
        installed = importlib.util.find_spec("liger_kernel") is not None
    return setting == "on" or installed


# --- fitting a run to a budget ----------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    peak_allocated_bytes: int
    predicted_tokens_per_s: float
    fits: bool
    checkpoint_every: int = 1
    activation_offload: bool = False
    # The sequences the estimate counted: micro_batch_size rows, or, packed with the run's rows
    # known (train --budget), the most bins such a micro-batch packed into.
    sequences: int = 0


def predicted_throughput(model: ModelShape, step: StepShape, flops_per_s: float = 200e12,
                         step_overhead_s: float = 0.35) -> float:
    """A simple, documented cost model for ranking configs (not a benchmark).

    Time per micro-batch = fixed overhead (kernel launches of the quantized LoRA layers, which
    dominate at small batches; the default is a rough H200 figure for the plain stack) + 6 x
    active params x tokens / achievable FLOP/s, x 4/3 when checkpointing recomputes the forward.
    """
    compute = 6 * model.active_params() * step.tokens / flops_per_s
    if step.gradient_checkpointing:
        # The recomputed forward (2 of the 6 FLOPs per parameter) of the checkpointed layers.
        ckpt_share = (-(-model.num_hidden_layers // step.checkpoint_every)
                      / model.num_hidden_layers)
        compute *= 1 + ckpt_share / 3
    if step.activation_offload:
        # Each layer input crosses PCIe twice (~25 GB/s each way on a typical card), on the
        # compute stream.
        compute += 2 * model.num_hidden_layers * step.tokens * model.hidden_size * 2 / 25e9
    return step.tokens / (step_overhead_s + compute)


# Activation strategies the budget search tries, cheapest in time first:
# (gradient_checkpointing, checkpoint_every, activation_offload).
STRATEGIES = ((False, 1, False), (True, 4, False), (True, 2, False), (True, 1, False),
              (True, 1, True))


def fit_to_budget(model: ModelShape, base: StepShape, budget_bytes: int,
                  micro_batches=(1, 2, 4, 8, 16, 32), optimizers: tuple[str, ...] | None = None,
                  bins: Callable[[int], int] | None = None,
                  compiled: Callable[[bool, int], bool] | None = None
                  ) -> tuple[Candidate | None, list[Candidate]]:
    """Search micro-batch x checkpointing x optimizer at the needed sequence length.

    The budget is compared with the predicted *reserved* peak (what the card must hold), so the
    allocator's overhead is inside the budget too. Returns the fastest feasible candidate.
    `bins` maps a micro-batch of rows to the sequences it holds (packed: its bins); without it
    each row is a full sequence of seq_len tokens, an upper bound for packed rows.
    `compiled` maps a candidate's (offloaded activations?, rows a micro-batch) to whether its
    layers are compiled (`train.compile: auto` compiles neither offloaded runs nor one row a
    micro-batch); None: as `base`.
    """
    # The optimizer the run resolves to (apply_candidate keeps `auto`): a search over others
    # would pick one the run does not use.
    optimizers = optimizers or (base.optimizer,)
    compiled = compiled or (lambda offload, rows: base.compiled)
    cands = _candidates(model, base, budget_bytes, micro_batches, optimizers, False, bins,
                        compiled)
    if not any(c.fits for c in cands) and base.fused_loss:
        # Offloading checkpoints to host memory is the last resort: it was measured for long
        # rows (98,304 tokens in 8 GiB), not for speed, so it is chosen only when nothing else
        # fits.
        cands += _candidates(model, base, budget_bytes, micro_batches, optimizers, True, bins,
                             compiled)
    feasible = [c for c in cands if c.fits]
    best = max(feasible, key=lambda c: c.predicted_tokens_per_s, default=None)
    return best, cands


def _candidates(model: ModelShape, base: StepShape, budget_bytes: int, micro_batches,
                optimizers, offload: bool, bins: Callable[[int], int] | None,
                compiled: Callable[[bool, int], bool]) -> list[Candidate]:
    cands = []
    for mb in micro_batches:
        sequences = bins(mb) if bins else mb
        for ckpt, every, strategy_offload in STRATEGIES:
            if strategy_offload != offload:
                continue
            for opt in optimizers:
                step = replace(base, micro_batch_size=sequences, gradient_checkpointing=ckpt,
                               optimizer=opt, checkpoint_every=every, activation_offload=offload,
                               compiled=compiled(offload, mb))
                plan = estimate_peak_memory(model, step)
                cands.append(Candidate(mb, step.seq_len, ckpt, opt, plan.peak_allocated_bytes,
                                       predicted_throughput(model, step),
                                       plan.peak_reserved_bytes <= budget_bytes, every,
                                       offload, sequences))
    return cands


def shorter_seq_fallback(model: ModelShape, base: StepShape, budget_bytes: int):
    """When nothing fits at the needed length, the longest power-of-two length that does."""
    seq = base.seq_len
    while seq > 64:
        seq //= 2
        best, _ = fit_to_budget(model, replace(base, seq_len=seq), budget_bytes)
        if best is not None:
            return best
    return None


def apply_candidate(cfg: RunConfig, cand: Candidate) -> RunConfig:
    """The run config with the candidate's choices; rows per optimizer step stay the same."""
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    accum = max(1, -(-rows_per_step // cand.micro_batch_size))
    train = replace(cfg.train, micro_batch_size=cand.micro_batch_size, grad_accum_steps=accum,
                    gradient_checkpointing=cand.gradient_checkpointing,
                    checkpoint_every=cand.checkpoint_every,
                    activation_offload=cand.activation_offload,
                    optimizer=cand.optimizer if cfg.train.optimizer != "auto" else "auto")
    return replace(cfg, train=train, data=replace(cfg.data, max_seq_len=cand.seq_len))


def planned_shape(cfg: RunConfig) -> memory.ModelShape:
    """The model `train` would build for `cfg`, as the planner counts it: LoRA where
    `lora.target_modules` puts it; a row longer than a learned position table is refused, as
    train refuses it."""
    shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
    check_position_limit(shape.position_limit, cfg.data.max_seq_len, cfg.model.name)
    if (cfg.quant.bits == 4 and shape.unquantized_linears
            and shape.unquantized_linears == sum(n for _, _, n in shape.linears)):
        # As train refuses it (models._check_quantized).
        raise unquantized_base_error(cfg.model.name, "a subclass of nn.Linear")
    return adapting(shape, cfg.lora, cfg.model.name)


def fit_config(cfg: RunConfig, budget_bytes: int, gpus: int = 1, strategy: str = "ddp",
               short_rows: bool = True, bins: Callable[[int], int] | None = None
               ) -> tuple[RunConfig, Candidate, list]:
    """The fastest config predicted to fit. short_rows: whether micro-batches need an attention
    mask (data.rows_share_bins); unknown (`plan` reads no data), assume they do, which costs
    more memory with selective checkpointing. bins: packed, the bins a micro-batch of n rows
    fills (train.fit_to_card reads them off the run's rows); unknown, each row a full bin."""
    shape = planned_shape(cfg)
    base = replace(step_shape(cfg, gpus=gpus, strategy=strategy), short_rows=short_rows)
    # Only micro-batches that divide the rows per optimizer step: the search trades micro-batch
    # for accumulation and must not change the effective batch (which changes the optimization).
    # Rows counted as full sequences stop at 64 (more never fits a small card); packed rows
    # with known bins go up to the whole step (160 Dolly rows are ~30 bins), at most 1,024 rows
    # (each size's bins are a simulation of ~0.1-0.3 s).
    rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    largest = min(rows, 1024 if bins else 64)
    micro_batches = tuple(d for d in range(1, largest + 1) if rows % d == 0)
    best, cands = fit_to_budget(
        shape, base, budget_bytes, micro_batches=micro_batches, bins=bins,
        compiled=lambda offload, rows: resolve_compile(
            replace(cfg.train, activation_offload=offload, micro_batch_size=rows), True, gpus))
    if best is None:
        fallback = shorter_seq_fallback(shape, base, budget_bytes)
        hint = (f"; data.max_seq_len = {fallback.seq_len} with micro-batch "
                f"{fallback.micro_batch_size} would fit") if fallback else ""
        raise NothingFits(f"no micro-batch/checkpointing choice fits {cfg.model.name} at "
                          f"data.max_seq_len = {base.seq_len} in "
                          f"{budget_bytes / memory.GIB:.2f} GiB{hint} — lower data.max_seq_len "
                          "or quant.bits, or raise the budget")
    return apply_candidate(cfg, best), best, cands


def _table(plan: memory.MemoryPlan) -> str:
    rows = [f"  {t.name:<28} {t.bytes / memory.GIB:8.3f} GiB   {t.derivation}"
            for t in plan.terms]
    rows.append(f"  {'peak allocated (predicted)':<28} "
                f"{plan.peak_allocated_bytes / memory.GIB:8.3f} GiB")
    rows.append(f"  {'peak reserved (predicted)':<28} "
                f"{plan.peak_reserved_bytes / memory.GIB:8.3f} GiB")
    rows.append(f"  excluded: {plan.excluded}")
    return "\n".join(rows)


MAX_GPUS = 65536  # past any one job; a larger --gpus is a typo


def _check_request(cfg: PlanConfig) -> None:
    """The flags alone, before any model is read: a wrong one fails at once, nothing written."""
    if not 1 <= cfg.gpus <= MAX_GPUS:
        raise UserError(f"--gpus {cfg.gpus} must be a whole number from 1 to {MAX_GPUS}")
    if cfg.strategy == "fsdp" and cfg.gpus < 2:
        raise UserError("--strategy fsdp shards over several GPUs — pass --gpus 2 or more, or "
                        "leave --strategy out for one GPU")
    if cfg.output is None:
        return
    out = Path(cfg.output)
    if not cfg.output.strip():
        raise UserError("--output is empty — pass a file path such as fit.yaml")
    if out.is_dir():
        raise UserError(f"--output {out} is a directory — pass a file path such as "
                        f"{out / 'fit.yaml'}")
    if os.path.lexists(out) and not cfg.overwrite:
        raise UserError(f"--output {out} already exists — pass --overwrite to replace it, or "
                        "another path (nothing was written)")


def run_plan(cfg: PlanConfig) -> dict:
    _check_request(cfg)
    run = cfg.run
    result: dict = {}
    if cfg.budget is not None:
        try:
            budget = memory.parse_bytes(cfg.budget)
        except ValueError as exc:
            raise UserError(f"--budget: {exc}") from None
        run, best, cands = fit_config(run, budget, cfg.gpus, cfg.strategy)
        result["budget_bytes"] = budget
        result["chosen"] = best.__dict__
        result["candidates"] = [c.__dict__ for c in cands]
    shape = planned_shape(run)
    step = step_shape(run, gpus=cfg.gpus, strategy=cfg.strategy)
    plan = memory.estimate_peak_memory(shape, step)
    result.update(model=run.model.name, step=step.__dict__, **plan.as_dict())
    packed_note = None
    if step.packed and step.micro_batch_size > 1:
        # `plan` reads no data; packed rows share bins, so this is an upper bound.
        packed_note = (f"packed: each of the {step.micro_batch_size} rows counted as a full "
                       f"{step.seq_len}-token bin, an upper bound (160 Dolly rows fill ~30 "
                       "bins of 1,024); `train --budget` plans the bins the run's rows fill")
        result["packed_note"] = packed_note
    if cfg.output is not None:
        try:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            save_config(run, cfg.output)  # atomic; a symlink there is replaced, not followed
        except OSError as exc:
            raise UserError(f"--output {cfg.output}: cannot write ({exc.strerror}) — pass a "
                            "writable path") from None
        result["config_path"] = cfg.output
    if cfg.as_json:
        print(json.dumps(result, indent=2))
    else:
        targets = run.lora.target_names()
        print(f"model {run.model.name}: micro-batch {step.micro_batch_size} x seq {step.seq_len}, "
              f"{step.bits}-bit base, LoRA r={step.lora_r} ({step.lora_bytes * 8}-bit"
              + (f", on {','.join(targets)}" if targets else "") + "), "
              f"{step.optimizer}, {_liger_text(step)}, "
              f"activations: {_strategy(step)}; peak at {plan.peak_phase}"
              + (f"; per GPU of {step.gpus} ({step.strategy})" if step.gpus > 1 else ""))
        print(_table(plan))
        if packed_note:
            print(f"  {packed_note}")
        if cfg.budget is not None:
            print(f"fits {cfg.budget}: micro-batch {result['chosen']['micro_batch_size']}, "
                  f"activations: {_strategy(step)}"
                  + (f"; config written to {cfg.output}" if cfg.output else ""))
        elif cfg.output is not None:
            print(f"config written to {cfg.output}")
    return result


def _strategy(step: memory.StepShape) -> str:
    if not step.gradient_checkpointing:
        return "kept (no checkpointing)"
    if step.activation_offload:
        return "checkpointing, layer inputs offloaded to host memory"
    if step.checkpoint_every > 1:
        return f"checkpointing every {step.checkpoint_every} layers"
    return "checkpointing every layer"


def nearest_fit_advice(cfg: RunConfig, budget_bytes: int) -> str | None:
    """After an OOM: the predicted peak of the failed config, and the closest one that fits.

    Returns None when the planner cannot read the architecture (then rules of thumb apply).
    """
    try:
        shape = planned_shape(cfg)
        failed = memory.estimate_peak_memory(shape, step_shape(cfg))
        fitted, _, _ = fit_config(cfg, budget_bytes)
    except NothingFits as exc:
        return str(exc)
    except UserError:
        return None
    t = fitted.train
    return (f"the planner predicts {failed.peak_reserved_bytes / memory.GIB:.2f} GiB for this "
            f"config and {budget_bytes / memory.GIB:.2f} GiB is available; nearest fit: "
            f"--set train.micro_batch_size={t.micro_batch_size} --set "
            f"train.grad_accum_steps={t.grad_accum_steps} --set "
            f"train.gradient_checkpointing={str(t.gradient_checkpointing).lower()}"
            + (f" --set train.checkpoint_every={t.checkpoint_every}"
               if t.checkpoint_every > 1 else "")
            + (" --set train.activation_offload=true" if t.activation_offload else "")
            + f" (or pass --budget {budget_bytes / memory.GIB:.1f}GiB)")
