"""What a user watches while a run trains: the progress line, and each epoch's grid, plots, history and generator.

`EpochOutputs` (after keras-io's GANMonitor) writes them into the run directory once the epoch's
checkpoint is saved; `StatusLine` is the one-line progress display.
"""

import collections
import json
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

import utils
from ganlab import models
from ganlab.sampling import evaluation, sample

METRICS = ("d_loss", "g_loss", "d_real", "d_fake")  # What each train step returns, per batch.


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


class BackgroundFiles:
    """Writes files beside training, in one thread, in the order given, so that the device never waits for
    a plot. A job submitted under the `key` of one not yet started replaces it (only the newest loss
    plot matters). A job's error (a full disk, say) is raised in the training thread at the next
    `submit` or `wait`. Every job writes atomically (utils.atomic_path), so a kill at any moment
    leaves whole files; the run's end, and a stop, `wait` for all of them.
    """

    def __init__(self):
        self._jobs = collections.OrderedDict()  # key -> job, oldest first
        self._condition = threading.Condition()
        self._busy, self._error = False, None
        threading.Thread(target=self._work, name="outputs", daemon=True).start()

    def submit(self, key, job):
        """Run `job()` in the writer thread, after the jobs before it; it replaces a waiting job of `key`."""
        self._raise_error()
        with self._condition:
            self._jobs.pop(key, None)
            self._jobs[key] = job
            self._condition.notify_all()

    def wait(self):
        """Return once every submitted job has run; raise the first error of one."""
        with self._condition:
            while self._jobs or self._busy:
                self._condition.wait(0.1)  # A timeout, so that a signal's handler runs meanwhile.
        self._raise_error()

    def _raise_error(self):
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _work(self):
        while True:
            with self._condition:
                while not self._jobs:
                    self._condition.wait()
                _, job = self._jobs.popitem(last=False)
                self._busy = True
            try:
                job()
            except Exception as error:  # noqa: BLE001 - handed to the training thread, which says it in one line.
                self._error = self._error or error
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()


