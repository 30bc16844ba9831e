"""A deep convolutional GAN on MNIST, following Radford et al. 2015 (DCGAN).

    python dcgan_mnist.py --epochs 20                  # train; outputs in results/dcgan_mnist/
    python dcgan_mnist.py --arch 64 --out results/dcgan64   # the seeds' big 64x64 model
    python dcgan_mnist.py --generate 100 --samples-npz s.npz   # sample the trained run

The DCGAN guidelines, as built here: G upsamples with transposed (fractionally strided)
convolutions, D downsamples with strided convolutions, no pooling; batch norm in every layer except
G's output and D's input; ReLU in G with a tanh output, LeakyReLU(0.2) in D; Adam; weights drawn
from N(0, 0.02). Three presets (--arch) set the resolution, the layer widths, the batch size, the
learning rate, Adam's beta1 and the R1 penalty: the seeds' batch sizes, Radford's 2e-4 and beta1
0.5 and no penalty for 32 and 64; for 28, batch 64, 1e-3, beta1 0 and an R1 penalty of 1 on D,
with which it learned faster. Samples come from an exponential moving average of G's weights
(--ema); Radford's recipe is --batch-size 128 --lr 2e-4 --beta1 0.5 --r1 0 --ema 0.
"""

from ganlab import keras, tf  # TensorFlow and Keras, loaded with their start-up chatter muted
from ganlab import bench, configurator, errors
from ganlab.devices import distribute
from ganlab.models import (GlobalBatchNormalization, assemble, augmenter, cross_entropy, d_scores, global_mean,
                           label_helpers, logits_and_r1_penalty, make_optimizer)
from ganlab.run import loop
from ganlab.sampling import sample
import utils

# ------------------------------------------------------------------------------------------------
# Hyperparameters. Each is a flag under the same name (BATCH_SIZE is --batch-size); see --help.
# None means "the value of the chosen --arch preset", from PRESETS below.
# ------------------------------------------------------------------------------------------------
# Architecture
ARCH = "auto"  # preset: 28 (native 28x28), 32 (DCGAN_Tensorflow seed), 64 (znxlwm's); auto: nearest the data's side
LATENT_DIM = None  # size of the noise vector z ~ N(0, I)
KERNEL_SIZE = None  # side of every (transposed) convolution kernel
LEAKY_SLOPE = 0.2  # slope of D's LeakyReLU for negative inputs (Radford et al.)
BN_MOMENTUM = 0.9  # batch-norm moving-average momentum; PyTorch's default, so sampling works from epoch 1
# Training length and data
EPOCHS = 20  # Radford et al.'s MNIST length; digits are legible after a few epochs
BATCH_SIZE = None  # images per step; 28: 64 (twice the steps per epoch of Radford's 128), 32 and 64: the seeds'
LIMIT = 0  # train on the first LIMIT images only, for quick runs (a folder: LIMIT from each class in proportion; 0: all)
DATASET = "mnist"  # mnist, fashion_mnist, cifar10 (32x32 colour), or folder: your own pictures in --data-dir
CLASSES = ""  # train on these classes only, comma-separated: names, or indices where no class has that name (empty: all)
CONDITIONAL = False  # class-conditional G(z, y) and D(x, y), so a digit can be asked for (--generate --label)
# Optimisation
LR = None  # Adam learning rate for both networks; 28: 1e-3, 32 and 64: Radford's 2e-4
BETA1 = None  # Adam beta1 (momentum); Radford's 0.5, as 0.9 made his training oscillate; 28: 0, as StyleGAN with R1
BETA2 = 0.999  # Adam beta2, the decay of its squared-gradient average (Adam's default)
# The GAN objective
LOSS = "ns"  # ns: the non-saturating cross-entropy of Goodfellow et al. and Radford et al.; hinge
R1 = None  # weight gamma of the R1 penalty gamma/2 * E||grad D(x)||^2 on real images, keeping D smooth (0: none)
G_STEPS = 1  # G updates per D update, each on fresh noise (carpedm20's DCGAN-tensorflow runs 2)
EMA = 0.9995  # decay of the moving average of G's weights that draws every sample (0: the raw G)
AUGMENT = ""  # DiffAugment on every image D sees, for small sets: color,translation,cutout (empty: none)
# Bookkeeping
SEED = 0  # seeds the weights, the data order and all noise, so a run can be repeated
SAMPLE_GRID = 10  # progress grids show SAMPLE_GRID x SAMPLE_GRID samples of one fixed noise batch
EVAL_EVERY = 5  # score samples every EVAL_EVERY epochs and after the last (0: never)

