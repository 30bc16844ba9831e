"""The training loop both scripts run: start or restore, epochs of compiled steps, stopping cleanly.

`train` is called by each script's `main` with its `build_training(config)`, which returns the
GAN's train step (one D and one G update on a batch) and its models, optimizers and noise
generator. Around the steps this module keeps the run going: it makes the `TrainingState` once
(restored from the checkpoint on --resume, checkpoint.py), runs `--steps-per-call` steps at a time
in one compiled call with the dataset on the device (calls.py), one call in flight, hands each
epoch to what the user watches (outputs.py, written beside training), and stops on a signal or a
NaN with the command that resumes (stopping.py, and `stop` here: the one place a stopped run
saves what it has).

    main -> train -> train_epochs -> run_epoch -> train_steps (compiled, calls.py) -> replica_step -> train_step
"""

import contextlib
import dataclasses
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

import utils
from ganlab import models
from ganlab.devices import distribute, speed
from ganlab.errors import TrainingStopped, UsageError, is_out_of_space, model_sizes, out_of_memory
from ganlab.run import directory as run_directory
from ganlab.run.calls import compile_steps, first_line
from ganlab.run.checkpoint import Checkpoint
from ganlab.run.outputs import METRICS, EpochOutputs, outputs_behind
from ganlab.run.stopping import StopNow, StopRequests, check_finite, interrupted, resume_command
from ganlab.sampling import sample

class Hooks:
    """Where a tool joins the training loop without changing it; each method here changes nothing.

    results/extra_averages.py keeps extra averages of G with `step` and scores them with `evaluated`.
    """

    def step(self, train_step, state):
        """The per-batch step to compile (traced once into the compiled call); `train_step` as is."""
        return train_step

    def calls(self, train_steps):
        """The compiled K-step call the loop runs; `train_steps` as is."""
        return train_steps

    def evaluated(self, epoch, figures, score):
        """After each evaluation: `figures` of the sampler; `score(generator)` scores another the same way."""


@dataclasses.dataclass(eq=False)
class TrainingState:
    """Everything a run holds while it trains, made once (`make_state`, then `start_or_restore`).

    The script's models, optimizers and noise generator; the moving average of G (`averaged`, with
    --ema); the train step; and, once the run's checkpoint is opened, the checkpoint, the history,
    how far training got (`epochs_done`, and `skip` steps into the next epoch), the progress grids'
    `fixed_noise`, the steps of an epoch, the steps this process has trained and when it started.
    """

    generator: keras.Model
    discriminator: keras.Model
    g_optimizer: keras.optimizers.Optimizer
    d_optimizer: keras.optimizers.Optimizer
    noise_rng: tf.random.Generator
    train_step: Callable
    averaged: models.AveragedGenerator | None = None
    checkpoint: Checkpoint | None = None
    history: dict = dataclasses.field(default_factory=lambda: {
        "iterations": {key: [] for key in METRICS}, "epochs": [], "evaluations": [], "total_seconds": 0.0})
    epochs_done: int = 0
    skip: int = 0
    fixed_noise: np.ndarray | None = None
    steps: int = 0
    steps_run: int = 0
    started: float = 0.0

    @property
    def sampler(self):
        """What draws every sample: the average of G with --ema, else G."""
        return self.averaged.model if self.averaged else self.generator

    def trackables(self):
        """What a checkpoint holds, by the names checkpoints have always used."""
        named = dict(generator=self.generator, discriminator=self.discriminator, g_optimizer=self.g_optimizer,
                     d_optimizer=self.d_optimizer, noise_rng=self.noise_rng)
        return named | ({"averaged_generator": self.averaged.variables} if self.averaged else {})

    def save_mid_epoch(self, epoch, step, seconds):
        """Checkpoint `step` steps into `epoch`, its history recording how far (and the epoch's seconds so
        far) under "partial_epoch"; returns that record."""
        self.history["partial_epoch"] = {"epoch": epoch, "step": step, "seconds": round(seconds, 3)}
        self.history["total_seconds"] = round(time.perf_counter() - self.started, 3)
        self.checkpoint.save(self.history, epoch - 1, step)
        return self.history.pop("partial_epoch")


