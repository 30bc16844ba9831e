"""Sampling and scoring a trained run: `--generate N`, `--interpolate`, `--evaluate`.

Each reads the run's saved generator (`generator.keras`, in Keras's safe mode) and its saved
configuration; none needs the training state. `evaluate_generator` is also what training calls at
each evaluation; the figures themselves are computed in evaluation.py.
"""

import contextlib
import os
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import keras
import numpy as np

import utils
from ganlab.datasets.downloads import cache_dir
from ganlab.errors import DataError, TrainingStopped, UsageError, out_of_memory
from ganlab.models import balanced_labels, one_hot
from ganlab.sampling import evaluation


def generate_or_evaluate(config, run):
    """Serve --generate, --interpolate or --evaluate from the trained run in `run`; True if one was asked for."""
    doing = "--generate" if config.generate else "--interpolate" if config.interpolate else "--evaluate"
    with out_of_memory("sampling", f"the run's generator ({run.generator})"), stopped_by_signals(doing):
        if config.generate:
            generate(config, run)
        if config.interpolate:
            interpolate(config, run)
        if config.evaluate:
            evaluate_run(config, run)
    return bool(config.generate or config.evaluate or config.interpolate)


class _Signalled(BaseException):
    """A signal while sampling: a BaseException, so that no `except Exception` on the way (Keras wraps
    what a layer raises) takes it for an error of its own."""


# The signals received under `stopped_by_signals`. Its handler's raise can be lost: Python runs a handler between
# any two bytecodes, inside a `__del__` too, whose exceptions it prints and drops; each batch looks here again.
_received = []


def _stop_if_signalled():
    """Raise the stop of a signal received while sampling whose first raise was lost (see `_received`)."""
    if _received:
        raise _Signalled(_received[0])


@contextlib.contextmanager
def stopped_by_signals(doing):
    """While active, SIGTERM and SIGINT stop `doing` at once, in one line: the with-blocks it unwinds
    remove their temporaries, so nothing half-written stays (exit 128 + signal)."""
    def handle(signum, frame):
        _received.append(signum)
        raise _Signalled(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Signalled as signalled:
        signum = signalled.args[0]
        raise TrainingStopped(f"{signal.Signals(signum).name}: stopped {doing}; nothing half-written was left",
                              128 + signum) from None
    finally:
        _received.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_writable(directory, what):
    """DataError, before any work, unless this process can create files in `directory` (`what` names it)."""
    probe = Path(directory) / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"{directory}: cannot write {what} there ({error.strerror or error})") from None


