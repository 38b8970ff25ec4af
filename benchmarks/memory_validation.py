"""Check the planner against measured peak CUDA memory of real `qlora-lab train` steps.

    python benchmarks/memory_validation.py --out benchmarks/results/memory_validation.json

For each config it builds the model exactly as `train` does (models.load_base_model,
prepare_for_training, attach_lora, train.build_training_args, transformers Trainer), runs a few
optimizer steps on random full-length rows (every token trained, no padding), and records
`torch.cuda.max_memory_allocated()` / `max_memory_reserved()` next to the planner's prediction.
Weights are random: memory does not depend on their values. Then, under an emulated 8 GiB card
(`set_per_process_memory_fraction`), it runs the config `fit_to_budget` picks for several models
and sequence lengths and records whether it fit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ARCHS = {
    "tinyllama": None,  # from the preset
    "smollm2-135m": None,
    # A Qwen2-0.5B-shaped model: tied, very large vocabulary, 2 KV heads, q/k/v biases.
    "qwen2-0.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                             intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=32768, tie_word_embeddings=True,
                             rope_theta=1000000.0, rms_norm_eps=1e-6),
    # Held-out shapes: never used to fit the planner's coefficients.
    "llama3.2-1b-shape": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                              intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8,
                              max_position_embeddings=8192, tie_word_embeddings=True,
                              rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen2.5-1.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                               intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2,
                               max_position_embeddings=32768, tie_word_embeddings=True,
                               rope_theta=1000000.0, rms_norm_eps=1e-6),
}

# Configs the coefficients were NOT fitted on (new shapes, new sizes, other ranks).
HELDOUT = [
    ("llama3.2-1b-shape", 1, 512, 16, True, 4), ("llama3.2-1b-shape", 3, 1024, 32, True, 4),
    ("llama3.2-1b-shape", 2, 3072, 8, True, 4), ("llama3.2-1b-shape", 2, 512, 16, False, 4),
    ("llama3.2-1b-shape", 6, 768, 16, True, 16),
    ("qwen2.5-1.5b-shape", 1, 1024, 16, True, 4), ("qwen2.5-1.5b-shape", 4, 768, 48, True, 4),
    ("qwen2.5-1.5b-shape", 1, 6144, 16, True, 4), ("qwen2.5-1.5b-shape", 2, 512, 16, False, 4),
    ("tinyllama", 12, 384, 24, True, 4), ("smollm2-135m", 24, 768, 32, False, 4),
    ("smollm2-135m", 6, 3072, 16, True, 4),
]

# (arch, micro_batch, seq_len, lora_r, gradient_checkpointing, bits)
GRID = [
    ("tinyllama", 1, 256, 16, True, 4), ("tinyllama", 4, 1024, 16, True, 4),
    ("tinyllama", 8, 1024, 16, True, 4), ("tinyllama", 16, 1024, 16, True, 4),
    ("tinyllama", 2, 2048, 16, True, 4), ("tinyllama", 1, 4096, 16, True, 4),
    ("tinyllama", 4, 512, 8, True, 4), ("tinyllama", 4, 512, 64, True, 4),
    ("tinyllama", 32, 256, 16, True, 4), ("tinyllama", 4, 1024, 16, False, 4),
    ("tinyllama", 2, 512, 16, False, 4), ("tinyllama", 4, 1024, 16, True, 16),
    ("tinyllama", 1, 2048, 32, False, 16),
    ("smollm2-135m", 1, 256, 16, True, 4), ("smollm2-135m", 8, 512, 16, True, 4),
    ("smollm2-135m", 16, 1024, 16, True, 4), ("smollm2-135m", 32, 512, 16, True, 4),
    ("smollm2-135m", 4, 2048, 16, True, 4), ("smollm2-135m", 1, 4096, 8, True, 4),
    ("smollm2-135m", 8, 1024, 64, True, 4), ("smollm2-135m", 8, 1024, 16, False, 4),
    ("smollm2-135m", 4, 512, 16, False, 16), ("smollm2-135m", 8, 1024, 16, True, 16),
    ("qwen2-0.5b-shape", 1, 256, 16, True, 4), ("qwen2-0.5b-shape", 4, 1024, 16, True, 4),
    ("qwen2-0.5b-shape", 8, 1024, 16, True, 4), ("qwen2-0.5b-shape", 2, 4096, 16, True, 4),
    ("qwen2-0.5b-shape", 8, 512, 32, True, 4), ("qwen2-0.5b-shape", 4, 1024, 16, False, 4),
    ("qwen2-0.5b-shape", 4, 1024, 16, True, 16), ("qwen2-0.5b-shape", 16, 256, 8, True, 4),
]
# Budget fits under an emulated 8 GiB card: (arch, seq_len needed by the data)
FITS = [("tinyllama", 1024), ("tinyllama", 2048), ("smollm2-135m", 2048),
        ("qwen2-0.5b-shape", 1024), ("qwen2-0.5b-shape", 4096)]


def build_random_base(arch: str, root: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_lab.models import PRESETS, build_byte_tokenizer

    target = root / arch
    if (target / "config.json").is_file():
        return target
    values = dict(ARCHS[arch] or PRESETS[arch].arch)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target)
    build_byte_tokenizer().save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


def run_config(base: Path, arch: str, mb: int, seq: int, r: int, ckpt: bool, bits: int,
               steps: int, work: Path) -> dict:
    from transformers import Trainer

    from qlora_lab import models
    from qlora_lab.config import config_from_dict
    from qlora_lab.data import PadCollator
    from qlora_lab.plan import model_shape, step_shape
    from qlora_lab.memory import estimate_peak_memory
    from qlora_lab.train import build_training_args

    cfg = config_from_dict({
        "model": {"name": str(base)}, "quant": {"bits": bits}, "lora": {"r": r},
        "data": {"max_seq_len": seq},
        "train": {"output_dir": str(work), "max_steps": steps, "micro_batch_size": mb,
                  "grad_accum_steps": 1, "gradient_checkpointing": ckpt, "save_steps": 10**6,
                  "logging_steps": 10**6, "tensorboard": False}})
    plan = estimate_peak_memory(model_shape(str(base)), step_shape(cfg))
    model = models.load_base_model(str(base), cfg.model, cfg.quant, "cuda")
    models.prepare_for_training(model, ckpt)
    model = models.attach_lora(model, cfg.lora)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, vocab, (mb * steps, seq), generator=gen).tolist()]
    args = build_training_args(cfg, work, "cuda", torch.bfloat16, has_eval=False,
                               resuming=False)
    args.disable_tqdm = True
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=PadCollator(pad_token_id=0))
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    measured = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    del trainer, model
    gc.collect()
    torch.cuda.empty_cache()
    return {"arch": arch, "micro_batch_size": mb, "seq_len": seq, "lora_r": r,
            "gradient_checkpointing": ckpt, "bits": bits,
            "predicted_bytes": plan.peak_allocated_bytes, "measured_bytes": measured,
            "predicted_reserved_bytes": plan.peak_reserved_bytes,
            "measured_reserved_bytes": reserved, "measured_static_bytes": static,
            "error_pct": 100.0 * (plan.peak_allocated_bytes - measured) / measured,
            "tokens_per_s": mb * seq * steps / seconds,
            "terms": {t.name: t.bytes for t in plan.terms}}


def _isolated(spec: list) -> dict:
    """Run one config in a fresh process, so nothing left by earlier configs inflates its peak."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(spec)],
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"arch": spec[0], "micro_batch_size": spec[1], "seq_len": spec[2],
            "error": proc.stderr[-500:]}


