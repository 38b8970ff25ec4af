"""Where rows come from: splits and configs of datasets (`data.hub_config`, `data.split`,
`data.eval_split`), weighted mixes of sources (`data.mix`), and `eval --columns`.

The hub cannot be reached here, so datasets are local folders that `datasets.load_dataset`
reads exactly as it reads a hub repository: data files, with a README declaring configs.
"""

import json

import pytest
from conftest import DOLLY_ROWS, write_jsonl

from qlora_lab.config import config_from_dict, parse_overrides
from qlora_lab.data import prepare_data
from qlora_lab.errors import UserError
from qlora_lab.sources import mix_counts, read_rows

# A dataset folder with two configs, as a hub repository declares them in its README card.
CARD = """---
configs:
- config_name: arithmetic
  data_files:
  - split: train
    path: arithmetic/train.jsonl
  - split: test
    path: arithmetic/test.jsonl
- config_name: chat
  data_files:
  - split: train
    path: chat/train.jsonl
---
"""
CHAT_ROWS = [{"conversations": [{"from": "human", "value": f"Say {w}."},
                                {"from": "gpt", "value": f"{w}!"}]}
             for w in ("hello", "goodbye", "yes", "no", "maybe", "never", "always", "soon")]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it reads from a folder: here, never under ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def dataset_dir(tmp_path):
    root = tmp_path / "dataset"
    (root / "arithmetic").mkdir(parents=True)
    (root / "chat").mkdir()
    (root / "README.md").write_text(CARD)
    write_jsonl(root / "arithmetic/train.jsonl", DOLLY_ROWS[:8])
    write_jsonl(root / "arithmetic/test.jsonl", DOLLY_ROWS[8:])
    write_jsonl(root / "chat/train.jsonl", CHAT_ROWS)
    return root


def _prepare(tok, seed=0, **values):
    return prepare_data(config_from_dict({"data": values}).data, tok, seed=seed)


def _decoded(tok, examples) -> list[str]:
    return sorted(tok.decode(e["input_ids"]) for e in examples)


# --- datasets: configs and splits ----------------------------------------------------------------


def test_config_and_split_pick_the_rows(tmp_path, tok, dataset_dir):
    test_rows = _prepare(tok, source=str(dataset_dir), hub_config="arithmetic", split="test",
                         eval_fraction=0.0)
    same_file = _prepare(tok, source=str(write_jsonl(tmp_path / "t.jsonl", DOLLY_ROWS[8:])),
                         eval_fraction=0.0)
    assert _decoded(tok, test_rows.train) == _decoded(tok, same_file.train)
    chat = _prepare(tok, source=str(dataset_dir), hub_config="chat", eval_fraction=0.0)
    assert chat.schema == "sharegpt" and len(chat.train) == len(CHAT_ROWS)


def test_eval_split_is_held_out_whole(tok, dataset_dir):
    data = _prepare(tok, source=str(dataset_dir), hub_config="arithmetic", eval_split="test")
    assert (len(data.train), len(data.eval)) == (8, 4)  # no eval_fraction taken from train
    assert not set(_decoded(tok, data.train)) & set(_decoded(tok, data.eval))


def test_a_folder_written_by_save_to_disk(tmp_path, tok):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(DOLLY_ROWS[:6]),
                          "validation": datasets.Dataset.from_list(DOLLY_ROWS[6:])}
                         ).save_to_disk(str(tmp_path / "saved"))
    data = _prepare(tok, source=str(tmp_path / "saved"), eval_split="validation")
    assert (len(data.train), len(data.eval)) == (6, 6)
    with pytest.raises(UserError, match=r"data.split = 'test' is not a split of .*saved \(its "
                       r"splits: train, validation\) — set data.split to one of them"):
        read_rows(str(tmp_path / "saved"), split="test")


@pytest.mark.parametrize("values, fragment", [
    ({"hub_config": "arithmetic", "split": "dev"},
     "data.split = 'dev' is not a split of {d} (its splits: train, test) — set data.split"),
    ({"hub_config": "arithmetic", "eval_split": "dev"},
     ("data.eval_split = 'dev' is not a split of {d} (its splits: train, test) — set "
      "data.eval_split")),
    ({"hub_config": "poetry"},
     "data.hub_config = 'poetry' is not a config of {d} (its configs: arithmetic, chat)"),
    ({}, "{d} has several configs (arithmetic, chat) — pick one with data.hub_config"),
])
def test_unknown_configs_and_splits_are_one_line(tok, dataset_dir, values, fragment):
    with pytest.raises(UserError) as err:
        _prepare(tok, source=str(dataset_dir), **values)
    message = str(err.value)
    assert fragment.format(d=dataset_dir) in message and "\n" not in message, message


