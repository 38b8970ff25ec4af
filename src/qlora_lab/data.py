"""Rows -> messages -> prompt text -> token ids with a loss mask -> padded batches.

Rows come from sources.py: a file, a dataset folder or hub dataset, or a weighted mix of several
(`data.mix`, `_draw_mix`). Schemas (auto-detected per source; `data.columns` renames a file's
columns to these fields first):
- dolly:    instruction, context (optional), response
- alpaca:   instruction, input (optional), output
- chat:     messages = [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
- sharegpt: conversations = [{"from": "system"|"human"|"gpt"|"tool", "value": str}, ...]
- prompt_completion (TRL): prompt and completion, both strings (trained as written: loss on the
            completion) or both message lists (rendered as a chat: loss on the completion's
            assistant turns)
- text:     text (continued pre-training: trained as written, loss on every token)

Prompt format. With the tokenizer's chat template (template `chat`, the default when the tokenizer
has one) rows are rendered exactly as `apply_chat_template` renders them, so inference with the
same template sees the same text. Without one (template `plain`) this documented format is used:

    <bos>### Instruction:
    {instruction}

    Context: {context}

    ### Response:
    {response}<eos>

(system turns render as `### System:`, tool turns as `### Tool:`; multi-turn chats repeat
Instruction/Response blocks.) Rows trained as written (template `raw`: text rows, TRL's string
prompt/completion rows) are their texts end to end, as TRL trains them: the BOS token if the
tokenizer adds one to plain text, then the prompt, then the answer and EOS.
Training and `generate` share `render_prompt`, so the two can never drift apart.

Answer masks. A chat template with `{% generation %}` blocks marks what the assistant says, and
those marks are the mask (as in TRL's assistant-only loss). Otherwise each answer is what
rendering it adds after its prompt (`render_segments`). Either way every assistant turn of a
multi-turn row is trained, except the prompt side of TRL's conversational rows.

A row over `data.max_seq_len` tokens loses the middle of its prompt first, then the end of its
last answer's text, but never that answer's end-of-turn marker (`fit_to_length`). A text row has
no end marker to keep: it loses its end, as in pre-training.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from qlora_lab.attention import row_bounds
from qlora_lab.config import DataConfig
from qlora_lab.errors import UserError
from qlora_lab.sources import Row, bad_row, draw_mix, first_line, read_rows, short_path, source_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (PyTorch's default ignore_index)
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n",
                 "assistant": "### Response:\n", "tool": "### Tool:\n"}
RAW = "raw"  # the template of rows trained as written: text rows, TRL's string prompt/completion
# ShareGPT's speaker names -> chat roles ("observation" is LLaMA-Factory's name for a tool result).
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "observation": "tool"}
OPTIONAL_FIELDS = ("context", "input")  # fields a row may lack (config.SCHEMA_FIELDS has all)
# Characters kept from each end of a message before tokenizing, per token of max_seq_len (see
# clip_messages). A token covers about 4 characters of English text, and the longest tokens of
# common vocabularies (runs of spaces or '=') a few dozen; byte-level tokenizers may spend
# several tokens on one character, which only makes the kept text go further. So max_seq_len
# tokens span well under 64 * max_seq_len characters, and 64 leaves a wide margin.
CLIP_CHARS_PER_TOKEN = 64
# The least share of max_seq_len a truncated row keeps for its prompt (see fit_to_length).
PROMPT_MIN_FRACTION = 0.25


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    schema: str
    template: str
    stats: dict = field(default_factory=dict)


# --- schemas -------------------------------------------------------------------------------------


def rename_columns(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    """Rows with the file's columns renamed to schema fields (`data.columns`), before detection.

    A row without a mapped column is a bad row (unless the field is optional), so a typo in the
    mapping names the file, the line and the column instead of "cannot detect the schema".
    """
    if not columns:
        return rows
    sources = set(columns.values())
    out = []
    for row in rows:
        values = row.values
        if isinstance(values, dict):
            missing = [(f, c) for f, c in columns.items()
                       if c not in values and f not in OPTIONAL_FIELDS]
            if missing:
                field_name, column = missing[0]
                values = bad_row(row.where, f"no column {column!r}, which data.columns maps to "
                              f"{field_name!r} (columns here: {sorted(map(str, values))[:8]})")
            else:
                renamed = {k: v for k, v in values.items() if k not in sources}
                renamed.update({f: values[c] for f, c in columns.items() if c in values})
                values = renamed
        out.append(Row(row.where, values))
    return out


def detect_schema(values: Any, source: str) -> str:
    keys = set(values) if isinstance(values, dict) else set()
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if "text" in keys:  # last: instruction datasets often carry a pre-rendered `text` too
        return "text"
    raise UserError(f"{source}: cannot detect the schema from keys {sorted(keys)} — expected "
                    "dolly (instruction, context, response), alpaca (instruction, input, output), "
                    "chat (messages), sharegpt (conversations), prompt_completion (prompt, "
                    "completion) or text; set data.schema to force one, or data.columns to "
                    "rename columns (instruction=question,response=answer)")


def trained_as_written(schema: str, values: Any) -> bool:
    """Whether rows like this one skip the prompt template: text rows, and TRL's standard
    prompt/completion rows, whose prompt is a string (TRL renders only message lists)."""
    if schema == "text":
        return True
    return (schema == "prompt_completion" and isinstance(values, dict)
            and isinstance(values.get("prompt"), str))


def _text_field(values: dict, key: str, where: str, required: bool) -> str:
    value = values.get(key)
    if value is None:
        if required:
            raise bad_row(where, f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise bad_row(where, f"field {key!r} must be a string, got {type(value).__name__}")
    _require_encodable(value, where, f"field {key!r}")
    return value


def _require_encodable(text: str, where: str, what: str) -> None:
    # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_row(where, f"{what} holds invalid Unicode ({exc.reason} at character "
                   f"{exc.start})") from None


def _message_list(values: dict, key: str, where: str, role_key: str = "role",
                  text_key: str = "content", roles: dict | None = None) -> list[dict]:
    """values[key] as chat messages; ShareGPT's {from, value} pass their own keys and `roles`."""
    roles = roles or {r: r for r in PLAIN_HEADERS}
    messages = values.get(key)
    if not isinstance(messages, list) or not messages:
        raise bad_row(where,
                      f"field {key!r} must be a non-empty list of {{{role_key}, {text_key}}}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get(text_key), str):
            raise bad_row(where, f"{key}[{i}] must be an object with a string {text_key!r}")
        role = msg.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise bad_row(where, f"{key}[{i}] has {role_key} {role!r}; allowed: "
                       + ", ".join(roles))
        _require_encodable(msg[text_key], where, f"{key}[{i}].{text_key}")
        out.append({"role": roles[role], "content": msg[text_key]})
    return out


def _require_answer(messages: list[dict], where: str, field_name: str = "") -> None:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise bad_row(where, f"no non-empty assistant message to learn from{field_name}")


def _prompt_completion(values: dict, where: str) -> list[dict]:
    prompt, completion = values.get("prompt"), values.get("completion")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise bad_row(where, f"missing field {key!r}")
    if isinstance(prompt, str) and isinstance(completion, str):  # TRL's standard form
        _require_encodable(prompt, where, "field 'prompt'")
        _require_encodable(completion, where, "field 'completion'")
        if not completion.strip():
            raise bad_row(where, "empty 'completion'")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):  # its conversational form
        # TRL trains on the completion only: assistant turns of the prompt are context.
        context = [{**m, "trained": False} if m["role"] == "assistant" else m
                   for m in _message_list(values, "prompt", where)]
        answer = _message_list(values, "completion", where)
        _require_answer(answer, where, " in 'completion'")
        return context + answer
    raise bad_row(where, "'prompt' and 'completion' must both be strings (TRL's standard form) or "
               "both lists of {role, content} (its conversational form), got "
               f"{type(prompt).__name__} and {type(completion).__name__}")