def load_trained_generator(run, writes=None):
    """The run's trained generator (Keras safe mode: no code from the file) and the run's saved config;
    with `writes` (what will be written into the run), checks first that it can be."""
    if not run.generator.is_file():
        raise DataError(f"{run.generator}: no trained generator in this run directory; train first "
                        f"(or name the run with --out)")
    saved = run.read_config()
    if not zipfile.is_zipfile(run.generator):  # Else Keras calls a truncated archive "File not found".
        raise DataError(f"{run.generator}: damaged (not a complete .keras archive: truncated or overwritten); "
                        f"train again, or --resume the run, which rewrites it")
    try:
        generator = keras.saving.load_model(run.generator, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a damaged archive.
        raise DataError(f"{run.generator}: cannot load the generator ({type(error).__name__}: {error})") from None
    problem = _not_the_runs(generator, saved)  # Issue 41, 10: another script's or architecture's, copied in.
    if problem:
        raise DataError(f"{run.generator}: not this run's generator ({problem}); restore the run's own, or train "
                        f"again")
    if writes:
        check_writable(run.path, writes)
    saved.setdefault("transform", "none")
    saved.setdefault("dataset", "mnist")
    saved.setdefault("classes", "")
    saved.setdefault("conditional", False)
    if saved["dataset"] in utils.DATASETS:  # Runs from before folders: the dataset's own.
        saved.setdefault("class_names", list(utils.DATASETS[saved["dataset"]].classes))
        saved.setdefault("data_shape", list(utils.DATASETS[saved["dataset"]].shape))
    return generator, SimpleNamespace(**saved)


def _not_the_runs(generator, saved):
    """What makes `generator` another run's than the one config.json (`saved`) describes, or None: its noise
    input or its picture's shape."""
    inputs = generator.inputs if isinstance(generator.inputs, list) else [generator.inputs]
    latent, output = inputs[0].shape[-1], tuple(generator.outputs[0].shape[1:])
    if saved.get("latent_dim") is not None and latent != saved["latent_dim"]:
        return f"it takes noise of {latent}, the run's config.json says {saved['latent_dim']}"
    side = (saved.get("data_shape") or [None])[0]  # The pictures' side, which a model drawing them as is draws.
    if side and saved.get("transform", "none") == "none" and output[:2] != (side, side):
        return f"it draws {'x'.join(map(str, output))} pictures, the run's are {side}x{side}"
    return None


def _latent_dim(generator):
    return generator.input_shape[0][-1] if len(generator.inputs) == 2 else generator.input_shape[-1]


def sample_images(generator, noise, labels=None, batch_size=500):
    """Run the generator in inference mode (batch norm on its moving statistics) over `noise`, in batches.

    A conditional generator (two inputs) also takes `labels`, as one-hot (N, classes) float vectors
    (mixtures of two classes too, for morphing); an unconditional one ignores them.
    """
    conditional = len(generator.inputs) == 2
    outputs = []
    for i in range(0, len(noise), batch_size):
        _stop_if_signalled()
        outputs.append(generator([noise[i:i + batch_size], labels[i:i + batch_size]] if conditional
                                 else noise[i:i + batch_size], training=False).numpy())
    return np.concatenate(outputs)


def check_cache_dir():
    """DataError, naming GAN_MNIST_CACHE, unless the classifier cache is a directory this process can write."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(f"{directory}: cannot use the classifier cache ({error.strerror or error}); "
                        f"set GAN_MNIST_CACHE to a writable directory") from None


def held_out_split(labels):
    """Which of a folder's pictures its classifier is checked on and the samples compared with: every tenth of
    each class, and at least one of each (issue 41, 9), as a boolean mask."""
    held_out = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        held_out[where[9::10] if len(where) >= 10 else where[-1:]] = True
    return held_out


def too_small_to_score(class_names, class_sizes, classes):
    """Why a folder's classes in play cannot be scored (a class of fewer than two pictures: one to train its
    classifier on, one held out), or None."""
    small = [f"{class_names[c]} ({utils.counted(int(class_sizes[c]), 'picture')})" for c in classes
             if class_sizes[c] < 2]
    return (f"class {', '.join(small)} is too small: the folder's classifier needs two pictures of each class, "
            f"one to learn from and one held out") if small else None


def load_evaluator(config):
    """The sample-quality evaluator for `config`'s dataset and --classes (the settings, or a trained run's):
    its classifier is trained once per dataset (minutes) and cached. A folder has no test split: its
    classifier trains on nine tenths of it, and the held-out tenth (`held_out_split`) is the
    reference the samples are compared with."""
    check_cache_dir()  # Before minutes of loading and training, not after them.
    whole = SimpleNamespace(dataset=config.dataset, data_dir=config.data_dir, classes="", limit=0,
                            class_names=config.class_names, data_shape=config.data_shape)
    if config.dataset == "folder":
        images, labels = utils.load_dataset(whole, "train")
        too_small = too_small_to_score(config.class_names, np.bincount(labels, minlength=len(config.class_names)),
                                       utils.classes_in_play(config))
        if too_small:
            raise DataError(f"{config.data_dir}: cannot score the run: {too_small}")
        held_out = held_out_split(labels)
        train_images, train_labels, test_images, test_labels = (images[~held_out], labels[~held_out],
                                                                images[held_out], labels[held_out])
    else:
        train_images, train_labels = utils.load_dataset(whole, "train")
        test_images, test_labels = utils.load_dataset(whole, "test")
    try:
        evaluator = evaluation.Evaluator.load_or_train(cache_dir(), train_images, train_labels, test_images,
                                                       test_labels, classes=utils.classes_in_play(config),
                                                       dataset=None if config.dataset == "folder" else config.dataset,
                                                       log=lambda line: print(line, flush=True))
    except OSError as error:
        raise DataError(f"{cache_dir()}: cannot use the classifier cache ({error.strerror or error}); "
                        f"set GAN_MNIST_CACHE to a writable directory") from None
    in_play = np.isin(test_labels, evaluator.classes)
    counts = np.bincount(test_labels[in_play], minlength=len(config.class_names) or 1)
    evaluator.reference_histogram = {  # Of the held-out images the scores compare against.
        "images": int(in_play.sum()),
        "fractions": {name: round(float(counts[c]) / max(int(in_play.sum()), 1), 4)
                      for c, name in enumerate(config.class_names) if c in evaluator.classes}}
    if config.dataset == "folder":
        evaluator.meaningless = evaluation.no_better_than_chance(evaluator.test_accuracy, int(in_play.sum()),
                                                                 len(evaluator.classes))
    return evaluator


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
    samples = utils.to_dataset_uint8(sample_images(generator, noise, one_hot(requested, config)), transform,
                                     config.data_shape[0])
    conditional = len(generator.inputs) == 2
    figures = evaluator.evaluate(samples, requested if conditional else None, list(config.class_names))
    figures["seconds"] = round(time.perf_counter() - start, 2)
    return figures


def evaluate_run(config, run):
    """Score a trained run's generator on `config.num_samples` samples; print and save the figures."""
    generator, saved = load_trained_generator(run, "evaluation.json")
    if len(saved.class_names) < 2:
        raise UsageError(f"argument --evaluate: the run in {run.path} trained on pictures without class subfolders, "
                         f"and the figures come from a classifier of the classes")
    evaluator = load_evaluator(SimpleNamespace(**vars(saved) | {"data_dir": config.data_dir or saved.data_dir}))
    figures = evaluate_generator(evaluator, generator, config.num_samples, config.seed, saved.transform, saved)
    utils.save_json(run.evaluation, {"figures": figures, "real_data_floor": evaluator.floor,
                               "classifier_test_accuracy": evaluator.test_accuracy,
                               "classifier_test_images": evaluator.test_count})
    print(f"Sample quality of {run.generator} ({figures['samples']} samples, seed {config.seed}; "
          f"{saved.dataset} classifier test accuracy {evaluator.accuracy_text()}; {figures['seconds']:.1f} s):")
    print(evaluation.format_figures(figures, evaluator.floor))
    print(f"Wrote {run.evaluation}")
    return figures


