"""Image helpers: scaling, the presets' resizing, grids, PNGs, GIFs, the loss plot and atomic writes."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

import utils
from ganlab.run import loop


def test_prepare_images_scales_to_tanh_range_for_each_transform():
    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    native = utils.prepare_images(images)
    assert native.shape == (3, 28, 28, 1) and native.dtype == np.float32
    assert native.min() == -1.0 and native.max() == 1.0
    padded = utils.prepare_images(images, 32, "pad")
    assert padded.shape == (3, 32, 32, 1)
    assert np.all(padded[:, :2] == -1.0) and np.all(padded[:, :, -2:] == -1.0)  # Black border.
    np.testing.assert_array_equal(padded[:, 2:30, 2:30], native)
    resized = utils.prepare_images(images, 64, "resize")
    assert resized.shape == (3, 64, 64, 1) and -1.0 <= resized.min() and resized.max() <= 1.0


@pytest.mark.parametrize("size, transform, mean_error, max_error", [
    (28, "none", 0, 0), (32, "pad", 0, 0), (64, "resize", 3, 40)])
def test_to_dataset_uint8_undoes_prepare_images(size, transform, mean_error, max_error):
    # A smooth stroke-like blob: bilinear up and area-averaged down keep it nearly intact.
    yy, xx = np.mgrid[0:28, 0:28]
    blob = np.clip(255 * np.exp(-((yy - 14) ** 2 + (xx - 12) ** 2) / 30.0), 0, 255).astype(np.uint8)
    images = np.stack([blob, blob.T, blob[::-1], np.zeros_like(blob)])
    back = utils.to_dataset_uint8(utils.prepare_images(images, size, transform), transform, native_size=28)
    assert back.shape == (4, 28, 28) and back.dtype == np.uint8
    error = np.abs(back.astype(int) - images)
    assert error.mean() <= mean_error and error.max() <= max_error


def test_to_uint8_maps_the_tanh_range_onto_0_255():
    np.testing.assert_array_equal(utils.to_uint8(np.array([-1.0, 0.0, 1.0, 3.0])), [0, 128, 255, 255])


def test_image_grid_places_each_tile_in_row_major_order():
    tiles = np.stack([np.full((4, 5), value, np.uint8) for value in (10, 20, 30, 40, 50)])
    grid = utils.image_grid(tiles, columns=3, padding=1, background=0)
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1)
    assert grid[1, 1] == 10 and grid[1, 7] == 20 and grid[1, 13] == 30
    assert grid[6, 1] == 40 and grid[6, 7] == 50 and grid[6, 13] == 0  # The sixth place stays empty.
    assert grid[0, 0] == 0


def test_image_grid_of_floats_and_colour():
    floats = np.full((4, 3, 3, 1), 1.0, np.float32)
    grid = utils.image_grid(floats, padding=0)
    assert grid.shape == (6, 6) and grid.dtype == np.uint8 and grid.min() == 255
    colour = utils.image_grid(np.zeros((2, 3, 3, 3), np.float32), columns=2, padding=0)
    assert colour.shape == (3, 6, 3)


def test_save_png_and_gif_round_trip(tmp_path):
    frames = []
    for index in range(4):
        frame = np.full((12, 10), index * 60, np.uint8)
        utils.save_png(tmp_path / f"epoch_{index + 1:03d}.png", frame)
        frames.append(tmp_path / f"epoch_{index + 1:03d}.png")
    np.testing.assert_array_equal(iio.imread(frames[2]), np.full((12, 10), 120))
    utils.save_gif(tmp_path / "progress.gif", frames)
    animation = iio.imread(tmp_path / "progress.gif", index=None)
    assert animation.shape[:3] == (4, 12, 10)
    assert abs(int(animation[3, 0, 0, 0]) - 180) <= 2
    assert iio.immeta(tmp_path / "progress.gif").get("loop") == 0  # Loops forever.
    utils.save_gif(tmp_path / "one.gif", frames[:1])  # A one-epoch run still gets its GIF.
    assert iio.imread(tmp_path / "one.gif", index=None).shape[0] == 1


def test_plot_history_draws_every_curve_in_its_colour(tmp_path):
    history = {"iterations": {key: list(np.linspace(0.1, 0.9, 20)) for key in loop.METRICS},
               "epochs": [{"epoch": e, **{key: 0.5 for key in loop.METRICS}} for e in (1, 2)]}
    utils.plot_history(tmp_path / "losses.png", history)
    picture = iio.imread(tmp_path / "losses.png")[..., :3].astype(int)
    assert picture.shape == (700, 800, 3)  # figsize (8, 7) at 100 dpi.
    # D loss, G loss, D(x), D(G(z)): matplotlib's tab:blue, tab:orange, tab:green and tab:red.
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)):
        assert (np.abs(picture - colour).sum(axis=-1) < 30).sum() > 100, colour
    assert list(tmp_path.iterdir()) == [tmp_path / "losses.png"]
    utils.plot_history(tmp_path / "empty.png", {"iterations": {key: [] for key in loop.METRICS}, "epochs": []})
    assert not (tmp_path / "empty.png").exists()  # Nothing to plot, nothing written.


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "history.json"
    utils.save_json(target, {"epochs": [1]})
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as temporary:
            temporary.write_text('{"epochs": [1, 2')  # Half written, then the writer dies.
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"epochs": [1]}
    assert list(tmp_path.iterdir()) == [target]  # No temporary file is left.
