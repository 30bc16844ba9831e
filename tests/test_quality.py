"""The sample-quality levers: the average of G (--ema), the losses, one-sided label smoothing, R1 and R2,
consistency, top-k, spectral norm."""

import json

import keras
import numpy as np
import pytest

import dcgan_mnist
import gan_mnist
import utils
from conftest import run_script
from test_speed import config_for


@pytest.fixture(autouse=True)
def float32_policy_afterwards():
    yield
    utils.set_precision("fp32")
    utils.tf.config.optimizer.set_experimental_options({"remapping": True})


def sigmoid_cross_entropy(logit, target):
    probability = 1 / (1 + np.exp(-logit))
    return -(target * np.log(probability) + (1 - target) * np.log(1 - probability))


@pytest.mark.parametrize("loss, smoothing, d_expected, g_expected", [
    ("ns", 0.0, sigmoid_cross_entropy(2.0, 1.0) + sigmoid_cross_entropy(-1.0, 0.0), sigmoid_cross_entropy(-1.0, 1.0)),
    ("ns", 0.1, sigmoid_cross_entropy(2.0, 0.9) + sigmoid_cross_entropy(-1.0, 0.0), sigmoid_cross_entropy(-1.0, 1.0)),
    ("hinge", 0.0, max(0, 1 - 2.0) + max(0, 1 - 1.0), 1.0),  # D: relu(1 - 2) + relu(1 + (-1)); G: -(-1).
    ("ls", 0.0, 0.5 * (2.0 - 1) ** 2 + 0.5 * 1.0, 0.5 * (-1.0 - 1) ** 2),
    ("ls", 0.2, 0.5 * (2.0 - 0.8) ** 2 + 0.5 * 1.0, 0.5 * (-1.0 - 1) ** 2),
    # rp pairs the fake with the real: D: softplus(-1 - 2), G: softplus(2 - (-1)).
    ("rp", 0.0, np.log1p(np.exp(-3.0)), np.log1p(np.exp(3.0))),
])
def test_each_loss_computes_its_stated_objective(loss, smoothing, d_expected, g_expected):
    config = config_for(gan_mnist, "--loss", loss, "--label-smoothing", str(smoothing))
    discriminator_loss, generator_loss = utils.gan_losses(config)
    real, fake = utils.tf.constant([[2.0]]), utils.tf.constant([[-1.0]])
    np.testing.assert_allclose(discriminator_loss(real, fake).numpy(), d_expected, rtol=1e-6)
    np.testing.assert_allclose(generator_loss(fake, real).numpy(), g_expected, rtol=1e-6)
    assert utils.loss_needs_real_logits(config) == (loss == "rp")


def test_the_relativistic_loss_depends_only_on_the_gap_between_real_and_fake_logits():
    discriminator_loss, generator_loss = utils.gan_losses(config_for(dcgan_mnist, "--loss", "rp"))
    real, fake = utils.tf.constant([[2.0], [0.5]]), utils.tf.constant([[-1.0], [1.5]])
    for shift in (0.0, 7.0):  # Adding the same constant to every logit changes nothing.
        np.testing.assert_allclose(discriminator_loss(real + shift, fake + shift).numpy(),
                                   np.mean(np.log1p(np.exp([-3.0, 1.0]))), rtol=1e-5)
        np.testing.assert_allclose(generator_loss(fake + shift, real + shift).numpy(),
                                   np.mean(np.log1p(np.exp([3.0, -1.0]))), rtol=1e-5)


