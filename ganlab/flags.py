"""Every flag that is not a hyperparameter, in its group, with its check.

The hyperparameters' flags come from the constants at the top of each script (configurator.py);
these are the others. Each group names the module that reads it. This module, like configurator.py's
parsing, loads no TensorFlow, so that `--help` and a bad flag are answered before TensorFlow's
5 s start (ganlab/__init__.py).
"""

import argparse
import os
from pathlib import Path

import utils
from ganlab.errors import UsageError

CHECKPOINT_MINUTES = 10.0  # Besides each epoch's end: a crash loses minutes of training, not an epoch.
PEER_TIMEOUT = 10.0  # Minutes a worker waits for its cluster: a peer that never starts must not hang it for ever.
# --distribute auto mirrors over a box's GPUs only when each GPU's share of a step's forward passes is at least
# this many billion multiply-adds: under it the ~20 collectives of a mirrored step (a few tens of microseconds
# each, over NVLink) outweigh the share's arithmetic (about 1 ms at 10 G on a current GPU), so one GPU is faster.
# The default DCGAN (64 x 0.18 G) stays on one GPU; --arch 64 (100 x 2.0 G) mirrors over up to 20.
MIRROR_MIN_GMACS = 10.0
# On GPUs, --steps-per-call 0 runs enough steps in a call that it holds about this many multiply-adds of
# training (a step: ~9 times its forward passes' `step_multiply_adds`, with the backward passes), some tens
# of milliseconds on a current GPU, so that the host's ~1 ms between calls is small beside it.
GPU_CALL_MULTIPLY_ADDS = 2e12


def add_flags(parser, script_name):
    """Add every group of flags to `parser`, in the order --help shows them."""
    _add_data(parser)
    _add_run(parser, script_name)
    _add_training(parser)
    _add_sampling(parser)
    _add_speed(parser)
    _add_devices(parser)
    _add_benchmark(parser)


def check_flags(config):
    """Each group's checks of the parsed `config`, in the same order; UsageError naming the flag."""
    for check in (_check_data, _check_run, _check_training, _check_sampling, _check_speed, _check_devices,
                  _check_benchmark):
        check(config)


# Data: read by utils.py.
def _add_data(parser):
    """The data flag: where the dataset's files are."""
    parser.add_argument_group("data").add_argument(
        "--data-dir", metavar="DIR", default=None,
        help="directory with the dataset's files: MNIST or Fashion-MNIST IDX files (or mnist.npz), "
             "or CIFAR-10's cifar-10-batches-py (default: $MNIST_DIR, $FASHION_MNIST_DIR or "
             "$CIFAR10_DIR, data/<dataset>, the system's and Keras's copies, else download)")


def _check_data(config):
    """--classes names classes of --dataset: refused now, before any data is read."""
    utils.classes_in_play(config)


# Run: read by ganlab/run/directory.py.
def _add_run(parser, script_name):
    """The run-directory flags."""
    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", default=None,
                     help=f"run directory for every output (default: results/{script_name})")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its newest readable checkpoint (or from scratch if it "
                          "has none yet), with its saved hyperparameters (--epochs may grow, --lr may drop)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run that --out already holds (only the files a run writes are removed)")
    return run


def _check_run(config):
    if config.resume and config.overwrite:
        raise UsageError("argument --resume: not allowed with --overwrite")
    if config.out is not None and not config.out.strip():
        raise UsageError("argument --out: empty; name a run directory (default: results/<script>)")
    try:
        (config.out or "").encode("utf-8")
    except UnicodeEncodeError:  # Issue 41, 10: bytes that are no UTF-8, kept by Python as surrogates.
        shown = os.fsencode(config.out).decode("utf-8", "backslashreplace")
        raise UsageError(f"argument --out: {shown} is not a UTF-8 name, which the run's files and messages "
                         f"need; choose another") from None
    if config.out and config.dataset == "folder" and config.data_dir and not (config.generate or config.interpolate or
                                                                              config.evaluate):
        pictures, out = Path(config.data_dir).expanduser().resolve(), Path(config.out).expanduser().resolve()
        if out == pictures or pictures in out.parents:  # Its grids would join the pictures it trains on.
            raise UsageError(f"argument --out: {config.out} is inside --data-dir {config.data_dir}, the folder of "
                             f"pictures the run reads, which it never writes into; choose a directory outside it")