@pytest.mark.parametrize("values, fragment", [
    ({"split": "test"}, "data.split = 'test' applies to hub datasets and dataset folders"),
    ({"hub_config": "x"}, "data.hub_config = 'x' applies to hub datasets and dataset folders"),
    ({"eval_split": "test"}, "data.eval_split = 'test' applies to hub datasets"),
])
def test_files_have_no_splits_or_configs(tok, dolly_file, values, fragment):
    with pytest.raises(UserError, match=fragment):
        _prepare(tok, source=str(dolly_file), **values)


# --- mixes ---------------------------------------------------------------------------------------


def _sources(tmp_path):
    """12 Dolly rows and 8 ShareGPT rows whose fields go by other names (per-source columns)."""
    a = write_jsonl(tmp_path / "a.jsonl", DOLLY_ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [{"talk": r["conversations"]} for r in CHAT_ROWS])
    return a, b


def _mix(a, b, wa, wb):
    return [{"source": str(a), "weight": wa},
            {"source": str(b), "weight": wb, "columns": {"conversations": "talk"}}]


def _origin(example, tok) -> str:
    return "b" if "Say " in tok.decode(example["input_ids"]) else "a"


@pytest.mark.parametrize("wa, wb, drawn", [
    (0.7, 0.3, (12, 5)),   # a runs out first: 12 / 0.7 = 17 rows in all
    (0.25, 0.75, (3, 7)),  # b runs out first: 8 / 0.75 -> 10 rows, 2.5 : 7.5 (ties go first)
    (1, 1, (8, 8)),
])
def test_mix_draws_the_weights_deterministically(tmp_path, tok, wa, wb, drawn):
    a, b = _sources(tmp_path)
    data = _prepare(tok, mix=_mix(a, b, wa, wb), eval_fraction=0.0)
    counts = [sum(_origin(e, tok) == s for e in data.train) for s in "ab"]
    assert tuple(counts) == drawn
    assert [m["rows_drawn"] for m in data.stats["mix"]] == list(drawn)
    assert data.stats["schema"] == "dolly+sharegpt"
    again = _prepare(tok, mix=_mix(a, b, wa, wb), eval_fraction=0.0)
    assert again.train == data.train and again.stats == data.stats
    other_seed = _prepare(tok, seed=1, mix=_mix(a, b, wa, wb), eval_fraction=0.0)
    assert [m["rows_drawn"] for m in other_seed.stats["mix"]] == list(drawn)


def test_mix_counts_match_the_weights():
    assert mix_counts([12, 8], [0.7, 0.3]) == [12, 5]
    assert mix_counts([1000, 1000], [0.7, 0.3]) == [1000, 428]
    assert mix_counts([1000, 1000], [0.7, 0.3], cap=100) == [70, 30]
    assert mix_counts([10, 10, 10], [1, 1, 1], cap=10) == [4, 3, 3]
    for available, weights in (([5, 50, 500], [3, 2, 1]), ([7, 7], [0.5, 0.5])):
        counts = mix_counts(available, weights)
        assert all(c <= n for c, n in zip(counts, available))


def test_mix_held_out_rows_never_train_and_are_recorded(tmp_path, tok):
    a, b = _sources(tmp_path)
    data = _prepare(tok, mix=_mix(a, b, 1, 1), eval_fraction=0.25)
    train, held = _decoded(tok, data.train), _decoded(tok, data.eval)
    assert len(train) + len(held) == 16 and len(held) == 4
    assert not set(train) & set(held)
    assert sum(m["eval_rows"] for m in data.stats["mix"]) == 4
    assert data.stats["mix"][1] == {"source": str(b), "weight": 1.0, "schema": "sharegpt",
                                    "rows_valid": 8, "rows_drawn": 8, "share_drawn": 0.5,
                                    "eval_rows": data.stats["mix"][1]["eval_rows"]}