def row_to_messages(row: Row, schema: str) -> list[dict]:
    """Validate one row against its schema and turn it into chat messages.

    An assistant message marked `"trained": False` is context, not an answer (the prompt side of
    a TRL conversational row). A text row is one assistant message: all of it is trained.
    """
    values, where = row.values, row.where
    if isinstance(values, UserError):
        raise values
    if not isinstance(values, dict):
        raise bad_row(where, f"expected an object, got {type(values).__name__}")
    if schema in ("dolly", "alpaca"):
        answer_key, extra_key = ("response", "context") if schema == "dolly" else ("output", "input")
        instruction = _text_field(values, "instruction", where, required=True)
        extra = _text_field(values, extra_key, where, required=False)
        answer = _text_field(values, answer_key, where, required=True)
        if not instruction.strip():
            raise bad_row(where, "empty 'instruction'")
        if not answer.strip():
            raise bad_row(where, f"empty {answer_key!r}")
        user = instruction.strip() + (f"\n\nContext: {extra.strip()}" if extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer.strip()}]
    if schema == "text":
        text = _text_field(values, "text", where, required=True)
        if not text.strip():
            raise bad_row(where, "empty 'text'")
        return [{"role": "assistant", "content": text}]
    if schema == "prompt_completion":
        return _prompt_completion(values, where)
    if schema == "sharegpt":
        out = _message_list(values, "conversations", where, "from", "value", SHAREGPT_ROLES)
    else:
        out = _message_list(values, "messages", where)
    _require_answer(out, where)
    return out


# --- rendering and tokenizing --------------------------------------------------------------------


