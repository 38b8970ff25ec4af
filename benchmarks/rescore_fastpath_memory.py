"""The planner against the fast path's measured peaks (no new runs: it re-reads result files).

    python benchmarks/rescore_fastpath_memory.py > benchmarks/results/memory_validation_fastpath.json

Points: the ladder of fastpath_sweep_h200_run2_before.json (TinyLlama, 4 x 1024-token bins,
gradient checkpointing, LoRA dropout 0.05) and the max-context search of
bench_context_ours_h200_8gib.json (one row, offloaded checkpoints, tiled MLP, dropout 0), and
the micro-batch 1 x 2048 runs of bench_1x2048_h200_8gib.json (and its offloaded twin), and the
rows of fastpath_sweep_h200_run3.json (4 to 32 bins, selective checkpointing, compiled layers).
Peaks are torch.cuda.max_memory_allocated on an H200 capped at 8 GiB.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlamaConfig

from qlora_lab import memory
from qlora_lab.models import PRESETS

RESULTS = Path(__file__).parent / "results"
GIB = 1024**3


def main() -> None:
    model = memory.ModelShape.from_config(LlamaConfig(**PRESETS["tinyllama"].arch))
    points = []
    ladder = json.loads((RESULTS / "fastpath_sweep_h200_run2_before.json").read_text())["rows"]
    for row in ladder:
        sets = set(row["set"])
        if "train.packing=false" in sets:
            continue  # padded rows: the batch's tokens vary with its longest row
        shape = memory.StepShape(micro_batch_size=4, seq_len=1024,
                                 fused_loss="train.fused_loss=false" not in sets)
        points.append((row["variant"], shape, row["peak_allocated_bytes"],
                       "fastpath_sweep_h200_run2_before.json"))
    context = json.loads((RESULTS / "bench_context_ours_h200_8gib.json").read_text())
    for attempt in context["max_context"]["qlora_lab"]["attempts"]:
        if attempt["ok"]:
            shape = memory.StepShape(micro_batch_size=1, seq_len=attempt["tokens"],
                                     lora_dropout=False, fused_loss=True,
                                     activation_offload=True, packed=True)
            points.append((f"one {attempt['tokens']}-token row, offloaded checkpoints", shape,
                           attempt["peak_allocated_bytes"], "bench_context_ours_h200_8gib.json"))
    for source, offload in (("bench_1x2048_h200_8gib.json", False),
                            ("bench_1x2048_offload_h200_8gib.json", True)):
        ours = json.loads((RESULTS / source).read_text())["recipes"]["qlora_lab"]
        points.append(("one 2,048-token bin per step (micro-batch 1)"
                       + (", offloaded checkpoints" if offload else ""),
                       memory.StepShape(micro_batch_size=1, seq_len=2048, fused_loss=True,
                                        lora_dropout=False, activation_offload=offload),
                       ours["peak_allocated_bytes"], source))
    # Run 3 (LoRA dropout 0 by default): larger micro-batches, selective checkpointing, and
    # torch.compile per layer (counted without MLP tiling).
    run3 = "fastpath_sweep_h200_run3.json"
    for row in json.loads((RESULTS / run3).read_text())["rows"]:
        if not row.get("peak_allocated_bytes"):
            continue
        sets = dict(s.split("=", 1) for s in row["set"])
        shape = memory.StepShape(
            micro_batch_size=int(sets.get("train.micro_batch_size", 4)), seq_len=1024,
            fused_loss=True, lora_dropout=False,
            gradient_checkpointing=sets.get("train.gradient_checkpointing") != "false",
            checkpoint_every=int(sets.get("train.checkpoint_every", 1)),
            compiled=sets.get("train.compile") == "true", packed=True)
        points.append((row["variant"], shape, row["peak_allocated_bytes"], run3))
    rows = []
    for name, shape, measured, source in points:
        predicted = memory.estimate_peak_memory(model, shape).peak_allocated_bytes
        rows.append({"run": name, "source": source, "measured_allocated_gib": measured / GIB,
                     "predicted_allocated_gib": predicted / GIB,
                     "error_pct": 100 * (predicted - measured) / measured})
    errors = [r["error_pct"] for r in rows]
    print(json.dumps({"command": "python benchmarks/rescore_fastpath_memory.py",
                      "model": "TinyLlama-1.1B architecture", "points": rows,
                      "max_under_prediction_pct": min(0.0, min(errors)),
                      "max_over_prediction_pct": max(errors)}, indent=2))


if __name__ == "__main__":
    main()