def test_mix_short_form_and_max_rows(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", DOLLY_ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", CHAT_ROWS)
    cfg = config_from_dict(parse_overrides([f"data.mix={a}=3,{b}=1", "data.max_rows=8",
                                            "data.eval_fraction=0"])).data
    data = prepare_data(cfg, tok, seed=0)
    assert [m["rows_drawn"] for m in data.stats["mix"]] == [6, 2]


def test_mix_refuses_sources_of_different_kinds(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", DOLLY_ROWS)
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}])
    with pytest.raises(UserError, match=r"data.mix: .*t.jsonl renders with template 'raw' but "
                       r".*a.jsonl with 'plain' — mix sources of one kind"):
        _prepare(tok, mix=[{"source": str(a)}, {"source": str(t)}])


def test_a_bad_row_in_a_mix_names_its_file_and_line(tmp_path, tok):
    a, b = _sources(tmp_path)
    write_jsonl(b, [{"talk": CHAT_ROWS[0]["conversations"]}, {"talk": "hi"}])
    with pytest.raises(UserError, match=rf"{b}:2: field 'conversations' must be"):
        _prepare(tok, mix=_mix(a, b, 1, 1))


@pytest.mark.parametrize("mix, fragment", [
    ("[a.jsonl, b.jsonl]", ("config key data.mix = '[a.jsonl, b.jsonl]' is invalid: must be "
                            "a list of {source, weight} mappings")),
    ([{"source": "a.jsonl", "wieght": 1}], ("data.mix[0] = {'source': 'a.jsonl', 'wieght': 1} "
                                            "is invalid: must be a mapping with keys among")),
    ([{"weight": 1}], "data.mix[0] = {'weight': 1} is invalid: must be a mapping with a `source`"),
    ([{"source": "a.jsonl", "weight": 0}], "data.mix[0].weight = 0 is invalid: must be a positive"),
    ("a.jsonl=lots", "data.mix[0].weight = 'lots' is invalid"),
    ([{"source": "a.jsonl", "schema": "csv"}], "data.mix[0].schema = 'csv' is invalid"),
    ([{"source": "a.jsonl", "columns": "instruction"}], "data.mix[0].columns = 'instruction'"),
    ({"source": "a.jsonl"}, "config key data.mix = {'source': 'a.jsonl'} has the wrong type"),
])
def test_bad_mixes_are_one_line(mix, fragment):
    with pytest.raises(UserError) as err:
        config_from_dict({"data": {"mix": mix}})
    assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_mix_round_trips_through_the_saved_config(tmp_path):
    from qlora_lab.config import load_run_config, save_config

    cfg = config_from_dict({"data": {"mix": _mix("a.jsonl", "b.jsonl", 0.7, 0.3)}})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_run_config(tmp_path / "config.yaml")
    assert again == cfg
    assert [(d.source, d.columns, w) for d, w in again.data.mix_sources()] == [
        ("a.jsonl", "", 0.7), ("b.jsonl", "conversations=talk", 0.3)]


# --- eval --columns ------------------------------------------------------------------------------


def test_eval_renames_columns_like_train(tmp_path):
    from qlora_lab.evaluate import EvalConfig, load_eval_rows

    renamed = [{"q": r["instruction"], "a": r["response"], "category": r["category"]}
               for r in DOLLY_ROWS[:3]]
    path = write_jsonl(tmp_path / "q.jsonl", renamed)
    rows, skipped = load_eval_rows(EvalConfig(data=str(path), model="tiny-random",
                                              columns="instruction=q,response=a"))
    assert skipped == 0 and [r.reference for r in rows] == [r["response"] for r in DOLLY_ROWS[:3]]
    assert rows[0].category == "open_qa"
    with pytest.raises(UserError, match="cannot detect the schema .* data.columns"):
        load_eval_rows(EvalConfig(data=str(path), model="tiny-random"))
    with pytest.raises(UserError, match="data.columns = 'q' is invalid"):
        EvalConfig(data=str(path), model="tiny-random", columns="q")


def test_eval_columns_flag_reaches_the_config(tmp_path, monkeypatch):
    from qlora_lab import cli, evaluate

    seen = {}

    def fake_run_eval(cfg):
        seen["cfg"] = cfg
        return {"table": "", "output_dir": str(tmp_path)}

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    assert cli.main(["eval", "--model", "tiny-random", "--data", "d.jsonl", "--columns",
                     "instruction=q,response=a", "--max-rows", "2"]) == 0
    assert seen["cfg"].columns == "instruction=q,response=a" and seen["cfg"].max_rows == 2
    assert seen["cfg"].compare_base is False and seen["cfg"].output_dir is None


