"""Bad input, part three (issue 33): each case ends in one line naming what is wrong, loses nothing and
touches nothing that is not the run's."""

import json
import shutil

import pytest

import dcgan_mnist
import gan_mnist
from conftest import run_script, write_mnist
from test_run_directory import QUICK, contents, fails


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir):
    """A finished one-epoch GAN run and a finished one-epoch DCGAN run (copied by each test that changes one)."""
    root = tmp_path_factory.mktemp("trained")
    gan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(root / "gan")])
    dcgan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(root / "dcgan")])
    return root


def copy_of(trained, name, tmp_path):
    shutil.copytree(trained / name, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("kind, words", [("directory", "a directory"), ("dangling", "a dangling symbolic link"),
                                         ("loop", "a symbolic link loop")])
def test_something_in_the_way_of_an_mnist_file_is_named_not_downloaded_over(tmp_path, capsys, kind, words):
    data = tmp_path / "data"
    write_mnist(data, count=64)
    target = data / "train-images-idx3-ubyte.gz"
    target.unlink()
    if kind == "directory":
        target.mkdir()
    elif kind == "dangling":
        target.symlink_to(tmp_path / "nowhere")
    else:
        target.symlink_to(target)
    status, error = fails(gan_mnist, ["--data-dir", str(data), "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and error.count("\n") == 1
    assert f"{target}: {words}, where the train-images-idx3-ubyte file should be" in error
    assert "Name or service" not in error and not (tmp_path / "run").exists()


def test_a_header_promising_too_many_images_blames_the_file_not_the_flags(tmp_path, capsys):
    data = tmp_path / "data"
    write_mnist(data, count=8)
    header = (2051).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (data / "train-images-idx3-ubyte.gz").unlink()
    (data / "train-images-idx3-ubyte").write_bytes(header + bytes(784 * 8))
    status, error = fails(gan_mnist, ["--data-dir", str(data), "--limit", "8", "--batch-size", "4",
                                      "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and "header promises 4294967295 images" in error and "a damaged header" in error
    assert "pass --limit" not in error


def test_files_holding_no_images_are_named_not_the_batch_size(tmp_path, capsys):
    data = tmp_path / "data"
    write_mnist(data, count=0, labels_count=0)
    status, error = fails(gan_mnist, ["--data-dir", str(data), "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and "train-images-idx3-ubyte.gz: holds no images (its header says 0)" in error
    assert "--batch-size" not in error


def test_a_truncated_generator_is_called_damaged(trained, tmp_path, capsys):
    run_dir = copy_of(trained, "gan", tmp_path)
    generator = run_dir / "generator.keras"
    generator.write_bytes(generator.read_bytes()[:5000])
    status, error = fails(gan_mnist, ["--out", str(run_dir), "--generate", "4"], capsys)
    assert status == 1 and f"{generator}: damaged (not a complete .keras archive" in error
    assert "File not found" not in error


def test_checkpoints_of_the_other_script_are_one_line_without_warnings(trained, tmp_path, mnist_dir):
    run_dir = copy_of(trained, "dcgan", tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    shutil.copytree(trained / "gan" / "checkpoints", run_dir / "checkpoints")
    result = run_script("dcgan_mnist.py", "--resume", "--epochs", "2", "--out", str(run_dir), "--data-dir", str(mnist_dir))
    assert result.returncode == 1 and "no checkpoint can be restored into this model" in result.stderr
    assert "WARNING" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_config_of_a_newer_format_is_called_newer(trained, tmp_path, capsys):
    run_dir = copy_of(trained, "gan", tmp_path)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(saved | {"format": "tf2-gan-mnist run 2"}))
    before = contents(run_dir)
    status, error = fails(gan_mnist, ["--out", str(run_dir), "--resume", "--epochs", "2"], capsys)
    assert status == 1 and "written by a newer version of this project" in error
    assert contents(run_dir) == before


def test_an_empty_out_is_refused(tmp_path, capsys):
    status, error = fails(gan_mnist, ["--out", "", "--epochs", "1"], capsys)
    assert status == 2 and "argument --out: empty" in error


@pytest.mark.parametrize("inside", ["checkpoints", "tensorboard/new", "nested/deeper"])
def test_a_run_inside_another_run_is_refused(trained, tmp_path, mnist_dir, capsys, inside):
    run_dir = copy_of(trained, "gan", tmp_path)
    before = contents(run_dir)
    status, error = fails(gan_mnist, QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out",
                                              str(run_dir / inside)], capsys)
    assert status == 2 and f"is inside the run in {run_dir}" in error
    assert contents(run_dir) == before
