"""What a user watches is written beside training: between two epochs only the checkpoint waits."""

import json
import threading

import pytest

import gan_mnist
import utils
from ganlab.run import loop
from ganlab.run.outputs import BackgroundFiles

TINY = ["--limit", "100", "--batch-size", "32", "--eval-every", "0", "--seed", "2", "--steps-per-call", "1"]


def test_training_goes_on_while_an_epochs_plot_is_drawn_and_the_end_waits_for_it(tmp_path, mnist_dir, monkeypatch):
    """The first epoch's loss plot is held until the second epoch has trained a step: were it drawn between
    the epochs, the run would never get there (the plot gives up after its bound and says so)."""
    second_epoch_trained, plot_held = threading.Event(), []
    plot_history = utils.plot_history

    def held_plot(path, history):
        if not plot_held:  # The first epoch's.
            plot_held.append(second_epoch_trained.wait(timeout=600))
        plot_history(path, history)

    class Watch(loop.Hooks):
        def calls(self, train_steps):
            count = []

            def watched(indices):
                count.append(1)
                if len(count) == 4:  # Epoch 2's first step.
                    second_epoch_trained.set()
                return train_steps(indices)

            return watched

    monkeypatch.setattr(utils, "plot_history", held_plot)
    run_dir = tmp_path / "run"
    gan_mnist.main(TINY + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(run_dir)], hooks=Watch())
    assert plot_held == [True]
    history = json.loads((run_dir / "history.json").read_text())  # Written whole before the run returned.
    assert [e["epoch"] for e in history["epochs"]] == [1, 2] and len(history["iterations"]["d_loss"]) == 6
    for name in ("epoch_001.png", "epoch_002.png", "generator.keras", "losses.png", "progress.gif"):
        assert (run_dir / name).is_file(), name
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]


def test_a_newer_job_replaces_one_waiting_and_an_error_reaches_the_training_thread():
    files, done, release = BackgroundFiles(), [], threading.Event()
    files.submit("first", lambda: release.wait(timeout=600))  # Holds the writer.
    files.submit("plot", lambda: done.append("old plot"))
    files.submit(("grid", 1), lambda: done.append("grid 1"))
    files.submit("plot", lambda: done.append("new plot"))  # Replaces the old one, not yet started.
    release.set()
    files.wait()
    assert done == ["grid 1", "new plot"]

    def full_disk():
        raise OSError(28, "No space left on device", "history.json")

    files.submit("history", full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.wait()
    files.submit("after", lambda: done.append("after"))  # The writer goes on.
    files.wait()
    assert done[-1] == "after"


def test_real_samples_show_every_class_of_a_set_held_class_by_class(tmp_path, mnist_dir):
    """A folder is held class by class: the grid of real images is spread over the whole set, not its start."""
    import numpy as np
    from types import SimpleNamespace
    from ganlab.run import directory as run_directory

    images = np.repeat(np.arange(10, dtype=np.uint8)[:, None, None, None] * 25, 30, axis=0) * np.ones((1, 4, 4, 1),
                                                                                                   np.uint8)
    run = run_directory.RunDirectory(tmp_path / "run")
    run.path.mkdir()
    config = SimpleNamespace(sample_grid=3, hyperparameters=(), script="gan_mnist", out=run.path, dataset="folder",
                             data_dir=str(tmp_path), num_samples=0, precision="fp32", xla=False, steps_per_call=1, checkpoint_minutes=0,
                             deterministic=False, data_shape=(4, 4, 1), class_names=(), constants={})
    loop.write_run_start(config, run, images, "none", {})
    grid = utils.iio.imread(run.real_samples)
    assert len(set(grid.ravel().tolist()) - {255}) >= 8  # Nine pictures from across the 10 classes' levels.
