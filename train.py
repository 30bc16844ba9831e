"""The training loop both scripts run: start or restore, epochs of compiled steps, the end-of-epoch outputs.

Not a script of its own: `gan_mnist.py` and `dcgan_mnist.py` call `train` with their `build(config)`,
which returns the GAN's train step (one D and one G update on a batch) and the state a checkpoint
holds. Around the steps this module keeps the run's bookkeeping: the checkpoint (`Checkpoint`),
the progress line and the signals that stop a run cleanly (`StatusLine`, `StopRequests`), and
what a user looks at after each epoch (`EpochOutputs`). Steps run `--steps-per-call` at a time in
one compiled call with the dataset on the device (`compile_steps`).
"""

import contextlib
import json
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

import evaluation
import gan
import sample
import speed
import utils
from errors import DataError, TrainingStopped, UsageError, is_out_of_space, model_sizes, out_of_memory
import run_directory

METRICS = ("d_loss", "g_loss", "d_real", "d_fake")  # What each train step returns, per batch.


CHECKPOINT_MINUTES = 10.0  # Besides each epoch's end: a crash loses minutes of training, not an epoch.


def add_flags(parser):
    """The training flags that are not hyperparameters."""
    training = parser.add_argument_group("training")
    training.add_argument("--deterministic", action="store_true",
                          help="enable TensorFlow's op determinism, for bit-exact repeats on GPUs (slower)")
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


def train(config, run, data, build, transform="none", hooks=None):
    """Train the GAN that `build(config)` makes on `data` (images, labels), writing every output into `run`.

    `build(config)` returns (train_step, state): `train_step(images, labels)` runs one D and one G
    update and returns the batch's METRICS; `state` names what a checkpoint must hold to go on (the
    models `generator` and `discriminator`, their optimizers, the noise generator `noise_rng`).
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
        match_saved_precision(config, run)
        print_devices(config)
        with out_of_memory("building the models", model_sizes(config)):
            session = start_or_restore(config, run, build, hooks, steps)
        try:
            write_run_start(config, run, images, transform, session.history)
            train_steps = hooks.calls(compile_steps(session.train_step, tf.constant(images), tf.constant(labels),
                                                    config))
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
    final = session.epochs_done >= config.epochs  # Stopped in its closing outputs: only those remain.
    if session.epochs_done and not session.skip and (final or outputs_behind(run, session.epochs_done)):
        outputs.write_epoch(session.epochs_done, gif=final)
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


def outputs_behind(run, epochs_done):
    """Whether the run's outputs lack the last checkpointed epoch (it was stopped between the two)."""
    try:
        written = json.loads(run.history.read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True
    return (not written or written[-1].get("epoch") != epochs_done or not run.epoch_grid(epochs_done).is_file()
            or not run.generator.is_file())


def match_saved_precision(config, run):
    """On --resume, keep fp16 (whose optimizers carry a loss scale) or non-fp16, as the checkpoint holds.

    An explicit --precision that crosses that line is refused naming the flag; `auto` follows the run.
    """
    saved = getattr(config, "saved_run", None)
    before = (saved or {}).get("precision", "fp32")
    if not config.resume or (before == "fp16") == (config.precision == "fp16"):
        return
    if getattr(config, "precision_requested", "auto") != "auto":
        raise UsageError(f"argument --precision: the run in {run.path} was trained in {before}; "
                         f"{'fp16 adds' if before != 'fp16' else 'it has'} a loss scale that "
                         f"{'its checkpoint lacks' if before != 'fp16' else config.precision + ' lacks'}: "
                         f"resume in {before if before == 'fp16' else 'bf16 or fp32'}")
    config.precision = "fp16" if before == "fp16" else "fp32"


# ---------------------------------------------------------------------------------------------
# Start or restore: the models, the average of G, the checkpoint, the history, the fixed noise
# ---------------------------------------------------------------------------------------------


def print_devices(config):
    devices = [f"{d.device_type}:{d.name.split(':')[-1]}" for d in tf.config.list_physical_devices("GPU")]
    print(f"TensorFlow {tf.__version__} on {', '.join(devices) or 'the CPU (no GPU found)'}; precision "
          f"{config.precision}, XLA {'on' if config.xla else 'off'}, {config.steps_per_call} steps per call")


def start_or_restore(config, run, build, hooks, steps):
    """Build everything a run holds and, with --resume, restore it from the last checkpoint.

    Returns a namespace: the train step, `state`, the `averaged` generator (or None), the
    `sampler` that draws every sample (the average with --ema, else G), the `checkpoint`, the
    `history`, how far training got (`epochs_done`, and `skip` steps into the next epoch) and the
    `fixed_noise` of the progress grids.
    """
    train_step, state, averaged = build_for_training(config, build)
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
                           steps=steps)


