"""The training loop both scripts run: start or restore, epochs of compiled steps, stopping cleanly.

Not a script of its own: `gan_mnist.py` and `dcgan_mnist.py` call `train` with their `build(config)`,
which returns the GAN's train step (one D and one G update on a batch) and the state a checkpoint
holds. Around the steps this module keeps the run going: it starts or restores (the state on disk
is checkpoint.py's), runs `--steps-per-call` steps at a time in one compiled call with the dataset
on the device (`compile_steps`), stops on a signal or a NaN with the command that resumes
(`StopRequests`, `check_finite`), and hands each epoch to what the user watches (outputs.py).
"""

import contextlib
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import tensorflow as tf

from ganlab.devices import distribute
from ganlab import models
from ganlab.run import directory as run_directory
from ganlab.sampling import sample
from ganlab.devices import speed
import utils
from ganlab.run.checkpoint import Checkpoint
from ganlab.errors import TrainingStopped, UsageError, is_out_of_space, model_sizes, out_of_memory
from ganlab.run.outputs import METRICS, EpochOutputs, outputs_behind

CHECKPOINT_MINUTES = 10.0  # Besides each epoch's end: a crash loses minutes of training, not an epoch.


def add_flags(parser):
    """The training flags that are not hyperparameters."""
    training = parser.add_argument_group("training")
    training.add_argument("--deterministic", action="store_true",
                          help="enable TensorFlow's op determinism, for bit-exact repeats on GPUs (slower; saved "
                               "with the run, so --resume keeps it)")
    training.add_argument("--checkpoint-minutes", metavar="M", type=float, default=CHECKPOINT_MINUTES,
                          help="also save a checkpoint mid-epoch after M minutes of training since the last "
                               f"(0: at the end of each epoch only; default: {CHECKPOINT_MINUTES:g})")


def check_flags(config):
    if not (config.checkpoint_minutes >= 0 and config.checkpoint_minutes != float("inf")):
        raise UsageError(f"argument --checkpoint-minutes: must be 0 or a positive number of minutes, "
                         f"got {config.checkpoint_minutes}")


class Hooks:
    """Where a tool joins the training loop without changing it; each method here changes nothing.

    results/extra_averages.py keeps extra averages of G with `step` and scores them with `evaluated`.
    """

    def step(self, train_step, state, averaged):
        """The per-batch step to compile (traced once into the compiled call); `train_step` as is."""
        return train_step

    def calls(self, train_steps):
        """The compiled K-step call the loop runs; `train_steps` as is."""
        return train_steps

    def evaluated(self, epoch, figures, score):
        """After each evaluation: `figures` of the sampler; `score(generator)` scores another the same way."""


def train(config, run, data, build, transform="none", hooks=None, strategy=None):
    """Train the GAN that `build(config)` makes on `data` (images, labels), writing every output into `run`.

    `build(config)` returns (train_step, state): `train_step(images, labels)` runs one D and one G
    update and returns the batch's METRICS; `state` names what a checkpoint must hold to go on (the
    models `generator` and `discriminator`, their optimizers, the noise generator `noise_rng`).
    Under a tf.distribute `strategy` (distribute.py) every replica trains its share of each batch.
    With `config.resume` training goes on from the newest readable checkpoint. SIGINT or SIGTERM
    stops it after the current step with a checkpoint saved; a non-finite loss stops it keeping
    the last good checkpoint; both raise TrainingStopped. A full disk raises DataError with every
    earlier output and checkpoint intact. Returns the history.
    """
    hooks = hooks or Hooks()
    with run.create(config.overwrite or getattr(config, "restart", False)):  # One training process at a time.
        images, labels = data
        steps = len(images) // config.batch_size
        evaluator = (sample.load_evaluator(config.dataset, config.data_dir, config.classes)
                     if config.eval_every else None)
        with out_of_memory("building the models", model_sizes(config)):
            session = start_or_restore(config, run, build, hooks, steps, strategy)
        try:
            write_run_start(config, run, images, transform, session.history)
            train_steps = hooks.calls(compile_steps(session.train_step, tf.constant(images), tf.constant(labels),
                                                    config, strategy))
            with out_of_memory("training", model_sizes(config)):
                train_epochs(config, run, session, train_steps, EpochOutputs(config, run, session, evaluator,
                                                                             transform, hooks), len(images))
        except (OSError, tf.errors.OpError) as error:
            if not is_out_of_space(error):
                raise
            run.remove_temporaries()
            raise run.out_of_space(session.checkpoint.bytes_per_epoch) from None
        return session.history


