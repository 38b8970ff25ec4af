"""The fast path is the same training, not a different one: losses, gradients and row isolation.

All on the real stack (tiny 4-bit Llama through bitsandbytes and peft on CPU).
"""

import logging
import os
from dataclasses import replace

import pytest
import torch
from conftest import DOLLY_ROWS, tiny_config, write_jsonl

from qlora_lab import fastpath
from qlora_lab.config import with_compile
from qlora_lab.data import IGNORE_INDEX, PackedCollator, PadCollator, pack_examples, pack_stats
from qlora_lab.train import setup_training


def _session(tmp_path, data, **train):
    cfg = tiny_config(tmp_path / "run", data, **train)
    cfg = replace(cfg, lora=replace(cfg.lora, dropout=0.0),
                  data=replace(cfg.data, eval_fraction=0.0))
    return setup_training(cfg)


def _lora_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def _loss_and_grads(session, batch) -> tuple[float, dict]:
    trainer, model = session.trainer, session.model
    model.train()
    model.zero_grad(set_to_none=True)
    # Give LoRA B a nonzero value so gradients reach LoRA A too (B starts at zero).
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.item(), _lora_grads(model)


def _assert_compiled_step_equals_eager(compiled, eager, batch) -> None:
    """The compiled session's loss and LoRA gradients equal the uncompiled one's, compiled
    afresh under training's compiler settings (a graph from an earlier test is not reused)."""
    torch._dynamo.reset()
    with fastpath.compile_settings():
        _loss_and_grads(compiled, batch)  # compiles
        loss_c, grads_c = _loss_and_grads(compiled, batch)
    loss_e, grads_e = _loss_and_grads(eager, batch)
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_uses_the_fast_path_by_default(tmp_path, dolly_file):
    session = _session(tmp_path, dolly_file)
    assert isinstance(session.trainer.data_collator, PackedCollator)
    assert isinstance(session.trainer.head_loss[0], fastpath.SupervisedHeadLoss)
    fused = [m for m in session.model.modules() if isinstance(m, fastpath.FusedSwiGLU)]
    assert len(fused) == session.model.config.num_hidden_layers
    # Adapter names are the plain path's: the swapped MLP keeps its projections' names.
    names = [n for n, _ in session.model.named_parameters() if "lora_A" in n]
    assert any(".mlp.gate_proj.lora_A" in n for n in names)
    # A micro-batch is rows, packed or not: the step holds the recipe's rows.
    assert session.trainer.args.per_device_train_batch_size == session.cfg.train.micro_batch_size
    assert session.data.stats["rows_per_step"] == 4


def test_fast_loss_and_gradients_match_the_plain_path(tmp_path, dolly_file):
    fast = _session(tmp_path / "fast", dolly_file)
    plain = _session(tmp_path / "plain", dolly_file, packing=False, fused_loss=False)
    rows = fast.data.train[:5]
    packed = PackedCollator(fast.tokenizer.pad_token_id, 256)(rows)
    padded = PadCollator(plain.tokenizer.pad_token_id)(rows)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # rows share bins
    fast_loss, fast_grads = _loss_and_grads(fast, packed)
    plain_loss, plain_grads = _loss_and_grads(plain, padded)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-6)
    assert fast_grads.keys() == plain_grads.keys() and fast_grads
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_packing_keeps_rows_whole_and_labels_inside_rows():
    rows = [{"input_ids": list(range(100 + i, 100 + i + n)), "labels": list(range(n))}
            for i, n in enumerate([7, 3, 9, 2, 5, 8, 1, 4])]
    packs = pack_examples(rows, bin_tokens=10)
    assert all(len(p["input_ids"]) <= 10 for p in packs)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(r["input_ids"]) for r in rows)
    seen = []
    for pack in packs:
        pos, ids, labels = pack["position_ids"], pack["input_ids"], pack["labels"]
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b] == list(range(b - a))  # positions restart per row
            assert labels[a] == IGNORE_INDEX  # never predicted from the previous row
            seen.append(ids[a:b])
    assert sorted(map(tuple, seen)) == sorted(tuple(r["input_ids"]) for r in rows)
    assert pack_stats(packs, 10)["pack_fill"] == pytest.approx(39 / (10 * len(packs)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("flatten", [False, True], ids=["bins", "flat"])
def test_attention_never_crosses_rows_in_a_pack(tmp_path, dolly_file, attn, flatten):
    session = _session(tmp_path, dolly_file)
    model, rows = session.model, session.data.train[:6]
    model.config._attn_implementation = attn  # the attention that runs, as loading would set it
    model.eval()
    bin_tokens = max(len(r["input_ids"]) for r in rows) + 8  # several bins, several rows each
    batch = PackedCollator(session.tokenizer.pad_token_id, bin_tokens, flatten=flatten)(rows)
    assert batch["input_ids"].shape[0] == (1 if flatten else len(pack_examples(rows, bin_tokens)))
    assert flatten or batch["input_ids"].shape[0] > 1
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        positions = batch["position_ids"]
        for b in range(packed.shape[0]):
            starts = (positions[b] == 0).nonzero().flatten().tolist() + [positions.shape[1]]
            for start, end in zip(starts, starts[1:]):
                ids = batch["input_ids"][b:b + 1, start:end]
                alone = model(input_ids=ids).logits[0]
                torch.testing.assert_close(packed[b, start:end], alone, rtol=1e-4, atol=1e-4)


def test_flash_attention_packs_each_micro_batch_into_one_row(tmp_path, dolly_file):
    from qlora_lab.train import collator_for

    cfg = with_compile(tiny_config(tmp_path / "run", dolly_file), False)
    flash = replace(cfg, model=replace(cfg.model, attn_implementation="flash_attention_2"))
    assert not collator_for(cfg, 0).flatten and collator_for(flash, 0).flatten
    rows = [{"input_ids": [5] * n, "labels": [7] * n} for n in (200, 150, 120, 90)]
    batch = collator_for(flash, 0)(rows)
    assert batch["input_ids"].shape == (1, 560)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 4 and (batch["labels"][0, starts] == IGNORE_INDEX).all()


def test_packing_does_not_change_which_rows_make_a_step(tmp_path, dolly_file):
    packed = _session(tmp_path / "p", dolly_file, micro_batch_size=3, grad_accum_steps=2)
    padded = _session(tmp_path / "u", dolly_file, micro_batch_size=3, grad_accum_steps=2,
                      packing=False)
    for key in ("rows_per_step", "tokens_per_step", "steps_per_epoch"):
        assert packed.data.stats[key] == padded.data.stats[key]
    assert packed.data.stats["rows_per_step"] == 6
    real = [int(b["num_real_tokens"]) for b in packed.trainer.get_train_dataloader()]
    rows = [int(b["attention_mask"].sum()) for b in padded.trainer.get_train_dataloader()]
    assert real == rows  # same rows in the same micro-batches: same tokens in each


def test_chunked_head_loss_equals_full_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    total, count = fastpath.SupervisedHeadLoss(head, use_liger=False, chunk_tokens=3)(hidden, labels)
    reference = torch.nn.functional.cross_entropy(
        head(hidden[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, reference)
    (g1,) = torch.autograd.grad(total, hidden)
    (g2,) = torch.autograd.grad(reference, hidden)
    torch.testing.assert_close(g1, g2)


def test_tiled_mlp_matches_untiled():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=4,
                                 num_key_value_heads=4))
    whole, tiled = (fastpath.FusedSwiGLU(mlp, use_liger=False, tile_tokens=t) for t in (10**6, 4))
    x = torch.randn(2, 11, 16, requires_grad=True)
    out_whole, out_tiled = whole(x), tiled(x)
    torch.testing.assert_close(out_whole, out_tiled)
    g_whole = torch.autograd.grad(out_whole.square().sum(), [x, mlp.up_proj.weight])
    g_tiled = torch.autograd.grad(out_tiled.square().sum(), [x, mlp.up_proj.weight])
    for a, b in zip(g_whole, g_tiled):
        torch.testing.assert_close(a, b)


def test_offloaded_checkpointing_gives_the_same_gradients(tmp_path, dolly_file):
    on = _session(tmp_path / "on", dolly_file, activation_offload=True)
    off = _session(tmp_path / "off", dolly_file)
    layers = [m for m in on.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func is fastpath.offloaded_checkpoint
                          for m in layers)
    batch = PackedCollator(on.tokenizer.pad_token_id, 256)(on.data.train[:6])
    loss_on, grads_on = _loss_and_grads(on, batch)
    loss_off, grads_off = _loss_and_grads(off, batch)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], msg=name)


