"""Host time of one packed micro-batch's collation, built as `train` builds it.

    python benchmarks/collate_cpu.py --data ../shared/data/dolly_dev.jsonl \
        --out benchmarks/results/collate_cpu.json

The collator runs in the training process between steps (`train.data_workers: 0`), and on the
H200 the GPU idled while it packed 160 rows (profile_step_h200_160rows_adapter_first.json:
gaps of 14-26 ms under the DataLoader). This times it on the Dolly sample tokenized with the
H200 bench's BPE (fixtures.bpe_tokenizer), at that bench's settings (160 rows per micro-batch,
1,024-token bins padded to full length for compiled layers, varlen row bounds), through
`train.collator_for` and `data.prepare_data`, over the same micro-batches every run (a seeded
shuffle, several epochs). Each run appends a row, labelled with the commit of the qlora_lab it
imported, to --out; run it with PYTHONPATH=<other checkout>/src to time another commit.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from fixtures import bpe_tokenizer, git_head, hardware_label, versions

import qlora_lab
from qlora_lab.config import config_from_dict
from qlora_lab.data import prepare_data
from qlora_lab.train import collator_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    cfg = config_from_dict({
        "model": {"attn_implementation": "varlen"},
        "data": {"source": args.data, "max_seq_len": 1024, "eval_fraction": 0.0},
        "train": {"micro_batch_size": args.rows, "compile": True, "packing": True}})
    tokenizer = bpe_tokenizer(Path(args.data))
    rows = prepare_data(cfg.data, tokenizer, cfg.train.seed).train
    collate = collator_for(cfg, tokenizer.pad_token_id)
    order = random.Random(0)
    seconds, tokens, bins = [], [], []
    for _ in range(args.epochs):
        index = list(range(len(rows)))
        order.shuffle(index)
        for at in range(0, len(index) - args.rows + 1, args.rows):
            start = time.perf_counter()
            batch = collate([rows[i] for i in index[at:at + args.rows]])
            seconds.append(time.perf_counter() - start)
            tokens.append(int(batch["num_real_tokens"]))
            bins.append(batch["input_ids"].shape[0])
    ms = sorted(s * 1e3 for s in seconds)
    head, changed = git_head(Path(qlora_lab.__file__).resolve().parent)
    row = {"commit": head + ("+" if changed else ""), "command": "python " + " ".join(sys.argv),
           "micro_batches": len(ms), "rows_per_micro_batch": args.rows,
           "median_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(0.9 * len(ms))], 2),
           "mean_real_tokens": round(statistics.mean(tokens)), "bins": [min(bins), max(bins)],
           "hardware": hardware_label(), "versions": versions()}
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {"what": __doc__.splitlines()[0],
                                                               "runs": []}
    report["runs"].append(row)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: row[k] for k in ("commit", "median_ms", "p90_ms", "mean_real_tokens",
                                          "bins")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
