"""Retrain the evaluation classifiers that ship with the code, by evaluation.RECIPE, and store them.

    python tools/train_classifiers.py                       # mnist, fashion_mnist and cifar10
    python tools/train_classifiers.py --datasets cifar10    # one of them

Each is trained as a run would train it (evaluation.train_classifier: fixed seed and order, op
determinism on, TF32 off, XLA off) on the dataset's train split, found as the scripts find it
(MNIST_DIR, FASHION_MNIST_DIR, CIFAR10_DIR, or a download). Its weights are stored in half
precision in ganlab/sampling/classifiers/<dataset>.npz (about 1 MB each), and
ganlab/sampling/classifiers/classifiers.json records, beside the recipe, the file's SHA-256 (checked
when it loads), the test accuracy of the stored weights, and how and where it was trained.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import utils  # noqa: E402
from ganlab.sampling import evaluation  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(evaluation.SHIPPED), help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    index = json.loads(evaluation.SHIPPED_INDEX.read_text()) if evaluation.SHIPPED_INDEX.is_file() else {}
    for dataset in args.datasets.split(","):
        if dataset not in evaluation.SHIPPED:
            parser.error(f"--datasets: {dataset} is not one of {', '.join(evaluation.SHIPPED)}")
        config = SimpleNamespace(dataset=dataset, data_dir=None, classes="", limit=0,
                                 class_names=tuple(utils.DATASETS[dataset].classes),
                                 data_shape=tuple(utils.DATASETS[dataset].shape))
        train_images, train_labels = utils.load_dataset(config, "train")
        test_images, test_labels = utils.load_dataset(config, "test")
        start = time.perf_counter()
        model, accuracy = evaluation.train_classifier(train_images, train_labels, test_images, test_labels)
        seconds = time.perf_counter() - start
        path = evaluation.SHIPPED_DIR / f"{dataset}.npz"
        with open(path, "wb") as handle:
            np.savez_compressed(handle, *[w.astype(np.float16) for w in model.get_weights()])
        shipped = evaluation.shipped_classifier(dataset, train_images.shape[1:], verify=False)
        half_accuracy = evaluation.accuracy(shipped, test_images, test_labels)
        index[dataset] = {"recipe": evaluation.RECIPE, "sha256": evaluation.sha256(path),
                          "test_accuracy": round(half_accuracy, 4), "test_accuracy_float32": round(accuracy, 4),
                          "bytes": path.stat().st_size, "training_seconds": round(seconds), **evaluation.how_trained()}
        evaluation.SHIPPED_INDEX.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        print(f"{dataset}: test accuracy {accuracy:.4f} (float32), {half_accuracy:.4f} as stored in half precision; "
              f"{path.stat().st_size / 1e6:.2f} MB in {path}; trained in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
