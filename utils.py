"""What gan_mnist.py and dcgan_mnist.py share: configuration, data, images and the run's bookkeeping.

The two training scripts hold the GAN itself (models, losses, the D and G updates); everything
around it lives here once:

- configuration: the scripts' blocks of hyperparameter constants become command-line flags
  (`parse_config`), checked before anything is built;
- data: MNIST and Fashion-MNIST from IDX files (or Keras's `mnist.npz`), CIFAR-10 from its python
  batches through a restricted unpickler, each found or downloaded and verified (`load_dataset`),
  `--classes` subsets, and the presets' resizing to and from the native size (`prepare_images`,
  `to_dataset_uint8`);
- models: conditioning on a label (`assemble`, `label_helpers`), precision policies and optimizers
  (`set_precision`, `make_optimizer`), and K training steps in one compiled call (`compile_steps`);
- pictures: image grids, GIFs and the loss and metric plots (`image_grid`, `save_png`, `save_gif`,
  `plot_history`, `plot_metrics`);
- the run: its directory, checkpoints, history and TensorBoard events (`RunDirectory`, `train`),
  the benchmark (`benchmark`), and sampling and scoring a trained run (`generate`, `interpolate`,
  `evaluate_run`; the figures themselves are in evaluation.py).

Every user-facing failure raises `UsageError` (a bad flag: exit status 2), `DataError` (a bad
file or directory: exit status 1) or `TrainingStopped` (a signal or a diverged loss); `run_main`
turns them into one line on stderr.
"""

import argparse
import contextlib
import gzip
import hashlib
import json
import math
import os
import pickle  # Only through _CifarUnpickler, which refuses every global but numpy's arrays.
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import matplotlib
import numpy as np

matplotlib.use("Agg")  # Plots are files; no display is needed or assumed.
import matplotlib.pyplot as plt  # noqa: E402


