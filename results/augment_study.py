"""The --augment study: DiffAugment on small folders, with and without, at the same number of steps.

    MNIST_DIR=... CIFAR10_DIR=... python results/augment_study.py [--epochs 100] [--seeds 0,1]
        [--folders mnist,cars] [--policies 'none;color,translation,cutout']

Builds two folders of PNGs from the real datasets under results/augment_study/ (git ignores it):
the first 1,000 MNIST training images in a subfolder per class, and the first 1,000 CIFAR-10
training automobiles. Trains dcgan_mnist.py on each (--arch auto: 28 for the digits, 32 for the
cars) without and with `--augment color,translation,cutout`, then scores each trained generator
with the project's own evaluator of the source dataset (10,000 samples against the MNIST test set;
against CIFAR-10's 1,000 test automobiles with --classes automobile): a figure independent of the
folder, on the full test sets. Appends a JSON line per run to results/augment_study/runs.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import utils  # noqa: E402
from ganlab.datasets import cifar10  # noqa: E402
from ganlab.run.directory import RunDirectory  # noqa: E402
from ganlab.sampling import sample  # noqa: E402

STUDY = REPO / "results" / "augment_study"
POLICY = "color,translation,cutout"


def build_folders():
    """The two folders of 1,000 PNGs, written once."""
    digits, cars = STUDY / "mnist1000", STUDY / "cars1000"
    if not digits.is_dir():
        images, labels = utils.load_mnist("train", os.environ.get("MNIST_DIR"))
        for index in range(1000):
            (digits / str(labels[index])).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(digits / str(labels[index]) / f"{index:05d}.png")
    if not cars.is_dir():
        images, labels = cifar10.load("train", os.environ.get("CIFAR10_DIR"))
        cars.mkdir(parents=True)
        for index, image in enumerate(images[labels == 1][:1000]):
            Image.fromarray(image).save(cars / f"{index:05d}.png")
    return {"mnist": digits, "cars": cars}


def evaluator_for(name):
    """The project's evaluator of the folder's source dataset."""
    if name == "mnist":
        return sample.load_evaluator(SimpleNamespace(dataset="mnist", data_dir=os.environ.get("MNIST_DIR"), classes="",
                                                     class_names=utils.DATASETS["mnist"].classes,
                                                     data_shape=(28, 28, 1)))
    return sample.load_evaluator(SimpleNamespace(dataset="cifar10", data_dir=os.environ.get("CIFAR10_DIR"),
                                                 classes="automobile", class_names=cifar10.CLASSES,
                                                 data_shape=(32, 32, 3)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--folders", default="mnist,cars")
    parser.add_argument("--policies", default="none;" + POLICY,
                        help="the runs' --augment values, separated by ';' (none: no augmentation)")
    args = parser.parse_args()
    folders = build_folders()
    policies = args.policies.split(";")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.folders.split(","):
            folder = folders[name]
            for augment in ("" if policy == "none" else policy for policy in policies):
                tag = "plain" if not augment else "augment" if augment == POLICY else augment.replace(",", "-")
                out = STUDY / f"{name}-{tag}-seed{seed}"
                command = [sys.executable, str(REPO / "dcgan_mnist.py"), "--dataset", "folder", "--data-dir",
                           str(folder), "--epochs", str(args.epochs), "--eval-every", "0", "--seed", str(seed),
                           "--augment", augment, "--out", str(out), "--overwrite"]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                generator, saved = sample.load_trained_generator(RunDirectory(out))
                evaluator = evaluator_for(name)
                scored = SimpleNamespace(**vars(saved) | ({"dataset": "mnist", "class_names": utils.DATASETS["mnist"]
                                                           .classes, "classes": ""} if name == "mnist" else
                                                          {"dataset": "cifar10", "class_names": cifar10.CLASSES,
                                                           "classes": "automobile"}))
                figures = sample.evaluate_generator(evaluator, generator, 10_000, seed, "none", scored)
                history = json.loads((out / "history.json").read_text())
                row = {"folder": name, "augment": augment or "none", "seed": seed, "epochs": args.epochs,
                       "steps": len(history["iterations"]["d_loss"]), "arch": saved.arch, "fid": figures["fid"],
                       "inception_score": figures["inception_score"], "classes_covered": figures["classes_covered"],
                       "floor_fid": evaluator.floor["fid"], "seconds": history["total_seconds"]}
                print(json.dumps(row), flush=True)
                with open(STUDY / "runs.jsonl", "a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