def test_offloaded_checkpointing_of_compiled_layers_gives_the_same_gradients(
        tmp_path, dolly_file, monkeypatch):
    """Compiled layers keep the offloaded checkpoint function (place_checkpoints leaves it), and
    the step equals the uncompiled one, on every transformers version: from 5.24 the function
    runs inside the compiled call, where the compiler steps out of it (it reads RNG states)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = _session(tmp_path / "c", dolly_file, activation_offload=True, compile=True)
    eager = _session(tmp_path / "e", dolly_file, activation_offload=True)
    layers = [m for m in compiled.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m._gradient_checkpointing_func is fastpath.offloaded_checkpoint
                          for m in layers)
    batch = PackedCollator(eager.tokenizer.pad_token_id, 256)(eager.data.train[:6])
    _assert_compiled_step_equals_eager(compiled, eager, batch)


def test_compiled_layers_checkpointing_every_2nd_layer_give_the_same_gradients(tmp_path,
                                                                               dolly_file,
                                                                               monkeypatch):
    """`train --budget` may pick checkpointing every n-th layer with train.compile: the compiled
    layers then mix checkpointed and unchecked calls of one compiled forward, each equal to
    the uncompiled step."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = _session(tmp_path / "c", dolly_file, compile=True, checkpoint_every=2)
    eager = _session(tmp_path / "e", dolly_file, checkpoint_every=2)
    flags = [m.gradient_checkpointing for m in compiled.model.modules()
             if type(m).__name__ == "LlamaDecoderLayer"]
    assert flags == [True, False]
    batch = PackedCollator(eager.tokenizer.pad_token_id, 256)(eager.data.train[:6])
    _assert_compiled_step_equals_eager(compiled, eager, batch)


def test_offload_needs_checkpointing(tmp_path, dolly_file):
    from qlora_lab.errors import UserError

    with pytest.raises(UserError, match="train.activation_offload"):
        tiny_config(tmp_path, dolly_file, activation_offload=True, gradient_checkpointing=False)