# Training: read by ganlab/run/loop.py.
def _add_training(parser):
    """The training flags that are not hyperparameters."""
    training = parser.add_argument_group("training")
    training.add_argument("--deterministic", action="store_true",
                          help="enable TensorFlow's op determinism, for bit-exact repeats on GPUs (slower; saved "
                               "with the run, so --resume keeps it)")
    training.add_argument("--checkpoint-minutes", metavar="M", type=float, default=CHECKPOINT_MINUTES,
                          help="also save a checkpoint mid-epoch after M minutes of training since the last "
                               f"(0: at the end of each epoch only; default: {CHECKPOINT_MINUTES:g})")


def _check_training(config):
    if not (config.checkpoint_minutes >= 0 and config.checkpoint_minutes != float("inf")):
        raise UsageError(f"argument --checkpoint-minutes: must be 0 or a positive number of minutes, "
                         f"got {config.checkpoint_minutes}")


# Sampling: read by ganlab/sampling/sample.py.
def _add_sampling(parser):
    """The flags that sample or score a trained run instead of training."""
    sampling = parser.add_argument_group("sampling and scoring a trained run (--out)")
    sampling.add_argument("--generate", metavar="N", type=int, default=None,
                          help="do not train: load the run's trained generator (--out) and draw N samples: a grid "
                               "of the first 1,024 at most, and all of them with --samples-npz")
    sampling.add_argument("--samples-npz", metavar="FILE", default=None,
                          help="with --generate: also write the samples as uint8 (N, 28, 28), or (N, 32, 32, 3) for "
                               "CIFAR-10, under the key 'images'")
    sampling.add_argument("--label", metavar="L", default=None,
                          help="with --generate or --interpolate on a conditional run: draw class L only, by name "
                               "or index; a name is that class, an index counts only where no class has that "
                               "name (default: every class in turn)")
    sampling.add_argument("--interpolate", action="store_true",
                          help="do not train: write interpolation.gif, a walk through the run's latent space "
                               "(and, for a conditional run, a morph through its classes)")
    sampling.add_argument("--evaluate", action="store_true",
                          help="do not train: score the run's trained generator (--out) on --num-samples samples")
    sampling.add_argument("--num-samples", metavar="N", type=int, default=0,
                          help="samples scored by each evaluation (default: 0, which is 10000, the size of the MNIST "
                               "test set; for a folder, its picture count up to 10000)")
    return sampling


def _check_sampling(config):
    if config.generate is not None and config.generate < 1:
        raise UsageError(f"argument --generate: must be a positive number of samples, got {config.generate}")
    if config.num_samples and config.num_samples < 2:
        raise UsageError(f"argument --num-samples: must be 0 (auto) or at least 2, got {config.num_samples}")
    if config.evaluate and config.generate is not None:
        raise UsageError("argument --evaluate: not allowed with --generate; run them one after the other")
    if config.label is not None and config.generate is None and not config.interpolate:
        raise UsageError("argument --label: only used with --generate or --interpolate")
    if config.samples_npz is not None and config.generate is None:
        raise UsageError("argument --samples-npz: only used with --generate N")
    if config.samples_npz is not None and not config.samples_npz.endswith(".npz"):
        raise UsageError(f"argument --samples-npz: {config.samples_npz} must end in .npz")


