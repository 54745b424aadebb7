"""latent_cache: what --cache_latents keeps, in memory or on disk, and the flips it draws."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pu_diffusion.batches import CaptionedImages, ImageTransform
from pu_diffusion.latent_cache import CachedLatents
from pu_diffusion.training_data import derived_seed


def captioned_images(random_flip: bool) -> CaptionedImages:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(5)]
    dataset = datasets.Dataset.from_dict({"image": images})
    transform = ImageTransform(8, 3, center_crop=True, random_flip=random_flip)
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


def test_a_random_crop_cannot_be_cached(tmp_path):
    images = captioned_images(random_flip=False)
    images.transform.center_crop = False
    with pytest.raises(ValueError, match="--center_crop"):
        CachedLatents(images, encode, batch_size=2, folder=str(tmp_path), show_progress=False)
