"""--cache_latents: U and S go through the frozen VAE once, before training, instead of at every step.

What is kept per image is the VAE's latent distribution (its mean and log
variance, ``latent_dist.parameters``), not one sample of it: each step still
draws its latent with the step's generator, so a run with the cache follows
the run without it (to float rounding of the batched encoding). With
--random_flip the mirror image is encoded too and each access draws the flip
as :class:`batches.ImageTransform` does. Without --center_crop each image
keeps one random window, drawn once from the dataset's seed and the image's
index (so the same on every process and on a resume), as Diffusers' own
scripts do when they cache latents; the crop is then no longer redrawn per
epoch, and the log says so.

S is drawn again at every step, so for PU training the cache saves more VAE
passes than for plain fine-tuning: without it, each step encodes its S batch
as well as its U batch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from pu_diffusion.batches import CaptionedImages
from pu_diffusion.buckets import group_by_bucket
from pu_diffusion.training_data import derived_seed

logger = logging.getLogger(__name__)

#: The cache stays in memory while it takes at most this share of the memory available when it is made.
MEMORY_SHARE = 0.5


def available_memory_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def allocate(shape: tuple[int, ...], dtype: torch.dtype, folder: str, name: str, memory_budget: int | None = None):
    """An empty tensor for the cache: in memory if it fits ``memory_budget`` (default: half the available
    memory), else a file in a new ``.tmp-latent-cache-*`` folder of ``folder`` that is deleted with it."""
    numel = int(torch.Size(shape).numel())
    size = numel * torch.empty((), dtype=dtype).element_size()
    budget = int(available_memory_bytes() * MEMORY_SHARE) if memory_budget is None else memory_budget
    if size <= budget:
        logger.info("--cache_latents: %s latents in memory (%.1f MB)", name, size / 2**20)
        return torch.empty(shape, dtype=dtype)
    cache_dir = tempfile.mkdtemp(prefix=".tmp-latent-cache-", dir=folder)
    logger.info("--cache_latents: %s latents on disk in %s (%.1f MB)", name, cache_dir, size / 2**20)
    storage = torch.from_file(os.path.join(cache_dir, f"{name}.bin"), shared=True, size=numel, dtype=dtype)
    tensor = storage.view(shape)
    weakref.finalize(tensor, shutil.rmtree, cache_dir, ignore_errors=True)
    return tensor


class CachedLatents(torch.utils.data.Dataset):
    """A :class:`batches.CaptionedImages` whose images are replaced by their VAE latent distributions.

    Items are ``{"latent_parameters"}`` plus what the images' item holds besides
    its pixels (``input_ids``, and for SDXL ``input_ids_2`` and ``time_ids``);
    keys are ``(index, epoch)`` as for the images. ``encode(pixels)`` maps a
    batch of pixel values in [-1, 1] to ``latent_dist.parameters``. With
    aspect-ratio buckets each bucket is encoded, and kept, as its own tensor.
    """

    def __init__(
        self,
        images: CaptionedImages,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int,
        folder: str,
        show_progress: bool = True,
        memory_budget: int | None = None,
    ):
        if not images.transform.center_crop:
            logger.info("--cache_latents without --center_crop: one random crop per image of %s, kept", images.source)
        self.images = images
        self.flips = (False, True) if images.transform.random_flip else (False,)
        self.parameters: dict[tuple[int, int], torch.Tensor] = {}  # per bucket: (images, flips, *latent shape)
        self.rows: list[tuple[tuple[int, int], int] | None] = [None] * len(images)  # per image: (bucket, row)
        self.crop_top_left: list[tuple] = [None] * len(images)  # per image: the window's (top, left) per flip
        progress = tqdm(
            total=len(images) * len(self.flips), desc=f"encoding {images.source or 'images'}", disable=not show_progress
        )
        every = range(len(images))
        by_bucket = group_by_bucket([images.target_size(index) for index in every], every)
        for bucket, indices in by_bucket.items():
            name = images.source or "images"
            name = name if len(by_bucket) == 1 else f"{name}-{bucket[0]}x{bucket[1]}"
            for start in range(0, len(indices), batch_size):
                batch = indices[start : start + batch_size]
                encoded = self.encode_batch(encode, batch, bucket)
                if bucket not in self.parameters:
                    shape = (len(indices), *encoded.shape[1:])
                    self.parameters[bucket] = allocate(shape, encoded.dtype, folder, name, memory_budget)
                self.parameters[bucket][start : start + len(batch)] = encoded
                progress.update(len(batch) * len(self.flips))
            for row, index in enumerate(indices):
                self.rows[index] = (bucket, row)
        progress.close()

    def encode_batch(self, encode, indices: list[int], bucket: tuple[int, int]) -> torch.Tensor:
        """(images, flips, *latent shape): ``indices`` (one bucket) cropped once each and encoded, and with
        --random_flip their mirror images too; their crops are kept for SDXL's conditioning."""
        transform = self.images.transform
        cropped = []
        for index in indices:
            image = self.images.prepared_image(index)
            top, left = transform.crop_offset(image.shape[-2:], self.crop_generator(index), bucket)
            cropped.append(transform.window(image, top, left, bucket))
            mirrored = (top, transform.mirrored_left(image.shape[-1], left, bucket))
            self.crop_top_left[index] = ((top, left), mirrored)
        return torch.stack(
            [encode(torch.stack([transform.to_pixels(image, flip) for image in cropped])).cpu() for flip in self.flips],
            dim=1,
        )

    def crop_generator(self, index: int) -> torch.Generator:
        """Where image ``index``'s fixed random crop is drawn from: its seed has no epoch, unlike the per-access
        draws, so it is the same in every epoch, process and resume."""
        return torch.Generator().manual_seed(derived_seed(self.images.seed, index))

    @property
    def target_sizes(self) -> list[tuple[int, int]] | None:
        return self.images.target_sizes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        # The same generator and draws as CaptionedImages: a centre crop draws nothing, then the flip.
        generator = torch.Generator().manual_seed(derived_seed(self.images.seed, epoch, index))
        flipped = self.images.transform.draw_flip(generator)
        conditioning = self.images.conditioning(index, epoch, self.crop_top_left[index][int(flipped)])
        bucket, row = self.rows[index]
        return {"latent_parameters": self.parameters[bucket][row, int(flipped)], **conditioning}
