"""`qlora-lab eval`: held-out loss, perplexity and answer quality of an adapter or a model.

Every row of `--data` is read by `qlora_lab.sources` and validated by `qlora_lab.data` (the
same schemas, the same one-line errors as `train`) and rendered by the same functions training
used, so:

- the loss is over answer tokens only, masked exactly as in training (`render_segments` +
  `tokenize_segments`, cut as training cuts by `encode_conversation`), averaged over tokens
  (not rows), and perplexity = exp(loss);
- the answer is generated greedily from the prompt `generate` would build (`render_prompt` via
  `generate.generate_reply`), long enough for the longest reference, then scored against the
  row's reference with ROUGE-L F1 (Google's `rouge-score`, the common reference) and, for
  categories whose answers are short facts or labels, normalised exact match.

With `--compare-base` the base the adapter was trained on is measured too: the adapter is
switched off inside the same loaded model (peft's `disable_adapter`), so both columns share the
exact quantized weights, tokenizer and prompt template, and differ only by the adapter.

Every row is checked against the loaded model before anything is computed: a prompt that fills
the model's context (`max_position_embeddings`) is refused, as `generate` refuses it, and the loss
and the answers stay within that context too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lab import child, fsio
from qlora_lab.config import DataConfig
from qlora_lab.data import (
    CLIP_CHARS_PER_TOKEN,
    IGNORE_INDEX,
    PadCollator,
    detect_schema,
    encode_conversation,
    rename_columns,
    render_prompt,
    row_to_messages,
)
from qlora_lab.errors import UserError
from qlora_lab.generate import (
    GenerateConfig,
    load_for_inference,
    model_context,
    stop_token_ids,
    template_source,
)
from qlora_lab.sources import bad_row, first_line, read_rows

log = logging.getLogger(__name__)

# Dolly categories whose references are a label or a short fact, where exact match means
# something; for open-ended answers (brainstorming, summaries) it is ~0 and only ROUGE-L is shown.
EXACT_MATCH_CATEGORIES = ("classification", "closed_qa")
UNCATEGORIZED = "uncategorized"
REPORT_FILES = ("predictions.jsonl", "eval.md", "eval.json")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, on which rows, and where the report goes.

    adapter: a run's output dir (or its adapter/ dir); the base it records is loaded under it.
    model_dir: a merged model written by `merge`. model: a base model (preset, hub id, dir), or
        with `adapter` an override of the recorded base.
    data: a .jsonl/.json/.csv/.parquet file (dolly, alpaca or chat rows); Dolly's `category`
        groups the quality scores, rows without one count as "uncategorized".
    compare_base: also measure the adapter's base (adapter switched off) and report deltas.
    max_rows: evaluate only the first N rows; 0 = all. Generation dominates the run time.
    max_new_tokens: generation cap per answer; None (the default) = the longest reference of the
        evaluated rows in the model's tokens plus its end-of-turn marker, within the model's
        context (see `answer_token_cap`). A model that never stops costs this many decode steps
        per batch: pass a number to bound the time, knowing longer references cannot score 1.
    max_seq_len: rows are truncated to this many tokens for the loss, as `data.max_seq_len`
        truncates them in training (same default).
    loss_batch_size: rows per forward pass for the loss; memory is batch x seq x vocab x 4 B.
    generate_batch_size: prompts answered per `generate` call (greedy, left-padded); 1 = one at
        a time, exactly like `qlora-lab generate`.
    skip_bad_rows: skip malformed rows (and report how many) instead of stopping at the first.
    skip_long_rows: skip rows whose prompt does not fit the model's context (and report how
        many) instead of stopping at the first.
    columns: rename the file's columns to a schema's fields first, as `data.columns` does for
        `train` (`instruction=question,response=answer`).
    output_dir: where eval.json, eval.md and predictions.jsonl go; None = <run dir>/eval for an
        adapter, ./eval otherwise.
    device: `auto` = CUDA when available, else CPU.
    allow_pickle: accept pickle weights (.bin) where safetensors are missing; they can run code.
    trust_remote_code: let a base recorded with trust_remote_code run its repo's code.
    """

    adapter: str | None = None
    model_dir: str | None = None
    model: str | None = None
    data: str | None = None
    compare_base: bool = False
    max_rows: int = 0
    # Was a fixed 128, which cut 17 % of Dolly's references (SmolLM2 tokens; 512 still cuts 2 %,
    # the longest is 1,916): a cut reference cannot score 1 whatever the model says, so the
    # default now follows the references themselves (issue #13).
    max_new_tokens: int | None = None
    max_seq_len: int = 1024
    loss_batch_size: int = 4
    generate_batch_size: int = 8
    skip_bad_rows: bool = False
    skip_long_rows: bool = False
    columns: str = ""
    output_dir: str | None = None
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise UserError("no data — pass --data FILE (.jsonl/.json/.csv/.parquet rows with "
                            "reference answers)")
        if self.adapter is not None and self.model_dir is not None:
            raise UserError("pass either --adapter or --model-dir, not both")
        if self.model_dir is not None and self.model is not None:
            # It would be ignored: a merged model has its base in it.
            raise UserError("--model-dir is a whole model: pass it without --model (or pass "
                            "--model alone to evaluate a base)")
        if self.adapter is None and self.model_dir is None and self.model is None:
            raise UserError("nothing to evaluate — pass --adapter DIR (a trained run), "
                            "--model-dir DIR (a merged model) or --model NAME (a base model)")
        if self.compare_base and self.adapter is None:
            raise UserError("--compare-base needs --adapter (the base is the one the adapter "
                            "was trained on); to measure a base alone pass --model NAME")
        for name in ("max_new_tokens", "max_seq_len", "loss_batch_size", "generate_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a "
                                "positive integer")
        DataConfig(columns=self.columns)  # a malformed mapping fails here, in one line
        if self.max_rows < 0:
            raise UserError(f"--max-rows {self.max_rows} must be >= 0 (0 = all rows)")


