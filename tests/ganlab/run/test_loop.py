"""Never lose a run: checkpoints and --resume, refusals, SIGINT/SIGTERM/SIGKILL, the NaN guard, safe loading."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import dcgan_mnist
import gan_mnist
from conftest import REPO, as_from_a_terminal
from ganlab import errors
from ganlab.run import directory as run_directory
from ganlab.run import loop
from ganlab.sampling import sample

QUICK = ["--limit", "192", "--batch-size", "64", "--eval-every", "0", "--seed", "3"]


def history_of(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def generator_weights(run_dir):
    return keras.saving.load_model(run_dir / "generator.keras", compile=False).get_weights()


@pytest.mark.parametrize("module, extra", [(gan_mnist, []), (dcgan_mnist, ["--limit", "96", "--batch-size", "32"]),
                                           (dcgan_mnist, ["--limit", "96", "--batch-size", "32", "--conditional"])])
@pytest.mark.slow
def test_resumed_run_equals_a_straight_run_exactly(tmp_path, mnist_dir, module, extra):
    flags = QUICK + extra + ["--data-dir", str(mnist_dir)]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    module.main(flags + ["--epochs", "2", "--out", str(straight)])
    module.main(flags + ["--epochs", "1", "--out", str(resumed)])
    module.main(["--resume", "--epochs", "2", "--out", str(resumed), "--data-dir", str(mnist_dir)])
    for a, b in zip(generator_weights(straight), generator_weights(resumed)):
        np.testing.assert_array_equal(a, b)
    assert history_of(straight)["iterations"] == history_of(resumed)["iterations"]
    assert [e["epoch"] for e in history_of(resumed)["epochs"]] == [1, 2]
    assert sorted(p.name for p in resumed.glob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png"]
    assert json.loads((resumed / "config.json").read_text())["epochs"] == 2


def checkpoint_files(run_dir):
    return {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}


@pytest.mark.parametrize("module, change, named", [
    (gan_mnist, ["--latent-dim", "64"], "--latent-dim 64 (the run has 100)"),
    pytest.param(dcgan_mnist, ["--arch", "32"], "--arch 32 (the run has 28)", marks=pytest.mark.slow),
    pytest.param(dcgan_mnist, ["--kernel-size", "3", "--lr", "2e-3"], "--kernel-size 3 (the run has 5); --lr 0.002",
                 marks=pytest.mark.slow),
])
def test_resume_with_other_settings_is_refused_and_the_checkpoint_untouched(tmp_path, mnist_dir, capsys,
                                                                            module, change, named):
    run_dir = tmp_path / "run"
    module.main(QUICK + ["--limit", "64", "--batch-size", "32", "--epochs", "1", "--data-dir", str(mnist_dir),
                         "--out", str(run_dir)])
    before = checkpoint_files(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(module.main, ["--resume", "--epochs", "2", "--out", str(run_dir)] + change)
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1
    assert checkpoint_files(run_dir) == before


def test_an_existing_run_is_not_clobbered_without_resume_or_overwrite(tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "run"
    flags = QUICK + ["--data-dir", str(mnist_dir), "--out", str(run_dir)]
    gan_mnist.main(flags + ["--epochs", "2"])
    first_grid = (run_dir / "epoch_001.png").read_bytes()
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, flags + ["--epochs", "1", "--seed", "4"])
    assert exit_status.value.code == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (run_dir / "epoch_001.png").read_bytes() == first_grid and (run_dir / "epoch_002.png").exists()

    gan_mnist.main(flags + ["--epochs", "1", "--seed", "4", "--overwrite"])
    assert not (run_dir / "epoch_002.png").exists()  # The old run's outputs are gone ...
    assert (run_dir / "epoch_001.png").read_bytes() != first_grid  # ... and replaced by the new run's.
    assert len(history_of(run_dir)["epochs"]) == 1


def test_resume_without_a_run_and_past_the_end_are_refused(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--resume", "--out", str(tmp_path / "none")])
    assert exit_status.value.code == 2 and "holds no run to resume" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--resume", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    assert exit_status.value.code == 2 and "already trained 1 epoch;" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Interruption: SIGINT, SIGTERM and SIGKILL on a real training process
# ------------------------------------------------------------------------------------------------

SLOW = ["--limit", "3200", "--batch-size", "32", "--eval-every", "0", "--seed", "3"]  # 100 steps per epoch.


def start_training(run_dir, mnist_dir, *flags):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "gan_mnist.py"), *SLOW, *flags, "--data-dir", str(mnist_dir),
                             "--out", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO, preexec_fn=as_from_a_terminal)


def wait_for_line(process, text, timeout=120):
    """Read the process's output until a line containing `text`; return the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    process.kill()
    pytest.fail(f"never saw {text!r}; output: {''.join(lines)} {process.stderr.read()}")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_a_signal_saves_everything_mid_epoch_and_resume_is_exact(tmp_path, mnist_dir, signum, status):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, mnist_dir, "--epochs", "2")
    wait_for_line(process, "epoch 2/2 step 20/100")  # In the middle of the second epoch.
    process.send_signal(signum)
    _, error = process.communicate(timeout=120)
    assert process.returncode == status
    assert f"Resume with: python gan_mnist.py --out {run_dir} --resume" in error
    history = history_of(run_dir)
    assert [e["epoch"] for e in history["epochs"]] == [1] and history["partial_epoch"]["epoch"] == 2
    steps_saved = len(history["iterations"]["d_loss"])
    assert 120 <= steps_saved < 200  # Epoch 1, and the steps of epoch 2 finished before the signal.
    assert (run_dir / "progress.gif").is_file() and (run_dir / "losses.png").is_file()

    gan_mnist.main(["--resume", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    straight = tmp_path / "straight"
    gan_mnist.main(SLOW + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(straight)])
    assert history_of(run_dir)["iterations"] == history_of(straight)["iterations"]
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1, 2]
    assert "partial_epoch" not in history_of(run_dir)


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
@pytest.mark.slow
def test_a_second_process_cannot_train_in_a_directory_being_trained(tmp_path, mnist_dir, flags):
    run_dir = tmp_path / "run"
    first = start_training(run_dir, mnist_dir, "--epochs", "3")
    try:
        wait_for_line(first, "epoch 1/3 step 20/100")
        config_before = (run_dir / "config.json").read_bytes()
        second = subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), *SLOW, "--epochs", "3", *flags,
                                 "--data-dir", str(mnist_dir), "--out", str(run_dir)],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
        assert f"{run_dir}: another process (PID {first.pid}) is training in this run directory" in second.stderr
        assert (run_dir / "config.json").read_bytes() == config_before  # The second touched nothing.
    finally:
        first.kill()
        first.communicate(timeout=60)


