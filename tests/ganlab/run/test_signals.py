"""A signal at any moment of an evaluation, the classifier's training or the closing outputs stops the run in
one line, the epoch's checkpoint saved and the command that resumes; the resumed run ends as if never stopped."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, as_from_a_terminal

sys.path.insert(0, str(REPO / "tests" / "ganlab" / "datasets"))
from test_folder import write_pngs  # noqa: E402

TINY = ["--limit", "100", "--batch-size", "32", "--seed", "2", "--num-samples", "200"]


def signalled(moment, name, *flags, timeout=900, env=None):
    return subprocess.run([sys.executable, str(REPO / "tests" / "signal_at.py"), moment, name, "gan_mnist.py", *flags],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, preexec_fn=as_from_a_terminal,
                          env=env)


def run_script(*flags, timeout=900, env=None):
    return subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), *flags], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.mark.parametrize("name, status", [("INT", 130), ("TERM", 143)])
@pytest.mark.parametrize("moment, epochs, where", [
    ("evaluation", 2, "the end of epoch 1, before its evaluation"),   # --eval-every 1: in epoch 1's evaluation
    ("evaluation", 1, "the end of epoch 1, before its evaluation"),   # the final evaluation
    ("gif", 2, "the end of epoch 2"),                                # the closing outputs
    ("random-grid", 2, "the end of epoch 2"),
])
@pytest.mark.slow
def test_a_signal_in_an_evaluation_or_the_closing_outputs_loses_nothing(tmp_path, mnist_dir, moment, epochs, where,
                                                                          name, status):
    run_dir = tmp_path / "run"
    flags = TINY + ["--eval-every", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)]
    stopped = signalled(moment, name, *flags, "--epochs", str(epochs))
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and len(lines) <= 2, stopped.stderr  # "received", then the one line.
    assert f"stopped at {where} and saved a checkpoint" in lines[-1]
    assert f"Resume with: python gan_mnist.py --out {run_dir} --resume" in lines[-1]
    resumed = run_script("--out", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, epochs + 1))
    assert [e["epoch"] for e in history["evaluations"]] == list(range(1, epochs + 1))
    assert len(history["iterations"]["d_loss"]) == 3 * epochs
    for name_ in ("progress.gif", "random_samples.png", "metrics.json", "metrics.png"):
        assert (run_dir / name_).is_file(), name_


@pytest.mark.parametrize("name, status", [("INT", 130), ("TERM", 143)])
@pytest.mark.slow
def test_a_signal_while_a_folders_classifier_trains_loses_nothing(tmp_path, mnist_dir, name, status):
    """A folder's classifier trains at the first evaluation, after the first epoch, saying so."""
    import utils

    images, labels = utils.load_mnist("train", mnist_dir)
    pictures = write_pngs(tmp_path / "digits", images[:300, ..., None], labels[:300] % 3, names=["a", "b", "c"])
    run_dir = tmp_path / "run"
    flags = ["--dataset", "folder", "--data-dir", str(pictures), "--batch-size", "32", "--seed", "2", "--num-samples",
             "200", "--eval-every", "1", "--out", str(run_dir)]
    cache = dict(os.environ, GAN_MNIST_CACHE=str(tmp_path / "cache"))  # Its own: no classifier trained before.
    stopped = signalled("classifier", name, *flags, "--epochs", "1", env=cache)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    out = stopped.stdout
    assert out.index("epoch 1/1 |") < out.index("Training the evaluation classifier once")  # After the first epoch.
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert "Traceback" not in stopped.stderr and len(lines) <= 2, stopped.stderr
    assert "stopped at the end of epoch 1, before its evaluation" in lines[-1] and "--resume" in lines[-1]
    resumed = run_script("--out", str(run_dir), "--resume", env=cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "classifier epoch 4/4" in resumed.stdout  # Its progress, a line an epoch.
    assert [e["epoch"] for e in json.loads((run_dir / "history.json").read_text())["evaluations"]] == [1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # The raise lost in __del__.
def test_a_signal_whose_first_raise_is_lost_still_stops_sampling_at_the_next_batch():
    """Python runs a signal's handler between any two bytecodes, inside a `__del__` too, where the stop it raises is
    printed and dropped: a SIGINT during --generate once went unheeded (the bad-input family's DCGAN case, on a
    busy machine). The next batch stops it."""
    from ganlab import tf
    from ganlab.errors import TrainingStopped
    from ganlab.sampling import sample

    class SignalledWhileDropped:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    batches = []

    class Generator:
        inputs = [None]

        def __call__(self, noise, training=False):
            batches.append(len(noise))
            if len(batches) == 1:
                SignalledWhileDropped()  # Dropped at once: the handler's raise happens in its __del__, and is lost.
            return tf.zeros((len(noise), 2, 2, 1))

    with pytest.raises(TrainingStopped) as stopped:
        with sample.stopped_by_signals("--generate"):
            sample.sample_images(Generator(), np.zeros((30, 4), np.float32), batch_size=10)
    assert batches == [10] and stopped.value.exit_status == 128 + signal.SIGINT
    assert sample._received == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # The raise lost in __del__.
def test_a_signal_whose_raise_is_lost_in_an_evaluation_still_stops_the_run_after_it():
    """The same in training: a SIGINT in the closing outputs once let the run print Done and exit 0. A block that
    a signal stops at once (the evaluation, the closing outputs) stops at its end if the raise was lost."""
    from ganlab.run.stopping import StopNow, StopRequests

    class SignalledWhileDropped:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    finished = []
    with StopRequests() as requests, pytest.raises(StopNow) as stopped:
        with requests.at_once(step=7, seconds=1.5):
            SignalledWhileDropped()  # Its __del__ gets the signal; the handler's StopNow is lost there.
            finished.append(True)
    assert finished == [True] and requests.signal == signal.SIGINT
    assert (stopped.value.step, stopped.value.seconds) == (7, 1.5)

