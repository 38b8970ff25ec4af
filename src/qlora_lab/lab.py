"""`qlora-lab lab`: measure the three tradeoffs of memory-bound fine-tuning, as one report.

Every number in the report comes from work this invocation did (or, continuing an interrupted
one, the same command did: see below): planner predictions (memory.estimate_peak_memory), real
`train` runs, real generation and real `eval`. Sections:

1. feasibility   seq_len x micro-batch x rank x checkpointing x 4/16-bit under --budget, as the
                 planner predicts it; on CUDA, real train steps confirm a subset (each in its own
                 process under the emulated card, peak from torch.cuda.max_memory_allocated).
2. throughput    for each memory budget, the config `train --budget` picks, trained for real:
                 real tokens/s and wall time to a target eval loss, with the Pareto front.
3. stability     learning rate x (nf4, fp4, 16-bit) x optimizer x seed: final eval loss and
                 divergences (a NaN stop, or a training loss above spike_factor x the first).
4. indirection   time to first token, decode tokens/s and weight memory at batch 1 and 8: 4-bit
                 base alone, 4-bit base + unmerged adapter, merged 16-bit, merged re-quantized.
5. quality       `eval` of base vs fine-tuned (the adapter section 4 used).

Outputs in --output-dir: report.json (every number, the config, versions, hardware and the
command), report.md, report.html (standalone: plots inlined as data URIs) and the PNGs; each
run's scratch dir under runs/. How a run is trained, recorded and timed lives in lab_runs.py;
rendering lives in lab_report.py.

Interrupted (Ctrl-C, SIGTERM), a lab keeps report.json ("complete": false) and every finished
run's record. The same command again, into the same --output-dir, continues it: finished
training runs are read back (marked "reused", listed in `reused_runs`), everything else runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import time
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from qlora_lab import child, fsio, memory
from qlora_lab.config import (
    MAX_LORA_RANK,
    MAX_SEQ_LEN,
    RunConfig,
    TrainConfig,
    config_from_dict,
)
from qlora_lab.errors import TrainingInterrupted, UserError
from qlora_lab.lab_runs import RunBook, free_memory, long_rows_file, time_generation

log = logging.getLogger(__name__)

GIB, MIB = 1024**3, 1024**2
DEMO_DIR = Path(__file__).parent / "demo_data"
QUANT_VARIANTS = {"nf4": {"bits": 4, "quant_type": "nf4"}, "fp4": {"bits": 4, "quant_type": "fp4"},
                  "16bit": {"bits": 16}}
CUDA_ONLY_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")


@dataclass(frozen=True)
class LabConfig:
    """One `qlora-lab lab` run. The defaults are the full (GPU) preset; QUICK holds --quick's.

    model: base for stability, indirection and quality (real weights make those meaningful).
    speed_model: base for feasibility and throughput (random weights are fine: memory and speed
        do not depend on weight values), a preset or a local dir.
    data / eval_data: training rows and held-out rows with reference answers.
    budget_bytes: the card the feasibility map is drawn for; on CUDA, sections 3-5 and the
        measured feasibility runs are capped to it (set_per_process_memory_fraction).
    seq_lens, micro_batches, ranks: the feasibility grid (x checkpointing on/off x 4/16-bit).
    measure_configs: how many grid points real CUDA runs confirm (one predicted not to fit).
    budgets_bytes: section 2's budgets; each gets the planner's config at throughput_seq_len.
    rows_per_step: rows per optimizer step (micro-batch x accumulation) in sections 2-5, packed
        into bins or not. The planner keeps it fixed while trading micro-batch for accumulation.
    target_eval_loss: section 2's target; None = the highest final eval loss of the budget runs
        (the loss every budget reached, so each has a time).
    spike_factor: a run diverged if a logged training loss exceeds spike_factor x the first one.
    workers: concurrent processes for runs whose timing is not reported (CUDA only).
    """

    output_dir: str = "lab"
    model: str = "smollm2-135m"
    speed_model: str = "tinyllama"
    data: str = str(DEMO_DIR / "train.jsonl")
    eval_data: str = str(DEMO_DIR / "eval.jsonl")
    budget_bytes: int = 8 * GIB
    quick: bool = False
    command: str = ""
    seq_lens: tuple = (512, 1024, 2048, 4096, 8192)
    micro_batches: tuple = (1, 2, 4, 8, 16, 32)
    ranks: tuple = (8, 64)
    measure_configs: int = 5
    measure_steps: int = 3
    budgets_bytes: tuple = (4 * GIB, 6 * GIB, 8 * GIB, 12 * GIB, 24 * GIB)
    throughput_seq_len: int = 1024
    throughput_steps: int = 10
    rows_per_step: int = 16
    learning_rate: float = 1e-3
    eval_steps: int = 2
    eval_rows: int = 16
    target_eval_loss: float | None = None
    learning_rates: tuple = (1e-4, 1e-3, 1e-2)
    quant_variants: tuple = ("nf4", "fp4", "16bit")
    optimizers: tuple = ("adamw_torch", "paged_adamw_8bit")
    seeds: tuple = (0, 1)
    stability_steps: int = 15
    spike_factor: float = 2.0
    seq_len: int = 256
    quality_steps: int = 30
    max_new_tokens: int = 48
    decode_tokens: int = 32
    batch_sizes: tuple = (1, 8)
    repeats: int = 3
    workers: int = 6

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise UserError(f"--budget {self.budget_bytes} bytes must be positive, e.g. 8GiB")
        for name in ("seq_lens", "micro_batches", "ranks", "budgets_bytes", "learning_rates",
                     "quant_variants", "optimizers", "seeds", "batch_sizes"):
            if not getattr(self, name):
                raise UserError(f"lab setting {name} is empty — give it at least one value")
        unknown = set(self.quant_variants) - set(QUANT_VARIANTS)
        if unknown:
            raise UserError(f"quant variant {min(unknown)!r} is unknown — use "
                            + ", ".join(QUANT_VARIANTS))
        # Ranges, checked here rather than by the runs: a bad value would otherwise surface
        # minutes later as a failed run, or as a report of nonsense (micro-batch 0 "fits").
        for name, low, high in RANGES:
            for value in _as_tuple(getattr(self, name)):
                if not low <= value <= high:
                    raise UserError(f"lab setting {name} = {value!r} is out of range — give "
                                    f"{_range_text(low, high)}")
        if self.target_eval_loss is not None and not self.target_eval_loss > 0:
            raise UserError(f"lab setting target_eval_loss = {self.target_eval_loss!r} is out of "
                            "range — give a positive loss, or none")
        known = typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"])
        for optimizer in self.optimizers:
            if optimizer not in known or optimizer == "auto":
                raise UserError(f"lab setting optimizers: {optimizer!r} is unknown — use "
                                + ", ".join(o for o in known if o != "auto"))


# (setting, lowest, highest) for every numeric lab setting; a tuple's items each.
RANGES = (
    ("seq_lens", 8, MAX_SEQ_LEN), ("micro_batches", 1, 4096), ("ranks", 1, MAX_LORA_RANK),
    ("measure_configs", 0, 1000), ("measure_steps", 1, 10**6),
    ("budgets_bytes", 1, 2**60), ("throughput_seq_len", 8, MAX_SEQ_LEN),
    ("throughput_steps", 1, 10**6), ("rows_per_step", 1, 10**6), ("eval_steps", 1, 10**6),
    ("eval_rows", 1, 10**6), ("learning_rate", 1e-12, 10.0), ("learning_rates", 1e-12, 10.0),
    ("seeds", 0, 2**32 - 1), ("stability_steps", 1, 10**6), ("spike_factor", 1.0, 1e6),
    ("seq_len", 8, MAX_SEQ_LEN), ("quality_steps", 1, 10**6), ("max_new_tokens", 1, 10**5),
    ("decode_tokens", 1, 10**5), ("batch_sizes", 1, 4096), ("repeats", 1, 1000),
    ("workers", 1, 256))


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _range_text(low, high) -> str:
    return f"a number from {low:g} to {high:g}" if isinstance(low, float) else (
        f"a whole number from {low} to {high}")


# --quick: the tiny random model everywhere, budgets small enough that `train --budget` picks a
# different micro-batch for it at each (4, 8 and 16 rows, under train's expandable segments:
# 82-85, 86-93 and >= 94 MiB with the fused head loss's chunks), a few steps per run.
QUICK = {"model": "tiny-random", "speed_model": "tiny-random",
         "seq_lens": (256, 512, 1024, 2048), "micro_batches": (1, 2, 4, 8, 16),
         "budgets_bytes": (83 * MIB, 90 * MIB, 110 * MIB), "throughput_seq_len": 256,
         "throughput_steps": 12, "learning_rate": 3e-3, "eval_rows": 8,
         "learning_rates": (1e-3, 1e-2, 1e-1, 1.0), "stability_steps": 8, "quality_steps": 20,
         "max_new_tokens": 16, "decode_tokens": 12, "repeats": 2, "workers": 1}


def lab_config(quick: bool = False, **given) -> LabConfig:
    """The preset (full, or QUICK) with the caller's values on top."""
    base = {**QUICK, "quick": True} if quick else {}
    return LabConfig(**{**base, **given})


