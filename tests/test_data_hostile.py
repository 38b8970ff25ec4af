"""Hostile inputs for reading and fitting rows: odd line breaks, huge fields, rows cut to fit.

Each test states an invariant; the random one checks the truncation rules on many row shapes.
"""

import json
import random

import pytest
from conftest import CHATML, DOLLY_ROWS, write_jsonl

from qlora_lab.config import DataConfig
from qlora_lab.data import (
    CLIP_CHARS_PER_TOKEN,
    IGNORE_INDEX,
    PROMPT_MIN_FRACTION,
    clip_messages,
    encode_conversation,
    prepare_data,
    render_segments,
    tokenize_segments,
)
from qlora_lab.errors import UserError
from qlora_lab.models import build_byte_tokenizer
from qlora_lab.sources import read_rows

# An end-of-turn marker of many tokens (the byte tokenizer has no <|im_end|>), as in ChatML.
IM_END = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that changes the content, so the answer's end marker cannot be located.
SHOUTING = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | upper }}</s>{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
STATS = ("clipped_chars", "truncated", "truncated_prompt_tokens", "truncated_answer_tokens",
         "dropped_overlength")


def _templated(template):
    t = build_byte_tokenizer()
    t.chat_template = template
    return t


def _stats():
    return dict.fromkeys(STATS, 0)


def _prepare(path, tok, **kw):
    return prepare_data(DataConfig(source=str(path), eval_fraction=0.0, **kw), tok, seed=0)


# --- reading -------------------------------------------------------------------------------------


def test_raw_control_character_is_reported_on_its_own_line(tmp_path, tok):
    # Raw U+0000-U+001F are invalid inside JSON strings; splitlines() used to cut such a row in
    # two at \x0c and \x1c, reporting the wrong line and shifting every later one.
    good = json.dumps(DOLLY_ROWS[0])
    lines = [good, good.replace("plus", "plus\x0c"), good.replace("plus", "plus\x1c"), good, "{"]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    assert [r.where for r in read_rows(str(path))] == [f"{path}:{i}" for i in range(1, 6)]
    with pytest.raises(UserError, match=rf"{path}:2: invalid JSON \(Invalid control character"):
        _prepare(path, tok)
    data = _prepare(path, tok, skip_bad_rows=True)
    assert data.stats["bad_rows_skipped"] == 3 and len(data.train) == 2


def test_crlf_file_loads_and_counts_lines(tmp_path, tok):
    rows = [json.dumps(r) for r in DOLLY_ROWS[:3]]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\r\n".join([rows[0], "", rows[1], "  ", rows[2], "{bad", ""]).encode())
    read = read_rows(str(path))
    assert [r.where.rsplit(":", 1)[1] for r in read] == ["1", "3", "5", "6"]
    assert read[0].values == DOLLY_ROWS[0]
    with pytest.raises(UserError, match=rf"{path}:6: invalid JSON"):
        _prepare(path, tok)


def test_json_suffix_holding_json_lines_with_raw_line_separators(tmp_path, tok):
    rows = [{**r, "response": r["response"] + "\u2028\u2029\x85"} for r in DOLLY_ROWS[:3]]
    path = write_jsonl(tmp_path / "d.json", [json.dumps(r, ensure_ascii=False) for r in rows])
    read = read_rows(str(path))
    assert [r.values for r in read] == rows
    assert [r.where for r in read] == [f"{path}:{i}" for i in (1, 2, 3)]


# --- clipping huge fields ------------------------------------------------------------------------


def test_clip_threshold_is_exact():
    keep = CLIP_CHARS_PER_TOKEN * 8
    stats = _stats()
    at, over = "a" * (2 * keep), "b" * keep + "c" + "d" * keep
    clipped = clip_messages([{"role": "user", "content": at},
                             {"role": "assistant", "content": over}], 8, stats)
    assert clipped[0]["content"] is at and stats["clipped_chars"] == 1
    assert clipped[1]["content"] == "b" * keep + "d" * keep


def test_huge_multibyte_field_in_an_earlier_turn(tok):
    # Each emoji is 4 byte-level tokens: the clipped text still covers more than max_seq_len.
    chat_tok = _templated(CHATML)
    msgs = [{"role": "user", "content": "\U0001F600" * 500_000},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "again?"}, {"role": "assistant", "content": "Yes."}]
    stats = _stats()
    ex = encode_conversation(msgs, chat_tok, "chat", 64, stats=stats)
    assert stats["clipped_chars"] == 500_000 - 2 * CLIP_CHARS_PER_TOKEN * 64
    assert len(ex["input_ids"]) == 64
    assert chat_tok.decode(ex["input_ids"]).endswith("<|user|>again?</s><|assistant|>Yes.</s>")


# --- fitting rows into max_seq_len ---------------------------------------------------------------


def test_multi_token_end_marker_survives_a_cut_answer():
    t = _templated(IM_END)
    msgs = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "x" * 500}]
    ex = encode_conversation(msgs, t, "chat", 100)
    text = t.decode(ex["input_ids"])
    assert len(ex["input_ids"]) == 100 and text.endswith("xxx<|im_end|>\n")
    assert ex["labels"][-len("<|im_end|>\n"):] == ex["input_ids"][-len("<|im_end|>\n"):]


