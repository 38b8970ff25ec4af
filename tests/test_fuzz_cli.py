"""Generated hostile inputs through the real command line (issue #12).

Five families of inputs run through `qlora_lab.cli.main(argv)` in-process, as `qlora-lab ...` would
run them:

1. YAML files given to `train --config`: alias bombs, deep nesting, python tags, unknown or
   mistyped keys, out-of-range values, bytes that are not UTF-8, files over the size limit;
2. `train --set section.key=value` pairs: malformed, unknown, mistyped, bombs, huge, tagged;
3. data files given to `train --data`, each with its first row (or every row) bad;
4. adapter folders given to `generate --adapter`, copied from a trained run and then tampered;
5. run folders given to `train --output-dir RUN --resume`: a changed key that a resume may not
   change, a damaged config.yaml or trainer_state.json, another run's checkpoint, no marker.

Every case is built so that it must be refused, and every case checks the same invariant:

- `main` returns 2 (a user error) and no exception escapes it;
- stderr is exactly one line of fewer than 600 characters, `qlora-lab <command>: error: ...`,
  and holds no traceback;
- no file under the test's folder or the shared trained run is created, changed or deleted, so
  nothing outside the output folder is touched and nothing inside it either (the empty lock file
  a refused `train` leaves in its output folder is the one exception);
- no model is loaded. The loaders are replaced by a tripwire, because every one of these inputs
  can be judged before loading; that is also what keeps ~400 cases within a minute or two.

Inputs come from `random.Random("<family>-<kind>-<i>")`, so a case's id names its inputs and they
are the same on every run. The cases whose ids start with `bug-` each broke an invariant when
this suite was written; their `bug` text says how, and they now pass like the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import struct
import types
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml
from conftest import DOLLY_ROWS, tiny_config, write_jsonl

from qlora_lab import adapters, cli, models, rundir
from qlora_lab.config import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_LORA_ALPHA,
    MAX_LORA_RANK,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MAX_YAML_BYTES,
    MAX_YAML_NODES,
    RunConfig,
    to_dict,
)

MAX_LINE = 600  # characters in the one stderr line
TWO_MB = 2 * 1024 * 1024
LONG_NAME = "x" * 300  # one path component over the 255 bytes Linux allows
GENERATED: dict[str, int] = {}  # family -> generated cases (known bugs not counted)


def param(case_id: str, *values, bug: str | None = None):
    """One case; `bug` records what it did before it was fixed (kept as documentation)."""
    return pytest.param(*values, id=case_id)


def generate_family(family: str, kinds: dict[str, tuple[int, typing.Callable]],
                    extra: tuple = ()) -> list:
    """`count` cases of each kind, kind(rng) -> values, each from its own seeded RNG."""
    cases = []
    for kind, (count, make) in kinds.items():
        for i in range(count):
            case_id = f"{kind}-{i:02d}"
            values = make(random.Random(f"{family}-{case_id}"))
            cases.append(param(case_id, *values, *extra))
    GENERATED[family] = len(cases)
    return cases


# --- random material -----------------------------------------------------------------------------

ALPHABETS = (
    "äöüßéèçñøåœ",  # Latin with diacritics
    "абвгдежзиклмнопрст",  # Cyrillic
    "αβγδεζηθλμξπσφψω",  # Greek
    "配置训练模型数据键值",  # CJK
    "ابتثجحخدذرزسش",  # Arabic, right to left
    "🙂🔥💥🧨🐍🦙",  # outside the Basic Multilingual Plane
)
MARKS = "\u0301\u0308\u200d\u200b"  # combining accents, zero-width joiner and space


def word(rng: random.Random, max_len: int = 12) -> str:
    """A non-ASCII name: never a config key, a YAML keyword, a number or a path separator."""
    letters = [rng.choice(rng.choice(ALPHABETS)) for _ in range(rng.randint(1, max_len))]
    if rng.random() < 0.3:
        letters.insert(rng.randint(1, len(letters)), rng.choice(MARKS))
    return "".join(letters)


def ascii_letters(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _schema() -> dict[str, object]:
    """'section.key' -> type annotation, read from the config dataclasses themselves."""
    return {f"{section}.{key}": hint
            for section, cls in typing.get_type_hints(RunConfig).items()
            for key, hint in typing.get_type_hints(cls).items()}


SCHEMA = _schema()
SECTIONS = sorted({key.split(".")[0] for key in SCHEMA})
INT_KEYS = sorted(k for k, h in SCHEMA.items() if h is int)
FLOAT_KEYS = sorted(k for k, h in SCHEMA.items() if h is float)
BOOL_KEYS = sorted(k for k, h in SCHEMA.items() if h is bool)
LITERAL_KEYS = sorted(k for k, h in SCHEMA.items() if typing.get_origin(h) is Literal)

# Values each key refuses (config.py's bounds); every value here is of the key's own type.
OUT_OF_RANGE = {
    "lora.r": (0, -1, MAX_LORA_RANK + 1, 10**6),
    "lora.alpha": (0, -16, MAX_LORA_ALPHA + 1),
    "lora.dropout": (1.0, -0.05, 7.5),
    "data.max_seq_len": (0, 2, 7, -512, MAX_SEQ_LEN + 1),
    "data.eval_fraction": (1.0, -0.2, 2.5),
    "data.max_rows": (-1, MAX_STEPS + 1),
    "data.max_eval_rows": (-1, -200),
    "train.max_steps": (-1, MAX_STEPS + 1),
    "train.micro_batch_size": (0, -4, MAX_BATCH + 1, 10**20),
    "train.grad_accum_steps": (0, -1, MAX_BATCH + 1),
    "train.logging_steps": (0, -1, MAX_STEPS + 1),
    "train.eval_steps": (0, MAX_STEPS + 1),
    "train.save_steps": (0, -10),
    "train.save_total_limit": (0, -1),
    "train.seed": (-1, 2**32, 2**40),
    "train.epochs": (MAX_EPOCHS + 1, 1e9),
    "train.learning_rate": (0, -1e-4, -3.0),
    "train.warmup_ratio": (1.0, -0.1, 5),
    "train.max_grad_norm": (-1, -0.3),
    "train.checkpoint_every": (0, -2),
}
# Settings that are valid on their own, mixed in so that the bad one is not alone.
VALID_SETTINGS = {"lora": {"alpha": 32, "dropout": 0.05}, "data": {"max_seq_len": 128},
                  "train": {"max_steps": 2, "save_steps": 1}, "quant": {"bits": 4},
                  "model": {"attn_implementation": "eager"}}
PYTHON_TAGS = (
    '!!python/object/apply:os.system ["touch {p}"]',
    '!!python/object/apply:subprocess.check_output [["touch", "{p}"]]',
    '!!python/object/new:os.system ["touch {p}"]',
    '!!python/object/apply:builtins.open ["{p}", "w"]',
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/object:pathlib.Path {{}}",
    "!!python/tuple [1, 2]",
    "!!python/complex 1+2j",
    '!<tag:yaml.org,2002:python/object/apply:os.system> ["touch {p}"]',
    "!local {{a: 1}}",
)
# Tags SafeLoader does construct: each yields a value no int or bool key accepts.
SAFE_TAGS = ("!!binary aGVsbG8=", "!!timestamp 2001-12-14t21:59:43.10-05:00", "!!set {a, b}",
             "!!omap [{a: 1}, {b: 2}]", "!!pairs [{a: 1}]", "!!null ''", "!!float 3",
             "!!str 42")


def split_key(key: str) -> tuple[str, str]:
    section, name = key.split(".")
    return section, name


def nested(key: str, value, rng: random.Random | None = None) -> dict:
    """{section: {name: value}}, with some valid settings around it when `rng` is given."""
    section, name = split_key(key)
    doc: dict = {}
    if rng is not None:
        for other in rng.sample(sorted(VALID_SETTINGS), rng.randint(0, 3)):
            doc[other] = {k: v for k, v in VALID_SETTINGS[other].items() if k != name}
    doc.setdefault(section, {})[name] = value
    return doc


def dump(doc, rng: random.Random) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False,
                          default_flow_style=rng.choice([False, True, None])).encode()


def wrong_value(rng: random.Random, key: str):
    """A value of a type `key` refuses (None included only where None is not allowed)."""
    hint = SCHEMA[key]
    if hint is int:
        return rng.choice([[1, 2], {"a": 1}, True, False, None, word(rng), 8.5, [8], "12"])
    if hint is float:
        return rng.choice([[0.1], {"x": 1.0}, True, False, None, word(rng), [word(rng)]])
    if hint is bool:
        return rng.choice([1, 0, word(rng), [True], {"on": 1}, None, 0.5, "maybe"])
    if hint is str:  # a list is no wrong value for target_modules: it joins them
        lists = [] if key == "lora.target_modules" else [[word(rng)]]
        return rng.choice([*lists, {word(rng): 1}, True, False, None])
    choices = typing.get_args(hint)
    if isinstance(choices[0], int):
        return rng.choice([8, "4", 4.0, None, word(rng), [4]])
    return rng.choice([word(rng), 123, [choices[0]], {choices[0]: 1}, None, 2.5])


def wrong_value_text(rng: random.Random, key: str) -> str:
    """The same, as the YAML text a --set value would be."""
    hint = SCHEMA[key]
    if hint is int:
        return rng.choice(["[1, 2]", "{a: 1}", "true", "~", "8.5", word(rng), "", "'12'", "[8"])
    if hint is float:
        return rng.choice(["[0.1]", "{}", "false", "~", word(rng), "''", "[1e-3"])
    if hint is bool:
        return rng.choice(["1", "0", word(rng), "[]", "~", "2.5", "'true'"])
    if hint is str:
        return rng.choice(["{a: 1}", "true", "false", "~", "{}"])
    choices = typing.get_args(hint)
    if isinstance(choices[0], int):
        return rng.choice(["8", "'4'", "4.0", "~", word(rng)])
    return rng.choice([word(rng), "[x]", "~", "12", f"[{choices[0]}]"])


def alias_bomb(rng: random.Random, big: bool, flow: bool) -> tuple[str, int]:
    """Anchors a0..ad, each `breadth` references to the one before: breadth**depth leaves."""
    breadth = rng.randint(2, 12)
    if big:  # ten times the node limit, and up to millions of times more
        depth = math.ceil(math.log(10 * MAX_YAML_NODES, breadth)) + rng.randint(0, 6)
    else:  # a hundredth of it: small enough to expand, and then refused for what it holds
        depth = max(1, math.floor(math.log(MAX_YAML_NODES / 100, breadth)))
    leaf = rng.choice(["lol", "x", "💥", "'a'"])
    levels = [f"a0: &a0 [{', '.join([leaf] * breadth)}]"]
    for level in range(1, depth + 1):
        levels.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * breadth)}]")
    if flow:
        return "{" + ", ".join(levels) + "}", depth
    return "\n".join(levels), depth


def deep_nesting(rng: random.Random) -> str:
    """YAML nested far deeper than the composer's recursion allows."""
    style = rng.choice(["flow-seq", "flow-map", "block-seq", "block-map", "under-key"])
    if style == "flow-seq":  # on one line PyYAML takes ~2 s to give up, with newlines ~0
        n = rng.randint(2_000, 60_000)
        return ("[" + rng.choice(["", "\n", "\n", " \n "])) * n + "]" * n
    if style == "flow-map":
        n = rng.randint(2_000, 40_000)
        return "{k: " * n + "1" + "}" * n
    if style == "block-seq":
        return "- " * rng.randint(1_500, 8_000) + "x"
    if style == "block-map":
        return "".join("  " * i + "k:\n" for i in range(rng.randint(650, 800))) + "  " * 800 + "v"
    n = rng.randint(2_000, 30_000)
    section, name = split_key(rng.choice(sorted(SCHEMA)))
    return f"{section}:\n  {name}: " + "[" * n + "]" * n


