"""`qlora-lab bench`: the plain HF QLoRA recipe and qlora-lab's own, side by side.

One invocation trains each recipe for the same number of optimizer steps (the plain recipe may
be given fewer: `plain_steps`) on the same rows with the same seed, each in its own Python
process (peak-memory counters, CUDA caching allocator state and any library patching cannot leak
from one recipe into the next), and writes:

    bench.json   `complete` and `pending` (rewritten after each recipe, so a stopped bench keeps
                 what it measured), `speedup` (qlora_lab / plain real tokens/s, the plain recipe's median)
                 and, under `recipes`, one entry per recipe (`plain`, `qlora_lab`, `unsloth`,
                 `unsloth_packed`) with `real_tokens_per_s`, `peak_allocated_bytes` (null on
                 CPU), step time, MFU, ...; `plain_runs`, each plain run's real tokens/s, and
                 `peer_runs`, each peer run's (by recipe); plus the command, library versions
                 and hardware
    bench.md     the same as a Markdown table

Recipes:
- `plain`: what a typical HF QLoRA train.py does, as the original demo did: peft's
  `prepare_model_for_kbit_training` (every non-quantized weight upcast to fp32, and its default
  gradient checkpointing), fp32 LoRA weights, padded batches, micro-batch 4, Trainer. Its speed
  varies most from run to run, so it runs `plain_runs` times and reports the median, min and max.
- `qlora_lab`: exactly `qlora-lab train` (train.setup_training), no eval, no checkpoints.
- `unsloth` and `unsloth_packed`: only when the package is importable and CUDA is there, in
  bench_peer.py, with unsloth's own recommended settings: padded batches of
  `peer_micro_batch_size` rows, accumulated to the rows of ours per optimizer step, and its own
  sample packing (TRL's packing, padding-free) with `peer_micro_batch_size` bins per
  micro-batch and step. Where the packed path lacks the variable-length
  attention kernels it is fastest with, its entry says so (`host_lacks`). Their rate moved 7 %
  between calls on one H200 model (55-62k tok/s on the same full rows), so `peer_runs` > 1
  runs each that many times and reports the median, min and max, as for the plain recipe.

With `context_lengths`, each recipe that supports it (ours, unsloth) also searches the longest
single row (micro-batch 1) that trains two optimizer steps under the cap, shortest first.

"Real" tokens are non-padding tokens (the attention mask's sum, counted by Trainer; every token
of a padding-free batch), timed over the steps after `warmup_steps`: on CUDA, between events recorded on
the GPU's stream at each step's end (step_timer). Every process is started through child.run_child.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import logging
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_lab import child, fsio
from qlora_lab.config import MAX_SEQ_LEN, RunConfig, config_from_dict, to_dict
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

OUR_RECIPES = ("plain", "qlora_lab")  # run by this module, in child processes
PEER_RECIPES = ("unsloth", "unsloth_packed")  # run by bench_peer.py
RECIPES = OUR_RECIPES + PEER_RECIPES
# Versions recorded with each peer entry: unsloth, and what its packed path runs on.
PEER_PACKAGES = ("unsloth", "unsloth_zoo", "trl", "flash-attn", "xformers")
GIB = 1024**3


@dataclass(frozen=True)
class BenchConfig:
    """One `qlora-lab bench` run.

    run: model, data, quantization, LoRA and training settings, resolved as for `train`; the
        `qlora_lab` recipe uses them unchanged (evaluation and checkpoints are switched off).
    output_dir: where bench.json, bench.md and each recipe's scratch run dir go.
    steps: optimizer steps per recipe (each is micro-batch x grad_accum_steps rows).
    warmup_steps: steps run before the clock starts (allocator growth, kernel selection, and
        with train.compile the compilation: the loss check compiles the layers for two shapes
        without grad, which makes the bin count dynamic, and step 1 compiles them for training;
        the H200 runs were steady from step 2).
    memory_cap_bytes: emulated card size on CUDA via `set_per_process_memory_fraction`
        (None = the whole card); ignored on CPU.
    plain_micro_batch_size: the plain recipe's micro-batch (the original demo used 4).
    plain_runs: how many times the plain recipe runs (each in its own process); it reports the
        median real tokens/s, with min and max. More runs, a steadier baseline, more time.
    plain_steps: the plain recipe's optimizer steps (None = `steps`). It compiles nothing and
        each of its steps is many micro-batches (4 rows each), so a few steps measure it; at 160
        rows per step on the H200 its 3 runs took most of a 10-minute call at 4 steps, which
        left ours and the peers 2 timed steps.
    peer_micro_batch_size: unsloth's micro-batch: rows padded (`unsloth`), or bins of
        max_seq_len tokens (`unsloth_packed`). Pick the largest that fits the cap (bigger =
        faster until it runs out of memory).
    peer_runs: how many times each unsloth recipe runs (each in its own process); above 1 its
        entry is the median run's, with min and max. A peer that is skipped (not installed, no
        CUDA) or fails is not run again.
    recipes: which recipes to run; the unsloth ones are skipped (and say why) where unsloth is
        not importable or there is no CUDA.
    context_lengths: row lengths for the max-context search; empty = no search.
    peak_flops: the peak FLOP/s MFU is measured against; 989e12 is the H100/H200 SXM dense bf16
        spec. MFU is reported only on CUDA.
    command: the command line, recorded in bench.json.
    """

    run: RunConfig = field(default_factory=RunConfig)
    output_dir: str = "bench"
    steps: int = 20
    warmup_steps: int = 2
    memory_cap_bytes: int | None = 8 * GIB
    plain_micro_batch_size: int = 4
    plain_runs: int = 3
    plain_steps: int | None = None
    peer_micro_batch_size: int = 32
    peer_runs: int = 1
    recipes: tuple[str, ...] = RECIPES
    context_lengths: tuple[int, ...] = ()
    peak_flops: float = 989e12
    command: str = ""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be 0 or more")
        if self.steps <= self.warmup_steps:
            raise UserError(f"--steps {self.steps} must exceed the {self.warmup_steps} warmup "
                            f"steps — pass --steps {self.warmup_steps + 1} or more")
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise UserError(f"--memory-cap {self.memory_cap_bytes} must be positive")
        if self.plain_steps is not None and self.plain_steps <= self.warmup_steps:
            raise UserError(f"--plain-steps {self.plain_steps} must exceed the "
                            f"{self.warmup_steps} warmup steps — pass --plain-steps "
                            f"{self.warmup_steps + 1} or more")
        for flag, runs in (("--plain-runs", self.plain_runs), ("--peer-runs", self.peer_runs)):
            if runs < 1:
                raise UserError(f"{flag} {runs} must be at least 1 (3 or more for a median "
                                "that one slow run cannot move)")
        for length in self.context_lengths:
            # data.max_seq_len's range: checked now, not after the first recipe's minutes.
            if not 8 <= length <= MAX_SEQ_LEN:
                raise UserError(f"--context-lengths {length} is out of range — give lengths "
                                f"from 8 to {MAX_SEQ_LEN} tokens")
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown or not self.recipes:
            raise UserError(f"--recipes {','.join(self.recipes)}: unknown {unknown} — pick from "
                            f"{', '.join(RECIPES)}")


# --- the parent: run each recipe in a child process, then report --------------------------------


def run_bench(cfg: BenchConfig) -> dict:
    """Run every recipe in its own process; write bench.json and bench.md; return the report.

    bench.json is rewritten (atomically) after each recipe's process ends, with `complete`
    false and the recipes still to run under `pending`, so a bench stopped by a time limit
    keeps what it measured. Ours runs first (a user error or OOM fails there, before the
    long plain runs), then the peers, then the plain recipe.
    """
    from qlora_lab.sources import check_sources

    check_sources(cfg.run.data)  # a wrong --data or data.mix fails here, before any process starts
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output dir {out} cannot be created ({exc.strerror}) — pick another "
                        "--output-dir") from None
    recipes: dict[str, dict] = {}
    plain: list[dict] = []
    contexts: dict[str, dict] = {}
    searches = [r for r in ("qlora_lab", "unsloth") if cfg.context_lengths and r in cfg.recipes]
    peers: dict[str, list[dict]] = {}  # each peer recipe's runs that measured
    pending = ["qlora_lab"] if "qlora_lab" in cfg.recipes else []
    pending += [f"{r}-{i}" for r in PEER_RECIPES if r in cfg.recipes
                for i in range(cfg.peer_runs)]
    pending += [f"plain-{i}" for i in range(cfg.plain_runs) if "plain" in cfg.recipes]
    pending += [f"max_context:{r}" for r in searches]

    versions = child.versions()

    def publish(done: str | None) -> dict:
        """Write bench.json after `done` ran; None = all ran (the final report)."""
        if done is not None:
            pending.remove(done)
        report = _report(cfg, recipes, plain, peers, contexts, pending, versions,
                         # Asking for the GPU's name starts CUDA in this process, whose context
                         # would then hold GPU memory while the next recipes measure: only once
                         # every recipe ran (each recipe's entry names its `device` meanwhile).
                         hardware=child.hardware() if done is None else None)
        fsio.write_text(out / "bench.json", json.dumps(report, indent=2) + "\n")
        return report

    if "qlora_lab" in cfg.recipes:
        recipes["qlora_lab"] = run_ours(cfg, out, "qlora_lab")
        publish("qlora_lab")
    for name in PEER_RECIPES:
        if name not in cfg.recipes:
            continue
        for i in range(cfg.peer_runs):
            result = run_peer(cfg, out, name, label=f"-{i}" if cfg.peer_runs > 1 else "")
            if "skipped" in result or "error" in result:
                # Skipped stays skipped; a failure would likely fail again, for minutes each.
                recipes[name] = result if name not in peers else {
                    **recipes[name], "run_errors": [result.get("error", result.get("skipped"))]}
                for rest in range(i + 1, cfg.peer_runs):
                    pending.remove(f"{name}-{rest}")
                publish(f"{name}-{i}")
                break
            peers.setdefault(name, []).append(result)
            recipes[name] = median_entry(peers[name]) if cfg.peer_runs > 1 else result
            publish(f"{name}-{i}")
    for i in range(cfg.plain_runs if "plain" in cfg.recipes else 0):
        plain.append(run_ours(cfg, out, "plain", label=f"-{i}"))
        recipes["plain"] = median_entry(plain)
        publish(f"plain-{i}")
    for name in searches:
        if name == "qlora_lab":
            contexts[name] = run_ours(cfg, out, name, mode="max_context")
        elif "skipped" not in recipes["unsloth"]:
            contexts[name] = run_peer(cfg, out, name, mode="max_context")
        publish(f"max_context:{name}")
    report = publish(None)
    report["table"] = format_table(report)
    fsio.write_text(out / "bench.md", report["table"])
    report["output_dir"] = str(out)
    return report


def _report(cfg: BenchConfig, recipes: dict, plain: list[dict], peers: dict[str, list[dict]],
            contexts: dict, pending: list[str], versions: dict, hardware: dict | None) -> dict:
    """bench.json's content so far; recipes in display order (plain, ours, the peers)."""
    return {
        "complete": not pending,
        "pending": list(pending),
        "speedup": _ratio(recipes, "qlora_lab", "plain"),
        "speedup_vs_unsloth": _ratio(recipes, "qlora_lab", "unsloth"),
        "speedup_vs_unsloth_packed": _ratio(recipes, "qlora_lab", "unsloth_packed"),
        "recipes": {name: recipes[name] for name in RECIPES if name in recipes},
        "plain_runs": [r["real_tokens_per_s"] for r in plain],
        "peer_runs": {name: [r["real_tokens_per_s"] for r in runs] for name, runs in peers.items()},
        "max_context": contexts,
        "command": cfg.command,
        "steps": cfg.steps,
        "plain_steps": cfg.plain_steps or cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "memory_cap_bytes": cfg.memory_cap_bytes,
        "peak_flops": cfg.peak_flops,
        "config": to_dict(cfg.run),
        "versions": versions,
        "hardware": hardware,
    }


