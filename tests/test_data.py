import csv
import json
from dataclasses import replace

import pytest
from conftest import DOLLY_ROWS, SHARED_DOLLY, write_jsonl

from qlora_lab.config import DataConfig
from qlora_lab.data import (
    CLIP_CHARS_PER_TOKEN,
    IGNORE_INDEX,
    PadCollator,
    detect_schema,
    encode_conversation,
    prepare_data,
    render_prompt,
    render_segments,
    row_to_messages,
    tokenize_segments,
)
from qlora_lab.errors import UserError
from qlora_lab.sources import read_rows


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


def test_unicode_line_breaks_inside_jsonl_rows_are_kept(tmp_path, tok):
    # json.dumps writes U+2028, U+2029 and U+0085 raw and escapes \x1c-\x1e, \v, \f: all are
    # characters str.splitlines() splits on, and none may split a JSON Lines row.
    odd = "\u2028\u2029\x85\x1c\x1d\x1e\x0b\x0c"
    rows = [{"instruction": f"a{odd}b", "context": f"c{odd[::-1]}d", "response": f"e{odd}f"},
            {"messages": [{"role": "user", "content": f"u{odd}"},
                          {"role": "assistant", "content": f"{odd}v"}]}]
    lines = [json.dumps(rows[0], ensure_ascii=False), json.dumps(DOLLY_ROWS[0]), "{oops"]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, not as an escape
    read = read_rows(str(path))
    assert [r.where for r in read] == [f"{path}:{i}" for i in (1, 2, 3)]
    assert read[0].values == rows[0]
    with pytest.raises(UserError, match=rf"{path}:3: invalid JSON"):
        _prepare(path, tok)
    data = _prepare(path, tok, skip_bad_rows=True)
    assert data.stats["bad_rows_skipped"] == 1 and len(data.train) == 2
    assert any(f"e{odd}f</s>" in tok.decode(ex["input_ids"]) for ex in data.train)
    chat = write_jsonl(tmp_path / "c.jsonl", [json.dumps(rows[1], ensure_ascii=False)])
    assert read_rows(str(chat))[0].values == rows[1]