# Speed: read by ganlab/devices/speed.py.
def _add_speed(parser):
    """The speed flags (the benchmark's are in bench.py)."""
    speed = parser.add_argument_group("speed (see --benchmark; the defaults pick what measured fastest on the device)")
    speed.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 on CPUs with AVX512-BF16 or AMX and on GPUs of compute capability 8+, fp16 "
                            "with loss scaling on older GPUs, else fp32 (default: auto)")
    speed.add_argument("--xla", default=None, action=argparse.BooleanOptionalAction,
                       help="compile the train step with XLA (default: on with one GPU; off on the CPU, where it "
                            "measured slower; always off over several replicas: TensorFlow 2.21 compiles a replica's "
                            "step only when every device is a GPU, a path no CPU can run, so it is left untried)")
    speed.add_argument("--steps-per-call", metavar="K", type=int, default=0,
                       help="training steps run in one compiled call (default: 0, which picks 10 for the GAN and 1 "
                            "for the DCGAN on the CPU; on GPUs, enough that a call holds about "
                            f"{GPU_CALL_MULTIPLY_ADDS / 1e12:g} T multiply-adds of training (10 to 100), so that the "
                            "host's ~1 ms per call is small beside it)")
    return speed


def _check_speed(config):
    if config.steps_per_call < 0:
        raise UsageError(f"argument --steps-per-call: must be 0 (auto) or a positive number, got {config.steps_per_call}")


# Devices: read by ganlab/devices/distribute.py.
def _add_devices(parser):
    """The device flags."""
    devices = parser.add_argument_group("devices")
    devices.add_argument("--distribute", choices=("auto", "off", "mirrored", "multi-worker"), default="auto",
                         help="auto: multi-worker when $TF_CONFIG (or a Slurm job step of several tasks) names a "
                              "cluster, else mirror over every visible GPU when there are two or more and each "
                              f"GPU's share of a step's forward passes is at least {MIRROR_MIN_GMACS:g} G "
                              "multiply-adds (the big --arch 64), else one device (one GPU); off: one device; "
                              "mirrored: every GPU, "
                              "or without GPUs the CPU's logical devices (see --cpu-devices); multi-worker: every "
                              "machine of $TF_CONFIG's cluster (default: auto)")
    devices.add_argument("--peer-timeout", metavar="MINUTES", type=float, default=PEER_TIMEOUT,
                         help="with a cluster ($TF_CONFIG or Slurm): how long to wait for every other worker to "
                              "join, and for a collective between them, before stopping in one line "
                              f"(default: {PEER_TIMEOUT:g})")
    devices.add_argument("--cpu", action="store_true",
                         help="train on the CPU: without it, training stops at once on a machine with NVIDIA GPUs "
                              "that TensorFlow cannot use (CUDA_VISIBLE_DEVICES=\"\" says the same)")
    devices.add_argument("--cpu-devices", metavar="N", type=int, default=0,
                         help="split the CPU into N logical devices, for --distribute mirrored on a machine "
                              "without GPUs (default: 0, the CPU as one device)")
    return devices


def _check_devices(config):
    if config.cpu_devices < 0 or config.cpu_devices > 64:
        raise UsageError(f"argument --cpu-devices: must be from 0 to 64, got {config.cpu_devices}")
    if not 0 < config.peer_timeout < float("inf"):
        raise UsageError(f"argument --peer-timeout: must be a positive number of minutes, got {config.peer_timeout}")


# Benchmark: read by ganlab/bench.py.
def _add_benchmark(parser):
    """The benchmark's flags."""
    group = parser.add_argument_group("benchmark")
    group.add_argument("--benchmark", action="store_true",
                       help="do not train: time training steps at steady state and print a table against the "
                            "machine's matmul peak and a plain fp32 step")
    group.add_argument("--batch-sizes", metavar="LIST", default=None,
                       help="with --benchmark: also time these batch sizes, e.g. 32,64,128,256")
    return group


def _check_benchmark(config):
    """--batch-sizes needs --benchmark, and lists positive integers."""
    if config.batch_sizes is None:
        return
    if not config.benchmark:
        raise UsageError("argument --batch-sizes: only used with --benchmark")
    batch_sizes(config.batch_sizes)


def batch_sizes(text):
    """--batch-sizes as a tuple of positive integers (None without it); UsageError naming the flag."""
    if text is None:
        return None
    try:
        sizes = tuple(int(size) for size in text.split(","))
        if min(sizes) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"argument --batch-sizes: expected positive integers separated by commas, "
                         f"got {text!r}") from None
    return sizes
