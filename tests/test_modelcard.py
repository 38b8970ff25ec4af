"""The adapter's model card names what the run really trained on: a mix's sources with their
weights and the rows drawn from each, and a dataset's config and splits. (Cards of real trained
adapters, loaded by peft and huggingface_hub, are tested in test_generate_merge.py.)"""

from __future__ import annotations

import pytest
from conftest import DOLLY_ROWS, write_jsonl
from huggingface_hub import ModelCard

from qlora_lab.config import DEFAULT_DATA, config_from_dict, parse_overrides
from qlora_lab.data import prepare_data
from qlora_lab.modelcard import render_model_card
from qlora_lab.models import build_byte_tokenizer

MIX = [{"source": "org/dolly-like", "weight": 0.7, "hub_config": "en", "split": "train_sft"},
       {"source": "chat.jsonl", "weight": 0.3, "columns": {"conversations": "talk"}}]


def _card(data: dict, summary: dict | None = None) -> str:
    return render_model_card("tiny-random", config_from_dict({"data": data}), "plain", summary)


def test_a_mixed_runs_card_lists_each_source_with_its_weight_and_rows():
    summary = {"data": {"schema": "dolly+sharegpt", "train_rows": 95, "eval_rows": 5,
                        "train_tokens": 9000,
                        "mix": [{"source": "org/dolly-like", "weight": 0.7, "schema": "dolly",
                                 "rows_drawn": 70},
                                {"source": "chat.jsonl", "weight": 0.3, "schema": "sharegpt",
                                 "rows_drawn": 30}]}}
    text = _card({"mix": MIX}, summary)
    assert DEFAULT_DATA not in text  # the default `data.source` was not trained on
    assert "- Mix of 2 sources, drawn by weight (no row twice):" in text
    assert ("  - `org/dolly-like` (config `en`, split `train_sft`): weight 0.7, schema dolly, "
            "70 rows drawn") in text
    assert ("  - `chat.jsonl`: weight 0.3, schema sharegpt, columns conversations=talk, "
            "30 rows drawn") in text
    assert "- Schema: dolly+sharegpt; prompt template: plain" in text
    assert ModelCard(text).data.datasets == ["org/dolly-like"]  # local files are no hub datasets


def test_a_mix_card_without_a_summary_comes_from_the_config():
    text = _card({"mix": "a.jsonl=3,b.jsonl=1"})
    assert "  - `a.jsonl`: weight 3, schema auto\n  - `b.jsonl`: weight 1, schema auto\n" in text
    assert "rows drawn" not in text and ModelCard(text).data.datasets is None


@pytest.mark.parametrize("data, line", [
    ({"source": "org/ds", "hub_config": "en", "split": "train_sft", "eval_split": "test_sft"},
     "- Source: `org/ds` (config `en`, split `train_sft`), held out: split `test_sft`"),
    ({"source": "org/ds", "eval_source": "held.jsonl"},
     "- Source: `org/ds`, held out: `held.jsonl`"),
    ({"source": "org/ds", "eval_source": "org/other", "eval_split": "validation"},
     "- Source: `org/ds`, held out: `org/other` split `validation`"),
])
def test_a_single_sources_card_names_its_config_and_splits(data, line):
    text = _card(data)
    assert line + "\n" in text
    assert ModelCard(text).data.datasets == ["org/ds"]


def test_the_card_records_the_rows_a_real_mix_drew(tmp_path):
    """From config to card through prepare_data's own stats (summary.json's `data`)."""
    a = write_jsonl(tmp_path / "a.jsonl", DOLLY_ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", DOLLY_ROWS[:4])
    run = config_from_dict(parse_overrides([f"data.mix={a}=1,{b}=1", "data.eval_fraction=0"]))
    stats = prepare_data(run.data, build_byte_tokenizer(), seed=0).stats
    text = render_model_card("tiny-random", run, "plain", {"data": stats})
    assert f"  - `{a}`: weight 1, schema dolly, 4 rows drawn\n" in text
    assert f"  - `{b}`: weight 1, schema dolly, 4 rows drawn\n" in text
    assert "- Rows: 8 trained, 0 held out" in text
