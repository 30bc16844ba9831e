"""The cross-replica collectives of one mirrored training step, counted as the compiled call is traced.

    python tests/collectives.py SCRIPT [--cpu-devices N] [flags...]

Splits the CPU into N logical devices (2 by default; before TensorFlow starts, hence a process of
its own), traces SCRIPT's compiled training call under MirroredStrategy over them, and prints, as
JSON, what replica 0's step asked of the other replicas: `all_reduce` calls (each one collective,
a list of tensors batched into one), `merge_call`s that are not an all-reduce (each a sync point
of every replica, and whatever it copies between devices), and their sum per step.
"""

import json
import runpy
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.distribute import distribute_lib  # noqa: E402

from ganlab import configurator  # noqa: E402
from ganlab.devices import distribute  # noqa: E402
from ganlab.run import calls, loop  # noqa: E402

COUNTS = {"all_reduce": 0, "merge_call": 0}
_nesting = threading.local()  # Each replica's step is traced in a thread of its own.


def _on_replica_zero():
    context = tf.distribute.get_replica_context()
    return context is not None and tf.get_static_value(context.replica_id_in_sync_group) == 0


def _counting(kind, original):
    """`original` (ReplicaContext.all_reduce or .merge_call), counting replica 0's outermost calls."""

    def counted(self, *args, **kwargs):
        depth = getattr(_nesting, "depth", 0)
        if depth == 0 and _on_replica_zero():
            COUNTS[kind] += 1
        _nesting.depth = depth + 1  # An all-reduce's own merge_call is part of it.
        try:
            return original(self, *args, **kwargs)
        finally:
            _nesting.depth = depth

    return counted


def count(script, argv):
    module = runpy.run_path(str(REPO / script), run_name="collectives")
    values = configurator.parse(REPO / script, module, argv + ["--distribute", "mirrored", "--no-xla",
                                                                "--steps-per-call", "1"],
                                presets=module.get("PRESETS"), auto_preset=module.get("default_arch"))
    config = configurator.freeze(configurator.with_devices(values))
    strategy = distribute.create(config)
    state = loop.make_state(config, module["build_training"], strategy)
    side = config.data_shape[0]
    images = np.zeros((config.batch_size * 2, side, side, config.data_shape[-1]), np.uint8)
    labels = np.zeros((config.batch_size * 2,), np.int32)
    steps = calls.compile_steps(state, images, labels, config, strategy)
    distribute_lib.ReplicaContext.all_reduce = _counting("all_reduce", distribute_lib.ReplicaContext.all_reduce)
    distribute_lib.ReplicaContext.merge_call = _counting("merge_call", distribute_lib.ReplicaContext.merge_call)
    steps.get_concrete_function()  # One step traced (the loop body holds one).
    return dict(COUNTS, per_step=COUNTS["all_reduce"] + COUNTS["merge_call"], replicas=config.replicas)


if __name__ == "__main__":
    script, *flags = sys.argv[1:]
    devices = 2
    if "--cpu-devices" in flags:
        devices = int(flags[flags.index("--cpu-devices") + 1])
    distribute.split_cpu(devices)
    print(json.dumps(count(script, [f for f in flags])))
