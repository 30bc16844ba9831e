"""MNIST loading: the IDX and npz readers, every corrupt case, the search order and the download."""

import functools
import gzip
import hashlib
import http.server
import shutil
import threading

import numpy as np
import pytest

import utils
from conftest import idx_bytes, run_script, write_mnist
from ganlab import errors
from ganlab.datasets import downloads


@pytest.fixture(autouse=True)
def no_outside_sources(monkeypatch, tmp_path):
    """Each test sees only the data it writes: no $MNIST_DIR, an empty Keras cache, no real mirror."""
    monkeypatch.delenv("MNIST_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("MNIST_MIRROR", "http://127.0.0.1:9/")  # Refused at once: nothing listens on port 9.
    monkeypatch.setattr(downloads, "DATA_ROOT", tmp_path / "repo" / "data")


def test_reads_gzip_and_raw_idx_files_identically(tmp_path):
    images, labels = write_mnist(tmp_path / "gz", count=7, gz=True)
    write_mnist(tmp_path / "raw", count=7, gz=False)
    for directory in ("gz", "raw"):
        loaded_images, loaded_labels = utils.load_mnist("train", tmp_path / directory)
        assert loaded_images.dtype == np.uint8 and loaded_images.shape == (7, 28, 28)
        np.testing.assert_array_equal(loaded_images, images)
        np.testing.assert_array_equal(loaded_labels, labels)


def test_limit_keeps_the_first_images(tmp_path):
    images, _ = write_mnist(tmp_path, count=9)
    loaded, labels = utils.load_mnist("train", tmp_path, limit=4)
    np.testing.assert_array_equal(loaded, images[:4])
    assert len(labels) == 4


def test_reads_keras_mnist_npz(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 5), ("test", 3))}
    arrays |= {"y_train": np.arange(5, dtype=np.uint8), "y_test": np.arange(3, dtype=np.uint8)}
    np.savez(tmp_path / "mnist.npz", **arrays)
    images, labels = utils.load_mnist("test", tmp_path)
    np.testing.assert_array_equal(images, arrays["x_test"])
    np.testing.assert_array_equal(labels, arrays["y_test"])


def test_search_order_data_dir_then_environment_then_keras_cache(tmp_path, monkeypatch):
    write_mnist(tmp_path / "flag", count=3)
    write_mnist(tmp_path / "env", count=5)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "env"))
    assert len(utils.load_mnist("train", tmp_path / "flag")[0]) == 3
    assert len(utils.load_mnist("train")[0]) == 5
    monkeypatch.delenv("MNIST_DIR")
    cache = tmp_path / "keras-home" / "datasets"
    cache.mkdir(parents=True)
    np.savez(cache / "mnist.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.zeros(4, np.uint8),
             x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.zeros(1, np.uint8))
    assert len(utils.load_mnist("train")[0]) == 4


# ------------------------------------------------------------------------------------------------
# Corrupt input: one clear error naming the file
# ------------------------------------------------------------------------------------------------

IMAGES = "train-images-idx3-ubyte"
LABELS = "train-labels-idx1-ubyte"


def corrupt(directory, name, data, gz=True):
    path = directory / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def good_images(count=6, size=28):
    return idx_bytes(np.zeros((count, size, size), np.uint8), 2051)