def _ratio(recipes: dict, top: str, bottom: str) -> float | None:
    a = recipes.get(top, {}).get("real_tokens_per_s")
    b = recipes.get(bottom, {}).get("real_tokens_per_s")
    return a / b if a and b else None


def spec(cfg: BenchConfig, **extra) -> dict:
    """What a recipe's process is given: the bench settings, the run config, and `extra`."""
    return {"bench": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "run"},
            "run": to_dict(cfg.run), **extra}


def bench_config(given: dict) -> BenchConfig:
    """The BenchConfig a `spec` was made from (in the recipe's process)."""
    return BenchConfig(run=config_from_dict(given["run"]), **given["bench"])


def run_ours(cfg: BenchConfig, out: Path, recipe: str, mode: str = "throughput",
             label: str = "") -> dict:
    """One of our recipes in its own process; its failure fails the bench."""
    name = f"{recipe}-{mode}{label}"
    # qlora_lab runs with train's allocator settings (child.CUDA_ALLOCATOR_ENV), as `train`
    # does; plain runs as a typical train.py would, without them.
    env = child.CUDA_ALLOCATOR_ENV if recipe == "qlora_lab" else None
    result = child.run_child("qlora_lab.bench:measure", spec(cfg, recipe=recipe, mode=mode),
                             out / f".{name}", cfg.memory_cap_bytes, env=env)
    if result.outcome in (child.Outcome.USER_ERROR, child.Outcome.OOM):
        hint = (" — lower the micro-batch or max_seq_len, or raise --memory-cap"
                if result.outcome is child.Outcome.OOM else "")
        raise UserError(f"recipe {name}: {result.error}{hint}")
    return result.unwrap()


