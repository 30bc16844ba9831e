"""Bad input, part three (issue 33): each case ends in one line naming what is wrong, loses nothing and
touches nothing that is not the run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

import dcgan_mnist
import gan_mnist
from conftest import QUICK, REPO, as_from_a_terminal, contents, fails, run_script, write_mnist
from ganlab.run import loop


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


@pytest.mark.slow
def test_a_truncated_generator_is_called_damaged(trained, tmp_path, capsys):
    run_dir = copy_of(trained, "gan", tmp_path)
    generator = run_dir / "generator.keras"
    generator.write_bytes(generator.read_bytes()[:5000])
    status, error = fails(gan_mnist, ["--out", str(run_dir), "--generate", "4"], capsys)
    assert status == 1 and f"{generator}: damaged (not a complete .keras archive" in error
    assert "File not found" not in error


@pytest.mark.slow
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


def test_generate_without_an_npz_draws_only_the_grid_and_refuses_an_npz_the_disk_cannot_hold(trained, tmp_path,
                                                                                             capsys):
    run_dir = copy_of(trained, "gan", tmp_path)
    gan_mnist.main(["--out", str(run_dir), "--generate", str(10**9)])  # Once: a list of 10**9 labels, then 4 GB.
    assert "Wrote 1024 of the 1000000000 samples" in capsys.readouterr().out
    status, error = fails(gan_mnist, ["--out", str(run_dir), "--generate", str(10**12), "--samples-npz",
                                      str(tmp_path / "all.npz")], capsys)
    assert status == 2 and "of samples (uncompressed) cannot fit in" in error
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".all.tmp-*"))


@pytest.mark.slow  # Issue 40, 7: over 5 s on an idle AVX2-only machine, so in the whole suite only.
def test_sigterm_during_generate_leaves_no_temporary_and_a_dead_ones_is_removed(trained, tmp_path):
    run_dir = copy_of(trained, "gan", tmp_path)
    npz = tmp_path / "samples.npz"
    stale = tmp_path / f".samples.tmp-{2**22 + 12345}.npz"  # A PID above Linux's maximum: a dead process's.
    stale.write_bytes(b"left by a kill -9")
    worker = subprocess.Popen([sys.executable, str(REPO / "gan_mnist.py"), "--out", str(run_dir), "--generate",
                               "3000000", "--samples-npz", str(npz)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, preexec_fn=as_from_a_terminal)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(f".samples.tmp-{worker.pid}.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)  # Until its temporary exists: it is writing samples.
    assert not stale.exists()  # Removed at the start of the write.
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 143 and err.count("\n") == 1 and "SIGTERM: stopped --generate" in err, err
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".samples.tmp-*"))


def test_a_cache_location_that_cannot_be_written_is_found_first(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("GAN_MNIST_CACHE", str(tmp_path / "a file"))
    monkeypatch.setenv("MNIST_DIR", str(tmp_path / "no data"))  # Loading data first would fail on this instead.
    run_dir = copy_of(trained, "gan", tmp_path)
    status, error = fails(gan_mnist, ["--out", str(run_dir), "--evaluate"], capsys)
    assert status == 1 and "cannot use the classifier cache" in error and "GAN_MNIST_CACHE" in error
    assert not (run_dir / "evaluation.json").exists()


# ------------------------------------------------------------------------------------------------
# A read-only filesystem: a tmpfs remounted read-only (root only, as the disk-full tests)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def read_only_run(trained, tmp_path):
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(mounted.stderr.strip() or 'mount failed').splitlines()[0]})")
    try:
        shutil.copytree(trained / "gan", mount_point / "gan")
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield mount_point / "gan"
    finally:
        subprocess.run(["umount", "-l", str(mount_point)])


@pytest.mark.parametrize("flags", [["--generate", "4"], ["--interpolate"], ["--resume", "--epochs", "2"],
                                   ["--overwrite", "--epochs", "1"], ["--generate", "4", "--samples-npz", "RO"]])
@pytest.mark.slow
def test_a_read_only_run_directory_is_one_line(read_only_run, mnist_dir, flags):
    flags = [str(read_only_run / "s.npz") if flag == "RO" else flag for flag in flags]
    before = contents(read_only_run)
    result = run_script("gan_mnist.py", "--out", str(read_only_run), "--data-dir", str(mnist_dir), *flags)
    assert result.returncode in (1, 2) and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "Read-only file system" in result.stderr and "Traceback" not in result.stderr
    assert contents(read_only_run) == before


@pytest.mark.slow  # Issue 40, 7: over 5 s on an idle AVX2-only machine, so in the whole suite only.
def test_a_full_disk_during_generate_is_one_line(trained, tmp_path):
    """The run on a 16 MB tmpfs with room for the npz but not also the grid (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(mounted.stderr.strip() or 'mount failed').splitlines()[0]})")
    try:
        run_dir = disk / "gan"
        run_dir.mkdir()
        for name in ("config.json", "generator.keras"):
            shutil.copy(trained / "gan" / name, run_dir / name)
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(bytes(free - 1200 * 1024))  # 1.2 MB left: the npz fits, the grid does not.
        result = run_script("gan_mnist.py", "--out", str(run_dir), "--generate", "1000", "--samples-npz",
                            str(disk / "s.npz"))
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert f"{run_dir / 'generated_samples.png'}: out of disk space" in result.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "generator.keras"]  # No temporary.
    finally:
        subprocess.run(["umount", "-l", str(disk)])


class NanFromTheStart(loop.Hooks):
    """Every compiled call returns NaN losses: what a checkpoint with finite but blown-up weights gives."""

    def calls(self, train_steps):
        def faulty(indices):
            values = train_steps(indices).numpy()
            values[:, 0] = np.nan
            return tf.constant(values)

        return faulty


def test_a_resumed_run_that_diverges_at_once_says_its_checkpoint_diverged(trained, tmp_path, mnist_dir, capsys):
    run_dir = copy_of(trained, "gan", tmp_path)
    diverging = SimpleNamespace(main=lambda argv: gan_mnist.main(argv, hooks=NanFromTheStart()))
    status, error = fails(diverging,
                          ["--out", str(run_dir), "--resume", "--epochs", "2", "--lr", "1e-4", "--data-dir",
                           str(mnist_dir)], capsys)
    assert status == 1 and error.count("\n") == 1
    assert "1 steps after resuming: the checkpoint it resumed from has itself diverged" in error
    assert f"start afresh with a lower rate: python gan_mnist.py --out {run_dir}-lr5e-05 --lr 5e-05" in error
    assert "--resume --lr" not in error  # Not the advice that fails again.


@pytest.mark.slow
def test_every_family_of_bad_input_ends_in_one_line(mnist_dir, tmp_path):
    """tools/bad_inputs.py: over 260 cases (flags, environment, files read, locations written, signals, folders
    and their caches, edited constants)."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "bad_inputs.py"), "--json", str(report)],
                            capture_output=True, text=True, timeout=5400, cwd=REPO, env=dict(os.environ,
                                                                                       MNIST_DIR=str(mnist_dir.resolve())))
    print(result.stdout[-6000:])
    results = json.loads(report.read_text())
    assert len(results) >= 260
    assert {r["family"] for r in results} == {"flags", "environment", "files read", "locations written", "signals",
                                              "folders", "constants"}
    assert min(sum(r["family"] == family for r in results) for family in ("folders", "constants")) >= 25
    bad = [f"{r['case']}: {r['outcome']} ({r['detail']})" for r in results if r["outcome"] not in ("one line", "ran")]
    assert not bad, "\n".join(bad)
    assert result.returncode == 0