def test_a_mixed_run_records_the_draw_in_its_summary(tmp_path):
    from conftest import tiny_config

    from qlora_lab.config import load_run_config
    from qlora_lab.train import run_train

    a, b = _sources(tmp_path)
    cfg = config_from_dict({"data": {"mix": _mix(a, b, 0.7, 0.3)}},
                           tiny_config(tmp_path / "run", a, max_steps=1, save_steps=1))
    summary = run_train(cfg)
    drawn = {m["source"]: m["rows_drawn"] for m in summary["data"]["mix"]}
    assert drawn == {str(a): 12, str(b): 5}
    saved = json.loads((tmp_path / "run/summary.json").read_text())
    assert saved["data"]["mix"] == summary["data"]["mix"]
    assert load_run_config(tmp_path / "run/config.yaml").data.mix_sources() == (
        cfg.data.mix_sources())


# --- a dataset folder cannot reach outside itself ------------------------------------------------


@pytest.mark.parametrize("data_files", ["../secret.jsonl", "/etc/passwd",
                                        "[{split: train, path: ../secret.jsonl}]"])
def test_a_folder_card_naming_files_outside_the_folder_is_refused(tmp_path, tok, data_files):
    write_jsonl(tmp_path / "secret.jsonl", DOLLY_ROWS[:2])
    folder = tmp_path / "handed"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOLLY_ROWS[:4])
    (folder / "README.md").write_text(
        f"---\nconfigs:\n- config_name: x\n  data_files: {data_files}\n---\n# card\n")
    with pytest.raises(UserError, match=r"README.md: config 'x' reads .* outside the folder") \
            as info:
        _prepare(tok, source=str(folder), hub_config="x", eval_fraction=0.0)
    assert "\n" not in str(info.value)


def test_a_folder_linking_to_a_file_outside_it_is_refused(tmp_path, tok):
    write_jsonl(tmp_path / "secret.jsonl", DOLLY_ROWS[:2])
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / "train.jsonl").symlink_to(tmp_path / "secret.jsonl")
    with pytest.raises(UserError, match=r"train.jsonl links outside its dataset folder"):
        _prepare(tok, source=str(folder), eval_fraction=0.0)


def test_a_hub_cache_snapshot_folder_may_link_to_its_blobs(tmp_path, tok):
    """The hub's cache stores files in blobs/ and links them from snapshots/<rev>/."""
    repo = tmp_path / "datasets--org--name"
    (repo / "blobs").mkdir(parents=True)
    blob = write_jsonl(repo / "blobs" / "abc123", DOLLY_ROWS[:4])
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "train.jsonl").symlink_to(blob)
    data = _prepare(tok, source=str(snapshot), eval_fraction=0.0)
    assert len(data.train) == 4


# --- a folder's files are read as the same files given directly ---------------------------------

# Rows whose answers are JSON text, as in the demo data: `datasets` parsed them into dicts.
JSON_ANSWERS = [{**r, "response": json.dumps({"sum": r["response"]})} for r in DOLLY_ROWS]
CSV_HEADER = "instruction,context,response\n"


def _csv(rows) -> str:
    return CSV_HEADER + "".join(f"{r['instruction']},,{r['response'].split()[-1]}\n" for r in rows)


@pytest.mark.parametrize("name, content, skippable", [
    ("train.jsonl", "".join(json.dumps(r) + "\n" for r in JSON_ANSWERS[:5]).encode()
     + b'{"instruction": "caf\xe9", "context": "", "response": "ok"}\n', False),
    ("train.jsonl", "".join(json.dumps(r) + "\n" for r in JSON_ANSWERS[:5]).encode()
     + b"[1, 2]\n" + json.dumps(JSON_ANSWERS[5]).encode() + b"\n", True),
    ("train.jsonl", "".join(json.dumps(r) + "\n" for r in JSON_ANSWERS[:5]).encode()
     + json.dumps({**DOLLY_ROWS[5], "response": 123}).encode() + b"\n", True),
    ("train.csv", (_csv(DOLLY_ROWS[:4]) + "a,b,c,surplus\n" + _csv(DOLLY_ROWS[5:7])[len(CSV_HEADER):]
                   ).encode(), True),
    ("train.csv", _csv(DOLLY_ROWS[:4]).encode() + b"caf\xe9,,ok\n", False),
], ids=["jsonl-not-utf8", "jsonl-row-not-an-object", "jsonl-response-int", "csv-ragged-row",
        "csv-not-utf8"])
