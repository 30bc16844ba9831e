"""Where the datasets are looked for on disk, and the verified downloads when they are not there.

Each download goes to a temporary name beside its destination, its SHA-256 is checked against the
original file's, and only then is it renamed into place: a failed or tampered download leaves
nothing behind. The IDX datasets (MNIST, Fashion-MNIST) come from public mirrors, tried in order;
`$MNIST_MIRROR` and `$FASHION_MNIST_MIRROR` (comma-separated) replace them, so tests can serve the
files from a `file://` URL or a loopback server.
"""

import contextlib
import hashlib
import os
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from ganlab.errors import REPO_DIR, DataError

# Where a dataset is downloaded to when no directory is given: data/<dataset>/ in the repository.
DATA_ROOT = REPO_DIR / "data"

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# SHA-256 of the original gzip files, checked after every download.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
# The IDX-format datasets: the variable that names their directory, the system's copy, Keras's
# cached copy, and where they are downloaded from.
IDX_DATASETS = {
    "mnist": SimpleNamespace(
        title="MNIST", env="MNIST_DIR", mirror_env="MNIST_MIRROR", sha256=MNIST_SHA256,
        mirrors=("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        system_dirs=(), keras_npz="mnist.npz", keras_dir=None),
    "fashion_mnist": SimpleNamespace(
        title="Fashion-MNIST", env="FASHION_MNIST_DIR", mirror_env="FASHION_MNIST_MIRROR", sha256=FASHION_MNIST_SHA256,
        mirrors=("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),  # Debian's dataset-fashion-mnist
        keras_npz=None, keras_dir="fashion-mnist"),
}


def cache_dir():
    """Where this project caches what it computes once (the evaluation classifier, decoded folders, XLA's
    programs): $GAN_MNIST_CACHE, else $XDG_CACHE_HOME/tf2-gan-mnist, else ~/.cache/tf2-gan-mnist."""
    if os.environ.get("GAN_MNIST_CACHE"):
        return Path(os.environ["GAN_MNIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tf2-gan-mnist"


def keras_datasets():
    """Keras's dataset cache: $KERAS_HOME/datasets, else ~/.keras/datasets."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def search_directories(data_dir, env, name):
    """The directories a dataset is looked for in, first to last: --data-dir, its variable, data/<name>/."""
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: --data-dir is not a directory")
    return [Path(d) for d in (data_dir, os.environ.get(env)) if d] + [DATA_ROOT / name]


def remove_stale_parts(directory, name):
    """Remove `.NAME.part-PID*` files that a download killed outright (SIGKILL, SIGTERM) left behind:
    those whose process is gone."""
    for leftover in Path(directory).glob(f".{name}.part-*"):
        pid = leftover.name[len(f".{name}.part-"):].split(".")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and os.path.isdir("/proc"):
            leftover.unlink(missing_ok=True)


def download(url, destination, sha256):
    """Download `url` to `destination` atomically, verifying its SHA-256; raise OSError/ValueError on failure."""
    remove_stale_parts(destination.parent, destination.name)
    temporary = destination.with_name(f".{destination.name}.part-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as handle:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                handle.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"SHA-256 {digest.hexdigest()[:12]}... does not match the expected {sha256[:12]}...")
        os.replace(temporary, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def download_idx(name, directory, split="train"):
    """Download one split's two gzip files of IDX dataset `name` into `directory`, verified; nothing left on failure."""
    spec = IDX_DATASETS[name]
    directory = Path(directory)
    mirrors = [m for m in os.environ.get(spec.mirror_env, "").split(",") if m] or spec.mirrors
    created = [parent for parent in (directory, *directory.parents) if not parent.exists()]  # Removed on failure.
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{directory}: cannot create the download directory ({error.strerror})") from None
    try:
        _download_split(spec, directory, split, mirrors)
    except DataError:
        for folder in created:  # Innermost first: only what this call made, and only if still empty.
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _download_split(spec, directory, split, mirrors):
    """The split's files into `directory`, from the first mirror that serves each; DataError if none does."""
    for base in IDX_FILES[split]:
        file_name = f"{base}.gz"
        if (directory / file_name).is_file():
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + file_name
            try:
                print(f"Downloading {url} ...", file=sys.stderr)
                download(url, directory / file_name, spec.sha256[file_name])
                break
            except (OSError, ValueError) as error:
                failures.append(f"{url}: {getattr(error, 'reason', None) or error}")
        else:
            names = ", ".join(f"{base}.gz" for split_files in IDX_FILES.values() for base in split_files)
            keras_copy = (f", or Keras's {spec.keras_npz} in {keras_datasets()}" if spec.keras_npz
                          else f", or Keras's {spec.keras_dir}/ in {keras_datasets()}")
            raise DataError(f"{directory / file_name}: download failed ({'; '.join(failures)}); put the {spec.title} "
                            f"files ({names}) in a directory and set {spec.env} or --data-dir to it{keras_copy}")
