"""`qlora-lab eval`: metric invariants, loss equal to an independent recomputation, the report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DOLLY_ROWS, SHARED_DOLLY, write_jsonl
from rouge_score import rouge_scorer

from qlora_lab.cli import main
from qlora_lab.evaluate import (
    ANSWER_END_TOKENS,
    EvalConfig,
    answer_token_cap,
    exact_match,
    load_eval_rows,
    normalize_answer,
    rouge_l,
    run_eval,
)

MAX_NEW_TOKENS = 4  # the tiny model's answers are noise; only the bookkeeping is under test


def _mixed_rows() -> list[dict]:
    """DOLLY_ROWS with a mix of categories, some missing, as real Dolly files have."""
    cats = ["classification"] * 3 + ["closed_qa"] * 3 + [None] * 2 + ["open_qa"] * 4
    rows = []
    for row, cat in zip(DOLLY_ROWS, cats):
        row = {k: v for k, v in row.items() if k != "category"}
        if cat:
            row["category"] = cat
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("evaldata") / "heldout.jsonl", _mixed_rows())


@pytest.fixture(scope="module")
def compare_report(trained_run, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    return run_eval(EvalConfig(adapter=str(trained_run), data=str(eval_data), compare_base=True,
                               max_new_tokens=MAX_NEW_TOKENS, loss_batch_size=5,
                               output_dir=str(out)))


# --- metrics -------------------------------------------------------------------------------------


def test_rouge_l_identical_disjoint_and_symmetric():
    text = "The cat sat on the mat."
    assert rouge_l(text, text) == 1.0
    assert rouge_l("the cat", "a dog barked") == 0.0
    a, b = "the cat sat on the mat", "the cat ran away from the mat"
    assert rouge_l(a, b) == rouge_l(b, a)  # F1 is symmetric, P and R swap
    assert 0.0 < rouge_l(a, b) < 1.0


def test_rouge_l_value_follows_the_lcs_definition():
    # LCS("the cat ran away", "the cat sat") = "the cat" = 2 words; R = 2/4, P = 2/3.
    r, p = 2 / 4, 2 / 3
    assert rouge_l("the cat sat", "the cat ran away") == pytest.approx(2 * r * p / (r + p))
    assert rouge_l("a x c y e", "a b c d e") == pytest.approx(3 / 5)  # LCS a c e
    assert rouge_l("THE, Cat!", "the cat") == 1.0  # lowercase words, punctuation ignored
    assert rouge_l("café", "caf") == 1.0  # only [a-z0-9] make words, as in rouge-score
    assert rouge_l("", "") == 0.0 and rouge_l("", "x") == 0.0  # rouge-score: no words, no score


def _package_rouge_l(prediction: str, reference: str) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


TRICKY_PAIRS = [  # (prediction, reference)
    ("an answer", ""), ("", "a reference"), ("", ""), ("   \n\t", "x"),
    ("...!?", "?!..."), ("-- : ;", "the end."),
    ("Crème brûlée à Paris", "creme brulee a paris"), ("東京は日本の首都", "東京"),
    ("Привет, мир", "привет мир"), ("naïve café résumé", "naive cafe resume"),
    ("3.14159 is pi", "pi is 3.14159"), ("1,000,000 $5 50%", "1000000 5 50"),
    ("2023-05-01", "May 1, 2023"), ("the the the the", "the"), ("a b a b a b", "b a b a"),
    ("line one\nline two\r\nline three", "line one line two line three"),
    ("Don't stop-believing", "dont stop believing"), ("e-mail me@x.com", "email me at x com"),
    ("running runs ran", "run runs running"),  # no stemming
    ("UPPER lower MiXeD", "upper LOWER mixed"), ("emoji 🙂 ok", "emoji ok 🙂"),
]


@pytest.mark.parametrize("prediction, reference", TRICKY_PAIRS)
def test_rouge_l_equals_the_rouge_score_package(prediction, reference):
    assert rouge_l(prediction, reference) == _package_rouge_l(prediction, reference)


@pytest.mark.skipif(not SHARED_DOLLY.is_file(), reason=f"{SHARED_DOLLY} not present")
def test_rouge_l_equals_the_package_on_dolly_responses():
    responses = [json.loads(line)["response"] for line in
                 SHARED_DOLLY.read_text(encoding="utf-8").splitlines()[:201]]
    pairs = list(zip(responses[1:], responses[:-1]))  # each response against the previous one
    assert len(pairs) == 200
    assert [rouge_l(p, r) for p, r in pairs] == [_package_rouge_l(p, r) for p, r in pairs]


def test_exact_match_normalisation():
    assert normalize_answer("  Yes.\n") == "yes"
    assert exact_match("The Eiffel  Tower!", "the eiffel tower")
    assert exact_match("positive", "Positive.")
    assert not exact_match("yes", "no")
    assert not exact_match("tower eiffel", "eiffel tower")


# --- the report ----------------------------------------------------------------------------------


def test_category_counts_add_up_and_both_columns_exist(compare_report):
    models = compare_report["models"]
    assert set(models) == {"base", "fine-tuned"}
    n_rows = len(DOLLY_ROWS)
    assert compare_report["rows"] == n_rows
    for result in models.values():
        cats, overall = result["categories"], result["overall"]
        assert overall["n"] == n_rows
        assert sum(s["n"] for s in cats.values()) == n_rows
        assert set(cats) == {"classification", "closed_qa", "open_qa", "uncategorized"}
        # exact match only where answers are labels or short facts, and overall over those rows
        assert cats["open_qa"]["exact_match"] is None
        assert cats["uncategorized"]["exact_match"] is None
        assert cats["classification"]["exact_match"] is not None
        assert overall["exact_match_n"] == 6
        assert all(0.0 <= s["rouge_l"] <= 1.0 for s in [overall, *cats.values()])
        assert math.isclose(result["perplexity"], math.exp(result["loss"]))
    # the adapter changed something: base and fine-tuned are different models
    assert models["base"]["loss"] != models["fine-tuned"]["loss"]
    table = compare_report["table"]
    assert "| metric | n | base | fine-tuned | delta |" in table
    assert "exact match: closed_qa" in table


def test_files_written(compare_report):
    from pathlib import Path

    out = Path(compare_report["output_dir"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["models"]["fine-tuned"]["loss"] == compare_report["models"]["fine-tuned"]["loss"]
    assert saved["command"].startswith("qlora-lab eval --adapter ")
    assert "--compare-base" in saved["command"]
    assert "| held-out loss" in (out / "eval.md").read_text()
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(DOLLY_ROWS)
    assert set(json.loads(predictions[0])) >= {"reference", "base", "fine-tuned", "category"}


def _independent_loss(loaded, rows) -> float:
    """Token-weighted mean of transformers' own causal-LM loss, one row at a time."""
    from qlora_lab.data import render_segments, row_to_messages, tokenize_segments
    from qlora_lab.sources import Row

    total, count = 0.0, 0
    for i, values in enumerate(rows):
        messages = row_to_messages(Row(f"row {i}", values), "dolly")
        ids, labels = tokenize_segments(render_segments(messages, loaded.tokenizer,
                                                        loaded.template),
                                        loaded.tokenizer, train_on_prompt=False)
        labels_t = torch.tensor([labels])
        n = int((labels_t[:, 1:] != -100).sum())  # the model shifts labels by one internally
        with torch.inference_mode():
            loss = loaded.model(input_ids=torch.tensor([ids]), labels=labels_t).loss
        total += loss.item() * n
        count += n
    return total / count