class _SpyTokenizer:
    """A real tokenizer that records the longest text it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kwargs)


def test_huge_fields_are_clipped_before_tokenizing(tmp_path, tok):
    # Tokenized whole, 3 MB fields would cost gigabytes of RAM: only their ends may reach the
    # tokenizer, and the row still comes out exactly as truncation would have cut it.
    big = {"instruction": "Sum it up.", "context": "z" * 3_000_000, "response": "y" * 3_000_000}
    spy = _SpyTokenizer(tok)
    data = _prepare(write_jsonl(tmp_path / "d.jsonl", [big]), spy, max_seq_len=256)
    keep = CLIP_CHARS_PER_TOKEN * 256
    user = len("Sum it up.\n\nContext: ") + 3_000_000
    assert data.stats["clipped_chars"] == (user - 2 * keep) + (3_000_000 - 2 * keep)
    assert spy.longest <= 2 * keep + 100
    (ex,) = data.train
    assert len(ex["input_ids"]) == 256 and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"]).startswith("<s>### Instruction:\nSum it up.")


def _answer_start(labels):
    return next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)


def test_long_prompt_is_cut_in_the_middle_and_answer_kept_whole(tmp_path, tok):
    row = {"instruction": "Which letter?", "context": "a" * 300 + "z" * 300, "response": "Z."}
    data = _prepare(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_seq_len=128)
    (ex,) = data.train
    ids, labels = ex["input_ids"], ex["labels"]
    start = _answer_start(labels)
    assert len(ids) == 128 and tok.decode(ids[start:]) == "Z.</s>"
    assert labels[start:] == ids[start:] and set(labels[:start]) == {IGNORE_INDEX}
    prompt = tok.decode(ids[:start])  # keeps the question and the header leading to the answer
    assert prompt.startswith("<s>### Instruction:\nWhich letter?\n\nContext: aaa")
    assert prompt.endswith("zzz\n\n### Response:\n")
    full = len(tok(render_prompt([{"role": "user", "content": f"Which letter?\n\nContext: "
                                                       f"{row['context']}"}], tok, "plain"),
                   add_special_tokens=False)["input_ids"]) + 3
    assert data.stats["truncated_prompt_tokens"] == full - 128
    assert data.stats["truncated_answer_tokens"] == 0 and data.stats["truncated"] == 1


def test_too_long_answer_keeps_its_start_and_end_token(tmp_path, tok):
    row = {"instruction": "Count.", "context": "", "response": "1 2 3 " * 100 + "done"}
    data = _prepare(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_seq_len=256)
    (ex,) = data.train
    ids, labels = ex["input_ids"], ex["labels"]
    start = _answer_start(labels)
    assert len(ids) == 256 and ids[-1] == labels[-1] == tok.eos_token_id
    assert labels[start:] == ids[start:]
    assert tok.decode(ids[start:]).startswith("1 2 3 1 2 3")
    # The short prompt fits beside the answer's share, so it is kept whole.
    messages = [{"role": "user", "content": "Count."}]
    assert tok.decode(ids[:start]) == render_prompt(messages, tok, "plain")
    assert data.stats["truncated_prompt_tokens"] == 0
    assert data.stats["truncated_answer_tokens"] == len(row["response"]) + 1 - (256 - start)


def test_multi_turn_keeps_the_last_answer_whole(chat_tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "q1 " * 60}, {"role": "assistant", "content": "a1 " * 60},
            {"role": "user", "content": "q2?"}, {"role": "assistant", "content": "A2."}]
    stats = {"clipped_chars": 0, "truncated": 0, "truncated_prompt_tokens": 0,
             "truncated_answer_tokens": 0}
    ex = encode_conversation(msgs, chat_tok, "chat", 128, stats=stats)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == 128 and chat_tok.decode(ids).startswith("<|system|>Be brief.</s>")
    assert chat_tok.decode(ids).endswith("<|user|>q2?</s><|assistant|>A2.</s>")
    answer = len(chat_tok("A2.</s>", add_special_tokens=False)["input_ids"])
    assert labels[-answer:] == ids[-answer:]
    # What survives of the earlier answer is still trained, except the first token after the cut.
    trained = [i for i, lab in enumerate(labels[:-answer]) if lab != IGNORE_INDEX]
    assert trained and all(labels[i] == ids[i] for i in trained)
    after_cut = (128 - answer) // 2  # the prompt keeps as many tokens from its start
    assert labels[after_cut] == IGNORE_INDEX and labels[after_cut + 1] == ids[after_cut + 1]
    assert stats["truncated_answer_tokens"] == 0


def test_dropping_overlength_rows_counts_clipped_rows_too(tmp_path, tok):
    rows = DOLLY_ROWS[:2] + [{**DOLLY_ROWS[2], "context": "z" * 200_000}]
    data = _prepare(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=128,
                    overlength="drop")
    assert data.stats["dropped_overlength"] == 1 and len(data.train) == 2
    assert data.stats["truncated"] == 0


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


def test_worst_micro_batch_bins_covers_every_micro_batch_the_run_packs(tmp_path):
    # train --budget plans a packed micro-batch as the most bins among many random ones; the
    # micro-batches a run's own sampler and collator build must not need more.
    import random

    from conftest import tiny_config

    from qlora_lab.data import bin_members, worst_micro_batch_bins
    from qlora_lab.train import packed_bins, setup_training

    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = [{"instruction": f"Question {i}?", "context": "",
             "response": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))}
            for i in range(96)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_config(tmp_path / "run", data, micro_batch_size=8, grad_accum_steps=1, epochs=2,
                      max_steps=0)
    cfg = replace(cfg, data=replace(cfg.data, max_seq_len=192, eval_fraction=0.0))
    session = setup_training(cfg)
    lengths = [len(e["input_ids"]) for e in session.trainer.train_dataset]
    seen = []
    for epoch in range(2):
        for batch in session.trainer.get_train_dataloader():
            seen.append(batch["input_ids"].shape[0])
    assert len(set(seen)) > 1, (seen, lengths)  # the rows' lengths make micro-batches of different bin counts
    planned = packed_bins(cfg, lengths)(8)
    assert max(seen) <= planned <= 8
    assert planned == worst_micro_batch_bins(lengths, 8, 192, draws=256, seed=cfg.train.seed)
    # never fewer than the 8 shortest rows need, never more than the 8 longest
    ordered = sorted(lengths)
    assert len(bin_members(ordered[:8], 192)) <= planned <= len(bin_members(ordered[-8:], 192))
