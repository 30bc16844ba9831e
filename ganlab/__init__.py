"""ganlab: the machinery that gan_mnist.py and dcgan_mnist.py share, so that each script is its GAN.

    configurator.py    the command line and the settings, resolved once, then frozen
    flags.py           the flags that are not hyperparameters, by group, with their checks
    models.py          the parts both GANs are built from: layers, losses, optimizers, the average of G
    run/               training: the loop, its state and checkpoints, the run directory, what the user watches
    devices/           where and how fast: the tf.distribute strategy, precision, XLA
    sampling/          a trained run's samples, and their scores (FID, IS, coverage)
    datasets/          the datasets beyond MNIST (utils.py's), and downloads
    bench.py           --benchmark
    errors.py          one line and an exit status for every failure a user can act on

Importing the package loads TensorFlow and Keras with their C++ start-up chatter muted; the
scripts take `keras` and `tf` from here. Before it loads them, a script run from the command line
has its `--help`, or a bad flag or constant, answered without them (configurator.answer_early).
"""

import os
import sys

from ganlab.datasets.downloads import cache_dir


def _keep_xla_programs():
    """Point TensorFlow's persistent XLA cache at cache_dir()/xla, so that a second process of the same model
    (a resume, a rerun) loads its compiled program instead of compiling it again (30 to 60 s on a GPU).

    TensorFlow reads TF_XLA_FLAGS once, as it loads, so this runs first. A place that cannot be
    written (TensorFlow would then fail every compile) is left out, as is a cache the user set.
    """
    ours = os.environ.pop("GAN_MNIST_XLA_FLAG", None)  # What this project added for a parent process: redone here.
    flags = " ".join(part for part in os.environ.get("TF_XLA_FLAGS", "").split() if part != ours)
    os.environ["TF_XLA_FLAGS"] = flags
    if "persistent_cache_directory" in flags:  # The user's own.
        return
    place = cache_dir() / "xla"
    existing = next((p for p in (place, *place.parents) if p.exists()), None)
    if (existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)
            or any(character.isspace() for character in str(place))):  # TF_XLA_FLAGS splits on spaces.
        return
    os.environ["GAN_MNIST_XLA_FLAG"] = f"--tf_xla_persistent_cache_directory={place}"
    os.environ["TF_XLA_FLAGS"] = f"{flags} {os.environ['GAN_MNIST_XLA_FLAG']}".strip()


def _import_tensorflow_quietly():
    """Import TensorFlow and Keras with their C++ start-up chatter (CUDA probing, CPU notes) muted.

    Those lines are written to file descriptor 2 before any logging setting applies, and would bury
    a one-line error or the progress line. Python errors still surface: they are raised after
    stderr is restored. Training prints the devices in use, so a missing GPU is still reported.
    """
    # Errors too: each failure a user can act on is said in one line of this project's (ganlab/errors.py), and
    # TensorFlow's C++ error lines around it (a cluster's peer lost, say) would bury it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras
        import tensorflow

        tensorflow.config.list_physical_devices("GPU")  # Probes CUDA now, while muted.
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras, tensorflow


def _answer_the_command_line():
    """When a training script runs (`python gan_mnist.py ...`, or an edited copy of it anywhere): its --help or a
    bad flag answered now, in a second, not after TensorFlow's 5 s start; training goes on past here as before."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script and script.endswith(".py"):
        from ganlab import configurator

        configurator.answer_early(script, sys.argv[1:])


_keep_xla_programs()
_answer_the_command_line()
keras, tf = _import_tensorflow_quietly()
