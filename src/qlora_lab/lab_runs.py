"""The lab's run machinery: how `qlora-lab lab` trains, records and times.

base_run is the lab's training recipe. train_and_measure trains one config in this process and
returns the record every report number is read from; run_isolated trains one in a fresh process
(`python -m qlora_lab.lab_runs SPEC RESULT`, the _worker below) under an emulated card, so CUDA
peaks are per run. Lab holds the records. long_rows_file writes the full-length rows measured
feasibility runs train on; time_generation times greedy generation for section 4. The sections
that use them live in lab.py.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_lab.config import RunConfig, config_from_dict, to_dict
from qlora_lab.errors import UserError

if TYPE_CHECKING:
    from qlora_lab.lab import LabConfig

log = logging.getLogger(__name__)


# --- training runs -------------------------------------------------------------------------------


def base_run(cfg: LabConfig, run_dir: Path, model: str, steps: int, **sections) -> RunConfig:
    """The lab's training recipe; `sections` override it ({"train": {...}, "quant": {...}})."""
    values = {
        "model": {"name": model},
        "lora": {"dropout": 0.0},
        "data": {"source": cfg.data, "eval_source": cfg.eval_data, "max_seq_len": cfg.seq_len,
                 "max_eval_rows": cfg.eval_rows},
        "train": {"output_dir": str(run_dir), "max_steps": steps, "micro_batch_size": 8,
                  "grad_accum_steps": max(1, cfg.rows_per_step // 8),
                  "learning_rate": cfg.learning_rate, "warmup_ratio": 0.1, "logging_steps": 1,
                  "eval_steps": cfg.eval_steps, "save_steps": steps + 1, "tensorboard": False},
    }
    for section, kv in sections.items():
        values[section] = {**values.get(section, {}), **kv}
    return config_from_dict(values)


RECORD_KEYS = ("steps", "eval_loss_before", "eval_loss", "tokens_seen", "tokens_per_s",
               "train_seconds", "wall_seconds", "peak_allocated_bytes", "peak_reserved_bytes",
               "peak_host_rss_bytes")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def train_and_measure(run: RunConfig) -> dict:
    """Train one config in this process; the record every report number is read from.

    A NaN/inf loss stops `train` with a UserError (faults.NonFiniteLoss) and a CUDA OOM becomes
    one too: both are outcomes to count here, not failures of the lab.
    """
    import torch

    from qlora_lab.train import run_train

    status, error, summary = "ok", None, {}
    try:
        summary = run_train(run, overwrite=True)
    except UserError as exc:
        error = str(exc)
        if "training loss became" in error:
            status = "nan"
        elif "out of memory" in error:
            status = "oom"
        else:
            raise
    metrics = _read_jsonl(Path(run.train.output_dir) / "metrics.jsonl")
    evals = [r for r in metrics if "eval_loss" in r]
    t0 = evals[0]["time"] if evals else None
    record = {
        "status": status, "error": error, "run_dir": run.train.output_dir,
        "train_losses": [r["loss"] for r in metrics if "loss" in r],
        # seconds from the end of the step-0 evaluation (the start of training)
        "evals": [{"step": r["step"], "seconds": round(r["time"] - t0, 3),
                   "eval_loss": r["eval_loss"]} for r in evals],
    }
    for key in RECORD_KEYS:
        record[key] = summary.get(key)
    if torch.cuda.is_available() and status != "ok":
        record["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return record


def _apply_cap(cap_bytes: int | None) -> None:
    import torch

    if cap_bytes and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))