def test_a_bad_row_in_a_folder_is_reported_as_in_the_file(tmp_path, tok, name, content,
                                                           skippable):
    """The same one-line error, naming the file in the folder and its 1-based line, and
    --skip-bad-rows skipping the same rows, as when the file is given directly."""
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / name).write_bytes(content)
    (tmp_path / name).write_bytes(content)
    for skip in (False, True):
        outcomes = []
        for source in (folder, tmp_path / name):
            try:
                data = _prepare(tok, source=str(source), skip_bad_rows=skip, eval_fraction=0.0)
                outcomes.append((data.stats["bad_rows_skipped"], _decoded(tok, data.train)))
            except UserError as err:
                outcomes.append(str(err).replace(str(folder / name), str(tmp_path / name)))
        via_folder, via_file = outcomes
        assert via_folder == via_file
        if skip and skippable:
            assert via_folder[0] == 1
        else:
            assert f"{tmp_path / name}:6: " in via_folder and "\n" not in via_folder, via_folder


def test_a_folder_with_an_empty_file_names_it(tmp_path, tok):
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / "train.jsonl").write_text("")
    with pytest.raises(UserError, match=rf"data source {folder} has no rows in "
                       rf"{folder / 'train.jsonl'} — add rows"):
        _prepare(tok, source=str(folder))


def test_a_folder_of_unsupported_files_is_refused_as_the_file_is(tmp_path, tok):
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi\n")
    with pytest.raises(UserError, match=r"notes.txt has an unsupported suffix '.txt'"):
        _prepare(tok, source=str(folder / "notes.txt"))
    with pytest.raises(UserError, match=rf"data file {folder / 'notes.txt'} in dataset folder "
                       rf"{folder} has an unsupported suffix '.txt' — a folder's data files "
                       r"take the suffixes a file does \(.jsonl, .json, .csv, .parquet\)"):
        _prepare(tok, source=str(folder))


def _split_files(folder) -> dict[str, set[str]]:
    return {split: {r.where.rsplit(":", 1)[0] for r in read_rows(str(folder), split=split)}
            for split in ("train", "validation", "test")}


def test_a_folder_keeps_splits_named_by_files_and_folders(tmp_path, tok):
    """As `load_dataset` names them: dev is the validation split; subfolders named for a split
    take precedence over files named for one."""
    folder = tmp_path / "handed"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOLLY_ROWS[:6])
    write_jsonl(folder / "dev.jsonl", DOLLY_ROWS[6:9])
    write_jsonl(folder / "test.jsonl", DOLLY_ROWS[9:])
    assert _split_files(folder) == {"train": {str(folder / "train.jsonl")},
                                    "validation": {str(folder / "dev.jsonl")},
                                    "test": {str(folder / "test.jsonl")}}
    data = _prepare(tok, source=str(folder), eval_split="validation")
    assert (len(data.train), len(data.eval)) == (6, 3)
    with pytest.raises(UserError, match=r"data.split = 'dev' is not a split of .*handed \(its "
                       r"splits: train, validation, test\)"):
        read_rows(str(folder), split="dev")
    for split in ("train", "validation", "test"):
        (folder / split).mkdir()
        write_jsonl(folder / split / "part1.jsonl", DOLLY_ROWS[:2])
    assert _split_files(folder) == {split: {str(folder / split / "part1.jsonl")}
                                    for split in ("train", "validation", "test")}


def test_a_folder_config_with_reader_options_is_read_by_datasets(tmp_path):
    """`field: data` is an option of `datasets`' JSON reader, which ours does not take."""
    folder = tmp_path / "handed"
    folder.mkdir()
    (folder / "rows.json").write_text(json.dumps({"data": DOLLY_ROWS[:3], "ids": [1, 2, 3]}))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: wrapped\n  data_files: rows.json\n  field: data\n---\n")
    rows = read_rows(str(folder), hub_config="wrapped")
    assert [r.values for r in rows] == DOLLY_ROWS[:3]
    assert rows[0].where == f"{folder}[wrapped:train]:row 0"