# Knobs `lab --set` may change: the sizes of each section's sweep, never paths or the command.
TUNABLE = ("seq_lens", "micro_batches", "ranks", "measure_configs", "measure_steps",
           "throughput_seq_len", "throughput_steps", "rows_per_step", "learning_rate",
           "eval_steps", "eval_rows", "target_eval_loss", "learning_rates", "quant_variants",
           "optimizers", "seeds", "stability_steps", "spike_factor", "seq_len", "quality_steps",
           "max_new_tokens", "decode_tokens", "batch_sizes", "repeats", "workers")


def parse_overrides(pairs: list[str]) -> dict:
    """`["seeds=0,1", "stability_steps=10"]` -> LabConfig values, each checked for its type.

    The grammar of `train --set` (config.split_set_pair), with one-word keys: lists are
    comma-separated or YAML (`seeds=[0, 1]`), and each value is checked against its field's type
    as a run config's are (a list item against the type of the field's default items).
    """
    import typing

    from qlora_lab.config import check_type, set_list, split_set_pair

    defaults = {f.name: f.default for f in dataclasses.fields(LabConfig)}
    hints = typing.get_type_hints(LabConfig)
    values = {}
    for pair in pairs:
        try:
            (key,), value = split_set_pair(pair, depth=1)
        except ValueError:  # malformed: no '=', or a dotted key
            key = None
        if key not in TUNABLE:
            raise UserError(f"lab --set {pair[:80]!r}: use KEY=VALUE with KEY one of "
                            f"{', '.join(TUNABLE)}")
        default = defaults[key]
        try:
            if isinstance(default, tuple):
                kind = type(default[0]) if default else str
                value = tuple(check_type(key, item, kind) for item in set_list(value))
                if not value:
                    raise ValueError("empty list")
            elif default is None and value in ("", "none", "None", None):
                value = None
            else:
                value = check_type(key, value, hints[key])
        except (ValueError, UserError):
            raw = pair.partition("=")[2]
            shown = ("comma-separated values or a [list]" if isinstance(default, tuple)
                     else "a number or none" if default is None else type(default).__name__)
            raise UserError(f"lab --set {pair[:80]!r}: {raw[:80]!r} is not a valid value for {key} "
                            f"(expected {shown}, e.g. {key}={_example(default)})") from None
        values[key] = value
    return values


