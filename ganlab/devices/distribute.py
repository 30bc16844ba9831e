"""Training on several devices with TensorFlow's own engine, tf.distribute: the --distribute setting.

auto: MultiWorkerMirroredStrategy when $TF_CONFIG (or a Slurm job step of several tasks,
`slurm_cluster`) names a cluster of two or more tasks (one process per machine, each started with
the same command), else MirroredStrategy over every visible GPU when there are two or more and
mirroring pays (`pays_to_mirror`: each GPU's share of a step's forward passes is at least
MIRROR_MIN_GMACS; the small default models stay on one GPU), else the single device (tf.distribute's
default strategy, which changes nothing). Over several machines the chief (task "chief", else
worker 0) writes the run directory; every other worker trains into a temporary directory, removed
when it exits, and resumes from the chief's checkpoints; the workers talk over NCCL between GPUs,
agree on one precision, and give up on a dead peer after --peer-timeout.
`mirrored` mirrors over the GPUs, or on a machine without any over the CPU's logical devices:
`--cpu-devices N` splits the CPU into N of them before TensorFlow starts, so that the
multi-device path can be tried, and tested, anywhere.

Under a strategy the recipe stays the one of a single device: --batch-size is the global batch,
each of the N replicas takes its share of it (`shares`: as even as can be, so that any batch runs
on any number of devices; 100 on 8 GPUs is 4 x 13 + 4 x 12), the replicas' gradients are summed
(so each replica's loss is its share of the global mean, `models.global_mean`, weighted by its share
of the images), batch norm takes the whole batch's statistics in one all-reduce per layer
(`models.GlobalBatchNormalization`), each device updates its own copy of the average of G
(`models.AveragedGenerator.update`), each replica draws its own noise, and under fp16 an
overflow on any replica skips the step on all (`models.ReplicaSafeLossScaleOptimizer`).
"""

import json
import os
import socket
import subprocess
import time

import tensorflow as tf
from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import expand_tasks_per_node

from ganlab.errors import UsageError
from ganlab.flags import MIRROR_MIN_GMACS

DEVICE_SHARE = 0.5  # A training set over this share of a GPU's memory stays in host memory (copied in per call).
SLURM_PORT_BASE = 8888  # The first port of a Slurm task's server ($GAN_MNIST_SLURM_PORT overrides), as TensorFlow's.


def split_cpu(count):
    """Make the CPU appear as `count` logical devices; must run before TensorFlow initialises its devices."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:  # Already initialised (a second run in one process): keep what is there.
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UsageError(f"argument --cpu-devices: TensorFlow has already started with "
                             f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s) in this process") from None


def cluster_tasks():
    """How many tasks $TF_CONFIG's cluster names (0 without it); UsageError naming TF_CONFIG if it is malformed."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return 0
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise UsageError(f"environment variable TF_CONFIG: not JSON ({error})") from None
    problem = tf_config_problem(spec)
    if problem:
        raise UsageError(f"environment variable TF_CONFIG: {problem}")
    return sum(len(tasks) for tasks in spec["cluster"].values())


def tf_config_problem(spec):
    """What is wrong with a parsed $TF_CONFIG for this project's clusters (chief and worker tasks), or None."""
    example = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
    cluster = spec.get("cluster") if isinstance(spec, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        return f'not a JSON object with a "cluster" of task lists, such as {example}'
    for kind, tasks in cluster.items():
        if kind not in ("chief", "worker"):
            return (f'the cluster has "{kind}" tasks; this project trains with "chief" and "worker" tasks only '
                    f"(MultiWorkerMirroredStrategy: no parameter servers or evaluators)")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and ":" in t for t in tasks):
            return f'cluster "{kind}" must be a list of "host:port" strings, got {json.dumps(tasks)}'
    if len(cluster.get("chief", [])) > 1:
        return f'a cluster has one chief at most, got {len(cluster["chief"])}'
    task = spec.get("task")
    if not isinstance(task, dict) or "type" not in task:
        return f'no "task" naming this process\'s place in the cluster, such as {example}'
    if task["type"] not in cluster:
        return f'task type {json.dumps(task["type"])} is not in the cluster ({", ".join(cluster)})'
    index, count = task.get("index", 0), len(cluster[task["type"]])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
        return (f'task index {json.dumps(index)} is outside the cluster\'s {count} "{task["type"]}" task'
                f'{"s" if count > 1 else ""} (0 to {count - 1})')
    return None


def gpus():
    """The GPUs this process may use (after `use_gpus`: the one of a single-device run)."""
    return tf.config.get_visible_devices("GPU")


