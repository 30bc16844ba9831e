"""A folder of your own pictures as a dataset: `--dataset folder --data-dir PATH`.

Subfolders are classes, as in torchvision's ImageFolder (their names, sorted); a folder without
subfolders is one unlabelled set. Every image is decoded by Pillow, its EXIF orientation applied
(an animated GIF gives its first frame; palette, CMYK and 16-bit images are converted; RGBA and LA
are composited on white, BACKGROUND), cropped to its centred square and resized to the model's
side. A set whose images are all greyscale trains with one channel, any other in RGB.

What a real folder holds besides: hidden files, `.DS_Store`, `Thumbs.db` and files that are not
images by their extension are passed over in silence; empty, truncated or corrupt images, images
whose extension lies about their content, and images over Pillow's decompression-bomb limit are
skipped and named in one summary line. Symbolic links are followed, each folder once (a loop
does not hang). Nothing in the folder is ever written.

Decoding runs once: the decoded uint8 arrays are cached outside the folder, under the cache
directory's `folders/` (`$GAN_MNIST_CACHE`, else ~/.cache/tf2-gan-mnist), keyed on the folder's
file list, sizes and modification times and on the target size; a changed folder is decoded again
(saying so); a cache file is written whole under a temporary name and renamed, so a damaged one or
one another process is still writing is never read as good.
"""

import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ganlab.datasets.downloads import cache_dir
from ganlab.errors import DataError

# The formats a file's extension promises; a file whose content is another is skipped.
FORMATS = {".png": {"PNG"}, ".jpg": {"JPEG", "MPO"}, ".jpeg": {"JPEG", "MPO"}, ".jpe": {"JPEG", "MPO"},
           ".bmp": {"BMP"}, ".gif": {"GIF"}, ".webp": {"WEBP"}, ".tif": {"TIFF"}, ".tiff": {"TIFF"},
           ".ppm": {"PPM"}, ".pgm": {"PPM"}, ".pbm": {"PPM"}, ".pnm": {"PPM"}}
IGNORED_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}  # Hidden files (".DS_Store", ...) are left out too.
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
BACKGROUND = 255  # Transparent pixels become white.
CACHE_VERSION = 1  # Bumped when decoding changes, so that older caches are not read.
SHOWN_SKIPS = 5  # Skipped files named in the summary line.


class Skip(Exception):
    """A file that is not a usable image; its message is the reason, in a few words."""


@dataclass(frozen=True)
class Folder:
    """A folder's usable images as its headers describe them (`probe`), in training order: class by class
    (subfolders sorted by name), each class's files sorted by path."""

    root: Path
    files: tuple  # paths relative to root
    labels: tuple  # class index of each file (0 for a flat folder)
    class_names: tuple  # subfolder names, () for a flat folder
    channels: int  # 1 if every usable image is greyscale, else 3
    side: int  # the images' typical side: the median of their shorter sides, in pixels
    skipped: tuple  # (path, reason) of the files already known to be unusable
    candidates: int  # the image files looked at (skipped included)
    key: str  # what the caches are keyed on: the file list, sizes and modification times


def probe(directory):
    """The Folder at `directory`: listed, each image's header read (no pixels decoded; cached by the file
    list). DataError naming the folder if it is not one, holds no usable image, or has an empty class."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (--data-dir of --dataset folder: a folder of pictures, "
                        f"with a subfolder per class or none)")
    class_dirs = sorted(p for p in _entries(root) if p.is_dir())
    class_names = tuple(p.name for p in class_dirs)
    listed, owner = [], {}  # (relative path, label, stat); each real file's class
    for label, folder in enumerate(class_dirs or [root]):
        seen = {root.resolve()} if class_dirs else set()
        for path in (_images_under(folder, seen) if class_dirs else _images_in(root)):
            real = path.resolve()
            if real in owner and owner[real] != label:  # Issue 41, 7: one picture under two labels.
                raise DataError(f"{root}: {real} is both in {class_names[owner[real]]} and in {class_names[label]} "
                                f"(a link between class folders?); a picture belongs to one class")
            owner[real] = label
            listed.append((path.relative_to(root), label, path.stat()))
    loose = _images_in(root) if class_dirs else []
    if loose:  # Issue 41, 7: ImageFolder's rule would drop them in silence.
        in_classes = len(listed)
        raise DataError(f"{root}: {len(loose)} pictures at its top and {in_classes} in its {len(class_dirs)} "
                        f"subfolder{'s' if len(class_dirs) > 1 else ''}; subfolders are classes, so move the top's "
                        f"pictures into one (or the subfolders out) to say which you mean")
    key = hashlib.sha256(json.dumps([CACHE_VERSION, str(root.resolve()), [
        (str(rel), label, stat.st_size, stat.st_mtime_ns) for rel, label, stat in listed]]).encode()).hexdigest()[:24]
    headers = _cached_headers(root, listed, key)
    usable = [(rel, label) for (rel, label, _), header in zip(listed, headers) if "reason" not in header]
    skipped = tuple((str(rel), header["reason"]) for (rel, _, _), header in zip(listed, headers) if "reason" in header)
    for label, name in enumerate(class_names):
        if not any(image_label == label for _, image_label in usable):
            raise DataError(f"{root / name}: a class folder with no usable image"
                            + (f" ({_describe_skips(skipped, len(listed))})" if skipped else "")
                            + "; add images to it or move it out of the folder")
    if not usable:
        raise DataError(f"{root}: no usable image (PNG, JPEG, GIF, BMP, WebP, TIFF or PNM)"
                        + (f": {_describe_skips(skipped, len(listed))}" if skipped else "")
                        + "; point --data-dir at a folder of pictures")
    good = [header for header in headers if "reason" not in header]
    return Folder(root=root, files=tuple(rel for rel, _ in usable), labels=tuple(label for _, label in usable),
                  class_names=class_names, channels=1 if all(h["grey"] for h in good) else 3,
                  side=int(np.median([h["side"] for h in good])), skipped=skipped, candidates=len(listed), key=key)


def _entries(directory):
    """The entries of `directory` that may hold images: not hidden, not a system file."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as error:
        raise DataError(f"{directory}: cannot list the folder ({error.strerror or error})") from None
    return [Path(directory) / name for name in names
            if not name.startswith(".") and name.lower() not in IGNORED_NAMES]


