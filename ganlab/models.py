"""What the two GANs share: conditioning on a label, Adam, the R1 penalty and the average of G's weights.

The losses and the D and G updates are in each script; these are the pieces both scripts call,
each named after the maths it computes.
"""

import keras
import numpy as np
import tensorflow as tf

import utils

# ---------------------------------------------------------------------------------------------
# Conditioning: G(z, y) and D(x, y) with --conditional
# ---------------------------------------------------------------------------------------------


def class_count(config):
    """How many classes the dataset has (the size of a conditional model's one-hot label)."""
    return max(len(config.class_names), 1)


def one_hot(labels, config):
    """Labels (N,) as float32 one-hot vectors (N, classes): what a conditional G and D take."""
    return np.eye(class_count(config), dtype=np.float32)[np.asarray(labels, np.int64)]


def balanced_labels(count, config, start=0):
    """`count` labels cycling through the classes in play (--classes), so every class gets its share;
    from position `start` of that cycle, so that batches drawn one after another continue it."""
    classes = np.array(utils.classes_in_play(config), np.int32)
    return classes[np.arange(start, start + count) % len(classes)]


def assemble(layers, input_shape, config, name, flatten=False):
    """A model applying `layers` to an input of `input_shape`; with --conditional it also takes a label.

    The label (one-hot, (N, classes)) joins the input: concatenated to a vector (z, or the image
    once flattened with `flatten`), or to an image as one constant plane per class stacked on its
    channels. Built from Keras layers only, so a saved model loads in safe mode.
    """
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(inputs) if flatten else inputs
    if config.conditional:
        label = keras.Input((class_count(config),))
        if len(x.shape) == 2:
            x = keras.layers.Concatenate()([x, label])                              # (N, features + classes)
        else:
            planes = keras.layers.Reshape((1, 1, class_count(config)))(label)
            planes = keras.layers.UpSampling2D(size=tuple(input_shape[:2]))(planes)  # (N, H, W, classes)
            x = keras.layers.Concatenate()([x, planes])                            # (N, H, W, C + classes)
        inputs = [inputs, label]
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name=name)


def label_helpers(config, rng):
    """For a train step: `random_labels(n)`, uniform over the classes in play (every one of them,
    the last included), and `conditioned(x, labels)`, the input a model takes ([x, one-hot labels]
    when conditional). Unconditional: no labels are drawn and `conditioned` passes x through."""
    conditional = config.conditional
    classes = tf.constant(utils.classes_in_play(config), tf.int32)
    count = class_count(config)

    def random_labels(n):
        if not conditional:
            return None
        return tf.gather(classes, rng.uniform((n,), minval=0, maxval=len(classes), dtype=tf.int32))

    def conditioned(x, labels):
        return [x, tf.one_hot(labels, count)] if conditional else x

    return random_labels, conditioned


# ---------------------------------------------------------------------------------------------
# Optimisation, the cross-entropy on D's logits and the R1 penalty
# ---------------------------------------------------------------------------------------------


def make_optimizer(config, variables):
    """Adam(lr, beta1, beta2) for `variables`, built now (eagerly, before any traced step creates slots).

    Under fp16 it is wrapped in a LossScaleOptimizer, so that small gradients do not underflow: a
    step computes `tape.gradient(optimizer.scale_loss(loss), ...)`, which is the plain loss otherwise.
    """
    optimizer = keras.optimizers.Adam(config.lr, beta_1=config.beta1, beta_2=config.beta2)
    if config.precision == "fp16":
        optimizer = ReplicaSafeLossScaleOptimizer(optimizer)
    optimizer.build(variables)
    return optimizer


class ReplicaSafeLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """A LossScaleOptimizer that skips a step on every replica when any replica's gradients overflow.

    Under MirroredStrategy Keras checks only the first replica's gradients for inf or NaN, so an
    overflow on another replica would be applied and corrupt the weights. Here each replica's
    finiteness is all-reduced first, and an overflow anywhere makes every replica's gradients
    non-finite: the step is skipped and the loss scale halved everywhere, as on one device.
    """

    def apply(self, grads, trainable_variables=None):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            local = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
            overflowed = context.all_reduce("sum", tf.cast(tf.logical_not(local), tf.float32)) > 0
            grads = [g if g is None else tf.where(overflowed, tf.cast(float("nan"), g.dtype), g) for g in grads]
        return super().apply(grads, trainable_variables)