def build_for_training(config, build):
    """Seed, set the precision policy, call the script's `build(config)`, and add the average of G.

    Returns (train_step, state, averaged): with --ema, `averaged` is the AveragedGenerator,
    `train_step` also updates it and `state` (what a checkpoint holds) includes it; else None.
    """
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
    refresh_labels = gan.one_hot(gan.balanced_labels(len(refresh_noise), config), config)
    averaged = gan.AveragedGenerator(generator, config.ema,
                                     [refresh_noise, refresh_labels] if len(generator.inputs) == 2 else refresh_noise)

    def step_and_average(real_images, real_labels):
        values = train_step(real_images, real_labels)
        averaged.update()
        return values

    return step_and_average, state | {"averaged_generator": averaged.variables}, averaged


def seed_everything(config):
    """Seed Python, numpy and TensorFlow from --seed; with --deterministic, make TensorFlow's ops repeatable."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


class Checkpoint:
    """The whole training state, saved together so that a resumed run equals an uninterrupted one.

    It holds the models, optimizers and noise generator of `state`, the fixed noise of the progress
    grids, how far training got (completed epochs, and steps into the next) and the history, in
    `checkpoints/` (the last three kept). TensorFlow writes each to `ckpt-N_temp/` and renames it
    into place, so a crash mid-save leaves the earlier ones whole; `restore` falls back past any
    that do not read.
    """

    def __init__(self, run, state, fixed_noise, steps_per_epoch):
        self.run = run
        self.progress = {"fixed_noise": tf.Variable(fixed_noise.astype(np.float32), trainable=False),
                         "epochs_done": tf.Variable(0, dtype=tf.int64, trainable=False),
                         "steps_into_epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
                         "history": tf.Variable("", dtype=tf.string, trainable=False)}
        # Keras 3 models are not tracked by tf.train.Checkpoint, so their variables go in as lists
        # (all of them: weights, batch-norm statistics and the dropout layers' random-number state).
        tracked = {name: list(value.variables) if isinstance(value, keras.Model) else value
                   for name, value in state.items()}
        self.checkpoint = tf.train.Checkpoint(**tracked, **self.progress)
        self._rebuild_lost_index()
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(run.checkpoints), max_to_keep=3)
        self.steps_per_epoch = steps_per_epoch
        self.saved_at = time.perf_counter()
        # About what one checkpoint and an epoch's outputs take on disk: the models' weights with
        # Adam's two moments, the average and generator.keras (float32), and a few MB of pictures.
        weights = {name: sum(int(np.prod(v.shape)) for v in state[name].variables)
                   for name in ("generator", "discriminator")}
        self.bytes_per_epoch = 4 * (5 * weights["generator"] + 3 * weights["discriminator"]) + 3 * 2**20

    def _rebuild_lost_index(self):
        """Write `checkpoints/checkpoint`, the index TensorFlow reads, if it is lost while checkpoints remain."""
        index, prefixes = self.run.checkpoints / "checkpoint", self.run.checkpoint_prefixes()
        if prefixes and not index.is_file():
            names = [Path(prefix).name for prefix in reversed(prefixes)]
            index.write_text(f'model_checkpoint_path: "{names[-1]}"\n'
                             + "".join(f'all_model_checkpoint_paths: "{name}"\n' for name in names))

    def restore(self):
        """Restore the newest checkpoint that reads into the state, saying which were skipped and why;
        return the history it holds. DataError if none can be restored."""
        skipped = []
        for prefix in self.run.checkpoint_prefixes():
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
                history = json.loads(self.progress["history"].numpy().decode())
            except (AssertionError, ValueError, IndexError, tf.errors.OpError) as error:
                skipped.append(f"{Path(prefix).name} ({type(error).__name__}: {str(error).strip().splitlines()[0]})")
                continue
            if skipped:
                print(f"{self.run.checkpoints}: skipped the newer {'; '.join(skipped)}; resuming from "
                      f"{Path(prefix).name}", file=sys.stderr)
            return history
        raise DataError(f"{self.run.checkpoints}: no checkpoint can be restored into this model: {'; '.join(skipped)}")

    def position(self):
        """(completed epochs, steps into the next) of the state as restored, or (0, 0)."""
        return int(self.progress["epochs_done"].numpy()), int(self.progress["steps_into_epoch"].numpy())

    def fixed_noise(self):
        return self.progress["fixed_noise"].numpy()

    def due(self, minutes):
        """Whether `minutes` (> 0) have passed since the last save (or the start)."""
        return minutes > 0 and time.perf_counter() - self.saved_at >= 60 * minutes

    def save(self, history, epochs_completed, steps_into_epoch):
        """Save everything after `epochs_completed` epochs and `steps_into_epoch` steps of the next."""
        self.progress["epochs_done"].assign(epochs_completed)
        self.progress["steps_into_epoch"].assign(steps_into_epoch)
        self.progress["history"].assign(json.dumps(history))
        self.manager.save(checkpoint_number=epochs_completed * self.steps_per_epoch + steps_into_epoch)
        self.saved_at = time.perf_counter()


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
                    steps_per_call=config.steps_per_call, checkpoint_minutes=config.checkpoint_minutes)
    return resolved


# ---------------------------------------------------------------------------------------------
# An epoch of compiled calls: the NaN guard, signals, the status line
# ---------------------------------------------------------------------------------------------


def compile_steps(train_step, images, labels, config):
    """K training steps in one compiled call, each gathering its batch from the dataset on the device.

    `images` is the uint8 training set (N, S, S, C); each batch is scaled to [-1, 1] in the call and
    passed to `train_step(images, labels)` with its int32 labels (which an unconditional GAN ignores).
    The returned function takes (K, batch_size) image indices and returns (K, 4) float32 values of
    METRICS. Its signature leaves K open, so the shorter last call of an epoch does not retrace.
    """

    @tf.function(input_signature=[tf.TensorSpec((None, config.batch_size), tf.int32)], jit_compile=config.xla)
    def train_steps(batch_indices):
        count = tf.shape(batch_indices)[0]
        values = tf.TensorArray(tf.float32, size=count)
        for index in tf.range(count):
            batch = tf.cast(tf.gather(images, batch_indices[index]), tf.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]
            step_values = train_step(batch, tf.gather(labels, batch_indices[index]))
            values = values.write(index, tf.stack([tf.cast(step_values[key], tf.float32) for key in METRICS]))
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
        check_finite(call_values, epoch, call_start, outputs.run, config)
        outputs.record_steps(call_values, (epoch - 1) * steps + call_start)
        step = call_start + len(call_values)
        elapsed = time.perf_counter() - epoch_start
        outputs.status.update(epoch, step, steps, (step - first_step) * config.batch_size
                              / max(elapsed - resumed_seconds, 1e-9), dict(zip(METRICS, call_values[-1].tolist())))
        if step < steps and (stop.signal or session.checkpoint.due(config.checkpoint_minutes)):
            save_mid_epoch(session, epoch, step, elapsed)
        if stop.signal and step < steps:
            history["partial_epoch"] = {"epoch": epoch, "step": step, "seconds": round(elapsed, 3)}
            outputs.stopped(epoch - 1)
            raise interrupted(stop.signal, config, outputs.run, f"epoch {epoch}, step {step}/{steps}")
    means = {key: float(np.mean(history["iterations"][key][-steps:])) for key in METRICS}
    return means, time.perf_counter() - epoch_start


def save_mid_epoch(session, epoch, step, seconds):
    """Checkpoint `step` steps into `epoch` (the history records how far, and the epoch's seconds so far)."""
    history = session.history
    history["partial_epoch"] = {"epoch": epoch, "step": step, "seconds": round(seconds, 3)}
    history["total_seconds"] = round(time.perf_counter() - session.started, 3)
    session.checkpoint.save(history, epoch - 1, step)
    del history["partial_epoch"]


def check_finite(call_values, epoch, call_start, run, config):
    """Stop the run, naming the value, epoch and step, if any step of the call returned NaN or infinity."""
    finite = np.isfinite(call_values).all(axis=1)
    if finite.all():
        return
    row = int(np.argmin(finite))
    bad = METRICS[int(np.argmin(np.isfinite(call_values[row])))]
    prefixes = run.checkpoint_prefixes()
    command = resume_command(config, run, "--lr", f"{config.lr / 2:g}")
    raise TrainingStopped(
        f"{bad} is {call_values[row][METRICS.index(bad)]} at epoch {epoch}, step {call_start + row + 1}: "
        f"training diverged and stopped; "
        + (f"the last good checkpoint, {Path(prefixes[0]).name}, is kept: continue it with a lower rate, "
           f"{command}" if prefixes else "no checkpoint yet: start again with a lower --lr"), 1)


def resume_command(config, run, *extra):
    """The shell command (quoted) that resumes this run."""
    return shlex.join(["python", f"{config.script}.py", "--out", str(run.path), "--resume", *extra])


def interrupted(signum, config, run, where):
    """The TrainingStopped of a signal: where it stopped, and the command that resumes."""
    return TrainingStopped(
        f"{signal.Signals(signum).name}: stopped at {where} and saved a checkpoint, the history, the plots and "
        f"the GIF so far. Resume with: {resume_command(config, run)}", 128 + signum)


class StatusLine:
    """A one-line progress display: position in the epoch, losses and speed.

    On a terminal it rewrites itself in place; in a log file it prints a line every tenth of an epoch.
    """

    def __init__(self, epochs):
        self.epochs = epochs
        self.interactive = sys.stdout.isatty()
        self._last_printed = (0, 0)  # (epoch, tenth of it) of the last line printed to a log

    def update(self, epoch, step, steps, images_per_second, values):
        """Show the running position; on a terminal after every call, in a log every tenth of an epoch."""
        text = f"epoch {epoch}/{self.epochs} step {step}/{steps} | {describe(values)} | {images_per_second:.0f} img/s"
        if self.interactive:
            print("\r" + text, end="", flush=True)
        elif step < steps and (epoch, step * 10 // steps) > self._last_printed:
            self._last_printed = (epoch, step * 10 // steps)
            print(text, flush=True)

    def finish_line(self, text):
        """Replace the running line with `text`."""
        print(("\r\033[K" if self.interactive else "") + text, flush=True)


def describe(values):
    return (f"D loss {values['d_loss']:.3f} G loss {values['g_loss']:.3f} "
            f"D(x) {values['d_real']:.2f} D(G(z)) {values['d_fake']:.2f}")


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


# ---------------------------------------------------------------------------------------------
# The end of an epoch, and of the run: grids, TensorBoard, evaluation, the generator, plots
# ---------------------------------------------------------------------------------------------


class EpochOutputs:
    """Everything a user looks at while a run trains, written into its directory (keras-io's GANMonitor).

    Per step: the history's iterations and TensorBoard scalars. Per epoch: the fixed-noise grid,
    TensorBoard, every `--eval-every` epochs an evaluation (the raw G beside the average), the
    trained generator, the history and plots. At the end: random_samples.png and metrics.json.
    """

    def __init__(self, config, run, session, evaluator, transform, hooks):
        self.config, self.run, self.session, self.evaluator = config, run, session, evaluator
        self.transform, self.hooks = transform, hooks
        self.history = session.history
        self.writer = tf.summary.create_file_writer(str(run.tensorboard))
        self.status = StatusLine(config.epochs)
        self.grid_noise, self.grid_labels, self.grid_columns = grid_inputs(config, session.fixed_noise)

    def record_steps(self, call_values, steps_before):
        """Append a call's per-step values to the history and to TensorBoard."""
        for row, step_values in enumerate(call_values.tolist()):
            for key, value in zip(METRICS, step_values):
                self.history["iterations"][key].append(value)
            with self.writer.as_default(step=steps_before + row + 1):
                for key, value in zip(METRICS, step_values):
                    tf.summary.scalar(f"iteration/{key}", value)

    def end_epoch(self, epoch, means, seconds, stop):
        """The epoch's summary line, the average's refresh and, when due, the evaluation; then the epoch
        joins the history. Writes no file: the checkpoint comes first (see `write_epoch`)."""
        config, steps = self.config, self.session.steps
        images_per_second = steps * config.batch_size / seconds
        self.status.finish_line(f"epoch {epoch}/{config.epochs} | {describe(means)} | {seconds:.1f} s, "
                                f"{images_per_second:.0f} img/s | {self.run.epoch_grid(epoch).name}")
        if self.session.averaged:
            self.session.averaged.refresh()
        if self.evaluator and (epoch % config.eval_every == 0 or epoch == config.epochs):
            with stop.at_once():  # It takes seconds: a signal interrupts it.
                self.evaluate(epoch)
        self.history["epochs"].append({"epoch": epoch, **means, "seconds": round(seconds, 3),
                                       "images_per_second": round(images_per_second, 1)})
        self.history["total_seconds"] = round(time.perf_counter() - self.session.started, 3)

    def write_epoch(self, epoch, gif=False):
        """The outputs of a checkpointed epoch: its grid, TensorBoard, the generator file, history and plots."""
        steps = self.session.steps
        grid = utils.image_grid(sample.sample_images(self.session.sampler, self.grid_noise, self.grid_labels),
                                self.grid_columns)
        utils.save_png(self.run.epoch_grid(epoch), grid)
        summary = next(e for e in self.history["epochs"] if e["epoch"] == epoch)
        evaluations = [e for e in self.history["evaluations"] if e["epoch"] == epoch]
        with self.writer.as_default(step=epoch * steps):
            for key in METRICS + ("seconds",):
                tf.summary.scalar(f"epoch/{key}", summary[key])
            tf.summary.image("fixed_noise_grid", grid.reshape((1,) + grid.shape[:2] + (-1,)))
            for figures in evaluations:
                for key in evaluation.FIGURES:
                    tf.summary.scalar(f"evaluation/{key}", figures[key])
                    if "raw" in figures:
                        tf.summary.scalar(f"evaluation_raw_generator/{key}", figures["raw"][key])
        self.writer.flush()
        with utils.atomic_path(self.run.generator) as temporary:
            self.session.sampler.save(temporary)
        self.write_pictures(epoch, gif=gif)

    def evaluate(self, epoch):
        """Score the sampler (and, with --ema, the raw G beside it); print the figures and keep them in the history."""
        config, evaluator, averaged = self.config, self.evaluator, self.session.averaged

        def score(generator):
            return sample.evaluate_generator(evaluator, generator, config.num_samples, config.seed,
                                             self.transform, config)

        figures = score(self.session.sampler)
        if averaged:  # The raw generator too: the same training without the average, for comparison.
            raw = score(self.session.state["generator"])
            figures["raw"] = {key: raw[key] for key in evaluation.FIGURES}
        print(f"  evaluation at epoch {epoch}: FID {figures['fid']:.3g} (real data {evaluator.floor['fid']:.3g}), "
              f"IS {figures['inception_score']:.3g}, {figures['classes_covered']}/{figures['classes']} classes, "
              f"confidence {figures['confidence']:.3f} ({figures['seconds']:.1f} s)"
              + (f"; raw G without the average: FID {figures['raw']['fid']:.3g}, IS "
                 f"{figures['raw']['inception_score']:.3g}, {figures['raw']['classes_covered']} classes"
                 if averaged else ""))
        self.history["evaluations"].append({"epoch": epoch, **figures})
        self.hooks.evaluated(epoch, figures, score)

    def stopped(self, epochs_done):
        """When a signal stops training: the history, plots and GIF so far, and TensorBoard closed."""
        self.write_pictures(epochs_done, gif=True)
        self.writer.close()

    def write_pictures(self, epochs_done, gif=False):
        """The history and the loss and metric plots; with `gif`, the GIF of every epoch grid so far.

        The GIF re-reads every grid, so it is made when training stops (at the end, or interrupted),
        not after every epoch; a resumed run rebuilds it from all the grids.
        """
        run, history = self.run, self.history
        utils.save_json(run.history, history, indent=None)  # Compact: it holds every iteration.
        utils.plot_history(run.loss_plot, history)
        if self.evaluator and history["evaluations"]:
            utils.plot_metrics(run.metrics_plot, history["evaluations"], self.evaluator.floor)
        if gif:
            utils.save_gif(run.progress_gif,
                           [run.epoch_grid(e) for e in range(1, epochs_done + 1) if run.epoch_grid(e).is_file()])

    def finish(self):
        """random_samples.png from fresh noise, metrics.json, and the run's closing lines."""
        config, run, evaluator = self.config, self.run, self.evaluator
        random_noise = np.random.default_rng(config.seed + 1).standard_normal((config.sample_grid ** 2,
                                                                                config.latent_dim))
        random_noise, random_labels, columns = grid_inputs(config, random_noise.astype(np.float32))
        # The average's batch-norm statistics were refreshed after the last epoch; nothing has moved since.
        utils.save_png(run.random_samples, utils.image_grid(
            sample.sample_images(self.session.sampler, random_noise, random_labels), columns))
        self.writer.close()
        total = self.history["total_seconds"]
        print(f"Done: {config.epochs} epochs in {total:.1f} s ({total / config.epochs:.1f} s/epoch). "
              f"Outputs in {run.path}")
        if evaluator:
            final = self.history["evaluations"][-1]
            utils.save_json(run.metrics, {"epoch": final["epoch"], "figures": final, "real_data_floor": evaluator.floor,
                                          "classifier_test_accuracy": evaluator.test_accuracy})
            print(f"Sample quality after epoch {final['epoch']} ({final['samples']} samples; {config.dataset} "
                  f"classifier test accuracy {evaluator.test_accuracy:.4f}; written to {run.metrics.name}):\n"
                  f"{evaluation.format_figures(final, evaluator.floor)}")


def grid_inputs(config, noise):
    """Noise and labels for a progress grid from `noise` (grid x grid vectors).

    Unconditional: the grid x grid vectors, no labels. Conditional: one row per class in play and
    one column per noise vector, the same vector down each column, so each frame shows every class
    in the same styles. Returns (noise, one-hot labels or None, columns).
    """
    if not getattr(config, "conditional", False):
        return noise, None, config.sample_grid
    classes = utils.parse_classes(config.classes, config.dataset)
    columns = noise[:config.sample_grid]
    rows = np.repeat(np.array(classes, np.int32), len(columns))
    return np.tile(columns, (len(classes), 1)), gan.one_hot(rows, config), len(columns)