# The presets: resolution, layer widths, and their own defaults. G projects z to g_start, then
# each transposed convolution doubles the side, the last one to the dataset's C channels (1 for
# MNIST, 3 for CIFAR-10); D halves the side with each strided convolution, then one dense layer
# gives the logit. A dataset of another side is zero-padded (28 -> 32) or resized to the preset's.
PRESETS = {
    # Native 28x28. G: z(100) -> 7x7x256 -> 14x14x128 -> 28x28xC.
    #               D: 28x28xC -> 14x14x64 -> 7x7x128 -> 1.
    # Radford's layers with the recipe that learned fastest in the study (results/README.md): 5x
    # his learning rate, an R1 penalty of 1, half his batch (twice the steps), Adam without momentum.
    "28": dict(image_size=28, batch_size=64, latent_dim=100, kernel_size=5, lr=1e-3, beta1=0.0, r1=1.0,
               g_start=(7, 7, 256), g_channels=(128,), d_channels=(64, 128)),
    # The DCGAN_Tensorflow seed, MNIST zero-padded to 32x32.
    #   G: z(200) -> 1x1x512 -> 2x2x256 -> 4x4x128 -> 8x8x64 -> 16x16x32 -> 32x32xC.
    #   D: 32x32xC -> 16x16x32 -> 8x8x64 -> 4x4x128 -> 2x2x256 -> 1.
    # Its small 4x4 and 2x2 layers ran slower in bf16 than in fp32 on the 2-core CPU, so
    # --precision auto keeps it in fp32 there.
    "32": dict(image_size=32, batch_size=64, latent_dim=200, kernel_size=4, lr=2e-4, beta1=0.5, r1=0.0,
               bf16_on_cpu=False, g_start=(1, 1, 512), g_channels=(256, 128, 64, 32), d_channels=(32, 64, 128, 256)),
    # The seeds' big model (znxlwm, MINGUKKANG), MNIST resized to 64x64.
    #   G: z(100) -> 4x4x1024 -> 8x8x512 -> 16x16x256 -> 32x32x128 -> 64x64xC.
    #   D: 64x64xC -> 32x32x128 -> 16x16x256 -> 8x8x512 -> 4x4x1024 -> 1.
    "64": dict(image_size=64, batch_size=100, latent_dim=100, kernel_size=4, lr=2e-4, beta1=0.5, r1=0.0,
               g_start=(4, 4, 1024), g_channels=(512, 256, 128), d_channels=(128, 256, 512, 1024)),
}


def default_arch(config):
    """--arch auto: the preset nearest the data's own side: 28 for the MNISTs, 32 for CIFAR-10 (as the
    seed did) and pictures up to 48 px, else Radford's 64x64."""
    return "28" if config.data_side <= 30 else "32" if config.data_side <= 48 else "64"


# ------------------------------------------------------------------------------------------------
# The two models
# ------------------------------------------------------------------------------------------------


def weights():
    """Radford et al.'s initialisation: every convolution and dense weight from N(0, 0.02)."""
    return keras.initializers.RandomNormal(0.0, 0.02)


def batch_norm(config):
    """Batch norm with its scale drawn from N(1, 0.02), as in the DCGAN reference code; over several
    replicas, on the statistics of the whole batch."""
    normalization = GlobalBatchNormalization if config.replicas > 1 else keras.layers.BatchNormalization
    return normalization(momentum=config.bn_momentum, epsilon=1e-5,
                         gamma_initializer=keras.initializers.RandomNormal(1.0, 0.02))


def build_generator(config):
    """G: z -> dense projection to g_start -> transposed convolutions, each doubling the side -> tanh.

    With --conditional, G(z, y): the one-hot label y is concatenated to z.
    """
    height, width, channels = config.g_start
    layers = [                                                                     # (N, z), or (N, z + 10) with y
        keras.layers.Dense(height * width * channels, use_bias=False, kernel_initializer=weights()),
        batch_norm(config),
        keras.layers.ReLU(),
        keras.layers.Reshape((height, width, channels)),                           # (N, h, w, c)
    ]
    for channels in config.g_channels:
        # (N, h, w, c) -> (N, 2h, 2w, channels)
        layers += [keras.layers.Conv2DTranspose(channels, config.kernel_size, strides=2, padding="same",
                                                use_bias=False, kernel_initializer=weights()),
                   batch_norm(config), keras.layers.ReLU()]
    # (N, S/2, S/2, c) -> (N, S, S, C): the image, tanh, no batch norm. The convolution computes in the
    # precision policy's type (under bf16 its one-channel output ran 1.7x faster than in float32, and
    # D casts its input to bf16 anyway); the tanh and the image are float32 under any precision.
    layers += [keras.layers.Conv2DTranspose(config.data_shape[-1], config.kernel_size,
                                            strides=2, padding="same", kernel_initializer=weights()),
               keras.layers.Activation("tanh", dtype="float32")]
    return assemble(layers, (config.latent_dim,), config, "generator")