@pytest.fixture(scope="module")
def tuned(trained_run):
    from qlora_lab.generate import GenerateConfig, load_for_inference

    return load_for_inference(GenerateConfig(adapter=str(trained_run)))


def test_loss_equals_independent_recomputation(tuned, compare_report):
    from qlora_lab.generate import GenerateConfig, load_for_inference

    rows = _mixed_rows()
    expected = _independent_loss(tuned, rows)
    assert compare_report["models"]["fine-tuned"]["loss"] == pytest.approx(expected, rel=1e-4)
    # the base column is the plain base model, loaded on its own, not just "the adapter off"
    base = load_for_inference(GenerateConfig(model="tiny-random"))
    assert base.template == tuned.template
    assert compare_report["models"]["base"]["loss"] == pytest.approx(
        _independent_loss(base, rows), rel=1e-4)


def test_batched_generation_equals_one_at_a_time(trained_run, tuned):
    from qlora_lab.evaluate import generate_batch
    from qlora_lab.generate import GenerateConfig, generate_reply

    # prompts of different lengths, so the batch is left-padded
    prompts = [[{"role": "user", "content": text}]
               for text in ("Hi", "What is 3 plus 4?", "Name a colour, please, in one word.")]
    cfg = GenerateConfig(adapter=str(trained_run), max_new_tokens=6)
    assert generate_batch(tuned, prompts, 6) == [generate_reply(tuned, p, cfg) for p in prompts]


def test_default_answer_cap_covers_every_reference(tuned, eval_data):
    from types import SimpleNamespace

    rows, _ = load_eval_rows(EvalConfig(model="tiny-random", data=str(eval_data)))
    longest = max(len(tuned.tokenizer(r.reference, add_special_tokens=False)["input_ids"])
                  for r in rows)
    assert answer_token_cap(tuned, rows, None) == longest + ANSWER_END_TOKENS
    assert answer_token_cap(tuned, rows, 3) == 3  # --max-new-tokens wins
    config = SimpleNamespace(max_position_embeddings=5)
    small = SimpleNamespace(tokenizer=tuned.tokenizer, model=SimpleNamespace(config=config))
    assert answer_token_cap(small, rows, None) == 5  # never past the model's context


