"""A run survives being killed at any moment of its life, and a full disk: resumed, it ends as a straight run."""

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import REPO

# 3 epochs of 10 steps in 5 calls, scored once at the end on a few samples.
FLAGS = ["--limit", "640", "--batch-size", "64", "--steps-per-call", "2", "--epochs", "3", "--seed", "5",
         "--eval-every", "3", "--num-samples", "200"]

# (moment, which visit, extra flags): one run's whole life, from start-up to its closing outputs.
# --checkpoint-minutes is not part of the run's settings: 0 keeps the first epoch without any
# checkpoint; 1e-9 saves one after every call from then on.
KILLS = [
    ("loading-data", 1, []),                              # start-up: nothing written yet
    ("models-built", 1, []),                              # the directory made, nothing in it
    ("after-call", 3, ["--checkpoint-minutes", "0"]),     # first epoch, before any checkpoint
    ("checkpoint-save", 1, ["--checkpoint-minutes", "0"]),  # in the first checkpoint's save
    ("epoch-grid", 1, []),                                # writing epoch 1's grid, after its checkpoint
    ("after-call", 4, ["--checkpoint-minutes", "1e-9"]),  # mid-epoch 2, after mid-epoch checkpoints
    ("checkpoint-save", 2, ["--checkpoint-minutes", "1e-9"]),  # in a mid-epoch checkpoint's save
    ("generator-save", 1, []),                            # writing generator.keras at an epoch's end
    ("history", 1, []),                                   # writing history.json
    ("evaluation", 1, []),                                # in the final evaluation
    ("gif", 1, []),                                       # writing the GIF after the last epoch
    ("finish", 1, []),                                    # before random_samples.png and metrics.json
]

HALF_WRITTEN = {"checkpoint-save": "checkpoints/ckpt-*_temp", "epoch-grid": ".epoch_*.tmp-*",
                "generator-save": ".generator.tmp-*"}


def attempt(run_dir, mnist_dir, moment=None, visit=1, extra=()):
    """Run gan_mnist.py into `run_dir` (resuming if it holds a run), killed at `moment` if given."""
    resume = ["--resume"] if (run_dir / "config.json").is_file() else []
    command = ([sys.executable, str(REPO / "tests" / "kill_at.py"), moment, str(visit)] if moment
               else [sys.executable]) + [str(REPO / "gan_mnist.py"), *FLAGS, *resume, *extra,
                                         "--data-dir", str(mnist_dir), "--out", str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def history_of(run_dir):
    return json.loads((run_dir / "history.json").read_text())


def weights(run_dir):
    return keras.saving.load_model(run_dir / "generator.keras", compile=False).get_weights()


def without_seconds(evaluations):
    return [{k: v for k, v in e.items() if k != "seconds"} for e in evaluations]


@pytest.mark.slow
def test_killed_at_any_moment_and_resumed_the_run_ends_as_a_straight_run(tmp_path, mnist_dir):
    straight = tmp_path / "straight"
    assert attempt(straight, mnist_dir).returncode == 0
    run_dir = tmp_path / "run"
    for moment, visit, extra in KILLS:
        killed = attempt(run_dir, mnist_dir, moment, visit, extra)
        assert killed.returncode == -9, f"{moment} #{visit} was never reached: {killed.stderr[-2000:]}"
        if moment in HALF_WRITTEN:  # Killed mid-write indeed: what it was writing is left under a temporary name.
            assert list(run_dir.glob(HALF_WRITTEN[moment])), moment
    finished = attempt(run_dir, mnist_dir)
    assert finished.returncode == 0, finished.stderr[-2000:]

    history, expected = history_of(run_dir), history_of(straight)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]
    assert len(history["iterations"]["d_loss"]) == 30  # Every step once.
    assert history["iterations"] == expected["iterations"]
    assert without_seconds(history["evaluations"]) == without_seconds(expected["evaluations"])
    for ours, theirs in zip(weights(run_dir), weights(straight)):
        np.testing.assert_array_equal(ours, theirs)
    assert sorted(p.name for p in run_dir.glob("epoch_*.png")) == ["epoch_001.png", "epoch_002.png", "epoch_003.png"]
    for name in ("random_samples.png", "metrics.json", "progress.gif", "losses.png", "metrics.png"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob(".*.tmp-*")) and not list((run_dir / "checkpoints").glob("*_temp"))
    again = attempt(run_dir, mnist_dir)  # Now complete: a further --resume is refused.
    assert again.returncode == 2 and "already trained 3 epochs" in again.stderr


