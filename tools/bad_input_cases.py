"""The cases of tools/bad_inputs.py, family by family: what a careless or unlucky user types, and what it must end in.

Each family is a function returning its Cases. A case's setup may read the real MNIST files (MNIST) and copy the
two small trained runs (TRAINED): tools/bad_inputs.py sets both with `use` before any case runs.
"""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--limit", "192", "--batch-size", "64", "--eval-every", "0", "--seed", "3"]
MNIST = TRAINED = None  # The real MNIST files' directory and the trained runs' one: set by `use`.
MNIST_IMAGES = None  # The first thousand real training images, read once (mnist_images).


@dataclass
class Case:
    family: str
    name: str
    argv: list  # The script first; "{run}", "{data}", "{tmp}" are filled in.
    expect: str = "one line"  # or "ran"
    env: dict = field(default_factory=dict)
    setup: object = None  # setup(tmp): prepares the case's files.
    run: str = "gan"  # The trained run copied into {run}: gan, dcgan, or None.
    keep: bool = True  # Whether the run directory must be unchanged afterwards.
    signal_after: tuple = None  # (line printed, signal): send the signal once stdout shows the line.
    limit: float = 240.0


def flag_cases():
    """Every flag's bad values, for each script, on a fresh --out (nothing may be created there)."""
    common = {
        "--epochs": ["0", "-3", "two", "1.5"], "--batch-size": ["0", "-1", "x"], "--limit": ["-5", "ten"],
        "--sample-grid": ["0", "33"], "--eval-every": ["-1"], "--dataset": ["imagenet", ""],
        "--classes": ["10", "cat", "0,,x"], "--latent-dim": ["0"], "--lr": ["0", "-1e-3", "nan", "inf", "fast"],
        "--beta1": ["1", "-0.1"], "--beta2": ["1.5"], "--leaky-slope": ["1"], "--loss": ["wasserstein"],
        "--r1": ["-1", "nan"], "--ema": ["1", "-0.5"], "--seed": ["-1", str(2**32)],
        "--precision": ["fp8"], "--steps-per-call": ["-1"], "--cpu-devices": ["-1", "65"],
        "--peer-timeout": ["0", "-1", "inf"], "--checkpoint-minutes": ["-1", "inf"], "--generate": ["0", "-10"],
        "--num-samples": ["1"], "--distribute": ["tpu"], "--batch-sizes": ["32,x"],
    }
    only = {"gan_mnist.py": {"--dropout": ["1", "-0.2"]},
            "dcgan_mnist.py": {"--arch": ["48"], "--kernel-size": ["0"], "--bn-momentum": ["1"], "--g-steps": ["0", "11"]}}
    cases = []
    for script in ("gan_mnist.py", "dcgan_mnist.py"):
        for flag, values in {**common, **only[script]}.items():
            for value in values:
                cases.append(Case("flags", f"{script} {flag} {value!r}", [script, flag, value, "--out", "{tmp}/new"],
                                  run=None))
    cases += [
        Case("flags", "unknown flag", ["gan_mnist.py", "--learning-rate", "1e-3", "--out", "{tmp}/new"], run=None),
        Case("flags", "abbreviated flag", ["gan_mnist.py", "--epo", "2", "--out", "{tmp}/new"], run=None),
        Case("flags", "--resume with --overwrite", ["gan_mnist.py", "--resume", "--overwrite", "--out", "{run}"]),
        Case("flags", "--label without --generate", ["gan_mnist.py", "--label", "3", "--out", "{run}"]),
        Case("flags", "--samples-npz without --generate", ["gan_mnist.py", "--samples-npz", "a.npz", "--out", "{run}"]),
        Case("flags", "--samples-npz not .npz", ["gan_mnist.py", "--generate", "4", "--samples-npz", "{tmp}/a.txt",
                                                  "--out", "{run}"]),
        Case("flags", "--evaluate with --generate", ["gan_mnist.py", "--evaluate", "--generate", "4", "--out", "{run}"]),
        Case("flags", "--batch-sizes without --benchmark", ["gan_mnist.py", "--batch-sizes", "32", "--out", "{run}"]),
        Case("flags", "--label on an unconditional run", ["gan_mnist.py", "--generate", "4", "--label", "3", "--out",
                                                          "{run}"]),
        Case("flags", "--batch-size above --limit", ["gan_mnist.py", "--limit", "50", "--batch-size", "64", "--out",
                                                     "{tmp}/new"], run=None),
        Case("flags", "--out empty", ["gan_mnist.py", "--out", ""], run=None),
        Case("flags", "--resume with a higher --lr", ["gan_mnist.py", "--resume", "--lr", "1", "--epochs", "2",
                                                      "--out", "{run}"]),
        Case("flags", "--resume with another --batch-size", ["gan_mnist.py", "--resume", "--batch-size", "32",
                                                             "--epochs", "2", "--out", "{run}"]),
        Case("flags", "--resume a finished run", ["gan_mnist.py", "--resume", "--out", "{run}"]),
        Case("flags", "--resume the other script's run", ["dcgan_mnist.py", "--resume", "--epochs", "2", "--out",
                                                          "{run}"]),
        Case("flags", "a run without --resume or --overwrite", ["gan_mnist.py", "--epochs", "2", "--out", "{run}"]),
        Case("flags", "a flag given twice", ["gan_mnist.py", *QUICK, "--epochs", "2", "--epochs", "1", "--out",
                                             "{tmp}/new"], expect="ran", run=None),
        Case("flags", "--batch-size smaller than the replicas", ["gan_mnist.py", "--batch-size", "1", "--distribute",
                                                                 "mirrored", "--cpu-devices", "2", "--out",
                                                                 "{tmp}/new"], run=None),
        Case("flags", "--precision fp16 on a non-fp16 run (it moves across)", ["gan_mnist.py", "--resume", "--epochs",
                                                                              "2", "--precision", "fp16", "--out",
                                                                              "{run}"], expect="ran", keep=False),
    ]
    return cases


