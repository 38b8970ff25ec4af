import os
import subprocess
import sys

import pytest
from conftest import DOLLY_ROWS, write_jsonl

from qlora_lab.cli import main


def _run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["merge"]])
def test_help(command):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0


@pytest.mark.parametrize("args, fragment", [
    (["train", "--model", "tiny-random", "--data", "missing.jsonl"], "missing.jsonl does not exist"),
    (["train", "--set", "lora.rank=3"], "unknown config key lora.rank"),
    (["train", "--config", "nope.yaml"], "config file nope.yaml does not exist"),
    (["generate", "--adapter", "no-such-dir", "--prompt", "x"], "no-such-dir does not exist"),
    (["merge", "--adapter", "no-such-dir", "--output-dir", "m"], "no-such-dir does not exist"),
    (["train", "--model", "./no/such/model", "--data", "d.jsonl"], "neither an existing path"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, fragment):
    write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_row_through_the_cli(tmp_path):
    rows = [*DOLLY_ROWS[:3], '{"instruction": "x"}']
    write_jsonl(tmp_path / "d.jsonl", rows)
    proc = _run("train", "--model", "tiny-random", "--data", "d.jsonl", "--output-dir", "out",
                cwd=tmp_path)
    assert proc.returncode == 2 and "d.jsonl:4: missing field 'response'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_budget_applies_the_plan(tmp_path):
    from qlora_lab.config import load_run_config

    data = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    out = tmp_path / "run"
    assert main(["-q", "train", "--model", "tiny-random", "--data", str(data), "--output-dir",
                 str(out), "--max-steps", "1", "--budget", "1GiB", "--set",
                 "train.tensorboard=false", "--set", "data.max_seq_len=256"]) == 0
    cfg = load_run_config(out / "config.yaml")
    # The tiny model fits every micro-batch; the search only tries those that divide the
    # 4 x 4 rows per step, so it takes all 16 in one micro-batch and keeps the effective batch.
    assert cfg.train.micro_batch_size == 16 and cfg.train.grad_accum_steps == 1


def test_train_stdout_is_only_the_json_summary(tmp_path, trained_run):
    # Logs, Trainer's per-step dicts and progress bars go to stderr: `train ... | jq` works.
    import json

    proc = _run("train", "--config", str(trained_run / "config.yaml"), "--output-dir",
                str(tmp_path / "run"), "--max-steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 2 and summary["rows_per_step"] == 4
    assert "'loss':" in proc.stderr or "'train_runtime'" in proc.stderr


def test_report_to_names_an_uninstalled_integration_in_one_line(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    code = main(["train", "--model", "tiny-random", "--data", str(tmp_path / "d.jsonl"),
                 "--output-dir", str(tmp_path / "run"), "--set",
                 "train.report_to=surely_not_an_integration"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "train.report_to" in err[-1] and "is not installed" in err[-1]


def test_flags_are_copied_into_the_config_by_field_name():
    from qlora_lab.cli import build_parser, given_fields, train_config_from_args
    from qlora_lab.config import config_from_dict, parse_overrides
    from qlora_lab.merge import MergeConfig

    args = build_parser().parse_args([
        "train", "--model", "m", "--data", "d.jsonl", "--output-dir", "o", "--max-steps", "3",
        "--save-steps", "2", "--seed", "7", "--skip-bad-rows"])
    by_set = config_from_dict(parse_overrides([
        "model.name=m", "data.source=d.jsonl", "train.output_dir=o", "train.max_steps=3",
        "train.save_steps=2", "train.seed=7", "data.skip_bad_rows=true"]))
    assert train_config_from_args(args) == by_set
    # An unset switch is no value: a YAML file or --set still decides it.
    args = build_parser().parse_args(["train", "--set", "data.skip_bad_rows=true"])
    assert train_config_from_args(args).data.skip_bad_rows is True
    args = build_parser().parse_args(["merge", "--adapter", "a", "--output-dir", "o",
                                      "--dtype", "bf16"])
    assert MergeConfig(**given_fields(args, MergeConfig)) == MergeConfig(
        adapter="a", output_dir="o", dtype="bf16")
