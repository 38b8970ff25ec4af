"""Peak memory and recomputed projections of one training step, per checkpoint placement (CPU).

    PYTHONPATH=src:benchmarks python benchmarks/checkpoint_placement_cpu.py \
        --data ../shared/data/dolly_dev.jsonl --out benchmarks/results/checkpoint_placement_cpu.json

`fastpath.place_checkpoints` checkpoints compiled layers inside their compiled code, or (its
`inside=False`, kept for this comparison) around it. Written before inside ran on a GPU (the
H200's torch 2.11 needed a checkpoint context first; since then: checkpoint_inside_h200.json),
this measures, on the CPU, whether inside needs more memory than the placement the planner was
calibrated on: the step's peak memory above its start (torch.profiler's allocation events, in time order) for a random
Llama with the bench's tokenizer, checkpointed uncompiled, compiled around, compiled inside, and
compiled without checkpointing, each in a process of its own, built by `train`'s setup
(`setup_training`); and how many times the step dequantized a 4-bit weight (forward, input
gradient and recomputation: 3 a projection around, one fewer a layer inside).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from fixtures import bpe_tokenizer, git_head, hardware_label, random_model, versions

# Wide layers and a small vocabulary, to give the layers' activations the largest share of the
# step's memory; the result's `peak_during` says where the peak was reached (at this shape, in the
# loss's backward for every placement: checkpoint_placement_cpu.json).
ARCH = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 2048,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048}
MODES = {  # name: (train.gradient_checkpointing, train.compile, checkpoint inside compiled code)
    "eager, checkpointed": (True, False, None),
    "compiled, checkpointed around": (True, True, False),
    "compiled, checkpointed inside": (True, True, True),
    "compiled, not checkpointed": (False, True, None),
}


def measure(model: str, data: str, mode: str, rows: int, seq: int) -> dict:
    """One mode, in this process: a warm-up step (compiles), then the profiled step."""
    import torch

    from qlora_lab import fastpath
    from qlora_lab.config import config_from_dict
    from qlora_lab.train import setup_training

    checkpointing, compiled, inside = MODES[mode]
    out = Path(f"/tmp/checkpoint-placement/{mode.replace(' ', '_').replace(',', '')}")
    cfg = config_from_dict({
        "model": {"name": model},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"source": data, "max_seq_len": seq, "eval_fraction": 0.0},
        "train": {"output_dir": str(out), "micro_batch_size": rows, "compile": compiled,
                  "gradient_checkpointing": checkpointing, "tensorboard": False}})
    shutil.rmtree(out, ignore_errors=True)  # this script's own scratch run
    session = setup_training(cfg)
    model_, trainer = session.model, session.trainer
    if inside is not None:
        fastpath.place_checkpoints(model_, inside)
    batch = trainer.data_collator(session.data.train[:rows])
    batch.pop("num_real_tokens", None)

    def step():
        model_.train()
        model_.zero_grad(set_to_none=True)
        trainer.compute_loss(model_, dict(batch)).backward()

    with fastpath.compile_settings():
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            step()
    # The step's allocations and frees in time order (the profiler's memory events): the
    # highest running total above the start is the step's peak.
    recorded = prof.profiler.kineto_results.events()
    events = sorted((e.start_ns(), e.nbytes()) for e in recorded if e.name() == "[memory]")
    running = peak = 0
    peak_at = None
    for at, nbytes in events:
        running += nbytes
        if running > peak:
            peak, peak_at = running, at
    # The innermost operator running at the peak: where in the step it was reached.
    around_peak = [e for e in recorded if e.name() != "[memory]"
                   and e.start_ns() <= peak_at <= e.end_ns()]
    peak_op = max(around_peak, key=lambda e: e.start_ns()).name() if around_peak else None
    dequantized = sum(e.count for e in prof.key_averages()
                      if e.key == "bitsandbytes::dequantize_4bit")
    layers = model_.config.num_hidden_layers
    return {"mode": mode, "bins": list(batch["input_ids"].shape),
            "peak_above_start_mib": round(peak / 2**20, 2), "net_mib": round(running / 2**20, 2),
            "peak_during": peak_op,
            "dequantized_per_layer": dequantized / layers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=48)
    # Short bins: on the CPU attention materializes its (bins x heads x seq x seq) scores, which
    # grow with the square of the bin's length in every placement alike.
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--model", default="/tmp/checkpoint-placement/llama-512")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.model, args.data, args.mode, args.rows, args.seq)))
        return 0
    random_model(Path(args.model), ARCH, bpe_tokenizer(Path(args.data), vocab_size=1000))
    rows = []
    for mode in MODES:
        # A process each: compiled graphs and dynamo's caches are per process.
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    head, changed = git_head()
    import torch

    report = {"what": __doc__.splitlines()[0], "commit": head + ("+" if changed else ""),
              "command": "PYTHONPATH=src:benchmarks python " + " ".join(sys.argv),
              "model": ARCH, "rows": args.rows, "max_seq_len": args.seq, "hardware": hardware_label(),
              "versions": versions(), "torch": torch.__version__, "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
