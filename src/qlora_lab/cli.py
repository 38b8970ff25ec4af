"""Command line: parse arguments, call `run_<command>(config)`, print results. Nothing else.

A UserError becomes one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from qlora_lab.errors import TrainingInterrupted, UserError

EXIT_USER_ERROR = 2


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a base model with QLoRA",
                       description="Fine-tune with QLoRA. Precedence: defaults < --config YAML < "
                       "flags < --set overrides.")
    p.add_argument("--config", help="YAML file with model/quant/lora/data/train sections")
    p.add_argument("--model", help="preset (tinyllama, smollm2-135m, tiny-random), hub id, "
                   "local dir or .gguf file")
    p.add_argument("--data", help="hub dataset name or .jsonl/.json/.csv/.parquet file")
    p.add_argument("--output-dir", help="where the adapter, checkpoints and metrics go")
    p.add_argument("--max-steps", type=int, help="optimizer steps (0 = train.epochs)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue from the newest checkpoint, or from CKPT (checkpoint-N)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --output-dir")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed data rows (and report how many) instead of stopping")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set lora.r=8 or --set "
                   "lora.target_modules=[q_proj,v_proj] (repeatable)")
    p.add_argument("--budget", help="fit micro-batch and checkpointing to this VRAM budget "
                   "(e.g. 8GiB) with the planner before training")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the base model run Python from its repository (off by default; "
                   "a YAML file or a run folder cannot turn it on)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt with an adapter or a merged model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a run's output dir (or its adapter/ dir)")
    src.add_argument("--model-dir", help="a merged model dir written by `merge`")
    p.add_argument("--model", help="base model (overrides the one recorded with the adapter)")
    inp = p.add_mutually_exclusive_group()
    inp.add_argument("--prompt", help="the prompt text (else --prompt-file or stdin)")
    inp.add_argument("--prompt-file", help="read the prompt from this file")
    inp.add_argument("--chat", action="store_true", help="interactive chat with streaming")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_safety_flags(p)


def _add_merge(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into a dense copy of its base")
    p.add_argument("--adapter", required=True, help="a run's output dir (or its adapter/ dir)")
    p.add_argument("--output-dir", required=True, help="new dir for the merged model")
    p.add_argument("--model", help="base model (overrides the one recorded with the adapter)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="dtype of the merged weights (default: the compute dtype the adapter "
                   "was trained in, e.g. bf16 for a GPU run)")
    _add_safety_flags(p)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run or a merged model as one GGUF file for "
                       "llama.cpp and Ollama",
                       description="Merge (in memory) and write a GGUF file: llama.cpp's "
                       "architecture metadata, the tokenizer with its chat template, and the "
                       "weights in f16 or q8_0. Supported architectures: llama, mistral "
                       "(as llama), qwen2.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a run's output dir (or its adapter/ dir); merged first")
    src.add_argument("--model-dir", help="a merged model dir (from `merge`) or any "
                     "save_pretrained folder")
    p.add_argument("--model", help="base model: exported alone, or the adapter's base override")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument("--type", choices=["f16", "q8_0"], help="weight type (default f16; q8_0 is "
                   "about half the size, with a little more error)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --gguf file")
    _add_safety_flags(p)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss, perplexity and answer quality (ROUGE-L, "
                       "exact match) per category",
                       description="Evaluate an adapter or a model on rows with reference "
                       "answers; writes eval.json, eval.md and predictions.jsonl.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="a run's output dir (or its adapter/ dir)")
    src.add_argument("--model-dir", help="a merged model dir written by `merge`")
    p.add_argument("--model", help="base model to evaluate alone, or the adapter's base override")
    p.add_argument("--data", required=True, help=".jsonl/.json/.csv/.parquet rows (dolly, alpaca "
                   "or chat) with reference answers")
    p.add_argument("--compare-base", action="store_true",
                   help="also evaluate the adapter's base (adapter off) and report deltas")
    p.add_argument("--max-rows", type=int, help="only the first N rows (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="generation cap per answer (default: the "
                   "longest reference in tokens, + 8)")
    p.add_argument("--output-dir", help="report dir (default: <run dir>/eval, or ./eval)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip malformed rows (and report how many) instead of stopping")
    p.add_argument("--skip-long-rows", action="store_true",
                   help="skip rows whose prompt does not fit the model's context (and report "
                   "how many) instead of stopping")
    p.add_argument("--columns", help="rename the file's columns to schema fields first, as "
                   "train's data.columns does (e.g. instruction=question,response=answer)")
    _add_safety_flags(p)


def _add_safety_flags(p) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle (.bin/.pt) weights where safetensors are missing; "
                   "pickles can run code when loaded")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a base model run code from its repository (off by default)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict peak GPU memory; fit a run to a VRAM budget",
                       description="Predict the peak GPU memory of a training config from the "
                       "architecture alone; with --budget, pick the fastest micro-batch and "
                       "checkpointing choice predicted to fit.")
    p.add_argument("--config", help="training YAML (as for train)")
    p.add_argument("--model", help="preset, hub id, local dir or .gguf file")
    p.add_argument("--budget", help="VRAM budget, e.g. 8GiB; search for the config that fits")
    p.add_argument("--output", help="write the fitted config as YAML that train accepts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run is spread over (per-GPU "
                   "memory is reported)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: a full replica per GPU; fsdp: parameters and optimizer sharded")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model's repository run its own Python (off by default)")


def _csv(text: str | None, kind, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r} is malformed — pass comma-separated values") from None


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="real tokens/s of the plain HF QLoRA recipe, qlora-lab's "
                       "and unsloth's, side by side",
                       description="Train the plain HF QLoRA recipe (fp32 upcast, padded "
                       "batches, micro-batch 4), qlora-lab's own and, where it is installed, "
                       "unsloth's for the same steps on the same rows under the same memory cap, "
                       "each in its own process; writes bench.json and bench.md.")
    p.add_argument("--config", help="training YAML (as for train)")
    p.add_argument("--model", help="preset, hub id, local dir or .gguf file")
    p.add_argument("--data", help="rows to train on (Dolly-length rows for meaningful numbers)")
    p.add_argument("--memory-cap", help="emulated GPU size, e.g. 8GiB (default 8GiB; 'none' = "
                   "the whole card; ignored on CPU)")
    p.add_argument("--steps", type=int, help="optimizer steps per recipe (default 20)")
    p.add_argument("--warmup-steps", type=int, help="steps run before the clock starts "
                   "(default 2; with train.compile the first step compiles, and a dimension "
                   "of 1 or an evaluation compiles again)")
    p.add_argument("--output-dir", help="where bench.json and bench.md go (default ./bench)")
    p.add_argument("--recipes", help="comma-separated subset of plain,qlora_lab,unsloth,"
                   "unsloth_packed (default all; unsloth's run only where it is installed)")
    p.add_argument("--plain-runs", type=int, help="runs of the plain recipe; bench.json "
                   "reports their median, min and max (default 3)")
    p.add_argument("--plain-steps", type=int, help="the plain recipe's optimizer steps "
                   "(default: --steps; it compiles nothing, so fewer serve)")
    p.add_argument("--peer-micro-batch", type=int, help="unsloth's micro-batch: rows padded, "
                   "bins packed (default 32)")
    p.add_argument("--peer-runs", type=int, help="runs of each unsloth recipe; above 1, "
                   "bench.json reports their median, min and max (default 1)")
    p.add_argument("--context-lengths", help="also find the longest trainable row at "
                   "micro-batch 1, trying these lengths in order, e.g. 32768,65536,98304")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def _add_lab(sub) -> None:
    p = sub.add_parser("lab", help="measure the memory/speed/stability/inference tradeoffs; "
                       "write a report with plots",
                       description="Run the planner, real training runs, generation timings "
                       "and eval; write report.md, a standalone report.html, report.json and "
                       "PNG plots to --output-dir.")
    p.add_argument("--budget", help="the card to map feasibility for, e.g. 8GiB (on CUDA also "
                   "the emulated cap for the stability and inference runs)")
    p.add_argument("--quick", action="store_true", help="tiny random model, a few steps per "
                   "run (about a minute on CPU; shows the method, not real-model numbers)")
    p.add_argument("--output-dir", help="where the report and each run's scratch dir go "
                   "(default ./lab)")
    p.add_argument("--model", help="base for stability, inference and quality (default "
                   "smollm2-135m; --quick: tiny-random)")
    p.add_argument("--speed-model", help="base for feasibility and throughput, e.g. a local "
                   "random-weight TinyLlama dir (default tinyllama; --quick: tiny-random)")
    p.add_argument("--data", help="training rows (default: the bundled demo data)")
    p.add_argument("--eval-data", help="held-out rows with reference answers (needed with "
                   "--data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a sweep size, e.g. --set seeds=0 --set stability_steps=10 "
                   "(train's --set grammar with one-word keys; lists as 0,1 or [0, 1]; keys: "
                   "see lab.TUNABLE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-lab",
        description="QLoRA fine-tuning on small GPUs: train, generate, merge, eval, plan, bench, "
                    "lab.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_generate(sub)
    _add_merge(sub)
    _add_export(sub)
    _add_plan(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_lab(sub)
    return parser


def train_config_from_args(args):
    from qlora_lab.config import RunConfig, config_from_dict, load_yaml, parse_overrides

    flags = _run_flags(args)
    overrides = parse_overrides(args.set)

    def build(yaml_values: dict) -> RunConfig:
        cfg = config_from_dict(yaml_values)
        return config_from_dict(overrides, config_from_dict(flags, cfg))

    source = args.config
    cfg = build(load_yaml(args.config) if args.config else {})
    saved = Path(cfg.train.output_dir).expanduser() / "config.yaml"
    if getattr(args, "resume", None) and not args.config and saved.is_file():
        source = str(saved)
        cfg = build(load_yaml(saved))  # resume repeats the saved run unless told otherwise
    return _consent_to_remote_code(cfg, args, overrides, source)


# train, plan and bench flags set the run config field of their own name (--max-steps sets
# train.max_steps); --model and --data name the section whose main field they set.
SECTION_FLAGS = {"model": "name", "data": "source"}
NOT_COPIED = {"trust_remote_code"}  # a consent, which _consent_to_remote_code alone grants


def _run_flags(args) -> dict:
    """{section: {field: value}} of the flags given: copied by field name, never one by one.

    Unset flags (None, or False for a switch) are left out: the config's defaults, the YAML file
    and --set decide those.
    """
    import typing

    from qlora_lab.config import RunConfig

    flags = {}
    for section, cls in typing.get_type_hints(RunConfig).items():
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)
                  if f.name not in NOT_COPIED}
        if section in SECTION_FLAGS:
            values[SECTION_FLAGS[section]] = getattr(args, section, None)
        flags[section] = {k: v for k, v in values.items() if v is not None and v is not False}
    return flags


def given_fields(args, cls, **computed) -> dict:
    """Arguments for dataclass `cls`: the flags named like its fields, plus `computed` values,
    without the unset ones (None), which keep `cls`'s defaults, the one place they live."""
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    return {k: v for k, v in {**values, **computed}.items() if v is not None}


