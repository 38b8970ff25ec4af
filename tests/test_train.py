import json
import shutil

import pytest
import torch
from conftest import DOLLY_ROWS, tiny_config, write_jsonl
from safetensors.torch import load_file

from qlora_lab.errors import UserError
from qlora_lab.train import run_train, setup_training


def _base_state(model) -> dict:
    """Every non-LoRA tensor, including the packed 4-bit weights and their quant constants."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            state[name] = tensor.detach().clone()
    return state


def test_only_lora_trains_and_4bit_base_is_bit_identical(tmp_path, dolly_file):
    session = setup_training(tiny_config(tmp_path / "run", dolly_file, max_steps=4))
    model = session.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    session.trainer.evaluate()  # an eval pass must not change the stored base either
    before = _base_state(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    session.trainer.train()
    after = _base_state(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    changed = [n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p.detach(), lora_before[n])]
    assert changed  # LoRA B starts at zero, so any step moves it


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", DOLLY_ROWS[:2])
    cfg = tiny_config(tmp_path / "run", data, max_steps=60, micro_batch_size=2,
                      grad_accum_steps=1, learning_rate=2e-2, warmup_ratio=0.0,
                      lr_scheduler="constant", max_grad_norm=0.0, eval_steps=1000,
                      save_steps=1000)
    from dataclasses import replace
    cfg = replace(cfg, data=replace(cfg.data, eval_fraction=0.0),
                  lora=replace(cfg.lora, r=16, alpha=32, dropout=0.0))
    session = setup_training(cfg)
    session.trainer.train()
    losses = [r["loss"] for r in session.trainer.state.log_history if "loss" in r]
    # A random 2-layer model moves slowly through rank-8 adapters alone; a quarter is plenty.
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses


def test_output_layout_and_plain_peft_loading(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for rel in ("config.yaml", "metrics.jsonl", "summary.json", "tokenizer_config.json",
                "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                "checkpoints/checkpoint-3/optimizer.pt", "checkpoints/checkpoint-6/scheduler.pt"):
        assert (trained_run / rel).is_file(), rel
    assert not list(trained_run.rglob("*.bin")) or all(
        p.name == "training_args.bin" for p in trained_run.rglob("*.bin"))
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens_seen"] > 0 and summary["tokens_per_s"] > 0
    for key in ("train_loss", "eval_loss", "eval_loss_before", "peak_host_rss_bytes",
                "wall_seconds"):
        assert summary[key] is not None, key
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Plain transformers + peft load the adapter, given the base it names.
    cfg = json.loads((trained_run / "adapter/adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(trained_run / "adapter"))
    tok = AutoTokenizer.from_pretrained(str(trained_run))
    out = model(**tok("hello", return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, trained_run):
    # An "interrupted" run: only what existed after step 3 was written.
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    shutil.copytree(trained_run / "checkpoints/checkpoint-3", run / "checkpoints/checkpoint-3")
    from dataclasses import replace

    from qlora_lab.config import load_run_config
    cfg = load_run_config(run / "config.yaml")
    cfg = replace(cfg, train=replace(cfg.train, output_dir=str(run)))
    summary = run_train(cfg, resume=True)
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 6
    full = load_file(trained_run / "adapter/adapter_model.safetensors")
    resumed = load_file(run / "adapter/adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    worst = max((full[k] - resumed[k]).abs().max().item() for k in full)
    assert worst <= 1e-6, worst


def test_output_dir_is_never_clobbered(tmp_path, dolly_file, trained_run):
    with pytest.raises(UserError, match="is not empty — pass --resume"):
        setup_training(tiny_config(trained_run, dolly_file))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="no qlora-lab run wrote"):
        setup_training(tiny_config(foreign, dolly_file), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"
    with pytest.raises(UserError, match="output dir .*fresh does not exist"):
        setup_training(tiny_config(tmp_path / "fresh", dolly_file), resume=True)


def test_data_workers_train_on_the_same_batches(tmp_path, dolly_file):
    """A DataLoader worker (train.data_workers) only moves fetching and packing out of the
    training process: the same rows, packed the same, so the same losses and adapter as
    packing in-process."""
    from dataclasses import replace
    results = []
    for workers in (0, 1):
        cfg = tiny_config(tmp_path / f"w{workers}", dolly_file, max_steps=3,
                          micro_batch_size=4, grad_accum_steps=1, eval_steps=1000,
                          save_steps=1000, logging_steps=1)
        cfg = replace(cfg, train=replace(cfg.train, data_workers=workers))
        session = setup_training(cfg)
        assert session.trainer.args.dataloader_num_workers == workers
        session.trainer.train()
        losses = [r["loss"] for r in session.trainer.state.log_history if "loss" in r]
        lora = {n: p.detach().clone() for n, p in session.model.named_parameters()
                if p.requires_grad}
        results.append((losses, lora))
    (losses0, lora0), (losses1, lora1) = results
    assert len(losses0) == 3 and losses1 == losses0
    assert lora0.keys() == lora1.keys()
    for name in lora0:
        assert torch.equal(lora0[name], lora1[name]), name


def test_data_workers_out_of_range_is_one_line_naming_the_key(tmp_path, dolly_file):
    from qlora_lab.config import config_from_dict

    with pytest.raises(UserError, match="train.data_workers"):
        config_from_dict({"train": {"data_workers": -1}})
    with pytest.raises(UserError, match="train.data_workers"):
        config_from_dict({"train": {"data_workers": "two"}})


def test_compile_auto_runs_uncompiled_on_cpu_and_the_run_keeps_auto(tmp_path):
    """`train.compile: auto` (the default) resolves where the run starts: off on CPU. The run
    folder keeps `auto`, so a resume on a GPU host resolves it there."""
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", DOLLY_ROWS)
    cfg = tiny_config(tmp_path / "run", data)
    assert cfg.train.compile == "auto"
    session = setup_training(cfg)
    try:
        assert session.cfg.train.compile is False
        layer = session.model.get_decoder().layers[0]
        assert not hasattr(layer, "_compiled_call_impl") or layer._compiled_call_impl is None
        written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert written["train"]["compile"] == "auto"
    finally:
        if session.lock is not None:
            session.lock.release()


def _tiny_gpt2(folder, n_positions: int):
    """A 2-layer GPT-2 (learned positions, Conv1D projections) with the byte tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qlora_lab.models import build_byte_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300,
                               n_positions=n_positions, bos_token_id=1, eos_token_id=2)
                    ).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def test_rows_past_a_learned_position_table_are_refused_before_training(tmp_path, dolly_file):
    # GPT-2's position table failed on the first longer row, mid-run, with an IndexError.
    from dataclasses import replace

    from conftest import check_outcome

    base = _tiny_gpt2(tmp_path / "gpt2", n_positions=64)
    long_rows = write_jsonl(tmp_path / "long.jsonl",
                            [{**r, "response": r["response"] * 8} for r in DOLLY_ROWS])
    cfg = tiny_config(tmp_path / "run", long_rows, max_steps=2)  # the fused loss reads ln_f's
    cfg = replace(cfg, model=replace(cfg.model, name=str(base)))
    check_outcome(lambda: run_train(replace(cfg, data=replace(cfg.data, max_seq_len=65))),
                  tmp_path, ["data.max_seq_len = 65 is past the 64 positions",
                             "set data.max_seq_len to 64 or less"])
    assert not (tmp_path / "run" / "adapter").exists()
    # At the limit it trains, rows truncated to the table; LoRA on GPT-2's Conv1D by name.
    cfg = replace(cfg, data=replace(cfg.data, max_seq_len=64),
                  lora=replace(cfg.lora, target_modules="c_attn"),
                  train=replace(cfg.train, output_dir=str(tmp_path / "run2")))
    run_train(cfg)
    from safetensors.torch import load_file as load

    names = load(tmp_path / "run2" / "adapter" / "adapter_model.safetensors").keys()
    assert names and all("c_attn" in n for n in names)


