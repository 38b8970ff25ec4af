"""Host time of the walks Trainer makes over the whole model at every optimizer step.

    cd benchmarks && python step_boundary_cpu.py --out results/step_boundary_cpu.json

Between one step's backward and the next step's forward, Trainer calls `model.train()` (every
module), accelerate's `clip_grad_norm_(model.parameters(), ...)` (every parameter, to keep
those with a gradient) and `model.zero_grad()` (every parameter). In QLoRA only the adapters
have gradients. The H200 profile at 160 rows (results/profile_step_h200_160rows_liger_loss.json)
shows the GPU idle 5.5 ms at the gradient norm: this times those walks on the host, over
TinyLlama's module tree as `train` builds it (fused MLP, peft LoRA on every projection), on the
meta device (the walks do not depend on the weights' values or sizes), each the median of
several rounds. Beside them, the same work over a list of the trainable parameters made once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from fixtures import hardware_label, per_call_us, versions

from qlora_lab.config import LoraConfig
from qlora_lab.fastpath import apply_fast_modules
from qlora_lab.models import attach_lora
from qlora_lab.presets import PRESETS


def median_ms(call, rounds: int, calls: int) -> float:
    return round(per_call_us(call, calls, rounds) / 1e3, 3)


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**PRESETS["tinyllama"].arch))
    model.requires_grad_(False)
    apply_fast_modules(model, use_liger=False)
    return attach_lora(model, LoraConfig(dropout=0.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    model = build_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.empty_like(p)

    def with_grads():
        return [p for p in model.parameters() if p.grad is not None]

    grads = [p.grad for p in trainable]

    def restore():
        for p, g in zip(trainable, grads):
            p.grad = g

    def zero_grad_then_restore():
        model.zero_grad()  # Trainer's call: set_to_none=True
        restore()

    restore_ms = median_ms(restore, args.rounds, args.calls)
    timed = {
        "model.train() (Trainer, every micro-batch)": median_ms(model.train, args.rounds,
                                                                 args.calls),
        "gradients from model.parameters() (accelerate's clip_grad_norm_)": median_ms(
            with_grads, args.rounds, args.calls),
        # Timed with the gradients put back after each call, that putting back subtracted.
        "model.zero_grad() (Trainer, every optimizer step)": round(median_ms(
            zero_grad_then_restore, args.rounds, args.calls) - restore_ms, 3),
        "the trainable parameters' gradients from a list made once": median_ms(
            lambda: [p for p in trainable if p.grad is not None], args.rounds, args.calls),
    }
    walks = list(timed.values())[:3]
    result = {
        "note": "meta device: no arithmetic, only the Python of the walks; an idle 2-core "
                "host (the session's CI run had finished)",
        "command": "cd benchmarks && python step_boundary_cpu.py --out "
                   "results/step_boundary_cpu.json",
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "model": "tinyllama shape (presets.PRESETS['tinyllama'].arch), fused MLP, peft LoRA "
                 "r=16 on every projection",
        "modules": sum(1 for _ in model.modules()),
        "parameters": sum(1 for _ in model.parameters()),
        "trainable_parameters": len(trainable),
        "ms": timed,
        "walks_ms_per_step": round(sum(walks), 3),
        "rounds": args.rounds, "calls_per_round": args.calls,
        "hardware": hardware_label(), "versions": versions(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
