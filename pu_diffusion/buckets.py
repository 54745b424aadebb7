"""--aspect_ratio_buckets: photos of mixed shapes trained near their own aspect ratio instead of all cropped square.

The flag takes the syntax of Diffusers' newest training scripts,
"h1,w1;h2,w2;...". Each image goes to the bucket whose aspect ratio is
nearest its own (on a log scale, so 2:1 and 1:2 are equally far from
square), read from the file's header before training. It is then resized
until it just covers its bucket and cropped to it, at the centre or at
random as --center_crop says, so --resolution no longer sets the training
size. A batch holds one bucket, since a batch is one tensor.

U and S are bucketed alike: the same list and the same rule. A U batch and
the S batch beside it may then come from different buckets; the training
step gives each its own UNet forward, since the risk only needs each
image's loss. The losses of Eq. (8) are sums over the latent, so a larger
bucket has larger per-image losses, as the ELBO of a larger image is larger.
"""

from __future__ import annotations

import argparse
import io
import math
from collections import Counter
from dataclasses import dataclass

import torch
from PIL import Image

from pu_diffusion.batches import EpochShuffle
from pu_diffusion.errors import InputError
from pu_diffusion.image_files import entry_name

FLAG = "--aspect_ratio_buckets"
EXIF_ORIENTATION = 0x0112
EXAMPLE = "write for example '512,512;384,640;640,384'"


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """'h1,w1;h2,w2' -> [(h1, w1), (h2, w2)]; an argparse ``type``, so its errors name the flag."""
    buckets = []
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        sides = entry.split(",")
        if len(sides) != 2 or not all(side.strip().isdigit() and int(side) > 0 for side in sides):
            raise argparse.ArgumentTypeError(f"{entry!r} is not HEIGHT,WIDTH in pixels; {EXAMPLE}")
        buckets.append((int(sides[0]), int(sides[1])))
    if not buckets:
        raise argparse.ArgumentTypeError(f"no bucket given; {EXAMPLE}")
    if len(set(buckets)) != len(buckets):
        raise argparse.ArgumentTypeError(f"a bucket is listed twice in {text!r}")
    return buckets


def check_divisible(buckets: list[tuple[int, int]], factor: int) -> None:
    """Each side must map to whole latent pixels: a multiple of the VAE's downsampling ``factor``."""
    uneven = [f"{height},{width}" for height, width in buckets if height % factor or width % factor]
    if uneven:
        raise InputError(
            f"{FLAG}: {'; '.join(uneven)} not a multiple of {factor}, the VAE's downsampling factor of"
            " this base; round each side to a multiple of it"
        )


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest height / width on a log scale (the first of a tie)."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - ratio))


def image_sizes(dataset, column: str, source: str) -> list[tuple[int, int]]:
    """(height, width) of every image as it will be decoded, read from the files' headers without decoding the
    pixels."""
    from datasets import Image as ImageFeature

    if not isinstance(dataset.features.get(column), ImageFeature):
        return [(image.height, image.width) for image in dataset[column]]
    sizes = []
    undecoded = dataset.cast_column(column, ImageFeature(decode=False))
    for batch in undecoded.iter(batch_size=1000):
        for entry in batch[column]:
            file = io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"]
            try:
                with Image.open(file) as image:
                    width, height = image.size
                    # datasets turns photos upright by their EXIF orientation when it decodes them; 5 to 8 are
                    # the quarter turns, which swap the sides.
                    if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                        width, height = height, width
            except Exception as error:  # PIL raises many types for a corrupt file
                raise InputError(f"{source}: {entry_name(entry, len(sizes))} cannot be read: {error}") from error
            sizes.append((height, width))
    return sizes


@dataclass(frozen=True)
class Bucketing:
    """Each image's bucket, (height, width), per source ("U", and "S" when there is one)."""

    target_sizes: dict[str, list[tuple[int, int]]]

    @classmethod
    def of(cls, buckets, vae_scale_factor: int, datasets: dict, column: str) -> Bucketing:
        check_divisible(buckets, vae_scale_factor)
        return cls(
            {
                source: [nearest_bucket(*size, buckets) for size in image_sizes(dataset, column, source)]
                for source, dataset in datasets.items()
                if dataset is not None
            }
        )

    def num_batches(self, source: str, batch_size: int) -> int:
        return count_batches(self.target_sizes[source], batch_size)

    def describe(self) -> str:
        """Images per bucket and source, for the log: 'U: 512x512 40, 384x640 12; S: 512x512 9'."""
        return "; ".join(
            f"{source}: " + ", ".join(f"{height}x{width} {count}" for (height, width), count in Counter(sizes).items())
            for source, sizes in self.target_sizes.items()
        )


def count_batches(target_sizes: list[tuple[int, int]], batch_size: int) -> int:
    """Batches per epoch when each bucket is cut into ``batch_size`` batches, its last one possibly short."""
    return sum(math.ceil(count / batch_size) for count in Counter(target_sizes).values())


def group_by_bucket(target_sizes: list, order) -> dict[tuple[int, int], list[int]]:
    """The indices of ``order`` per bucket, each list in ``order``'s order, the buckets in the order first met."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in order:
        by_bucket.setdefault(target_sizes[index], []).append(index)
    return by_bucket


def bucket_batches(target_sizes: list, batch_size: int, order: list[int]) -> list[list[int]]:
    """``order`` cut into batches of one bucket each: per bucket, its images in ``order``, ``batch_size`` at a
    time (the last batch of a bucket may be short)."""
    return [
        indices[start : start + batch_size]
        for indices in group_by_bucket(target_sizes, order).values()
        for start in range(0, len(indices), batch_size)
    ]


class BucketBatches(EpochShuffle):
    """A batch sampler whose batches each hold one bucket, yielding lists of ``(index, epoch)`` keys.

    The epoch's shuffle of :class:`batches.EpochShuffle`, a pure function of
    ``(seed, epoch)``, cut into batches per bucket; then the batches are
    shuffled with the same generator, so a resumed run replays the same
    batches. It has no ``batch_size`` attribute on purpose: Accelerate then
    shards whole batches of any length across processes instead of refilling
    short ones from other buckets.
    """

    def __init__(self, target_sizes: list[tuple[int, int]], batch_size: int, seed: int):
        super().__init__(len(target_sizes), seed)
        self.target_sizes = target_sizes
        self.size_of_batch = batch_size

    def __len__(self) -> int:
        return count_batches(self.target_sizes, self.size_of_batch)

    def __iter__(self):
        epoch, order, generator = self.draw()
        batches = bucket_batches(self.target_sizes, self.size_of_batch, order)
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield [(index, epoch) for index in batches[position]]
