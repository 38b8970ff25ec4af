"""Bad inputs, fuzzed: data files, configs, paths, checkpoints, adapters and model dirs.

Every case must end in a one-line `UserError` that names the file, line or key, never in another
exception, and must leave every file that existed before it byte-for-byte as it was. Cases run
in-process on the functions the CLI calls (prepare_data, config_from_dict, setup_training up to
the failure, resolve_adapter, load_for_inference, run_merge), so ~300 of them take seconds.

Hand-written cases name the expected message; seeded random mutations of valid files (bytes
flipped, inserted, deleted, cut) may also load fine, but must never raise anything else.
"""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import DOLLY_ROWS, check_outcome, snapshot, tiny_config, write_jsonl

from qlora_lab import adapters
from qlora_lab.config import DataConfig, config_from_dict, load_yaml, parse_overrides
from qlora_lab.data import prepare_data
from qlora_lab.generate import GenerateConfig, load_for_inference, read_prompt
from qlora_lab.merge import MergeConfig, run_merge
from qlora_lab.models import build_byte_tokenizer
from qlora_lab.train import setup_training

ROWS = DOLLY_ROWS[:4]
GOOD = {"instruction": "Add 2 and 2.", "context": "", "response": "4"}
CHATML = ("{% for m in messages %}{% if m['role'] == 'system' %}"
          "{{ raise_exception('System role not supported') }}{% endif %}"
          "<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


# --- the invariant: conftest.check_outcome (one line, pre-existing files untouched) --------


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


# --- data files --------------------------------------------------------------------------------


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def csv_bytes(header, *rows) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def parquet_bytes(rows=None, table=None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table if table is not None else pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


VALID_JSONL = jsonl(*ROWS)
FOURTH = len(jsonl(*ROWS[:3]))  # byte offset where line 4 starts

# (id, file name, contents, expected fragments, DataConfig overrides); "{f}" is the file path.
DATA_CASES = [
    ("empty", "d.jsonl", b"", ["{f} has no rows"], {}),
    ("blank-lines", "d.jsonl", b"\n  \n\t\n", ["{f} has no rows"], {}),
    ("empty-json", "d.json", b"", ["{f}:1: invalid JSON"], {}),
    ("empty-csv", "d.csv", b"", ["{f} has no rows"], {}),
    ("header-only-csv", "d.csv", b"instruction,context,response\n", ["{f} has no rows"], {}),
    ("empty-parquet-file", "d.parquet", b"", ["{f}: not a readable Parquet"], {}),
    *[(f"truncated-line4-at-{cut}", "d.jsonl", VALID_JSONL[: FOURTH + cut],
       ["{f}:4: invalid JSON"], {}) for cut in (1, 2, 5, 13, 20, 40, 60, 80, 95)],
    *[(f"{key}-is-{type(value).__name__}-{i}", "d.jsonl", jsonl(GOOD, {**GOOD, key: value}),
       ["{f}:2:", f"field {key!r} must be a string"], {})
      for key in ("instruction", "response", "context")
      for i, value in enumerate((5, 1.5, True, [], {"a": 1}, ["x"]))],
    ("instruction-null", "d.jsonl", jsonl(GOOD, {**GOOD, "instruction": None}),
     ["{f}:2: missing field 'instruction'"], {}),
    ("response-null", "d.jsonl", jsonl(GOOD, {**GOOD, "response": None}),
     ["{f}:2: missing field 'response'"], {}),
    ("response-nan", "d.jsonl", jsonl(GOOD, '{"instruction": "a", "response": NaN}'),
     ["{f}:2:", "must be a string, got float"], {}),
    ("instruction-empty", "d.jsonl", jsonl(GOOD, {**GOOD, "instruction": ""}),
     ["{f}:2: empty 'instruction'"], {}),
    ("response-blank", "d.jsonl", jsonl(GOOD, {**GOOD, "response": " \n\t"}),
     ["{f}:2: empty 'response'"], {}),
    ("missing-response", "d.jsonl", jsonl(GOOD, {"instruction": "x", "context": "y"}),
     ["{f}:2: missing field 'response'"], {}),
    ("missing-instruction", "d.jsonl", jsonl(GOOD, {"response": "x"}),
     ["{f}:2: missing field 'instruction'"], {}),
    ("unknown-columns", "d.jsonl", jsonl({"question": "a", "answer": "b"}),
     ["{f}:1: cannot detect the schema", "['answer', 'question']"], {}),
    ("empty-object", "d.jsonl", jsonl({}), ["{f}:1: cannot detect the schema"], {}),
    ("mixed-dolly-alpaca", "d.jsonl", jsonl(GOOD, {"instruction": "a", "input": "", "output": "b"}),
     ["{f}:2: missing field 'response'"], {}),
    ("mixed-dolly-chat", "d.jsonl",
     jsonl(GOOD, {"messages": [{"role": "user", "content": "a"}]}),
     ["{f}:2: missing field 'instruction'"], {}),
    ("mixed-chat-dolly", "d.jsonl",
     jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
           GOOD), ["{f}:2: field 'messages' must be a non-empty list"], {}),
    *[(f"line-is-{name}", "d.jsonl", jsonl(GOOD, raw), ["{f}:2: expected an object"], {})
      for name, raw in (("list", "[1, 2]"), ("string", '"row"'), ("number", "5"),
                        ("null", "null"), ("bool", "true"))],
    ("only-a-list-row", "d.jsonl", b"[1]\n", ["{f}:1: expected an object, got list"], {}),
    ("first-row-broken", "d.jsonl", jsonl('{"instruction": ', GOOD), ["{f}:1: invalid JSON"], {}),
    ("all-rows-broken", "d.jsonl", jsonl("{", "}"), ["{f}:1: invalid JSON"], {}),
    ("non-utf8-ff", "d.jsonl", VALID_JSONL + b'{"instruction": "\xff"}\n',
     ["{f}:5: not valid UTF-8"], {}),
    ("latin1", "d.jsonl", jsonl(GOOD) + '{"instruction": "café", "response": "x"}\n'.encode("latin-1"),
     ["{f}:2: not valid UTF-8"], {}),
    ("cut-multibyte", "d.jsonl", jsonl(GOOD) + '{"instruction": "é'.encode()[:-1],
     ["{f}:2: not valid UTF-8"], {}),
    ("utf16", "d.jsonl", VALID_JSONL.decode().encode("utf-16"), ["{f}:1: not valid UTF-8"], {}),
    ("nul-in-string", "d.jsonl", jsonl(GOOD) + b'{"instruction": "a\x00b", "response": "c"}\n',
     ["{f}:2: invalid JSON"], {}),
    ("deep-nesting", "d.jsonl", jsonl(GOOD, "[" * 100_000), ["{f}:2: invalid JSON"], {}),
    ("huge-integer", "d.jsonl", jsonl(GOOD, '{"instruction": ' + "9" * 5000 + "}"),
     ["{f}:2: invalid JSON"], {}),
    ("garbage-megabyte", "d.jsonl", jsonl(GOOD, "x" * 1_000_000), ["{f}:2: invalid JSON"], {}),
    ("lone-surrogate", "d.jsonl", jsonl(GOOD, '{"instruction": "a", "response": "\\ud800"}'),
     ["{f}:2: field 'response' holds invalid Unicode"], {}),
    ("chat-messages-string", "d.jsonl", jsonl({"messages": "hi"}),
     ["{f}:1: field 'messages' must be a non-empty list"], {}),
    ("chat-messages-empty", "d.jsonl", jsonl({"messages": []}),
     ["{f}:1: field 'messages' must be a non-empty list"], {}),
    ("chat-message-not-object", "d.jsonl", jsonl({"messages": ["hi"]}),
     ["{f}:1: messages[0] must be an object"], {}),
    ("chat-content-missing", "d.jsonl", jsonl({"messages": [{"role": "user"}]}),
     ["{f}:1: messages[0] must be an object with a string 'content'"], {}),
    ("chat-content-int", "d.jsonl", jsonl({"messages": [{"role": "user", "content": 1}]}),
     ["{f}:1: messages[0]"], {}),
    ("chat-role-function", "d.jsonl", jsonl({"messages": [{"role": "function", "content": "x"}]}),
     ["{f}:1: messages[0] has role 'function'"], {}),
    ("chat-role-list", "d.jsonl", jsonl({"messages": [{"role": ["user"], "content": "x"}]}),
     ["{f}:1: messages[0] has role ['user']"], {}),
    ("chat-no-assistant", "d.jsonl", jsonl({"messages": [{"role": "user", "content": "x"}]}),
     ["{f}:1: no non-empty assistant message"], {}),
    ("chat-surrogate", "d.jsonl",
     jsonl('{"messages": [{"role": "user", "content": "\\udfff"}, '
           '{"role": "assistant", "content": "b"}]}'),
     ["{f}:1: messages[0].content holds invalid Unicode"], {}),
    ("forced-chat-on-dolly", "d.jsonl", VALID_JSONL, ["{f}:1: field 'messages'"],
     {"schema": "chat"}),
    ("forced-alpaca-on-dolly", "d.jsonl", VALID_JSONL, ["{f}:1: missing field 'output'"],
     {"schema": "alpaca"}),
    ("overlength-drops-all", "d.jsonl", VALID_JSONL, ["{f} left no trainable rows"],
     {"max_seq_len": 16, "overlength": "drop"}),
    ("chat-template-missing", "d.jsonl", VALID_JSONL, ["data.template = 'chat'"],
     {"template": "chat"}),
    ("skip-bad-rows-all-bad", "d.jsonl", jsonl({**GOOD, "response": ""}, {**GOOD, "response": " "}),
     ["{f} left no trainable rows"], {"skip_bad_rows": True}),
    ("eval-source-missing", "d.jsonl", VALID_JSONL, ["data file nope.jsonl does not exist"],
     {"eval_source": "nope.jsonl"}),
    ("unsupported-suffix", "d.txt", VALID_JSONL, ["{f} has an unsupported suffix '.txt'"], {}),
    # .json files
    ("json-truncated", "d.json", json.dumps(ROWS).encode()[:-30], ["{f}:1: invalid JSON"], {}),
    *[(f"json-top-{name}", "d.json", raw, ["{f}: expected a list of row objects"], {})
      for name, raw in (("string", b'"rows"'), ("number", b"3"), ("null", b"null"),
                        ("true", b"true"))],
    ("json-list-of-numbers", "d.json", b"[1, 2]", ["{f}:item 0: expected an object"], {}),
    ("json-empty-list", "d.json", b"[]", ["{f} has no rows"], {}),
    ("json-two-lists", "d.json", json.dumps({"a": ROWS, "b": ROWS}).encode(),
     ["{f}:1: cannot detect the schema"], {}),
    ("json-deep-nesting", "d.json", b"[" * 100_000, ["{f}: invalid JSON"], {}),
    ("json-huge-integer", "d.json", b"[" + b"9" * 5000 + b"]", ["{f}: invalid JSON"], {}),
    ("json-lines-bad-line-3", "d.json", jsonl(GOOD, GOOD, "{oops}", GOOD),
     ["{f}:3: invalid JSON"], {}),
    ("json-wrapper-bad-item", "d.json", json.dumps({"train": [GOOD, {"instruction": 1}]}).encode(),
     ["{f}:item 1:", "must be a string"], {}),
    # .csv files
    ("csv-no-header", "d.csv", b"What is 1+1?,,2\nWhat is 2+2?,,4\n",
     ["{f}:2: cannot detect the schema"], {}),
    ("csv-extra-field", "d.csv", csv_bytes(["instruction", "context", "response"],
                                           ["a", "", "b", "surplus"]),
     ["{f}:2: more fields than the header names"], {}),
    ("csv-missing-field", "d.csv", b"instruction,context,response\nonly an instruction\n",
     ["{f}:2: missing field 'response'"], {}),
    ("csv-unterminated-quote", "d.csv", b'instruction,context,response\n"a,b',
     ["{f}:2: missing field 'response'"], {}),
    ("csv-field-over-limit", "d.csv", csv_bytes(["instruction", "context", "response"],
                                                ["a", "x" * 200_000, "b"]),
     ["{f}:2: unreadable CSV", "field larger than field limit"], {}),
    ("csv-semicolons", "d.csv", b"instruction;context;response\na;;b\n",
     ["cannot detect the schema"], {}),
    ("csv-empty-response", "d.csv", csv_bytes(["instruction", "context", "response"],
                                              ["a", "", ""]), ["{f}:2: empty 'response'"], {}),
    ("csv-non-utf8", "d.csv", b"instruction,context,response\n\xe9,,b\n",
     ["{f}:2: not valid UTF-8"], {}),
    # .parquet files
    ("parquet-garbage", "d.parquet", b"PAR1" + bytes(range(256)) * 4,
     ["{f}: not a readable Parquet"], {}),
    ("parquet-truncated", "d.parquet", parquet_bytes(ROWS)[:-40], ["{f}: not a readable Parquet"],
     {}),
    ("parquet-int-response", "d.parquet", parquet_bytes([{**GOOD, "response": 4}]),
     ["{f}:row 0: field 'response' must be a string, got int"], {}),
    ("parquet-null-response", "d.parquet", parquet_bytes([GOOD, {**GOOD, "response": None}]),
     ["{f}:row 1: missing field 'response'"], {}),
    ("parquet-binary-column", "d.parquet",
     parquet_bytes([{"instruction": b"a", "context": b"", "response": b"b"}]),
     ["{f}:row 0: field 'instruction' must be a string, got bytes"], {}),
    ("parquet-list-instruction", "d.parquet",
     parquet_bytes([{"instruction": ["a"], "response": "b"}]),
     ["{f}:row 0: field 'instruction' must be a string, got list"], {}),
    ("parquet-chat-bad-role", "d.parquet",
     parquet_bytes([{"messages": [{"role": "robot", "content": "x"}]}]),
     ["{f}:row 0: messages[0] has role 'robot'"], {}),
]


@pytest.mark.parametrize("name, contents, fragments, overrides",
                         [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tmp_path, tok, name, contents, fragments, overrides):
    path = tmp_path / name
    path.write_bytes(contents)
    cfg = DataConfig(source=str(path), eval_fraction=0.0, **overrides)
    check_outcome(lambda: prepare_data(cfg, tok, seed=0), tmp_path,
                  [f.replace("{f}", str(path)) for f in fragments])


@pytest.mark.parametrize("case", ["dir-named-like-a-file", "missing-file"])
def test_bad_data_paths(tmp_path, tok, case):
    path = tmp_path / "d.jsonl"
    if case == "dir-named-like-a-file":
        path.mkdir()
    fragment = "is a directory" if case == "dir-named-like-a-file" else "does not exist"
    check_outcome(lambda: prepare_data(DataConfig(source=str(path)), tok, seed=0), tmp_path,
                  [f"data file {path} {fragment}"])


def test_chat_template_that_raises_names_the_row(tmp_path, tok):
    chat_tok = build_byte_tokenizer()
    chat_tok.chat_template = CHATML
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}]}))
    cfg = DataConfig(source=str(path), eval_fraction=0.0, template="chat")
    check_outcome(lambda: prepare_data(cfg, chat_tok, seed=0), tmp_path,
                  [f"{path}:2: the chat template rejects this conversation",
                   "System role not supported"])
    data = prepare_data(replace(cfg, skip_bad_rows=True), chat_tok, seed=0)
    assert data.stats["bad_rows_skipped"] == 1 and len(data.train) == 1


