"""Two-process DDP on CPU (gloo): equal to one process, and kill -9 then resume equal to neither
being interrupted."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil  # accelerate's dependency
import pytest
from conftest import DOLLY_ROWS, write_jsonl
from safetensors.torch import load_file

# Same rows per optimizer step: 2 processes x micro-batch 2 = 1 process x micro-batch 2 x 2
# accumulation steps (accelerate hands process k every k-th batch of the same shuffled order).
COMMON = ["-m", "qlora_lab", "-q", "train", "--model", "tiny-random", "--max-steps", "4",
          "--save-steps", "2", "--set", "train.micro_batch_size=2", "--set",
          "data.eval_fraction=0.2", "--set", "lora.dropout=0.0", "--set",
          "train.tensorboard=false", "--set", "train.logging_steps=1"]
TOLERANCE = 1e-6  # observed: bit-identical on CPU
ADAPTER = "adapter/adapter_model.safetensors"
# Whoever launches training must not leak its own distributed settings into it.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _torchrun() -> list[str]:
    # A free port per launch: a killed run's store port may linger in TIME_WAIT.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(port)]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600,
                          check=False)


def _train(prefix, data, out, accum):
    proc = _run([*prefix, *COMMON, "--data", str(data), "--output-dir", str(out),
                 "--set", f"train.grad_accum_steps={accum}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _max_abs_diff(run_a, run_b) -> float:
    a, b = load_file(run_a / ADAPTER), load_file(run_b / ADAPTER)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted 2-process run (4 steps, checkpoints at 2 and 4), its data and stdout."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "d.jsonl", DOLLY_ROWS * 2)
    stdout = _train(_torchrun(), data, root / "two", accum=1)
    return root / "two", data, stdout


def test_two_process_ddp_matches_one_process(two_process_run, tmp_path):
    two, data, stdout = two_process_run
    _train([sys.executable], data, tmp_path / "one", accum=2)
    assert stdout.count('"steps": 4') == 1  # the summary is printed once, by rank 0
    assert _max_abs_diff(tmp_path / "one", two) <= TOLERANCE
    # Written once: one checkpoint per save step, one summary, one metrics line per step.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "checkpoint-2", "checkpoint-4"]
    lines = (two / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line and "train_loss" not in line for line in lines) == 4


# --- kill -9 of a 2-process run, then resume ------------------------------------------------------


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, as losing the machine would.

    The launcher's process group is not enough: torchrun starts each worker in a session of its
    own (torch.distributed.elastic's SubprocessHandler), and killing the group alone leaves them
    training as orphans. So the workers are found as its descendants and each one's group is
    killed too (taking any dataloader workers with it).
    """
    workers = psutil.Process(proc.pid).children(recursive=True)
    for pgid in {proc.pid} | {os.getpgid(p.pid) for p in workers if p.is_running()}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"survived SIGKILL: {alive}"


def snapshot(run) -> dict:
    """Every file under `run` (hidden ones included) with a hash of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_two_process_run_killed_after_a_checkpoint_resumes_exactly(two_process_run, tmp_path):
    uninterrupted, data, _ = two_process_run
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    log = tmp_path / "killed.log"
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would stall the workers
        proc = subprocess.Popen([*_torchrun(), *COMMON, "--data", str(data), "--output-dir",
                                 str(run), "--set", "train.grad_accum_steps=1"],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        # A published checkpoint-N is complete (checkpoints.publish renames it into place).
        while not (ckpts / "checkpoint-2").is_dir():
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "checkpoint-2 never appeared"
            time.sleep(0.002)
        kill_job(proc)
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("checkpoint-")] == [
        "checkpoint-2"], "killed too late: the run got past its second checkpoint"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert '"world_size": 2' in (ckpts / "checkpoint-2" / "qlora_lab_layout.json").read_text()

    # One process may not continue it: the data position is counted per process.
    before = snapshot(run)
    resume = ["-m", "qlora_lab", "-q", "train", "--output-dir", str(run), "--resume"]
    alone = _run([sys.executable, *resume])
    assert alone.returncode == 2, alone.stderr[-3000:]
    # One line, no traceback. Judged among our own lines: CI once saw this stderr hold more than
    # one line, which only the whole stderr in the message can explain if it happens again.
    lines = alone.stderr.strip().splitlines()
    assert "Traceback" not in alone.stderr, alone.stderr[-3000:]
    ours = [line for line in lines if line.startswith("qlora-lab ")]
    assert len(ours) == 1 and lines[-1] == ours[0], alone.stderr[-3000:]
    message = ours[0]
    assert message.startswith("qlora-lab train: error: --resume: "), alone.stderr[-3000:]
    assert "written by 2 process(es) and this run has 1" in message
    assert "torchrun --nproc-per-node 2" in message
    assert snapshot(run) == before  # refused before touching anything

    # Two processes continue it to the adapter of the uninterrupted run.
    resumed = _run([*_torchrun(), *resume])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    assert _max_abs_diff(uninterrupted, run) <= TOLERANCE
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4]  # each step logged once, despite the kill


def test_resume_with_another_world_size_says_why_not(trained_run, tmp_path, monkeypatch):
    import shutil

    from qlora_lab.config import load_run_config
    from qlora_lab.errors import UserError
    from qlora_lab.train import setup_training

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    layout = run / "checkpoints" / "checkpoint-6" / "qlora_lab_layout.json"
    assert layout.is_file() and '"world_size": 1' in layout.read_text()
    cfg = load_run_config(run / "config.yaml")
    from dataclasses import replace
    cfg = replace(cfg, train=replace(cfg.train, output_dir=str(run)))
    before = sorted(p.name for p in run.rglob("*"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"written by 1 process\(es\) and this run has 2"):
        setup_training(cfg, resume=True)
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing touched
