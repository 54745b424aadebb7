"""A second built-in dataset: procedurally drawn colour shapes on textured backgrounds.

The digits are 8x8 grey strokes on black. Settings chosen on them need a
check on data with other statistics before anyone calls them defaults, and
that data must be built here (no download). These images differ where it
matters for the PU loss: three channels, 16 or 32 px (12-48x more values per
image, so the per-sample loss is that much larger), and much more variety
within a class (colour, size, position, rotation, background).

Every image is a function of ``(seed, class, index)`` alone, so a dataset is
reproduced exactly by its seed whatever the number of images asked for.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Class names, in label-id order. The benchmark treats the last three as sensitive.
SHAPES = ("circle", "square", "cross", "triangle", "star", "ring")
SENSITIVE_SHAPES = ("triangle", "star", "ring")
#: The caption that names no shape: the prompt whose mix of classes the text-to-image benchmark measures.
GENERIC_CAPTION = "a photo of a shape"
#: Three paraphrases of it that no training caption uses: does what PU removes stay removed under other words?
PARAPHRASES = ("a picture of a shape", "an image of a shape", "a drawing of a shape")

#: Background textures, by the index the drawing draws.
TEXTURES = ("a gradient", "stripes", "noise")
#: Hue names at the centre of each of eight equal sectors of the colour wheel, red at 0.
HUES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
#: Shapes are drawn this many times larger, then reduced, for anti-aliased edges.
SUPERSAMPLING = 4


def _polygon(sides: int, radius: float, rotation: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices around the origin; with ``inner`` a star alternating between radius and inner * radius."""
    points = []
    count = 2 * sides if inner is not None else sides
    for k in range(count):
        r = radius * (inner if inner is not None and k % 2 else 1.0)
        angle = rotation + 2 * math.pi * k / count
        points.append((r * math.cos(angle), r * math.sin(angle)))
    return points


