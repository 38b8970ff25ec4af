"""memory.py, one step's arithmetic: hand-checked weight bytes, monotonic estimates, each
term's rule, and the committed H200 peaks re-predicted by this planner."""

import itertools
import json
from dataclasses import replace

import pytest
from conftest import REPO, benchmark_module, committed_result

from qlora_lab import memory
from qlora_lab import plan as plan_module
from qlora_lab.memory import ModelShape, StepShape, estimate_peak_memory, parse_bytes
from qlora_lab.models import PRESETS

TINYLLAMA = ModelShape.from_config(PRESETS["tinyllama"].arch)
STEP = StepShape(micro_batch_size=4, seq_len=1024)


def _term(plan, name):
    return next(t.bytes for t in plan.terms if t.name == name)


def test_weight_bytes_match_hand_computation():
    # TinyLlama: per layer q,o 2048x2048, k,v 2048x256, gate,up,down 2048x5632; 22 layers.
    linear = 22 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632)
    assert TINYLLAMA.linear_params() == linear == 968_884_224
    plan = estimate_peak_memory(TINYLLAMA, STEP)
    # NF4: half a byte per weight, + 1 B absmax per 64 weights + 4 B per 64*256 (double quant).
    assert _term(plan, "quantized_linear_weights") == linear // 2 + linear // 64 + 4 * linear // 16384
    no_dq = estimate_peak_memory(TINYLLAMA, replace(STEP, double_quant=False))
    assert _term(no_dq, "quantized_linear_weights") == linear // 2 + 4 * linear // 64
    # Embeddings and lm_head (untied) and 45 norms in bf16, not upcast.
    assert _term(plan, "embeddings_lm_head_norms") == 2 * (2 * 32000 * 2048 + 45 * 2048)
    sixteen = estimate_peak_memory(TINYLLAMA, replace(STEP, bits=16))
    assert _term(sixteen, "linear_weights_16bit") == 2 * linear
    # LoRA r=16 on all 7 projections: r * (in + out) each.
    lora = 22 * 16 * (2 * 4096 + 2 * 2304 + 3 * 7680)
    assert _term(plan, "lora_weights") == 4 * lora  # fp32 masters
    # Gradients are allocated layer by layer in backward: at its worst moment (the first layer
    # it meets) one layer's worth exists.
    assert _term(plan, "lora_grads") == 4 * lora // 22
    bf16 = estimate_peak_memory(TINYLLAMA, replace(STEP, lora_bytes=2))
    assert _term(bf16, "lora_weights") == 2 * lora


def test_tied_embeddings_are_counted_once():
    smol = ModelShape.from_config(PRESETS["smollm2-135m"].arch)
    plan = estimate_peak_memory(smol, STEP)
    assert _term(plan, "embeddings_lm_head_norms") == 2 * (49152 * 576 + 61 * 576)


@pytest.mark.parametrize("field, values", [
    ("seq_len", [128, 256, 512, 1024, 2048, 4096]),
    ("micro_batch_size", [1, 2, 4, 8, 16, 32]),
    ("lora_r", [4, 8, 16, 32, 64, 128]),
])
@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("preset", ["tinyllama", "smollm2-135m", "tiny-random"])
def test_estimate_rises_monotonically(field, values, checkpointing, preset):
    shape = ModelShape.from_config(PRESETS[preset].arch)
    peaks = [estimate_peak_memory(shape, replace(STEP, gradient_checkpointing=checkpointing,
                                                 **{field: v})).peak_allocated_bytes
             for v in values]
    assert all(a < b for a, b in itertools.pairwise(peaks)), peaks