def test_d_scores_are_sigmoids_of_the_logits_and_under_rp_of_their_gaps():
    real, fake = utils.tf.constant([[2.0], [0.0]]), utils.tf.constant([[-1.0], [1.0]])
    plain = utils.discriminator_scores(config_for(dcgan_mnist), real, fake)
    np.testing.assert_allclose([plain["d_real"], plain["d_fake"]],
                               [np.mean(1 / (1 + np.exp([-2.0, 0.0]))), np.mean(1 / (1 + np.exp([1.0, -1.0])))], rtol=1e-6)
    relative = utils.discriminator_scores(config_for(dcgan_mnist, "--loss", "rp"), real - 50, fake - 50)
    np.testing.assert_allclose(relative["d_real"], np.mean(1 / (1 + np.exp([-3.0, 1.0]))), rtol=1e-6)
    np.testing.assert_allclose(relative["d_real"] + relative["d_fake"], 1.0, rtol=1e-6)


def test_r1_is_half_gamma_times_the_squared_gradient_norm_on_real_images():
    # A linear D, l(x) = w . x + b, has grad_x l = w for every image: the penalty is gamma/2 ||w||^2.
    inputs = keras.Input((28, 28, 1))
    discriminator = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    w = discriminator.layers[-1].kernel.numpy()
    images = utils.tf.random.normal((5, 28, 28, 1))
    logits, penalty = utils.logits_and_gradient_penalty(discriminator, images, 10.0)
    np.testing.assert_allclose(penalty.numpy(), 0.5 * 10.0 * np.sum(w ** 2), rtol=1e-5)
    assert logits.shape == (5, 1)
    assert utils.logits_and_gradient_penalty(discriminator, images, 0.0)[1] == 0.0


def test_random_shifts_move_each_image_by_its_own_whole_pixel_offset_within_the_bound():
    images = np.full((64, 28, 28, 1), -1.0, np.float32)
    images[:, 10:14, 12:15, 0] = 1.0  # A 4x3 block on the background, away from the edges.
    shifted = utils.random_shifts(utils.tf.constant(images), 3, utils.tf.random.Generator.from_seed(0)).numpy()
    offsets = []
    for picture in shifted[..., 0]:
        assert set(np.unique(picture)) == {-1.0, 1.0} and (picture == 1.0).sum() == 12  # Moved, not blurred.
        rows, columns = np.nonzero(picture == 1.0)
        offsets.append((rows.min() - 10, columns.min() - 12))
    offsets = np.array(offsets)
    assert np.abs(offsets).max() == 3 and len({tuple(o) for o in offsets}) > 20  # Per image, up to 3 pixels.


def test_the_consistency_term_is_zero_for_a_shift_invariant_d_and_weighted_otherwise():
    inputs = keras.Input((28, 28, 1))
    invariant = keras.Model(inputs, keras.ops.sum(inputs, axis=(1, 2)))  # Sums the pixels: blind to a shift.
    corner = keras.Model(inputs, keras.ops.sum(inputs[:, :14, :14], axis=(1, 2)))  # Sees where the digit is.
    images = np.full((32, 28, 28, 1), -1.0, np.float32)
    images[:, 12:16, 12:16, 0] = 1.0  # Straddles the corner's edge: most shifts change its sum.
    images = utils.tf.constant(images)
    rng = utils.tf.random.Generator.from_seed(0)

    def term(discriminator, weight):
        batches = [(images, None, discriminator(images))] * 2
        return float(utils.consistency_penalty(discriminator, weight, rng, lambda x, labels: x, batches))

    assert term(invariant, 10.0) == 0.0
    one, ten = term(corner, 1.0), term(corner, 10.0)
    assert one > 0.0 and 5.0 < ten / one < 20.0  # Fresh shifts each call: about 10x, not exactly.


def test_the_average_follows_its_warmed_up_decay_exactly():
    config = config_for(gan_mnist, "--ema", "0.999", "--precision", "fp32", "--batch-size", "8")
    train_step, state, averaged = utils.build_for_training(config, gan_mnist.build_training)
    generator = state["generator"]
    before = [v.numpy() for v in generator.trainable_variables]
    np.testing.assert_array_equal(averaged.model.get_weights()[0], generator.get_weights()[0])
    step = utils.tf.function(train_step)
    images, labels = utils.tf.random.uniform((8, 28, 28, 1), -1, 1), utils.tf.zeros((8,), "int32")
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


