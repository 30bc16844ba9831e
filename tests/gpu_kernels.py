"""Every op of the compiled training call, checked against TensorFlow's kernel registry for a GPU kernel.

    python tests/gpu_kernels.py off|mirrored|multi-worker SCRIPT [flags...]

Builds SCRIPT's training step as training does (one device, MirroredStrategy over two logical CPU
devices, or MultiWorkerMirroredStrategy), traces the compiled K-step call with XLA off, walks
every node of its graph and of the functions it calls (the loop body, each replica's step, the
gradients), and looks each op up in `tensorflow.python.framework.kernels`: an op passes if a GPU
(or device-agnostic DEFAULT) kernel accepts every one of its type attributes. An op that has
none would run on the host, and every tensor it reads or writes would cross the PCIe bus each
step. Prints, as JSON, the ops that pass only because they are on `HOST_BY_DESIGN`, and those
that fail.

Runs in a process of its own: the CPU must be split before TensorFlow starts.
"""

import json
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.framework import kernels  # noqa: E402

from ganlab import configurator  # noqa: E402
from ganlab.devices import distribute  # noqa: E402
from ganlab.run import calls, loop  # noqa: E402

# Ops that TensorFlow keeps on the host by design, whatever the device, each with its reason. None
# is needed today: every op of the training call has a GPU kernel for its types. (The shapes and
# loop counters that GPU kernels keep in host memory are those kernels' own business, not an op
# without a GPU kernel.)
HOST_BY_DESIGN = {}


def gpu_kernel_types(op_type):
    """The type constraints of every GPU or DEFAULT kernel of `op_type`: a list of {attr: allowed types}."""
    return [{c.name: set(c.allowed_values.list.type) for c in kernel.constraint}
            for kernel in kernels.get_registered_kernels_for_op(op_type).kernel
            if kernel.device_type in ("GPU", "DEFAULT")]


def node_types(node):
    """A node's type attributes: {attr: [types]}."""
    types = {}
    for name, value in node.attr.items():
        if value.WhichOneof("value") == "type":
            types[name] = [value.type]
        elif value.WhichOneof("value") == "list" and value.list.type:
            types[name] = list(value.list.type)
    return types


def has_gpu_kernel(node, function_names):
    if node.op in function_names:  # A call of a function of the library: its body is checked on its own.
        return True
    for constraints in gpu_kernel_types(node.op):
        if all(all(t in constraints[name] for t in node_types(node).get(name, [])) for name in constraints):
            return True
    return False


def check(graph_def):
    """{"host_by_design": sorted op types, "missing": [(op, {attr: type names}), ...]} of a GraphDef."""
    function_names = {f.signature.name for f in graph_def.library.function}
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    host, missing = set(), {}
    for node in nodes:
        if has_gpu_kernel(node, function_names):
            continue
        if node.op in HOST_BY_DESIGN:
            host.add(node.op)
            continue
        types = {name: [tf.dtypes.as_dtype(t).name for t in values] for name, values in node_types(node).items()}
        missing[f"{node.op} {json.dumps(types, sort_keys=True)}"] = node.name
    return {"host_by_design": sorted(host), "missing": sorted(missing),
            "ops": len(nodes)}


def traced_call(script, mode, argv):
    """The GraphDef of SCRIPT's compiled training call under --distribute `mode`, XLA off."""
    module = runpy.run_path(str(REPO / script), run_name="gpu_kernels")
    values = configurator.parse(REPO / script, module, argv + ["--distribute", "off" if mode == "off" else "mirrored",
                                                                "--no-xla"],
                                presets=module.get("PRESETS"), auto_preset=module.get("default_arch"))
    if mode == "multi-worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # No TF_CONFIG: one worker, its collectives.
        config = configurator.freeze(configurator.with_devices(values) | dict(
            distribute=mode, replicas=strategy.num_replicas_in_sync))
    else:
        config = configurator.freeze(configurator.with_devices(values))
        strategy = distribute.create(config)
    state = loop.make_state(config, module["build_training"], strategy)
    side = config.image_size if config.arch else 28
    images = np.zeros((config.batch_size * 2, side, side, 1), np.uint8)
    labels = np.zeros((config.batch_size * 2,), np.int32)
    steps = calls.compile_steps(state, images, labels, config, strategy)
    return steps.get_concrete_function().graph.as_graph_def()


if __name__ == "__main__":
    mode, script, *flags = sys.argv[1:]
    if mode == "mirrored":
        distribute.split_cpu(2)
    print(json.dumps(check(traced_call(script, mode, flags))))
