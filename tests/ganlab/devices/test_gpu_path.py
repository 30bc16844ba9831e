"""The CUDA path, checked without a GPU: TensorFlow's kernel registry against the graph of the compiled
training call, and stand-ins for what a GPU box shows (a fake nvidia-smi, fake device details)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

import gan_mnist
from conftest import REPO, parsed, run_script
from ganlab import bench, configurator, errors, models
from ganlab.devices import distribute, speed
from ganlab.run import loop
from ganlab.run.directory import RunDirectory

sys.path.insert(0, str(REPO / "tests"))
import gpu_kernels  # noqa: E402


@pytest.mark.parametrize("mode, script, flags", [
    ("off", "dcgan_mnist.py", ["--precision", "fp32"]),
    ("off", "dcgan_mnist.py", ["--precision", "bf16", "--conditional"]),
    ("off", "gan_mnist.py", ["--precision", "fp16", "--r1", "1"]),
    ("off", "dcgan_mnist.py", ["--precision", "bf16", "--augment", "color,translation,cutout"]),
    ("mirrored", "dcgan_mnist.py", ["--precision", "fp16"]),
    ("mirrored", "gan_mnist.py", ["--precision", "bf16", "--conditional"]),
    ("multi-worker", "dcgan_mnist.py", ["--precision", "bf16"]),
])
@pytest.mark.slow
def test_every_op_of_the_training_call_has_a_gpu_kernel(mode, script, flags):
    result = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_kernels.py"), mode, script, *flags],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ops"] > 1000  # The whole call was walked: the loop, each replica's step, the gradients.
    assert report["missing"] == [], report["missing"]
    assert set(report["host_by_design"]) <= set(gpu_kernels.HOST_BY_DESIGN)


def test_the_kernel_check_finds_a_uint8_gather_that_has_no_gpu_kernel():
    """What the training call did before: GatherV2 on the uint8 dataset, which only the CPU can run."""
    dataset = tf.constant(np.zeros((10, 28, 28, 1), np.uint8))
    variable = tf.Variable(dataset)
    before = tf.function(lambda indices: tf.gather(dataset, indices))
    after = tf.function(lambda indices: variable.sparse_read(indices))
    spec = tf.TensorSpec((None,), tf.int32)
    missing = gpu_kernels.check(before.get_concrete_function(spec).graph.as_graph_def())["missing"]
    assert len(missing) == 1 and missing[0].startswith("GatherV2") and '"uint8"' in missing[0]
    assert gpu_kernels.check(after.get_concrete_function(spec).graph.as_graph_def())["missing"] == []


# ------------------------------------------------------------------------------------------------
# A GPU box whose TensorFlow cannot use its GPUs: a stand-in nvidia-smi on PATH
# ------------------------------------------------------------------------------------------------

FAKE_NVIDIA_SMI = """#!/bin/sh
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-66666666-2222-3333-4444-555555555555)"
"""


def run_with_nvidia_smi(tmp_path, mnist_dir, flags=(), only=False, **env):
    """gan_mnist.py on a stand-in box of two H100s (a fake nvidia-smi); `only`: `flags` alone, else after a
    short run's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    environment = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    short = [] if only else ["--epochs", "1", "--limit", "64", "--batch-size", "32", "--eval-every", "0",
                             "--data-dir", str(mnist_dir)]
    return subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), *short, *flags, "--out", str(tmp_path / "run")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment, timeout=900,
                          cwd=REPO)


@pytest.mark.slow
def test_gpus_that_tensorflow_cannot_use_stop_training_in_one_line_unless_the_cpu_is_asked_for(tmp_path, mnist_dir):
    result = run_with_nvidia_smi(tmp_path, mnist_dir)
    assert result.returncode == 2 and result.stdout.count("\n") == 1, result.stdout[-3000:]
    line = result.stdout.strip()
    assert line.startswith("gan_mnist.py: error: this machine has 2 NVIDIA GPUs (GPU 0: NVIDIA H100 80GB HBM3, ...) "
                           "but TensorFlow")
    # TensorFlow's own reason (here: no CUDA driver on this machine), the fix in requirements.txt's range, the way on.
    assert "cuda" in line.lower() and 'Fix: pip install "tensorflow[and-cuda]>=2.16,<3"; or train on the CPU ' \
                                      "anyway with --cpu" in line
    assert not (tmp_path / "run").exists()
    on_cpu = run_with_nvidia_smi(tmp_path, mnist_dir, flags=["--cpu"])
    assert on_cpu.returncode == 0, on_cpu.stdout[-3000:]
    assert on_cpu.stdout.startswith("TensorFlow ") and "on the CPU (no GPU found)" in on_cpu.stdout.splitlines()[0]
    sampled = run_with_nvidia_smi(tmp_path, mnist_dir, flags=["--generate", "4"], only=True)
    assert sampled.returncode == 0, sampled.stdout[-3000:]
    assert sampled.stdout.startswith("gan_mnist.py: warning: this machine has 2 NVIDIA GPUs")
    assert "it samples on the CPU" in sampled.stdout.splitlines()[0]