FAMILY_SIZES = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "pad_token_id": 0,
                "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 512}


@pytest.mark.parametrize("model_type, extra", [
    ("gemma2", {"num_key_value_heads": 2, "head_dim": 16}),  # no SDPA path: loads eager
    ("bloom", {"n_layer": 2, "n_head": 4}),  # ALiBi, fused query_key_value, no SDPA path
    ("phi3", {"num_key_value_heads": 2}),  # fused qkv_proj and gate_up_proj
    ("gpt_neox", {}),  # final_layer_norm, not `norm`
    ("qwen3_moe", {"num_key_value_heads": 2, "moe_intermediate_size": 32, "num_experts": 4,
                   "num_experts_per_tok": 2, "head_dim": 16}),
    ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 4}),  # fused experts too
    ("qwen2_moe", {"num_key_value_heads": 2, "moe_intermediate_size": 32, "num_experts": 4,
                   "num_experts_per_tok": 2, "shared_expert_intermediate_size": 48}),
])
def test_train_defaults_run_on_other_families(tmp_path, dolly_file, model_type, extra):
    """`train` with its defaults (packing, fused LoRA and loss, sdpa) on families other than
    Llama: each trains, its adapter loads onto the base with plain peft and through qlora-lab's
    own loader (`all-linear` on Qwen3-MoE once made peft adapt the fused experts and router,
    which that loader refused)."""
    from dataclasses import replace

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_lab.models import build_byte_tokenizer

    torch.manual_seed(0)
    sizes = {k: v for k, v in FAMILY_SIZES.items()
             if model_type != "bloom" or k not in ("num_hidden_layers", "num_attention_heads")}
    base = tmp_path / model_type
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **extra)
                                     ).save_pretrained(base)
    build_byte_tokenizer().save_pretrained(base)
    cfg = tiny_config(tmp_path / "run", dolly_file, max_steps=2, save_steps=2, eval_steps=2)
    summary = run_train(replace(cfg, model=replace(cfg.model, name=str(base))))
    assert torch.isfinite(torch.tensor(summary["eval_loss"]))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                       tmp_path / "run" / "adapter")
    assert any("lora_A" in n for n, _ in loaded.named_parameters())
    from qlora_lab.generate import GenerateConfig, load_for_inference

    ours = load_for_inference(GenerateConfig(adapter=str(tmp_path / "run")))
    assert not getattr(ours.model.peft_config["default"], "target_parameters", None)