def test_huge_rows_load_and_are_truncated(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(GOOD, {**GOOD, "response": "y" * 200_000},
                           {**GOOD, "context": "z" * 200_000}))
    data = prepare_data(DataConfig(source=str(path), eval_fraction=0.0, max_seq_len=512), tok, 0)
    # Both are cut to fit, prompt first: the long context loses its middle and keeps the answer.
    assert data.stats["truncated"] == 2 and data.stats["dropped_no_answer_tokens"] == 0
    assert len(data.train) == 3 and data.stats["clipped_chars"] > 0
    assert all(len(e["input_ids"]) <= 512 for e in data.train)


def test_multiline_csv_fields_survive(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_bytes(csv_bytes(["instruction", "context", "response"], ["a", "", "line 1\nline 2"]))
    data = prepare_data(DataConfig(source=str(path), eval_fraction=0.0), tok, seed=0)
    assert "line 1\nline 2" in tok.decode(data.train[0]["input_ids"])


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: flip, insert, delete a range, duplicate a range, or cut."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(max(1, len(data)))
        op = rng.choice(("flip", "insert", "delete", "duplicate", "cut"))
        if op == "flip" and data:
            data[pos] = rng.randrange(256)
        elif op == "insert":
            data[pos:pos] = bytes(rng.choice((b'"', b"{", b"}", b",", b"\n", b"\\", b"\xff",
                                              b"\x00", b"[", b":", b"\xc3", b"\r")))
        elif op == "delete":
            del data[pos:pos + rng.randint(1, 40)]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + rng.randint(1, 80)]
        else:
            del data[pos:]
    return bytes(data)