def _import_tensorflow_quietly():
    """Import TensorFlow and Keras with their C++ start-up chatter (CUDA probing, CPU notes) muted.

    Those lines are written to file descriptor 2 before any logging setting applies, and they would
    bury a one-line error or the progress line. Python errors still surface: they are raised after
    stderr is restored. `train` prints the devices in use, so a missing GPU is still reported.
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
    return tensorflow, keras


tf, keras = _import_tensorflow_quietly()

import evaluation  # noqa: E402  (after TensorFlow, which it uses)

REPO_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Errors the user can act on
# ---------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """A command-line flag or value that cannot be used; reported in one line, exit status 2."""


class DataError(ValueError):
    """A missing, corrupt or unwritable file or directory; reported in one line, exit status 1."""


def run_main(main, argv=None):
    """Run a script's `main(argv)` and turn the errors a user can fix into one line and an exit status."""
    program = Path(sys.argv[0]).name
    try:
        main(argv)
    except UsageError as error:
        print(f"{program}: error: {error} (see --help)", file=sys.stderr)
        sys.exit(2)
    except DataError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except TrainingStopped as stopped:
        print(f"{program}: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_status)
    except KeyboardInterrupt:  # Outside training (loading data, say), or a second Ctrl-C in it.
        print(f"\n{program}: interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Configuration: the scripts' constants as command-line flags
# ---------------------------------------------------------------------------------------------

# A constant in a script's block: NAME = value  # comment (the comment becomes the flag's help).
_CONSTANT_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(?!=)[^#]*?(?:#\s*(.*))?$")

# Checks for the hyperparameters both scripts use, applied to whichever a script defines.
_CHECKS = {
    "epochs": (lambda v: v >= 1, "must be a positive integer"),
    "batch_size": (lambda v: v >= 1, "must be a positive integer"),
    "latent_dim": (lambda v: v >= 1, "must be a positive integer"),
    "kernel_size": (lambda v: v >= 1, "must be a positive integer"),
    "sample_grid": (lambda v: 1 <= v <= 32, "must be an integer from 1 to 32"),
    "limit": (lambda v: v >= 0, "must be 0 (all images) or a positive number of images"),
    "eval_every": (lambda v: v >= 0, "must be 0 (no evaluation) or a positive number of epochs"),
    "dataset": (lambda v: v in ("mnist", "fashion_mnist", "cifar10"), "must be mnist, fashion_mnist or cifar10"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "must be a positive number"),
    "beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "leaky_slope": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "bn_momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "ema": (lambda v: 0 <= v < 1, "must be in [0, 1) (0: no average)"),
    "loss": (lambda v: v in ("ns", "hinge", "ls", "rp"), "must be ns, hinge, ls or rp"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "d_lr_scale": (lambda v: math.isfinite(v) and v > 0, "must be a positive number"),
    "r1": (lambda v: math.isfinite(v) and v >= 0, "must be 0 (no penalty) or a positive number"),
    "r2": (lambda v: math.isfinite(v) and v >= 0, "must be 0 (no penalty) or a positive number"),
    "top_k": (lambda v: 0 < v <= 1, "must be in (0, 1] (1: every fake)"),
    "g_steps": (lambda v: 1 <= v <= 10, "must be a whole number from 1 to 10"),
    "consistency": (lambda v: math.isfinite(v) and v >= 0, "must be 0 (no consistency term) or a positive number"),
    "lr_decay": (lambda v: 0 <= v <= 1, "must be in [0, 1] (0: a constant rate; 1: decay over the whole run)"),
}


class _OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the flag, raised as UsageError."""

    def error(self, message):
        raise UsageError(message)


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def _read_constants(script_path, namespace):
    """Return [(NAME, comment)] for the script's top-level constants of plain type, in source order."""
    constants = []
    for line in Path(script_path).read_text().splitlines():
        match = _CONSTANT_LINE.match(line)
        if match and match.group(1) in namespace:
            value = namespace[match.group(1)]
            if value is None or isinstance(value, (bool, int, float, str)):
                constants.append((match.group(1), (match.group(2) or "").strip()))
    return constants


def _parse_value(kind, flag):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def parse_config(script_path, namespace, argv=None, description=None, presets=None, preset_key="arch",
                 auto_preset=None):
    """Build the run's configuration from a script's constants and the command line.

    Every upper-case constant of plain type (int, float, str, bool or None) at the top of the
    script becomes a flag under the same name (`BATCH_SIZE` is `--batch-size`), with the
    constant's value as its default and its trailing comment as its help. A constant set to None
    takes its value from the chosen preset (`presets[config[preset_key]]`), so each preset carries
    its own defaults; a preset of 'auto' is chosen by `auto_preset(config)`. Besides the hyperparameters there are the run flags shared by both scripts:
    `--out`, `--data-dir`, `--generate` and `--samples-npz`.

    Returns a SimpleNamespace with lower-case names. An unknown flag, a wrong type or a bad value
    raises UsageError naming the flag, before any model is built.
    """
    presets = presets or {}
    script_name = Path(script_path).stem
    parser = _OneLineParser(
        prog=Path(script_path).name,
        allow_abbrev=False,  # A flag is its full name, so --resume can tell which ones were given.
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hyper = parser.add_argument_group("hyperparameters (defaults from the constants at the top of the script)")
    names = []
    for name, comment in _read_constants(script_path, namespace):
        key = name.lower()
        default = namespace[name]
        names.append(key)
        if default is None:
            preset_values = {p: spec[key] for p, spec in presets.items() if key in spec}
            if not preset_values:
                raise TypeError(f"{name} is None but no preset gives {key!r}")
            kind = type(next(iter(preset_values.values())))
            shown = ", ".join(f"{p}: {v}" for p, v in preset_values.items())
            help_text = f"{comment} (default: from --{preset_key}; {shown})"
        else:
            kind = type(default)
            help_text = f"{comment} (default: {default!r})" if default == "" else f"{comment} (default: {default})"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            hyper.add_argument(_flag(name), dest=key, default=default, help=help_text,
                               action=argparse.BooleanOptionalAction)
        else:
            choices = list(presets) + (["auto"] if auto_preset else []) if key == preset_key and presets else None
            hyper.add_argument(_flag(name), dest=key, default=default, help=help_text, metavar=kind.__name__.upper(),
                               type=_parse_value(kind, _flag(name)), choices=choices)

    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", default=None,
                     help=f"run directory for every output (default: results/{script_name})")
    run.add_argument("--data-dir", metavar="DIR", default=None,
                     help="directory with the dataset's files: MNIST or Fashion-MNIST IDX files (or mnist.npz), "
                          "or CIFAR-10's cifar-10-batches-py (default: $MNIST_DIR, $FASHION_MNIST_DIR or "
                          "$CIFAR10_DIR, data/<dataset>, the system's and Keras's copies, else download)")
    run.add_argument("--generate", metavar="N", type=_parse_value(int, "--generate"), default=None,
                     help="do not train: load the run's trained generator (--out) and write an N-sample grid")
    run.add_argument("--samples-npz", metavar="FILE", default=None,
                     help="with --generate: also write the samples as uint8 (N, 28, 28), or (N, 32, 32, 3) for "
                          "CIFAR-10, under the key 'images'")
    run.add_argument("--label", metavar="L", type=_parse_value(int, "--label"), default=None,
                     help="with --generate or --interpolate on a conditional run: draw class L only "
                          "(default: every class in turn)")
    run.add_argument("--interpolate", action="store_true",
                     help="do not train: write interpolation.gif, a walk through the run's latent space "
                          "(and, for a conditional run, a morph through its classes)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint, with its saved hyperparameters "
                          "(--epochs may grow)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run that --out already holds")
    run.add_argument("--deterministic", action="store_true",
                     help="enable TensorFlow's op determinism, for bit-exact repeats on GPUs (slower)")
    speed = parser.add_argument_group("speed (see --benchmark; the defaults pick what measured fastest on the device)")
    speed.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 on CPUs with AVX512-BF16 or AMX and on GPUs of compute capability 8+, fp16 "
                            "with loss scaling on older GPUs, else fp32 (default: auto)")
    speed.add_argument("--xla", default=None, action=argparse.BooleanOptionalAction,
                       help="compile the train step with XLA (default: on with a GPU, off on the CPU, where it "
                            "measured slower)")
    speed.add_argument("--steps-per-call", metavar="K", type=_parse_value(int, "--steps-per-call"), default=0,
                       help="training steps run in one compiled call (default: 0, which picks 10 for the GAN and "
                            "on GPUs, 1 for the DCGAN on the CPU)")
    speed.add_argument("--benchmark", action="store_true",
                       help="do not train: time training steps at steady state and print a table against the "
                            "machine's matmul peak and a plain fp32 step")
    speed.add_argument("--batch-sizes", metavar="LIST", default=None,
                       help="with --benchmark: also time these batch sizes, e.g. 32,64,128,256")
    run.add_argument("--evaluate", action="store_true",
                     help="do not train: score the run's trained generator (--out) on --num-samples samples")
    run.add_argument("--num-samples", metavar="N", type=_parse_value(int, "--num-samples"), default=10_000,
                     help="samples scored by each evaluation (default: 10000, the size of the MNIST test set)")

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    config = SimpleNamespace(**vars(args))
    # The hyperparameters given on the command line (not taken from the script's defaults).
    given = {token.split("=")[0] for token in argv if token.startswith("--")}
    config.explicit = {key for key in names if _flag(key) in given or _flag(key).replace("--", "--no-") in given}

    # Fill the preset's defaults for the constants left as None, then check every value.
    if presets and auto_preset and getattr(config, preset_key) == "auto":
        setattr(config, preset_key, auto_preset(config))
    if presets:
        for key, value in presets[getattr(config, preset_key)].items():
            if key in names and getattr(config, key) is None:
                setattr(config, key, value)
    for key in names:
        value = getattr(config, key)
        if key in _CHECKS and not isinstance(value, bool):
            check, requirement = _CHECKS[key]
            if not check(value):
                raise UsageError(f"argument {_flag(key)}: {requirement}, got {value}")
    if "classes" in names and "dataset" in names and config.dataset in DATASETS:
        parse_classes(config.classes, config.dataset)  # Refuses an unknown class now, before any data is read.
    if getattr(config, "label_smoothing", 0) and config.loss in ("hinge", "rp"):
        raise UsageError(f"argument --label-smoothing: applies to the ns and ls losses, not to --loss {config.loss} "
                         f"(got {config.label_smoothing}; add --loss ns or --loss ls)")
    if config.limit and config.batch_size > config.limit:
        raise UsageError(f"argument --batch-size: {config.batch_size} is larger than the "
                         f"{config.limit} training images of --limit {config.limit}")
    if config.generate is not None and config.generate < 1:
        raise UsageError(f"argument --generate: must be a positive number of samples, got {config.generate}")
    if config.steps_per_call < 0:
        raise UsageError(f"argument --steps-per-call: must be 0 (auto) or a positive number, got {config.steps_per_call}")
    if config.batch_sizes is not None:
        if not config.benchmark:
            raise UsageError("argument --batch-sizes: only used with --benchmark")
        try:
            config.batch_sizes = [int(size) for size in config.batch_sizes.split(",")]
            if min(config.batch_sizes) < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"argument --batch-sizes: expected positive integers separated by commas, "
                             f"got {config.batch_sizes!r}") from None
    if config.num_samples < 2:
        raise UsageError(f"argument --num-samples: must be at least 2, got {config.num_samples}")
    if config.evaluate and config.generate is not None:
        raise UsageError("argument --evaluate: not allowed with --generate; run them one after the other")
    if config.label is not None and config.generate is None and not config.interpolate:
        raise UsageError("argument --label: only used with --generate or --interpolate")
    if config.samples_npz is not None and config.generate is None:
        raise UsageError("argument --samples-npz: only used with --generate N")
    if config.samples_npz is not None and not config.samples_npz.endswith(".npz"):
        raise UsageError(f"argument --samples-npz: {config.samples_npz} must end in .npz")

    config.script = script_name
    config.hyperparameters = names
    config.out = Path(config.out) if config.out else REPO_DIR / "results" / script_name
    return config


def config_dict(config):
    """The configuration as a JSON-ready dict: the hyperparameters, then the run's settings."""
    resolved = {key: getattr(config, key) for key in config.hyperparameters}
    resolved.update(script=config.script, out=str(config.out), data_dir=config.data_dir,
                    num_samples=config.num_samples, precision=config.precision, xla=config.xla,
                    steps_per_call=config.steps_per_call)
    return resolved


# ---------------------------------------------------------------------------------------------
# MNIST: find, download, verify, read
# ---------------------------------------------------------------------------------------------

MNIST_FILES = {
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
# Public mirrors of the original files, tried in order ($MNIST_MIRROR, comma-separated, replaces them).
MNIST_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: 3-D unsigned bytes; 0x0801: 1-D.


def _open_idx_bytes(path):
    """Read an IDX file, gunzipping it when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, zlib.error):
        raise DataError(f"{path}: not a valid gzip file") from None
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None


def read_idx(path, kind):
    """Read an MNIST IDX file of `kind` 'images' (N, 28, 28) or 'labels' (N,), as uint8.

    Raises DataError naming the file for a bad gzip stream, a wrong magic number, a size that
    disagrees with the header, images that are not 28x28 or labels outside 0..9.
    """
    path = Path(path)
    data = _open_idx_bytes(path)
    dims = 3 if kind == "images" else 1
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[kind]:
        raise DataError(f"{path}: bad magic number {magic}, expected {_IDX_MAGIC[kind]} for IDX {kind}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape))
    found = len(data) - header
    if found < expected:
        raise DataError(f"{path}: truncated: header promises {expected} bytes of {kind} for shape {shape}, "
                        f"file holds {found}")
    if found > expected:
        raise DataError(f"{path}: {found - expected} unexpected bytes after the {kind} of shape {shape}")
    if kind == "images" and shape[1:] != (28, 28):
        raise DataError(f"{path}: wrong image size {shape[1]}x{shape[2]}, expected 28x28")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    if kind == "labels" and array.size and array.max() > 9:
        raise DataError(f"{path}: label {array.max()} outside 0..9")
    return array


def _check_pair(images, labels, images_name, labels_name):
    if len(images) != len(labels):
        raise DataError(f"{images_name}: {len(images)} images but {labels_name} has {len(labels)} labels")
    return images, labels


def _read_npz(path, split):
    """Read one split of Keras's mnist.npz (keys x_train, y_train, x_test, y_test) without unpickling."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive[f"x_{split}"], archive[f"y_{split}"]
    except KeyError as error:
        raise DataError(f"{path}: no array {error} in this npz (expected Keras's mnist.npz)") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable npz archive ({error})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path}: x_{split} has shape {images.shape} and type {images.dtype}, "
                        f"expected (N, 28, 28) uint8")
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: y_{split} must be a 1-D array of labels 0..9")
    return _check_pair(images, labels.astype(np.uint8), f"{path} x_{split}", f"y_{split}")


def _idx_files_in(directory, split):
    """The (images, labels) paths of `split` in `directory`, gzip or raw, or None if either is missing."""
    found = []
    for base in MNIST_FILES[split]:
        candidates = [directory / f"{base}.gz", directory / base]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return tuple(found)


def _download(url, destination, sha256):
    """Download `url` to `destination` atomically, verifying its SHA-256; raise OSError/ValueError on failure."""
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


# The IDX-format datasets: where each is looked for, and where it is downloaded from.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
IDX_DATASETS = {
    "mnist": SimpleNamespace(
        title="MNIST", env="MNIST_DIR", mirror_env="MNIST_MIRROR", mirrors=MNIST_MIRRORS, sha256=MNIST_SHA256,
        system_dirs=(), keras_npz="mnist.npz", keras_dir=None),
    "fashion_mnist": SimpleNamespace(
        title="Fashion-MNIST", env="FASHION_MNIST_DIR", mirror_env="FASHION_MNIST_MIRROR",
        mirrors=("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), sha256=FASHION_MNIST_SHA256,
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),  # Debian's dataset-fashion-mnist
        keras_npz=None, keras_dir="fashion-mnist"),
}


def download_idx(name, directory, split="train"):
    """Download one split's two gzip files of IDX dataset `name` into `directory`, verified; nothing left on failure."""
    spec = IDX_DATASETS[name]
    directory = Path(directory)
    mirrors = [m for m in os.environ.get(spec.mirror_env, "").split(",") if m] or spec.mirrors
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{directory}: cannot create the download directory ({error.strerror})") from None
    for base in MNIST_FILES[split]:
        file_name = f"{base}.gz"
        if (directory / file_name).is_file():
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + file_name
            try:
                print(f"Downloading {url} ...", file=sys.stderr)
                _download(url, directory / file_name, spec.sha256[file_name])
                break
            except (OSError, ValueError) as error:
                failures.append(f"{url}: {getattr(error, 'reason', None) or error}")
        else:
            raise DataError(f"{directory / file_name}: download failed ({'; '.join(failures)}); "
                            f"put the {spec.title} files there or set {spec.env}")
    return _idx_files_in(directory, split)


def _keras_datasets():
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def load_idx_dataset(name, split="train", data_dir=None, limit=0, download=True):
    """Load a split of an IDX-format dataset (MNIST, Fashion-MNIST) as uint8 (N, 28, 28) and labels (N,).

    Looks, in order, in `data_dir`, the dataset's environment variable (`$MNIST_DIR`,
    `$FASHION_MNIST_DIR`), `data/<name>/` in the repository, the system's copy (Debian's
    dataset-fashion-mnist) and Keras's cache, for the four IDX files (gzip or raw) or, for MNIST, an
    `mnist.npz`. If none has them, downloads the split from a public mirror into the first of those
    directories given (else `data/<name>/`), verifying SHA-256. `limit` > 0 keeps the first images.
    """
    spec = IDX_DATASETS[name]
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: --data-dir is not a directory")
    directories = [Path(d) for d in (data_dir, os.environ.get(spec.env)) if d]
    directories.append(REPO_DIR / "data" / name)
    searched = directories + list(spec.system_dirs) + ([_keras_datasets() / spec.keras_dir] if spec.keras_dir else [])
    for directory in searched:
        files = _idx_files_in(directory, split)
        if files:
            break
        if spec.keras_npz and (directory / spec.keras_npz).is_file():
            images, labels = _read_npz(directory / spec.keras_npz, split)
            return _apply_limit(images, labels, limit)
    else:
        if spec.keras_npz and (_keras_datasets() / spec.keras_npz).is_file():
            images, labels = _read_npz(_keras_datasets() / spec.keras_npz, split)
            return _apply_limit(images, labels, limit)
        if not download:
            raise DataError(f"{directories[0]}: no {spec.title} {split} files (looked in "
                            f"{', '.join(map(str, searched))})")
        files = download_idx(name, directories[0], split)
    images = read_idx(files[0], "images")
    labels = read_idx(files[1], "labels")
    _check_pair(images, labels, files[0], files[1])
    return _apply_limit(images, labels, limit)


def load_mnist(split="train", data_dir=None, limit=0, download=True):
    """Load an MNIST split as (images uint8 (N, 28, 28), labels uint8 (N,)), white digits on black.

    Looks, in order, in `data_dir`, `$MNIST_DIR`, `data/mnist/` in the repository and Keras's cache
    (`~/.keras/datasets/mnist.npz`) for the four IDX files (gzip or raw) or an `mnist.npz`. If none
    has them, downloads the split from a public mirror into the first of those directories given
    (else `data/mnist/`), verifying SHA-256. `limit` > 0 keeps the first `limit` images.
    """
    return load_idx_dataset("mnist", split, data_dir, limit, download)


def load_fashion_mnist(split="train", data_dir=None, limit=0, download=True):
    """Load a Fashion-MNIST split as (images uint8 (N, 28, 28), labels uint8 (N,)); see load_idx_dataset."""
    return load_idx_dataset("fashion_mnist", split, data_dir, limit, download)


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the python-version batches, read with a restricted unpickler
# ---------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # $CIFAR10_URL replaces it.
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, numbers, strings, bytes and numpy arrays.

    Any other global a pickle names (os.system, say) is refused before it is looked up, so a
    malicious file cannot run code. The arrays are then checked for type and shape by the caller.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # How Python 3 writes bytes into a protocol-2 pickle; it only encodes text.

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to unpickle {module}.{name}: not part of the CIFAR-10 format")


def read_cifar_batch(path):
    """Read one CIFAR-10 python batch as (images uint8 (N, 32, 32, 3), labels uint8 (N,))."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
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
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: data must be a uint8 array of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if not isinstance(labels, list) or not all(isinstance(label, int) and 0 <= label <= 9 for label in labels):
        raise DataError(f"{path}: labels must be a list of integers 0..9")
    _check_pair(data, labels, f"{path} data", "its labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), np.array(labels, np.uint8)


def _cifar_files_in(directory, split):
    paths = [Path(directory) / name for name in CIFAR10_FILES[split]]
    return paths if all(p.is_file() for p in paths) else None


def download_cifar10(directory):
    """Download the official archive, verify its SHA-256 and extract the batches into `directory`.

    Only the expected member names are extracted (no path in the archive can point elsewhere), and
    each is written to a temporary name first: a failure leaves nothing behind.
    """
    directory = Path(directory)
    url = os.environ.get("CIFAR10_URL", CIFAR10_URL)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        archive = directory / f".cifar-10-python.tar.gz.part-{os.getpid()}"
        print(f"Downloading {url} ...", file=sys.stderr)
        _download(url, archive, CIFAR10_SHA256)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for name in CIFAR10_FILES["train"] + CIFAR10_FILES["test"] + ("batches.meta",):
                    member = tar.getmember(f"cifar-10-batches-py/{name}")
                    with tar.extractfile(member) as source, atomic_path(directory / name) as temporary:
                        temporary.write_bytes(source.read())
        finally:
            archive.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, tarfile.TarError) as error:
        raise DataError(f"{directory}: CIFAR-10 download failed ({getattr(error, 'reason', None) or error}); "
                        f"put cifar-10-batches-py there or set CIFAR10_DIR") from None
    return _cifar_files_in(directory, "train")


def load_cifar10(split="train", data_dir=None, limit=0, download=True):
    """Load a CIFAR-10 split as (images uint8 (N, 32, 32, 3), labels uint8 (N,)).

    Looks in `data_dir`, `$CIFAR10_DIR`, `data/cifar10/` in the repository and Keras's cache
    (`~/.keras/datasets/cifar-10-batches-py`); else downloads the official archive, verified.
    """
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"{data_dir}: --data-dir is not a directory")
    directories = [Path(d) for d in (data_dir, os.environ.get("CIFAR10_DIR")) if d]
    directories.append(REPO_DIR / "data" / "cifar10")
    searched = directories + [_keras_datasets() / "cifar-10-batches-py"]
    files = next((f for f in (_cifar_files_in(d, split) for d in searched) if f), None)
    if files is None:
        if not download:
            raise DataError(f"{directories[0]}: no CIFAR-10 {split} batches (looked in {', '.join(map(str, searched))})")
        download_cifar10(directories[0])
        files = _cifar_files_in(directories[0], split)
    batches = [read_cifar_batch(path) for path in files]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return _apply_limit(images, labels, limit)


DATASETS = {
    "mnist": SimpleNamespace(load=load_mnist, shape=(28, 28, 1), classes=tuple(str(d) for d in range(10))),
    "fashion_mnist": SimpleNamespace(load=load_fashion_mnist, shape=(28, 28, 1), classes=(
        "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")),
    "cifar10": SimpleNamespace(load=load_cifar10, shape=(32, 32, 3), classes=CIFAR10_CLASSES),
}


def parse_classes(text, dataset):
    """`--classes` as sorted class indices: a comma-separated list of indices or names; '' means all."""
    names = DATASETS[dataset].classes
    if not text.strip():
        return list(range(len(names)))
    indices = set()
    for token in (t.strip() for t in text.split(",")):
        wanted = token.lower().replace("_", " ")
        if token.isdigit() and int(token) < len(names):
            indices.add(int(token))
        elif wanted in names:
            indices.add(names.index(wanted))
        else:
            raise UsageError(f"argument --classes: {token!r} is not a {dataset} class; use 0..{len(names) - 1} "
                             f"or one of {', '.join(names)}")
    return sorted(indices)


def class_count(config):
    """How many classes the dataset has (the size of a conditional model's one-hot label)."""
    return len(DATASETS[config.dataset].classes)


def one_hot(labels, config):
    """Labels (N,) as float32 one-hot vectors (N, classes): what a conditional G and D take."""
    return np.eye(class_count(config), dtype=np.float32)[np.asarray(labels, np.int64)]


def balanced_labels(count, config):
    """`count` labels cycling through the classes in play (--classes), so every class gets its share."""
    classes = parse_classes(config.classes, config.dataset)
    return np.array([classes[i % len(classes)] for i in range(count)], np.int32)


def assemble(layers, input_shape, config, name, flatten=False):
    """A model applying `layers` to an input of `input_shape`; with --conditional it also takes a label.

    With --spectral-norm, D's Dense and Conv2D layers are spectrally normalised.
    The label (one-hot, (N, classes)) joins the input: concatenated to a vector (z, or the image
    once flattened with `flatten`), or to an image as one constant plane per class stacked on its
    channels. Built from Keras layers only, so a saved model loads in safe mode.
    """
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs) if flatten else inputs
    if getattr(config, "conditional", False):
        label = keras.Input((class_count(config),))
        if len(x.shape) == 2:
            x = keras.layers.Concatenate()([x, label])                              # (N, features + classes)
        else:
            planes = keras.layers.Reshape((1, 1, class_count(config)))(label)
            planes = keras.layers.UpSampling2D(size=tuple(input_shape[:2]))(planes)  # (N, H, W, classes)
            x = keras.layers.Concatenate()([x, planes])                            # (N, H, W, C + classes)
        inputs = [inputs, label]
    for layer in layers:
        if name == "discriminator" and getattr(config, "spectral_norm", False) and isinstance(
                layer, (keras.layers.Dense, keras.layers.Conv2D)):
            # --spectral-norm: each weight layer of D divided by its largest singular value (one
            # power iteration per step), so D is 1-Lipschitz per layer. The wrapper keeps the
            # layer's precision (the float32 logit stays float32).
            layer = keras.layers.SpectralNormalization(layer, dtype=layer.dtype_policy)
        x = layer(x)
    return keras.Model(inputs, x, name=name)


def label_helpers(config, rng):
    """For a train step: `random_labels(n)`, uniform over the classes in play (every one of them,
    the last included), and `conditioned(x, labels)`, the input a model takes ([x, one-hot labels]
    when conditional). Unconditional: no labels are drawn and `conditioned` passes x through."""
    conditional = getattr(config, "conditional", False)
    classes = tf.constant(parse_classes(config.classes, config.dataset), tf.int32)
    count = class_count(config)

    def random_labels(n):
        if not conditional:
            return None
        return tf.gather(classes, rng.uniform((n,), minval=0, maxval=len(classes), dtype=tf.int32))

    def conditioned(x, labels):
        return [x, tf.one_hot(labels, count)] if conditional else x

    return random_labels, conditioned


def load_dataset(config, split="train", limit=0):
    """The `config.dataset` split, kept to `config.classes`, then to the first `limit` images."""
    images, labels = DATASETS[config.dataset].load(split, config.data_dir)
    wanted = parse_classes(config.classes, config.dataset)
    if len(wanted) < len(DATASETS[config.dataset].classes):
        keep = np.isin(labels, wanted)
        images, labels = images[keep], labels[keep]
    return _apply_limit(images, labels, limit)


def load_training_images(config, image_size=None, transform="none"):
    """The training set for a run: the dataset's train split (its --classes, up to --limit), as images
    uint8 (N, S, S, C) at the model's size S (see `prepare_images`) and labels int32 (N,).

    Refuses a batch size larger than the data, as a flag error, before any model is built.
    """
    images, labels = load_dataset(config, "train", config.limit)
    if config.batch_size > len(images):
        raise UsageError(f"argument --batch-size: {config.batch_size} is larger than the {len(images)} training images")
    # Kept as uint8 at the model's size (a quarter of float32's memory, on the device too); each
    # step scales its batch to [-1, 1]. Converted in chunks, so the float copies stay small.
    size = image_size or images.shape[1]
    chunks = [to_uint8(prepare_images(images[i:i + 8192], size, transform)) for i in range(0, len(images), 8192)]
    return np.concatenate(chunks), labels.astype(np.int32)


def cache_dir():
    """Where the evaluation classifier is cached: $GAN_MNIST_CACHE, else ~/.cache/tf2-gan-mnist."""
    if os.environ.get("GAN_MNIST_CACHE"):
        return Path(os.environ["GAN_MNIST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tf2-gan-mnist"


def load_evaluator(dataset="mnist", data_dir=None, classes=""):
    """The sample-quality evaluator for `dataset` (and its --classes): the classifier is trained once
    per dataset (minutes) and cached."""
    config = SimpleNamespace(dataset=dataset, data_dir=data_dir, classes="")
    train_images, train_labels = load_dataset(config, "train")
    test_images, test_labels = load_dataset(config, "test")
    try:
        return evaluation.Evaluator.load_or_train(cache_dir(), train_images, train_labels, test_images, test_labels,
                                                  classes=parse_classes(classes, dataset))
    except OSError as error:
        raise DataError(f"{cache_dir()}: cannot use the classifier cache ({error.strerror or error}); "
                        f"set GAN_MNIST_CACHE to a writable directory") from None


def _apply_limit(images, labels, limit):
    return (images[:limit], labels[:limit]) if limit else (images, labels)


# ---------------------------------------------------------------------------------------------
# Images: the presets' resolutions, grids, PNGs and GIFs
# ---------------------------------------------------------------------------------------------


def prepare_images(images, image_size=28, transform="none"):
    """Dataset uint8 (N, H, W) or (N, H, W, 3) to float32 (N, S, S, C) in [-1, 1], the generator's tanh range.

    `transform` says how the native H x W becomes `image_size`: 'none' (already that size), 'pad'
    (zero-pad with a black border, as the 32x32 MNIST seed does) or 'resize' (bilinear, as the
    64x64 seeds do).
    """
    scaled = images.astype(np.float32)
    scaled /= 127.5
    scaled -= 1.0
    if scaled.ndim == 3:
        scaled = scaled[..., None]
    native, channels = scaled.shape[1], scaled.shape[-1]
    if transform == "none":
        result = scaled
    elif transform == "pad":
        before, after = (image_size - native) // 2, image_size - native - (image_size - native) // 2
        result = np.pad(scaled, ((0, 0), (before, after), (before, after), (0, 0)), constant_values=-1.0)
    elif transform == "resize":
        chunks = [tf.image.resize(scaled[i:i + 4096], (image_size, image_size)).numpy()
                  for i in range(0, len(scaled), 4096)]
        result = np.concatenate(chunks) if chunks else np.zeros((0, image_size, image_size, channels), np.float32)
    else:
        raise ValueError(f"unknown transform {transform!r}")
    assert result.shape[1:] == (image_size, image_size, channels), result.shape
    return np.clip(result, -1.0, 1.0, out=result)


def transform_for(native_size, image_size):
    """How a dataset's native side becomes a model's: 'none', 'pad' (MNIST 28 -> 32) or 'resize'."""
    if native_size == image_size:
        return "none"
    return "pad" if (native_size, image_size) == (28, 32) else "resize"


def to_uint8(images):
    """Generator output in [-1, 1] (any shape) to uint8 0..255."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_dataset_uint8(images, transform="none", native_size=28):
    """Generated float (N, S, S, C) in [-1, 1] back to the dataset's form: uint8 (N, H, W) grey, (N, H, W, 3) colour.

    Undoes `prepare_images`: crops the padded border or resizes (area-averaged) back to the native side.
    """
    images = np.asarray(images, np.float32)
    if transform == "pad":
        margin = (images.shape[1] - native_size) // 2
        images = images[:, margin:margin + native_size, margin:margin + native_size]
    elif transform == "resize":
        images = tf.image.resize(images, (native_size, native_size), method="area").numpy()
    if images.shape[1:3] != (native_size, native_size):
        raise ValueError(f"cannot bring images of shape {images.shape} back to {native_size}x{native_size} "
                         f"with transform {transform!r}")
    return to_uint8(images[..., 0] if images.shape[-1] == 1 else images)


def to_mnist_uint8(images, transform="none"):
    """Generated float (N, S, S, 1) in [-1, 1] back to MNIST's form: uint8 (N, 28, 28), white on black."""
    return to_dataset_uint8(images, transform, 28)


def image_grid(images, columns=None, padding=2, background=64):
    """Tile images into one uint8 picture: rows of `columns` tiles, `padding` pixels of grey between.

    `images` is (N, H, W, C) or (N, H, W), float in [-1, 1] or uint8. Returns (rows*H', cols*W')
    for one channel, (.., .., 3) for three.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    count, height, width = images.shape[:3]
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    shape = (rows * (height + padding) + padding, columns * (width + padding) + padding) + images.shape[3:]
    grid = np.full(shape, background, dtype=np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return grid


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same suffix); on success rename it onto `path`.

    A crash or an error at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def save_png(path, picture):
    """Write a uint8 picture (H, W) or (H, W, 3) as PNG, atomically."""
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, picture, extension=".png")


def save_json(path, data, indent=1):
    """Write `data` as JSON (indented, unless `indent` is None), atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=indent) + "\n")


def save_gif(path, frame_paths, frame_ms=200, last_frame_ms=1500):
    """Assemble PNG frames (in the given order) into a looping GIF, holding the last frame longer."""
    frames = [iio.imread(p) for p in frame_paths]
    if not frames:
        return
    # Pillow takes a list of durations only for several frames.
    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms] if len(frames) > 1 else last_frame_ms
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, np.stack(frames), extension=".gif", duration=durations, loop=0)