def use_gpus(choice, cpu=False):
    """Take only the GPUs the run needs, and their memory as it grows, so that a shared box keeps the rest.

    One device (`off`): the first visible GPU only (CUDA_VISIBLE_DEVICES picks which); a strategy:
    every visible GPU; `cpu` (--cpu): none. Without memory growth TensorFlow would reserve nearly all of each GPU's
    memory at start. Must run before TensorFlow initialises its devices; a second run in one
    process keeps what the first set.
    """
    visible = gpus()
    used = [] if cpu else visible[:1] if choice == "off" else visible
    try:
        if len(used) < len(visible):
            tf.config.set_visible_devices(used, "GPU")
        for gpu in used:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # Already initialised (a second run in one process).
        pass


def newer_than_the_wheel(details, build_info):
    """A line when a GPU is newer than the newest machine code (sm_XY) that TensorFlow's wheel carries;
    CUDA then compiles every kernel from the wheel's PTX at its first use. None otherwise."""
    capability = tuple(details.get("compute_capability") or ())
    codes = [code.split("_")[1] for code in build_info.get("cuda_compute_capabilities", []) if code.startswith("sm_")]
    newest = max((divmod(int(code), 10) for code in codes if code.isdigit()), default=None)
    if not capability or newest is None or capability <= newest:
        return None
    return (f"{details.get('device_name', 'the GPU')} (compute capability {capability[0]}.{capability[1]}) is newer "
            f"than TensorFlow {tf.__version__}'s machine code (up to {newest[0]}.{newest[1]}): CUDA compiles each "
            f"kernel from PTX at its first use, so the first steps can take minutes in silence (once: "
            f"~/.nv/ComputeCache keeps them; CUDA_CACHE_MAXSIZE=4294967296 makes it large enough)")


def choose(choice, step_multiply_adds=None):
    """What --distribute `choice` means here: `auto` becomes multi-worker when $TF_CONFIG (or Slurm, see
    `slurm_cluster`) names a cluster of two or more tasks, else mirrored over the visible GPUs when
    `pays_to_mirror` (each GPU's share of the step's `step_multiply_adds` is large enough), else
    off, saying so on a box of several GPUs; multi-worker needs a cluster. Without
    `step_multiply_adds` (the model not yet known) `auto` outside a cluster stays auto."""
    slurm_cluster()
    if choice == "auto":
        if cluster_tasks() >= 2:
            return "multi-worker"
        if step_multiply_adds is None:
            return "auto"
        count = len(gpus())
        if count < 2:
            return "off"
        share = step_multiply_adds / count / 1e9
        if pays_to_mirror(step_multiply_adds, count):
            print(f"--distribute auto: mirrored over the {count} GPUs, each with {share:.0f} G multiply-adds of "
                  f"a step's forward passes (one GPU: --distribute off)")
            return "mirrored"
        print(f"--distribute auto: one GPU of {count}, as each GPU's share of a step ({share:.1f} G multiply-adds "
              f"of forward passes, under {MIRROR_MIN_GMACS:g} G) would not pay for the collectives between them "
              f"(all {count}: --distribute mirrored)")
        return "off"
    if choice == "multi-worker" and cluster_tasks() < 2:
        raise UsageError("argument --distribute: multi-worker needs TF_CONFIG naming a cluster of two or "
                         "more tasks")
    return choice


def pays_to_mirror(step_multiply_adds, count):
    """Whether mirroring over `count` GPUs pays: each GPU's share of a step's forward passes (G's and D's,
    `step_multiply_adds` in all) is at least MIRROR_MIN_GMACS billion multiply-adds."""
    return step_multiply_adds / count >= MIRROR_MIN_GMACS * 1e9


def place(choice):
    """(chief, task): whether this process writes the run directory, and its task ("worker 1") in a cluster.

    In a cluster the chief is the "chief" task, else worker 0, as MultiWorkerMirroredStrategy decides.
    """
    if choice != "multi-worker":
        return True, None
    spec = json.loads(os.environ["TF_CONFIG"])
    kind, index = spec["task"]["type"], spec["task"].get("index", 0)
    return kind == "chief" or ("chief" not in spec["cluster"] and index == 0), f"{kind} {index}"


def take_devices(choice, cpu_devices, cpu=False):
    """Make the devices `choice` trains on (the CPU split into `cpu_devices`, the GPUs it needs, `use_gpus`,
    none with `cpu`); return the replica count its strategy will have. Runs before TensorFlow
    initialises its devices."""
    if cpu_devices:
        split_cpu(cpu_devices)
    use_gpus(choice, cpu)
    if choice == "off":
        return 1
    if choice == "multi-worker":  # Each machine's GPUs, or its CPU.
        return max(len(gpus()), 1) * cluster_tasks()
    cpu = tf.config.list_physical_devices("CPU")[0]
    return len(gpus()) or len(tf.config.get_logical_device_configuration(cpu) or [cpu])