class EpochOutputs:
    """Everything a user looks at while a run trains, written into its directory (keras-io's GANMonitor).

    Per step: the history's iterations; per compiled call, TensorBoard scalars. Per epoch: the fixed-noise grid,
    TensorBoard, every `--eval-every` epochs an evaluation (of the generator that samples), the
    trained generator, the history and plots. At the end: random_samples.png and metrics.json.
    """

    def __init__(self, config, run, state, transform, hooks):
        self.config, self.run, self.state = config, run, state
        self.scores = bool(config.eval_every)  # Evaluated: by `evaluator`, loaded at the first evaluation.
        self._evaluator = None
        self.transform, self.hooks = transform, hooks
        self.history = state.history
        self.writer = tf.summary.create_file_writer(str(run.tensorboard))
        self.status = StatusLine(config.epochs)
        self.grid_noise, self.grid_labels, self.grid_columns = grid_inputs(config, state.fixed_noise)
        self.files = BackgroundFiles()
        with tf.device("/CPU:0"):  # What generator.keras is saved from, beside training: a copy of the sampler.
            self.saved_generator = keras.models.clone_model(state.sampler)
        self.metrics_plotted = 0  # Evaluations in metrics.png (the writer thread's): redrawn only when new.
        self.loss_plot_at, self.loss_plot_seconds = float("-inf"), 0.0  # When losses.png was drawn, in how long.
        self.generator_at, self.generator_seconds = float("-inf"), 0.0  # And generator.keras saved.
        self.unsaved_weights = None  # The last epoch's sampler weights, when generator.keras does not hold them yet.

    def record_steps(self, call_values, steps_before):
        """Append a call's per-step values to the history; TensorBoard gets one point per call (its steps'
        mean, at its last step), so that a call of K steps costs four summary writes, not 4K."""
        for key, values in zip(METRICS, call_values.T.tolist()):
            self.history["iterations"][key].extend(values)
        with self.writer.as_default(step=steps_before + len(call_values)):
            for key, value in zip(METRICS, call_values.mean(axis=0).tolist()):
                tf.summary.scalar(f"iteration/{key}", value)

    @property
    def evaluator(self):
        """The sample-quality evaluator, loaded (or, for a folder, its classifier trained) when first needed:
        at the first evaluation, so that the first picture and step come without waiting for it."""
        if self._evaluator is None and self.scores:
            self._evaluator = sample.load_evaluator(self.config)
        return self._evaluator

    def end_epoch(self, epoch, means, seconds, stop):
        """The epoch's summary line, the average's refresh and, when due, the evaluation; then the epoch
        joins the history. Writes no file: the checkpoint comes first (see `write_epoch`)."""
        config, steps = self.config, self.state.steps
        images_per_second = steps * config.batch_size / seconds
        self.status.finish_line(f"epoch {epoch}/{config.epochs} | {describe(means)} | {seconds:.1f} s, "
                                f"{images_per_second:.0f} img/s")
        if self.state.averaged:
            self.state.averaged.refresh()
        if self.scores and (epoch % config.eval_every == 0 or epoch == config.epochs):
            with stop.at_once(steps, seconds):  # It takes seconds: a signal interrupts it.
                self.evaluate(epoch)
        self.history["epochs"].append({"epoch": epoch, **means, "seconds": round(seconds, 3),
                                       "images_per_second": round(images_per_second, 1)})
        self.history["total_seconds"] = round(time.perf_counter() - self.state.started, 3)

    def write_epoch(self, epoch, gif=False):
        """The outputs of a checkpointed epoch: TensorBoard here; its grid, the generator file, history and plots
        handed to the writer thread (`files`), from copies made now, as training goes on."""
        steps = self.state.steps
        grid = utils.image_grid(sample.sample_images(self.state.sampler, self.grid_noise, self.grid_labels),
                                self.grid_columns)
        path = self.run.epoch_grid(epoch)
        self.files.submit(("grid", epoch), lambda: utils.save_png(path, grid))
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
        # generator.keras as losses.png: at most a tenth of the time; an epoch's weights not saved are kept for
        # when training stops (`close`), so that a stopped run's file is its last epoch's.
        self.unsaved_weights = self.state.sampler.get_weights()
        if gif or time.perf_counter() - self.generator_at >= 10 * self.generator_seconds:
            self.save_generator_beside()
        self.write_pictures(epoch, gif=gif)

    def save_generator_beside(self):
        """Hand the unsaved weights to the writer thread, for generator.keras."""
        weights, self.unsaved_weights = self.unsaved_weights, None
        self.files.submit("generator", lambda: self.save_generator(weights))

    def save_generator(self, weights):
        """generator.keras: the sampler's `weights` (copied when its epoch ended), saved atomically."""
        started = time.perf_counter()
        self.saved_generator.set_weights(weights)
        with utils.atomic_path(self.run.generator) as temporary:
            self.saved_generator.save(temporary)
        self.generator_at, self.generator_seconds = time.perf_counter(), time.perf_counter() - started

    def evaluate(self, epoch):
        """Score the generator that draws the samples (the average with --ema); print the figures and keep them in
        the history. A folder whose classifier is no better than chance gets one line instead, and no scores."""
        config, evaluator = self.config, self.evaluator
        if evaluator.meaningless:
            print(f"No scores for {config.data_dir}: its classifier's {evaluator.meaningless}, so a Fréchet distance, "
                  f"Inception Score or class coverage from it would mean nothing; the grids and losses go on",
                  flush=True)
            self.scores = False
            return

        def score(generator):
            return sample.evaluate_generator(evaluator, generator, config.num_samples, config.seed,
                                             self.transform, config)

        figures = score(self.state.sampler)
        print(f"  evaluation at epoch {epoch}: FID {figures['fid']:.3g} (real data {evaluator.floor['fid']:.3g}), "
              f"IS {figures['inception_score']:.3g} (at most {figures['classes']}), {figures['classes_covered']}/"
              f"{figures['classes']} classes, confidence {figures['confidence']:.3f} ({figures['seconds']:.1f} s)")
        self.history["evaluations"].append({"epoch": epoch, **figures})
        self.hooks.evaluated(epoch, figures, score)

    def stopped(self, epochs_done):
        """When a signal stops training: the history, plots and GIF so far, written before it returns, and
        TensorBoard closed."""
        self.write_pictures(epochs_done, gif=True)
        self.close()

    def close(self):
        """Save the generator of the last epoch written if it is not yet, wait for every file of the writer
        thread, then close TensorBoard."""
        if self.unsaved_weights is not None:
            self.save_generator_beside()
        self.files.wait()
        self.writer.close()

    def write_pictures(self, epochs_done, gif=False):
        """The history, the loss plot (at most a tenth of the time, and always with `gif`) and the metrics plot
        when an evaluation is new; with `gif`, the GIF of every epoch grid so far, all written before it
        returns. All in the writer thread, from a copy.

        The GIF re-reads every grid, so it is made when training stops (at the end, or interrupted),
        not after every epoch; a resumed run rebuilds it from all the grids.
        """
        run, history = self.run, snapshot(self.history)

        def pictures():
            utils.save_json(run.history, history, indent=None)  # Compact: it holds every iteration.
            # losses.png at most a tenth of the time (0.4 s a drawing on a 2-core CPU, against epochs of 1 s on
            # a small set), and always when training stops: the device, or the CPU's other core, trains meanwhile.
            started = time.perf_counter()
            if gif or started - self.loss_plot_at >= 10 * self.loss_plot_seconds:
                utils.plot_history(run.loss_plot, history)
                self.loss_plot_at, self.loss_plot_seconds = time.perf_counter(), time.perf_counter() - started
            # Once this process has an evaluator (a resumed run's metrics.png stands until its first evaluation).
            if self._evaluator and len(history["evaluations"]) != self.metrics_plotted:
                utils.plot_metrics(run.metrics_plot, history["evaluations"], self._evaluator.floor)
                self.metrics_plotted = len(history["evaluations"])

        self.files.submit("pictures", pictures)
        if gif:
            self.files.submit("gif", lambda: utils.save_gif(run.progress_gif, [
                run.epoch_grid(e) for e in range(1, epochs_done + 1) if run.epoch_grid(e).is_file()]))
            self.files.wait()

    def finish(self):
        """random_samples.png from fresh noise, metrics.json, and the run's closing lines."""
        config, run = self.config, self.run
        evaluator = self.evaluator if self.scores and self.history["evaluations"] else None
        random_noise = np.random.default_rng(config.seed + 1).standard_normal((config.sample_grid ** 2,
                                                                                config.latent_dim))
        random_noise, random_labels, columns = grid_inputs(config, random_noise.astype(np.float32))
        # The average's batch-norm statistics were refreshed after the last epoch; nothing has moved since.
        utils.save_png(run.random_samples, utils.image_grid(
            sample.sample_images(self.state.sampler, random_noise, random_labels), columns))
        self.close()
        total = self.history["total_seconds"]
        print(f"Done: {utils.counted(config.epochs, 'epoch')} in {total:.1f} s ({total / config.epochs:.1f} s/epoch). "
              f"Outputs in {run.path}")
        if evaluator:
            final = self.history["evaluations"][-1]
            utils.save_json(run.metrics, {"epoch": final["epoch"], "figures": final, "real_data_floor": evaluator.floor,
                                          "classifier_test_accuracy": evaluator.test_accuracy,
                                          "classifier_test_images": evaluator.test_count,
                                          "real_data_classes": evaluator.reference_histogram})
            print(f"Sample quality after epoch {final['epoch']} ({final['samples']} samples; {config.dataset} "
                  f"classifier test accuracy {evaluator.accuracy_text()}; written to {run.metrics.name}):\n"
                  f"{evaluation.format_figures(final, evaluator.floor)}")


def snapshot(history):
    """A copy of the history that training can go on appending to: its lists copied, their items shared."""
    return {key: ({name: list(values) for name, values in value.items()} if key == "iterations"
                  else list(value) if isinstance(value, list) else value) for key, value in history.items()}


def grid_inputs(config, noise):
    """Noise and labels for a progress grid from `noise` (grid x grid vectors).

    Unconditional: the grid x grid vectors, no labels. Conditional: one row per class in play and
    one column per noise vector, the same vector down each column, so each frame shows every class
    in the same styles. Returns (noise, one-hot labels or None, columns).
    """
    if not config.conditional:
        return noise, None, config.sample_grid
    classes = utils.classes_in_play(config)
    columns = noise[:config.sample_grid]
    rows = np.repeat(np.array(classes, np.int32), len(columns))
    return np.tile(columns, (len(classes), 1)), models.one_hot(rows, config), len(columns)


def outputs_behind(run, epochs_done):
    """Whether the run's outputs lack the last checkpointed epoch (it was stopped between the two)."""
    try:
        written = json.loads(run.history.read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True
    return (not written or written[-1].get("epoch") != epochs_done or not run.epoch_grid(epochs_done).is_file()
            or not run.generator.is_file())