SEEDS = {
    "d.jsonl": VALID_JSONL,
    "d.json": json.dumps(ROWS, indent=1).encode(),
    "d.csv": csv_bytes(["instruction", "context", "response"],
                       *[[r["instruction"], r["context"], r["response"]] for r in ROWS]),
    "c.jsonl": jsonl(*[{"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["response"]}]}
                       for r in ROWS]),
}
MUTATIONS = [(name, i) for name, count in (("d.jsonl", 50), ("d.json", 20), ("d.csv", 20),
                                           ("c.jsonl", 20)) for i in range(count)]


@pytest.mark.parametrize("name, seed", MUTATIONS, ids=[f"{n}-{i}" for n, i in MUTATIONS])
def test_mutated_data_file(tmp_path, tok, name, seed):
    path = tmp_path / name
    path.write_bytes(mutate(SEEDS[name], random.Random(f"{name}-{seed}")))
    cfg = DataConfig(source=str(path), eval_fraction=0.0)
    check_outcome(lambda: prepare_data(cfg, tok, seed=0), tmp_path, [str(path)],
                  may_succeed=True)


# --- configs -----------------------------------------------------------------------------------

CONFIG_CASES = [
    *[({section: {"nope": 1}}, f"unknown config key {section}.nope")
      for section in ("model", "quant", "lora", "data", "train")],
    ({"training": {}}, "unknown config section 'training'"),
    ({1: {}}, "unknown config section 1"),
    ([1, 2], "config must be a mapping"),
    ("text", "config must be a mapping"),
    ({"train": [1]}, "config section train must be a mapping"),
    ({"lora": {"r": "big"}}, "lora.r = 'big' has the wrong type"),
    ({"lora": {"r": 8.5}}, "lora.r = 8.5 has the wrong type"),
    ({"lora": {"r": True}}, "lora.r = True has the wrong type"),
    ({"lora": {"r": None}}, "lora.r = None has the wrong type"),
    ({"lora": {"r": [8]}}, "lora.r = [8] has the wrong type"),
    ({"lora": {"r": 0}}, "lora.r = 0 is invalid"),
    ({"lora": {"r": -8}}, "lora.r = -8 is invalid"),
    ({"lora": {"alpha": 0}}, "lora.alpha = 0 is invalid"),
    ({"lora": {"dropout": 1.0}}, "lora.dropout = 1.0 is invalid"),
    ({"lora": {"dropout": "x"}}, "lora.dropout = 'x' has the wrong type"),
    ({"lora": {"weight_dtype": "int8"}}, "lora.weight_dtype = 'int8' is invalid"),
    ({"quant": {"bits": 8}}, "quant.bits = 8 is invalid"),
    ({"quant": {"bits": "4"}}, "quant.bits = '4' is invalid"),
    ({"quant": {"quant_type": "int4"}}, "quant.quant_type = 'int4' is invalid"),
    ({"quant": {"compute_dtype": "float8"}}, "quant.compute_dtype = 'float8' is invalid"),
    ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code = 'yes' has the wrong"),
    ({"model": {"attn_implementation": "flash"}}, "model.attn_implementation = 'flash'"),
    ({"model": {"name": ["a"]}}, "model.name = ['a'] has the wrong type"),
    ({"data": {"source": {"path": "x"}}}, "data.source = {'path': 'x'} has the wrong type"),
    ({"data": {"schema": "xml"}}, "data.schema = 'xml' is invalid"),
    ({"data": {"max_seq_len": 0}}, "data.max_seq_len = 0 is invalid"),
    ({"data": {"max_seq_len": 4}}, "data.max_seq_len = 4 is invalid"),
    ({"data": {"max_seq_len": -512}}, "data.max_seq_len = -512 is invalid"),
    ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction = 1.0 is invalid"),
    ({"data": {"eval_fraction": -0.1}}, "data.eval_fraction = -0.1 is invalid"),
    ({"data": {"max_rows": -1}}, "data.max_rows = -1 is invalid"),
    ({"data": {"max_eval_rows": -1}}, "data.max_eval_rows = -1 is invalid"),
    ({"data": {"overlength": "wrap"}}, "data.overlength = 'wrap' is invalid"),
    ({"data": {"eval_source": [1]}}, "data.eval_source = [1] has the wrong type"),
    *[({"train": {key: value}}, f"train.{key} = {value!r} is invalid")
      for key in ("micro_batch_size", "grad_accum_steps", "save_steps", "save_total_limit",
                  "logging_steps", "eval_steps") for value in (0, -1)],
    ({"train": {"max_steps": -1}}, "train.max_steps = -1 is invalid"),
    ({"train": {"max_steps": 0, "epochs": 0}}, "train.epochs = 0.0 is invalid"),
    ({"train": {"learning_rate": 0}}, "train.learning_rate = 0.0 is invalid"),
    ({"train": {"learning_rate": -1e-4}}, "train.learning_rate = -0.0001 is invalid"),
    ({"train": {"learning_rate": "nan"}}, "train.learning_rate = 'nan' is invalid: must be a finite number"),
    ({"train": {"learning_rate": "inf"}}, "train.learning_rate = 'inf' is invalid: must be a finite"),
    ({"lora": {"dropout": float("inf")}}, "lora.dropout = inf is invalid: must be a finite"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate = 'fast' has the wrong type"),
    ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio = 1.5 is invalid"),
    ({"train": {"max_grad_norm": -1}}, "train.max_grad_norm = -1.0 is invalid"),
    ({"train": {"optimizer": "sgd"}}, "train.optimizer = 'sgd' is invalid"),
    ({"train": {"lr_scheduler": "exp"}}, "train.lr_scheduler = 'exp' is invalid"),
    ({"train": {"device": "tpu"}}, "train.device = 'tpu' is invalid"),
    ({"train": {"seed": "x"}}, "train.seed = 'x' has the wrong type"),
    ({"train": {"output_dir": {"a": 1}}}, "train.output_dir = {'a': 1} has the wrong type"),
]


@pytest.mark.parametrize("values, fragment", CONFIG_CASES)
def test_bad_config_values(tmp_path, values, fragment):
    check_outcome(lambda: config_from_dict(values), tmp_path, [fragment])


@pytest.mark.parametrize("pair", ["lora", "lora.r", "=5", "a.b.c=1", ".r=1", "lora.=1", "", " = "])
def test_malformed_set(tmp_path, pair):
    check_outcome(lambda: parse_overrides([pair]), tmp_path, [f"--set {pair!r} is malformed"])


@pytest.mark.parametrize("pair, fragment", [
    ("lora.r=[1, 2", "lora.r = '[1, 2' has the wrong type"),
    ("train.max_steps=1e3", "train.max_steps = '1e3' has the wrong type"),
    ("train.max_steps=!!python/object/apply:os.system [echo]", "train.max_steps"),
    ("lora.r=~", "lora.r = None has the wrong type"),
])
def test_set_values_are_data_never_code(tmp_path, pair, fragment):
    check_outcome(lambda: config_from_dict(parse_overrides([pair])), tmp_path, [fragment])


YAML_CASES = [
    ("unclosed", b"lora: [unclosed", "is not valid YAML"),
    ("python-tag", b"train:\n  seed: !!python/object/apply:os.system ['echo pwned']\n",
     "is not valid YAML"),
    ("non-utf8", b"lora:\n  r: \xff\n", "is not valid YAML"),
    ("tab-indent", b"lora:\n\tr: 8\n", "is not valid YAML"),
    ("top-list", b"- lora\n- r\n", "config must be a mapping"),
    ("top-scalar", b"just text\n", "config must be a mapping"),
    ("unhashable-key", b"? [a, b]\n: 1\n", "is not valid YAML"),
    ("alias-bomb", b"a: &a [x, x]\nb: &b [*a, *a]\nlora: {r: *b}\n", "unknown config section"),
]


@pytest.mark.parametrize("contents, fragment", [c[1:] for c in YAML_CASES],
                         ids=[c[0] for c in YAML_CASES])
def test_bad_yaml_files(tmp_path, contents, fragment):
    path = tmp_path / "c.yaml"
    path.write_bytes(contents)
    check_outcome(lambda: config_from_dict(load_yaml(path)), tmp_path, [fragment])


# --- output dirs, resume, models (setup_training fails before anything is loaded or written) ---


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", DOLLY_ROWS)


def _earlier_run(path: Path, trained_run: Path) -> Path:
    shutil.copytree(trained_run, path, ignore=shutil.ignore_patterns("checkpoint-3"))
    return path


OUTPUT_CASES = ["is-a-file", "under-a-file", "foreign-files", "foreign-files-overwrite",
                "earlier-run", "resume-nothing", "resume-foreign", "resume-missing-name",
                "resume-a-file", "resume-staging-dir"]


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_bad_output_dirs(tmp_path, data_file, trained_run, case):
    out, resume, overwrite = tmp_path / "out", None, False
    if case == "is-a-file":
        out.write_text("x")
        fragment = f"output dir {out} is a file"
    elif case == "under-a-file":
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "out"
        fragment = f"output dir {out} is not writable"
    elif case.startswith("foreign-files"):
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        overwrite = case.endswith("overwrite")
        fragment = "no qlora-lab run wrote" if overwrite else "is not empty — pass --resume"
    elif case == "earlier-run":
        _earlier_run(out, trained_run)
        fragment = f"output dir {out} is not empty"
    elif case == "resume-nothing":
        resume, fragment = True, f"--resume: output dir {out} does not exist"
    elif case == "resume-foreign":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
        resume, fragment = True, "holds files that no qlora-lab run wrote"
    elif case == "resume-missing-name":
        _earlier_run(out, trained_run)
        resume, fragment = "checkpoint-99", "--resume checkpoint-99: no such checkpoint"
    elif case == "resume-a-file":
        _earlier_run(out, trained_run)
        resume, fragment = str(out / "config.yaml"), "is not a checkpoint folder"
    else:
        _earlier_run(out, trained_run)
        staging = out / "checkpoints" / ".tmp-checkpoint-9" / "checkpoint-9"
        shutil.copytree(out / "checkpoints" / "checkpoint-6", staging)
        resume, fragment = str(staging), "is an unfinished checkpoint"
    cfg = _run_config(out, data_file)
    check_outcome(lambda: setup_training(cfg, resume=resume, overwrite=overwrite), tmp_path,
                  [fragment])


def _run_config(out: Path, data_file: Path):
    """The config a resume of `out` repeats (its saved one), else a fresh tiny config."""
    if (out / "config.yaml").is_file():
        cfg = load_yaml(out / "config.yaml")
        cfg["train"]["output_dir"] = str(out)
        return config_from_dict(cfg)
    return tiny_config(out, data_file)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CHECKPOINT_DAMAGE = {
    "state-not-json": (lambda c: (c / "trainer_state.json").write_text("{"),
                       "corrupted trainer_state.json (not JSON)"),
    "state-no-step": (lambda c: (c / "trainer_state.json").write_text("{}"),
                      "corrupted trainer_state.json (no global_step)"),
    "state-list": (lambda c: (c / "trainer_state.json").write_text("[6]"),
                   "corrupted trainer_state.json (no global_step)"),
    "no-optimizer": (lambda c: (c / "optimizer.pt").unlink(), "has no optimizer.pt"),
    "no-scheduler": (lambda c: (c / "scheduler.pt").unlink(), "has no scheduler.pt"),
    "no-adapter": (lambda c: (c / "adapter_model.safetensors").unlink(),
                   "has no adapter_model.safetensors"),
    "optimizer-truncated": (lambda c: _truncate(c / "optimizer.pt"),
                            "truncated or corrupted optimizer.pt"),
    "scheduler-garbage": (lambda c: (c / "scheduler.pt").write_bytes(b"\x80\x04garbage"),
                          "truncated or corrupted scheduler.pt"),
    "rng-truncated": (lambda c: _truncate(c / "rng_state.pth"),
                      "truncated or corrupted rng_state.pth"),
    "adapter-truncated": (lambda c: _truncate(c / "adapter_model.safetensors"),
                          "adapter_model.safetensors that is truncated"),
    "adapter-empty": (lambda c: (c / "adapter_model.safetensors").write_bytes(b""),
                      "adapter_model.safetensors that is truncated"),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
@pytest.mark.parametrize("named", [True, False], ids=["named", "newest"])
def test_damaged_checkpoints_are_refused(tmp_path, data_file, trained_run, damage, named):
    out = _earlier_run(tmp_path / "out", trained_run)
    breaker, fragment = CHECKPOINT_DAMAGE[damage]
    breaker(out / "checkpoints" / "checkpoint-6")
    cfg = _run_config(out, data_file)
    resume = "checkpoint-6" if named else True
    lead = "--resume checkpoint-6:" if named else "--resume: no usable checkpoint"
    check_outcome(lambda: setup_training(cfg, resume=resume), tmp_path, [lead, fragment])


def _model_dir(tmp_path: Path, trained_run: Path, case: str) -> Path:
    base = Path(json.loads((trained_run / "adapter/adapter_config.json").read_text())[
        "base_model_name_or_path"])
    model = tmp_path / "model"
    shutil.copytree(base, model)
    if case == "no-config":
        (model / "config.json").unlink()
    elif case == "config-not-json":
        (model / "config.json").write_text("{ not json")
    elif case == "config-wrong-types":
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, "hidden_size": "wide"}))
    elif case == "weights-garbage":
        (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b"0" * 64)
    elif case == "weights-truncated":
        _truncate(model / "model.safetensors")
    elif case == "pickle-only":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return model