def train(config, run, data, build_training, transform="none", hooks=None, strategy=None):
    """Train the GAN that `build_training(config)` makes on `data` (images, labels), writing every output into `run`.

    `build_training(config)` returns (train_step, parts): `train_step(images, labels)` runs one D
    and one G update and returns the batch's METRICS; `parts` names the models `generator` and
    `discriminator`, their optimizers `g_optimizer` and `d_optimizer` and the noise generator
    `noise_rng`. Under a tf.distribute `strategy` (distribute.py) every replica trains its share of
    each batch. With `config.resume` training goes on from the newest readable checkpoint. SIGINT
    or SIGTERM stops it after the current step with a checkpoint saved; a non-finite loss stops it
    keeping the last good checkpoint; both raise TrainingStopped. A full disk raises DataError with
    every earlier output and checkpoint intact. Returns the history.
    """
    hooks = hooks or Hooks()
    with run.create(config.overwrite or config.restart):  # One training process at a time.
        images, labels = data
        if config.eval_every:
            sample.check_cache_dir()  # Now; the evaluator itself is loaded at the first evaluation (outputs.py).
        sizes = model_sizes(config)  # Named if memory runs out.
        with out_of_memory("building the models", sizes):
            state = make_state(config, build_training, strategy)
            state.train_step = hooks.step(state.train_step, state)
        with out_of_memory("placing the data", f"{sizes} and a training set of {images.nbytes / 1e6:.0f} MB (--limit)"):
            # Traced before the checkpoint is read, so that the call's name, on which XLA's cache keys its
            # program, is the same in every process of the model, fresh or resumed.
            train_steps = hooks.calls(compile_steps(state, images, labels, config, strategy))
        start_or_restore(config, run, state, len(images) // config.batch_size)
        try:
            write_run_start(config, run, images, transform, state.history)
            with out_of_memory("training", sizes):
                outputs = EpochOutputs(config, run, state, transform, hooks)
                train_epochs(config, run, state, train_steps, outputs, len(images))
        except (OSError, tf.errors.OpError) as error:
            if config.distribute == "multi-worker" and isinstance(error, PEER_LOST):
                raise TrainingStopped(f"a worker of the cluster stopped answering ({first_line(error)}); this one "
                                      f"stopped too, its last checkpoint kept. When every worker can run, start "
                                      f"each with: {resume_command(config, run.restore_from)}", 1) from None
            if not is_out_of_space(error):
                raise
            run.remove_temporaries()
            raise run.out_of_space(state.checkpoint.bytes_per_epoch) from None
        return state.history


# What a collective raises when a peer of the cluster died: MultiWorkerMirroredStrategy's health check aborts the
# collectives (unavailable, cancelled, aborted), or the collective timeout (--peer-timeout) passes.
PEER_LOST = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.AbortedError,
             tf.errors.DeadlineExceededError)


def train_epochs(config, run, state, train_steps, outputs, image_count):
    """The epochs from where the state stands to config.epochs: train, score, checkpoint, then the outputs.

    Each epoch's checkpoint is saved before its outputs are written, so no output ever claims an
    epoch the checkpoint does not hold; a resumed run first writes the outputs of the epoch its
    checkpoint ends on, in case the stopped run had not. A signal ends the epoch in `stop`.
    """
    # The same place in the same words as the stop that left it ("epoch 2, step 7/31").
    where = ("from scratch" if not config.resume else f"resuming at epoch {state.epochs_done + 1}, step "
             f"{state.skip}/{state.steps}" if state.skip else f"resuming after epoch {state.epochs_done}")
    data = (f" on {image_count} pictures of {len(config.class_names) or 'no'} classes in {config.data_dir}"
            if config.dataset == "folder" else "")
    print(f"Training {config.script}{data} for {utils.counted(config.epochs, 'epoch')} of "
          f"{utils.counted(state.steps, 'step')} (batch {config.batch_size}, {image_count} images), {where}; "
          f"outputs in {run.path}")
    state.started = time.perf_counter() - state.history["total_seconds"]
    trained = state.epochs_done >= config.epochs  # Stopped in its closing outputs: only those remain.
    epoch = state.epochs_done
    try:
        with StopRequests() as requests:
            try:
                if epoch and not state.skip and (trained or outputs_behind(run, epoch)):
                    with requests.at_once(epoch_saved=True):
                        outputs.write_epoch(epoch, gif=trained)
                for epoch in range(state.epochs_done + 1, config.epochs + 1):
                    first_step = state.skip if epoch == state.epochs_done + 1 else 0
                    batches = epoch_batches(config.seed, epoch, image_count, state.steps, config.batch_size)
                    means, seconds = run_epoch(config, state, outputs, train_steps, epoch, batches, first_step,
                                               requests)
                    outputs.end_epoch(epoch, means, seconds, requests)  # A signal in its evaluation: StopNow.
                    state.checkpoint.save(state.history, epoch, 0)  # Then the next epoch, its outputs beside it.
                    outputs.write_epoch(epoch, gif=requests.signal is not None or epoch == config.epochs)
                    if requests.signal:
                        raise StopNow(epoch_saved=True)
                with requests.at_once(epoch_saved=True):  # The closing outputs: a resume writes them.
                    outputs.finish()
            except StopNow as stopped:
                raise stop(config, run, state, outputs, requests.signal, epoch, stopped) from None
    except BaseException:  # Whatever stops the run, the files being written are finished first.
        with contextlib.suppress(Exception):
            outputs.close()
        raise