def create(settings):
    """The tf.distribute strategy of `settings.distribute` (see `choose`), over the devices of `take_devices`.

    In a cluster this first waits, bounded by --peer-timeout, for every other worker (`wait_for_peers`).
    """
    if settings.distribute == "off":
        strategy = tf.distribute.get_strategy()
    elif settings.distribute == "multi-worker":
        wait_for_peers(settings.peer_timeout)
        # NCCL between GPUs (TensorFlow's AUTO takes the gRPC ring); a collective that waits longer than
        # --peer-timeout for a dead peer fails, and `loop.train` says so in one line.
        implementation = tf.distribute.experimental.CommunicationImplementation
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation.NCCL if gpus() else implementation.AUTO,
                timeout_seconds=60 * settings.peer_timeout))
    else:
        logical_gpus = tf.config.list_logical_devices("GPU")
        devices = [device.name for device in (logical_gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(
            devices, cross_device_ops=None if logical_gpus else tf.distribute.ReductionToOneDevice())
    if settings.distribute == "multi-worker":
        agree_on_precision(strategy, settings.precision)
    if strategy.num_replicas_in_sync != settings.replicas:
        raise UsageError(f"argument --distribute: {settings.distribute} made {strategy.num_replicas_in_sync} "
                         f"replicas where {settings.replicas} were expected (every machine of a cluster must have "
                         f"as many GPUs as this one)")
    return strategy


def slurm_cluster():
    """Without $TF_CONFIG, in a Slurm job step of two or more tasks (`srun python dcgan_mnist.py`), set
    $TF_CONFIG from Slurm's environment with TensorFlow's own SlurmClusterResolver, and print the layout.

    Each task is a worker at port $GAN_MNIST_SLURM_PORT (default 8888) plus its place on its node;
    the resolver gives each task its node's GPUs (asking nvidia-smi how many), or, on a machine
    without NVIDIA GPUs, none. Runs before TensorFlow initialises its devices.
    """
    if os.environ.get("TF_CONFIG") or int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1) < 2:
        return
    try:
        port = int(os.environ.get("GAN_MNIST_SLURM_PORT", SLURM_PORT_BASE))
    except ValueError:
        raise UsageError(f"environment variable GAN_MNIST_SLURM_PORT: not a port number, got "
                         f"{os.environ['GAN_MNIST_SLURM_PORT']!r}") from None
    try:
        # Without NVIDIA GPUs the resolver is told so: one (unused) slot per task, CUDA_VISIBLE_DEVICES untouched.
        local = {} if nvidia_gpu_count() else dict(
            gpus_per_node=max(expand_tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))),
            gpus_per_task=1, auto_set_gpu=False)
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port, **local)
        cluster = resolver.cluster_spec().as_dict()
    except (RuntimeError, ValueError, KeyError) as error:
        raise UsageError(f"environment variable SLURM_*: the Slurm job step cannot be read as a cluster "
                         f"({error})") from None
    os.environ["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": resolver.task_type,
                                                                       "index": resolver.task_id}})
    print(f"Slurm: task {os.environ.get('SLURM_PROCID')} of {os.environ.get('SLURM_STEP_NUM_TASKS')} is "
          f"{resolver.task_type} {resolver.task_id} of {', '.join(cluster['worker'])}"
          + (f", GPUs {os.environ.get('CUDA_VISIBLE_DEVICES')}" if not local else ", no GPUs"), flush=True)


def nvidia_gpu_count():
    """How many NVIDIA GPUs this machine's driver lists (errors.nvidia_gpus)."""
    from ganlab.errors import nvidia_gpus
    return len(nvidia_gpus())


def device_memory():
    """Bytes of memory of the smallest GPU this process uses (`nvidia-smi`'s total), or None on the CPU,
    whose memory is the host's."""
    if not gpus():
        return None
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30).stdout
        return min(int(line.strip()) for line in listed.splitlines() if line.strip()) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def agree_on_precision(strategy, precision):
    """Refuse, on every worker at once, a cluster whose workers resolved different precisions (mixed GPU
    generations under --precision auto, say): their optimizers and loss scales would not match."""
    kinds = ("fp32", "bf16", "fp16")

    @tf.function
    def vote():
        return strategy.run(lambda: tf.one_hot(kinds.index(precision), len(kinds)))

    votes = strategy.reduce("SUM", vote(), axis=None)
    counts = {kind: int(count) for kind, count in zip(kinds, votes.numpy()) if count}
    if len(counts) > 1:
        raise UsageError("argument --precision: the cluster's workers resolved different precisions ("
                         + ", ".join(f"{kind} on {count} replica{'s' if count > 1 else ''}"
                                     for kind, count in counts.items())
                         + "); pass the same --precision to every worker")


