"""Fashion-MNIST and CIFAR-10 readers: real data, the restricted unpickler, corrupt files, downloads."""

import hashlib
import io
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest

import utils
from ganlab import errors
from ganlab.datasets import cifar10, downloads


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Each test sees only the data it names: no dataset variables, an empty Keras cache, no real mirror."""
    for name in ("FASHION_MNIST_DIR", "CIFAR10_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("FASHION_MNIST_MIRROR", "http://127.0.0.1:9/")
    monkeypatch.setenv("CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr(downloads, "DATA_ROOT", tmp_path / "repo" / "data")


def test_fashion_mnist_is_found_with_no_flag(fashion_dir, monkeypatch):
    if fashion_dir not in downloads.IDX_DATASETS["fashion_mnist"].system_dirs:
        monkeypatch.setenv("FASHION_MNIST_DIR", str(fashion_dir))  # Found there before the isolation.
    images, labels = utils.load_fashion_mnist("test")  # No flag: the search finds it (Debian's copy in CI).
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10


def test_fashion_mnist_download_from_a_local_mirror_is_verified(tmp_path, fashion_dir, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fashion_dir / name, mirror / name)
    monkeypatch.setattr(downloads.IDX_DATASETS["fashion_mnist"], "system_dirs", ())
    monkeypatch.setenv("FASHION_MNIST_MIRROR", mirror.as_uri())
    images, _ = utils.load_fashion_mnist("test", tmp_path / "downloaded", limit=5)
    assert images.shape == (5, 28, 28)
    (mirror / "t10k-images-idx3-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(errors.DataError, match="SHA-256"):
        utils.load_fashion_mnist("test", tmp_path / "again")
    assert not (tmp_path / "again").exists()  # Made for the download, removed with it.


def test_real_cifar10_reads_as_colour_images_with_balanced_classes(cifar_dir):
    images, labels = cifar10.load("test", cifar_dir)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    # Channel order is red, green, blue: the test set's mean colour is reddish-grey, blue lowest.
    means = images.reshape(-1, 3).mean(axis=0)
    assert means[2] < means[0]


def cifar_batch(count=4, **changes):
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"testing batch", b"labels": [int(i % 10) for i in range(count)],
             b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8)}
    batch.update({key.encode(): value for key, value in changes.items()})
    return batch


def write_cifar(directory, batch=None, raw=None, name="test_batch"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(raw if raw is not None else pickle.dumps(batch or cifar_batch(), protocol=2))
    return directory / name


def test_a_small_cifar_batch_round_trips(tmp_path):
    batch = cifar_batch(5)
    write_cifar(tmp_path, batch)
    images, labels = cifar10.load("test", tmp_path)
    assert images.shape == (5, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(images[2, :, :, 1], batch[b"data"][2, 1024:2048].reshape(32, 32))


class RunsACommand:
    """Unpickling this would call os.system: what a malicious 'dataset' file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_restricted_unpickler_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = write_cifar(tmp_path / "data", raw=pickle.dumps({b"data": RunsACommand(marker), b"labels": [0]}))
    with pytest.raises(errors.DataError, match=r"refused to unpickle (posix|os)\.system") as error:
        cifar10.load("test", tmp_path / "data")
    assert str(path) in str(error.value)
    assert not marker.exists()  # The command never ran.