def test_checkpointing_and_4bit_save_memory():
    base = estimate_peak_memory(TINYLLAMA, STEP).peak_allocated_bytes
    assert estimate_peak_memory(TINYLLAMA, replace(STEP, gradient_checkpointing=False)
                                ).peak_allocated_bytes > base
    assert estimate_peak_memory(TINYLLAMA, replace(STEP, bits=16)).peak_allocated_bytes > base


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("8g", 8 * 2**30),
                                            ("7.5GB", int(7.5 * 2**30)), ("512MiB", 2**29)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_per_gpu_memory_under_ddp_and_fsdp():
    one = estimate_peak_memory(TINYLLAMA, STEP)
    ddp = estimate_peak_memory(TINYLLAMA, replace(STEP, gpus=2, strategy="ddp"))
    # DDP: a full replica plus all-reduce buckets the size of all the LoRA gradients.
    assert (ddp.peak_allocated_bytes - one.peak_allocated_bytes
            == 4 * TINYLLAMA.lora_params(16))
    fsdp = [estimate_peak_memory(TINYLLAMA, replace(STEP, gpus=n, strategy="fsdp"))
            for n in (2, 4, 8)]
    assert all(a.peak_allocated_bytes > b.peak_allocated_bytes for a, b in itertools.pairwise(fsdp))
    # The packed codes shard; the absmax constants (quant_state, not a parameter) do not.
    packed = TINYLLAMA.linear_params() // 2
    consts = _term(one, "quantized_linear_weights") - packed
    assert _term(fsdp[0], "quantized_linear_weights") == packed // 2 + consts
    # The root unit (embeddings, lm_head) stays gathered through forward and backward.
    assert (_term(fsdp[0], "embeddings_lm_head_norms")
            == _term(one, "embeddings_lm_head_norms") * 3 // 2)
    assert fsdp[0].peak_allocated_bytes < one.peak_allocated_bytes


def _tinyllama_shape():
    from transformers import LlamaConfig

    from qlora_lab.models import PRESETS

    return memory.ModelShape.from_config(LlamaConfig(**PRESETS["tinyllama"].arch))


def test_fast_path_terms_shrink_the_loss_and_offload_the_checkpoints():
    model = _tinyllama_shape()
    plain = memory.estimate_peak_memory(model, memory.StepShape(4, 1024))
    fused = memory.estimate_peak_memory(model, memory.StepShape(4, 1024, fused_loss=True,
                                                                liger=True))
    assert fused.peak_allocated_bytes < plain.peak_allocated_bytes
    # Without Liger the chunked loss holds one chunk's logits whatever N is.
    chunked = [_term(memory.estimate_peak_memory(model, memory.StepShape(
        mb, 1024, fused_loss=True)), "supervised_head_loss") for mb in (4, 8, 16)]
    plain_loss = [_term(memory.estimate_peak_memory(model, memory.StepShape(mb, 1024)),
                        "logits_and_loss") for mb in (4, 8, 16)]
    assert chunked[2] - chunked[0] < (plain_loss[2] - plain_loss[0]) / 4
    long = {"micro_batch_size": 1, "seq_len": 65536, "fused_loss": True, "liger": True}
    kept = memory.estimate_peak_memory(model, memory.StepShape(**long))
    offloaded = memory.estimate_peak_memory(model, memory.StepShape(**long,
                                                                    activation_offload=True))
    assert offloaded.peak_allocated_bytes < kept.peak_allocated_bytes
    lengths = [16384, 32768, 65536, 131072]
    peaks = [memory.estimate_peak_memory(model, memory.StepShape(
        1, n, fused_loss=True, liger=True, activation_offload=True)).peak_allocated_bytes
        for n in lengths]
    assert peaks == sorted(peaks)


def test_selective_checkpointing_sits_between_full_and_none():
    model = _tinyllama_shape()
    peak = {every: memory.estimate_peak_memory(model, memory.StepShape(
        4, 1024, fused_loss=True, checkpoint_every=every)).peak_allocated_bytes
        for every in (1, 2, 4)}
    none = memory.estimate_peak_memory(model, memory.StepShape(
        4, 1024, fused_loss=True, gradient_checkpointing=False)).peak_allocated_bytes
    assert peak[1] < peak[2] < peak[4] < none
    slow = plan_module.predicted_throughput(model, memory.StepShape(4, 1024, checkpoint_every=1))
    fast = plan_module.predicted_throughput(model, memory.StepShape(4, 1024, checkpoint_every=4))
    assert fast > slow  # less recomputation


def test_packed_reserve_ratio_covers_every_measured_fast_path_run():
    """Reserved/allocated of the 47 packed CUDA runs in the committed H200 lab report
    (benchmarks/results/reserved_ratio_fastpath.json) stays within the ratio the budget search
    assumes for packed runs."""
    result = committed_result("reserved_ratio_fastpath.json")
    assert result["runs"] >= 40 and len(result["points"]) == result["runs"]
    report = json.loads((REPO / result["source"]).read_text())  # still the report it was read from
    for point in result["points"]:
        run = report["runs"][point["run"]]
        assert (run["peak_allocated_bytes"], run["peak_reserved_bytes"]) == (
            point["peak_allocated_bytes"], point["peak_reserved_bytes"])
    assert 1.0 <= result["min_ratio"] <= result["max_ratio"] <= memory.RESERVED_OVER_ALLOCATED_PACKED


def test_packed_runs_reserve_less_and_tiles_only_eager_layers():
    model = _tinyllama_shape()
    padded = memory.estimate_peak_memory(model, memory.StepShape(4, 1024))
    packed = memory.estimate_peak_memory(model, memory.StepShape(4, 1024, packed=True))
    assert packed.peak_allocated_bytes == padded.peak_allocated_bytes
    assert packed.peak_reserved_bytes < padded.peak_reserved_bytes
    # 32 x 1,024 tokens is above two 8,192-token MLP tiles: eager layers hold one tile's MLP,
    # compiled layers are counted whole, and below two tiles nothing changes.
    big = {"micro_batch_size": 32, "seq_len": 1024, "fused_loss": True, "packed": True}
    eager = memory.estimate_peak_memory(model, memory.StepShape(**big))
    compiled = memory.estimate_peak_memory(model, memory.StepShape(**big, compiled=True))
    assert eager.peak_allocated_bytes < compiled.peak_allocated_bytes
    small = {**big, "micro_batch_size": 16}
    assert (memory.estimate_peak_memory(model, memory.StepShape(**small)).peak_allocated_bytes
            == memory.estimate_peak_memory(model, memory.StepShape(**small, compiled=True))
            .peak_allocated_bytes)


def test_liger_loss_chunk_follows_liger_kernels_rule():
    # liger_kernel/ops/fused_linear_cross_entropy.py's own example: BT = 16,384, V = 32,000,
    # H = 4,096 -> ceil(V / H) = 8 -> 2,048-row chunks; rounded up to a power of two, <= BT.
    shape = ModelShape(32000, 4096, 11008, 1, 32, 32)
    assert memory._loss_chunk_rows(shape, 16384) == 2048
    assert memory._loss_chunk_rows(shape, 100) == 16
    assert memory._loss_chunk_rows(shape, 1) == 1


def test_large_vocabulary_tied_models_hold_no_n_by_v_logits():
    # Qwen2.5-0.5B: V = 151,936 over H = 896. Liger's chunks keep one chunk's logits at about
    # N x H elements; the plain loss would hold 12 B x N x V.
    qwen = ModelShape.from_config({"model_type": "qwen2", "vocab_size": 151936,
                                   "hidden_size": 896, "intermediate_size": 4864,
                                   "num_hidden_layers": 24, "num_attention_heads": 14,
                                   "num_key_value_heads": 2, "tie_word_embeddings": True})
    step = StepShape(16, 1024, fused_loss=True, liger=True, packed=True, lora_dropout=False)
    n, h, v = step.tokens, 896, 151936
    loss = _term(estimate_peak_memory(qwen, step), "fused_linear_cross_entropy")
    assert loss < 2 * 2 * n * h + 8 * n * h  # states, their gradient, final norm, one chunk
    plain = _term(estimate_peak_memory(qwen, replace(step, fused_loss=False)), "logits_and_loss")
    assert plain >= 12 * n * v and loss < plain / 50


def test_fp32_adapters_cost_their_weights_grads_and_casts():
    step = StepShape(4, 1024, gradient_checkpointing=False, lora_dropout=False)
    fp32 = estimate_peak_memory(TINYLLAMA, step)
    bf16 = estimate_peak_memory(TINYLLAMA, replace(step, lora_bytes=2))
    lora = TINYLLAMA.lora_params(16)
    assert _term(fp32, "lora_weights") == 2 * _term(bf16, "lora_weights") == 4 * lora
    # Under bf16 autocast every matmul keeps the 16-bit cast of its fp32 weight for backward.
    assert _term(fp32, "lora_autocast_casts") == 2 * lora and _term(bf16,
                                                                     "lora_autocast_casts") == 0


def test_liger_path_tracks_the_measured_tinyllama_peaks():
    """TinyLlama on an H200 with Liger, LoRA dropout 0, packed Dolly bins (several rows per bin,
    so a block-diagonal mask): fastpath_sweep_h200_run3.json. bf16 adapters then."""
    rows = committed_result("fastpath_sweep_h200_run3.json")["rows"]
    for row in rows:
        sets = dict(s.split("=", 1) for s in row["set"])
        step = StepShape(int(sets.get("train.micro_batch_size", 4)), 1024, lora_bytes=2,
                         lora_dropout=False, fused_loss=True, liger=True, packed=True,
                         checkpoint_every=int(sets.get("train.checkpoint_every", 1)),
                         compiled=sets.get("train.compile") == "true")
        predicted = estimate_peak_memory(TINYLLAMA, step).peak_allocated_bytes
        error = 100 * (predicted - row["peak_allocated_bytes"]) / row["peak_allocated_bytes"]
        # Dolly rows supervise only their answers; the planner assumes every position.
        assert -2.0 < error < 10.0, (row["variant"], error)


# --- the planner against the committed H200 validation (issue #14) -------------------------


def _validation():
    """benchmarks/results/memory_validation_v2.json, every row re-predicted by this planner
    (on the CPU, from each row's config; the measured peaks are the file's)."""
    report = committed_result("memory_validation_v2.json")
    harness = benchmark_module("memory_validation_v2")
    return report, harness.repredict(report), harness.strategy


def _errors(rows, keep) -> dict:
    return {(r["model"], json.dumps(r["config"], sort_keys=True)):
            100 * (r["predicted_bytes"] - r["measured_bytes"]) / r["measured_bytes"]
            for r in rows if r.get("measured_bytes") and keep(r)}


# Held-out families with a known gap, each bounded at what was achieved (NOT the 2 % goal; see
# docs/planner.md, "How accurate it is"):
# - transformers' own gated MLP modules (Gemma-2's GeGLU, Phi-3's fused gate_up), not
#   fastpath.FusedSwiGLU: no fit family exercises that path at the peak; up to 2.3 % (Gemma-2)
#   and 3.4 % (Phi-3) under;
# - Granite's scaled residual stream, modelled (memory.residual_scaled) from a Granite-shaped
#   TinyLlama; its 16-bit-base row (LoRA keeps 16-bit input copies there) is still 3.4 % under.
KNOWN_GAP_FAMILIES = {"gemma2-2b-8l": 5.0, "phi3-mini-8l": 5.0, "granite3-2b-8l": 3.5}


@pytest.fixture(scope="module")
def validation():
    return _validation()


def test_committed_validation_is_the_planners_and_keeps_its_split(validation):
    report, rows, _ = validation
    families = {r["model"] for r in report["rows"]}
    assert len(report["rows"]) >= 40 and len(families) >= 6
    assert len({r["model"] for r in report["rows"] if r["split"] == "fit"}) <= len(families) / 2
    # The committed predictions are this planner's: rescore the file after changing it
    # (python benchmarks/memory_validation_v2.py --rescore ... --out ...).
    stale = [(r["model"], r["config"]) for r, new in zip(report["rows"], rows)
             if r["predicted_bytes"] != new["predicted_bytes"]]
    assert not stale, stale


def test_heldout_max_error_within_5_percent_on_every_strategy(validation):
    _, rows, _ = validation
    errors = _errors(rows, lambda r: r["split"] == "heldout")
    assert len(errors) >= 20
    worst = max(errors.items(), key=lambda kv: abs(kv[1]))
    assert abs(worst[1]) <= 5.0, worst


def test_heldout_under_prediction_within_2_percent_where_every_module_is_modelled(validation):
    """The goal, on every strategy, for the held-out families outside the known gaps
    (Llama-3.2 at 128k vocabulary, and the round-2 Qwen3, Mistral-7B, Gemma-3 and OLMo-2)."""
    _, rows, _ = validation
    errors = _errors(rows, lambda r: r["split"] == "heldout"
                     and r["model"] not in KNOWN_GAP_FAMILIES)
    assert len(errors) >= 25 and len({k[0] for k in errors}) >= 5
    assert all(e >= -2.0 for e in errors.values()), errors


def test_heldout_known_gap_families_under_predict_at_most_what_was_achieved(validation):
    _, rows, _ = validation
    errors = _errors(rows, lambda r: r["model"] in KNOWN_GAP_FAMILIES)
    assert len(errors) >= 15
    assert all(e >= -KNOWN_GAP_FAMILIES[k[0]] for k, e in errors.items()), errors


def test_fit_families_within_2_5_percent_except_compiled_layers(validation):
    _, rows, _ = validation
    errors = _errors(rows, lambda r: r["split"] == "fit"
                     and not r["config"].get("train.compile"))
    assert all(abs(e) <= 2.5 for e in errors.values()), errors


# --- terms for what runs, as the allocator's trace showed them --------------------------------


def test_gradients_peak_at_the_end_of_backward_only_when_they_outgrow_the_activations():
    small = StepShape(1, 256, lora_r=128, fused_loss=True, liger=True)
    plan = estimate_peak_memory(TINYLLAMA, small)
    # A layer's r=128 gradients (4 B each) outweigh its 256-token checkpointed input: the worst
    # moment is the end of backward, all gradients alive, 21 layers' inputs freed by then (the
    # term nets them out; the inputs stay counted in checkpointed_layer_inputs).
    grads, freed_input = 4 * TINYLLAMA.lora_params(128), 256 * 2048 * 2
    assert _term(plan, "lora_grads") == grads - 21 * freed_input
    big = estimate_peak_memory(TINYLLAMA, replace(small, micro_batch_size=16, seq_len=1024))
    assert _term(big, "lora_grads") == 4 * TINYLLAMA.lora_params(128) // 22


def test_paged_8bit_optimizer_keeps_small_tensors_states_in_the_allocator():
    step = StepShape(16, 1024, fused_loss=True, liger=True)
    r16 = _term(estimate_peak_memory(TINYLLAMA, step), "optimizer_state")
    # TinyLlama r=16: every LoRA tensor is under 1e5 elements, so both 8-bit states stay
    # (measured 24.4 MiB); at r=64 most tensors are paged and only their absmax stays.
    assert 24 * 2**20 < r16 < 25 * 2**20
    r64 = _term(estimate_peak_memory(TINYLLAMA, replace(step, lora_r=64)), "optimizer_state")
    assert r64 < r16
    unpaged = _term(estimate_peak_memory(TINYLLAMA, replace(step, optimizer="adamw_8bit")),
                    "optimizer_state")
    assert unpaged >= 2 * TINYLLAMA.lora_params(16)


def test_16bit_base_keeps_a_16bit_copy_of_every_adapted_input():
    step = StepShape(8, 1024, gradient_checkpointing=False, fused_loss=True, liger=True)
    four = memory.layer_saved_bytes_per_token(TINYLLAMA, step)
    sixteen = memory.layer_saved_bytes_per_token(TINYLLAMA, replace(step, bits=16))
    h, i = 2048, 5632
    # + a copy of each of the 7 inputs, - the norm outputs and MLP product LoRA kept before.
    assert sixteen - four == 2 * TINYLLAMA.layer_linear_inputs() - 2 * (2 * h + i)
    # 16-bit adapters are not cast: nothing changes.
    assert (memory.layer_saved_bytes_per_token(TINYLLAMA, replace(step, bits=16, lora_bytes=2))
            == memory.layer_saved_bytes_per_token(TINYLLAMA, replace(step, lora_bytes=2)))


def test_offloaded_recomputation_rebuilds_a_layer_as_checkpointing_does():
    """fastpath._OffloadedCheckpoint recomputes under the forward's autocast (as torch's
    checkpoint does): the rebuilt layer costs what a checkpointed one does, whatever the
    adapters' dtype."""
    step = StepShape(1, 16384, fused_loss=True, liger=True, activation_offload=True)
    offloaded = _term(estimate_peak_memory(TINYLLAMA, step), "recomputed_layer")
    kept = _term(estimate_peak_memory(TINYLLAMA, replace(step, activation_offload=False)),
                 "recomputed_layer")
    assert offloaded == kept
    # Only the layer inputs move: 3 N x H on the GPU instead of one per checkpointed layer.
    on_gpu = _term(estimate_peak_memory(TINYLLAMA, step), "offloaded_layer_inputs")
    assert on_gpu == 3 * 16384 * 2048 * 2


def test_selective_checkpointing_peaks_at_the_last_layer_it_keeps():
    step = StepShape(32, 512, fused_loss=True, liger=True, checkpoint_every=2)
    plan = estimate_peak_memory(TINYLLAMA, step)
    # Layer 21 of 22 is not checkpointed (layers 0, 2, ... are): backward adds its gradients,
    # not a rebuilt copy of its activations.
    assert "layer_backward" in {t.name for t in plan.terms}
    assert "recomputed_layer" not in {t.name for t in plan.terms}
    every3 = estimate_peak_memory(TINYLLAMA, replace(step, checkpoint_every=3))
    assert "recomputed_layer" in {t.name for t in every3.terms}  # 21 = 3 x 7


def test_sliding_window_rows_get_a_mask_from_the_window_on():
    gemma = ModelShape(256000, 2304, 9216, 8, 8, 4, head_dim=256, sliding_window=4096)
    short = estimate_peak_memory(gemma, StepShape(4, 2048, fused_loss=True, short_rows=False))
    long = estimate_peak_memory(gemma, StepShape(4, 4096, fused_loss=True, short_rows=False))
    assert _term(short, "attention_mask") == 0
    assert _term(long, "attention_mask") == 4 * 4096 * 4096 * 3




def test_packed_reserve_ratio_under_expandable_segments_covers_every_measured_run(capsys):
    """Reserved/allocated of the packed H200 runs made since `train` uses expandable segments
    (benchmarks/results/reserved_ratio_expandable.json, read again from the committed result
    files) stays within the ratio the planner assumes for them, and below the one without."""
    result = committed_result("reserved_ratio_expandable.json")
    benchmark_module("reserved_ratio_expandable").main()
    assert json.loads(capsys.readouterr().out) == result  # the files still say what it read
    assert result["runs"] >= 20 and len(result["points"]) == result["runs"]
    assert 1.0 <= result["min_ratio"] <= result["max_ratio"] \
        <= memory.RESERVED_OVER_ALLOCATED_PACKED_EXPANDABLE < memory.RESERVED_OVER_ALLOCATED_PACKED


@pytest.mark.parametrize("env, expandable", [
    ({}, True),  # train sets it
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments: true"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, False),  # the user's choice stands
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, False),
])
def test_the_planner_reads_the_allocator_config_train_will_run_with(env, expandable, monkeypatch):
    from qlora_lab.config import RunConfig
    from qlora_lab.plan import step_shape

    assert memory.expandable_segments(env) is expandable
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    step = step_shape(RunConfig())
    assert step.packed and step.expandable_segments is expandable
    plan = memory.estimate_peak_memory(_tinyllama_shape(), step)
    ratio = (memory.RESERVED_OVER_ALLOCATED_PACKED_EXPANDABLE if expandable
             else memory.RESERVED_OVER_ALLOCATED_PACKED)
    assert plan.peak_reserved_bytes == int(plan.peak_allocated_bytes * ratio)


