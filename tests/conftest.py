"""Shared fixtures: a tiny random Llama, tiny datasets, one short trained run, and the hostile-input
invariant (`check_outcome`).

Everything is local: HF_HUB_OFFLINE=1 makes any accidental hub access fail loudly.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from qlora_lab.errors import UserError

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DOLLY = REPO.parent / "shared" / "data" / "dolly_dev.jsonl"

DOLLY_ROWS = [
    {"instruction": f"What is {a} plus {b}?", "context": "" if a % 2 else f"Numbers: {a}, {b}.",
     "response": f"{a} plus {b} is {a + b}.", "category": "open_qa"}
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3),
                 (9, 9), (1, 7), (3, 3), (5, 2)]
]


def committed_result(name: str) -> dict:
    """A result file committed under benchmarks/results/: tests read results, never run the
    scripts that wrote them."""
    return json.loads((REPO / "benchmarks" / "results" / name).read_text())


def benchmark_module(name: str):
    """A benchmarks/ script imported as a module, for its constants and pure functions (the
    result schema it wrote), never to run it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One model cache per test session, so nothing touches ~/.cache."""
    os.environ["QLORA_LAB_CACHE"] = str(tmp_path_factory.mktemp("qlora-cache"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# A ChatML-like template for the byte tokenizer (the data tests' chat rows).
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """The byte tokenizer: one token per byte, no chat template."""
    from qlora_lab.models import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    """The byte tokenizer with CHATML as its chat template."""
    from qlora_lab.models import build_byte_tokenizer

    t = build_byte_tokenizer()
    t.chat_template = CHATML
    return t


@pytest.fixture
def dolly_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)


def tiny_config(output_dir, data, **train):
    """A RunConfig for the tiny random model that trains in about a second on CPU."""
    from qlora_lab.config import config_from_dict

    values = {
        "model": {"name": "tiny-random"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"source": str(data), "max_seq_len": 256, "eval_fraction": 0.2},
        "train": {"output_dir": str(output_dir), "max_steps": 6, "save_steps": 3,
                  "eval_steps": 3, "logging_steps": 1, "micro_batch_size": 2,
                  "grad_accum_steps": 2, "learning_rate": 1e-3, "tensorboard": False,
                  **train},
    }
    return config_from_dict(values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 6-step run on the tiny model (checkpoints at steps 3 and 6)."""
    from qlora_lab.train import run_train

    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "dolly.jsonl", DOLLY_ROWS)
    run_train(tiny_config(root / "run", data))
    return root / "run"


# --- the invariant for hostile input --------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def check_outcome(action, root: Path, fragments=(), may_succeed=False) -> None:
    """Run `action`: a UserError (one line, holding every fragment) or, if allowed, success.

    Any other exception propagates and fails the test with its traceback. Files that existed
    under `root` before must be unchanged afterwards (new files are allowed).
    """
    before = snapshot(root)
    try:
        action()
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    else:
        assert may_succeed, f"expected a UserError containing {fragments}"
    after = snapshot(root)
    changed = {name for name, digest in before.items() if after.get(name) != digest}
    assert not changed, f"pre-existing files changed or deleted: {sorted(changed)}"
