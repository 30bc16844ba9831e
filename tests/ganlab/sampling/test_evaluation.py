"""Sample-quality figures: the Fréchet distance, Inception Score, mode coverage and the real-data floor."""

import json
import re
import unittest.mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import gan_mnist
from conftest import parse
import utils
from ganlab.sampling import evaluation, sample


@pytest.fixture(scope="session")
def evaluator(mnist_dir):
    """The cached evaluator (trained once per machine, about two minutes, then loaded in a second)."""
    return sample.load_evaluator(parse(gan_mnist, "--data-dir", str(mnist_dir)))


@pytest.fixture(scope="session")
def test_set(mnist_dir):
    return utils.load_mnist("test", mnist_dir)


def test_frechet_distance_matches_the_closed_form():
    mean = np.zeros(2)
    assert evaluation.frechet_distance(mean, np.eye(2), mean, np.eye(2)) == pytest.approx(0, abs=1e-9)
    assert evaluation.frechet_distance(np.array([3.0, 4.0]), np.eye(2), mean, np.eye(2)) == pytest.approx(25)
    # Diagonal covariances: sum of (sqrt(a) - sqrt(b))^2 = (2 - 1)^2 + (3 - 1)^2.
    assert evaluation.frechet_distance(mean, np.diag([4.0, 9.0]), mean, np.eye(2)) == pytest.approx(5)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(evaluator, test_set):
    images = test_set[0][:3000]
    features, _ = evaluator.features_and_probabilities(images)
    mean, cov = evaluation.feature_statistics(features)
    assert evaluation.frechet_distance(mean, cov, mean, cov) == pytest.approx(0, abs=1e-6)
    rng = np.random.default_rng(0)
    distances = []
    for sigma in (10, 40, 100):
        noisy = np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
        noisy_mean, noisy_cov = evaluation.feature_statistics(evaluator.features_and_probabilities(noisy)[0])
        distances.append(evaluation.frechet_distance(noisy_mean, noisy_cov, mean, cov))
    assert 0 < distances[0] < distances[1] < distances[2]


def test_real_data_floor_is_small_and_the_classifier_is_accurate(evaluator):
    floor = evaluator.floor
    assert evaluator.test_accuracy >= 0.99
    assert floor["samples"] == 10_000
    assert floor["fid"] < 3 and floor["inception_score"] > 9.3
    assert floor["classes_covered"] == 10 and floor["label_kl"] < 0.01 and floor["confidence"] > 0.97


def test_real_test_images_score_an_inception_score_near_10(evaluator, test_set):
    figures = evaluator.evaluate(test_set[0])
    assert 9.5 < figures["inception_score"] <= 10
    assert figures["fid"] == pytest.approx(0, abs=1e-6)  # The test set is the reference itself.


def test_a_set_of_one_digit_covers_one_class_with_a_large_kl(evaluator, test_set):
    images, labels = test_set
    figures = evaluator.evaluate(images[labels == 3][:1000])
    assert figures["classes_covered"] == 1
    assert figures["label_kl"] > 2.0  # log(10) = 2.30 for a single class.
    assert figures["inception_score"] < 1.5
    assert figures["fid"] > 50


def test_blurred_digits_lose_confidence(evaluator, test_set):
    images = test_set[0][:2000].astype(np.float32)
    blurred = images.copy()
    for _ in range(4):  # A crude box blur, repeated.
        blurred = (blurred + np.roll(blurred, 1, 1) + np.roll(blurred, -1, 1) + np.roll(blurred, 1, 2)
                   + np.roll(blurred, -1, 2)) / 5
    sharp = evaluator.evaluate(images.astype(np.uint8))["confidence"]
    assert evaluator.evaluate(blurred.astype(np.uint8))["confidence"] < sharp - 0.02