@dataclass(frozen=True)
class EvalRow:
    """One validated row: its messages, the prompt to answer, and the reference answer."""

    where: str
    category: str
    messages: list
    prompt: list
    reference: str


# --- metrics -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imports nltk: only when answers are scored

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 exactly as Google's `rouge-score` package computes it, so scores compare with
    published ones: text lowercased, every run of characters outside [a-z0-9] read as a space
    (accented letters and other scripts drop out), no stemming; R = LCS / reference words,
    P = LCS / predicted words, F1 = 2PR / (P + R) (Lin 2004, section 3.1, with beta = 1).
    A text with no such words on either side scores 0, two empty texts too.
    """
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: "Yes." and " yes" compare equal."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


# --- rows ----------------------------------------------------------------------------------------


def _category(values) -> str:
    category = values.get("category") if isinstance(values, dict) else None
    return category.strip() if isinstance(category, str) and category.strip() else UNCATEGORIZED


def load_eval_rows(cfg: EvalConfig) -> tuple[list[EvalRow], int]:
    """Validated rows (the schema comes from the first parsed row) and how many were skipped."""
    rows = read_rows(cfg.data)
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    rows = rename_columns(rows, DataConfig(columns=cfg.columns).column_map())
    first = next((r for r in rows if isinstance(r.values, dict)), rows[0])
    if isinstance(first.values, UserError):
        raise first.values  # no row parsed: the first one's own error names file and line
    schema = detect_schema(first.values, first.where)
    out, skipped = [], 0
    for row in rows:
        try:
            messages = row_to_messages(row, schema)
        except UserError:
            if not cfg.skip_bad_rows:
                raise
            skipped += 1
            continue
        # The reference is the last assistant turn; the prompt is everything before it, which is
        # exactly what the model saw when training produced that turn.
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(EvalRow(row.where, _category(row.values), messages, messages[:last],
                           messages[last]["content"].strip()))
    if not out:
        raise UserError(f"data file {cfg.data} has no valid rows ({skipped} skipped) — fix the "
                        "rows or pass another file")
    return out, skipped


# --- rows against the model ----------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedRows:
    """The rows to evaluate, checked against the loaded model, and what every column shares."""

    rows: list  # EvalRow, each with a prompt that fits the model's context
    examples: list  # {input_ids, labels} per row, cut as training cuts them
    prompt_tokens: list  # per row, the prompt as `generate` renders it
    max_seq_len: int  # the loss's cut: EvalConfig.max_seq_len, within the model's context
    bad_rows_skipped: int  # rows the chat template rejects (with skip_bad_rows)
    long_rows_skipped: int  # rows whose prompt fills the context (with skip_long_rows)


def _check_chat_template(loaded, row: EvalRow) -> None:
    """Fail once, naming the template, when it does not parse: every row would fail to render,
    and `data` would blame the first row's data for it."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        render_prompt(row.prompt, loaded.tokenizer, loaded.template, add_generation_prompt=True)
    except TemplateSyntaxError as exc:
        raise UserError(f"{template_source(loaded.tokenizer)} does not parse ({first_line(exc)}, "
                        f"template line {exc.lineno}) — fix the template there, or restore it "
                        "from the base model; the data is not at fault") from None
    except TemplateError:
        pass  # this conversation's own problem: reported below with its file and line


