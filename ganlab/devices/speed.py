"""The speed settings: precision policy, XLA and training steps per compiled call (their flags: flags.py).

`--precision auto`, `--xla` unset and `--steps-per-call 0` pick what measured fastest on the device
at hand (`choose`); bench.py measures them.
"""

from pathlib import Path

import keras
import tensorflow as tf

from ganlab.devices import distribute
from ganlab.flags import GPU_CALL_MULTIPLY_ADDS

PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def cpu_has_bf16():
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose(values, default_steps_per_call):
    """--precision auto, --xla and --steps-per-call 0 made what measured fastest on this device: a dict of
    the three, from `values` (the settings being resolved: these flags, `replicas`, `resume`, `out`).

    On this project's 2-core CPU (AVX512-BF16), bf16 ran the DCGAN step 1.3x faster than fp32 and
    XLA ran it 1.5x slower; on GPUs, XLA and several steps per call remove per-step overhead, and
    bf16 (compute capability 8+) or fp16 with loss scaling (7.x) use the tensor cores. A preset
    with `bf16_on_cpu` False keeps fp32 on the CPU, where bf16 measured slower for it. A resumed run
    takes this machine's precision too: its checkpoint moves between fp16 and the others
    (`checkpoint.Checkpoint` restores around the loss scale).
    """
    gpus = distribute.gpus()
    precision, xla, replicas = values["precision"], values["xla"], values["replicas"]
    if precision == "auto":
        if gpus:
            capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
            precision = "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"
        else:
            precision = "bf16" if cpu_has_bf16() and values["bf16_on_cpu"] else "fp32"
    if xla is None:
        xla = bool(gpus) and replicas == 1
    elif xla and replicas > 1:  # See --help: XLA inside strategy.run is GPU-only and untried.
        print(f"--xla ignored over the {replicas} replicas of --distribute: TensorFlow compiles a replica's "
              f"step with XLA only when every device is a GPU, a path not yet checked here")
        xla = False
    steps_per_call = values["steps_per_call"] or (
        gpu_steps_per_call(values["step_multiply_adds"], replicas) if gpus else default_steps_per_call)
    return dict(precision=precision, xla=xla, steps_per_call=steps_per_call)


def gpu_steps_per_call(step_multiply_adds, replicas=1):
    """--steps-per-call 0 on GPUs: enough steps that a call holds GPU_CALL_MULTIPLY_ADDS of training on each
    GPU (a step's training ~9 times its forward passes), from 10 to 100 (10 when the model's work is unknown)."""
    per_step = 9 * step_multiply_adds / replicas
    return int(min(100, max(10, -(-GPU_CALL_MULTIPLY_ADDS // per_step)))) if per_step else 10


def set_precision(precision):
    """Make Keras build the next models in `precision` (variables stay float32 under mixed policies).

    fp32 is fp32: TensorFlow's default of TF32 for float32 matmuls and convolutions on GPUs of
    compute capability 8+ (10 mantissa bits, not 23) is turned off; the mixed policies keep it.
    """
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[precision])
    tf.config.experimental.enable_tensor_float_32_execution(precision != "fp32")


def compute_type(precision):
    """What the matmuls of `precision` compute in, as a benchmark row names it: fp32, tf32, bf16 or fp16."""
    if precision == "fp32" and distribute.gpus() and tf.config.experimental.tensor_float_32_execution_enabled():
        return "tf32"
    return precision