def _requested_labels(config, saved, count, start=0):
    """--label L for every sample, else labels balanced over the run's classes (samples `start` to
    `start + count` of that cycle); checked against the run."""
    if config.label is None:
        return balanced_labels(count, saved, start)
    if not saved.conditional:
        raise UsageError("argument --label: this run is not conditional (trained without --conditional), "
                         "so it cannot be asked for a class")
    classes = utils.classes_in_play(saved)
    names = list(saved.class_names) or [str(c) for c in classes]
    try:  # A name first, then an index (issue 41, 2), as --classes reads them.
        (label,) = utils.parse_classes(config.label, saved.class_names, saved.dataset) if "," not in config.label \
            else (None, None)
    except (UsageError, ValueError):
        label = None
    if label not in classes:
        raise UsageError(f"argument --label: {config.label} is not a class this run was trained on "
                         f"({', '.join(names[c] if names[c] == str(c) else f'{c} {names[c]}' for c in classes)})")
    return np.full(count, label, np.int32)


def interpolate(config, run, frames=48, points=4):
    """Write interpolation.gif: a smooth walk through latent space between `points` random points.

    For a conditional run, a second half morphs through the classes with the noise held fixed.
    """
    generator, saved = load_trained_generator(run, "interpolation.gif")
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
        pictures.append(utils.image_grid(sample_images(generator, noise, labels), columns))
    if len(generator.inputs) == 2:
        classes = utils.classes_in_play(saved)
        eye = one_hot(classes + classes[:1], saved)
        for t in np.linspace(0, len(classes), frames, endpoint=False):
            low, fraction = int(t), t - int(t)
            mixed = (1 - fraction) * eye[low] + fraction * eye[low + 1]
            pictures.append(utils.image_grid(sample_images(generator, anchors[0], np.tile(mixed, (columns, 1))), columns))
    path = run.path / "interpolation.gif"
    with utils.atomic_path(path) as temporary:
        iio.imwrite(temporary, np.stack(pictures), extension=".gif", duration=80, loop=0)
    print(f"Wrote {path} ({len(pictures)} frames)")
    return path


GRID_LIMIT = 32 * 32  # --generate draws at most this many samples into its grid (the npz takes them all).


