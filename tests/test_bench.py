"""`qlora-lab bench` on CPU with the tiny model: the report's schema and its invariants.

One bench run (both recipes, 3 steps each, the plain one 3 times, each run in its own process)
is shared by the tests.
Speed itself is never asserted here; GPU numbers come from the benchmark run, not CI.
"""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import DOLLY_ROWS, benchmark_module, tiny_config, write_jsonl

from qlora_lab.cli import main

STEPS = 3


def plain_template_tokens(row: dict) -> int:
    """Tokens of one Dolly row under the plain template and the tiny model's byte tokenizer.

    Written from the template in the README, independently of data.py: <s>, then
    "### Instruction:\\n{instruction}[\\n\\nContext: {context}]\\n\\n### Response:\\n{response}",
    then </s>; every UTF-8 byte is one token.
    """
    user = row["instruction"] + (f"\n\nContext: {row['context']}" if row["context"] else "")
    text = f"### Instruction:\n{user}\n\n### Response:\n{row['response']}"
    return 1 + len(text.encode("utf-8")) + 1


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    data = write_jsonl(root / "dolly.jsonl", DOLLY_ROWS)
    # 12 rows, 16 rows per step: the plain recipe reads them as 3 micro-batches of 4 (the
    # demo's 4 x 4) and ours packs them into bins in one micro-batch: one pass per step.
    # bf16 compute so that "no fp32 upcast" is visible on CPU (fp32 is the CPU default).
    code = main(["bench", "--model", "tiny-random", "--data", str(data), "--steps", str(STEPS),
                 "--output-dir", str(root / "out"), "--set", "train.grad_accum_steps=1",
                 "--set", "data.max_seq_len=1024", "--peer-runs", "3",
                 "--set", "quant.compute_dtype=bfloat16", "--set", "lora.r=8"])
    assert code == 0
    return root / "out"


def test_bench_json_schema(bench_report):
    report = json.loads((bench_report / "bench.json").read_text())
    assert set(report["recipes"]) == {"plain", "qlora_lab", "unsloth", "unsloth_packed"}
    for name in ("plain", "qlora_lab"):
        r = report["recipes"][name]
        for key in ("real_tokens_per_s", "peak_allocated_bytes", "mean_step_seconds", "mfu",
                    "peak_host_rss_bytes", "param_count", "steps", "real_tokens_total"):
            assert key in r, (name, key)
        assert r["real_tokens_per_s"] > 0
        # Each step's wall time and real tokens: the timed ones add up to the headline.
        assert len(r["step_seconds"]) == len(r["step_real_tokens"]) == r["steps"]
        timed = r["steps"] - r["timed_steps"]
        assert sum(r["step_seconds"][timed:]) == pytest.approx(r["timed_seconds"], abs=1e-3)
        assert sum(r["step_real_tokens"][timed:]) == r["real_tokens_timed"]
        assert r["peak_allocated_bytes"] is None and r["mfu"] is None  # CPU: no CUDA peak, no MFU
        assert r["peak_memory_kind"] == "host_rss" and r["peak_host_rss_bytes"] > 0
    for peer in ("unsloth", "unsloth_packed"):  # not installed here: skipped, and says why
        assert report["recipes"][peer] == {"skipped": "not installed"}
    assert report["speedup_vs_unsloth"] is None and report["speedup_vs_unsloth_packed"] is None
    assert report["max_context"] == {}
    assert report["command"].startswith("qlora-lab bench")
    assert report["versions"]["torch"] and "cpu_count" in report["hardware"]
    table = (bench_report / "bench.md").read_text()
    assert "| plain |" in table and "| qlora_lab |" in table


def test_same_steps_and_real_tokens_excluding_padding(bench_report):
    recipes = json.loads((bench_report / "bench.json").read_text())["recipes"]
    plain, ours = recipes["plain"], recipes["qlora_lab"]
    assert plain["steps"] == ours["steps"] == STEPS
    # The same rows per optimizer step: ours 16 x 1, the plain recipe 4 x 4 (the demo's).
    assert (ours["micro_batch_size"], ours["grad_accum_steps"]) == (16, 1)
    assert (plain["micro_batch_size"], plain["grad_accum_steps"]) == (4, 4)
    # The real-token count is the rows' own length, no padding: with 12 rows and 16 rows per
    # step, each recipe reads every row once per step.
    expected = sum(plain_template_tokens(r) for r in DOLLY_ROWS)
    assert plain["real_tokens_total"] == STEPS * expected
    assert ours["real_tokens_total"] == STEPS * expected