def median_entry(runs: list[dict]) -> dict:
    """A recipe's entry from its runs so far: the median run's fields, with the median, min and
    max real tokens/s (for an even count, the lower of the two middle runs' fields)."""
    ordered = sorted(runs, key=lambda r: r["real_tokens_per_s"] or 0.0)
    rates = [r["real_tokens_per_s"] or 0.0 for r in ordered]
    return {**ordered[(len(runs) - 1) // 2], "runs": len(runs),
            "real_tokens_per_s": statistics.median(rates),
            "real_tokens_per_s_min": rates[0], "real_tokens_per_s_max": rates[-1]}


def run_peer(cfg: BenchConfig, out: Path, recipe: str, mode: str = "throughput",
             label: str = "") -> dict:
    """An unsloth recipe in its own process (it patches transformers when imported); its
    failure is recorded in bench.json, not fatal."""
    if importlib.util.find_spec("unsloth") is None:
        return {"skipped": "not installed"}
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "unsloth needs CUDA"}
    given = spec(cfg, mode=mode, packed=recipe == "unsloth_packed",
                 micro_batch=cfg.peer_micro_batch_size, lengths=list(cfg.context_lengths))
    result = child.run_child("qlora_lab.bench_peer:run", given, out / f".{recipe}-{mode}{label}",
                             cfg.memory_cap_bytes, packages=PEER_PACKAGES)
    if result.outcome is not child.Outcome.OK:
        return {"error": result.error, "outcome": result.outcome.value,
                "wall_seconds": result.wall_seconds}
    peer_versions = {k: result.versions.get(k) for k in PEER_PACKAGES}
    return {**result.value, "versions": peer_versions, "wall_seconds": result.wall_seconds}


