"""Superseded by benchmarks/memory_validation_v2.py (issue #14).

This first harness wired its own model and Trainer instead of calling `train`'s setup, so it
stopped measuring what `train` runs once the fast path existed. Its results stay in
benchmarks/results/memory_validation*.json; `rescore_memory_validation.py` re-predicts them
with the current planner and reads the shapes below. Measure with:

    python benchmarks/memory_validation_v2.py --out benchmarks/results/memory_validation_v2.json
"""

from __future__ import annotations

import sys

ARCHS = {
    "tinyllama": None,  # from the preset
    "smollm2-135m": None,
    # A Qwen2-0.5B-shaped model: tied, very large vocabulary, 2 KV heads, q/k/v biases.
    "qwen2-0.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                             intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2,
                             max_position_embeddings=32768, tie_word_embeddings=True,
                             rope_theta=1000000.0, rms_norm_eps=1e-6),
    "llama3.2-1b-shape": dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                              intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8,
                              max_position_embeddings=8192, tie_word_embeddings=True,
                              rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen2.5-1.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                               intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2,
                               max_position_embeddings=32768, tie_word_embeddings=True,
                               rope_theta=1000000.0, rms_norm_eps=1e-6),
}

if __name__ == "__main__":
    sys.exit("benchmarks/memory_validation.py is superseded: run "
             "benchmarks/memory_validation_v2.py (it measures through train.setup_training)")