def _example(default) -> str:
    if isinstance(default, tuple):
        return ",".join(str(x) for x in default)
    return str(default)


class Lab(RunBook):
    """The run records, plus the settings every section reads."""

    def __init__(self, cfg: LabConfig, out: Path, device: str, reuse: bool = False):
        super().__init__(out, device, reuse)
        self.cfg = cfg


def base_run(cfg: LabConfig, run_dir: Path, model: str, steps: int, **sections) -> RunConfig:
    """The lab's training recipe; `sections` override it ({"train": {...}, "quant": {...}})."""
    values = {
        "model": {"name": model},
        "lora": {"dropout": 0.0},
        "data": {"source": cfg.data, "eval_source": cfg.eval_data, "max_seq_len": cfg.seq_len,
                 "max_eval_rows": cfg.eval_rows},
        "train": {"output_dir": str(run_dir), "max_steps": steps, "micro_batch_size": 8,
                  "grad_accum_steps": max(1, cfg.rows_per_step // 8),
                  "learning_rate": cfg.learning_rate, "warmup_ratio": 0.1, "logging_steps": 1,
                  "eval_steps": cfg.eval_steps, "save_steps": steps + 1, "tensorboard": False},
    }
    for section, kv in sections.items():
        values[section] = {**values.get(section, {}), **kv}
    return config_from_dict(values)


# --- 1. feasibility -----------------------------------------------------------------------------


def _step_shape(run: RunConfig, mb: int, seq: int, r: int, ckpt: bool, bits: int):
    from qlora_lab.plan import step_shape

    return replace(step_shape(run), micro_batch_size=mb, seq_len=seq, lora_r=r,
                   gradient_checkpointing=ckpt, bits=bits)


def feasibility(lab: Lab) -> dict:
    from qlora_lab.plan import model_shape

    cfg = lab.cfg
    shape = model_shape(cfg.speed_model)
    run = base_run(cfg, lab.run_dir("x"), cfg.speed_model, 1)
    grid = []
    for bits in (4, 16):
        for ckpt in (True, False):
            for r in cfg.ranks:
                for seq in cfg.seq_lens:
                    for mb in cfg.micro_batches:
                        plan = memory.estimate_peak_memory(
                            shape, _step_shape(run, mb, seq, r, ckpt, bits))
                        grid.append({"bits": bits, "gradient_checkpointing": ckpt, "lora_r": r,
                                     "seq_len": seq, "micro_batch_size": mb,
                                     "predicted_peak_allocated_bytes": plan.peak_allocated_bytes,
                                     "predicted_peak_reserved_bytes": plan.peak_reserved_bytes,
                                     "fits": plan.peak_reserved_bytes <= cfg.budget_bytes})
    result = {"model": cfg.speed_model, "budget_bytes": cfg.budget_bytes, "grid": grid,
              "rule": "fits = predicted peak reserved (allocated x the allocator's measured "
                      "reserve ratio) <= budget; the CUDA context is excluded"}
    if lab.device != "cuda":
        result["measured_skipped"] = ("measured confirmation needs CUDA "
                                      "(torch.cuda.max_memory_allocated); this run had none, so "
                                      "the map shows predictions only")
        return result
    jobs = []
    for point in _measure_subset(grid, cfg.measure_configs):
        rid = (f"feasibility/{point['bits']}bit-r{point['lora_r']}-seq{point['seq_len']}-"
               f"mb{point['micro_batch_size']}-ckpt{int(point['gradient_checkpointing'])}")
        data = long_rows_file(lab.out / "runs" / f"long-rows-{point['seq_len']}.jsonl",
                              rows=point["micro_batch_size"] * cfg.measure_steps + 8,
                              chars=6 * point["seq_len"])
        run = base_run(cfg, lab.run_dir(rid), cfg.speed_model, cfg.measure_steps,
                       quant={"bits": point["bits"]}, lora={"r": point["lora_r"]},
                       data={"source": str(data), "eval_source": None, "eval_fraction": 0.0,
                             "max_seq_len": point["seq_len"]},
                       train={"micro_batch_size": point["micro_batch_size"],
                              "grad_accum_steps": 1,
                              "gradient_checkpointing": point["gradient_checkpointing"]})
        point["run_id"] = rid
        jobs.append((rid, run, {"section": "feasibility", **{k: point[k] for k in (
            "bits", "lora_r", "seq_len", "micro_batch_size", "gradient_checkpointing")}}))
    lab.train_many(jobs, cfg.budget_bytes, cfg.workers)
    result["measured"] = [
        {"run_id": rid, "predicted_peak_allocated_bytes": p["predicted_peak_allocated_bytes"],
         "predicted_fits": p["fits"], "status": lab.runs[rid]["status"],
         "peak_allocated_bytes": lab.runs[rid]["peak_allocated_bytes"]}
        for rid, p in ((p["run_id"], p) for p in grid if "run_id" in p)]
    return result


def _measure_subset(grid: list[dict], n: int) -> list[dict]:
    """Fitting 4-bit points spread over the predicted range, plus the smallest misfit."""
    fits = sorted((p for p in grid if p["fits"] and p["bits"] == 4),
                  key=lambda p: p["predicted_peak_allocated_bytes"])
    misfits = sorted((p for p in grid if not p["fits"] and p["bits"] == 4),
                     key=lambda p: p["predicted_peak_allocated_bytes"])
    k = max(0, n - (1 if misfits else 0))
    picked = [fits[round(i * (len(fits) - 1) / max(1, k - 1))] for i in range(k)] if fits else []
    return list({id(p): p for p in picked + misfits[:1]}.values())


# --- 2. throughput vs accessibility --------------------------------------------------------------


def throughput(lab: Lab) -> dict:
    # What `train --budget` picks (it reads the rows: their bins when packed, their masks).
    from qlora_lab.train import budget_rows, fit_to_card

    cfg, points, jobs, rows = lab.cfg, [], [], None
    for budget in cfg.budgets_bytes:
        rid = f"throughput/{budget / GIB:.3g}GiB" if budget >= GIB else f"throughput/{budget // MIB}MiB"
        want = base_run(cfg, lab.run_dir(rid), cfg.speed_model, cfg.throughput_steps,
                        data={"max_seq_len": cfg.throughput_seq_len},
                        train={"micro_batch_size": cfg.rows_per_step, "grad_accum_steps": 1})
        try:
            rows = rows or budget_rows(want)  # every budget's run trains the same rows
            run, best, _ = fit_to_card(want, budget, rows)
        except UserError as exc:
            points.append({"budget_bytes": budget, "skipped": str(exc)})
            continue
        describe = {"section": "throughput", "budget_bytes": budget,
                    "micro_batch_size": best.micro_batch_size,
                    "grad_accum_steps": run.train.grad_accum_steps,
                    "gradient_checkpointing": best.gradient_checkpointing,
                    "predicted_peak_allocated_bytes": best.peak_allocated_bytes}
        points.append({"budget_bytes": budget, "run_id": rid})
        jobs.append((rid, run, describe))
    for rid, run, describe in jobs:
        if lab.device == "cuda":
            # One at a time (concurrent runs would share the GPU's time), each in its own
            # process capped to its budget.
            lab.train_many([(rid, run, describe)], describe["budget_bytes"], workers=1)
        else:
            lab.train(rid, run, describe)  # CPU: no cap to apply; the budget picks the config
    done = [p for p in points if "run_id" in p and lab.runs[p["run_id"]]["status"] == "ok"]
    finals = [lab.runs[p["run_id"]]["eval_loss"] for p in done]
    target = cfg.target_eval_loss if cfg.target_eval_loss is not None else max(finals, default=None)
    for p in done:
        rec = lab.runs[p["run_id"]]
        reached = [e for e in rec["evals"] if target is not None and e["eval_loss"] <= target]
        p.update(micro_batch_size=rec["micro_batch_size"], grad_accum_steps=rec["grad_accum_steps"],
                 gradient_checkpointing=rec["gradient_checkpointing"],
                 tokens_per_s=rec["tokens_per_s"], eval_loss=rec["eval_loss"],
                 peak_allocated_bytes=rec["peak_allocated_bytes"],
                 time_to_target_s=reached[0]["seconds"] if reached else None)
    front = pareto_front([(p["budget_bytes"], p["tokens_per_s"]) for p in done])
    for p, on in zip(done, front):
        p["pareto"] = on
    return {"model": cfg.speed_model, "seq_len": cfg.throughput_seq_len,
            "rows_per_step": cfg.rows_per_step, "steps": cfg.throughput_steps,
            "target_eval_loss": target,
            "target_rule": ("given" if cfg.target_eval_loss is not None else
                            "the highest final eval loss among the budgets' runs, so every "
                            "budget reaches it"),
            "capped": lab.device == "cuda", "points": points}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """(cost, value) pairs: on the front if no other point costs <= and gives >=, one strictly."""
    def dominated(c, v):
        return any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for c2, v2 in points)
    return [not dominated(c, v) for c, v in points]


