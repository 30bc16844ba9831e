"""Stopping a run: signals (`StopRequests`), a loss that is no longer finite (`check_finite`), and the
message of each with the command that resumes. What a stopped run saves is `loop.stop`'s.
"""

import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from ganlab.errors import TrainingStopped
from ganlab.run.outputs import METRICS

RESUMED_DIVERGENCE_STEPS = 20  # A resumed run that diverges within these steps diverged in its checkpoint.


def check_finite(call_values, epoch, call_start, run, config, steps_run=0):
    """Stop the run, naming the value, epoch and step, if any step of the call returned NaN or infinity.

    `steps_run` counts the steps this process trained before the call: a resumed run that diverges
    within RESUMED_DIVERGENCE_STEPS of its start has a checkpoint that diverged already (finite, but
    blown-up weights), which no lower rate saves; the message then says to start afresh.
    """
    finite = np.isfinite(call_values).all(axis=1)
    if finite.all():
        return
    row = int(np.argmin(finite))
    bad = METRICS[int(np.argmin(np.isfinite(call_values[row])))]
    prefixes = run.checkpoint_prefixes()
    where = f"{bad} is {call_values[row][METRICS.index(bad)]} at epoch {epoch}, step {call_start + row + 1}"
    half = f"{config.lr / 2:g}"
    if config.resume and steps_run + row < RESUMED_DIVERGENCE_STEPS:
        fresh = shlex.join(["python", f"{config.script}.py", "--out", f"{run.path}-lr{half}", "--lr", half])
        raise TrainingStopped(
            f"{where}, {steps_run + row + 1} steps after resuming: the checkpoint it resumed from has itself "
            f"diverged (its weights are finite but blown up), so resuming it again, at any rate, diverges too; "
            f"start afresh with a lower rate: {fresh} (with the run's other flags, from its config.json)", 1)
    raise TrainingStopped(
        f"{where}: training diverged and stopped; "
        + (f"the last good checkpoint, {Path(prefixes[0]).name}, is kept: continue it with a lower rate, "
           f"{resume_command(config, run, '--lr', half)}" if prefixes
           else "no checkpoint yet: start again with a lower --lr"), 1)


def resume_command(config, run, *extra):
    """The shell command (quoted) that resumes this run."""
    return shlex.join(["python", f"{config.script}.py", "--out", str(run.path), "--resume", *extra])


def interrupted(signum, config, run, where):
    """The TrainingStopped of a signal: where it stopped, and the command that resumes."""
    return TrainingStopped(
        f"{signal.Signals(signum).name}: stopped at {where} and saved a checkpoint, the history, the plots and "
        f"the GIF so far. Resume with: {resume_command(config, run)}", 128 + signum)


class StopNow(BaseException):
    """Training stops for a signal: `step` steps into the epoch after `seconds` of it (all its steps, in its
    evaluation: `StopRequests.at_once`), or with the epoch saved whole (`epoch_saved`).

    A BaseException, as KeyboardInterrupt: raised by a signal inside a Keras call (the evaluation's
    classifier), it must pass `except Exception` on the way untouched (Keras re-raises an Exception
    as a new one of its class, built from its message)."""

    def __init__(self, step=None, seconds=0.0, epoch_saved=False):
        super().__init__(step, seconds, epoch_saved)
        self.step, self.seconds, self.epoch_saved = step, seconds, epoch_saved


class StopRequests:
    """While active, SIGINT (Ctrl-C) and SIGTERM ask training to stop after the current step.

    A second Ctrl-C stops at once, as usual; inside `at_once()` (the evaluation, which takes
    seconds) the first signal does. Outside the main thread signals cannot be caught, and this
    does nothing.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._at_once = None  # Inside `at_once`: the StopNow a signal raises.

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self._at_once:
            print(f"\n{signal.Signals(signum).name} received: stopping now", file=sys.stderr, flush=True)
            raise self._at_once
        print(f"\n{signal.Signals(signum).name} received: saving after this step "
              f"(Ctrl-C again stops at once, losing the epoch in progress)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def at_once(self, step=None, seconds=0.0, epoch_saved=False):
        """A block that a signal interrupts with StopNow(step, seconds, epoch_saved) (at once if one is already
        pending, and at its end if the signal's raise inside it was lost)."""
        if self.signal is not None:
            raise StopNow(step, seconds, epoch_saved)
        self._at_once = StopNow(step, seconds, epoch_saved)
        try:
            yield
        finally:
            self._at_once = None
        if self.signal is not None:  # Its raise was lost: Python drops what a handler raises inside a `__del__`.
            raise StopNow(step, seconds, epoch_saved)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
