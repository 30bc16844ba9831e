"""A fully-connected GAN on MNIST (Goodfellow et al. 2014), after znxlwm's tensorflow-MNIST-GAN-DCGAN.

    python gan_mnist.py --epochs 100                  # train; outputs in results/gan_mnist/
    python gan_mnist.py --generate 100 --samples-npz s.npz   # sample the trained run

G maps z ~ N(0, I) through dense layers to a 28x28 image in [-1, 1]; D maps an image through dense
layers to one logit. Both are trained with the hinge loss (--loss ns is the seed's non-saturating
cross-entropy); samples come from an exponential moving average of G's weights (--ema 0: the raw G).
The seed recipe is `--loss ns --ema 0`; the study behind these two defaults is in results/README.md.
"""

import numpy as np

from ganlab import keras, tf  # TensorFlow and Keras, loaded with their start-up chatter muted
from ganlab import bench, configurator, errors
from ganlab.devices import distribute
from ganlab.models import (assemble, augmenter, cross_entropy, d_scores, global_mean, label_helpers,
                           logits_and_r1_penalty, make_optimizer)
from ganlab.run import loop
from ganlab.sampling import sample
import utils

# ------------------------------------------------------------------------------------------------
# Hyperparameters. Each is a flag under the same name (BATCH_SIZE is --batch-size); see --help.
# ------------------------------------------------------------------------------------------------
# Training length and data
EPOCHS = 100  # znxlwm's length; a fully-connected GAN needs many epochs to sharpen its digits
BATCH_SIZE = 100  # znxlwm's batch size: 600 steps per epoch on the 60,000 training images
LIMIT = 0  # train on the first LIMIT images only, for quick runs (a folder: LIMIT from each class in proportion; 0: all)
DATASET = "mnist"  # mnist, fashion_mnist, cifar10 (32x32 colour), or folder: your own pictures in --data-dir
CLASSES = ""  # train on these classes only, comma-separated: names, or indices where no class has that name (empty: all)
CONDITIONAL = False  # class-conditional G(z, y) and D(x, y), so a digit can be asked for (--generate --label)
# Models
LATENT_DIM = 100  # size of the noise vector z ~ N(0, I) that G maps to an image
LEAKY_SLOPE = 0.2  # slope of LeakyReLU for negative inputs, in G and D, as in the seed
DROPOUT = 0.3  # dropout after each hidden layer of D, so D cannot memorise the training set
# Optimisation
LR = 2e-4  # Adam learning rate for both networks (Radford et al. 2015)
BETA1 = 0.5  # Adam beta1; the default 0.9 makes the adversarial game oscillate
BETA2 = 0.999  # Adam beta2, the decay of its squared-gradient average (Adam's default)
# The GAN objective (the seed recipe is --loss ns --ema 0)
LOSS = "hinge"  # hinge: a margin on D's logit, sharper digits here; ns: the seed's non-saturating cross-entropy
R1 = 0.0  # weight gamma of the R1 penalty gamma/2 * E||grad D(x)||^2 on real images (0: none)
EMA = 0.999  # decay of the moving average of G's weights that draws every sample (0: the raw G)
AUGMENT = ""  # DiffAugment on every image D sees, for small sets: color,translation,cutout (empty: none)
# Bookkeeping
SEED = 0  # seeds the weights, the data order and all noise, so a run can be repeated
SAMPLE_GRID = 10  # progress grids show SAMPLE_GRID x SAMPLE_GRID samples of one fixed noise batch
EVAL_EVERY = 10  # score samples every EVAL_EVERY epochs and after the last (0: never)


# ------------------------------------------------------------------------------------------------
# The two models
# ------------------------------------------------------------------------------------------------


def build_generator(config):
    """G: z (latent_dim) -> 256 -> 512 -> 1024 -> 784 -> 28x28x1 in [-1, 1] (3,072 -> 32x32x3 for CIFAR-10).

    With --conditional, G(z, y): the one-hot label y is concatenated to z.
    """
    shape = config.data_shape
    return assemble([                                         # (N, 100), or (N, 110) with y
        keras.layers.Dense(256),                                  # (N, 256)
        keras.layers.LeakyReLU(config.leaky_slope),
        keras.layers.Dense(512),                                  # (N, 512)
        keras.layers.LeakyReLU(config.leaky_slope),
        keras.layers.Dense(1024),                                 # (N, 1024)
        keras.layers.LeakyReLU(config.leaky_slope),
        keras.layers.Dense(int(np.prod(shape))),                  # (N, 784), in the policy's precision (D reads bf16 anyway)
        keras.layers.Activation("tanh", dtype="float32"),         # (N, 784) in [-1, 1], float32 under any precision
        keras.layers.Reshape(shape, dtype="float32"),             # (N, 28, 28, 1), float32 under any precision
    ], (config.latent_dim,), config, "generator")


def build_discriminator(config):
    """D: 28x28x1 -> 784 -> 1024 -> 512 -> 256 -> 1 logit (positive: 'real').

    With --conditional, D(x, y): the one-hot label y is concatenated to the flattened image.
    """
    return assemble([                                         # (N, 784), or (N, 794) with y
        keras.layers.Dense(1024),                                 # (N, 1024)
        keras.layers.LeakyReLU(config.leaky_slope),
        keras.layers.Dropout(config.dropout),
        keras.layers.Dense(512),                                  # (N, 512)
        keras.layers.LeakyReLU(config.leaky_slope),
        keras.layers.Dropout(config.dropout),
        keras.layers.Dense(256),                                  # (N, 256)
        keras.layers.LeakyReLU(config.leaky_slope),
        keras.layers.Dropout(config.dropout),
        keras.layers.Dense(1, dtype="float32"),                   # (N, 1) logit; the sigmoid is in the loss
    ], config.data_shape, config, "discriminator", flatten=True)