def train_epochs(config, run, session, train_steps, outputs, image_count):
    """The epochs from where the session stands to config.epochs: train, score, checkpoint, then the outputs.

    Each epoch's checkpoint is saved before its outputs are written, so no output ever claims an
    epoch the checkpoint does not hold; a resumed run first writes the outputs of the epoch its
    checkpoint ends on, in case the stopped run had not.
    """
    where = (f"resuming after epoch {session.epochs_done}" + (f", step {session.skip}" if session.skip else "")
             if config.resume else "from scratch")
    print(f"Training {config.script} for {config.epochs} epochs of {session.steps} steps (batch {config.batch_size}, "
          f"{image_count} images), {where}; outputs in {run.path}")
    session.started = time.perf_counter() - session.history["total_seconds"]
    trained = session.epochs_done >= config.epochs  # Stopped in its closing outputs: only those remain.
    if session.epochs_done and not session.skip and (trained or outputs_behind(run, session.epochs_done)):
        outputs.write_epoch(session.epochs_done, gif=trained)
    with StopRequests() as stop:
        for epoch in range(session.epochs_done + 1, config.epochs + 1):
            first_step = session.skip if epoch == session.epochs_done + 1 else 0
            batches = epoch_batches(config.seed, epoch, image_count, session.steps, config.batch_size)
            means, seconds = run_epoch(config, session, outputs, train_steps, epoch, batches, first_step, stop)
            try:
                outputs.end_epoch(epoch, means, seconds, stop)
            except StopNow:  # A signal during the evaluation: it goes, the epoch's training is kept.
                session.history["evaluations"] = [e for e in session.history["evaluations"] if e["epoch"] != epoch]
                save_mid_epoch(session, epoch, session.steps, seconds)
                outputs.stopped(epoch - 1)
                raise interrupted(stop.signal, config, run, f"the end of epoch {epoch}, before its evaluation")
            session.checkpoint.save(session.history, epoch, 0)
            final = stop.signal is not None or epoch == config.epochs
            outputs.write_epoch(epoch, gif=final)
            if stop.signal and epoch < config.epochs:
                outputs.writer.close()
                raise interrupted(stop.signal, config, run, f"the end of epoch {epoch}")
    outputs.finish()


# ---------------------------------------------------------------------------------------------
# Start or restore: the models, the average of G, the checkpoint, the history, the fixed noise
# ---------------------------------------------------------------------------------------------


def start_or_restore(config, run, build, hooks, steps, strategy=None):
    """Build everything a run holds and, with --resume, restore it from the last checkpoint.

    Returns a namespace: the train step, `state`, the `averaged` generator (or None), the
    `sampler` that draws every sample (the average with --ema, else G), the `checkpoint`, the
    `history`, how far training got (`epochs_done`, and `skip` steps into the next epoch) and the
    `fixed_noise` of the progress grids.
    """
    train_step, state, averaged = build_for_training(config, build, strategy)
    train_step = hooks.step(train_step, state, averaged)
    fixed_noise = np.random.default_rng(config.seed).standard_normal((config.sample_grid ** 2, config.latent_dim))
    checkpoint = Checkpoint(run, state, fixed_noise, steps)
    history = {"iterations": {key: [] for key in METRICS}, "epochs": [], "evaluations": [], "total_seconds": 0.0}
    if config.resume:
        history = checkpoint.restore()
    epochs_done, skip = checkpoint.position()
    if config.resume and getattr(config, "lr_change", None):  # A lower --lr, after a divergence say.
        for name in ("g_optimizer", "d_optimizer"):
            state[name].learning_rate = config.lr
        before, after = config.lr_change
        history.setdefault("lr_changes", []).append({"epoch": epochs_done, "step": skip, "from": before, "to": after})
        print(f"Learning rate lowered from {before:g} to {after:g} after epoch {epochs_done}, step {skip}")
    finished = run.random_samples.is_file() and (run.metrics.is_file() or not history["evaluations"])
    if config.resume and epochs_done >= config.epochs and finished:  # Else it stopped in its last outputs.
        raise UsageError(f"argument --epochs: the run in {run.path} has already trained {epochs_done} epochs; "
                         f"pass a larger --epochs to train on")
    return SimpleNamespace(train_step=train_step, state=state, averaged=averaged,
                           sampler=averaged.model if averaged else state["generator"], checkpoint=checkpoint,
                           history=history, epochs_done=epochs_done, skip=skip, fixed_noise=checkpoint.fixed_noise(),
                           steps=steps, steps_run=0)


