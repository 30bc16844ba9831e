"""One run's directory, `results/<run-name>/`: the names of its files, starting, resuming, replacing.

A run writes everything into its own directory (`--out`), which it holds with an OS lock for its
whole life; its config.json carries FORMAT, by which this project recognises its runs. A
directory that already holds a run is continued only with `--resume` (with the run's saved
hyperparameters) and replaced only with `--overwrite`, which removes only the files a run writes;
another program's files are never taken for a run.
"""

import atexit
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl  # POSIX: the run directory's lock (without it, e.g. on Windows, runs are not locked).
except ImportError:
    fcntl = None

from ganlab.errors import REPO_DIR, DataError, UsageError

# Written into every run's config.json: how this project recognises a run of its own, so that
# --resume and --overwrite never take another program's files for one.
FORMAT = "tf2-gan-mnist run 1"
SCRIPTS = ("gan_mnist", "dcgan_mnist")
DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")


_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.index$")


def default_out(out, script, data_dir=None):
    """--out as a path: when not given, results/<script> of this checkout, or for a folder of one's own
    pictures (`data_dir`) results/<script>-<the folder's name>."""
    if out:
        return Path(out)
    name = Path(data_dir).expanduser().resolve().name if data_dir else ""
    return REPO_DIR / "results" / (f"{script}-{name}" if name else script)


