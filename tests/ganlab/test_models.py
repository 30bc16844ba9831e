"""The GAN objective: each script's losses, the R1 penalty, the average of G (--ema), --g-steps."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import dcgan_mnist
import gan_mnist
from conftest import config_for, run_script
from ganlab import models
from ganlab.run import loop

pytestmark = pytest.mark.usefixtures("float32_policy_afterwards")


def sigmoid_cross_entropy(logit, target):
    probability = 1 / (1 + np.exp(-logit))
    return -(target * np.log(probability) + (1 - target) * np.log(1 - probability))


@pytest.mark.parametrize("module", [gan_mnist, dcgan_mnist])
@pytest.mark.parametrize("loss, d_expected, g_expected", [
    ("ns", sigmoid_cross_entropy(2.0, 1.0) + sigmoid_cross_entropy(-1.0, 0.0), sigmoid_cross_entropy(-1.0, 1.0)),
    ("hinge", max(0, 1 - 2.0) + max(0, 1 - 1.0), 1.0),  # D: relu(1 - 2) + relu(1 + (-1)); G: -(-1).
])
def test_each_scripts_losses_compute_their_stated_objective(module, loss, d_expected, g_expected):
    config = config_for(module, "--loss", loss)
    real, fake = tf.constant([[2.0]]), tf.constant([[-1.0]])
    np.testing.assert_allclose(module.discriminator_loss(config, real, fake).numpy(), d_expected, rtol=1e-6)
    np.testing.assert_allclose(module.generator_loss(config, fake).numpy(), g_expected, rtol=1e-6)


def test_d_scores_are_the_batch_means_of_sigmoid_of_the_logits():
    real, fake = tf.constant([[2.0], [0.0]]), tf.constant([[-1.0], [1.0]])
    scores = models.d_scores(real, fake)
    np.testing.assert_allclose([scores["d_real"], scores["d_fake"]],
                               [np.mean(1 / (1 + np.exp([-2.0, 0.0]))), np.mean(1 / (1 + np.exp([1.0, -1.0])))],
                               rtol=1e-6)


def test_r1_is_half_gamma_times_the_squared_gradient_norm_on_real_images():
    # A linear D, l(x) = w . x + b, has grad_x l = w for every image: the penalty is gamma/2 ||w||^2.
    inputs = keras.Input((28, 28, 1))
    discriminator = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    w = discriminator.layers[-1].kernel.numpy()
    images = tf.random.normal((5, 28, 28, 1))
    logits, penalty = models.logits_and_r1_penalty(discriminator, images, 10.0)
    np.testing.assert_allclose(penalty.numpy(), 0.5 * 10.0 * np.sum(w ** 2), rtol=1e-5)
    assert logits.shape == (5, 1)
    assert models.logits_and_r1_penalty(discriminator, images, 0.0)[1] == 0.0


def test_the_average_follows_its_warmed_up_decay_exactly():
    config = config_for(gan_mnist, "--ema", "0.999", "--precision", "fp32", "--batch-size", "8")
    state = loop.make_state(config, gan_mnist.build_training)
    generator, averaged = state.generator, state.averaged
    before = [v.numpy() for v in generator.trainable_variables]
    np.testing.assert_array_equal(averaged.model.get_weights()[0], generator.get_weights()[0])
    step = tf.function(lambda images, labels: (state.train_step(images, labels), averaged.update()))
    images, labels = tf.random.uniform((8, 28, 28, 1), -1, 1), tf.zeros((8,), "int32")
    step(images, labels)
    after_one = [v.numpy() for v in generator.trainable_variables]
    decay = 2 / 11  # min(0.999, (1 + n) / (10 + n)) after n = 1 update
    for average, start, now in zip(averaged.model.trainable_variables, before, after_one):
        np.testing.assert_allclose(average.numpy(), decay * start + (1 - decay) * now, rtol=1e-5, atol=1e-7)
    assert not np.allclose(after_one[0], before[0])  # G did move, so the test can tell the two apart.
    step(images, labels)
    decay = 3 / 12
    for average, start, one, now in zip(averaged.model.trainable_variables, before, after_one,
                                        [v.numpy() for v in generator.trainable_variables]):
        first = 2 / 11 * start + (1 - 2 / 11) * one
        np.testing.assert_allclose(average.numpy(), decay * first + (1 - decay) * now, rtol=1e-5, atol=1e-7)
    assert int(averaged.updates.numpy()) == 2


@pytest.mark.slow
def test_the_average_gets_batch_norm_statistics_of_its_own_weights():
    config = config_for(dcgan_mnist, "--ema", "0.9", "--precision", "fp32", "--batch-size", "8")
    state = loop.make_state(config, dcgan_mnist.build_training)
    averaged = state.averaged
    step = tf.function(lambda images, labels: (state.train_step(images, labels), averaged.update()))
    for _ in range(3):
        step(tf.random.uniform((8, 28, 28, 1), -1, 1), tf.zeros((8,), "int32"))
    model = averaged.model
    stale = [layer.moving_mean.numpy() for layer in averaged.batch_norms]
    averaged.refresh(batch_size=2000)
    assert averaged.batch_norms and all(not np.allclose(a, layer.moving_mean.numpy())
                                        for a, layer in zip(stale, averaged.batch_norms))
    # Refreshed from one batch, the statistics are that batch's: inference then equals training mode on it.
    inference = model(averaged.refresh_inputs, training=False).numpy()
    np.testing.assert_allclose(inference, model(averaged.refresh_inputs, training=True).numpy(), atol=2e-5)
    # In batches, each statistic is the mean of the batches' own statistics.
    per_batch = []
    everything = averaged.refresh_inputs
    for start in range(0, 2000, 500):
        averaged.refresh_inputs = everything[start:start + 500]
        averaged.refresh(batch_size=500)
        per_batch.append([(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in averaged.batch_norms])
    averaged.refresh_inputs = everything
    averaged.refresh(batch_size=500)
    for index, layer in enumerate(averaged.batch_norms):
        np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean([b[index][0] for b in per_batch], axis=0),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), np.mean([b[index][1] for b in per_batch], axis=0),
                                   rtol=1e-4, atol=1e-5)
        assert layer.momentum == config.bn_momentum  # Restored, so the saved generator keeps the run's value.


@pytest.mark.parametrize("module, extra", [
    (gan_mnist, ["--loss", "ns", "--r1", "1"]),
    (dcgan_mnist, ["--loss", "hinge", "--g-steps", "2", "--limit", "64", "--batch-size", "32"]),
])
@pytest.mark.slow
def test_other_losses_train_end_to_end_and_only_the_generator_that_samples_is_scored(tmp_path, mnist_dir, module,
                                                                                    extra):
    run_dir = tmp_path / "run"
    module.main(["--limit", "200", "--epochs", "1", "--num-samples", "200", "--data-dir", str(mnist_dir),
                 "--out", str(run_dir)] + extra)
    history = json.loads((run_dir / "history.json").read_text())
    assert np.isfinite(history["iterations"]["d_loss"]).all() and np.isfinite(history["iterations"]["g_loss"]).all()
    final = history["evaluations"][-1]
    assert "raw" not in final and final["samples"] == 200  # The average of G only: an evaluation costs one scoring.
    config = json.loads((run_dir / "config.json").read_text())
    assert config["r1"] == 1.0 and config["ema"] == module.EMA > 0 and config["loss"] == extra[1]


def test_g_steps_updates_g_that_many_times_per_d_update():
    config = config_for(dcgan_mnist, "--g-steps", "2", "--batch-size", "4", "--precision", "fp32")
    state = loop.make_state(config, dcgan_mnist.build_training)
    generator_before = [weight.numpy().copy() for weight in state.generator.trainable_variables]
    images = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    tf.function(state.train_step)(images, np.zeros(4, np.int32))
    assert int(state.d_optimizer.iterations) == 1 and int(state.g_optimizer.iterations) == 2
    assert any(not np.array_equal(before, after.numpy())
               for before, after in zip(generator_before, state.generator.trainable_variables))


def test_without_ema_the_raw_generator_draws_and_is_scored_alone(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    gan_mnist.main(["--limit", "200", "--epochs", "1", "--num-samples", "200", "--ema", "0",
                    "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    final = json.loads((run_dir / "history.json").read_text())["evaluations"][-1]
    assert "raw" not in final


def test_adam_takes_both_betas_from_the_flags():
    config = config_for(dcgan_mnist, "--beta1", "0", "--beta2", "0.99")
    optimizer = models.make_optimizer(config, [tf.Variable(1.0)])
    assert (optimizer.beta_1, optimizer.beta_2) == (0.0, 0.99)


@pytest.mark.slow
def test_the_study_tool_scores_extra_averages_beside_the_runs_own(mnist_dir, tmp_path):
    # results/extra_averages.py: its first extra average repeats the run's own schedule, so its FID
    # must equal the run's; the others differ from it after a few steps of real training.
    run_dir = tmp_path / "run"
    result = run_script("results/extra_averages.py", "dcgan_mnist.py", "--epochs", "1", "--limit", "256",
                        "--batch-size", "32", "--num-samples", "300", "--data-dir", str(mnist_dir), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (run_dir / "extra_averages.jsonl").read_text().splitlines()]
    own = json.loads((run_dir / "metrics.json").read_text())["figures"]
    assert [(row["cap"], row["c"], row["step"]) for row in rows][:2] == [(0.999, 10.0, 8), (0.9995, 10.0, 8)]
    assert len(rows) == 6 and rows[0]["fid"] == pytest.approx(own["fid"], rel=1e-6)
    assert rows[-1]["fid"] != pytest.approx(own["fid"], rel=1e-3)  # c = 2 keeps far more of the initial weights.
    assert "extra average cap 1.0 c 2 at step 8" in result.stdout


def test_diffaugment_translates_cuts_out_and_recolours_each_image_differentiably():
    images = tf.constant(np.random.default_rng(0).uniform(0.2, 1.0, (16, 32, 32, 3)), tf.float32)
    settings = type("Settings", (), {"augment": ""})
    assert models.augmenter(settings, tf.random.Generator.from_seed(0))(images) is images  # Off: as it is.
    for policy in ("translation", "cutout", "color"):
        settings.augment = policy
        augment = models.augmenter(settings, tf.random.Generator.from_seed(1))
        with tf.GradientTape() as tape:
            tape.watch(images)
            out = augment(images)
            total = tf.reduce_sum(out)
        assert out.shape == images.shape and out.dtype == tf.float32
        assert np.abs(tape.gradient(total, images).numpy()).sum() > 0  # G learns through it.
        zeros = (out.numpy() == 0).all(axis=-1).mean(axis=(1, 2))  # Per image: the fraction zeroed.
        if policy == "translation":  # Up to 1/8 of each side comes in as zeros; the rest is the image, moved.
            assert zeros.max() <= 1 - (1 - 4 / 32) ** 2 + 1e-6 and zeros.max() > 0
            assert len({float(z) for z in zeros}) > 1  # Each image its own shift.
        elif policy == "cutout":  # A square of half the side (less where it crosses the border).
            assert zeros.max() == pytest.approx(0.25) and zeros.min() > 0
        else:
            assert zeros.max() == 0 and not np.allclose(out.numpy(), images.numpy())
    settings.augment = "color,translation,cutout"
    step = tf.function(models.augmenter(settings, tf.random.Generator.from_seed(2)), jit_compile=False)
    assert step(tf.cast(images, tf.bfloat16)).dtype == tf.float32  # Precision-safe: float32 whatever comes in.