def test_fast_path_loss_matches_the_plain_loss_in_the_bench(bench_report):
    check = json.loads((bench_report / "bench.json").read_text())["recipes"]["qlora_lab"][
        "loss_check"]
    assert check["rows"] == 8
    # bf16 compute in this run: 1 % is far above bf16 rounding of a loss near 7 (observed
    # 0.01 %) and far below what crossing rows or dropping a token's loss would change.
    assert check["abs_diff"] < 0.01 * check["plain_loss"]


def test_plain_upcasts_and_ours_does_not(bench_report):
    recipes = json.loads((bench_report / "bench.json").read_text())["recipes"]
    assert recipes["plain"]["weight_dtypes"]["non_quantized_base"] == ["float32"]
    assert recipes["plain"]["weight_dtypes"]["lora"] == ["float32"]
    assert recipes["qlora_lab"]["weight_dtypes"]["non_quantized_base"] == ["bfloat16"]


def test_speedup_is_the_ratio_of_recorded_rates(bench_report):
    report = json.loads((bench_report / "bench.json").read_text())
    plain = report["recipes"]["plain"]["real_tokens_per_s"]
    ours = report["recipes"]["qlora_lab"]["real_tokens_per_s"]
    assert report["speedup"] == pytest.approx(ours / plain, rel=1e-12)
    assert ours == pytest.approx(report["recipes"]["qlora_lab"]["real_tokens_timed"]
                                 / report["recipes"]["qlora_lab"]["timed_seconds"])


def test_plain_is_the_median_of_its_runs(bench_report):
    report = json.loads((bench_report / "bench.json").read_text())
    runs, plain = report["plain_runs"], report["recipes"]["plain"]
    assert len(runs) == plain["runs"] == 3 and all(r > 0 for r in runs)  # the default count
    assert plain["real_tokens_per_s"] == statistics.median(runs)
    assert (plain["real_tokens_per_s_min"], plain["real_tokens_per_s_max"]) == (min(runs),
                                                                               max(runs))
    # With an odd count the entry is the median run's own record, so its fields agree.
    assert plain["real_tokens_per_s"] == pytest.approx(plain["real_tokens_timed"]
                                                       / plain["timed_seconds"])
    assert "median of 3 runs" in (bench_report / "bench.md").read_text()


def test_complete_bench_says_so(bench_report):
    report = json.loads((bench_report / "bench.json").read_text())
    assert report["complete"] is True and report["pending"] == []
    assert list(report["recipes"]) == ["plain", "qlora_lab", "unsloth", "unsloth_packed"]
    # --peer-runs 3 with unsloth not installed: each peer skipped once, not three times
    assert report["peer_runs"] == {}
    assert report["recipes"]["unsloth"] == {"skipped": "not installed"}


def test_a_recipes_entry_is_its_median_run():
    from qlora_lab.bench import median_entry

    runs = [{"real_tokens_per_s": rate, "run": i} for i, rate in enumerate([30.0, 10.0, 20.0])]
    entry = median_entry(runs)
    assert (entry["real_tokens_per_s"], entry["run"], entry["runs"]) == (20.0, 2, 3)
    assert (entry["real_tokens_per_s_min"], entry["real_tokens_per_s_max"]) == (10.0, 30.0)
    # an even count: the median of the middle two, the fields of the lower one's run
    entry = median_entry(runs + [{"real_tokens_per_s": 40.0, "run": 3}])
    assert (entry["real_tokens_per_s"], entry["run"], entry["runs"]) == (25.0, 2, 4)


