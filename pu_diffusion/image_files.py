"""Reading image files: modes and bit depths, a start-up check that decodes each image once, the channel
count of a whole dataset, and the files an image folder's loader passes over."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pu_diffusion.errors import InputError

logger = logging.getLogger(__name__)


#: PIL modes read as one channel. Palette ("P") images are often coloured, so they count as RGB.
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def to_8bit(image: Image.Image) -> Image.Image:
    """An image whose pixels are not 8-bit, scaled into 8-bit grayscale; other images as they are.

    PIL's own conversion to "L" clips such pixels at 255 instead of scaling
    them, which turns a 16-bit scan white. The ranges taken: 16-bit modes
    ("I;16*", and "I", which Pillow also gives 16-bit PNGs) span 0..65535;
    32-bit float ("F") spans 0..1. Values outside are clipped.
    """
    if image.mode.startswith("I"):
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) * (255.0 / 65535.0)
    elif image.mode == "F":
        pixels = np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255.0
    else:
        return image
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def warn_about_left_out_files(folder: Path, dataset, source: str) -> None:
    """Name the image files of a folder that the loaded dataset does not hold: broken links, images with no
    metadata row, and any other file the image-folder loader passed over."""
    from datasets import Image as ImageFeature

    image_column = next((c for c, f in dataset.features.items() if isinstance(f, ImageFeature)), None)
    if image_column is None:
        return
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    on_disk = {
        os.path.abspath(path)
        for path in folder.rglob("*")
        if path.suffix.lower() in extensions and (path.is_file() or path.is_symlink())
    }
    loaded = {
        os.path.abspath(entry["path"])
        for entry in dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]
        if entry.get("path")
    }
    left_out = sorted(on_disk - loaded)
    if not left_out:
        return
    broken = [path for path in left_out if not os.path.exists(path)]
    has_metadata = any(folder.glob("metadata.*"))
    others = [path for path in left_out if path not in broken]
    reasons = []
    if broken:
        reasons.append(f"{len(broken)} broken link(s), e.g. {', '.join(broken[:3])}")
    if others:
        why = "with no row in the metadata file" if has_metadata else "passed over by the image-folder loader"
        reasons.append(f"{len(others)} {why}, e.g. {', '.join(others[:3])}")
    logger.warning("%s: %d image file(s) are left out: %s", source, len(left_out), "; ".join(reasons))


def check_images(dataset, image_column: str, resolution: int, source: str):
    """Decode every image once; return the dataset without the ones that cannot be read.

    A full decode, not PIL's ``verify()`` alone, so a file cut off half-way
    is found here and not at step N. JPEGs decode at 1/8 scale (their whole
    stream is still read), which keeps this pass cheap. Unreadable entries are
    skipped with a warning that counts them and names a few files; a source
    with no readable image at all is an error. Images smaller than
    ``resolution`` are kept (they are enlarged) and counted in a warning.
    """
    from datasets import Image as ImageFeature

    if not isinstance(dataset.features[image_column], ImageFeature):
        raise InputError(
            f"--image_column {image_column!r} of {source} holds {dataset.features[image_column]}, not images"
        )
    readable, corrupt, small = [], [], 0
    for index, entry in enumerate(dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]):
        try:
            small += min(_decode_once(entry)) < resolution
            readable.append(index)
        except Exception:  # PIL raises many types for a file that is not a readable image
            corrupt.append(entry_name(entry, index))
    if not readable:
        raise InputError(f"{source}: none of its {len(dataset)} images can be read (e.g. {corrupt[0]})")
    if corrupt:
        logger.warning("%s: skipping %d unreadable image(s), e.g. %s", source, len(corrupt), ", ".join(corrupt[:3]))
        dataset = dataset.select(readable)
    if small:
        logger.warning(
            "%s: %d image(s) are smaller than --resolution %d and will be enlarged", source, small, resolution
        )
    return dataset


def _open_entry(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"])


def _decode_once(entry: dict) -> tuple[int, int]:
    """Check the file's structure, then decode its pixels; returns its size."""
    with _open_entry(entry) as image:
        image.verify()
    with _open_entry(entry) as image:
        size = image.size
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    return size


def entry_name(entry: dict, index: int) -> str:
    """A file name for messages; rows stored as bytes only have their row number."""
    return entry.get("path") or f"row {index}"


def image_channels(datasets_and_sources: list, image_column: str) -> int:
    """3 if any image of the given datasets is in colour, else 1; decided from the data as a whole.

    Grayscale images are repeated into three channels for a colour model,
    which loses nothing, so a few grayscale images in colour data (or the
    reverse) are named in a warning but do not change the decision. Only the
    headers are read.
    """
    from datasets import Image as ImageFeature

    grayscale, colour = [], []
    for dataset, source in datasets_and_sources:
        entries = dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]
        for index, entry in enumerate(entries):
            with _open_entry(entry) as image:
                kind = grayscale if image.mode in GRAYSCALE_MODES else colour
            kind.append(f"{source}: {entry_name(entry, index)}")
    if colour and grayscale:
        minority, what = (grayscale, "grayscale") if len(grayscale) <= len(colour) else (colour, "colour")
        logger.warning(
            "%d of %d images are %s (e.g. %s); the model takes 3 channels and grayscale images are repeated into them",
            len(minority),
            len(grayscale) + len(colour),
            what,
            ", ".join(minority[:3]),
        )
    return 3 if colour else 1
