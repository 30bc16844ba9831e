"""The run directory's promises: only this project's runs are resumed or replaced, a run killed early or with a
damaged checkpoint goes on, a lower learning rate may resume, sizes that do not fit are one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import dcgan_mnist
import gan_mnist
from conftest import QUICK, REPO, contents, fails, run_script
from ganlab import errors
from ganlab.run import loop
from ganlab.run.directory import RunDirectory
from ganlab.sampling import sample


def history_of(run_dir):
    return json.loads((run_dir / "history.json").read_text())


@pytest.fixture
def foreign(tmp_path):
    """A directory of another program's files under a run's names."""
    directory = tmp_path / "other"
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "tensorboard").mkdir()
    (directory / "config.json").write_text(json.dumps({"model": "resnet", "epochs": 90}))
    (directory / "checkpoints" / "model_step_9000.pt").write_bytes(b"weights")
    (directory / "tensorboard" / "events.out.tfevents.1.other").write_bytes(b"events")
    return directory


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_another_programs_directory_is_refused_and_untouched(foreign, mnist_dir, capsys, flags):
    before = contents(foreign)
    status, error = fails(gan_mnist, QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(foreign),
                                              *flags], capsys)
    assert status == 1 and error.count("\n") == 1
    assert f"{foreign / 'config.json'}: not written by a run of this project" in error
    assert contents(foreign) == before


def test_files_named_like_a_run_without_its_config_are_refused(tmp_path, mnist_dir, capsys):
    directory = tmp_path / "other"
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "checkpoints" / "model.pt").write_bytes(b"weights")
    status, error = fails(gan_mnist, QUICK + ["--overwrite", "--data-dir", str(mnist_dir), "--out", str(directory)],
                          capsys)
    assert status == 1 and "holds checkpoints but no config.json of a run of this project" in error
    assert (directory / "checkpoints" / "model.pt").read_bytes() == b"weights"


def test_overwrite_removes_only_what_a_run_writes(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    flags = QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)]
    gan_mnist.main(flags)
    mine = {run_dir / "notes.txt": b"mine", run_dir / "checkpoints" / "best.pt": b"mine too",
            run_dir / "tensorboard" / "other.csv": b"kept"}
    for path, data in mine.items():
        path.write_bytes(data)
    old_events = set((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    gan_mnist.main(flags + ["--overwrite", "--seed", "4"])
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert not old_events & set((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 4
    assert [Path(p).name for p in (run_dir / "checkpoints").glob("ckpt-*.index")] == ["ckpt-3.index"]


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "not a run's configuration (a JSON list, expected an object)"),
    ('{"format": "tf2-gan-mnist run 1", "script": "gan_mnist", "dataset": "imagenet"}', "unknown dataset 'imagenet'"),
    ("{", "cannot read the run's configuration"),
])
@pytest.mark.parametrize("flags", [["--resume"], ["--generate", "4"], ["--evaluate"]])
def test_a_damaged_config_is_one_line_for_resume_and_sampling(tmp_path, capsys, text, problem, flags):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(text)
    (run_dir / "generator.keras").write_bytes(b"not read")
    status, error = fails(gan_mnist, ["--out", str(run_dir), *flags], capsys)
    assert status == 1 and error.count("\n") == 1 and problem in error, error


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path, mnist_dir, capsys):
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    gan_mnist.main(QUICK + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(straight)])
    gan_mnist.main(QUICK + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    for path in run_dir.iterdir():  # What a kill -9 in the first epoch leaves: config.json, real_samples.png,
        if path.name not in ("config.json", "real_samples.png", "tensorboard", ".lock"):  # TensorBoard's file.
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    gan_mnist.main(["--resume", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    assert "no checkpoint yet" in capsys.readouterr().out
    assert history_of(run_dir)["iterations"] == history_of(straight)["iterations"]


@pytest.mark.slow
def test_a_truncated_checkpoint_falls_back_to_the_newest_that_reads(tmp_path, mnist_dir, capsys):
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    gan_mnist.main(QUICK + ["--epochs", "4", "--data-dir", str(mnist_dir), "--out", str(straight)])
    gan_mnist.main(QUICK + ["--epochs", "3", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    newest = run_dir / "checkpoints" / "ckpt-9.data-00000-of-00001"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    gan_mnist.main(["--resume", "--epochs", "4", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    captured = capsys.readouterr()
    assert "skipped the newer ckpt-9 (" in captured.err and "resuming from ckpt-6" in captured.err
    assert "resuming after epoch 2" in captured.out
    assert history_of(run_dir)["iterations"] == history_of(straight)["iterations"]


@pytest.mark.slow  # Issue 40, 7: over 5 s on an idle AVX2-only machine, so in the whole suite only.
def test_a_lost_checkpoint_index_reads_the_newest_checkpoint_present(tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    (run_dir / "checkpoints" / "checkpoint").unlink()
    capsys.readouterr()
    gan_mnist.main(["--resume", "--epochs", "3", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.index")) == ["ckpt-3.index", "ckpt-6.index",
                                                                               "ckpt-9.index"]


def test_no_readable_checkpoint_is_one_line(tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    for data in (run_dir / "checkpoints").glob("*.data-*"):
        data.write_bytes(b"")
    status, error = fails(gan_mnist, ["--resume", "--epochs", "2", "--out", str(run_dir), "--data-dir",
                                      str(mnist_dir)], capsys)
    assert status == 1 and error.count("\n") == 1 and "no checkpoint can be restored" in error


@pytest.mark.slow
def test_resume_may_lower_the_learning_rate_and_records_it(tmp_path, mnist_dir, capsys):
    class LearningRates(loop.Hooks):
        def step(self, train_step, state):
            self.rates = [float(optimizer.learning_rate.numpy()) for optimizer in (state.g_optimizer, state.d_optimizer)]
            return train_step

    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--epochs", "1", "--lr", "4e-4", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    hooks = LearningRates()
    gan_mnist.main(["--resume", "--epochs", "2", "--lr", "1e-4", "--out", str(run_dir), "--data-dir",
                    str(mnist_dir)], hooks=hooks)
    assert hooks.rates == [pytest.approx(1e-4)] * 2
    saved = json.loads((run_dir / "config.json").read_text())
    change = {"epoch": 1, "step": 0, "from": 4e-4, "to": 1e-4}
    assert saved["lr"] == 1e-4 and saved["lr_changes"] == [change] and history_of(run_dir)["lr_changes"] == [change]
    hooks = LearningRates()  # A later resume keeps the lower rate.
    gan_mnist.main(["--resume", "--epochs", "3", "--out", str(run_dir), "--data-dir", str(mnist_dir)], hooks=hooks)
    assert hooks.rates == [pytest.approx(1e-4)] * 2
    status, error = fails(gan_mnist, ["--resume", "--epochs", "4", "--lr", "1e-3", "--out", str(run_dir)], capsys)
    assert status == 2 and "--lr 0.001 (the run has 0.0001)" in error


def test_the_divergence_message_gives_the_command_that_continues_with_a_lower_rate(tmp_path, mnist_dir, capsys):
    class NanInEpochTwo(loop.Hooks):
        def calls(self, train_steps):
            count = []

            def faulty(indices):  # One call an epoch (3 steps, 10 per call): NaN from the second on.
                count.append(1)
                values = train_steps(indices).numpy()
                if len(count) > 1:
                    values[:, 0] = np.nan
                return tf.constant(values)

            return faulty

    run_dir = tmp_path / "run dir"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        errors.run_main(lambda argv: gan_mnist.main(argv, hooks=NanInEpochTwo()),
                        QUICK + ["--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    error = capsys.readouterr().err
    assert f"python gan_mnist.py --out '{run_dir}' --resume --lr 0.0001" in error
    gan_mnist.main(["--out", str(run_dir), "--resume", "--lr", "0.0001", "--data-dir", str(mnist_dir)])
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1, 2]


def test_checkpoints_are_saved_mid_epoch_every_few_minutes(tmp_path, mnist_dir):
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--epochs", "2", "--checkpoint-minutes", "1e-9", "--steps-per-call", "1",
                            "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    numbers = sorted(int(p.name[5:-6]) for p in (run_dir / "checkpoints").glob("ckpt-*.index"))
    assert numbers == [4, 5, 6]  # Mid-epoch 2 (steps 4 and 5), then its end; the last three kept.
    assert "partial_epoch" not in history_of(run_dir)


@pytest.mark.parametrize("flags, size", [(["--latent-dim", "100000000"], "--latent-dim 100000000"),
                                         (["--kernel-size", "1000"], "--kernel-size 1000")])
@pytest.mark.slow
def test_sizes_that_cannot_fit_are_one_line_and_leave_nothing(tmp_path, mnist_dir, flags, size):
    run_dir = tmp_path / "run"
    result = run_script("dcgan_mnist.py", *QUICK, *flags, "--epochs", "1", "--data-dir", str(mnist_dir),
                        "--out", str(run_dir))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "out of memory building the models (a tensor of shape" in result.stderr and size in result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_generate_streams_batches_into_the_npz(tmp_path, mnist_dir, capsys):
    run_dir = tmp_path / "run"
    dcgan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    npz = tmp_path / "samples.npz"
    dcgan_mnist.main(["--out", str(run_dir), "--generate", "2500", "--samples-npz", str(npz), "--seed", "7"])
    generator, saved = sample.load_trained_generator(RunDirectory(run_dir))
    noise = np.random.default_rng(7).standard_normal((2500, 100)).astype(np.float32)  # One draw of all.
    expected = sample.utils.to_dataset_uint8(sample.sample_images(generator, noise), saved.transform, 28)
    with np.load(npz) as archive:
        assert archive["images"].dtype == np.uint8 and archive["images"].shape == (2500, 28, 28)
        assert np.abs(archive["images"].astype(int) - expected).max() <= 1  # Batches of 1000 vs one of 500s.
    assert "Wrote 1024 of the 2500 samples" in capsys.readouterr().out
    assert not list(tmp_path.glob(".samples.tmp-*"))


@pytest.mark.slow
def test_sigterm_during_the_evaluation_stops_at_once_and_resumes(tmp_path, mnist_dir, monkeypatch, capsys):
    original = sample.evaluate_generator

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # As `kill` would, while the evaluation runs.
        return original(*args, **kwargs)

    run_dir = tmp_path / "run"
    flags = QUICK + ["--epochs", "2", "--eval-every", "2", "--num-samples", "100", "--data-dir", str(mnist_dir),
                     "--out", str(run_dir)]
    monkeypatch.setattr(sample, "evaluate_generator", terminated)
    status, error = fails(gan_mnist, flags, capsys)
    assert status == 128 + signal.SIGTERM and "before its evaluation" in error
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1] and not history_of(run_dir)["evaluations"]
    monkeypatch.setattr(sample, "evaluate_generator", original)
    gan_mnist.main(["--resume", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    history = history_of(run_dir)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2] and [e["epoch"] for e in history["evaluations"]] == [2]
    assert len(history["iterations"]["d_loss"]) == 6


@pytest.mark.parametrize("damage", ["deleted", "a file"])
def test_resume_of_a_trained_run_without_checkpoints_keeps_every_output(tmp_path, mnist_dir, capsys, damage):
    """Users delete checkpoints/ to save space; --resume must not take that run for one killed before its first."""
    run_dir = tmp_path / "run"
    gan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    shutil.rmtree(run_dir / "checkpoints")
    if damage == "a file":
        (run_dir / "checkpoints").write_bytes(b"not a directory")
    before = contents(run_dir)
    status, error = fails(gan_mnist, ["--resume", "--epochs", "2", "--out", str(run_dir), "--data-dir",
                                      str(mnist_dir)], capsys)
    assert status in (1, 2) and error.count("\n") == 1, error
    assert ("no checkpoint to go on from; its outputs are kept" in error if damage == "deleted"
            else "checkpoints: not a directory" in error)
    assert contents(run_dir) == before


def test_a_lock_that_is_a_symlink_is_never_followed(tmp_path, mnist_dir, capsys):
    run_dir, outside = tmp_path / "run", tmp_path / "precious.txt"
    gan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    outside.write_text("precious")
    (run_dir / ".lock").unlink()
    (run_dir / ".lock").symlink_to(outside)
    for flags in (["--resume", "--epochs", "2"], ["--overwrite", "--epochs", "1"]):
        status, error = fails(gan_mnist, QUICK + ["--data-dir", str(mnist_dir), "--out", str(run_dir), *flags], capsys)
        assert status == 1 and error.count("\n") == 1 and "a symbolic link, which a run never follows" in error
    assert outside.read_text() == "precious" and (run_dir / ".lock").is_symlink()


def test_a_foreign_directory_with_a_lock_file_is_refused_untouched(foreign, mnist_dir, capsys):
    (foreign / ".lock").write_text("not ours")
    before = contents(foreign)
    status, error = fails(gan_mnist, QUICK + ["--data-dir", str(mnist_dir), "--out", str(foreign), "--resume"], capsys)
    assert status == 1 and "not written by a run of this project" in error
    assert contents(foreign) == before


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_dir):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    gan_mnist.main(QUICK + ["--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(run_dir)])
    return run_dir


@pytest.mark.parametrize("key, value, problem", [
    ("batch_size", 0, '"batch_size" is 0: must be a positive integer (as --batch-size)'),
    ("lr", "fast", '"lr" is "fast": must be a number (as --lr)'),
    ("classes", None, '"classes" is null: must be a string (as --classes)'),
    ("classes", "42", '"classes" is "42": \'42\' is not a mnist class'),
    ("conditional", "yes", '"conditional" is "yes": must be true or false (as --conditional)'),
    ("seed", -1, '"seed" is -1: must be a whole number from 0 to 4294967295'),
])
def test_a_hand_edited_config_is_checked_as_its_flags_are(trained_run, tmp_path, mnist_dir, capsys, key, value,
                                                          problem):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(saved | {key: value}))
    before = contents(run_dir)
    status, error = fails(gan_mnist, ["--resume", "--epochs", "2", "--out", str(run_dir), "--data-dir", str(mnist_dir)],
                          capsys)
    assert status == 1 and error.count("\n") == 1, error
    assert f"{run_dir / 'config.json'}: {problem}" in error
    assert contents(run_dir) == before


@pytest.mark.slow  # Issue 40, 7: over 5 s on an idle AVX2-only machine, so in the whole suite only.
def test_an_out_name_that_is_not_utf8_is_one_line(tmp_path):
    """Issue 41, 10: a UnicodeEncodeError traceback before."""
    name = os.fsdecode(bytes(tmp_path) + b"/run-\xff")
    result = subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), "--out", name], capture_output=True,
                            timeout=900, cwd=REPO)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and err.count("\n") == 1, err
    assert "argument --out:" in err and "run-\\xff is not a UTF-8 name" in err
    assert not list(tmp_path.iterdir())


def test_an_edited_constant_on_resume_is_taken_as_its_flag_would_be(trained_run, tmp_path, mnist_dir, monkeypatch,
                                                                    capsys):
    """Issue 41, 6: before, an edited LR was ignored on --resume without a word (exit 0, the old value kept)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["constants"]["lr"] == gan_mnist.LR and saved["constants"]["epochs"] == gan_mnist.EPOCHS
    assert saved["data_source"] == str(Path(mnist_dir).resolve())  # Issue 41, 1: where the data came from.
    before = contents(run_dir)
    monkeypatch.setattr(gan_mnist, "EMA", 0.99)  # Refused, as --ema 0.99 would be.
    status, error = fails(gan_mnist, ["--resume", "--epochs", "2", "--out", str(run_dir), "--data-dir", str(mnist_dir)],
                          capsys)
    assert status == 2 and error.count("\n") == 1, error
    assert "EMA at the top of gan_mnist.py 0.99 (the run has 0.999)" in error
    assert contents(run_dir) == before
    monkeypatch.setattr(gan_mnist, "EMA", 0.999)
    monkeypatch.setattr(gan_mnist, "EPOCHS", 2)  # Taken, as --epochs 2 would be, and said.
    gan_mnist.main(["--resume", "--out", str(run_dir), "--data-dir", str(mnist_dir)])
    assert "EPOCHS at the top of gan_mnist.py 2, edited since the run started: taken (the run had 1)" in \
        capsys.readouterr().out
    assert [e["epoch"] for e in history_of(run_dir)["epochs"]] == [1, 2]