MODEL_CASES = {
    "no-config": "has no config.json",
    "config-not-json": "could not load",
    "config-wrong-types": "could not load",
    "weights-garbage": "could not load",
    "weights-truncated": "could not load",
    "pickle-only": "holds only pickle weights (pytorch_model.bin)",
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_base_model_dirs_for_train(tmp_path, data_file, trained_run, case):
    model = _model_dir(tmp_path, trained_run, case)
    cfg = tiny_config(tmp_path / "out", data_file)
    cfg = replace(cfg, model=replace(cfg.model, name=str(model)))
    check_outcome(lambda: setup_training(cfg), tmp_path, [MODEL_CASES[case]])
    assert not (tmp_path / "out" / "config.yaml").exists()  # nothing written on failure


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_model_dirs_for_generate(tmp_path, trained_run, case):
    model = _model_dir(tmp_path, trained_run, case)
    check_outcome(lambda: load_for_inference(GenerateConfig(model_dir=str(model))), tmp_path,
                  [MODEL_CASES[case].replace("could not load", f"could not load model {model}")])


@pytest.mark.parametrize("name, fragment", [
    ("./no/such/model", "neither an existing path nor a hub id"),
    ("missing.gguf", "model file missing.gguf does not exist"),
    ("a/b/c", "neither an existing path nor a hub id"),
])
def test_bad_model_names(tmp_path, data_file, name, fragment):
    cfg = tiny_config(tmp_path / "out", data_file)
    cfg = replace(cfg, model=replace(cfg.model, name=name))
    check_outcome(lambda: setup_training(cfg), tmp_path, [fragment])


@pytest.mark.parametrize("values, fragment", [
    ({"train": {"optimizer": "paged_adamw_8bit"}}, "train.optimizer = 'paged_adamw_8bit' needs CUDA"),
    ({"train": {"optimizer": "adamw_8bit"}}, "train.optimizer = 'adamw_8bit' needs CUDA"),
    ({"train": {"device": "cuda"}}, "train.device = 'cuda' but no CUDA device"),
    ({"train": {"compile": True, "cuda_graphs": True, "gradient_checkpointing": False}}, "train.cuda_graphs = true needs CUDA"),
    ({"data": {"template": "chat"}}, "data.template = 'chat' but the tokenizer has no chat"),
    ({"data": {"eval_source": "missing.jsonl"}}, "data file missing.jsonl does not exist"),
])
def test_inconsistent_choices(tmp_path, data_file, values, fragment):
    import torch

    if "cuda" in fragment.lower() and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    cfg = config_from_dict(values, tiny_config(tmp_path / "out", data_file))
    check_outcome(lambda: setup_training(cfg), tmp_path, [fragment])


@pytest.mark.parametrize("key", ["source", "eval_source"])
def test_a_missing_data_file_is_the_first_error_before_the_model(tmp_path, data_file, key):
    # A hub model this offline machine cannot reach: the wrong data path must still be what
    # the user hears first (before a tokenizer download, or a hub error about the model).
    cfg = tiny_config(tmp_path / "out", data_file)
    cfg = replace(cfg, model=replace(cfg.model, name="no-such-org/no-such-model"),
                  data=replace(cfg.data, **{key: str(tmp_path / "missing.jsonl")}))
    check_outcome(lambda: setup_training(cfg), tmp_path, ["missing.jsonl does not exist"])


# --- adapters ----------------------------------------------------------------------------------


def _safetensors_header(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


ADAPTER_DAMAGE = {
    "weights-missing": (lambda a: (a / "adapter_model.safetensors").unlink(),
                        "has no adapter_model.safetensors"),
    "config-missing": (lambda a: (a / "adapter_config.json").unlink(),
                       "has no adapter_config.json"),
    "pickle-only": (lambda a: (a / "adapter_model.safetensors").rename(a / "adapter_model.bin"),
                    "holds only pickle weights (adapter_model.bin)"),
    "weights-empty": (lambda a: (a / "adapter_model.safetensors").write_bytes(b""),
                      "adapter_model.safetensors is truncated (no header)"),
    "weights-4-bytes": (lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x01\x02\x03\x04"),
                        "is truncated (no header)"),
    "weights-garbage": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        bytes(random.Random(0).randrange(256) for _ in range(4096))), "bad header length"),
    "weights-header-not-json": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", 8) + b"not json" + b"\x00" * 8), "its header is not JSON"),
    "weights-header-list": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        _safetensors_header([1])), "not a JSON object"),
    "weights-bad-offsets": (lambda a: (a / "adapter_model.safetensors").write_bytes(
        _safetensors_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
                            b"\x00" * 8)), "bad entry for tensor 'w'"),
    "weights-truncated": (lambda a: _truncate(a / "adapter_model.safetensors"), "is truncated"),
    "config-not-json": (lambda a: (a / "adapter_config.json").write_text("{'r': 8"),
                        "adapter_config.json is corrupted (not valid JSON)"),
    "config-list": (lambda a: (a / "adapter_config.json").write_text("[]"),
                    "adapter_config.json is corrupted (expected a JSON object, got list)"),
    "config-non-utf8": (lambda a: (a / "adapter_config.json").write_bytes(b'{"r": "\xff"}'),
                        "adapter_config.json is corrupted"),
    "base-info-not-json": (lambda a: (a / adapters.BASE_INFO_FILE).write_text("{"),
                           "qlora_lab_base.json is corrupted (not valid JSON)"),
    "base-info-list": (lambda a: (a / adapters.BASE_INFO_FILE).write_text("[1]"),
                       "qlora_lab_base.json is corrupted (expected a JSON object"),
    "base-info-model-int": (lambda a: _edit_info(a, model=5), "model = 5 must be a str"),
    "base-info-bits-8": (lambda a: _edit_info(a, quant={"bits": 8}), "quant.bits = 8 is invalid"),
    "base-info-quant-unknown": (lambda a: _edit_info(a, quant={"group": 64}),
                                "unknown config key quant.group"),
    "base-info-template": (lambda a: _edit_info(a, template="xml"), "template = 'xml' must be"),
    "base-info-fingerprint-list": (lambda a: _edit_info(a, fingerprint=[1]),
                                   "fingerprint = [1] must be a dict"),
    "base-info-trust-string": (lambda a: _edit_info(a, trust_remote_code="yes"),
                               "trust_remote_code = 'yes' must be a bool"),
    "base-info-wants-remote-code": (lambda a: _edit_info(a, trust_remote_code=True),
                                    "pass --trust-remote-code"),
    "no-base-named": (lambda a: (_edit_info(a, model=""), _edit_config(a, base_model_name_or_path=None)),
                      "does not name its base model"),
}


