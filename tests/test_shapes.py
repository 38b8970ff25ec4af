"""shapes.py: architectures are read from the module tree; counts equal transformers' own, odd
configs get one line. Every model here is a tiny config built locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from itertools import pairwise

import pytest

from qlora_lab import memory
from qlora_lab.errors import UserError

BASE = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2}


FAMILIES = {
    "llama": BASE,
    "mistral": BASE,
    "qwen2": {**BASE, "tie_word_embeddings": True},  # q/k/v biases, tied head
    "qwen3": {**BASE, "head_dim": 32},  # per-head q/k norms
    "gemma2": {**BASE, "head_dim": 16},  # 4 norms per layer, GeGLU, tied
    "phi3": BASE,  # fused qkv_proj and gate_up_proj
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 128, "bos_token_id": 1,
             "eos_token_id": 2},  # Conv1D layers, LayerNorm, position embeddings
    # fc1 and fc2 in the layer itself (no MLP module), LayerNorm, learned positions (+2 offset)
    "opt": {"vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 96,
            "num_attention_heads": 4, "word_embed_proj_dim": 64, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2},
    "qwen3_moe": {**BASE, "moe_intermediate_size": 32, "num_experts": 4,
                  "num_experts_per_tok": 2, "head_dim": 16},
    "qwen2_moe": {**BASE, "moe_intermediate_size": 32, "num_experts": 4,
                  "num_experts_per_tok": 2, "shared_expert_intermediate_size": 48},
}


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def _config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**FAMILIES.get(model_type, BASE), **overrides})


def _census(model_type: str, **overrides) -> memory.ModelShape:
    from qlora_lab.shapes import census

    return census(_config(model_type, **overrides), model_type)


def _counted(shape: memory.ModelShape) -> int:
    return (shape.linear_params() + shape.linear_bias_params + shape.embedding_params
            + shape.head_params + shape.norm_params + shape.frozen_params + shape.fp32_params)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_meta_count_equals_the_real_models_parameters(model_type):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(_config(model_type))
    assert _counted(_census(model_type)) == sum(p.numel() for p in real.parameters())


@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_config_arithmetic_equals_the_module_tree(model_type):
    arithmetic = memory.ModelShape.from_config(_config(model_type))
    tree = _census(model_type)
    for name in ("linears", "linear_bias_params", "embedding_params", "head_params",
                 "norm_params", "tie_word_embeddings", "qk_norm", "mlp", "norms_per_layer",
                 "norm_kind", "q_dim", "kv_dim"):
        assert getattr(arithmetic, name) == getattr(tree, name), name
    assert sorted(arithmetic.linear_names) == sorted(tree.linear_names)


@pytest.mark.parametrize("preset", ["tinyllama", "smollm2-135m", "tiny-random"])
def test_every_preset_is_counted_as_transformers_builds_it(preset):
    # Full-size shapes on the meta device: no memory, no weights.
    from transformers import AutoConfig

    from qlora_lab.presets import PRESETS
    from qlora_lab.shapes import census

    arch = dict(PRESETS[preset].arch)
    tree = census(AutoConfig.for_model(arch.pop("model_type"), **arch), preset)
    arithmetic = memory.ModelShape.from_config(PRESETS[preset].arch)
    assert _counted(tree) == _counted(arithmetic)
    assert tree.linears == arithmetic.linears
    assert sorted(tree.linear_names) == sorted(arithmetic.linear_names)


@pytest.mark.parametrize("model_type, targets", [
    ("llama", "q_proj,v_proj"), ("qwen2", "down_proj"), ("phi3", "qkv_proj,o_proj"),
    ("gpt2", "c_attn,c_proj"),  # GPT-2's c_proj is both attention's and the MLP's output
    ("qwen2_moe", "gate_proj"),  # the shared expert's and every routed expert's
])
def test_lora_on_named_targets_is_planned_as_train_adapts_them(model_type, targets):
    """The planner's adapters are the trainable parameters models.attach_lora makes (the
    setup `train` uses), name for name; fewer targets plan fewer bytes at the peak."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_lab.config import LoraConfig
    from qlora_lab.models import attach_lora
    from qlora_lab.shapes import adapting

    torch.manual_seed(0)
    lora = LoraConfig(r=8, target_modules=targets)
    model = attach_lora(AutoModelForCausalLM.from_config(_config(model_type)), lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    every, some = _census(model_type), adapting(_census(model_type), lora, model_type)
    assert some.lora_params(8) == trainable
    assert some.lora_params(8) < every.lora_params(8)
    assert some.linears == every.linears  # all of them are still quantized
    step = memory.StepShape(4, 128, lora_r=8, lora_dropout=True)
    assert (memory.estimate_peak_memory(some, step).peak_allocated_bytes
            < memory.estimate_peak_memory(every, step).peak_allocated_bytes)


def test_joint_lora_groups_are_planned_only_where_train_forms_them():
    # fusedlora groups gate/up and q/k/v only where every member is adapted.
    from qlora_lab.config import LoraConfig
    from qlora_lab.shapes import adapting

    shape = _census("llama")
    step = memory.StepShape(4, 128, joint_lora=True, compiled=True, fused_lora=True,
                            lora_dropout=False)
    wide = {t: memory.joint_input_bytes_per_token(
        adapting(shape, LoraConfig(target_modules=t), "llama"), step)
        for t in ("all-linear", "gate_proj,up_proj", "q_proj,k_proj,v_proj",
                  "q_proj,v_proj,up_proj")}
    assert wide["all-linear"] == wide["gate_proj,up_proj"] + wide["q_proj,k_proj,v_proj"]
    assert wide["gate_proj,up_proj"] > 0 and wide["q_proj,k_proj,v_proj"] > 0
    assert wide["q_proj,v_proj,up_proj"] == 0


def test_a_preset_plans_named_targets_like_its_module_tree():
    from qlora_lab.config import LoraConfig
    from qlora_lab.shapes import adapting

    lora = LoraConfig(target_modules="q_proj,k_proj,v_proj,o_proj")
    arithmetic = adapting(memory.ModelShape.from_config(_config("llama")), lora, "llama")
    assert arithmetic.adapted == adapting(_census("llama"), lora, "llama").adapted
    assert adapting(_census("llama"), LoraConfig(), "llama").adapted is None  # all-linear


@pytest.mark.parametrize("targets", ["q_proj,nope", "lm_head", "self_attn.q_proj"])
def test_a_target_no_linear_has_is_refused_by_plan_as_train_refuses_it(targets, tmp_path):
    # Names are last components (peft's suffix match of a list); lm_head is no adapted linear.
    _config("llama").save_pretrained(tmp_path)
    proc = _cli("plan", "--model", str(tmp_path), "--set", f"lora.target_modules={targets}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    wrong = [t for t in targets.split(",") if t != "q_proj"]
    assert f"lora.target_modules names {', '.join(wrong)}, which match no linear" in error
    assert "down_proj, gate_proj, k_proj" in error


def test_an_architecture_without_sdpa_is_planned_with_the_eager_attention_it_loads_with():
    # transformers 5.x has no SDPA path for Gemma 2: models.attention_for loads it eager.
    gemma, llama = _census("gemma2"), _census("llama")
    assert not gemma.sdpa and llama.sdpa
    step = memory.StepShape(4, 512)
    eager = replace(step, attn_implementation="eager")
    assert (memory.estimate_peak_memory(gemma, step).peak_allocated_bytes
            == memory.estimate_peak_memory(gemma, eager).peak_allocated_bytes)
    assert (memory.estimate_peak_memory(llama, step).peak_allocated_bytes
            < memory.estimate_peak_memory(llama, eager).peak_allocated_bytes)


def test_learned_position_tables_are_read_from_the_module_tree():
    from transformers import AutoModelForCausalLM

    from qlora_lab.shapes import learned_position_limit

    assert _census("gpt2", n_positions=96).position_limit == 96
    assert all(_census(t).position_limit is None for t in ("llama", "phi3", "qwen3_moe"))
    # A table of no rows reads no row: refused, not planned as unlimited.
    assert _census("gpt2", n_positions=0).position_limit == 0
    from qlora_lab.shapes import check_position_limit
    with pytest.raises(UserError, match="learned position table has no rows"):
        check_position_limit(0, 16, "gpt2")
    # OPT's table has two rows of offset: its limit is the config's, not the table's size.
    model = AutoModelForCausalLM.from_config(_config("opt", max_position_embeddings=48))
    assert learned_position_limit(model) == 48 < model.get_decoder().embed_positions.num_embeddings
    opt = _census("opt", max_position_embeddings=48)
    assert opt.position_limit == 48 and opt.mlp == "plain" and opt.intermediate_size == 96


def test_plan_refuses_rows_past_a_learned_position_table(tmp_path):
    _config("gpt2", n_positions=128).save_pretrained(tmp_path)
    fine = _cli("plan", "--model", str(tmp_path), "--json", "--set", "data.max_seq_len=128")
    assert fine.returncode == 0, fine.stderr[-2000:]
    proc = _cli("plan", "--model", str(tmp_path), "--set", "data.max_seq_len=129")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "data.max_seq_len = 129 is past the 128 positions" in error
    assert "set data.max_seq_len to 128 or less" in error


def test_tied_head_is_counted_once():
    tied, untied = _census("qwen2"), _census("qwen2", tie_word_embeddings=False)
    v, h = BASE["vocab_size"], BASE["hidden_size"]
    assert tied.tie_word_embeddings and tied.head_params == 0
    assert not untied.tie_word_embeddings and untied.head_params == v * h
    step = memory.StepShape(2, 64)
    weights = [next(t.bytes for t in memory.estimate_peak_memory(s, step).terms
                    if t.name == "embeddings_lm_head_norms") for s in (tied, untied)]
    assert weights[1] - weights[0] == 2 * v * h


def test_qkv_biases_are_counted():
    shape = _census("qwen2")
    q, kv = shape.q_dim, shape.kv_dim
    assert shape.linear_bias_params == BASE["num_hidden_layers"] * (q + 2 * kv)


def test_fused_projections_and_sliding_windows_are_read_from_the_module_tree():
    # Phi-3's qkv_proj (and GPT-2's c_attn) keep their whole output alive behind the v view.
    assert _census("phi3").fused_qkv and _census("gpt2").fused_qkv
    assert not _census("llama").fused_qkv and not _census("qwen2").fused_qkv
    # Gemma-2 alternates sliding-window layers; Qwen2 names a window it uses in no layer.
    assert _census("gemma2", sliding_window=64).sliding_window == 64
    assert _census("qwen2", sliding_window=64).sliding_window == 0
    assert _census("llama").sliding_window == 0


def test_moe_counts_every_expert_for_weights_and_the_active_ones_for_activations():
    four, eight = _census("qwen3_moe"), _census("qwen3_moe", num_experts=8)
    h, i, layers = BASE["hidden_size"], 32, BASE["num_hidden_layers"]
    assert four.mlp == "moe" and four.experts_per_token == 2 and four.num_experts == 4
    # gate_up (2 x I x H) and down (H x I) per expert, in every layer: 16-bit, not quantized.
    experts = layers * 4 * 3 * h * i
    assert four.expert_params == experts and eight.expert_params == 2 * experts
    step = memory.StepShape(2, 256, fused_loss=True, liger=True)
    act = [memory.layer_saved_bytes_per_token(s, step) for s in (four, eight)]
    assert act[1] - act[0] == 10 * 4  # only the router's logits grow with the expert count
    k4 = _census("qwen3_moe", num_experts_per_tok=4)
    assert memory.layer_saved_bytes_per_token(k4, step) > act[0]


def test_a_30b_moe_counts_all_its_experts():
    # Qwen3-30B-A3B's shape: ~30.5B parameters, ~3B active; its experts stay 16-bit.
    shape = _census("qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                    num_key_value_heads=4, num_experts=128, num_experts_per_tok=8,
                    head_dim=128)
    assert 30e9 < _counted(shape) < 31e9
    assert 2.5e9 < shape.active_params() < 4e9
    plan = memory.estimate_peak_memory(shape, memory.StepShape(1, 1024, fused_loss=True))
    assert plan.peak_allocated_bytes > 55 * memory.GIB  # not "fits 24GiB"


def test_gpt2_is_counted_with_its_conv1d_layers():
    shape = _census("gpt2")
    h = 64
    # c_attn (H -> 3H), c_proj (H -> H), c_fc (H -> 4H), mlp c_proj (4H -> H), per layer.
    assert set(shape.linears) == {(h, 3 * h, 2), (h, h, 2), (h, 4 * h, 2), (4 * h, h, 2)}
    assert shape.mlp == "plain" and shape.norm_kind == "layer"
    assert shape.final_norm  # ln_f, the decoder's last norm, whatever its name
    assert shape.embedding_params == 128 * h + 1024 * h  # tokens + positions
    plain = memory.estimate_peak_memory(shape, memory.StepShape(2, 128))
    assert plain.peak_allocated_bytes > 0
    # train's fused loss reads the decoder's output (GPT-2's too): planned as train runs it,
    # its loss never holds the N x V logits the model's own loss does.
    fused = memory.estimate_peak_memory(shape, memory.StepShape(2, 128, fused_loss=True))
    loss = {t.name: t.bytes for t in (*plain.terms, *fused.terms) if "loss" in t.name}
    assert 0 < loss["supervised_head_loss"] < loss["logits_and_loss"]


@pytest.mark.parametrize("model_type, fragment", [
    ("mamba", "MambaMixer"),
    ("falcon_h1", "FalconH1Mixer"),
    ("bert", "does not model"),
    ("t5", "cannot build"),
])
def test_architectures_it_cannot_count_are_refused_in_one_line(model_type, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        _census(model_type)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3_moe", "gemma2", "mamba", "t5"])
def test_plan_cli_gives_a_number_or_one_line_never_a_traceback(model_type, tmp_path):
    _config(model_type).save_pretrained(tmp_path)  # config.json alone: plan loads no weights
    proc = _cli("plan", "--model", str(tmp_path), "--json", "--set", "train.fused_loss=false")
    assert "Traceback" not in proc.stderr
    if proc.returncode == 0:
        assert json.loads(proc.stdout)["peak_allocated_bytes"] > 0
    else:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr


@pytest.mark.parametrize("change, fragment", [
    ({"num_attention_heads": 0}, "config.json"),  # transformers' own check divides by it
    ({"hidden_size": 66}, "not a multiple of the number of attention heads"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    ({"hidden_size": 0}, "hidden_size = 0"), ({"vocab_size": 0}, "vocab_size = 0"),
    ({"intermediate_size": -1}, "intermediate_size = -1"),
    ({"num_key_value_heads": 3}, "num_key_value_heads = 3, which does not divide"),
])
def test_a_config_no_model_can_have_is_one_line(tmp_path, change, fragment):
    import json as json_module

    values = {**_config("llama").to_dict(), **change}
    (tmp_path / "config.json").write_text(json_module.dumps(values))
    proc = _cli("plan", "--model", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert fragment in error, error


@pytest.mark.parametrize("content", [b"not a gguf\n", b"GGUF\x03\x00\x00\x00"])
def test_a_file_that_is_not_gguf_is_one_line(tmp_path, content):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(content)
    proc = _cli("plan", "--model", str(fake))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert f"cannot read {fake} as a GGUF model" in error


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "qwen3_moe", "gpt2"])
@pytest.mark.parametrize("field, values", [("seq_len", [256, 512, 1024, 4096, 16384]),
                                           ("micro_batch_size", [1, 2, 4, 16, 64]),
                                           ("lora_r", [8, 16, 64, 128])])
@pytest.mark.parametrize("strategy", [{}, {"gradient_checkpointing": False},
                                      {"checkpoint_every": 2}, {"activation_offload": True}])
def test_totals_grow_for_every_family(model_type, field, values, strategy):
    shape = _census(model_type)
    fused = model_type != "gpt2"
    base = memory.StepShape(4, 1024, fused_loss=fused, liger=fused, packed=True,
                            lora_dropout=False, **strategy)
    peaks = [memory.estimate_peak_memory(shape, replace(base, **{field: v})).peak_allocated_bytes
             for v in values]
    assert all(a < b for a, b in pairwise(peaks)), peaks


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def test_attention_loads_as_the_planner_counts_it(tmp_path):
    """models.attention_for: sdpa where transformers has it, eager where it has not (Gemma 2
    on transformers 5.2x; both are read from the installed classes, as census reads them);
    varlen, which runs through SDPA, is refused where SDPA is missing."""
    from qlora_lab.config import ModelConfig
    from qlora_lab.models import attention_for

    for model_type in ("llama", "gemma2"):
        _config(model_type).save_pretrained(tmp_path / model_type)
        path = str(tmp_path / model_type)
        loaded = attention_for(path, ModelConfig(name=path))
        assert loaded == ("sdpa" if _census(model_type).sdpa else "eager")
        assert attention_for(path, ModelConfig(name=path, attn_implementation="eager")) == "eager"
        if _census(model_type).sdpa:
            assert attention_for(path, ModelConfig(name=path, attn_implementation="varlen")) \
                == "sdpa"
        else:
            with pytest.raises(UserError, match="set model.attn_implementation to eager"):
                attention_for(path, ModelConfig(name=path, attn_implementation="varlen"))