def _consent_to_remote_code(cfg, args, overrides: dict, source: str | None):
    """Remote code runs only when this command line says so, never because a file does.

    A config file or a run folder is data that may come from someone else; `trust_remote_code`
    executes the model repository's Python, so it needs `--trust-remote-code` (or
    `--set model.trust_remote_code=true`) in this very invocation.
    """
    from dataclasses import replace

    granted = (getattr(args, "trust_remote_code", False)
               or overrides.get("model", {}).get("trust_remote_code") is True)
    if cfg.model.trust_remote_code and not granted:
        raise UserError(f"{source} sets model.trust_remote_code: true, which runs the model "
                        "repository's own Python — pass --trust-remote-code on the command line "
                        "if you trust it, or set it to false")
    if granted and not cfg.model.trust_remote_code:
        cfg = replace(cfg, model=replace(cfg.model, trust_remote_code=True))
    return cfg


# Arguments that name files or folders; each is checked before any command touches it.
PATH_ARGS = ("config", "model", "data", "eval_data", "output_dir", "adapter", "model_dir",
             "prompt_file", "output", "speed_model")


def _check_paths(args) -> None:
    from qlora_lab.config import check_path_text

    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            check_path_text(value, "--" + name.replace("_", "-"))
    if isinstance(getattr(args, "resume", None), str):
        check_path_text(args.resume, "--resume")