def generate(config, run, batch_size=1000):
    """Load the run's trained generator and write `config.generate` samples: a grid, and an npz if asked.

    The noise comes from `config.seed`. The grid shows the first GRID_LIMIT samples. With
    `config.samples_npz` all are also saved as uint8 (N, 28, 28), 0..255, white on black like MNIST,
    under the key 'images' (the 32 and 64 presets' outputs are cropped or resized back to 28x28).
    Samples are drawn `batch_size` at a time and streamed to the npz, so memory stays bounded
    whatever N is. Returns the grid's samples.
    """
    generator, saved = load_trained_generator(run, "generated_samples.png")
    if config.samples_npz:
        check_writable(Path(config.samples_npz).resolve().parent, "--samples-npz")
    native_size, channels = saved.data_shape[0], saved.data_shape[-1]
    if config.samples_npz:
        check_npz_space(config.samples_npz, config.generate * native_size ** 2 * channels)
    # Without --samples-npz only the grid's samples are written: the rest would be drawn for nothing.
    count = config.generate if config.samples_npz else min(config.generate, GRID_LIMIT)
    _requested_labels(config, saved, 1)  # Checks --label against the run before anything is drawn.
    noise_rng = np.random.default_rng(config.seed)

    def batches():  # The same noise as one (count, latent) draw would give: numpy fills it in order.
        for start in range(0, count, batch_size):
            noise = noise_rng.standard_normal((min(batch_size, count - start), _latent_dim(generator)))
            labels = _requested_labels(config, saved, len(noise), start)  # Streamed, as the images are.
            yield sample_images(generator, noise.astype(np.float32), one_hot(labels, saved))

    shown = []
    npz = NpzImageWriter(config.samples_npz, (count, native_size, native_size, channels)
                         ) if config.samples_npz else contextlib.nullcontext()
    with npz:
        for start, samples in zip(range(0, count, batch_size), batches()):
            shown.append(samples[:max(GRID_LIMIT - start, 0)])
            if config.samples_npz:
                npz.write(utils.to_dataset_uint8(samples, saved.transform, native_size))
    shown = np.concatenate(shown)
    utils.save_png(run.generated, utils.image_grid(shown))
    print(f"Wrote {len(shown)} of the {config.generate} samples to {run.generated}"
          + (f" (labels: {config.label if config.label is not None else 'balanced'})" if saved.conditional else ""))
    if config.samples_npz:
        print(f"Wrote {config.samples_npz} (images: uint8 {npz.shape})")
    return shown


def check_npz_space(path, size):
    """Refuse, before any sample is drawn, an npz of `size` uncompressed bytes that its folder cannot hold."""
    folder = Path(path).resolve().parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as error:
        raise DataError(f"{path}: cannot write the samples there ({error.strerror or error})") from None
    if size > free:
        raise UsageError(f"argument --generate: {utils.size_text(size)} of samples (uncompressed) cannot fit in "
                         f"{folder}, which has {utils.size_text(free)} free; ask for fewer, or write --samples-npz "
                         f"elsewhere")


def remove_dead_temporaries(path):
    """Remove the temporaries `.NAME.tmp-PID.npz` that killed processes left beside `path` (a live one's stay)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.stem}.tmp-*.npz"):
        try:
            os.kill(int(leftover.name.rsplit("tmp-", 1)[1].split(".")[0]), 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


class NpzImageWriter:
    """Writes one uint8 array under the key 'images' into a compressed .npz, batch by batch, atomically.

    What np.savez_compressed writes, without holding the whole array: a zip member images.npy with
    numpy's header and the rows in order, in a temporary file renamed into place once all are in.
    """

    def __init__(self, path, shape):
        self.path = Path(path)
        self.shape = shape[:-1] if shape[-1] == 1 else shape  # One channel: (N, 28, 28), as MNIST's arrays.
        self.temporary = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.npz")

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except OSError as error:
            raise DataError(f"{self.path}: cannot write the samples ({error.strerror or error})") from None

    def __enter__(self):
        try:
            with self._errors():
                remove_dead_temporaries(self.path)
                self._zip = zipfile.ZipFile(self.temporary, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
                self._member = self._zip.open("images.npy", "w", force_zip64=True)
                np.lib.format.write_array_header_1_0(self._member, {"descr": "|u1", "fortran_order": False,
                                                                    "shape": self.shape})
        except DataError:
            self.temporary.unlink(missing_ok=True)
            raise
        return self

    def write(self, images):
        with self._errors():
            self._member.write(np.ascontiguousarray(images, np.uint8).reshape((-1,) + self.shape[1:]).tobytes())

    def __exit__(self, kind, *exc_info):
        try:
            with self._errors():
                self._member.close()
                self._zip.close()
                if kind is None:
                    os.replace(self.temporary, self.path)
        finally:
            with contextlib.suppress(OSError):  # A read-only folder: nothing to remove, and the error above says so.
                self.temporary.unlink(missing_ok=True)
