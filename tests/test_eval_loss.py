"""Training-time eval loss: token-weighted, whatever the eval batch size, layout or process count.

Trainer's own loop averages one mean loss per batch, so rows in small batches weigh more
(issue #13); QloraTrainer sums the answer tokens' losses and divides once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_jsonl

from qlora_lab.data import IGNORE_INDEX, PadCollator
from qlora_lab.evaluate import heldout_loss
from qlora_lab.train import setup_training
from qlora_lab.trainer import pad_for_shards, summed_token_loss

RTOL = 1e-5
# Answers of 2 to 30 words: rows differ in length, so batch weighting and token weighting differ.
ROWS = [{"instruction": f"Question {i}?", "context": "", "category": "open_qa",
         "response": " ".join(["word"] * (1 + 9 * (i % 4))) + f" {i}."} for i in range(20)]


def eval_config(out: Path, data: Path, **train):
    cfg = tiny_config(out, data, **train)
    return replace(cfg, data=replace(cfg.data, eval_fraction=0.5))  # 10 eval rows


def sharpen(model) -> None:
    """Random LoRA B weights (seeded): LoRA starts as the identity, and a random base predicts
    every token about equally badly, which would hide any weighting of them."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("evalloss") / "rows.jsonl", ROWS)


# Both layouts and both loss paths; the other pairings meet in the flattened-batch test below.
@pytest.mark.parametrize("packing, fused_loss", [(True, True), (False, False)])
def test_eval_loss_is_token_weighted_at_any_eval_batch_size(tmp_path, data, packing, fused_loss):
    session = setup_training(eval_config(tmp_path / "run", data, packing=packing,
                                         fused_loss=fused_loss))
    try:
        sharpen(session.model)
        trainer, pad_id = session.trainer, session.tokenizer.pad_token_id
        losses = {}
        for batch in (1, 3, 4):
            trainer.args.per_device_eval_batch_size = batch
            metrics = trainer.evaluate()
            assert "eval_runtime" in metrics
            losses[batch] = metrics["eval_loss"]
        session.model.eval()  # Trainer's evaluate left it so; said again for the reader
        expected, _ = heldout_loss(session.model, session.data.eval, pad_id, batch_size=4)
        for batch, loss in losses.items():
            assert loss == pytest.approx(expected, rel=RTOL), (batch, losses, expected)
        # The rows really differ: a mean over rows (Trainer at batch 1) is far from it.
        per_row = [heldout_loss(session.model, [row], pad_id, 1)[0] for row in session.data.eval]
        assert abs(sum(per_row) / len(per_row) - expected) > 100 * RTOL * expected
        # What Trainer logs is the same number: metrics.jsonl and log_history.
        logged = [json.loads(line) for line in (session.out / "metrics.jsonl").read_text()
                  .splitlines()]
        assert [r["eval_loss"] for r in logged if "eval_loss" in r] == list(losses.values())
        assert trainer.state.log_history[-1]["eval_loss"] == losses[4]
    finally:
        session.lock.release()


def _flattened(rows: list[dict]) -> dict:
    """Rows laid end to end in one row: position_ids restart per row, each row's first label is
    ignored, no attention_mask (the layout of packed micro-batches)."""
    ids, labels, positions = [], [], []
    for row in rows:
        ids += row["input_ids"]
        labels += [IGNORE_INDEX] + list(row["labels"][1:])
        positions += list(range(len(row["input_ids"])))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def test_padded_and_flattened_batches_give_the_same_sum_and_count(tmp_path, data):
    session = setup_training(eval_config(tmp_path / "run", data, packing=False))
    try:
        sharpen(session.model)
        session.model.eval()
        rows = session.data.eval[:4]
        padded = PadCollator(session.tokenizer.pad_token_id)(rows)
        expected_count = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:])
                             for row in rows)
        assert session.trainer.head_loss is not None  # the fused loss is on by default
        results = []
        with torch.no_grad():
            for head_loss in (session.trainer.head_loss, None):  # fast path, then logits (FSDP)
                for batch in (padded, _flattened(rows)):
                    total, count = summed_token_loss(session.model, batch, head_loss)
                    assert count == expected_count
                    results.append(total.item())
        assert results == pytest.approx([results[0]] * 4, rel=RTOL)
    finally:
        session.lock.release()


def test_shards_are_filled_with_rows_that_supervise_nothing():
    """Accelerate's sharding of the filled set: every row once, on equal batch counts."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    rows = [{"input_ids": [i, i], "labels": [IGNORE_INDEX, i]} for i in range(10)]
    batch, world = 2, 2
    filled = pad_for_shards(rows, batch * world)
    assert len(filled) == 12 and filled[:10] == rows
    assert all(set(r["labels"]) == {IGNORE_INDEX} for r in filled[10:])
    assert pad_for_shards(rows, 5) is rows  # already a multiple: untouched
    seen, batches = [], []
    for rank in range(world):
        sampler = BatchSamplerShard(BatchSampler(SequentialSampler(filled), batch, False),
                                    num_processes=world, process_index=rank, even_batches=True)
        indices = list(sampler)
        batches.append(len(indices))
        seen += [filled[i]["labels"][1] for b in indices for i in b
                 if filled[i]["labels"][1] != IGNORE_INDEX]
    assert batches[0] == batches[1]
    assert sorted(seen) == list(range(10))


DDP_SCRIPT = """
import json, sys
sys.path[:0] = [{tests!r}]
from pathlib import Path
from test_eval_loss import eval_config, sharpen
from qlora_lab.train import setup_training

session = setup_training(eval_config(Path({out!r}), Path({data!r}), packing=False))
sharpen(session.model)
loss = session.trainer.evaluate()["eval_loss"]
if session.trainer.is_world_process_zero():
    Path({result!r}).write_text(json.dumps(loss))
    session.lock.release()
# As the CLI does after a command (cli._leave_process_group): left to the interpreter's exit,
# gloo's threads aborted this script once (SIGABRT) after it had written its result.
import torch.distributed as dist
dist.destroy_process_group()
"""


def test_two_process_eval_loss_equals_one_process(tmp_path, data):
    # 10 eval rows over 2 processes x micro-batch 2: the last round is short, which accelerate
    # would fill with rows counted twice.
    script = tmp_path / "ddp_eval.py"
    result = tmp_path / "loss.json"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "ddp"),
                                        data=str(data), result=str(result)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = setup_training(eval_config(tmp_path / "one", data, packing=False))
    try:
        sharpen(session.model)
        session.model.eval()
        assert len(session.data.eval) % 4 != 0
        expected, _ = heldout_loss(session.model, session.data.eval,
                                   session.tokenizer.pad_token_id, batch_size=4)
    finally:
        session.lock.release()
    assert json.loads(result.read_text()) == pytest.approx(expected, rel=RTOL)