def _cross(radius: float, rotation: float) -> list[tuple[float, float]]:
    """A plus sign whose arms are 0.7 radius wide: one arm's three outer corners, turned four times."""
    half = 0.35 * radius
    points = []
    for quarter in range(4):
        angle = rotation + quarter * math.pi / 2
        cos, sin = math.cos(angle), math.sin(angle)
        points += [(x * cos - y * sin, x * sin + y * cos) for x, y in ((radius, -half), (radius, half), (half, half))]
    return points


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """The shape's coverage (mode L) on a size x size canvas, random in size, position and rotation, and its
    radius as a share of the canvas."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    radius = size * rng.uniform(0.22, 0.36)
    centre_x, centre_y = size / 2 + size * rng.uniform(-0.12, 0.12, size=2)
    rotation = rng.uniform(0, 2 * math.pi)

    def place(points):
        return [(centre_x + x, centre_y + y) for x, y in points]

    box = [centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        hole = radius * rng.uniform(0.45, 0.6)
        draw.ellipse([centre_x - hole, centre_y - hole, centre_x + hole, centre_y + hole], fill=0)
    elif shape == "square":
        draw.polygon(place(_polygon(4, radius * 1.1, rotation)), fill=255)
    elif shape == "triangle":
        draw.polygon(place(_polygon(3, radius * 1.15, rotation)), fill=255)
    elif shape == "star":
        draw.polygon(place(_polygon(5, radius * 1.15, rotation, inner=0.45)), fill=255)
    elif shape == "cross":
        draw.polygon(place(_cross(radius * 1.1, rotation)), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return mask, radius / size


def _colour(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, float, str]:
    """A two-colour linear gradient with stripes or noise on top (float RGB in [0, 1]), its mean value, and
    its texture's name."""
    value = rng.choice([rng.uniform(0.1, 0.35), rng.uniform(0.65, 0.9)])
    hue = rng.uniform()
    start = _colour(hue, rng.uniform(0.1, 0.6), value)
    end = _colour(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.6), np.clip(value + rng.uniform(-0.1, 0.1), 0, 1))
    angle = rng.uniform(0, 2 * math.pi)
    grid = np.linspace(-1, 1, size)
    x, y = np.meshgrid(grid, grid)
    position = (x * math.cos(angle) + y * math.sin(angle) + 1.5) / 3  # 0..1 across the canvas
    canvas = start + (end - start) * position[..., None]
    texture = rng.integers(3)
    if texture == 1:  # stripes in a random direction and period
        direction = rng.uniform(0, 2 * math.pi)
        period = rng.uniform(0.25, 0.6)
        phase = x * math.cos(direction) + y * math.sin(direction)
        canvas = canvas + 0.06 * np.sin(2 * math.pi * phase / period)[..., None]
    elif texture == 2:  # coarse noise, constant over each 8x8 block of the drawing canvas
        blocks = rng.normal(0, 0.04, size=(size // 8, size // 8, 3))
        canvas = canvas + np.kron(blocks, np.ones((8, 8, 1)))[:size, :size]
    return np.clip(canvas, 0, 1), value, TEXTURES[texture]


def draw_shape(shape: str, resolution: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``shape`` at ``resolution`` px."""
    return draw_described_shape(shape, resolution, rng)[0]


def draw_described_shape(shape: str, resolution: int, rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """One RGB image of ``shape`` and what was drawn: its size word, colour, shape and background texture.
    The random draws are those of :func:`draw_shape`, so the image is the same."""
    size = resolution * SUPERSAMPLING
    background, background_value, texture = _background(size, rng)
    coverage, radius = _shape_mask(shape, size, rng)
    mask = np.asarray(coverage, dtype=np.float64)[..., None] / 255.0
    # The shape's brightness stays far from the background's, so every class is visible on every background.
    value = rng.uniform(0.75, 1.0) if background_value < 0.5 else rng.uniform(0.0, 0.3)
    hue = rng.uniform()
    foreground = _colour(hue, rng.uniform(0.4, 1.0), value)
    shading = 1 + 0.08 * np.linspace(-1, 1, size)[None, :, None]  # a little light from one side
    pixels = background * (1 - mask) + np.clip(foreground * shading, 0, 1) * mask
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="RGB")
    attributes = {
        "size": "small" if radius < 0.29 else "large",  # radii are drawn from 0.22 to 0.36 of the canvas
        "colour": ("bright " if value >= 0.75 else "dark ") + HUES[int((hue * len(HUES) + 0.5) % len(HUES))],
        "shape": shape,
        "background": texture,
    }
    return image.resize((resolution, resolution), Image.Resampling.BOX), attributes


def describe(attributes: dict, rng: np.random.Generator) -> str:
    """A caption naming the shape and, each with probability 1/2, its size, colour and background: "a photo of
    a small dark blue star on stripes", "a photo of a star", ... so that short prompts are captions too."""
    size, colour, background = (rng.uniform(size=3) < 0.5).tolist()
    words = [attributes["size"]] * size + [attributes["colour"]] * colour + [attributes["shape"]]
    return f"a photo of a {' '.join(words)}" + (f" on {attributes['background']}" if background else "")


def image_rng(seed: int, class_id: int, index: int) -> np.random.Generator:
    """The random source of one image: a function of its seed, class and index only."""
    return np.random.default_rng([seed, class_id, index])


def write_shapes_dataset(
    output_dir: str | os.PathLike,
    resolution: int = 16,
    images_per_class: int = 600,
    test_fraction: float = 0.2,
    seed: int = 0,
    generic_caption_share: float | None = None,
) -> dict:
    """Write the shapes as a labeled dataset folder, like :func:`builtin_datasets.write_digits_dataset`.

    ``data/train-*.parquet`` and ``data/test-*.parquet`` hold an ``image``
    column (RGB PNG, ``resolution`` px) and a ``label`` column (the names in
    :data:`SHAPES`). The first ``test_fraction`` of each class's images go to
    the test split. Returns the number of rows per split.

    With ``generic_caption_share`` a ``text`` column holds captions: what was
    drawn (:func:`describe`), or for that share of the images, drawn at
    random, :data:`GENERIC_CAPTION`.
    """
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    test_count = round(images_per_class * test_fraction)
    captions = generic_caption_share is not None
    columns = ("image", "label", "text") if captions else ("image", "label")
    splits = {split: {column: [] for column in columns} for split in ("train", "test")}
    for class_id, shape in enumerate(SHAPES):
        for index in range(images_per_class):
            split = splits["test" if index < test_count else "train"]
            rng = image_rng(seed, class_id, index)
            image, attributes = draw_described_shape(shape, resolution, rng)
            split["image"].append(image)
            split["label"].append(class_id)
            if captions:
                generic = rng.uniform() < generic_caption_share
                split["text"].append(GENERIC_CAPTION if generic else describe(attributes, rng))
    features = {"image": ImageFeature(), "label": ClassLabel(names=list(SHAPES))}
    features = Features({**features, "text": Value("string")} if captions else features)
    data_dir = Path(output_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, columns in splits.items():
        Dataset.from_dict(columns, features=features).to_parquet(str(data_dir / f"{split}-00000-of-00001.parquet"))
        counts[split] = len(columns["label"])
    (Path(output_dir) / "README.md").write_text(
        f"# shapes\n\nProcedurally drawn RGB shapes ({', '.join(SHAPES)}) at {resolution} px on textured"
        f" backgrounds, written by `prepare_shapes.py` with seed {seed}: {json.dumps(counts)}.\n"
    )
    return counts