def environment_cases():
    tf_configs = {
        "index beyond the cluster": {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}},
        "worker list a string": {"cluster": {"worker": "a:1,b:2"}, "task": {"type": "worker", "index": 0}},
        "no task": {"cluster": {"worker": ["a:1", "b:2"]}},
        "a ps task": {"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "ps", "index": 0}},
        "a task type not in the cluster": {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "chief"}},
        "a cluster list": {"cluster": ["a:1", "b:2"]},
        "an index that is text": {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": "0"}},
        "two chiefs": {"cluster": {"chief": ["a:1", "b:2"], "worker": ["c:3"]}, "task": {"type": "chief"}},
        "an address without a port": {"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 0}},
    }
    cases = [Case("environment", f"TF_CONFIG: {name}", ["gan_mnist.py", "--out", "{tmp}/new"],
                  env={"TF_CONFIG": json.dumps(spec)}, run=None) for name, spec in tf_configs.items()]
    cases += [
        Case("environment", "TF_CONFIG: not JSON", ["gan_mnist.py", "--out", "{tmp}/new"], env={"TF_CONFIG": "{x"},
             run=None),
        Case("environment", "MNIST_DIR: a missing directory", ["gan_mnist.py", *QUICK, "--out", "{tmp}/new"],
             env={"MNIST_DIR": "{tmp}/nowhere"}, run=None),
        Case("environment", "MNIST_DIR: a file", ["gan_mnist.py", *QUICK, "--out", "{tmp}/new"],
             env={"MNIST_DIR": "{tmp}/a-file"}, setup=lambda tmp: (tmp / "a-file").write_text("x"), run=None),
        Case("environment", "MNIST_DIR: junk files", ["gan_mnist.py", *QUICK, "--out", "{tmp}/new"],
             env={"MNIST_DIR": "{tmp}/junk"}, setup=junk_mnist, run=None),
        Case("environment", "CIFAR10_DIR: an empty directory", ["dcgan_mnist.py", "--dataset", "cifar10", *QUICK,
                                                                "--out", "{tmp}/new"],
             env={"CIFAR10_DIR": "{tmp}/empty"}, setup=lambda tmp: (tmp / "empty").mkdir(), run=None),
        Case("environment", "FASHION_MNIST_DIR: junk files", ["gan_mnist.py", "--dataset", "fashion_mnist", *QUICK,
                                                              "--out", "{tmp}/new"],
             env={"FASHION_MNIST_DIR": "{tmp}/junk"}, setup=junk_mnist, run=None),
        Case("environment", "GAN_MNIST_CACHE: a file", ["gan_mnist.py", "--evaluate", "--out", "{run}"],
             env={"GAN_MNIST_CACHE": "{tmp}/a-file"}, setup=lambda tmp: (tmp / "a-file").write_text("x")),
        Case("environment", "GAN_MNIST_CACHE: under a file", ["gan_mnist.py", "--evaluate", "--out", "{run}"],
             env={"GAN_MNIST_CACHE": "{tmp}/a-file/cache"}, setup=lambda tmp: (tmp / "a-file").write_text("x")),
        Case("environment", "XDG_CACHE_HOME: a file", ["gan_mnist.py", "--evaluate", "--out", "{run}"],
             env={"XDG_CACHE_HOME": "{tmp}/a-file", "GAN_MNIST_CACHE": ""},
             setup=lambda tmp: (tmp / "a-file").write_text("x")),
        Case("environment", "CUDA_VISIBLE_DEVICES=-1", ["gan_mnist.py", "--generate", "4", "--out", "{run}"],
             env={"CUDA_VISIBLE_DEVICES": "-1"}, expect="ran", keep=False),
        Case("environment", "CUDA_VISIBLE_DEVICES empty", ["gan_mnist.py", "--generate", "4", "--out", "{run}"],
             env={"CUDA_VISIBLE_DEVICES": ""}, expect="ran", keep=False),
    ]
    return cases


def junk_mnist(tmp):
    junk = tmp / "junk"
    junk.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (junk / name).write_bytes(b"<html>not found</html>")


def mnist_copy(tmp, change):
    """A copy of the real MNIST's training files in {tmp}/data, changed by `change(directory)`."""
    data = tmp / "data"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST / name, data / name)
    change(data)


