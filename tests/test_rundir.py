"""Run folders under hostile use: what --overwrite deletes, who may write, what --resume accepts.

Each test reproduces a case a hostile probe found (issue #12) and fails on the old behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_config

from qlora_lab import cli, rundir
from qlora_lab.config import load_run_config, load_yaml, parse_overrides
from qlora_lab.errors import UserError
from qlora_lab.train import run_train, setup_training


def digest_tree(root: Path) -> dict[str, str]:
    """Every file's hash; the (empty) lock file a refused run may create is not content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != rundir.LOCK}


def copy_run(trained_run: Path, dest: Path):
    """A copy of the finished tiny run, with its config pointing at the copy."""
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns(rundir.LOCK))
    cfg = load_run_config(dest / "config.yaml")
    return replace(cfg, train=replace(cfg.train, output_dir=str(dest)))


def cli_error(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line and no traceback."""
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# --- 1. --overwrite deletes only what qlora-lab wrote --------------------------------------------


def test_overwrite_refuses_a_project_folder_that_holds_a_config_yaml(tmp_path, dolly_file):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('precious')")
    (project / "config.yaml").write_text("train: {max_steps: 1}\n")
    before = digest_tree(project)
    with pytest.raises(UserError, match="no qlora-lab run wrote"):
        run_train(tiny_config(project, dolly_file), overwrite=True)
    assert digest_tree(project) == before


def test_empty_output_dir_is_refused_not_read_as_the_current_folder(capsys):
    message = cli_error(["train", "--model", "tiny-random", "--set", "train.output_dir="], capsys)
    assert "train.output_dir" in message and "non-empty" in message


def test_overwrite_clears_a_run_but_keeps_files_it_did_not_write(tmp_path, dolly_file,
                                                                  trained_run):
    cfg = copy_run(trained_run, tmp_path / "run")
    (tmp_path / "run" / "my-notes.txt").write_text("keep me")
    summary = run_train(cfg, overwrite=True)
    assert summary["steps"] == 6 and summary["resumed_from"] is None
    assert (tmp_path / "run" / "my-notes.txt").read_text() == "keep me"
    assert rundir.is_run_dir(tmp_path / "run")


def test_a_replacing_run_that_fails_before_its_first_checkpoint_gives_the_run_back(
        tmp_path, trained_run):
    from conftest import snapshot

    from qlora_lab.errors import LossNotFinite

    cfg = copy_run(trained_run, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    diverging = replace(cfg, train=replace(cfg.train, learning_rate=1e30, warmup_ratio=0.0,
                                           lr_scheduler="constant"))
    with pytest.raises(LossNotFinite):
        run_train(diverging, overwrite=True)
    after = {k: v for k, v in snapshot(tmp_path / "run").items() if k != rundir.LOCK}
    assert after == before  # adapter, checkpoints, summary, config: all back as they were
    assert not list((tmp_path / "run").glob(".tmp-*"))
    # A replacing run that succeeds leaves nothing of the earlier one aside.
    assert run_train(cfg, overwrite=True)["steps"] == 6
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_a_tilde_output_dir_is_one_folder_in_home(tmp_path, dolly_file, monkeypatch):
    """Trainer expands `~` itself: the marker, lock and adapter must land where it writes."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("~/runs/x", dolly_file, max_steps=3)
    assert run_train(cfg)["steps"] == 3
    run = tmp_path / "home" / "runs" / "x"
    assert rundir.is_run_dir(run) and (run / "adapter").is_dir()
    assert (run / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "~").exists()
    assert run_train(cfg, resume=True)["steps"] == 3  # finished: found, not trained again


def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_same_adapter(tmp_path,
                                                                             trained_run):
    """Killed between checkpoint-6 (max_steps) and writing adapter/: Trainer resumed there would
    train a seventh step; the last checkpoint is the result instead."""
    cfg = copy_run(trained_run, tmp_path / "run")
    run = tmp_path / "run"
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    summary = run_train(cfg, resume=True)
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-6")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-3", "checkpoint-6"]
    name = "adapter_model.safetensors"
    assert (run / "adapter" / name).read_bytes() == (trained_run / "adapter" / name).read_bytes()


def test_resume_refuses_a_checkpoint_trained_on_other_rows(tmp_path):
    from conftest import DOLLY_ROWS, snapshot, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS * 2)
    cfg = tiny_config(tmp_path / "run", data, max_steps=4, save_steps=2, eval_steps=2)
    run_train(cfg)
    run = tmp_path / "run"
    for stopped_after_2 in (run / "checkpoints" / "checkpoint-4", run / "adapter"):
        shutil.rmtree(stopped_after_2)
    (run / "summary.json").unlink()
    write_jsonl(data, DOLLY_ROWS[:8] * 2)  # the user edits the file between the two runs
    before = snapshot(run)
    with pytest.raises(UserError, match="trained on other rows than the data now gives"):
        run_train(cfg, resume=True)
    assert {k: v for k, v in snapshot(run).items() if k != rundir.LOCK} == {
        k: v for k, v in before.items() if k != rundir.LOCK}
    write_jsonl(data, DOLLY_ROWS * 2)  # the same rows again: it continues
    assert run_train(cfg, resume=True)["resumed_from"].endswith("checkpoint-2")


