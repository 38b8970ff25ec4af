"""Runtime faults during training: stop signals and non-finite losses.

- SIGINT (Ctrl-C) and SIGTERM (schedulers, `kill`, container shutdown) ask the run to stop: the
  current optimizer step finishes, a checkpoint is written, and `train` exits with a line saying
  how to resume. A second signal stops at once (KeyboardInterrupt).
- A NaN or inf training loss stops the run; that step's update never reaches the weights (the
  optimizer skips it on the device, or the run stops before it), and nothing is written after
  it, so the last checkpoint on disk is the last good one. Policy: stop, never skip and go on.
  A loss that is already non-finite has poisoned nothing yet; going on would hide a learning
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
    """Stop on a NaN/inf training loss; the step whose loss it was never changes the weights.

    The trainer reports each micro-batch's loss to `observe`, which only folds it into a flag
    on the loss's device: reading a GPU value on the host waits for the GPU to finish all the
    work queued so far, and the GPU then idles while the host prepares the next step. What
    keeps a bad step from the weights depends on the optimizer:

    - one that can skip its update on the device (torch's fused AdamW, through the `found_inf`
      input that torch's GradScaler uses) is handed the step's flag; the host reads the flag
      one step later, when the GPU has long written it, and stops there. Before anything is
      written or shown (a checkpoint, an eval, a log line, the end of training) it reads the
      flag at once, so nothing written ever follows a bad step;
    - any other optimizer: the host reads the flag before the optimizer step (one wait per
      optimizer step; bitsandbytes' optimizers wait for the GPU after every tensor anyway).

    Under DDP every rank reads the same step's flag at the same point, and they agree.
    """

    def __init__(self) -> None:
        self._bad: torch.Tensor | None = None  # this optimizer step so far: any loss non-finite
        self._value: torch.Tensor | None = None  # the first non-finite loss (else the last)
        # A step handed to an optimizer that skips on the device: (flag, value, ready, step).
        self._pending: tuple | None = None

    def observe(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        loss = loss.max() if loss.dim() else loss  # nn.DataParallel: one loss per GPU
        bad = ~torch.isfinite(loss)
        if self._bad is None:
            self._bad, self._value = bad, loss
        else:
            self._value = torch.where(self._bad, self._value, loss)
            self._bad = self._bad | bad

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The previous step first: written on the GPU long ago. A flag left on the optimizer
        # by a bad step never reaches another step: this raises before it.
        self._check_pending(args)
        if self._bad is None:  # no loss seen this step (Trainer's loop always reports one)
            return control
        bad, value, step = self._bad, self._value, state.global_step + 1
        self._bad = self._value = None
        skipper = _device_skipping(optimizer)
        if skipper is not None:
            skipper.found_inf = bad.float()  # 1.0: the fused kernel leaves every tensor as it was
        if bad.is_cuda:
            bad, value = bad.to("cpu", non_blocking=True), value.to("cpu", non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            ready = None
        self._pending = (bad, value, ready, step)
        if skipper is None:
            self._check_pending(args)  # nothing else would stop the update: read it now
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after Trainer's flow callback has decided what this step writes or shows.
        if (control.should_save or control.should_evaluate or control.should_log
                or control.should_training_stop):
            self._check_pending(args)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._check_pending(args)  # before `train` writes the adapter
        return control

    def _check_pending(self, args) -> None:
        if self._pending is None:
            return
        bad, value, ready, step = self._pending
        self._pending = None
        if ready is not None:
            ready.synchronize()
        local = bool(bad)
        if _any_rank(local, args.device):
            raise NonFiniteLoss(float(value) if local else float("nan"), step)


def _device_skipping(optimizer) -> torch.optim.Optimizer | None:
    """The torch optimizer under Trainer's wrappers, if it can skip a step on the device.

    `_step_supports_amp_scaling` is how torch marks the optimizers whose step reads
    `found_inf` (the fused ones); every param group must still be fused (a state loaded from
    a checkpoint of an unfused optimizer sets its groups' `fused` back to False).
    """
    inner = optimizer
    # accelerate's AcceleratedOptimizer is itself an Optimizer subclass around the real one.
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    if inner is None or not getattr(inner, "_step_supports_amp_scaling", False):
        return None
    return inner if all(g.get("fused") for g in inner.param_groups) else None


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