def rewrite_images(data, transform):
    path = data / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(transform(raw), compresslevel=1))


def edit_config(**changes):
    def setup(tmp):
        path = tmp / "run" / "config.json"
        saved = json.loads(path.read_text())
        saved.update(changes)
        for key in [k for k, v in changes.items() if v is DELETE]:
            del saved[key]
        path.write_text(json.dumps(saved))
    return setup


DELETE = object()


def replace(relative, new):
    def setup(tmp):
        path = tmp / "run" / relative
        content = new(path) if callable(new) else new  # Made from the file before it goes.
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        if content == "dir":
            path.mkdir()
        elif content == "loop":
            path.symlink_to(path)
        elif content == "dangling":
            path.symlink_to(tmp / "nowhere")
        elif content is not None:
            path.write_bytes(content)
    return setup


def truncate_newest_checkpoint(tmp):
    data = sorted((tmp / "run" / "checkpoints").glob("ckpt-*.data-*"))[-1]
    data.write_bytes(data.read_bytes()[:100])


def mnist_file_cases():
    """The real MNIST's files, damaged, in --data-dir."""
    data = ["--data-dir", "{tmp}/data", *QUICK, "--out", "{tmp}/new"]
    return [
        Case("files read", "MNIST: truncated gzip", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                 (d / "train-images-idx3-ubyte.gz").read_bytes()[:5000]))),
        Case("files read", "MNIST: not gzip", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(b"plain"))),
        Case("files read", "MNIST: bad magic", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: rewrite_images(d, lambda raw: b"\0\0\0\0" + raw[4:]))),
        Case("files read", "MNIST: 32x32 images", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: rewrite_images(
                 d, lambda raw: raw[:8] + (32).to_bytes(4, "big") * 2 + raw[16:]))),
        Case("files read", "MNIST: a header promising 2**32-1 images", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: rewrite_images(
                 d, lambda raw: raw[:4] + (2**32 - 1).to_bytes(4, "big") + raw[8:]))),
        Case("files read", "MNIST: zero images", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: rewrite_images(
                 d, lambda raw: raw[:4] + (0).to_bytes(4, "big") + raw[8:16]))),
        Case("files read", "MNIST: trailing bytes", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: rewrite_images(d, lambda raw: raw + b"extra"))),
        Case("files read", "MNIST: labels file missing", ["gan_mnist.py", *data, "--epochs", "1"], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: (d / "train-labels-idx1-ubyte.gz").unlink())),
        Case("files read", "MNIST: a label of 12", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: (d / "train-labels-idx1-ubyte.gz").write_bytes(
                 gzip.compress(gzip.decompress((d / "train-labels-idx1-ubyte.gz").read_bytes())[:8]
                               + bytes([12]) * 60000)))),
        Case("files read", "MNIST: a directory in a file's place", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: ((d / "train-images-idx3-ubyte.gz").unlink(),
                                                          (d / "train-images-idx3-ubyte.gz").mkdir()))),
        Case("files read", "MNIST: a symlink loop", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: ((d / "train-images-idx3-ubyte.gz").unlink(),
                                                          (d / "train-images-idx3-ubyte.gz").symlink_to(
                                                              d / "train-images-idx3-ubyte.gz")))),
        Case("files read", "MNIST: a dangling symlink", ["gan_mnist.py", *data], run=None,
             setup=lambda tmp: mnist_copy(tmp, lambda d: ((d / "train-images-idx3-ubyte.gz").unlink(),
                                                          (d / "train-images-idx3-ubyte.gz").symlink_to(
                                                              d / "gone")))),
    ]


