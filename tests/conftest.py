"""Shared fixtures and helpers: the repository on sys.path, the real datasets found the way the scripts
find them, a script's parsed configuration, small IDX writers and subprocess runs.

A dataset that cannot be found skips the tests that need it, with the way to get it; with
GAN_MNIST_REQUIRE_DATA=1 (as .ci/run sets) it fails them instead, so CI never skips.
"""

import gzip
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import utils  # noqa: E402
from ganlab import configurator, errors, tf  # noqa: E402  (TensorFlow loaded by the package, its chatter muted)
from ganlab.datasets import cifar10  # noqa: E402
from ganlab.devices import speed  # noqa: E402

HOW_TO_GET = {
    "mnist": "set MNIST_DIR to a directory with the four MNIST IDX files, or run a script once to download them",
    "fashion_mnist": "apt-get install dataset-fashion-mnist, or set FASHION_MNIST_DIR",
    "cifar10": "set CIFAR10_DIR to the cifar-10-batches-py directory, or run a script with --dataset cifar10 once",
}


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini) runs a test per core, but keeps 4 GiB of memory for each worker: a worker holds
    TensorFlow and the training processes its tests start."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, memory // 2**32))


def pytest_collection_modifyitems(items):
    """The slow tests first, the family of bad inputs (the longest, 11 min) first of all: over several workers
    the suite then ends on short tests, not on one long one started last."""
    items.sort(key=lambda item: (item.name != "test_every_family_of_bad_input_ends_in_one_line",
                                 item.get_closest_marker("slow") is None))


def _missing(dataset):
    message = f"no {dataset} data found: {HOW_TO_GET[dataset]}"
    if os.environ.get("GAN_MNIST_REQUIRE_DATA") == "1":
        pytest.fail(message + " (GAN_MNIST_REQUIRE_DATA=1: a missing dataset fails instead of skipping)")
    pytest.skip(message)


def dataset_dir(dataset):
    """The directory the scripts would read `dataset`'s train and test splits from (no download), or skip / fail."""
    located = [cifar10.locate(split)[0] if dataset == "cifar10" else utils.locate_idx_dataset(dataset, split)[0]
               for split in ("train", "test")]
    if not all(located) or Path(located[0][0]).parent != Path(located[1][0]).parent:
        _missing(dataset)
    return Path(located[0][0]).parent


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST, where the scripts find it ($MNIST_DIR, data/mnist/, Keras's cache)."""
    return dataset_dir("mnist")


@pytest.fixture(scope="session")
def fashion_dir():
    """The real Fashion-MNIST ($FASHION_MNIST_DIR, data/fashion_mnist/, Debian's copy, Keras's cache)."""
    return dataset_dir("fashion_mnist")


@pytest.fixture(scope="session")
def cifar_dir():
    """The real CIFAR-10's cifar-10-batches-py ($CIFAR10_DIR, data/cifar10/, Keras's cache)."""
    return dataset_dir("cifar10")


def parsed(module, *argv):
    """The settings `module.main` would take from the flags `argv` and the preset, as a dict."""
    return configurator.parse(module.__file__, vars(module), list(argv), presets=getattr(module, "PRESETS", None),
                              auto_preset=getattr(module, "default_arch", None))


def parse(module, *argv):
    """The frozen settings of `argv`'s flags and preset (the devices and precision not yet resolved)."""
    return configurator.freeze(parsed(module, *argv))


def config_for(module, *argv):
    """The frozen settings of `argv`, with the devices, precision, XLA and steps per call resolved as on this
    machine (a fresh run on one device, unless `argv` says otherwise)."""
    return configurator.freeze(configurator.with_devices(parsed(module, *argv)))


@pytest.fixture
def float32_policy_afterwards():
    """Restore what building a model for training changes globally: the precision policy, the remapper."""
    yield
    speed.set_precision("fp32")
    tf.config.optimizer.set_experimental_options({"remapping": True})


def idx_bytes(array, magic):
    """The bytes of an IDX file holding `array` (uint8) under `magic`."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory, count=6, labels_count=None, gz=True, split="train"):
    """Write a small, valid MNIST split (random pixels, labels 0..9) and return (images, labels)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = (np.arange(labels_count if labels_count is not None else count) % 10).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    for name, data in ((f"{prefix}-images-idx3-ubyte", idx_bytes(images, 2051)),
                       (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 2049))):
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return images, labels


def run_script(script, *args, env_extra=None, timeout=300):
    """Run a training script in a subprocess from the repository root; return the CompletedProcess."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


QUICK = ["--limit", "192", "--batch-size", "64", "--eval-every", "0", "--seed", "3"]  # 3 steps an epoch.


def fails(module, argv, capsys):
    """Run `module.main(argv)` as the command line does; return (exit status, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(module.main, argv)
    return exit_status.value.code, capsys.readouterr().err


def contents(directory):
    """Every file under `directory`, as {relative path: bytes}."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def as_from_a_terminal():
    """Popen's preexec_fn for a script a test signals: SIGINT as a terminal delivers it. A shell that starts
    the tests in the background (`cmd &`) makes them, and what they start, ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