# --- 3. memory vs stability ----------------------------------------------------------------------


def stability(lab: Lab) -> dict:
    cfg = lab.cfg
    optimizers = [o for o in cfg.optimizers if lab.device == "cuda" or o not in CUDA_ONLY_OPTIMIZERS]
    skipped = {o: "bitsandbytes' 8-bit and paged optimizers need CUDA; this run had none"
               for o in cfg.optimizers if o not in optimizers}
    jobs = []
    for lr in cfg.learning_rates:
        for quant in cfg.quant_variants:
            for opt in optimizers:
                for seed in cfg.seeds:
                    rid = f"stability/lr{lr:g}-{quant}-{opt}-seed{seed}"
                    run = base_run(cfg, lab.run_dir(rid), cfg.model, cfg.stability_steps,
                                   quant=QUANT_VARIANTS[quant],
                                   train={"learning_rate": lr, "optimizer": opt, "seed": seed,
                                          "eval_steps": cfg.stability_steps})
                    jobs.append((rid, run, {"section": "stability", "learning_rate": lr,
                                            "quant": quant, "optimizer": opt, "seed": seed}))
    if lab.device == "cuda":
        lab.train_many(jobs, cfg.budget_bytes, cfg.workers)
    else:
        for job in jobs:
            lab.train(*job)
    points = []
    for rid, _, d in jobs:
        rec = lab.runs[rid]
        losses = rec["train_losses"]
        spike = bool(losses) and max(losses) > cfg.spike_factor * losses[0]
        reason = "nan" if rec["status"] == "nan" else "spike" if spike else None
        points.append({"run_id": rid, **{k: d[k] for k in ("learning_rate", "quant",
                                                         "optimizer", "seed")},
                       "eval_loss": rec["eval_loss"], "diverged": reason is not None,
                       "divergence": reason})
    summary = []
    for lr in cfg.learning_rates:
        for quant in cfg.quant_variants:
            for opt in optimizers:
                group = [p for p in points if (p["learning_rate"], p["quant"], p["optimizer"])
                         == (lr, quant, opt)]
                ok = [p["eval_loss"] for p in group if p["eval_loss"] is not None]
                summary.append({"learning_rate": lr, "quant": quant, "optimizer": opt,
                                "runs": len(group), "diverged": sum(p["diverged"] for p in group),
                                "mean_eval_loss": statistics.fmean(ok) if ok else None,
                                "run_ids": [p["run_id"] for p in group]})
    return {"model": cfg.model, "steps": cfg.stability_steps, "spike_factor": cfg.spike_factor,
            "rule": (f"diverged = training stopped on a NaN/inf loss, or a logged training loss "
                     f"exceeded {cfg.spike_factor:g} x the first step's loss"),
            "optimizers_skipped": skipped, "points": points, "summary": summary}


