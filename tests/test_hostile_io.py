"""Hostile files and streams: symlinks in folders we write to, the umask of what we publish,
tampered adapters, a closed or empty stdin, prompts longer than the model's context.

Every refusal must be one UserError line, raised before a model is loaded where that is possible,
and nothing outside the folder the user chose may change.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DOLLY_ROWS, write_jsonl

from qlora_lab import adapters, fsio, generate, models
from qlora_lab.cli import main
from qlora_lab.errors import UserError
from qlora_lab.evaluate import EvalConfig, run_eval
from qlora_lab.generate import GenerateConfig, fit_new_tokens, load_for_inference
from qlora_lab.merge import MergeConfig, run_merge


def one_line_error(action, *fragments) -> str:
    with pytest.raises(UserError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder nothing may write to, holding one file whose bytes must survive."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.json").write_text('{"keep": true}\n')
    return folder


def assert_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["precious.json"]
    assert (outside / "precious.json").read_text() == '{"keep": true}\n'


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the trained run (adapter, tokenizer, config.yaml), as if downloaded."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints", "eval"))
    return copy


# --- symlinks ------------------------------------------------------------------------------------


def test_write_text_replaces_a_symlink_instead_of_writing_through_it(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").symlink_to(outside / "precious.json")
    fsio.write_text(out / "eval.json", "new\n")
    assert not (out / "eval.json").is_symlink()
    assert (out / "eval.json").read_text() == "new\n"
    assert_untouched(outside)


def test_write_text_inside_refuses_a_symlinked_subdir(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval").symlink_to(outside)
    one_line_error(lambda: fsio.write_text(out / "eval" / "eval.json", "x", inside=out),
                   "leads outside", str(outside))
    assert_untouched(outside)


def test_check_inside_allows_links_that_stay_inside_and_a_linked_root(tmp_path):
    real = tmp_path / "real"
    (real / "old").mkdir(parents=True)
    (real / "eval").symlink_to(real / "old")
    (tmp_path / "chosen").symlink_to(real)
    assert fsio.check_inside(real, real / "eval" / "eval.json") == real / "old" / "eval.json"
    assert fsio.check_inside(tmp_path / "chosen", tmp_path / "chosen" / "new.json") == \
        real / "new.json"
    one_line_error(lambda: fsio.check_inside(real, real / ".." / "x"), "leads outside")


@pytest.mark.parametrize("dangling", [False, True])
def test_publishing_over_a_symlink_replaces_the_link_only(tmp_path, outside, dangling):
    target = tmp_path / "adapter"
    target.symlink_to(tmp_path / "gone" if dangling else outside)
    with fsio.staged_dir(target) as staging:
        (staging / "adapter_config.json").write_text("{}")
    assert target.is_dir() and not target.is_symlink()
    assert (target / "adapter_config.json").read_text() == "{}"
    assert_untouched(outside)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(fsio.TMP_PREFIX)]


@pytest.mark.parametrize("link", ["eval", "eval/eval.json", "eval/predictions.jsonl"])
def test_eval_refuses_a_symlink_shipped_in_the_run_folder(run_copy, outside, tmp_path, link):
    if link == "eval":
        (run_copy / "eval").symlink_to(outside)
    else:
        (run_copy / "eval").mkdir()
        (run_copy / link).symlink_to(outside / "precious.json")
    data = write_jsonl(tmp_path / "heldout.jsonl", DOLLY_ROWS[:2])
    one_line_error(lambda: run_eval(EvalConfig(adapter=str(run_copy), data=str(data),
                                               max_new_tokens=2)),
                   "leads outside", "--output-dir")
    assert_untouched(outside)


def test_eval_cli_writes_into_a_linked_output_dir_the_user_chose(run_copy, tmp_path, capsys):
    real = tmp_path / "reports"
    real.mkdir()
    (tmp_path / "latest").symlink_to(real)
    data = write_jsonl(tmp_path / "heldout.jsonl", DOLLY_ROWS[:2])
    assert main(["-q", "eval", "--adapter", str(run_copy), "--data", str(data),
                 "--max-new-tokens", "2", "--output-dir", str(tmp_path / "latest")]) == 0
    assert (real / "eval.json").is_file() and (tmp_path / "latest").is_symlink()


def test_eval_cli_refusal_is_one_line(run_copy, outside, tmp_path, capsys):
    (run_copy / "eval").symlink_to(outside)
    data = write_jsonl(tmp_path / "heldout.jsonl", DOLLY_ROWS[:2])
    assert main(["eval", "--adapter", str(run_copy), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leads outside" in err
    assert_untouched(outside)


@pytest.mark.parametrize("dangling", [False, True])
def test_merge_refuses_a_symlinked_output_dir(trained_run, tmp_path, monkeypatch, dangling):
    empty = tmp_path / "empty"
    if not dangling:
        empty.mkdir()
    out = tmp_path / "merged"
    out.symlink_to(empty)
    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    one_line_error(lambda: run_merge(MergeConfig(adapter=str(trained_run), output_dir=str(out))),
                   "is a symlink", "pass the real path")
    assert out.is_symlink() and (dangling or list(empty.iterdir()) == [])


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the refusal")


# --- umask ---------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("intruder", ["file in the dir", "a file", "a symlink"])
def test_a_new_dir_filled_meanwhile_is_never_replaced(tmp_path, intruder):
    """merge's publish: minutes pass between its empty-dir check and its rename."""
    target = tmp_path / "out"
    with pytest.raises(fsio.TargetTaken) as err, fsio.staged_dir(target, replace=False) as tmp:
        (tmp / "model.safetensors").write_text("result")
        if intruder == "file in the dir":
            target.mkdir()
            (target / "notes.txt").write_text("mine")
        elif intruder == "a file":
            target.write_text("mine")
        else:
            target.symlink_to(tmp_path)
    kept = Path(str(err.value).split("the result is in ")[1].split(":")[0])
    assert (kept / "model.safetensors").read_text() == "result"  # minutes of work kept
    assert target.is_symlink() or (target / "notes.txt" if target.is_dir() else target
                                   ).read_text() == "mine"