def count_prompt_tokens(loaded, row: EvalRow, context: int | None) -> tuple[int, bool]:
    """(tokens of the row's prompt as `generate` renders it, whether that count is exact).

    Past CLIP_CHARS_PER_TOKEN x (context + 1) characters a text holds more tokens than the context
    whatever it says (see `data.clip_messages`), so only that much is counted, and a 50 MB row
    costs no more than a long one; the count is then a lower bound, already over the context.
    """
    from jinja2 import TemplateError

    try:
        text = render_prompt(row.prompt, loaded.tokenizer, loaded.template,
                             add_generation_prompt=True)
    except TemplateError as exc:  # e.g. a template that demands alternating user/assistant
        raise bad_row(row.where, f"the chat template rejects this conversation "
                      f"({first_line(exc)})") from None

    def count(part: str) -> int:
        return len(loaded.tokenizer(part, add_special_tokens=False)["input_ids"])

    if context is not None and len(text) > CLIP_CHARS_PER_TOKEN * (context + 1):
        n = count(text[: CLIP_CHARS_PER_TOKEN * (context + 1)])
        if n >= context:
            return n, False
    return count(text), True


def encode_rows(loaded, rows: list[EvalRow], cfg: EvalConfig) -> EncodedRows:
    """Check every row against the model and encode it for the loss, before any is evaluated.

    A prompt that fills the model's context leaves no room for an answer, and past the context the
    model runs at positions it was never trained on: such a row is refused here (or skipped with
    `skip_long_rows`), as `generate` refuses such a prompt, instead of costing minutes of
    generation and a report computed past the context. The loss rows are cut to the context for
    the same reason.
    """
    context = model_context(loaded.model.config)
    max_seq_len = cfg.max_seq_len if context is None else min(cfg.max_seq_len, context)
    _check_chat_template(loaded, rows[0])
    kept, examples, lengths, bad, long, stats = [], [], [], 0, 0, Counter()
    for row in rows:
        try:
            n, exact = count_prompt_tokens(loaded, row, context)
            example = None  # the prompt fills the context
            if context is None or n < context:
                # The same cut as training (prompt first, the answer keeps its end token), so
                # the held-out loss here equals the training-time eval loss on the same rows.
                example = encode_conversation(row.messages, loaded.tokenizer, loaded.template,
                                              max_seq_len, stats=stats, where=row.where)
        except UserError:
            if not cfg.skip_bad_rows:
                raise
            bad += 1
            continue
        if example is None:
            if not cfg.skip_long_rows:
                raise UserError(f"{row.where}: the prompt is {n:,} tokens{'' if exact else '+'}, "
                                f"but the model reads at most {context:,} "
                                "(max_position_embeddings) — shorten the row, or pass "
                                "--skip-long-rows to skip such rows")
            long += 1
            continue
        kept.append(row)
        examples.append(example)
        lengths.append(n)
    if not kept:
        raise UserError(f"data file {cfg.data} has no row left to evaluate ({long} longer than "
                        f"the model's context, {bad} rejected by its chat template) — pass rows "
                        "that fit the model, or another model")
    if stats["truncated"]:
        log.info("%d rows are longer than %d tokens%s, so the loss reads them cut as training "
                 "cuts them", stats["truncated"], max_seq_len,
                 " (the model's context)" if max_seq_len < cfg.max_seq_len else "")
    return EncodedRows(kept, examples, lengths, max_seq_len, bad, long)


# --- loss ----------------------------------------------------------------------------------------


@torch.inference_mode()
def heldout_loss(model, examples: list[dict], pad_token_id: int, batch_size: int) -> tuple:
    """(token-weighted mean cross-entropy over answer tokens, number of answer tokens).

    The same loss as transformers' causal-LM loss in training: logits at position t predict the
    label at t + 1, labels of -100 (prompt, padding) are skipped. Summing per batch and dividing
    once at the end weights every answer token equally, whatever row or batch it sits in.
    """
    collate = PadCollator(pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size])
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        return float("nan"), 0  # every answer truncated away: report it, do not divide by 0
    return total / count, count


