"""Render a `qlora-lab lab` report: report.json -> PNG plots, report.md and report.html.

Only reads the report dict that lab.run_lab built; every value shown is one of its numbers. The
HTML page inlines each PNG as a base64 data URI so the single file works anywhere (mail, a wiki,
an offline browser); the PNGs are also written beside it for the Markdown file to link.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from qlora_lab import fsio

GIB, MIB = 1024**3, 1024**2


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / 1024:,.0f} KiB"


def fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG bytes only
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


# --- plots ---------------------------------------------------------------------------------------


def plot_feasibility(f: dict) -> bytes:
    import numpy as np

    plt = _pyplot()
    grid = f["grid"]
    ranks = sorted({p["lora_r"] for p in grid})
    panels = [(b, c) for b in (4, 16) for c in (True, False)]
    seqs = sorted({p["seq_len"] for p in grid})
    mbs = sorted({p["micro_batch_size"] for p in grid})
    measured = {m["run_id"]: m for m in f.get("measured", [])}
    fig, axes = plt.subplots(len(panels), len(ranks), squeeze=False, layout="constrained",
                             figsize=(3.4 * len(ranks) + 1.5, 2.6 * len(panels)))
    values = [p["predicted_peak_reserved_bytes"] / GIB for p in grid]
    norm = plt.matplotlib.colors.LogNorm(vmin=min(values), vmax=max(values))
    for i, (bits, ckpt) in enumerate(panels):
        for j, r in enumerate(ranks):
            ax = axes[i][j]
            cells = {(p["seq_len"], p["micro_batch_size"]): p for p in grid
                     if (p["bits"], p["gradient_checkpointing"], p["lora_r"]) == (bits, ckpt, r)}
            z = np.array([[cells[s, m]["predicted_peak_reserved_bytes"] / GIB for m in mbs]
                          for s in seqs])
            im = ax.imshow(z, cmap="viridis", norm=norm, aspect="auto", origin="lower")
            for a, s in enumerate(seqs):
                for b, m in enumerate(mbs):
                    p = cells[s, m]
                    label = f"{z[a, b]:.2g}" if p["fits"] else "✗"
                    if p.get("run_id") in measured:
                        label += "•"
                    ax.text(b, a, label, ha="center", va="center", fontsize=7,
                            color="white" if p["fits"] else "red")
            ax.set_xticks(range(len(mbs)), [str(m) for m in mbs])
            ax.set_yticks(range(len(seqs)), [str(s) for s in seqs])
            ax.set_title(f"{bits}-bit, ckpt {'on' if ckpt else 'off'}, r={r}", fontsize=9)
            if i == len(panels) - 1:
                ax.set_xlabel("micro-batch")
            if j == 0:
                ax.set_ylabel("seq_len")
    fig.colorbar(im, ax=axes, label="predicted peak reserved (GiB)", shrink=0.5)
    fig.suptitle(f"{f['model']}: predicted peak; ✗ = over {fmt_bytes(f['budget_bytes'])}"
                 + (", • = measured" if measured else ""), fontsize=10)
    return _png(fig)


def plot_feasibility_measured(f: dict) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ok = [m for m in f["measured"] if m["peak_allocated_bytes"] is not None]
    xs = [m["predicted_peak_allocated_bytes"] / GIB for m in ok]
    ys = [m["peak_allocated_bytes"] / GIB for m in ok]
    ax.scatter(xs, ys, c=["tab:green" if m["status"] == "ok" else "tab:red" for m in ok])
    top = max(xs + ys + [0.1]) * 1.1
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="measured = predicted")
    ax.axhline(f["budget_bytes"] / GIB, color="tab:red", lw=0.8, label="budget")
    ax.set_xlabel("predicted peak allocated (GiB)")
    ax.set_ylabel("measured max_memory_allocated (GiB)")
    ax.legend(fontsize=8)
    ax.set_title("planner vs real train steps (red = out of memory)", fontsize=10)
    return _png(fig)


def _budget_axis(budgets: list[int]) -> tuple[list[float], str]:
    if max(budgets) >= GIB:
        return [b / GIB for b in budgets], "memory budget (GiB)"
    return [b / MIB for b in budgets], "memory budget (MiB)"


def plot_throughput(t: dict) -> bytes:
    plt = _pyplot()
    pts = [p for p in t["points"] if p.get("tokens_per_s") is not None]
    xs, xlabel = _budget_axis([p["budget_bytes"] for p in pts])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(xs, [p["tokens_per_s"] for p in pts], "o", color="tab:blue")
    front = sorted((x, p["tokens_per_s"]) for x, p in zip(xs, pts) if p["pareto"])
    a.step([f[0] for f in front], [f[1] for f in front], where="post", color="tab:orange",
           label="Pareto front")
    for x, p in zip(xs, pts):
        a.annotate(f"mb {p['micro_batch_size']}", (x, p["tokens_per_s"]), fontsize=7,
                   textcoords="offset points", xytext=(4, 4))
    a.set_xlabel(xlabel)
    a.set_ylabel("real tokens/s")
    a.legend(fontsize=8)
    reached = [(x, p["time_to_target_s"]) for x, p in zip(xs, pts)
               if p["time_to_target_s"] is not None]
    b.plot([r[0] for r in reached], [r[1] for r in reached], "o-", color="tab:green")
    b.set_xlabel(xlabel)
    b.set_ylabel(f"seconds to eval loss <= {fmt(t['target_eval_loss'])}")
    fig.suptitle(f"{t['model']}: the planner's config per budget, trained for real", fontsize=10)
    return _png(fig)


def plot_stability(s: dict) -> bytes:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    groups = sorted({(p["quant"], p["optimizer"]) for p in s["summary"]})
    lrs = sorted({p["learning_rate"] for p in s["summary"]})
    width = 0.8 / max(1, len(groups))
    for k, (quant, opt) in enumerate(groups):
        rows = [p for p in s["summary"] if (p["quant"], p["optimizer"]) == (quant, opt)]
        label = f"{quant}, {opt}"
        line = a.plot([p["learning_rate"] for p in rows if p["mean_eval_loss"] is not None],
                      [p["mean_eval_loss"] for p in rows if p["mean_eval_loss"] is not None],
                      "o-", label=label)[0]
        seeds = [p for p in s["points"] if (p["quant"], p["optimizer"]) == (quant, opt)
                 and p["eval_loss"] is not None]
        a.scatter([p["learning_rate"] for p in seeds], [p["eval_loss"] for p in seeds],
                  s=10, color=line.get_color(), alpha=0.5)
        b.bar([i + k * width for i in range(len(lrs))],
              [next((p["diverged"] for p in rows if p["learning_rate"] == lr), 0) for lr in lrs],
              width=width, label=label, color=line.get_color())
    a.set_xscale("log")
    a.set_xlabel("learning rate")
    a.set_ylabel("final eval loss (mean; dots = seeds)")
    a.legend(fontsize=7)
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(lrs))], [f"{lr:g}" for lr in lrs])
    b.set_xlabel("learning rate")
    per_group = max((p["runs"] for p in s["summary"]), default=1)
    b.set_ylim(0, per_group)  # a sweep with no divergence shows an empty 0..n axis, not noise
    b.set_yticks(range(per_group + 1))
    b.set_ylabel(f"diverged runs (of {per_group})")
    fig.suptitle(f"{s['model']}, {s['steps']} steps: {s['rule']}", fontsize=9)
    return _png(fig)


def plot_indirection(d: dict) -> bytes:
    plt = _pyplot()
    variants = list(dict.fromkeys(p["variant"] for p in d["points"]))
    batches = sorted({p["batch_size"] for p in d["points"]})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(batches)
    for k, batch in enumerate(batches):
        rows = {p["variant"]: p for p in d["points"] if p["batch_size"] == batch}
        xs = [i + k * width for i in range(len(variants))]
        a.bar(xs, [1000 * rows[v]["ttft_s"] for v in variants], width, label=f"batch {batch}")
        b.bar(xs, [rows[v]["decode_tokens_per_s"] for v in variants], width,
              label=f"batch {batch}")
    for ax, ylabel in ((a, "time to first token (ms)"), (b, "decode tokens/s (all rows)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(variants))],
                      [v.replace(", ", ",\n").replace(" + ", " +\n") for v in variants],
                      fontsize=7)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"{d['model']}: generation cost of each way to serve the adapter", fontsize=10)
    return _png(fig)


# --- document ------------------------------------------------------------------------------------


def _feasibility_blocks(f: dict) -> list:
    ranks = sorted({p["lora_r"] for p in f["grid"]})
    seqs = sorted({p["seq_len"] for p in f["grid"]})
    rows = []
    for bits in (4, 16):
        for ckpt in (True, False):
            for r in ranks:
                cells = []
                for s in seqs:
                    fit = [p for p in f["grid"] if (p["bits"], p["gradient_checkpointing"],
                           p["lora_r"], p["seq_len"]) == (bits, ckpt, r, s) and p["fits"]]
                    best = max(fit, key=lambda p: p["micro_batch_size"], default=None)
                    cells.append("–" if best is None else f"{best['micro_batch_size']} "
                                 f"({fmt_bytes(best['predicted_peak_reserved_bytes'])})")
                rows.append([f"{bits}-bit", "on" if ckpt else "off", str(r), *cells])
    blocks = [{"p": f"Planner predictions for `{f['model']}` under "
                    f"{fmt_bytes(f['budget_bytes'])}: {f['rule']}. Each cell is the largest "
                    "micro-batch that fits at that sequence length, with its predicted reserved "
                    "peak."},
              {"img": "feasibility.png", "alt": "feasibility heatmaps"},
              {"table": (["base", "checkpointing", "rank", *[f"seq {s}" for s in seqs]], rows)}]
    if "measured_skipped" in f:
        blocks.append({"p": f"Measured confirmation: skipped — {f['measured_skipped']}."})
    else:
        blocks.append({"img": "feasibility_measured.png", "alt": "predicted vs measured"})
        blocks.append({"table": (["run", "predicted fits", "predicted allocated",
                                  "measured allocated", "outcome"],
                                 [[m["run_id"], "yes" if m["predicted_fits"] else "no",
                                   fmt_bytes(m["predicted_peak_allocated_bytes"]),
                                   fmt_bytes(m["peak_allocated_bytes"]), m["status"]]
                                  for m in f["measured"]])})
    return blocks


def _throughput_blocks(t: dict, runs: dict) -> list:
    rows = []
    for p in t["points"]:
        if "skipped" in p:
            rows.append([fmt_bytes(p["budget_bytes"]), f"nothing fits: {p['skipped']}",
                         *[""] * 7])
            continue
        r = runs[p["run_id"]]
        rows.append([fmt_bytes(p["budget_bytes"]),
                     f"{r['micro_batch_size']} x {r['grad_accum_steps']}",
                     "on" if r["gradient_checkpointing"] else "off",
                     fmt_bytes(r["predicted_peak_allocated_bytes"]),
                     fmt_bytes(r["peak_allocated_bytes"]), fmt(p.get("tokens_per_s"), ",.0f"),
                     fmt(p.get("eval_loss")), fmt(p.get("time_to_target_s"), ".1f"),
                     "yes" if p.get("pareto") else ""])
    cap = ("each run in its own process, capped to its budget with "
           "torch.cuda.set_per_process_memory_fraction" if t["capped"] else
           "on CPU no cap can be applied: the budget only chooses the planner's config, and the "
           "measured memory column needs CUDA")
    return [{"p": f"`{t['model']}`, seq_len {t['seq_len']}, {t['rows_per_step']} rows "
                  f"per optimizer step (each micro-batch's rows packed into bins of seq_len "
                  f"tokens), "
                  f"{t['steps']} steps per run; {cap}. Target eval loss "
                  f"{fmt(t['target_eval_loss'])} ({t['target_rule']}); time to target counts "
                  "from the start of training to the first evaluation at or below it, "
                  "evaluations included."},
            {"img": "throughput.png", "alt": "throughput vs budget"},
            {"table": (["budget", "micro-batch x accum", "checkpointing", "predicted peak",
                        "measured peak", "real tok/s", "final eval loss", "s to target",
                        "Pareto"], rows)}]


def _stability_blocks(s: dict) -> list:
    rows = [[f"{p['learning_rate']:g}", p["quant"], p["optimizer"], str(p["runs"]),
             str(p["diverged"]), fmt(p["mean_eval_loss"])] for p in s["summary"]]
    blocks = [{"p": f"`{s['model']}`, {s['steps']} steps per run. {s['rule']}. Final eval loss "
                    "is the mean over the seeds that finished (a run stopped by a NaN has "
                    "none)."},
              {"img": "stability.png", "alt": "stability sweep"},
              {"table": (["learning rate", "base", "optimizer", "runs", "diverged",
                          "mean final eval loss"], rows)}]
    for opt, why in s["optimizers_skipped"].items():
        blocks.append({"p": f"Skipped optimizer `{opt}`: {why}."})
    return blocks


def _indirection_blocks(d: dict) -> list:
    rows = [[p["variant"], str(p["batch_size"]), str(p["prompt_tokens"]),
             fmt(1000 * p["ttft_s"], ".1f"), fmt(p["decode_tokens_per_s"], ",.1f"),
             fmt_bytes(p["weight_bytes"]), fmt_bytes(p["peak_allocated_bytes"])]
            for p in d["points"]]
    merge = d["merge"]
    return [{"p": f"`{d['model']}` with the section-5 adapter. Time to first token = "
                  f"prefill + the first step of a greedy generate; decode rate = the other "
                  f"{d['decode_tokens'] - 1} tokens of every row over the time they took, from "
                  f"per-token timestamps; median of {d['repeats']} after a warm-up; EOS "
                  "suppressed. Weights = "
                  "parameters and buffers as stored; peak allocated needs CUDA. The merge's "
                  f"largest logit difference from base + adapter: "
                  f"{fmt(merge['max_abs_logit_diff'], '.2e')}."},
            {"img": "indirection.png", "alt": "adapter indirection"},
            {"table": (["variant", "batch", "prompt tokens", "TTFT ms", "decode tok/s",
                        "weights", "peak allocated"], rows)}]


def _quality_blocks(q: dict, runs: dict) -> list:
    lines = [line.strip().strip("|").split("|") for line in q["table"].strip().splitlines()]
    header, rows = [c.strip() for c in lines[0]], [[c.strip() for c in r] for r in lines[2:]]
    train = runs[q["train_run_id"]]
    return [{"p": f"`qlora-lab eval --compare-base` on {q['rows']} held-out rows: the base with "
                  f"the adapter switched off vs the fine-tune (run `{q['train_run_id']}`, "
                  f"{train['steps']} steps, eval loss {fmt(train['eval_loss_before'])} -> "
                  f"{fmt(train['eval_loss'])} during training)."},
            {"table": (header, rows)}]


def _made_by(report: dict) -> str:
    reused = len(report.get("reused_runs", ()))
    if not reused:
        return "all made by this invocation"
    return (f"{reused} of them finished by an interrupted invocation of the same command and "
            "reused, the rest made by this one")


def build_document(report: dict) -> tuple[str, list[dict]]:
    cfg, hw, versions = report["config"], report["hardware"], report["versions"]
    runs = report["runs"]
    head = [{"p": f"Regenerate with: `{report['command']}`"},
            {"p": f"Device: {report['device']} ({hw.get('gpu') or hw.get('cpu')}, "
                  f"{hw.get('cpu_count')} CPU cores); "
                  + ", ".join(f"{k} {v}" for k, v in versions.items() if v)
                  + f". Wall time {report['wall_seconds']:.0f} s; "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds"].items())
                  + f". {len(runs)} runs, {_made_by(report)}; report.json holds every "
                  "number and each run's record."}]
    if cfg["quick"]:
        head.append({"p": "`--quick`: the tiny random model and a few steps per run, so the "
                          "numbers show the method, not what a real model does."})
    sections = [("1. Feasibility map", _feasibility_blocks(report["feasibility"])),
                ("2. Throughput vs accessibility", _throughput_blocks(report["throughput"],
                                                                      runs)),
                ("3. Memory vs stability", _stability_blocks(report["stability"])),
                ("4. Adapter indirection", _indirection_blocks(report["indirection"])),
                ("5. Quality", _quality_blocks(report["quality"], runs))]
    return "qlora-lab lab report", [{"title": None, "blocks": head}] + [
        {"title": t, "blocks": b} for t, b in sections]


def to_markdown(title: str, sections: list[dict]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        if sec["title"]:
            out += [f"## {sec['title']}", ""]
        for block in sec["blocks"]:
            if "p" in block:
                out += [block["p"], ""]
            elif "img" in block:
                out += [f"![{block['alt']}]({block['img']})", ""]
            else:
                header, rows = block["table"]
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("")
    return "\n".join(out)


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(title: str, sections: list[dict], images: dict[str, bytes]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        if sec["title"]:
            body.append(f"<h2>{html.escape(sec['title'])}</h2>")
        for block in sec["blocks"]:
            if "p" in block:
                body.append(f"<p>{_inline_code(block['p'])}</p>")
            elif "img" in block:
                data = base64.b64encode(images[block["img"]]).decode("ascii")
                body.append(f'<img src="data:image/png;base64,{data}" '
                            f'alt="{html.escape(block["alt"])}" data-file="{block["img"]}">')
            else:
                header, rows = block["table"]
                cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                trs = "".join("<tr>" + "".join(f"<td>{_inline_code(c)}</td>" for c in r)
                              + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;"
             "padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;"
             "font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"
             "code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


PLOTS = {"feasibility.png": ("feasibility", plot_feasibility),
         "feasibility_measured.png": ("feasibility", plot_feasibility_measured),
         "throughput.png": ("throughput", plot_throughput),
         "stability.png": ("stability", plot_stability),
         "indirection.png": ("indirection", plot_indirection)}


def plot_names(report: dict) -> list[str]:
    measured = bool(report["feasibility"].get("measured"))
    return [name for name in PLOTS if measured or name != "feasibility_measured.png"]


def write_report(report: dict, out: Path) -> None:
    """report.json first (the numbers survive a plotting failure), then the PNGs, report.md and
    report.html; each file is replaced atomically."""
    report["plots"] = plot_names(report)
    fsio.write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    render(report, out)


def render(report: dict, out: Path) -> None:
    """The PNGs, report.md and report.html from a report dict (as read from report.json)."""
    images = {name: PLOTS[name][1](report[PLOTS[name][0]]) for name in report["plots"]}
    for name, data in images.items():
        tmp = out / f"{fsio.TMP_PREFIX}{name}"
        tmp.write_bytes(data)
        fsio.commit_file(tmp, out / name)
    title, sections = build_document(report)
    fsio.write_text(out / "report.md", to_markdown(title, sections))
    fsio.write_text(out / "report.html", to_html(title, sections, images))


if __name__ == "__main__":
    # Re-render a report dir from its report.json (e.g. after a run on a machine without
    # matplotlib): python -m qlora_lab.lab_report DIR
    import sys

    target = Path(sys.argv[1])
    render(json.loads((target / "report.json").read_text(encoding="utf-8")), target)
