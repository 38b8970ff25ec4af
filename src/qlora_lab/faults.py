"""Runtime faults during training: stop signals and non-finite losses.

- SIGINT (Ctrl-C) and SIGTERM (schedulers, `kill`, container shutdown) ask the run to stop: the
  current optimizer step finishes, a checkpoint is written, and `train` exits with a line saying
  how to resume. A second signal stops at once (KeyboardInterrupt).
- A NaN or inf training loss stops the run before that step updates the weights or writes a
  checkpoint, so the last checkpoint on disk is the last good one. Policy: stop, never skip.
  A loss that is already non-finite has poisoned nothing yet; skipping it would hide a learning
  rate or data problem that comes back on the next batch.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class NonFiniteLoss(Exception):
    """Raised before the optimizer step; `train.train_session` turns it into a UserError."""

    def __init__(self, value: float, step: int):
        super().__init__(f"loss became {value} at step {step}")
        self.value = value
        self.step = step


def _any_rank(flag: bool, device) -> bool:
    """True if `flag` is set on any process (under DDP every rank must take the same branch,
    or the ones that did not stop wait forever in the next collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


class NonFiniteLossGuard(TrainerCallback):
    """Stop on a NaN/inf training loss, before the optimizer step that would apply it.

    The trainer reports each micro-batch's loss to `observe`; the decision is taken once per
    optimizer step in `on_pre_optimizer_step` (Trainer's last hook before `optimizer.step()`),
    agreed across processes, so nothing non-finite reaches the weights or a checkpoint.
    """

    def __init__(self) -> None:
        self.bad_loss: float | None = None

    def observe(self, loss: torch.Tensor) -> None:
        # A host-device sync per micro-batch; Trainer already makes the same one to filter NaNs
        # out of its logged loss (logging_nan_inf_filter), so this adds no stall of its own.
        if self.bad_loss is None and not torch.isfinite(loss).all():
            self.bad_loss = loss.detach().float().cpu().max().item()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if _any_rank(self.bad_loss is not None, args.device):
            value = self.bad_loss if self.bad_loss is not None else float("nan")
            raise NonFiniteLoss(value, state.global_step + 1)
        return control


class StopOnSignal(TrainerCallback):
    """Turn SIGINT/SIGTERM into "checkpoint at the next step boundary, then stop".

    The handler only records the signal: Python runs it between bytecodes of the main thread,
    possibly inside Trainer's bookkeeping, so it must not touch training state itself. The
    callback acts at `on_step_end`, right before Trainer's own save/log decision for that step.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped_at_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        requested = _any_rank(self.signal_name is not None, args.device)
        if requested and self.stopped_at_step is None:
            self.signal_name = self.signal_name or "a signal to another process"
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt  # a second signal: the user wants out now
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after the current step, then stopping "
                    "(send it again to stop at once, without saving)", self.signal_name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        """Handle the signals only while training runs; outside it they keep their behaviour."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
