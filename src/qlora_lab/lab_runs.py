"""The lab's run machinery: how `qlora-lab lab` trains, records and times.

train_and_measure trains one config in this process and returns the record every report number
is read from; run_isolated trains one in a fresh process (child.run_child) under an emulated
card, so CUDA peaks are per run. RunBook holds the records and keeps them on disk, so that an
interrupted lab can continue. long_rows_file writes the full-length rows measured feasibility
runs train on; time_generation times greedy generation for section 4. The lab's recipe and its
sections live in lab.py, which uses this module (never the other way round).
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import random
import statistics
import time
from pathlib import Path

from qlora_lab import child, fsio
from qlora_lab.config import RunConfig, config_from_dict, to_dict
from qlora_lab.errors import TrainingInterrupted, UserError

log = logging.getLogger(__name__)


# --- training runs -------------------------------------------------------------------------------


RECORD_KEYS = ("steps", "eval_loss_before", "eval_loss", "tokens_seen", "tokens_per_s",
               "train_seconds", "wall_seconds", "peak_allocated_bytes", "peak_reserved_bytes",
               "peak_host_rss_bytes")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# Outcomes a lab run may have and still count (a point on the stability or feasibility map),
# by the status they are recorded as; any other failure is the lab's own.
COUNTED = {child.Outcome.NON_FINITE: "nan", child.Outcome.OOM: "oom"}
FINISHED = ("ok", *COUNTED.values())


def train_and_measure(run: RunConfig) -> dict:
    """Train one config in this process; the record every report number is read from.

    A NaN/inf loss and a CUDA OOM stop `train` with a UserError; both are outcomes to count
    here (status "nan", "oom"), not failures of the lab. Other errors propagate.
    """
    import torch

    from qlora_lab.train import run_train

    status, error, summary = "ok", None, {}
    try:
        summary = run_train(run, overwrite=True)
    except UserError as exc:
        status = COUNTED.get(child.classify(exc))
        if status is None:
            raise
        error = str(exc)
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


def run_spec(given: dict) -> dict:
    """A run's process (child.run_child's target)."""
    return train_and_measure(config_from_dict(given["run"]))


def run_isolated(run: RunConfig, cap_bytes: int | None) -> dict:
    """Train in a fresh process under an emulated card of `cap_bytes` (CUDA).

    One broken config must not cost the other runs: a failure becomes the run's record (status
    "error", or the counted status its outcome has), except a stop signal, which stops the lab.
    """
    out = Path(run.train.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = child.run_child("qlora_lab.lab_runs:run_spec", {"run": to_dict(run)}, out,
                             cap_bytes)
    if result.outcome is child.Outcome.OK:
        return result.value
    if result.outcome is child.Outcome.INTERRUPTED:
        raise TrainingInterrupted(f"run {out.name} stopped: {result.error}", 130)
    record = {"status": COUNTED.get(result.outcome, "error"), "error": result.error,
              "run_dir": str(out), "train_losses": [], "evals": []}
    record.update(dict.fromkeys(RECORD_KEYS))
    return record


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RunBook:
    """The lab's run records, by run id; each section adds its runs and reads them back.

    Every training record is also written beside its run dir (RUN_DIR.record.json). With
    `reuse`, a run whose record says it finished is read back instead of trained again: how an
    interrupted lab continues.
    """

    def __init__(self, out: Path, device: str, reuse: bool = False):
        self.out, self.device, self.reuse = out, device, reuse
        self.runs: dict[str, dict] = {}

    def train(self, run_id: str, run: RunConfig, describe: dict) -> dict:
        """Train in this process (its memory cap, if any, is this process's)."""
        if self._reused(run_id):
            return self.runs[run_id]
        log.info("lab: training %s", run_id)
        record = train_and_measure(run)
        free_memory()
        return self.add(run_id, {"kind": "train", **describe, **record})

    def train_many(self, jobs: list[tuple[str, RunConfig, dict]], cap_bytes: int | None,
                   workers: int) -> None:
        """Runs in their own processes, `workers` at a time (CUDA: peaks are per process)."""
        from tqdm.auto import tqdm

        jobs = [job for job in jobs if not self._reused(job[0])]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        futures = {pool.submit(run_isolated, run, cap_bytes): (rid, describe)
                   for rid, run, describe in jobs}
        try:
            for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                            desc="lab runs", unit="run"):
                rid, describe = futures[fut]
                self.add(rid, {"kind": "train", **describe, **fut.result()})
        finally:
            # On a stop signal (or a failure), queued runs must not start; running ones have
            # received the same signal and stop at their next step.
            pool.shutdown(wait=True, cancel_futures=True)

    def add(self, run_id: str, record: dict) -> dict:
        self.runs[run_id] = {"id": run_id, **record}
        if record.get("kind") == "train":
            fsio.write_text(self._record_path(run_id), json.dumps(self.runs[run_id]) + "\n")
        return self.runs[run_id]

    def run_dir(self, run_id: str) -> Path:
        return self.out / "runs" / run_id.replace("/", "__")

    def _record_path(self, run_id: str) -> Path:
        return self.run_dir(run_id).with_name(self.run_dir(run_id).name + ".record.json")

    def _reused(self, run_id: str) -> bool:
        """Read back a finished run's record (reuse only); False if it has to train."""
        path = self._record_path(run_id)
        if not (self.reuse and path.is_file()):
            return False
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("status") not in FINISHED:
            return False  # a failed run trains again: the failure may have been the machine's
        log.info("lab: reusing %s (finished by an earlier run of this lab)", run_id)
        self.runs[run_id] = {**record, "reused": True}
        return True


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

