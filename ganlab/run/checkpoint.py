"""The training state on disk: `checkpoints/` of a run, saved whole, restored from the newest that reads.

TensorFlow writes each checkpoint to `ckpt-N_temp/` and renames it into place (Orbax and Keras's
BackupAndRestore commit theirs the same way), so a crash mid-save leaves the earlier ones whole;
`Checkpoint.restore` falls back past any that do not read, as Lightning resumes from the last good one.
"""

import json
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ganlab.errors import DataError


class Checkpoint:
    """The whole training state, saved together so that a resumed run equals an uninterrupted one.

    It holds the models, optimizers and noise generator of `state`, the fixed noise of the progress
    grids, how far training got (completed epochs, and steps into the next) and the history, in
    `checkpoints/` (the last three kept). TensorFlow writes each to `ckpt-N_temp/` and renames it
    into place, so a crash mid-save leaves the earlier ones whole; `restore` falls back past any
    that do not read.
    """

    def __init__(self, run, state, fixed_noise, steps_per_epoch, saved_precision=None):
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
        # A run that moves between fp16 and another precision reads its optimizers around the loss scale.
        self.reading = tf.train.Checkpoint(**{name: across_loss_scale(value, saved_precision == "fp16")
                                              for name, value in tracked.items()}, **self.progress)
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
        for prefix in self.run.restore_from.checkpoint_prefixes():
            try:
                status = self.reading.restore(prefix)
                status.expect_partial()  # A mismatch is said in one line below, not in TensorFlow's warnings.
                status.assert_existing_objects_matched()
                history = json.loads(self.progress["history"].numpy().decode())
            except (AssertionError, ValueError, IndexError, tf.errors.OpError) as error:
                skipped.append(f"{Path(prefix).name} ({type(error).__name__}: {str(error).strip().splitlines()[0]})")
                # The failed attempt leaves values pending, which TensorFlow lists in WARNING lines when they
                # are collected (at exit, say); the one line here says why instead.
                tf.get_logger().setLevel("ERROR")
                continue
            if skipped:
                print(f"{self.run.restore_from.checkpoints}: skipped the newer {'; '.join(skipped)}; resuming from "
                      f"{Path(prefix).name}", file=sys.stderr)
            return history
        raise DataError(f"{self.run.restore_from.checkpoints}: no checkpoint can be restored into this model: "
                        f"{'; '.join(skipped)}")

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


def across_loss_scale(value, saved_in_fp16):
    """What reads `value` from a checkpoint saved in fp16 (`saved_in_fp16`) or not: an optimizer whose side of
    fp16 differs reads only the Adam state, inside or outside the saved loss-scale optimizer (whose
    scale is dropped, or starts afresh); anything else is read as it is."""
    scaled = isinstance(value, keras.optimizers.LossScaleOptimizer)
    if not isinstance(value, keras.optimizers.Optimizer) or scaled == saved_in_fp16:
        return value
    return value.inner_optimizer if scaled else tf.train.Checkpoint(inner_optimizer=value)