def _images_in(directory):
    """The files of `directory` whose extension names an image format."""
    return [p for p in _entries(directory) if p.suffix.lower() in FORMATS and p.is_file()]


def _images_under(directory, seen):
    """The image files under `directory`, subfolders included, each real folder once (`seen`: no loops)."""
    real = directory.resolve()
    if real in seen:
        return []
    seen.add(real)
    files = _images_in(directory)
    for sub in _entries(directory):
        if sub.is_dir():
            files += _images_under(sub, seen)
    return files


def _cached_headers(root, listed, key):
    """Each listed file's header summary ({"grey", "side"} or {"reason"}), from the cache when the file list
    is unchanged, else read now (and cached)."""
    path = cache_dir() / "folders" / f"{key}.json"
    try:
        headers = json.loads(path.read_text())
        if isinstance(headers, list) and len(headers) == len(listed) and all(isinstance(h, dict) for h in headers):
            return headers
    except (OSError, ValueError):
        pass
    headers = []
    for index, (rel, _, stat) in enumerate(listed):
        try:
            headers.append(_header(root / rel, stat.st_size))
        except Skip as skip:
            headers.append({"reason": str(skip)})
        _progress("reading headers", index + 1, len(listed))
    _write_atomically(path, lambda handle: handle.write(json.dumps(headers).encode()))
    return headers


def _header(path, size):
    """{"grey": bool, "side": shorter side} of one image, from its header; Skip if it is not usable."""
    if size == 0:
        raise Skip("empty")
    with _opened(path) as image:
        return {"grey": _is_grey(image), "side": min(image.size)}


class _opened:
    """Image.open as a context, its failures as Skip: not an image, a lying extension, a decompression bomb."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                self.image = Image.open(self.path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise Skip("over Pillow's decompression-bomb limit") from None
        except UnidentifiedImageError:
            raise Skip("not an image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise Skip(_reason(error)) from None
        expected = FORMATS[self.path.suffix.lower()]
        if self.image.format not in expected:
            self.image.close()
            raise Skip(f"a {self.image.format or 'different'} file named {self.path.suffix}")
        return self.image

    def __exit__(self, *exc_info):
        self.image.close()


def _reason(error):
    text = str(error).lower()
    return "truncated" if "truncat" in text or isinstance(error, EOFError) else "corrupt"


def _is_grey(image):
    if image.mode == "P":
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return image.mode in GREY_MODES


def decode(path, side, channels):
    """One image as uint8 (side, side, channels): first frame, EXIF orientation, converted to 8-bit L or RGB
    (transparency on white), the centred square, resized (Lanczos) if its side differs. Skip if unusable."""
    with _opened(path) as image:
        try:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _eight_bit(image, channels)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise Skip(_reason(error)) from None
    width, height = image.size
    square = min(width, height)
    if (width, height) != (square, square):
        left, top = (width - square) // 2, (height - square) // 2
        image = image.crop((left, top, left + square, top + square))
    if square != side:
        image = image.resize((side, side), Image.LANCZOS)
    array = np.asarray(image, np.uint8)
    return array.reshape(side, side, channels)


def _eight_bit(image, channels):
    """`image` as 8-bit L (channels 1) or RGB (3): 16-bit and float greys scaled, palettes and CMYK
    converted, transparency composited on BACKGROUND."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, np.float64)
        scale = 257.0 if image.mode.startswith("I") and values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("L" if channels == 1 else "RGB")


