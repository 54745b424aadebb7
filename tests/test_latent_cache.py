"""latent_cache: what --cache_latents keeps, in memory or on disk, and the flips it draws."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pu_diffusion.batches import CaptionedImages, ImageTransform
from pu_diffusion.latent_cache import CachedLatents
from pu_diffusion.training_data import derived_seed


def captioned_images(random_flip: bool, width: int = 8, center_crop: bool = True) -> CaptionedImages:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, width, 3), dtype=np.uint8)) for _ in range(5)]
    dataset = datasets.Dataset.from_dict({"image": images})
    transform = ImageTransform(8, 3, center_crop=center_crop, random_flip=random_flip)
    return CaptionedImages(
        dataset, "image", transform, ["a", "b", "c", "d", "e"], lambda caption: torch.tensor([ord(caption)]), seed=3
    )


def encode(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in for the VAE: mean = the pixels, log variance = their negation (2 x 3 channels)."""
    return torch.cat([pixels, -pixels], dim=1)


@pytest.mark.parametrize("memory_budget", [None, 0], ids=["in memory", "on disk"])
def test_cached_items_are_the_encoded_images_with_the_same_flips_and_captions(memory_budget, tmp_path):
    images = captioned_images(random_flip=True)
    cached = CachedLatents(
        images, encode, batch_size=2, folder=str(tmp_path), show_progress=False, memory_budget=memory_budget
    )
    on_disk = list(tmp_path.glob(".tmp-latent-cache-*"))
    assert len(on_disk) == (1 if memory_budget == 0 else 0)
    flips = set()
    for epoch in range(4):
        for index in range(len(images)):
            item, original = cached[(index, epoch)], images[(index, epoch)]
            assert torch.equal(item["latent_parameters"], encode(original["pixel_values"][None])[0])
            assert torch.equal(item["input_ids"], original["input_ids"])
            generator = torch.Generator().manual_seed(derived_seed(3, epoch, index))
            flips.add(images.transform.draw_flip(generator))
    assert flips == {False, True}  # both orientations were served from the cache
    del cached
    assert not any(path.exists() for path in on_disk)  # the disk cache goes with the dataset


def test_without_center_crop_each_image_keeps_one_seeded_random_crop(tmp_path, caplog):
    """8 x 16 px images, 8 px windows: the cache holds one random window per image, the same in every epoch and
    in a second cache built from the same seed (another process, or a resume)."""
    images = captioned_images(random_flip=False, width=16, center_crop=False)
    with caplog.at_level("INFO", logger="pu_diffusion.latent_cache"):
        cached = CachedLatents(images, encode, batch_size=2, folder=str(tmp_path), show_progress=False)
    assert "one random crop per image" in caplog.text
    again = CachedLatents(images, encode, batch_size=3, folder=str(tmp_path), show_progress=False)
    assert list(cached.parameters) == list(again.parameters) == [(8, 8)]  # one bucket: the square
    assert torch.equal(cached.parameters[(8, 8)], again.parameters[(8, 8)])
    offsets = set()
    for index in range(len(images)):
        prepared = images.prepared_image(index)
        top, left = images.transform.crop_offset(
            prepared.shape[-2:], torch.Generator().manual_seed(derived_seed(3, index))
        )
        window = images.transform.to_pixels(images.transform.window(prepared, top, left), flip=False)
        for epoch in range(3):
            assert torch.equal(cached[(index, epoch)]["latent_parameters"], encode(window[None])[0])
        offsets.add((top, left))
    assert len(offsets) > 1  # random windows, not the centre (0, 4) for every image