# --- fused LoRA and scaled residuals (session 19: memory_diagnose_granite_h200.json) -----------


def test_fused_lora_holds_one_input_gradient_where_peft_holds_two():
    """fusedlora writes the down projection's input gradient once; peft holds the base's, the
    adapter's and their sum. With Liger's SiLU-mul the rebuilt layer's worst moment shrinks by
    one N x I tensor, and the weight dequantized beside that gradient counts whole."""
    peft = StepShape(16, 1024, fused_loss=True, liger=True, lora_dropout=False)
    fused = replace(peft, fused_lora=True)
    n, a, i = 16 * 1024, 2, TINYLLAMA.intermediate_size
    per_token = (memory.layer_backward_bytes_per_token(TINYLLAMA, peft)
                 - memory.layer_backward_bytes_per_token(TINYLLAMA, fused))
    assert per_token == a * i
    plan_peft, plan_fused = (estimate_peak_memory(TINYLLAMA, s) for s in (peft, fused))
    assert _term(plan_fused, "dequant_workspace") == TINYLLAMA.largest_linear() * a
    assert _term(plan_peft, "dequant_workspace") == 0  # beyond the gradients it replaces
    assert _term(plan_fused, "recomputed_layer") == _term(plan_peft, "recomputed_layer") - n * a * i
    # Measured on the H200 (16 x 1,024 TinyLlama): 3.41 GiB fused against 3.50 with peft's layers.
    assert 0.07 * 2**30 < plan_peft.peak_allocated_bytes - plan_fused.peak_allocated_bytes \
        < 0.11 * 2**30