def resolve_template(template: str, tokenizer) -> str:
    """The template to render with: `auto` becomes `chat` or `plain`; `raw` stays as it is."""
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserError("data.template = 'chat' but the tokenizer has no chat template — use "
                        "'plain' or 'auto'")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return template


def data_template(cfg: DataConfig, schema: str, first_values: Any, tokenizer) -> str:
    """The template a data set renders with: `raw` for rows trained as written, unless
    `data.template` names another for TRL's string rows (text rows have no prompt to format)."""
    if trained_as_written(schema, first_values):
        if cfg.template == "auto":
            return RAW
        if schema == "text":
            raise UserError(f"data.template = {cfg.template!r} does not apply to text rows, "
                            "which are trained as written — leave data.template at 'auto'")
    return resolve_template(cfg.template, tokenizer)


def _raw_prefix(tokenizer) -> str:
    """The BOS token when the tokenizer adds one to plain text (Llama's does, GPT-2's does not)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return ""
    return tokenizer.bos_token if tokenizer("a")["input_ids"][:1] == [bos_id] else ""


def render_prompt(messages: list[dict], tokenizer, template: str,
                  add_generation_prompt: bool = True) -> str:
    """Text of a conversation; with `add_generation_prompt` it ends where the answer starts."""
    if template == RAW:
        # TRL's language-modelling rows: texts end to end, EOS after each answer (once).
        eos = tokenizer.eos_token or ""
        return _raw_prefix(tokenizer) + "".join(
            m["content"] + (eos if m["role"] == "assistant" and not m["content"].endswith(eos)
                            else "") for m in messages)
    if template == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    blocks = []
    for msg in messages:
        end = (tokenizer.eos_token or "") if msg["role"] == "assistant" else ""
        blocks.append(PLAIN_HEADERS[msg["role"]] + msg["content"] + end)
    if add_generation_prompt:
        blocks.append(PLAIN_HEADERS["assistant"])
    return (tokenizer.bos_token or "") + "\n\n".join(blocks)


def render_segments(messages: list[dict], tokenizer, template: str) -> list[tuple[str, bool]]:
    """Split a conversation into (text, is_answer) pieces; answers are what the loss trains on.

    A chat template with `{% generation %}` blocks marks the answers itself (`marked_segments`).
    Otherwise each answer's text is what the template adds after the generation prompt, so the
    model learns to emit the template's end-of-turn marker too and generation stops where
    training stopped. Assistant messages marked `"trained": False` stay in the prompt.
    """
    if template == "chat" and _has_generation_marks(tokenizer):
        segments = marked_segments(messages, tokenizer)
        if segments is not None:
            return segments
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if not _is_answer(msg):
            continue
        prompt = render_prompt(messages[:i], tokenizer, template, add_generation_prompt=True)
        full = render_prompt(messages[: i + 1], tokenizer, template, add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the tokenizer's chat template does not render conversations as "
                            "prefixes of each other, so answers cannot be masked — set "
                            "data.template = 'plain'")
        segments.append((prompt[len(done):], False))
        segments.append((full[len(prompt):], True))
        done = full
    return segments


GENERATION_MARK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it


def _has_generation_marks(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and bool(GENERATION_MARK.search(template))


def _mask_method(tokenizer, template: str) -> str:
    """How answers were told from prompts, for the data stats."""
    if template == "chat" and _has_generation_marks(tokenizer):
        return "generation marks"
    return "prefixes" if template == "chat" else template


def marked_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]] | None:
    """(text, is_answer) pieces from the template's `{% generation %}` blocks, the answer mask
    TRL's assistant-only loss reads (`apply_chat_template(return_assistant_tokens_mask=True)`).

    The n-th block is the n-th assistant message, trained unless it is marked `"trained": False`;
    the text after the last trained answer is left out (nothing after it is trained). None when
    the blocks do not pair with the assistant messages, or the tokenizer gives no character
    offsets (a slow tokenizer): then answers are found by rendering prefixes.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        offsets = out.encodings[0].offsets
    except (ValueError, TypeError, AttributeError, IndexError):  # slow tokenizers have no offsets
        return None
    spans: list[list[int]] = []  # character spans of runs of marked tokens
    previous = False
    for marked, (start, end) in zip(out["assistant_masks"], offsets):
        if marked and previous:
            spans[-1][1] = end
        elif marked:
            spans.append([start, end])
        previous = bool(marked)
    assistants = [m for m in messages if m["role"] == "assistant"]
    if len(spans) != len(assistants):
        return None
    segments: list[tuple[str, bool]] = []
    at = 0
    for (start, end), msg in zip(spans, assistants):
        if _is_answer(msg):
            segments += [(text[at:start], False), (text[start:end], True)]
            at = end
    return segments