# --- 4. adapter indirection and 5. quality ------------------------------------------------------


def quality_run(lab: Lab) -> str:
    cfg = lab.cfg
    rid = "quality/fine-tune"
    lab.train(rid, base_run(cfg, lab.run_dir(rid), cfg.model, cfg.quality_steps,
                            train={"eval_steps": cfg.quality_steps}),
              {"section": "quality", "learning_rate": cfg.learning_rate})
    if lab.runs[rid]["status"] != "ok":
        raise UserError(f"the fine-tune for sections 4-5 stopped: {lab.runs[rid]['error']}")
    return rid


def quality(lab: Lab, train_id: str) -> dict:
    from qlora_lab.evaluate import EvalConfig, run_eval

    cfg = lab.cfg
    report = run_eval(EvalConfig(adapter=lab.runs[train_id]["run_dir"], data=cfg.eval_data,
                                 compare_base=True, max_rows=cfg.eval_rows,
                                 max_new_tokens=cfg.max_new_tokens,
                                 output_dir=str(lab.run_dir("quality/eval"))))
    lab.add("quality/eval", {"kind": "eval", "section": "quality", "command": report["command"],
                             "models": report["models"], "wall_seconds": report["wall_seconds"]})
    return {"run_id": "quality/eval", "train_run_id": train_id, "models": report["models"],
            "rows": report["rows"], "table": report["table"]}