# ---------------------------------------------------------------------------------------------
# The run: its directory, history, plots and the epoch loop
# ---------------------------------------------------------------------------------------------

METRICS = ("d_loss", "g_loss", "d_real", "d_fake")  # What each train step returns, per batch.


def plot_history(path, history):
    """Plot D and G losses (per iteration, and per-epoch means) and mean D(x), D(G(z)) against epochs."""
    iterations = history["iterations"]
    steps = len(iterations["d_loss"])
    epochs = history["epochs"]
    if not steps or not epochs:
        return
    # Steps per epoch from the complete epochs (an interrupted run also holds part of the next).
    steps_per_epoch = (steps - history.get("partial_epoch", {}).get("step", 0)) / len(epochs)
    # At most ~4,000 points a curve: the mean of each bin of iterations. A long run has 60,000
    # iterations, which took matplotlib 2 s to draw after every epoch and drew only a blur.
    width = max(1, math.ceil(steps / 4000))
    used = steps - steps % width or steps
    x = (np.arange(used).reshape(-1, width).mean(axis=1) + 1) / steps_per_epoch

    def binned(key):
        return np.asarray(iterations[key][:used], np.float64).reshape(-1, width).mean(axis=1)

    x_epoch = [e["epoch"] - 0.5 for e in epochs]  # An epoch's mean belongs to its middle.
    style = "o-" if len(epochs) <= 30 else "-"
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, label, colour in (("d_loss", "D loss", "tab:blue"), ("g_loss", "G loss", "tab:orange")):
        top.plot(x, binned(key), color=colour, alpha=0.25, linewidth=0.6)
        top.plot(x_epoch, [e[key] for e in epochs], style, color=colour, label=f"{label} (epoch mean)")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    for key, label, colour in (("d_real", "D(x)", "tab:green"), ("d_fake", "D(G(z))", "tab:red")):
        bottom.plot(x, binned(key), color=colour, alpha=0.25, linewidth=0.6)
        bottom.plot(x_epoch, [e[key] for e in epochs], style, color=colour, label=f"mean {label}")
    bottom.set_ylabel("discriminator output")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("epoch")
    bottom.legend()
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