def test_overwrite_refuses_a_symlinked_output_dir(tmp_path, dolly_file, trained_run):
    copy_run(trained_run, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    before = digest_tree(tmp_path / "real")
    with pytest.raises(UserError, match="is a symbolic link"):
        run_train(tiny_config(tmp_path / "link", dolly_file), overwrite=True)
    assert digest_tree(tmp_path / "real") == before


# --- 2. remote code needs this command line's consent --------------------------------------------


def test_a_run_folder_cannot_turn_on_remote_code(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    copy_run(trained_run, run)
    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved.replace("trust_remote_code: false",
                                                   "trust_remote_code: true"))
    before = digest_tree(run)
    message = cli_error(["train", "--output-dir", str(run), "--resume"], capsys)
    assert "trust_remote_code" in message and "--trust-remote-code" in message
    assert digest_tree(run) == before


def test_a_config_file_cannot_turn_on_remote_code(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: tiny-random, trust_remote_code: true}\n")
    message = cli_error(["plan", "--config", str(config)], capsys)
    assert str(config) in message and "--trust-remote-code" in message


# --- 3. --resume only from this run's own checkpoints ---------------------------------------------


def test_resume_from_another_folders_checkpoint_is_refused(tmp_path, dolly_file, trained_run):
    other = tmp_path / "other"
    copy_run(trained_run, other)
    before = digest_tree(other)
    with pytest.raises(UserError, match="is not a checkpoint of"):
        run_train(tiny_config(tmp_path / "new", dolly_file),
                  resume=str(other / "checkpoints" / "checkpoint-3"))
    assert digest_tree(other) == before
    assert not (tmp_path / "new" / "config.yaml").exists()


def test_resume_into_a_folder_no_run_wrote_is_refused(tmp_path, dolly_file):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no qlora-lab run wrote"):
        run_train(tiny_config(mine, dolly_file), resume=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# --- 5. resuming a finished run is a no-op ----------------------------------------------------------


def test_resuming_a_finished_run_changes_nothing(tmp_path, dolly_file, caplog):
    cfg = tiny_config(tmp_path / "run", dolly_file, lr_scheduler="constant")
    first = run_train(cfg)
    before = digest_tree(tmp_path / "run")
    for resume in (True, "checkpoint-6"):
        again = run_train(cfg, resume=resume)
        assert again["steps"] == first["steps"] == 6
        assert digest_tree(tmp_path / "run") == before
    assert "already finished at step 6" in caplog.text


# --- 6. resume with a changed config: per key ----------------------------------------------------


@pytest.mark.parametrize("pair, key", [
    ("train.learning_rate=0.01", "train.learning_rate"),
    ("lora.r=4", "lora.r"),
    ("train.micro_batch_size=1", "train.micro_batch_size"),
    ("train.max_steps=9", "train.max_steps"),
    ("model.name=smollm2-135m", "model.name"),
])
def test_resume_refuses_a_changed_key_before_touching_the_run(tmp_path, trained_run, capsys,
                                                               pair, key):
    run = tmp_path / "run"
    copy_run(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")  # an interrupted run
    before = digest_tree(run)
    message = cli_error(["train", "--output-dir", str(run), "--resume", "--set", pair], capsys)
    assert f"--resume: {key} is" in message and "config.yaml" in message
    assert digest_tree(run) == before


def test_resume_refuses_a_changed_data_source(tmp_path, trained_run, dolly_file, capsys):
    run = tmp_path / "run"
    copy_run(trained_run, run)
    message = cli_error(["train", "--output-dir", str(run), "--resume", "--data",
                         str(dolly_file)], capsys)
    assert "data.source" in message


def test_resume_applies_bookkeeping_changes(tmp_path, trained_run):
    cfg = copy_run(trained_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-6")
    cfg = replace(cfg, train=replace(cfg.train, logging_steps=2, save_total_limit=1))
    summary = run_train(cfg, resume=True)
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-3")
    assert load_run_config(tmp_path / "run" / "config.yaml").train.logging_steps == 2


# --- 7. one writer per folder ---------------------------------------------------------------------


def test_a_second_process_on_the_same_folder_stops_with_one_line(tmp_path, dolly_file):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qlora_lab.rundir import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="in use by another qlora-lab process"):
            run_train(tiny_config(out, dolly_file), overwrite=True)
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops a dead holder's lock: no stale lock file blocks the next run.
    assert run_train(tiny_config(out, dolly_file, max_steps=1), overwrite=True)["steps"] == 1


# --- 9. bounded YAML --------------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    previous = "a"
    for name in "bcdefghijk"[: levels - 1]:
        text += f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]\n"
        previous = name
    return text


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    assert bomb.stat().st_size < 500
    with pytest.raises(UserError, match="expands to more than"):
        load_yaml(bomb)
    with pytest.raises(UserError, match="expands to more than"):
        parse_overrides(["train.seed=" + billion_laughs().replace("\n", ", ").join("{}")])


def test_yaml_alias_bomb_in_a_run_folder_is_refused(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    copy_run(trained_run, run)
    (run / "config.yaml").write_text(billion_laughs())
    message = cli_error(["train", "--output-dir", str(run), "--resume"], capsys)
    assert "expands to more than" in message and len(message) < 400


def test_a_huge_value_is_quoted_short(tmp_path, capsys):
    message = cli_error(["plan", "--model", "tiny-random", "--set",
                         "train.seed=" + "9" * 5000 + "x"], capsys)
    assert "train.seed" in message and len(message) < 400


# --- 10. disk full ----------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply():
        # A file-size limit fails writes like a full disk does, without needing root or a mount.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_while_checkpointing_is_one_line_and_resumable(tmp_path, dolly_file,
                                                                  trained_run):
    # trained_run built the tiny model's cache, so the limited process writes only run files.
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "qlora_lab", "train", "--model", "tiny-random", "--data",
            str(dolly_file), "--output-dir", str(run), "--max-steps", "4", "--save-steps", "2",
            "--set", "train.tensorboard=false", "--set", "data.max_seq_len=256",
            "--set", "lora.r=8", "--set", "train.micro_batch_size=2"]
    failed = subprocess.run(argv, preexec_fn=_file_size_limit(100_000), capture_output=True,
                            text=True, env=os.environ)
    assert failed.returncode == cli.EXIT_USER_ERROR, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert "could not write checkpoint" in failed.stderr and "--resume" in failed.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == []  # nothing half-written kept
    done = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("exc, disk", [
    (OSError(28, "No space left on device"), True),
    (OSError(27, "File too large"), True),
    (RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed "
                  "writing file data/0: file write failed"), True),
    # tokenizers' save and safetensors' writer, as a full tmpfs made them fail
    (Exception("No space left on device (os error 28)"), True),
    (Exception("Error while serializing: I/O error: disk quota exceeded (os error 122)"), True),
    (OSError(13, "Permission denied"), False),
    (RuntimeError("checkpoint adapter is missing lora_A weights"), False),
])
def test_only_a_write_failure_gets_the_free_disk_space_advice(exc, disk):
    """Anything else raised while checkpointing is a bug: it keeps its traceback instead of
    being told to free disk space."""
    from qlora_lab.trainer import is_write_failure

    assert is_write_failure(exc) is disk