def test_packed_training_counts_only_real_tokens(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    session = _session(tmp_path, data, max_steps=2, micro_batch_size=3, grad_accum_steps=1,
                       compile=False)
    session.trainer.train()
    rows = sorted(len(r["input_ids"]) for r in session.trainer.train_dataset)
    seen = session.trainer.state.num_input_tokens_seen
    # Two steps of three rows each: between the six shortest and the six longest rows.
    assert sum(rows[:6]) <= seen <= sum(rows[-6:])


def test_floating_point_ops_are_trainers_count(tmp_path, dolly_file):
    """The trainer keeps the parameter count instead of walking the model every micro-batch;
    the FLOPs it reports are still Trainer's 6 x tokens x non-embedding parameters."""
    session = _session(tmp_path, dolly_file)
    params = session.model.num_parameters(exclude_embeddings=True)
    for rows in (2, 5):
        batch = PackedCollator(session.tokenizer.pad_token_id, 256)(session.data.train[:rows])
        expected = 6 * batch["input_ids"].numel() * params
        assert session.trainer.floating_point_ops(batch) == expected > 0


def test_compiled_layers_give_the_same_loss_and_gradients(tmp_path, dolly_file):
    compiled = _session(tmp_path / "c", dolly_file, compile=True)
    eager = _session(tmp_path / "e", dolly_file)
    assert all(getattr(m, "_compiled_call_impl", None) is not None
               for m in compiled.model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    batch = PackedCollator(eager.tokenizer.pad_token_id, 256)(eager.data.train[:6])
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    loss_e, grads_e = _loss_and_grads(eager, batch)
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("inside", "tag_every_op"), [(True, None), (True, True), (False, None)])
def test_compiled_checkpointed_layers_recompute_in_backward_graph(tmp_path, dolly_file,
                                                                   monkeypatch, inside,
                                                                   tag_every_op):
    """Checkpointed and compiled, each layer keeps for backward at most its input beyond what
    an uncompiled checkpointed run keeps (torch 2.11 compiled checkpointing inside the layer
    kept every projection's output: out of 8 GiB on the H200 at 64 rows), and the step equals
    the uncompiled one, on every transformers version.

    Inside the compiled code (torch >= 2.12) the recomputation is part of the compiled backward,
    which recomputes only what backward reads: each projection's 4-bit weight is dequantized
    once in forward, once for its input gradient and once more to recompute, except down_proj's
    (its output is the layer's output, which backward never reads). Around it, the whole
    forward runs again: three times for every projection. `tag_every_op` None is this torch's
    default (a selective-checkpointing context on torch 2.11, a plain checkpoint from 2.12);
    True runs the context on every torch."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled = _session(tmp_path / "c", dolly_file, compile=True, gradient_checkpointing=True)
    where = fastpath.place_checkpoints(compiled.model, inside, tag_every_op)
    assert where.startswith("inside" if inside else "around")
    # Under the context, torch's warning about in-place operators is dropped (the gradients
    # below hold under it), and only that one.
    wrap_log = logging.getLogger("torch._higher_order_ops.wrap")

    def warned(message):
        return wrap_log.filter(wrap_log.makeRecord(wrap_log.name, logging.WARNING, __file__, 0,
                                                   message, None, None))

    if where == "inside (every operator tagged for recomputation)":
        assert not warned("Detected that context_fn is passed to torch.utils.checkpoint under "
                          "torch.compile.")
    assert warned("Detected something else")
    eager = _session(tmp_path / "e", dolly_file, gradient_checkpointing=True)
    layers = [m for m in compiled.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert layers and all(m.gradient_checkpointing for m in layers)
    projections = [m for m in compiled.model.modules() if hasattr(m, "lora_A")]
    assert len(projections) == 7 * len(layers)  # q, k, v, o, gate, up, down
    batch = PackedCollator(eager.tokenizer.pad_token_id, 256)(eager.data.train[:6])
    tokens = batch["input_ids"].numel()

    def activations(session) -> tuple[float, dict, int]:
        """The loss, the gradients and the bytes of activations kept for backward."""
        kept = {}

        def keep(t):
            if t.is_floating_point() and t.numel() >= tokens:  # token-sized, not a weight
                storage = t.untyped_storage()
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss, grads = _loss_and_grads(session, batch)
        return loss, grads, sum(kept.values())

    # Compile here, under training's settings: a layer graph compiled by an earlier test
    # without them (with CSE) would serve this one too (dynamo does not guard on them).
    torch._dynamo.reset()
    with fastpath.compile_settings():
        _loss_and_grads(compiled, batch)  # compiles (tracing runs the ops on fake tensors)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss_c, grads_c, kept_c = activations(compiled)
    dequantized = sum(e.count for e in prof.key_averages()
                      if e.key == "bitsandbytes::dequantize_4bit")
    recomputed = len(projections) - len(layers) if inside else len(projections)
    assert dequantized == 2 * len(projections) + recomputed
    loss_e, grads_e, kept_e = activations(eager)
    # Each layer's input (and the rotary tables, half of one) may be kept by the compiled
    # function itself, where eager checkpointing keeps them out of the hooks' sight.
    hidden = tokens * compiled.model.config.hidden_size * 4
    assert kept_e > 0 and kept_c - kept_e <= (len(layers) + 1) * hidden
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_plain_checkpoint_recomputes_autograd_functions_from_torch_2_12():
    assert not fastpath.compiler_recomputes_autograd_functions("2.11.0+cu130")
    assert fastpath.compiler_recomputes_autograd_functions("2.12.0")
    assert fastpath.compiler_recomputes_autograd_functions("2.13.0+cpu")
    assert fastpath.compiler_recomputes_autograd_functions("2.15.0.dev20261101")


def test_selective_checkpointing_checkpoints_every_nth_layer_with_the_same_gradients(
        tmp_path, dolly_file):
    every = _session(tmp_path / "every", dolly_file, checkpoint_every=2)
    full = _session(tmp_path / "full", dolly_file)
    flags = [m.gradient_checkpointing for m in every.model.modules()
             if type(m).__name__ == "LlamaDecoderLayer"]
    assert flags == [i % 2 == 0 for i in range(len(flags))] and len(flags) == 2
    batch = PackedCollator(full.tokenizer.pad_token_id, 256)(full.data.train[:6])
    loss_e, grads_e = _loss_and_grads(every, batch)
    loss_f, grads_f = _loss_and_grads(full, batch)
    assert loss_e == pytest.approx(loss_f, rel=1e-6)
    for name in grads_f:
        torch.testing.assert_close(grads_e[name], grads_f[name], msg=name)


def test_offloaded_checkpoint_recomputes_under_the_forwards_autocast():
    # The recompute in backward must see the forward's autocast, as torch's checkpoint does;
    # otherwise it runs in fp32 and its gradients differ from the forward it replays.
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    x = torch.randn(4, 16)
    grads = []
    for wrap in (fastpath.offloaded_checkpoint,
                 lambda f, h: checkpoint(f, h, use_reentrant=False)):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = wrap(layer, x.clone().requires_grad_(True))
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("model_type,extra", [
    ("gemma2", {"final_logit_softcapping": 0.5, "head_dim": 8}),  # a small cap: it bites
    ("cohere", {"logit_scale": 0.25}),
    ("granite", {"logits_scaling": 3.0}),
])
def test_fused_head_loss_applies_the_models_own_logit_transform(model_type, extra):
    """The fused loss must equal the model's own loss where the model rescales or caps logits
    (Gemma 2 softcapping, Cohere's logit scale, Granite's divisor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32,
                                  intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    transform = fastpath.logit_transform(model.config)
    assert transform != fastpath.LogitTransform()  # the config's transform was read
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    loss = fastpath.SupervisedHeadLoss(model.get_output_embeddings(), use_liger=False,
                                       chunk_tokens=5, logits=transform)
    states = fastpath.FinalHiddenStates(model)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
        total, count = loss(states.take(), labels)
        # Without the transform the loss differs: the test would catch its absence.
        model(input_ids=ids)
        plain, _ = fastpath.SupervisedHeadLoss(model.get_output_embeddings(),
                                               use_liger=False)(states.take(), labels)
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-5)
    assert abs(float(plain / count) - float(reference)) > 1e-3


@pytest.mark.parametrize("model_type, sizes", [
    ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),  # ln_f
    ("gpt_neox", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 48}),  # final_layer_norm
    ("phi", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48}),  # final_layernorm
])
def test_fused_head_loss_reads_the_decoder_output_whatever_its_norm_is_named(model_type, sizes):
    """train.fused_loss (the default) hooks the decoder's output, so families whose final norm
    is not Llama's `norm` train with it too (GPT-2 was refused) and give the model's own loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    states = fastpath.FinalHiddenStates(model)
    loss = fastpath.SupervisedHeadLoss(model.get_output_embeddings(), use_liger=False,
                                       chunk_tokens=5)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss
        model(input_ids=ids, logits_to_keep=1)  # as the trainer calls it
        total, count = loss(states.take(), labels)
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="decoder did not run"):
        states.take()  # each forward's states are taken once


# --- varlen attention ---------------------------------------------------------------------------


def test_row_bounds_mark_every_row_and_each_bins_padding_tail():
    from qlora_lab.attention import row_bounds

    rows = [{"input_ids": [5] * n, "labels": [7] * n} for n in (6, 3, 5, 2)]
    batch = PackedCollator(0, 10, pad_to_multiple_of=10, row_bounds=True)(rows)
    bounds = batch["cu_seq_lens_q"]
    assert bounds.dtype == torch.int32 and batch["input_ids"].shape == (2, 10)
    assert bounds.tolist() == row_bounds(batch["position_ids"]).tolist()
    lengths = [b - a for a, b in zip(bounds.tolist(), bounds.tolist()[1:])]
    # Bins 6+3 (+1 padding) and 5+2 (+3): each row is a segment, each padding tail one more,
    # and no segment crosses from one bin into the next.
    assert sorted(lengths) == sorted([6, 3, 5, 2, 1, 3])
    assert bounds[0] == 0 and bounds[-1] == 20
    assert all(a // 10 == (b - 1) // 10 for a, b in zip(bounds.tolist(), bounds.tolist()[1:]))


def test_varlen_attention_gives_the_masked_sdpa_loss_and_gradients(tmp_path, dolly_file):
    sdpa = _session(tmp_path / "sdpa", dolly_file)
    cfg = tiny_config(tmp_path / "varlen", dolly_file)
    cfg = replace(cfg, model=replace(cfg.model, attn_implementation="varlen"),
                  lora=replace(cfg.lora, dropout=0.0), data=replace(cfg.data, eval_fraction=0.0))
    varlen = setup_training(cfg)
    assert varlen.trainer.data_collator.row_bounds
    assert varlen.model.config._attn_implementation == "qlora_varlen"
    rows = sdpa.data.train[:5]
    bin_tokens = max(len(r["input_ids"]) for r in rows) + 8  # several bins, several rows each
    batch = PackedCollator(0, bin_tokens, row_bounds=True)(rows)
    assert batch["input_ids"].shape[0] > 1
    loss_v, grads_v = _loss_and_grads(varlen, batch)
    plain = {k: v for k, v in batch.items() if k != "cu_seq_lens_q"}
    loss_s, grads_s = _loss_and_grads(sdpa, plain)
    assert loss_v == pytest.approx(loss_s, rel=1e-5)
    assert grads_v.keys() == grads_s.keys() and grads_v
    for name in grads_v:
        torch.testing.assert_close(grads_v[name], grads_s[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("rows", ["short", "full"])
def test_varlen_says_when_sdpa_needs_no_mask_for_the_rows(tmp_path, dolly_file, caplog, rows):
    # Rows longer than max_seq_len are clipped to it: each then fills its bin alone, where
    # SDPA needs no mask (and measured faster than varlen); short rows share bins.
    data = dolly_file if rows == "short" else write_jsonl(tmp_path / "long.jsonl", [
        dict(r, response=r["response"] + " and so on" * 60) for r in DOLLY_ROWS])
    cfg = tiny_config(tmp_path / "run", data)
    cfg = replace(cfg, model=replace(cfg.model, attn_implementation="varlen"))
    with caplog.at_level(logging.INFO, logger="qlora_lab.train"):
        session = setup_training(cfg)
    lengths = [len(r["input_ids"]) for r in session.data.train + session.data.eval]
    assert (min(lengths) == cfg.data.max_seq_len) == (rows == "full")
    hinted = any("sdpa (the default" in r.getMessage() for r in caplog.records)
    assert hinted == (rows == "full")


def test_varlen_attention_refuses_what_it_cannot_compute(tmp_path, dolly_file):
    from transformers import LlamaConfig

    from qlora_lab.attention import unsupported_by
    from qlora_lab.errors import UserError

    assert unsupported_by(LlamaConfig(), 1024) is None
    assert "sliding window" in unsupported_by(LlamaConfig(sliding_window=512), 1024)
    assert "dropout" in unsupported_by(LlamaConfig(attention_dropout=0.1), 1024)
    cfg = tiny_config(tmp_path / "run", dolly_file, packing=False)
    cfg = replace(cfg, model=replace(cfg.model, attn_implementation="varlen"))
    with pytest.raises(UserError, match="needs packed rows"):
        setup_training(cfg)


# --- fused LoRA projections -----------------------------------------------------------------------


def _project_both_ways(layer, x):
    """(peft's output and grads, the fused function's) for one LoRA-over-4-bit layer."""
    from peft.tuners.lora.bnb import Linear4bit

    results = []
    # peft's own forward (the base class's), then the layer's: fused where it applies.
    for run in (lambda v: Linear4bit.forward(layer, v), lambda v: layer(v)):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = run(xi)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((out.detach(), xi.grad.clone(), grads))
    return results


def test_fused_lora_projection_equals_peft_output_and_gradients(tmp_path, dolly_file):
    from qlora_lab.fusedlora import fusable

    session = _session(tmp_path, dolly_file)
    layer = session.model.get_decoder().layers[0].mlp.up_proj
    assert fusable(layer)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x = torch.randn(3, 7, layer.in_features)
    (out_p, dx_p, g_p), (out_f, dx_f, g_f) = _project_both_ways(layer, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-5, atol=1e-5)
    assert g_f.keys() == g_p.keys() == {"lora_A.default.weight", "lora_B.default.weight"}
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-5, atol=1e-6, msg=name)


def test_joint_gate_up_equals_each_projection_alone(tmp_path, dolly_file):
    """gate and up as one function (adapters in the base matmuls' K, one input gradient)
    give each projection's own output and every gradient; the MLP takes that path."""
    from qlora_lab.fusedlora import project_together

    mlp = _session(tmp_path, dolly_file).model.get_decoder().layers[0].mlp
    assert isinstance(mlp, fastpath.FusedSwiGLU) and mlp.joint_lora
    pair = (mlp.gate_proj, mlp.up_proj)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in pair:
            m.lora_B["default"].weight.normal_(0, 0.05)
    x = torch.randn(3, 7, mlp.gate_proj.in_features)
    results = []
    for run in (lambda v: project_together(pair, v), lambda v: [m(v) for m in pair]):
        for m in pair:
            m.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        outs = run(xi)
        sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() * (i + 1)
            for i, o in enumerate(outs)).backward()
        grads = {f"{i}.{n}": p.grad.clone() for i, m in enumerate(pair)
                 for n, p in m.named_parameters() if p.grad is not None}
        results.append(([o.detach() for o in outs], xi.grad.clone(), grads, outs[0].grad_fn))
    (outs_j, dx_j, g_j, fn_j), (outs_s, dx_s, g_s, fn_s) = results
    assert "LoraJoint4bit" in type(fn_j).__name__ and "LoraLinear4bit" in type(fn_s).__name__
    for a, b in zip(outs_j, outs_s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_j, dx_s, rtol=1e-5, atol=1e-5)
    assert g_j.keys() == g_s.keys() and len(g_j) == 4  # A and B of both
    for name in g_s:
        torch.testing.assert_close(g_j[name], g_s[name], rtol=1e-5, atol=1e-6, msg=name)
    # Anything else (here a plain Linear beside a fused layer) runs each module on its own.
    plain = torch.nn.Linear(x.shape[-1], 5)
    out = project_together((mlp.gate_proj, plain), x)
    torch.testing.assert_close(out[1], plain(x))