def logits_and_r1_penalty(discriminator, inputs, gamma, optimizer=None):
    """D's logits on real `inputs` and the R1 penalty gamma/2 * E||grad_x l(x)||^2 at those images.

    The R1 penalty (Mescheder et al. 2018; --r1) keeps D smooth on the real data. `inputs` is the
    image batch, or [images, one-hot labels] for a conditional D (the gradient is taken with
    respect to the images only). With gamma 0 the penalty is 0 and costs nothing. Under fp16,
    `optimizer` (D's, a LossScaleOptimizer) scales the inner gradient as it does the outer one, so
    that it does not underflow to zero in float16 as R1 makes D smooth; it is unscaled in float32.
    """
    if not gamma:
        return discriminator(inputs, training=True), 0.0
    images = inputs[0] if isinstance(inputs, list) else inputs
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    with tf.GradientTape() as tape:
        tape.watch(images)
        logits = discriminator(inputs, training=True)
        total = tf.reduce_sum(logits)  # Inside the tape: the gradient's target must be recorded too.
        if scaled:
            total = optimizer.scale_loss(total)
    gradients = tf.cast(tape.gradient(total, images), tf.float32)
    if scaled:
        gradients = gradients / tf.cast(optimizer.dynamic_scale, tf.float32)
    squared_norms = tf.reduce_sum(tf.square(tf.reshape(gradients, (tf.shape(gradients)[0], -1))), axis=1)
    return logits, 0.5 * gamma * tf.reduce_mean(squared_norms)


AUGMENTATIONS = ("color", "translation", "cutout")  # DiffAugment's policies (--augment).


def augmenter(config, rng):
    """`augment(images)`: DiffAugment (Zhao et al. 2020) with the --augment policies, for every image D
    sees, real and fake, in D's and G's updates; the identity without --augment.

    color: brightness +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]; translation: up to 1/8 of the
    side, zero-padded; cutout: a zero square of half the side. Each image draws its own from `rng`
    (the step's noise generator), in float32 under any precision, and every op is differentiable,
    so G learns through the augmentation: D never sees an image that is not augmented, and cannot
    memorise a small set.
    """
    policies = [policy for policy in config.augment.split(",") if policy]
    if not policies:
        return lambda images: images

    def augment(images):
        x = tf.cast(images, tf.float32)
        shape = tf.shape(x)
        n, height, width = shape[0], x.shape[1], x.shape[2]
        if "color" in policies:
            x = x + (rng.uniform((n, 1, 1, 1)) - 0.5)
            mean = tf.reduce_mean(x, axis=3, keepdims=True)
            x = (x - mean) * (rng.uniform((n, 1, 1, 1)) * 2.0) + mean
            mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
            x = (x - mean) * (rng.uniform((n, 1, 1, 1)) + 0.5) + mean
        if "translation" in policies:
            for axis, size in ((1, height), (2, width)):
                shift = int(size * 0.125 + 0.5)
                offsets = rng.uniform((n, 1), minval=-shift, maxval=shift + 1, dtype=tf.int32)
                source = tf.range(size)[None, :] - offsets  # (N, size): where each row (column) comes from
                inside = tf.cast((source >= 0) & (source < size), tf.float32)
                x = tf.gather(x, tf.clip_by_value(source, 0, size - 1), axis=axis, batch_dims=1)
                x = x * (inside[:, :, None, None] if axis == 1 else inside[:, None, :, None])
        if "cutout" in policies:
            cut_height, cut_width = int(height * 0.5 + 0.5), int(width * 0.5 + 0.5)
            centre_y = rng.uniform((n, 1, 1, 1), maxval=height + 1 - cut_height % 2, dtype=tf.int32)
            centre_x = rng.uniform((n, 1, 1, 1), maxval=width + 1 - cut_width % 2, dtype=tf.int32)
            rows = tf.range(height)[None, :, None, None] - centre_y + cut_height // 2  # 0 .. cut_height - 1 inside
            columns = tf.range(width)[None, None, :, None] - centre_x + cut_width // 2
            hole = (rows >= 0) & (rows < cut_height) & (columns >= 0) & (columns < cut_width)
            x = x * (1.0 - tf.cast(hole, tf.float32))
        return x

    return augment


@keras.saving.register_keras_serializable(package="tf2_gan_mnist")
class GlobalBatchNormalization(keras.layers.BatchNormalization):
    """Batch norm on the statistics of the whole batch across tf.distribute replicas (under a
    strategy of several; a plain BatchNormalization otherwise).

    Keras's `synchronized=True` computes the variance as E[x^2] - E[x]^2; one device's
    tf.nn.moments computes E[(x - stop_gradient(mean))^2]. Both give the same values and first
    derivatives, but R1 differentiates twice, and there they differ. This layer computes
    E[x^2] - 2 m E[x] + m^2 with m = stop_gradient(mean): the value E[x^2] - E[x]^2, the first
    derivative 2 (x - m) / n and the second 2 / n of the one-device formula, from the sums of x, of
    x^2 and the count, all-reduced together in one collective, so that N replicas take the step one
    device does at one collective per layer (plus one in the backward pass), not three.
    """

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        if mask is not None or context is None or context.num_replicas_in_sync == 1:
            return super()._moments(inputs, mask)
        axes = self._reduction_axes
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(inputs), axes)), inputs.dtype)
        sums = tf.stack([tf.reduce_sum(inputs, axes), tf.reduce_sum(tf.square(inputs), axes),
                         tf.fill(tf.shape(inputs)[-1:], count)])
        total, total_squares, total_count = tf.unstack(context.all_reduce("sum", sums))
        mean, mean_square = total / total_count, total_squares / total_count
        anchor = tf.stop_gradient(mean)
        return mean, tf.maximum(mean_square - 2.0 * anchor * mean + tf.square(anchor), 0.0)


