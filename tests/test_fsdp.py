"""FSDP with a 4-bit base: the quant_storage dtype, and how it is chosen.

FSDP flattens each wrapped unit into one tensor of one dtype and casts it to its param dtype, so
bitsandbytes must pack 4-bit codes into that dtype (`bnb_4bit_quant_storage`) instead of uint8.
The invariant that makes this safe: the container changes, the quantized weights do not.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lab import checkpoints, models
from qlora_lab.config import ModelConfig, QuantConfig
from qlora_lab.errors import UserError

PROMPT_IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 44, 32, 52, 45, 98, 105, 116]])


def _load(storage: str, monkeypatch, fsdp: bool = False):
    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    else:
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    path = models.resolve_model_path("tiny-random")
    return models.load_base_model(path, ModelConfig(name="tiny-random"),
                                  QuantConfig(storage=storage), "cpu")


def _four_bit_weights(model):
    return [p for p in model.parameters() if type(p).__name__ == "Params4bit"]


@pytest.fixture(scope="module")
def uint8_logits():
    path = models.resolve_model_path("tiny-random")
    model = models.load_base_model(path, ModelConfig(name="tiny-random"),
                                   QuantConfig(storage="uint8"), "cpu")
    with torch.no_grad():
        return model(PROMPT_IDS).logits


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_storage_dtype_changes_the_container_not_the_weights(storage, uint8_logits, monkeypatch):
    model = _load(storage, monkeypatch)
    weights = _four_bit_weights(model)
    assert weights and all(w.dtype == getattr(torch, storage) for w in weights)
    # Same packed bytes: a float32 element holds 8 codes where a uint8 holds 2.
    uint8_model = _load("uint8", monkeypatch)
    for packed, reference in zip(weights, _four_bit_weights(uint8_model)):
        assert reference.dtype == torch.uint8
        assert torch.equal(packed.data.view(torch.uint8).flatten(), reference.data.flatten())
    with torch.no_grad():
        logits = model(PROMPT_IDS).logits
    assert torch.equal(logits, uint8_logits)


def test_reading_packed_bytes_as_numbers_is_garbage(monkeypatch):
    """What a storage/param dtype mismatch does under FSDP: a numeric cast of the packed bytes."""
    model = _load("float32", monkeypatch)
    weight = _four_bit_weights(model)[0]
    recast = weight.data.to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(recast.view(torch.uint8), weight.data.view(torch.uint8))


def test_auto_storage_is_uint8_without_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not models.fsdp_active()
    assert models.resolve_quant_storage(QuantConfig(), torch.bfloat16, False) == torch.uint8
    weights = _four_bit_weights(_load("auto", monkeypatch))
    assert all(w.dtype == torch.uint8 for w in weights)


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_accelerate_env_turns_fsdp_on(value, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", value)
    assert models.fsdp_active()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not models.fsdp_active()


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16, torch.float32])
def test_auto_storage_is_the_compute_dtype_under_fsdp(compute):
    assert models.resolve_quant_storage(QuantConfig(), compute, True) == compute
    matching = QuantConfig(storage=str(compute).removeprefix("torch."))
    assert models.resolve_quant_storage(matching, compute, True) == compute


def test_fsdp_load_uses_compute_dtype_storage_in_host_memory(monkeypatch):
    model = _load("auto", monkeypatch, fsdp=True)
    weights = _four_bit_weights(model)
    # CPU compute dtype is float32; FSDP moves units to the GPU itself, so loading stays on CPU.
    assert weights and all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights)
    assert models.device_map_for("cuda", fsdp=True) == {"": "cpu"}


@pytest.mark.parametrize("storage", ["uint8", "bfloat16", "float16"])
def test_mismatched_storage_under_fsdp_is_one_line_error(storage, monkeypatch):
    with pytest.raises(UserError) as err:
        _load(storage, monkeypatch, fsdp=True)  # CPU: FSDP's param dtype is float32
    message = str(err.value)
    assert "\n" not in message
    assert f"quant.storage = {storage}" in message and "float32" in message
    assert "auto" in message


def test_explicit_storage_without_fsdp_is_allowed(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    storage = models.resolve_quant_storage(QuantConfig(storage="float16"), torch.bfloat16, False)
    assert storage == torch.float16


def test_checkpointing_is_reentrant_under_fsdp(monkeypatch):
    """FSDP's flat parameters break non-reentrant recomputation (transformers#28499)."""
    model = _load("auto", monkeypatch, fsdp=True)
    models.prepare_for_training(model, gradient_checkpointing=True)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is True
    # The reentrant variant needs an input that requires grad: the embeddings' output does.
    embeds = model.get_input_embeddings()(PROMPT_IDS)
    assert embeds.requires_grad