def test_the_average_gets_batch_norm_statistics_of_its_own_weights():
    config = config_for(dcgan_mnist, "--ema", "0.9", "--precision", "fp32", "--batch-size", "8")
    train_step, state, averaged = utils.build_for_training(
        config, lambda settings: dcgan_mnist.build_training(settings, dcgan_mnist.PRESETS["28"]))
    step = utils.tf.function(train_step)
    for _ in range(3):
        step(utils.tf.random.uniform((8, 28, 28, 1), -1, 1), utils.tf.zeros((8,), "int32"))
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
    (gan_mnist, ["--loss", "hinge", "--r1", "1", "--spectral-norm", "--d-lr-scale", "2"]),
    (gan_mnist, ["--loss", "rp", "--r1", "1", "--spectral-norm"]),
    (dcgan_mnist, ["--loss", "ls", "--label-smoothing", "0.1", "--r1", "1", "--spectral-norm", "--consistency", "10",
                   "--limit", "64", "--batch-size", "32"]),
    (dcgan_mnist, ["--loss", "rp", "--r1", "1", "--r2", "1", "--top-k", "0.5", "--spectral-norm", "--g-steps", "2",
                   "--limit", "64", "--batch-size", "32"]),
])
def test_the_levers_train_end_to_end_and_the_raw_generator_is_scored_beside_the_average(tmp_path, mnist_dir,
                                                                                        module, extra):
    run_dir = tmp_path / "run"
    module.main(["--limit", "200", "--epochs", "1", "--num-samples", "200", "--data-dir", str(mnist_dir),
                 "--out", str(run_dir)] + extra)
    history = json.loads((run_dir / "history.json").read_text())
    assert np.isfinite(history["iterations"]["d_loss"]).all() and np.isfinite(history["iterations"]["g_loss"]).all()
    final = history["evaluations"][-1]
    assert set(final["raw"]) == {"fid", "inception_score", "classes_covered", "label_kl", "confidence"}
    assert final["fid"] != final["raw"]["fid"]  # Two different generators were scored.
    config = json.loads((run_dir / "config.json").read_text())
    assert config["spectral_norm"] is True and config["r1"] == 1.0 and config["ema"] == module.EMA > 0


def test_g_steps_updates_g_that_many_times_per_d_update_and_its_decay_follows_the_training_steps():
    utils.set_precision("fp32")
    config = config_for(dcgan_mnist, "--g-steps", "2", "--lr-decay", "1", "--batch-size", "4")
    config.total_steps = 3
    train_step, state = dcgan_mnist.build_training(config, dcgan_mnist.PRESETS[config.arch])
    generator_before = [weight.numpy().copy() for weight in state["generator"].trainable_variables]
    images = np.random.default_rng(0).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    utils.tf.function(train_step)(images, np.zeros(4, np.int32))
    assert int(state["d_optimizer"].iterations) == 1 and int(state["g_optimizer"].iterations) == 2
    assert any(not np.array_equal(before, after.numpy())
               for before, after in zip(generator_before, state["generator"].trainable_variables))
    # After one of the run's three steps, both rates have fallen by a third (G's schedule counts
    # its two updates per step), and both reach zero at the run's last step.
    for name in ("d_optimizer", "g_optimizer"):  # learning_rate: the schedule at the optimizer's own count.
        assert float(state[name].learning_rate) == pytest.approx(config.lr * 2 / 3, rel=1e-5), name
    state["g_optimizer"].iterations.assign(6)  # G's count after the run's third and last step.
    assert float(state["g_optimizer"].learning_rate) == 0.0