def global_mean(loss, batch_size, global_batch_size):
    """A replica's batch-mean `loss` as its share of the mean over the global batch.

    tf.distribute sums the replicas' gradients, so a replica holding `batch_size` of the
    `global_batch_size` images contributes loss * batch_size / global_batch_size: what
    `tf.nn.compute_average_loss(per_example, global_batch_size=...)` gives, also when the shares
    are uneven (a batch of 100 on 8 GPUs). One device: the loss as it is.
    """
    if tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return loss
    return loss * tf.cast(batch_size, loss.dtype) / global_batch_size


def cross_entropy(logits, target):
    """Mean binary cross-entropy of D(x) = sigmoid(logits) against a constant target (1: real, 0: fake)."""
    labels = tf.fill(tf.shape(logits), tf.constant(target, logits.dtype))
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def d_scores(real_logits, fake_logits):
    """{"d_real": D(x), "d_fake": D(G(z))}, batch means of sigmoid(logit), for the progress line and plot."""
    return {"d_real": tf.reduce_mean(tf.sigmoid(real_logits)), "d_fake": tf.reduce_mean(tf.sigmoid(fake_logits))}


# ---------------------------------------------------------------------------------------------
# The average of G's weights (--ema): the generator that draws every sample
# ---------------------------------------------------------------------------------------------


class AveragedGenerator:
    """An exponential moving average of G's weights (--ema), the generator that draws every sample.

    Averaging the weights of the last ~1/(1 - decay) steps smooths away the step-to-step wobble of
    the adversarial game (Yazici et al. 2019; Karras et al. 2018). The decay is warmed up as
    min(decay, (1 + n) / (warm_up + n)) after n updates (warm_up 10: about the last ninth of the
    steps so far), so early epochs are not dominated by the random initial weights. Batch-norm
    statistics are not averaged: they belong to the raw weights, so before sampling, `refresh()`
    recomputes them for the averaged weights from fixed noise (BigGAN's "standing statistics"): the
    mean of the per-batch statistics of a few batches.
    The training noise stream is untouched, so the same run shows the raw generator's figures
    beside the average's.
    """

    def __init__(self, generator, decay, refresh_inputs, warm_up=10.0):
        self.decay = decay
        self.warm_up = warm_up
        self.source = generator
        self.model = keras.models.clone_model(generator)
        self.model.set_weights(generator.get_weights())
        self.batch_norms = [layer for layer in self.model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        self.refresh_inputs = refresh_inputs
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.pairs = list(zip(self.model.trainable_variables, generator.trainable_variables))

    @property
    def variables(self):
        """What a checkpoint holds: the averaged weights and the update count."""
        return list(self.model.variables) + [self.updates]

    def update(self):
        """One averaging step, after a training step (traced into the compiled training call).

        In a replica of several (tf.distribute), each device updates its own copy of the average from
        its own copy of G's weights, which every replica holds identical: nothing crosses devices.
        """
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            own = lambda variable: getattr(variable, "_value", variable)._get_on_device_or_primary()  # noqa: E731
        else:
            own = lambda variable: variable  # noqa: E731
        updates = own(self.updates)
        updates.assign_add(1)
        count = tf.cast(updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + count) / (self.warm_up + count))
        for average, value in self.pairs:
            own(average).assign(decay * own(average) + (1.0 - decay) * value)

    def refresh(self, batch_size=500):
        """Recompute the batch-norm statistics for the averaged weights (nothing to do without batch norm).

        Each batch norm's moving statistics become the mean of its per-batch statistics over the
        refresh noise, in batches of `batch_size` (momentum (k - 1) / k at the k-th batch keeps a
        running mean); batches bound the memory, which one batch of 2,000 DCGAN samples doubled.
        """
        inputs = self.refresh_inputs if isinstance(self.refresh_inputs, list) else [self.refresh_inputs]
        for index, start in enumerate(range(0, len(inputs[0]), batch_size) if self.batch_norms else []):
            for layer in self.batch_norms:
                layer.momentum = index / (index + 1)  # 0 at the first batch: the old statistics go.
            batch = [values[start:start + batch_size] for values in inputs]
            self.model(batch if len(batch) == 2 else batch[0], training=True)
        for layer in self.batch_norms:
            layer.momentum = self.source.get_layer(layer.name).momentum  # As saved in generator.keras.


