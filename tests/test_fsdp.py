"""FSDP with a 4-bit base: the quant_storage dtype, and how it is chosen.

FSDP flattens each wrapped unit into one tensor of one dtype and casts it to its param dtype, so
bitsandbytes must pack 4-bit codes into that dtype (`bnb_4bit_quant_storage`) instead of uint8.
The invariant that makes this safe: the container changes, the quantized weights do not.
"""

from __future__ import annotations

import pytest
import torch

from qlora_lab import models
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
