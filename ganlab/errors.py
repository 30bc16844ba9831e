"""The failures a user can act on, and how each reaches the terminal: one line and an exit status.

Every user-facing failure raises `UsageError` (a bad flag: exit status 2), `DataError` (a bad file
or directory: exit status 1) or `TrainingStopped` (a signal or a diverged loss); `run_main` turns
each into one line on stderr, never a traceback.

TensorFlow's C++ start-up chatter is muted when the package loads it (ganlab/__init__.py); what
that chatter would have said about GPUs that TensorFlow cannot use is not lost: `unusable_gpus`
says it in one line, before anything else is done.
"""

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent  # The checkout: the scripts, requirements.txt, results/.


class UsageError(ValueError):
    """A command-line flag or value that cannot be used; reported in one line, exit status 2."""


class DataError(ValueError):
    """A missing, corrupt or unwritable file or directory; reported in one line, exit status 1."""


class Terminated(BaseException):
    """SIGTERM outside training: a BaseException, as KeyboardInterrupt, so that no `except Exception` takes it."""


class TrainingStopped(Exception):
    """Training stopped before its last epoch: interrupted (exit 128 + signal) or diverged (exit 1)."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


def flag(name):
    """The command-line flag of a configuration key: batch_size is --batch-size."""
    return "--" + name.lower().replace("_", "-")


def is_out_of_space(error):
    """Whether an OSError or a TensorFlow error is a full disk (or an exceeded quota)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


@contextlib.contextmanager
def out_of_memory(doing, sizes):
    """Turn running out of memory while `doing` into one UsageError naming the `sizes` to reduce (exit 2)."""
    import tensorflow as tf  # Not at the top: the command line is checked before it loads (configurator.answer_early).

    try:
        yield
    except (MemoryError, tf.errors.ResourceExhaustedError) as error:
        if is_out_of_space(error):
            raise
        tensor = re.search(r"OOM when allocating tensor with shape\[([^\]]*)\]", str(error))
        raise UsageError(f"out of memory {doing}" + (f" (a tensor of shape [{tensor.group(1)}])" if tensor else "")
                         + f" with {sizes}: try smaller values") from None


def model_sizes(config):
    """The flags that set the models' and the batch's memory, as `--flag value, ...`."""
    return ", ".join(f"{flag(key)} {getattr(config, key)}"
                     for key in ("batch_size", "latent_dim", "kernel_size") if key in config.hyperparameters)


def nvidia_gpus():
    """The NVIDIA GPUs the machine's driver lists (`nvidia-smi -L`, else /proc/driver/nvidia/gpus/); [] without."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        gpus = [re.sub(r"\s*\(UUID: [^)]*\)", "", line.strip()) for line in listed.splitlines() if line.startswith("GPU ")]
        if gpus:
            return gpus
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return [f"GPU at PCI {entry.name}" for entry in sorted(Path("/proc/driver/nvidia/gpus").iterdir())]
    except OSError:
        return []


def tensorflow_gpu_problem():
    """TensorFlow's own reason for finding no GPU: its log lines about CUDA, from a quick probe with them on."""
    import tensorflow

    if not tensorflow.test.is_built_with_cuda():
        return f"this TensorFlow {tensorflow.__version__} was built without CUDA"
    probe = "import tensorflow as tf; tf.config.list_physical_devices('GPU')"
    try:
        log = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")).stderr
    except (OSError, subprocess.SubprocessError):
        log = ""
    reasons = [line.split("] ", 1)[-1].strip().rstrip(".") for line in log.splitlines()
               if re.search(r"dlopen|cuda|CUDA|GPU|libcu|driver", line) and "] " in line]
    return "; ".join(dict.fromkeys(reasons)) or "it gave no reason (try: python -c \"import tensorflow as tf; " \
                                                 "print(tf.config.list_physical_devices('GPU'))\")"


def unusable_gpus():
    """One line if this machine has NVIDIA GPUs and TensorFlow sees none (unless CUDA_VISIBLE_DEVICES hides
    them on purpose): the GPUs, TensorFlow's reason, and the fix; else None. `configurator.resolve` stops
    training with it (unless --cpu) and warns with it when sampling."""
    import tensorflow

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.split(",")[0].strip().startswith("-")):
        return None
    if tensorflow.config.list_physical_devices("GPU"):
        return None
    gpus = nvidia_gpus()
    if not gpus:
        return None
    try:
        wanted = next(line.split("#")[0].strip() for line in (REPO_DIR / "requirements.txt")
                      .read_text().splitlines() if re.match(r"tensorflow\s*[<>=]", line))
        fix = f'pip install "{wanted.replace("tensorflow", "tensorflow[and-cuda]", 1).replace(" ", "")}"'
    except (OSError, StopIteration):
        fix = f'pip install "tensorflow[and-cuda]=={tensorflow.__version__}"'
    return (f"this machine has {len(gpus)} NVIDIA GPU{'s' if len(gpus) > 1 else ''} ({gpus[0]}"
            f"{', ...' if len(gpus) > 1 else ''}) but TensorFlow {tensorflow.__version__} cannot use them: "
            f"{tensorflow_gpu_problem()}. Fix: {fix}")


def run_main(main, argv=None):
    """Run a script's `main(argv)` and turn the errors a user can fix into one line and an exit status."""
    program = Path(sys.argv[0]).name

    def terminated(signum, frame):  # Outside training (which saves first): stop as Ctrl-C does.
        raise Terminated

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
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
    except OSError as error:  # A file the checks could not foresee: read-only, full, gone; never a traceback.
        where = f"{error.filename}: " if error.filename else ""
        what = ("out of disk space; nothing half-written was left" if is_out_of_space(error)
                else error.strerror or str(error))
        print(f"{program}: error: {where}{what}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print(f"{program}: SIGTERM: stopped; nothing half-written was left", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:  # Outside training (loading data, say), or a second Ctrl-C in it.
        print(f"\n{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