def stop(config, run, state, outputs, signum, epoch, stopped):
    """The one place a signal stops training: keep what the epoch has not saved, then the TrainingStopped.

    Mid-epoch (`stopped.step` steps in) or in the epoch's evaluation (all its steps in, the
    evaluation dropped), the checkpoint and history.json say how far it got and the plots and GIF
    cover the epochs before; after the epoch's own checkpoint and outputs, nothing is left to save.
    """
    if stopped.epoch_saved:
        outputs.close()
        where = f"the end of epoch {epoch}"
    else:
        step = stopped.step if stopped.step is not None else state.steps
        state.history["evaluations"] = [e for e in state.history["evaluations"] if e["epoch"] != epoch]
        state.history["partial_epoch"] = state.save_mid_epoch(epoch, step, stopped.seconds)
        outputs.stopped(epoch - 1)
        where = (f"epoch {epoch}, step {step}/{state.steps}" if step < state.steps
                 else f"the end of epoch {epoch}, before its evaluation")
    return interrupted(signum, config, run, where)


# ---------------------------------------------------------------------------------------------
# The state: the script's models and step, the average of G, the checkpoint, the history
# ---------------------------------------------------------------------------------------------


def start_or_restore(config, run, state, steps):
    """Give the run's TrainingState (`make_state`) its checkpoint; with --resume, restore it from the last one."""
    fixed_noise = np.random.default_rng(config.seed).standard_normal((config.sample_grid ** 2, config.latent_dim))
    state.checkpoint = Checkpoint(run, state.trackables(), fixed_noise, steps, config.saved_precision)
    if config.resume:
        state.history = state.checkpoint.restore()
    state.epochs_done, state.skip = state.checkpoint.position()
    state.fixed_noise, state.steps = state.checkpoint.fixed_noise(), steps
    if config.lr_change and config.resume:  # A lower --lr, after a divergence say.
        for optimizer in (state.g_optimizer, state.d_optimizer):
            optimizer.learning_rate = config.lr
        before, after = config.lr_change
        state.history.setdefault("lr_changes", []).append(
            {"epoch": state.epochs_done, "step": state.skip, "from": before, "to": after})
        print(f"Learning rate lowered from {before:g} to {after:g} after epoch {state.epochs_done}, step {state.skip}")
    finished = run.random_samples.is_file() and (run.metrics.is_file() or not state.history["evaluations"])
    if config.resume and state.epochs_done >= config.epochs and finished:  # Else it stopped in its last outputs.
        raise UsageError(f"argument --epochs: the run in {run.path} has already trained {utils.counted(state.epochs_done, 'epoch')}; "
                         f"pass a larger --epochs to train on")


def make_state(config, build_training, strategy=None):
    """Seed, set the precision policy, call the script's `build_training(config)` and add the average of G
    (with --ema), all in `strategy`'s scope (the default: one device); a fresh TrainingState."""
    with (strategy or tf.distribute.get_strategy()).scope():
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:  # Repeatable ops, for bit-exact repeats on GPUs.
            tf.config.experimental.enable_op_determinism()
        speed.set_precision(config.precision)
        if not config.xla and not distribute.gpus():
            # Grappler's remapper fails on the DCGAN's bias-free convolution + batch norm + LeakyReLU
            # ("remapper failed ... LeakyReluGrad ... missing node BiasAdd") and skips the whole graph;
            # switched off, the error line goes and the step measured as fast or faster on the CPU. Only there:
            # on GPUs its convolution + bias + activation and batch-norm fusions count.
            tf.config.optimizer.set_experimental_options({"remapping": False})
        train_step, parts = build_training(config)
        state = TrainingState(**parts, train_step=train_step)
        if config.ema:
            # A fixed batch of noise (and balanced labels) for the batch-norm statistics of the average.
            noise = np.random.default_rng(config.seed + 3).standard_normal((2000, config.latent_dim)).astype(np.float32)
            labels = models.one_hot(models.balanced_labels(len(noise), config), config)
            state.averaged = models.AveragedGenerator(state.generator, config.ema,
                                                      [noise, labels] if config.conditional else noise)
    return state


