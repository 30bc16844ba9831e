"""One run's directory, `results/<run-name>/`: the names of its files, starting, resuming, replacing.

A run writes everything into its own directory (`--out`); a directory that already holds a run
is continued only with `--resume` (with the run's saved hyperparameters) and replaced only with
`--overwrite`.
"""

import json
import os
import shutil
from pathlib import Path

try:
    import fcntl  # POSIX: the run directory's lock (without it, e.g. on Windows, runs are not locked).
except ImportError:
    fcntl = None

import tensorflow as tf

from errors import DataError, UsageError, flag

REPO_DIR = Path(__file__).resolve().parent

# What --resume may change: the length of the run and how often it is scored. Anything else would
# make the resumed run a different experiment, so it is refused.
RESUMABLE_CHANGES = ("epochs", "eval_every")


def add_flags(parser, script_name):
    """The run-directory flags."""
    run = parser.add_argument_group("run")
    run.add_argument("--out", metavar="DIR", default=None,
                     help=f"run directory for every output (default: results/{script_name})")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint, with its saved hyperparameters "
                          "(--epochs may grow)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run that --out already holds")
    return run


def check_flags(config):
    if config.resume and config.overwrite:
        raise UsageError("argument --resume: not allowed with --overwrite")
    config.out = Path(config.out) if config.out else REPO_DIR / "results" / config.script


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
        self.lock_file = self.path / ".lock"
        self._lock = None

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
        naming each difference; the checkpoint is left untouched. A directory another process is
        training in is refused first, naming that process.
        """
        if self.lock_file.is_file():
            self.lock()  # Only to see whether another process holds it; training takes it again in `create`.
            self.release()
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
                    differences.append(f"{flag(key)} {getattr(config, key)} (the run has {saved[key]})")
            else:
                setattr(config, key, saved[key])
        if differences:
            raise UsageError(f"argument --resume: {self.path} was trained with other settings: "
                             f"{'; '.join(differences)}. Start a new run with --out, or --overwrite")

    def create(self, overwrite=False):
        """Create and lock the directory (emptied of an earlier run's outputs with `overwrite`).

        Returns self, a context manager that holds the lock (see `lock`) until it exits. DataError
        if the directory cannot be written or another process holds it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            self.lock()
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
            self.release()
            raise DataError(f"{self.path}: cannot write the run directory ({error.strerror or error})") from None
        return self

    def lock(self):
        """Hold the directory for this process: an exclusive OS lock on `.lock`, which the kernel releases
        when the process dies (kill -9 too), so no stale lock is left. DataError naming the holder's
        process ID if another process holds it."""
        if fcntl is None or self._lock is not None:
            return
        handle = open(self.lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataError(f"{self.path}: another process (PID {holder}) is training in this run directory; "
                            f"wait for it to finish, or choose another --out") from None
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
        self.release()