def test_a_new_dir_may_replace_an_empty_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with fsio.staged_dir(target, replace=False) as tmp:
        (tmp / "a").write_text("x")
    assert (target / "a").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging dir left


def test_current_umask_reads_without_changing_it(umask):
    assert fsio.current_umask() == umask
    assert fsio.current_umask() == umask


def test_published_files_and_dirs_follow_the_umask(tmp_path, umask):
    fsio.write_text(tmp_path / "summary.json", "{}")
    assert _mode(tmp_path / "summary.json") == 0o666 & ~umask
    with fsio.staged_dir(tmp_path / "model") as staging:
        # What libraries leave behind: safetensors and mkstemp create 0600, mkdtemp 0700.
        fd, _ = tempfile.mkstemp(dir=staging)
        os.close(fd)
        tempfile.mkdtemp(dir=staging)
    published = [tmp_path / "model", *(tmp_path / "model").rglob("*")]
    assert len(published) == 3
    for path in published:
        assert _mode(path) == (0o777 if path.is_dir() else 0o666) & ~umask, path


def test_a_trained_adapter_is_readable_by_others(trained_run):
    mask = fsio.current_umask()
    adapter = trained_run / "adapter"
    assert _mode(adapter) == 0o777 & ~mask
    for path in [*adapter.iterdir(), trained_run / "summary.json"]:
        assert _mode(path) == 0o666 & ~mask, path


# --- tampered adapters ---------------------------------------------------------------------------


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(adapter: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / adapters.ADAPTER_WEIGHTS)
    change(tensors)
    save_file(tensors, adapter / adapters.ADAPTER_WEIGHTS)


def _first_module(adapter: Path) -> str:
    return json.loads((adapter / adapters.ADAPTER_CONFIG).read_text())["target_modules"][0]


def _narrower_targets(a):
    targets = json.loads((a / adapters.ADAPTER_CONFIG).read_text())["target_modules"]
    _edit(a / adapters.ADAPTER_CONFIG, target_modules=targets[1:])


def _wider_targets(a):
    targets = json.loads((a / adapters.ADAPTER_CONFIG).read_text())["target_modules"]
    _edit(a / adapters.ADAPTER_CONFIG, target_modules=targets + ["lm_head"])


def _dora_magnitudes(a):
    import torch

    name = f"base_model.model.{_first_module(a)}.lora_magnitude_vector"
    _edit_tensors(a, lambda t: t.update({name: torch.ones(64)}))