def test_spectral_norm_wraps_every_weight_layer_of_d_and_keeps_the_logit_float32():
    utils.set_precision("bf16")
    for module in (gan_mnist, dcgan_mnist):
        config = config_for(module, "--spectral-norm")
        args = (config, module.PRESETS[config.arch]) if module is dcgan_mnist else (config,)
        discriminator = module.build_discriminator(*args)
        wrapped = [layer for layer in discriminator.layers if isinstance(layer, keras.layers.SpectralNormalization)]
        weight_layers = [layer for layer in discriminator.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]
        assert wrapped and not weight_layers
        assert discriminator(np.zeros((2,) + tuple(discriminator.input_shape[1:]), np.float32)).dtype == "float32"
        assert not any(isinstance(layer, keras.layers.SpectralNormalization)
                       for layer in module.build_generator(*args).layers)


def test_without_ema_the_raw_generator_draws_and_is_scored_alone(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    gan_mnist.main(["--limit", "200", "--epochs", "1", "--num-samples", "200", "--ema", "0",
                    "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    final = json.loads((run_dir / "history.json").read_text())["evaluations"][-1]
    assert "raw" not in final


def test_adam_takes_both_betas_from_the_flags():
    config = config_for(dcgan_mnist, "--beta1", "0", "--beta2", "0.99")
    optimizer = utils.make_optimizer(config, [utils.tf.Variable(1.0)])
    assert (optimizer.beta_1, optimizer.beta_2) == (0.0, 0.99)


def test_the_learning_rate_decays_linearly_to_zero_over_the_last_fraction_of_the_run():
    config = config_for(gan_mnist, "--lr", "1e-3", "--lr-decay", "0.5")
    variables = [utils.tf.Variable(1.0)]
    assert float(utils.make_optimizer(config, variables).learning_rate) == pytest.approx(1e-3)  # No horizon: constant.
    config.total_steps = 100
    optimizer = utils.make_optimizer(config, variables, lr_scale=2.0)
    rates = {}
    for step in (0, 50, 75, 100, 120):
        optimizer.iterations.assign(step)
        rates[step] = float(optimizer.learning_rate)
    assert rates == pytest.approx({0: 2e-3, 50: 2e-3, 75: 1e-3, 100: 0.0, 120: 0.0})


def test_a_training_run_ends_with_the_decayed_rate_at_zero(tmp_path, mnist_dir, monkeypatch):
    optimizers = []
    make_optimizer = utils.make_optimizer

    def recording_make_optimizer(*args, **kwargs):
        optimizers.append(make_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(utils, "make_optimizer", recording_make_optimizer)
    gan_mnist.main(["--limit", "200", "--batch-size", "50", "--epochs", "2", "--eval-every", "0", "--lr-decay", "1",
                    "--data-dir", str(mnist_dir), "--out", str(tmp_path / "run")])
    assert len(optimizers) == 2
    for optimizer in optimizers:
        assert int(optimizer.iterations) == 8 and float(optimizer.learning_rate) == 0.0


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


def test_top_k_keeps_the_fakes_d_rates_most_real_with_their_paired_reals_and_anneals_over_the_run():
    config = config_for(dcgan_mnist, "--top-k", "0.5")
    config.total_steps = 100
    fake = utils.tf.constant([[0.1], [3.0], [-2.0], [1.0]])
    real = utils.tf.constant([[10.0], [13.0], [8.0], [11.0]])
    kept_fake, kept_real = utils.top_k_logits(config, 0, fake, real)  # First step: every fake.
    assert sorted(kept_fake.numpy().ravel()) == sorted(fake.numpy().ravel())
    kept_fake, kept_real = utils.top_k_logits(config, 100, fake, real)  # Last step: the best half.
    np.testing.assert_allclose(kept_fake.numpy().ravel(), [3.0, 1.0])
    np.testing.assert_allclose(kept_real.numpy().ravel(), [13.0, 11.0])  # Each with its own real image.
    assert len(utils.top_k_logits(config, 50, fake)[0]) == 3  # Halfway: ceil(0.75 * 4).
    assert utils.top_k_logits(config_for(dcgan_mnist), 100, fake)[0] is fake  # --top-k 1: untouched.