def multiply_adds(config):
    """Multiply-adds of one image through G and D above (the conditioning label aside): how big a share of a
    step each GPU would get, for --distribute auto (ganlab/devices/distribute.py)."""
    widths = [config.latent_dim, 256, 512, 1024, int(np.prod(config.data_shape)), 1024, 512, 256, 1]
    return sum(a * b for a, b in zip(widths, widths[1:]))


# ------------------------------------------------------------------------------------------------
# The GAN: its losses, and one D update and one G update per training step
# ------------------------------------------------------------------------------------------------


def discriminator_loss(config, real_logits, fake_logits):
    """D's loss on its logits l, where D(x) = sigmoid(l(x)).

    hinge: E[max(0, 1 - l(x))] + E[max(0, 1 + l(G(z)))]; ns: -[log D(x) + log(1 - D(G(z)))].
    """
    if config.loss == "hinge":
        return tf.reduce_mean(tf.nn.relu(1.0 - real_logits)) + tf.reduce_mean(tf.nn.relu(1.0 + fake_logits))
    return cross_entropy(real_logits, 1.0) + cross_entropy(fake_logits, 0.0)


def generator_loss(config, fake_logits):
    """G's loss. hinge: -E[l(G(z))]; ns: -log D(G(z)), the non-saturating form."""
    if config.loss == "hinge":
        return -tf.reduce_mean(fake_logits)
    return cross_entropy(fake_logits, 1.0)


def build_training(config):
    """The two models, their optimizers and one training step: (train_step, parts).

    ganlab/run/loop.py calls it under the chosen precision policy and runs `train_step` inside its
    compiled loop; `parts` (the models, optimizers and noise generator) is what a checkpoint holds.
    """
    generator = build_generator(config)
    discriminator = build_discriminator(config)
    g_optimizer = make_optimizer(config, generator.trainable_variables)
    d_optimizer = make_optimizer(config, discriminator.trainable_variables)
    noise_rng = tf.random.Generator.from_seed(config.seed)
    # Conditional: y is the real images' labels, y' labels drawn for the fakes; else both are absent.
    random_labels, conditioned = label_helpers(config, noise_rng)
    augment = augmenter(config, noise_rng)  # What D sees of every image, real or fake (--augment; else as is).

    def train_step(real_images, real_labels):
        batch_size = tf.shape(real_images)[0]

        # (1) Update D: minimize E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z, y'), y'))]  (hinge, D the logit;
        #     ns: maximize log D(x, y) + log(1 - D(G(z, y'), y'))), + R1/2 * E||grad_x D(x, y)||^2 with --r1
        noise, fake_labels = noise_rng.normal((batch_size, config.latent_dim)), random_labels(batch_size)
        with tf.GradientTape() as tape:
            fake_images = generator(conditioned(noise, fake_labels), training=True)
            real_inputs = conditioned(augment(real_images), real_labels)
            real_logits, r1_penalty = logits_and_r1_penalty(discriminator, real_inputs, config.r1, d_optimizer)
            fake_logits = discriminator(conditioned(augment(fake_images), fake_labels), training=True)
            d_loss = discriminator_loss(config, real_logits, fake_logits)
            # Its share of the global batch's mean, times the loss scale under fp16.
            scaled_loss = d_optimizer.scale_loss(global_mean(d_loss + r1_penalty, batch_size, config.batch_size))
        gradients = tape.gradient(scaled_loss, discriminator.trainable_variables)
        d_optimizer.apply(gradients, discriminator.trainable_variables)

        # (2) Update G: maximize E[D(G(z, y'), y')] (hinge; ns: maximize log D(G(z, y'), y')), on fresh
        #     noise, against the D just updated
        noise, fake_labels = noise_rng.normal((batch_size, config.latent_dim)), random_labels(batch_size)
        with tf.GradientTape() as tape:
            fake_images = generator(conditioned(noise, fake_labels), training=True)
            g_loss = generator_loss(config, discriminator(conditioned(augment(fake_images), fake_labels), training=True))
            scaled_loss = g_optimizer.scale_loss(global_mean(g_loss, batch_size, config.batch_size))
        gradients = tape.gradient(scaled_loss, generator.trainable_variables)
        g_optimizer.apply(gradients, generator.trainable_variables)

        return {"d_loss": d_loss, "g_loss": g_loss, **d_scores(real_logits, fake_logits)}

    parts = dict(generator=generator, discriminator=discriminator, g_optimizer=g_optimizer,
                 d_optimizer=d_optimizer, noise_rng=noise_rng)
    return train_step, parts


def main(argv=None, hooks=None):
    """Train (or, with --generate, --interpolate, --evaluate or --benchmark, use) the GAN; see --help."""
    # The settings, resolved once: flags, a resumed run's, devices and precision; and the strategy (one
    # device, every GPU or every machine: --distribute). Steps of ~10 ms: Python overhead shows, so 10 per call.
    config, run, strategy = configurator.resolve(__file__, globals(), argv, description=__doc__,
                                                 default_steps_per_call=10)
    if strategy is None:  # --generate N, --interpolate or --evaluate on a trained run.
        return sample.generate_or_evaluate(config, run)
    distribute.print_devices(config)
    data = utils.load_training_images(config)  # uint8 images (60000, 28, 28, 1) and labels for MNIST
    if config.benchmark:
        bench.benchmark(config, data, build_training, strategy=strategy)
    else:
        loop.train(config, run, data, build_training, hooks=hooks, strategy=strategy)


if __name__ == "__main__":
    errors.run_main(main)