def _edit_info(adapter: Path, **changes) -> None:
    path = adapter / adapters.BASE_INFO_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage", sorted(ADAPTER_DAMAGE))
def test_damaged_adapters_are_refused(tmp_path, trained_run, damage):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    breaker, fragment = ADAPTER_DAMAGE[damage]
    breaker(adapter)
    check_outcome(lambda: adapters.resolve_adapter(str(adapter)), tmp_path, [fragment])


@pytest.mark.parametrize("case, fragment", [
    ("other-base-fingerprint", "was trained on a different base (hidden_size = 999"),
    ("peft-config-garbage", "could not load adapter"),
    ("shapes-of-another-base", "could not load adapter"),
])
def test_adapters_that_do_not_fit_their_base(tmp_path, trained_run, case, fragment):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    if case == "other-base-fingerprint":
        info = json.loads((adapter / adapters.BASE_INFO_FILE).read_text())
        _edit_info(adapter, fingerprint={**info["fingerprint"], "hidden_size": 999})
    elif case == "peft-config-garbage":
        _edit_config(adapter, r="eight", target_modules=5)
    else:  # a plain peft adapter (no base info) whose tensors have the wrong shapes
        (adapter / adapters.BASE_INFO_FILE).unlink()
        tensors = load_file(adapter / "adapter_model.safetensors")
        save_file({k: torch.zeros(3, 5) for k in tensors}, adapter / "adapter_model.safetensors")
    check_outcome(lambda: load_for_inference(GenerateConfig(adapter=str(adapter))), tmp_path,
                  [fragment])