def build_for_training(config, build, strategy=None):
    """Seed, set the precision policy, call the script's `build(config)`, and add the average of G,
    all in `strategy`'s scope (the default: one device).

    Returns (train_step, state, averaged): with --ema, `averaged` is the AveragedGenerator,
    `train_step` also updates it and `state` (what a checkpoint holds) includes it; else None.
    """
    with (strategy or tf.distribute.get_strategy()).scope():
        return _build_for_training(config, build)


def _build_for_training(config, build):
    seed_everything(config)
    speed.set_precision(config.precision)
    if not config.xla:
        # Grappler's remapper fails on the DCGAN's bias-free convolution + batch norm + LeakyReLU
        # ("remapper failed ... LeakyReluGrad ... missing node BiasAdd") and skips the whole graph;
        # switched off, the error line goes and the step measured as fast or faster on the CPU.
        tf.config.optimizer.set_experimental_options({"remapping": False})
    train_step, state = build(config)
    if not getattr(config, "ema", 0):
        return train_step, state, None
    generator = state["generator"]
    # A fixed batch of noise (and balanced labels) for the batch-norm statistics of the average.
    refresh_noise = np.random.default_rng(config.seed + 3).standard_normal((2000, config.latent_dim)).astype(np.float32)
    refresh_labels = models.one_hot(models.balanced_labels(len(refresh_noise), config), config)
    averaged = models.AveragedGenerator(generator, config.ema,
                                     [refresh_noise, refresh_labels] if len(generator.inputs) == 2 else refresh_noise)

    def step_and_average(real_images, real_labels):
        values = train_step(real_images, real_labels)
        # Once per step for all replicas (in cross-replica context; a plain call on one device).
        tf.distribute.get_replica_context().merge_call(lambda strategy: averaged.update())
        return values

    return step_and_average, state | {"averaged_generator": averaged.variables}, averaged


