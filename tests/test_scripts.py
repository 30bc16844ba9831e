"""Smoke runs: each script (and each DCGAN preset) trains a few steps on real MNIST and writes every output."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

import dcgan_mnist
import gan_mnist
from conftest import fails, parse
from ganlab import errors
from ganlab.run import loop

RUN_FILES = ("config.json", "real_samples.png", "random_samples.png", "history.json", "losses.png",
             "progress.gif", "generator.keras", "metrics.json", "metrics.png")


def check_run(run_dir, epochs, steps_per_epoch, tile, images, grid=10, padding=2):
    """Assert that a finished run wrote every output, each with the right shape."""
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    side = grid * (tile + padding) + padding
    real_rows = min(grid, -(-images // grid))  # The real grid shows at most grid x grid training images.
    assert iio.imread(run_dir / "real_samples.png").shape == (real_rows * (tile + padding) + padding, side)
    assert iio.imread(run_dir / "random_samples.png").shape == (side, side)
    epoch_grids = sorted(run_dir.glob("epoch_*.png"))
    assert [p.name for p in epoch_grids] == [f"epoch_{e:03d}.png" for e in range(1, epochs + 1)]
    assert iio.imread(epoch_grids[-1]).shape == (side, side)
    assert iio.imread(run_dir / "progress.gif", index=None).shape[:3] == (epochs, side, side)

    history = json.loads((run_dir / "history.json").read_text())
    for key in loop.METRICS:
        assert len(history["iterations"][key]) == epochs * steps_per_epoch
        assert all(np.isfinite(history["iterations"][key]))
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, epochs + 1))
    assert all(e["seconds"] > 0 for e in history["epochs"]) and history["total_seconds"] > 0
    assert all(0 <= e["d_real"] <= 1 and 0 <= e["d_fake"] <= 1 for e in history["epochs"])

    config = json.loads((run_dir / "config.json").read_text())
    assert config["epochs"] == epochs
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    return config


def generate_npz(module, run_dir, tmp_path, count, tile=28):
    npz = tmp_path / "samples.npz"
    module.main(["--out", str(run_dir), "--generate", str(count), "--samples-npz", str(npz), "--seed", "3"])
    with np.load(npz, allow_pickle=False) as archive:
        images = archive["images"]
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert images.max() > images.min()  # A trained generator does not draw a flat image.
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = iio.imread(run_dir / "generated_samples.png")
    assert grid.shape == (rows * (tile + 2) + 2, columns * (tile + 2) + 2)  # All N samples, at the model's size.
    return images


def test_gan_trains_writes_every_output_and_generates(tmp_path, mnist_dir):
    run_dir = tmp_path / "gan"
    gan_mnist.main(["--epochs", "2", "--limit", "256", "--batch-size", "64", "--data-dir", str(mnist_dir),
                    "--num-samples", "200", "--out", str(run_dir)])
    config = check_run(run_dir, epochs=2, steps_per_epoch=4, tile=28, images=256)
    assert config["batch_size"] == 64 and config["training_images"] == 256
    first = generate_npz(gan_mnist, run_dir, tmp_path, 100)
    again = generate_npz(gan_mnist, run_dir, tmp_path, 100)
    np.testing.assert_array_equal(first, again)  # --seed fixes the noise.


@pytest.mark.parametrize("arch, limit, batch, tile", [("28", 64, 32, 28), ("32", 32, 16, 32), ("64", 16, 8, 64)])
@pytest.mark.slow
def test_dcgan_preset_trains_writes_every_output_and_generates(tmp_path, mnist_dir, arch, limit, batch, tile):
    run_dir = tmp_path / f"dcgan{arch}"
    dcgan_mnist.main(["--arch", arch, "--epochs", "1", "--limit", str(limit), "--batch-size", str(batch),
                      "--num-samples", "100", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    config = check_run(run_dir, epochs=1, steps_per_epoch=2, tile=tile, images=limit)
    assert config["arch"] == arch and config["image_shape"] == [tile, tile, 1]
    generate_npz(dcgan_mnist, run_dir, tmp_path, 10, tile)


def test_generate_without_a_trained_run_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(dcgan_mnist.main, ["--out", str(tmp_path / "nothing"), "--generate", "4"])
    assert exit_status.value.code == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "generator.keras: no trained generator" in error


def test_unwritable_run_directory_is_reported_before_training(tmp_path, mnist_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--epochs", "1", "--limit", "100", "--data-dir", str(mnist_dir),
                                        "--out", str(blocker / "run")])
    assert exit_status.value.code == 1
    assert "cannot write the run directory" in capsys.readouterr().err


def test_the_step_is_traced_once_whatever_the_length_of_a_call(tmp_path, mnist_dir):
    """100 images in batches of 32: 3 steps per epoch, run 2 at a time, so calls of 2 and then 1 steps."""
    compiled = []

    class RecordCalls(loop.Hooks):
        def calls(self, train_steps):
            compiled.append(train_steps)
            return train_steps

    gan_mnist.main(["--epochs", "2", "--limit", "100", "--batch-size", "32", "--steps-per-call", "2",
                    "--eval-every", "0", "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")],
                   hooks=RecordCalls())
    assert len(compiled) == 1 and compiled[0].experimental_get_tracing_count() == 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["iterations"]["d_loss"]) == 2 * 3  # The ragged 4 images are dropped each epoch.


def test_the_same_seed_repeats_a_run_exactly(tmp_path, mnist_dir):
    histories = []
    for name in ("first", "second"):
        gan_mnist.main(["--epochs", "1", "--limit", "192", "--batch-size", "64", "--seed", "5", "--eval-every", "0",
                        "--data-dir", str(mnist_dir), "--out", str(tmp_path / name)])
        histories.append(json.loads((tmp_path / name / "history.json").read_text())["iterations"])
    assert histories[0] == histories[1]
    np.testing.assert_array_equal(iio.imread(tmp_path / "first" / "epoch_001.png"),
                                  iio.imread(tmp_path / "second" / "epoch_001.png"))


def test_a_generator_of_another_architecture_copied_into_a_run_is_one_line(tmp_path, mnist_dir, capsys):
    """Issue 41, 10: a dcgan_mnist.py --arch 32 generator in a gan_mnist.py run was a traceback on --generate."""
    gan_mnist.main(["--epochs", "1", "--limit", "64", "--batch-size", "32", "--eval-every", "0", "--data-dir",
                    str(mnist_dir), "--out", str(tmp_path / "gan")])
    other = dcgan_mnist.build_generator(parse(dcgan_mnist, "--arch", "32"))  # As its run saves it, untrained.
    other.save(tmp_path / "gan" / "generator.keras")
    before = sorted(p.name for p in (tmp_path / "gan").iterdir())
    status, err = fails(gan_mnist, ["--out", str(tmp_path / "gan"), "--generate", "4"], capsys)
    assert status == 1 and err.count("\n") == 1, err
    assert "generator.keras: not this run's generator (it takes noise of 200, the run's config.json says 100)" in err
    assert sorted(p.name for p in (tmp_path / "gan").iterdir()) == before  # Nothing written.