@pytest.mark.parametrize("make, fault", [
    (lambda d: write_cifar(d, raw=pickle.dumps(cifar_batch(), protocol=2)[:-300]), "not a CIFAR-10 batch"),
    (lambda d: write_cifar(d, raw=b"not a pickle at all"), "not a CIFAR-10 batch"),
    (lambda d: write_cifar(d, raw=pickle.dumps([1, 2, 3])), "expected a dict with data and labels"),
    (lambda d: write_cifar(d, cifar_batch(data=np.zeros((4, 1024), np.uint8))), "shape (N, 3072)"),
    (lambda d: write_cifar(d, cifar_batch(data=np.zeros((4, 3072), np.float32))), "uint8 array"),
    (lambda d: write_cifar(d, cifar_batch(labels=[0, 1, 2, 10])), "integers 0..9"),
    (lambda d: write_cifar(d, cifar_batch(labels=[0, 1, 2])), "4 images but"),
])
def test_corrupt_cifar_batches_get_one_clear_error(tmp_path, make, fault):
    path = make(tmp_path)
    with pytest.raises(errors.DataError) as error:
        cifar10.load("test", tmp_path)
    assert fault in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def cifar_archive(path):
    """A tar.gz laid out like the official one, with small batches."""
    with tarfile.open(path, "w:gz") as tar:
        for name in cifar10.FILES["train"] + cifar10.FILES["test"] + ("batches.meta",):
            data = pickle.dumps(cifar_batch(3) if name != "batches.meta" else {b"label_names": []}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cifar_download_from_a_local_archive_is_verified_and_extracted(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar10, "SHA256", cifar_archive(archive))
    monkeypatch.setenv("CIFAR10_URL", archive.as_uri())
    images, labels = cifar10.load("train", tmp_path / "downloaded")
    assert images.shape == (15, 32, 32, 3) and len(labels) == 15
    assert sorted(p.name for p in (tmp_path / "downloaded").iterdir()) == sorted(
        cifar10.FILES["train"] + cifar10.FILES["test"] + ("batches.meta",))


def test_cifar_download_with_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    cifar_archive(archive)
    monkeypatch.setenv("CIFAR10_URL", archive.as_uri())  # The real archive's hash will not match.
    with pytest.raises(errors.DataError, match="CIFAR-10 download failed.*SHA-256"):
        cifar10.load("train", tmp_path / "downloaded")
    assert not (tmp_path / "downloaded").exists()  # Made for the download, removed with it.


# ------------------------------------------------------------------------------------------------
# Training on each dataset, --classes, and evaluation per dataset
# ------------------------------------------------------------------------------------------------

import imageio.v3 as iio  # noqa: E402

import dcgan_mnist  # noqa: E402
import gan_mnist  # noqa: E402
from conftest import parse  # noqa: E402
from ganlab.sampling import evaluation  # noqa: E402

QUICK = ["--epochs", "1", "--limit", "64", "--batch-size", "32", "--eval-every", "0"]


@pytest.mark.parametrize("module, dataset, extra, tile, channels", [
    (gan_mnist, "fashion_mnist", [], 28, 1),
    (gan_mnist, "cifar10", [], 32, 3),
    (dcgan_mnist, "fashion_mnist", ["--arch", "32"], 32, 1),
    (dcgan_mnist, "cifar10", [], 32, 3),  # --arch auto: 32 for CIFAR-10.
    (dcgan_mnist, "cifar10", ["--arch", "28", "--classes", "automobile"], 28, 3),
])
@pytest.mark.slow
def test_each_script_trains_on_each_dataset(tmp_path, fashion_dir, cifar_dir, module, dataset, extra, tile, channels):
    data_dir = cifar_dir if dataset == "cifar10" else fashion_dir
    run_dir = tmp_path / "run"
    module.main(QUICK + extra + ["--dataset", dataset, "--data-dir", str(data_dir), "--out", str(run_dir)])
    side = 10 * (tile + 2) + 2
    grid = iio.imread(run_dir / "epoch_001.png")
    assert grid.shape == ((side, side, 3) if channels == 3 else (side, side))
    if channels == 3:
        assert np.abs(grid[..., 0].astype(int) - grid[..., 2]).max() > 0  # Colour, not grey in three channels.
    assert iio.imread(run_dir / "progress.gif", index=None).shape[1:3] == (side, side)
    real = iio.imread(run_dir / "real_samples.png")  # The 64 training images: 7 rows of 10.
    assert real.shape == ((7 * (tile + 2) + 2, side) + ((3,) if channels == 3 else ()))
    npz = tmp_path / "samples.npz"
    module.main(["--out", str(run_dir), "--generate", "6", "--samples-npz", str(npz)])
    with np.load(npz, allow_pickle=False) as archive:
        native = (32, 32, 3) if dataset == "cifar10" else (28, 28)
        assert archive["images"].shape == (6,) + native and archive["images"].dtype == np.uint8


def test_classes_filter_by_name_and_index(cifar_dir, capsys):
    config = parse(gan_mnist, "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--classes", "automobile, 9")
    images, labels = utils.load_dataset(config, "test")
    assert sorted(set(labels.tolist())) == [1, 9] and len(images) == 2000
    config = parse(gan_mnist, "--dataset", "cifar10", "--data-dir", str(cifar_dir), "--classes", "automobile")
    assert len(utils.load_dataset(config, "train")[0]) == 5000
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--dataset", "cifar10", "--classes", "unicorn"])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert "--classes: 'unicorn' is not a cifar10 class" in error and "automobile" in error
    with pytest.raises(SystemExit) as exit_status:
        errors.run_main(gan_mnist.main, ["--classes", "10"])  # MNIST has 0..9.
    assert exit_status.value.code == 2
    assert "--classes: '10' is not a mnist class; use 0..9" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_works_in_colour_and_on_a_class_subset(tmp_path, cifar_dir):
    train, train_labels = cifar10.load("train", cifar_dir, limit=3000)
    test, test_labels = cifar10.load("test", cifar_dir, limit=1000)
    evaluator = evaluation.Evaluator.load_or_train(tmp_path, train, train_labels, test, test_labels,
                                                   classes=[1, 9], log=lambda message: None, epochs=1)
    assert evaluator.shape == (32, 32, 3) and evaluator.classes == [1, 9]
    subset = test[np.isin(test_labels, [1, 9])]
    figures = evaluator.evaluate(subset)
    assert figures["fid"] == pytest.approx(0, abs=1e-6) and figures["classes"] == 2
    assert evaluator.floor["classes"] == 2
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\), got \(5, 28, 28\)"):
        evaluator.evaluate(np.zeros((5, 28, 28), np.uint8))