def _command(args) -> int:
    _check_paths(args)
    if args.command == "train":
        from qlora_lab.train import allocator_defaults, fit_to_card, run_train

        allocator_defaults()  # before anything (the budget fit's card query) starts CUDA
        cfg = train_config_from_args(args)
        if args.budget is not None:
            from qlora_lab.memory import GIB, parse_bytes

            try:
                budget = parse_bytes(args.budget)
            except ValueError as exc:
                raise UserError(f"--budget: {exc}") from None
            cfg, best, short = fit_to_card(cfg, budget)
            logging.getLogger("qlora_lab").info(
                "planner: micro-batch %d rows (planned as %d x %d tokens), checkpointing %s "
                "(every %d), predicted peak %.2f GiB of %.2f (%s)", best.micro_batch_size,
                best.sequences, best.seq_len, best.gradient_checkpointing, best.checkpoint_every,
                best.peak_allocated_bytes / GIB, budget / GIB,
                "rows share bins: masked attention" if short else "every row fills its bin")
        summary = run_train(cfg, resume=args.resume, overwrite=args.overwrite)
        if int(os.environ.get("RANK", "0")) == 0:  # one summary, not one per process
            print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    elif args.command == "generate":
        from qlora_lab.generate import GenerateConfig, run_generate

        run_generate(GenerateConfig(**given_fields(args, GenerateConfig)))
    elif args.command == "plan":
        from qlora_lab.plan import PlanConfig, run_plan

        run_plan(PlanConfig(run=train_config_from_args(args), gpus=args.gpus,
                            strategy=args.strategy, budget=args.budget,
                            output=args.output, overwrite=args.overwrite,
                            as_json=args.json))
    elif args.command == "eval":
        from qlora_lab.evaluate import EvalConfig, run_eval

        report = run_eval(EvalConfig(**given_fields(args, EvalConfig)))
        print(report["table"], end="")
        print(f"report: {report['output_dir']}/eval.json, eval.md, predictions.jsonl")
    elif args.command == "bench":
        from qlora_lab.bench import BenchConfig, run_bench

        # --peer-micro-batch keeps its short name; lists arrive comma-separated.
        given = given_fields(args, BenchConfig, run=train_config_from_args(args),
                             peer_micro_batch_size=args.peer_micro_batch,
                             recipes=_csv(args.recipes, str, "--recipes"),
                             context_lengths=_csv(args.context_lengths, int, "--context-lengths"),
                             command=shlex.join(["qlora-lab", *args.argv]))
        # `--memory-cap none` is a value (no cap), not an unset flag.
        if args.memory_cap is not None:
            given["memory_cap_bytes"] = _parse_cap(args.memory_cap)
        report = run_bench(BenchConfig(**given))
        print(report["table"], end="")
        print(f"report: {report['output_dir']}/bench.json, bench.md")
    elif args.command == "lab":
        from qlora_lab.lab import LabConfig, lab_config, parse_overrides, run_lab

        if args.data and not args.eval_data:
            raise UserError(f"--data {args.data} needs --eval-data FILE: held-out rows with "
                            "reference answers for the eval and quality sections")
        # quick=None: --quick picks the preset (lab_config's first argument), not one field.
        given = given_fields(args, LabConfig, quick=None,
                             command=shlex.join(["qlora-lab", *args.argv]))
        if args.budget is not None:
            from qlora_lab.memory import parse_bytes

            try:
                given["budget_bytes"] = parse_bytes(args.budget)
            except ValueError as exc:
                raise UserError(f"--budget: {exc}") from None
        given.update(parse_overrides(args.set))
        # Unset flags keep the preset's values (LabConfig / lab.QUICK), the one place they live.
        report = run_lab(lab_config(args.quick, **{k: v for k, v in given.items()
                                                   if v is not None}))
        print(f"report: {report['output_dir']}/report.html, report.md, report.json")
    elif args.command == "merge":
        from qlora_lab.merge import MergeConfig, run_merge

        report = run_merge(MergeConfig(**given_fields(args, MergeConfig)))
        print(json.dumps(report, indent=2))
    elif args.command == "export":
        from qlora_lab.export import ExportConfig, run_export

        report = run_export(ExportConfig(**given_fields(args, ExportConfig)))
        print(json.dumps(report, indent=2))
    return 0