def test_peft_computes_the_layers_fused_lora_cannot():
    """Dropout (peft's own forward), 16-bit bases and FSDP keep peft's terms."""
    base = StepShape(16, 1024, fused_loss=True, liger=True, lora_dropout=False)
    for other in (replace(base, lora_dropout=True), replace(base, bits=16),
                  replace(base, gpus=2, strategy="fsdp")):
        assert (memory.layer_backward_bytes_per_token(TINYLLAMA, replace(other, fused_lora=True))
                == memory.layer_backward_bytes_per_token(TINYLLAMA, other))


def test_fused_lora_keeps_no_16bit_casts_of_fp32_adapters():
    step = StepShape(8, 1024, gradient_checkpointing=False, fused_loss=True, liger=True,
                     lora_dropout=False)
    assert _term(estimate_peak_memory(TINYLLAMA, step), "lora_autocast_casts") > 0
    fused = estimate_peak_memory(TINYLLAMA, replace(step, fused_lora=True))
    assert _term(fused, "lora_autocast_casts") == 0


def test_scaled_residual_branches_hold_their_scaled_gradient():
    """Granite multiplies each branch before the residual add: backward holds that gradient
    beside the arriving one (+1 x N x H x 2 B with peft's layers, +2 fused, as measured)."""
    granite = {"model_type": "granite", "vocab_size": 49155, "hidden_size": 2048,
               "intermediate_size": 8192, "num_hidden_layers": 8, "num_attention_heads": 32,
               "num_key_value_heads": 8, "residual_multiplier": 0.22}
    shape = ModelShape.from_config(granite)
    plain = ModelShape.from_config({**granite, "residual_multiplier": 1.0})
    assert shape.residual_scaled and not plain.residual_scaled
    assert not TINYLLAMA.residual_scaled
    step = StepShape(16, 1024, fused_loss=True, liger=True, lora_dropout=False)
    for fused, tensors in ((False, 1), (True, 2)):
        s = replace(step, fused_lora=fused)
        extra = (memory.layer_backward_bytes_per_token(shape, s)
                 - memory.layer_backward_bytes_per_token(plain, s))
        assert extra == tensors * 2 * 2048


