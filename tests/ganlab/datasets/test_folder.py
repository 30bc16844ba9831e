"""A folder of pictures as a dataset (ganlab/datasets/folder.py), built from the real MNIST and CIFAR-10 images."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import dcgan_mnist
import gan_mnist
import utils
from conftest import REPO, contents, fails, parse, parsed
from ganlab import errors
from ganlab.datasets import cifar10, folder

QUICK = ["--epochs", "1", "--batch-size", "32", "--eval-every", "0"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test decodes into a cache of its own (the classifier's cache stays the machine's)."""
    monkeypatch.setattr(folder, "cache_dir", lambda: tmp_path / "cache")


@pytest.fixture(scope="session")
def mnist_train(mnist_dir):
    images, labels = utils.load_mnist("train", mnist_dir)
    return images[:400, ..., None], labels[:400]


def write_pngs(directory, images, labels=None, names=None):
    """`images` as PNGs named by index (00000.png, ...), in a subfolder per class (`names[label]`) if `labels`."""
    for index, image in enumerate(images):
        target = directory / (names or [str(c) for c in range(10)])[labels[index]] if labels is not None else directory
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze()).save(target / f"{index:05d}.png")
    return directory


def png_bytes(array, mode=None, format="PNG", **options):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format, **options)
    return buffer.getvalue()


def test_a_folder_of_mnist_pngs_trains_into_the_same_uint8_array_as_its_idx_images(tmp_path, mnist_train):
    images, labels = mnist_train
    classes = write_pngs(tmp_path / "classes", images, labels)
    found = folder.probe(classes)
    assert found.class_names == tuple(str(c) for c in range(10)) and (found.channels, found.side) == (1, 28)
    decoded, decoded_labels = folder.load(found, 28, 1)
    order = np.argsort(labels, kind="stable")  # The stated order: class by class, each by file name.
    np.testing.assert_array_equal(decoded, images[order])
    np.testing.assert_array_equal(decoded_labels, labels[order])
    flat = folder.probe(write_pngs(tmp_path / "flat", images))
    assert flat.class_names == () and set(flat.labels) == {0}
    np.testing.assert_array_equal(folder.load(flat, 28, 1)[0], images)  # Unlabelled: in file-name order.


def test_every_kind_of_bad_file_is_skipped_and_named_in_one_line(tmp_path, mnist_train, capsys):
    images, _ = mnist_train
    root = write_pngs(tmp_path / "pictures", images[:20])
    good = png_bytes(images[0].squeeze())
    for name, data in {".hidden.png": good, ".DS_Store": b"\0\0\0\1Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0",
                       "notes.txt": b"not a picture"}.items():  # Passed over in silence.
        (root / name).write_bytes(data)
    bad = {"empty.png": b"", "truncated.png": good[:len(good) // 2], "corrupt.png": os.urandom(3000),
           "liar.png": png_bytes(images[1].squeeze(), format="JPEG"),
           "bomb.png": png_bytes(np.zeros((13400, 13400), bool), "1")}  # Over twice Pillow's 89.5 Mpixel limit.
    for name, data in bad.items():
        (root / name).write_bytes(data)
    found = folder.probe(root)
    decoded, _ = folder.load(found, 28, 1)
    assert len(decoded) == 20
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "skipped" in line)
    assert "skipped 5 of 25 files" in line
    for name, reason in {"empty.png": "empty", "truncated.png": "truncated", "corrupt.png": "not an image",
                         "liar.png": "a JPEG file named .png", "bomb.png": "decompression-bomb"}.items():
        assert name in line and reason in line, (name, line)
    assert not any(name in out for name in (".hidden.png", ".DS_Store", "Thumbs.db", "notes.txt"))