class TrainingStopped(Exception):
    """Training stopped before its last epoch: interrupted (exit 128 + signal) or diverged (exit 1)."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


# What --resume may change: the length of the run and how often it is scored. Anything else would
# make the resumed run a different experiment, so it is refused.
RESUMABLE_CHANGES = ("epochs", "eval_every")


class RunDirectory:
    """One run's directory, `results/<run-name>/`, and the names of everything written into it."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / "config.json"
        self.history = self.path / "history.json"
        self.loss_plot = self.path / "losses.png"
        self.metrics_plot = self.path / "metrics.png"
        self.metrics = self.path / "metrics.json"
        self.evaluation = self.path / "evaluation.json"
        self.real_samples = self.path / "real_samples.png"
        self.random_samples = self.path / "random_samples.png"
        self.progress_gif = self.path / "progress.gif"
        self.generator = self.path / "generator.keras"
        self.generated = self.path / "generated_samples.png"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"

    def epoch_grid(self, epoch):
        """The fixed-noise grid after `epoch` (zero-padded, so sorting by name sorts by time)."""
        return self.path / f"epoch_{epoch:03d}.png"

    def holds_a_run(self):
        return self.config.is_file() or self.checkpoints.is_dir()

    def prepare(self, config):
        """Check, before anything is built, that training may start here; with --resume, adopt the run's config.

        A directory that already holds a run needs --resume (continue it) or --overwrite (replace
        it). With --resume, every hyperparameter not given on the command line takes the run's
        saved value, and one given with another value is refused (except RESUMABLE_CHANGES),
        naming each difference; the checkpoint is left untouched.
        """
        if config.resume and config.overwrite:
            raise UsageError("argument --resume: not allowed with --overwrite")
        if not config.resume:
            if self.holds_a_run() and not config.overwrite:
                raise UsageError(f"{self.path} already holds a run; pass --resume to continue it, "
                                 f"--overwrite to replace it, or --out to start another")
            return
        if not tf.train.latest_checkpoint(self.checkpoints):
            raise UsageError(f"argument --resume: no checkpoint in {self.checkpoints} to resume from")
        try:
            saved = json.loads(self.config.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{self.config}: cannot read the run's configuration ({error})") from None
        if saved.get("script") != config.script:
            raise UsageError(f"argument --resume: {self.path} holds a {saved.get('script')} run, "
                             f"not a {config.script} run")
        differences = []
        for key in config.hyperparameters:
            if key not in saved:
                continue
            if key in config.explicit and getattr(config, key) != saved[key]:
                if key not in RESUMABLE_CHANGES:
                    differences.append(f"{_flag(key)} {getattr(config, key)} (the run has {saved[key]})")
            else:
                setattr(config, key, saved[key])
        if differences:
            raise UsageError(f"argument --resume: {self.path} was trained with other settings: "
                             f"{'; '.join(differences)}. Start a new run with --out, or --overwrite")

    def create(self, overwrite=False):
        """Create the directory (emptied of an earlier run's outputs with `overwrite`); DataError if unwritable."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            for leftover in self.path.glob(".*.tmp-*"):  # From a process killed while writing.
                leftover.unlink()
            if overwrite:
                for path in [*self.path.glob("epoch_[0-9]*.png"), self.config, self.history, self.loss_plot,
                             self.metrics_plot, self.metrics, self.evaluation, self.real_samples,
                             self.random_samples, self.progress_gif, self.generator, self.generated]:
                    path.unlink(missing_ok=True)
                for directory in (self.checkpoints, self.tensorboard):
                    if directory.is_dir():
                        shutil.rmtree(directory)
        except OSError as error:
            raise DataError(f"{self.path}: cannot write the run directory ({error.strerror or error})") from None
        return self


class _StatusLine:
    """A one-line progress display: position in the epoch, losses and speed.

    On a terminal it rewrites itself in place; in a log file it prints a line every tenth of an epoch.
    """

    def __init__(self, epochs):
        self.epochs = epochs
        self.interactive = sys.stdout.isatty()
        self._last_printed = (0, 0)  # (epoch, tenth of it) of the last line printed to a log

    def update(self, epoch, step, steps, images_per_second, values):
        """Show the running position; on a terminal after every call, in a log every tenth of an epoch."""
        text = f"epoch {epoch}/{self.epochs} step {step}/{steps} | {_describe(values)} | {images_per_second:.0f} img/s"
        if self.interactive:
            print("\r" + text, end="", flush=True)
        elif step < steps and (epoch, step * 10 // steps) > self._last_printed:
            self._last_printed = (epoch, step * 10 // steps)
            print(text, flush=True)

    def finish_line(self, text):
        """Replace the running line with `text`."""
        print(("\r\033[K" if self.interactive else "") + text, flush=True)


def _describe(values):
    return (f"D loss {values['d_loss']:.3f} G loss {values['g_loss']:.3f} "
            f"D(x) {values['d_real']:.2f} D(G(z)) {values['d_fake']:.2f}")


class _StopRequests:
    """While active, SIGINT (Ctrl-C) and SIGTERM ask training to stop after the current step.

    A second Ctrl-C stops at once, as usual. Outside the main thread signals cannot be caught, and
    this does nothing.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: saving after this step "
              f"(Ctrl-C again stops at once, losing the epoch in progress)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def _cpu_has_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_speed_settings(config, default_steps_per_call, bf16_on_cpu=True):
    """Fill in --precision auto, --xla and --steps-per-call 0 with what measured fastest on this device.

    On this project's 2-core CPU (AVX512-BF16), bf16 ran the DCGAN step 1.3x faster than fp32 and
    XLA ran it 1.5x slower; on GPUs, XLA and several steps per call remove per-step overhead, and
    bf16 (compute capability 8+) or fp16 with loss scaling (7.x) use the tensor cores.
    `bf16_on_cpu=False` keeps fp32 on the CPU for a model where bf16 measured slower there.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if config.precision == "auto":
        if gpus:
            capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
            config.precision = "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"
        else:
            config.precision = "bf16" if _cpu_has_bf16() and bf16_on_cpu else "fp32"
    if config.xla is None:
        config.xla = bool(gpus)
    if not config.steps_per_call:
        config.steps_per_call = 10 if gpus else default_steps_per_call
    return config


def set_precision(precision):
    """Make Keras build the next models in `precision` (variables stay float32 under mixed policies)."""
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])


class LinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate held at `initial` until step `start`, then falling linearly to zero at step `end`."""

    def __init__(self, initial, start, end):
        if not 0 <= start < end:
            raise ValueError(f"LinearDecay needs 0 <= start < end, got start {start}, end {end}")
        self.initial, self.start, self.end = float(initial), int(start), int(end)

    def __call__(self, step):
        progress = (tf.cast(step, tf.float32) - self.start) / float(self.end - self.start)
        return self.initial * (1.0 - tf.clip_by_value(progress, 0.0, 1.0))

    def get_config(self):
        return {"initial": self.initial, "start": self.start, "end": self.end}


def make_optimizer(config, variables, lr_scale=1.0, updates_per_step=1):
    """Adam(lr * lr_scale, beta1, beta2) for `variables`, built now (eagerly, before any traced step creates slots).

    With --lr-decay f, the rate is constant for the first 1 - f of the run's `config.total_steps` (set
    by `train`) and falls linearly to zero over the last f; elsewhere (the benchmark) it stays constant.
    `updates_per_step` is how often this optimizer steps in one training step (G's --g-steps), so
    that its decay follows the run's training steps rather than its own count.
    Under fp16 it is wrapped in a LossScaleOptimizer, so that small gradients do not underflow: a
    step computes `tape.gradient(optimizer.scale_loss(loss), ...)`, which is the plain loss otherwise.
    """
    learning_rate = config.lr * lr_scale
    total_steps = getattr(config, "total_steps", 0) * updates_per_step
    if config.lr_decay and total_steps:
        learning_rate = LinearDecay(learning_rate, round(total_steps * (1 - config.lr_decay)), total_steps)
    optimizer = keras.optimizers.Adam(learning_rate, beta_1=config.beta1, beta_2=config.beta2)
    if config.precision == "fp16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


# ---------------------------------------------------------------------------------------------
# The GAN losses (--loss) and the gradient penalties (--r1, --r2), on D's logits
# ---------------------------------------------------------------------------------------------


def _cross_entropy(logits, target):
    """Mean binary cross-entropy of sigmoid(logits) against a constant target (1: real, 0: fake)."""
    labels = tf.fill(tf.shape(logits), tf.constant(target, logits.dtype))
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def gan_losses(config):
    """(discriminator_loss(real_logits, fake_logits), generator_loss(fake_logits)) for `config.loss`.

    ns (Goodfellow et al. 2014, the seeds' loss), with D(x) = sigmoid(logit):
        D minimises -[log D(x) + log(1 - D(G(z)))], G minimises -log D(G(z)) (non-saturating).
    hinge (Lim & Ye 2017; Miyato et al. 2018), on the logit l:
        D minimises E[max(0, 1 - l(x))] + E[max(0, 1 + l(G(z)))], G minimises -E[l(G(z))].
    ls (least squares, Mao et al. 2017), on the logit l:
        D minimises 1/2 E[(l(x) - 1)^2] + 1/2 E[l(G(z))^2], G minimises 1/2 E[(l(G(z)) - 1)^2].
    rp (relativistic pairing, Jolicoeur-Martineau 2018; Huang et al. 2024's R3GAN), each fake paired
    with a real image of the batch, f(t) = log(1 + e^t):
        D minimises E[f(l(G(z)) - l(x))], G minimises E[f(l(x) - l(G(z)))]: each side judges how much
        more real the real image looks than the fake, so G also gets a signal from the real logits.
    With --label-smoothing s (ns and ls), D's target for real images is 1 - s (one-sided: fakes stay 0).
    The generator loss takes (fake_logits, real_logits); only rp reads the real logits (see
    `loss_needs_real_logits`), the others take None.
    """
    real_target = 1.0 - getattr(config, "label_smoothing", 0.0)
    if config.loss == "hinge":
        def discriminator_loss(real_logits, fake_logits):
            return tf.reduce_mean(tf.nn.relu(1.0 - real_logits)) + tf.reduce_mean(tf.nn.relu(1.0 + fake_logits))

        def generator_loss(fake_logits, real_logits=None):
            return -tf.reduce_mean(fake_logits)
    elif config.loss == "ls":
        def discriminator_loss(real_logits, fake_logits):
            return 0.5 * tf.reduce_mean(tf.square(real_logits - real_target)) + 0.5 * tf.reduce_mean(tf.square(fake_logits))

        def generator_loss(fake_logits, real_logits=None):
            return 0.5 * tf.reduce_mean(tf.square(fake_logits - 1.0))
    elif config.loss == "rp":
        def discriminator_loss(real_logits, fake_logits):
            return tf.reduce_mean(tf.nn.softplus(fake_logits - real_logits))

        def generator_loss(fake_logits, real_logits=None):
            return tf.reduce_mean(tf.nn.softplus(real_logits - fake_logits))
    else:
        def discriminator_loss(real_logits, fake_logits):
            return _cross_entropy(real_logits, real_target) + _cross_entropy(fake_logits, 0.0)

        def generator_loss(fake_logits, real_logits=None):
            return _cross_entropy(fake_logits, 1.0)
    return discriminator_loss, generator_loss


def discriminator_scores(config, real_logits, fake_logits):
    """{"d_real": D(x), "d_fake": D(G(z))}, batch means, for the progress line and the loss plot.

    D(x) = sigmoid(l(x)). The relativistic loss (rp) fixes no zero for the logits (adding a constant
    to all of them changes nothing), so there the two are sigmoid(l(x) - l(G(z))) and its complement
    over the pairs: how surely D ranks each real image above its paired fake (0.5: it cannot tell).
    """
    if loss_needs_real_logits(config):
        real_logits, fake_logits = real_logits - fake_logits, fake_logits - real_logits
    return {"d_real": tf.reduce_mean(tf.sigmoid(real_logits)), "d_fake": tf.reduce_mean(tf.sigmoid(fake_logits))}


def loss_needs_real_logits(config):
    """Whether G's loss reads D's logits on real images too (the relativistic --loss rp)."""
    return config.loss == "rp"


def top_k_logits(config, step, fake_logits, real_logits=None):
    """G's update from only the fakes that D rates most real (--top-k; Sinha et al. 2020).

    Of the batch's fake logits (N, 1), the k = ceil(f * N) largest are kept, f falling linearly from
    1 at the first step to `config.top_k` at the run's last (`config.total_steps`): early on D's
    ranking means little, later the worst samples' gradients mostly pull G towards the modes of the
    others. With `real_logits` (the relativistic loss) each kept fake keeps its paired real logit.
    Returns (fake_logits, real_logits); both as given when --top-k is 1.
    """
    if getattr(config, "top_k", 1.0) >= 1.0:
        return fake_logits, real_logits
    progress = tf.minimum(tf.cast(step, tf.float32) / float(max(getattr(config, "total_steps", 0), 1)), 1.0)
    fraction = 1.0 - (1.0 - config.top_k) * progress
    count = tf.shape(fake_logits)[0]
    k = tf.maximum(tf.cast(tf.math.ceil(fraction * tf.cast(count, tf.float32)), tf.int32), 1)
    kept = tf.math.top_k(tf.reshape(fake_logits, [-1]), k).indices
    return tf.gather(fake_logits, kept), None if real_logits is None else tf.gather(real_logits, kept)


def logits_and_gradient_penalty(discriminator, inputs, gamma):
    """D's logits on `inputs` and the gradient penalty gamma/2 * E||grad_x l(x)||^2 at those images.

    On real images it is the R1 penalty (Mescheder et al. 2018; --r1), on fakes the R2 penalty
    (--r2; R1 and R2 together are Huang et al. 2024's R3GAN recipe). `inputs` is the image batch,
    or [images, one-hot labels] for a conditional D (the gradient is taken with respect to the
    images only). With gamma 0 the penalty is 0 and costs nothing.
    """
    if not gamma:
        return discriminator(inputs, training=True), 0.0
    images = inputs[0] if isinstance(inputs, list) else inputs
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = discriminator(inputs, training=True)
        total = tf.reduce_sum(logits)  # Inside the tape: the gradient's target must be recorded too.
    gradients = tf.cast(tape.gradient(total, images), tf.float32)
    squared_norms = tf.reduce_sum(tf.square(tf.reshape(gradients, (tf.shape(gradients)[0], -1))), axis=1)
    return logits, 0.5 * gamma * tf.reduce_mean(squared_norms)


def random_shifts(images, max_shift, rng):
    """Each image of the (N, H, W, C) batch moved by its own whole-pixel offset of up to `max_shift`
    rows and columns (uniform in [-max_shift, max_shift]), the edges filled by reflection.

    The augmentation T of the consistency term (--consistency); MNIST's borders are background, so
    reflection fills them with background."""
    count = tf.shape(images)[0]
    offsets = tf.cast(rng.uniform((count, 2), -max_shift, max_shift + 1, dtype=tf.int32), tf.float32)
    ones, zeros = tf.ones((count, 1)), tf.zeros((count, 1))
    # Output pixel (x, y) reads input pixel (x - dx, y - dy): [a0, a1, a2, b0, b1, b2, c0, c1].
    transforms = tf.concat([ones, zeros, -offsets[:, :1], zeros, ones, -offsets[:, 1:], zeros, zeros], axis=1)
    shifted = keras.ops.image.affine_transform(tf.cast(images, tf.float32), transforms, interpolation="nearest",
                                               fill_mode="reflect", data_format="channels_last")
    return tf.cast(shifted, images.dtype)


def consistency_penalty(discriminator, weight, rng, conditioned, batches):
    """Balanced consistency regularisation (Zhang et al. 2020; Zhao et al. 2021), the --consistency term:
    weight * sum over the batches of E[(l(x) - l(T(x)))^2], T a random shift of up to 1/8 of the side.

    `batches` holds (images, labels, logits) triples, the real batch and the fake batch with D's
    logits on them; `conditioned` (from `label_helpers`) adds the labels for a conditional D. D learns
    to give an image and its shifted copy the same score, without ever being told a shifted image is real.
    """
    penalty = 0.0
    for images, labels, logits in batches:
        shifted = random_shifts(images, max(1, images.shape[1] // 8), rng)
        penalty += tf.reduce_mean(tf.square(discriminator(conditioned(shifted, labels), training=True) - logits))
    return weight * penalty


class AveragedGenerator:
    """An exponential moving average of G's weights (--ema), the generator that draws every sample.

    Averaging the weights of the last ~1/(1 - decay) steps smooths away the step-to-step wobble of
    the adversarial game (Yazici et al. 2019; Karras et al. 2018). The decay is warmed up as
    min(decay, (1 + n) / (warm_up + n)) after n updates (warm_up 10: about the last ninth of the
    steps so far), so early epochs are not dominated by the random initial weights. Batch-norm
    statistics are not averaged: they belong to the raw weights, so before sampling, `refresh()`
    recomputes them for the averaged weights from fixed noise (BigGAN's "standing statistics"): the
    mean of the per-batch statistics of a few batches.
    The training noise stream is untouched, so the same run shows the raw generator's figures
    beside the average's.
    """

    def __init__(self, generator, decay, refresh_inputs, warm_up=10.0):
        self.decay = decay
        self.warm_up = warm_up
        self.source = generator
        self.model = keras.models.clone_model(generator)
        self.model.set_weights(generator.get_weights())
        self.batch_norms = [layer for layer in self.model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        self.refresh_inputs = refresh_inputs
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.pairs = list(zip(self.model.trainable_variables, generator.trainable_variables))

    @property
    def variables(self):
        """What a checkpoint holds: the averaged weights and the update count."""
        return list(self.model.variables) + [self.updates]

    def update(self):
        """One averaging step, after a training step (traced into the compiled training call)."""
        self.updates.assign_add(1)
        count = tf.cast(self.updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + count) / (self.warm_up + count))
        for average, value in self.pairs:
            average.assign(decay * average + (1.0 - decay) * value)

    def refresh(self, batch_size=500):
        """Recompute the batch-norm statistics for the averaged weights (nothing to do without batch norm).

        Each batch norm's moving statistics become the mean of its per-batch statistics over the
        refresh noise, in batches of `batch_size` (momentum (k - 1) / k at the k-th batch keeps a
        running mean); batches bound the memory, which one batch of 2,000 DCGAN samples doubled.
        """
        inputs = self.refresh_inputs if isinstance(self.refresh_inputs, list) else [self.refresh_inputs]
        for index, start in enumerate(range(0, len(inputs[0]), batch_size) if self.batch_norms else []):
            for layer in self.batch_norms:
                layer.momentum = index / (index + 1)  # 0 at the first batch: the old statistics go.
            batch = [values[start:start + batch_size] for values in inputs]
            self.model(batch if len(batch) == 2 else batch[0], training=True)
        for layer in self.batch_norms:
            layer.momentum = self.source.get_layer(layer.name).momentum  # As saved in generator.keras.


def compile_steps(train_step, images, labels, config):
    """K training steps in one compiled call, each gathering its batch from the dataset on the device.

    `images` is the uint8 training set (N, S, S, C); each batch is scaled to [-1, 1] in the call and
    passed to `train_step(images, labels)` with its int32 labels (which an unconditional GAN ignores).
    The returned function takes (K, batch_size) image indices and returns (K, 4) float32 values of
    METRICS. Its signature leaves K open, so the shorter last call of an epoch does not retrace.
    """

    @tf.function(input_signature=[tf.TensorSpec((None, config.batch_size), tf.int32)], jit_compile=config.xla)
    def train_steps(batch_indices):
        count = tf.shape(batch_indices)[0]
        values = tf.TensorArray(tf.float32, size=count)
        for index in tf.range(count):
            batch = tf.cast(tf.gather(images, batch_indices[index]), tf.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
            step_values = train_step(batch, tf.gather(labels, batch_indices[index]))
            values = values.write(index, tf.stack([tf.cast(step_values[key], tf.float32) for key in METRICS]))
        return values.stack()

    return train_steps


def build_for_training(config, build):
    """Seed, set the precision policy, call the script's `build(config)`, and add the average of G.

    Returns (train_step, state, averaged): with --ema, `averaged` is the AveragedGenerator,
    `train_step` also updates it and `state` (what a checkpoint holds) includes it; else None.
    """
    seed_everything(config)
    set_precision(config.precision)
    if not config.xla:
        # Grappler's remapper fails on the DCGAN's bias-free convolution + batch norm + LeakyReLU
        # ("remapper failed ... LeakyReluGrad ... missing node BiasAdd") and skips the whole graph;
        # switched off, the error line goes and the step measured as fast or faster on the CPU.
        tf.config.optimizer.set_experimental_options({"remapping": False})
    train_step, state = build(config)
    if not getattr(config, "ema", 0):
        return train_step, state, None
    generator = state["generator"]
    # A fixed batch of noise (and balanced labels) for the batch-norm statistics of the average.
    refresh_noise = np.random.default_rng(config.seed + 3).standard_normal((2000, config.latent_dim)).astype(np.float32)
    refresh_labels = one_hot(balanced_labels(len(refresh_noise), config), config)
    averaged = AveragedGenerator(generator, config.ema,
                                 [refresh_noise, refresh_labels] if len(generator.inputs) == 2 else refresh_noise)

    def step_and_average(real_images, real_labels):
        values = train_step(real_images, real_labels)
        averaged.update()
        return values

    return step_and_average, state | {"averaged_generator": averaged.variables}, averaged


def seed_everything(config):
    """Seed Python, numpy and TensorFlow from --seed; with --deterministic, make TensorFlow's ops repeatable."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def epoch_batches(seed, epoch, count, steps, batch_size):
    """The image indices of each step of one epoch, (steps, batch_size): a permutation fixed by (seed, epoch).

    Because the order depends on nothing else, a resumed run sees exactly the batches that an
    uninterrupted one would, even from the middle of an epoch. The ragged last batch is dropped.
    """
    return np.random.default_rng([seed, epoch]).permutation(count)[:steps * batch_size].reshape(steps, batch_size)


def sample_images(generator, noise, labels=None, batch_size=500):
    """Run the generator in inference mode (batch norm on its moving statistics) over `noise`, in batches.

    A conditional generator (two inputs) also takes `labels`, as one-hot (N, classes) float vectors
    (mixtures of two classes too, for morphing); an unconditional one ignores them.
    """
    conditional = len(generator.inputs) == 2
    outputs = [generator([noise[i:i + batch_size], labels[i:i + batch_size]] if conditional
                         else noise[i:i + batch_size], training=False).numpy()
               for i in range(0, len(noise), batch_size)]
    return np.concatenate(outputs)


def _write_pictures(run, history, epochs_done, evaluator, gif=False):
    """The history and the loss and metric plots; with `gif`, the GIF of every epoch grid so far.

    The GIF re-reads every grid, so it is made when training stops (at the end, or interrupted),
    not after every epoch; a resumed run rebuilds it from all the grids.
    """
    save_json(run.history, history, indent=None)  # Compact: it holds every iteration.
    plot_history(run.loss_plot, history)
    if evaluator and history["evaluations"]:
        plot_metrics(run.metrics_plot, history["evaluations"], evaluator.floor)
    if gif:
        save_gif(run.progress_gif,
                 [run.epoch_grid(e) for e in range(1, epochs_done + 1) if run.epoch_grid(e).is_file()])


def grid_inputs(config, noise):
    """Noise and labels for a progress grid from `noise` (grid x grid vectors).

    Unconditional: the grid x grid vectors, no labels. Conditional: one row per class in play and
    one column per noise vector, the same vector down each column, so each frame shows every class
    in the same styles. Returns (noise, one-hot labels or None, columns).
    """
    if not getattr(config, "conditional", False):
        return noise, None, config.sample_grid
    classes = parse_classes(config.classes, config.dataset)
    columns = noise[:config.sample_grid]
    rows = np.repeat(np.array(classes, np.int32), len(columns))
    return np.tile(columns, (len(classes), 1)), one_hot(rows, config), len(columns)


def train(config, run, data, build, transform="none"):
    """The epoch loop and its bookkeeping, shared by both scripts.

    `data` is (images, labels) from `load_training_images`.
    `build(config)` returns (train_step, state): `train_step(images, labels)` runs one D update and one G
    update and returns the batch's d_loss, g_loss and mean D(x), D(G(z)); `state` names everything
    a checkpoint must hold to go on: the models (`generator`, `discriminator`), their optimizers and
    the noise generator (`noise_rng`). Steps run `config.steps_per_call` at a time in one compiled
    call (`compile_steps`), with the dataset on the device.

    Around the steps, this writes into `run`: config.json, real_samples.png, one fixed-noise grid
    per epoch, the history (history.json), loss plot and trained generator (generator.keras) after
    every epoch, TensorBoard events, a checkpoint of the whole state after every epoch (the last
    three kept), and at the end random_samples.png and progress.gif. Every `config.eval_every`
    epochs and after the last, it scores `config.num_samples` samples (see evaluation.py), adds the
    figures to the history and metrics.png, and writes the final ones to metrics.json.

    With `config.resume` it goes on from the last checkpoint. SIGINT or SIGTERM stops it after the
    current step with a checkpoint saved; a non-finite loss stops it keeping the last good
    checkpoint. Both raise TrainingStopped.
    """
    evaluator = load_evaluator(config.dataset, config.data_dir, config.classes) if config.eval_every else None
    devices = [f"{d.device_type}:{d.name.split(':')[-1]}" for d in tf.config.list_physical_devices("GPU")]
    print(f"TensorFlow {tf.__version__} on {', '.join(devices) or 'the CPU (no GPU found)'}; precision "
          f"{config.precision}, XLA {'on' if config.xla else 'off'}, {config.steps_per_call} steps per call")
    images, labels = data
    steps = len(images) // config.batch_size
    config.total_steps = config.epochs * steps  # The horizon of --lr-decay and of --top-k's annealing.
    train_step, state, averaged = build_for_training(config, build)
    generator = state["generator"]
    # --ema: samples, grids, figures and the saved generator come from the averaged weights; the
    # raw generator is scored beside it at each evaluation.
    sampler = averaged.model if averaged else generator
    grid_size = config.sample_grid

    # The checkpoint: the models, optimizers and noise generator, the fixed noise of the progress
    # grids, how far training got (completed epochs, and steps into the next after an interrupt),
    # and the history, so that all of it is saved and restored together.
    fixed_noise = np.random.default_rng(config.seed).standard_normal((grid_size * grid_size, config.latent_dim))
    progress = {"fixed_noise": tf.Variable(fixed_noise.astype(np.float32), trainable=False),
                "epochs_done": tf.Variable(0, dtype=tf.int64, trainable=False),
                "steps_into_epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
                "history": tf.Variable("", dtype=tf.string, trainable=False)}
    # Keras 3 models are not tracked by tf.train.Checkpoint, so their variables go in as lists (all
    # of them: weights, batch-norm statistics and the dropout layers' random-number state).
    tracked = {name: list(value.variables) if isinstance(value, keras.Model) else value for name, value in state.items()}
    checkpoint = tf.train.Checkpoint(**tracked, **progress)
    manager = tf.train.CheckpointManager(checkpoint, str(run.checkpoints), max_to_keep=3)
    history = {"iterations": {key: [] for key in METRICS}, "epochs": [], "evaluations": [], "total_seconds": 0.0}
    if config.resume:
        try:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise DataError(f"{manager.latest_checkpoint}: does not fit this model ({str(error).splitlines()[0]})") from None
        history = json.loads(progress["history"].numpy().decode())
    epochs_done, skip = int(progress["epochs_done"].numpy()), int(progress["steps_into_epoch"].numpy())
    if config.resume and epochs_done >= config.epochs:
        raise UsageError(f"argument --epochs: the run in {run.path} has already trained {epochs_done} epochs; "
                         f"pass a larger --epochs to train on")
    fixed_noise = progress["fixed_noise"].numpy()

    config_data = config_dict(config) | {"transform": transform, "image_shape": list(images.shape[1:]),
                                         "training_images": len(images), "tensorflow": tf.__version__}
    save_json(run.config, config_data)
    save_png(run.real_samples, image_grid(images[:grid_size * grid_size], grid_size))
    writer = tf.summary.create_file_writer(str(run.tensorboard))
    images = tf.constant(images)  # Once, on the device; each step gathers its batch from it.
    train_steps = compile_steps(train_step, images, tf.constant(labels), config)
    grid_noise, grid_labels, grid_columns = grid_inputs(config, fixed_noise)
    status = _StatusLine(config.epochs)
    where = f"resuming after epoch {epochs_done}" + (f", step {skip}" if skip else "") if config.resume else "from scratch"
    print(f"Training {config.script} for {config.epochs} epochs of {steps} steps (batch {config.batch_size}, "
          f"{len(images)} images), {where}; outputs in {run.path}")

    def save_checkpoint(epochs_completed, steps_into_epoch):
        progress["epochs_done"].assign(epochs_completed)
        progress["steps_into_epoch"].assign(steps_into_epoch)
        progress["history"].assign(json.dumps(history))
        manager.save(checkpoint_number=epochs_completed * steps + steps_into_epoch)

    session_start = time.perf_counter() - history["total_seconds"]
    with _StopRequests() as stop:
        for epoch in range(epochs_done + 1, config.epochs + 1):
            first_step = skip if epoch == epochs_done + 1 else 0
            partial = history.pop("partial_epoch", None) if first_step else None
            epoch_start = time.perf_counter() - (partial["seconds"] if partial else 0.0)
            batches = epoch_batches(config.seed, epoch, len(images), steps, config.batch_size)
            for call_start in range(first_step, steps, config.steps_per_call):
                call_values = train_steps(batches[call_start:call_start + config.steps_per_call]).numpy()
                finite = np.isfinite(call_values).all(axis=1)
                if not finite.all():
                    row = int(np.argmin(finite))
                    bad = METRICS[int(np.argmin(np.isfinite(call_values[row])))]
                    kept = tf.train.latest_checkpoint(run.checkpoints)
                    raise TrainingStopped(
                        f"{bad} is {call_values[row][METRICS.index(bad)]} at epoch {epoch}, step {call_start + row + 1}: "
                        f"training diverged and stopped; "
                        + (f"the last good checkpoint, {kept}, is kept" if kept else "no checkpoint yet")
                        + " (try a lower --lr)", 1)
                for row, step_values in enumerate(call_values):
                    for key, value in zip(METRICS, step_values.tolist()):
                        history["iterations"][key].append(value)
                    with writer.as_default(step=(epoch - 1) * steps + call_start + row + 1):
                        for key, value in zip(METRICS, step_values.tolist()):
                            tf.summary.scalar(f"iteration/{key}", value)
                step = call_start + len(call_values)
                elapsed = time.perf_counter() - epoch_start
                status.update(epoch, step, steps, (step - first_step) * config.batch_size
                              / max(elapsed - (partial["seconds"] if partial else 0.0), 1e-9),
                              dict(zip(METRICS, call_values[-1].tolist())))
                if stop.signal and step < steps:
                    history["partial_epoch"] = {"epoch": epoch, "step": step, "seconds": round(elapsed, 3)}
                    history["total_seconds"] = round(time.perf_counter() - session_start, 3)
                    save_checkpoint(epoch - 1, step)
                    _write_pictures(run, history, epoch - 1, evaluator, gif=True)
                    writer.close()
                    raise _interrupted(stop.signal, config, run, f"epoch {epoch}, step {step}/{steps}")
            seconds = time.perf_counter() - epoch_start
            means = {key: float(np.mean(history["iterations"][key][-steps:])) for key in METRICS}
            history["epochs"].append({"epoch": epoch, **means, "seconds": round(seconds, 3),
                                      "images_per_second": round(steps * config.batch_size / seconds, 1)})
            status.finish_line(f"epoch {epoch}/{config.epochs} | {_describe(means)} | {seconds:.1f} s, "
                               f"{steps * config.batch_size / seconds:.0f} img/s | {run.epoch_grid(epoch).name}")

            # Everything a user looks at between epochs: the grid, the plots, the history, the
            # generator; then the checkpoint, last, so that it never runs ahead of them.
            if averaged:
                averaged.refresh()
            grid = image_grid(sample_images(sampler, grid_noise, grid_labels), grid_columns)
            save_png(run.epoch_grid(epoch), grid)
            with writer.as_default(step=epoch * steps):
                for key in METRICS:
                    tf.summary.scalar(f"epoch/{key}", means[key])
                tf.summary.scalar("epoch/seconds", seconds)
                tf.summary.image("fixed_noise_grid", grid.reshape((1,) + grid.shape[:2] + (-1,)))
            if evaluator and (epoch % config.eval_every == 0 or epoch == config.epochs):
                figures = evaluate_generator(evaluator, sampler, config.num_samples, config.seed, transform, config)
                if averaged:  # The raw generator too: the same training without the average, for comparison.
                    raw = evaluate_generator(evaluator, generator, config.num_samples, config.seed, transform, config)
                    figures["raw"] = {key: raw[key] for key in evaluation.FIGURES}
                with writer.as_default(step=epoch * steps):
                    for key in evaluation.FIGURES:
                        tf.summary.scalar(f"evaluation/{key}", figures[key])
                        if averaged:
                            tf.summary.scalar(f"evaluation_raw_generator/{key}", figures["raw"][key])
                print(f"  evaluation at epoch {epoch}: FID {figures['fid']:.3g} (real data {evaluator.floor['fid']:.3g}), "
                      f"IS {figures['inception_score']:.3g}, {figures['classes_covered']}/{figures['classes']} classes, "
                      f"confidence {figures['confidence']:.3f} ({figures['seconds']:.1f} s)"
                      + (f"; raw G without the average: FID {figures['raw']['fid']:.3g}, IS "
                         f"{figures['raw']['inception_score']:.3g}, {figures['raw']['classes_covered']} classes"
                         if averaged else ""))
                history["evaluations"].append({"epoch": epoch, **figures})
            writer.flush()
            history["total_seconds"] = round(time.perf_counter() - session_start, 3)
            with atomic_path(run.generator) as temporary:
                sampler.save(temporary)
            _write_pictures(run, history, epoch, evaluator, gif=stop.signal is not None or epoch == config.epochs)
            save_checkpoint(epoch, 0)
            if stop.signal and epoch < config.epochs:
                writer.close()
                raise _interrupted(stop.signal, config, run, f"the end of epoch {epoch}")

    random_noise = np.random.default_rng(config.seed + 1).standard_normal((grid_size * grid_size, config.latent_dim))
    random_noise, random_labels, columns = grid_inputs(config, random_noise.astype(np.float32))
    # The average's batch-norm statistics were refreshed after the last epoch; nothing has moved since.
    save_png(run.random_samples, image_grid(sample_images(sampler, random_noise, random_labels), columns))
    writer.close()
    total = history["total_seconds"]
    print(f"Done: {config.epochs} epochs in {total:.1f} s ({total / config.epochs:.1f} s/epoch). "
          f"Outputs in {run.path}")
    if evaluator:
        final = history["evaluations"][-1]
        save_json(run.metrics, {"epoch": final["epoch"], "figures": final, "real_data_floor": evaluator.floor,
                                "classifier_test_accuracy": evaluator.test_accuracy})
        print(f"Sample quality after epoch {final['epoch']} ({final['samples']} samples; {config.dataset} classifier "
              f"test accuracy {evaluator.test_accuracy:.4f}; written to {run.metrics.name}):\n"
              f"{evaluation.format_figures(final, evaluator.floor)}")
    return history


# ---------------------------------------------------------------------------------------------
# Benchmark: training steps against the machine's matmul peak
# ---------------------------------------------------------------------------------------------


def forward_flops(model):
    """Multiply-add FLOPs (2 per multiply-add) of one image's forward pass, counted from the layers.

    Dense: 2 * inputs * units. Conv2D: 2 * k * k * C_in * C_out per output pixel. Conv2DTranspose:
    2 * k * k * C_in * C_out per input pixel (each input pixel is spread over a k x k patch).
    Batch norm, activations and the like are not counted; they are small beside these.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # A conditional model wraps its body.
            total += forward_flops(layer)
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
        elif isinstance(layer, keras.layers.Conv2DTranspose):
            k_h, k_w = layer.kernel_size
            total += 2 * k_h * k_w * layer.input.shape[-1] * layer.filters * layer.input.shape[1] * layer.input.shape[2]
        elif isinstance(layer, keras.layers.Conv2D):
            k_h, k_w = layer.kernel_size
            total += 2 * k_h * k_w * layer.input.shape[-1] * layer.filters * layer.output.shape[1] * layer.output.shape[2]
    return total


def training_flops(generator_flops, discriminator_flops, r1=False, consistency=False, r2=False,
                   relativistic=False, g_steps=1):
    """FLOPs of one image's share of a training step, with backward passes at twice the forward.

    D update: G forward, D forward on a real and a fake image, D backward on both: G + 6 D.
    G update: G forward, D forward, D backward to its input only (about 1 D), G backward: 3 G + 2 D.
    With the R1 penalty, D's gradient at the real image (about 1 D) is itself differentiated
    (about 2 D more): 3 D; the R2 penalty does the same at the fake image: 3 D. The consistency
    term scores shifted copies of both images and differentiates those scores too: 6 D. The
    relativistic loss scores the real batch again in G's update: 1 D. With --g-steps n, G's update
    (and the relativistic loss's extra D forward) happens n times.
    """
    d_update = generator_flops + (6 + (3 if r1 else 0) + (3 if r2 else 0) + (6 if consistency else 0)) * discriminator_flops
    g_update = 3 * generator_flops + (2 + (1 if relativistic else 0)) * discriminator_flops
    return d_update + g_steps * g_update


def matmul_peak(precision, size=2048, repeats=8):
    """Measured GFLOP/s of a large square matmul in `precision`'s compute type, best of three."""
    dtype = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}[precision]
    a = tf.random.normal((size, size), dtype=tf.float32)
    a = tf.cast(a, dtype)

    @tf.function
    def chain(x):
        for _ in range(repeats):
            x = tf.matmul(x, a) * tf.cast(1.0 / size, dtype)  # Scaled, so values stay finite.
        return x

    chain(a).numpy()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        chain(a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 * repeats / best / 1e9


def _reset_peak_memory():
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count (VmHWM).
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.reset_memory_stats(gpu.name.replace("/physical_device:", ""))


def _peak_memory_mb():
    """Peak host RSS since the last reset, and the peak GPU memory (None without a GPU), in MB."""
    try:
        status = Path("/proc/self/status").read_text()
        host = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpus = tf.config.list_physical_devices("GPU")
    device = (tf.config.experimental.get_memory_info(gpus[0].name.replace("/physical_device:", ""))["peak"]
              / 2**20 if gpus else None)
    return host, device


def _time_training(config, data, build, min_seconds=6.0, min_steps=2):
    """Steady-state seconds per step (and peak memory) of the training step under `config`'s settings.

    The result also holds "window": a function that times one more window and returns its seconds
    per step, so that two settings can be timed in alternation (see `benchmark`).
    """
    _reset_peak_memory()
    images, labels = data
    train_step, state, _ = build_for_training(config, build)
    train_steps = compile_steps(train_step, images, labels, config)
    rng = np.random.default_rng(0)
    calls = [rng.integers(0, len(images), (config.steps_per_call, config.batch_size)).astype(np.int32)
             for _ in range(4)]
    for indices in calls[:2]:  # Warm-up: the first call traces and compiles.
        train_steps(indices).numpy()

    def window():
        steps, start = 0, time.perf_counter()
        while steps < min_steps or time.perf_counter() - start < min_seconds / 3:
            train_steps(calls[steps // config.steps_per_call % len(calls)]).numpy()
            steps += config.steps_per_call
        return (time.perf_counter() - start) / steps

    # Three timing windows; the fastest is the steady state (the others caught the machine busy).
    seconds = min(window() for _ in range(3))
    flops = training_flops(forward_flops(state["generator"]), forward_flops(state["discriminator"]),
                           r1=config.r1 > 0, consistency=getattr(config, "consistency", 0) > 0,
                           r2=getattr(config, "r2", 0) > 0, relativistic=loss_needs_real_logits(config),
                           g_steps=getattr(config, "g_steps", 1))
    host, device = _peak_memory_mb()
    return {"seconds": seconds, "flops": flops, "host_mb": host, "device_mb": device, "window": window}


def benchmark(config, data, build, min_seconds=6.0, alternations=3):
    """Time training steps at steady state and print them against the matmul peak and a plain fp32 step.

    Rows: a plain fp32 step (one step per call, no XLA), the chosen settings, and the chosen
    settings at each of `config.batch_sizes`. Every figure is measured in this run; the first two
    rows, whose ratio is the speedup, get `alternations` more windows each, taken in turn.
    """
    images, labels = data
    devices = [d.name for d in tf.config.list_physical_devices("GPU")] or ["CPU"]
    print(f"Benchmark of {config.script}"
          + (f" --arch {config.arch}" if hasattr(config, "arch") else "")
          + f" on {', '.join(devices)} ({os.cpu_count()} CPU cores), TensorFlow {tf.__version__}; "
            f"real {config.dataset} batches from {len(images)} images")
    data = (tf.constant(images), tf.constant(labels))
    plain = SimpleNamespace(**{**vars(config), "precision": "fp32", "xla": False, "steps_per_call": 1})
    settings = [("plain fp32 step", plain), ("chosen settings", config)]
    for batch_size in config.batch_sizes or []:
        settings.append((f"chosen, batch {batch_size}", SimpleNamespace(**{**vars(config), "batch_size": batch_size})))
    peaks = {}
    rows = []
    for label, setting in settings:
        if setting.batch_size > len(images):
            print(f"  (skipping batch {setting.batch_size}: larger than the {len(images)} images)")
            continue
        result = _time_training(setting, data, build, min_seconds)
        if setting.precision not in peaks:
            peaks[setting.precision] = matmul_peak(setting.precision)
        rows.append((label, setting, result))
        if len(rows) == 2:
            # The speedup compares these two rows. Timed one after the other, a slow spell of the
            # machine during either moves it by 10% or more; so both are timed again in alternating
            # windows, and each keeps its fastest window. Their window functions (which hold the
            # models) go afterwards, so that a --batch-sizes row's memory does not count them.
            for _ in range(alternations):
                for _, _, timed in rows:
                    timed["seconds"] = min(timed["seconds"], timed["window"]())
        if len(rows) >= 2:
            for _, _, timed in rows:
                timed.pop("window", None)
    set_precision("fp32")

    header = (f"{'setting':<22} {'precision':>9} {'XLA':>4} {'K':>3} {'batch':>5} {'ms/step':>8} {'img/s':>8} "
              f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'peak':>7} {'of peak':>7} {'host MB':>8}")
    if tf.config.list_physical_devices("GPU"):
        header += f" {'GPU MB':>7}"
    print(header)
    for label, setting, result in rows:
        images_per_second = setting.batch_size / result["seconds"]
        achieved = result["flops"] * images_per_second / 1e9
        peak = peaks[setting.precision]
        line = (f"{label:<22} {setting.precision:>9} {'on' if setting.xla else 'off':>4} {setting.steps_per_call:>3} "
                f"{setting.batch_size:>5} {result['seconds'] * 1000:>8.2f} {images_per_second:>8.0f} "
                f"{result['flops'] / 1e9:>9.3f} {achieved:>8.1f} {peak:>7.0f} {achieved / peak:>7.0%} "
                f"{result['host_mb']:>8.0f}")
        if result["device_mb"] is not None:
            line += f" {result['device_mb']:>7.0f}"
        print(line)
    speedup = rows[0][2]["seconds"] / rows[1][2]["seconds"]
    print(f"Speedup of the chosen settings ({config.precision}, XLA {'on' if config.xla else 'off'}, "
          f"{config.steps_per_call} steps per call) over the plain fp32 step: {speedup:.2f}x")
    print("peak: a large matmul's GFLOP/s in that precision, measured in this run; GFLOP/img counts one "
          "image's share of a D and a G update (utils.training_flops); host MB: peak RSS while timing.")
    return rows


def _interrupted(signum, config, run, where):
    return TrainingStopped(
        f"{signal.Signals(signum).name}: stopped at {where} and saved a checkpoint, the history, the plots and "
        f"the GIF so far. Resume with: python {config.script}.py --out {run.path} --resume", 128 + signum)


def evaluate_generator(evaluator, generator, count, seed, transform, config):
    """Score `count` samples of `generator` from noise fixed by `seed`, in the dataset's own uint8 form.

    A conditional generator is asked for balanced labels over the classes in play, and the figures
    add how often the classifier recognises the requested label (`label_accuracy`, per class too).
    """
    start = time.perf_counter()
    latent_dim = _latent_dim(generator)
    # Its own noise stream (seed + 2), the same at every evaluation, so epochs compare.
    noise = np.random.default_rng(seed + 2).standard_normal((count, latent_dim)).astype(np.float32)
    requested = balanced_labels(count, config)
    samples = to_dataset_uint8(sample_images(generator, noise, one_hot(requested, config)), transform,
                               DATASETS[config.dataset].shape[0])
    conditional = len(generator.inputs) == 2
    figures = evaluator.evaluate(samples, requested if conditional else None, DATASETS[config.dataset].classes)
    figures["seconds"] = round(time.perf_counter() - start, 2)
    return figures


def plot_metrics(path, evaluations, floor):
    """Plot the evaluation figures against epochs, each beside its real-data floor (dashed)."""
    if not evaluations:
        return
    epochs = [e["epoch"] for e in evaluations]
    panels = (("fid", "Frechet distance (log scale)"), ("inception_score", "Inception Score"),
              ("classes_covered", "classes covered"), ("confidence", "mean top-class confidence"))
    figure, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    for axis, (key, title) in zip(axes.flat, panels):
        axis.plot(epochs, [e[key] for e in evaluations], "o-", color="tab:purple",
                  label="generated (EMA of G)" if "raw" in evaluations[-1] else "generated")
        if "raw" in evaluations[-1]:
            raw = [(e["epoch"], e["raw"][key]) for e in evaluations if "raw" in e]
            axis.plot(*zip(*raw), "s:", color="tab:gray", markersize=4, label="raw G (no EMA)")
        axis.axhline(floor[key], color="black", linestyle="--", linewidth=1, label="real data")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if key == "fid":
            axis.set_yscale("log")
        if key == "classes_covered":
            axis.set_ylim(0, 10.5)
    axes[0, 0].legend()
    for axis in axes[1]:
        axis.set_xlabel("epoch")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def load_trained_generator(run):
    """The run's trained generator (Keras safe mode: no code from the file) and the run's saved config."""
    if not run.generator.is_file():
        raise DataError(f"{run.generator}: no trained generator in this run directory; train first "
                        f"(or name the run with --out)")
    try:
        saved = json.loads(run.config.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{run.config}: cannot read the run's configuration ({error})") from None
    try:
        generator = keras.saving.load_model(run.generator, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged archive.
        raise DataError(f"{run.generator}: cannot load the generator ({type(error).__name__}: {error})") from None
    saved.setdefault("transform", "none")
    saved.setdefault("dataset", "mnist")
    saved.setdefault("classes", "")
    saved.setdefault("conditional", False)
    return generator, SimpleNamespace(**saved)


def _latent_dim(generator):
    return generator.input_shape[0][-1] if len(generator.inputs) == 2 else generator.input_shape[-1]


def evaluate_run(config, run):
    """Score a trained run's generator on `config.num_samples` samples; print and save the figures."""
    generator, saved = load_trained_generator(run)
    evaluator = load_evaluator(saved.dataset, config.data_dir, saved.classes)
    figures = evaluate_generator(evaluator, generator, config.num_samples, config.seed, saved.transform, saved)
    save_json(run.evaluation, {"figures": figures, "real_data_floor": evaluator.floor,
                               "classifier_test_accuracy": evaluator.test_accuracy})
    print(f"Sample quality of {run.generator} ({figures['samples']} samples, seed {config.seed}; "
          f"{saved.dataset} classifier test accuracy {evaluator.test_accuracy:.4f}; {figures['seconds']:.1f} s):")
    print(evaluation.format_figures(figures, evaluator.floor))
    print(f"Wrote {run.evaluation}")
    return figures


def generate_or_evaluate(config, run):
    """Serve --generate, --interpolate or --evaluate from the trained run in `run`; True if one was asked for."""
    if config.generate:
        generate(config, run)
    if config.interpolate:
        interpolate(config, run)
    if config.evaluate:
        evaluate_run(config, run)
    return bool(config.generate or config.evaluate or config.interpolate)


def benchmark_or_train(config, run, data, build, transform="none"):
    """With --benchmark, time the training step; else create the run directory and train (see `train`)."""
    if config.benchmark:
        return benchmark(config, data, build)
    run.create(config.overwrite)
    return train(config, run, data, build, transform)


def _requested_labels(config, saved, count):
    """--label L for every sample, else labels balanced over the run's classes; checked against the run."""
    if config.label is None:
        return balanced_labels(count, saved)
    classes = parse_classes(saved.classes, saved.dataset)
    if config.label not in classes:
        raise UsageError(f"argument --label: {config.label} is not a class this run was trained on "
                         f"({', '.join(map(str, classes))})")
    return np.full(count, config.label, np.int32)


def interpolate(config, run, frames=48, points=4):
    """Write interpolation.gif: a smooth walk through latent space between `points` random points.

    For a conditional run, a second half morphs through the classes with the noise held fixed.
    """
    generator, saved = load_trained_generator(run)
    rng = np.random.default_rng(config.seed)
    columns = config.sample_grid
    anchors = rng.standard_normal((points + 1, columns, _latent_dim(generator))).astype(np.float32)
    anchors[-1] = anchors[0]  # Back to the start, so the GIF loops smoothly.
    steps = np.linspace(0, points, frames, endpoint=False)
    labels = one_hot(_requested_labels(config, saved, columns), saved)
    pictures = []
    for t in steps:
        low, fraction = int(t), t - int(t)
        weight = (1 - np.cos(np.pi * fraction)) / 2  # Eased: slow at each anchor.
        noise = (1 - weight) * anchors[low] + weight * anchors[low + 1]
        pictures.append(image_grid(sample_images(generator, noise, labels), columns))
    if len(generator.inputs) == 2:
        classes = parse_classes(saved.classes, saved.dataset)
        eye = one_hot(classes + classes[:1], saved)
        for t in np.linspace(0, len(classes), frames, endpoint=False):
            low, fraction = int(t), t - int(t)
            mixed = (1 - fraction) * eye[low] + fraction * eye[low + 1]
            pictures.append(image_grid(sample_images(generator, anchors[0], np.tile(mixed, (columns, 1))), columns))
    path = run.path / "interpolation.gif"
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, np.stack(pictures), extension=".gif", duration=80, loop=0)
    print(f"Wrote {path} ({len(pictures)} frames)")
    return path


def generate(config, run):
    """Load the run's trained generator and write `config.generate` samples: a grid, and an npz if asked.

    The noise comes from `config.seed`. With `config.samples_npz` the samples are also saved as
    uint8 (N, 28, 28), 0..255, white on black like MNIST, under the key 'images' (the 32 and 64
    presets' outputs are cropped or resized back to 28x28).
    """
    generator, saved = load_trained_generator(run)
    noise = np.random.default_rng(config.seed).standard_normal((config.generate, _latent_dim(generator)))
    labels = _requested_labels(config, saved, config.generate)
    samples = sample_images(generator, noise.astype(np.float32), one_hot(labels, saved))
    save_png(run.generated, image_grid(samples))
    print(f"Wrote {config.generate} samples to {run.generated}"
          + (f" (labels: {config.label if config.label is not None else 'balanced'})" if saved.conditional else ""))
    if config.samples_npz:
        destination = Path(config.samples_npz)
        native = to_dataset_uint8(samples, saved.transform, DATASETS[saved.dataset].shape[0])
        try:
            with atomic_path(destination) as temporary, open(temporary, "wb") as handle:
                np.savez_compressed(handle, images=native)
        except OSError as error:
            raise DataError(f"{destination}: cannot write the samples ({error.strerror or error})") from None
        print(f"Wrote {destination} (images: uint8 {native.shape})")
    return samples