# --- generate and merge arguments ----------------------------------------------------------------


@pytest.mark.parametrize("case, fragment", [
    ("prompt-file-missing", "prompt file"),
    ("prompt-file-non-utf8", "is not UTF-8 text"),
    ("prompt-file-empty", "the prompt is empty"),
    ("prompt-file-is-dir", "does not exist"),
    ("max-new-tokens-0", "--max-new-tokens 0 must be a positive integer"),
    ("temperature-negative", "--temperature -1.0 must be 0 (greedy) or between 0.01 and 100"),
    ("adapter-and-model-dir", "pass either --adapter or --model-dir"),
    ("nothing-to-run", "nothing to run"),
])
def test_bad_generate_arguments(tmp_path, case, fragment):
    prompt = tmp_path / "p.txt"
    kwargs = {"model": "tiny-random", "prompt_file": str(prompt)}
    if case == "prompt-file-non-utf8":
        prompt.write_bytes(b"caf\xe9")
    elif case == "prompt-file-empty":
        prompt.write_text("  \n")
    elif case == "prompt-file-is-dir":
        prompt.mkdir()
    elif case == "max-new-tokens-0":
        kwargs["max_new_tokens"] = 0
    elif case == "temperature-negative":
        kwargs["temperature"] = -1.0
    elif case == "adapter-and-model-dir":
        kwargs.update(adapter="a", model_dir="b")
    elif case == "nothing-to-run":
        kwargs = {}
    check_outcome(lambda: read_prompt(GenerateConfig(**kwargs)), tmp_path, [fragment])