def test_pictures_of_every_kind_are_converted_as_stated(tmp_path):
    root = tmp_path / "kinds"
    root.mkdir()
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 0] = 255
    transparent = np.zeros((30, 30, 4), np.uint8)  # Fully transparent: the white background shows.
    (root / "a_rgba.png").write_bytes(png_bytes(transparent, "RGBA"))
    Image.fromarray(red).convert("CMYK").save(root / "b_cmyk.jpg", quality=95)
    (root / "c_16bit.png").write_bytes(png_bytes(np.full((30, 30), 65535, np.uint16)))
    Image.fromarray(red).convert("P").save(root / "d_palette.png")
    frames = [Image.fromarray(np.full((30, 30, 3), value, np.uint8)) for value in (10, 200)]
    frames[0].save(root / "e_animated.gif", save_all=True, append_images=frames[1:])
    tall = np.zeros((60, 30, 3), np.uint8)
    tall[:30] = 255  # White on top: rotated 90 degrees by its EXIF orientation (6), white goes to the right.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(tall).save(root / "f_rotated.jpg", exif=exif, quality=95)
    found = folder.probe(root)
    assert found.channels == 3 and found.class_names == ()
    images, _ = folder.load(found, 30, 3)
    rgba, cmyk, deep, palette, animated, rotated = images.astype(int)
    assert (rgba == 255).all()  # Composited on white.
    assert abs(cmyk[..., 0].mean() - 255) < 8 and cmyk[..., 1:].mean() < 8  # Red, back from CMYK.
    assert (deep == 255).all()  # 16-bit white is 8-bit white, not clipped noise.
    assert (palette[..., 0] > 240).all() and (palette[..., 1:] < 15).all()
    assert abs(animated.mean() - 10) < 3  # The first frame.
    assert rotated[:, 20:].mean() > 200 and rotated[:, :10].mean() < 50  # Orientation applied, then centre-cropped.


def test_a_folder_without_a_usable_image_or_with_an_empty_class_is_one_line(tmp_path, mnist_train, capsys):
    images, labels = mnist_train
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    status, error = fails(gan_mnist, ["--dataset", "folder", "--data-dir", str(empty)] + QUICK, capsys)
    assert status == 1 and "no usable image" in error and len(error.strip().splitlines()) == 1
    classes = write_pngs(tmp_path / "classes", images[:20], labels[:20])
    (classes / "zz_empty").mkdir()
    (classes / "zz_empty" / "broken.png").write_bytes(b"")
    status, error = fails(gan_mnist, ["--dataset", "folder", "--data-dir", str(classes)] + QUICK, capsys)
    assert status == 1 and "zz_empty: a class folder with no usable image" in error
    assert len(error.strip().splitlines()) == 1
    status, error = fails(gan_mnist, ["--dataset", "folder"] + QUICK, capsys)
    assert status == 2 and "--data-dir" in error


