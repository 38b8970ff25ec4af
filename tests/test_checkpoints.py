"""checkpoints.py: a checkpoint is published whole or not at all, pruning keeps the right ones,
and a folder is judged by its own files (FSDP's sharded layout included)."""

from __future__ import annotations

import json

import pytest

from qlora_lab import checkpoints, fsio
from qlora_lab.errors import UserError
from qlora_lab.rundir import find_checkpoint


def test_an_unpublished_checkpoint_is_invisible_and_cleaned_up(tmp_path):
    staging = checkpoints.prepare_staging(tmp_path, 7)
    (staging / "checkpoint-7").mkdir()
    (staging / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7}')
    # ...killed here, before checkpoints.publish.
    assert checkpoints.list_all(tmp_path) == [] and checkpoints.newest_usable(tmp_path) is None
    assert checkpoints.problem(staging / "checkpoint-7").startswith("is an unfinished checkpoint")
    assert fsio.remove_stale(tmp_path) == [staging] and list(tmp_path.iterdir()) == []


def test_prune_keeps_the_newest_and_the_one_just_written(tmp_path):
    for step in (3, 6, 9, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".tmp-checkpoint-15-x").mkdir()
    checkpoints.prune(tmp_path, keep=2, current=tmp_path / "checkpoint-12")
    assert [p.name for p in checkpoints.list_all(tmp_path)] == ["checkpoint-9", "checkpoint-12"]
    # After resuming from an older checkpoint, the one just written (9) beats a stale newer 12.
    checkpoints.prune(tmp_path, keep=1, current=tmp_path / "checkpoint-9")
    assert [p.name for p in checkpoints.list_all(tmp_path)] == ["checkpoint-9"]


def test_an_fsdp_sharded_checkpoint_is_judged_by_its_own_files(tmp_path):
    # accelerate's SHARDED_STATE_DICT layout: the adapter and optimizer as distributed-checkpoint
    # folders, no adapter_model.safetensors or optimizer.pt; written here without a process group.
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(ckpt / checkpoints.FSDP_MODEL_DIR))
    dcp.save({"m": torch.zeros(3)}, checkpoint_id=str(ckpt / checkpoints.FSDP_OPTIMIZER_DIR))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, ckpt / name)
    checkpoints.write_layout(ckpt, 2)
    assert checkpoints.problem(ckpt) is None
    assert find_checkpoint(tmp_path, True) == str(ckpt)
    with pytest.raises(UserError, match="written by 2 process"):
        checkpoints.check_layout(ckpt, 1)
    (ckpt / checkpoints.FSDP_OPTIMIZER_DIR / ".metadata").unlink()
    assert "sharded write was interrupted" in checkpoints.problem(ckpt)
