"""`qlora-lab bench`: the plain HF QLoRA recipe and qlora-lab's own, side by side.

One invocation trains each recipe for the same number of optimizer steps on the same rows with
the same seed, each in its own Python process (peak-memory counters, CUDA caching allocator state
and any library patching cannot leak from one recipe into the next), and writes:

    bench.json   top-level `speedup` (qlora_lab / plain real tokens/s) and, under `recipes`, one
                 entry per recipe (`plain`, `qlora_lab`, `unsloth`) with `real_tokens_per_s`,
                 `peak_allocated_bytes` (null on CPU), step time, MFU, ...; plus the command,
                 library versions and hardware
    bench.md     the same as a Markdown table

Recipes:
- `plain`: what a typical HF QLoRA train.py does, as the original demo did: peft's
  `prepare_model_for_kbit_training` (every non-quantized weight upcast to fp32, and its default
  gradient checkpointing), fp32 LoRA weights, padded batches, micro-batch 4, Trainer.
- `qlora_lab`: exactly `qlora-lab train` (train.setup_training), no eval, no checkpoints.
- `unsloth`: only when the package is importable; see `run_unsloth_recipe`.

"Real" tokens are non-padding tokens (the attention mask's sum, counted by Trainer), timed over
the steps after `warmup_steps`, with CUDA synchronized before each clock read.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_lab.config import RunConfig, config_from_dict, to_dict
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

RECIPES = ("plain", "qlora_lab")
GIB = 1024**3


@dataclass(frozen=True)
class BenchConfig:
    """One `qlora-lab bench` run.

    run: model, data, quantization, LoRA and training settings, resolved as for `train`; the
        `qlora_lab` recipe uses them unchanged (evaluation and checkpoints are switched off).
    output_dir: where bench.json, bench.md and each recipe's scratch run dir go.
    steps: optimizer steps per recipe (each is micro-batch x grad_accum_steps rows).
    warmup_steps: steps run before the clock starts (allocator growth, kernel selection).
    memory_cap_bytes: emulated card size on CUDA via `set_per_process_memory_fraction`
        (None = the whole card); ignored on CPU.
    plain_micro_batch_size: the plain recipe's micro-batch (the original demo used 4).
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
    peak_flops: float = 989e12
    command: str = ""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.steps <= self.warmup_steps:
            raise UserError(f"--steps {self.steps} must exceed the {self.warmup_steps} warmup "
                            f"steps — pass --steps {self.warmup_steps + 1} or more")
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise UserError(f"--memory-cap {self.memory_cap_bytes} must be positive")


# --- the parent: run each recipe in a subprocess, then report -----------------------------------


def run_bench(cfg: BenchConfig) -> dict:
    """Run every recipe in its own process; write bench.json and bench.md; return the report."""
    from qlora_lab.data import read_rows

    read_rows(cfg.run.data.source)  # a wrong --data fails here, before any process starts
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output dir {out} cannot be created ({exc.strerror}) — pick another "
                        "--output-dir") from None
    recipes = {name: _run_in_subprocess(cfg, name, out) for name in RECIPES}
    recipes["unsloth"] = run_unsloth_recipe(cfg, out)
    plain, ours = recipes["plain"]["real_tokens_per_s"], recipes["qlora_lab"]["real_tokens_per_s"]
    report = {
        "speedup": ours / plain if plain else None,
        "recipes": recipes,
        "command": cfg.command,
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "memory_cap_bytes": cfg.memory_cap_bytes,
        "peak_flops": cfg.peak_flops,
        "config": to_dict(cfg.run),
        "versions": _versions(),
        "hardware": _hardware(),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["table"] = format_table(report)
    (out / "bench.md").write_text(report["table"], encoding="utf-8")
    report["output_dir"] = str(out)
    return report


def run_unsloth_recipe(cfg: BenchConfig, out: Path) -> dict:
    """unsloth's recipe, in its own process (it patches transformers when imported).

    Not built yet: when unsloth is importable this records that it was skipped rather than
    reporting numbers it did not measure.
    """
    if importlib.util.find_spec("unsloth") is None:
        return {"skipped": "not installed"}
    return {"skipped": "installed, but qlora-lab's unsloth recipe is not implemented yet"}


def _run_in_subprocess(cfg: BenchConfig, recipe: str, out: Path) -> dict:
    spec = {"recipe": recipe, "bench": {k: v for k, v in dataclasses.asdict(cfg).items()
                                        if k != "run"}, "run": to_dict(cfg.run)}
    spec_path, result_path = out / f".{recipe}-spec.json", out / f".{recipe}-result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    log.info("bench: running recipe %s in its own process", recipe)
    # The child's stdout (Trainer prints its summary dict there) goes to our stderr, so that
    # stdout carries only the table.
    proc = subprocess.run([sys.executable, "-m", "qlora_lab.bench", str(spec_path),
                           str(result_path)], check=False, stdout=sys.stderr)
    if not result_path.is_file():
        raise RuntimeError(f"bench recipe {recipe} exited {proc.returncode} without a result")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    if "error" in result:
        raise UserError(f"recipe {recipe}: {result['error']}")
    return result


# --- the child: one recipe in this process ------------------------------------------------------


def _apply_memory_cap(cap: int | None, device: str) -> None:
    import torch

    if cap is None:
        return
    if device != "cuda":
        log.info("bench: --memory-cap applies to CUDA only; ignored on %s", device)
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))