# --- 11. accepted inputs that ended in tracebacks ------------------------------------------------


@pytest.mark.parametrize("flags, fragment", [
    (["--seed", "-1"], "train.seed"),
    (["--seed", str(2**32)], "train.seed"),
    (["--set", "train.micro_batch_size=100000000000000000000"], "train.micro_batch_size"),
    (["--set", "train.grad_accum_steps=99999999"], "train.grad_accum_steps"),
    (["--set", "data.max_seq_len=10000000000"], "data.max_seq_len"),
    (["--set", "lora.r=100000"], "lora.r"),
])
def test_out_of_range_values_are_one_line(tmp_path, dolly_file, capsys, flags, fragment):
    message = cli_error(["train", "--model", "tiny-random", "--data", str(dolly_file),
                         "--output-dir", str(tmp_path / "run"), *flags], capsys)
    assert fragment in message
    assert not (tmp_path / "run").exists()


def test_target_modules_that_match_nothing_are_one_line(tmp_path, dolly_file):
    cfg = tiny_config(tmp_path / "run", dolly_file)
    cfg = replace(cfg, lora=replace(cfg.lora, target_modules="qkv_nope,o_proj"))
    with pytest.raises(UserError, match="lora.target_modules names qkv_nope.*q_proj"):
        setup_training(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_target_modules_by_name_and_as_a_list(tmp_path, dolly_file):
    from qlora_lab.config import config_from_dict

    cfg = tiny_config(tmp_path / "run", dolly_file, max_steps=1)
    listed = config_from_dict({"lora": {"target_modules": ["q_proj", "v_proj"]}}, cfg)
    assert listed.lora.target_modules == "q_proj,v_proj"
    session = setup_training(listed)
    trained = {n.split(".")[-4] for n, p in session.model.named_parameters() if p.requires_grad}
    assert trained == {"q_proj", "v_proj"}
    session.lock.release()


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, dolly_file,
                                                                 trained_run):
    run = tmp_path / "run"
    # The same config as the uninterrupted run (its data file too), in another folder.
    argv = [sys.executable, "-m", "qlora_lab", "train", "--config",
            str(trained_run / "config.yaml"), "--output-dir", str(run)]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "checkpoint-3").is_dir():
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    if (run / "summary.json").exists():
        pytest.skip("the run finished before the kill landed")
    assert (run / "checkpoints" / "checkpoint-3").is_dir()
    done = subprocess.run(argv + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    full = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
