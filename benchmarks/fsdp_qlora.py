"""FSDP-QLoRA on 2 GPUs capped at 8 GiB each, for a model whose training does not fit one.

    bash benchmarks/fsdp_qlora.sh            # on a 2-GPU host; writes $OUT/fsdp_qlora.json
    python benchmarks/fsdp_qlora.py --out fsdp_qlora.json [--data .benchdata/dolly_dev.jsonl]

Phases, each logged as it starts (a failure writes the JSON so far, with the error text):
1. build: a random-weight Llama-2-13B shape (or --layers N of it) written as bf16 safetensors
   shards, tensor by tensor (never a 13B nn.Module), plus a BPE tokenizer trained on the data;
2. plan: `qlora-lab plan` with configs/fsdp_qlora.yaml for 1 GPU (expected: nothing fits 8 GiB)
   and for 2 GPUs under FSDP (the per-GPU prediction the run is compared with);
3. train: `accelerate launch --config_file configs/accelerate_fsdp.yaml` running this file's
   `worker` mode on each GPU: cap the process at --cap-gib with
   torch.cuda.set_per_process_memory_fraction (an emulated 8 GiB card), then run the unchanged
   `qlora-lab train` CLI, then record this rank's peak allocated/reserved memory.
Weights are random: memory and speed do not depend on their values, and the loss only needs to
be finite and to fall as LoRA fits the data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from fixtures import (
    GIB,
    ROOT,
    apply_memory_cap,
    bpe_tokenizer,
    default_data,
    hardware_label,
    random_model,
    versions,
)

# Llama-2-13B (meta-llama/Llama-2-13b-hf config.json).
LLAMA2_13B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 5120,
              "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
              "num_key_value_heads": 40, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "initializer_range": 0.02}
SHARD_BYTES = 4 * GIB


def log(msg: str) -> None:
    print(f"[fsdp_qlora {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- phase 1: the model ---------------------------------------------------------------------------


def build_model(target: Path, arch: dict, data: Path, device: str) -> Path:
    """The random bf16 model, written tensor by tensor in ~4 GiB shards (never a 13B
    nn.Module), with a BPE tokenizer trained on the data."""
    if (target / "config.json").is_file():
        log(f"build: reusing {target}")
        return target
    return random_model(target, arch, bpe_tokenizer(data), device, shard_bytes=SHARD_BYTES)


# --- phase 2: the plan ----------------------------------------------------------------------------


def qlora_lab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], check=False,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def plan(config: str, base: Path, gpus: int, budget: str | None) -> dict:
    args = ["plan", "--config", config, "--model", str(base), "--json", "--gpus", str(gpus)]
    if gpus > 1:
        args += ["--strategy", "fsdp"]
    if budget:
        args += ["--budget", budget]
    proc = qlora_lab(*args)
    result = {"command": "qlora-lab " + " ".join(args), "exit_code": proc.returncode}
    if proc.returncode == 0:
        out = json.loads(proc.stdout)
        result.update({k: out[k] for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                           "terms", "step") if k in out})
        if "chosen" in out:
            result["chosen"] = out["chosen"]
    else:
        result["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return result


# --- phase 3: training ----------------------------------------------------------------------------


def worker(cap_gib: float, peak_dir: Path, train_args: list[str]) -> int:
    """One rank: cap this process's GPU memory, run `qlora-lab train`, record its peak."""
    import torch

    from qlora_lab.cli import main as cli_main

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(rank)  # before anything touches CUDA: one context, on our GPU
    apply_memory_cap(int(cap_gib * GIB))  # on the current device, the one just set
    code, error = 1, None
    try:
        code = cli_main(train_args)
    except BaseException as exc:  # recorded, then re-raised: the launcher sees the failure
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        peak_dir.mkdir(parents=True, exist_ok=True)
        (peak_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "exit_code": code, "error": error, "cap_bytes": int(cap_gib * GIB),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(rank),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(rank)}))
    return code


def launch_training(args, base: Path, work: Path, gpus: int) -> dict:
    out = work / "run"
    train_args = ["train", "--config", args.config, "--model", str(base), "--data", args.data,
                  "--output-dir", str(out), "--max-steps", str(args.steps),
                  "--save-steps", str(args.steps), "--overwrite",
                  "--set", "data.eval_fraction=0", "--set", "train.tensorboard=false",
                  "--set", "train.logging_steps=1", "--set", "train.warmup_ratio=0",
                  "--set", f"train.learning_rate={args.learning_rate}", *args.extra]
    threads = max(1, (os.cpu_count() or 2) // gpus)  # CPU quantization of the base uses them
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate_fsdp.yaml"), "--num_processes", str(gpus),
           "--num_cpu_threads_per_process", str(threads), "--main_process_port", "29561",
           str(Path(__file__).resolve()), "worker", "--cap-gib", str(args.cap_gib),
           "--peak-dir", str(work / "peaks"), "--", *train_args]
    log("train: " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                          timeout=args.train_timeout)
    result = {"command": " ".join(cmd), "exit_code": proc.returncode,
              "wall_seconds": time.perf_counter() - start,
              "per_gpu": [json.loads(p.read_text())
                          for p in sorted((work / "peaks").glob("rank*.json"))]}
    if (out / "summary.json").is_file():
        result["summary"] = json.loads((out / "summary.json").read_text())
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        result["losses"] = [r["loss"] for r in records if "loss" in r and "train_loss" not in r]
    return result