# --- one model -----------------------------------------------------------------------------------


ANSWER_END_TOKENS = 8  # room for the template's end-of-turn marker ("<|im_end|>\n" is 2 tokens)


def answer_token_cap(loaded, rows: list[EvalRow], max_new_tokens: int | None) -> int:
    """`max_new_tokens` if given, else enough for the longest reference, within the context."""
    if max_new_tokens is not None:
        return max_new_tokens
    tok = loaded.tokenizer
    longest = max(len(tok(row.reference, add_special_tokens=False)["input_ids"]) for row in rows)
    cap = longest + ANSWER_END_TOKENS
    context = model_context(loaded.model.config)
    return min(cap, context) if context is not None else cap


def answer_batches(prompt_tokens: list[int], context: int | None, max_new_tokens: int,
                   batch_size: int) -> list[tuple[int, list[int]]]:
    """(new-token cap, row indices) of each `generate` call, every row's answer within the context.

    A row whose prompt leaves less room than `max_new_tokens` gets only that room, as `generate`
    cuts it (`fit_new_tokens`). A cap holds for a whole call, so rows share calls with rows of
    the same cap: a long prompt never shortens the answers batched beside it.
    """
    by_cap: dict[int, list[int]] = {}
    for i, n in enumerate(prompt_tokens):
        cap = max_new_tokens if context is None else min(max_new_tokens, context - n)
        by_cap.setdefault(cap, []).append(i)
    return [(cap, idx[start: start + batch_size]) for cap, idx in by_cap.items()
            for start in range(0, len(idx), batch_size)]


def _scores(rows: list[EvalRow], predictions: list[str], idx: list[int]) -> dict:
    em_idx = [i for i in idx if rows[i].category in EXACT_MATCH_CATEGORIES]
    rouge = sum(rouge_l(predictions[i], rows[i].reference) for i in idx) / len(idx)
    em = (sum(exact_match(predictions[i], rows[i].reference) for i in em_idx) / len(em_idx)
          if em_idx else None)
    return {"n": len(idx), "rouge_l": rouge, "exact_match": em, "exact_match_n": len(em_idx)}


def score_answers(rows: list[EvalRow], predictions: list[str]) -> dict:
    """{"overall": scores of every row, "categories": {category: scores}}, where scores are n,
    mean ROUGE-L F1, and exact match over the rows where it is meaningful.

    The overall scores have their own key: a category is whatever string the data holds, so no
    name for them could be kept from colliding with one ("all" is a category in some files).
    """
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.category, []).append(i)
    return {"overall": _scores(rows, predictions, list(range(len(rows)))),
            "categories": {name: _scores(rows, predictions, groups[name])
                           for name in sorted(groups)}}


def encode_prompts(loaded, prompts: list[list]):
    """Render prompts as `generate` does and left-pad them into one batch on the model's device.

    Left padding keeps every row's last prompt token at the end, where generation continues.
    """
    tok = loaded.tokenizer
    texts = [render_prompt(p, tok, loaded.template, add_generation_prompt=True) for p in prompts]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    return enc.to(loaded.model.device)


@torch.inference_mode()
def generate_batch(loaded, prompts: list[list], max_new_tokens: int) -> list[str]:
    """Greedy answers to several prompts in one `generate` call.

    Prompts are rendered by `render_prompt`, exactly as `generate` renders one. Batching matters
    on CPU: a 4-bit decode step costs about the same for 1 row as for 8 (the per-layer
    dequantization dominates), so one batch of 8 is ~8x faster than 8 calls. Prompts are padded
    on the left so every answer starts right after its own prompt; the attention mask hides the
    padding, and generate derives position ids from it.
    """
    tok = loaded.tokenizer
    enc = encode_prompts(loaded, prompts)
    out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                temperature=None, top_p=None, top_k=None,
                                eos_token_id=stop_token_ids(loaded), pad_token_id=tok.pad_token_id,
                                use_cache=True)
    return [tok.decode(row, skip_special_tokens=True).strip()
            for row in out[:, enc["input_ids"].shape[1]:]]