def _step_timer(device: str):
    """A callback that reads the clock and Trainer's real-token count after every step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []  # (clock, real tokens seen) per step end

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), state.num_input_tokens_seen)]

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()  # kernels run async; the step is done only now
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

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
    plain_train = dataclasses.replace(run.train, micro_batch_size=cfg.plain_micro_batch_size)
    args = build_training_args(dataclasses.replace(run, train=plain_train), out, device, dtype,
                               has_eval=False, resuming=False)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      data_collator=PadCollator(tokenizer.pad_token_id))
    return trainer, model, device, cfg.plain_micro_batch_size


def _build_qlora_lab(run: RunConfig, out: Path):
    from qlora_lab.train import setup_training

    session = setup_training(run, overwrite=True)
    return session.trainer, session.model, session.device, run.train.micro_batch_size


def bench_run_config(cfg: BenchConfig, recipe: str) -> RunConfig:
    """The run both recipes train: every row trains (no held-out split), no eval, no saves."""
    out = Path(cfg.output_dir) / "runs" / recipe
    data = dataclasses.replace(cfg.run.data, eval_fraction=0.0, eval_source=None)
    train = dataclasses.replace(cfg.run.train, output_dir=str(out), max_steps=cfg.steps,
                                save_steps=cfg.steps + 1, tensorboard=False)
    return dataclasses.replace(cfg.run, data=data, train=train)


def run_recipe(cfg: BenchConfig, recipe: str) -> dict:
    """Train one recipe in this process and measure it (call in a fresh process)."""
    import torch

    from qlora_lab import models

    run = bench_run_config(cfg, recipe)
    device = models.resolve_device(run.train.device)
    _apply_memory_cap(cfg.memory_cap_bytes, device)
    if recipe == "plain":
        trainer, model, device, micro_batch = _build_plain(cfg, run, Path(run.train.output_dir))
    else:
        trainer, model, device, micro_batch = _build_qlora_lab(run, Path(run.train.output_dir))
    timer = _step_timer(device)
    trainer.add_callback(timer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return _measure(cfg, recipe, timer.marks, model, device, micro_batch, run)


def _measure(cfg: BenchConfig, recipe: str, marks: list, model, device: str, micro_batch: int,
             run: RunConfig) -> dict:
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
    for name, r in report["recipes"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            continue
        if r["peak_allocated_bytes"] is not None:
            peak = f"{r['peak_allocated_bytes'] / GIB:.2f} GiB allocated"
        else:
            peak = f"{r['peak_host_rss_bytes'] / GIB:.2f} GiB host RSS"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        dtypes = ", ".join(r["weight_dtypes"]["non_quantized_base"])
        lines.append(f"| {name} | {_fmt(r['real_tokens_per_s'], ',.0f')} | "
                     f"{r['mean_step_seconds']:.3f} | {peak} | {mfu} | {dtypes} |")
    lines.append(f"\nspeedup (qlora_lab / plain real tok/s): {_fmt(report['speedup'], '.2f')}x\n")
    return "\n".join(lines)


def _versions() -> dict:
    names = ("qlora-lab", "torch", "transformers", "peft", "bitsandbytes", "accelerate")
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _hardware() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def _worker(spec_path: str, result_path: str) -> int:
    """Entry point of a recipe's process: read the spec, run, write the result (or the error)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = BenchConfig(run=config_from_dict(spec["run"]), **spec["bench"])
    try:
        result = run_recipe(cfg, spec["recipe"])
        code = 0
    except UserError as exc:
        result, code = {"error": str(exc)}, 2
    Path(result_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