def _parse_cap(text: str) -> int | None:
    from qlora_lab.memory import parse_bytes

    if text.lower() == "none":
        return None
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise UserError(f"--memory-cap: {exc}") from None


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # Library chatter drowns our own messages; keep their warnings, drop their info.
    # gguf's writer logs INFO lines (byte order, the files it writes) on every `export`.
    for name in ("transformers", "accelerate", "peft", "bitsandbytes", "datasets", "httpx",
                 "gguf"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes warns on every CPU load that an optional kernel package is missing; the
    # built-in CPU path it falls back to is the one we test with.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:
        # -q is "only warnings and results": transformers' weight-loading bar is neither, and
        # it would stand above a one-line error on stderr.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # transformers >= 5.20 renamed gradient_checkpointing_* to activation_checkpointing_*; peft
    # and our code use the old names, which 5.17 (still supported) has alone. The warning is
    # for library authors, not for someone running a fine-tune.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*(gradient|is_gradient)_checkpointing.*deprecated.*")


def _leave_process_group() -> None:
    """Under torchrun, destroy the process group once a command has finished. Left to the
    interpreter's exit, gloo's worker threads can still hold tensors while Python is torn
    down, and the process aborts ("terminate called without an active exception", SIGABRT;
    pytorch/pytorch#179291): torchrun then reports a run that finished as failed (a two-process
    CPU test met it once in session 27). Only after success: on an error path the other ranks
    may be inside a collective, and NCCL's destroy is not safe to call alone then."""
    dist = sys.modules.get("torch.distributed")  # nothing to leave if it was never imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by bench
    _setup_logging(args.quiet)
    try:
        code = _command(args)
        _leave_process_group()
        return code
    except TrainingInterrupted as exc:
        # Not an error: a checkpoint was saved on request; the message says how to resume.
        print(f"qlora-lab {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        if args.debug:
            raise
        print(f"qlora-lab {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"qlora-lab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
