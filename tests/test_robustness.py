"""Nothing lost: kill -9 and resume, SIGINT/SIGTERM, NaN loss, OOM, atomic checkpoints.

The subprocess tests run the real CLI (`python -m qlora_lab train`) on the tiny model with the
same config as the `trained_run` fixture, so every interrupted-then-resumed run must end with the
adapter of that uninterrupted run (max abs difference <= 1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import DOLLY_ROWS, tiny_config, write_jsonl
from safetensors.torch import load_file

from qlora_lab import checkpoints, fsio
from qlora_lab.config import load_run_config, save_config
from qlora_lab.errors import LossNotFinite, OutOfMemory, TrainingInterrupted, UserError
from qlora_lab.rundir import find_checkpoint
from qlora_lab.train import oom_advice, run_train

ADAPTER = "adapter/adapter_model.safetensors"


def assert_same_adapter(expected_run: Path, actual_run: Path) -> None:
    expected = load_file(expected_run / ADAPTER)
    actual = load_file(actual_run / ADAPTER)
    assert expected.keys() == actual.keys()
    worst = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst


def tmp_entries(run: Path) -> list[str]:
    return sorted(p.name for d in (run, run / "checkpoints") if d.is_dir()
                  for p in d.iterdir() if p.name.startswith(fsio.TMP_PREFIX))


# --- the CLI in a subprocess -------------------------------------------------------------------


@pytest.fixture
def cli_run(tmp_path):
    """A work dir holding the data and a config equal to `trained_run`'s; the run goes in ./run."""
    write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    save_config(tiny_config("run", "d.jsonl"), tmp_path / "cfg.yaml")
    return tmp_path


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "qlora_lab", "-q", "train", *args], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """Poll (without sleeping: a checkpoint's staging dir lives ~15 ms) until `ready()`."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"train exited ({proc.returncode}) before the kill point:\n"
                                 f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")


def kill_when(proc: subprocess.Popen, ready) -> None:
    wait_until(proc, ready)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(proc: subprocess.Popen) -> str:
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stderr


def logged_step(run: Path, step: int):
    """True once metrics.jsonl holds the training loss of `step`."""
    def ready() -> bool:
        try:
            lines = (run / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(f'"step": {step},' in line and '"loss"' in line for line in lines)
    return ready


def staging_of(run: Path, step: int):
    """True once Trainer has started writing checkpoint-`step` (its staging dir exists)."""
    name = checkpoints.staging_dir(run / "checkpoints", step).name

    def ready() -> bool:
        try:
            return name in os.listdir(run / "checkpoints")
        except FileNotFoundError:
            return False
    return ready


def test_sigkill_at_three_points_then_resume_equals_uninterrupted(cli_run, trained_run):
    run = cli_run / "run"
    ckpts = run / "checkpoints"

    # 1. Killed while checkpoint-3 is being written: only its staging dir exists.
    kill_when(start(cli_run, "--config", "cfg.yaml"), staging_of(run, 3))
    assert not (ckpts / "checkpoint-3").exists() and tmp_entries(run)

    # 2. Resume (no checkpoint yet: starts again), killed between checkpoints, at step 5.
    kill_when(start(cli_run, "--output-dir", "run", "--resume"), logged_step(run, 5))
    assert checkpoints.list_all(ckpts) == [ckpts / "checkpoint-3"]
    assert checkpoints.problem(ckpts / "checkpoint-3") is None

    # 3. Resume from checkpoint-3, killed while checkpoint-6 is being written.
    kill_when(start(cli_run, "--output-dir", "run", "--resume"), staging_of(run, 6))
    assert checkpoints.list_all(ckpts) == [ckpts / "checkpoint-3"] and tmp_entries(run)

    # 4. Resume from checkpoint-3 again and finish.
    finish(start(cli_run, "--output-dir", "run", "--resume"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-3")
    assert tmp_entries(run) == []
    assert_same_adapter(trained_run, run)
    # metrics.jsonl tells one story: each step once, in order, despite three kills.
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(cli_run, trained_run):
    run = cli_run / "run"
    proc = start(cli_run, "--config", "cfg.yaml")
    wait_until(proc, logged_step(run, 1))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (2, 128 + signal.SIGTERM), stderr
    message = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM at step" in message
    assert "qlora-lab train --output-dir run --resume" in message
    stopped_at = int(message.split("at step ")[1].split()[0])
    assert 1 <= stopped_at < 6
    assert checkpoints.newest_usable(run / "checkpoints").name == f"checkpoint-{stopped_at}"
    assert not (run / "adapter").exists() and tmp_entries(run) == []

    finish(start(cli_run, "--output-dir", "run", "--resume"))
    assert_same_adapter(trained_run, run)


# --- in-process faults -------------------------------------------------------------------------


def test_sigint_in_process_checkpoints_then_resume_is_exact(tmp_path, dolly_file, trained_run):
    cfg = tiny_config(tmp_path / "run", dolly_file)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def interrupt_after_step_one():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.is_file() and '"loss"' in metrics.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.005)

    before = signal.getsignal(signal.SIGINT)
    watcher = threading.Thread(target=interrupt_after_step_one)
    watcher.start()
    with pytest.raises(TrainingInterrupted) as stop:
        run_train(cfg)
    watcher.join()
    assert stop.value.exit_code == 130 and "--resume" in str(stop.value)
    assert signal.getsignal(signal.SIGINT) is before  # the handler lives only while training
    summary = run_train(cfg, resume=True)
    assert summary["steps"] == 6
    assert_same_adapter(trained_run, tmp_path / "run")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, dolly_file):
    # lr 1e20: step 1 is finite and saved; its update makes step 2's loss NaN.
    cfg = tiny_config(tmp_path / "run", dolly_file, learning_rate=1e20, save_steps=1,
                      max_grad_norm=0.0, lr_scheduler="constant", warmup_ratio=0.0)
    with pytest.raises(LossNotFinite) as err:
        run_train(cfg)
    message = str(err.value)
    assert "training loss became nan at step 2" in message and "\n" not in message
    assert "checkpoint-1" in message and "train.learning_rate" in message
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.list_all(ckpts)] == ["checkpoint-1"]
    assert checkpoints.problem(ckpts / "checkpoint-1") is None
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_nan_step_read_a_step_later_never_reaches_the_weights(tmp_path, dolly_file):
    # Nothing to save, eval or log at step 2: the guard reads step 2's flag at step 3, without
    # waiting. torch's fused AdamW (train.optimizer adamw_torch) skipped step 2's update on the
    # device meanwhile, so the weights are still those after step 1.
    from qlora_lab import faults
    from qlora_lab.train import setup_training

    common = {"learning_rate": 1e20, "max_grad_norm": 0.0, "lr_scheduler": "constant",
              "warmup_ratio": 0.0, "save_steps": 100, "eval_steps": 100, "logging_steps": 100}
    one = setup_training(tiny_config(tmp_path / "one", dolly_file, max_steps=1, **common))
    one.trainer.train()
    after_one = {n: p.detach().clone() for n, p in one.model.named_parameters()
                 if p.requires_grad}
    assert after_one
    many = setup_training(tiny_config(tmp_path / "many", dolly_file, max_steps=6, **common))
    with pytest.raises(faults.NonFiniteLoss) as err:
        many.trainer.train()
    assert err.value.step == 2 and not torch.isfinite(torch.tensor(err.value.value))
    assert many.trainer.state.global_step == 2  # stopped at step 3's optimizer step
    for name, p in many.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), after_one[name]), name
    assert not (tmp_path / "many" / "checkpoints").exists() or not checkpoints.list_all(
        tmp_path / "many" / "checkpoints")


def test_the_loss_guard_reads_at_once_when_the_optimizer_cannot_skip(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from qlora_lab import faults

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    weight = torch.nn.Parameter(torch.ones(3))
    state = TrainerState()
    state.global_step = 4

    plain = faults.NonFiniteLossGuard()  # SGD has no step it can skip on the device
    plain.observe(torch.tensor(1.5))
    plain.observe(torch.tensor(float("inf")))
    plain.observe(torch.tensor(2.0))
    with pytest.raises(faults.NonFiniteLoss) as err:
        plain.on_pre_optimizer_step(args, state, TrainerControl(),
                                    optimizer=torch.optim.SGD([weight], lr=1.0))
    assert err.value.step == 5 and err.value.value == float("inf")  # the first bad loss

    fused = torch.optim.AdamW([weight], lr=1.0, fused=True)
    deferred = faults.NonFiniteLossGuard()
    deferred.observe(torch.tensor(float("nan")))
    deferred.on_pre_optimizer_step(args, state, TrainerControl(), optimizer=fused)
    weight.grad = torch.full((3,), float("nan"))
    fused.step()
    assert torch.equal(weight.detach(), torch.ones(3))  # skipped: found_inf was set
    control = TrainerControl()
    deferred.on_step_end(args, state, control)  # nothing written or shown: no read yet
    control.should_save = True
    with pytest.raises(faults.NonFiniteLoss) as err:
        deferred.on_step_end(args, state, control)  # a checkpoint would follow: read now
    assert err.value.step == 5

    fine = faults.NonFiniteLossGuard()  # finite losses: the fused step runs
    fine.observe(torch.tensor(0.5))
    fine.on_pre_optimizer_step(args, state, TrainerControl(), optimizer=fused)
    weight.grad = torch.ones(3)
    fused.step()
    assert not torch.equal(weight.detach(), torch.ones(3))
    fine.on_train_end(args, state, TrainerControl())


def test_cuda_oom_becomes_advice(tmp_path, dolly_file, monkeypatch):
    from transformers import Trainer

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
                                          "has a total capacity of 7.6 GiB of which 1.2 GiB is free.")

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    cfg = tiny_config(tmp_path / "run", dolly_file)
    with pytest.raises(OutOfMemory) as err:
        run_train(cfg)
    message = str(err.value)
    assert "Tried to allocate 2.00 GiB" in message and "\n" not in message
    assert oom_advice(cfg) in message and "--overwrite" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the memory planner advises")
def test_oom_advice_follows_the_config():
    from qlora_lab.config import config_from_dict

    lean = config_from_dict({"train": {"micro_batch_size": 1, "optimizer": "paged_adamw_8bit"},
                             "data": {"max_seq_len": 256}})
    assert "smaller base model" in oom_advice(lean)
    fat = config_from_dict({"train": {"gradient_checkpointing": False}, "quant": {"bits": 16}})
    advice = oom_advice(fat)
    assert "micro_batch_size=8 --set train.grad_accum_steps=2" in advice  # 16 rows kept
    assert "gradient_checkpointing=true" in advice


def test_resume_of_a_finished_run_killed_while_writing_the_adapter(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    (run / f"{fsio.TMP_PREFIX}adapter-x1").mkdir()  # what a kill mid-publish leaves
    cfg = load_run_config(run / "config.yaml")
    summary = run_train(replace(cfg, train=replace(cfg.train, output_dir=str(run))), resume=True)
    assert summary["steps"] == 6 and tmp_entries(run) == []
    assert_same_adapter(trained_run, run)


# --- resuming past broken checkpoints --------------------------------------------------------


def _fake_checkpoint(path: Path, step: int, trained_run: Path) -> Path:
    shutil.copytree(trained_run / "checkpoints" / "checkpoint-6", path)
    state = json.loads((path / "trainer_state.json").read_text())
    (path / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}))
    return path


def test_resume_skips_broken_checkpoints_and_names_them(tmp_path, trained_run, caplog):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    good = _fake_checkpoint(run / "checkpoints" / "checkpoint-3", 3, trained_run)
    broken = _fake_checkpoint(run / "checkpoints" / "checkpoint-6", 6, trained_run)
    data = (broken / "optimizer.pt").read_bytes()
    (broken / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert find_checkpoint(run, True) == str(good)
    assert "checkpoint-6: it has a truncated or corrupted optimizer.pt" in caplog.text
    with pytest.raises(UserError, match="checkpoint-6 has a truncated or corrupted optimizer.pt"):
        find_checkpoint(run, "checkpoint-6")
    shutil.rmtree(good)
    with pytest.raises(UserError, match="no usable checkpoint .* pass --overwrite"):
        find_checkpoint(run, True)