def test_the_census_reads_scaled_residuals_from_the_config():
    from transformers import AutoConfig

    from qlora_lab.shapes import census

    config = AutoConfig.for_model("granite", vocab_size=256, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  residual_multiplier=0.22)
    assert census(config, "granite-tiny").residual_scaled
    config.residual_multiplier = 1.0
    assert not census(config, "granite-tiny").residual_scaled


def test_triton_varlen_backward_holds_no_fp32_dq_accumulator_nor_per_head_kv_grads():
    # A narrow MLP, so attention's backward is the layer's worst moment.
    m = ModelShape(32000, 2048, 128, 4, 32, 4)
    flash = StepShape(16, 1024, packed=True, compiled=True, attn_implementation="varlen")
    triton = replace(flash, varlen_triton=True)
    a = flash.compute_bytes
    saved = memory.layer_backward_bytes_per_token(m, flash) \
        - memory.layer_backward_bytes_per_token(m, triton)
    assert saved == 4 * m.q_dim + 2 * a * m.q_dim  # the accumulator and dK/dV per query head
    # heads wider than the Triton kernels' tiles keep FlashAttention-2's backward
    wide = ModelShape(32000, 4096, 1024, 4, 16, 4, head_dim=256)
    assert memory.layer_backward_bytes_per_token(wide, flash) \
        == memory.layer_backward_bytes_per_token(wide, triton)
    # only varlen runs the kernels
    sdpa = replace(flash, attn_implementation="sdpa")
    assert memory.layer_backward_bytes_per_token(m, sdpa) \
        == memory.layer_backward_bytes_per_token(m, replace(sdpa, varlen_triton=True))