def evaluate_model(loaded, encoded: EncodedRows, cfg: EvalConfig, label: str) -> tuple:
    """Loss, perplexity, overall and per-category scores of one model; also its predictions."""
    from tqdm.auto import tqdm

    rows = encoded.rows
    loss, n_tokens = heldout_loss(loaded.model, encoded.examples, loaded.tokenizer.pad_token_id,
                                  cfg.loss_batch_size)
    predictions: list[str] = [""] * len(rows)
    batches = answer_batches(encoded.prompt_tokens, model_context(loaded.model.config),
                             cfg.max_new_tokens, cfg.generate_batch_size)
    with tqdm(total=len(rows), desc=f"generating ({label})", unit="row") as bar:
        for cap, idx in batches:
            answers = generate_batch(loaded, [rows[i].prompt for i in idx], cap)
            for i, answer in zip(idx, answers):
                predictions[i] = answer
            bar.update(len(idx))
    result = {"loss": loss, "perplexity": math.exp(loss) if math.isfinite(loss) else None,
              "answer_tokens": n_tokens, **score_answers(rows, predictions)}
    return result, predictions


# --- report --------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def _delta(new, old, digits: int = 3) -> str:
    if new is None or old is None or not math.isfinite(new - old):
        return "–"
    return f"{new - old:+.{digits}f}"


def _metric_rows(result: dict) -> list[tuple[str, int, str, object]]:
    """(metric, n, key path, value) in table order.

    Overall rows read "ROUGE-L F1 (overall)", category rows "ROUGE-L F1: <category>": the colon
    keeps any category name, "overall" or "all" included, from reading as the overall row.
    """
    named = [("ROUGE-L F1 (overall)", "exact match (overall)", "", result["overall"])]
    for name, s in result["categories"].items():
        shown = " ".join(name.split()).replace("|", "\\|")  # one table cell, whatever the data
        named.append((f"ROUGE-L F1: {shown}", f"exact match: {shown}", f":{name}", s))
    out = [("held-out loss (answer tokens)", result["answer_tokens"], "loss", result["loss"]),
           ("perplexity", result["answer_tokens"], "perplexity", result["perplexity"])]
    out += [(rouge, s["n"], "rouge_l" + key, s["rouge_l"]) for rouge, _, key, s in named]
    out += [(em, s["exact_match_n"], "em" + key, s["exact_match"])
            for _, em, key, s in named if s["exact_match"] is not None]
    return out