def write_run_start(config, run, images, transform, history):
    """config.json (the resolved configuration, marked as this project's) and real_samples.png, before
    the first step; a resumed run rewrites them (with the learning rates it changed to)."""
    utils.save_json(run.config, {"format": run_directory.FORMAT} | resolved_config(config) | {
        "data_source": utils.data_source(config), "transform": transform, "image_shape": list(images.shape[1:]), "training_images": len(images),
        "tensorflow": tf.__version__, "lr_changes": history.get("lr_changes", [])})
    # Spread over the whole set, which a folder holds class by class: every class, as the model sees them.
    shown = np.linspace(0, len(images) - 1, min(config.sample_grid ** 2, len(images))).round().astype(int)
    utils.save_png(run.real_samples, utils.image_grid(images[shown], config.sample_grid))


def resolved_config(config):
    """The configuration as a JSON-ready dict: the hyperparameters, then the run's settings."""
    resolved = {key: getattr(config, key) for key in config.hyperparameters}
    resolved.update(script=config.script, out=str(config.out), data_dir=config.data_dir,
                    num_samples=config.num_samples, precision=config.precision, xla=config.xla,
                    steps_per_call=config.steps_per_call, checkpoint_minutes=config.checkpoint_minutes,
                    deterministic=config.deterministic, data_shape=list(config.data_shape),
                    class_names=list(config.class_names),
                    constants=dict(config.constants))  # As the script's top held them: --resume sees an edit.
    return resolved


# ---------------------------------------------------------------------------------------------
# An epoch of compiled calls
# ---------------------------------------------------------------------------------------------


def epoch_batches(seed, epoch, count, steps, batch_size):
    """The image indices of each step of one epoch, (steps, batch_size): a permutation fixed by (seed, epoch).

    Because the order depends on nothing else, a resumed run sees exactly the batches that an
    uninterrupted one would, even from the middle of an epoch. The ragged last batch is dropped.
    """
    return np.random.default_rng([seed, epoch]).permutation(count)[:steps * batch_size].reshape(steps, batch_size)


def run_epoch(config, state, outputs, train_steps, epoch, batches, first_step, requests):
    """Train one epoch from `first_step`, call by call; return (the epoch's metric means, its seconds).

    One call is kept in flight: the next call is dispatched before the last one's values are read,
    so the host's reading, checking and recording overlap the device's steps. After each call is
    read: stop on a non-finite value (keeping the last good checkpoint), record the steps, update
    the status line. For a signal (StopNow for `stop`) or a --checkpoint-minutes save, nothing more
    is dispatched and the call in flight is read first, so that the state saved is the steps recorded.
    """
    steps, history = len(batches), state.history
    partial = history.pop("partial_epoch", None) if first_step else None
    resumed_seconds = partial["seconds"] if partial else 0.0
    epoch_start = time.perf_counter() - resumed_seconds

    def read(call_start, values):
        """Read a dispatched call's values, check and record them; return (the step after it, seconds so far)."""
        call_values = np.asarray(values)
        check_finite(call_values, epoch, call_start, outputs.run, config, state.steps_run)
        state.steps_run += len(call_values)
        outputs.record_steps(call_values, (epoch - 1) * steps + call_start)
        step, elapsed = call_start + len(call_values), time.perf_counter() - epoch_start
        outputs.status.update(epoch, step, steps, (step - first_step) * config.batch_size
                              / max(elapsed - resumed_seconds, 1e-9), dict(zip(METRICS, call_values[-1].tolist())))
        return step, elapsed

    in_flight = None  # (first step, values) of the call dispatched and not yet read
    for call_start in range(first_step, steps, config.steps_per_call):
        dispatched = (call_start, train_steps(batches[call_start:call_start + config.steps_per_call]))
        if in_flight:
            read(*in_flight)  # While the device runs the call just dispatched.
        in_flight = dispatched
        due = state.checkpoint.due(config.checkpoint_minutes)
        if requests.signal or due:
            step, elapsed = read(*in_flight)
            in_flight = None
            if step < steps and requests.signal:
                raise StopNow(step=step, seconds=elapsed)
            if step < steps and due:
                state.save_mid_epoch(epoch, step, elapsed)
    if in_flight:
        read(*in_flight)
    means = {key: float(np.mean(history["iterations"][key][-steps:])) for key in METRICS}
    return means, time.perf_counter() - epoch_start