def run_file_cases():
    """A trained run's files, damaged: config.json, generator.keras, checkpoints, history.json."""
    resume = ["gan_mnist.py", "--resume", "--epochs", "2", "--out", "{run}"]
    configs = {
        "batch_size 0": {"batch_size": 0}, "lr 'fast'": {"lr": "fast"}, "classes null": {"classes": None},
        "classes '42'": {"classes": "42"}, "conditional 'yes'": {"conditional": "yes"}, "seed -1": {"seed": -1},
        "latent_dim 2.5": {"latent_dim": 2.5}, "loss 'l2'": {"loss": "l2"}, "ema 1": {"ema": 1},
        "dataset 'svhn'": {"dataset": "svhn"}, "script 'other'": {"script": "other"},
        "a newer format": {"format": "tf2-gan-mnist run 9"}, "another program's": {"format": "other"},
        "no format, no shape": {"format": DELETE, "image_shape": DELETE},
    }
    cases = [Case("files read", f"config.json: {name}", resume, setup=edit_config(**changes))
             for name, changes in configs.items()]
    cases += [
        Case("files read", "config.json: not JSON", resume, setup=replace("config.json", b"{")),
        Case("files read", "config.json: a list", resume, setup=replace("config.json", b"[1]")),
        Case("files read", "config.json: a directory", resume, setup=replace("config.json", "dir")),
        Case("files read", "config.json: empty", resume, setup=replace("config.json", b"")),
        Case("files read", "config.json (generate): not JSON", ["gan_mnist.py", "--generate", "4", "--out", "{run}"],
             setup=replace("config.json", b"{")),
        Case("files read", "generator.keras: truncated", ["gan_mnist.py", "--generate", "4", "--out", "{run}"],
             setup=replace("generator.keras", lambda path: path.read_bytes()[:4000])),
        Case("files read", "generator.keras: empty", ["gan_mnist.py", "--generate", "4", "--out", "{run}"],
             setup=replace("generator.keras", b"")),
        Case("files read", "generator.keras: a zip of junk", ["gan_mnist.py", "--evaluate", "--out", "{run}"],
             setup=replace("generator.keras", _junk_zip)),
        Case("files read", "generator.keras: a directory", ["gan_mnist.py", "--interpolate", "--out", "{run}"],
             setup=replace("generator.keras", "dir")),
        Case("files read", "generator.keras: missing", ["gan_mnist.py", "--generate", "4", "--out", "{run}"],
             setup=replace("generator.keras", None)),
        Case("files read", "generator.keras: the other script's (it draws)", ["dcgan_mnist.py", "--generate", "4",
                                                                               "--out", "{run}"], expect="ran",
             keep=False),
        Case("files read", "checkpoints: the newest truncated, the others gone", resume,
             setup=lambda tmp: (truncate_newest_checkpoint(tmp),)),
        Case("files read", "checkpoints: deleted", resume, setup=replace("checkpoints", None)),
        Case("files read", "checkpoints: a file", resume, setup=replace("checkpoints", b"x")),
        Case("files read", "checkpoints: the other script's", ["dcgan_mnist.py", "--resume", "--epochs", "2",
                                                               "--out", "{run}"], run="dcgan",
             setup=lambda tmp: (shutil.rmtree(tmp / "run" / "checkpoints"),
                                shutil.copytree(TRAINED / "gan" / "checkpoints", tmp / "run" / "checkpoints"))),
        Case("files read", "tensorboard: a file", resume, setup=replace("tensorboard", b"x")),
        Case("files read", "history.json: damaged (the checkpoint holds it)", resume, expect="ran", keep=False,
             setup=replace("history.json", b"{")),
    ]
    return cases


def _junk_zip(path):
    import io
    import zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", "not json")
    return buffer.getvalue()