def test_rewritten_content_keeps_the_last_token():
    t = _templated(SHOUTING)
    msgs = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "y" * 300}]
    ex = encode_conversation(msgs, t, "chat", 64)
    assert len(ex["input_ids"]) == 64 and ex["input_ids"][-1] == t.eos_token_id


def test_smallest_max_seq_len_still_trains_the_answer(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS[:3])
    data = _prepare(path, tok, max_seq_len=8)
    for ex in data.train:
        assert len(ex["input_ids"]) == 8 and ex["labels"][-1] == tok.eos_token_id
        assert ex["input_ids"][0] == tok.bos_token_id


def test_train_on_prompt_masks_only_the_token_after_the_cut(tok):
    msgs = [{"role": "user", "content": "q" * 200}, {"role": "assistant", "content": "ok"}]
    ex = encode_conversation(msgs, tok, "plain", 64, train_on_prompt=True)
    masked = [i for i, lab in enumerate(ex["labels"]) if lab == IGNORE_INDEX]
    assert masked == [(64 - 3) // 2]  # the prompt keeps 64 - 3 tokens, half at its start


def _random_messages(rng):
    pick = ["w ", "é", "\n", "\u2028", "0", "</s>"]
    texts = ["".join(rng.choice(pick) for _ in range(rng.choice((0, 1, 5, 40, 300))))
             for _ in range(6)]
    turns = rng.randint(1, 3)
    msgs = [{"role": "system", "content": texts[5]}] if rng.random() < 0.3 else []
    for i in range(turns):
        msgs += [{"role": "user", "content": texts[2 * i] or "?"},
                 {"role": "assistant", "content": texts[2 * i + 1] or "!"}]
    return msgs


@pytest.mark.parametrize("seed", range(4))
def test_fitting_invariants_on_random_rows(seed):
    tokenizers = {"plain": build_byte_tokenizer(), "chat": _templated(CHATML)}
    rng = random.Random(seed)
    for _ in range(60):
        template = rng.choice(("plain", "chat"))
        t, msgs = tokenizers[template], _random_messages(rng)
        max_len, on_prompt = rng.choice((8, 9, 33, 64, 200)), rng.random() < 0.3
        segments = render_segments(msgs, t, template)
        full_ids, full_labels = tokenize_segments(segments, t, on_prompt)
        n_answer = len(t(segments[-1][0], add_special_tokens=False)["input_ids"])
        n_prompt = len(full_ids) - n_answer
        stats = _stats()
        ex = encode_conversation(msgs, t, template, max_len, train_on_prompt=on_prompt,
                                 stats=stats)
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == min(max_len, len(full_ids))
        assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids))
        if len(full_ids) <= max_len:
            assert (ids, labels) == (full_ids, full_labels) and stats["truncated"] == 0
            continue
        assert stats["truncated"] == 1 and ids[-1] == full_ids[-1]  # the end marker stays
        assert (stats["truncated_prompt_tokens"] + stats["truncated_answer_tokens"]
                == len(full_ids) - max_len)
        prompt_len = max_len - (n_answer - stats["truncated_answer_tokens"])
        assert ids[:prompt_len // 2] == full_ids[:prompt_len // 2]  # the prompt's start stays
        if n_answer + min(n_prompt, int(max_len * PROMPT_MIN_FRACTION)) <= max_len:
            assert ids[-n_answer:] == full_ids[-n_answer:]  # the last answer stays whole
            assert labels[-n_answer:] == ids[-n_answer:]