def test_attention_q_k_v_run_as_one_group_and_leave_nothing_behind(tmp_path, dolly_file):
    """q, k and v (train.joint_lora) compute in one call when attention asks for q: the step
    equals each projection alone, nothing stays kept after the attention's forward, and a
    member called on another tensor (cross-attention) stops the group, still exact."""
    from qlora_lab.fusedlora import GROUP

    joint = _session(tmp_path / "j", dolly_file)
    alone = _session(tmp_path / "a", dolly_file, joint_lora=False)
    attn = joint.model.get_decoder().layers[0].self_attn
    group, index = getattr(attn.q_proj, GROUP)
    assert index == 0 and [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")] == \
        list(group.modules)
    assert getattr(alone.model.get_decoder().layers[0].self_attn.q_proj, GROUP, None) is None
    batch = PackedCollator(joint.tokenizer.pad_token_id, 256)(joint.data.train[:5])
    seen = []
    hook = attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out.grad_fn))
    loss_j, grads_j = _loss_and_grads(joint, batch)
    hook.remove()
    loss_a, grads_a = _loss_and_grads(alone, batch)
    assert seen and all("LoraJoint4bit" in type(f).__name__ for f in seen)
    assert group.on and group.kept == [None, None, None]
    assert loss_j == pytest.approx(loss_a, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_j[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    x, other = torch.randn(2, 3, attn.q_proj.in_features), torch.randn(2, 5, attn.q_proj.in_features)
    with torch.no_grad():
        q, k, v = attn.q_proj(x), attn.k_proj(other), attn.v_proj(other)
        assert not group.on and group.kept == [None, None, None]
        for out, m, inp in ((q, attn.q_proj, x), (k, attn.k_proj, other), (v, attn.v_proj, other)):
            torch.testing.assert_close(out, m.forward_alone(inp), rtol=1e-5, atol=1e-5)


# 12 and 80 adapter columns: 64 and 128. Compiled, the adapters ride in the base matmuls' K
# (the wide form); uncompiled, each projection accumulates onto its sliced adapter product.
@pytest.mark.parametrize("ranks,compiled", [((4, 8), False), ((40, 40), False), ((4, 8), True)])
def test_joint_projections_with_unequal_ranks_equal_the_formula(tmp_path, dolly_file, ranks,
                                                                compiled):
    """Each adapter lands in its own columns of the padded K, whatever the ranks; compiled
    and uncompiled forms alike."""
    from qlora_lab.fusedlora import ABSMAX, LoraJoint4bit, _dequantize

    mlp = _session(tmp_path, dolly_file).model.get_decoder().layers[0].mlp
    pair = (mlp.gate_proj, mlp.up_proj)
    d_in = mlp.gate_proj.in_features
    torch.manual_seed(0)
    x = torch.randn(2, 5, d_in, requires_grad=True)
    adapters = [(torch.randn(r, d_in, requires_grad=True),
                 torch.randn(m.out_features, r, requires_grad=True), scale)
                for r, m, scale in zip(ranks, pair, (0.5, 2.0))]
    per = []
    for m, (a, b, scale) in zip(pair, adapters):
        per += [m.base_layer.weight, getattr(m, ABSMAX), a, b, scale, None]
    apply = LoraJoint4bit.apply
    if compiled:
        torch._dynamo.reset()
        apply = torch.compile(lambda *args: LoraJoint4bit.apply(*args), fullgraph=True)
    outs = apply(x, 2, *per)
    weights = [_dequantize(m.base_layer.weight, getattr(m, ABSMAX), torch.float32) for m in pair]
    xr = x.detach().clone().requires_grad_(True)
    refs = [xr @ w.t() + scale * (xr @ a.t()) @ b.t() for w, (a, b, scale) in zip(weights, adapters)]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    params = [t for a, b, _ in adapters for t in (a, b)]
    got = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outs)), [x, *params])
    want = torch.autograd.grad(sum((r * (i + 1)).sum() for i, r in enumerate(refs)),
                               [xr, *params])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bitsandbytes operators a region dispatches."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("bitsandbytes::"):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_fused_lora_dequantizes_with_its_block_scales_kept_in_fp32(tmp_path, dolly_file):
    """Double-quantized scales are dequantized once, at build time: a fused forward and
    backward dequantize the weight twice and its scales never, peft's forward does both,
    and the weight comes out bit for bit as bitsandbytes' own dequantize gives it."""
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora.bnb import Linear4bit

    from qlora_lab.fusedlora import ABSMAX, _dequantize, flat_absmax

    session = _session(tmp_path, dolly_file)
    layer = session.model.get_decoder().layers[0].mlp.up_proj
    weight = layer.base_layer.weight
    assert weight.quant_state.nested  # quant.double_quant, the default
    absmax = getattr(layer, ABSMAX)
    assert absmax.dtype == torch.float32 and absmax.numel() == weight.quant_state.absmax.numel()
    assert torch.equal(_dequantize(weight, absmax, torch.float32),
                       bnbf.dequantize_4bit(weight, weight.quant_state))
    assert not any(ABSMAX in k for k in session.model.state_dict())  # never saved
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    with _OpCounter() as fused:
        layer(x).sum().backward()
    with _OpCounter() as plain:
        Linear4bit.forward(layer, x).sum().backward()
    assert fused.counts == {"bitsandbytes::dequantize_4bit": 2}, fused.counts
    assert plain.counts.get("bitsandbytes::dequantize_blockwise", 0) >= 1, plain.counts
    # Without double quantization the scales are fp32 already: nothing is kept.
    assert flat_absmax(torch.zeros(3)) is None


