"""Run one piece of work in a fresh Python process and read back a typed result.

`bench` (each recipe, and the unsloth peer) and `lab` (its capped training runs) measure this
way, so that CUDA's peak-memory counters, the caching allocator's state and any library's
import-time patching (unsloth reassigns transformers' methods) cannot leak from one measurement
into the next.

The protocol, all of it here:

    parent  run_child("qlora_lab.lab_runs:run_spec", spec, stem, memory_cap_bytes, timeout_s)
            writes STEM.task.json, starts `python -m qlora_lab.child STEM.task.json
            STEM.result.json` and waits
    child   applies the memory cap, calls the target with the spec (a JSON-able dict), writes
            {"outcome", "value" or "error", "versions", "wall_seconds"} to STEM.result.json
    parent  returns a ChildResult; a missing result file means the process died (CRASH, or
            INTERRUPTED when a stop signal killed it), a run past timeout_s is killed (TIMEOUT)

Outcomes are classified from exception types, never from message text (`classify`).
"""

from __future__ import annotations

import enum
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from qlora_lab import fsio
from qlora_lab.errors import LossNotFinite, OutOfMemory, TrainingInterrupted, UserError

log = logging.getLogger(__name__)

# The libraries whose versions every report records.
BASE_PACKAGES = ("qlora-lab", "torch", "transformers", "peft", "bitsandbytes", "accelerate")


class Outcome(enum.Enum):
    """How a child's work ended."""

    OK = "ok"
    OOM = "oom"  # errors.OutOfMemory, or torch's OutOfMemoryError in the exception's chain
    NON_FINITE = "non_finite"  # a NaN/inf loss: errors.LossNotFinite (or faults.NonFiniteLoss)
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: TrainingInterrupted, or killed by the signal
    USER_ERROR = "user_error"  # a UserError: the config or the data is wrong
    CRASH = "crash"  # any other exception (a bug), or the process died without a result
    TIMEOUT = "timeout"  # the parent killed it after timeout_s


@dataclass(frozen=True)
class ChildResult:
    """What one child process returned.

    name: the label the parent gave it (for messages).
    outcome: how it ended.
    value: the target's return value; set only when outcome is OK.
    error: one line, the exception's type and message (or how the process died); None when OK.
    exit_code: the process's exit status (negative: killed by that signal); None after a timeout.
    versions: library versions as the child saw them (its sys.path may differ from ours).
    wall_seconds: from start to exit, as the parent measured it.
    """

    name: str
    outcome: Outcome
    value: dict | None = None
    error: str | None = None
    exit_code: int | None = None
    versions: dict = field(default_factory=dict)
    wall_seconds: float = 0.0

    def unwrap(self) -> dict:
        """The value, or ChildFailed carrying this result."""
        if self.outcome is not Outcome.OK:
            raise ChildFailed(self)
        return self.value


class ChildFailed(RuntimeError):
    """A child returned no value; `.result.outcome` says why (OOM, user error, crash, ...)."""

    def __init__(self, result: ChildResult):
        super().__init__(f"{result.name}: {result.outcome.value}: {result.error}")
        self.result = result


# --- the parent side ----------------------------------------------------------------------------


