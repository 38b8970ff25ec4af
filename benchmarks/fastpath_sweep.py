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
    # A micro-batch is train.micro_batch_size rows, packed or not (~5 Dolly rows fill a
    # 1024-token bin), so "16 rows" is ~3 bins. Rows 0-11 are the ladder of run3, whose labels
    # then said bins: since micro_batch_size counts rows they measure smaller micro-batches.
    ("padded rows, HF loss, no Liger (no upcast)",
     ["train.packing=false", "train.fused_loss=false", "train.liger=off", "lora.dropout=0.05",
      "train.fused_lora=false"]),
    ("+ packing (4 rows per micro-batch, in bins)",
     ["train.fused_loss=false", "train.liger=off", "lora.dropout=0.05",
      "train.fused_lora=false"]),
    ("+ loss at supervised positions only",
     ["train.liger=off", "lora.dropout=0.05", "train.fused_lora=false"]),
    ("+ Liger kernels (RMSNorm, SwiGLU, fused linear CE)",
     ["lora.dropout=0.05", "train.fused_lora=false"]),
    ("+ LoRA dropout 0 = default", ["train.fused_lora=false"]),
    ("+ 8 rows per micro-batch", ["train.micro_batch_size=8", "train.fused_lora=false"]),
    ("+ 16 rows per micro-batch", ["train.micro_batch_size=16", "train.fused_lora=false"]),
    ("+ 32 rows per micro-batch", ["train.micro_batch_size=32", "train.fused_lora=false"]),
    ("4 rows, no gradient checkpointing",
     ["train.gradient_checkpointing=false", "train.fused_lora=false"]),
    ("4 rows, checkpointing every 2nd layer",
     ["train.checkpoint_every=2", "train.fused_lora=false"]),
    ("16 rows + torch.compile per decoder layer",
     ["train.micro_batch_size=16", "train.compile=true", "train.fused_lora=false"]),
    ("32 rows + torch.compile per decoder layer",
     ["train.micro_batch_size=32", "train.compile=true", "train.fused_lora=false"]),
    # Issue #15's levers, at ~30 bins per micro-batch (160 rows: the old "32 bins").
    ("160 rows (~30 bins) + compile, peft's LoRA layers",
     ["train.micro_batch_size=160", "train.compile=true", "train.fused_lora=false"]),
    ("160 rows + compile + fused LoRA MLP projections (default)",
     ["train.micro_batch_size=160", "train.compile=true"]),
    ("160 rows + compile + fused LoRA + varlen attention",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen"]),
    ("160 rows + compile + fused LoRA + FlexAttention",
     ["train.micro_batch_size=160", "train.compile=true",
      "model.attn_implementation=flex_attention"]),
    ("224 rows + compile + fused LoRA + varlen attention",
     ["train.micro_batch_size=224", "train.compile=true", "model.attn_implementation=varlen"]),
    ("32 rows + compile + fused LoRA + varlen attention",
     ["train.micro_batch_size=32", "train.compile=true", "model.attn_implementation=varlen"]),
    # Run 6: at 160 rows checkpointing recomputes every layer's forward (a third of the matmul
    # time); smaller micro-batches can keep their activations under the same 8 GiB.
    ("24 rows, no checkpointing + compile + fused LoRA + varlen",
     ["train.micro_batch_size=24", "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen"]),
    ("32 rows, no checkpointing + compile + fused LoRA + varlen",
     ["train.micro_batch_size=32", "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen"]),
    ("48 rows, checkpointing every 2nd layer + compile + fused LoRA + varlen",
     ["train.micro_batch_size=48", "train.checkpoint_every=2", "train.compile=true",
      "model.attn_implementation=varlen"]),
    # Session 9: the optimizer step's host cost (bitsandbytes makes one Python call per tensor;
    # torch's AdamW steps all 308 LoRA tensors in a few multi-tensor kernels).
    ("160 rows + compile + fused LoRA + varlen, torch AdamW (foreach)",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen",
      "train.optimizer=adamw_torch"]),
    ("160 rows + compile + fused LoRA + varlen, 8-bit AdamW not paged",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen",
      "train.optimizer=adamw_8bit"]),
    # Session 10: a step without host waits (the loss guard reads its flag a step later,
    # batches copy without blocking; torch AdamW runs fused, bitsandbytes' optimizers wait for
    # the GPU after every tensor). Row 21 is then torch's fused AdamW.
    ("160 rows + compile + fused LoRA + varlen, torch AdamW, one DataLoader worker",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen",
      "train.optimizer=adamw_torch", "train.data_workers=1"]),
    ("32 rows, no checkpointing, torch AdamW + compile + fused LoRA + varlen",
     ["train.micro_batch_size=32", "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen", "train.optimizer=adamw_torch"]),
    ("64 rows, checkpointing every 2nd layer, torch AdamW + compile + fused LoRA + varlen",
     ["train.micro_batch_size=64", "train.checkpoint_every=2", "train.compile=true",
      "model.attn_implementation=varlen", "train.optimizer=adamw_torch"]),
    ("32 rows x 5 accumulated (160 a step), no checkpointing, torch AdamW + compile + varlen",
     ["train.micro_batch_size=32", "train.grad_accum_steps=5",
      "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen", "train.optimizer=adamw_torch"]),
    # 32 rows need ~5 bins, 8.3 GiB without checkpointing by the planner; 16 rows ~3 (5.4 GiB).
    ("16 rows x 10 accumulated (160 a step), no checkpointing + compile + varlen",
     ["train.micro_batch_size=16", "train.grad_accum_steps=10",
      "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen"]),
    ("20 rows x 8 accumulated (160 a step), no checkpointing + compile + varlen",
     ["train.micro_batch_size=20", "train.grad_accum_steps=8",
      "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen"]),
    # Session 11: fewer layers recomputed at mid-size micro-batches (layers 0, 3, ..., 21: 8 of
    # 22 checkpointed; the planner gives ~6.6 GiB for 6 bins).
    ("32 rows x 5 accumulated (160 a step), checkpointing every 3rd layer + compile + varlen",
     ["train.micro_batch_size=32", "train.grad_accum_steps=5", "train.checkpoint_every=3",
      "train.compile=true", "model.attn_implementation=varlen"]),
    # Rows 30-32 are for the full-rows fixture (SWEEP_DATA=full): 32 rows of 1,024 tokens a
    # step, as `bench_h200.sh fullrows` gives both recipes; 30 was that phase's own setting
    # until run 8 (40, SDPA, since session 14).
    ("full rows: 32 rows, checkpointing + compile + varlen",
     ["train.micro_batch_size=32", "train.compile=true", "model.attn_implementation=varlen"]),
    ("full rows: 4 rows x 8 accumulated, no checkpointing + compile + varlen",
     ["train.micro_batch_size=4", "train.grad_accum_steps=8",
      "train.gradient_checkpointing=false", "train.compile=true",
      "model.attn_implementation=varlen"]),
    ("full rows: 8 rows x 4 accumulated, checkpointing every 3rd layer + compile + varlen",
     ["train.micro_batch_size=8", "train.grad_accum_steps=4", "train.checkpoint_every=3",
      "train.compile=true", "model.attn_implementation=varlen"]),
    # Session 11: small micro-batches without checkpointing were bound by the host's launches
    # (full rows 4 x 8: 0.35 s of GPU work in a 1.1 s step); train.cuda_graphs replays each
    # compiled layer as CUDA graphs. 33-35 on the Dolly sample, 36-37 on full rows.
    ("16 rows x 10 accumulated, no checkpointing + compile + varlen + CUDA graphs",
     ["train.micro_batch_size=16", "train.grad_accum_steps=10",
      "train.gradient_checkpointing=false", "train.compile=true", "train.cuda_graphs=true",
      "model.attn_implementation=varlen"]),
    ("8 rows x 20 accumulated, no checkpointing + compile + varlen + CUDA graphs",
     ["train.micro_batch_size=8", "train.grad_accum_steps=20",
      "train.gradient_checkpointing=false", "train.compile=true", "train.cuda_graphs=true",
      "model.attn_implementation=varlen"]),
    ("32 rows x 5 accumulated, no checkpointing + compile + varlen + CUDA graphs",
     ["train.micro_batch_size=32", "train.grad_accum_steps=5",
      "train.gradient_checkpointing=false", "train.compile=true", "train.cuda_graphs=true",
      "model.attn_implementation=varlen"]),
    ("full rows: 4 rows x 8 accumulated, no checkpointing + compile + varlen + CUDA graphs",
     ["train.micro_batch_size=4", "train.grad_accum_steps=8",
      "train.gradient_checkpointing=false", "train.compile=true", "train.cuda_graphs=true",
      "model.attn_implementation=varlen"]),
    ("full rows: 2 rows x 16 accumulated, no checkpointing + compile + varlen + CUDA graphs",
     ["train.micro_batch_size=2", "train.grad_accum_steps=16",
      "train.gradient_checkpointing=false", "train.compile=true", "train.cuda_graphs=true",
      "model.attn_implementation=varlen"]),
    # 38-39 (session 12): checkpointing inside the compiled layers, what saves the extra memory
    ("160 rows + compile + varlen, Liger off",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen",
      "train.liger=off"]),
    ("64 rows + compile + varlen",
     ["train.micro_batch_size=64", "train.compile=true", "model.attn_implementation=varlen"]),
    # 40 (session 14): full rows with SDPA, no mask (each row is its own bin): FlashAttention-2's
    # dense kernel, faster there than the varlen kernel (fastpath_sweep_h200_run16_sdpa.json).
    ("full rows: 32 rows, checkpointing + compile + SDPA",
     ["train.micro_batch_size=32", "train.compile=true"]),
    # 41-42 (session 15): Liger for the head's loss only; the layers' RMSNorm and SwiGLU are
    # the model's own, which the compiler fuses with the residual adds around them.
    ("160 rows + compile + varlen, Liger for the loss only",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen",
      "train.liger=loss"]),
    ("full rows: 32 rows, checkpointing + compile + SDPA, Liger for the loss only",
     ["train.micro_batch_size=32", "train.compile=true", "train.liger=loss"]),
    # 43-44 (session 21): gate and up each on its own, against rows 14 and 40 (one function,
    # adapters in the base matmuls' K: train.joint_lora, the default).
    ("160 rows + compile + varlen, gate and up each on its own",
     ["train.micro_batch_size=160", "train.compile=true", "model.attn_implementation=varlen",
      "train.joint_lora=false"]),
    ("full rows: 32 rows, checkpointing + compile + SDPA, gate and up each on its own",
     ["train.micro_batch_size=32", "train.compile=true", "train.joint_lora=false"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="untimed steps first (compiled rows recompile per new shape)")
    parser.add_argument("--memory-cap", default="8GiB")
    parser.add_argument("--work", default="/tmp/fastpath-sweep")
    parser.add_argument("--variants", help="comma-separated ladder indices, run in this order; "
                        "one may repeat (A/B/A/B on one machine); default: all")
    args = parser.parse_args()
    order = ([int(v) for v in args.variants.split(",")] if args.variants
             else list(range(len(LADDER))))
    rows = []
    for run, i in enumerate(order):
        name, sets = LADDER[i]
        cmd = [sys.executable, "-m", "qlora_lab", "bench", "--recipes", "qlora_lab",
               "--model", args.model, "--data", args.data, "--steps", str(args.steps),
               "--warmup-steps", str(args.warmup_steps),
               "--memory-cap", args.memory_cap, "--output-dir", f"{args.work}/{run}-{i}",
               "--set", "train.grad_accum_steps=1", "--set", "data.max_seq_len=1024"]
        for s in sets:
            cmd += ["--set", s]
        started = time.perf_counter()
        proc = subprocess.run(cmd, check=False)
        row = {"index": i, "variant": name, "set": sets, "exit_code": proc.returncode,
               "wall_seconds": round(time.perf_counter() - started, 1)}
        result = Path(f"{args.work}/{run}-{i}/bench.json")
        if proc.returncode == 0 and result.is_file():
            r = json.loads(result.read_text())["recipes"]["qlora_lab"]
            row.update({k: r.get(k) for k in ("real_tokens_per_s", "mean_step_seconds",
                                              "peak_allocated_bytes", "peak_reserved_bytes",
                                              "micro_batch_size", "mfu", "step_seconds",
                                              # each step's tokens too: run 5's steady rates
                                              # had to assume a recompiled step's tokens
                                              "step_real_tokens", "loss_check")})
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