def indirection(lab: Lab, train_id: str) -> dict:
    from qlora_lab.evaluate import EvalConfig, load_eval_rows
    from qlora_lab.generate import GenerateConfig, load_for_inference
    from qlora_lab.merge import MergeConfig, run_merge

    cfg = lab.cfg
    adapter = lab.runs[train_id]["run_dir"]
    merged = lab.run_dir("indirection/merged")
    shutil.rmtree(merged, ignore_errors=True)
    merge_report = run_merge(MergeConfig(adapter=adapter, output_dir=str(merged)))
    rows, _ = load_eval_rows(EvalConfig(data=cfg.eval_data, model=cfg.model,
                                          max_rows=max(cfg.batch_sizes)))
    prompts = [rows[i % len(rows)].prompt for i in range(max(cfg.batch_sizes))]
    variants = {
        "4-bit base alone": GenerateConfig(model=cfg.model),
        "4-bit base + unmerged adapter": GenerateConfig(adapter=adapter),
        "merged 16-bit": GenerateConfig(model_dir=str(merged)),
        # a dir passed as --model loads quantized to 4-bit, like any base
        "merged, re-quantized to 4-bit": GenerateConfig(model=str(merged)),
    }
    points = []
    for name, gen_cfg in variants.items():
        log.info("lab: generation timing, %s", name)
        loaded = load_for_inference(gen_cfg)
        for batch in cfg.batch_sizes:
            rid = f"indirection/{name}/batch{batch}"
            measured = time_generation(loaded, prompts[:batch], cfg.decode_tokens, cfg.repeats)
            lab.add(rid, {"kind": "generate", "section": "indirection", "variant": name,
                          "batch_size": batch, **measured})
            points.append({"run_id": rid, "variant": name, "batch_size": batch, **measured})
        del loaded
        free_memory()
    return {"model": cfg.model, "merge": merge_report, "decode_tokens": cfg.decode_tokens,
            "repeats": cfg.repeats, "points": points}