@pytest.mark.slow
def test_the_lock_dies_with_its_process(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, mnist_dir, "--epochs", "2")
    wait_for_line(process, "epoch 1/2 step 20/100")
    process.kill()  # kill -9: no handler runs, and no stale lock is left.
    process.communicate(timeout=60)
    assert (run_dir / ".lock").is_file()
    gan_mnist.main(SLOW + ["--epochs", "1", "--overwrite", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1]


@pytest.mark.slow
def test_kill_9_loses_at_most_the_epoch_in_progress(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    process = start_training(run_dir, mnist_dir, "--epochs", "3")
    wait_for_line(process, "epoch 2/3 step 50/100")
    process.kill()  # SIGKILL: no handler runs.
    process.communicate(timeout=60)
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1]
    json.loads((run_dir / "config.json").read_text())  # Every file is whole.

    gan_mnist.main(["--resume", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    history = history_of(run_dir)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    assert len(history["iterations"]["g_loss"]) == 3 * 100  # No step missing or doubled.
    assert sorted(p.name for p in run_dir.glob("epoch_*.png")) == [f"epoch_{e:03d}.png" for e in (1, 2, 3)]
    assert not list(run_dir.glob(".*.tmp-*"))


# ------------------------------------------------------------------------------------------------
# Bad numbers and unsafe files
# ------------------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(tmp_path, mnist_dir, capsys):
    class FaultAtTheFifthCall(loop.Hooks):
        def calls(self, train_steps):
            calls = []

            def faulty(indices):
                calls.append(1)
                values = train_steps(indices).numpy()
                if len(calls) == 5:  # The fifth call of one step: epoch 2, step 2.
                    values[0, loop.METRICS.index("g_loss")] = float("nan")
                return tf.constant(values)

            return faulty

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(lambda argv: gan_mnist.main(argv, hooks=FaultAtTheFifthCall()),
                        QUICK + ["--epochs", "3", "--steps-per-call", "1", "--data-dir", str(mnist_dir),
                                 "--out", str(run_dir)])
    assert exit_status.value.code == 1
    error = capsys.readouterr().err
    assert "g_loss is nan at epoch 2, step 2" in error and "ckpt-3, is kept" in error
    assert Path(tf.train.latest_checkpoint(run_dir / "checkpoints")).name == "ckpt-3"  # End of epoch 1.
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1]


def test_an_absurd_learning_rate_is_caught_by_the_guard(tmp_path, mnist_dir, capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, QUICK + ["--epochs", "2", "--lr", "1e30", "--data-dir", str(mnist_dir),
                                                "--out", str(tmp_path / "run")])
    assert exit_status.value.code == 1
    assert "training diverged" in capsys.readouterr().err


def test_a_generator_file_with_code_in_it_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda z: z * 2)])
    model.save(run_dir / "generator.keras")
    (run_dir / "config.json").write_text(json.dumps({"format": run_directory.FORMAT, "script": "gan_mnist"}))
    with pytest.raises(errors.DataError, match="cannot load the generator"):
        sample.load_trained_generator(run_directory.RunDirectory(run_dir))


def test_nothing_is_loaded_with_pickle_or_outside_keras_safe_mode():
    """No plain unpickling anywhere (CIFAR-10 goes through cifar10._CifarUnpickler only), numpy without
    pickles, Keras in safe mode."""
    for path in [*REPO.glob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(name.split(".")[0] in ("cPickle", "dill", "joblib") for name in names), path
                assert "pickle" not in names or path.name == "cifar10.py", path
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "pickle":
                assert node.attr in ("Unpickler", "UnpicklingError"), f"{path}:{node.lineno} pickle.{node.attr}"
            if isinstance(node, ast.ClassDef) and any(getattr(b, "attr", "") == "Unpickler" for b in node.bases):
                assert node.name == "_CifarUnpickler"
                assert any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if node.func.attr == "load" and getattr(node.func.value, "id", "") == "np":
                    assert keywords.get("allow_pickle") is False, f"{path}:{node.lineno}"
                if node.func.attr == "load_model":
                    assert keywords.get("safe_mode") is True, f"{path}:{node.lineno}"
