"""What the benchmark scripts share: a random-weight model to train, an emulated smaller card,
and the record of the software and hardware a result came from.

    python benchmarks/fixtures.py tinyllama --out /tmp/tinyllama-random --data dolly_dev.jsonl

Nothing can be downloaded on the GPU hosts, and speed and memory do not depend on weight values,
so benchmarks train models with random weights built from a transformers config
(`random_model`). Their tokenizer is either the byte tokenizer (`models.build_byte_tokenizer`:
every character is one token, so a row's length is exact) or a BPE trained on the rows
themselves (`bpe_tokenizer`: realistic token counts for Dolly text). The scripts run as
`python benchmarks/<script>.py`, so this folder is their sys.path[0] and `import fixtures` works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from qlora_lab.child import apply_memory_cap
from qlora_lab.child import versions as _child_versions
from qlora_lab.presets import PRESETS

__all__ = ["GIB", "ROOT", "apply_memory_cap", "bpe_tokenizer", "default_data", "full_rows",
           "hardware_label", "random_model", "tinyllama_random", "versions",
           "write_result"]

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# --- data ----------------------------------------------------------------------------------------


def default_data() -> str:
    """The Dolly sample where it was carried (.benchdata/), else the bundled demo rows."""
    bench = ROOT / ".benchdata/dolly_dev.jsonl"
    return str(bench if bench.is_file() else ROOT / "src/qlora_lab/demo_data/train.jsonl")


def bpe_tokenizer(data: Path, vocab_size: int = 16000):
    """A byte-level BPE trained on the rows' text (Dolly or Alpaca fields): realistic token
    counts without downloading a model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in Path(data).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(" ".join(str(row.get(k, "")) for k in
                                  ("instruction", "context", "response", "input", "output")))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def full_rows(data: Path, out: Path, min_chars: int = 6000) -> Path:
    """Rows long enough to fill every bin: each joins consecutive Dolly rows' text into one
    answer of at least `min_chars` characters (~1,400 BPE tokens), so at max_seq_len 1024 every
    row is truncated to exactly 1024 tokens. Packing then has nothing to pack and padding has
    nothing to pad: ours and a peer do the same work per row (issue #15's full-rows goal).
    Deterministic (file order), written once."""
    if out.is_file():
        return out
    rows, answer, first = [], [], None
    for line in Path(data).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        first = first or row["instruction"]
        answer += [row.get("context", ""), row.get("response", "")]
        if sum(len(a) for a in answer) >= min_chars:
            rows.append({"instruction": first, "context": "",
                         "response": "\n".join(a for a in answer if a)})
            answer, first = [], None
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


# --- the model -----------------------------------------------------------------------------------


def random_model(target: Path, arch: dict, tokenizer, device: str = "cpu",
                 shard_bytes: int | None = None) -> Path:
    """Save a random-weight model of `arch` (a transformers config with `model_type`) and
    `tokenizer` to `target`, once: an existing target is reused.

    The tokenizer's BOS/EOS/PAD ids go into the config. Weights are bf16 on CUDA, fp32 on CPU,
    drawn with seed 0. With `shard_bytes`, the model is never built: each weight is drawn on
    `device` one at a time (normal with the config's initializer_range; norm weights 1, other
    vectors 0) and written in bf16 safetensors shards of about that size, so host memory holds
    one shard, not the model (a 13B shape on a 128 GiB host). The folder appears whole or not
    at all (written beside it, then renamed).
    """
    target = Path(target)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig

    values = {**arch, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    if shard_bytes:
        _write_shards(config, tmp, device, shard_bytes)
    else:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        model.save_pretrained(tmp)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def _write_shards(config, out: Path, device: str, shard_bytes: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # names and shapes only: no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    params = [(name, tuple(p.shape)) for name, p in skeleton.named_parameters()]  # tied: once
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch.bfloat16
    del skeleton
    gen = torch.Generator(device=device).manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in params:
        if len(shape) == 1:
            value = (torch.ones if "norm" in name else torch.zeros)(shape, dtype=torch.bfloat16)
        else:
            value = torch.empty(shape, dtype=torch.bfloat16, device=device)
            value.normal_(0.0, config.initializer_range, generator=gen)
            value = value.cpu()
        if size >= shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.numel() * value.element_size()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(v.numel() * v.element_size() for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(out)


def tinyllama_random(target: Path, data: Path | None = None, vocab_size: int = 16000) -> Path:
    """The TinyLlama-1.1B architecture with random weights, built on the GPU where there is one.

    With `data`, its tokenizer is a BPE trained on those rows (a vocabulary under TinyLlama's
    32,000; what bench_h200.sh, h200_session.sh and ddp_scaling.py train); without, the byte
    tokenizer (lab_h200.sh's speed model).
    """
    if (Path(target) / "config.json").is_file():
        return Path(target)
    import torch

    from qlora_lab.models import build_byte_tokenizer

    tokenizer = bpe_tokenizer(data, vocab_size) if data else build_byte_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return random_model(target, PRESETS["tinyllama"].arch, tokenizer, device)


# --- what a result records -----------------------------------------------------------------------


def versions(*packages: str) -> dict:
    """Python's and the installed versions of qlora-lab, torch, transformers, peft,
    bitsandbytes, accelerate and `packages` (None where one is not installed)."""
    return _child_versions(packages)


def git_head(where: Path = ROOT, *paths: str) -> tuple[str, bool]:
    """The short HEAD of the checkout at `where` ('' outside one), and whether `paths` (the
    whole tree below `where` if none) differ from it: the commit a result was measured at."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--",
                                                         *(paths or (".",))))


def per_call_us(call, calls: int, rounds: int) -> float:
    """Host time of one call of `call`, in microseconds: the median over `rounds` rounds of
    `calls` calls each, after `calls // 10` untimed warm-up calls."""
    import statistics
    import time

    for _ in range(max(1, calls // 10)):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def hardware_label() -> str:
    """'NVIDIA H200', '2 x NVIDIA H200' or 'cpu (16 cores)': the hardware line of a result."""
    import torch

    if not torch.cuda.is_available():
        return f"cpu ({os.cpu_count()} cores)"
    count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
    return name if count == 1 else f"{count} x {name}"


def write_result(out: str | Path, report: dict, started: float) -> None:
    """Write a benchmark's result file: `report`, then the hardware, the versions, the commit
    measured (and whether the tree differed from it) and the seconds since `started`
    (time.time()), as indented JSON."""
    import time

    commit, dirty = git_head()
    report = {**report, "hardware": hardware_label(), "versions": versions(),
              "commit": commit + (" (modified)" if dirty else ""),
              "seconds": round(time.time() - started, 1)}
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="build a benchmark model")
    sub = parser.add_subparsers(dest="model", required=True)
    tiny = sub.add_parser("tinyllama", help=tinyllama_random.__doc__.splitlines()[0])
    tiny.add_argument("--out", required=True, help="the model folder (kept if it exists)")
    tiny.add_argument("--data", help="JSONL rows to train a BPE tokenizer on (default: the byte "
                      "tokenizer)")
    rows = sub.add_parser("full-rows", help=full_rows.__doc__.splitlines()[0])
    rows.add_argument("--data", required=True, help="Dolly JSONL rows to join")
    rows.add_argument("--out", required=True, help="the JSONL file to write (kept if it exists)")
    args = parser.parse_args()
    if args.model == "full-rows":
        print(full_rows(Path(args.data), Path(args.out)))
        return
    print(tinyllama_random(Path(args.out), Path(args.data) if args.data else None))


if __name__ == "__main__":
    main()