@pytest.mark.slow
def test_a_symlink_loop_ends_and_nothing_in_the_folder_is_written(tmp_path, mnist_train, mnist_dir):
    images, labels = mnist_train
    root = write_pngs(tmp_path / "pictures", images[:64], labels[:64] % 2, names=["even", "odd"])
    (root / "even" / "loop").symlink_to(root, target_is_directory=True)  # pictures/even/loop -> pictures
    (root / "odd" / "self").symlink_to(root / "odd", target_is_directory=True)
    before = contents(root / "even") | contents(root / "odd")
    result = subprocess.run([sys.executable, str(REPO / "gan_mnist.py"), "--dataset", "folder", "--data-dir",
                             str(root), "--out", str(tmp_path / "run"), *QUICK], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env=dict(os.environ, GAN_MNIST_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "64 images" in result.stdout  # Each picture once, through the loops too.
    assert contents(root / "even") | contents(root / "odd") == before
    assert sorted(p.name for p in root.iterdir()) == ["even", "odd"]


def test_the_cache_is_reused_rebuilt_after_a_change_and_ignored_when_damaged(tmp_path, mnist_train, monkeypatch,
                                                                            capsys):
    images, labels = mnist_train
    root = write_pngs(tmp_path / "pictures", images[:50], labels[:50])
    first = folder.load(folder.probe(root), 28, 1)[0]
    real_decode = folder.decode
    monkeypatch.setattr(folder, "decode", lambda *args: pytest.fail("decoded again, the cache unused"))
    np.testing.assert_array_equal(folder.load(folder.probe(root), 28, 1)[0], first)
    monkeypatch.setattr(folder, "decode", real_decode)
    Image.fromarray(images[60].squeeze()).save(root / "3" / "zz_new.png")  # The folder changes.
    capsys.readouterr()
    grown = folder.load(folder.probe(root), 28, 1)[0]
    assert len(grown) == 51 and "changed since it was decoded; decoding it again" in capsys.readouterr().out
    caches = sorted((tmp_path / "cache" / "folders").glob("*-28x1-51.npz"))
    assert len(caches) == 1
    caches[0].write_bytes(caches[0].read_bytes()[:1000])  # Damaged: cut short.
    again = folder.load(folder.probe(root), 28, 1)[0]
    assert "cache is damaged" in capsys.readouterr().out
    np.testing.assert_array_equal(again, grown)
    assert not list((tmp_path / "cache" / "folders").glob(".*tmp*"))  # No temporary is left behind.


def test_a_folder_too_large_for_memory_is_refused_before_decoding(tmp_path, mnist_train, monkeypatch, capsys):
    images, labels = mnist_train
    root = write_pngs(tmp_path / "pictures", images[:40], labels[:40])
    monkeypatch.setattr(utils, "available_memory", lambda: 40_000)  # Half of it is less than 40 x 784 bytes.
    monkeypatch.setattr(folder, "decode", lambda *args: pytest.fail("decoded before the size was checked"))
    status, error = fails(gan_mnist, ["--dataset", "folder", "--data-dir", str(root)] + QUICK, capsys)
    assert status == 1 and "40 images at 28x28x1 need" in error and "--limit" in error


@pytest.mark.slow  # Issue 40, 7: over 5 s on an idle AVX2-only machine, so in the whole suite only.
def test_a_conditional_run_on_a_class_folder_draws_a_row_per_class(tmp_path, mnist_train, capsys):
    images, labels = mnist_train
    keep = labels < 3
    root = write_pngs(tmp_path / "pictures", images[keep][:96], labels[keep][:96], names=["zero", "one", "two"])
    run_dir = tmp_path / "run"
    dcgan_mnist.main(["--dataset", "folder", "--data-dir", str(root), "--conditional", "--out", str(run_dir),
                      "--classes", "zero,two"] + QUICK)
    grid = np.asarray(Image.open(run_dir / "epoch_001.png"))
    assert grid.shape[0] == 2 * (28 + 2) + 2  # A row for each class in play: zero and two.
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["class_names"] == ["one", "two", "zero"]  # Subfolders sorted by name.
    status, error = fails(dcgan_mnist, ["--dataset", "folder", "--data-dir", str(root), "--classes", "three",
                                        "--out", str(tmp_path / "other")] + QUICK, capsys)
    assert status == 2 and "'three' is not a folder class" in error and "one, two, zero" in error
    flat = write_pngs(tmp_path / "flat", images[:40])
    status, error = fails(dcgan_mnist, ["--dataset", "folder", "--data-dir", str(flat), "--conditional"] + QUICK,
                          capsys)
    assert status == 2 and "no class subfolders" in error


@pytest.mark.slow
def test_both_scripts_train_resume_generate_and_evaluate_on_a_folder(tmp_path, mnist_train, capsys):
    images, labels = mnist_train
    root = write_pngs(tmp_path / "pictures", images, labels)
    run_dir = tmp_path / "gan"
    flags = ["--num-samples", "200", "--batch-size", "50"]
    gan_mnist.main(["--dataset", "folder", "--data-dir", str(root), "--epochs", "1", "--out", str(run_dir)] + flags)
    assert json.loads((run_dir / "metrics.json").read_text())["figures"]["classes"] == 10
    gan_mnist.main(["--out", str(run_dir), "--resume", "--epochs", "2"] + flags)  # The folder from config.json.
    assert [e["epoch"] for e in json.loads((run_dir / "history.json").read_text())["epochs"]] == [1, 2]
    gan_mnist.main(["--out", str(run_dir), "--generate", "12", "--samples-npz", str(tmp_path / "s.npz")])
    assert np.load(tmp_path / "s.npz")["images"].shape == (12, 28, 28)
    gan_mnist.main(["--out", str(run_dir), "--evaluate", "--num-samples", "200"])
    assert (run_dir / "evaluation.json").is_file()
    flat = write_pngs(tmp_path / "flat", images[:100])
    dcgan_mnist.main(["--dataset", "folder", "--data-dir", str(flat), "--out", str(tmp_path / "dcgan"),
                      "--epochs", "1", "--batch-size", "50"])
    out = capsys.readouterr().out
    assert "No evaluation: " in out and (tmp_path / "dcgan" / "progress.gif").is_file()
    assert not (tmp_path / "dcgan" / "metrics.json").exists()
    status, error = fails(dcgan_mnist, ["--out", str(tmp_path / "dcgan"), "--evaluate"], capsys)
    assert status == 2 and "without class subfolders" in error


def test_arch_auto_picks_the_preset_nearest_the_pictures_side(tmp_path, cifar_dir, capsys):
    images, labels = cifar10.load("train", cifar_dir, limit=200)
    cars = images[labels == 1][:64]
    root = write_pngs(tmp_path / "cars", cars)
    found = folder.probe(root)
    assert (found.channels, found.side) == (3, 32)
    config = dcgan_mnist.configurator.freeze(dcgan_mnist.configurator.parse(
        dcgan_mnist.__file__, vars(dcgan_mnist), ["--dataset", "folder", "--data-dir", str(root)],
        presets=dcgan_mnist.PRESETS, auto_preset=dcgan_mnist.default_arch))
    assert (config.arch, config.data_shape) == ("32", (32, 32, 3))
    assert "--arch auto: 32" in capsys.readouterr().out
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.kron(cars[0], np.ones((8, 8, 1), np.uint8))).save(big / "a.png")  # 256 x 256
    Image.fromarray(np.kron(cars[1], np.ones((8, 8, 1), np.uint8))).save(big / "b.png")
    assert dcgan_mnist.default_arch(type("Settings", (), {"data_side": folder.probe(big).side})) == "64"
    decoded, _ = folder.load(folder.probe(root), 32, 3)
    np.testing.assert_array_equal(decoded, cars)  # At their own size, colour pictures come back exactly too.


def test_resuming_a_folder_run_whose_classes_changed_is_one_line(tmp_path, mnist_train, capsys):
    images, labels = mnist_train
    root = write_pngs(tmp_path / "pictures", images[:64], labels[:64] % 2, names=["even", "odd"])
    gan_mnist.main(["--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "run")] + QUICK)
    before = contents(tmp_path / "run")
    (root / "odd").rename(root / "uneven")
    status, error = fails(gan_mnist, ["--out", str(tmp_path / "run"), "--resume", "--epochs", "2"], capsys)
    assert status == 1 and "trained on the classes even, odd" in error and "even, uneven" in error
    assert contents(tmp_path / "run") == before


def test_a_folder_run_is_named_after_its_folder_and_says_what_it_trains_on(tmp_path, mnist_train, capsys):
    pets = write_pngs(tmp_path / "pets", mnist_train[0][:100], mnist_train[1][:100] % 2, names=["cats", "dogs"])
    assert parsed(gan_mnist, "--dataset", "folder", "--data-dir", str(pets))["out"] == REPO / "results" / "gan_mnist-pets"
    assert parsed(gan_mnist, "--dataset", "folder", "--data-dir", str(pets), "--out", str(tmp_path / "x"))["out"] == \
        tmp_path / "x"
    assert parsed(gan_mnist)["out"] == REPO / "results" / "gan_mnist"
    assert parsed(gan_mnist, "--dataset", "folder", "--data-dir", str(pets))["num_samples"] == 100  # Sized to it.
    for script in (gan_mnist, dcgan_mnist):  # The constant a user edits names it.
        assert "or folder: your own pictures in --data-dir" in open(script.__file__).read()


@pytest.mark.slow
def test_scores_from_a_classifier_no_better_than_chance_are_not_printed(tmp_path, mnist_train, capsys):
    """Digits dealt into two classes at random: no classifier can tell them apart on the held-out tenth."""
    labels = np.random.default_rng(0).integers(0, 2, 200)
    shuffled = write_pngs(tmp_path / "shuffled", mnist_train[0][:200], labels, names=["left", "right"])
    run_dir = tmp_path / "run"
    gan_mnist.main(["--dataset", "folder", "--data-dir", str(shuffled), "--epochs", "1", "--batch-size", "32",
                    "--eval-every", "1", "--out", str(run_dir)])
    out = capsys.readouterr().out
    assert f"Training gan_mnist on 200 pictures of 2 classes in {shuffled} for 1 epoch of 6 steps" in out
    notes = [line for line in out.splitlines() if line.startswith("No scores for")]
    assert len(notes) == 1 and "is not clearly better than chance (0.50)" in notes[0], out
    assert "FID" not in out and not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "history.json").read_text())["evaluations"] == []


def test_the_chance_rule_is_the_lower_end_of_a_95_percent_interval():
    from ganlab.sampling import evaluation

    assert "0.56 (95% interval 0.42 to 0.69), is not clearly better than chance (0.50)" in \
        evaluation.no_better_than_chance(0.56, 50, 2)
    assert evaluation.no_better_than_chance(0.9, 50, 2) is None
    assert evaluation.no_better_than_chance(0.5, 400, 3) is None  # Chance is a third.
    assert evaluation.no_better_than_chance(1.0, 3, 2) is not None  # Three pictures prove little.


@pytest.mark.parametrize("blocked", ["a file", "read-only"])
def test_a_cache_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, mnist_train, monkeypatch, capsys,
                                                                        blocked):
    """Issue 41, 3: the temporary's removal raised where the cache cannot be written, stopping the run."""
    cache = tmp_path / "cache-place"
    if blocked == "a file":
        cache.write_text("not a directory")
    else:
        cache.mkdir()
        cache.chmod(0o500)
        if os.access(cache, os.W_OK):  # Root writes anyway: a file in its way stands for it.
            cache.chmod(0o700)
            cache.rmdir()
            cache.write_text("not a directory")
    monkeypatch.setattr(folder, "cache_dir", lambda: cache)
    pictures = write_pngs(tmp_path / "digits", mnist_train[0][:64], mnist_train[1][:64] % 2, names=["a", "b"])
    gan_mnist.main(["--dataset", "folder", "--data-dir", str(pictures), "--epochs", "1", "--batch-size", "32",
                    "--eval-every", "0", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "cannot cache the decoded folder" in out and (tmp_path / "run" / "history.json").is_file()


def test_a_killed_writers_temporary_in_the_cache_is_removed_at_the_next_write(tmp_path, mnist_train):
    """Issue 41, 4: a kill -9 while the decoded set was cached left its temporary for ever."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache" / "folders"  # own_cache's
    cache.mkdir(parents=True)
    leftover = cache / f".0123abcd-28x1-64.npz.tmp-{dead.pid}"
    leftover.write_bytes(b"x" * 1000)
    alive = cache / f".0123abcd-28x1-64.npz.tmp-{os.getpid()}"
    alive.write_bytes(b"mine")
    pictures = write_pngs(tmp_path / "digits", mnist_train[0][:64], mnist_train[1][:64] % 2, names=["a", "b"])
    found = folder.probe(pictures)
    folder.load(found, 28, 1)
    assert not leftover.exists() and alive.exists()  # A live process's stays.


def test_a_data_dir_of_pictures_without_dataset_folder_is_refused_and_untouched(tmp_path, mnist_train, capsys):
    """Issue 41, 1: MNIST was downloaded into the user's picture folder, or trained on in its name."""
    cats = write_pngs(tmp_path / "cats", mnist_train[0][:8])
    before = contents(cats)
    status, err = fails(gan_mnist, ["--data-dir", str(cats), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"argument --data-dir: {cats} holds pictures, not mnist's files; to train on them, add --dataset folder" in err
    assert contents(cats) == before and not (tmp_path / "run").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    status, err = fails(gan_mnist, ["--data-dir", str(tmp_path / "notes"), "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "holds none of mnist's files and is not empty, so nothing is downloaded into it" in err


def test_pictures_both_at_the_top_and_in_subfolders_or_under_two_classes_are_refused(tmp_path, mnist_train, capsys):
    """Issue 41, 7: 300 pictures at the top and 2 in rejects/ trained on the 2; a linked class doubled pictures."""
    mixed = write_pngs(tmp_path / "mixed", mnist_train[0][:30])
    write_pngs(mixed / "rejects", mnist_train[0][30:32])
    with pytest.raises(errors.DataError, match=r"30 pictures at its top and 2 in its 1 subfolder; subfolders are "
                                                r"classes"):
        folder.probe(mixed)
    linked = write_pngs(tmp_path / "linked", mnist_train[0][:20], mnist_train[1][:20] % 2, names=["a", "b"])
    (linked / "c").symlink_to(linked / "a", target_is_directory=True)
    with pytest.raises(errors.DataError, match="is both in a and in c"):
        folder.probe(linked)


def test_limit_takes_every_class_in_proportion_and_a_conditional_run_needs_each(tmp_path, mnist_train, capsys):
    """Issue 41, 8: --limit took the first pictures in class order, so a class could train on none."""
    images, labels = mnist_train
    order = np.argsort(labels, kind="stable")
    sizes = {0: 30, 1: 30, 2: 1}
    chosen = np.concatenate([order[labels[order] == c][:n] for c, n in sizes.items()])
    root = write_pngs(tmp_path / "pictures", images[chosen], labels[chosen], names=["a", "b", "c"])
    config = parse(gan_mnist, "--dataset", "folder", "--data-dir", str(root), "--limit", "30", "--classes", "a,b",
                   "--batch-size", "10")
    _, kept = utils.load_dataset(config, "train", 30)
    assert np.bincount(kept).tolist() == [15, 15]  # Not the first 30: all of a.
    _, kept = utils.load_dataset(parse(gan_mnist, "--dataset", "folder", "--data-dir", str(root)), "train", 31)
    assert np.bincount(kept).tolist() == [15, 15, 1]  # c's one picture sits mid-way through the spread order.
    status, error = fails(gan_mnist, ["--dataset", "folder", "--data-dir", str(root), "--conditional", "--limit", "20",
                                      "--batch-size", "10", "--eval-every", "0", "--out", str(tmp_path / "run")], capsys)
    assert status == 1 and error.count("\n") == 1, error
    assert "no training image of class c among the 20 pictures of --limit 20" in error
    assert not (tmp_path / "run").exists()


def test_the_held_out_set_holds_every_class_and_a_class_too_small_is_not_scored(tmp_path, mnist_train, capsys):
    """Issue 41, 9: classes of 1 to 3 pictures were scored, "accuracy 1.0000", "Inception Score (of 10)"."""
    from ganlab.sampling import evaluation, sample

    labels = np.array([0] * 25 + [1] * 3 + [2] * 12)
    held_out = sample.held_out_split(labels)
    assert np.bincount(labels[held_out]).tolist() == [2, 1, 1] and np.bincount(labels[~held_out]).tolist() == [23, 2, 11]
    images, mnist_labels = mnist_train
    order = np.argsort(mnist_labels, kind="stable")
    chosen = np.concatenate([order[mnist_labels[order] == c][:n] for c, n in {0: 30, 1: 30, 2: 1}.items()])
    root = write_pngs(tmp_path / "pictures", images[chosen], mnist_labels[chosen], names=["a", "b", "c"])
    run_dir = tmp_path / "run"
    gan_mnist.main(["--dataset", "folder", "--data-dir", str(root), "--epochs", "1", "--batch-size", "30",
                    "--out", str(run_dir)])
    out = capsys.readouterr().out
    assert f"No evaluation: in {root}, class c (1 picture) is too small" in out and "Frechet" not in out
    status, error = fails(gan_mnist, ["--out", str(run_dir), "--evaluate"], capsys)
    assert status == 1 and error.count("\n") == 1 and "class c (1 picture) is too small" in error
    figures = {"fid": 1.0, "inception_score": 1.9, "classes_covered": 2, "classes": 3, "label_kl": 0.1,
               "confidence": 0.9}
    assert "Inception Score (at most 3)" in evaluation.format_figures(figures)


def test_label_is_a_class_name_first_and_an_index_only_where_no_class_has_that_name():
    """Issue 41, 2: --label read indices only, so on subfolders 0, 1, 10, 2 "--label 2" drew "10"."""
    from types import SimpleNamespace

    from ganlab.sampling import sample

    saved = SimpleNamespace(conditional=True, classes="", class_names=("0", "1", "10", "2"), dataset="folder")
    assert set(sample._requested_labels(SimpleNamespace(label="2"), saved, 3)) == {3}
    assert set(sample._requested_labels(SimpleNamespace(label="10"), saved, 3)) == {2}
    for label in ("4", "zebra", "1,2", "²"):
        with pytest.raises(errors.UsageError, match=f"^argument --label: {label} is not a class this run was trained"):
            sample._requested_labels(SimpleNamespace(label=label), saved, 3)


def test_a_run_directory_inside_the_picture_folder_is_refused(tmp_path, mnist_train):
    """Its grids would have joined the pictures (a class "run" at the next probe); found by the folders family."""
    root = write_pngs(tmp_path / "pictures", mnist_train[0][:20], mnist_train[1][:20])
    with pytest.raises(errors.UsageError, match=r"^argument --out: .*/pictures/runs/a is inside --data-dir"):
        parse(gan_mnist, "--dataset", "folder", "--data-dir", str(root), "--out", str(root / "runs" / "a"))
    parse(gan_mnist, "--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "run"))  # Beside it.
