"""ganlab: the machinery that gan_mnist.py and dcgan_mnist.py share, so that each script is its GAN.

    configurator.py    the command line and the settings, resolved once, then frozen
    models.py          the parts both GANs are built from: layers, losses, optimizers, the average of G
    run/               training: the loop, its state and checkpoints, the run directory, what the user watches
    devices/           where and how fast: the tf.distribute strategy, precision, XLA
    sampling/          a trained run's samples, and their scores (FID, IS, coverage)
    datasets/          the datasets beyond MNIST (utils.py's), and downloads
    bench.py           --benchmark
    errors.py          one line and an exit status for every failure a user can act on

Importing the package loads TensorFlow and Keras with their C++ start-up chatter muted; the
scripts take `keras` and `tf` from here.
"""

import os
import sys


def _import_tensorflow_quietly():
    """Import TensorFlow and Keras with their C++ start-up chatter (CUDA probing, CPU notes) muted.

    Those lines are written to file descriptor 2 before any logging setting applies, and would bury
    a one-line error or the progress line. Python errors still surface: they are raised after
    stderr is restored. Training prints the devices in use, so a missing GPU is still reported.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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


keras, tf = _import_tensorflow_quietly()