def build_discriminator(config):
    """D: image -> strided convolutions, each halving the side -> dense -> 1 logit.

    With --conditional, D(x, y): the one-hot label y joins the image as 10 constant channels.
    """
    layers = []                                                          # (N, S, S, C), or (N, S, S, C + 10)
    for index, channels in enumerate(config.d_channels):
        # (N, s, s, c) -> (N, s/2, s/2, channels); no batch norm on the input layer.
        layers.append(keras.layers.Conv2D(channels, config.kernel_size, strides=2, padding="same",
                                          use_bias=index == 0, kernel_initializer=weights()))
        if index > 0:
            layers.append(batch_norm(config))
        layers.append(keras.layers.LeakyReLU(config.leaky_slope))
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(1, kernel_initializer=weights(), dtype="float32"),      # (N, 1) logit, float32
    ]
    shape = (config.image_size, config.image_size, config.data_shape[-1])
    return assemble(layers, shape, config, "discriminator")


def multiply_adds(config):
    """Multiply-adds of one image through G and D above (the conditioning label aside): how big a share of a
    step each GPU would get, for --distribute auto (ganlab/devices/distribute.py)."""
    area, (side, _, channels) = config.kernel_size ** 2, config.g_start
    total = config.latent_dim * side * side * channels                  # G's projection
    for out in list(config.g_channels) + [config.data_shape[-1]]:       # G's transposed convolutions
        side, total, channels = 2 * side, total + (2 * side) ** 2 * area * channels * out, out
    side, channels = config.image_size, config.data_shape[-1]
    for out in config.d_channels:                                        # D's strided convolutions
        side, total, channels = side // 2, total + (side // 2) ** 2 * area * channels * out, out
    return total + side * side * channels                                # D's logit


# ------------------------------------------------------------------------------------------------
# The GAN: its losses, and one D update and one G update per training step
# ------------------------------------------------------------------------------------------------


def discriminator_loss(config, real_logits, fake_logits):
    """D's loss on its logits l, where D(x) = sigmoid(l(x)).

    ns: -[log D(x) + log(1 - D(G(z)))]; hinge: E[max(0, 1 - l(x))] + E[max(0, 1 + l(G(z)))].
    """
    if config.loss == "hinge":
        return tf.reduce_mean(tf.nn.relu(1.0 - real_logits)) + tf.reduce_mean(tf.nn.relu(1.0 + fake_logits))
    return cross_entropy(real_logits, 1.0) + cross_entropy(fake_logits, 0.0)


def generator_loss(config, fake_logits):
    """G's loss. ns: -log D(G(z)), the non-saturating form; hinge: -E[l(G(z))]."""
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

        # (1) Update D: maximize log D(x, y) + log(1 - D(G(z, y'), y')) - R1/2 * E||grad_x D(x, y)||^2
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

        # (2) Update G: maximize log D(G(z, y'), y') against the D just updated, G_STEPS times on fresh noise
        for _ in range(config.g_steps):  # A Python loop: the compiled step holds g_steps G updates.
            noise, fake_labels = noise_rng.normal((batch_size, config.latent_dim)), random_labels(batch_size)
            with tf.GradientTape() as tape:
                fake_images = generator(conditioned(noise, fake_labels), training=True)
                g_loss = generator_loss(config, discriminator(conditioned(augment(fake_images), fake_labels),
                                                              training=True))
                scaled_loss = g_optimizer.scale_loss(global_mean(g_loss, batch_size, config.batch_size))
            gradients = tape.gradient(scaled_loss, generator.trainable_variables)
            g_optimizer.apply(gradients, generator.trainable_variables)

        return {"d_loss": d_loss, "g_loss": g_loss, **d_scores(real_logits, fake_logits)}

    parts = dict(generator=generator, discriminator=discriminator, g_optimizer=g_optimizer,
                 d_optimizer=d_optimizer, noise_rng=noise_rng)
    return train_step, parts


def main(argv=None, hooks=None):
    """Train (or, with --generate, --interpolate, --evaluate or --benchmark, use) a DCGAN; see --help."""
    # The settings, resolved once: flags, preset, a resumed run's, devices and precision; and the strategy
    # (one device, every GPU or every machine: --distribute). Steps of ~0.2 s on the CPU: no Python
    # overhead to hide, so one step per call there.
    config, run, strategy = configurator.resolve(__file__, globals(), argv, description=__doc__, presets=PRESETS,
                                                 auto_preset=default_arch, default_steps_per_call=1)
    if strategy is None:  # --generate N, --interpolate or --evaluate on a trained run.
        return sample.generate_or_evaluate(config, run)
    distribute.print_devices(config)
    transform = utils.transform_for(config.data_shape[0], config.image_size)
    data = utils.load_training_images(config, config.image_size, transform)  # uint8 (N, S, S, C), labels
    if config.benchmark:
        bench.benchmark(config, data, build_training, strategy=strategy)
    else:
        loop.train(config, run, data, build_training, transform, hooks, strategy)


if __name__ == "__main__":
    errors.run_main(main)
