import csv
import json

import pytest

from qlora_lab.config import DataConfig
from qlora_lab.data import (IGNORE_INDEX, PadCollator, detect_schema, prepare_data, read_rows,
                            render_prompt, render_segments, row_to_messages, tokenize_segments)
from qlora_lab.errors import UserError
from qlora_lab.models import build_byte_tokenizer

from conftest import DOLLY_ROWS, SHARED_DOLLY, write_jsonl

CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = build_byte_tokenizer()
    t.chat_template = CHATML
    return t


def _prepare(path, tok, **kw):
    return prepare_data(DataConfig(source=str(path), eval_fraction=0.0, **kw), tok, seed=0)


@pytest.mark.parametrize("row, schema", [
    ({"instruction": "a", "context": "", "response": "b"}, "dolly"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}]}, "chat"),
])
def test_schema_detection(row, schema):
    assert detect_schema(row, "f") == schema


def test_unknown_schema_names_keys():
    with pytest.raises(UserError, match=r"keys \['foo'\]"):
        detect_schema({"foo": 1}, "f.jsonl")


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_prompt_tokens_are_masked(tmp_path, tok, chat_tok, template):
    t = chat_tok if template == "chat" else tok
    data = _prepare(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS[:3]), t, template=template)
    assert len(data.train) == 3
    for ex in data.train:
        labels = ex["labels"]
        n_prompt = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
        assert n_prompt > 0 and all(lab == IGNORE_INDEX for lab in labels[:n_prompt])
        assert labels[n_prompt:] == ex["input_ids"][n_prompt:]  # the answer is fully trained
        answer = t.decode(ex["input_ids"][n_prompt:])
        row = next(r for r in DOLLY_ROWS[:3] if answer.startswith(r["response"]))
        assert answer == row["response"] + "</s>"
        # The unmasked part is exactly what inference renders as the prompt.
        messages = row_to_messages(type("R", (), {"values": row, "where": "x"})(), "dolly")
        prompt = render_prompt(messages[:1], t, template)
        assert t.decode(ex["input_ids"][:n_prompt]) == prompt


def test_train_on_prompt_trains_everything(tmp_path, tok):
    data = _prepare(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS[:2]), tok, train_on_prompt=True)
    assert all(ex["labels"] == ex["input_ids"] for ex in data.train)


def test_multi_turn_chat_masks_user_turns(chat_tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]
    segments = render_segments(msgs, chat_tok, "chat")
    trained = [text for text, is_answer in segments if is_answer]
    assert trained == ["A1</s>", "A2</s>"]
    ids, labels = tokenize_segments(segments, chat_tok, train_on_prompt=False)
    assert chat_tok.decode(ids) == render_prompt(msgs, chat_tok, "chat", add_generation_prompt=False)


def test_alpaca_and_chat_files(tmp_path, tok):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 2",
                                                 "output": "4"}])
    assert _prepare(alpaca, tok).schema == "alpaca"
    chat = tmp_path / "c.json"
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}]))
    assert _prepare(chat, tok).schema == "chat"


def test_csv_and_parquet(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "context", "response"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in DOLLY_ROWS[:4])
    assert len(_prepare(path, tok).train) == 4
    pq.write_table(pa.Table.from_pylist(DOLLY_ROWS[:5]), tmp_path / "d.parquet")
    assert len(_prepare(tmp_path / "d.parquet", tok).train) == 5


@pytest.mark.parametrize("bad_line, fragment", [
    ('{"instruction": "x", "response": ', "invalid JSON"),
    ('{"instruction": "x", "context": ""}', "missing field 'response'"),
    ('{"instruction": "x", "response": 5}', "field 'response' must be a string"),
    ('{"instruction": "x", "response": "  "}', "empty 'response'"),
    ('[1, 2]', "expected an object"),
])
def test_bad_row_is_one_line_error_naming_file_and_line(tmp_path, tok, bad_line, fragment):
    rows = [json.dumps(r) for r in DOLLY_ROWS[:3]] + [bad_line] + [json.dumps(DOLLY_ROWS[3])]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as err:
        _prepare(path, tok)
    message = str(err.value)
    assert f"{path}:4:" in message and fragment in message and "--skip-bad-rows" in message
    assert "\n" not in message
    data = _prepare(path, tok, skip_bad_rows=True)
    assert data.stats["bad_rows_skipped"] == 1 and len(data.train) == 4


def test_non_utf8_and_empty_files(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(DOLLY_ROWS[0]).encode() + b"\n\xff\xfe\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid UTF-8"):
        read_rows(str(path))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="has no rows"):
        read_rows(str(tmp_path / "e.jsonl"))


def test_overlength_rows_are_truncated_or_dropped_and_counted(tmp_path, tok):
    rows = DOLLY_ROWS[:4] + [{"instruction": "long", "context": "", "response": "y" * 500}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    truncated = _prepare(path, tok, max_seq_len=120)
    assert truncated.stats["truncated"] == 1
    assert max(len(e["input_ids"]) for e in truncated.train) == 120
    dropped = _prepare(path, tok, max_seq_len=120, overlength="drop")
    assert dropped.stats["dropped_overlength"] == 1 and len(dropped.train) == 4


def test_eval_split_is_held_out_and_deterministic(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    cfg = DataConfig(source=str(path), eval_fraction=0.25)
    a, b = prepare_data(cfg, tok, seed=1), prepare_data(cfg, tok, seed=1)
    assert len(a.eval) == 3 and len(a.train) == 9
    assert a.eval == b.eval
    train_ids = {tuple(e["input_ids"]) for e in a.train}
    assert not any(tuple(e["input_ids"]) in train_ids for e in a.eval)


def test_collator_pads_and_masks():
    batch = PadCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.skipif(not SHARED_DOLLY.is_file(), reason="../shared/data is not in this checkout")
def test_real_dolly_sample_loads(tok):
    data = prepare_data(DataConfig(source=str(SHARED_DOLLY), max_seq_len=512), tok, seed=0)
    assert data.schema == "dolly" and data.stats["rows_read"] == 560
    assert len(data.train) + len(data.eval) + data.stats["dropped_no_answer_tokens"] == 560