def wait_for_peers(minutes):
    """Wait, bounded by `minutes`, until every other worker of $TF_CONFIG's cluster has started.

    TensorFlow's own wait for them (in MultiWorkerMirroredStrategy's start) has no bound and, in
    C++, lets no Python signal handler run; so this one comes first, in Python: this worker listens
    on its own port of the cluster (so that the others see it started), then connects to each other
    worker's until all answer, then frees its port for TensorFlow. The bound passing is one line
    (UsageError naming --peer-timeout); Ctrl-C and SIGTERM stop it as anywhere else. Nothing is
    written before or during the wait.
    """
    spec = json.loads(os.environ["TF_CONFIG"])
    me = (spec["task"]["type"], spec["task"].get("index", 0))
    addresses = {(kind, index): address for kind, tasks in spec["cluster"].items() for index, address in enumerate(tasks)}
    peers = [address for key, address in addresses.items() if key != me]
    print(f"Waiting up to {minutes:g} min for the cluster's other workers ({', '.join(peers)}) to start ...",
          flush=True)
    own_port = int(addresses[me].rsplit(":", 1)[1])
    listener = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", own_port))
        listener.listen(len(peers) + 8)  # The kernel completes the others' connections; none is accepted.
    except OSError as error:
        listener.close()
        raise UsageError(f"environment variable TF_CONFIG: this task's port {own_port} ({addresses[me]}) cannot be "
                         f"used ({error.strerror or error}): another process holds it?") from None
    deadline = time.monotonic() + 60 * minutes
    try:
        waiting = list(peers)
        while waiting:
            waiting = [address for address in waiting if not _answers(address)]
            if waiting and time.monotonic() > deadline:
                raise UsageError(f"argument --peer-timeout: the cluster's other workers ({', '.join(waiting)}) did not "
                                 f"start within {minutes:g} min: start the same command on each, with its own "
                                 f"TF_CONFIG task")
            if waiting:
                time.sleep(0.5)
    finally:
        listener.close()


def _answers(address):
    """Whether something listens at `address` (host:port)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def shares(batch_size, replicas):
    """Each replica's rows [start, end) of a global batch: as even as can be, the first `batch_size %
    replicas` replicas one image larger (100 over 8: 13, 13, 13, 13, 12, 12, 12, 12)."""
    base, extra = divmod(batch_size, replicas)
    ends = [sum(base + (index < extra) for index in range(replica + 1)) for replica in range(replicas)]
    return list(zip([0] + ends[:-1], ends))


def replica_index():
    """In a replica's step: its index among all replicas (0 on one device). MirroredStrategy and
    MultiWorkerMirroredStrategy fix it when each replica's step is traced, so it is a Python int."""
    context = tf.distribute.get_replica_context()
    return int(tf.get_static_value(context.replica_id_in_sync_group)) if context.num_replicas_in_sync > 1 else 0


def print_devices(config):
    """The start-up line: TensorFlow, the devices, the strategy, precision, XLA and steps per call;
    and a line for a GPU newer than TensorFlow's machine code. Printed before any data is loaded."""
    names = [f"{d.device_type}:{d.name.split(':')[-1]}" for d in gpus()]
    print(f"TensorFlow {tf.__version__} on {', '.join(names) or 'the CPU (no GPU found)'}, "
          f"{describe(config)}; precision {config.precision}, XLA {'on' if config.xla else 'off'}, "
          f"{config.steps_per_call} step{'s' if config.steps_per_call != 1 else ''} per call", flush=True)
    for gpu in gpus():
        newer = newer_than_the_wheel(tf.config.experimental.get_device_details(gpu), tf.sysconfig.get_build_info())
        if newer:
            print(newer, flush=True)
            break


def describe(config):
    """The strategy and its replicas, for the start-up line."""
    sizes = sorted({end - start for start, end in shares(config.batch_size, config.replicas)}, reverse=True)
    share = f"{config.replicas} replicas of batch {' or '.join(map(str, sizes))}"
    if config.distribute == "off":
        return "one device"
    if config.distribute == "multi-worker":
        return f"MultiWorkerMirroredStrategy, {config.task}{' (chief)' if config.chief else ''}, {share}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"MirroredStrategy over {share}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
