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
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
# Llama-2-13B (meta-llama/Llama-2-13b-hf config.json).
LLAMA2_13B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
                  hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu", initializer_range=0.02, torch_dtype="bfloat16")
SHARD_BYTES = 4 * GIB


def log(msg: str) -> None:
    print(f"[fsdp_qlora {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- phase 1: the model ---------------------------------------------------------------------------


def train_tokenizer(data: Path, vocab_size: int = 16000):
    """A byte-level BPE trained on the data: Dolly rows get realistic token counts offline."""
    from gpu_train import train_bpe_tokenizer  # benchmarks/ is this script's sys.path[0]

    return train_bpe_tokenizer(data, vocab_size)


def llama_tensor_shapes(arch: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of a LlamaForCausalLM checkpoint, in file order, with its shape."""
    h, i, v = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    head_dim = h // arch["num_attention_heads"]
    kv = arch["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(arch["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def build_random_llama(target: Path, arch: dict, data: Path, device: str) -> Path:
    """Write a random bf16 Llama as safetensors shards + index + config + tokenizer.

    Tensors are drawn one at a time on `device` (normal, std = initializer_range; norms = 1)
    and written in ~4 GiB shards, so host memory holds one shard, not the model.
    """
    import torch
    from safetensors.torch import save_file

    if (target / "config.json").is_file():
        log(f"build: reusing {target}")
        return target
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(data)
    arch = {**arch, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = llama_tensor_shapes(arch)
    weight_map, shard, shard_bytes, names, total = {}, {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
        log(f"build: wrote {name} ({shard_bytes / GIB:.1f} GiB)")
        shard, shard_bytes = {}, 0

    for key, shape in shapes:
        if len(shape) == 1:
            value = torch.ones(shape, dtype=torch.bfloat16)
        else:
            value = torch.empty(shape, dtype=torch.bfloat16, device=device)
            value.normal_(0.0, arch["initializer_range"], generator=gen)
            value = value.cpu()
        shard[key] = value
        shard_bytes += value.numel() * 2
        total += value.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    # Final names carry the shard count, as transformers writes them.
    renamed = {n: n.replace(".safetensors", f"-of-{len(names):05d}.safetensors") for n in names}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(arch, indent=1))
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


# --- phase 2: the plan ----------------------------------------------------------------------------


def qlora_lab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


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
    total = torch.cuda.get_device_properties(rank).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), rank)
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
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
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
                    loss_all_finite=all(x == x and abs(x) != float("inf") for x in losses),
                    loss_decreased=last < first)
    return head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON report path")
    parser.add_argument("--data", default=None,
                        help="Dolly-style JSONL (default: .benchdata/dolly_dev.jsonl, else the "
                             "bundled demo data)")
    parser.add_argument("--config", default=str(ROOT / "configs/fsdp_qlora.yaml"))
    parser.add_argument("--layers", type=int, default=40, help="decoder layers (13B: 40)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--cap-gib", type=float, default=8.0)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--work", default="/tmp/qlora-fsdp")
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
    if args.data is None:
        bench = ROOT / ".benchdata/dolly_dev.jsonl"
        args.data = str(bench if bench.is_file() else ROOT / "src/qlora_lab/demo_data/train.jsonl")
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

        report["versions"] = _versions()
        report["hardware"] = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
                              if torch.cuda.is_available() else platform.processor() or "cpu")
        phase = "build"
        log(f"build: {args.layers}-layer Llama-2-13B shape in {work}")
        start = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = build_random_llama(work / f"llama2-13b-shape-{args.layers}l", arch,
                                  Path(args.data), device)
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
    except BaseException as exc:  # partial results are still worth keeping
        report["error"] = f"{phase}: {type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-4000:]
        log(report["error"])
    write()
    log(f"wrote {out}: {json.dumps(report['headline'])}")
    return 0 if "error" not in report else 1


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


if __name__ == "__main__":
    sys.exit(main())
