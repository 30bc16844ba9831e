"""Run a training script and send it a signal at one chosen moment of its life: the signal tests' driver.

    python tests/signal_at.py MOMENT SIGNAL gan_mnist.py [flags...]

At the first time the script reaches MOMENT (one of MOMENTS: a compiled call, inside an evaluation, the
evaluation classifier's training, the GIF, the random grid), the process sends itself SIGNAL (INT or TERM),
as a terminal's Ctrl-C or a scheduler would, and goes on: what follows is the script's own
handling. If it never gets there, it runs to the end and exits 0, which the test takes as a
failure to reach the moment.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ganlab import errors, keras  # noqa: E402  (first: TensorFlow loads with its chatter muted)
import utils  # noqa: E402
from ganlab.run import calls  # noqa: E402
from ganlab.sampling import evaluation, sample  # noqa: E402

moment, signum = sys.argv[1], getattr(signal, f"SIG{sys.argv[2]}")
sent = []


def signal_on_entering(owner, attribute, when=lambda *args, **kwargs: True):
    """Send the signal once, on entering owner.attribute (when `when(args)` holds); then run it."""
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(moment)
            os.kill(os.getpid(), signum)  # Handled in the main thread, within its next few instructions.
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapper)


def nth(count):
    """A `when` that holds at its `count`-th call."""
    calls = []

    def when(*args, **kwargs):
        calls.append(1)
        return len(calls) == count

    return when


MOMENTS = {
    "third-call": lambda: signal_on_entering(calls.CompiledCalls, "__call__", nth(3)),
    "evaluation": lambda: signal_on_entering(evaluation.Evaluator, "evaluate"),
    "classifier": lambda: signal_on_entering(keras.Model, "fit"),
    "gif": lambda: signal_on_entering(utils, "save_gif"),  # In the writer thread; the main thread waits for it.
    "random-grid": lambda: signal_on_entering(utils, "save_png", lambda path, *a, **k: "random" in str(path)),
    "sampling": lambda: signal_on_entering(sample, "sample_images"),
}

if __name__ == "__main__":
    MOMENTS[moment]()
    script = REPO / sys.argv[3]
    sys.argv = [str(script)] + sys.argv[4:]
    module = runpy.run_path(str(script), run_name="signal_at")
    errors.run_main(module["main"])