def load(folder, side, channels, limit=0):
    """The folder's images as uint8 (N, side, side, channels) and int32 labels (N,), in the Folder's order,
    the first `limit` usable ones (0: all); decoded once and cached (see the module's docstring).

    Prints one summary line naming the skipped files, and a progress line while a large folder decodes.
    (utils.load_dataset first checks that they fit in memory.)
    """
    count = min(limit, len(folder.files)) if limit else len(folder.files)
    spread = "-spread" if count < len(folder.files) else ""  # --limit's pictures, from every class (spread_order).
    path = cache_dir() / "folders" / f"{folder.key}-{side}x{channels}-{count}{spread}.npz"
    cached = _read_cache(path, count, side, channels)
    if cached is None:
        stale = [p for p in (cache_dir() / "folders").glob("*.npz")
                 if not p.name.startswith(folder.key) and _cache_folder(p) == str(folder.root.resolve())]
        if stale:
            print(f"{folder.root}: the folder changed since it was decoded; decoding it again")
        cached = _decode_all(folder, side, channels, count)
        _write_atomically(path, lambda handle: np.savez(handle, folder=str(folder.root.resolve()), **cached))
        for old in stale:  # The folder as it was: never read again.
            old.unlink(missing_ok=True)
    images, labels, skipped = cached["images"], cached["labels"], list(folder.skipped) + [
        tuple(pair) for pair in json.loads(str(cached["skipped"]))]
    if skipped:
        print(f"{folder.root}: {_describe_skips(skipped, folder.candidates)}")
    if not len(images):
        raise DataError(f"{folder.root}: no usable image: {_describe_skips(skipped, folder.candidates)}")
    return images, labels


def spread_order(labels):
    """The order in which --limit takes a folder's pictures: every class in proportion to its size (issue 41, 8).

    A picture's key is its place within its class as a fraction of the class, (rank + 1/2) / size;
    the first N pictures by key hold each class's share of N to within one picture.
    """
    labels = np.asarray(labels)
    keys = np.zeros(len(labels))
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        keys[where] = (np.arange(len(where)) + 0.5) / len(where)
    return np.argsort(keys, kind="stable")


def _decode_all(folder, side, channels, count):
    """The first `count` usable images in `spread_order` (all of them: the folder's order), kept in the folder's
    order: class by class."""
    images = np.empty((count, side, side, channels), np.uint8)
    labels = np.empty((count,), np.int32)
    places = np.empty((count,), np.int64)
    skipped, kept = [], 0
    start = time.perf_counter()
    order = spread_order(folder.labels) if count < len(folder.files) else range(len(folder.files))
    for done, index in enumerate(order):
        if kept == count:
            break
        rel = folder.files[index]
        try:
            images[kept] = decode(folder.root / rel, side, channels)
        except Skip as skip:
            skipped.append((str(rel), str(skip)))
            continue
        labels[kept], places[kept] = folder.labels[index], index
        kept += 1
        _progress("decoding", done + 1, len(folder.files), start)
    in_order = np.argsort(places[:kept], kind="stable")
    return {"images": images[:kept][in_order], "labels": labels[:kept][in_order], "skipped": json.dumps(skipped)}


def _read_cache(path, count, side, channels):
    """The cached arrays at `path`, or None if there are none or they do not read whole."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            cached = {name: saved[name] for name in ("images", "labels", "skipped")}
        if cached["images"].shape[1:] != (side, side, channels) or len(cached["labels"]) != len(cached["images"]) \
                or len(cached["images"]) > count or cached["images"].dtype != np.uint8:
            raise ValueError("arrays of unexpected shapes")
        return cached
    except Exception as error:  # numpy and zipfile raise many types for a damaged file.
        print(f"{path}: the decoded folder's cache is damaged ({type(error).__name__}); decoding again")
        return None


def _cache_folder(path):
    try:
        with np.load(path, allow_pickle=False) as saved:
            return str(saved["folder"])
    except Exception:  # A damaged or unrelated file: not this folder's.
        return None


def _write_atomically(path, write):
    """Write `path` through `write(handle)` under a temporary name, then rename it into place. A cache that
    cannot be written is not an error: the next start decodes again."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(path.parent)
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    except OSError as error:
        print(f"{path.parent}: cannot cache the decoded folder ({error.strerror or error}); it is decoded "
              f"again at the next start")
    finally:
        with contextlib.suppress(OSError):  # A cache on a read-only disk, or under a file, has none to remove.
            temporary.unlink(missing_ok=True)


def _remove_dead_temporaries(directory):
    """Remove the cache's temporaries (`.NAME.tmp-PID`) whose process is dead: a kill -9 mid-write left them,
    as large as a decoded set; a live process's stay."""
    for leftover in directory.glob(".*.tmp-*"):
        try:
            os.kill(int(leftover.name.rsplit(".tmp-", 1)[1]), 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


def _describe_skips(skipped, total):
    shown = ", ".join(f"{Path(name).name} ({reason})" for name, reason in skipped[:SHOWN_SKIPS])
    return f"skipped {len(skipped):,} of {total:,} files: {shown}" + (", ..." if len(skipped) > SHOWN_SKIPS else "")


def _progress(doing, done, total, start=None, every=2000):
    """A progress line for a large folder: in place on a terminal, else every `every` images."""
    if total < every:
        return
    if sys.stdout.isatty():
        print(f"\r{doing} {done:,}/{total:,} images", end="\n" if done == total else "", flush=True)
    elif done % every == 0 or done == total:
        rate = f", {done / (time.perf_counter() - start):.0f} images/s" if start else ""
        print(f"{doing} {done:,}/{total:,} images{rate}", flush=True)
