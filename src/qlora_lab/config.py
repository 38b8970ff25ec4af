"""Run configuration: frozen dataclasses are the single place where defaults live.

Flow: defaults -> YAML file -> CLI flags -> `--set section.key=value` overrides -> validation.
Unknown keys and wrong types are `UserError`s that quote the bad value. The resolved config is
written next to a run's outputs (`config.yaml`) so the run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from qlora_lab import fsio
from qlora_lab.errors import UserError

DEFAULT_MODEL = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
DEFAULT_DATA = "databricks/databricks-dolly-15k"


# Bounds that keep a typo (an extra zero, 1e20) a one-line error instead of an allocation that
# fails deep inside torch. Each is far above any run that fits on hardware that exists today.
MAX_LORA_RANK = 4096
MAX_LORA_ALPHA = 1 << 20
MAX_SEQ_LEN = 1 << 22  # tokens per row; the longest measured trainable row is 98,304
MAX_BATCH = 1 << 16  # micro-batch rows (or bins) and accumulation steps
MAX_STEPS = 10**9
MAX_DATA_WORKERS = 64  # DataLoader processes; each holds a copy-on-write view of the rows
MAX_EPOCHS = 10**6


def resolve_optimizer(setting: str, on_cuda: bool, fsdp: bool = False) -> str:
    """`train.optimizer`, with `auto` resolved as `train` runs it (and `plan` predicts it).

    auto: torch's AdamW (fused: trainer.trainer_optim) everywhere. It was bitsandbytes' paged
    8-bit AdamW on CUDA, but bitsandbytes' step waits for the GPU after every tensor it updates
    (308 waits a step for TinyLlama's adapters), and its paging never applies to adapters of
    usual ranks (it pages only tensors of >= 1e5 elements): torch's fused AdamW trained 11 %
    faster at 160 rows on the H200 (benchmarks/results/fastpath_sweep_h200_run11_async.json)
    for 6 more bytes a LoRA parameter (75 MB for TinyLlama at r=16). Paged 8-bit stays a choice
    for tight budgets. Under FSDP the state shards with the LoRA weights, and paged 8-bit state
    fails to save in FSDP-QLoRA checkpoints (peft docs, accelerate/fsdp.md, caveats).
    """
    if setting == "auto":
        return "adamw_torch"
    if setting != "adamw_torch" and not on_cuda:
        raise UserError(f"train.optimizer = {setting!r} needs CUDA — use 'adamw_torch' or "
                        "'auto' on CPU")
    return setting


def resolve_compile(train: TrainConfig, on_cuda: bool, processes: int = 1,
                    triton_installed: bool | None = None) -> bool:
    """`train.compile`, with `auto` resolved as `train` runs it (and `plan` predicts it).

    auto: on for one process on CUDA with triton (inductor's GPU code generator), for
    micro-batches of more than one row without offloaded activations. Uncompiled, the GPU waits
    on the host's kernel launches: full 1,024-token rows on an H200 trained at 24.8k tok/s
    against 75.4k compiled in one call (benchmarks/results/bench_full_rows_eager_h200_8gib.json,
    archive/bench_full_rows_h200_8gib_run14_0d838f4.json), for 10-30 s of compilation at start. Not for one row a
    micro-batch, the setting that saves memory: compiled layers pad each bin to
    data.max_seq_len (one shape to compile), which for a single short row is mostly padding
    (1 x 2,048 on Dolly rows: 1.36 GiB compiled against 1.06 uncompiled on the H200,
    benchmarks/results/bench_1x2048_compiled_h200_8gib.json). Not with offloaded activations,
    for the longest rows, where the uncompiled MLP runs in tiles (the compiled layers do not).
    Multi-process runs (DDP, FSDP) were measured uncompiled only. On CPU the compiler would
    spend minutes compiling a step the CPU's arithmetic bounds anyway. `triton_installed`:
    None = as on this host.
    """
    if train.compile != "auto":
        return bool(train.compile)
    if (not on_cuda or processes > 1 or train.activation_offload
            or train.micro_batch_size == 1):
        return False
    if triton_installed is None:
        import importlib.util

        triton_installed = importlib.util.find_spec("triton") is not None
    return triton_installed


def with_compile(cfg: RunConfig, compiled: bool) -> RunConfig:
    """`cfg` with `train.compile` resolved (resolve_compile) to what runs."""
    return replace(cfg, train=replace(cfg.train, compile=compiled))


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to fine-tune.

    name: a preset (`tinyllama`, `smollm2-135m`, `tiny-random`), a hub id, a local directory or a
        `.gguf` file.
    trust_remote_code: run code shipped with a hub model. Off: it executes arbitrary Python.
        Only this invocation's `--trust-remote-code` or `--set model.trust_remote_code=true`
        turns it on; a YAML file or a run folder's config.yaml that sets it alone is refused.
    allow_pickle: accept pickle (.bin) weights when a model has no safetensors; they can run code.
    attn_implementation: `sdpa` is fast everywhere torch runs; `eager` is the reference, and
        what `sdpa` loads as for an architecture transformers has no SDPA path for (Gemma 2,
        Bloom), as `plan` counts it.
        `varlen` (training with packing only): each packed row attends only to itself through
        a variable-length kernel (see `varlen_kernel`), with no mask; elsewhere it computes the
        same with SDPA. For rows that fill their bins (long documents clipped at
        `data.max_seq_len`) SDPA needs no mask, and on an H200 it trained 3 % faster than
        `varlen` there (77.7k against 75.4k tok/s with the Triton kernels,
        bench_full_rows_{sdpa,varlen_triton}_s26.json in benchmarks/results; 5-6 % against
        FlashAttention-2's): `varlen` is for shorter rows packed together. `flex_attention`:
        transformers' FlexAttention with a block mask of the packed rows. See
        docs/performance.md for measurements.
    varlen_kernel: which kernel `varlen` attention runs on a GPU. `triton`: qlora-lab's own
        (src/qlora_lab/triton_attention.py: 64-token tiles, the forward's holding a K/V head's
        whole query group, only tiles that hold tokens launched; forward 0.22 against 0.59 ms
        and backward ~2x faster than torch's on 160 Dolly rows on an H200,
        benchmarks/results/attention_triton_h200{,_s27_tilemap}.json); needs triton, compute capability 8.0
        for bf16, head dim <= 128. `flash`: torch's FlashAttention-2 varlen kernel (128 x 128
        tiles). `auto`: triton where it runs, else flash.
    """

    name: str = DEFAULT_MODEL
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention",
                                 "varlen"] = "sdpa"
    varlen_kernel: Literal["auto", "triton", "flash"] = "auto"


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen base weights are stored.

    bits: 4 = QLoRA (bitsandbytes); 16 = plain LoRA on a 16-bit base (more memory, no quant noise).
    quant_type: nf4 suits normally distributed weights (QLoRA paper); fp4 is the older format.
    double_quant: quantize the absmax constants too; saves ~0.37 bit/param for ~free.
    compute_dtype: `auto` = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
        (bf16 matmuls are very slow on most CPUs).
    storage: the dtype bitsandbytes packs 4-bit weights into (`bnb_4bit_quant_storage`). `auto` =
        uint8, except under FSDP, where it must equal the dtype FSDP flattens parameters into
        (the compute dtype): mixed storage dtypes cannot share a flat parameter, and a mismatch
        silently shards the packed bytes as if they were numbers.
    """

    bits: Literal[4, 16] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"


@dataclass(frozen=True)
class LoraConfig:
    """The trainable low-rank adapters.

    r: rank; higher = more capacity and memory. Chosen with `alpha` by a sweep of SmolLM2-135M
        on the Dolly sample (held-out answer loss, benchmarks/results/sweep_defaults.json):
        scale 2 beat scale 1, and r 32 beat r 16 by little for twice the adapter memory and
        optimizer state, so r stays 16 and alpha 32.
    alpha: the adapters' update is scaled by alpha / r (2 by default; see the sweep under `r`).
    target_modules: `all-linear` = every linear projection except lm_head (QLoRA paper; on
        transformers 5 MoE models the fused expert tensors and router are not linear layers:
        they stay frozen, as `plan` counts them); or module names, comma-separated
        (`q_proj,v_proj`) or as a YAML list, matched by their last name component.
    weight_dtype: `float32` (default) keeps the trainable adapter weights, their gradients and
        the optimizer's update in fp32 under bf16/fp16 autocast, as peft does by default: in
        bf16 an update smaller than 1/256 of a weight rounds away, and at the learning rates of
        a cosine schedule's tail most do. `compute` stores them in the compute dtype: faster,
        but those updates are lost.
    dropout: 0 by default, as unsloth and torchtune ship it. peft then skips the dropout kernel
        on every adapter's input, which is faster
        (benchmarks/results/fastpath_sweep_h200_run1.json). The QLoRA paper's 0.05 for small
        models is a `--set lora.dropout=0.05` away.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"
    weight_dtype: Literal["compute", "float32"] = "float32"

    def __post_init__(self) -> None:
        _require(0 < self.r <= MAX_LORA_RANK, "lora.r", self.r,
                 f"a positive integer <= {MAX_LORA_RANK}")
        _require(0 < self.alpha <= MAX_LORA_ALPHA, "lora.alpha", self.alpha,
                 f"a positive integer <= {MAX_LORA_ALPHA}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a float in [0, 1)")
        _require(bool(self.target_modules.replace(",", "").strip()), "lora.target_modules",
                 self.target_modules, "'all-linear' or layer names, e.g. q_proj,v_proj")
        names = [n.strip() for n in self.target_modules.split(",")]
        _require("all-linear" not in names or len([n for n in names if n]) == 1,
                 "lora.target_modules", self.target_modules,
                 "'all-linear' alone, or layer names without it")

    def target_names(self) -> list[str] | None:
        """The comma-separated module names as a list; None for `all-linear`.

        peft reads a bare string as a regular expression that must match a module's full name,
        so `q_proj` alone would match nothing; a list matches name suffixes, which is what
        users mean (models.attach_lora passes it; the planner adapts the same linears).
        """
        if self.target_modules.strip() == "all-linear":
            return None
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


# The fields of each data schema (data.py reads them): the names `data.columns` maps onto.
SCHEMA_FIELDS = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass(frozen=True)
class DataConfig:
    """Where rows come from and how they become token sequences.

    source: a hub dataset name, a local .jsonl/.json/.csv/.parquet file, or a dataset folder (data
        files, with a README declaring configs or not, or one written by `save_to_disk`).
    hub_config: the configuration (subset) of a hub dataset or dataset folder, as
        `load_dataset(source, hub_config)` names it; empty = the dataset's only or default one.
    split: the split of a hub dataset or dataset folder to train on.
    eval_split: hold out this split (`test`, `validation`) of `eval_source`, or of `source` when
        there is none, instead of `eval_fraction` of the training rows.
    mix: draw rows from several sources by weight instead of from `source`: a YAML list of
        `{source: a.jsonl, weight: 0.7}` mappings, each with its own optional `schema`,
        `columns`, `hub_config` and `split`, or `a.jsonl=0.7,b.jsonl=0.3` (a weight defaults to
        1). Each source gives each of its rows at most once, in a shuffle seeded with
        `train.seed`: the total is the most rows the weights allow (capped by `max_rows`), and
        summary.json records the rows drawn from each source.
    schema: `auto` detects it from the first row's keys: dolly (instruction/context/response),
        alpaca (instruction/input/output), chat (messages with role/content), sharegpt
        (conversations with from/value), prompt_completion (TRL's prompt/completion, as strings
        or as message lists) or text (continued pre-training: every token trained).
    columns: rename the file's columns to a schema's fields before detection, as
        `field=column` pairs (`instruction=question,response=answer`) or a YAML mapping
        (`{instruction: question}`); the fields are those in SCHEMA_FIELDS. Column names holding
        `,` or `=` cannot be mapped.
    template: `auto` uses the tokenizer's chat template when it has one, else the plain template
        documented in data.py. Text rows and TRL's string prompt/completion rows are trained as
        written, with no template (TRL does the same), unless `chat`/`plain` is asked for by name.
    train_on_prompt: also compute loss on prompt tokens (default: response tokens only).
    max_seq_len: longer rows are truncated or dropped (`overlength`), and the counts reported.
    overlength: `truncate` cuts a longer row to max_seq_len tokens (the prompt's middle first,
        the answer last); `drop` leaves it out. The counts are in summary.json under `data`.
    eval_source: a separate held-out file; otherwise `eval_fraction` of the rows is held out.
    eval_fraction: the share of rows held out for evaluation when there is no `eval_source`
        (chosen by a shuffle seeded with `train.seed`).
    max_eval_rows: at most this many held-out rows are evaluated, from either source.
    max_rows: use only the first N rows (quick experiments); 0 = all.
    skip_bad_rows: skip malformed rows (and report the count) instead of stopping at the first.
    """

    source: str = DEFAULT_DATA
    hub_config: str = ""
    split: str = "train"
    eval_split: str = ""
    mix: str = ""
    schema: Literal["auto", "dolly", "alpaca", "chat", "sharegpt", "prompt_completion",
                    "text"] = "auto"
    columns: str = ""
    template: Literal["auto", "chat", "plain"] = "auto"
    train_on_prompt: bool = False
    max_seq_len: int = 1024
    overlength: Literal["truncate", "drop"] = "truncate"
    eval_source: str | None = None
    eval_fraction: float = 0.05
    max_eval_rows: int = 200
    max_rows: int = 0
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        _require(8 <= self.max_seq_len <= MAX_SEQ_LEN, "data.max_seq_len", self.max_seq_len,
                 f"an integer in [8, {MAX_SEQ_LEN}]")
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", self.eval_fraction,
                 "a float in [0, 1)")
        _require(self.max_eval_rows >= 0, "data.max_eval_rows", self.max_eval_rows, ">= 0")
        _require(self.max_rows >= 0, "data.max_rows", self.max_rows, ">= 0 (0 = all rows)")
        _require(self.max_eval_rows <= MAX_STEPS and self.max_rows <= MAX_STEPS,
                 "data.max_rows", self.max_rows, f"<= {MAX_STEPS}")
        self.column_map()  # raises on a malformed mapping
        _require(bool(self.split.strip()), "data.split", self.split, "a split name (`train`)")
        _require(not (self.mix and self.eval_split), "data.eval_split", self.eval_split,
                 "empty with data.mix (hold out rows with data.eval_source or eval_fraction)")
        self.mix_sources()  # raises on a malformed mix

    def column_map(self) -> dict[str, str]:
        """`columns` as {schema field: the file's column}."""
        fields_ = sorted({f for names in SCHEMA_FIELDS.values() for f in names})
        mapping: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.columns.split(","))):
            target, sep, column = pair.partition("=")
            target, column = target.strip(), column.strip()
            _require(bool(sep and target and column), "data.columns", self.columns,
                     "field=column pairs, comma-separated (instruction=question,response=answer)")
            _require(target in fields_, "data.columns", self.columns,
                     f"pairs whose field is one of {', '.join(fields_)} (not {target!r})")
            _require(target not in mapping, "data.columns", self.columns,
                     f"pairs with distinct fields ({target!r} is mapped twice)")
            mapping[target] = column
        return mapping

    def mix_sources(self) -> list[tuple[DataConfig, float]]:
        """`mix` as (this config with one source's settings, its weight); [] without a mix.

        Each source's `schema`, `columns`, `hub_config` and `split` are its own (defaults when
        not given), never the top-level ones, so sources of different layouts can be mixed.
        """
        text = self.mix.strip()
        if not text:
            return []
        if text.startswith("["):
            entries = parse_yaml_text(text, "config key data.mix")
            _require(isinstance(entries, list) and bool(entries)
                     and all(isinstance(e, dict) for e in entries), "data.mix", self.mix, MIX_FORMS)
        else:
            entries = []
            for part in filter(None, (p.strip() for p in text.split(","))):
                source, sep, weight = part.rpartition("=")
                entries.append({"source": source.strip(), "weight": weight.strip()} if sep
                               else {"source": part})
            _require(bool(entries), "data.mix", self.mix, MIX_FORMS)  # e.g. ",,," names none
        out = []
        for i, entry in enumerate(entries):
            key = f"data.mix[{i}]"
            unknown = sorted(map(str, set(entry) - MIX_KEYS))
            allowed = ", ".join(sorted(MIX_KEYS))
            _require(not unknown, key, entry,
                     f"a mapping with keys among {allowed} (not {unknown[0] if unknown else ''!r})")
            _require(isinstance(entry.get("source"), str) and bool(entry["source"].strip()), key,
                     entry, "a mapping with a `source` (a file, folder or hub dataset name)")
            check_path_text(entry["source"], f"config key {key}.source")
            weight = entry.get("weight", 1.0)
            try:
                weight = float(weight) if not isinstance(weight, bool) else math.nan
            except (TypeError, ValueError):
                weight = math.nan
            _require(math.isfinite(weight) and weight > 0, f"{key}.weight", entry.get("weight"),
                     "a positive number (the source's share of the rows drawn)")
            values = {"schema": "auto", "columns": "", "hub_config": "", "split": "train",
                      **{k: v for k, v in entry.items() if k != "weight"}, "mix": ""}
            try:
                out.append((_section_from_dict(DataConfig, values, f"{key}.", self), weight))
            except UserError as exc:  # DataConfig's own checks name `data.<field>`: say which
                text = str(exc)
                raise UserError(text if f" {key}." in text
                                else text.replace(" data.", f" {key}.", 1)) from None
        return out