def _is_answer(message: dict) -> bool:
    return message["role"] == "assistant" and message.get("trained", True)


def tokenize_segments(segments: list[tuple[str, bool]], tokenizer,
                      train_on_prompt: bool) -> tuple[list[int], list[int]]:
    # Each segment is tokenized alone: at inference the prompt is tokenized alone too, and the
    # answer's tokens are generated after it, so this is the split the model will actually see.
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in segments:
        ids = _tokenize(text, tokenizer)
        input_ids += ids
        labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _tokenize(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- fitting a row into max_seq_len --------------------------------------------------------------


def clip_messages(messages: list[dict], max_seq_len: int, stats: dict) -> list[dict]:
    """The messages, each content cut to its first and last CLIP_CHARS_PER_TOKEN * max_seq_len
    characters, so that a 50 MB row is not tokenized whole (7.5 GB of RAM) only to be truncated.

    Nothing that truncation would keep is lost: `fit_to_length` keeps only tokens within
    max_seq_len tokens of a message's start or end, and those lie within the kept characters.
    A clipped message still holds far more than max_seq_len tokens, so `overlength: drop` drops
    its row as before.
    """
    keep = CLIP_CHARS_PER_TOKEN * max_seq_len
    out = []
    for msg in messages:
        text = msg["content"]
        if len(text) > 2 * keep:
            stats["clipped_chars"] += len(text) - 2 * keep
            # Joined end to end: the changed tokens around the join lie in the part that
            # fit_to_length cuts anyway, `keep` characters away from anything it keeps.
            msg = {**msg, "content": text[:keep] + text[-keep:]}
        out.append(msg)
    return out


def answer_end_tokens(answer_text: str, content: str, tokenizer) -> int:
    """How many tokens end an answer after its content: the template's end-of-turn marker
    (`</s>`, `<|im_end|>\\n`, ...). At least 1, so the answer's last token is always kept."""
    core = content.strip()
    at = answer_text.rfind(core) if core else 0  # an empty answer is all end marker
    # at < 0: the template rewrote the content, so its end cannot be found: keep the last token.
    end = answer_text[at + len(core):] if at >= 0 else ""
    return max(1, len(_tokenize(end, tokenizer)))


def fit_to_length(ids: list[int], labels: list[int], n_prompt: int, max_len: int,
                  end_tokens: int, stats: dict) -> tuple[list[int], list[int]]:
    """Cut a row to `max_len` tokens: the prompt first, the answer's end-of-turn marker never.

    `ids[:n_prompt]` is the prompt of the last answer: everything before it, earlier turns
    included. The prompt loses its middle. Its start holds the BOS token, the system prompt and
    the instruction; its end holds the latest turn and the assistant header that the answer
    follows. Cutting from the left would lose the question, and cutting from the right would
    lose the header, so the answer would no longer follow a prompt like those seen in inference.
    The last answer stays whole unless it does not fit beside PROMPT_MIN_FRACTION of `max_len`
    of prompt (an answer without its question teaches little). Then it loses the end of its
    text but keeps its last `end_tokens` tokens, so the model still learns to stop.
    """
    n_answer = len(ids) - n_prompt
    prompt_len = min(n_prompt, max(max_len - n_answer, int(max_len * PROMPT_MIN_FRACTION)))
    answer_len = max_len - prompt_len
    head = prompt_len // 2  # the end of the prompt gets the odd token: it leads into the answer
    end = min(end_tokens, answer_len)
    keep = [*range(head), *range(n_prompt - (prompt_len - head), n_prompt + answer_len - end),
            *range(len(ids) - end, len(ids))]
    out_ids, out_labels = [ids[i] for i in keep], [labels[i] for i in keep]
    if prompt_len < n_prompt:
        # The token after the cut cannot be predicted from the one before it: never train on it
        # (with train_on_prompt, or when it belongs to an earlier answer).
        out_labels[head] = IGNORE_INDEX
    stats["truncated"] += 1
    stats["truncated_prompt_tokens"] += n_prompt - prompt_len
    stats["truncated_answer_tokens"] += n_answer - answer_len
    return out_ids, out_labels


def _render(where: str, messages: list[dict], tokenizer, template: str):
    from jinja2 import TemplateError

    try:
        segments = render_segments(messages, tokenizer, template)
    except TemplateError as exc:  # e.g. a template that demands alternating user/assistant
        raise bad_row(where, f"the chat template rejects this conversation ({first_line(exc)})"
                   ) from None
    if template == "chat":
        # Many templates render only the roles they know and skip the rest without a word
        # (TinyLlama's, for one, has no branch for tool turns): a tool result the model never
        # sees would train answers on facts it was not given.
        rendered = "".join(text for text, _ in segments)
        last = max((i for i, m in enumerate(messages) if _is_answer(m)), default=0)
        for i, msg in enumerate(messages[:last]):
            if msg["role"] == "tool" and msg["content"].strip() not in rendered:
                raise bad_row(where, f"the chat template drops message {i} (role 'tool') — use a "
                           "model whose template renders tool turns, or data.template = 'plain'")
    return segments


def encode_conversation(messages: list[dict], tokenizer, template: str, max_seq_len: int, *,
                        train_on_prompt: bool = False, overlength: str = "truncate",
                        stats: dict | None = None, where: str = "conversation") -> dict | None:
    """{input_ids, labels} of one conversation in at most `max_seq_len` tokens; None if dropped.

    Training and held-out evaluation should both use this, so that their rows are cut alike.
    """
    stats = Counter() if stats is None else stats
    messages = clip_messages(messages, max_seq_len, stats)
    segments = _render(where, messages, tokenizer, template)  # ends with the last answer
    ids, labels = tokenize_segments(segments[:-1], tokenizer, train_on_prompt)
    n_prompt = len(ids)
    answer = _tokenize(segments[-1][0], tokenizer)
    ids, labels = ids + answer, labels + answer
    if len(ids) > max_seq_len:
        if overlength == "drop":
            stats["dropped_overlength"] += 1
            return None
        if template == RAW and len(messages) == 1:
            # A text row has no end-of-turn marker to keep: keep its start, as pre-training does.
            stats["truncated"] += 1
            stats["truncated_answer_tokens"] += len(ids) - max_seq_len
            return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}
        last = next(m for m in reversed(messages) if _is_answer(m))
        end = answer_end_tokens(segments[-1][0], last["content"], tokenizer)
        ids, labels = fit_to_length(ids, labels, n_prompt, max_seq_len, end, stats)
    return {"input_ids": ids, "labels": labels}