@pytest.mark.parametrize("case, make, fault", [
    ("not gzip", lambda d: (d / f"{IMAGES}.gz").write_bytes(b"plain bytes, not gzip"), "not a valid gzip file"),
    ("truncated gzip", lambda d: (d / f"{IMAGES}.gz").write_bytes(gzip.compress(good_images())[:-12]),
     "truncated gzip stream"),
    ("bad magic", lambda d: corrupt(d, IMAGES, idx_bytes(np.zeros((6, 28, 28), np.uint8), 2049)), "bad magic number"),
    ("labels magic", lambda d: corrupt(d, LABELS, good_images()), "bad magic number"),
    ("shorter than header", lambda d: corrupt(d, IMAGES, b"\x00\x00\x08\x03\x00"), "truncated"),
    ("truncated pixels", lambda d: corrupt(d, IMAGES, good_images()[:-100]), "truncated"),
    ("trailing bytes", lambda d: corrupt(d, IMAGES, good_images() + b"extra"), "unexpected bytes"),
    ("wrong image size", lambda d: corrupt(d, IMAGES, good_images(size=32)), "wrong image size 32x32"),
    ("label out of range", lambda d: corrupt(d, LABELS, idx_bytes(np.full(6, 12, np.uint8), 2049)), "outside 0..9"),
    ("count mismatch", lambda d: corrupt(d, LABELS, idx_bytes(np.zeros(5, np.uint8), 2049)), "6 images but"),
])
def test_corrupt_idx_files_get_one_clear_error(tmp_path, case, make, fault):
    write_mnist(tmp_path, count=6)
    make(tmp_path)
    with pytest.raises(errors.DataError) as error:
        utils.load_mnist("train", tmp_path)
    message = str(error.value)
    assert fault in message
    assert str(tmp_path) in message and "\n" not in message


def test_raw_file_with_bad_magic_is_named(tmp_path):
    write_mnist(tmp_path, gz=False)
    path = corrupt(tmp_path, IMAGES, b"\x00\x00\x00\x01" + bytes(20), gz=False)
    with pytest.raises(errors.DataError, match=f"{path}: bad magic number 1"):
        utils.load_mnist("train", tmp_path)


@pytest.mark.parametrize("arrays, fault", [
    ({"x_test": np.zeros((2, 28, 28), np.uint8)}, "no array"),
    ({"x_train": np.zeros((2, 32, 32), np.uint8), "y_train": np.zeros(2, np.uint8)}, "expected (N, 28, 28) uint8"),
    ({"x_train": np.zeros((2, 28, 28), np.uint8), "y_train": np.zeros(3, np.uint8)}, "2 images but"),
])
def test_corrupt_npz_gets_one_clear_error(tmp_path, arrays, fault):
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(errors.DataError) as error:
        utils.load_mnist("train", tmp_path)
    assert fault in str(error.value) and "mnist.npz" in str(error.value)


def test_npz_that_is_not_a_zip_is_refused(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"not a zip archive")
    with pytest.raises(errors.DataError, match="mnist.npz: not a readable npz"):
        utils.load_mnist("train", tmp_path)


def test_npz_holding_pickled_objects_is_not_unpickled(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.array([{"evil": 1}], dtype=object), y_train=np.zeros(1))
    with pytest.raises(errors.DataError, match="mnist.npz"):
        utils.load_mnist("train", tmp_path)


@pytest.mark.slow  # Issue 40, 7: over 5 s on an idle AVX2-only machine, so in the whole suite only.
def test_corrupt_file_through_the_script_exits_1_with_one_line(tmp_path):
    write_mnist(tmp_path, count=6)
    corrupt(tmp_path, IMAGES, good_images()[:-10])
    result = run_script("gan_mnist.py", "--epochs", "1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("gan_mnist.py: error: ") and f"{IMAGES}.gz: truncated" in lines[-1]
    assert not (tmp_path / "run").exists()  # Nothing is created for a run that cannot start.


def test_data_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.DataError, match="--data-dir is not a directory"):
        utils.load_mnist("train", tmp_path / "file")


# ------------------------------------------------------------------------------------------------
# Download: verified, atomic, tested against local mirrors
# ------------------------------------------------------------------------------------------------

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def mirror(tmp_path, mnist_dir):
    """A local copy of the real MNIST test files, laid out like a public mirror."""
    if not all((mnist_dir / name).is_file() for name in TEST_FILES):
        pytest.skip(f"{mnist_dir} holds MNIST in another form than the original gzip files")
    directory = tmp_path / "mirror"
    directory.mkdir()
    for name in TEST_FILES:
        shutil.copy(mnist_dir / name, directory / name)
    return directory