def test_max_rows_and_default_output_dir(trained_run, eval_data, tmp_path):
    from qlora_lab.evaluate import _default_output_dir

    assert _default_output_dir(EvalConfig(adapter=str(trained_run), data="x.jsonl")) == \
        trained_run / "eval"
    report = run_eval(EvalConfig(model="tiny-random", data=str(eval_data), max_rows=5,
                                 max_new_tokens=2, output_dir=str(tmp_path)))
    assert list(report["models"]) == ["model"]
    assert report["models"]["model"]["overall"]["n"] == 5
    assert report["max_new_tokens"] == 2


def test_default_cap_is_recorded_and_the_command_stays_as_given(tuned, eval_data, tmp_path):
    cfg = EvalConfig(model="tiny-random", data=str(eval_data), max_rows=2,
                     output_dir=str(tmp_path))
    report = run_eval(cfg)
    assert report["max_new_tokens"] == answer_token_cap(tuned, load_eval_rows(cfg)[0], None)
    assert "--max-new-tokens" not in report["command"]


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_writes_report_and_exits_0(trained_run, eval_data, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["-q", "eval", "--adapter", str(trained_run), "--data", str(eval_data),
                 "--max-rows", "4", "--max-new-tokens", str(MAX_NEW_TOKENS),
                 "--output-dir", str(out)])
    assert code == 0
    assert (out / "eval.json").is_file() and (out / "eval.md").is_file()
    assert "| ROUGE-L F1 (overall) | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize("make_data, fragment", [
    (lambda d: d / "missing.jsonl", "does not exist"),
    (lambda d: write_jsonl(d / "empty.jsonl", []), "has no rows"),
    (lambda d: write_jsonl(d / "wrong.jsonl", [{"question": "q", "answer": "a"}]),
     "cannot detect the schema"),
])
def test_bad_data_exits_2_with_one_line_and_keeps_old_reports(trained_run, tmp_path, capsys,
                                                              make_data, fragment):
    out = tmp_path / "report"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    code = main(["eval", "--adapter", str(trained_run), "--data", str(make_data(tmp_path)),
                 "--output-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and fragment in err and err.startswith("qlora-lab eval:")
    assert (out / "eval.json").read_text() == "{}"  # nothing written before deleted


def test_compare_base_needs_an_adapter(eval_data, capsys):
    assert main(["eval", "--model", "tiny-random", "--data", str(eval_data),
                 "--compare-base"]) == 2
    assert "--compare-base needs --adapter" in capsys.readouterr().err


# --- the overall row, rows against the model's context, flags, failures that write nothing -----


def test_overall_scores_never_collide_with_a_category_named_all():
    from qlora_lab.evaluate import EvalRow, markdown_table, score_answers

    cats = ["all", "all", "closed_qa", "x|y\nz"]
    rows = [EvalRow(f"d.jsonl:{i}", cat, [], [], "yes") for i, cat in enumerate(cats, 1)]
    result = {"loss": 1.0, "perplexity": math.e, "answer_tokens": 4,
              **score_answers(rows, ["yes", "no", "yes", "no"])}
    assert result["overall"]["n"] == 4 and result["categories"]["all"]["n"] == 2
    assert sum(s["n"] for s in result["categories"].values()) == 4
    assert result["overall"]["rouge_l"] == 0.5 and result["categories"]["all"]["rouge_l"] == 0.5
    assert result["overall"]["exact_match_n"] == 1  # closed_qa alone has exact match
    table = markdown_table({"model": result})
    assert "| ROUGE-L F1 (overall) | 4 |" in table and "| ROUGE-L F1: all | 2 |" in table
    lines = table.splitlines()
    assert len({line.split(" | ")[0] for line in lines}) == len(lines)  # no metric twice
    assert len(lines) == 2 + 2 + 1 + 3 + 2  # header, loss, ppl, overall + 3 categories, 2 EM
    assert {line.replace("\\|", "").count("|") for line in lines} == {4}  # one cell per column


def test_answer_batches_keep_every_answer_within_the_context():
    from qlora_lab.evaluate import answer_batches

    lengths = [10, 95, 10, 60, 10, 99, 10]
    batches = answer_batches(lengths, 100, 20, 2)
    assert sorted(i for _, idx in batches for i in idx) == list(range(len(lengths)))
    for cap, idx in batches:
        assert 1 <= len(idx) <= 2
        # each row gets what `generate` would give it alone: a long prompt beside it in the
        # batch never shortens its answer, and no answer runs past the context
        assert all(cap == min(20, 100 - lengths[i]) for i in idx)
    assert answer_batches(lengths, None, 20, 8) == [(20, list(range(len(lengths))))]


def test_a_prompt_longer_than_the_context_is_refused_before_any_work(tmp_path, capsys,
                                                                     monkeypatch):
    from qlora_lab import evaluate

    def never(*args, **kwargs):
        raise AssertionError("a row was evaluated before every row was checked")

    monkeypatch.setattr(evaluate, "heldout_loss", never)
    monkeypatch.setattr(evaluate, "generate_batch", never)
    # tiny-random reads 4,096 tokens, one per byte
    data = write_jsonl(tmp_path / "long.jsonl",
                       [DOLLY_ROWS[0], {**DOLLY_ROWS[1], "instruction": "x " * 3000}])
    out = tmp_path / "report"
    argv = ["-q", "eval", "--model", "tiny-random", "--data", str(data), "--max-new-tokens", "1",
            "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"qlora-lab eval: error: {data}:2: the prompt is 6,")
    assert "at most 4,096 (max_position_embeddings)" in err and "--skip-long-rows" in err
    assert not out.exists()  # nothing written, not even the folder

    monkeypatch.undo()
    assert main([*argv, "--skip-long-rows"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert (report["rows"], report["long_rows_skipped"]) == (1, 1)
    assert "--skip-long-rows" in report["command"]


def test_rows_are_cut_to_a_short_context_and_long_prompts_skipped(tuned, tmp_path):
    from types import SimpleNamespace

    from qlora_lab.errors import UserError
    from qlora_lab.evaluate import encode_rows

    context = 200
    data = write_jsonl(tmp_path / "d.jsonl", [
        DOLLY_ROWS[0], {**DOLLY_ROWS[1], "instruction": "x" * 500},
        {**DOLLY_ROWS[2], "response": "y " * 300}])  # its prompt fits, its answer does not
    config = SimpleNamespace(max_position_embeddings=context)
    small = SimpleNamespace(tokenizer=tuned.tokenizer, template=tuned.template,
                            model=SimpleNamespace(config=config))
    cfg = EvalConfig(model="tiny-random", data=str(data), skip_long_rows=True)
    rows = load_eval_rows(cfg)[0]
    encoded = encode_rows(small, rows, cfg)
    assert encoded.long_rows_skipped == 1 and encoded.bad_rows_skipped == 0
    assert [r.where for r in encoded.rows] == [f"{data}:1", f"{data}:3"]
    assert all(n < context for n in encoded.prompt_tokens)
    assert encoded.max_seq_len == context
    assert all(len(e["input_ids"]) <= context for e in encoded.examples)
    assert any(label != -100 for label in encoded.examples[1]["labels"])  # the answer kept some
    with pytest.raises(UserError, match=f"{data}:2: the prompt is .* at most 200"):
        encode_rows(small, rows, EvalConfig(model="tiny-random", data=str(data)))


def test_eval_accepts_the_flags_its_errors_recommend(trained_run, eval_data, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    adapter = tmp_path / "adapter"  # pickle weights only, a base recorded with remote code
    shutil.copytree(trained_run / "adapter", adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    info = json.loads((adapter / "qlora_lab_base.json").read_text())
    (adapter / "qlora_lab_base.json").write_text(json.dumps({**info, "trust_remote_code": True}))
    out = tmp_path / "report"
    argv = ["-q", "eval", "--adapter", str(adapter), "--data", str(eval_data), "--max-rows", "1",
            "--max-new-tokens", "1", "--output-dir", str(out)]
    for flag in ("--allow-pickle", "--trust-remote-code"):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pass {flag}" in err, err
        assert not out.exists()
        argv.append(flag)  # follow the advice
    assert main(argv) == 0
    saved = json.loads((out / "eval.json").read_text())
    assert saved["config"]["allow_pickle"] and saved["config"]["trust_remote_code"]


def test_model_dir_with_model_is_refused_in_one_line(eval_data, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", "--model-dir", str(tmp_path), "--model", "tiny-random", "--data",
                 str(eval_data), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model-dir is a whole model" in err
    assert not out.exists()


def test_a_chat_template_that_does_not_parse_is_named_not_the_data(trained_run, eval_data,
                                                                   tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    info_path = run / "adapter" / "qlora_lab_base.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "template": "chat"}))
    (run / "chat_template.jinja").write_text("{% if %}broken")
    assert main(["-q", "eval", "--adapter", str(run), "--data", str(eval_data),
                 "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"qlora-lab eval: error: the chat template in {run}/chat_template.jinja "
                          "does not parse")
    assert str(eval_data) not in err
    assert not (run / "eval").exists()
