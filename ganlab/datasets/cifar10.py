"""CIFAR-10: the python-version batches, read through a restricted unpickler, and their verified download.

The batches are pickles, and unpickling a file can run any code it names; `_CifarUnpickler`
accepts only what a CIFAR-10 batch holds and refuses every other global with a one-line error.
"""

import contextlib
import io
import os
import pickle  # Only through _CifarUnpickler, which refuses every global but numpy's arrays.
import pickletools
import sys
import tarfile
from pathlib import Path

import numpy as np

from ganlab.datasets import downloads
from ganlab.errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # $CIFAR10_URL replaces it.
SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


BATCH_BYTES = 40 * 2**20  # Each batch file is about 30 MB (10,000 images of 3,072 bytes); larger is not a batch.


def _bounded(function):
    """`function(subtype, shape, dtype)` (numpy's array constructors) refusing arrays over BATCH_BYTES."""

    def construct(subtype, shape, dtype, *rest):
        size = np.prod(np.asarray(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
        if not 0 <= size <= BATCH_BYTES:
            raise pickle.UnpicklingError(f"an array of shape {shape} is larger than a CIFAR-10 batch")
        return function(subtype, shape, dtype, *rest)

    return construct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, numbers, strings, bytes and numpy arrays.

    Any other global a pickle names (os.system, say) is refused before it is looked up, so a
    malicious file cannot run code; the array constructors refuse sizes no batch has. The arrays
    are then checked for type and shape by the caller.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # How Python 3 writes bytes into a protocol-2 pickle; it only encodes text.

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: not part of the CIFAR-10 format")
        found = super().find_class(module, name)
        if name == "_reconstruct":
            return _bounded(found)
        if name == "ndarray":  # Passed to _reconstruct as the type; called directly, it could allocate anything.
            return _BoundedArray
        return found


class _BoundedArray(np.ndarray):
    """numpy.ndarray as a batch's pickle may name it: a direct call refuses sizes no batch has."""

    def __new__(cls, shape, dtype=float, *rest, **options):
        return _bounded(lambda subtype, *args: np.ndarray.__new__(np.ndarray, *args, **options))(
            cls, shape, dtype, *rest)


def read_batch(path):
    """Read one CIFAR-10 python batch as (images uint8 (N, 32, 32, 3), labels uint8 (N,)).

    The file is read whole only if it is no larger than a batch, and its pickle opcodes are
    checked against the bytes present before anything is built, so a declared size cannot make
    the reader allocate more than that.
    """
    path = Path(path)
    try:
        if path.stat().st_size > BATCH_BYTES:
            raise DataError(f"{path}: {path.stat().st_size} bytes, larger than a CIFAR-10 batch")
        content = path.read_bytes()
        for _ in pickletools.genops(io.BytesIO(content)):  # Raises ValueError for a length past the end.
            pass
        batch = _CifarUnpickler(io.BytesIO(content), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        if str(error).startswith("refused"):
            raise DataError(f"{path}: {error}") from None
        raise DataError(f"{path}: not a CIFAR-10 batch ({error})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(error).__name__}: {error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict with data and labels)")
    data, labels = batch[b"data"], batch[b"labels"]
    data = np.asarray(data) if isinstance(data, np.ndarray) else data  # A plain array, not _BoundedArray.
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data must be a uint8 array of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if not isinstance(labels, list) or not all(isinstance(label, int) and 0 <= label <= 9 for label in labels):
        raise DataError(f"{path}: labels must be a list of integers 0..9")
    if len(data) != len(labels):
        raise DataError(f"{path} data: {len(data)} images but its labels has {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), np.array(labels, np.uint8)


def _files_in(directory, split):
    """The batch files of `split` in `directory`, or None if it holds none of CIFAR-10's; DataError naming
    the missing ones if it holds some batches but not all of `split`'s."""
    paths = [Path(directory) / name for name in FILES[split]]
    if all(p.is_file() for p in paths):
        return paths
    if any((Path(directory) / name).is_file() for name in FILES["train"] + FILES["test"]):
        missing = [p.name for p in paths if not p.is_file()]
        raise DataError(f"{directory}: incomplete CIFAR-10: {', '.join(missing)} missing (the {split} split needs "
                        f"{', '.join(FILES[split])})")
    return None


def locate(split="train", data_dir=None):
    """The batch files of `split` where `load` finds them, without downloading (or None), and the
    directories searched: `data_dir`, `$CIFAR10_DIR`, `data/cifar10/`, Keras's cache."""
    searched = (downloads.search_directories(data_dir, "CIFAR10_DIR", "cifar10")
                + [downloads.keras_datasets() / "cifar-10-batches-py"])
    return next((f for f in (_files_in(d, split) for d in searched) if f), None), searched


def download(directory):
    """Download the official archive, verify its SHA-256 and extract the batches into `directory`.

    Only the expected member names are extracted (no path in the archive can point elsewhere), and
    each is written to a temporary name first: a failure leaves nothing behind.
    """
    directory = Path(directory)
    url = os.environ.get("CIFAR10_URL", URL)
    created = [parent for parent in (directory, *directory.parents) if not parent.exists()]  # Removed on failure.
    try:
        directory.mkdir(parents=True, exist_ok=True)
        archive = directory / ".cifar-10-python.tar.gz"  # Removed once extracted; a later download replaces it.
        print(f"Downloading {url} ...", file=sys.stderr)
        downloads.download(url, archive, SHA256)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for name in FILES["train"] + FILES["test"] + ("batches.meta",):
                    temporary = directory / f".{name}.tmp-{os.getpid()}"
                    try:
                        with tar.extractfile(tar.getmember(f"cifar-10-batches-py/{name}")) as source:
                            temporary.write_bytes(source.read())
                        os.replace(temporary, directory / name)
                    finally:
                        with contextlib.suppress(FileNotFoundError):
                            temporary.unlink()
        finally:
            archive.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, tarfile.TarError) as error:
        for folder in created:  # Innermost first: only what this call made, and only if still empty.
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(f"{directory}: CIFAR-10 download failed ({getattr(error, 'reason', None) or error}); "
                        f"put cifar-10-batches-py there or set CIFAR10_DIR") from None


def load(split="train", data_dir=None, limit=0, download_missing=True):
    """Load a CIFAR-10 split as (images uint8 (N, 32, 32, 3), labels uint8 (N,)).

    Looks in `data_dir`, `$CIFAR10_DIR`, `data/cifar10/` in the repository and Keras's cache
    (`~/.keras/datasets/cifar-10-batches-py`); else downloads the official archive, verified.
    `limit` > 0 keeps the first images.
    """
    files, searched = locate(split, data_dir)
    if files is None:
        if not download_missing:
            raise DataError(f"{searched[0]}: no CIFAR-10 {split} batches (looked in {', '.join(map(str, searched))})")
        download(searched[0])
        files = _files_in(searched[0], split)
    batches = [read_batch(path) for path in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return (images[:limit], labels[:limit]) if limit else (images, labels)
