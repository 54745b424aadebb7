"""The second built-in dataset: drawn shapes, deterministic from (seed, class, index)."""

import subprocess
import sys

import numpy as np
from datasets import load_dataset

from pu_diffusion.shapes import (
    GENERIC_CAPTION,
    HUES,
    SENSITIVE_SHAPES,
    SHAPES,
    TEXTURES,
    _shape_mask,
    describe,
    draw_described_shape,
    draw_shape,
    image_rng,
    write_shapes_dataset,
)
from tests.helpers import REPO_ROOT


def test_an_image_is_a_function_of_seed_class_and_index_only():
    first = np.asarray(draw_shape("star", 16, image_rng(3, 4, 7)))
    again = np.asarray(draw_shape("star", 16, image_rng(3, 4, 7)))
    other_seed = np.asarray(draw_shape("star", 16, image_rng(4, 4, 7)))
    other_index = np.asarray(draw_shape("star", 16, image_rng(3, 4, 8)))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed) and not np.array_equal(first, other_index)


def test_each_shape_has_its_own_outline():
    """With the same random draws (size, centre, rotation), the masks differ: a ring is a circle with a hole."""
    masks = {shape: np.asarray(_shape_mask(shape, 64, image_rng(0, 0, 0))[0], dtype=float) for shape in SHAPES}
    assert masks["ring"].sum() < 0.8 * masks["circle"].sum()
    assert np.all(masks["ring"] <= masks["circle"])  # the ring lies inside its circle
    for first in SHAPES:
        for second in SHAPES:
            if first < second:
                assert np.abs(masks[first] - masks[second]).sum() > 0.05 * masks[first].sum(), (first, second)


def test_written_dataset_has_labeled_rgb_splits_and_is_reproducible(tmp_path):
    counts = write_shapes_dataset(tmp_path / "a", resolution=16, images_per_class=10, test_fraction=0.2, seed=1)
    write_shapes_dataset(tmp_path / "b", resolution=16, images_per_class=10, test_fraction=0.2, seed=1)
    assert counts == {"train": 48, "test": 12}
    first, second = load_dataset(str(tmp_path / "a")), load_dataset(str(tmp_path / "b"))
    assert first["train"].features["label"].names == list(SHAPES)
    assert [first["test"]["label"].count(k) for k in range(len(SHAPES))] == [2] * len(SHAPES)
    image = first["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (16, 16)
    for row_a, row_b in zip(first["train"], second["train"], strict=True):
        assert row_a["label"] == row_b["label"]
        assert np.array_equal(np.asarray(row_a["image"]), np.asarray(row_b["image"]))
    # More images per class add images; the first ones stay the same.
    write_shapes_dataset(tmp_path / "c", resolution=16, images_per_class=15, test_fraction=0.2, seed=1)
    larger = load_dataset(str(tmp_path / "c"))
    assert np.array_equal(np.asarray(larger["test"][0]["image"]), np.asarray(first["test"][0]["image"]))
    assert set(SENSITIVE_SHAPES) < set(SHAPES)


def test_prepare_shapes_writes_the_requested_resolution(tmp_path):
    command = [sys.executable, "prepare_shapes.py", "--output_dir", str(tmp_path / "s"), "--resolution", "32"]
    result = subprocess.run(
        command + ["--images_per_class", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "'train': 12" in result.stdout and "'test': 6" in result.stdout
    assert load_dataset(str(tmp_path / "s"), split="train")[0]["image"].size == (32, 32)


def test_a_described_shape_is_the_same_image_and_its_caption_names_what_was_drawn():
    for class_id, shape in enumerate(SHAPES):
        image, attributes = draw_described_shape(shape, 16, image_rng(0, class_id, 5))
        assert np.array_equal(np.asarray(image), np.asarray(draw_shape(shape, 16, image_rng(0, class_id, 5))))
        assert attributes["shape"] == shape and attributes["size"] in ("small", "large")
        assert attributes["background"] in TEXTURES
        brightness, hue = attributes["colour"].split()
        assert brightness in ("bright", "dark") and hue in HUES
    captions = {describe(attributes, np.random.default_rng(seed)) for seed in range(40)}
    assert f"a photo of a {attributes['shape']}" in captions  # every attribute left out
    full = (
        f"a photo of a {attributes['size']} {attributes['colour']} {attributes['shape']} on {attributes['background']}"
    )
    assert full in captions and all(caption.startswith("a photo of a ") for caption in captions)


def test_captions_come_with_a_share_of_generic_ones_and_leave_the_images_unchanged(tmp_path):
    write_shapes_dataset(tmp_path / "plain", resolution=8, images_per_class=20, seed=2)
    write_shapes_dataset(tmp_path / "captioned", resolution=8, images_per_class=20, seed=2, generic_caption_share=0.5)
    plain, captioned = (
        load_dataset(str(tmp_path / "plain"), split="train"),
        load_dataset(str(tmp_path / "captioned"), split="train"),
    )
    assert "text" not in plain.column_names
    assert [np.asarray(image).tolist() for image in plain["image"]] == [
        np.asarray(image).tolist() for image in captioned["image"]
    ]
    generic = [caption == GENERIC_CAPTION for caption in captioned["text"]]
    assert 0.3 < sum(generic) / len(generic) < 0.7  # 96 draws at 1/2
    names = captioned.features["label"].names
    for caption, label, is_generic in zip(captioned["text"], captioned["label"], generic, strict=True):
        assert is_generic or f" {names[label]}" in caption