def markdown_table(models: dict) -> str:
    """One row per metric, one column per model; with two models a delta column (second - first).

    n is answer tokens for loss and perplexity, rows for the answer scores.
    """
    names = list(models)
    columns = [{key: value for _, _, key, value in _metric_rows(models[m])} for m in names]
    header = "| metric | n | " + " | ".join(names) + (" | delta |" if len(names) == 2 else " |")
    lines = [header, "|---|---:|" + "---:|" * (len(names) + (len(names) == 2))]
    for metric, n, key, _ in _metric_rows(models[names[-1]]):
        values = [col.get(key) for col in columns]
        cells = [_fmt(v) for v in values]
        if len(names) == 2:
            cells.append(_delta(values[1], values[0]))
        lines.append(f"| {metric} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def command_line(cfg: EvalConfig) -> str:
    """The `qlora-lab eval` invocation that repeats this evaluation (recorded in eval.json)."""
    parts = ["qlora-lab", "eval"]
    for field in dataclasses.fields(cfg):
        value, default = getattr(cfg, field.name), field.default
        if value == default:
            continue
        flag = "--" + field.name.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def _adapter_ref(cfg: EvalConfig):
    from qlora_lab.adapters import resolve_adapter

    return resolve_adapter(cfg.adapter, cfg.model, allow_pickle=cfg.allow_pickle,
                           trust_remote_code=cfg.trust_remote_code)


def _default_output_dir(cfg: EvalConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    if cfg.adapter:
        adapter_dir = _adapter_ref(cfg).adapter_dir
        # A run dir holds adapter/; a bare adapter dir is its own "run".
        run_dir = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
        return run_dir / "eval"
    return Path("eval")


def _check_output_dir(cfg: EvalConfig) -> tuple[Path, Path]:
    """The report dir, checked but not created, and the folder no write may leave.

    The dir is made only when the report is written: a run that fails on the way (an adapter
    for another base, a row too long) leaves no empty folder behind.

    The default <run dir>/eval sits in a folder that may come from someone else: an `eval` or
    `eval/eval.json` symlink shipped in it must not make us write elsewhere, so that folder is
    the bound. A dir named with --output-dir may itself be a symlink (the user's choice, and
    nothing is replaced or deleted, only files written into it); it is the bound itself.
    """
    out = _default_output_dir(cfg)
    root = out if cfg.output_dir else out.parent
    fix = "remove the link, or pass --output-dir DIR to choose where the report goes"
    fsio.check_inside(root, out, fix)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"output dir {out} is a file or a broken link — pass another --output-dir")
    # The nearest existing folder is where mkdir will start: it must take new entries.
    parent = next(p for p in (out, *out.absolute().parents) if os.path.lexists(p))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output dir {out} cannot be created ({parent} is not a writable "
                        "folder) — pass another --output-dir")
    for name in REPORT_FILES:
        fsio.check_inside(root, out / name, fix)
    return out, root


def _write_reports(out: Path, bound: Path, files: dict[str, str]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output dir {out} cannot be created ({exc.strerror}) — pass another "
                        "--output-dir") from None
    # Checked again as written: the checks in _check_output_dir were minutes of eval ago.
    for name, text in files.items():
        fsio.write_text(out / name, text, inside=bound)


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate, write eval.json / eval.md / predictions.jsonl, and return the eval.json dict.

    Data and output dir are checked before any model is loaded, so a bad path fails in a second;
    every row is checked against the model before any is evaluated; and nothing is written, the
    output dir included, until every number exists (files are replaced atomically).
    """
    started = time.perf_counter()
    rows, skipped = load_eval_rows(cfg)
    out, bound = _check_output_dir(cfg)
    loaded = load_for_inference(GenerateConfig(
        adapter=cfg.adapter, model_dir=cfg.model_dir, model=cfg.model, device=cfg.device,
        allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code))
    if cfg.adapter:
        base_name, label = _adapter_ref(cfg).base_model, "fine-tuned"
    else:
        base_name, label = None, "model"
    encoded = encode_rows(loaded, rows, cfg)
    # The command and config are recorded as given; the cap they resolve to is recorded too.
    max_new_tokens = answer_token_cap(loaded, encoded.rows, cfg.max_new_tokens)
    context = model_context(loaded.model.config)
    room = [context - n for n in encoded.prompt_tokens] if context is not None else []
    short = sum(r < max_new_tokens for r in room)
    if short:
        log.warning("%d of %d prompts leave less than %d tokens of the model's %d, so their "
                    "answers are cut to the room left", short, len(encoded.rows),
                    max_new_tokens, context)
    run_cfg = dataclasses.replace(cfg, max_new_tokens=max_new_tokens)
    models, predictions = {}, {}
    if cfg.compare_base:
        # Same loaded weights with the LoRA layers bypassed: the base as the adapter saw it.
        with loaded.model.disable_adapter():
            models["base"], predictions["base"] = evaluate_model(loaded, encoded, run_cfg, "base")
    models[label], predictions[label] = evaluate_model(loaded, encoded, run_cfg, label)
    table = markdown_table(models)
    report = {
        "command": command_line(cfg),
        "data": str(cfg.data), "rows": len(encoded.rows),
        "bad_rows_skipped": skipped + encoded.bad_rows_skipped,
        "long_rows_skipped": encoded.long_rows_skipped,
        "evaluated": cfg.adapter or cfg.model_dir or cfg.model, "base_model": base_name,
        "template": loaded.template, "device": loaded.device,
        "max_new_tokens": max_new_tokens, "max_seq_len": encoded.max_seq_len,
        "decoding": "greedy",
        "exact_match_categories": list(EXACT_MATCH_CATEGORIES),
        "models": models,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": child.versions(("rouge-score",)),
        "config": dataclasses.asdict(cfg),
    }
    lines = [json.dumps({"where": row.where, "category": row.category,
                         "reference": row.reference,
                         **{name: predictions[name][i] for name in predictions}},
                        ensure_ascii=False) for i, row in enumerate(encoded.rows)]
    _write_reports(out, bound, {
        "predictions.jsonl": "\n".join(lines) + "\n",
        "eval.md": f"# qlora-lab eval\n\n`{report['command']}`\n\n{table}",
        "eval.json": json.dumps(report, indent=2) + "\n"})
    report["table"] = table
    report["output_dir"] = str(out)
    return report