# --- the whole pipeline --------------------------------------------------------------------------


def _valid_messages(rows: list[Row], schema: str, as_written: bool, cfg: DataConfig,
                    stats: dict) -> list:
    """(where, messages) for each valid row; bad rows raise, or are counted and skipped.

    `as_written`: whether the first row is trained as written; TRL's two prompt/completion forms
    render differently, so a file must keep to one.
    """
    out = []
    for row in rows:
        try:
            messages = row_to_messages(row, schema)
            if trained_as_written(schema, row.values) != as_written:
                form = {True: "a string", False: "a message list"}
                raise bad_row(row.where, f"'prompt' is {form[not as_written]} here but "
                           f"{form[as_written]} in the first row — use one form in a file")
            out.append((row.where, messages))
        except UserError:
            if not cfg.skip_bad_rows:
                raise
            stats["bad_rows_skipped"] += 1
    return out


def _encode(conversations: list, tokenizer, template: str, cfg: DataConfig, stats: dict) -> list:
    examples = []
    for where, messages in conversations:
        try:
            example = encode_conversation(messages, tokenizer, template, cfg.max_seq_len,
                                          train_on_prompt=cfg.train_on_prompt,
                                          overlength=cfg.overlength, stats=stats, where=where)
        except UserError:
            if not cfg.skip_bad_rows:
                raise
            stats["bad_rows_skipped"] += 1
            continue
        if example is None:
            continue
        if all(label == IGNORE_INDEX for label in example["labels"]):
            stats["dropped_no_answer_tokens"] += 1  # the answer rendered to no tokens at all
            continue
        examples.append(example)
    return examples


def _first_object(rows: list[Row]) -> Row:
    """The first row that parsed to an object: it decides the schema and the template."""
    first = next((r for r in rows if isinstance(r.values, dict)), rows[0])
    if isinstance(first.values, UserError):
        raise first.values  # no row parsed: the first one's own error names file and line
    if not isinstance(first.values, dict):
        raise bad_row(first.where, f"expected an object, got {type(first.values).__name__}")
    return first


@dataclass(frozen=True)
class Source:
    """One source's valid conversations and what its first row decided."""

    name: str
    schema: str
    template: str
    as_written: bool
    conversations: list  # (where, messages)
    rows_read: int


def read_source(cfg: DataConfig, tokenizer, stats: dict, max_rows: int = 0) -> Source:
    """`cfg.source` read, renamed (`cfg.columns`), detected and validated."""
    rows = source_rows(cfg)
    if max_rows:
        rows = rows[:max_rows]
    rows = rename_columns(rows, cfg.column_map())
    first = _first_object(rows)
    schema = cfg.schema if cfg.schema != "auto" else detect_schema(first.values, first.where)
    template = data_template(cfg, schema, first.values, tokenizer)
    as_written = trained_as_written(schema, first.values)
    return Source(cfg.source, schema, template, as_written,
                  _valid_messages(rows, schema, as_written, cfg, stats), len(rows))