BAD_UTF8 = (b"\xff", b"\xfe\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xe2\x82",
            b"\xf8\x88\x80\x80\x80", "café".encode("latin-1"))


def insert_bad_utf8(rng: random.Random, text: bytes) -> bytes:
    for _ in range(rng.randint(1, 3)):
        pos = rng.randint(0, len(text))
        text = text[:pos] + rng.choice(BAD_UTF8) + text[pos:]
    return text


# --- the invariant -------------------------------------------------------------------------------


class ModelLoadAttempted(BaseException):
    """Raised by the patched loaders. A BaseException, so that no `except Exception` that turns
    library errors into a UserError can hide it: the input got past every check."""


@pytest.fixture(autouse=True)
def tripwire(monkeypatch, tmp_path):
    """Model loads raise ModelLoadAttempted while `tripwire.armed` (a known bug may disarm it to
    show what happens after loading)."""
    state = types.SimpleNamespace(armed=True)

    def guard(load):
        def guarded(*args, **kwargs):
            if state.armed:
                raise ModelLoadAttempted("a model load was attempted")
            return load(*args, **kwargs)
        return guarded

    monkeypatch.setattr(models, "load_base_model", guard(models.load_base_model))
    monkeypatch.setattr(adapters, "load_adapter_model", guard(adapters.load_adapter_model))
    # A relative path written by mistake (or by a python tag that ran) lands where it is seen.
    monkeypatch.chdir(tmp_path)
    return state


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`; the (empty) lock a refused train creates is not one."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != rundir.LOCK}


def expect_refusal(argv: list[str], capsys, roots: list[Path], fragment: str | None) -> str:
    """Run the CLI on `argv`: exit 2, one short error line on stderr, no file touched."""
    command = argv[1]
    before = [tree(root) for root in roots]
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except ModelLoadAttempted:
        pytest.fail(f"qlora-lab {command} got past every check to a model load")
    except SystemExit as exc:
        pytest.fail(f"argparse refused the command line (exit {exc.code}): "
                    f"{capsys.readouterr().err[:500]}")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == cli.EXIT_USER_ERROR, (code, err[-2000:])
    assert len(lines) == 1, f"{len(lines)} stderr lines: {err[:2000]!r}"
    line = lines[0]
    assert line.startswith(f"qlora-lab {command}: error: "), line[:MAX_LINE]
    # Measured with the test folders' paths shortened: the bound is on what the message says,
    # not on how deep this machine's temporary folder is.
    short = line
    for root in roots:
        short = short.replace(str(root), "<tmp>")
    assert len(short) < MAX_LINE, f"{len(short)} characters: {line[:1000]}"
    assert "Traceback" not in err
    if fragment is not None:
        assert fragment in line, (fragment, line)
    for root, old in zip(roots, before):
        new = tree(root)
        changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
        assert not changed, f"files created, changed or deleted under {root}: {changed[:10]}"
    return line


def train_flags(tmp_path: Path) -> list[str]:
    """--model/--data/--output-dir for a fresh train: if a case were accepted, it would train."""
    data = tmp_path / "dolly.jsonl"
    if not data.exists():
        write_jsonl(data, DOLLY_ROWS)
    return ["--model", "tiny-random", "--data", str(data), "--output-dir", str(tmp_path / "out")]


# --- 1. YAML files given to --config -------------------------------------------------------------


def _config_alias_bomb(rng):
    big = rng.random() < 0.75
    bomb, depth = alias_bomb(rng, big, flow=False)
    section, name = split_key(rng.choice(sorted(SCHEMA)))
    text = f"{bomb}\n{section}:\n  {name}: *a{depth}\n"
    return text.encode(), "through YAML aliases" if big else "unknown config section 'a0'"


def _config_deep(rng):
    return deep_nesting(rng).encode(), "nested too deeply"


def _config_python_tag(rng):
    tag = rng.choice(PYTHON_TAGS).format(p=f"pwned-{rng.randrange(10**6)}")
    where = rng.choice(["key", "unknown", "top", "list"])
    section, name = split_key(rng.choice(sorted(SCHEMA)))
    text = {"key": f"{section}:\n  {name}: {tag}\n",
            "unknown": f"{word(rng)}:\n  {word(rng)}: {tag}\n",
            "top": f"{tag}\n",
            "list": f"lora:\n  target_modules: [q_proj, {tag}]\n"}[where]
    return text.encode(), "is not valid YAML"


def _config_safe_tag(rng):
    key = rng.choice(INT_KEYS + BOOL_KEYS)
    section, name = split_key(key)
    return (f"{section}:\n  {name}: {rng.choice(SAFE_TAGS)}\n".encode(),
            f"config key {key} = ")


def _config_unknown_section(rng):
    doc = nested("lora.alpha", 16, rng)
    doc[word(rng)] = {word(rng): rng.choice([1, "x", None, [1]])}
    return dump(doc, rng), "unknown config section"


def _config_unknown_key(rng):
    section = rng.choice(SECTIONS)
    return dump(nested(f"{section}.{word(rng)}", rng.choice([1, 0.5, "x", None]), rng), rng), \
        f"unknown config key {section}."


def _config_wrong_type(rng):
    key = rng.choice(sorted(set(SCHEMA) - {"data.eval_source"}))  # it may be None (null)
    return dump(nested(key, wrong_value(rng, key), rng), rng), f"config key {key} = "


def _config_not_finite(rng):
    key = rng.choice(FLOAT_KEYS + INT_KEYS)
    section, name = split_key(key)
    token = rng.choice([".nan", ".NaN", ".inf", "-.inf", "+.Inf", "1.0e+999", "'nan'", "'-inf'",
                        "1e999"])
    fragment = "must be a finite number" if key in FLOAT_KEYS else "has the wrong type"
    return f"{section}:\n  {name}: {token}\n".encode(), fragment


def _config_huge_int(rng):
    key = rng.choice(INT_KEYS)
    value = rng.choice([1, -1]) * 10 ** rng.randint(19, 300)  # |value| >= 2**63
    return dump(nested(key, value, rng), rng), f"config key {key} = "


def _config_negative(rng):
    key = rng.choice(INT_KEYS)
    return dump(nested(key, -rng.randint(1, 10**6), rng), rng), f"config key {key} = "


def _config_out_of_range(rng):
    key = rng.choice(sorted(OUT_OF_RANGE))
    return dump(nested(key, rng.choice(OUT_OF_RANGE[key]), rng), rng), f"config key {key} = "


def _config_not_utf8(rng):
    text = rng.choice([dump(nested("lora.r", 8, rng), rng), b"train:\n  seed: 'caf\xc3\xa9'\n"])
    if rng.random() < 0.2:
        return text.decode().encode("utf-16"), "not UTF-8"
    return insert_bad_utf8(rng, text), "not UTF-8"


def _config_top_level(rng):
    text = rng.choice([f"- {word(rng)}\n- lora\n", f"{rng.randint(-99, 99)}\n", f"{word(rng)}\n",
                       "[lora, r]\n", f"'{word(rng)}'\n", "true\n", "3.5\n",
                       f"- lora:\n    r: {rng.randint(1, 64)}\n"])
    return text.encode(), "config must be a mapping"


def _config_section_not_mapping(rng):
    section = rng.choice(SECTIONS)
    value = rng.choice(["[1, 2]", f"{word(rng)}", "17", "true", "[r, 8]", "'8'"])
    return f"{section}: {value}\n".encode(), f"config section {section} must be a mapping"


def _config_two_megabytes(rng):
    size = TWO_MB + rng.randint(0, 4096)
    style = rng.choice(["comments", "string", "keys"])
    if style == "comments":
        text = b"lora:\n  r: 8\n" + b"# " + b"x" * (size - 14) + b"\n"
    elif style == "string":
        text = b'model:\n  name: "' + b"a" * size + b'"\n'
    else:
        text = b"".join(f"k{i}: {i}\n".encode() for i in range(size // 9))
    return text, "a config is at most"


CONFIG_CASES = generate_family("config", {
    "alias-bomb": (8, _config_alias_bomb),
    "deep-nesting": (7, _config_deep),
    "python-tag": (9, _config_python_tag),
    "safe-tag-wrong-type": (6, _config_safe_tag),
    "unknown-section": (6, _config_unknown_section),
    "unknown-key": (7, _config_unknown_key),
    "wrong-type": (12, _config_wrong_type),
    "nan-inf": (6, _config_not_finite),
    "huge-int": (5, _config_huge_int),
    "negative": (5, _config_negative),
    "out-of-range": (9, _config_out_of_range),
    "not-utf8": (6, _config_not_utf8),
    "top-level-not-mapping": (6, _config_top_level),
    "section-not-mapping": (5, _config_section_not_mapping),
    "two-megabytes": (3, _config_two_megabytes),
}, extra=(True,)) + [
    param("bug-int-over-4300-digits", f"train:\n  seed: {'9' * 5000}\n".encode(), None, True,
          bug="PyYAML's int() raises ValueError (Python's 4300-digit limit) inside "
              "config.parse_yaml_text, which catches only YAMLError: traceback"),
    param("bug-hex-int-too-large-to-print", f"lora:\n  r: 0x{'f' * 4000}\n".encode(), None, True,
          bug="a hex int is parsed, then config._short's repr() of it exceeds the 4300-digit "
              "limit: ValueError traceback while formatting the 'too large' error"),
    param("bug-hex-int-as-str-key", f"model:\n  name: 0x{'f' * 4000}\n".encode(), None, True,
          bug="config._check_type turns an int into str for a str key: str() of a 4800-digit "
              "int raises ValueError: traceback"),
    param("bug-float-key-int-beyond-float", f"lora:\n  dropout: 1{'0' * 400}\n".encode(), None,
          True, bug="config._check_type calls float() on an int over 1.8e308: OverflowError "
                    "traceback"),
    param("bug-nul-in-output-dir", b'train:\n  output_dir: "out\\0x"\n', None, False,
          bug="train.output_dir holding a NUL byte reaches Path.mkdir in "
              "rundir.check_output_dir: ValueError 'embedded null byte' traceback"),
    param("bug-eval-source-name-too-long",
          f"data:\n  eval_source: {LONG_NAME}.jsonl\n".encode(), None, True,
          bug="a path component over 255 bytes makes Path.is_dir raise OSError(ENAMETOOLONG) "
              "in data.read_rows: traceback"),
]


@pytest.mark.parametrize("contents, fragment, with_flags", CONFIG_CASES)
def test_hostile_config_file(tmp_path, trained_run, capsys, contents, fragment, with_flags):
    config = tmp_path / "c.yaml"
    config.write_bytes(contents)
    argv = ["-q", "train", "--config", str(config)]
    if with_flags:
        argv += train_flags(tmp_path)
    expect_refusal(argv, capsys, [tmp_path, trained_run.parent], fragment)


# --- 2. --set pairs ------------------------------------------------------------------------------

VALID_PAIRS = ("train.max_steps=2", "lora.alpha=8", "data.max_seq_len=128",
               "train.tensorboard=false", "lora.dropout=0.1", "quant.double_quant=true")


def _set_argv(rng, hostile: str, key: str | None = None) -> list[str]:
    """The hostile pair among 0-2 valid ones (never for the same key, which would replace it)."""
    others = [p for p in VALID_PAIRS if key is None or not p.startswith(key + "=")]
    pairs = rng.sample(others, rng.randint(0, 2))
    pairs.insert(rng.randint(0, len(pairs)), hostile)
    return [f"--set={pair}" for pair in pairs]  # `--set=` keeps a leading '-' away from argparse


def _set_malformed(rng):
    key = rng.choice(sorted(SCHEMA))
    section, name = split_key(key)
    value = rng.choice(["8", "", "a=b", word(rng), "1.5"])
    style = rng.choice(["no-equals", "no-dot", "three-dots", "empty-part"])
    if style == "no-equals":
        text = rng.choice(["8", word(rng), "1.5", "[1, 2]"])
        pair = rng.choice([key, f"{key}:{text}", f"{key} {text}", word(rng), f"{key}->{text}"])
    elif style == "no-dot":
        pair = f"{rng.choice([section, name, word(rng), section + name])}={value}"
    elif style == "three-dots":
        pair = f"{key}.{rng.choice([name, word(rng)])}.{word(rng)}={value}"
    else:
        pair = rng.choice([f".{name}={value}", f"{section}.={value}", f"={value}", f"..={value}",
                           " . =1", "", "=", f"{section}..{name}={value}"])
    return _set_argv(rng, pair), "is malformed"


def _set_unknown(rng):
    if rng.random() < 0.4:
        return _set_argv(rng, f"{word(rng)}.{rng.choice(SECTIONS)}=1"), "unknown config section"
    section = rng.choice(SECTIONS)
    return (_set_argv(rng, f"{section}.{word(rng)}={rng.choice(['1', 'x', '~', '[1]'])}"),
            f"unknown config key {section}.")


def _set_wrong_type(rng):
    key = rng.choice(sorted(set(SCHEMA) - {"data.eval_source", "lora.target_modules"}))
    return _set_argv(rng, f"{key}={wrong_value_text(rng, key)}", key), f"config key {key} = "


def _set_alias_bomb(rng):
    big = rng.random() < 0.7
    bomb, _ = alias_bomb(rng, big, flow=True)
    key = rng.choice(sorted(SCHEMA))
    return (_set_argv(rng, f"{key}={bomb}", key),
            "through YAML aliases" if big else f"config key {key} = ")


def _set_huge_string(rng):
    key = rng.choice(INT_KEYS + FLOAT_KEYS + BOOL_KEYS + LITERAL_KEYS)
    if rng.random() < 0.3:
        size = MAX_YAML_BYTES + rng.randint(1, 500_000)
        return _set_argv(rng, f"{key}={'z' * size}", key), "a config is at most"
    text = ascii_letters(rng, rng.randint(10_000, 100_000))
    return _set_argv(rng, f"{key}={text}", key), f"config key {key} = "


def _set_yaml_tag(rng):
    key = rng.choice(INT_KEYS + BOOL_KEYS + LITERAL_KEYS)
    tag = rng.choice([*(t.format(p=f"pwned-{rng.randrange(10**6)}") for t in PYTHON_TAGS),
                      *(t for t in SAFE_TAGS if t not in ("!!float 3",))])
    return _set_argv(rng, f"{key}={tag}", key), f"config key {key} = "


def _set_out_of_range(rng):
    key = rng.choice(sorted(OUT_OF_RANGE))
    return (_set_argv(rng, f"{key}={rng.choice(OUT_OF_RANGE[key])!r}", key),
            f"config key {key} = ")


def _set_not_finite(rng):
    key = rng.choice(FLOAT_KEYS)
    token = rng.choice([".nan", ".inf", "-.inf", "nan", "inf", "-Infinity", "1e999", "NaN"])
    return _set_argv(rng, f"{key}={token}", key), "must be a finite number"


def _set_empty_output_dir(rng):
    return (_set_argv(rng, rng.choice(["train.output_dir=", "train.output_dir=  ",
                                       "train.output_dir=''", 'train.output_dir=" "'])),
            "train.output_dir")


SET_CASES = generate_family("set", {
    "malformed": (12, _set_malformed),
    "unknown": (10, _set_unknown),
    "wrong-type": (14, _set_wrong_type),
    "alias-bomb": (6, _set_alias_bomb),
    "huge-string": (6, _set_huge_string),
    "yaml-tag": (10, _set_yaml_tag),
    "out-of-range": (10, _set_out_of_range),
    "nan-inf": (5, _set_not_finite),
    "empty-output-dir": (3, _set_empty_output_dir),
}) + [
    param("bug-int-over-4300-digits", [f"--set=train.seed={'9' * 5000}"], None,
          bug="PyYAML's int() raises ValueError (4300-digit limit), uncaught in "
              "config.parse_yaml_text: traceback"),
    param("bug-binary-int-too-large-to-print", [f"--set=lora.r=0b{'1' * 15000}"], None,
          bug="config._short's repr() of a 4500-digit int raises ValueError: traceback"),
    param("bug-float-key-int-beyond-float", [f"--set=train.learning_rate=1{'0' * 400}"], None,
          bug="config._check_type: float() of an int over 1.8e308 raises OverflowError"),
    param("bug-model-name-too-long", [f"--set=model.name={LONG_NAME}"], None,
          bug="models.resolve_model_path: Path.exists raises OSError(ENAMETOOLONG)"),
    param("bug-data-source-name-too-long", [f"--set=data.source={LONG_NAME}.jsonl"], None,
          bug="data.read_rows: Path.is_dir raises OSError(ENAMETOOLONG)"),
    param("bug-output-dir-name-too-long", [f"--set=train.output_dir={LONG_NAME}"], None,
          bug="rundir.check_output_dir: Path.is_symlink raises OSError(ENAMETOOLONG)"),
    param("bug-output-dir-nul", ['--set=train.output_dir="out\\0x"'], None,
          bug="rundir.check_output_dir: Path.mkdir raises ValueError('embedded null byte')"),
    param("bug-data-path-message-unbounded", [f"--set=data.source={'a/' * 400}d.jsonl"], None,
          bug="'data file ... does not exist' quotes the whole 800-character path: a "
              "929-character line"),
]


@pytest.mark.parametrize("set_args, fragment", SET_CASES)
def test_hostile_set_pairs(tmp_path, trained_run, capsys, set_args, fragment):
    argv = ["-q", "train", *train_flags(tmp_path), *set_args]
    expect_refusal(argv, capsys, [tmp_path, trained_run.parent], fragment)


# --- 3. data files given to --data ---------------------------------------------------------------

DOLLY = [{k: r[k] for k in ("instruction", "context", "response")} for r in DOLLY_ROWS]
ALPACA = [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]}
          for r in DOLLY_ROWS]
CHAT = [{"messages": [{"role": "user", "content": r["instruction"]},
                      {"role": "assistant", "content": r["response"]}]} for r in DOLLY_ROWS]
SCHEMAS = {"dolly": (DOLLY, "instruction", "response"), "alpaca": (ALPACA, "instruction", "output")}


def _rows_with_bad(rng, bad_row) -> list:
    """1-6 rows where the first (or every) row went through `bad_row`: invalid without
    --skip-bad-rows whatever the other rows hold."""
    n = rng.randint(1, 6)
    every = rng.random() < 0.5
    schema = rng.choice(sorted(SCHEMAS))
    good = [dict(r) for r in rng.sample(SCHEMAS[schema][0], n)]
    return [bad_row(rng, schema, good[i]) if every or i == 0 else good[i] for i in range(n)]


def _jsonl(rng, rows) -> bytes:
    newline = rng.choice(["\n", "\r\n"])
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=rng.random() < 0.5))
                   + newline for r in rows).encode()


def _bad_type(rng, schema, row):
    _, instruction, answer = SCHEMAS[schema]
    field = rng.choice([instruction, answer, "context" if schema == "dolly" else "input"])
    row[field] = rng.choice([rng.randint(-9, 9), 2.5, True, False, [], [word(rng)],
                             {"text": word(rng)}, [[1]]])
    return row


def _missing_field(rng, schema, row):
    _, instruction, answer = SCHEMAS[schema]
    for field in rng.sample([instruction, answer], rng.randint(1, 2)):
        del row[field]
    if rng.random() < 0.3:
        row[word(rng, 6)] = word(rng)
    return row


def _non_object(rng, schema, row):
    return rng.choice(["[1, 2]", json.dumps(list(row.values())), '"a row"', "42", "null", "true",
                       "-0.5", json.dumps(word(rng))])


def _bad_json(rng, schema, row):
    text = json.dumps(row)
    return rng.choice([
        text[: rng.randint(1, len(text) - 1)],  # cut short: a prefix of an object never parses
        text.replace('"', "'"),
        text[:-1] + ",}",
        text.replace(":", "", 1),
        rng.choice("}])@#<") + text,
        "{" + word(rng) + "}",
    ])


def _bad_chat(rng, schema, row):
    messages = json.loads(json.dumps(CHAT[0]["messages"]))
    style = rng.choice(["content-type", "role", "not-list", "no-assistant", "message-type"])
    if style == "content-type":
        messages[rng.randrange(2)]["content"] = rng.choice([5, None, [], {"t": "x"}])
    elif style == "role":
        messages[rng.randrange(2)]["role"] = rng.choice([word(rng), 5, None, "tool", ["user"]])
    elif style == "not-list":
        messages = rng.choice(["hi", {}, 5, None, []])
    elif style == "no-assistant":
        messages = [m for m in messages if m["role"] != "assistant"]
    else:
        messages[rng.randrange(2)] = rng.choice(["hi", 5, None, ["user", "x"]])
    return {"messages": messages}


def _data_jsonl(bad_row):
    def make(rng):
        if bad_row is _bad_chat:
            n, every = rng.randint(1, 5), rng.random() < 0.5
            rows = [_bad_chat(rng, "chat", None) if every or i == 0 else CHAT[i] for i in range(n)]
        else:
            rows = _rows_with_bad(rng, bad_row)
        return "d.jsonl", _jsonl(rng, rows)
    return make


def _data_binary(rng):
    garbage = b"\xff" + rng.randbytes(rng.randint(1, 4096))
    good = _jsonl(rng, rng.sample(DOLLY, rng.randint(0, 3)))
    return rng.choice(["d.jsonl", "d.json", "d.csv"]), garbage + good


def _data_empty(rng):
    return rng.choice(["d.jsonl", "d.json", "d.csv"]), rng.choice([b"", b"\xef\xbb\xbf"])


def _data_whitespace(rng):
    blank = "".join(rng.choice([" ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", "\n\n"])
                    for _ in range(rng.randint(1, 200)))
    return rng.choice(["d.jsonl", "d.json", "d.csv"]), blank.encode()


def _data_json(rng):
    style = rng.choice(["bad-first-item", "truncated", "top-scalar", "two-lists", "not-utf8"])
    if style == "bad-first-item":
        bad = rng.choice([_bad_type, _missing_field, _non_object])
        rows = [json.loads(r) if isinstance(r, str) else r for r in _rows_with_bad(rng, bad)]
        doc = rows if rng.random() < 0.5 else {rng.choice(["train", "data", "rows"]): rows}
        return "d.json", json.dumps(doc, indent=rng.choice([None, 1])).encode()
    if style == "truncated":
        text = json.dumps(rng.sample(DOLLY, rng.randint(1, 5)))
        return "d.json", text[: rng.randint(1, len(text) - 1)].encode()
    if style == "top-scalar":
        return "d.json", rng.choice([b'"rows"', b"3", b"null", b"true", b"-1.5",
                                     json.dumps(word(rng)).encode()])
    if style == "two-lists":
        return "d.json", json.dumps({word(rng): DOLLY[:2], word(rng) + "2": DOLLY[2:4]}).encode()
    return "d.json", insert_bad_utf8(rng, json.dumps(DOLLY[:3]).encode())


def _csv_line(fields) -> str:
    return ",".join('"' + f.replace('"', '""') + '"' for f in fields)


def _data_csv(rng):
    header = ["instruction", "context", "response"]
    rows = [[r["instruction"], r["context"], r["response"]]
            for r in rng.sample(DOLLY, rng.randint(1, 5))]
    style = rng.choice(["empty-response", "missing-field", "extra-field", "unknown-header",
                        "not-utf8", "header-only", "unterminated-quote"])
    every = rng.random() < 0.5
    bad_rows = range(len(rows)) if every else [0]
    if style == "empty-response":
        for i in bad_rows:
            rows[i][2] = rng.choice(["", " ", "\t", "  \n "])
    elif style == "missing-field":
        for i in bad_rows:
            rows[i] = rows[i][: rng.randint(1, 2)]
    elif style == "extra-field":
        for i in bad_rows:
            rows[i] = rows[i] + [word(rng) for _ in range(rng.randint(1, 3))]
    elif style == "unknown-header":
        header = [word(rng, 6) for _ in range(3)]
    elif style == "header-only":
        rows = []
    text = "\n".join([",".join(header), *(_csv_line(r) for r in rows)]) + "\n"
    if style == "unterminated-quote":  # the open quote swallows the rest: one field, no response
        text = ",".join(header) + '\n"' + "\n".join(",".join(r) for r in rows) + "\n"
    raw = text.encode()
    if style == "not-utf8":
        raw = insert_bad_utf8(rng, raw)
    return "d.csv", raw


DATA_CASES = generate_family("data", {
    "jsonl-wrong-type": (10, _data_jsonl(_bad_type)),
    "jsonl-missing-field": (8, _data_jsonl(_missing_field)),
    "jsonl-non-object": (7, _data_jsonl(_non_object)),
    "jsonl-invalid-json": (9, _data_jsonl(_bad_json)),
    "jsonl-bad-chat": (7, _data_jsonl(_bad_chat)),
    "binary-garbage": (5, _data_binary),
    "empty": (5, _data_empty),
    "whitespace-only": (6, _data_whitespace),
    "json": (10, _data_json),
    "csv": (10, _data_csv),
}) + [
    param("bug-data-name-too-long", f"{LONG_NAME}.jsonl", _jsonl(random.Random(0), DOLLY),
          bug="data.read_rows: Path.is_dir raises OSError(ENAMETOOLONG) for a path component "
              "over 255 bytes: traceback"),
]


@pytest.mark.parametrize("name, contents", DATA_CASES)
def test_hostile_data_file(tmp_path, trained_run, capsys, name, contents):
    data = tmp_path / name
    if len(name) < 255:
        data.write_bytes(contents)
    argv = ["-q", "train", *train_flags(tmp_path), "--data", str(data)]
    expect_refusal(argv, capsys, [tmp_path, trained_run.parent], None if len(name) > 255
                   else str(data))


# --- 4. adapter folders given to generate --adapter ----------------------------------------------


def _json_file(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**_json_file(path), **changes}), encoding="utf-8")


def _read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header, payload: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def _adapter_config(rng, key: str, values) -> tuple:
    value = rng.choice(values)

    def tamper(adapter: Path):
        _edit_json(adapter / "adapter_config.json", **{key: value})
    return tamper, "adapter_config.json"


def _adapter_rank(rng):  # anything but the int 8 the weights were trained with
    return _adapter_config(rng, "r", [0, -1, 1e30, "x", None, True, False, 8.0, "8", [8],
                                      MAX_LORA_RANK + 1, 10**9, rng.randint(9, 4096),
                                      rng.randint(1, 7)])


def _adapter_alpha(rng):
    return _adapter_config(rng, "lora_alpha", [1e30, -1, 0, "x", None, True, [16], {"a": 16},
                                               float("nan"), float("inf"), MAX_LORA_ALPHA + 1])


def _adapter_targets(rng):
    style = rng.choice(["empty", "ints", "nonsense", "scalar", "one-missing", "one-extra",
                        "regex-nothing", "bad-regex"])

    def tamper(adapter: Path):
        path = adapter / "adapter_config.json"
        targets = _json_file(path)["target_modules"]
        value = {"empty": [], "ints": [rng.randint(0, 9) for _ in range(3)],
                 "nonsense": [word(rng) for _ in range(rng.randint(1, 4))],
                 "scalar": rng.choice([None, "", 5, {"q_proj": 1}, True]),
                 "one-missing": rng.sample(targets, len(targets) - 1),
                 "one-extra": targets + [f"model.layers.0.{word(rng)}_proj"],
                 "regex-nothing": word(rng), "bad-regex": "model.(layers[" + word(rng),
                 }[style]
        _edit_json(path, target_modules=value)
    return tamper, "could not load adapter"


def _adapter_options(rng):
    chosen = rng.sample(adapters.UNSUPPORTED_OPTIONS, rng.randint(1, 3))
    values = {k: rng.choice([True, 1, "yes", [0], {"x": 4}, ["lm_head"]]) for k in chosen}
    if rng.random() < 0.3:
        values["use_dora"] = True

    def tamper(adapter: Path):
        _edit_json(adapter / "adapter_config.json", **values)
    return tamper, "is a peft option qlora-lab never writes"


def _adapter_peft_type(rng):
    if rng.random() < 0.3:
        return _adapter_config(rng, "bias", ["all", "lora_only", True, 1, word(rng)])
    return _adapter_config(rng, "peft_type", ["IA3", "LOHA", "LOKR", "ADALORA", "lora", None, 5,
                                              word(rng)])


def _adapter_config_garbage(rng):
    style = rng.choice(["truncated", "random", "list", "scalar", "not-utf8", "empty", "deep"])

    def tamper(adapter: Path):
        path = adapter / "adapter_config.json"
        text = path.read_bytes().rstrip()
        path.write_bytes({
            "truncated": text[: rng.randint(0, len(text) - 1)],
            "random": b"\xff" + rng.randbytes(rng.randint(0, 2000)),
            "list": json.dumps([_json_file(path)]).encode(),
            "scalar": rng.choice([b"8", b"null", b'"LORA"', b"true"]),
            "not-utf8": insert_bad_utf8(rng, text),
            "empty": b"",
            "deep": b"[" * rng.randint(10_000, 200_000),
        }[style])
    return tamper, "adapter_config.json is corrupted"


def _weights_bytes(rng):
    style = rng.choice(["truncated", "length-too-big", "length-cut", "header-garbage",
                        "first-byte", "empty"])

    def tamper(adapter: Path):
        path = adapter / "adapter_model.safetensors"
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        if style == "truncated":  # the last tensor ends at the end of the file
            raw = raw[: rng.randint(0, len(raw) - 1)]
        elif style == "length-too-big":
            raw = struct.pack("<Q", rng.choice([len(raw), 2**63, 2**64 - 1,
                                                rng.randint(len(raw), 10**12)])) + raw[8:]
        elif style == "length-cut":  # past the padding: the JSON loses its closing brace
            raw = struct.pack("<Q", rng.randint(0, n - 8)) + raw[8:]
        elif style == "header-garbage":
            raw = raw[:8] + b"\xff" + rng.randbytes(n - 1) + raw[8 + n:]
        elif style == "first-byte":
            raw = raw[:8] + rng.choice([b"x", b"#", b"}", b"\xff", b"\x00"]) + raw[9:]
        else:
            raw = b""
        path.write_bytes(raw)
    return tamper, "adapter_model.safetensors"


def _weights_header(rng):
    style = rng.choice(["offsets-reversed", "offsets-past-end", "offsets-not-int",
                        "offsets-missing", "shape-negative", "shape-not-list", "entry-scalar",
                        "header-list", "rank-changed", "tensor-dropped", "no-tensors"])

    def tamper(adapter: Path):
        path = adapter / "adapter_model.safetensors"
        header, payload = _read_safetensors(path)
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        entry = header[name]
        start, end = entry["data_offsets"]
        if style == "offsets-reversed":
            entry["data_offsets"] = [end, start]
        elif style == "offsets-past-end":
            entry["data_offsets"] = [start, len(payload) + rng.randint(1, 10**6)]
        elif style == "offsets-not-int":
            entry["data_offsets"] = rng.choice([[str(start), end], [start, float(end)], [start],
                                                None, {"start": start}])
        elif style == "offsets-missing":
            del entry["data_offsets"]
        elif style == "shape-negative":
            entry["shape"][rng.randrange(2)] = -rng.randint(1, 100)
        elif style == "shape-not-list":
            entry["shape"] = rng.choice(["8x64", 8, None, [8.0, 64], [True, 64]])
        elif style == "entry-scalar":
            header[name] = rng.choice([1, "x", [1, 2], None])
        elif style == "header-list":
            header = [header]
        elif style == "rank-changed":
            part = 0 if name.endswith("lora_A.weight") else 1
            entry["shape"][part] = rng.choice([r for r in range(1, 65) if r != 8])
        elif style == "tensor-dropped":
            del header[name]
        else:
            header = {k: v for k, v in header.items() if k == "__metadata__"}
        _write_safetensors(path, header, payload)
    return tamper, "adapter_model.safetensors"


def _weights_renamed(rng):
    def tamper(adapter: Path):
        path = adapter / "adapter_model.safetensors"
        header, payload = _read_safetensors(path)
        name = rng.choice(sorted(k for k in header if k != "__metadata__"))
        new = rng.choice([
            word(rng),
            name.replace("lora_A", "lora_C").replace("lora_B", "lora_C"),
            name.replace(".weight", ".bias"),
            f"base_model.model.model.layers.{rng.randint(2, 99)}.mlp.{word(rng)}.lora_A.weight",
            name.replace("base_model.model.", ""),
            name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B",
                                                                                   "lora_A"),
        ])
        header[new] = header.pop(name)  # one of a module's pair loses its partner, at least
        _write_safetensors(path, header, payload)
    return tamper, "adapter_model.safetensors"


def _base_info(rng):
    style = rng.choice(["bits", "quant-type", "double-quant", "model", "garbage", "types",
                        "template", "remote-code", "quant-invalid"])

    def tamper(adapter: Path):
        path = adapter / adapters.BASE_INFO_FILE
        info = _json_file(path)
        if style == "bits":
            info["quant"]["bits"] = 16
        elif style == "quant-type":
            info["quant"]["quant_type"] = "fp4"
        elif style == "double-quant":
            info["quant"]["double_quant"] = False
        elif style == "model":
            info["model"] = rng.choice(["tinyllama", "smollm2-135m", "org/other-model",
                                        word(rng), "/no/such/model"])
        elif style == "types":
            key = rng.choice(["model", "trust_remote_code", "quant", "template", "fingerprint"])
            info[key] = rng.choice([5, [1], "yes"] if key != "model" else [5, [1], None, {}])
            if key == "model" and info[key] is None:
                info[key] = 5.5
        elif style == "template":
            info["template"] = rng.choice(["xml", word(rng), "Plain", ""])
        elif style == "remote-code":
            info["trust_remote_code"] = True
        elif style == "quant-invalid":
            info["quant"] = rng.choice([{"bits": 8}, {"bits": "4"}, {word(rng): 1},
                                        {"quant_type": "int4"}])
        if style == "garbage":
            text = path.read_bytes().rstrip()
            path.write_bytes(rng.choice([text[: rng.randint(0, len(text) - 1)], b"[1]",
                                         b"\xff" + rng.randbytes(64), insert_bad_utf8(rng, text),
                                         b"null"]))
        else:
            path.write_text(json.dumps(info), encoding="utf-8")
    # A recorded trust_remote_code is refused by name: the adapter asks for remote code.
    return tamper, "--trust-remote-code" if style == "remote-code" else adapters.BASE_INFO_FILE


ADAPTER_CASES = generate_family("adapter", {
    "rank": (10, _adapter_rank),
    "alpha": (8, _adapter_alpha),
    "target-modules": (10, _adapter_targets),
    "unsupported-options": (8, _adapter_options),
    "peft-type-or-bias": (6, _adapter_peft_type),
    "config-garbage": (8, _adapter_config_garbage),
    "weights-bytes": (8, _weights_bytes),
    "weights-header": (10, _weights_header),
    "tensor-renamed": (6, _weights_renamed),
    "base-info": (12, _base_info),
}) + [
    param("bug-adapter-name-too-long", None, None,
          bug="adapters.resolve_adapter: Path.is_file raises OSError(ENAMETOOLONG) for a path "
              "component over 255 bytes: traceback"),
]


@pytest.mark.parametrize("tamper, fragment", ADAPTER_CASES)
def test_hostile_adapter(request, tmp_path, trained_run, capsys, tamper, fragment):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", rundir.LOCK))
    target = run / LONG_NAME
    if tamper is not None:
        tamper(run / "adapter")
        # The run folder or its adapter/ folder: generate accepts both.
        target = run if random.Random(request.node.callspec.id).random() < 0.5 else run / "adapter"
    argv = ["-q", "generate", "--adapter", str(target), "--prompt", "hi"]
    expect_refusal(argv, capsys, [tmp_path, trained_run.parent], fragment)


# --- 5. run folders continued with train --resume ------------------------------------------------

OTHER_DATA = "other.jsonl"  # written beside the run: a different but valid data file
# For the keys a resume may not change: values that differ from the trained run's (conftest's
# tiny_config) and are valid on their own, so that only the resume check can refuse them. A key
# missing here gets a value derived from its type (`changed_value`).
RESUME_CHANGES = {
    "model.name": ["tinyllama", "smollm2-135m", "org/some-model"],
    "model.attn_implementation": ["eager", "flash_attention_2"],
    "quant.bits": ["16"],
    "quant.quant_type": ["fp4"],
    "quant.compute_dtype": ["float32", "bfloat16", "float16"],
    "quant.storage": ["uint8", "float32"],
    "lora.r": ["4", "16", "64"],
    "lora.alpha": ["8", "32"],
    "lora.dropout": ["0.05", "0.5"],
    "lora.target_modules": ["q_proj,v_proj", "[q_proj, k_proj]"],
    "data.source": [OTHER_DATA],
    "data.schema": ["dolly", "alpaca", "chat"],
    "data.max_seq_len": ["128", "512"],
    "data.eval_source": [OTHER_DATA],
    "data.eval_fraction": ["0.1", "0.0"],
    "train.max_steps": ["3", "12", "1000"],
    "train.epochs": ["2", "0.5"],
    "train.micro_batch_size": ["1", "4"],
    "train.grad_accum_steps": ["1", "8"],
    "train.learning_rate": ["2e-4", "0.01"],
    "train.warmup_ratio": ["0.1", "0.0"],
    "train.max_grad_norm": ["1.0", "0"],
    "train.optimizer": ["adamw_torch", "paged_adamw_32bit"],
    "train.seed": ["0", "7", "4294967295"],
}
TRAINED = {f"{section}.{key}": value
           for section, values in to_dict(tiny_config("run", "dolly.jsonl")).items()
           for key, value in values.items()}
RESUME_FIXED = sorted(set(SCHEMA) - rundir.RESUME_MAY_CHANGE)


def changed_value(rng: random.Random, key: str) -> str:
    """A valid --set value for `key` that differs from the trained run's."""
    if key in RESUME_CHANGES:
        return rng.choice(RESUME_CHANGES[key])
    hint, trained = SCHEMA[key], TRAINED[key]
    if hint is bool:
        return str(not trained).lower()
    if typing.get_origin(hint) is Literal:
        return str(rng.choice([c for c in typing.get_args(hint) if c != trained]))
    if hint is int:
        return str(trained + 1)
    if hint is float:
        return repr(trained / 2 if trained else 0.5)
    return word(rng)


def copy_run(trained_run: Path, dest: Path) -> Path:
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns(rundir.LOCK))
    return dest


def _resume_set(rng):
    key = rng.choice(RESUME_FIXED)
    return ("set", [f"--set={key}={changed_value(rng, key)}"]), f"--resume: {key} is"


def _resume_flag(rng):
    flag, key, values = rng.choice([("--seed", "train.seed", ["0", "1", "123"]),
                                    ("--max-steps", "train.max_steps", ["1", "7", "50"]),
                                    ("--data", "data.source", [OTHER_DATA]),
                                    ("--model", "model.name", ["tinyllama", "org/other"])])
    return ("set", [flag, rng.choice(values)]), f"--resume: {key} is"


def _resume_config_copy(rng):
    key = rng.choice(RESUME_FIXED)
    return ("config-copy", (key, changed_value(rng, key))), f"--resume: {key} is"


def _resume_damaged_config(rng):
    """The run's own config.yaml, damaged: `train --resume` reads it before anything else."""
    style = rng.choice(["unclosed", "tab", "double-colon", "not-utf8", "alias-bomb", "python-tag",
                        "remote-code", "unknown-key", "wrong-type", "top-list", "two-megabytes",
                        "section-list"])
    key = rng.choice(INT_KEYS + BOOL_KEYS)
    section, name = split_key(key)
    fragment = {"not-utf8": "not UTF-8", "alias-bomb": "through YAML aliases",
                "remote-code": "--trust-remote-code",
                "unknown-key": f"unknown config key {section}.",
                "wrong-type": f"config key {key} = ", "top-list": "config must be a mapping",
                "two-megabytes": "a config is at most",
                "section-list": f"config section {section} must be a mapping",
                }.get(style, "is not valid YAML")  # unclosed, tab, double-colon, python-tag

    def tamper(run: Path):
        path = run / rundir.CONFIG
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        if style == "remote-code":
            values["model"]["trust_remote_code"] = True
        elif style == "unknown-key":
            values[section][word(rng)] = 1
        elif style == "wrong-type":
            values[section][name] = wrong_value(rng, key)
        elif style == "top-list":
            values = list(values.items())
        elif style == "section-list":
            values[section] = rng.choice([[1, 2], list(values[section]), word(rng), 8])
        text = yaml.safe_dump(values, allow_unicode=True, sort_keys=False)
        lines = text.splitlines()
        i = rng.choice([i for i, line in enumerate(lines) if line.startswith("  ")] or [0])
        if style == "unclosed":  # config.yaml holds no ']' that could close it
            lines[i] = lines[i].split(":")[0] + ": [unclosed"
        elif style == "tab":
            lines[i] = "\t" + lines[i].lstrip()
        elif style == "double-colon":
            lines[i] += ": " + word(rng)
        elif style == "python-tag":
            tag = rng.choice(PYTHON_TAGS).format(p=f"pwned-{rng.randrange(10**6)}")
            lines[i] = lines[i].split(":")[0] + ": " + tag
        text = "\n".join(lines) + "\n"
        if style == "alias-bomb":
            text = alias_bomb(rng, True, flow=False)[0] + "\n" + text
        raw = text.encode()
        if style == "not-utf8":
            raw = insert_bad_utf8(rng, raw)
        elif style == "two-megabytes":
            raw += b"# " + b"-" * TWO_MB + b"\n"
        path.write_bytes(raw)
    return ("tamper", tamper), fragment


def _corrupt_state(rng, path: Path) -> None:
    raw = path.read_bytes().rstrip()
    state = json.loads(raw)
    style = rng.choice(["truncated", "garbage", "not-object", "no-step", "step-type", "not-utf8",
                        "empty"])
    if style == "truncated":  # a prefix of a JSON object never parses
        raw = raw[: rng.randint(0, len(raw) - 1)]
    elif style == "garbage":
        raw = b"\xff" + rng.randbytes(rng.randint(0, 512))
    elif style == "not-object":
        raw = rng.choice([b"[6]", b"6", b"null", b'"global_step"', json.dumps([state]).encode()])
    elif style == "no-step":
        del state["global_step"]
        raw = json.dumps(state).encode()
    elif style == "step-type":  # not bool: True is an int to isinstance (see the known bugs)
        state["global_step"] = rng.choice(["6", 6.0, None, [6], {"step": 6}, "six"])
        raw = json.dumps(state).encode()
    elif style == "not-utf8":
        raw = insert_bad_utf8(rng, raw)
    else:
        raw = b""
    path.write_bytes(raw)


def _resume_states(rng):
    named = rng.random() < 0.4

    def tamper(run: Path):
        for checkpoint in sorted((run / "checkpoints").iterdir()):
            _corrupt_state(rng, checkpoint / "trainer_state.json")
    if named:
        return ("tamper", tamper, ["--resume=checkpoint-6"]), "trainer_state.json"
    return ("tamper", tamper), "--resume: no usable checkpoint"


def _resume_foreign_checkpoint(rng):
    style = rng.choice(["absolute", "relative", "symlink", "stash", "session-run"])
    return ("foreign", style, rng.choice([3, 6])), "is not a checkpoint of"


def _resume_unmarked(rng):
    extra = rng.sample(["adapter", "summary.json", "metrics.jsonl", "tokenizer.json"],
                       rng.randint(0, 2))
    foreign = [word(rng, 8) + rng.choice([".txt", ".py", ""]) for _ in range(rng.randint(0, 2))]

    def tamper(run: Path):
        (run / rundir.MARKER).unlink()
        (run / rundir.CONFIG).unlink()
        for name in extra:
            path = run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for name in foreign:
            (run / name).write_text("mine\n", encoding="utf-8")
    return ("tamper", tamper, ["--model", "tiny-random", "--data", OTHER_DATA]), \
        "no qlora-lab run wrote"


def _resume_bad_target(rng):
    style = rng.choice(["missing-name", "a-file", "staging", "no-such-path"])
    if style == "missing-name":
        step = rng.choice([0, 1, 2, 4, 5, 7, 99, 10**6])
        return ("tamper", lambda run: None, [f"--resume=checkpoint-{step}"]), "no such checkpoint"
    if style == "a-file":
        name = rng.choice(["config.yaml", "summary.json", "checkpoints/checkpoint-6/optimizer.pt"])
        return ("target", name), "is not a checkpoint folder"
    if style == "staging":
        return ("staging",), "is an unfinished checkpoint"
    return ("tamper", lambda run: None, [f"--resume={word(rng)}/checkpoint-6"]), \
        "no such checkpoint"


RESUME_CASES = generate_family("resume", {
    "set-changes-key": (26, _resume_set),
    "flag-changes-key": (6, _resume_flag),
    "config-copy-changes-key": (8, _resume_config_copy),
    "run-config-damaged": (14, _resume_damaged_config),
    "trainer-state-corrupted": (12, _resume_states),
    "other-runs-checkpoint": (6, _resume_foreign_checkpoint),
    "no-marker-no-config": (6, _resume_unmarked),
    "bad-resume-target": (6, _resume_bad_target),
}) + [
    param("bug-resume-name-too-long", ("tamper", lambda run: None, [f"--resume={LONG_NAME}"]),
          None, bug="rundir.find_checkpoint: Path.exists raises OSError(ENAMETOOLONG): "
                    "traceback"),
    *[param(f"bug-global-step-{name}", ("global-step", value), None,
            bug=f"trainer_state.json global_step = {value!r} in every checkpoint passes "
                "checkpoints.problem (bool is an int to isinstance; negative steps are "
                "accepted): resume loads the model and trains again, rewriting adapter/ and "
                "summary.json, instead of refusing")
      for name, value in (("true", True), ("negative", -1))],
    param("bug-edited-rank-unfinished-run", ("edited-rank",), None,
          bug="config.yaml edited by hand (lora.r 8 -> 16) in a run whose newest checkpoint is "
              "not its last: nothing compares config.yaml with the checkpoint, so resume "
              "rewrites the run's files, loads the model, and Trainer raises RuntimeError "
              "(size mismatch for lora_A) with a traceback"),
]


def _setup_resume(tmp_path: Path, trained_run: Path, how) -> tuple[Path, list[str]]:
    """Copy the trained run, tamper with it as `how` says; return it and the extra argv."""
    write_jsonl(tmp_path / OTHER_DATA, DOLLY_ROWS[:6])
    run = copy_run(trained_run, tmp_path / "run")
    kind, extra = how[0], []
    if kind == "set":
        extra = list(how[1])
    elif kind == "config-copy":
        key, text = how[1]
        values = yaml.safe_load((run / rundir.CONFIG).read_text(encoding="utf-8"))
        section, name = split_key(key)
        values[section][name] = yaml.safe_load(text)
        edited = tmp_path / "edited.yaml"
        edited.write_text(yaml.safe_dump(values), encoding="utf-8")
        extra = ["--config", str(edited)]
    elif kind == "tamper":
        how[1](run)
        extra = list(how[2]) if len(how) > 2 else []
    elif kind == "foreign":
        style, step = how[1], how[2]
        other = copy_run(trained_run, tmp_path / "other")
        checkpoint = other / "checkpoints" / f"checkpoint-{step}"
        if style == "absolute":
            extra = [f"--resume={checkpoint}"]
        elif style == "relative":
            extra = [f"--resume={checkpoint.relative_to(tmp_path)}"]
        elif style == "symlink":
            (run / "checkpoints" / "checkpoint-9").symlink_to(checkpoint)
            extra = ["--resume=checkpoint-9"]
        elif style == "stash":
            shutil.copytree(checkpoint, run / "stash" / checkpoint.name)
            extra = [f"--resume={run / 'stash' / checkpoint.name}"]
        else:  # the shared session run itself, which the snapshot also watches
            extra = [f"--resume={trained_run / 'checkpoints' / checkpoint.name}"]
    elif kind == "target":
        extra = [f"--resume={run / how[1]}"]
    elif kind == "staging":
        staging = run / "checkpoints" / ".tmp-checkpoint-9" / "checkpoint-9"
        shutil.copytree(run / "checkpoints" / "checkpoint-6", staging)
        extra = [f"--resume={staging}"]
    elif kind == "edited-rank":
        shutil.rmtree(run / "checkpoints" / "checkpoint-6")
        config = run / rundir.CONFIG
        config.write_text(config.read_text(encoding="utf-8").replace("  r: 8\n", "  r: 16\n"),
                          encoding="utf-8")
    elif kind == "global-step":
        for checkpoint in (run / "checkpoints").iterdir():
            _edit_json(checkpoint / "trainer_state.json", global_step=how[1])
    return run, extra


@pytest.mark.parametrize("how, fragment", RESUME_CASES)
def test_hostile_resume(tmp_path, trained_run, capsys, tripwire, how, fragment):
    run, extra = _setup_resume(tmp_path, trained_run, how)
    tripwire.armed = how[0] != "edited-rank"  # its bug shows only once the model is loaded
    # `--resume` alone first: a later `--resume=NAME` in `extra` replaces it.
    argv = ["-q", "train", "--output-dir", str(run), "--resume", *extra]
    expect_refusal(argv, capsys, [tmp_path, trained_run.parent], fragment)


# --- the size of the suite -----------------------------------------------------------------------


def test_at_least_320_generated_cases():
    assert GENERATED.keys() == {"config", "set", "data", "adapter", "resume"}
    assert all(count >= 64 for count in GENERATED.values()), GENERATED
    assert sum(GENERATED.values()) >= 320, GENERATED
