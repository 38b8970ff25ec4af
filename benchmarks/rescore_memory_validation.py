"""Re-score a memory validation result with the current planner, without a GPU.

    python benchmarks/rescore_memory_validation.py RUN.json benchmarks/results/memory_validation.json

The measured peaks do not depend on the planner, so the planner's formula can be changed and
checked again against the same measurements. `predicted_bytes_at_run` keeps what the run printed.
"""

import json
import sys
from pathlib import Path

from qlora_lab.config import config_from_dict
from qlora_lab.memory import estimate_peak_memory
from qlora_lab.plan import step_shape

sys.path.insert(0, str(Path(__file__).parent))
from memory_validation import ARCHS  # noqa: E402

from qlora_lab.memory import ModelShape  # noqa: E402
from qlora_lab.models import PRESETS  # noqa: E402


def main(src: str, dst: str) -> None:
    report = json.loads(Path(src).read_text())
    errors = []
    for row in report["rows"]:
        arch = ARCHS[row["arch"]] or PRESETS[row["arch"]].arch
        cfg = config_from_dict({"quant": {"bits": row["bits"]}, "lora": {"r": row["lora_r"]},
                                "data": {"max_seq_len": row["seq_len"]},
                                "train": {"micro_batch_size": row["micro_batch_size"],
                                          "gradient_checkpointing": row["gradient_checkpointing"]}})
        plan = estimate_peak_memory(ModelShape.from_config(arch), step_shape(cfg))
        row.setdefault("predicted_bytes_at_run", row["predicted_bytes"])
        row["predicted_bytes"] = plan.peak_allocated_bytes
        row["predicted_reserved_bytes"] = plan.peak_reserved_bytes
        row["error_pct"] = 100.0 * (plan.peak_allocated_bytes - row["measured_bytes"]) / row[
            "measured_bytes"]
        row["terms"] = {t.name: t.bytes for t in plan.terms}
        errors.append(abs(row["error_pct"]))
    report["max_abs_error_pct"] = max(errors)
    report["median_abs_error_pct"] = sorted(errors)[len(errors) // 2]
    report["within_5pct"] = sum(e <= 5 for e in errors)
    report["rescored_with"] = "python " + " ".join(sys.argv)
    Path(dst).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(errors)} configs: max |error| {max(errors):.1f}%, median "
          f"{report['median_abs_error_pct']:.1f}%, within 5%: {report['within_5pct']}")
    for row in report["rows"]:
        print(f"  {row['arch']:18} mb={row['micro_batch_size']:<3} seq={row['seq_len']:<5} "
              f"r={row['lora_r']:<3} ckpt={row['gradient_checkpointing']!s:5} bits={row['bits']:<2}"
              f" err {row['error_pct']:+5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
