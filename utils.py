"""Data, pictures and files: what both training scripts read and write.

- the datasets: MNIST and Fashion-MNIST from IDX files (or Keras's `mnist.npz`), CIFAR-10 through
  ganlab/datasets/, each found on disk or downloaded and verified, kept to `--classes`
  (`load_dataset`, `load_training_images`);
- images: scaling to the generator's [-1, 1] and the presets' resizing to and from the native size
  (`prepare_images`, `to_dataset_uint8`), and grids of samples (`image_grid`);
- files: PNG, JSON and GIF writers that never leave half a file (`atomic_path`);
- plots: the losses and D's outputs (`plot_history`), the evaluation figures (`plot_metrics`).
"""

import contextlib
import errno
import gzip
import json
import math
import os
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np

from ganlab.datasets import cifar10, downloads, folder
from ganlab.errors import DataError, UsageError


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files (or Keras's mnist.npz), found or downloaded
# ---------------------------------------------------------------------------------------------

_IDX_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: 3-D unsigned bytes; 0x0801: 1-D.


def available_memory():
    """Bytes of memory this machine can still give (MemAvailable on Linux, else all of it)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63


def read_idx(path, kind, limit=0):
    """Read an MNIST IDX file of `kind` 'images' (N, 28, 28) or 'labels' (N,), as uint8; gunzipped if .gz.

    Reads no more than the header promises (and, with `limit` > 0, only the first `limit` items),
    so a gzip bomb or a lying header cannot exhaust memory. Raises DataError naming the file for a
    bad gzip stream, a wrong magic number, a size that disagrees with the header, images that are
    not 28x28, more data than memory holds or labels outside 0..9.
    """
    path = Path(path)
    dims = 3 if kind == "images" else 1
    header_size = 4 + 4 * dims
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            header = handle.read(header_size)
            if len(header) < header_size:
                raise DataError(f"{path}: truncated: {len(header)} bytes, shorter than the {header_size}-byte "
                                f"IDX header")
            magic = int.from_bytes(header[:4], "big")
            if magic != _IDX_MAGIC[kind]:
                raise DataError(f"{path}: bad magic number {magic}, expected {_IDX_MAGIC[kind]} for IDX {kind}")
            shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
            if kind == "images" and shape[1:] != (28, 28):
                raise DataError(f"{path}: wrong image size {shape[1]}x{shape[2]}, expected 28x28")
            expected = int(np.prod(shape))
            count = min(limit, shape[0]) if limit else shape[0]
            wanted = count * int(np.prod(shape[1:]))  # Bytes of the `count` items read.
            if wanted > available_memory() // 2:
                raise DataError(f"{path}: header promises {shape[0]} {kind} ({wanted / 2**30:.1f} GB), more than "
                                f"half the memory available ({available_memory() / 2**30:.1f} GB): a damaged "
                                f"header, or a file too large for this machine")
            if shape[0] == 0:
                raise DataError(f"{path}: holds no {kind} (its header says 0)")
            data = handle.read(wanted)
            if len(data) < wanted:
                raise DataError(f"{path}: truncated: header promises {expected} bytes of {kind} for shape {shape}, "
                                f"file holds {len(data)}")
            if count == shape[0] and handle.read(1):
                raise DataError(f"{path}: unexpected bytes after the {kind} of shape {shape}")
    except (gzip.BadGzipFile, zlib.error):
        raise DataError(f"{path}: not a valid gzip file") from None
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    array = np.frombuffer(data, dtype=np.uint8).reshape((count,) + shape[1:])
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


def _not_a_file(path):
    """What is at `path` instead of a regular file, in words."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as error:
            return "a symbolic link loop" if error.errno == errno.ELOOP else "a dangling symbolic link"
    return "a directory" if path.is_dir() else "not a regular file"


def _idx_files_in(directory, split):
    """The (images, labels) paths of `split` in `directory`, gzip or raw, or None if either is missing."""
    found = []
    for base in downloads.IDX_FILES[split]:
        candidates = [directory / f"{base}.gz", directory / base]
        for candidate in candidates:  # Something in the way is named, not skipped for a download.
            if os.path.lexists(candidate) and not candidate.is_file():
                raise DataError(f"{candidate}: {_not_a_file(candidate)}, where the {base} file should be")
        found.append(next((c for c in candidates if c.is_file()), None))
    if any(found) and not all(found):  # Half a dataset: named, rather than passed over for another copy.
        missing = downloads.IDX_FILES[split][found.index(None)]
        raise DataError(f"{directory}: has {Path(next(p for p in found if p)).name} but not {missing}(.gz)")
    return tuple(found) if all(found) else None


def locate_idx_dataset(name, split="train", data_dir=None):
    """Where a split of IDX dataset `name` is found, without downloading: its (images, labels) files,
    or Keras's mnist.npz as a one-element tuple, or None; and the directories searched, in order.

    The order: `data_dir`, the dataset's environment variable (`$MNIST_DIR`, `$FASHION_MNIST_DIR`),
    `data/<name>/` in the repository, the system's copy (Debian's dataset-fashion-mnist), Keras's
    cache; in each, the four IDX files (gzip or raw) or, for MNIST, an `mnist.npz`.
    """
    spec = downloads.IDX_DATASETS[name]
    directories = downloads.search_directories(data_dir, spec.env, name)
    keras_cache = downloads.keras_datasets()
    searched = directories + list(spec.system_dirs) + ([keras_cache / spec.keras_dir] if spec.keras_dir else [])
    for directory in searched:
        files = _idx_files_in(directory, split)
        if files:
            return files, searched
        if spec.keras_npz and (directory / spec.keras_npz).is_file():
            return (directory / spec.keras_npz,), searched
    if spec.keras_npz and (keras_cache / spec.keras_npz).is_file():
        return (keras_cache / spec.keras_npz,), searched
    return None, searched


def load_idx_dataset(name, split="train", data_dir=None, limit=0, download=True):
    """Load a split of an IDX-format dataset (MNIST, Fashion-MNIST) as uint8 (N, 28, 28) and labels (N,).

    Looks where `locate_idx_dataset` says. If none has it, downloads the split from a public mirror
    into the first of those directories given (else `data/<name>/`), verifying SHA-256. `limit` > 0
    keeps the first images.
    """
    files, searched = locate_idx_dataset(name, split, data_dir)
    if files and len(files) == 1:
        images, labels = _read_npz(files[0], split)
        return _apply_limit(images, labels, limit)
    if files is None:
        spec = downloads.IDX_DATASETS[name]
        if not download:
            raise DataError(f"{searched[0]}: no {spec.title} {split} files (looked in "
                            f"{', '.join(map(str, searched))})")
        downloads.download_idx(name, searched[0], split)
        files = _idx_files_in(searched[0], split)
    images = read_idx(files[0], "images", limit)
    labels = read_idx(files[1], "labels", limit)
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


# The datasets: how each is loaded, its image shape, and its class names (for --classes).
DATASETS = {
    "mnist": SimpleNamespace(load=load_mnist, shape=(28, 28, 1), classes=tuple(str(d) for d in range(10))),
    "fashion_mnist": SimpleNamespace(load=load_fashion_mnist, shape=(28, 28, 1), classes=(
        "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")),
    "cifar10": SimpleNamespace(load=cifar10.load, shape=(32, 32, 3), classes=cifar10.CLASSES),
}


def data_source(config):
    """Where the run's training images were read from, resolved, for config.json (issue 41, 1): the folder of
    pictures, the directory of the dataset's files, or Keras's mnist.npz; None if not found."""
    if config.dataset == "folder":
        return str(Path(config.data_dir).expanduser().resolve())
    if config.dataset == "cifar10":
        files = cifar10.locate("train", config.data_dir)[0]
    else:
        files = locate_idx_dataset(config.dataset, "train", config.data_dir)[0]
    if not files:
        return None
    return str(Path(files[0]).resolve() if len(files) == 1 else Path(files[0]).resolve().parent)


def parse_classes(text, class_names, dataset):
    """`--classes` as sorted class indices: a comma-separated list of names of `class_names` or indices; a
    token that names a class is that class (a folder's subfolder "2" is "2", wherever it sorts), and
    is read as an index only where no class has that name; '' means all. A dataset without classes
    (a folder without subfolders) has one, 0."""
    if not class_names:
        if text.strip():
            raise UsageError(f"argument --classes: {dataset} has no classes (a folder without class subfolders)")
        return [0]
    names = [name.lower().replace("_", " ") for name in class_names]
    if not text.strip():
        return list(range(len(names)))
    indices = set()
    for token in (t.strip() for t in text.split(",")):
        wanted = token.lower().replace("_", " ")
        if wanted in names:
            indices.add(names.index(wanted))
        elif token.isascii() and token.isdigit() and int(token) < len(names):  # Not "²", which int() refuses.
            indices.add(int(token))
        else:
            raise UsageError(f"argument --classes: {token!r} is not a {dataset} class; use 0..{len(names) - 1} "
                             f"or one of {', '.join(class_names)}")
    return sorted(indices)


def classes_in_play(config):
    """The class indices a run trains on: its --classes of its dataset's `class_names` (settings or a saved run)."""
    return parse_classes(config.classes, config.class_names, config.dataset)


def load_dataset(config, split="train", limit=0):
    """The `config.dataset` split, kept to `config.classes`, then to the first `limit` images (of a folder:
    `limit` images from every class in proportion, `folder.spread_order`).

    A folder (--dataset folder) is one set: its "train" split is all of it, at `config.data_shape`.
    """
    if config.dataset == "folder":
        side, _, channels = config.data_shape
        found, subset = folder.probe(config.data_dir), len(classes_in_play(config)) < max(len(config.class_names), 1)
        count = min(limit, len(found.files)) if limit and not subset else len(found.files)
        needed, available = count * side * side * channels, available_memory()
        if available and needed > available / 2:  # Before decoding: it streams file by file, into this.
            raise DataError(f"{found.root}: its {count:,} images at {side}x{side}x{channels} need {size_text(needed)} "
                            f"in memory, more than half of the {size_text(available)} available; train on fewer "
                            f"with --limit, or at a smaller size")
        images, labels = folder.load(found, side, channels, 0 if subset else limit)
    else:
        images, labels = DATASETS[config.dataset].load(split, config.data_dir)
    wanted = classes_in_play(config)
    if len(wanted) < max(len(config.class_names), 1):
        keep = np.isin(labels, wanted)
        images, labels = images[keep], labels[keep]
    if config.dataset == "folder" and limit and limit < len(images):  # Every class in proportion, not the first.
        keep = np.sort(folder.spread_order(labels)[:limit])
        return images[keep], labels[keep]
    return _apply_limit(images, labels, limit)


def load_training_images(config, image_size=None, transform="none"):
    """The training set for a run: the dataset's train split (its --classes, up to --limit), as images
    uint8 (N, S, S, C) at the model's size S (see `prepare_images`) and labels int32 (N,).

    Refuses a batch size larger than the data, as a flag error, before any model is built.
    """
    images, labels = load_dataset(config, "train", config.limit)
    if not len(images):
        raise DataError(f"--classes {config.classes}: the {config.dataset} training set holds no images of them")
    if config.batch_size > len(images):
        raise UsageError(f"argument --batch-size: {config.batch_size} is larger than the {len(images)} training images")
    missing = [config.class_names[c] for c in classes_in_play(config) if config.conditional and c not in labels]
    if missing:  # G would be asked to draw a class it never saw (issue 41, 8).
        raise DataError(f"{config.data_dir or config.dataset}: no training image of class {', '.join(missing)}"
                        + (f" among the {counted(config.limit, 'picture')} of --limit {config.limit}" if config.limit
                           else "") + "; a conditional run needs every class: raise --limit, or leave it out "
                                      "with --classes")
    # Kept as uint8 at the model's size (a quarter of float32's memory, on the device too); each
    # step scales its batch to [-1, 1]. Converted in chunks, so the float copies stay small.
    size = image_size or images.shape[1]
    chunks = [to_uint8(prepare_images(images[i:i + 8192], size, transform)) for i in range(0, len(images), 8192)]
    return np.concatenate(chunks), labels.astype(np.int32)


def _apply_limit(images, labels, limit):
    return (images[:limit], labels[:limit]) if limit else (images, labels)


# ---------------------------------------------------------------------------------------------
# Images: the presets' resolutions and grids
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
        import tensorflow as tf  # Here, not at the top: the command line is checked without TensorFlow.

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
        import tensorflow as tf

        images = tf.image.resize(images, (native_size, native_size), method="area").numpy()
    if images.shape[1:3] != (native_size, native_size):
        raise ValueError(f"cannot bring images of shape {images.shape} back to {native_size}x{native_size} "
                         f"with transform {transform!r}")
    return to_uint8(images[..., 0] if images.shape[-1] == 1 else images)


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



# ---------------------------------------------------------------------------------------------
# Files written whole or not at all: PNG, JSON, GIF
# ---------------------------------------------------------------------------------------------


def counted(count, noun):
    """`count` and its noun, plural unless one: "1 epoch", "20 epochs"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def size_text(count):
    """A byte count for people: 1.2 GB, 34.5 MB or 12 kB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 1024:.0f} kB"


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
    except OSError as error:  # A writer that does not say which file (Pillow on a full disk): this one.
        if error.filename is None:
            error.filename = str(path)
        raise
    finally:
        with contextlib.suppress(OSError):  # Not there, or a read-only folder: the error that got here says so.
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
# Plots: losses and D's outputs per iteration and epoch, evaluation figures per epoch
# ---------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot, drawing into files (no display is needed or assumed). Imported at the first plot, as
    TensorFlow's start has loaded matplotlib by then, quietly; at the top it would add 0.5 s to --help."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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

    def smoothed(values, span):
        """An exponential moving average over ~a tenth of an epoch: the trend through the step-to-step
        flips of the adversarial game (D(x) alternating between two levels, say)."""
        alpha, level, out = 2.0 / (span + 1.0), values[0], np.empty_like(values)
        for index, value in enumerate(values):
            level = alpha * value + (1.0 - alpha) * level
            out[index] = level
        return out

    x_epoch = [e["epoch"] - 0.5 for e in epochs]  # An epoch's mean belongs to its middle.
    style = "o-" if len(epochs) <= 30 else "-"
    figure, (top, bottom) = _pyplot().subplots(2, 1, figsize=(8, 7), sharex=True)
    for key, label, colour in (("d_loss", "D loss", "tab:blue"), ("g_loss", "G loss", "tab:orange")):
        top.plot(x, binned(key), color=colour, alpha=0.2, linewidth=0.6)
        top.plot(x, smoothed(binned(key), max(2.0, steps_per_epoch / 10 / width)), color=colour, linewidth=1.0)
        top.plot(x_epoch, [e[key] for e in epochs], style, color=colour, label=f"{label} (epoch mean)")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    for key, label, colour in (("d_real", "D(x)", "tab:green"), ("d_fake", "D(G(z))", "tab:red")):
        bottom.plot(x, binned(key), color=colour, alpha=0.2, linewidth=0.6)
        bottom.plot(x, smoothed(binned(key), max(2.0, steps_per_epoch / 10 / width)), color=colour, linewidth=1.0)
        bottom.plot(x_epoch, [e[key] for e in epochs], style, color=colour, label=f"mean {label}")
    bottom.set_ylabel("discriminator output")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("epoch")
    bottom.legend()
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    _pyplot().close(figure)


def plot_metrics(path, evaluations, floor):
    """Plot the evaluation figures against epochs, each beside its real-data floor (dashed)."""
    if not evaluations:
        return
    epochs = [e["epoch"] for e in evaluations]
    panels = (("fid", "Frechet distance (log scale)"), ("inception_score", "Inception Score"),
              ("classes_covered", "classes covered"), ("confidence", "mean top-class confidence"))
    from matplotlib.ticker import MaxNLocator

    figure, axes = _pyplot().subplots(2, 2, figsize=(9, 6.5), sharex=True)
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
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # Epochs, not 1.900 to 2.100 around one point.
    if len(epochs) == 1:
        axes[1, 0].set_xlim(epochs[0] - 1, epochs[0] + 1)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    _pyplot().close(figure)
