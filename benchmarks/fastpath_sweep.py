"""The fast path, one change at a time: real tokens/s and peak memory of each step of the ladder.

    python benchmarks/fastpath_sweep.py --model DIR --data dolly.jsonl --out sweep.json

Each variant is one `qlora-lab bench --recipes qlora_lab` run (its own process, same rows,
same emulated cap), so each row of the log is "before" for the next one. The variant with the
most real tokens/s is printed last, as `--set` flags, for the final `bench` run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# (name, --set overrides); each adds one change to the previous one unless it says otherwise.
LADDER = [
    ("padded rows, HF loss, no Liger (no upcast)",
     ["train.packing=false", "train.fused_loss=false", "train.liger=off", "lora.dropout=0.05"]),
    ("+ packing (4 x 1024-token bins)",
     ["train.fused_loss=false", "train.liger=off", "lora.dropout=0.05"]),
    ("+ loss at supervised positions only", ["train.liger=off", "lora.dropout=0.05"]),
    ("+ Liger kernels (RMSNorm, SwiGLU, fused linear CE)", ["lora.dropout=0.05"]),
    ("+ LoRA dropout 0 = default", []),
    ("+ 8 bins per micro-batch", ["train.micro_batch_size=8"]),
    ("+ 16 bins per micro-batch", ["train.micro_batch_size=16"]),
    ("+ 32 bins per micro-batch", ["train.micro_batch_size=32"]),
    ("4 bins, no gradient checkpointing", ["train.gradient_checkpointing=false"]),
    ("4 bins, checkpointing every 2nd layer", ["train.checkpoint_every=2"]),
    ("16 bins + torch.compile per decoder layer",
     ["train.micro_batch_size=16", "train.compile=true"]),
    ("32 bins + torch.compile per decoder layer",
     ["train.micro_batch_size=32", "train.compile=true"]),
    # Attention over packed rows without a dense mask (issue #15's second lever).
    ("32 compiled bins + varlen attention (torch FlashAttention, row bounds)",
     ["train.micro_batch_size=32", "train.compile=true", "model.attn_implementation=varlen"]),
    ("32 compiled bins + FlexAttention (block mask of the rows)",
     ["train.micro_batch_size=32", "train.compile=true",
      "model.attn_implementation=flex_attention"]),
    ("48 compiled bins + varlen attention",
     ["train.micro_batch_size=48", "train.compile=true", "model.attn_implementation=varlen"]),
    ("32 bins + varlen attention, not compiled",
     ["train.micro_batch_size=32", "model.attn_implementation=varlen"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--memory-cap", default="8GiB")
    parser.add_argument("--work", default="/tmp/fastpath-sweep")
    parser.add_argument("--variants", help="comma-separated ladder indices (default: all)")
    args = parser.parse_args()
    chosen = ({int(v) for v in args.variants.split(",")} if args.variants
              else set(range(len(LADDER))))
    rows = []
    for i, (name, sets) in enumerate(LADDER):
        if i not in chosen:
            continue
        cmd = [sys.executable, "-m", "qlora_lab", "bench", "--recipes", "qlora_lab",
               "--model", args.model, "--data", args.data, "--steps", str(args.steps),
               "--memory-cap", args.memory_cap, "--output-dir", f"{args.work}/{i}",
               "--set", "train.grad_accum_steps=1", "--set", "data.max_seq_len=1024"]
        for s in sets:
            cmd += ["--set", s]
        started = time.perf_counter()
        proc = subprocess.run(cmd, check=False)
        row = {"variant": name, "set": sets, "exit_code": proc.returncode,
               "wall_seconds": round(time.perf_counter() - started, 1)}
        result = Path(f"{args.work}/{i}/bench.json")
        if proc.returncode == 0 and result.is_file():
            r = json.loads(result.read_text())["recipes"]["qlora_lab"]
            row.update({k: r[k] for k in ("real_tokens_per_s", "mean_step_seconds",
                                          "peak_allocated_bytes", "peak_reserved_bytes",
                                          "micro_batch_size", "mfu")})
        rows.append(row)
        print(json.dumps(row), flush=True)
        # Rewritten after every variant: a sweep cut short by a time limit still has a best.
        ok = [r for r in rows if r.get("real_tokens_per_s")]
        best = max(ok, key=lambda r: r["real_tokens_per_s"]) if ok else None
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows,
                                              "best": best}, indent=2) + "\n")
    if best:
        print("BEST " + " ".join(f"--set {s}" for s in best["set"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
