"""image_files: bit depths, the start-up decode check, the channel count, files an image folder leaves out."""

import numpy as np
import pytest
from PIL import Image

from pu_diffusion.batches import ImageTransform
from pu_diffusion.image_files import check_images, image_channels, to_8bit
from pu_diffusion.training_data import load_image_dataset
from tests.helpers import write_image_folder


@pytest.mark.parametrize(
    ("mode", "stored", "expected"),
    [("I;16", 32896, 128), ("I;16", 65535, 255), ("I", 257 * 10, 10), ("F", 0.5, 128), ("L", 77, 77)],
)
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode, stored, expected):
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32, "L": np.uint8}[mode]
    image = Image.fromarray(np.full((8, 8), stored, dtype=dtype))
    if mode == "I;16":  # through a real 16-bit PNG, as a folder of scans would hold it
        image.save(tmp_path / "scan.png")
        image = Image.open(tmp_path / "scan.png")
    assert image.mode == mode
    assert to_8bit(image).mode == "L" and np.asarray(to_8bit(image)).max() == expected
    prepared = ImageTransform(8, channels=1).prepare(image)
    assert prepared.unique().tolist() == [expected]
    assert ImageTransform(8, channels=3).prepare(image).shape == (3, 8, 8)


def test_the_start_up_check_finds_truncated_files_and_names_them(tmp_path, caplog):
    folder = write_image_folder(tmp_path / "u", 4, size=32, mode="RGB")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    whole = (tmp_path / "x.jpg").read_bytes()
    (folder / "000-cut.jpg").write_bytes(whole[: len(whole) // 2])  # sorts first
    png = (folder / "001.png").read_bytes()
    (folder / "002-header-only.png").write_bytes(png[:33])  # signature and IHDR, no pixels
    dataset = load_image_dataset(None, str(folder), name_flag="--dataset_name", dir_flag="--train_data_dir")
    with Image.open(folder / "000-cut.jpg") as cut:
        cut.verify()  # what the old check ran: it passes
    with caplog.at_level("WARNING"):
        checked = check_images(dataset, "image", 8, "--train_data_dir u")
    assert len(checked) == 4
    assert "skipping 2 unreadable image(s)" in caplog.text
    assert "000-cut.jpg" in caplog.text and "002-header-only.png" in caplog.text
    assert image_channels([(checked, "U")], "image") == 3  # the header probe no longer meets the cut file


def test_channels_are_decided_by_all_images_and_the_odd_ones_named(tmp_path, caplog):
    folder = write_image_folder(tmp_path / "u", 5, mode="RGB", seed=1)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "000-gray.png")  # sorts first
    dataset = load_image_dataset(None, str(folder), name_flag="--dataset_name", dir_flag="--train_data_dir")
    assert dataset[0]["image"].mode == "L"
    with caplog.at_level("WARNING"):
        assert image_channels([(dataset, "U")], "image") == 3
    assert "1 of 6 images are grayscale" in caplog.text and "000-gray.png" in caplog.text
    gray_only = write_image_folder(tmp_path / "g", 3)
    loaded = load_image_dataset(None, str(gray_only), name_flag="--dataset_name", dir_flag="--train_data_dir")
    assert image_channels([(loaded, "U"), (dataset.select([0]), "S")], "image") == 1


def test_image_files_left_out_by_the_folder_loader_are_named(tmp_path, caplog):
    import json
    import os

    folder = write_image_folder(tmp_path / "u", 3)
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    rows = [{"file_name": f"{index:03d}.png", "text": "a digit"} for index in (0, 1)]  # none for 002.png
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level("WARNING"):
        dataset = load_image_dataset(None, str(folder), name_flag="--dataset_name", dir_flag="--train_data_dir")
    assert len(dataset) == 2
    assert "--train_data_dir" in caplog.text and "2 image file(s) are left out" in caplog.text
    assert "1 broken link(s), e.g." in caplog.text and "link.png" in caplog.text
    assert "1 with no row in the metadata file, e.g." in caplog.text and "002.png" in caplog.text
