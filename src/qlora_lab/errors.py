"""The one exception type for a user's mistake.

Anything raised as `UserError` reaches the terminal as a single line (what failed, the value, what is
allowed, the next step) and a non-zero exit code. Everything else is a bug and keeps its traceback
under `--debug`.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad path, bad row, bad config value, wrong adapter."""

    def __init__(self, message: str):
        # Errors must stay one line: a multi-line message hides the fix below the fold.
        super().__init__(" ".join(message.split()))


class TrainingInterrupted(UserError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the message says how to resume.

    `exit_code` follows the shell convention for death by a signal (128 + signal number), so
    schedulers and scripts can tell "stopped on request" from "failed".
    """

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class OutOfMemory(UserError):
    """Training ran out of CUDA memory; the message names the config and what to lower.

    Raised by `train` in place of torch's OutOfMemoryError, so that callers (`lab`, `bench`'s
    child processes) can count an OOM as an outcome by its type.
    """


class LossNotFinite(UserError):
    """Training stopped on a NaN/inf loss before applying it; the message names the step, the
    last good checkpoint and what to change. Raised by `train` in place of
    faults.NonFiniteLoss (the trainer's internal signal)."""


class NothingFits(UserError):
    """No micro-batch/checkpointing choice fits the memory budget (the planner's budget search)."""
