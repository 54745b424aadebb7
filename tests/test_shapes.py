"""The second built-in dataset: drawn shapes, deterministic from (seed, class, index)."""

import subprocess
import sys

import numpy as np
from datasets import load_dataset

from pu_diffusion.shapes import SENSITIVE_SHAPES, SHAPES, _shape_mask, draw_shape, image_rng, write_shapes_dataset
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
    masks = {shape: np.asarray(_shape_mask(shape, 64, image_rng(0, 0, 0)), dtype=float) for shape in SHAPES}
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
