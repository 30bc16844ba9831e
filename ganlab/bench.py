"""The benchmark (--benchmark): training steps timed at steady state, against the machine's matmul peak.

    python dcgan_mnist.py --benchmark                       # the default preset, default settings
    python dcgan_mnist.py --arch 64 --benchmark --batch-sizes 32,64,128

Rows: a plain fp32 step (one step per call, no XLA), the chosen settings (speed.py), and the
chosen settings at each of --batch-sizes; columns: ms/step, images/s, the FLOPs of one image's
share of a step (counted from the layers), the GFLOP/s that makes, a large matmul's GFLOP/s in the
same precision measured in the same run, the fraction of it reached, and peak memory.
"""

import contextlib
import dataclasses
import os
import re
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import utils
from ganlab.devices import distribute, speed
from ganlab.run import calls, loop


def forward_flops(model):
    """Multiply-add FLOPs (2 per multiply-add) of one image's forward pass, counted from the layers.

    Dense: 2 * inputs * units. Conv2D: 2 * k * k * C_in * C_out per output pixel. Conv2DTranspose:
    2 * k * k * C_in * C_out per input pixel (each input pixel is spread over a k x k patch).
    Batch norm, activations and the like are not counted; they are small beside these.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # A conditional model wraps its body.
            total += forward_flops(layer)
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
        elif isinstance(layer, keras.layers.Conv2DTranspose):
            k_h, k_w = layer.kernel_size
            total += 2 * k_h * k_w * layer.input.shape[-1] * layer.filters * layer.input.shape[1] * layer.input.shape[2]
        elif isinstance(layer, keras.layers.Conv2D):
            k_h, k_w = layer.kernel_size
            total += 2 * k_h * k_w * layer.input.shape[-1] * layer.filters * layer.output.shape[1] * layer.output.shape[2]
    return total


def training_flops(generator_flops, discriminator_flops, r1=False, g_steps=1):
    """FLOPs of one image's share of a training step, with backward passes at twice the forward.

    D update: G forward, D forward on a real and a fake image, D backward on both: G + 6 D.
    G update: G forward, D forward, D backward to its input only (about 1 D), G backward: 3 G + 2 D.
    With the R1 penalty, D's gradient at the real image (about 1 D) is itself differentiated
    (about 2 D more): 3 D. With --g-steps n, G's update happens n times.
    """
    d_update = generator_flops + (6 + (3 if r1 else 0)) * discriminator_flops
    g_update = 3 * generator_flops + 2 * discriminator_flops
    return d_update + g_steps * g_update


def peak_sides():
    """The sides of the peak's square matmuls, the best of which is the peak, and the multiply-adds each
    timed call does: 4096 and 8192 on a GPU (smaller ones leave a large GPU mostly idle), 1024 to
    4096 on the CPU, whose best size varies with its caches and cores."""
    return ((4096, 8192), 8 * 8192 ** 3) if distribute.gpus() else ((1024, 2048, 4096), 8 * 2048 ** 3)


def matmul_chain(matrix, count):
    """A compiled function of x: x times `matrix`, `count` times, and nothing between the matmuls; it
    returns one element, so that a call's clock waits for the device without copying a matrix."""

    @tf.function
    def chained(x):
        for _ in range(count):
            x = tf.matmul(x, matrix)
        return x[0, 0]

    return chained


def matmul_peak(precision, seconds=1.0):
    """Measured GFLOP/s of large square matmuls in `precision`'s compute type (TF32 as `speed.set_precision`
    leaves it): the best over `peak_sides`, each side's call timed as often as fits in `seconds`
    (at least three times), its fastest call kept.

    Timed on the device: each call chains matmuls and returns one number, so the clock waits for
    the device without copying the matrix to the host. The matrix is scaled by 1/sqrt(side), so
    the chain stays finite without an elementwise op between the matmuls: the peak is of matmuls
    alone, which a training step, whose other ops only add time, should not pass.
    """
    dtype = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}[precision]
    sides, multiply_adds = peak_sides()
    best_rate = 0.0
    for side in sides:
        chain = max(1, round(multiply_adds / side ** 3))
        a = tf.cast(tf.random.normal((side, side), stddev=side ** -0.5, seed=0), dtype)
        chained = matmul_chain(a, chain)
        float(chained(a))  # Traced, and the first call's setup paid.
        best, spent, calls = float("inf"), 0.0, 0
        while calls < 3 or spent < seconds:
            start = time.perf_counter()
            float(chained(a))
            elapsed = time.perf_counter() - start
            best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
        best_rate = max(best_rate, 2 * side ** 3 * chain / best / 1e9)
    return best_rate


def _reset_peak_memory():
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS count (VmHWM).
    for gpu in distribute.gpus():
        tf.config.experimental.reset_memory_stats(gpu.name.replace("/physical_device:", ""))


def _peak_memory_mb():
    """Peak host RSS since the last reset, and the peak GPU memory (None without a GPU), in MB."""
    try:
        status = Path("/proc/self/status").read_text()
        host = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    except (OSError, AttributeError):
        import resource

        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpus = distribute.gpus()
    device = (tf.config.experimental.get_memory_info(gpus[0].name.replace("/physical_device:", ""))["peak"]
              / 2**20 if gpus else None)
    return host, device