# ------------------------------------------------------------------------------------------------
# A full disk, on a small tmpfs (CI runs as root; elsewhere the mount may be refused: then skip)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MB tmpfs mounted for the test, and a function that fills it to leave `free` bytes."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = (mounted.stderr.strip() or "mount failed").splitlines()[0]
        print(f"disk-full test skipped: the machine refused a tmpfs mount ({reason})")
        pytest.skip(f"cannot mount a tmpfs here ({reason})")
    filler = mount_point / "filler"

    def fill(free):
        filler.unlink(missing_ok=True)
        size = shutil.disk_usage(mount_point).free - free
        with open(filler, "wb") as handle:
            handle.truncate(0)
            for start in range(0, size, 2**20):
                handle.write(b"\0" * min(2**20, size - start))

    fill.release = lambda: filler.unlink(missing_ok=True)
    yield mount_point, fill
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def run_gan(run_dir, mnist_dir, *flags):
    return subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), "--limit", "640", "--batch-size", "64",
                           "--seed", "5", "--eval-every", "0", *flags, "--data-dir", str(mnist_dir),
                           "--out", str(run_dir)], capture_output=True, text=True, timeout=300, cwd=REPO)


def leftovers(run_dir):
    return list(run_dir.glob(".*.tmp-*")) + list((run_dir / "checkpoints").glob("*_temp*"))


@pytest.mark.slow
def test_a_full_disk_at_the_first_save_is_one_line_and_the_run_resumes(small_disk, mnist_dir, tmp_path):
    disk, fill = small_disk
    run_dir = disk / "run"
    fill(2 * 2**20)  # Room for config.json and the first pictures, not for a 40 MB checkpoint.
    full = run_gan(run_dir, mnist_dir, "--epochs", "2")
    assert full.returncode == 1 and full.stderr.count("\n") == 1, full.stderr
    assert f"{run_dir}: out of disk space" in full.stderr and "MB" in full.stderr
    assert not leftovers(run_dir) and not (run_dir / "history.json").exists()
    fill.release()
    resumed = run_gan(run_dir, mnist_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = run_gan(tmp_path / "straight", mnist_dir, "--epochs", "2")
    assert straight.returncode == 0
    assert history_of(run_dir)["iterations"] == history_of(tmp_path / "straight")["iterations"]


@pytest.mark.slow
def test_a_full_disk_at_a_later_checkpoint_keeps_everything_before_it(small_disk, mnist_dir, tmp_path):
    disk, fill = small_disk
    run_dir = disk / "run"
    assert run_gan(run_dir, mnist_dir, "--epochs", "1").returncode == 0
    before = {name: (run_dir / name).read_bytes() for name in ("history.json", "epoch_001.png", "generator.keras")}
    fill(10 * 2**20)  # Less than a checkpoint.
    full = run_gan(run_dir, mnist_dir, "--resume", "--epochs", "2")
    assert full.returncode == 1 and full.stderr.count("\n") == 1, full.stderr
    assert f"{run_dir}: out of disk space" in full.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before  # Nothing claims epoch 2.
    assert not (run_dir / "epoch_002.png").exists() and not leftovers(run_dir)
    fill.release()
    assert run_gan(run_dir, mnist_dir, "--resume", "--epochs", "2").returncode == 0
    assert run_gan(tmp_path / "straight", mnist_dir, "--epochs", "2").returncode == 0
    assert history_of(run_dir)["iterations"] == history_of(tmp_path / "straight")["iterations"]
    for ours, theirs in zip(weights(run_dir), weights(tmp_path / "straight")):
        np.testing.assert_array_equal(ours, theirs)