# --- the whole lab -------------------------------------------------------------------------------


SCRATCH_MARK = ".qlora-lab-lab-scratch"  # in runs/: this folder is the lab's to delete
SCRATCH_IGNORE = "*\n"  # runs/.gitignore: scratch is never meant for version control


def _prepare_output_dir(out: Path, cfg: LabConfig) -> bool:
    """Make `out` ready; True when it holds an interrupted run of this same lab to continue.

    A lab replaces its own earlier report and scratch runs, nothing else: `out` must be empty or
    hold a lab's report.json, and `out/runs` is deleted only when the lab's mark says it made it
    (users keep their own training runs in a `runs/` folder too).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} is a file — pass another --output-dir")
    if out.is_dir() and any(out.iterdir()) and _lab_report(out / "report.json") is None:
        raise UserError(f"output dir {out} holds files that no lab run wrote — pass an empty or "
                        "new --output-dir")
    runs = out / "runs"
    if os.path.lexists(runs) and not _lab_scratch(runs):
        raise UserError(f"{runs} was not written by a lab run (it has no {SCRATCH_MARK}) — "
                        "move it away, or pass an empty or new --output-dir")
    continuing = _interrupted_here(out, cfg)
    try:
        if not continuing:
            shutil.rmtree(runs, ignore_errors=True)  # scratch of an earlier lab run
        runs.mkdir(parents=True, exist_ok=True)
        (runs / SCRATCH_MARK).write_text("scratch runs of `qlora-lab lab`; deleted by the next "
                                         "lab run into this folder\n", encoding="utf-8")
        (runs / ".gitignore").write_text(SCRATCH_IGNORE, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"output dir {out} cannot be written ({exc.strerror}) — pass another "
                        "--output-dir") from None
    return continuing


def _lab_report(path: Path) -> dict | None:
    """The report a lab wrote at `path` (its `config` and `complete` keys), else None."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    if (isinstance(report, dict) and isinstance(report.get("config"), dict)
            and isinstance(report.get("complete"), bool)):
        return report
    return None


def _lab_scratch(runs: Path) -> bool:
    """Whether `runs` is a lab's scratch folder (labs before the mark left only .gitignore)."""
    if runs.is_symlink() or not runs.is_dir():
        return False
    if (runs / SCRATCH_MARK).is_file():
        return True
    try:
        return (runs / ".gitignore").read_text(encoding="utf-8") == SCRATCH_IGNORE
    except (OSError, ValueError):
        return False