@pytest.mark.slow
def test_gpus_hidden_on_purpose_or_absent_give_no_warning(tmp_path, mnist_dir):
    hidden = run_with_nvidia_smi(tmp_path, mnist_dir, CUDA_VISIBLE_DEVICES="-1")
    assert hidden.returncode == 0 and "warning" not in hidden.stdout
    assert errors.unusable_gpus() is None  # This machine: no NVIDIA GPU, so no line.


# ------------------------------------------------------------------------------------------------
# Stand-ins for a box of GPUs: its devices, their details, TensorFlow's build
# ------------------------------------------------------------------------------------------------


def fake_gpus(monkeypatch, count):
    """`count` stand-in GPUs, and a record of what was asked of them."""
    devices = [tf.config.PhysicalDevice(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(count)]
    asked = {"visible": None, "growth": []}
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: devices if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda used, kind=None: asked.update(visible=list(used)))
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda device, on: asked["growth"].append((device.name, on)))
    return devices, asked


def test_sampling_takes_one_gpu_with_its_memory_growing(monkeypatch, tmp_path):
    devices, asked = fake_gpus(monkeypatch, 8)
    with pytest.raises(ValueError):  # No trained run there: what matters is what was taken before.
        gan_mnist.main(["--generate", "4", "--out", str(tmp_path / "none")])
    assert asked["visible"] == devices[:1] and asked["growth"] == [("/physical_device:GPU:0", True)]


def test_the_remapper_is_switched_off_on_the_cpu_only(monkeypatch, float32_policy_afterwards):
    config = configurator.freeze(configurator.with_devices(parsed(gan_mnist, "--no-xla")))
    loop.make_state(config, gan_mnist.build_training)
    assert tf.config.optimizer.get_experimental_options().get("remapping") is False  # The CPU's workaround.
    tf.config.optimizer.set_experimental_options({"remapping": True})
    fake_gpus(monkeypatch, 1)
    loop.make_state(config, gan_mnist.build_training)
    assert tf.config.optimizer.get_experimental_options().get("remapping") is not False  # Kept for GPUs' fusions.


def test_one_device_takes_one_gpu_and_every_gpu_used_grows_its_memory(monkeypatch):
    devices, asked = fake_gpus(monkeypatch, 4)
    distribute.use_gpus("off")
    assert asked["visible"] == devices[:1] and asked["growth"] == [("/physical_device:GPU:0", True)]
    devices, asked = fake_gpus(monkeypatch, 4)
    distribute.use_gpus("mirrored")
    assert asked["visible"] is None and asked["growth"] == [(f"/physical_device:GPU:{i}", True) for i in range(4)]


def test_a_gpu_newer_than_the_wheels_machine_code_is_named():
    build = tf.sysconfig.get_build_info()  # TensorFlow 2.21: sm_60 ... sm_89, and compute_90 (PTX).
    newest = max(int(code[3:]) for code in build["cuda_compute_capabilities"] if code.startswith("sm_"))
    line = distribute.newer_than_the_wheel({"device_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0)},
                                           {"cuda_compute_capabilities": ["sm_60", "sm_70", "sm_80", "sm_89",
                                                                          "compute_90"]})
    assert line.startswith("NVIDIA H100 80GB HBM3 (compute capability 9.0) is newer than TensorFlow")
    assert "(up to 8.9)" in line and "PTX" in line
    assert distribute.newer_than_the_wheel({"compute_capability": (8, 9)}, build) is None or newest < 89
    assert distribute.newer_than_the_wheel({"compute_capability": (7, 0)}, build) is None
    assert distribute.newer_than_the_wheel({"compute_capability": divmod(newest, 10)}, build) is None


# ------------------------------------------------------------------------------------------------
# Precision: fp16's R1 gradient loss-scaled, fp32 without TF32
# ------------------------------------------------------------------------------------------------


def small_discriminator(policy, weights=None):
    keras.mixed_precision.set_global_policy(policy)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 5, strides=2, padding="same"),
                              keras.layers.LeakyReLU(0.2), keras.layers.Flatten(),
                              keras.layers.Dense(1, dtype="float32")])
    if weights:
        model.set_weights(weights)
    return model


