"""Speed settings: precision policies (bf16, fp16 with loss scaling), XLA, steps per call, FLOP counts, --benchmark."""

import json
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

import dcgan_mnist
import gan_mnist
import utils
from conftest import config_for
from ganlab import bench, errors
from ganlab.devices import speed
from ganlab.run import directory as run_directory
from ganlab.run import loop
from ganlab.sampling import sample

pytestmark = pytest.mark.usefixtures("float32_policy_afterwards")

TINY = ["--limit", "128", "--batch-size", "32", "--eval-every", "0", "--epochs", "1"]


@pytest.mark.parametrize("precision, compute, scaled", [("fp32", "float32", False), ("bf16", "bfloat16", False),
                                                        ("fp16", "float16", True)])
def test_precision_policies_keep_images_logits_and_losses_in_float32(precision, compute, scaled):
    config = config_for(gan_mnist, "--precision", precision)
    state = loop.make_state(config, gan_mnist.build_training)
    generator, discriminator = state.generator, state.discriminator
    assert generator.layers[0].compute_dtype == compute
    assert all(v.dtype == "float32" for v in generator.trainable_variables)  # Master weights stay float32.
    assert isinstance(state.g_optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    assert isinstance(state.d_optimizer, keras.optimizers.LossScaleOptimizer) == scaled
    images = generator(np.zeros((4, config.latent_dim), np.float32), training=False)
    assert images.dtype == "float32" and discriminator(images).dtype == "float32"
    values = tf.function(state.train_step)(tf.random.uniform((8, 28, 28, 1), -1, 1), tf.zeros((8,), "int32"))
    assert all(v.dtype == "float32" and np.isfinite(v.numpy()) for v in values.values())


@pytest.mark.slow
def test_fp16_with_loss_scaling_and_xla_train_end_to_end_on_the_cpu(tmp_path, mnist_dir):
    """The GPU code path (mixed float16, a loss-scale optimizer per network, XLA) runs here too."""
    run_dir = tmp_path / "run"
    gan_mnist.main(TINY + ["--precision", "fp16", "--xla", "--steps-per-call", "2", "--data-dir", str(mnist_dir),
                           "--out", str(run_dir)])
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["iterations"]["d_loss"]) == 4 and np.isfinite(history["iterations"]["g_loss"]).all()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["precision"], config["xla"], config["steps_per_call"]) == ("fp16", True, 2)
    samples = sample.generate(SimpleNamespace(generate=9, seed=0, samples_npz=None, label=None),
                              run_directory.RunDirectory(run_dir))
    assert samples.dtype == np.float32 and np.isfinite(samples).all()


@pytest.mark.slow  # Issue 40, 7: a minute where bf16 is emulated (AVX2 only); the GAN's bf16 runs stay fast.
def test_the_dcgan_trains_in_bf16_with_several_steps_per_call(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    dcgan_mnist.main(TINY + ["--precision", "bf16", "--steps-per-call", "3", "--data-dir", str(mnist_dir),
                             "--out", str(run_dir)])
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["iterations"]["d_loss"]) == 4  # Calls of 3 steps, then 1.