def test_a_base_bitsandbytes_cannot_quantize_is_refused_at_4_bit(tmp_path, dolly_file):
    """Falcon's FalconLinear subclasses nn.Linear, which transformers' 4-bit replacement skips:
    `quant.bits: 4` trained a 16-bit base the planner counted as 4-bit. Refused by train and
    plan alike, in one line; 16 bits trains it."""
    import subprocess
    import sys
    from dataclasses import replace

    from conftest import check_outcome
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_lab.models import build_byte_tokenizer

    base = tmp_path / "falcon"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2)).save_pretrained(base)
    build_byte_tokenizer().save_pretrained(base)
    cfg = tiny_config(tmp_path / "run", dolly_file, max_steps=2, save_steps=2, eval_steps=2)
    cfg = replace(cfg, model=replace(cfg.model, name=str(base)))
    fragments = ["bitsandbytes quantize", "set quant.bits to 16"]
    check_outcome(lambda: run_train(cfg), tmp_path, fragments)
    proc = subprocess.run([sys.executable, "-m", "qlora_lab", "plan", "--model", str(base)],
                          capture_output=True, text=True, timeout=300, check=False)
    [error] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and all(f in error for f in fragments), proc.stderr[-2000:]
    summary = run_train(replace(cfg, quant=replace(cfg.quant, bits=16)))
    assert torch.isfinite(torch.tensor(summary["eval_loss"]))