def test_fused_lora_block_scales_follow_a_merge_and_unmerge(tmp_path, dolly_file):
    """peft's merge and unmerge re-quantize the base weight; the kept scales are the new
    weight's, so the fused output is still peft's."""
    from qlora_lab.fusedlora import ABSMAX, flat_absmax

    layer = _session(tmp_path, dolly_file).model.get_decoder().layers[0].mlp.up_proj
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
    before = layer.base_layer.weight
    layer.merge()
    layer.unmerge()
    assert layer.base_layer.weight is not before
    assert torch.equal(getattr(layer, ABSMAX), flat_absmax(layer.base_layer.weight))
    x = torch.randn(2, 5, layer.in_features)
    (out_p, dx_p, _), (out_f, dx_f, _) = _project_both_ways(layer, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-5, atol=1e-5)


def test_fused_lora_leaves_layers_it_cannot_compute_to_peft(tmp_path, dolly_file):
    from qlora_lab.fusedlora import fusable

    dropout = _session(tmp_path / "d", dolly_file)
    cfg = tiny_config(tmp_path / "drop", dolly_file)
    cfg = replace(cfg, lora=replace(cfg.lora, dropout=0.1),
                  data=replace(cfg.data, eval_fraction=0.0))
    with_dropout = setup_training(cfg)
    assert not fusable(with_dropout.model.get_decoder().layers[0].mlp.up_proj)
    layer = dropout.model.get_decoder().layers[0].mlp.up_proj
    with layer.disable_adapters_context() if hasattr(layer, "disable_adapters_context") \
            else dropout.model.disable_adapter():
        assert not fusable(layer)
    assert fusable(layer)
    assert not fusable(dropout.model.get_decoder().layers[0].mlp)  # not a LoRA layer at all


