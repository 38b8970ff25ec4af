import json
import shutil
import stat
from dataclasses import replace

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


def test_merge_of_a_base_with_an_auto_map_leaves_no_remote_code_pointer(trained_run, tmp_path):
    """The base's config names repo code (auto_map) that merge did not run (trust_remote_code
    off): the merged folder loads with transformers' own classes either way."""
    from transformers import AutoModelForCausalLM

    base_path = json.loads((trained_run / "adapter/adapter_config.json").read_text())[
        "base_model_name_or_path"]
    base = tmp_path / "base"
    shutil.copytree(base_path, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "someone/else--modeling_evil.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    run_merge(MergeConfig(adapter=str(trained_run), model=str(base),
                          output_dir=str(tmp_path / "m")))
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in saved and saved["model_type"] == config["model_type"]
    # Even a caller who trusts remote code gets transformers' class, not someone else's repo.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers.")


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


# --- merge --dtype -------------------------------------------------------------------------------

# Largest |merged - (base + adapter)| logit allowed, relative to the largest logit. In fp32 only
# summation order differs; in 16 bits every weight and activation is rounded (to eps/2, growing
# through the layers), and on this wide-init random model that comes to 3-5 eps (measured).
LOGIT_TOLERANCE = {"fp32": 1e-5, "bf16": 8 * torch.finfo(torch.bfloat16).eps,
                   "fp16": 8 * torch.finfo(torch.float16).eps}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def unmerged_logits(trained_run):
    """Token ids and the logits of base + adapter, unmerged, on the dense fp32 base."""
    from peft import PeftModel

    from qlora_lab.merge import _dequantized_base

    ref = adapters.resolve_adapter(str(trained_run))
    base_path = json.loads((trained_run / "adapter/adapter_config.json").read_text())[
        "base_model_name_or_path"]
    model = PeftModel.from_pretrained(_dequantized_base(ref, base_path, "cpu"),
                                      str(ref.adapter_dir)).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ids, model(input_ids=ids).logits


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_merge_dtype(trained_run, tmp_path, unmerged_logits, dtype):
    from transformers import AutoModelForCausalLM

    out = tmp_path / dtype
    report = run_merge(MergeConfig(adapter=str(trained_run), output_dir=str(out), dtype=dtype))
    assert report["dtype"] == str(TORCH_DTYPE[dtype]).removeprefix("torch.")
    assert report["dtype_from"] == "--dtype"
    assert json.loads((out / "merge_report.json").read_text())["dtype"] == report["dtype"]
    # Plain transformers loads it in that dtype by default (the dtype its config records).
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {TORCH_DTYPE[dtype]}
    ids, expected = unmerged_logits
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits.float() - expected).abs().max().item()
    assert diff <= LOGIT_TOLERANCE[dtype] * expected.abs().max().item(), diff
    weights = (out / "model.safetensors").stat().st_size
    fp32_bytes = 4 * sum(p.numel() for p in merged.parameters())
    assert weights < fp32_bytes * (0.6 if dtype != "fp32" else 1.1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_16_bit_merge_rounds_once(trained_run, tmp_path, dtype):
    # W + BA is rounded once, into the saved dtype: the weights are the fp32 merge's, cast.
    # (Casting the fp32 base first and merging in 16 bits would round twice.)
    from safetensors.torch import load_file

    for name in ("fp32", dtype):
        run_merge(MergeConfig(adapter=str(trained_run), output_dir=str(tmp_path / name),
                              dtype=name))
    exact = load_file(tmp_path / "fp32/model.safetensors")
    saved = load_file(tmp_path / dtype / "model.safetensors")
    assert exact.keys() == saved.keys()
    assert all(torch.equal(exact[k].to(TORCH_DTYPE[dtype]), saved[k]) for k in exact)


@pytest.mark.parametrize("record_in", ["qlora_lab_base.json", "summary.json"])
def test_merge_defaults_to_the_training_dtype(trained_run, tmp_path, record_in):
    # A GPU run trains in bf16: its merge is bf16 by default, wherever it runs. summary.json is
    # the record of runs trained before qlora_lab_base.json kept the dtype.
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info_path, summary_path = run / "adapter" / adapters.BASE_INFO_FILE, run / "summary.json"
    info, summary = json.loads(info_path.read_text()), json.loads(summary_path.read_text())
    assert info["compute_dtype"] == summary["compute_dtype"] == "float32"  # trained on CPU
    del info["compute_dtype"]
    (info if record_in == "qlora_lab_base.json" else summary)["compute_dtype"] = "bfloat16"
    info_path.write_text(json.dumps(info))
    summary_path.write_text(json.dumps(summary))
    report = run_merge(MergeConfig(adapter=str(run), output_dir=str(tmp_path / "m")))
    assert (report["dtype"], report["dtype_from"]) == ("bfloat16", "training")


def test_merge_without_a_dtype_record_keeps_the_device_default(trained_run, tmp_path):
    copy = tmp_path / "adapter"  # a bare adapter dir: no summary.json beside it
    shutil.copytree(trained_run / "adapter", copy)
    info = json.loads((copy / adapters.BASE_INFO_FILE).read_text())
    del info["compute_dtype"]
    (copy / adapters.BASE_INFO_FILE).write_text(json.dumps(info))
    report = run_merge(MergeConfig(adapter=str(copy), output_dir=str(tmp_path / "m")))
    assert report["dtype"] == "float32" and report["dtype_from"].startswith("device default")


def test_merge_cli_takes_dtype(trained_run, tmp_path, capsys):
    assert main(["-q", "merge", "--adapter", str(trained_run), "--output-dir",
                 str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["merge", "--adapter", str(trained_run), "--output-dir", str(tmp_path / "n"),
              "--dtype", "int8"])


# --- shareable adapters --------------------------------------------------------------------------


@pytest.mark.parametrize("name, hub", [
    ("tinyllama", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
    ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
     "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"),
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("org/some-model", "org/some-model"),
    ("tiny-random", None),
    ("/models/llama", None),
    ("model.gguf", None),
])
def test_hub_id_of_bases(name, hub):
    from qlora_lab.modelcard import hub_id

    assert hub_id(name) == hub


def test_trained_adapter_has_a_model_card_peft_loads(trained_run):
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM

    adapter = trained_run / "adapter"
    text = (adapter / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "peft"
    assert card.data.tags == ["qlora", "lora", "qlora-lab"]
    assert card.data.base_model is None  # tiny-random has no hub repo
    assert "More Information Needed" not in text  # peft's template card is gone
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"{summary['eval_loss']:.4f} after" in text
    assert "## Hyperparameters" in text and "- LoRA: r 8, alpha 16" in text
    # With no hub id the adapter keeps the local base path, so plain peft still loads it.
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert model.peft_config["default"].r == 8


@pytest.mark.parametrize("preset, hub", [("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                                         ("tinyllama",
                                          "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T")])
def test_preset_adapters_name_their_hub_base(trained_run, tmp_path, preset, hub):
    from types import SimpleNamespace

    from huggingface_hub import ModelCard

    from qlora_lab.config import QuantConfig, load_run_config

    adapter = tmp_path / "adapter"  # as `train` saves it, with the preset as the base
    shutil.copytree(trained_run / "adapter", adapter)
    run_cfg = load_run_config(trained_run / "config.yaml")
    run_cfg = replace(run_cfg, model=replace(run_cfg.model, name=preset))
    adapters.write_base_info(adapter, run_cfg.model, QuantConfig(), "chat", SimpleNamespace(),
                             run=run_cfg, summary=json.loads((trained_run / "summary.json")
                                                             .read_text()))
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == hub  # what peft and the hub read
    assert ModelCard((adapter / "README.md").read_text()).data.base_model == hub
    # qlora-lab itself still reloads the preset (offline for smollm2-135m), not the hub repo.
    assert json.loads((adapter / adapters.BASE_INFO_FILE).read_text())["model"] == preset
    assert adapters.resolve_adapter(str(adapter)).base_model == preset


# --- refused before a traceback: bad prompts, flags and chat templates ---------------------------


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the input was checked")


def _one_error_line(capsys) -> str:
    """The one error line on stderr (transformers' weight-loading progress bar may share it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# Python decodes argv, and stdin under a C locale, with surrogateescape: b"\xff\xfe" arrives as
# lone surrogates, which the tokenizer cannot encode.
@pytest.mark.parametrize("source", ["--prompt", "stdin"])
def test_non_utf8_prompt_is_one_line_before_loading(monkeypatch, capsys, source):
    import io

    from qlora_lab import models

    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    bad = b"\xff\xfe bad".decode("utf-8", "surrogateescape")
    argv = ["generate", "--model", "tiny-random"]
    if source == "--prompt":
        argv += ["--prompt", bad]
    else:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(
            io.BytesIO(b"\xff\xfe bad"), encoding="utf-8", errors="surrogateescape"))
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert f"{'--prompt' if source == '--prompt' else 'the prompt on stdin'} is not UTF-8" in err


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_refuses_a_non_utf8_message_and_goes_on(trained_run, monkeypatch, capsys, errors):
    import io

    from qlora_lab import generate

    # Strict (a UTF-8 locale) used to end the chat at the bad line as if at EOF.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(
        io.BytesIO(b"hi\n\xff\xfe bad\nhello\n"), encoding="utf-8", errors=errors))
    seen, real = [], generate.generate_reply

    def recording_reply(loaded, messages, cfg, streamer=None):
        seen.append([m["content"] for m in messages])
        return real(loaded, messages, cfg, streamer)

    monkeypatch.setattr(generate, "generate_reply", recording_reply)
    assert main(["-q", "generate", "--adapter", str(trained_run), "--chat",
                 "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("you> ") == 4  # hi, the bad line, hello, then EOF
    errors_seen = [line for line in captured.err.splitlines() if "error" in line]
    assert len(errors_seen) == 1 and "the message is not UTF-8 text" in errors_seen[0]
    # The refused line never reached the model, and the history holds only the good turns.
    assert [turns[::2] for turns in seen] == [["hi"], ["hi", "hello"]]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"seed": 2**32}, "--seed 4294967296 must be an integer in [0, 2**32 - 1]"),
    ({"seed": -1}, "--seed -1 must be an integer in [0, 2**32 - 1]"),
    ({"temperature": float("nan")}, "--temperature nan must be 0 (greedy) or between 0.01"),
    ({"temperature": float("inf")}, "--temperature inf must be 0 (greedy) or between"),
    ({"temperature": -1.0}, "--temperature -1.0 must be 0 (greedy) or between 0.01 and 100"),
    # Logits over 1e-40 overflowed fp32 and sampling crashed on NaN probabilities.
    ({"temperature": 1e-40}, "--temperature 1e-40 must be 0 (greedy) or between"),
    ({"temperature": 0.009}, "--temperature 0.009 must be 0 (greedy) or between"),
    ({"temperature": 1e300}, "--temperature 1e+300 must be 0 (greedy) or between"),
    ({"model_dir": "merged", "model": "tiny-random"},
     "--model-dir is a whole model: pass it without --model"),
])
def test_bad_generate_flags_are_refused(kwargs, fragment):
    with pytest.raises(UserError) as info:
        GenerateConfig(**{"model": "tiny-random", **kwargs})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_generate_flag_bounds_are_allowed():
    # The ends of each range are valid, as train.seed's are.
    for seed in (0, 2**32 - 1):
        assert GenerateConfig(model="tiny-random", seed=seed).seed == seed
    assert GenerateConfig(model="tiny-random", temperature=0.0).temperature == 0.0


@pytest.mark.parametrize("temperature", [0.01, 100.0])
def test_sampling_at_the_temperature_bounds_answers(trained_run, temperature):
    # Both ends of the range sample real tokens: no overflow at 0.01, no crash at 100.
    cfg = GenerateConfig(adapter=str(trained_run), max_new_tokens=6, temperature=temperature,
                         seed=3)
    loaded = load_for_inference(cfg)
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}]
    assert isinstance(generate_reply(loaded, msgs, cfg), str)
    assert generate_reply(loaded, msgs, cfg) == generate_reply(loaded, msgs, cfg)  # seeded


@pytest.mark.parametrize("argv", [
    ["--temperature", "1", "--seed", "99999999999999999999999"],  # overflowed torch.manual_seed
    ["--temperature", "nan"],  # was silently greedy
    ["--model-dir", "merged"],  # --model was silently ignored
])
def test_bad_generate_flags_are_one_line_before_loading(monkeypatch, capsys, argv):
    from qlora_lab import models

    monkeypatch.setattr(models, "load_base_model", _must_not_load)
    assert main(["generate", "--model", "tiny-random", "--prompt", "hi", *argv]) == 2
    assert "qlora-lab generate: error: --" in _one_error_line(capsys)


@pytest.fixture
def chat_run(trained_run, tmp_path):
    """A copy of the trained run recorded as trained with the run folder's chat template."""
    from conftest import CHATML

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    info_path = run / "adapter" / adapters.BASE_INFO_FILE
    info = json.loads(info_path.read_text())
    (run / "chat_template.jinja").write_text(CHATML)
    info_path.write_text(json.dumps({**info, "template": "chat"}))
    return run


def test_a_broken_chat_template_file_is_one_line(chat_run, capsys):
    template = chat_run / "chat_template.jinja"
    template.write_text("{% for %}")
    assert main(["-q", "generate", "--adapter", str(chat_run), "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 2
    err = _one_error_line(capsys)
    assert f"the chat template in {template} cannot render the prompt" in err and "fix the" in err


def test_chat_template_errors_are_user_errors(chat_run):
    from conftest import CHATML

    loaded = load_for_inference(GenerateConfig(adapter=str(chat_run)))
    cfg = GenerateConfig(adapter=str(chat_run), max_new_tokens=2)
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.template == "chat" and loaded.tokenizer.chat_template == CHATML
    assert isinstance(generate_reply(loaded, msgs, cfg), str)  # the good template renders
    # A template may refuse a conversation with raise_exception(): its message is kept.
    loaded.tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match=r"chat_template.jinja cannot render the prompt "
                                        r"\(roles must alternate\)"):
        generate_reply(loaded, msgs, cfg)
