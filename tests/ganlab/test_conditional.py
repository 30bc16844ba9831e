"""Class-conditional GAN and DCGAN: labels in training, conditional grids, --label, --interpolate, per-class accuracy."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf

import dcgan_mnist
import gan_mnist
import utils
from conftest import parse
from ganlab import errors, models
from ganlab.run import loop

QUICK = ["--conditional", "--epochs", "1", "--limit", "128", "--batch-size", "32", "--num-samples", "200"]


def conditional_config(module, *argv):
    return parse(module, "--conditional", *argv)


@pytest.mark.parametrize("classes, expected", [("", list(range(10))), ("3,9", [3, 9])])
def test_drawn_labels_cover_every_class_in_play_the_last_included(classes, expected):
    config = conditional_config(gan_mnist, "--classes", classes) if classes else conditional_config(gan_mnist)
    random_labels, conditioned = models.label_helpers(config, tf.random.Generator.from_seed(0))
    labels = random_labels(5000).numpy()
    assert sorted(set(labels.tolist())) == expected
    counts = np.bincount(labels)[expected]
    assert counts.min() > 0.8 * 5000 / len(expected)  # Roughly uniform.
    image, one_hot = conditioned(tf.zeros((4, 28, 28, 1)), tf.constant([0, 3, 9, 9]))
    assert one_hot.shape == (4, 10) and one_hot.numpy().argmax(axis=1).tolist() == [0, 3, 9, 9]


@pytest.mark.parametrize("module", [gan_mnist, dcgan_mnist])
def test_conditional_models_take_a_label(module):
    config = conditional_config(module)
    generator = module.build_generator(config)
    discriminator = module.build_discriminator(config)
    noise, labels = np.zeros((3, config.latent_dim), np.float32), models.one_hot([0, 5, 9], config)
    images = generator([noise, labels])
    assert images.shape == (3, 28, 28, 1)
    assert discriminator([images, tf.constant(labels)]).shape == (3, 1)
    unconditional = module.build_generator(conditional_config(module, "--no-conditional"))
    assert len(unconditional.inputs) == 1


def test_every_class_is_in_the_training_batches(mnist_dir):
    config = conditional_config(gan_mnist, "--data-dir", str(mnist_dir), "--limit", "600", "--batch-size", "100")
    _, labels = utils.load_training_images(config)
    batches = loop.epoch_batches(config.seed, 1, len(labels), 6, 100)
    assert sorted(set(labels[batches.ravel()].tolist())) == list(range(10))


@pytest.mark.parametrize("module", [gan_mnist, dcgan_mnist])
@pytest.mark.slow
def test_a_conditional_run_has_a_row_per_class_and_generates_a_requested_label(tmp_path, mnist_dir, module, capsys):
    run_dir = tmp_path / "run"
    module.main(QUICK + ["--data-dir", str(mnist_dir), "--out", str(run_dir)])
    side = 10 * 30 + 2
    assert iio.imread(run_dir / "epoch_001.png").shape == (side, side)  # 10 classes x 10 noise vectors.
    metrics = json.loads((run_dir / "metrics.json").read_text())["figures"]
    assert 0 <= metrics["label_accuracy"] <= 1
    assert list(metrics["label_accuracy_per_class"]) == [str(d) for d in range(10)]
    assert "requested label recognised" in capsys.readouterr().out

    npz = tmp_path / "sevens.npz"
    module.main(["--out", str(run_dir), "--generate", "12", "--label", "7", "--samples-npz", str(npz)])
    with np.load(npz, allow_pickle=False) as archive:
        assert archive["images"].shape == (12, 28, 28)
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(module.main, ["--out", str(run_dir), "--generate", "4", "--label", "10"])
    assert exit_status.value.code == 2
    assert "--label: 10 is not a class this run was trained on" in capsys.readouterr().err


@pytest.mark.slow
def test_labels_requested_from_a_class_subset_run(tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--classes", "1,7", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    assert iio.imread(run_dir / "epoch_001.png").shape == (2 * 30 + 2, 10 * 30 + 2)  # Rows for 1 and 7 only.
    assert list(json.loads((run_dir / "metrics.json").read_text())["figures"]["label_accuracy_per_class"]) == ["1", "7"]
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--out", str(run_dir), "--generate", "4", "--label", "3"])
    assert exit_status.value.code == 2


@pytest.mark.parametrize("sampling", [["--generate", "4"], ["--interpolate"]])
def test_a_label_asked_of_an_unconditional_run_is_refused(tmp_path, mnist_dir, sampling, capsys):
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK[1:] + ["--eval-every", "0", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--out", str(run_dir), *sampling, "--label", "3"])
    assert exit_status.value.code == 2
    assert "--label: this run is not conditional" in capsys.readouterr().err
    assert not (run_dir / "generated_samples.png").exists() and not (run_dir / "interpolation.gif").exists()


def test_label_needs_generate_or_interpolate(capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--label", "3"])
    assert exit_status.value.code == 2 and "--label: only used with --generate" in capsys.readouterr().err


@pytest.mark.parametrize("conditional, frames", [(False, 48), (True, 96)])
def test_interpolation_gif_frames_and_shape(tmp_path, mnist_dir, conditional, frames):
    run_dir = tmp_path / "run"
    flags = QUICK[1:] + ["--eval-every", "0"] + (["--conditional"] if conditional else [])
    gan_mnist.main(flags + ["--data-dir", str(mnist_dir), "--out", str(run_dir)])
    gan_mnist.main(["--out", str(run_dir), "--interpolate", "--sample-grid", "6"])
    animation = iio.imread(run_dir / "interpolation.gif", index=None)
    assert animation.shape[:3] == (frames, 1 * 30 + 2, 6 * 30 + 2)  # One row of 6 samples.
    assert not np.array_equal(animation[0], animation[frames // 4])  # It moves.
