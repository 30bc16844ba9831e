"""The compiled calls: one program per process (and kept between processes with XLA), the first call's
failures, one call in flight, and a training set kept in host memory when the device's is too small."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

import gan_mnist
from conftest import REPO, as_from_a_terminal, fails
from ganlab import errors
from ganlab.devices import distribute
from ganlab.run import loop

TINY = ["--limit", "100", "--batch-size", "32", "--eval-every", "0", "--seed", "2"]  # 3 steps an epoch.


def history_of(run_dir):
    return json.loads((run_dir / "history.json").read_text())["iterations"]


def xla_run(tmp_path, *flags, stop_at_the_third_call=False):
    driver = [str(REPO / "tests" / "signal_at.py"), "third-call", "INT"] if stop_at_the_third_call else []
    return subprocess.run([sys.executable, *driver, str(REPO / "gan_mnist.py"), *TINY, "--xla", "--steps-per-call", "2",
                           *flags], capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, GAN_MNIST_CACHE=str(tmp_path / "cache")), preexec_fn=as_from_a_terminal)


@pytest.mark.slow
def test_one_xla_program_per_process_kept_for_the_next(tmp_path, mnist_dir):
    """Calls of 2 steps then 1 (a ragged last call), stopped 2 steps into the second epoch, then resumed from
    there: one compiled program in all, written by the first process and loaded by the second."""
    run_dir, programs = tmp_path / "run", tmp_path / "cache" / "xla"
    first = xla_run(tmp_path, "--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(run_dir),
                    stop_at_the_third_call=True)
    assert first.returncode == 130 and "stopped at epoch 2, step 2/3" in first.stderr, first.stderr[-3000:]
    written = sorted(programs.iterdir())
    assert len(written) == 1 and written[0].stat().st_size > 0, written  # Calls of 2 and 1 steps: one program.
    stamp = written[0].stat().st_mtime_ns
    second = xla_run(tmp_path, "--epochs", "2", "--resume", "--data-dir", str(mnist_dir), "--out", str(run_dir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(programs.iterdir()) == written and written[0].stat().st_mtime_ns == stamp  # Loaded, not compiled.
    assert len(history_of(run_dir)["d_loss"]) == 6


class StopInTheSecondEpoch(loop.Hooks):
    """Records the compiled calls; asks the run to stop (SIGINT) in the second epoch's first call, so that it
    stops mid-epoch, 2 steps into it."""

    def __init__(self, compiled):
        self.compiled, self.count = compiled, 0

    def calls(self, train_steps):
        self.compiled.append(train_steps)

        def counted(indices):
            self.count += 1
            if self.count == 3:  # Calls of 2 and 1 steps: the third call is epoch 2's first.
                os.kill(os.getpid(), signal.SIGINT)
            return train_steps(indices)

        return counted


def test_the_call_is_traced_once_for_calls_of_any_length_and_a_resume_mid_epoch(tmp_path, mnist_dir):
    compiled = []
    common = TINY + ["--steps-per-call", "2", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")]
    with pytest.raises(errors.TrainingStopped, match="stopped at epoch 2, step 2/3"):
        gan_mnist.main(common + ["--epochs", "2"], hooks=StopInTheSecondEpoch(compiled))
    assert len(history_of(tmp_path / "run")["d_loss"]) == 5
    gan_mnist.main(common + ["--epochs", "2", "--resume"], hooks=StopInTheSecondEpoch(compiled))
    assert len(history_of(tmp_path / "run")["d_loss"]) == 6  # Its last call: 1 step, from step 2 of epoch 2.
    assert [calls.experimental_get_tracing_count() for calls in compiled] == [1, 1]
    signature = compiled[0].get_concrete_function().structured_input_signature[0]
    assert signature[0].shape == (2, 32) and signature[1].shape == ()  # (K, batch) indices and the step count.


class Unknown(loop.Hooks):
    """A train step with an op XLA cannot compile (a string op: XLA has no kernel for it); TensorFlow runs it."""

    def step(self, train_step, state):
        def with_a_string(images, labels):
            values = train_step(images, labels)
            text = tf.strings.as_string(values["d_loss"])
            return dict(values, d_loss=values["d_loss"] + 0.0 * tf.strings.to_number(text))

        return with_a_string


def test_a_call_xla_cannot_compile_trains_without_it_in_one_line(tmp_path, mnist_dir, capsys):
    gan_mnist.main(TINY + ["--epochs", "1", "--xla", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")],
                   hooks=Unknown())
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("XLA could not compile")]
    assert len(notes) == 1 and "training without XLA" in notes[0], out
    assert len(history_of(tmp_path / "run")["d_loss"]) == 3


def test_any_other_failure_of_the_first_call_is_one_line(tmp_path, mnist_dir, capsys):
    class Broken(loop.Hooks):
        def step(self, train_step, state):
            def broken(images, labels):
                values = train_step(images, labels)
                tf.debugging.assert_less(values["d_loss"], -1.0, message="a stand-in failure of the data")
                return values

            return broken

    status, err = fails(SimpleNamespace(main=lambda argv: gan_mnist.main(argv, hooks=Broken())),
                        TINY + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and err.count("\n") == 1, err
    assert "error: the first training call failed: assertion failed: [a stand-in failure of the data]" in err


def test_running_out_of_memory_placing_the_data_is_one_line_naming_the_sizes(tmp_path, mnist_dir, capsys):
    class OutOfMemory(loop.Hooks):
        def calls(self, train_steps):
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[100,28,28,1]")

    status, err = fails(SimpleNamespace(main=lambda argv: gan_mnist.main(argv, hooks=OutOfMemory())),
                        TINY + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert "out of memory placing the data (a tensor of shape [100,28,28,1])" in err
    assert "--batch-size 32" in err and "a training set of 0 MB (--limit)" in err


def test_the_next_call_is_dispatched_before_the_last_is_read(tmp_path, mnist_dir):
    events = []

    class Watched:
        def __init__(self, number, values):
            self.number, self.values = number, values

        def __array__(self, dtype=None, copy=None):
            events.append(("read", self.number))
            return np.asarray(self.values)

    class InFlight(loop.Hooks):
        def calls(self, train_steps):
            def watched(indices):
                events.append(("dispatch", len([e for e in events if e[0] == "dispatch"]) + 1))
                return Watched(events[-1][1], train_steps(indices))

            return watched

    gan_mnist.main(TINY + ["--epochs", "2", "--steps-per-call", "1", "--data-dir", str(mnist_dir),
                           "--out", str(tmp_path / "run")], hooks=InFlight())
    # Each epoch: dispatch 1, dispatch 2, read 1, dispatch 3, read 2, read 3 (the last, at the epoch's end).
    assert events[:6] == [("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2), ("read", 3)]
    assert len(events) == 12 and len(history_of(tmp_path / "run")["d_loss"]) == 6


def test_a_set_too_large_for_the_device_trains_from_host_memory_to_the_same_numbers(tmp_path, mnist_dir, monkeypatch,
                                                                                   capsys):
    flags = TINY + ["--epochs", "1", "--steps-per-call", "2", "--data-dir", str(mnist_dir)]
    gan_mnist.main(flags + ["--out", str(tmp_path / "on_device")])
    monkeypatch.setattr(distribute, "device_memory", lambda: 100_000)  # A stand-in GPU of 100 kB: 78 kB do not fit.
    capsys.readouterr()
    gan_mnist.main(flags + ["--out", str(tmp_path / "on_host")])
    out = capsys.readouterr().out
    assert "The training set (77 kB) is over 50% of a GPU's memory (98 kB): it stays in host memory" in out, out
    assert history_of(tmp_path / "on_host") == history_of(tmp_path / "on_device")
