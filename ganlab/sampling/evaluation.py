"""Sample-quality figures for generated digits, from a small CNN classifier trained once on MNIST.

- Fréchet distance (an MNIST "FID"): between the Gaussians fitted to the classifier's
  penultimate-layer features of the generated set and of the MNIST test set. Lower is better.
- Inception Score: exp(E_x[KL(p(y|x) || p(y))]) with the classifier's p(y|x); from 1 to 10.
  High when each sample is a confident digit and the digits are varied.
- Mode coverage: how many of the 10 classes receive a fair share (at least half of the uniform
  1/10) of the predicted labels, and the KL divergence of the predicted-label histogram from uniform.
- Confidence: the mean top-class probability; blurry or broken digits score low.

The real-data floor is the same figures for 10,000 MNIST training images against the test set: the
best a generator can hope for, in the same units. The classifier, the test set's feature statistics
and the floor are computed once and cached, keyed by the data they were made from.

This module works on arrays; `utils.load_evaluator` finds the data and the cache.
"""

import hashlib
import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import config as tf_config

from ganlab.errors import DataError

CLASSES = 10
FAIR_SHARE = 0.5  # A class is covered when it gets at least half of its uniform share of samples.
FLOOR_SAMPLES = 10_000  # Training images scored against the test set for the real-data floor.
# Bump when the classifier's recipe changes, so old caches are not reused.
RECIPE = ("mnist-cnn-v2: 32-32-pool-64-64-pool-128, adam 1e-3, batch 128, 4 epochs, seed 0; op determinism on, "
          "TF32 off, XLA off")
FIGURES = ("fid", "inception_score", "classes_covered", "label_kl", "confidence")
# The classifiers that ship with the code (tools/train_classifiers.py trains them by RECIPE): a new user's
# first run scores its samples at once instead of training one for minutes first.
SHIPPED = ("mnist", "fashion_mnist", "cifar10")
SHIPPED_DIR = Path(__file__).resolve().parent / "classifiers"
SHIPPED_INDEX = SHIPPED_DIR / "classifiers.json"


def check_images(images, shape=(28, 28, 1)):
    """Validate generated or real images for scoring: uint8 0..255 of `shape` (H, W, C); grey may drop C.

    Raises ValueError with a message that says what is wrong (shape, type or range).
    """
    images = np.asarray(images)
    given = images.shape
    if images.ndim == 3 and shape[-1] == 1:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != tuple(shape):
        expected = f"(N, {shape[0]}, {shape[1]})" if shape[-1] == 1 else f"(N, {', '.join(map(str, shape))})"
        raise ValueError(f"expected images of shape {expected}, got {given}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 images to score, got {len(images)}")
    if images.dtype != np.uint8:
        low, high = (float(images.min()), float(images.max())) if images.size else (0, 0)
        raise ValueError(f"expected uint8 images 0..255, got {images.dtype} in [{low:.3g}, {high:.3g}]; "
                         f"convert generator output with utils.to_dataset_uint8")
    return images


def build_classifier(shape=(28, 28, 1), classes=CLASSES):
    """The classifier of `classes` classes: two conv blocks and a 128-unit feature layer (the FID features)."""
    height, width, _ = shape
    return keras.Sequential([
        keras.Input(shape),                                                # (N, H, W, C) in [0, 1]
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"),     # (N, H, W, 32)
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),                                       # (N, H/2, W/2, 32)
        keras.layers.Conv2D(64, 3, activation="relu", padding="same"),     # (N, H/2, W/2, 64)
        keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),                                       # (N, H/4, W/4, 64)
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(128, activation="relu", name="features"),       # (N, 128): the FID features
        keras.layers.Dropout(0.3),
        keras.layers.Dense(classes, name="logits"),                        # (N, classes)
    ], name="classifier")


def _scaled(images, shape):
    return check_images(images, shape).astype(np.float32) / 255.0