def location_cases():
    cases = [
        Case("locations written", "--out is a file", ["gan_mnist.py", *QUICK, "--out", "{tmp}/a-file"], run=None,
             setup=lambda tmp: (tmp / "a-file").write_text("keep")),
        Case("locations written", "--out under a file", ["gan_mnist.py", *QUICK, "--out", "{tmp}/a-file/run"],
             run=None, setup=lambda tmp: (tmp / "a-file").write_text("keep")),
        Case("locations written", "--out inside another run's checkpoints", ["gan_mnist.py", *QUICK, "--out",
                                                                              "{run}/checkpoints"]),
        Case("locations written", "--out inside another run", ["gan_mnist.py", *QUICK, "--out", "{run}/sub/run"]),
        Case("locations written", "--out another program's directory", ["gan_mnist.py", *QUICK, "--overwrite",
                                                                         "--out", "{tmp}/other"], run=None,
             setup=lambda tmp: ((tmp / "other").mkdir(), (tmp / "other" / "config.json").write_text('{"x": 1}'),
                                (tmp / "other" / ".lock").write_text("theirs"))),
        Case("locations written", ".lock a symlink to a file outside", ["gan_mnist.py", "--resume", "--epochs", "2",
                                                                        "--out", "{run}"],
             setup=lambda tmp: ((tmp / "run" / ".lock").unlink(missing_ok=True),
                                (tmp / "outside").write_text("precious"),
                                (tmp / "run" / ".lock").symlink_to(tmp / "outside"))),
        Case("locations written", ".lock a directory", ["gan_mnist.py", "--resume", "--epochs", "2", "--out", "{run}"],
             setup=replace(".lock", "dir")),
        Case("locations written", "--samples-npz in a missing folder", ["gan_mnist.py", "--generate", "4",
                                                                        "--samples-npz", "{tmp}/no/such/s.npz",
                                                                        "--out", "{run}"]),
        Case("locations written", "--samples-npz a directory", ["gan_mnist.py", "--generate", "4", "--samples-npz",
                                                                "{tmp}/d.npz", "--out", "{run}"],
             setup=lambda tmp: (tmp / "d.npz").mkdir()),
        Case("locations written", "--samples-npz under a file", ["gan_mnist.py", "--generate", "4", "--samples-npz",
                                                                 "{tmp}/a-file/s.npz", "--out", "{run}"],
             setup=lambda tmp: (tmp / "a-file").write_text("keep")),
        Case("locations written", "--generate 10**12 into an npz", ["gan_mnist.py", "--generate", str(10**12),
                                                                    "--samples-npz", "{tmp}/s.npz", "--out", "{run}"]),
        Case("locations written", "--generate 10**9 without an npz", ["gan_mnist.py", "--generate", str(10**9),
                                                                      "--out", "{run}"], expect="ran", keep=False),
        Case("locations written", "--generate into a run directory that is gone", ["gan_mnist.py", "--generate", "4",
                                                                                   "--out", "{tmp}/gone"], run=None),
    ]
    if can_mount():  # Read-only mounts need root (and a machine that allows mounts).
        for flags in (["--generate", "4"], ["--interpolate"], ["--evaluate", "--num-samples", "100"],
                      ["--resume", "--epochs", "2"], ["--overwrite", "--epochs", "1"]):
            cases.append(Case("locations written", f"read-only run directory: {' '.join(flags)}",
                              ["gan_mnist.py", *flags, "--out", "{ro}/run"], run="gan-ro"))
    return cases


def can_mount():
    """Whether a tmpfs can be mounted here (root, and a machine that allows it)."""
    probe = Path(tempfile.mkdtemp(prefix="bad-inputs-mount-"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
        if mounted.returncode == 0:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return mounted.returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def signal_cases():
    train = ["gan_mnist.py", "--epochs", "50", "--limit", "6400", "--batch-size", "64", "--eval-every", "0",
             "--out", "{tmp}/new"]
    return [
        Case("signals", "SIGTERM while loading data", train, run=None, expect="one line",
             signal_after=("TensorFlow ", signal.SIGTERM)),
        Case("signals", "SIGINT while loading data", train, run=None, signal_after=("TensorFlow ", signal.SIGINT)),
        Case("signals", "SIGTERM while training", train, run=None, signal_after=("epoch 1/50 step", signal.SIGTERM)),
        Case("signals", "SIGINT while training", train, run=None, signal_after=("epoch 1/50 step", signal.SIGINT)),
        Case("signals", "SIGTERM during --generate", ["gan_mnist.py", "--generate", "2000000", "--samples-npz",
                                                      "{tmp}/s.npz", "--out", "{run}"],
             signal_after=("@temporary {tmp}/.s.tmp-*.npz", signal.SIGTERM)),
        Case("signals", "SIGINT during --generate (DCGAN)", ["dcgan_mnist.py", "--generate", "500000", "--samples-npz",
                                                             "{tmp}/s.npz", "--out", "{run}"], run="dcgan",
             signal_after=("@temporary {tmp}/.s.tmp-*.npz", signal.SIGINT)),
        Case("signals", "SIGTERM waiting for a cluster's peers", ["gan_mnist.py", "--out", "{tmp}/new"], run=None,
             env={"TF_CONFIG": "@cluster"}, signal_after=("Waiting up to", signal.SIGTERM)),
        Case("signals", "a cluster's peers never come", ["gan_mnist.py", "--peer-timeout", "0.05", "--out",
                                                         "{tmp}/new"], run=None, env={"TF_CONFIG": "@cluster"}),
    ]


FOLDER_QUICK = ["--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--seed", "3"]


def pictures(relative="outside", classes=("cat", "dog"), count=12, start=0):
    """setup: `count` real MNIST digits as PNGs in each class subfolder of {tmp}/`relative` (flat with classes=())."""
    def setup(tmp):
        from PIL import Image

        images = mnist_images()
        for index, name in enumerate(classes or ("",)):
            target = tmp / relative / name
            target.mkdir(parents=True, exist_ok=True)
            for number in range(count):
                picture = images[start + index * count + number]
                Image.fromarray(picture).save(target / f"{number:03d}.png")
    return setup


def mnist_images():
    """The first thousand real MNIST training images, uint8 (N, 28, 28)."""
    global MNIST_IMAGES
    if MNIST_IMAGES is None:
        import utils
        MNIST_IMAGES = utils.load_mnist("train", MNIST, limit=1000)[0]
    return MNIST_IMAGES


def then(*steps):
    """setup: several setups in turn."""
    def setup(tmp):
        for step in steps:
            step(tmp)
    return setup


FOLDER_TRAIN = ["gan_mnist.py", "--dataset", "folder", "--data-dir", "{tmp}/outside", *FOLDER_QUICK, "--out",
                "{tmp}/new"]
FOLDER = dict(run=None, env={"GAN_MNIST_CACHE": "{tmp}/cache"})  # No trained run; a cache of the case's own.


def put(relative, content):
    """setup: at {tmp}/outside/`relative`, a directory ("dir"), a FIFO ("fifo"), a link (("link", target)) or bytes."""
    def setup(tmp):
        path = tmp / "outside" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "dir":
            path.mkdir()
        elif content == "fifo":
            os.mkfifo(path)
        elif isinstance(content, tuple):
            path.symlink_to(tmp / "outside" / content[1])
        else:
            path.write_bytes(content)
    return setup


def jpeg_named_png(tmp):
    """setup: a JPEG among the cat pictures, named .png."""
    from PIL import Image
    Image.fromarray(mnist_images()[500]).save(tmp / "outside" / "cat" / "lies.png", format="JPEG")


def dead_temporary(tmp):
    """setup: the temporary of a decoded-cache writer that died (pid 999999) in the case's cache."""
    (tmp / "cache" / "folders").mkdir(parents=True)
    (tmp / "cache" / "folders" / ".0123abcd-28x1-24.npz.tmp-999999").write_bytes(b"x" * 1000)


def damaged_cache(tmp):
    """setup: a run that caches the folder's decoded set, then that cache cut short."""
    subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), "--dataset", "folder", "--data-dir",
                    str(tmp / "outside"), *FOLDER_QUICK, "--out", str(tmp / "first")], capture_output=True,
                   env=dict(os.environ, GAN_MNIST_CACHE=str(tmp / "cache"), MNIST_DIR=str(MNIST)), cwd=tmp)
    for path in (tmp / "cache" / "folders").glob("*.npz"):
        path.write_bytes(path.read_bytes()[:200])


