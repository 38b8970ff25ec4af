"""Two-process DDP on CPU (gloo) against one process with the same global batch."""

import os
import subprocess
import sys

from safetensors.torch import load_file

from conftest import DOLLY_ROWS, write_jsonl

# Same rows per optimizer step: 2 processes x micro-batch 2 = 1 process x micro-batch 2 x 2
# accumulation steps (accelerate hands process k every k-th batch of the same shuffled order).
COMMON = ["-m", "qlora_lab", "-q", "train", "--model", "tiny-random", "--max-steps", "4",
          "--save-steps", "2", "--set", "train.micro_batch_size=2", "--set",
          "data.eval_fraction=0.2", "--set", "lora.dropout=0.0", "--set",
          "train.tensorboard=false", "--set", "train.logging_steps=1"]
TOLERANCE = 1e-6  # observed: bit-identical on CPU


def _train(prefix, data, out, accum):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*prefix, *COMMON, "--data", str(data), "--output-dir", str(out),
                           "--set", f"train.grad_accum_steps={accum}"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_process_ddp_matches_one_process(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS * 2)
    _train([sys.executable], data, tmp_path / "one", accum=2)
    stdout = _train([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                     "--master-port", "29512"], data, tmp_path / "two", accum=1)
    assert stdout.count('"steps": 4') == 1  # the summary is printed once, by rank 0
    one = load_file(tmp_path / "one/adapter/adapter_model.safetensors")
    two = load_file(tmp_path / "two/adapter/adapter_model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= TOLERANCE
    # Written once: one checkpoint per save step, one summary, one metrics line per step.
    assert sorted(p.name for p in (tmp_path / "two/checkpoints").iterdir()) == [
        "checkpoint-2", "checkpoint-4"]
    lines = (tmp_path / "two/metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line and "train_loss" not in line for line in lines) == 4


def test_resume_with_another_world_size_says_why_not(trained_run, tmp_path, monkeypatch):
    import shutil

    import pytest

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