def data_key(*arrays):
    """A short hash of the arrays' bytes and the classifier recipe: the cache key."""
    digest = hashlib.sha256(RECIPE.encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _shape_of(images):
    return tuple(images.shape[1:]) if images.ndim == 4 else tuple(images.shape[1:]) + (1,)


def train_classifier(train_images, train_labels, test_images, test_labels, epochs=4, seed=0, log=None):
    """Train the classifier the same way on every machine of a kind (fixed seed and order, op determinism on,
    TF32 off, XLA off: RECIPE), scaling each batch as it is read, so that a large set is held once, in
    uint8; return (model, test accuracy). The process's determinism and TF32 are restored after."""
    determinism, tf32 = tf_config.is_op_determinism_enabled(), tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_op_determinism()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    try:
        keras.utils.set_random_seed(seed)
        shape = _shape_of(train_images)
        check_images(train_images, shape), check_images(test_images, shape)
        model = build_classifier(shape, int(max(train_labels.max(), test_labels.max())) + 1)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        order = np.random.default_rng(seed)
        start = time.perf_counter()
        for epoch in range(epochs):
            model.fit(ScaledBatches(train_images, train_labels, shape, order.permutation(len(train_images)), 128),
                      epochs=1, shuffle=False, verbose=0)
            if log:
                log(f"  classifier epoch {epoch + 1}/{epochs} ({time.perf_counter() - start:.0f} s)")
        _, accuracy = model.evaluate(ScaledBatches(test_images, test_labels, shape, np.arange(len(test_images)), 1000),
                                     verbose=0)
    finally:
        if not determinism:
            tf_config.disable_op_determinism()
        tf.config.experimental.enable_tensor_float_32_execution(tf32)
    return model, float(accuracy)


def how_trained():
    """What the cache entry records of how its classifier was trained: the recipe, TensorFlow and the device."""
    gpus = tf.config.get_visible_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    return {"recipe": RECIPE, "tensorflow": tf.__version__, "device": device, "op_determinism": True,
            "tf32": False, "xla": False}


class ScaledBatches(keras.utils.PyDataset):
    """Batches of (images scaled to [0, 1] float32, int32 labels) in the given `order`, scaled as each is read."""

    def __init__(self, images, labels, shape, order, batch_size):
        super().__init__()
        self.images, self.labels, self.shape, self.order, self.batch_size = images, labels, shape, order, batch_size

    def __len__(self):
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = self.images[rows]
        return batch.reshape((len(rows),) + self.shape).astype(np.float32) / 255.0, self.labels[rows].astype(np.int32)


def sha256(path):
    """The SHA-256 of a file, in hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shipped_classifier(dataset, shape, verify=True):
    """The classifier of `dataset` that ships with the code (float32, from its half-precision weights), or None
    if none ships for it, or for this RECIPE. With `verify`, a file whose SHA-256 is not the one recorded
    beside the recipe (classifiers.json) raises DataError: it is not the recipe's."""
    path = SHIPPED_DIR / f"{dataset}.npz"
    if dataset not in SHIPPED or not path.is_file():
        return None
    if verify:
        entry = json.loads(SHIPPED_INDEX.read_text()).get(dataset, {}) if SHIPPED_INDEX.is_file() else {}
        if entry.get("recipe") != RECIPE:
            return None
        if sha256(path) != entry.get("sha256"):
            raise DataError(f"{path}: not the classifier that {SHIPPED_INDEX.name} records for {dataset} (its SHA-256 "
                            f"differs); restore it (git checkout), or retrain it with tools/train_classifiers.py")
    with np.load(path, allow_pickle=False) as stored:
        weights = [stored[f"arr_{index}"].astype(np.float32) for index in range(len(stored.files))]
    model = build_classifier(tuple(shape) if len(shape) == 3 else tuple(shape) + (1,), weights[-1].shape[0])
    model.set_weights(weights)
    return model


def accuracy(model, images, labels):
    """The classifier's accuracy on uint8 `images` with `labels`."""
    shape = _shape_of(images)
    logits = model.predict(ScaledBatches(images, labels, shape, np.arange(len(images)), 1000), verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def no_better_than_chance(accuracy, count, classes, z=1.96):
    """Why scores from a classifier of `classes` classes would mean nothing, or None: the rule is that the lower
    end of the 95% Wilson interval of its `accuracy` on `count` held-out images must exceed chance, 1/classes
    (so 0.56 on 50 pictures of 2 classes is not clearly better than chance: 0.42 to 0.69)."""
    if count < 1:
        return "it has no held-out picture to be checked on"
    centre = (accuracy + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(accuracy * (1 - accuracy) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    if centre - half > 1.0 / classes:
        return None
    return (f"its accuracy on the {count} held-out pictures, {accuracy:.2f} (95% interval {centre - half:.2f} to "
            f"{centre + half:.2f}), is not clearly better than chance ({1.0 / classes:.2f})")


class Evaluator:
    """Scores sets of digits with the cached classifier against the MNIST test set's statistics."""

    def __init__(self, classifier, reference_mean, reference_cov, floor, test_accuracy, classes=None):
        self.classifier = classifier
        self.meaningless = None  # Why its scores would mean nothing (a folder's weak classifier), or None.
        self.reference_histogram = None  # The held-out images' classes: {"images": N, "fractions": {...}}.
        self.shape = tuple(classifier.inputs[0].shape[1:])
        self.classes = list(range(classifier.outputs[0].shape[-1])) if classes is None else list(classes)
        self.reference_mean = reference_mean
        self.reference_cov = reference_cov
        self.floor = floor
        self.test_accuracy = test_accuracy
        self.test_count = None  # The held-out images `test_accuracy` is measured on (`load_or_train` sets it).
        feature_layer = classifier.get_layer("features")
        self._features_and_logits = keras.Model(classifier.inputs, [feature_layer.output, classifier.outputs[0]])
        self._predict = tf.function(lambda x: self._features_and_logits(x, training=False), reduce_retracing=True)

    def accuracy_text(self):
        """Its classifier's test accuracy with the count it was measured on: "0.9936 on 10,000 held-out images"."""
        return f"{self.test_accuracy:.4f}" + (f" on {self.test_count:,} held-out images" if self.test_count else "")

    def features_and_probabilities(self, images, batch_size=500):
        """Penultimate features (N, 128, float64) and class probabilities (N, 10) of uint8 images."""
        x = _scaled(images, self.shape)
        features, probabilities = [], []
        for start in range(0, len(x), batch_size):
            batch_features, logits = self._predict(tf.constant(x[start:start + batch_size]))
            features.append(batch_features.numpy().astype(np.float64))
            probabilities.append(tf.nn.softmax(logits).numpy().astype(np.float64))
        return np.concatenate(features), np.concatenate(probabilities)

    def evaluate(self, images, requested=None, class_names=None):
        """All the figures for one set of uint8 images, as a dict of floats.

        With `requested` (the labels a conditional generator was asked for), also how often the
        classifier recognises them: `label_accuracy`, and per class (keyed by `class_names`).
        """
        features, probabilities = self.features_and_probabilities(images)
        mean, cov = feature_statistics(features)
        figures = {"fid": frechet_distance(mean, cov, self.reference_mean, self.reference_cov),
                   "inception_score": inception_score(probabilities)}
        figures.update(mode_coverage(probabilities, self.classes))
        figures["confidence"] = float(probabilities.max(axis=1).mean())
        figures["samples"] = len(features)
        if requested is not None:
            requested = np.asarray(requested)
            correct = probabilities.argmax(axis=1) == requested
            names = class_names or [str(c) for c in range(probabilities.shape[1])]
            figures["label_accuracy"] = float(correct.mean())
            figures["label_accuracy_per_class"] = {names[c]: round(float(correct[requested == c].mean()), 4)
                                                   for c in sorted(set(requested.tolist()))}
        return figures

    @classmethod
    def load_or_train(cls, cache_dir, train_images, train_labels, test_images, test_labels, classes=None,
                      log=print, epochs=4, dataset=None):
        """The evaluator for this data: loaded from `cache_dir/<key>/`, else made and cached there: from the
        classifier that ships for `dataset` (`shipped_classifier`), else trained.

        Training takes a few minutes on 2 CPU cores and happens once per data and recipe. Files are
        written atomically, so an interrupted training leaves no half cache behind. With `classes`
        (a subset), the reference statistics and the floor are those of the subset's images,
        computed on the spot from the cached classifier.
        """
        key = data_key(train_images, train_labels, test_images, test_labels)
        directory = Path(cache_dir) / f"classifier-{key}"
        files = {name: directory / name for name in ("classifier.keras", "reference.npz", "floor.json")}
        evaluator = None
        if all(path.is_file() for path in files.values()):
            try:
                evaluator = cls._load(files)
            except Exception as error:  # Keras, numpy and json raise many types for a damaged file.
                log(f"The cached evaluation classifier in {directory} is damaged ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); training it again")
        if evaluator is None:
            start = time.perf_counter()
            shipped = shipped_classifier(dataset, train_images.shape[1:]) if dataset else None
            if shipped is not None:
                classifier, test_accuracy = shipped, json.loads(SHIPPED_INDEX.read_text())[dataset]["test_accuracy"]
            else:
                log(f"Training the evaluation classifier once (cached in {directory}; a few minutes on a CPU) ...")
                classifier, test_accuracy = train_classifier(train_images, train_labels, test_images, test_labels,
                                                             epochs, log=log)
                log(f"Classifier test accuracy {test_accuracy:.4f}, trained in {time.perf_counter() - start:.0f} s")
            evaluator = cls(classifier, None, None, None, test_accuracy)
            evaluator._set_reference(train_images, test_images)
            directory.mkdir(parents=True, exist_ok=True)
            pid = os.getpid()
            temporary = {name: path.with_name(f".{path.stem}.tmp-{pid}{path.suffix}") for name, path in files.items()}
            try:
                classifier.save(temporary["classifier.keras"])
                with open(temporary["reference.npz"], "wb") as handle:
                    np.savez(handle, mean=evaluator.reference_mean, cov=evaluator.reference_cov)
                temporary["floor.json"].write_text(json.dumps(
                    {"floor": evaluator.floor, "test_accuracy": test_accuracy, "recipe": RECIPE,
                     "floor_samples": FLOOR_SAMPLES,
                     "trained": "shipped" if shipped is not None else how_trained()}, indent=1) + "\n")
                for name in ("classifier.keras", "reference.npz", "floor.json"):  # floor.json last: it marks done.
                    os.replace(temporary[name], files[name])
            finally:
                for path in temporary.values():
                    path.unlink(missing_ok=True)
        if classes is not None and sorted(classes) != list(range(evaluator.classifier.outputs[0].shape[-1])):
            evaluator.classes = sorted(classes)
            evaluator._set_reference(train_images[np.isin(train_labels, classes)],
                                     test_images[np.isin(test_labels, classes)])
        evaluator.test_count = len(test_images)
        return evaluator

    @classmethod
    def _load(cls, files):
        """The evaluator from its cached files; raises if any of them is damaged."""
        classifier = keras.saving.load_model(files["classifier.keras"], compile=False, safe_mode=True)
        with np.load(files["reference.npz"], allow_pickle=False) as reference:
            mean, cov = reference["mean"], reference["cov"]
        saved = json.loads(files["floor.json"].read_text())
        for key in FIGURES:  # A missing or non-numeric figure raises.
            float(saved["floor"][key])
        if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
            raise ValueError(f"reference statistics of shapes {mean.shape} and {cov.shape}")
        return cls(classifier, mean, cov, saved["floor"], float(saved["test_accuracy"]))

    def _set_reference(self, train_images, test_images):
        """The test images' feature statistics, and the floor: the first FLOOR_SAMPLES train images' figures."""
        test_features, _ = self.features_and_probabilities(test_images)
        self.reference_mean, self.reference_cov = feature_statistics(test_features)
        self.floor = self.evaluate(train_images[:FLOOR_SAMPLES])


def feature_statistics(features):
    """Mean and covariance of (N, D) features, in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean_a, cov_a, mean_b, cov_b):
    """||m_a - m_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)), the Fréchet distance of two Gaussians.

    Tr((C_a C_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix C_a^(1/2) C_b C_a^(1/2), which has the same spectrum and is stable in float64.
    """
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def inception_score(probabilities, eps=1e-12):
    """exp(E_x[KL(p(y|x) || p(y))]) over the whole set (one split); between 1 and the class count."""
    probabilities = np.asarray(probabilities, np.float64)
    marginal = probabilities.mean(axis=0)
    kl = np.sum(probabilities * (np.log(probabilities + eps) - np.log(marginal + eps)), axis=1)
    return float(np.exp(kl.mean()))


def mode_coverage(probabilities, classes=None):
    """Classes covered and the label histogram's KL divergence from uniform, over the classes in play.

    A class is covered when it gets at least FAIR_SHARE of its uniform share (1/K of K classes in
    play) of the predicted labels. The KL is that of the histogram over the classes in play
    (renormalised) from uniform; `off_classes` is the fraction predicted as any other class.
    """
    probabilities = np.asarray(probabilities)
    classes = list(range(probabilities.shape[1])) if classes is None else list(classes)
    predicted = probabilities.argmax(axis=1)
    histogram = np.bincount(predicted, minlength=probabilities.shape[1]) / len(predicted)
    in_play = histogram[classes]
    covered = int(np.sum(in_play >= FAIR_SHARE / len(classes)))
    share = in_play / in_play.sum() if in_play.sum() else np.zeros_like(in_play)
    nonzero = share[share > 0]
    kl = float(np.sum(nonzero * np.log(nonzero * len(classes)))) if nonzero.size else float(np.log(len(classes)))
    return {"classes_covered": covered, "classes": len(classes), "label_kl": kl,
            "off_classes": round(float(1 - in_play.sum()), 4),
            "label_histogram": [round(float(h), 4) for h in histogram]}


def format_figures(figures, floor=None):
    """One line per figure, with the real-data floor beside it when given."""
    names = {"fid": "Frechet distance (classifier features, lower is better)",
             "inception_score": f"Inception Score (at most {figures.get('classes', CLASSES)})",
             "classes_covered": "classes covered",
             "label_kl": "label KL from uniform (nats)",
             "confidence": "mean top-class confidence"}
    lines = []
    for key, name in names.items():
        value = f"{figures[key]:.4g}" if isinstance(figures[key], float) else str(figures[key])
        if key == "classes_covered":
            value = f"{figures[key]}/{figures.get('classes', CLASSES)}"
        line = f"  {name:<52} {value:>9}"
        if floor is not None:
            floor_value = f"{floor[key]:.4g}" if isinstance(floor[key], float) else str(floor[key])
            if key == "classes_covered":
                floor_value = f"{floor[key]}/{floor.get('classes', CLASSES)}"
            line += f"   (real data: {floor_value})"
        lines.append(line)
    if "label_accuracy" in figures:  # A conditional run: is the requested class what comes out?
        per_class = ", ".join(f"{name} {value:.2f}" for name, value in figures["label_accuracy_per_class"].items())
        lines.append(f"  {'requested label recognised (conditional)':<52} {figures['label_accuracy']:>9.4g}"
                     f"   (per class: {per_class})")
    return "\n".join(lines)