def _single(spec: list) -> None:
    arch, mb, seq, r, ckpt, bits, steps, work, cap = spec
    if cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
    base = Path(work) / "models" / arch
    try:
        row = run_config(base, arch, mb, seq, r, ckpt, bits, steps, Path(work) / f"run-{os.getpid()}")
    except torch.cuda.OutOfMemoryError as exc:
        row = {"arch": arch, "micro_batch_size": mb, "seq_len": seq, "oom": str(exc)[:300]}
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory_validation.json")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="/tmp/qlora-memval")
    parser.add_argument("--only", default="", help="comma-separated arch names")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", type=int, default=4, help="configs measured at once")
    parser.add_argument("--heldout", action="store_true",
                        help="measure the held-out grid (shapes and sizes not used for fitting)")
    args = parser.parse_args()
    if args.single:
        _single(json.loads(args.single))
        return
    work = Path(args.work)
    report = {"command": "python " + " ".join(sys.argv),
              "hardware": torch.cuda.get_device_name(0),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "rows": [], "budget_fits": []}
    out = Path(args.out)

    def flush() -> None:
        errors = [abs(r["error_pct"]) for r in report["rows"]]
        if errors:
            report["max_abs_error_pct"] = max(errors)
            report["median_abs_error_pct"] = sorted(errors)[len(errors) // 2]
        out.write_text(json.dumps(report, indent=2) + "\n")

    from concurrent.futures import ThreadPoolExecutor

    only = set(filter(None, args.only.split(",")))
    grid = [g for g in (HELDOUT if args.heldout else GRID) if not only or g[0] in only]
    fits = [] if args.heldout else FITS
    for arch in {g[0] for g in grid} | {f[0] for f in fits}:
        build_random_base(arch, work / "models")
    # Each config runs in its own process (peak stats are per process), a few at a time: the
    # card has far more memory than any one config uses, and memory is what is measured here.
    specs = [[*g, args.steps, str(work), 0] for g in grid]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(_isolated, specs))
    for (arch, mb, seq, r, ckpt, bits), row in zip(grid, results):
        if "error_pct" in row:
            report["rows"].append(row)
            print(f"{arch:18} mb={mb:<3} seq={seq:<5} r={r:<3} ckpt={ckpt!s:5} bits={bits:<2} "
                  f"pred {row['predicted_bytes'] / 2**30:6.3f} GiB  meas "
                  f"{row['measured_bytes'] / 2**30:6.3f} GiB  err {row['error_pct']:+6.1f}%  "
                  f"res {row['measured_reserved_bytes'] / 2**30:6.3f}", flush=True)
        else:
            print("FAILED", row, flush=True)
        flush()

    from qlora_lab.config import config_from_dict
    from qlora_lab.errors import UserError
    from qlora_lab.plan import fit_config

    cap = 8 * 2**30
    for arch, seq in fits:
        if only and arch not in only:
            continue
        base = build_random_base(arch, work / "models")
        cfg = config_from_dict({"model": {"name": str(base)}, "data": {"max_seq_len": seq}})
        entry = {"arch": arch, "seq_len": seq, "budget_bytes": cap}
        try:
            _, best, _ = fit_config(cfg, cap)
        except UserError as exc:  # nothing fits: the planner says so instead of guessing
            entry.update(chosen=None, planner_message=str(exc))
        else:
            entry["chosen"] = best.__dict__
            row = _isolated([arch, best.micro_batch_size, seq, 16, best.gradient_checkpointing,
                             4, args.steps, str(work), cap])
            entry.update(oom="oom" in row, **{k: row[k] for k in (
                "measured_bytes", "measured_reserved_bytes", "predicted_bytes") if k in row})
        report["budget_fits"].append(entry)
        print("fit", json.dumps(entry), flush=True)
        flush()


if __name__ == "__main__":
    main()
