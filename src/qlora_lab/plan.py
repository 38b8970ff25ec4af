"""`qlora-lab plan`: print the predicted peak memory of a run, and fit a run to a VRAM budget.

The model's architecture comes from its preset, its local config.json, or (for other hub ids)
`AutoConfig`, so planning never loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from qlora_lab import memory, models
from qlora_lab.config import RunConfig, save_config
from qlora_lab.errors import UserError


@dataclass(frozen=True)
class PlanConfig:
    """run: the training config to plan. budget: e.g. '8GiB' (None = just print the estimate).
    output: where to write the fitted config as YAML. as_json: machine-readable output.
    """

    run: RunConfig
    gpus: int = 1
    strategy: str = "ddp"
    budget: str | None = None
    output: str | None = None
    as_json: bool = False


def model_shape(name: str, trust_remote_code: bool = False) -> memory.ModelShape:
    preset = models.preset_for(name)
    if preset is not None:
        return memory.ModelShape.from_config(preset.arch)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return memory.ModelShape.from_config(json.loads((path / "config.json").read_text()))
    if name.endswith(".gguf"):
        path = Path(models.resolve_model_path(name))
        return memory.ModelShape.from_config(json.loads((path / "config.json").read_text()))
    from transformers import AutoConfig

    try:
        return memory.ModelShape.from_config(
            AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))
    except OSError as exc:
        raise UserError(f"cannot read the architecture of {name!r} ({str(exc).splitlines()[0]}) "
                        "— pass a preset, a local model dir or a reachable hub id") from None


def step_shape(cfg: RunConfig, device_is_gpu: bool = True, gpus: int = 1,
               strategy: str = "ddp") -> memory.StepShape:
    compute = 4 if cfg.quant.compute_dtype == "float32" else 2
    optimizer = cfg.train.optimizer
    if optimizer == "auto":
        # As train resolves it; under FSDP torch AdamW (see trainer.optimizer_name).
        paged = device_is_gpu and not (gpus > 1 and strategy == "fsdp")
        optimizer = "paged_adamw_8bit" if paged else "adamw_torch"
    return memory.StepShape(
        micro_batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.max_seq_len,
        bits=cfg.quant.bits, double_quant=cfg.quant.double_quant, compute_bytes=compute,
        lora_r=cfg.lora.r, lora_bytes=4 if cfg.lora.weight_dtype == "float32" else compute,
        lora_dropout=cfg.lora.dropout > 0, optimizer=optimizer,
        gradient_checkpointing=cfg.train.gradient_checkpointing, gpus=gpus, strategy=strategy,
        # Under FSDP train falls back to the model's own loss (lm_head is sharded there).
        fused_loss=cfg.train.fused_loss and not (gpus > 1 and strategy == "fsdp"),
        activation_offload=cfg.train.activation_offload,
        checkpoint_every=cfg.train.checkpoint_every, packed=cfg.train.packing,
        compiled=cfg.train.compile)


def apply_candidate(cfg: RunConfig, cand: memory.Candidate) -> RunConfig:
    """The run config with the candidate's choices; rows per optimizer step stay the same."""
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    accum = max(1, -(-rows_per_step // cand.micro_batch_size))
    train = replace(cfg.train, micro_batch_size=cand.micro_batch_size, grad_accum_steps=accum,
                    gradient_checkpointing=cand.gradient_checkpointing,
                    checkpoint_every=cand.checkpoint_every,
                    activation_offload=cand.activation_offload,
                    optimizer=cand.optimizer if cfg.train.optimizer != "auto" else "auto")
    return replace(cfg, train=train, data=replace(cfg.data, max_seq_len=cand.seq_len))


def fit_config(cfg: RunConfig, budget_bytes: int, gpus: int = 1, strategy: str = "ddp"
               ) -> tuple[RunConfig, memory.Candidate, list]:
    shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
    base = step_shape(cfg, gpus=gpus, strategy=strategy)
    # Only micro-batches that divide the rows per optimizer step: the search trades micro-batch
    # for accumulation and must not change the effective batch (which changes the optimization).
    rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    micro_batches = tuple(d for d in range(1, min(rows, 64) + 1) if rows % d == 0)
    best, cands = memory.fit_to_budget(shape, base, budget_bytes, micro_batches=micro_batches)
    if best is None:
        fallback = memory.shorter_seq_fallback(shape, base, budget_bytes)
        hint = (f"; data.max_seq_len = {fallback.seq_len} with micro-batch "
                f"{fallback.micro_batch_size} would fit") if fallback else ""
        raise UserError(f"no micro-batch/checkpointing choice fits {cfg.model.name} at "
                        f"data.max_seq_len = {base.seq_len} in {budget_bytes / memory.GIB:.2f} "
                        f"GiB{hint} — lower data.max_seq_len or quant.bits, or raise the budget")
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


def run_plan(cfg: PlanConfig) -> dict:
    run = cfg.run
    result: dict = {}
    if cfg.budget:
        try:
            budget = memory.parse_bytes(cfg.budget)
        except ValueError as exc:
            raise UserError(f"--budget: {exc}") from None
        run, best, cands = fit_config(run, budget, cfg.gpus, cfg.strategy)
        result["budget_bytes"] = budget
        result["chosen"] = best.__dict__
        result["candidates"] = [c.__dict__ for c in cands]
    shape = model_shape(run.model.name, run.model.trust_remote_code)
    if cfg.gpus < 1:
        raise UserError(f"--gpus {cfg.gpus} must be a positive integer")
    step = step_shape(run, gpus=cfg.gpus, strategy=cfg.strategy)
    plan = memory.estimate_peak_memory(shape, step)
    result.update(model=run.model.name, step=step.__dict__, **plan.as_dict())
    if cfg.output:
        try:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            save_config(run, cfg.output)
        except OSError as exc:
            raise UserError(f"--output {cfg.output}: cannot write ({exc.strerror}) — pass a "
                            "writable path") from None
        result["config_path"] = cfg.output
    if cfg.as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {run.model.name}: micro-batch {step.micro_batch_size} x seq {step.seq_len}, "
              f"{step.bits}-bit base, LoRA r={step.lora_r}, {step.optimizer}, "
              f"activations: {_strategy(step)}"
              + (f"; per GPU of {step.gpus} ({step.strategy})" if step.gpus > 1 else ""))
        print(_table(plan))
        if cfg.budget:
            print(f"fits {cfg.budget}: micro-batch {result['chosen']['micro_batch_size']}, "
                  f"activations: {_strategy(step)}"
                  + (f"; config written to {cfg.output}" if cfg.output else ""))
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
        shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
        failed = memory.estimate_peak_memory(shape, step_shape(cfg))
        fitted, _, _ = fit_config(cfg, budget_bytes)
    except UserError as exc:
        return str(exc) if "fits" in str(exc) else None
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