@pytest.mark.parametrize("case", ["non-empty", "is-a-file", "under-a-file"])
def test_bad_merge_output_dirs(tmp_path, trained_run, case):
    out = tmp_path / "merged"
    if case == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
        fragment = "already exists and is not empty"
    elif case == "is-a-file":
        out.write_text("x")
        fragment = "already exists and is not empty"
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "merged"
        fragment = f"output dir {out} cannot be created"
    check_outcome(lambda: run_merge(MergeConfig(adapter=str(trained_run), output_dir=str(out))),
                  tmp_path, [fragment])


# --- the same mistakes through the command line ------------------------------------------------


@pytest.mark.parametrize("case", [
    "set-invalid", "set-malformed", "set-unknown", "max-steps-negative", "config-python-tag",
    "output-not-empty", "output-under-a-file", "resume-nothing", "data-deep-nesting",
    "generate-corrupt-adapter", "generate-pickle-model-dir", "merge-missing-adapter",
    "merge-output-not-empty",
])
def test_cli_prints_one_error_line(tmp_path, trained_run, capsys, monkeypatch, case):
    from qlora_lab.cli import main

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    train = ["-q", "train", "--model", "tiny-random", "--data", "d.jsonl", "--output-dir", "out"]
    args, fragment = {
        "set-invalid": ([*train, "--set", "lora.r=0"], "lora.r = 0 is invalid"),
        "set-malformed": ([*train, "--set", "lora"], "--set 'lora' is malformed"),
        "set-unknown": ([*train, "--set", "train.speed=11"], "unknown config key train.speed"),
        "max-steps-negative": ([*train, "--max-steps", "-5"], "train.max_steps = -5"),
        "config-python-tag": ([*train, "--config", "c.yaml"], "c.yaml is not valid YAML"),
        "output-not-empty": (train, "output dir out is not empty"),
        "output-under-a-file": ([*train[:-1], "d.jsonl/out"], "is not writable"),
        "resume-nothing": ([*train, "--resume"], "--resume: output dir out does not exist"),
        "data-deep-nesting": ([*train[:5], "deep.jsonl", *train[6:]], "deep.jsonl:1: invalid JSON"),
        "generate-corrupt-adapter": (["-q", "generate", "--adapter", "a", "--prompt", "hi"],
                                     "adapter_model.safetensors is truncated"),
        "generate-pickle-model-dir": (["-q", "generate", "--model-dir", "m", "--prompt", "hi"],
                                      "holds only pickle weights"),
        "merge-missing-adapter": (["-q", "merge", "--adapter", "nope", "--output-dir", "m2"],
                                  "adapter dir nope does not exist"),
        "merge-output-not-empty": (["-q", "merge", "--adapter", str(trained_run),
                                    "--output-dir", "out"], "output dir out already exists"),
    }[case]
    (tmp_path / "c.yaml").write_text("train:\n  seed: !!python/object/apply:os.system ['echo']\n")
    (tmp_path / "deep.jsonl").write_text("[" * 50_000 + "\n")
    if case in ("output-not-empty", "merge-output-not-empty"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
    shutil.copytree(trained_run / "adapter", tmp_path / "a")
    _truncate(tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    before = snapshot(tmp_path)
    assert main(args) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], stderr
    assert "Traceback" not in stderr
    after = snapshot(tmp_path)
    assert all(after.get(name) == digest for name, digest in before.items())