def test_the_r1_gradient_is_loss_scaled_under_fp16(float32_policy_afterwards):
    """A smooth D (input gradients of ~1e-8, below float16's smallest subnormal, 6e-8): the unscaled
    float16 gradient underflows to zero; scaled by the loss scale (2**15) it matches float32's R1."""
    rng = np.random.default_rng(0)
    reference = small_discriminator("float32")
    weights = [rng.standard_normal(w.shape).astype(np.float32) * scale
               for w, scale in zip(reference.get_weights(), (1e-2, 0.0, 1e-7, 0.0))]
    reference.set_weights(weights)
    half = small_discriminator("mixed_float16", weights)
    optimizer = models.make_optimizer(SimpleNamespace(lr=1e-3, beta1=0.5, beta2=0.999, precision="fp16"),
                                   half.trainable_variables)
    images = tf.constant(rng.uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32))
    exact = float(models.logits_and_r1_penalty(reference, images, 1.0)[1])
    scaled = float(models.logits_and_r1_penalty(half, images, 1.0, optimizer)[1])
    unscaled = float(models.logits_and_r1_penalty(half, images, 1.0)[1])
    assert exact > 0 and abs(scaled - exact) < 0.01 * exact, (scaled, exact)
    assert abs(unscaled - exact) > 0.5 * exact  # What it was: underflowed (zero here).


def test_fp32_turns_tf32_off_and_the_mixed_policies_leave_it_on(float32_policy_afterwards):
    speed.set_precision("fp32")
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
    speed.set_precision("bf16")
    assert tf.config.experimental.tensor_float_32_execution_enabled()


@pytest.mark.slow
def test_deterministic_is_saved_and_kept_on_resume(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    result = run_script("gan_mnist.py", "--epochs", "1", "--limit", "64", "--batch-size", "32", "--eval-every", "0",
                        "--deterministic", "--data-dir", str(mnist_dir), "--out", str(run_dir))  # A process of its
    assert result.returncode == 0, result.stderr[-3000:]  # own: op determinism stays on once turned on.
    assert json.loads((run_dir / "config.json").read_text())["deterministic"] is True
    values = parsed(gan_mnist, "--resume", "--epochs", "2", "--out", str(run_dir))
    assert values["deterministic"] is False  # Not given again on the command line,
    run = RunDirectory(run_dir)
    assert configurator.saved_settings(run, run.read_config(), values)["deterministic"] is True  # but kept from the run.


def test_the_benchmark_peak_is_sized_for_the_device_and_names_its_compute_type(monkeypatch, float32_policy_afterwards):
    assert bench.peak_sides()[0] == (1024, 2048, 4096) and speed.compute_type("fp32") == "fp32"  # The CPU here.
    fake_gpus(monkeypatch, 1)
    assert bench.peak_sides()[0] == (4096, 8192)
    tf.config.experimental.enable_tensor_float_32_execution(True)  # TensorFlow's default on a GPU:
    assert speed.compute_type("fp32") == "tf32"  # a float32 matmul is TF32 there, and the row says so.
    speed.set_precision("fp32")
    assert speed.compute_type("fp32") == "fp32" and speed.compute_type("bf16") == "bf16"


def test_tensorboard_gets_one_point_per_call_and_the_history_every_step(tmp_path, mnist_dir, float32_policy_afterwards):
    run_dir = tmp_path / "run"
    gan_mnist.main(["--epochs", "1", "--limit", "64", "--batch-size", "16", "--steps-per-call", "3", "--eval-every",
                    "0", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    losses = json.loads((run_dir / "history.json").read_text())["iterations"]["d_loss"]
    assert len(losses) == 4  # Calls of 3 steps, then 1.
    points = {}
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                if value.tag == "iteration/d_loss":
                    points[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(points) == [3, 4]
    assert points[3] == pytest.approx(np.mean(losses[:3]), rel=1e-6) and points[4] == pytest.approx(losses[3])


def test_the_peak_times_matmuls_alone_so_no_training_step_can_pass_it():
    """Issue 40, 6: the old peak scaled between its matmuls, an elementwise op a training step's matmuls
    need not wait for; the chain now holds matmuls only (its matrix is scaled once, before)."""
    matrix = tf.random.normal((64, 64), stddev=64 ** -0.5, seed=0)
    chained = bench.matmul_chain(matrix, 3)
    graph = chained.get_concrete_function(tf.TensorSpec((64, 64), tf.float32)).graph
    kinds = [op.type for op in graph.get_operations() if op.type not in ("Placeholder", "Const", "Identity", "NoOp")]
    assert kinds.count("MatMul") == 3 and set(kinds) == {"MatMul", "StridedSlice"}, kinds
    assert abs(float(chained(matrix))) < 10  # Scaled by 1/sqrt(side), the chain stays finite.
