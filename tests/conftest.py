"""Shared fixtures: the repository on sys.path, real MNIST from $MNIST_DIR, and small IDX writers."""

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST files; the smoke runs train on them. CI sets MNIST_DIR=../shared/data/mnist."""
    directory = os.environ.get("MNIST_DIR")
    if not directory or not (Path(directory) / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("set MNIST_DIR to a directory with the four MNIST IDX files (for example ../shared/data/mnist)")
    return Path(directory)


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