def test_fused_lora_training_step_equals_the_peft_step(tmp_path, dolly_file):
    from qlora_lab.fusedlora import fused_layer_class

    fused = _session(tmp_path / "fused", dolly_file)
    peft_path = _session(tmp_path / "peft", dolly_file, fused_lora=False)
    rows = fused.data.train[:5]
    batch = PackedCollator(fused.tokenizer.pad_token_id, 256)(rows)
    fused_class = fused_layer_class()
    attn_f, attn_p = (s.model.get_decoder().layers[0].self_attn for s in (fused, peft_path))
    # Attention's projections too, not only the MLP's: peft builds them as the fused class.
    assert all(isinstance(getattr(attn_f, n), fused_class) for n in ("q_proj", "k_proj", "o_proj"))
    assert not isinstance(attn_p.q_proj, fused_class)
    loss_f, grads_f = _loss_and_grads(fused, batch)
    loss_p, grads_p = _loss_and_grads(peft_path, batch)
    assert loss_f == pytest.approx(loss_p, rel=1e-6)
    assert grads_f.keys() == grads_p.keys()
    assert any(".mlp." in n for n in grads_f) and any(".self_attn." in n for n in grads_f)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_fused_lora_accumulates_in_place(tmp_path, dolly_file, monkeypatch):
    """Compiled, the adapter's product is added into the base's output (and the input
    gradient) in place: inductor made addmm_ out of place, copying the whole output first."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    layer = _session(tmp_path, dolly_file).model.get_decoder().layers[0].mlp.up_proj
    torch.manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.05)  # else the adapter adds zeros
    x = torch.randn(2, 8, layer.in_features, requires_grad=True)
    compiled = torch.compile(layer)
    _, code = run_and_get_code(lambda: compiled(x).sum().backward())
    assert len(code) == 2  # forward and backward
    for source in code:
        assert "qlora_lab.accumulate_mm" in source and "extern_kernels.addmm(" not in source
    from peft.tuners.lora.bnb import Linear4bit

    eager = x.detach().clone().requires_grad_(True)
    Linear4bit.forward(layer, eager).sum().backward()  # peft's own forward, uncompiled
    torch.testing.assert_close(x.grad, eager.grad, rtol=1e-5, atol=1e-5)


def test_compiled_layers_save_no_dequantized_weight(tmp_path, dolly_file, monkeypatch):
    """Without checkpointing, what a compiled layer keeps for backward holds no dequantized
    weight: CSE had merged forward's and backward's dequantize, and the graph saved the
    result, every layer's weights in the compute dtype (out of memory at 32 rows on the H200)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    session = _session(tmp_path, dolly_file, gradient_checkpointing=False, compile=True,
                       max_steps=1)
    weights = {tuple(m.base_layer.weight.quant_state.shape)
               for m in session.model.modules() if hasattr(m, "lora_A")}
    assert weights
    saved = []

    def keep(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        session.trainer.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    quantized = [s for s in saved if s[1] == torch.uint8]
    assert quantized  # the 4-bit weights are what backward dequantizes again
    dequantized = [s for s in saved if s[0] in weights and s[1].is_floating_point]
    assert not dequantized, dequantized[:4]


@pytest.mark.parametrize("model_type,extra", [
    ("qwen2", {}),  # biases on q/k/v: the fused function adds them
    ("phi3", {"pad_token_id": 258}),  # fused qkv_proj and gate_up_proj: no FusedSwiGLU there
    ("mistral", {"head_dim": 16}),  # head_dim x heads != hidden: q/o projections not square
])
def test_fused_lora_step_equals_peft_on_other_shapes(tmp_path, dolly_file, model_type, extra):
    """Other decoders' projections (biases, fused qkv, non-square attention) go through the
    fused layers too, and a training step gives peft's loss and gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_lab.fusedlora import fused_layer_class
    from qlora_lab.models import build_byte_tokenizer

    base = tmp_path / model_type
    config = AutoConfig.for_model(model_type, vocab_size=272, hidden_size=64,
                                  intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    build_byte_tokenizer().save_pretrained(base)
    sessions = []
    for fused in (True, False):
        cfg = tiny_config(tmp_path / f"run-{fused}", dolly_file, fused_lora=fused)
        cfg = replace(cfg, model=replace(cfg.model, name=str(base)),
                      lora=replace(cfg.lora, dropout=0.0),
                      data=replace(cfg.data, eval_fraction=0.0))
        sessions.append(setup_training(cfg))
    fused_class = fused_layer_class()
    fused_layers = [m for m in sessions[0].model.modules() if isinstance(m, fused_class)]
    assert len(fused_layers) >= 4 * 2  # every targeted projection of both layers
    assert not any(isinstance(m, fused_class) for m in sessions[1].model.modules())
    batch = PackedCollator(sessions[0].tokenizer.pad_token_id, 256)(sessions[0].data.train[:4])
    loss_f, grads_f = _loss_and_grads(sessions[0], batch)
    loss_p, grads_p = _loss_and_grads(sessions[1], batch)
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_f.keys() == grads_p.keys() and any("self_attn" in n for n in grads_f)
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_layers_save_as_plain_peft_layers(tmp_path, dolly_file):
    """The fused layers are peft's own for everything but forward: the same adapter keys, an
    adapter_config.json that names nothing of ours, and weights that give a plain peft model
    the same outputs."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    fused = _session(tmp_path / "fused", dolly_file)
    plain = _session(tmp_path / "peft", dolly_file, fused_lora=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in fused.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    state = get_peft_model_state_dict(fused.model)
    assert state.keys() == get_peft_model_state_dict(plain.model).keys()
    fused.model.save_pretrained(tmp_path / "adapter")
    saved = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert "Fused" not in saved and "custom" not in saved.lower()
    set_peft_model_state_dict(plain.model, state)
    batch = PackedCollator(fused.tokenizer.pad_token_id, 256)(fused.data.train[:3])
    outputs = []
    for session in (fused, plain):
        session.model.eval()
        with torch.no_grad():
            outputs.append(session.model(input_ids=batch["input_ids"],
                                         position_ids=batch["position_ids"]).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("choice", ["flash", "triton"])
def test_varlen_kernel_equals_masked_sdpa_on_the_gpu(kv_heads, choice):
    from qlora_lab import attention

    if choice == "triton" and attention.triton_runs(64, torch.bfloat16):
        pytest.skip(attention.triton_runs(64, torch.bfloat16))
    if attention.choose_kernel(True, choice, 64, torch.bfloat16) is None:
        pytest.skip("torch has no varlen attention kernel")
    torch.manual_seed(0)
    bins, heads, length, dim = 3, 8, 256, 64
    positions = torch.cat([torch.arange(n) for n in (100, 60, 96, 256, 200, 56)]).view(bins, -1)
    bounds = attention.row_bounds(positions).cuda()
    q = torch.randn(bins, heads, length, dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k = torch.randn(bins, kv_heads, length, dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    runs = {}
    for path in ("kernel", "bf16", "fp32"):
        for t in (q, k, v):
            t.grad = None
        if path == "kernel":
            out, _ = attention.varlen_attention(None, q, k, v, None, scaling=dim ** -0.5,
                                                cu_seq_lens_q=bounds)
        else:
            inputs = (q, k, v) if path == "bf16" else (q.float(), k.float(), v.float())
            out = attention._masked_sdpa(*inputs, bounds, dim ** -0.5)
        out.float().pow(2).sum().backward()
        runs[path] = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
    # Against exact (fp32) attention, each element as close as torch's own bf16 SDPA is, within
    # bf16 rounding: kernels that round in different places (the Triton kernels sum a group's
    # dK/dV in fp32 and round once; bf16 SDPA rounds the sums too) differ from each other by a
    # few units in the last place (on the H200: 0.03 in one element of 49,152).
    for got, bf16, exact in zip(runs["kernel"], runs["bf16"], runs["fp32"]):
        allowed = (bf16 - exact).abs() + 2e-2 + 2e-2 * exact.abs()
        assert bool(((got - exact).abs() <= allowed).all()), float((got - exact).abs().max())


def test_bench_loss_check_runs_its_padded_reference_with_sdpa_under_varlen(tmp_path, dolly_file):
    from qlora_lab.bench import loss_check

    cfg = tiny_config(tmp_path / "run", dolly_file)
    cfg = replace(cfg, model=replace(cfg.model, attn_implementation="varlen"))
    session = setup_training(cfg)
    check = loss_check(session.trainer)
    assert check["abs_diff"] < 1e-4 and check["rows"] > 1
    assert session.model.config._attn_implementation == "qlora_varlen"  # restored


def test_train_asks_for_expandable_segments_unless_the_user_chose(monkeypatch):
    from qlora_lab.child import CUDA_ALLOCATOR_ENV
    from qlora_lab.train import allocator_defaults

    (key, value), = CUDA_ALLOCATOR_ENV.items()
    monkeypatch.delenv(key, raising=False)
    allocator_defaults()
    assert os.environ[key] == value == "expandable_segments:True"
    monkeypatch.setenv(key, "max_split_size_mb:64")
    allocator_defaults()
    assert os.environ[key] == "max_split_size_mb:64"


def _saved_bytes(module, x) -> int:
    """Activation bytes autograd keeps for backward in one forward (each storage once; the
    module's own weights and buffers are not activations, however a function holds on to
    them)."""
    state = [*module.parameters(), *module.buffers()]
    weights = {p.untyped_storage().data_ptr() for p in state}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_lora_keeps_no_more_for_backward_than_peft(tmp_path, dolly_file, autocast):
    """The planner's activation terms were measured on peft's LoRA layers; the fused function
    must not keep more (it keeps the input and the r-wide product; under autocast peft also
    keeps 16-bit casts of the fp32 adapter weights)."""
    from qlora_lab.fusedlora import fused_layer_class

    dtype = torch.bfloat16 if autocast else torch.float32
    mlps = []
    for fused in (True, False):
        cfg = tiny_config(tmp_path / str(fused), dolly_file, fused_lora=fused)
        cfg = replace(cfg, quant=replace(cfg.quant, compute_dtype=str(dtype).split(".")[1]),
                      data=replace(cfg.data, eval_fraction=0.0))
        mlps.append(setup_training(cfg).model.get_decoder().layers[0].mlp)
    fused_class = fused_layer_class()
    assert isinstance(mlps[0].up_proj, fused_class) and not isinstance(mlps[1].up_proj, fused_class)
    x = torch.randn(4, 64, mlps[0].gate_proj.in_features, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kept_fused, kept_peft = _saved_bytes(mlps[0], x), _saved_bytes(mlps[1], x)
    assert 0 < kept_fused <= kept_peft
    if autocast:
        assert kept_fused < kept_peft


def _joint_against_fp32(layer, device: str) -> None:
    """gate/up and q/k/v of one decoder layer, each group as one function (bf16 inputs and
    compute, fp32 adapters under bf16 autocast, nonzero adapters), against peft's layers and
    the fp32 arithmetic on the same 4-bit weights: within bf16 rounding in outputs and every
    gradient, outputs no further from fp32 than peft's."""
    from peft.tuners.lora.bnb import Linear4bit

    from qlora_lab.fusedlora import ABSMAX, _dequantize, project_together

    torch.manual_seed(0)

    def exact(group, v):  # fp32 throughout, from the same 4-bit weights
        out = []
        for m in group:
            w = _dequantize(m.base_layer.weight, getattr(m, ABSMAX), torch.float32)
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            out.append(v.float() @ w.t() + m.scaling["default"] * (v.float() @ a.t()) @ b.t())
        return out

    for group in ((layer.mlp.gate_proj, layer.mlp.up_proj),
                  (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)):
        with torch.no_grad():
            for m in group:
                m.lora_B["default"].weight.normal_(0, 0.05)
        x = torch.randn(4, 16, group[0].in_features, dtype=torch.bfloat16, device=device)
        runs = []
        for run in (lambda v, g=group: project_together(g, v),
                    lambda v, g=group: [Linear4bit.forward(m, v) for m in g], exact):
            for m in group:
                m.zero_grad(set_to_none=True)
            xi = x.detach().clone().requires_grad_(True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=run is not exact):
                outs = run(group, xi) if run is exact else run(xi)
            sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
            grads = [p.grad for m in group for p in m.parameters() if p.grad is not None]
            runs.append(([o.float() for o in outs] + [xi.grad.float()] + grads, outs[0].grad_fn))
        (joint, fn), (peft, _), (ref, _) = runs
        assert "LoraJoint4bit" in type(fn).__name__
        assert len(joint) == len(peft) == len(ref) == 1 + 3 * len(group)  # outs, dx, A and B
        for i, (j, p, r) in enumerate(zip(joint, peft, ref)):
            scale = r.abs().max()
            err_joint, err_peft = (j - r).abs().max() / scale, (p - r).abs().max() / scale
            assert err_joint < 1.5e-2, (i, float(err_joint))  # a few bf16 roundings
            # Outputs: two roundings (the adapter's product, then the base accumulated onto
            # it; compiled, one), where peft rounds three times.
            if i < len(group):
                assert err_joint <= err_peft, (i, float(err_joint), float(err_peft))


def test_joint_projections_under_bf16_autocast_stay_within_bf16_rounding(tmp_path, dolly_file):
    """As on a GPU, on the CPU (the bench's loss check runs with B = 0, where adapters add
    nothing): see _joint_against_fp32."""
    cfg = tiny_config(tmp_path / "run", dolly_file)
    cfg = replace(cfg, quant=replace(cfg.quant, compute_dtype="bfloat16"),
                  data=replace(cfg.data, eval_fraction=0.0))
    _joint_against_fp32(setup_training(cfg).model.get_decoder().layers[0], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_joint_projections_on_the_gpu_stay_within_bf16_rounding(tmp_path, dolly_file):
    """The same on CUDA: cuBLAS's bf16 matmuls, bitsandbytes' CUDA dequantize."""
    cfg = tiny_config(tmp_path / "run", dolly_file, device="cuda")
    cfg = replace(cfg, quant=replace(cfg.quant, compute_dtype="bfloat16"),
                  data=replace(cfg.data, eval_fraction=0.0))
    layer = setup_training(cfg).model.get_decoder().layers[0]
    assert layer.mlp.gate_proj.base_layer.weight.device.type == "cuda"
    _joint_against_fp32(layer, "cuda")


def test_fused_lora_under_bf16_autocast_matches_peft_within_bf16_rounding(tmp_path, dolly_file):
    """As on a GPU: bf16 inputs and compute dtype, bf16 autocast around fp32 adapters. Output
    and input gradient in bf16, the adapters' gradients in fp32, within bf16 rounding."""
    cfg = tiny_config(tmp_path / "run", dolly_file)
    cfg = replace(cfg, quant=replace(cfg.quant, compute_dtype="bfloat16"),
                  data=replace(cfg.data, eval_fraction=0.0))
    layer = setup_training(cfg).model.get_decoder().layers[0].mlp.down_proj
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    x = torch.randn(2, 9, layer.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out_p, dx_p, g_p), (out_f, dx_f, g_f) = _project_both_ways(layer, x)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_p, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx_f.float(), dx_p.float(), rtol=2e-2, atol=2e-2)
    for name in g_p:
        assert g_f[name].dtype == g_p[name].dtype == torch.float32
        torch.testing.assert_close(g_f[name], g_p[name], rtol=3e-2, atol=3e-2, msg=name)


def test_fused_lora_leaves_mixed_dtypes_to_peft(tmp_path, dolly_file):
    """fp32 base compute under bf16 autocast: peft adds an fp32 base to a bf16 adapter; the
    fused function would do both in one dtype, so it hands the layer to peft unchanged."""
    from peft.tuners.lora.bnb import Linear4bit

    from qlora_lab.fusedlora import applies

    layer = _session(tmp_path, dolly_file).model.get_decoder().layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not applies(layer, x)
        assert torch.equal(layer(x), Linear4bit.forward(layer, x))


@pytest.mark.parametrize("attn", ["sdpa", "varlen"])
def test_compiled_layers_trace_whole_with_fused_lora_and_varlen(tmp_path, dolly_file, attn):
    """A graph break inside a compiled decoder layer splits it into pieces with eager Python
    between them, in every layer, every step (varlen's kernel setup once broke it that way)."""
    import torch._dynamo

    cfg = tiny_config(tmp_path / "run", dolly_file, compile=True)
    cfg = replace(cfg, model=replace(cfg.model, attn_implementation=attn),
                  data=replace(cfg.data, eval_fraction=0.0), lora=replace(cfg.lora, dropout=0.0))
    session = setup_training(cfg)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rows = session.data.train[:5]
    batch = session.trainer.data_collator(rows)
    assert ("cu_seq_lens_q" in batch) == (attn == "varlen")
    with fastpath.compile_settings():  # as Trainer.train runs it (QloraTrainer.train)
        _loss_and_grads(session, batch)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    assert not breaks, breaks
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("checkpointing", [True, False])
def test_compiled_layers_compile_once_per_grad_mode(tmp_path, dolly_file, checkpointing,
                                                    monkeypatch):
    """Each compilation of a decoder layer costs tens of seconds on a GPU, inside the first
    steps. With the bin count changing from batch to batch, training should compile twice (the
    first shape, then one graph with a dynamic bin count) and evaluation once more (no grad),
    whatever layer a call comes from. The first layer's input once differed from the rest in
    requires_grad (peft marks it under no_grad too; nothing marks it without checkpointing),
    which doubled every count."""
    import torch._dynamo

    # Inductor's on-disk graph cache keeps the guards of graphs compiled by earlier processes
    # (an earlier version of this code): count this code's compilations only.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    session = _session(tmp_path, dolly_file, compile=True,
                       gradient_checkpointing=checkpointing)
    # Eager layers tile the MLP above 2 x 300 tokens here: the 4-bin batch is above, the 2-bin
    # one below. Compiled layers never tile, and reading the token count to decide so once
    # left a guard on it that recompiled every layer (the H200's 160-row runs, step 8).
    for module in session.model.modules():
        if isinstance(module, fastpath.FusedSwiGLU):
            module.tile_tokens = 300
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    rows = session.data.train
    # 4, 3 and 2 bins (dynamo specializes a dimension of 1: one bin would be a graph of its own)
    batches = [session.trainer.data_collator(rows[:n]) for n in (12, 8, 5)]
    assert len({b["input_ids"].shape[0] for b in batches}) == 3, "bin counts must differ"
    with fastpath.compile_settings():  # as Trainer.train runs it (QloraTrainer.train)
        for batch in batches:
            _loss_and_grads(session, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    session.model.eval()
    with torch.no_grad():
        for batch in batches:
            session.model(**{k: v for k, v in batch.items() if k != "num_real_tokens"})
    # transformers < 5.24 checkpointing inside compiled code: training compiled the checkpoint
    # function, evaluation compiles the layer's own call, from a static shape.
    apart = checkpointing and fastpath.checkpoints_outside_compiled_layers()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3 + apart


# --- CUDA graphs (train.cuda_graphs) ----------------------------------------------------------


def test_cuda_graphs_refuse_multi_gpu_runs(tmp_path, dolly_file, monkeypatch):
    from qlora_lab.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config(tmp_path / "run", dolly_file, compile=True, cuda_graphs=True,
                      gradient_checkpointing=False)
    with pytest.raises(UserError, match=r"train\.cuda_graphs = true is for one process "
                                        r"\(WORLD_SIZE is 2\)"):
        setup_training(cfg)


def test_cuda_graphs_need_compiled_layers():
    from qlora_lab.config import TrainConfig
    from qlora_lab.errors import UserError

    # (on CPU, tests/test_fuzz.py::test_inconsistent_choices: "needs CUDA", nothing written)
    with pytest.raises(UserError, match=r"train\.cuda_graphs = True .*train\.compile is true"):
        TrainConfig(compile=False, cuda_graphs=True, gradient_checkpointing=False)
    with pytest.raises(UserError, match=r"train\.cuda_graphs = True .*gradient_checkpointing"):
        TrainConfig(compile=True, cuda_graphs=True)
    assert TrainConfig(compile=True, cuda_graphs=True, gradient_checkpointing=False).cuda_graphs


_PRODUCED: list[int] = []  # where each backward of _GradAtAddress put its gradient


class _GradAtAddress(torch.autograd.Function):
    """Identity whose backward records where its gradient lives (holding no reference)."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        _PRODUCED.append(grad.data_ptr())
        return grad


def test_the_first_gradient_of_a_step_is_copied_out_of_the_graph_pool():
    # Autograd keeps the first gradient it gets as .grad, storage and all; a backward CUDA
    # graph's output is overwritten by the next replay. With the hook, .grad never shares the
    # produced gradient's storage, and later micro-batches add into it: the sum is exact.
    def accumulate(own: bool):
        weight = torch.nn.Parameter(torch.arange(4.0))
        if own:
            assert fastpath.keep_grads_out_of_graph_pool(torch.nn.ParameterList([weight])) == 1
        _PRODUCED.clear()
        ptrs = []
        for scale in (1.0, 2.0, 3.0):
            (_GradAtAddress.apply(weight) * scale).sum().backward()
            ptrs.append(weight.grad.data_ptr())
        return weight.grad, ptrs, list(_PRODUCED)

    grad, ptrs, produced = accumulate(own=False)
    assert ptrs[0] == produced[0]  # without the hook autograd keeps the produced tensor itself
    grad, ptrs, produced = accumulate(own=True)
    assert ptrs[0] != produced[0] and len(set(ptrs)) == 1  # a copy, then added into in place
    assert torch.equal(grad, torch.full((4,), 6.0))
    weight = torch.nn.Parameter(torch.ones(2))
    fastpath.keep_grads_out_of_graph_pool(torch.nn.ParameterList([weight]))
    weight.grad = None  # what Trainer's zero_grad leaves after a step: the next one copies again
    _PRODUCED.clear()
    _GradAtAddress.apply(weight).sum().backward()
    assert weight.grad.data_ptr() != _PRODUCED[0]


def test_evaluation_inside_training_compiles_without_cuda_graphs(tmp_path, dolly_file):
    # Inductor reads triton.cudagraphs when it compiles a graph: training's graphs compile with
    # the setting, evaluation's (no grad: graphs of their own) without, since CUDA graph trees
    # would overwrite each layer's output with the next layer's replay. Trainer's callbacks run
    # inside each loop, so they see the setting that loop's compilations see.
    import torch._inductor.config as inductor_config
    from transformers import TrainerCallback

    session = setup_training(tiny_config(tmp_path / "run", dolly_file, max_steps=2,
                                         eval_steps=1, save_steps=100))
    trainer = session.trainer
    trainer.cuda_graphs = True  # CPU: nothing is graphed, the settings are what is checked
    seen = {"train": set(), "eval": set()}

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen["train"].add(inductor_config.triton.cudagraphs)

        def on_prediction_step(self, args, state, control, **kwargs):
            seen["eval"].add(inductor_config.triton.cudagraphs)

    trainer.add_callback(Recorder())
    trainer.train()
    assert seen == {"train": {True}, "eval": {False}}
    assert inductor_config.triton.cudagraphs is False  # scoped: nothing left behind