def test_auto_settings_follow_the_device(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_bf16", lambda: True)
    config = config_for(dcgan_mnist)
    assert (config.precision, config.xla, config.steps_per_call) == ("bf16", False, 1)
    monkeypatch.setattr(speed, "cpu_has_bf16", lambda: False)
    assert config_for(dcgan_mnist).precision == "fp32"
    explicit = config_for(gan_mnist, "--precision", "fp16", "--xla", "--steps-per-call", "7")
    assert (explicit.precision, explicit.xla, explicit.steps_per_call) == ("fp16", True, 7)

    gpu = SimpleNamespace(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: [gpu] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda device, on: None)  # A stand-in GPU.
    for capability, precision in (((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp32")):
        monkeypatch.setattr(tf.config.experimental, "get_device_details",
                            lambda device, c=capability: {"compute_capability": c})
        config = config_for(dcgan_mnist)
        assert (config.precision, config.xla, config.steps_per_call) == (precision, True, 20)
    # Steps per call on GPUs: a call of about 2 T multiply-adds of training, from 10 to 100.
    assert [config_for(module, *flags).steps_per_call for module, flags in (
        (gan_mnist, []), (dcgan_mnist, []), (dcgan_mnist, ["--arch", "64"]))] == [100, 20, 10]


@pytest.mark.parametrize("first, then, said", [
    ("fp16", "fp32", "The run trained in fp16 and goes on in fp32 (--precision fp32): its optimizers drop their "
                     "loss scale"),
    pytest.param("fp32", "fp16", "The run trained in fp32 and goes on in fp16 (--precision fp16): its optimizers "
                                 "gain a fresh loss scale", marks=pytest.mark.slow),
])
def test_a_checkpoint_moves_between_fp16_and_another_precision(tmp_path, mnist_dir, capsys, first, then, said):
    run_dir = tmp_path / "run"
    flags = TINY + ["--steps-per-call", "2", "--data-dir", str(mnist_dir), "--out", str(run_dir)]
    gan_mnist.main(flags + ["--precision", first])
    capsys.readouterr()
    trained = {}

    class Inspect(loop.Hooks):
        def calls(self, train_steps):  # After the restore: the optimizers' own state, read back.
            def first_call(indices):
                if not trained:
                    for name in ("g_optimizer", "d_optimizer"):
                        optimizer = getattr(state, name)
                        inner = getattr(optimizer, "inner_optimizer", optimizer)
                        trained[name] = int(inner.iterations.numpy())
                return train_steps(indices)

            return first_call

        def step(self, train_step, state_now):
            nonlocal state
            state = state_now
            return train_step

    state = None
    gan_mnist.main(flags[:-2] + ["--epochs", "2", "--resume", "--precision", then, "--out", str(run_dir)],
                   hooks=Inspect())
    assert said in capsys.readouterr().out
    assert trained == {"g_optimizer": 4, "d_optimizer": 4}  # Adam's 4 steps of epoch 1 restored, around the scale.
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history["iterations"]["d_loss"]) == 8 and np.isfinite(history["iterations"]["d_loss"]).all()
    assert json.loads((run_dir / "config.json").read_text())["precision"] == then


def test_flops_are_counted_from_the_layers():
    dense = keras.Sequential([keras.Input((100,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    assert bench.forward_flops(dense) == 2 * (100 * 256 + 256 * 10)
    conv = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(64, 5, strides=2, padding="same"),
                             keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same")])
    assert bench.forward_flops(conv) == 2 * 25 * 1 * 64 * 14 * 14 + 2 * 9 * 64 * 8 * 14 * 14
    assert bench.training_flops(10, 1) == 48 and bench.training_flops(10, 1, r1=True) == 51
    assert bench.training_flops(10, 1, g_steps=2) == 80  # D's update (16) and G's (32) twice.


@pytest.mark.slow
def test_benchmark_prints_the_table(mnist_dir, capsys):
    config = config_for(gan_mnist, "--benchmark", "--limit", "512", "--batch-sizes", "32,64", "--steps-per-call", "4")
    images = utils.load_training_images(config)
    rows = bench.benchmark(config, images, gan_mnist.build_training, min_seconds=0.1)
    output = capsys.readouterr().out
    assert [label for label, _, _ in rows] == ["plain fp32 step", "chosen settings", "chosen, batch 32",
                                               "chosen, batch 64"]
    for column in ("ms/step", "img/s", "GFLOP/img", "GFLOP/s", "peak", "of peak", "host MB"):
        assert column in output
    assert "Speedup of the chosen settings" in output
    plain = rows[0][2]
    assert plain["flops"] == bench.training_flops(2 * (100 * 256 + 256 * 512 + 512 * 1024 + 1024 * 784),
                                                  2 * (784 * 1024 + 1024 * 512 + 512 * 256 + 256))
    assert plain["seconds"] > 0 and plain["host_mb"] > 100


def test_benchmark_times_the_speedup_rows_in_alternation(monkeypatch, capsys):
    """The plain and chosen rows get extra windows taken in turn, and each keeps its fastest."""
    calls = []

    def fake_time_training(setting, data, build, min_seconds, strategy=None):
        name = "plain" if setting.steps_per_call == 1 and setting.precision == "fp32" else "chosen"
        windows = iter([0.5, 0.1, 0.7] if name == "plain" else [0.3, 0.2, 0.05])

        def window():
            calls.append(name)
            return next(windows)

        return {"seconds": 0.4 if name == "plain" else 0.25, "flops": 1e9, "host_mb": 1.0, "device_mb": None,
                "window": window}

    monkeypatch.setattr(bench, "time_training", fake_time_training)
    monkeypatch.setattr(bench, "matmul_peak", lambda precision: 100.0)
    config = config_for(gan_mnist, "--benchmark", "--limit", "64", "--batch-size", "32", "--precision", "bf16",
                        "--steps-per-call", "4")
    rows = bench.benchmark(config, (np.zeros((64, 28, 28, 1), np.uint8), np.zeros(64, np.int32)), None,
                           alternations=3)
    assert calls == ["plain", "chosen"] * 3
    assert rows[0][2]["seconds"] == 0.1 and rows[1][2]["seconds"] == 0.05  # The fastest window of each.
    assert "over the plain fp32 step: 2.00x" in capsys.readouterr().out


def test_benchmark_flags_are_checked(capsys):
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--batch-sizes", "32,x", "--benchmark"])
    assert exit_status.value.code == 2 and "--batch-sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--batch-sizes", "32"])
    assert exit_status.value.code == 2 and "only used with --benchmark" in capsys.readouterr().err