@pytest.mark.parametrize("flag", ["--peer-runs", "--plain-runs"])
def test_runs_below_one_are_refused_in_one_line(flag, capsys):
    assert main(["bench", "--model", "tiny-random", flag, "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "at least 1" in err[0]


def test_a_stopped_bench_keeps_the_recipes_it_finished(tmp_path, dolly_file):
    """A time limit that stops a bench mid-way (the H200's 10-minute calls did, inside the
    last peer) leaves bench.json with every recipe that finished, marked incomplete. Also: the
    plain recipe runs its own number of steps (--plain-steps)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_lab", "bench", "--model", "tiny-random", "--data",
         str(dolly_file), "--steps", "2", "--warmup-steps", "1", "--recipes", "qlora_lab,plain",
         "--plain-runs", "3", "--plain-steps", "3", "--output-dir", str(out),
         "--set", "lora.r=8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "bench.json").exists():
                report = json.loads((out / "bench.json").read_text())
                if report["recipes"].get("plain", {}).get("runs") == 1:
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and its recipe's process
        proc.wait()
    report = json.loads((out / "bench.json").read_text())
    assert report["complete"] is False
    assert report["pending"] == ["plain-1", "plain-2"]
    assert report["recipes"]["qlora_lab"]["real_tokens_per_s"] > 0
    assert report["recipes"]["plain"]["runs"] == 1 and len(report["plain_runs"]) == 1
    assert report["recipes"]["qlora_lab"]["steps"] == report["steps"] == 2
    assert report["recipes"]["plain"]["steps"] == report["plain_steps"] == 3
    assert report["speedup"] == pytest.approx(report["recipes"]["qlora_lab"]["real_tokens_per_s"]
                                              / report["plain_runs"][0])


def test_max_context_search_trains_each_length_in_turn(tmp_path, dolly_file):
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file), "--steps", "3",
                 "--recipes", "qlora_lab", "--context-lengths", "600,300",
                 "--output-dir", str(tmp_path / "out"), "--set", "lora.r=8"])
    assert code == 0
    search = json.loads((tmp_path / "out" / "bench.json").read_text())["max_context"]["qlora_lab"]
    assert [a["tokens"] for a in search["attempts"]] == [300, 600]  # shortest first
    assert all(a["ok"] and a["seconds_per_step"] > 0 for a in search["attempts"])
    assert search["longest_tokens"] == 600


def test_unknown_recipe_is_one_line(tmp_path, dolly_file, capsys):
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file),
                 "--recipes", "plain,fast", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--recipes" in err and "'fast'" in err and len(err.splitlines()) == 1


def test_bad_data_path_exits_2_with_one_line(tmp_path, capsys):
    code = main(["bench", "--model", "tiny-random", "--data", str(tmp_path / "missing.jsonl"),
                 "--steps", "3", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "missing.jsonl" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


class PreCheckPassed(Exception):
    """Raised in place of the first recipe: the data pre-check let the run through."""


def test_a_local_mix_passes_the_data_pre_check(tmp_path, monkeypatch):
    """bench reads data as train does: a data.mix (with no --data) is read source by source."""
    from qlora_lab import bench

    def first_recipe(*args, **kwargs):
        raise PreCheckPassed

    monkeypatch.setattr(bench, "run_ours", first_recipe)
    a = write_jsonl(tmp_path / "a.jsonl", DOLLY_ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [{"talk": r["instruction"], "answer": r["response"]}
                                           for r in DOLLY_ROWS])
    mix = (f"[{{source: '{a}', weight: 0.7}}, {{source: '{b}', weight: 0.3, "
           "columns: 'instruction=talk,response=answer'}]")
    with pytest.raises(PreCheckPassed):
        main(["bench", "--model", "tiny-random", "--recipes", "qlora_lab", "--steps", "3",
              "--output-dir", str(tmp_path / "out"), "--set", f"data.mix={mix}"])


def test_a_missing_mix_source_fails_the_pre_check_in_one_line(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", DOLLY_ROWS)
    code = main(["bench", "--model", "tiny-random", "--steps", "3",
                 "--output-dir", str(tmp_path / "out"),
                 "--set", f"data.mix={a}=0.7,{tmp_path / 'gone.jsonl'}=0.3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "gone.jsonl" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_steps_must_exceed_warmup(tmp_path, dolly_file, capsys):
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file), "--steps", "2",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "--steps 2" in capsys.readouterr().err
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file), "--steps", "5",
                 "--warmup-steps", "5", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "--steps 5" in capsys.readouterr().err
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file), "--steps", "5",
                 "--plain-steps", "2", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "--plain-steps 2" in capsys.readouterr().err
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file),
                 "--warmup-steps", "-1", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "--warmup-steps -1 must be 0 or more" in capsys.readouterr().err
    # Checked before any recipe trains, not after the first one's minutes.
    code = main(["bench", "--model", "tiny-random", "--data", str(dolly_file),
                 "--context-lengths=-5,0", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and "--context-lengths -5 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the unsloth_packed recipe's spec, without unsloth (it runs on the GPU host only) ----------


def test_packed_peer_spec_trains_on_exactly_the_padded_rows_tokens(tmp_path, dolly_file):
    """What unsloth_packed hands TRL, run through TRL's own SFTTrainer: padding-free bins that
    hold every row once, the same supervised tokens and loss as the rows padded, and every
    token counted as real."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    SFTTrainer = pytest.importorskip("trl").SFTTrainer  # in the test extra; skipped without it

    from qlora_lab import models
    from qlora_lab.bench_peer import packed_sft_config, sft_rows
    from qlora_lab.data import IGNORE_INDEX, PadCollator, prepare_data
    from qlora_lab.train import build_training_args

    path = models.resolve_model_path("tiny-random")
    tokenizer = models.load_tokenizer(path, False)
    run = tiny_config(tmp_path / "run", dolly_file, max_steps=1, grad_accum_steps=1)
    rows = prepare_data(run.data, tokenizer, 0).train
    args = build_training_args(run, tmp_path / "run", "cpu", torch.float32, has_eval=False,
                               resuming=False)
    args.per_device_train_batch_size = len(rows)  # every bin in one micro-batch
    config = packed_sft_config(args, run.data.max_seq_len)
    assert config.packing and config.padding_free and config.max_length == run.data.max_seq_len
    # The bench's own settings carry over unchanged.
    for name in ("learning_rate", "optim", "seed", "max_steps", "lr_scheduler_type", "bf16"):
        assert getattr(config, name) == getattr(args, name), name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(sft_rows(rows)),
                         processing_class=tokenizer)
    packed = next(iter(trainer.get_train_dataloader()))
    total = sum(len(r["input_ids"]) for r in rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, total)
    # A model shifts labels by one, so a padded row's first label is never read; padding-free
    # batches mask each row's first label instead. Either way: the answer tokens, once each.
    answer_tokens = sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == answer_tokens
    padded = PadCollator(tokenizer.pad_token_id)(rows)
    model.eval()
    with torch.no_grad():
        packed_loss = model(**packed).loss  # rows kept apart by their position_ids alone
        assert packed_loss == pytest.approx(float(model(**padded).loss), rel=1e-4)
    model.train()
    trainer.train()
    assert trainer.state.num_input_tokens_seen == total  # no padding to leave out


def test_packed_peer_records_the_kernels_the_host_lacks():
    import importlib.util

    from qlora_lab.bench_peer import attention_kernels

    found = attention_kernels()
    assert set(found["attention_kernels"]) == {"flash_attn", "xformers"}
    usable = [name for name, version in found["attention_kernels"].items() if version]
    assert found["host_lacks"] == ([] if usable else ["flash_attn", "xformers"])
    if not any(importlib.util.find_spec(m) for m in ("flash_attn", "xformers")):
        assert found["host_lacks"] == ["flash_attn", "xformers"]  # this CPU host: neither


def test_idle_gaps_finds_when_the_gpu_waited_and_what_the_host_did():
    """profile_step.py's timeline analysis: overlapping kernels count once, gaps shorter than
    the threshold are busy time's neighbours, not gaps, and each long gap names the host
    operators that overlap it, longest first."""
    idle_gaps = benchmark_module("profile_step").idle_gaps
    kernels = [(0, 100), (50, 150), (150, 400),  # overlapping and touching: busy 0-400
               (450, 500),                       # a 50 us gap before it: too short to list
               (1500, 1600)]                     # a 1,000 us gap: the optimizer's host time
    host = [(380, 1480, "Optimizer.step"), (1400, 1550, "aten::mm"), (0, 10, "aten::empty")]
    report = idle_gaps(kernels, host, min_gap_us=200)
    assert report["window_us"] == 1600
    assert report["busy_us"] == 400 + 50 + 100
    assert report["idle_us"] == 1600 - 550 == 50 + 1000
    assert report["gaps"] == 1 and report["idle_in_gaps_us"] == 1000
    (gap,) = report["longest"]
    assert gap["us"] == 1000
    assert [op["name"] for op in gap["host_ops"]] == ["Optimizer.step", "aten::mm"]
    assert gap["host_ops"][0]["us"] == 1480 - 500 and gap["host_ops"][1]["us"] == 1500 - 1400
    assert idle_gaps([], host)["gaps"] == 0


def test_idle_between_sums_the_gpus_gaps_by_the_kernels_around_them():
    """profile_step.py --gpu-only: gaps of at least the threshold are summed per (previous,
    next) kernel pair with the compiler's numbering dropped, shorter ones count as small gaps,
    a kernel inside another's span does not end it, and all is per profiled step."""
    idle_between = benchmark_module("profile_step").idle_between
    kernels = [(0, 100, "mm"), (10, 50, "inner_3"),         # inner ends first: "mm" is last
               (300, 400, "triton_poi_fused_add_12"),       # 200 us after mm
               (405, 500, "mm"),                            # 5 us: a small gap
               (1500, 1600, "triton_poi_fused_add_7")]      # 1,000 us after mm
    report = idle_between(kernels, steps=2, min_gap_us=20)
    assert report["window_ms_per_step"] == 0.8
    assert report["busy_ms_per_step"] == round((100 + 100 + 95 + 100) / 1e3 / 2, 2)
    assert report["idle_ms_per_step"] == round(1205 / 1e3 / 2, 2)
    assert report["small_gaps_ms_per_step"] == 0.0  # 5 us / 2 steps, rounded
    (pair,) = report["gaps"]
    assert (pair["after"], pair["before"]) == ("mm", "triton_poi_fused_add")
    assert pair["ms_per_step"] == 0.6 and pair["count_per_step"] == 1.0
    assert idle_between([], steps=1) == {}
    # Phases by kernel name: the embedding's gather starts the forward, a backward kernel the
    # backward, the optimizer's multi-tensor kernel the boundary; a gap counts in the phase
    # of the kernel before it.
    step = [(0, 10, "Memcpy HtoD"), (30, 40, "vectorized_gather_kernel"),   # boundary, gap 20
            (40, 100, "mm"), (150, 160, "triton_poi_fused_add_3"),         # forward, gap 50
            (160, 260, "attention_bwd_dkdv"), (270, 300, "mm"),            # backward, gap 10
            (400, 410, "multi_tensor_apply_kernel"), (430, 440, "Memset")]  # gap 100 (backward)
    timeline = step + [(s + 500, e + 500, n) for s, e, n in step]  # 60 between: boundary's
    phases = idle_between(timeline, steps=2)["phases"]
    assert phases["boundary"] == {"busy_ms_per_step": 0.03, "idle_ms_per_step": 0.07}
    assert phases["forward"] == {"busy_ms_per_step": 0.08, "idle_ms_per_step": 0.05}
    assert phases["backward"] == {"busy_ms_per_step": 0.13, "idle_ms_per_step": 0.11}


def test_the_plain_recipe_keeps_the_demos_trainer_settings(tmp_path, dolly_file):
    """`train` spares the GPU's waits (no NaN filter, non-blocking copies, torch's fused AdamW by
    default); the plain recipe is the demo's, with Trainer's own defaults and its optimizer."""
    from qlora_lab import bench
    from qlora_lab.config import config_from_dict

    run = config_from_dict({"model": {"name": "tiny-random"},
                            "data": {"source": str(dolly_file), "max_seq_len": 128},
                            "train": {"output_dir": str(tmp_path / "out"), "max_steps": 1,
                                      "tensorboard": False}})
    cfg = bench.BenchConfig(run=run, output_dir=str(tmp_path / "bench"))
    trainer, *_ = bench._build_plain(cfg, bench.bench_run_config(cfg, "plain"),
                                     tmp_path / "plain")
    assert trainer.args.logging_nan_inf_filter
    assert not trainer.args.accelerator_config.non_blocking
    # torch's AdamW on CPU, as the demo's `auto` was there (paged 8-bit AdamW on CUDA).
    assert str(trainer.args.optim.value).startswith("adamw_torch")
    ours = bench._build_qlora_lab(bench.bench_run_config(cfg, "qlora_lab"), tmp_path / "ours")[0]
    assert not ours.args.logging_nan_inf_filter
