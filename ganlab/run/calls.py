"""The compiled call that runs K training steps on the device: one program per process, its inputs, its first call.

`compile_steps` builds it around the script's train step; `CompiledCalls` is what the loop calls,
one call in flight at a time (loop.run_epoch). The dataset lives on the device, or in host memory
when the device's is too small (`fits_on_device`); the first call compiles, and falls back from
XLA in one line when XLA cannot (`CompiledCalls.__call__`).
"""

import re

import numpy as np
import tensorflow as tf

import utils
from ganlab.devices import distribute
from ganlab.errors import DataError
from ganlab.run.outputs import METRICS

# What an error of the first XLA call says when it comes from compiling (not from the data or memory): XLA's own
# words, CUDA's compilers and libraries (ptxas, nvJitLink, nvlink, libdevice) and cuDNN.
XLA_COMPILE_FAILURE = re.compile(r"compil|XLA|xla|ptxas|nvjitlink|nvlink|libdevice|PTX|cudnn|DNN library", re.I)


def compile_steps(state, images, labels, config, strategy=None):
    """K training steps in one compiled call, each gathering its batch from the dataset on the device.

    `images` is the uint8 training set (N, S, S, C); each batch is scaled to [-1, 1] in the call and
    passed to `state.train_step(images, labels)` with its int32 labels (which an unconditional GAN
    ignores), after which the average of G (with --ema) takes the new weights.
    The dataset lives in a variable on each device (one copy per replica under a tf.distribute
    `strategy`), read with ResourceGather, which has a GPU kernel for uint8 where GatherV2 has none
    (a constant would be gathered on the host, and under MirroredStrategy copied there whole every
    step). A set that does not fit the device's memory (`fits_on_device`)
    stays in host memory instead, and each call's batches are gathered there and copied in; the
    next call's copy is made while the device runs the current one (see `run_epoch`). Each replica
    takes its share of the batch (`distribute.shares`); the returned values are the global batch's,
    all-reduced on the devices, never the host. Returns a `CompiledCalls`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    rows = distribute.shares(config.batch_size, replicas)
    calls = config.steps_per_call  # K, the program's one shape.
    on_host = not fits_on_device(images)
    copies = []
    for device in [] if on_host else strategy.extended.worker_devices if replicas > 1 else [None]:
        with tf.device(device):  # A copy on each local device.
            copies.append((tf.Variable(images, trainable=False),
                           tf.Variable(tf.cast(labels, tf.int64), trainable=False)))  # No int32 ResourceGather on GPUs.

    def replica_step(step_input):
        replica = distribute.replica_index()
        start, end = rows[replica]
        if on_host:  # The batch itself, (images, labels): this replica's rows of it.
            batch, batch_labels = (part[start:end] for part in step_input)
        else:  # The batch's indices into the set on this device.
            local_images, local_labels = copies[replica % len(copies)]
            mine = step_input[start:end]
            batch, batch_labels = local_images.sparse_read(mine), local_labels.sparse_read(mine)
        batch = tf.cast(batch, tf.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
        step_values = state.train_step(batch, tf.cast(batch_labels, tf.int32))
        if state.averaged:  # On each device, from that device's weights: no copy between devices.
            state.averaged.update()
        values = tf.stack([tf.cast(step_values[key], tf.float32) for key in METRICS])
        if replicas == 1:
            return values
        # The global batch's means: each replica's weighted by its share, summed on the devices.
        return tf.distribute.get_replica_context().all_reduce("sum", values * ((end - start) / config.batch_size))

    indices = tf.TensorSpec((calls, config.batch_size), tf.int32)
    if on_host:  # The batches themselves, gathered on the host.
        indices = (tf.TensorSpec((calls, config.batch_size) + images.shape[1:], tf.uint8),
                   tf.TensorSpec((calls, config.batch_size), tf.int64))
    signature = [indices, tf.TensorSpec((), tf.int32)]

    def train_steps(step_inputs, count):
        # One program of K steps whatever `count` (<= K) runs: a fixed shape, and a loop bound XLA need not
        # know when compiling, so the shorter last call of an epoch and a resume mid-epoch compile nothing new.
        values = tf.TensorArray(tf.float32, size=calls)
        index = tf.constant(0)
        while index < count:  # Outside strategy.run: one compiled call holds K steps.
            step_input = tf.nest.map_structure(lambda inputs: inputs[index], step_inputs)
            per_replica = strategy.run(replica_step, args=(step_input,))
            values = values.write(index, strategy.experimental_local_results(per_replica)[0])
            index += 1
        return values.stack()

    return CompiledCalls(train_steps, signature, config.xla, calls,
                         (np.asarray(images), np.asarray(labels)) if on_host else None)


def fits_on_device(images):
    """Whether the uint8 training set `images` (with int64 labels) fits on each device: at most DEVICE_SHARE of its
    memory (`distribute.device_memory`; the CPU's is the host's). If not, says so in one line."""
    memory, size = distribute.device_memory(), int(np.prod(images.shape)) + 8 * len(images)  # uint8, int64
    if memory is None or size <= distribute.DEVICE_SHARE * memory:
        return True
    print(f"The training set ({utils.size_text(size)}) is over {distribute.DEVICE_SHARE:.0%} of a GPU's memory "
          f"({utils.size_text(memory)}): it stays in host memory and each call's batches are copied in (the next "
          f"while the GPU runs the current)", flush=True)
    return False


class CompiledCalls:
    """The compiled K-step call of `compile_steps`: `calls(indices)` runs the steps of `indices` ((k, batch)
    image indices, k <= K) and returns their (k, 4) float32 METRICS values, a tensor not yet read.

    The program always takes K rows (the rest padded, the step count passed as a value), so one
    process compiles it once; with XLA, TensorFlow's persistent cache keeps it for the next process
    (`downloads.cache_dir`). If XLA cannot compile it (on a GPU: no `ptxas` or nvJitLink, no libdevice, an
    older cuDNN), the first call says so in one line and runs it compiled by TensorFlow alone; any
    other failure of the first call is one line too.
    """

    def __init__(self, function, signature, xla, calls, host_data=None):
        self.python_function, self.signature, self.xla, self.calls = function, signature, xla, calls
        self.host_data = host_data  # (images, labels) in host memory, when the set does not fit the device.
        self.compiled = tf.function(function, input_signature=signature, jit_compile=xla)
        self.compiled.get_concrete_function()  # Traced now (see `train`); compiled at the first call.
        self.called = False

    def __call__(self, indices):
        count = len(indices)
        padded = np.zeros((self.calls, indices.shape[1]), np.int32)
        padded[:count] = indices
        inputs = padded
        if self.host_data is not None:  # Gathered here, copied in as the call's input.
            images, labels = self.host_data
            inputs = (images[padded], labels[padded].astype(np.int64))
        if self.called:
            return self.compiled(inputs, count)[:count]
        try:  # The first call compiles.
            values = self.compiled(inputs, count)[:count]
            self.called = True
            return values
        except tf.errors.ResourceExhaustedError:
            raise  # Out of memory: said by `out_of_memory`.
        except tf.errors.OpError as error:
            reason = first_line(error)
            if not XLA_COMPILE_FAILURE.search(str(error)):
                raise DataError(f"the first training call failed: {reason}") from None
            print(f"XLA could not compile the training call ({reason}); training without XLA (--no-xla "
                  f"says so at the start)", flush=True)
            self.xla, self.compiled = False, tf.function(self.python_function, input_signature=self.signature)
            return self(indices)

    def get_concrete_function(self):
        return self.compiled.get_concrete_function()

    def experimental_get_tracing_count(self):
        return self.compiled.experimental_get_tracing_count()


def first_line(error):
    """What a TensorFlow error says, in one line: its message's first line that is not the frame around it
    ("Graph execution error:", the Python stack of the node), without the op's name."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    said = [line for line in lines if line and not line.startswith(("Graph execution error", "Detected at node",
                                                                     "File ", "[[", "{{", "Traceback"))
            and not line.endswith("(most recent call last):") and not line.startswith(tuple("0123456789"))]
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", said[0] if said else type(error).__name__)