def _interrupted_here(out: Path, cfg: LabConfig) -> bool:
    """Whether out/report.json is an unfinished run of the same settings (the command aside)."""
    earlier = _lab_report(out / "report.json")
    if earlier is None:
        return False
    same = _settings(earlier.get("config", {})) == _settings(dataclasses.asdict(cfg))
    return earlier.get("complete") is False and same


def _settings(config: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(config, default=str)).items()
            if k != "command"}


def _check_inputs(cfg: LabConfig) -> None:
    from qlora_lab.models import resolve_model_path
    from qlora_lab.sources import read_rows

    for path in (cfg.data, cfg.eval_data):
        read_rows(path)  # a wrong path or format fails now, not after minutes of runs
    for name in (cfg.model, cfg.speed_model):
        # Builds a preset's cache (GGUF conversion, tiny-random) once, here, rather than in
        # each of several concurrent run processes.
        resolve_model_path(name)


def run_lab(cfg: LabConfig) -> dict:
    """Run every section, then write report.json, report.md, report.html and the plots."""
    from qlora_lab import lab_report
    from qlora_lab.models import resolve_device

    started = time.perf_counter()
    _check_inputs(cfg)
    out = Path(cfg.output_dir)
    continuing = _prepare_output_dir(out, cfg)
    device = resolve_device("auto")
    lab = Lab(cfg, out, device, reuse=continuing)
    versions, hardware = child.versions(("matplotlib",)), child.hardware()
    report = {"command": cfg.command, "complete": False, "device": device,
              "config": dataclasses.asdict(cfg), "versions": versions, "hardware": hardware,
              "stage_seconds": {}, "runs": lab.runs}
    _write_partial(report)  # from now on, a rerun of the same command can continue this one
    try:
        _run_sections(report, lab)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        # An inner run's own message would advise `train --resume` for its scratch dir, which
        # does not continue the lab.
        raise TrainingInterrupted(_interrupted_message(report, out),
                                  getattr(exc, "exit_code", 130)) from None
    report["wall_seconds"] = time.perf_counter() - started
    report["reused_runs"] = sorted(rid for rid, r in lab.runs.items() if r.get("reused"))
    report["complete"] = True
    lab_report.write_report(report, out)
    report["output_dir"] = str(out)
    return report


def _run_sections(report: dict, lab: Lab) -> None:
    report["feasibility"] = _stage(report, "feasibility", lambda: feasibility(lab))
    report["throughput"] = _stage(report, "throughput", lambda: throughput(lab))
    # Sections 3-5 run in this process: on CUDA it plays the emulated card.
    child.apply_memory_cap(lab.cfg.budget_bytes if lab.device == "cuda" else None)
    report["stability"] = _stage(report, "stability", lambda: stability(lab))
    train_id = _stage(report, "fine-tune", lambda: quality_run(lab))
    report["indirection"] = _stage(report, "indirection", lambda: indirection(lab, train_id))
    report["quality"] = _stage(report, "quality", lambda: quality(lab, train_id))


STAGES = ("feasibility", "throughput", "stability", "fine-tune", "indirection", "quality")


def _interrupted_message(report: dict, out: Path) -> str:
    done = [s for s in STAGES if s in report["stage_seconds"]]
    stopped_in = STAGES[len(done)] if len(done) < len(STAGES) else "the report"
    kept = (f"the sections finished so far ({', '.join(done)}) are in {out}/report.json "
            '("complete": false)' if done else "no section had finished")
    return (f"lab stopped by a signal during {stopped_in}; {kept} — run the same command again "
            "to continue: the runs that finished are reused, the rest run")


def _stage(report: dict, name: str, fn):
    log.info("lab: %s ...", name)
    start = time.perf_counter()
    result = fn()
    report["stage_seconds"][name] = round(time.perf_counter() - start, 1)
    log.info("lab: %s done in %.1f s", name, report["stage_seconds"][name])
    # The numbers so far survive a later stage's failure or a killed run ("complete": false).
    _write_partial({**report, name: result} if isinstance(result, dict) else report)
    return result


def _write_partial(report: dict) -> None:
    fsio.write_text(Path(report["config"]["output_dir"]) / "report.json",
                    json.dumps(report, indent=2, default=str) + "\n")