def folder_cases():
    """Issue 41: a folder of one's own pictures (--dataset folder), its caches, and where it is given from."""
    return folder_place_cases() + folder_content_cases() + folder_class_and_cache_cases()


def folder_place_cases():
    """Pictures given to a named dataset, or no folder given."""
    folder = FOLDER
    return [
        Case("folders", "--data-dir of pictures without --dataset folder", ["gan_mnist.py", "--data-dir",
                                                                           "{tmp}/outside", *QUICK, "--out", "{tmp}/new"],
             setup=pictures(), **folder),
        Case("folders", "--data-dir of flat pictures without --dataset folder", ["gan_mnist.py", "--data-dir",
                                                                                "{tmp}/outside", *QUICK, "--out",
                                                                                "{tmp}/new"],
             setup=pictures(classes=()), **folder),
        Case("folders", "--data-dir of other files for MNIST", ["gan_mnist.py", "--data-dir", "{tmp}/outside", *QUICK,
                                                               "--out", "{tmp}/new"],
             setup=put("notes.txt", b"mine"), **folder),
        Case("folders", "--data-dir of pictures for CIFAR-10", ["dcgan_mnist.py", "--dataset", "cifar10", "--data-dir",
                                                               "{tmp}/outside", *QUICK, "--out", "{tmp}/new"],
             setup=pictures(), **folder),
        Case("folders", "--dataset folder without --data-dir", ["gan_mnist.py", "--dataset", "folder", *FOLDER_QUICK,
                                                              "--out", "{tmp}/new"], **folder),
    ]


