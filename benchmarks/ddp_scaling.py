"""DDP scaling of `qlora-lab train`: one GPU against two, same per-GPU micro-batch.

    python benchmarks/ddp_scaling.py --data ../shared/data/dolly_dev.jsonl \
        --out benchmarks/results/ddp_scaling.json

Runs the unchanged CLI twice on the TinyLlama-1.1B architecture (random weights, BPE tokenizer
trained on the data; fixtures.tinyllama_random): `python -m qlora_lab train` on one GPU, then
`torchrun --nproc-per-node 2 -m qlora_lab train`. Weak scaling: each GPU keeps micro-batch x
accumulation, so two GPUs process twice the rows per optimizer step. `scaling` is real (non-pad)
tokens/s on two GPUs over one. Memory per GPU is compared with `qlora-lab plan` at the longest
row length (an upper bound, since Dolly rows are shorter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from fixtures import hardware_label, tinyllama_random


def train(cmd_prefix: list[str], base: Path, data: str, out: Path, steps: int,
          env: dict | None = None) -> dict:
    cmd = [*cmd_prefix, "-m", "qlora_lab", "-q", "train", "--model", str(base), "--data", data,
           "--output-dir", str(out), "--max-steps", str(steps), "--save-steps", str(steps),
           "--set", "data.eval_fraction=0", "--set", "train.tensorboard=false",
           "--set", "train.logging_steps=10", "--overwrite"]
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    summary = json.loads((out / "summary.json").read_text())
    summary["command"] = " ".join(cmd)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/qlora-ddp")
    args = parser.parse_args()
    work = Path(args.work)
    base = tinyllama_random(work / "tinyllama-random", Path(args.data))
    one = train([sys.executable], base, args.data, work / "one", args.steps,
                env={"CUDA_VISIBLE_DEVICES": "0"})
    two = train([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"],
                base, args.data, work / "two", args.steps)
    from qlora_lab.config import config_from_dict
    from qlora_lab.memory import estimate_peak_memory
    from qlora_lab.plan import step_shape
    from qlora_lab.shapes import model_shape

    plan = estimate_peak_memory(model_shape(str(base)), step_shape(config_from_dict({})))
    report = {
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware_label(),
        "model": "TinyLlama-1.1B architecture, random weights, NF4; defaults of `train`",
        "scaling": two["tokens_per_s"] / one["tokens_per_s"],
        "one_gpu": one, "two_gpus": two,
        "plan_peak_allocated_bytes_at_seq_1024": plan.peak_allocated_bytes,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("hardware", "scaling")}))
    print("tok/s", one["tokens_per_s"], two["tokens_per_s"], "peak GiB",
          one.get("peak_allocated_bytes", 0) / 2**30, two.get("peak_allocated_bytes", 0) / 2**30)


if __name__ == "__main__":
    main()