# --- the final adapter of an FSDP run: two CPU processes (gloo) -----------------------------------
#
# accelerate turns FSDP on only over GPUs (on CPU it stays MULTI_CPU), so `train` itself cannot run
# FSDP here. These processes do what Trainer and accelerate do around checkpoints.save_adapter, with
# torch's real FSDP1: peft's auto-wrap policy (transformers' update_fsdp_plugin_peft), FULL_SHARD,
# flat parameters, one optimizer step, then accelerate's get_state_dict gather (FULL_STATE_DICT to
# rank 0; without offload_to_cpu, which torch's FSDP1 cannot do for CPU tensors).

REPORT = "report.json"


def _fsdp_save_worker(out: Path, base: str) -> None:
    """One rank: wrap a tiny LoRA model in FSDP, train a step, save its adapter as `train` does."""
    import copy

    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model
    from peft import get_peft_model_state_dict
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from qlora_lab.checkpoints import save_adapter
    from qlora_lab.config import LoraConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same LoRA init on both ranks (sync_module_states needs a GPU)
    model = models.attach_lora(models.load_base_model(base, ModelConfig(name=base),
                                                      QuantConfig(bits=16), "cpu"), LoraConfig())
    reference = copy.deepcopy(model)  # the same step, unwrapped
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                   sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=False,
                   device_id=torch.device("cpu"))
    # Both ranks see the same batch, so FSDP's averaged gradient is the unwrapped one.
    for net in (wrapped, reference):
        trainable = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=1.0)  # large: lora_B moves visibly off zero
        net(PROMPT_IDS, labels=PROMPT_IDS).loss.backward()
        optimizer.step()
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                              FullStateDictConfig(offload_to_cpu=False, rank0_only=True)):
        full_state = wrapped.state_dict()  # a collective: every rank joins
    # A checkpoint as Trainer writes one under FSDP (SHARDED_STATE_DICT, adapter only).
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="SHARDED_STATE_DICT")
    save_fsdp_model(plugin, PartialState(cpu=True), wrapped, out / "checkpoint-1",
                    adapter_only=True)
    if rank == 0:
        save_adapter(model, out / "fsdp", full_state)
        reference.save_pretrained(out / "reference")
        with torch.no_grad():
            torch.save(reference(PROMPT_IDS).logits, out / "reference_logits.pt")
        (out / REPORT).write_text(json.dumps({
            "peft_alone_tensors": len(get_peft_model_state_dict(model, state_dict=full_state)),
            "fsdp_segments_in_module_names": sum("_fsdp_wrapped_module" in n
                                                 for n, _ in model.named_modules())}))
    dist.barrier()
    dist.destroy_process_group()


def _launch(out: Path, *worker_args: str) -> None:
    """Run this file's __main__ as 2 gloo ranks (a fresh pair of processes per call)."""
    base = str(models.resolve_model_path("tiny-random"))  # built here, not by two ranks at once
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), __file__, str(out), base, *worker_args],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def fsdp_saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-save")
    _launch(out)
    return out


def test_fsdp_adapter_has_every_lora_tensor_of_the_unwrapped_model(fsdp_saved):
    from safetensors.torch import load_file

    report = json.loads((fsdp_saved / REPORT).read_text())
    assert report["fsdp_segments_in_module_names"] > 0  # nested units: the case peft misses
    saved = load_file(fsdp_saved / "fsdp" / "adapter_model.safetensors")
    expected = load_file(fsdp_saved / "reference" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() and len(saved) > 0
    for key, value in expected.items():
        assert saved[key].dtype == value.dtype
        torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=0, msg=key)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # it trained


def test_fsdp_adapter_loads_with_plain_peft(fsdp_saved):
    from peft import PeftModel

    base = models.resolve_model_path("tiny-random")
    model = models.load_base_model(base, ModelConfig(name="tiny-random"), QuantConfig(bits=16),
                                   "cpu")
    model = PeftModel.from_pretrained(model, fsdp_saved / "fsdp")
    with torch.no_grad():
        logits = model(PROMPT_IDS).logits
    torch.testing.assert_close(logits, torch.load(fsdp_saved / "reference_logits.pt"),
                               atol=1e-5, rtol=0)


