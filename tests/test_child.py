"""child.py: work in a fresh process, read back as a typed outcome.

Real child processes throughout: a tiny-model training run (lab's), and small targets defined
below (the child imports this file, with tests/ on its PYTHONPATH) for the outcomes a tiny CPU
run cannot produce on demand (a CUDA OOM, a crash, a hang, a signal).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from qlora_lab import child, faults, lab_runs
from qlora_lab.child import Outcome
from qlora_lab.config import to_dict
from qlora_lab.errors import LossNotFinite, OutOfMemory, TrainingInterrupted, UserError

TESTS = Path(__file__).parent


# --- targets the child runs (`test_child:<name>`) ------------------------------------------------


def echo(spec: dict) -> dict:
    return {"got": spec, "pid": os.getpid()}


def environment(spec: dict) -> dict:
    return {k: os.environ.get(k) for k in spec["keys"]}


def oom_inside_train(spec: dict) -> dict:
    """An OOM as `train` reports it: a one-line OutOfMemory (a UserError) raised `from None`."""
    try:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except torch.cuda.OutOfMemoryError:
        raise OutOfMemory("CUDA out of memory (Tried to allocate 2.00 GiB) — try less") from None


def crash(spec: dict) -> dict:
    raise ValueError("a bug\nwith a second line")


def die(spec: dict) -> dict:
    os._exit(3)  # no result file, no exception: as a segfault or the OOM killer would


def stop(spec: dict) -> dict:
    os.kill(os.getpid(), signal.SIGTERM)  # default action: the process ends at once
    time.sleep(30)
    return {}


def sleep(spec: dict) -> dict:
    time.sleep(spec["seconds"])
    return {}


def allocate(spec: dict) -> dict:
    torch.empty(spec["bytes"], dtype=torch.uint8, device="cuda")
    return {}


@pytest.fixture
def on_path(monkeypatch):
    """Let the child import this file's targets."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))


# --- the protocol --------------------------------------------------------------------------------


def test_value_round_trips_through_a_fresh_process(tmp_path, on_path):
    result = child.run_child("test_child:echo", {"a": [1, 2], "b": None}, tmp_path / "echo",
                             packages=("pytest",))
    assert result.outcome is Outcome.OK and result.error is None and result.exit_code == 0
    assert result.unwrap()["got"] == {"a": [1, 2], "b": None}
    assert result.value["pid"] != os.getpid()
    assert result.versions["torch"] and result.versions["python"]
    assert result.versions["pytest"] == pytest.__version__ and result.wall_seconds > 0
    task = json.loads((tmp_path / "echo.task.json").read_text())
    assert task["target"] == "test_child:echo" and task["memory_cap_bytes"] is None


def test_the_task_sets_environment_defaults_the_users_own_values_win(tmp_path, on_path,
                                                                     monkeypatch):
    monkeypatch.setenv("QLORA_LAB_TEST_MINE", "user")
    monkeypatch.delenv("QLORA_LAB_TEST_NEW", raising=False)
    result = child.run_child("test_child:environment",
                             {"keys": ["QLORA_LAB_TEST_MINE", "QLORA_LAB_TEST_NEW"]},
                             tmp_path / "env", env={"QLORA_LAB_TEST_MINE": "default",
                                                    "QLORA_LAB_TEST_NEW": "default"})
    assert result.unwrap() == {"QLORA_LAB_TEST_MINE": "user", "QLORA_LAB_TEST_NEW": "default"}
    assert "QLORA_LAB_TEST_NEW" not in os.environ  # the parent's environment is untouched


