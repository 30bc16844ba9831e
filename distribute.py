"""Training on several devices with TensorFlow's own engine, tf.distribute: the --distribute setting.

auto: MirroredStrategy over every visible GPU when there are two or more (CUDA_VISIBLE_DEVICES
picks them), else the single device as before (tf.distribute's default strategy, which changes
nothing). `mirrored` mirrors over the GPUs, or on a machine without any over the CPU's logical
devices: `--cpu-devices N` splits the CPU into N of them before TensorFlow starts, so that the
multi-device path can be tried, and tested, anywhere.

Under a strategy the recipe stays the one of a single device: --batch-size is the global batch,
each of the N replicas takes batch/N of it, the replicas' gradients are summed (so each replica's
loss is its share of the global mean, `gan.global_mean`), batch norm is synchronized across
replicas, and each replica draws its own noise.
"""

import os

import tensorflow as tf

from errors import UsageError


def add_flags(parser):
    """The device flags."""
    devices = parser.add_argument_group("devices")
    devices.add_argument("--distribute", choices=("auto", "off", "mirrored"), default="auto",
                         help="auto: mirror over every visible GPU when there are two or more, else one device; "
                              "off: one device; mirrored: every GPU, or without GPUs the CPU's logical devices "
                              "(see --cpu-devices) (default: auto)")
    devices.add_argument("--cpu-devices", metavar="N", type=int, default=0,
                         help="split the CPU into N logical devices, for --distribute mirrored on a machine "
                              "without GPUs (default: 0, the CPU as one device)")
    return devices


def check_flags(config):
    if config.cpu_devices < 0 or config.cpu_devices > 64:
        raise UsageError(f"argument --cpu-devices: must be from 0 to 64, got {config.cpu_devices}")
    config.replicas = 1  # Until `resolve` picks the strategy.


def split_cpu(count):
    """Make the CPU appear as `count` logical devices; must run before TensorFlow initialises its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # Already initialised (a second run in one process): keep what is there.
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UsageError(f"argument --cpu-devices: TensorFlow has already started with "
                             f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s) in this process") from None


def resolve(config):
    """The tf.distribute strategy that --distribute asks for; sets `config.distribute` to the one
    chosen and `config.replicas` to its replica count. Call it before any TensorFlow op runs."""
    if config.cpu_devices:
        split_cpu(config.cpu_devices)
    gpus = tf.config.list_logical_devices("GPU")
    choice = config.distribute
    if choice == "auto":
        choice = "mirrored" if len(gpus) >= 2 else "off"
    if choice == "off":
        strategy = tf.distribute.get_strategy()
    else:
        devices = [device.name for device in (gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=None if gpus else tf.distribute.ReductionToOneDevice())
    config.distribute, config.replicas = choice, strategy.num_replicas_in_sync
    if config.batch_size % config.replicas:
        raise UsageError(f"argument --batch-size: {config.batch_size} does not split evenly over the "
                         f"{config.replicas} replicas of --distribute {choice}")
    return strategy


def describe(config):
    """The strategy and its replicas, for the start-up line."""
    if config.distribute == "off":
        return "one device"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"MirroredStrategy over {config.replicas} replicas of batch {config.batch_size // config.replicas}"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""))
