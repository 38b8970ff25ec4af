"""`qlora-lab lab --quick` on CPU: one real run of the whole lab, then invariants on its report.

The run is shared by every test here (module fixture, ~1-2 min on 2 CPU cores). Nothing is
mocked: the numbers checked are the ones the lab measured.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qlora_lab import memory
from qlora_lab.cli import main
from qlora_lab.config import resolve_optimizer
from qlora_lab.lab import lab_config, pareto_front
from qlora_lab.plan import model_shape

SECTIONS = ("1. Feasibility map", "2. Throughput vs accessibility", "3. Memory vs stability",
            "4. Adapter indirection", "5. Quality")


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "report"
    assert main(["lab", "--quick", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def report(lab_dir):
    return json.loads((lab_dir / "report.json").read_text(encoding="utf-8"))


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _not_blank(png: bytes) -> None:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.width > 200 and img.height > 150
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 20, "image is (nearly) one colour"


def test_files_and_sections(lab_dir, report):
    for name in ("report.md", "report.html", "report.json", *report["plots"]):
        assert (lab_dir / name).is_file(), name
    assert set(report["plots"]) >= {"feasibility.png", "throughput.png", "stability.png",
                                    "indirection.png"}
    md = (lab_dir / "report.md").read_text(encoding="utf-8")
    page = (lab_dir / "report.html").read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"## {title}" in md and f"<h2>{title}</h2>" in page
    assert report["complete"] is True
    for key in ("feasibility", "throughput", "stability", "indirection", "quality", "runs",
                "config", "versions", "hardware", "command"):
        assert report[key], key
    # The scratch runs stay out of version control and inside the output dir.
    assert (lab_dir / "runs" / ".gitignore").read_text() == "*\n"


def test_command_and_config_regenerate_the_report(lab_dir, report):
    assert report["command"] == f"qlora-lab lab --quick --output-dir {lab_dir}"
    assert report["config"] == json.loads(json.dumps(
        lab_config(True, output_dir=str(lab_dir), command=report["command"]).__dict__))
    assert report["versions"]["torch"] and report["hardware"]["cpu_count"]


def test_feasibility_is_the_planners_and_says_measurement_needs_cuda(report):
    f = report["feasibility"]
    cfg = report["config"]
    assert len(f["grid"]) == 2 * 2 * len(cfg["ranks"]) * len(cfg["seq_lens"]) * len(
        cfg["micro_batches"])
    shape = model_shape(f["model"])
    for p in f["grid"][:: max(1, len(f["grid"]) // 7)]:
        step = memory.StepShape(micro_batch_size=p["micro_batch_size"], seq_len=p["seq_len"],
                                bits=p["bits"], lora_r=p["lora_r"], lora_dropout=False,
                                gradient_checkpointing=p["gradient_checkpointing"],
                                optimizer=resolve_optimizer("auto", on_cuda=True),
                                fused_loss=True, fused_lora=True, packed=True,
                                # as plan.step_shape reads it for the run (train's allocator)
                                expandable_segments=memory.expandable_segments(os.environ))
        plan = memory.estimate_peak_memory(shape, step)
        assert p["predicted_peak_reserved_bytes"] == plan.peak_reserved_bytes
        assert p["fits"] == (plan.peak_reserved_bytes <= f["budget_bytes"])
    # No CUDA here: the map must say so rather than show measured numbers.
    assert "needs CUDA" in f["measured_skipped"] and "measured" not in f


def test_every_number_traces_to_a_run(report):
    runs = report["runs"]
    for rid, run in runs.items():
        assert run["id"] == rid
        if run["kind"] == "train":
            assert run["status"] in ("ok", "nan", "oom")
            assert run["train_losses"], rid  # every run logged real steps
    t = report["throughput"]
    points = [p for p in t["points"] if "run_id" in p]
    assert len(points) >= 2
    # The budgets made the planner pick different configs, each trained for real.
    assert len({runs[p["run_id"]]["micro_batch_size"] for p in points}) == len(points)
    for p in points:
        run = runs[p["run_id"]]
        assert p["tokens_per_s"] == run["tokens_per_s"] and _finite_positive(p["tokens_per_s"])
        assert p["eval_loss"] == run["eval_loss"] and _finite_positive(p["eval_loss"])
        assert p["time_to_target_s"] is not None
        assert any(e["eval_loss"] <= t["target_eval_loss"] for e in run["evals"])
    assert any(p["pareto"] for p in points)
    s = report["stability"]
    assert s["optimizers_skipped"] == {"paged_adamw_8bit": s["optimizers_skipped"][
        "paged_adamw_8bit"]} and "CUDA" in s["optimizers_skipped"]["paged_adamw_8bit"]
    cfg = report["config"]
    assert len(s["points"]) == len(cfg["learning_rates"]) * len(cfg["quant_variants"]) * len(
        cfg["seeds"])
    for p in s["points"]:
        run = runs[p["run_id"]]
        assert p["eval_loss"] == run["eval_loss"]
        assert (run["status"] == "nan") == (p["divergence"] == "nan")
        spiked = max(run["train_losses"]) > s["spike_factor"] * run["train_losses"][0]
        assert p["diverged"] == (run["status"] == "nan" or spiked)
        if run["status"] == "ok":
            assert _finite_positive(p["eval_loss"])
    for row in s["summary"]:
        assert row["diverged"] == sum(runs[r]["status"] == "nan" or max(
            runs[r]["train_losses"]) > s["spike_factor"] * runs[r]["train_losses"][0]
            for r in row["run_ids"])
    d = report["indirection"]
    assert {p["variant"] for p in d["points"]} == {
        "4-bit base alone", "4-bit base + unmerged adapter", "merged 16-bit",
        "merged, re-quantized to 4-bit"}
    assert {p["batch_size"] for p in d["points"]} == {1, 8}
    for p in d["points"]:
        run = runs[p["run_id"]]
        for key in ("ttft_s", "decode_tokens_per_s", "weight_bytes"):
            assert p[key] == run[key] and _finite_positive(p[key]), (p["run_id"], key)
        assert p["peak_allocated_bytes"] is None  # CPU: not measurable, never invented
    q = report["quality"]
    assert q["models"] == runs[q["run_id"]]["models"]
    assert set(q["models"]) == {"base", "fine-tuned"}
    assert q["models"]["fine-tuned"]["loss"] < q["models"]["base"]["loss"]


def test_markdown_shows_the_reports_numbers(lab_dir, report):
    md = (lab_dir / "report.md").read_text(encoding="utf-8")
    for p in report["throughput"]["points"]:
        if "run_id" in p:
            assert f"{p['tokens_per_s']:,.0f}" in md
    assert f"{report['quality']['models']['fine-tuned']['loss']:.3f}" in md
    for name in report["plots"]:
        assert f"]({name})" in md


def test_pngs_decode_and_are_not_blank(lab_dir, report):
    for name in report["plots"]:
        _not_blank((lab_dir / name).read_bytes())


def test_html_embeds_every_plot(lab_dir, report):
    page = (lab_dir / "report.html").read_text(encoding="utf-8")
    embedded = {m.group(2): m.group(1) for m in re.finditer(
        r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="[^"]*" data-file="([^"]+)">',
        page)}
    assert set(embedded) == set(report["plots"])
    for name, data in embedded.items():
        png = base64.b64decode(data)
        assert png == (lab_dir / name).read_bytes()  # the page needs no file beside it
        _not_blank(png)


def _colored_pixels(png_path) -> int:
    from PIL import Image

    img = Image.open(png_path).convert("HSV")
    return sum(1 for _, sat, val in img.getdata() if sat > 80 and val > 60)


def _screenshot(chromium: str, page, shot) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--window-size=1200,6000", f"--screenshot={shot}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)


def test_html_renders_plots_in_headless_chromium(lab_dir, tmp_path):
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                    "google-chrome", "chrome"))), None)
    if chromium is None:
        pytest.skip("no headless Chromium on PATH (apt-get install chromium); the embedded "
                    "PNGs are still decoded and checked by test_html_embeds_every_plot")
    _screenshot(chromium, lab_dir / "report.html", tmp_path / "page.png")
    # The same page with its images' data removed: everything else (text, tables) is grey, so
    # the colour in the first screenshot comes from the plots rendering.
    page = (lab_dir / "report.html").read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', 'src=""', page),
                      encoding="utf-8")
    _screenshot(chromium, broken, tmp_path / "broken.png")
    with_plots, without = _colored_pixels(tmp_path / "page.png"), _colored_pixels(
        tmp_path / "broken.png")
    assert with_plots > 20000 and without < with_plots / 20, (with_plots, without)


def test_pareto_front():
    assert pareto_front([(1, 10), (2, 5), (3, 20), (3, 15)]) == [True, False, True, False]


def test_output_dir_with_foreign_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["lab", "--quick", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds files that no lab run wrote" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_users_runs_folder_and_report_are_never_the_labs_to_delete(tmp_path, capsys):
    mine = tmp_path / "runs" / "my-finetune" / "adapter_model.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_text("weights")
    (tmp_path / "report.json").write_text('{"my": "own report"}')
    assert main(["lab", "--quick", "--output-dir", str(tmp_path)]) == 2
    assert "holds files that no lab run wrote" in capsys.readouterr().err
    # A lab's report beside a runs/ folder the lab did not make: still refused.
    (tmp_path / "report.json").write_text('{"config": {}, "complete": true}')
    assert main(["lab", "--quick", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "runs was not written by a lab run" in err and "\n" not in err
    assert mine.read_text() == "weights"


@pytest.mark.parametrize("pair, fragment", [
    ("micro_batches=0", "micro_batches = 0 is out of range"),
    ("seq_lens=3", "seq_lens = 3 is out of range"), ("ranks=100000", "ranks = 100000"),
    ("seeds=-1", "seeds = -1"), ("learning_rates=0", "learning_rates = 0.0"),
    ("stability_steps=0", "stability_steps = 0"), ("repeats=0", "repeats = 0"),
    ("workers=-5", "workers = -5"), ("spike_factor=-1", "spike_factor = -1.0"),
    ("target_eval_loss=-5", "a positive loss, or none"),
    ("target_eval_loss=nan", "expected a number or none"),
    ("optimizers=sgd", "'sgd' is unknown"),
])
def test_lab_settings_out_of_range_are_refused_before_any_run(pair, fragment, tmp_path, capsys):
    out = tmp_path / "lab"
    assert main(["lab", "--quick", "--output-dir", str(out), "--set", pair]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not out.exists()


def test_bad_budget_is_one_line(capsys):
    assert main(["lab", "--quick", "--budget", "lots"]) == 2
    assert "--budget" in capsys.readouterr().err


def test_set_overrides_are_typed_and_checked(capsys):
    from qlora_lab.cli import main
    from qlora_lab.errors import UserError
    from qlora_lab.lab import parse_overrides

    values = parse_overrides(["seeds=0", "learning_rates=1e-4,2e-3", "stability_steps=7",
                              "quant_variants=nf4,16bit", "target_eval_loss=2.5"])
    assert values == {"seeds": (0,), "learning_rates": (1e-4, 2e-3), "stability_steps": 7,
                      "quant_variants": ("nf4", "16bit"), "target_eval_loss": 2.5}
    assert lab_config(True, **values).seeds == (0,)
    for bad in ("output_dir=/tmp/x", "seeds", "stability_steps=many", "seeds="):
        with pytest.raises(UserError, match="lab --set"):
            parse_overrides([bad])
    assert main(["lab", "--quick", "--set", "colour=blue"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "colour=blue" in err and "seeds" in err


# A small lab for the interruption test: every section, few runs, few steps.
SMALL = ["--set", "learning_rates=1e-3", "--set", "quant_variants=nf4,16bit", "--set", "seeds=0",
         "--set", "throughput_steps=3", "--set", "stability_steps=3", "--set", "quality_steps=4",
         "--set", "seq_lens=256", "--set", "micro_batches=1,2", "--set", "batch_sizes=1",
         "--set", "repeats=1", "--set", "decode_tokens=4", "--set", "max_new_tokens=4",
         "--set", "eval_rows=2"]


def test_an_interrupted_lab_continues_where_it_stopped(tmp_path):
    """Ctrl-C while a section trains: lab says how to continue (an inner run's own advice,
    `train --resume` for its scratch dir, would not); the same command then reuses every run
    that finished and runs the rest."""
    out = tmp_path / "report"
    argv = ["lab", "--quick", "--output-dir", str(out), *SMALL]
    proc = subprocess.Popen([sys.executable, "-m", "qlora_lab", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("runs/stability__*/metrics.jsonl")):  # section 3 is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert re.match(r"qlora-lab lab: lab stopped by a signal during (stability|fine-tune);", last)
    assert "run the same command again to continue" in last and "--resume" not in last
    partial = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert partial["complete"] is False and partial["throughput"]["points"]
    finished = {r["id"]: r for r in (json.loads(f.read_text()) for f in
                                      out.glob("runs/*.record.json"))}
    assert {rid for rid in finished if rid.startswith("throughput/")} == {
        p["run_id"] for p in partial["throughput"]["points"] if "run_id" in p}

    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["complete"] is True
    assert set(report["reused_runs"]) == set(finished)  # all finished ones, read back as they were
    for rid, earlier in finished.items():
        assert report["runs"][rid] == {**earlier, "reused": True}
    trained_now = [r for r in report["runs"].values()
                   if r["kind"] == "train" and not r.get("reused")]
    assert trained_now and all(r["status"] == "ok" for r in trained_now)
    assert "reused" in (out / "report.md").read_text(encoding="utf-8")
