"""One training step on one device and on two mirrored replicas, from the same weights and inputs.

    python tests/distributed_step.py gan_mnist.py [--cpu-devices N] [flags...]

Splits the CPU into N logical devices (2 by default; before TensorFlow starts, hence a process of
its own), builds the script's models twice, on the default strategy and under MirroredStrategy
over the N devices, gives both the same weights, the same batch and the same noise
(`SharedNoise`: each replica's k-th draw is its rows of the one device's k-th draw, its share as
`distribute.shares` deals them, uneven where N does not divide the batch), runs one compiled step each and
prints, as JSON, the largest absolute difference of every model's weights afterwards.
"""

import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ganlab import configurator  # noqa: E402
from ganlab.devices import distribute  # noqa: E402
from ganlab.run import calls, loop  # noqa: E402


class SharedNoise:
    """Stands in for tf.random.Generator: on one device the k-th draw is the k-th global draw; on
    replica r of N, rows r/N to (r+1)/N of it. Draws are fixed when the step is traced."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.global_draws, self.counts = [], {}

    def _draw(self, shape, make):
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        replica = int(tf.get_static_value(context.replica_id_in_sync_group)) if replicas > 1 else 0
        index = self.counts.get(replica, 0)
        self.counts[replica] = index + 1
        while len(self.global_draws) <= index:
            self.global_draws.append(make())
        start, end = distribute.shares(BATCH, replicas)[replica]
        return tf.constant(self.global_draws[index])[start:end]

    def normal(self, shape, dtype=tf.float32):
        return self._draw(shape, lambda: self.rng.standard_normal((BATCH, shape[1])).astype(np.float32))

    def uniform(self, shape, minval=0, maxval=None, dtype=tf.int32):
        return self._draw(shape, lambda: self.rng.integers(minval, maxval, (BATCH,)).astype(np.int32))


def build_and_step(module, config, strategy, weights=None):
    """Build under `strategy`, take `weights` if given, run one step; return the models' weights after it."""
    tf.random.Generator.from_seed = staticmethod(lambda seed: SharedNoise(seed))
    state = loop.make_state(config, module["build_training"], strategy)
    models = [state.generator, state.discriminator] + ([state.averaged.model] if state.averaged else [])
    if weights:
        for model, values in zip(models, weights["before"]):
            model.set_weights(values)
    before = [model.get_weights() for model in models]
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (BATCH * 2,) + tuple(IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, (BATCH * 2,), dtype=np.int32)
    steps = calls.compile_steps(state, tf.constant(images), tf.constant(labels), config, strategy)
    values = steps(np.arange(BATCH, dtype=np.int32)[None]).numpy()
    return {"before": before, "after": [model.get_weights() for model in models], "values": values}


if __name__ == "__main__":
    argv = sys.argv[2:]
    devices = int(argv[argv.index("--cpu-devices") + 1]) if "--cpu-devices" in argv else 2
    distribute.split_cpu(devices)
    script = REPO / sys.argv[1]
    module = runpy.run_path(str(script), run_name="distributed_step")
    results = {}
    for mode in ("off", "mirrored"):
        config = configurator.freeze(configurator.with_devices(configurator.parse(
            script, module, argv + ["--distribute", mode], presets=module.get("PRESETS"),
            auto_preset=module.get("default_arch"))))
        strategy = distribute.create(config)
        BATCH = config.batch_size
        side = config.image_size if config.arch else 28
        IMAGE_SHAPE = (side, side, 1)
        results[mode] = build_and_step(module, config, strategy, results.get("off"))
    one, two = results["off"], results["mirrored"]
    names = ["generator", "discriminator", "averaged_generator"]
    report = {"lr": config.lr, "replicas": config.replicas,
              "moved": {name: max(float(np.abs(a - b).max()) for a, b in zip(before, after))
                        for name, before, after in zip(names, one["before"], one["after"])},
              "difference": {name: max(float(np.abs(a - b).max()) for a, b in zip(x, y))
                             for name, x, y in zip(names, one["after"], two["after"])},
              "metrics_difference": float(np.abs(one["values"] - two["values"]).max())}
    print(json.dumps(report))