def run_isolated(run: RunConfig, cap_bytes: int | None) -> dict:
    """Train in a fresh process under an emulated card of `cap_bytes` (CUDA)."""
    out = Path(run.train.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec, result = out.with_name(out.name + ".spec.json"), out.with_name(out.name + ".result.json")
    spec.write_text(json.dumps({"run": to_dict(run), "cap_bytes": cap_bytes}), encoding="utf-8")
    result.unlink(missing_ok=True)
    # The child's stdout (Trainer prints dicts) goes to our stderr: stdout is the report path.
    proc = subprocess.run([sys.executable, "-m", "qlora_lab.lab_runs", str(spec), str(result)],
                          check=False, stdout=sys.stderr)
    if not result.is_file():
        raise RuntimeError(f"lab run {out} exited {proc.returncode} without a result")
    return json.loads(result.read_text(encoding="utf-8"))


def _worker(spec_path: str, result_path: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    _apply_cap(spec["cap_bytes"])
    try:
        record = train_and_measure(config_from_dict(spec["run"]))
    except Exception as exc:  # noqa: BLE001 -- one broken config must not cost the other runs
        record = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                  "run_dir": spec["run"]["train"]["output_dir"], "train_losses": [], "evals": []}
        record.update(dict.fromkeys(RECORD_KEYS))
    Path(result_path).write_text(json.dumps(record), encoding="utf-8")
    return 0


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Lab:
    """Holds the run records; each section adds its runs and returns its numbers."""

    def __init__(self, cfg: LabConfig, out: Path, device: str):
        self.cfg, self.out, self.device = cfg, out, device
        self.runs: dict[str, dict] = {}

    def train(self, run_id: str, run: RunConfig, describe: dict) -> dict:
        log.info("lab: training %s", run_id)
        record = train_and_measure(run)
        _free_memory()
        return self.add(run_id, {"kind": "train", **describe, **record})

    def train_many(self, jobs: list[tuple[str, RunConfig, dict]], cap_bytes: int | None,
                   workers: int) -> None:
        """Runs in their own processes, `workers` at a time (CUDA: peaks are per process)."""
        from tqdm.auto import tqdm

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(run_isolated, run, cap_bytes): (rid, describe)
                       for rid, run, describe in jobs}
            for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                            desc="lab runs", unit="run"):
                rid, describe = futures[fut]
                self.add(rid, {"kind": "train", **describe, **fut.result()})

    def add(self, run_id: str, record: dict) -> dict:
        self.runs[run_id] = {"id": run_id, **record}
        return self.runs[run_id]

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id.replace("/", "__")


# --- inputs and timing ---------------------------------------------------------------------------


def long_rows_file(path: Path, rows: int, chars: int, seed: int = 0) -> Path:
    """Rows whose answer alone outlasts any seq_len: every sequence is full, as the planner
    assumes (real rows shorter than seq_len would under-fill batches and under-measure)."""
    rng = random.Random(seed)
    words = [f"w{rng.randrange(10**6)}" for _ in range(2000)]
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(rows):
            text = " ".join(rng.choice(words) for _ in range(chars // 7))
            fh.write(json.dumps({"instruction": "Continue the list.", "context": "",
                                 "response": text}) + "\n")
    return path


def time_generation(loaded, prompts: list, new_tokens: int, repeats: int) -> dict:
    """Time to first token and decode rate of a greedy `generate`, from per-token timestamps.

    A streamer notes the clock as each token leaves generate (transformers moves it to the host
    first, a sync point on CUDA). TTFT = first token - start (prefill + one step); decode rate =
    the remaining tokens of every row over the time they took. EOS is suppressed
    (min_new_tokens) so every repeat decodes the same number of tokens; medians of `repeats`.
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    from qlora_lab.evaluate import encode_prompts

    class Clock(BaseStreamer):
        def __init__(self):
            self.marks: list[float] = []

        def put(self, value):  # the first call carries the prompt, then one per new token
            self.marks.append(time.perf_counter())

        def end(self):
            pass

    tok, model = loaded.tokenizer, loaded.model
    enc = encode_prompts(loaded, prompts)
    cuda = loaded.device == "cuda"

    @torch.inference_mode()
    def timed(n: int) -> tuple[float, float]:
        clock = Clock()
        if cuda:
            torch.cuda.synchronize()  # the clock must not start while earlier kernels run
        start = time.perf_counter()
        model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                       use_cache=True, streamer=clock)
        tokens = clock.marks[1:]
        return tokens[0] - start, tokens[-1] - tokens[0]

    # Warm-up at full length: kernel selection, allocator growth, bitsandbytes' CPU repacking and
    # the GPU's clocks, for every decode shape the timed runs will see.
    timed(new_tokens)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [timed(new_tokens) for _ in range(repeats)]
    ttft, decode_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    weights = sum(t.numel() * t.element_size()
                  for t in list(model.parameters()) + list(model.buffers()))
    return {"ttft_s": ttft, "decode_s": decode_s,
            "prompt_tokens": int(enc["input_ids"].shape[1]),
            "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / decode_s,
            "weight_bytes": weights,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}


if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