MIX_KEYS = frozenset({"source", "weight", "schema", "columns", "hub_config", "split"})
MIX_FORMS = ("a list of {source, weight} mappings (each may add schema, columns, hub_config, "
             "split), or source=weight pairs, comma-separated (a.jsonl=0.7,b.jsonl=0.3)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping.

    output_dir: the run folder: config.yaml, adapter/, checkpoints/, metrics.jsonl, summary.json.
    micro_batch_size: rows per forward pass (packed into bins or padded).
    grad_accum_steps: micro-batches accumulated into one optimizer step.
        micro_batch_size x grad_accum_steps (x processes) = rows per optimizer step, with packing
        on or off (the QLoRA demo's 16). One micro-batch of 16 rows instead of 4 x 4 accumulation is
        the same step (the loss is averaged over the step's answer tokens either way) in fewer,
        larger forward passes; lower it and raise accumulation when memory is short.
    max_steps: optimizer steps; 0 = run `epochs` over the data instead.
    epochs: passes over the training rows when max_steps is 0 (a fraction is allowed).
    learning_rate: the peak learning rate. 4e-4 won the sweep described under LoraConfig.r
        against 2e-4 and 1e-4 (benchmarks/results/sweep_defaults.json).
    lr_scheduler: the decay after warmup. In the sweep, constant with warmup ended a little
        below linear and cosine in its short runs, where a decaying schedule spends most steps
        at a low rate. Cosine stays: long runs end better annealed.
    warmup_ratio: the share of steps over which the rate rises linearly. 0, 3 and 10 % ended
        alike in the sweep; 3 % guards a long run's first steps against Adam's untrained second
        moments.
    weight_decay: AdamW's decoupled weight decay on the trainable (LoRA) weights.
    optimizer: `auto` = `adamw_torch`, torch's fused AdamW (one kernel; a step with a NaN/inf
        loss is skipped on the device, so the host never waits for the GPU to check it).
        bitsandbytes' 8-bit optimizers (CUDA only) keep the state in 8 bits (6 bytes less a LoRA
        parameter; paged ones move states of >= 1e5 elements to host RAM under pressure) but
        wait for the GPU after each tensor they update: 11 % slower at 160 rows on the H200.
    max_grad_norm: 0.3 follows the QLoRA paper; 4-bit training is sensitive to spikes.
    gradient_checkpointing: recompute activations in backward; slower, far less memory.
    checkpoint_every: with checkpointing, checkpoint only every n-th decoder layer (selective
        checkpointing; the others keep their activations): less recomputation, more memory.
    save_steps / eval_steps / logging_steps: in optimizer steps.
    save_total_limit: how many of the newest checkpoints are kept; older ones are deleted.
    seed: seeds torch, numpy and Python's random, the held-out split and the data order.
    device: `auto` = CUDA when available, else CPU.
    tensorboard: TensorBoard logs in <output_dir>/tensorboard when the tensorboard package is
        installed (a warning says so when it is not; metrics.jsonl has the same numbers).
    report_to: more Trainer integrations, comma-separated (`wandb`, `mlflow`, ...), passed to
        Trainer's `report_to` as they are; each must be installed.
    packing: lay each micro-batch's rows end to end in bins of `data.max_seq_len` tokens (best-fit
        decreasing) instead of padding every row to the longest. Attention and loss never cross
        rows: position_ids restart at each row and the model builds a block-diagonal mask (with
        FlashAttention-2 the bins are flattened into one row, the only layout its packed path
        reads). The rows of a step are the same as without packing; only padding goes.
    fused_loss: compute the LM head and cross-entropy only at supervised (answer) positions, in
        chunks, with the gradient computed in the forward pass, so the full fp32 logits tensor
        never exists: Liger's fused linear cross-entropy where `liger` picks it, else
        qlora-lab's (fusedce.py: the same technique without Liger's three waits for the GPU a
        step; with `compile` on CUDA each chunk's softmax and gradient is one compiled kernel).
    liger: Liger's Triton kernels (RMSNorm, SwiGLU, fused linear cross-entropy) on CUDA when
        liger-kernel is installed, applied to this model's modules only. `auto`: without
        `compile`, all three; with it, none: the compiler's own norm and SwiGLU, fused with the
        residual adds, trained 4-6 % faster on an H200
        (benchmarks/results/fastpath_sweep_h200_run17_liger_loss.json), and fusedce's loss,
        as fast as Liger's there (within 0.3 %, fastpath_sweep_h200_run18_fusedce.json) and
        with no wait for the GPU. `on`: all three, compiled or not (an error where Liger cannot run); `loss`: the head's
        loss only; `off`: none.
    fused_lora: compute each LoRA projection's 4-bit base and adapter (attention and MLP) as
        one autograd function (fusedlora.py): the adapter's matmuls accumulate into the base's
        output and input gradient, so no (tokens x features) tensor is scaled, cloned or summed
        on its own. peft builds the layers (a subclass of its own), so adapter files and peft's
        APIs are unchanged; layers with dropout, DoRA or several adapters run as peft runs them.
        Each keeps its weight's double-quantized block scales in fp32 (4 B per 64 weights), so
        a dequantize is one bitsandbytes call, not three (+1.3 % on the H200 at 160 rows).
    joint_lora: with `fused_lora`, projections that read the same input as one function
        (fusedlora.LoraJoint4bit): an MLP's gate and up, and attention's q, k and v where they
        are separate projections (fusedlora.ProjectionGroup: the first one called computes all
        three). The adapters ride in the base matmuls' inner dimension: x A^T for the group's
        adapters at once, then per projection one matmul [x | x A^T | 0] [W | sB | 0]^T, so no
        (tokens x out) product is written and read back; backward shares one input gradient.
        On an H200 (compiled, 8 GiB cap, TinyLlama) gate/up +4.4 % tok/s at 160 Dolly rows and
        +2.6 % on full rows, q/k/v +1.0 % and +2.0 % more, for one more (tokens x hidden)
        tensor per group at the peak (+0.12 GiB each; benchmarks/results/
        fastpath_sweep_h200_run23_joint*.json, run25_qkv_ab.json). Off: each projection alone.
    activation_offload: keep checkpointed activations in pinned host memory (long contexts).
    data_workers: processes that fetch and pack the next micro-batches while the current one
        trains (PyTorch DataLoader workers, kept for the whole run); 0 = in the training
        process. On an H200 at 160 rows a worker removed the 14-25 ms a step the GPU idled
        while the step's rows were packed (benchmarks/results/profile_step_h200_160rows_
        {adapter_first,workers}.json), but one 10-step run measured no faster, with two slow
        steps (fastpath_sweep_h200_run10_workers.json), so it stays off by default.
    compile: torch.compile each decoder layer (one region per layer, so packed-row masks and the
        loss stay outside compiled code). `auto` (the default): on for one process on CUDA with
        triton installed, for micro-batches of more than one row, unless `activation_offload`
        (config.resolve_compile; `plan` predicts the same). The number of bins in a micro-batch changes from step
        to step: a layer compiles for the first shape, then once with the bin count dynamic,
        and once more for evaluation (no grad), 10-30 s in all. On an H200 (TinyLlama, 8 GiB
        cap, 160 rows per micro-batch, varlen attention) the run reached 77.8k real tok/s
        (benchmarks/results/bench_h200_8gib.json); on full 1,024-token rows 75.4k against 24.8k
        uncompiled in one call (benchmarks/results/archive/bench_full_rows_h200_8gib_run14_
        0d838f4.json, bench_full_rows_eager_h200_8gib.json: the uncompiled path is bound by
        the host's kernel launches). Compiled layers keep the compiler's own
        RMSNorm and SwiGLU under `liger: auto` (see `liger`). Off under `auto` on CPU (minutes
        of compilation for a step the CPU's arithmetic bounds), for multi-GPU runs (measured
        uncompiled only), at one row a micro-batch (compiled layers pad each bin to
        data.max_seq_len: 1 x 2,048 Dolly rows took 1.36 GiB compiled, 1.06 uncompiled) and
        with `activation_offload` (the longest rows, where the uncompiled MLP runs in tiles
        and the compiled one does not); `true` compiles there too.
        Checkpointed layers recompute inside their compiled backward (down_proj is not
        recomputed: +7 % at 160 rows on the H200, benchmarks/results/checkpoint_inside_h200.json),
        on every torch and transformers version; on torch 2.11 through a checkpoint context that tags every
        operator for recomputation, without which its compiler kept every projection's output
        (out of 8 GiB at 64 rows: benchmarks/results/checkpoint_placement_h200.json).
    cuda_graphs: with `compile`, replay each compiled layer's forward and backward as CUDA graphs
        (inductor's CUDA graph trees, torch.compile's `reduce-overhead`): the host launches a
        layer in one call instead of ~180 kernels. Small micro-batches are bound by those
        launches (4 full rows without checkpointing: 0.35 s of GPU work in a 1.1 s step on an
        H200, benchmarks/results/profile_step_h200_full_rows_4x8_nockpt.json), and only small
        micro-batches fit in 8 GiB without recomputing every layer. Off by default: measured
        without a gain so far, since graphs are recorded again for every new micro-batch shape
        (fastpath_sweep_h200_run15_cuda_graphs.json). CUDA and one process only (DDP's and
        FSDP's gradient hooks were never run beside it); training only (evaluation runs
        the compiled layers without graphs); without gradient checkpointing (CUDA graph trees
        start a new generation at a compiled call with no forward pending, so a layer
        recomputed inside backward would overwrite the gradients in flight: torch's rule, not
        run). The layers' norms and SwiGLU are then inductor's, not Liger's (Liger's backward
        writes into its saved inputs, and a graph that mutates its inputs is not graphed);
        Liger's head loss stays.
    """

    output_dir: str = "runs/qlora"
    max_steps: int = 0
    epochs: float = 1.0
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    learning_rate: float = 4e-4  # sweep above: 2.179 at 4e-4 vs 2.217 at 2e-4, 2.272 at 1e-4
    # Sweep (r 32, lr 4e-4): constant with warmup 2.153, linear 2.162, cosine 2.163; 0.5 % in a
    # 64-step run, where a decaying schedule spends the most steps at a low rate. Cosine stays:
    # long runs (Dolly-15k is ~940 steps an epoch) end better annealed, which 64 steps cannot show.
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    # Sweep: 0 %, 3 % and 10 % warmup gave 2.162, 2.163 and 2.163: no effect; 3 % guards a long
    # run's first steps against Adam's untrained second moments.
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"] = "auto"
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    eval_steps: int = 100
    save_steps: int = 100
    save_total_limit: int = 3
    seed: int = 42
    device: Literal["auto", "cuda", "cpu"] = "auto"
    tensorboard: bool = True
    report_to: str = ""
    packing: bool = True
    fused_loss: bool = True
    liger: Literal["auto", "on", "off", "loss"] = "auto"
    fused_lora: bool = True
    joint_lora: bool = True
    activation_offload: bool = False
    data_workers: int = 0
    compile: bool | Literal["auto"] = "auto"
    cuda_graphs: bool = False
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        _require(bool(self.output_dir.strip()), "train.output_dir", self.output_dir,
                 "a non-empty path (an empty one would mean the current folder)")
        for name in ("micro_batch_size", "grad_accum_steps"):
            value = getattr(self, name)
            _require(0 < value <= MAX_BATCH, f"train.{name}", value,
                     f"a positive integer <= {MAX_BATCH}")
        for name in ("logging_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            _require(0 < value <= MAX_STEPS, f"train.{name}", value, "a positive integer")
        _require(0 <= self.max_steps <= MAX_STEPS, "train.max_steps", self.max_steps,
                 f"in [0, {MAX_STEPS}] (0 = use epochs)")
        _require(self.epochs <= MAX_EPOCHS, "train.epochs", self.epochs, f"<= {MAX_EPOCHS}")
        # numpy's and torch's seeding take an unsigned 32-bit seed.
        _require(0 <= self.seed < 2**32, "train.seed", self.seed, "an integer in [0, 2**32 - 1]")
        _require(self.max_steps > 0 or self.epochs > 0, "train.epochs", self.epochs,
                 "> 0 when train.max_steps is 0")
        _require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "> 0")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", self.warmup_ratio,
                 "a float in [0, 1)")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm,
                 ">= 0 (0 = no clipping)")
        _require(0 <= self.data_workers <= MAX_DATA_WORKERS, "train.data_workers",
                 self.data_workers, f"an integer in [0, {MAX_DATA_WORKERS}]")
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every,
                 "a positive integer (1 = every layer)")
        _require(self.compile is not False or not self.cuda_graphs, "train.cuda_graphs",
                 self.cuda_graphs, "false unless train.compile is true or auto (it graphs the "
                 "compiled layers)")
        _require(not (self.cuda_graphs and self.gradient_checkpointing), "train.cuda_graphs",
                 self.cuda_graphs, "false while train.gradient_checkpointing is true (a layer "
                 "recomputed inside backward would start a new graph generation and overwrite "
                 "the gradients in flight); set train.gradient_checkpointing: false with it")
        _require(self.gradient_checkpointing or not self.activation_offload,
                 "train.activation_offload", self.activation_offload,
                 "false when train.gradient_checkpointing is false (it offloads checkpoints)")

    def liger_in_layers(self, liger_on: bool) -> bool:
        """Whether the layers' RMSNorm and SwiGLU are Liger's, Liger being on (`train` builds
        them so, `plan` counts them so). The head's loss: liger_for_loss.

        Not with `liger: loss`, and with `auto` not in compiled layers: the compiler's own
        norm and SwiGLU, fused with the residual adds beside them, trained faster on an H200
        (Dolly rows +4.3 %, full rows +6.0 %, for ~0.5 GiB more at 160 rows:
        benchmarks/results/fastpath_sweep_h200_run17_liger_loss.json); Liger's are opaque
        kernels the compiler cannot fuse. Never with cuda_graphs: Liger's backward writes
        into its saved inputs, and CUDA graph trees leave a graph that mutates its inputs
        ungraphed (run 14 logged "skipping cudagraphs due to mutated inputs" 7 times with
        them, run 15 none without)."""
        if not liger_on or self.liger == "loss" or self.cuda_graphs:
            return False
        return self.liger == "on" or not self.compiled()

    def liger_for_loss(self, liger_on: bool) -> bool:
        """Whether the head's fused loss is Liger's (else fusedce's), Liger being on.

        `on` and `loss`: Liger's. `auto`: Liger's unless `compile` is on; then fusedce's, whose
        chunk softmax the compiler fuses and which never waits for the GPU (Liger waits three
        times a step, fusedce.py)."""
        if not liger_on:
            return False
        return self.liger in ("on", "loss") or not self.compiled()

    def compiled(self) -> bool:
        """`compile` once resolved (config.with_compile); an error while it is `auto`."""
        if self.compile == "auto":  # "auto" is truthy: reading it unresolved would mean "on"
            raise ValueError("train.compile is unresolved ('auto'): resolve it first "
                             "(config.resolve_compile, config.with_compile)")
        return self.compile


@dataclass(frozen=True)
class RunConfig:
    """Everything one `qlora-lab train` needs; nested sections map to YAML sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: a hostile value must not make a huge message."""
    short = reprlib.Repr()  # keyword arguments need Python 3.12
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxdict = 6
    short.maxlevel = 3
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length()} bits>"  # repr() refuses > 4300 digits
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Keys whose values are file system paths (or hub ids, which must survive the same checks).
PATH_KEYS = {"model.name", "data.source", "data.eval_source", "train.output_dir"}
MAX_PATH_COMPONENT_BYTES = 255  # NAME_MAX on Linux, macOS and Windows file systems
MAX_PATH_BYTES = 4096


def check_path_text(text: str, what: str) -> str:
    """Refuse a path no file system accepts (a NUL byte, a 256-byte name) with one line.

    Python raises ValueError or OSError(ENAMETOOLONG) for such paths at the first stat, deep
    inside whatever touches them first.
    """
    if not text.strip():
        # "" would be read as the current folder (a model dir, an output dir) or ignored.
        raise UserError(f"{what} is empty — pass a non-empty path or name")
    encoded = text.encode("utf-8", "surrogateescape")
    if "\0" in text:
        raise UserError(f"{what} = {_short(text)} holds a NUL byte, which no path can — fix it")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > MAX_PATH_COMPONENT_BYTES or len(encoded) > MAX_PATH_BYTES:
        raise UserError(f"{what} = {_short(text)} is too long for a path (a name is at most "
                        f"{MAX_PATH_COMPONENT_BYTES} bytes, a path {MAX_PATH_BYTES}) — shorten it")
    return text


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"config key {key} = {_short(value)} is invalid: must be {allowed}")


# --- building a config from YAML and overrides -------------------------------------------------


def check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` as `annotation` requires, or raise a one-line error quoting it."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        # torch and numpy index with int64; larger never works (and str() may refuse it)
        raise UserError(f"config key {key} = {_short(value)} is invalid: too large")
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            # YAML 1.1 reads a bare on/off as a boolean; for an on/off switch that is what
            # the user wrote.
            value = "on" if value else "off"
        if value in choices and type(value) is type(choices[0]):
            return value
        allowed = ", ".join(repr(c) for c in choices)
        raise UserError(f"config key {key} = {_short(value)} is invalid: must be one of "
                        f"{allowed}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return check_type(key, value, inner[0])
        for arm in inner:  # bool | Literal["auto"]: the first arm that takes the value
            try:
                return check_type(key, value, arm)
            except UserError:
                pass
        names = " or ".join(
            ", ".join(repr(c) for c in typing.get_args(a)) if typing.get_origin(a) is Literal
            else getattr(a, "__name__", str(a)) for a in inner)
        raise UserError(f"config key {key} = {_short(value)} has the wrong type: expected "
                        f"{names}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # torch and numpy index with int64; larger never works
                raise UserError(f"config key {key} = {_short(value)} is invalid: too large")
            return value
    elif annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)  # an int here is < 2**63 (checked above): no overflow
        elif isinstance(value, str):
            # YAML 1.1 reads `2e-4` (no dot) as a string; accept what Python reads as a float.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"config key {key} = {_short(value)} is invalid: must be a finite "
                                  "number")
            return number
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value)
            if key in PATH_KEYS:
                check_path_text(text, f"config key {key}")
            return text
    type_name = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"config key {key} = {_short(value)} has the wrong type: expected "
                    f"{type_name}")


def _section_from_dict(cls: type, values: dict, prefix: str, base: Any) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    updates = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key {prefix}{_clip(str(key))}: known keys in "
                            f"{prefix.rstrip('.')} "
                            f"are {', '.join(sorted(known))}")
        if key == "target_modules" and isinstance(value, list):
            value = ",".join(str(v) for v in value)  # [q_proj, v_proj] in YAML or --set
        if key == "columns" and isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())  # {instruction: question}
        if key == "mix" and isinstance(value, list):  # kept as YAML text: see mix_sources
            value = yaml.safe_dump(value, default_flow_style=True, width=math.inf,
                                   allow_unicode=True, sort_keys=False).strip()
        updates[key] = check_type(prefix + key, value, hints[key])
    return replace(base, **updates)


def config_from_dict(values: dict, base: RunConfig | None = None) -> RunConfig:
    """Merge a nested mapping (as read from YAML) onto `base` (defaults if None), validating."""
    base = base or RunConfig()
    if not isinstance(values, dict):
        raise UserError(f"config must be a mapping of sections, got {type(values).__name__}")
    sections = {f.name: f for f in fields(RunConfig)}
    updates = {}
    for name, section_values in values.items():
        if name not in sections:
            raise UserError(f"unknown config section {_short(name)}: known sections are "
                            f"{', '.join(sections)}")
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise UserError(f"config section {name} must be a mapping, got "
                            f"{_short(section_values)}")
        section_cls = typing.get_type_hints(RunConfig)[name]
        updates[name] = _section_from_dict(section_cls, section_values, f"{name}.",
                                           getattr(base, name))
    return replace(base, **updates)


# A config is a few hundred bytes. The bounds stop a "billion laughs" file (a few hundred bytes
# of nested aliases that expand to billions of nodes) before it expands: the node graph is
# composed without expanding aliases, then its expanded size is counted with shared subtrees
# counted once per reference.
MAX_YAML_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000
# A config is a few levels deep (section, key, a list of mix entries, their fields). Checked on
# the parser's events, which PyYAML produces without recursion, before the recursive composer
# runs: catching its RecursionError alone depended on the interpreter's recursion limit, which
# libraries raise (torch.compile does), and a deep enough file then got through to a
# confusing error, or could exhaust the C stack.
MAX_YAML_DEPTH = 64


class InvalidYaml(UserError):
    """Text that is not YAML at all (`--set` then takes it as a plain string)."""


def _expanded_size(node, memo: dict) -> int:
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a node that contains itself (a recursive alias) counts once
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[key]


def _deeper_than(text: str, limit: int) -> bool:
    """Whether collections nest more than `limit` deep, from the parser's event stream."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > limit:
                return True
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return False


def _duplicate_key(node: yaml.Node, seen: set[int]) -> tuple[str, yaml.Mark] | None:
    """The first scalar key given twice in one mapping, with where its second copy starts."""
    if id(node) in seen:  # an alias: the anchored node was checked where it was defined
        return None
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in keys and key.tag != "tag:yaml.org,2002:merge":
                    return key.value, key.start_mark
                keys.add(key.value)
            found = _duplicate_key(value, seen)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item, seen)
            if found is not None:
                return found
    return None