# CUDA's caching allocator with expandable segments, for training processes: micro-batches of
# packed bins change shape every step, and with fixed segments freed blocks stop fitting the
# next step's tensors; near the card's limit the allocator then frees its cache and retries,
# synchronizing, every step. unsloth sets the same default. It is read once, when CUDA's
# allocator starts: `train` sets it before loading (train.allocator_defaults), bench's qlora_lab
# child gets it through its task, before the memory cap starts CUDA.
CUDA_ALLOCATOR_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def env_defaults(env: dict[str, str]) -> None:
    """Set each variable of `env` this process's environment does not already have."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def run_child(target: str, spec: dict, stem: Path, memory_cap_bytes: int | None = None,
              timeout_s: float | None = None, packages: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> ChildResult:
    """Run `target` ("module:function", called with `spec`) in a fresh Python process.

    stem: path prefix of the task and result files (its folder must exist).
    memory_cap_bytes: on CUDA, the emulated card (set_per_process_memory_fraction); None = all.
    packages: versions to record besides BASE_PACKAGES.
    env: environment defaults the child sets before CUDA starts (the user's own values win).
    """
    task_path, result_path = Path(f"{stem}.task.json"), Path(f"{stem}.result.json")
    task = {"target": target, "spec": spec, "memory_cap_bytes": memory_cap_bytes,
            "packages": list(packages), "env": dict(env or {})}
    fsio.write_text(task_path, json.dumps(task) + "\n")
    result_path.unlink(missing_ok=True)
    name = stem.name.lstrip(".")
    log.info("running %s in its own process", name)
    started = time.perf_counter()
    try:
        # The child's stdout (Trainer prints dicts there) goes to our stderr, so that our stdout
        # carries only the command's output (a table, a report path).
        proc = subprocess.run([sys.executable, "-m", "qlora_lab.child", str(task_path),
                               str(result_path)], check=False, stdout=sys.stderr,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ChildResult(name, Outcome.TIMEOUT, error=f"still running after {timeout_s:g} s; "
                           "killed", wall_seconds=time.perf_counter() - started)
    wall = time.perf_counter() - started
    if not result_path.is_file():
        return ChildResult(name, _death(proc.returncode), exit_code=proc.returncode,
                           error=f"exited {proc.returncode} without a result", wall_seconds=wall)
    found = json.loads(result_path.read_text(encoding="utf-8"))
    return ChildResult(name, Outcome(found["outcome"]), value=found.get("value"),
                       error=found.get("error"), exit_code=proc.returncode,
                       versions=found.get("versions", {}), wall_seconds=wall)


def _death(returncode: int) -> Outcome:
    stop = {-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM}
    return Outcome.INTERRUPTED if returncode in stop else Outcome.CRASH


# --- shared by both sides ----------------------------------------------------------------------


def classify(exc: BaseException) -> Outcome:
    """The outcome an exception stands for, read from its type, never from its message.

    `train` raises errors.OutOfMemory and errors.LossNotFinite (one-line UserErrors). Code that
    trains without `train` (bench's plain recipe, the unsloth peer) lets torch's
    OutOfMemoryError and faults.NonFiniteLoss through as they are, and a library may wrap them
    (`raise ... from`), so those two are also looked for in the exception's chain.
    """
    if isinstance(exc, OutOfMemory):
        return Outcome.OOM
    if isinstance(exc, LossNotFinite):
        return Outcome.NON_FINITE
    chain = _chain(exc)
    torch = sys.modules.get("torch")  # not imported: nothing can have run out of CUDA memory
    if torch is not None and any(isinstance(e, torch.cuda.OutOfMemoryError) for e in chain):
        return Outcome.OOM
    faults = sys.modules.get("qlora_lab.faults")
    if faults is not None and any(isinstance(e, faults.NonFiniteLoss) for e in chain):
        return Outcome.NON_FINITE
    if isinstance(exc, (TrainingInterrupted, KeyboardInterrupt)):
        return Outcome.INTERRUPTED
    if isinstance(exc, UserError):
        return Outcome.USER_ERROR
    return Outcome.CRASH


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and not any(exc is s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def apply_memory_cap(cap_bytes: int | None) -> None:
    """Emulate a card of `cap_bytes` on CUDA (this process only); nothing on CPU."""
    if cap_bytes is None:
        return
    import torch

    if not torch.cuda.is_available():
        log.info("a memory cap applies to CUDA only; ignored here")
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))


def versions(packages: tuple[str, ...] = ()) -> dict:
    """Python's and each package's installed version (None where it is not installed)."""
    found = {"python": platform.python_version()}
    for name in BASE_PACKAGES + tuple(packages):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def hardware() -> dict:
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


# --- the child side -----------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def serve(task_path: str, result_path: str) -> int:
    """The child's main: run the task's target, write its typed result; exit 0 only when OK."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    task = json.loads(Path(task_path).read_text(encoding="utf-8"))
    started = time.perf_counter()
    env_defaults(task.get("env") or {})  # before the memory cap starts CUDA's allocator
    try:
        apply_memory_cap(task["memory_cap_bytes"])
        module, _, function = task["target"].partition(":")
        value = getattr(importlib.import_module(module), function)(task["spec"])
        result = {"outcome": Outcome.OK.value, "value": value}
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 -- every outcome is reported
        outcome = classify(exc)
        if outcome is Outcome.CRASH:
            traceback.print_exc()  # a bug: its traceback belongs on the terminal
        # A UserError's message is already the one line the user should read.
        error = str(exc) if isinstance(exc, UserError) else _one_line(exc)
        result = {"outcome": outcome.value, "error": error}
    result["versions"] = versions(tuple(task.get("packages", ())))
    result["wall_seconds"] = time.perf_counter() - started
    fsio.write_text(Path(result_path), json.dumps(result, indent=2) + "\n")
    return 0 if result["outcome"] == Outcome.OK.value else 1


if __name__ == "__main__":
    sys.exit(serve(*sys.argv[1:3]))
