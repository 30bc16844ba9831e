"""Run a training script and SIGKILL it at one chosen moment of its life: the kill-anywhere test's driver.

    python tests/kill_at.py MOMENT N gan_mnist.py [flags...]

The process kills itself (SIGKILL: no handler, no `finally`, as an out-of-memory kill or a power
cut) at the N-th time it reaches MOMENT, one of MOMENTS. If it never gets there, it runs to the
end and exits 0, which the test takes as a failure to reach the moment.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import keras  # noqa: E402
from tensorflow.python.checkpoint import functional_saver  # noqa: E402

import utils  # noqa: E402
from ganlab import errors  # noqa: E402
from ganlab.run import loop, outputs  # noqa: E402
from ganlab.sampling import sample  # noqa: E402

moment, wanted = sys.argv[1], int(sys.argv[2])
seen = 0


def reached(name):
    """Count a visit to `name`; on the wanted visit of the chosen moment, die at once."""
    global seen
    if name == moment:
        seen += 1
        if seen == wanted:
            os.kill(os.getpid(), signal.SIGKILL)


def before(name, owner, attribute, when=lambda *args, **kwargs: True):
    """Reach `name` on entering owner.attribute (when `when(args)` holds)."""
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            reached(name)
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapper)


def after(name, owner, attribute, when=lambda *args, **kwargs: True):
    """Reach `name` on leaving owner.attribute (when `when(args)` holds)."""
    original = getattr(owner, attribute)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            reached(name)
        return result

    setattr(owner, attribute, wrapper)


class KillingHooks(loop.Hooks):
    def calls(self, train_steps):
        def counted(indices):
            values = train_steps(indices)
            reached("after-call")  # Trained, not yet recorded in the history.
            return values

        return counted


MOMENTS = {
    "loading-data": lambda: before("loading-data", utils, "load_training_images"),
    "models-built": lambda: after("models-built", loop, "make_state"),
    "after-call": lambda: None,
    # The shards are written to ckpt-N_temp/, the merge into ckpt-N has not run.
    "checkpoint-save": lambda: before("checkpoint-save", functional_saver.gen_io_ops, "merge_v2_checkpoints"),
    # A grid written to its temporary name, not yet renamed into place.
    "epoch-grid": lambda: after("epoch-grid", utils.iio, "imwrite",
                                lambda path, *args, **kwargs: ".epoch_" in str(path)),
    "generator-save": lambda: after("generator-save", keras.Model, "save"),
    "history": lambda: before("history", utils, "save_json", lambda path, *args, **kwargs: "history" in str(path)),
    "evaluation": lambda: before("evaluation", sample, "evaluate_generator"),
    "gif": lambda: before("gif", utils, "save_gif"),
    "finish": lambda: before("finish", outputs.EpochOutputs, "finish"),
}

if __name__ == "__main__":
    MOMENTS[moment]()
    script = REPO / sys.argv[3]
    sys.argv = [str(script)] + sys.argv[4:]
    module = runpy.run_path(str(script), run_name="kill_at")
    errors.run_main(lambda argv: module["main"](argv, hooks=KillingHooks()))