def _complete_sharded_checkpoint(ckpt: Path) -> None:
    """The files besides the adapter's shards that a resumable FSDP checkpoint holds."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"m": torch.zeros(3)}, checkpoint_id=str(ckpt / checkpoints.FSDP_OPTIMIZER_DIR))
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    for name in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        torch.save({}, ckpt / name)


def test_fsdp_checkpoint_without_adapter_weights_is_not_resumed(fsdp_saved, tmp_path):
    import torch.distributed.checkpoint as dcp

    # As Trainer wrote it: with peft 0.21 its shards are empty (the names peft walks do not match).
    written = fsdp_saved / "checkpoint-1"
    _complete_sharded_checkpoint(written)
    entries = dcp.FileSystemReader(str(written / checkpoints.FSDP_MODEL_DIR)).read_metadata()
    verdict = checkpoints.problem(written)
    assert (verdict is None) == bool(entries.state_dict_metadata), verdict
    # Written without a process group, and with no tensors at all: refused, in one line.
    empty = tmp_path / "checkpoint-1"
    dcp.save({"model": {}}, checkpoint_id=str(empty / checkpoints.FSDP_MODEL_DIR))
    _complete_sharded_checkpoint(empty)
    message = checkpoints.problem(empty)
    assert message.startswith("has no adapter weights") and "\n" not in message


def test_fsdp_save_refuses_a_gathered_state_without_the_adapter():
    """If the gathered keys ever stop matching the adapter's layers, no empty file is written."""
    from qlora_lab.checkpoints import fsdp_adapter_tensors
    from qlora_lab.config import LoraConfig

    base = models.resolve_model_path("tiny-random")
    model = models.attach_lora(models.load_base_model(base, ModelConfig(name="tiny-random"),
                                                      QuantConfig(bits=16), "cpu"), LoraConfig())
    state = model.state_dict()
    assert len(fsdp_adapter_tensors(model, state)) == sum("lora_" in k for k in state)
    renamed = {f"_fsdp_wrapped_module.{k}": v for k, v in state.items()}
    with pytest.raises(RuntimeError, match=r"FSDP adapter save: \d+ of \d+ adapter weights") as err:
        fsdp_adapter_tensors(model, renamed)
    assert "\n" not in str(err.value)


# --- resuming from an FSDP checkpoint: 2 gloo processes per phase ------------------------------
#
# QloraTrainer's own checkpoint methods (_save_checkpoint with its FSDP save_model and
# _save_optimizer_and_scheduler; _load_from_checkpoint, _load_optimizer_and_scheduler) on a model
# under torch's real FSDP1 wrap. accelerate turns FSDP on only over GPUs, so the trainer is given
# what its prepare step would set (_fsdp_trainer), and the training steps are plain ones: Trainer's
# RNG and data-position restore are stood in for by seeding each step by its number.

STEPS, CHECKPOINT_AT = 4, 2