def time_training(config, data, build_training, min_seconds=6.0, min_steps=2, strategy=None):
    """Steady-state seconds per step (and peak memory) of the training step under `config`'s settings.

    The result also holds "window": a function that times one more window and returns its seconds
    per step, so that two settings can be timed in alternation (see `benchmark`).
    """
    _reset_peak_memory()
    images, labels = data
    state = loop.make_state(config, build_training, strategy)
    train_steps = calls.compile_steps(state, images, labels, config, strategy)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(images), (config.steps_per_call, config.batch_size)).astype(np.int32)
               for _ in range(4)]
    for indices in batches[:2]:  # Warm-up: the first call traces and compiles.
        train_steps(indices).numpy()

    def window():
        steps, start = 0, time.perf_counter()
        while steps < min_steps or time.perf_counter() - start < min_seconds / 3:
            train_steps(batches[steps // config.steps_per_call % len(batches)]).numpy()
            steps += config.steps_per_call
        return (time.perf_counter() - start) / steps

    # Three timing windows; the fastest is the steady state (the others caught the machine busy).
    seconds = min(window() for _ in range(3))
    flops = training_flops(forward_flops(state.generator), forward_flops(state.discriminator),
                           r1=config.r1 > 0, g_steps=config.g_steps)
    host, device = _peak_memory_mb()
    return {"seconds": seconds, "flops": flops, "host_mb": host, "device_mb": device, "window": window}


def benchmark(config, data, build_training, min_seconds=6.0, alternations=3, strategy=None):
    """Time training steps at steady state and print them against the matmul peak and a plain fp32 step.

    Rows: a plain fp32 step (one step per call, no XLA), the chosen settings, and the chosen
    settings at each of `config.batch_sizes`; under a `strategy` of several replicas, also the
    chosen settings on one device, for the scaling. Every figure is measured in this run; the first
    two rows, whose ratio is the speedup, get `alternations` more windows each, taken in turn.
    """
    images, labels = data
    devices = [d.name for d in distribute.gpus()] or ["CPU"]
    print(f"Benchmark of {config.script}"
          + (f" --arch {config.arch}" if config.arch else "")
          + f" on {', '.join(devices)} ({os.cpu_count()} CPU cores), TensorFlow {tf.__version__}; "
            f"real {config.dataset} batches from {len(images)} images")
    data = (tf.constant(images), tf.constant(labels))
    plain = dataclasses.replace(config, precision="fp32", xla=False, steps_per_call=1)
    settings = [("plain fp32 step", plain, strategy), ("chosen settings", config, strategy)]
    for batch_size in config.batch_sizes or []:
        settings.append((f"chosen, batch {batch_size}", dataclasses.replace(config, batch_size=batch_size), strategy))
    replicas = config.replicas
    if replicas > 1:
        settings.append(("chosen, one device", config, None))
    peaks = {}
    rows = []
    for label, setting, on in settings:
        if setting.batch_size > len(images):
            print(f"  (skipping batch {setting.batch_size}: larger than the {len(images)} images)")
            continue
        result = time_training(setting, data, build_training, min_seconds, strategy=on)
        if setting.precision not in peaks:
            speed.set_precision(setting.precision)  # TF32 as the row trained with it (off for fp32).
            peaks[setting.precision] = (speed.compute_type(setting.precision), matmul_peak(setting.precision))
        rows.append((label, setting, result))
        if len(rows) == 2:
            # The speedup compares these two rows. Timed one after the other, a slow spell of the
            # machine during either moves it by 10% or more; so both are timed again in alternating
            # windows, and each keeps its fastest window. Their window functions (which hold the
            # models) go afterwards, so that a --batch-sizes row's memory does not count them.
            for _ in range(alternations):
                for _, _, timed in rows:
                    timed["seconds"] = min(timed["seconds"], timed["window"]())
        if len(rows) >= 2:
            for _, _, timed in rows:
                timed.pop("window", None)
    speed.set_precision("fp32")

    header = (f"{'setting':<22} {'precision':>9} {'XLA':>4} {'K':>3} {'batch':>5} {'ms/step':>8} {'img/s':>8} "
              f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'peak':>7} {'of peak':>7} {'host MB':>8}")
    if distribute.gpus():
        header += f" {'GPU MB':>7}"
    print(header)
    for label, setting, result in rows:
        images_per_second = setting.batch_size / result["seconds"]
        achieved = result["flops"] * images_per_second / 1e9
        compute, peak = peaks[setting.precision]
        line = (f"{label:<22} {compute:>9} {'on' if setting.xla else 'off':>4} {setting.steps_per_call:>3} "
                f"{setting.batch_size:>5} {result['seconds'] * 1000:>8.2f} {images_per_second:>8.0f} "
                f"{result['flops'] / 1e9:>9.3f} {achieved:>8.1f} {peak:>7.0f} {achieved / peak:>7.0%} "
                f"{result['host_mb']:>8.0f}")
        if result["device_mb"] is not None:
            line += f" {result['device_mb']:>7.0f}"
        print(line)
    speedup = rows[0][2]["seconds"] / rows[1][2]["seconds"]
    print(f"Speedup of the chosen settings ({config.precision}, XLA {'on' if config.xla else 'off'}, "
          f"{utils.counted(config.steps_per_call, 'step')} per call) over the plain fp32 step: {speedup:.2f}x")
    if replicas > 1:
        scaling = rows[-1][2]["seconds"] / rows[1][2]["seconds"]
        print(f"Scaling over {replicas} replicas ({distribute.describe(config)}) against one device: {scaling:.2f}x "
              f"({scaling / replicas:.0%} per replica)")
    print("precision: what matmuls compute in (fp32 is true fp32: TF32 off); peak: large matmuls' GFLOP/s in that "
          "precision, timed on the device in this run; GFLOP/img counts one image's share of a D and a G update "
          "(bench.training_flops); host MB: peak RSS while timing.")
    return rows