def parse_yaml_text(text: str, where: str) -> Any:
    """Parse YAML data (never code: safe tags only) within size and alias-expansion bounds."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{where} is {len(text)} characters; a config is at most "
                        f"{MAX_YAML_BYTES} — check that this is the right file")
    loader = yaml.SafeLoader(text)
    try:
        if _deeper_than(text, MAX_YAML_DEPTH):
            raise RecursionError  # reported below, as the composer's own would be
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise UserError(f"{where} expands to more than {MAX_YAML_NODES} values through "
                            "YAML aliases (&anchor/*alias) — write the values out, without "
                            "nested aliases")
        duplicate = _duplicate_key(node, set())
        if duplicate is not None:
            # PyYAML keeps the last of two equal keys; the first setting would vanish unsaid.
            key, mark = duplicate
            raise InvalidYaml(f"{where} line {mark.line + 1}: key {_short(key)} is given twice "
                              "in the same section — keep one")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        # Where and what: PyYAML's first line ("while scanning ...") says neither.
        mark = exc.problem_mark or exc.context_mark
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or type(exc).__name__
        raise InvalidYaml(f"{where} is not valid YAML:{at}: {problem[:200]}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidYaml(f"{where} is not valid YAML: {first[:200]}") from None
    except RecursionError:
        raise UserError(f"{where} is nested too deeply to be a config — flatten it") from None
    except (ValueError, OverflowError) as exc:  # an int of over 4300 digits, a float overflow
        raise InvalidYaml(f"{where} holds a value YAML cannot read ({str(exc)[:100]}) — use a "
                          "number of ordinary size") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"config file {path} is not a regular file (a folder, a device or a "
                        "pipe) — pass a YAML file to --config")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist — pass an existing YAML file to --config")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UserError(f"config file {path} is {path.stat().st_size} bytes; a config is at "
                            f"most {MAX_YAML_BYTES} — check that this is the right file")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not valid YAML: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read ({exc.strerror})") from None
    return parse_yaml_text(text, f"config file {path}") or {}


def split_set_pair(pair: str, depth: int) -> tuple[list[str], Any]:
    """One `--set KEY=VALUE`, the grammar `train`, `plan`, `bench` and `lab` share.

    KEY is `depth` dotted names (`lora.r` for a run config, `seeds` for lab) and ends at the first
    `=`. VALUE is read as YAML data (`8`, `true`, `2e-4`, `[q_proj, v_proj]`, `{a: b}`); text
    that is not YAML stays the text as written. Raises ValueError for a malformed pair; the
    value's type is checked later, against the field it sets.
    """
    key, sep, raw = pair.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != depth or not all(parts):
        raise ValueError(pair)
    try:
        value = parse_yaml_text(raw, f"--set {_short(key)}") if raw.strip() else ""
    except InvalidYaml:
        value = raw  # not YAML: the text as written, then type-checked like any value
    return parts, value


def set_list(value: Any) -> list:
    """A list-valued `--set` value as its items: a YAML list (`[0, 1]`) as it is, comma-separated
    text (`0,1`, `nf4, 16bit`) split and each item read as YAML, one scalar as one item."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                items.append(parse_yaml_text(part, "--set item"))
            except InvalidYaml:
                items.append(part)
        return items
    return [value]


def parse_overrides(pairs: list[str]) -> dict:
    """Turn `["train.max_steps=5", "lora.r=8"]` into a nested dict, YAML-typing each value."""
    nested: dict = {}
    for pair in pairs:
        try:
            (section, key), value = split_set_pair(pair, depth=2)
        except ValueError:
            raise UserError(f"--set {_short(pair)} is malformed: use --set section.key=value "
                            "(e.g. --set lora.r=8, --set lora.target_modules=[q_proj,v_proj])"
                            ) from None
        nested.setdefault(section, {})[key] = value
    return nested


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write `cfg` as YAML atomically: a kill leaves the old file or the new one, never a
    truncated config for `--resume` to read, and a symlink at `path` is replaced, not followed."""
    fsio.write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(path: str | Path) -> RunConfig:
    """Read a `config.yaml` written by `train` (or by hand)."""
    return config_from_dict(load_yaml(path))
