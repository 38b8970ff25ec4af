"""What `train --budget` plans for the bench's packed 160-row run, with no GPU: the bins it
reads off the rows, the predicted peak at those bins against the peak `bench` measured, and
the config it picks for 160 rows a step.

    python benchmarks/plan_packed_bins.py benchmarks/results/bench_h200_8gib.json \
        --data .benchdata/dolly_dev.jsonl --out benchmarks/results/plan_packed_bins_h200.json

The bench's tokenizer is rebuilt as the bench built it (fixtures.bpe_tokenizer on the same rows,
deterministic), saved beside the TinyLlama preset's config.json: planning loads no weights. The
bins come from train.packed_bins (what train.fit_to_card plans with); the run config is the
bench.json's own (`config`), planned with liger-kernel installed as on the GPU host.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from fixtures import bpe_tokenizer, git_head

from qlora_lab.config import config_from_dict
from qlora_lab.memory import GIB, estimate_peak_memory, parse_bytes
from qlora_lab.models import PRESETS
from qlora_lab.plan import step_shape
from qlora_lab.shapes import model_shape
from qlora_lab.train import budget_rows, fit_to_card, packed_bins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--budget", default="8GiB")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from transformers import LlamaConfig

    bench = json.loads(args.bench.read_text())
    measured = bench["recipes"]["qlora_lab"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "tinyllama-shape"
        LlamaConfig(**PRESETS["tinyllama"].arch).save_pretrained(base)
        bpe_tokenizer(args.data).save_pretrained(base)
        values = bench["config"]
        values["model"]["name"] = str(base)
        values["data"]["source"] = str(args.data)
        run = config_from_dict(values)
        lengths, short = budget_rows(run)  # the rows as `train --budget` reads them, once
        rows = run.train.micro_batch_size
        bins = packed_bins(run, lengths)(rows)
        shape = model_shape(str(base))
        step = step_shape(run, liger_installed=True)
        at_bins = estimate_peak_memory(shape, replace(step, micro_batch_size=bins))
        fitted, best, short = fit_to_card(run, parse_bytes(args.budget), (lengths, short))
    tokens = measured["step_real_tokens"]
    report = {
        "what": __doc__.split("\n\n")[0], "planner_commit": git_head()[0],
        "command": "PYTHONPATH=src:benchmarks python " + " ".join(sys.argv),
        "bench": str(args.bench), "bench_command": bench.get("command"),
        "rows": len(lengths), "mean_row_tokens": round(sum(lengths) / len(lengths), 1),
        "micro_batch_rows": rows, "bin_tokens": run.data.max_seq_len,
        "planned_bins": bins,
        "fewest_bins_of_largest_measured_step": math.ceil(max(tokens) / run.data.max_seq_len),
        "measured_peak_allocated_gib": measured["peak_allocated_bytes"] / GIB,
        "predicted_peak_allocated_gib_at_planned_bins": at_bins.peak_allocated_bytes / GIB,
        "allocated_error": at_bins.peak_allocated_bytes / measured["peak_allocated_bytes"] - 1,
        "predicted_peak_reserved_gib_at_planned_bins": at_bins.peak_reserved_bytes / GIB,
        "measured_peak_reserved_gib": measured["peak_reserved_bytes"] / GIB,
        "budget": args.budget,
        "train_budget_choice": {"micro_batch_size": fitted.train.micro_batch_size,
                                "grad_accum_steps": fitted.train.grad_accum_steps,
                                "gradient_checkpointing": fitted.train.gradient_checkpointing,
                                "checkpoint_every": fitted.train.checkpoint_every,
                                "planned_bins": best.sequences,
                                "predicted_peak_allocated_gib": best.peak_allocated_bytes / GIB,
                                "rows_share_bins": short}}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
