"""One real `qlora-lab train` run of the TinyLlama-1.1B architecture under an emulated VRAM cap.

    python benchmarks/gpu_train.py --data ../shared/data/dolly_dev.jsonl --memory-cap-gib 8 \
        --steps 50 --out benchmarks/results/train_tinyllama_h200_8gib.json

The weights are random (speed and memory do not depend on their values) and the tokenizer is a
BPE trained on the data itself with a vocabulary under TinyLlama's 32,000, so Dolly rows get
realistic token lengths without downloading Llama's tokenizer. The cap is applied with
`torch.cuda.set_per_process_memory_fraction`, as an 8 GB card would impose it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def train_bpe_tokenizer(data: Path, vocab_size: int = 16000):
    """A byte-level BPE trained on the rows' text (Dolly or Alpaca fields)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for line in data.read_text(encoding="utf-8").splitlines():
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


def build_base(data: Path, target: Path, vocab_size: int = 16000) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_lab.models import PRESETS

    fast = train_bpe_tokenizer(data, vocab_size)
    arch = dict(PRESETS["tinyllama"].arch)
    arch.update(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**arch)).to(torch.bfloat16)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    del model
    torch.cuda.empty_cache()
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--memory-cap-gib", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/qlora-gpu-train")
    args = parser.parse_args()

    from qlora_lab.config import config_from_dict
    from qlora_lab.train import run_train

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
    work = Path(args.work)
    base = build_base(Path(args.data), work / "tinyllama-random")

    variants = {
        # The defaults `qlora-lab train` uses (seed recipe: 4 x 4 rows, paged 8-bit AdamW).
        "default": {},
        # LoRA weights in bf16 instead of fp32: does fp32 LoRA cost speed or memory?
        "lora_bf16": {"lora": {"weight_dtype": "compute"}},
    }
    results = []
    for name, overrides in variants.items():
        values = {"model": {"name": str(base)},
                  "data": {"source": args.data, "max_seq_len": 1024},
                  "train": {"output_dir": str(work / f"run-{name}"), "max_steps": args.steps,
                            "save_steps": args.steps, "eval_steps": args.steps,
                            "logging_steps": 10, "tensorboard": False}}
        for section, kv in overrides.items():
            values.setdefault(section, {}).update(kv)
        cfg = config_from_dict(values)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = run_train(cfg)
        summary["variant"] = name
        summary["overrides"] = overrides
        summary["wall_seconds_incl_load"] = time.perf_counter() - start
        results.append(summary)
        print(json.dumps({k: summary[k] for k in ("variant", "tokens_per_s",
                                                  "peak_allocated_bytes", "eval_loss")}))

    import bitsandbytes
    import peft
    import transformers

    report = {
        "command": "python " + " ".join(sys.argv),
        "hardware": torch.cuda.get_device_name(0),
        "memory_cap_gib": args.memory_cap_gib,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "python": platform.python_version()},
        "model": "TinyLlama-1.1B architecture, random bf16 weights, NF4 double-quant base",
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