@pytest.mark.parametrize("target, outcome, exit_code, says", [
    ("oom_inside_train", Outcome.OOM, 1, "CUDA out of memory"),
    ("crash", Outcome.CRASH, 1, "ValueError: a bug"),
    ("die", Outcome.CRASH, 3, "exited 3 without a result"),
    ("stop", Outcome.INTERRUPTED, -signal.SIGTERM, "without a result"),
])
def test_each_failure_has_its_own_outcome(tmp_path, on_path, target, outcome, exit_code, says):
    result = child.run_child(f"test_child:{target}", {}, tmp_path / target)
    assert result.outcome is outcome and result.exit_code == exit_code
    assert says in result.error and "\n" not in result.error and result.value is None
    with pytest.raises(child.ChildFailed) as failed:
        result.unwrap()
    assert failed.value.result is result


def test_a_child_past_its_timeout_is_killed(tmp_path, on_path):
    started = time.perf_counter()
    result = child.run_child("test_child:sleep", {"seconds": 60}, tmp_path / "slow", timeout_s=3)
    assert result.outcome is Outcome.TIMEOUT and result.exit_code is None
    assert time.perf_counter() - started < 30 and "3 s" in result.error


def test_outcomes_are_read_from_types_not_message_text():
    def raised(make):
        try:
            make()
        except BaseException as exc:  # noqa: BLE001
            return exc

    def nan_as_train_reports_it():
        try:
            raise faults.NonFiniteLoss(float("nan"), 3)
        except faults.NonFiniteLoss:
            raise LossNotFinite("training loss became nan at step 3 — lower the lr") from None

    def user_error_mentioning_oom():
        raise UserError("out of memory? training loss became nan? neither: a bad path")

    assert child.classify(raised(lambda: oom_inside_train({}))) is Outcome.OOM
    assert child.classify(raised(nan_as_train_reports_it)) is Outcome.NON_FINITE
    assert child.classify(OutOfMemory("no context needed")) is Outcome.OOM
    assert child.classify(LossNotFinite("no context needed")) is Outcome.NON_FINITE
    assert child.classify(raised(user_error_mentioning_oom)) is Outcome.USER_ERROR
    assert child.classify(TrainingInterrupted("stopped", 130)) is Outcome.INTERRUPTED
    assert child.classify(raised(lambda: crash({}))) is Outcome.CRASH


# --- lab's runs through it: real training on the tiny model ---------------------------------------


def test_lab_run_trains_in_its_own_process(tmp_path, dolly_file):
    run = tiny_config(tmp_path / "runs" / "one", dolly_file, max_steps=2, eval_steps=2)
    record = lab_runs.run_isolated(run, cap_bytes=None)
    assert record["status"] == "ok" and record["error"] is None
    assert len(record["train_losses"]) == 2 and record["steps"] == 2
    assert record["tokens_per_s"] > 0 and record["eval_loss"] > 0
    assert (tmp_path / "runs" / "one" / "adapter" / "adapter_config.json").is_file()
    result = json.loads((tmp_path / "runs" / "one.result.json").read_text())
    assert result["outcome"] == "ok" and result["value"] == record


def test_lab_run_with_a_user_error_is_recorded_not_raised(tmp_path, dolly_file):
    run = tiny_config(tmp_path / "runs" / "bad", tmp_path / "missing.jsonl", max_steps=2)
    result = child.run_child("qlora_lab.lab_runs:run_spec", {"run": to_dict(run)},
                             tmp_path / "bad")
    assert result.outcome is Outcome.USER_ERROR and "missing.jsonl" in result.error
    record = lab_runs.run_isolated(run, cap_bytes=None)
    assert record["status"] == "error" and "missing.jsonl" in record["error"]
    assert record["train_losses"] == [] and record["tokens_per_s"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory cap applies to CUDA only")
def test_memory_cap_emulates_a_smaller_card(tmp_path, on_path):
    gib = 1024**3
    assert child.run_child("test_child:allocate", {"bytes": 2 * gib}, tmp_path / "free",
                           None).outcome is Outcome.OK
    capped = child.run_child("test_child:allocate", {"bytes": 2 * gib}, tmp_path / "capped",
                             memory_cap_bytes=1 * gib)
    assert capped.outcome is Outcome.OOM and "OutOfMemoryError" in capped.error