# ------------------------------------------------------------------------------------------------
# Pickles that declare sizes no batch has, and a batch missing from the directory
# ------------------------------------------------------------------------------------------------


class HugeArray:
    """Unpickling this asks numpy for a 1 TB array outright."""

    def __init__(self, constructor, args):
        self.constructor, self.args = constructor, args

    def __reduce__(self):
        return self.constructor, self.args


@pytest.mark.parametrize("raw, fault", [
    (b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b".", "expected 4611686018427387904 bytes in a bytes8"),
    (pickle.dumps({b"data": HugeArray(np.ndarray, ((2**40,),)), b"labels": [0]}, protocol=2),
     "an array of shape (1099511627776,) is larger than a CIFAR-10 batch"),
    (pickle.dumps({b"data": HugeArray(np._core.multiarray._reconstruct, (np.ndarray, (2**40,), b"b")),
                   b"labels": [0]}, protocol=2), "an array of shape (1099511627776,) is larger than a CIFAR-10 batch"),
], ids=["2**62-byte string", "ndarray call", "_reconstruct call"])
def test_a_pickle_declaring_a_huge_size_is_refused_without_allocating_it(tmp_path, raw, fault):
    path = write_cifar(tmp_path, raw=raw)
    with pytest.raises(errors.DataError) as error:
        cifar10.load("test", tmp_path)
    assert fault in str(error.value) and str(path) in str(error.value)


def test_a_file_larger_than_a_batch_is_not_read(tmp_path):
    path = write_cifar(tmp_path, raw=b"")
    with open(path, "wb") as handle:
        handle.truncate(cifar10.BATCH_BYTES + 1)  # Sparse: nothing is written.
    with pytest.raises(errors.DataError, match="larger than a CIFAR-10 batch"):
        cifar10.load("test", tmp_path)


def test_a_missing_batch_is_named(tmp_path, cifar_dir):
    directory = tmp_path / "cifar"
    directory.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "test_batch"):
        (directory / name).symlink_to((cifar_dir / name).resolve())
    with pytest.raises(errors.DataError) as error:
        cifar10.load("train", directory)
    assert str(error.value) == (f"{directory}: incomplete CIFAR-10: data_batch_5 missing (the train split needs "
                                f"data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5)")
    assert cifar10.load("test", directory)[0].shape == (10000, 32, 32, 3)