def _hold_out(conversations: list, cfg: DataConfig, seed: int) -> tuple[list, list]:
    """(train, held-out): `eval_fraction` of the conversations, chosen by a seeded shuffle."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_eval = min(cfg.max_eval_rows, round(len(order) * cfg.eval_fraction))
    if cfg.eval_fraction > 0 and len(order) >= 2:
        n_eval = max(n_eval, 1)
    return ([conversations[i] for i in order[n_eval:]],
            [conversations[i] for i in order[:n_eval]])


def _draw_mix(cfg: DataConfig, tokenizer, seed: int, stats: dict) -> tuple[list, list, str, str]:
    """(train, held-out, schema, template) of `data.mix`; what was drawn goes in stats["mix"].

    Each source's rows are drawn by `sources.draw_mix`, so no row is drawn twice, and the
    held-out rows, taken from the drawn ones, never reach training.
    """
    mix = cfg.mix_sources()
    sources = [read_source(sub, tokenizer, stats) for sub, _ in mix]
    for src in sources:
        if not src.conversations:
            raise UserError(f"data.mix source {short_path(src.name)} has no valid rows "
                            f"({stats['bad_rows_skipped']} skipped so far) — fix it or drop it")
        if src.template != sources[0].template:
            raise UserError(f"data.mix: {short_path(src.name)} renders with template "
                            f"{src.template!r} but {short_path(sources[0].name)} with "
                            f"{sources[0].template!r} — mix sources of one kind (text rows and "
                            "TRL's string prompt/completion rows are trained as written)")
    picks = draw_mix([len(s.conversations) for s in sources], [w for _, w in mix],
                     cfg.max_rows, seed)
    counts = [len(p) for p in picks]
    drawn = [(i, src.conversations[j])  # (source index, conversation)
             for i, (src, indices) in enumerate(zip(sources, picks)) for j in indices]
    template = sources[0].template
    if cfg.eval_source:
        held = read_source(replace(cfg, source=cfg.eval_source, hub_config="", split="train",
                                   mix=""), tokenizer, stats)
        if held.template != template:
            raise UserError(f"data.eval_source {short_path(held.name)} renders with template "
                            f"{held.template!r} but data.mix with {template!r} — hold out rows "
                            "of the same kind")
        train, held_out = drawn, [(None, c) for c in held.conversations]
    else:
        train, held_out = _hold_out(drawn, cfg, seed)
    stats["mix"] = [{"source": src.name, "weight": weight, "schema": src.schema,
                     "rows_valid": len(src.conversations), "rows_drawn": k,
                     "share_drawn": round(k / max(1, sum(counts)), 4),
                     "eval_rows": sum(1 for j, _ in held_out if j == i)}
                    for i, (src, (_, weight), k) in enumerate(zip(sources, mix, counts))]
    stats["rows_read"] = sum(s.rows_read for s in sources)
    schema = "+".join(dict.fromkeys(s.schema for s in sources))  # "dolly+sharegpt"
    return [c for _, c in train], [c for _, c in held_out], schema, template


def prepare_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, validate, split, render and tokenize. Counts of what was skipped go in `stats`."""
    stats = {"bad_rows_skipped": 0, "clipped_chars": 0, "truncated": 0,
             "truncated_prompt_tokens": 0, "truncated_answer_tokens": 0,
             "dropped_overlength": 0, "dropped_no_answer_tokens": 0}
    if cfg.mix:
        train_convs, eval_convs, schema, template = _draw_mix(cfg, tokenizer, seed, stats)
    else:
        src = read_source(cfg, tokenizer, stats, cfg.max_rows)
        schema, template = src.schema, src.template
        stats["rows_read"] = src.rows_read
        if cfg.eval_source or cfg.eval_split:
            # A split of the same dataset, or another source with the same columns and schema.
            where = ((cfg.eval_source, "", cfg.eval_split or "train") if cfg.eval_source
                     else (cfg.source, cfg.hub_config, cfg.eval_split))
            eval_rows = rename_columns(read_rows(*where, split_key="data.eval_split"),
                                       cfg.column_map())
            eval_convs = _valid_messages(eval_rows, schema, src.as_written, cfg, stats)
            train_convs = src.conversations
        else:
            train_convs, eval_convs = _hold_out(src.conversations, cfg, seed)
    eval_convs = eval_convs[: cfg.max_eval_rows]
    train = _encode(train_convs, tokenizer, template, cfg, stats)
    evals = _encode(eval_convs, tokenizer, template, cfg, stats)
    if not train and not train_convs and eval_convs:
        # The held-out share took every row: nothing was filtered.
        raise UserError(f"data source {short_path(cfg.mix or cfg.source)} has "
                        f"{len(eval_convs)} usable row(s) and data.eval_fraction = "
                        f"{cfg.eval_fraction} holds out all of them — lower data.eval_fraction "
                        "or add rows")
    if not train:
        raise UserError(f"data source {short_path(cfg.mix or cfg.source)} left no trainable rows "
                        f"after filtering ({stats}) — raise data.max_seq_len or check the rows")
    stats.update(train_rows=len(train), eval_rows=len(evals),
                 train_tokens=sum(len(e["input_ids"]) for e in train), schema=schema,
                 template=template, answer_masks=_mask_method(tokenizer, template))
    return PreparedData(train, evals, schema, template, stats)