def _drop_one_lora_b(a):
    _edit_tensors(a, lambda t: t.pop(f"base_model.model.{_first_module(a)}.lora_B.weight"))


def _config(**changes):
    return lambda a: _edit(a / adapters.ADAPTER_CONFIG, **changes)


TAMPERED = {
    "targets-narrower-than-weights": (_narrower_targets, "which adapter_config.json "
                                      "target_modules does not list"),
    "targets-wider-than-weights": (_wider_targets, "has no weights for lm_head"),
    "targets-not-a-list": (_config(target_modules=5), "target_modules = 5 must be a list"),
    "targets-empty": (_config(target_modules=[]), "target_modules = [] must be a list"),
    "use-dora": (_config(use_dora=True), "use_dora = True is a peft option qlora-lab never"),
    "modules-to-save": (_config(modules_to_save=["lm_head"]), "modules_to_save = ['lm_head']"),
    "rank-pattern": (_config(rank_pattern={"q_proj": 4}), "rank_pattern = {'q_proj': 4}"),
    "bias": (_config(bias="all"), "bias = 'all' is not supported"),
    "rslora-not-a-bool": (_config(use_rslora="yes"), "use_rslora = 'yes' must be true or false"),
    "peft-type": (_config(peft_type="IA3"), "peft_type = 'IA3' is not supported"),
    "alpha-huge": (_config(lora_alpha=1e30), "lora_alpha = 1e+30 must be a positive number"),
    "alpha-nan": (_config(lora_alpha=float("nan")), "lora_alpha = nan must be"),
    "alpha-negative": (_config(lora_alpha=-16), "lora_alpha = -16 must be"),
    "alpha-bool": (_config(lora_alpha=True), "lora_alpha = True must be"),
    "r-huge": (_config(r=100000), "r = 100000 must be a positive integer <= 4096"),
    "r-zero": (_config(r=0), "r = 0 must be a positive integer"),
    "r-string": (_config(r="8"), "r = '8' must be a positive integer"),
    "r-differs-from-weights": (_config(r=16), "r = 16 needs [16, in] and [out, 16]"),
    "dora-magnitude-tensor": (_dora_magnitudes, "lora_magnitude_vector, which is not a LoRA"),
    "lora-b-missing": (_drop_one_lora_b, "and lora_B None for"),
    "no-lora-tensors": (lambda a: _edit_tensors(a, lambda t: t.clear()), "holds no LoRA weights"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_adapters_are_refused_before_the_base_loads(trained_run, tmp_path, monkeypatch,
                                                              case):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    tamper, fragment = TAMPERED[case]
    tamper(adapter)
    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    one_line_error(lambda: load_for_inference(GenerateConfig(adapter=str(adapter))),
                   f"could not load adapter {adapter}", fragment, "re-run train")


def test_an_adapter_for_a_deeper_base_is_refused_not_half_loaded(trained_run, tmp_path):
    """peft skips weights whose module the base lacks, with a warning; we refuse them."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    _edit_tensors(adapter, lambda t: t.update(
        {k.replace("layers.1.", "layers.7."): t.pop(k) for k in list(t) if "layers.1." in k}))
    targets = json.loads((adapter / adapters.ADAPTER_CONFIG).read_text())["target_modules"]
    if isinstance(targets, list):  # full module paths: they name layer 7 too
        _edit(adapter / adapters.ADAPTER_CONFIG,
              target_modules=[t.replace("layers.1.", "layers.7.") for t in targets])
    for action in (lambda: load_for_inference(GenerateConfig(adapter=str(adapter))),
                   lambda: run_merge(MergeConfig(adapter=str(adapter),
                                                 output_dir=str(tmp_path / "merged")))):
        one_line_error(action, f"could not load adapter {adapter}", "model.layers.7.",
                       "which the base model does not have")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("targets", [
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
])
def test_plain_peft_target_forms_are_accepted(trained_run, tmp_path, targets):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    _edit(adapter / adapters.ADAPTER_CONFIG, target_modules=targets)
    assert adapters.resolve_adapter(str(adapter)).adapter_dir == adapter


@pytest.mark.parametrize("key, value", [("quant", {"bits": 16, "quant_type": "nf4",
                                                    "double_quant": True}),
                                        ("quant", {"bits": 4, "quant_type": "fp4"}),
                                        ("model", "tinyllama")])
def test_a_base_record_that_contradicts_the_run_config_is_refused(run_copy, key, value):
    _edit(run_copy / "adapter" / adapters.BASE_INFO_FILE, **{key: value})
    one_line_error(lambda: adapters.resolve_adapter(str(run_copy)), adapters.BASE_INFO_FILE,
                   "but the run's", "config.yaml")


def test_a_base_record_without_quant_is_checked_with_its_defaults(run_copy):
    record = run_copy / "adapter" / adapters.BASE_INFO_FILE
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k != "quant"}))  # loading would assume 4-bit
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("  bits: 4\n", "  bits: 16\n"))
    one_line_error(lambda: adapters.resolve_adapter(str(run_copy)), "quant.bits = 4",
                   "has 16")


# --- stdin ---------------------------------------------------------------------------------------


def _closed_file(tmp_path):
    stream = open(tmp_path / "stdin.txt", "w+")  # noqa: SIM115 - closed on purpose
    stream.close()
    return stream


STDINS = {"empty": lambda _: io.StringIO(""), "blank": lambda _: io.StringIO(" \n"),
          "closed-stream": _closed_file, "no-stdin": lambda _: None}


@pytest.mark.parametrize("stdin", sorted(STDINS))
def test_generate_without_a_prompt_on_stdin_is_one_line(tmp_path, monkeypatch, capsys, stdin):
    monkeypatch.setattr("sys.stdin", STDINS[stdin](tmp_path))
    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    assert main(["generate", "--model", "tiny-random"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no prompt" in err and "--prompt" in err


@pytest.mark.parametrize("stdin", ["closed-stream", "no-stdin"])
def test_chat_on_a_closed_stdin_exits_cleanly_without_loading(tmp_path, monkeypatch, stdin):
    monkeypatch.setattr("sys.stdin", STDINS[stdin](tmp_path))
    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    assert main(["-q", "generate", "--model", "tiny-random", "--chat"]) == 0


def test_chat_ends_at_the_end_of_stdin(trained_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["-q", "generate", "--adapter", str(trained_run), "--chat",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("you> ") == 2  # one turn, then EOF


# --- context length ------------------------------------------------------------------------------


def test_fit_new_tokens(caplog):
    config = SimpleNamespace(max_position_embeddings=10)
    assert fit_new_tokens(config, 3, 7) == 7 and not caplog.records
    assert fit_new_tokens(config, 3, 100) == 7
    assert "--max-new-tokens 100 is cut to 7" in caplog.text
    one_line_error(lambda: fit_new_tokens(config, 10, 1), "the prompt is 10 tokens",
                   "at most 10")
    assert fit_new_tokens(SimpleNamespace(), 10**6, 5) == 5


@pytest.fixture(scope="module")
def tuned(trained_run):
    return load_for_inference(GenerateConfig(adapter=str(trained_run)))


def _prompt_tokens(loaded, text: str) -> int:
    from qlora_lab.data import render_prompt

    rendered = render_prompt([{"role": "user", "content": text}], loaded.tokenizer,
                             loaded.template, add_generation_prompt=True)
    return len(loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_a_prompt_longer_than_the_context_is_refused(trained_run, tuned, tmp_path, capsys):
    limit = tuned.model.config.max_position_embeddings
    prompt = tmp_path / "long.txt"
    prompt.write_text("a" * limit)
    assert _prompt_tokens(tuned, prompt.read_text()) > limit
    assert main(["generate", "--adapter", str(trained_run), "--prompt-file", str(prompt)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert last.startswith("qlora-lab generate: error: the prompt is")
    assert f"reads at most {limit}" in last


def test_max_new_tokens_is_cut_to_the_room_left(tuned, monkeypatch, caplog):
    limit = tuned.model.config.max_position_embeddings
    text = "a" * (limit - 40)
    room = limit - _prompt_tokens(tuned, text)
    assert 0 < room < 100
    asked = {}
    real_generate = tuned.model.generate

    def spy(**kwargs):
        asked["max_new_tokens"] = kwargs["max_new_tokens"]
        return real_generate(**kwargs)

    monkeypatch.setattr(tuned.model, "generate", spy)
    generate.generate_reply(tuned, [{"role": "user", "content": text}],
                            GenerateConfig(adapter="x", max_new_tokens=100))
    assert asked["max_new_tokens"] == room
    assert f"--max-new-tokens 100 is cut to {room}" in caplog.text