def folder_content_cases():
    """What the folder holds: nothing, no pictures, unreadable ones, links, pictures at two levels."""
    train, folder = FOLDER_TRAIN, FOLDER
    return [
        Case("folders", "--data-dir a missing folder", train, **folder),
        Case("folders", "--data-dir a file", train, setup=lambda tmp: (tmp / "outside").write_text("keep"), **folder),
        Case("folders", "an empty folder", train, setup=lambda tmp: (tmp / "outside").mkdir(), **folder),
        Case("folders", "only files that are not pictures", train, setup=put("a.txt", b"text"), **folder),
        Case("folders", "only hidden pictures", train, setup=then(pictures(classes=()), lambda tmp: [
            p.rename(p.with_name("." + p.name)) for p in (tmp / "outside").glob("*.png")]), **folder),
        Case("folders", "every picture corrupt", train, setup=then(pictures(classes=()), lambda tmp: [
            p.write_bytes(b"\x89PNG junk") for p in (tmp / "outside").glob("*.png")]), **folder),
        Case("folders", "an empty class", train, setup=then(pictures(), put("bird", "dir")), **folder),
        Case("folders", "pictures at the top and in a subfolder", train,
             setup=then(pictures(classes=()), pictures(classes=("rejects",), count=2, start=100)), **folder),
        Case("folders", "a class that is a link to another", train,
             setup=then(pictures(), put("puppy", ("link", "dog"))), **folder),
        Case("folders", "a picture linked from another class", train,
             setup=then(pictures(), put("cat/also.png", ("link", "dog/000.png"))), **folder),
        Case("folders", "a FIFO named like a picture", train, setup=then(pictures(), put("cat/pipe.png", "fifo")),
             expect="ran", **folder),
        Case("folders", "a directory named like a picture", train,
             setup=then(pictures(), put("cat/sub.png", "dir")), expect="ran", **folder),
        Case("folders", "a dangling link named like a picture", train,
             setup=then(pictures(), put("cat/gone.png", ("link", "nowhere.png"))), expect="ran", **folder),
        Case("folders", "a JPEG named .png", train, setup=then(pictures(), jpeg_named_png), expect="ran", **folder),
        Case("folders", "an empty picture file", train, setup=then(pictures(), put("cat/empty.png", b"")),
             expect="ran", **folder),
        Case("folders", "a file name that is not UTF-8", train,
             setup=then(pictures(), lambda tmp: os.rename(tmp / "outside" / "cat" / "000.png",
                                                          os.fsencode(tmp / "outside" / "cat") + b"/\xff.png")),
             expect="ran", **folder),
        Case("folders", "--data-dir given through a link", ["gan_mnist.py", "--dataset", "folder", "--data-dir",
                                                            "{tmp}/link", *FOLDER_QUICK, "--out", "{tmp}/new"],
             setup=then(pictures(), lambda tmp: (tmp / "link").symlink_to(tmp / "outside")), expect="ran", **folder),
    ]


def folder_class_and_cache_cases():
    """Classes named by numbers, --classes and --limit on classes, the cache, and --out inside the folder."""
    train, folder = FOLDER_TRAIN, FOLDER
    numbered = pictures(classes=("0", "1", "2", "10"), count=8)
    return [
        Case("folders", "numbered classes: --classes 2 is the class named 2", train[:-2] + ["--classes", "2", "--out",
                                                                                          "{tmp}/new"],
             setup=numbered, expect="ran", **folder),
        Case("folders", "--classes a Unicode digit", train[:-2] + ["--classes", "\u00b2", "--out", "{tmp}/new"],
             setup=numbered, **folder),
        Case("folders", "--classes a class that is not there", train[:-2] + ["--classes", "bird", "--out",
                                                                             "{tmp}/new"], setup=pictures(), **folder),
        Case("folders", "--conditional on a flat folder", train + ["--conditional"], setup=pictures(classes=()),
             **folder),
        Case("folders", "--conditional --limit leaving a class without a picture", train + ["--conditional", "--limit",
                                                                                             "8"],
             setup=then(pictures(), pictures(classes=("zebra",), count=1, start=200)), **folder),
        Case("folders", "a class of one picture is not scored", train[:-2] + ["--eval-every", "1", "--out",
                                                                              "{tmp}/new"],
             setup=then(pictures(), pictures(classes=("zebra",), count=1, start=200)), expect="ran", **folder),
        Case("folders", "--batch-size larger than the folder", train + ["--batch-size", "100"], setup=pictures(),
             **folder),
        Case("folders", "--limit larger than the folder", train + ["--limit", "1000"], setup=pictures(), expect="ran",
             **folder),
        Case("folders", "GAN_MNIST_CACHE a file", train, setup=then(pictures(), lambda tmp: (tmp / "a-file").write_text(
            "x")), env={"GAN_MNIST_CACHE": "{tmp}/a-file"}, run=None, expect="ran"),
        Case("folders", "a dead writer's temporary in the cache", train, setup=then(pictures(), dead_temporary),
             expect="ran", **folder),
        Case("folders", "a damaged decoded cache", train, setup=then(pictures(), damaged_cache), expect="ran",
             **folder),
        Case("folders", "--out inside the picture folder", train[:-2] + ["--out", "{tmp}/outside/run"],
             setup=pictures(), **folder),
    ]


def edited(script, name, value=None, replace_text=None):
    """setup: a copy of `script` in {tmp} with its constant NAME = value (its line dropped for None), or with
    `replace_text` (old, new) replaced: as a user edits the top of a script."""
    def setup(tmp):
        lines = []
        for line in (REPO / script).read_text().splitlines():
            if replace_text and replace_text[0] in line:
                line = line.replace(*replace_text)
            elif not replace_text and line.startswith(f"{name} = "):
                if value is None:
                    continue
                line = f"{name} = {value}  # edited"
            lines.append(line)
        (tmp / script).write_text("\n".join(lines) + "\n")
    return setup