@dataclass(frozen=True)
class PadCollator:
    """Pad a batch to its longest row (what HF's collators do); padding is masked everywhere."""

    pad_token_id: int
    pad_to_multiple_of: int = 1
    positions: bool = False  # add SUPERVISED_POSITIONS (see supervised_positions)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = _right_padded(features, self.pad_token_id, self.pad_to_multiple_of)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            mask[i, :len(f["input_ids"])] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.positions:
            batch[SUPERVISED_POSITIONS] = supervised_positions(labels)
        return batch


SUPERVISED_POSITIONS = "supervised_positions"


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is supervised, in a batch's (rows x (length - 1))
    positions laid end to end: where the head's loss is computed (fastpath.SupervisedHeadLoss).

    Found here on the host, from labels the collator has just built; on the GPU finding them
    is a wait for all the work queued before (the count sizes the loss's tensors).
    """
    return (labels[:, 1:] != IGNORE_INDEX).reshape(-1).nonzero().squeeze(-1)


def _right_padded(features: list[dict], pad_token_id: int, multiple: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels of `features`, right-padded to the longest (rounded up).

    Filled through numpy: numpy reads a Python list of ints ~7x faster than torch.tensor does,
    and a collator runs in the training process while the GPU waits for the next batch
    (benchmarks/results/collate_cpu.json)."""
    longest = max(len(f["input_ids"]) for f in features)
    longest = (longest + multiple - 1) // multiple * multiple
    ids = np.full((len(features), longest), pad_token_id, dtype=np.int64)
    labels = np.full((len(features), longest), IGNORE_INDEX, dtype=np.int64)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = f["input_ids"]
        labels[i, :n] = f["labels"]
    return torch.from_numpy(ids), torch.from_numpy(labels)


# --- packing -------------------------------------------------------------------------------------


def pack_examples(examples: list[dict], bin_tokens: int) -> list[dict]:
    """Lay whole rows end to end in bins of at most `bin_tokens` tokens (best-fit decreasing).

    A pack's `position_ids` restart at 0 for each row: transformers reads the restarts as row
    boundaries and builds a block-diagonal causal mask (masking_utils.find_packed_sequence_indices,
    used when no attention_mask is passed and the KV cache is off), so no token attends across
    rows. The first label of every row is IGNORE_INDEX, so no row's first token is predicted from
    the previous row's last one. Rows are never split. `PackedCollator` packs each micro-batch's
    rows, so which rows share an optimizer step is the sampler's choice, as without packing.
    """
    packs = []
    for members in bin_members([len(e["input_ids"]) for e in examples], bin_tokens):
        ids, labels, positions = [], [], []
        for i in sorted(members):  # source order inside a pack: deterministic, easy to read
            row_ids, row_labels = examples[i]["input_ids"], examples[i]["labels"]
            ids.extend(row_ids)
            labels.append(IGNORE_INDEX)
            labels.extend(row_labels[1:])
            positions.extend(range(len(row_ids)))
        packs.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packs


def bin_members(lengths: Sequence[int], bin_tokens: int) -> list[list[int]]:
    """Which rows (by index) share each bin: best-fit decreasing, as `pack_examples` packs."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted: best fit by bisect
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            left, b = free.pop(at)
        else:
            left, b = bin_tokens, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - need > 0:
            bisect.insort(free, (left - need, b))
    return bins


# Rows packed in all when estimating a micro-batch's bins (worst_micro_batch_bins): ~0.3 s.
BIN_SEARCH_ROWS = 200_000


def worst_micro_batch_bins(lengths: Sequence[int], micro_batch_size: int, bin_tokens: int,
                           draws: int, seed: int = 0) -> int:
    """The most bins a packed micro-batch of `micro_batch_size` of these rows needed, among
    `draws` micro-batches drawn as the training sampler draws them (consecutive rows of
    shuffled epochs), each packed as `PackedCollator` packs it.

    What a packed micro-batch holds is its bins (bins x bin_tokens tokens, padded), not its
    rows: 160 Dolly rows fill ~30 bins of 1,024 tokens. The maximum over many random
    micro-batches stands for the worst one a run meets; `train --budget` plans with it (one
    more bin than the run meets is 1/bins more activation memory). Draws are capped at
    BIN_SEARCH_ROWS rows packed in all.
    """
    n = len(lengths)
    if n == 0 or micro_batch_size <= 1:
        return 1
    size = min(micro_batch_size, n)
    draws = max(1, min(draws, BIN_SEARCH_ROWS // size))
    rng = random.Random(seed)
    order = list(range(n))
    worst, drawn = 1, 0
    while drawn < draws:
        rng.shuffle(order)
        for start in range(0, n - size + 1, size):
            batch = [lengths[i] for i in order[start:start + size]]
            worst = max(worst, len(bin_members(batch, bin_tokens)))
            drawn += 1
            if drawn == draws:
                break
    return worst


def pack_stats(packs: list[dict], bin_tokens: int) -> dict:
    tokens = sum(len(p["input_ids"]) for p in packs)
    return {"packs": len(packs), "pack_fill": round(tokens / max(1, len(packs) * bin_tokens), 4)}


def rows_share_bins(examples: list[dict], max_seq_len: int, packing: bool) -> bool:
    """Whether a micro-batch of these rows needs an attention mask (what the planner calls
    short rows): packed, two rows can share a bin (the shortest two fit in one), so positions
    restart inside it; padded, some row is shorter than the rest and is padded. False when
    every row fills its bin (long documents cut at max_seq_len): then attention is plain causal.
    """
    lengths = sorted(len(e["input_ids"]) for e in examples)
    if not lengths:
        return True
    if packing:
        return len(lengths) > 1 and lengths[0] + lengths[1] <= max_seq_len
    return lengths[0] < lengths[-1]


def batch_geometry(examples: list[dict], micro_batch_size: int, grad_accum_steps: int,
                   processes: int = 1) -> dict:
    """Rows, tokens and optimizer steps per epoch: the same with packing on or off.

    Steps per epoch count as Trainer counts them: micro-batches per process, rounded up, then
    accumulation steps, rounded up.
    """
    rows_per_step = micro_batch_size * grad_accum_steps * processes
    mean_tokens = sum(len(e["input_ids"]) for e in examples) / max(1, len(examples))
    micro_batches = -(-len(examples) // (micro_batch_size * processes))
    return {"rows_per_step": rows_per_step,
            "tokens_per_step": round(mean_tokens * rows_per_step),
            "steps_per_epoch": max(1, -(-micro_batches // grad_accum_steps))}


@dataclass(frozen=True)
class PackedCollator:
    """Pack one micro-batch's rows into bins; no attention_mask, by design.

    A micro-batch is `train.micro_batch_size` rows, packed or not, so an optimizer step holds the
    same rows either way and packing changes only speed, never the recipe. Its rows are laid end
    to end in bins of `bin_tokens` (`pack_examples`) and the bins stacked; the number of bins
    follows from the rows' lengths. The tail of a shorter bin is padding laid out as one more
    "row" (its own restarting positions, labels ignored), so real tokens never attend to it.
    `num_real_tokens` counts the rest; the trainer pops it before the forward pass.

    `flatten` lays all bins in one row instead: FlashAttention-2 in transformers reads restarting
    position_ids as row boundaries only at batch size 1, and would let a bin's rows attend to each
    other at larger batch sizes (transformers' DataCollatorWithFlattening flattens for the same
    reason). SDPA and eager build a block-diagonal mask from the restarts at any batch size, and
    for them bins keep the masked attention square small.

    `row_bounds` adds `cu_seq_lens_q`, where each row (and each bin's padding tail) starts in the
    flattened bins, for varlen attention (attention.py), which then needs no mask. `positions`
    adds SUPERVISED_POSITIONS (supervised_positions); the trainer pops it, as it does
    `num_real_tokens`.
    """

    pad_token_id: int
    bin_tokens: int
    pad_to_multiple_of: int = 1
    flatten: bool = False
    row_bounds: bool = False
    positions: bool = False

    def __call__(self, features: list[dict]) -> dict:
        bins = pack_examples(features, self.bin_tokens)
        if self.flatten:
            bins = [{key: [x for b in bins for x in b[key]] for key in bins[0]}]
        ids, labels = _right_padded(bins, self.pad_token_id, self.pad_to_multiple_of)
        longest = ids.shape[1]
        positions = np.empty((len(bins), longest), dtype=np.int64)
        real = 0
        for i, b in enumerate(bins):
            n = len(b["input_ids"])
            positions[i, :n] = b["position_ids"]
            positions[i, n:] = np.arange(longest - n)
            real += n
        positions = torch.from_numpy(positions)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
                 # An int, not a tensor: the trainer reads it on the host, and a tensor would be
                 # moved to the GPU with the batch, then read back (a wait for the GPU).
                 "num_real_tokens": real}
        if self.row_bounds:
            batch["cu_seq_lens_q"] = row_bounds(positions)
        if self.positions:
            batch[SUPERVISED_POSITIONS] = supervised_positions(labels)
        return batch