def seed_everything(config):
    """Seed Python, numpy and TensorFlow from --seed; with --deterministic, make TensorFlow's ops repeatable."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def write_run_start(config, run, images, transform, history):
    """config.json (the resolved configuration, marked as this project's) and real_samples.png, before
    the first step; a resumed run rewrites them (with the learning rates it changed to)."""
    utils.save_json(run.config, {"format": run_directory.FORMAT} | resolved_config(config) | {
        "transform": transform, "image_shape": list(images.shape[1:]), "training_images": len(images),
        "tensorflow": tf.__version__, "lr_changes": history.get("lr_changes", [])})
    utils.save_png(run.real_samples, utils.image_grid(images[:config.sample_grid ** 2], config.sample_grid))


def resolved_config(config):
    """The configuration as a JSON-ready dict: the hyperparameters, then the run's settings."""
    resolved = {key: getattr(config, key) for key in config.hyperparameters}
    resolved.update(script=config.script, out=str(config.out), data_dir=config.data_dir,
                    num_samples=config.num_samples, precision=config.precision, xla=config.xla,
                    steps_per_call=config.steps_per_call, checkpoint_minutes=config.checkpoint_minutes,
                    deterministic=config.deterministic)
    return resolved


# ---------------------------------------------------------------------------------------------
# An epoch of compiled calls: the NaN guard, signals, the status line
# ---------------------------------------------------------------------------------------------


def compile_steps(train_step, images, labels, config, strategy=None):
    """K training steps in one compiled call, each gathering its batch from the dataset on the device.

    `images` is the uint8 training set (N, S, S, C); each batch is scaled to [-1, 1] in the call and
    passed to `train_step(images, labels)` with its int32 labels (which an unconditional GAN ignores).
    The dataset lives in a variable on each device (one copy per replica under a tf.distribute
    `strategy`), read with ResourceGather, which has a GPU kernel for uint8 where GatherV2 has none
    (a constant would be gathered on the host, and under MirroredStrategy copied there whole every
    step). Each replica takes its share of the batch (`distribute.shares`); the returned values are
    the global batch's, all-reduced on the devices, never the host. The returned function takes
    (K, batch_size) image indices and returns (K, 4) float32 values of METRICS. Its signature leaves
    K open, so the shorter last call of an epoch does not retrace.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    rows = distribute.shares(config.batch_size, replicas)
    copies = []
    for device in strategy.extended.worker_devices if replicas > 1 else [None]:  # A copy on each local device.
        with tf.device(device):
            copies.append((tf.Variable(images, trainable=False),
                           tf.Variable(tf.cast(labels, tf.int64), trainable=False)))  # No int32 ResourceGather on GPUs.

    def replica_step(step_indices):
        replica = distribute.replica_index()
        start, end = rows[replica]
        local_images, local_labels = copies[replica % len(copies)]
        mine = step_indices[start:end]
        batch = tf.cast(local_images.sparse_read(mine), tf.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
        step_values = train_step(batch, tf.cast(local_labels.sparse_read(mine), tf.int32))
        values = tf.stack([tf.cast(step_values[key], tf.float32) for key in METRICS])
        if replicas == 1:
            return values
        # The global batch's means: each replica's weighted by its share, summed on the devices.
        return tf.distribute.get_replica_context().all_reduce("sum", values * ((end - start) / config.batch_size))

    @tf.function(input_signature=[tf.TensorSpec((None, config.batch_size), tf.int32)], jit_compile=config.xla)
    def train_steps(batch_indices):
        count = tf.shape(batch_indices)[0]
        values = tf.TensorArray(tf.float32, size=count)
        for index in tf.range(count):  # Outside strategy.run: one compiled call holds K steps.
            per_replica = strategy.run(replica_step, args=(batch_indices[index],))
            values = values.write(index, strategy.experimental_local_results(per_replica)[0])
        return values.stack()

    return train_steps


def epoch_batches(seed, epoch, count, steps, batch_size):
    """The image indices of each step of one epoch, (steps, batch_size): a permutation fixed by (seed, epoch).

    Because the order depends on nothing else, a resumed run sees exactly the batches that an
    uninterrupted one would, even from the middle of an epoch. The ragged last batch is dropped.
    """
    return np.random.default_rng([seed, epoch]).permutation(count)[:steps * batch_size].reshape(steps, batch_size)


def run_epoch(config, session, outputs, train_steps, epoch, batches, first_step, stop):
    """Train one epoch from `first_step`, call by call; return (the epoch's metric means, its seconds).

    After each call: stop on a non-finite value (keeping the last good checkpoint), record the
    steps, update the status line; every --checkpoint-minutes save a mid-epoch checkpoint; on a
    signal save everything mid-epoch and stop.
    """
    steps, history = len(batches), session.history
    partial = history.pop("partial_epoch", None) if first_step else None
    resumed_seconds = partial["seconds"] if partial else 0.0
    epoch_start = time.perf_counter() - resumed_seconds
    for call_start in range(first_step, steps, config.steps_per_call):
        call_values = train_steps(batches[call_start:call_start + config.steps_per_call]).numpy()
        check_finite(call_values, epoch, call_start, outputs.run, config, session.steps_run)
        session.steps_run += len(call_values)
        outputs.record_steps(call_values, (epoch - 1) * steps + call_start)
        step = call_start + len(call_values)
        elapsed = time.perf_counter() - epoch_start
        outputs.status.update(epoch, step, steps, (step - first_step) * config.batch_size
                              / max(elapsed - resumed_seconds, 1e-9), dict(zip(METRICS, call_values[-1].tolist())))
        if step < steps and (stop.signal or session.checkpoint.due(config.checkpoint_minutes)):
            partial = save_mid_epoch(session, epoch, step, elapsed)
        if stop.signal and step < steps:
            history["partial_epoch"] = partial  # history.json says how far, as the checkpoint does.
            outputs.stopped(epoch - 1)
            raise interrupted(stop.signal, config, outputs.run, f"epoch {epoch}, step {step}/{steps}")
    means = {key: float(np.mean(history["iterations"][key][-steps:])) for key in METRICS}
    return means, time.perf_counter() - epoch_start


def save_mid_epoch(session, epoch, step, seconds):
    """Checkpoint `step` steps into `epoch`, its history recording how far (and the epoch's seconds so
    far) under "partial_epoch"; returns that record."""
    history = session.history
    history["partial_epoch"] = {"epoch": epoch, "step": step, "seconds": round(seconds, 3)}
    history["total_seconds"] = round(time.perf_counter() - session.started, 3)
    session.checkpoint.save(history, epoch - 1, step)
    return history.pop("partial_epoch")


RESUMED_DIVERGENCE_STEPS = 20  # A resumed run that diverges within these steps diverged in its checkpoint.


def check_finite(call_values, epoch, call_start, run, config, steps_run=0):
    """Stop the run, naming the value, epoch and step, if any step of the call returned NaN or infinity.

    `steps_run` counts the steps this process trained before the call: a resumed run that diverges
    within RESUMED_DIVERGENCE_STEPS of its start has a checkpoint that diverged already (finite, but
    blown-up weights), which no lower rate saves; the message then says to start afresh.
    """
    finite = np.isfinite(call_values).all(axis=1)
    if finite.all():
        return
    row = int(np.argmin(finite))
    bad = METRICS[int(np.argmin(np.isfinite(call_values[row])))]
    prefixes = run.checkpoint_prefixes()
    where = f"{bad} is {call_values[row][METRICS.index(bad)]} at epoch {epoch}, step {call_start + row + 1}"
    half = f"{config.lr / 2:g}"
    if config.resume and steps_run + row < RESUMED_DIVERGENCE_STEPS:
        fresh = shlex.join(["python", f"{config.script}.py", "--out", f"{run.path}-lr{half}", "--lr", half])
        raise TrainingStopped(
            f"{where}, {steps_run + row + 1} steps after resuming: the checkpoint it resumed from has itself "
            f"diverged (its weights are finite but blown up), so resuming it again, at any rate, diverges too; "
            f"start afresh with a lower rate: {fresh} (with the run's other flags, from its config.json)", 1)
    raise TrainingStopped(
        f"{where}: training diverged and stopped; "
        + (f"the last good checkpoint, {Path(prefixes[0]).name}, is kept: continue it with a lower rate, "
           f"{resume_command(config, run, '--lr', half)}" if prefixes
           else "no checkpoint yet: start again with a lower --lr"), 1)


def resume_command(config, run, *extra):
    """The shell command (quoted) that resumes this run."""
    return shlex.join(["python", f"{config.script}.py", "--out", str(run.path), "--resume", *extra])


def interrupted(signum, config, run, where):
    """The TrainingStopped of a signal: where it stopped, and the command that resumes."""
    return TrainingStopped(
        f"{signal.Signals(signum).name}: stopped at {where} and saved a checkpoint, the history, the plots and "
        f"the GIF so far. Resume with: {resume_command(config, run)}", 128 + signum)


class StopNow(Exception):
    """A signal arrived while `StopRequests.at_once` was active."""


class StopRequests:
    """While active, SIGINT (Ctrl-C) and SIGTERM ask training to stop after the current step.

    A second Ctrl-C stops at once, as usual; inside `at_once()` (the evaluation, which takes
    seconds) the first signal does. Outside the main thread signals cannot be caught, and this
    does nothing.
    """

    def __init__(self):
        self.signal = None
        self._previous = {}
        self._at_once = False

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        if self._at_once:
            print(f"\n{signal.Signals(signum).name} received: stopping now", file=sys.stderr, flush=True)
            raise StopNow
        print(f"\n{signal.Signals(signum).name} received: saving after this step "
              f"(Ctrl-C again stops at once, losing the epoch in progress)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def at_once(self):
        """A block that a signal interrupts with StopNow (at once if one is already pending)."""
        if self.signal is not None:
            raise StopNow
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