def constant_cases():
    """Issue 41, 5 and 6: the constants at the top of the scripts, edited as the README invites."""
    quick = ["--limit", "64", "--batch-size", "32", "--eval-every", "0"]
    path = {"PYTHONPATH": str(REPO)}
    cases = []
    for script, name, value in [
        ("gan_mnist.py", "LR", '"fast"'), ("gan_mnist.py", "LR", None), ("gan_mnist.py", "EPOCHS", "2.5"),
        ("gan_mnist.py", "EPOCHS", "0"), ("gan_mnist.py", "EPOCHS", "-1"), ("gan_mnist.py", "BATCH_SIZE", '"64"'),
        ("gan_mnist.py", "SEED", "-1"), ("gan_mnist.py", "SEED", "1.5"), ("gan_mnist.py", "CONDITIONAL", '"yes"'),
        ("gan_mnist.py", "CONDITIONAL", "1"), ("gan_mnist.py", "DATASET", '"imagenet"'),
        ("gan_mnist.py", "DATASET", "None"), ("gan_mnist.py", "CLASSES", '"zebra"'), ("gan_mnist.py", "CLASSES", "3"),
        ("gan_mnist.py", "LOSS", '"wasserstein"'), ("gan_mnist.py", "R1", "-1"), ("gan_mnist.py", "EMA", "1.0"),
        ("gan_mnist.py", "DROPOUT", None), ("gan_mnist.py", "LEAKY_SLOPE", '"0.2"'), ("gan_mnist.py", "SAMPLE_GRID", "0"),
        ("gan_mnist.py", "EVAL_EVERY", "-1"), ("gan_mnist.py", "AUGMENT", '"blur"'), ("gan_mnist.py", "LIMIT", "-5"),
        ("gan_mnist.py", "LATENT_DIM", "[100]"), ("dcgan_mnist.py", "ARCH", '"48"'), ("dcgan_mnist.py", "ARCH", "28"),
        ("dcgan_mnist.py", "BN_MOMENTUM", None), ("dcgan_mnist.py", "G_STEPS", "0"), ("dcgan_mnist.py", "LR", None),
    ]:
        shown = "deleted" if value is None else f"= {value}"
        cases.append(Case("constants", f"{script} {name} {shown}", ["{tmp}/" + script, "--out", "{tmp}/new"],
                          setup=edited(script, name, value), env=path, run=None))
    cases += [
        Case("constants", "gan_mnist.py EPOCHS = 2.0 (a whole float)", ["{tmp}/gan_mnist.py", *quick, "--out",
                                                                        "{tmp}/new"],
             setup=edited("gan_mnist.py", "EPOCHS", "2.0"), env=path, run=None, expect="ran"),
        Case("constants", "dcgan_mnist.py PRESETS['28'] lr = 'fast'", ["{tmp}/dcgan_mnist.py", "--out", "{tmp}/new"],
             setup=edited("dcgan_mnist.py", None, replace_text=("lr=1e-3,", 'lr="fast",')), env=path, run=None),
        Case("constants", "dcgan_mnist.py PRESETS['28'] batch_size = 64.0", ["{tmp}/dcgan_mnist.py", *quick[:2],
                                                                              "--epochs", "1", "--eval-every", "0",
                                                                              "--out", "{tmp}/new"],
             setup=edited("dcgan_mnist.py", None, replace_text=("batch_size=64, latent_dim=100, kernel_size=5",
                                                                "batch_size=64.0, latent_dim=100, kernel_size=5")),
             env=path, run=None, expect="ran"),
        Case("constants", "--resume after LR was edited", ["{tmp}/gan_mnist.py", "--resume", "--epochs", "2", "--out",
                                                           "{run}"],
             setup=edited("gan_mnist.py", "LR", "5e-4"), env=path),
        Case("constants", "--resume after EMA was edited (DCGAN)", ["{tmp}/dcgan_mnist.py", "--resume", "--epochs",
                                                                    "2", "--out", "{run}"],
             setup=edited("dcgan_mnist.py", "EMA", "0.9"), env=path, run="dcgan"),
        Case("constants", "--resume after EPOCHS was edited (taken)", ["{tmp}/gan_mnist.py", "--resume", "--out",
                                                                       "{run}"],
             setup=edited("gan_mnist.py", "EPOCHS", "2"), env=path, expect="ran", keep=False),
    ]
    return cases


def all_cases():
    return (flag_cases() + environment_cases() + mnist_file_cases() + run_file_cases() + location_cases()
            + signal_cases() + folder_cases() + constant_cases())


def use(mnist, trained):
    """Point the cases' setups at the directory of the real MNIST files and at the trained runs' directory."""
    global MNIST, TRAINED
    MNIST, TRAINED = Path(mnist), Path(trained)