def megabytes(count):
    return f"{count / 2**20:.1f} MB"


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
        self.interpolation = self.path / "interpolation.gif"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"
        self.lock_file = self.path / ".lock"
        self.restore_from = self  # Where checkpoints are read: another worker's directory is the chief's.
        self._lock = None
        self._created = False

    def epoch_grid(self, epoch):
        """The fixed-noise grid after `epoch` (zero-padded, so sorting by name sorts by time)."""
        return self.path / f"epoch_{epoch:03d}.png"

    def output_files(self):
        """The files a run of this project writes at the top of its directory, those present now."""
        named = [self.config, self.history, self.loss_plot, self.metrics_plot, self.metrics, self.evaluation,
                 self.real_samples, self.random_samples, self.progress_gif, self.generator, self.generated,
                 self.interpolation]
        return [p for p in named if p.is_file()] + sorted(self.path.glob("epoch_[0-9][0-9][0-9]*.png"))

    def checkpoint_prefixes(self):
        """The saved checkpoints' paths (`.../ckpt-N`), newest (largest step) first; read from the files
        themselves, so a lost `checkpoint` index file hides none."""
        if not self.checkpoints.is_dir():
            return []
        numbered = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
        return [str(p.with_suffix("")) for _, p in sorted(numbered, reverse=True)]

    def read_config(self):
        """The saved configuration of this project's run here, as a dict; DataError if it is missing,
        unreadable, or not a run of this project."""
        try:
            saved = json.loads(self.config.read_text())
        except (OSError, ValueError) as error:
            raise DataError(f"{self.config}: cannot read the run's configuration ({error})") from None
        problem = _config_problem(saved)
        if problem:
            raise DataError(f"{self.config}: {problem}")
        return saved

    def is_run(self):
        """Whether this directory holds a run of this project (its config.json reads and carries FORMAT)."""
        try:
            return bool(self.read_config())
        except DataError:
            return False

    def holds_a_run(self):
        """Whether a run of this project is here (its config.json carries FORMAT); DataError for a directory
        that holds another program's files under a run's names, which this project never touches."""
        if os.path.lexists(self.config) and not self.config.is_file():
            raise DataError(f"{self.config}: not a file (a directory or a broken link), where a run keeps its "
                            f"configuration; nothing there was touched")
        if self.config.is_file():
            self.read_config()
            return True
        foreign = [p.name for p in self.output_files() + [self.checkpoints, self.tensorboard] if p.exists()]
        if foreign:
            raise DataError(f"{self.path}: holds {', '.join(foreign[:3])} but no config.json of a run of this "
                            f"project; choose another --out (nothing there was touched)")
        return False

    def check_start(self, resume, overwrite):
        """Check, before anything is built, that training may start here; changes nothing.

        A directory that already holds a run needs --resume (continue it) or --overwrite (replace
        it); one holding another program's files is refused either way. A directory another
        process is training in is refused first, naming that process. With --resume, the run's
        saved settings are the configurator's to take (`configurator.saved_settings`).
        """
        for parent in self.path.resolve().parents:  # Never a run inside another (its checkpoints/, say).
            if (parent / "config.json").is_file() and RunDirectory(parent).is_run():
                raise UsageError(f"argument --out: {self.path} is inside the run in {parent}; choose a directory "
                                 f"outside it")
        holds_a_run = self.path.is_dir() and self.holds_a_run()  # Refuses another program's files, touching none.
        holder = self.holder()
        if holder:
            raise DataError(self._busy(holder))
        for folder in (self.checkpoints, self.tensorboard):
            if os.path.lexists(folder) and not folder.is_dir():
                raise DataError(f"{folder}: not a directory, where a run keeps its {folder.name}; move it away "
                                f"(nothing was touched)")
        if holds_a_run and not resume and not overwrite:
            raise UsageError(f"{self.path} already holds a run; pass --resume to continue it, "
                             f"--overwrite to replace it, or --out to start another")
        if resume and not holds_a_run:
            raise UsageError(f"argument --resume: {self.path} holds no run to resume (no config.json)")

    def trained_outputs(self):
        """The names of the outputs that only training writes (all but config.json and real_samples.png)."""
        return [p.name for p in self.output_files() if p not in (self.config, self.real_samples)]

    def create(self, overwrite=False):
        """Create and lock the directory; with `overwrite`, remove an earlier run's outputs (only those).

        Returns self, a context manager that holds the lock (see `lock`) until it exits; a directory
        this process created and left empty (a run that failed before writing anything) is removed
        then. Temporaries of a process killed while writing are removed now. DataError if the
        directory cannot be written or another process holds it.
        """
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            self.lock()
            self.remove_temporaries()
            if overwrite:
                self.remove_outputs()
        except OSError as error:
            self.__exit__()
            raise DataError(f"{self.path}: cannot write the run directory ({error.strerror or error})") from None
        return self

    def remove_temporaries(self):
        """Remove what a process killed (or out of space) while writing left: `.name.tmp-PID` files of
        atomic writes and the `ckpt-N_temp/` directories of checkpoint saves."""
        for leftover in self.path.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)
        if self.checkpoints.is_dir():
            for leftover in self.checkpoints.glob("ckpt-*_temp"):
                shutil.rmtree(leftover, ignore_errors=True)

    def remove_outputs(self):
        """Remove the files a run writes (--overwrite), and nothing else: other files stay, and so do
        `checkpoints/` and `tensorboard/` if something other than a run's files is in them."""
        for path in self.output_files():
            path.unlink()
        patterns = {self.checkpoints: ("checkpoint", "ckpt-*.index", "ckpt-*.data-*", "ckpt-*_temp"),
                    self.tensorboard: ("events.out.tfevents.*",)}
        for directory, names in patterns.items():
            if not directory.is_dir():
                continue
            for pattern in names:
                for path in directory.glob(pattern):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            if not any(directory.iterdir()):
                directory.rmdir()

    def out_of_space(self, needed_bytes):
        """The DataError of a full disk: the directory, what the run needs to go on, what is free."""
        try:
            free = megabytes(shutil.disk_usage(self.path).free)
        except OSError:
            free = "unknown"
        return DataError(f"{self.path}: out of disk space (a checkpoint and an epoch's outputs need about "
                         f"{megabytes(needed_bytes)}; {free} free); the last good checkpoint and every earlier "
                         f"output are kept: free some space and continue with --resume")

    def _open_lock(self, flags):
        """The lock file's descriptor, never through a symbolic link (O_NOFOLLOW); DataError if it cannot be opened."""
        try:
            return os.open(self.lock_file, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            reason = ("a symbolic link, which a run never follows" if error.errno == errno.ELOOP
                      else error.strerror or str(error))
            raise DataError(f"{self.lock_file}: cannot open the run's lock ({reason}); nothing was touched") from None

    def _busy(self, holder):
        return (f"{self.path}: another process (PID {holder}) is training in this run directory; "
                f"wait for it to finish, or choose another --out")

    def holder(self):
        """The PID (as text) of another process that holds this directory's lock, or None; changes nothing."""
        if fcntl is None or self._lock is not None or not os.path.lexists(self.lock_file):
            return None
        descriptor = self._open_lock(os.O_RDONLY)
        with os.fdopen(descriptor) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return handle.read().strip() or "unknown"
            return None  # Free: closing the file releases the lock again.

    def lock(self):
        """Hold the directory for this process: an exclusive OS lock on `.lock`, which the kernel releases
        when the process dies (kill -9 too), so no stale lock is left. DataError naming the holder's
        process ID if another process holds it."""
        if fcntl is None or self._lock is not None:
            return
        handle = os.fdopen(self._open_lock(os.O_RDWR | os.O_CREAT), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataError(self._busy(holder)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def release(self):
        """Give up the directory's lock (the kernel does so anyway when the process ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        try:
            if self._created and {p.name for p in self.path.iterdir()} <= {self.lock_file.name}:
                self.lock_file.unlink(missing_ok=True)  # A directory this run created and wrote nothing into.
                self.path.rmdir()
        except OSError:
            pass
        self.release()


def _config_problem(saved):
    """What makes `saved` (a parsed config.json) not a configuration of this project's runs, or None."""
    if not isinstance(saved, dict):
        return f"not a run's configuration (a JSON {type(saved).__name__}, expected an object)"
    legacy = "format" not in saved and "image_shape" in saved and "training_images" in saved
    if isinstance(saved.get("format"), str) and saved["format"].startswith(FORMAT.rsplit(" ", 1)[0] + " ") \
            and saved["format"] != FORMAT:
        return (f"written by a newer version of this project (\"format\": \"{saved['format']}\"; this one reads "
                f"\"{FORMAT}\"): update this repository to use it (nothing there was touched)")
    if saved.get("format") != FORMAT and not legacy:
        return (f"not written by a run of this project (no \"format\": \"{FORMAT}\"); choose another --out "
                f"(nothing there was touched)")
    if saved.get("script") not in SCRIPTS:
        return f"names an unknown script {saved.get('script')!r} (expected {' or '.join(SCRIPTS)})"
    if saved.get("dataset", "mnist") not in DATASETS:
        return f"names an unknown dataset {saved.get('dataset')!r} (expected {', '.join(DATASETS)})"
    return None


def worker_directory(task, chief_run):
    """The run directory of a cluster's worker other than the chief: a temporary directory, removed when
    the process exits, that reads the chief's checkpoints (`chief_run`). Earlier ones of this task
    that were killed outright are removed first."""
    prefix = f"tf2-gan-{task.replace(' ', '-')}-"
    remove_stale_directories(prefix)
    own = RunDirectory(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, own.path, ignore_errors=True)
    own.restore_from = chief_run
    return own


def remove_stale_directories(prefix):
    """Remove the temporary directories of this worker's earlier processes that were killed outright
    (their lock is free); a live process's directory is locked and kept."""
    for path in Path(tempfile.gettempdir()).glob(prefix + "*"):
        try:
            if RunDirectory(path).holder():
                continue
        except DataError:  # Not a lock this project made: leave it.
            continue
        shutil.rmtree(path, ignore_errors=True)