def test_download_from_a_file_url_verifies_and_loads(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", mirror.as_uri() + "/")
    target = tmp_path / "downloaded"
    images, labels = utils.load_mnist("test", target)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    for name in TEST_FILES:
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == downloads.MNIST_SHA256[name]
    assert sorted(p.name for p in target.iterdir()) == sorted(TEST_FILES)  # No temporary files remain.


def test_download_over_loopback_http_falls_back_to_the_second_mirror(tmp_path, mirror, monkeypatch):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("MNIST_MIRROR", f"http://127.0.0.1:{port}/missing/,http://127.0.0.1:{port}/")
        images, _ = utils.load_mnist("test", tmp_path / "downloaded", limit=10)
        assert images.shape == (10, 28, 28)
    finally:
        server.shutdown()
        server.server_close()


def test_download_with_wrong_checksum_leaves_nothing_behind(tmp_path, mirror, monkeypatch):
    data = bytearray((mirror / TEST_FILES[0]).read_bytes())
    data[-1] ^= 0xFF  # One flipped byte.
    (mirror / TEST_FILES[0]).write_bytes(bytes(data))
    monkeypatch.setenv("MNIST_MIRROR", mirror.as_uri() + "/")
    target = tmp_path / "downloaded"
    with pytest.raises(errors.DataError) as error:
        utils.load_mnist("test", target)
    assert "SHA-256" in str(error.value) and TEST_FILES[0] in str(error.value)
    assert not target.exists()  # Made for the download, removed with it: no empty directory is left.


def test_download_when_no_mirror_answers_is_one_clear_error(tmp_path):
    with pytest.raises(errors.DataError, match="download failed") as error:
        utils.load_mnist("train")
    message = str(error.value)
    assert "MNIST_DIR" in message and "--data-dir" in message and "mnist.npz" in message
    assert all(name in message for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    assert not (tmp_path / "repo" / "data" / "mnist").exists()  # No empty directory is left.


# ------------------------------------------------------------------------------------------------
# Data that explodes: the reader takes no more than the header promises, and that only if it fits
# ------------------------------------------------------------------------------------------------


def test_a_gzip_bomb_after_a_valid_header_is_refused_without_inflating_it(tmp_path):
    directory = tmp_path / "bomb"
    images, _ = write_mnist(directory, count=10)
    zeros = gzip.compress(b"\0" * 2**20)  # 1 MB of zeros in ~1 KB; 8192 members: 8 GB once inflated.
    with open(directory / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(gzip.compress(idx_bytes(images, 2051)))
        for _ in range(8192):
            handle.write(zeros)
    with pytest.raises(errors.DataError, match="unexpected bytes after the images of shape") as error:
        utils.load_mnist("train", directory)
    assert "train-images-idx3-ubyte.gz" in str(error.value)
    limited, _ = utils.load_mnist("train", directory, limit=4)  # --limit reads only what it keeps.
    np.testing.assert_array_equal(limited, images[:4])


def test_a_header_promising_more_than_memory_is_refused_before_reading(tmp_path):
    directory = tmp_path / "huge"
    write_mnist(directory, count=10)
    header = (2051).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\0" * 784))
    with pytest.raises(errors.DataError, match=r"header promises 4294967295 images \(3\d\d\d.\d GB\), more than"):
        utils.load_mnist("train", directory)


def test_a_download_killed_outright_leaves_no_part_file_behind_the_next(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", mirror.as_uri() + "/")
    target = tmp_path / "downloaded"
    target.mkdir()
    stale = target / f".{TEST_FILES[0]}.part-999999999"  # A PID no process has: its download was killed.
    stale.write_bytes(b"half a download")
    utils.load_mnist("test", target, limit=5)
    assert sorted(p.name for p in target.iterdir()) == sorted(TEST_FILES)


def test_a_class_named_like_a_number_is_that_class_and_other_digits_are_one_line():
    """Issue 41, 2: subfolders 0, 1, 10, 2 sort as named; "2" means the class named 2, not index 2 (10)."""
    names = ("0", "1", "10", "2")
    assert utils.parse_classes("2", names, "folder") == [3]
    assert utils.parse_classes("10,0", names, "folder") == [0, 2]
    assert utils.parse_classes("3", names, "folder") == [3]  # No class is named 3: index 3.
    with pytest.raises(errors.UsageError, match="'²' is not a folder class"):
        utils.parse_classes("²", names, "folder")
