"""The CUDA path, checked without a GPU: TensorFlow's kernel registry against the graph of the compiled
training call, and stand-ins for what a GPU box shows (a fake nvidia-smi, fake device details)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
import gpu_kernels  # noqa: E402


@pytest.mark.parametrize("mode, script, flags", [
    ("off", "dcgan_mnist.py", ["--precision", "fp32"]),
    ("off", "dcgan_mnist.py", ["--precision", "bf16", "--conditional"]),
    ("off", "gan_mnist.py", ["--precision", "fp16", "--r1", "1"]),
    ("mirrored", "dcgan_mnist.py", ["--precision", "fp16"]),
    ("mirrored", "gan_mnist.py", ["--precision", "bf16", "--conditional"]),
    ("multi-worker", "dcgan_mnist.py", ["--precision", "bf16"]),
])
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