# --- max-context search (shared with the peer's process) ---------------------------------------


def context_run(run: RunConfig, out: Path) -> RunConfig:
    """One long row per step: micro-batch 1, no accumulation, two optimizer steps."""
    train = dataclasses.replace(run.train, output_dir=str(out), micro_batch_size=1,
                                grad_accum_steps=1, max_steps=2, save_steps=3, packing=False,
                                warmup_ratio=0.0)
    return dataclasses.replace(run, train=train)


def context_collator():
    from qlora_lab.data import PadCollator

    return PadCollator(pad_token_id=0)  # one row per batch: nothing is ever padded


def search_max_context(make_trainer, lengths, out: Path, vocab_size: int) -> dict:
    """Train two steps on one random row of each length, shortest first, until one fails.

    Every token is supervised (the worst case for the loss). `make_trainer(rows, out)` returns
    a Trainer over the already-loaded model, so the model loads once per search.
    """
    import gc

    import torch

    cuda = torch.cuda.is_available()
    attempts, longest = [], None
    generator = torch.Generator().manual_seed(0)
    for length in sorted(lengths):
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        trainer = make_trainer([{"input_ids": ids, "labels": ids}], out / f"len-{length}")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            trainer.train()
            if cuda:
                torch.cuda.synchronize()
            attempt = {"tokens": length, "ok": True,
                       "seconds_per_step": (time.perf_counter() - started) / 2,
                       "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                       "final_loss": trainer.state.log_history[-1].get("train_loss")}
            longest = length
        except torch.cuda.OutOfMemoryError:
            attempt = {"tokens": length, "ok": False, "error": "CUDA out of memory"}
        attempts.append(attempt)
        log.info("bench: max-context %s", attempt)
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if not attempt["ok"]:
            break
    return {"longest_tokens": longest, "attempts": attempts}


def our_max_context(cfg: BenchConfig) -> dict:
    """Ours at long context: one row, checkpoints offloaded to host memory, tiled MLP."""
    from qlora_lab.train import build_training_args, setup_training, trainer_class

    out = Path(cfg.output_dir) / "runs" / "qlora_lab-context"
    base = bench_run_config(cfg, "qlora_lab-context")
    base = dataclasses.replace(
        base, data=dataclasses.replace(base.data, max_seq_len=max(cfg.context_lengths)),
        train=dataclasses.replace(base.train, activation_offload=True,
                                  gradient_checkpointing=True))
    session = setup_training(context_run(base, out), overwrite=True)

    def make_trainer(rows, run_out: Path):
        run = context_run(base, run_out)
        args = build_training_args(run, run_out, session.device, session.dtype, has_eval=False,
                                   resuming=False)
        return trainer_class()(model=session.model, args=args, train_dataset=rows,
                                data_collator=context_collator(),
                                head_loss=session.trainer.head_loss)

    return search_max_context(make_trainer, cfg.context_lengths, out,
                              session.model.config.vocab_size)


# --- the child: one recipe in this process ------------------------------------------------------


def step_timer(device: str):
    """A callback that marks the end of every step and Trainer's real-token count there.

    On CUDA a mark is an event recorded on the GPU's stream, not a clock read after a
    synchronize: a sync at each step's end left the GPU idle while the host started the next
    step (Trainer's bookkeeping, the next batch, the first launches), a stall `train` does not
    have, and it charged that stall to every recipe. `marks` (read after training, one
    synchronize) gives (seconds since the start, real tokens seen) per mark.
    """
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self._ends: list[tuple] = []  # (event or clock, real tokens seen) per step end

        def _now(self):
            if device != "cuda":
                return time.perf_counter()
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event

        def on_train_begin(self, args, state, control, **kwargs):
            self._ends = [(self._now(), int(state.num_input_tokens_seen))]

        def on_step_end(self, args, state, control, **kwargs):
            self._ends.append((self._now(), int(state.num_input_tokens_seen)))

        @property
        def marks(self) -> list[tuple[float, int]]:
            if device != "cuda":
                return [(clock - self._ends[0][0], tokens) for clock, tokens in self._ends]
            torch.cuda.synchronize()
            start = self._ends[0][0]
            return [(start.elapsed_time(event) / 1000.0, tokens) for event, tokens in self._ends]

    return StepTimer()


def _param_count(model) -> int:
    """Logical parameters, frozen included: a 4-bit weight stores 2 values per byte."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += int(state.shape.numel()) if state is not None else p.numel()
    return total


def _weight_dtypes(model) -> dict:
    """dtypes of the non-quantized base weights (embeddings, norms, lm_head) and of LoRA."""
    base, lora = set(), set()
    for name, p in model.named_parameters():
        if getattr(p, "quant_state", None) is not None:
            continue
        (lora if "lora_" in name else base).add(str(p.dtype).removeprefix("torch."))
    return {"non_quantized_base": sorted(base), "lora": sorted(lora)}


def _build_plain(cfg: BenchConfig, run: RunConfig, out: Path):
    """The original demo's recipe, from qlora-lab's loading pieces plus peft's upcast."""
    from peft import prepare_model_for_kbit_training
    from transformers import Trainer, set_seed

    from qlora_lab import models
    from qlora_lab.data import PadCollator, prepare_data
    from qlora_lab.train import build_training_args

    device = models.resolve_device(run.train.device)
    dtype = models.resolve_compute_dtype(run.quant, device)
    path = models.resolve_model_path(run.model.name)
    tokenizer = models.load_tokenizer(path, run.model.trust_remote_code)
    data = prepare_data(run.data, tokenizer, run.train.seed)
    set_seed(run.train.seed)
    model = models.load_base_model(path, run.model, run.quant, device)
    models.keep_cpu_4bit_layout(model)  # a CPU correctness fix, not a speed-up
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = models.attach_lora(model, dataclasses.replace(run.lora, weight_dtype="float32"))
    # Padded rows and the model's own loss, as the original train.py had them; accumulation
    # makes its optimizer step hold the same rows as qlora-lab's (the demo's 4 x 4 = 16).
    rows_per_step = run.train.micro_batch_size * run.train.grad_accum_steps
    # The demo's optimizer too: bitsandbytes' paged 8-bit AdamW on CUDA (`train`'s `auto` now
    # means torch's fused AdamW; run 7 of bench_h200_8gib.json ran the plain recipe with it).
    plain_train = dataclasses.replace(
        run.train, micro_batch_size=cfg.plain_micro_batch_size, packing=False, fused_loss=False,
        liger="off", grad_accum_steps=max(1, rows_per_step // cfg.plain_micro_batch_size),
        optimizer="paged_adamw_8bit" if device == "cuda" else "adamw_torch")
    run = dataclasses.replace(run, train=plain_train)
    args = build_training_args(run, out, device, dtype, has_eval=False, resuming=False)
    # And Trainer's own defaults where build_training_args changes them to spare the GPU waits
    # (the NaN filter's read of every loss, blocking batch copies): the demo had them.
    args.logging_nan_inf_filter = True
    args.accelerator_config.non_blocking = False
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      data_collator=PadCollator(tokenizer.pad_token_id))
    return trainer, model, device, cfg.plain_micro_batch_size, run


def _build_qlora_lab(run: RunConfig, out: Path):
    from qlora_lab.train import setup_training

    session = setup_training(run, overwrite=True)
    return session.trainer, session.model, session.device, run.train.micro_batch_size, run


def bench_run_config(cfg: BenchConfig, recipe: str) -> RunConfig:
    """The run every recipe trains: every row trains (no held-out split), no eval, no saves."""
    out = Path(cfg.output_dir) / "runs" / recipe
    data = dataclasses.replace(cfg.run.data, eval_fraction=0.0, eval_source=None)
    steps = cfg.plain_steps if recipe == "plain" and cfg.plain_steps else cfg.steps
    train = dataclasses.replace(cfg.run.train, output_dir=str(out), max_steps=steps,
                                save_steps=steps + 1, tensorboard=False)
    return dataclasses.replace(cfg.run, data=data, train=train)


def measure(given: dict) -> dict:
    """A recipe's process (child.run_child's target): train it here and measure it."""
    cfg = bench_config(given)
    if given["mode"] == "max_context":
        return our_max_context(cfg)
    return run_recipe(cfg, given["recipe"])


def run_recipe(cfg: BenchConfig, recipe: str) -> dict:
    """Train one recipe in this process and measure it (call in a fresh process)."""
    import torch

    from qlora_lab import models

    run = bench_run_config(cfg, recipe)
    device = models.resolve_device(run.train.device)
    if recipe == "plain":
        trainer, model, device, micro_batch, run = _build_plain(cfg, run,
                                                                Path(run.train.output_dir))
    else:
        trainer, model, device, micro_batch, run = _build_qlora_lab(run,
                                                                    Path(run.train.output_dir))
    check = loss_check(trainer) if recipe == "qlora_lab" and run.train.packing else None
    timer = step_timer(device)
    trainer.add_callback(timer)
    if device == "cuda":
        # The loss check's padded pass leaves blocks cached; without this they would count in
        # the reserved peak (more than twice the allocated peak, as once measured).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    result = measurement(cfg, recipe, timer.marks, model, device, micro_batch, run)
    if check is not None:
        result["loss_check"] = check
    return result


def loss_check(trainer, rows: int = 8) -> dict:
    """The fast path's loss on the first rows, packed, against the model's own loss on them
    padded: the two must agree within the compute dtype's noise (run before training)."""
    import torch

    from qlora_lab.attention import sdpa_instead
    from qlora_lab.data import PadCollator

    first = [trainer.train_dataset[i] for i in range(min(rows, len(trainer.train_dataset)))]
    pad = trainer.data_collator.pad_token_id
    device = trainer.args.device
    model = trainer.model
    model.eval()  # no dropout: both sides see the same network
    with torch.no_grad():
        packed = trainer.data_collator(first)  # the collator training uses
        fast = trainer.compute_loss(model, trainer._prepare_inputs(packed))
        padded = {k: v.to(device) for k, v in PadCollator(pad)(first).items()}
        with sdpa_instead(model):  # padded rows have no row bounds for varlen attention
            plain = model(**padded).loss
    model.train()
    return {"rows": len(first), "fast_path_loss": float(fast), "plain_loss": float(plain),
            "abs_diff": abs(float(fast) - float(plain))}


def measurement(cfg: BenchConfig, recipe: str, marks: list, model, device: str,
                micro_batch: int, run: RunConfig) -> dict:
    """A recipe's bench.json entry from its step marks (step_timer) and its model."""
    import torch

    steps = len(marks) - 1
    (t0, tok0), (t1, tok1) = marks[cfg.warmup_steps], marks[-1]
    timed_steps, seconds, tokens = steps - cfg.warmup_steps, t1 - t0, tok1 - tok0
    tokens_per_s = tokens / seconds if seconds > 0 else None
    n_params = _param_count(model)
    # MFU by the 6N rule: training costs ~6 FLOPs per parameter per token (2 forward, 4
    # backward), attention ignored (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B;
    # nanoGPT's estimate_mfu). Frozen weights count: their backward still computes input grads.
    # Recomputation by gradient checkpointing is not counted, as in PaLM's definition.
    mfu = (tokens_per_s * 6 * n_params / cfg.peak_flops
           if device == "cuda" and tokens_per_s else None)
    result = {
        "recipe": recipe,
        "steps": steps,
        "timed_steps": timed_steps,
        "micro_batch_size": micro_batch,
        "grad_accum_steps": run.train.grad_accum_steps,
        "real_tokens_total": marks[-1][1] - marks[0][1],
        "real_tokens_timed": tokens,
        "timed_seconds": seconds,
        "real_tokens_per_s": tokens_per_s,
        "mean_step_seconds": seconds / timed_steps,
        # Every step's wall time and real tokens, warm-up included: a step that compiled (or
        # recompiled for a new shape) stands out here, where the mean hides it.
        "step_seconds": [round(b[0] - a[0], 4) for a, b in itertools.pairwise(marks)],
        "step_real_tokens": [b[1] - a[1] for a, b in itertools.pairwise(marks)],
        "param_count": n_params,
        "mfu": mfu,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "weight_dtypes": _weight_dtypes(model),
        "peak_allocated_bytes": None,
        "peak_reserved_bytes": None,
        # ru_maxrss is in KiB on Linux; this process ran only this recipe.
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_memory_kind": "cuda_allocated" if device == "cuda" else "host_rss",
    }
    if device == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return result


# --- reporting ----------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    lines = ["| recipe | real tok/s | step s | peak memory | MFU | non-quantized weights |",
             "|---|---:|---:|---:|---:|---|"]
    notes = []
    for name, r in report["recipes"].items():
        if "skipped" in r or "error" in r:
            why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error']}"
            lines.append(f"| {name} | {why} | | | | |")
            continue
        if r["peak_allocated_bytes"] is not None:
            peak = f"{r['peak_allocated_bytes'] / GIB:.2f} GiB allocated"
        else:
            peak = f"{r['peak_host_rss_bytes'] / GIB:.2f} GiB host RSS"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        dtypes = ", ".join(r["weight_dtypes"]["non_quantized_base"])
        lines.append(f"| {name} | {_fmt(r['real_tokens_per_s'], ',.0f')} | "
                     f"{r['mean_step_seconds']:.3f} | {peak} | {mfu} | {dtypes} |")
        if "runs" in r:
            notes.append(f"{name}: median of {r['runs']} runs, min "
                         f"{r['real_tokens_per_s_min']:,.0f}, max {r['real_tokens_per_s_max']:,.0f}")
        if r.get("host_lacks"):
            notes.append(f"{name}: this host lacks {', '.join(r['host_lacks'])} (its packed "
                         "attention's fast kernels)")
    lines.append("")
    lines += notes
    # One line per baseline that ran (a peer-only run has no plain recipe to divide by).
    for key, peer in (("speedup", "plain"), ("speedup_vs_unsloth", "unsloth"),
                      ("speedup_vs_unsloth_packed", "unsloth_packed")):
        if report.get(key) is not None:
            lines.append(f"speedup (qlora_lab / {peer} real tok/s): {report[key]:.2f}x")
    lines.append("")
    return "\n".join(lines)