def summarize(report: dict) -> dict:
    """The headline numbers: fits or not, per-GPU peak vs plan, tok/s, loss trend."""
    run, two = report.get("train", {}), report.get("plan_2gpu_fsdp", {})
    peaks = [g["peak_allocated_bytes"] for g in run.get("per_gpu", [])]
    losses = run.get("losses", [])
    head = {"single_gpu_plan_fits": report.get("plan_1gpu_budget", {}).get("exit_code") == 0,
            "fsdp_plan_fits": report.get("plan_2gpu_budget", {}).get("exit_code") == 0,
            "trained": run.get("exit_code") == 0}
    if peaks and two.get("peak_allocated_bytes"):
        head["peak_allocated_gib_per_gpu"] = [round(p / GIB, 3) for p in peaks]
        head["plan_peak_allocated_gib_per_gpu"] = round(two["peak_allocated_bytes"] / GIB, 3)
        head["plan_error_pct"] = round(100 * (max(peaks) - two["peak_allocated_bytes"])
                                       / max(peaks), 2)
    if run.get("summary"):
        head["tokens_per_s"] = run["summary"].get("tokens_per_s")
    if losses:
        k = max(1, len(losses) // 4)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        head.update(loss_first=losses[0], loss_last=losses[-1],
                    loss_all_finite=all(math.isfinite(x) for x in losses),
                    loss_decreased=last < first)
    return head


def common_arguments(description: str, layers: int, layers_of: str, steps: int,
                     work: str) -> argparse.ArgumentParser:
    """The options this script and fsdp_resume.py share (same names, same defaults)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--data", default=None,
                        help="Dolly-style JSONL (default: .benchdata/dolly_dev.jsonl, else the "
                             "bundled demo data)")
    parser.add_argument("--config", default=str(ROOT / "configs/fsdp_qlora.yaml"))
    parser.add_argument("--layers", type=int, default=layers,
                        help=f"decoder layers ({layers_of}: {layers})")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--work", default=work)
    return parser


def main() -> int:
    parser = common_arguments(__doc__.splitlines()[0], 40, "13B", 6, "/tmp/qlora-fsdp")
    parser.add_argument("--build-only", action="store_true",
                        help="phase 1 only (CPU-testable: builds on CPU when CUDA is absent)")
    parser.add_argument("--train-timeout", type=int, default=330)
    parser.add_argument("--set", dest="extra_sets", action="append", default=[],
                        help="extra section.key=value for train (repeatable)")
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        # `worker --cap-gib X --peak-dir D -- train ...`: split at "--" by hand (argparse's
        # REMAINDER after a positional swallows the options before it).
        rest = sys.argv[2:]
        cut = rest.index("--") if "--" in rest else len(rest)
        wp = argparse.ArgumentParser()
        wp.add_argument("--cap-gib", type=float, required=True)
        wp.add_argument("--peak-dir", required=True)
        w = wp.parse_args(rest[:cut])
        return worker(w.cap_gib, Path(w.peak_dir), rest[cut + 1:])
    args = parser.parse_args()
    args.extra = [x for s in args.extra_sets for x in ("--set", s)]
    args.data = args.data or default_data()
    out, work = Path(args.out), Path(args.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = {**LLAMA2_13B, "num_hidden_layers": args.layers}
    report: dict = {"command": "python " + " ".join(sys.argv), "data": args.data,
                    "config": args.config, "accelerate_config": "configs/accelerate_fsdp.yaml",
                    "memory_cap_gib_per_gpu": args.cap_gib, "gpus": args.gpus,
                    "model": f"Llama-2-13B shape ({args.layers} layers), random bf16 weights, "
                             "NF4 double-quant base, BPE tokenizer trained on the data",
                    "architecture": arch, "phases": {}}

    def write() -> None:
        report["headline"] = summarize(report)
        out.write_text(json.dumps(report, indent=2) + "\n")

    phase = "setup"
    try:
        import torch

        report["versions"] = versions()
        report["hardware"] = hardware_label()
        phase = "build"
        log(f"build: {args.layers}-layer Llama-2-13B shape in {work}")
        start = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = build_model(work / f"llama2-13b-shape-{args.layers}l", arch, Path(args.data),
                           device)
        report["phases"]["build_seconds"] = time.perf_counter() - start
        write()
        if args.build_only:
            return 0
        phase = "plan"
        log("plan: 1 GPU and 2 GPUs (FSDP) at the cap")
        budget = f"{args.cap_gib}GiB"
        report["plan_1gpu_budget"] = plan(args.config, base, 1, budget)
        report["plan_2gpu_budget"] = plan(args.config, base, args.gpus, budget)
        report["plan_2gpu_fsdp"] = plan(args.config, base, args.gpus, None)
        write()
        log(f"plan: 1 GPU fits: {report['plan_1gpu_budget']['exit_code'] == 0}; "
            f"{args.gpus} GPUs fit: {report['plan_2gpu_budget']['exit_code'] == 0}")
        phase = "train"
        report["train"] = launch_training(args, base, work, args.gpus)
        if report["train"]["exit_code"] != 0:
            report["error"] = f"train exited with {report['train']['exit_code']} (see log above)"
    except BaseException as exc:  # noqa: BLE001 - partial results are still worth keeping
        report["error"] = f"{phase}: {type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-4000:]
        log(report["error"])
    write()
    log(f"wrote {out}: {json.dumps(report['headline'])}")
    return 0 if "error" not in report else 1


if __name__ == "__main__":
    sys.exit(main())