@pytest.mark.parametrize("images, message", [
    (np.zeros((10, 28, 28), np.float32), "expected uint8 images 0..255"),
    (np.full((10, 28, 28), -1.0), "in [-1, -1]"),
    (np.zeros((10, 32, 32), np.uint8), "shape (N, 28, 28), got (10, 32, 32)"),
    (np.zeros((10, 28, 28, 3), np.uint8), "got (10, 28, 28, 3)"),
    (np.zeros((1, 28, 28), np.uint8), "at least 2 images"),
])
def test_mismatched_shape_or_range_gets_a_clear_error(evaluator, images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluator.evaluate(images)


def test_classifier_training_is_deterministic(test_set):
    images, labels = test_set[0][:512], test_set[1][:512]
    first, _ = evaluation.train_classifier(images, labels, images[:200], labels[:200], epochs=1)
    second, _ = evaluation.train_classifier(images, labels, images[:200], labels[:200], epochs=1)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_cache_key_follows_the_data():
    a = np.zeros((3, 28, 28), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert evaluation.data_key(a) == evaluation.data_key(a.copy()) != evaluation.data_key(b)


def test_a_run_evaluates_on_schedule_and_writes_metrics(tmp_path, mnist_dir, evaluator, capsys):
    run_dir = tmp_path / "gan"
    gan_mnist.main(["--epochs", "3", "--eval-every", "2", "--num-samples", "400", "--limit", "128",
                    "--batch-size", "64", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    output = capsys.readouterr().out
    history = json.loads((run_dir / "history.json").read_text())
    assert [e["epoch"] for e in history["evaluations"]] == [2, 3]  # Every 2 epochs, and after the last.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epoch"] == 3 and metrics["figures"]["samples"] == 400
    assert metrics["figures"] == history["evaluations"][-1]
    assert metrics["real_data_floor"] == evaluator.floor
    assert set(evaluation.FIGURES) <= set(metrics["figures"])
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    assert "real data:" in output and "Inception Score" in output

    gan_mnist.main(["--out", str(run_dir), "--evaluate", "--num-samples", "300", "--data-dir", str(mnist_dir)])
    output = capsys.readouterr().out
    saved = json.loads((run_dir / "evaluation.json").read_text())
    assert saved["figures"]["samples"] == 300 and saved["real_data_floor"] == evaluator.floor
    assert f"{saved['figures']['fid']:.4g}" in output and "real data:" in output


def test_eval_every_0_turns_evaluation_off(tmp_path, mnist_dir):
    gan_mnist.main(["--epochs", "1", "--eval-every", "0", "--limit", "128", "--batch-size", "64",
                    "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert json.loads((tmp_path / "run" / "history.json").read_text())["evaluations"] == []


@pytest.mark.parametrize("damage", [
    lambda directory: (directory / "floor.json").write_text('{"floor": 3}'),
    pytest.param(lambda directory: (directory / "classifier.keras").write_bytes(
        (directory / "classifier.keras").read_bytes()[:500]), marks=pytest.mark.slow),
])
def test_a_damaged_classifier_cache_is_rebuilt_saying_so(tmp_path, test_set, damage):
    images, labels = test_set[0][:600], test_set[1][:600]
    messages = []

    def load():
        return evaluation.Evaluator.load_or_train(tmp_path, images, labels, images[:200], labels[:200],
                                                  log=messages.append, epochs=1)

    first = load()
    directory = next(tmp_path.glob("classifier-*"))
    damage(directory)
    messages.clear()
    rebuilt = load()
    assert any(m.startswith(f"The cached evaluation classifier in {directory} is damaged") for m in messages)
    assert rebuilt.floor == first.floor  # Trained again, deterministically, and cached again:
    messages.clear()
    load()
    assert messages == []


def test_the_classifier_trains_the_same_way_anywhere_and_its_cache_says_how(tmp_path, test_set):
    """Op determinism on, TF32 off, XLA off while it trains (then as they were); the cache entry records it; the
    batches are scaled one at a time, from the uint8 set."""
    from tensorflow.python.framework import config as tf_config

    images, labels = test_set[0][:600], test_set[1][:600]
    seen = []
    fit = keras.Model.fit

    def watched_fit(model, data, **kwargs):
        seen.append((tf_config.is_op_determinism_enabled(), tf.config.experimental.tensor_float_32_execution_enabled(),
                     model.jit_compile, type(data).__name__, data[0][0].shape, data[0][0].dtype))
        return fit(model, data, **kwargs)

    tf32_before = tf.config.experimental.tensor_float_32_execution_enabled()
    determinism_before = tf_config.is_op_determinism_enabled()
    with unittest.mock.patch.object(keras.Model, "fit", watched_fit):
        evaluation.Evaluator.load_or_train(tmp_path, images, labels, images[:200], labels[:200], log=lambda m: None,
                                           epochs=1)
    assert seen == [(True, False, False, "ScaledBatches", (128, 28, 28, 1), np.float32)]
    assert tf_config.is_op_determinism_enabled() == determinism_before
    assert tf.config.experimental.tensor_float_32_execution_enabled() == tf32_before
    trained = json.loads(next(tmp_path.glob("classifier-*/floor.json")).read_text())["trained"]
    assert trained["op_determinism"] is True and trained["tf32"] is False and trained["xla"] is False
    assert trained["device"] == "CPU" and trained["recipe"] == evaluation.RECIPE


@pytest.mark.parametrize("dataset, least", [("mnist", 0.99), ("fashion_mnist", 0.90), ("cifar10", 0.65)])
def test_the_shipped_classifiers_are_small_and_the_recipes(dataset, least):
    """Each ships in half precision under 2 MB, recorded beside the recipe with its SHA-256 and test accuracy."""
    path = evaluation.SHIPPED_DIR / f"{dataset}.npz"
    entry = json.loads(evaluation.SHIPPED_INDEX.read_text())[dataset]
    assert path.stat().st_size < 2_000_000 and entry["bytes"] == path.stat().st_size
    assert entry["recipe"] == evaluation.RECIPE and entry["sha256"] == evaluation.sha256(path)
    assert entry["test_accuracy"] >= least and abs(entry["test_accuracy"] - entry["test_accuracy_float32"]) < 0.002
    with np.load(path) as stored:
        assert {stored[name].dtype for name in stored.files} == {np.dtype(np.float16)}


def test_the_shipped_mnist_classifier_reaches_its_recorded_accuracy(test_set):
    model = evaluation.shipped_classifier("mnist", (28, 28, 1))
    recorded = json.loads(evaluation.SHIPPED_INDEX.read_text())["mnist"]["test_accuracy"]
    assert evaluation.accuracy(model, *test_set) == pytest.approx(recorded, abs=0.0011)


def test_a_changed_shipped_classifier_is_refused_in_one_line(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "classifiers"
    shutil.copytree(evaluation.SHIPPED_DIR, copy)
    damaged = bytearray((copy / "mnist.npz").read_bytes())
    damaged[-100] ^= 1
    (copy / "mnist.npz").write_bytes(bytes(damaged))
    monkeypatch.setattr(evaluation, "SHIPPED_DIR", copy)
    monkeypatch.setattr(evaluation, "SHIPPED_INDEX", copy / "classifiers.json")
    with pytest.raises(utils.DataError, match=r"mnist\.npz: not the classifier that classifiers\.json records .* "
                                              r"tools/train_classifiers\.py"):
        evaluation.shipped_classifier("mnist", (28, 28, 1))
    assert evaluation.shipped_classifier("fashion_mnist", (28, 28, 1)) is not None  # The others are untouched.


def test_a_first_evaluation_of_mnist_uses_the_shipped_classifier_without_training(tmp_path, test_set):
    images, labels = test_set[0][:600], test_set[1][:600]
    messages = []
    with unittest.mock.patch.object(evaluation, "train_classifier", side_effect=AssertionError("trained")):
        evaluator = evaluation.Evaluator.load_or_train(tmp_path, images, labels, test_set[0], test_set[1],
                                                       log=messages.append, dataset="mnist")
    assert messages == [] and evaluator.test_count == 10_000
    assert evaluator.test_accuracy == json.loads(evaluation.SHIPPED_INDEX.read_text())["mnist"]["test_accuracy"]
    saved = json.loads(next(tmp_path.glob("classifier-*/floor.json")).read_text())
    assert saved["trained"] == "shipped"