def _fsdp_trainer(out: Path, model, wrapped, optimizer):
    """A QloraTrainer holding `wrapped` as Trainer holds an FSDP model once training started."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from qlora_lab.trainer import trainer_class

    args = TrainingArguments(output_dir=str(out / "checkpoints"), use_cpu=True,
                             report_to="none", save_total_limit=2)
    trainer = trainer_class()(model=model, args=args)
    trainer.is_fsdp_enabled = True
    trainer.model = trainer.model_wrapped = wrapped
    trainer.optimizer = optimizer
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # configs/accelerate_fsdp.yaml's checkpoint setting.
    trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1, state_dict_type="SHARDED_STATE_DICT")
    return trainer


def _fsdp_resume_worker(out: Path, base: str, phases: list[str]) -> None:
    """`straight`: STEPS steps. `first`: CHECKPOINT_AT steps, then a checkpoint. `resume`: a model
    initialised differently loads that checkpoint and trains the remaining steps."""
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import load_fsdp_optimizer
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from qlora_lab.config import LoraConfig

    dist.init_process_group("gloo")
    rank, ckpt = dist.get_rank(), out / "checkpoints" / checkpoints.name_for(CHECKPOINT_AT)
    for phase in phases:
        # A resume that loaded nothing would go on from another init and end elsewhere.
        torch.manual_seed(1 if phase == "resume" else 0)
        model = models.attach_lora(models.load_base_model(base, ModelConfig(name=base),
                                                          QuantConfig(bits=16), "cpu"),
                                   LoraConfig())
        wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                       sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=False,
                       device_id=torch.device("cpu"))
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad],
                                      lr=1e-2)
        trainer = _fsdp_trainer(out, model, wrapped, optimizer) if phase != "straight" else None
        first, last = 0, STEPS
        if phase == "resume":
            trainer._load_from_checkpoint(str(ckpt), wrapped)
            trainer._load_optimizer_and_scheduler(str(ckpt))
            first = CHECKPOINT_AT
            # accelerate's loader, which Trainer's own method calls, on another fresh optimizer.
            probe = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad])
            load_fsdp_optimizer(trainer.accelerator.state.fsdp_plugin, PartialState(cpu=True),
                                probe, wrapped, ckpt)
            if rank == 0:
                (out / REPORT).write_text(json.dumps({"optimizer_states": len(optimizer.state),
                                                      "accelerate_states": len(probe.state)}))
        elif phase == "first":
            last = CHECKPOINT_AT
        for step in range(first, last):
            torch.manual_seed(100 + step)  # LoRA dropout: Trainer restores the RNG on resume
            ids = PROMPT_IDS.roll(step + rank, dims=1)  # each rank and step its own batch
            wrapped(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if phase == "first":
            trainer.state.global_step = CHECKPOINT_AT
            trainer._save_checkpoint(wrapped, None)  # staged, then published by rank 0
        else:
            checkpoints.save_fsdp_adapter(wrapped, out / phase, write=rank == 0)
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_resumed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp-resume")
    _launch(out, "straight", "first")
    checkpoint = out / "checkpoints" / checkpoints.name_for(CHECKPOINT_AT)
    assert checkpoints.problem(checkpoint) is None  # what --resume checks before loading
    _launch(out, "resume")  # fresh processes, as after a kill -9
    return out


def test_fsdp_resume_equals_an_uninterrupted_run(fsdp_resumed):
    from safetensors.torch import load_file

    straight = load_file(fsdp_resumed / "straight" / checkpoints.ADAPTER_FILE)
    resumed = load_file(fsdp_resumed / "resume" / checkpoints.ADAPTER_FILE)
    checkpoint = fsdp_resumed / "checkpoints" / checkpoints.name_for(CHECKPOINT_AT)
    at_checkpoint = load_file(checkpoint / checkpoints.ADAPTER_FILE)
    assert straight.keys() == resumed.keys() == at_checkpoint.keys() and len(straight) > 0
    for key, value in straight.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=0, msg=key)
    # The last steps changed the adapter: the comparison is not between two copies of the init.
    assert max((straight[k] - at_checkpoint[k]).abs().max() for k in straight) > 1e-4
    # Every trainable flat parameter got its AdamW moments back; accelerate's loader gives none.
    report = json.loads((fsdp_resumed / REPORT).read_text())
    assert report["optimizer_states"] > 0 and report["accelerate_states"] == 0, report


def test_fsdp_checkpoint_holds_the_adapter_and_the_optimizer_state(fsdp_resumed):
    import torch.distributed.checkpoint as dcp
    from peft import PeftModel

    checkpoint = fsdp_resumed / "checkpoints" / checkpoints.name_for(CHECKPOINT_AT)
    assert not (checkpoint / checkpoints.FSDP_MODEL_DIR).exists()
    entries = dcp.FileSystemReader(str(checkpoint / checkpoints.FSDP_OPTIMIZER_DIR)).read_metadata()
    moments = [k for k in entries.state_dict_metadata if "lora_" in k and k.endswith("exp_avg")]
    assert moments, sorted(entries.state_dict_metadata)[:5]
    # The checkpoint's adapter is a plain peft adapter as well.
    base = models.resolve_model_path("tiny-random")
    model = models.load_base_model(base, ModelConfig(name="tiny-random"), QuantConfig(bits=16),
                                   "cpu")
    PeftModel.from_pretrained(model, checkpoint)


def test_fsdp_checkpoint_with_an_empty_adapter_file_is_not_resumed(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    save_file({}, checkpoint / checkpoints.ADAPTER_FILE)  # what peft alone writes under FSDP
    _complete_sharded_checkpoint(checkpoint)
    message = checkpoints.problem(checkpoint)
    assert message.startswith("has no adapter weights") and "\n" not in message
    save_file({"base_model.model.lm_head.weight": torch.zeros(2)},
              checkpoint / checkpoints.ADAPTER_FILE)  # foreign: weights, but no LoRA ones
    assert checkpoints.problem(checkpoint).startswith("has no adapter weights")


def test_fsdp_load_refuses_an_adapter_of_another_shape():
    from qlora_lab.config import LoraConfig

    base = models.resolve_model_path("tiny-random")
    model = models.attach_lora(models.load_base_model(base, ModelConfig(name="tiny-random"),
                                                      QuantConfig(bits=16), "cpu"), LoraConfig())
    saved = checkpoints.fsdp_adapter_tensors(model, model.state_dict())
    assert checkpoints.fsdp_adapter_state(model, saved).keys() == {
        k for k in model.state_dict() if "lora_" in k}
    with pytest.raises(RuntimeError, match="not a weight of this model's adapter"):
        checkpoints.fsdp_adapter_state(model, {**saved, "base_model.model.x.lora_A.weight":
                                               torch.zeros(1)})
    first = next(iter(saved))
    with pytest.raises(RuntimeError, match=r"FSDP adapter load: 1 of \d+ adapter weights"):
        checkpoints.fsdp_adapter_state(model, {k: v for k, v in saved.items() if k != first})


if __name__ == "__main__":  # a rank of a torchrun launch (_launch)
    if len(sys.argv) > 3:
        _fsdp_resume_worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
    else:
        _fsdp_save_worker(Path(sys.argv[1]), sys.argv[2])
