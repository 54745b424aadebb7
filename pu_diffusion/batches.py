"""From loaded images to training batches: transforms, captions, the epoch shuffle and the endless S loader."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from pu_diffusion.errors import InputError
from pu_diffusion.image_files import entry_name, to_8bit
from pu_diffusion.training_data import derived_seed

#: --image_interpolation_mode: the Diffusers scripts' names (torchvision's) for PIL's resampling filters; PIL's
#: nearest is what torchvision calls nearest_exact.
INTERPOLATION_MODES = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}


class ImageTransform:
    """PIL image -> float tensor in [-1, 1] of shape (channels, height, width).

    The target is the ``resolution`` square, or a ``size`` (height, width)
    given per call (--aspect_ratio_buckets). Two stages: :meth:`prepare` is
    deterministic (convert to grayscale or RGB, dropping any alpha channel;
    resize with ``interpolation`` until the image just covers the target,
    enlarging smaller images) and can be cached; :meth:`augment` crops the
    centre or a random window and flips at random, with the random choices
    drawn from ``generator``.
    """

    def __init__(
        self,
        resolution: int,
        channels: int,
        center_crop: bool = False,
        random_flip: bool = False,
        interpolation: str = "bilinear",
    ):
        if channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, the model expects {channels}")
        self.resolution = resolution
        self.square = (resolution, resolution)
        self.mode = "L" if channels == 1 else "RGB"
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = INTERPOLATION_MODES[interpolation]

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None, size=None) -> torch.Tensor:
        return self.augment(self.prepare(image, size), generator, size)

    def prepare(self, image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 tensor (channels, height, width) that covers ``size`` (default: the square) with one side equal."""
        target_height, target_width = size or self.square
        image = to_8bit(image).convert(self.mode)
        width, height = image.size
        scale = max(target_height / height, target_width / width)
        if scale != 1.0:
            resized = (max(target_width, round(width * scale)), max(target_height, round(height * scale)))
            image = image.resize(resized, self.resample)
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def augment(self, prepared: torch.Tensor, generator: torch.Generator | None = None, size=None) -> torch.Tensor:
        return self.augment_with_crop(prepared, generator, size)[0]

    def augment_with_crop(self, prepared: torch.Tensor, generator: torch.Generator | None = None, size=None):
        """(pixels, (top, left)): the augmented image and where its window starts in the prepared image, as seen
        after the flip (SDXL's crop conditioning)."""
        top, left = self.crop_offset(prepared.shape[-2:], generator, size)
        flip = self.draw_flip(generator)
        seen_left = self.mirrored_left(prepared.shape[-1], left, size) if flip else left
        return self.to_pixels(self.window(prepared, top, left, size), flip), (top, seen_left)

    def mirrored_left(self, width: int, left: int, size: tuple[int, int] | None = None) -> int:
        """The left edge of a window once the image is mirrored."""
        return width - left - (size or self.square)[1]

    def draw_flip(self, generator: torch.Generator | None) -> bool:
        """Whether this access mirrors the image (drawn after the crop; cached latents draw it the same way)."""
        return self.random_flip and bool(torch.rand((), generator=generator) < 0.5)

    @staticmethod
    def to_pixels(cropped: torch.Tensor, flip: bool) -> torch.Tensor:
        """uint8 (channels, height, width) -> floats in [-1, 1], mirrored if ``flip``."""
        tensor = cropped.float()
        if flip:
            tensor = tensor.flip(-1)
        return tensor / 127.5 - 1.0

    def crop_offset(self, image_size, generator: torch.Generator | None = None, size=None) -> tuple[int, int]:
        """(top, left) of the centre (--center_crop; ``generator`` is not used) or of a random window of
        ``size`` (default: the square) in an image of ``image_size``."""
        height, width = image_size
        target_height, target_width = size or self.square
        if self.center_crop:
            return (height - target_height) // 2, (width - target_width) // 2
        top = int(torch.randint(0, height - target_height + 1, (), generator=generator))
        left = int(torch.randint(0, width - target_width + 1, (), generator=generator))
        return top, left

    def window(self, tensor: torch.Tensor, top: int, left: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The window of ``size`` (default: the square) of ``tensor`` whose top-left corner is (top, left)."""
        height, width = size or self.square
        return tensor[:, top : top + height, left : left + width]


#: Datasets whose prepared (decoded and resized) images fit in this many bytes are kept in memory.
PRELOAD_BUDGET_BYTES = 2**30


class TransformedImages(torch.utils.data.Dataset):
    """A torch view of one image column of a ``datasets.Dataset``, transformed on access.

    Keys are ``(index, epoch)`` pairs from :class:`EpochShuffle` (a plain
    index means epoch 0). The augmentation of an image is seeded by
    ``(seed, epoch, index)``, so it does not depend on what was loaded before:
    a resumed run, or a data-loader worker, draws the same crop and flip.
    ``target_sizes`` gives each image its own (height, width), its
    aspect-ratio bucket (buckets.py); without it every image is the
    transform's square.

    Small datasets are decoded and resized once, up front, when their size
    estimate fits ``PRELOAD_BUDGET_BYTES``: decoding a PNG per access
    otherwise costs more than a training step of a small model.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        transform: ImageTransform,
        seed: int = 0,
        source: str = "",
        target_sizes: list[tuple[int, int]] | None = None,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.source = source
        self.target_sizes = target_sizes
        channels = 1 if transform.mode == "L" else 3
        self.original_sizes: dict[int, tuple[int, int]] = {}  # (height, width) before resizing, once decoded
        self.prepared = None
        pixels = sum(height * width for height, width in map(self.target_size, range(len(dataset))))
        if channels * pixels <= PRELOAD_BUDGET_BYTES:
            self.prepared = [self._prepare(index) for index in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> torch.Tensor:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.augmented(index, epoch)[0]

    def target_size(self, index: int) -> tuple[int, int]:
        """(height, width) that image ``index`` is trained at."""
        return self.target_sizes[index] if self.target_sizes is not None else self.transform.square

    def augmented(self, index: int, epoch: int):
        """(pixels, crop top-left) of image ``index`` in ``epoch``: :meth:`ImageTransform.augment_with_crop`."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index))
        return self.transform.augment_with_crop(self.prepared_image(index), generator, self.target_size(index))

    def prepared_image(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded and resized (:meth:`ImageTransform.prepare`), before any augmentation."""
        return self.prepared[index] if self.prepared is not None else self._prepare(index)

    def _prepare(self, index: int) -> torch.Tensor:
        try:
            image = self.dataset[index][self.image_column]
        except Exception as error:  # PIL raises many types for a truncated or corrupt file
            from datasets import Image as ImageFeature

            entry = self.dataset.cast_column(self.image_column, ImageFeature(decode=False))[index][self.image_column]
            raise InputError(f"{self.source}: {entry_name(entry, index)} cannot be decoded: {error}") from error
        self.original_sizes[index] = (image.height, image.width)
        return self.transform.prepare(image, self.target_size(index))


def read_captions(dataset, column: str | None, prompt: str | None, flag: str) -> list:
    """One caption per image: the ``column`` cells (a string, or a list to pick from), or ``prompt`` for all."""
    if prompt is not None:
        return [prompt] * len(dataset)
    captions = list(dataset[column])
    for index, caption in enumerate(captions):
        is_list = isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption)
        if not (isinstance(caption, str) or is_list):
            raise InputError(
                f"{flag} {column}: row {index} holds {caption!r}; captions must be strings or lists of strings"
            )
    return captions


class CaptionedImages(TransformedImages):
    """Images with their tokenized captions, as ``{"pixel_values", "input_ids"}`` plus whatever else
    ``tokenize`` returns as a dict (SDXL: ``input_ids_2``), and with ``micro_conditioning`` SDXL's
    ``time_ids``: original size, crop top-left, target size.

    Where a caption cell holds several captions, one is picked per access,
    seeded by ``(seed, epoch, index)`` like the augmentation; with
    ``caption_dropout_rate`` that share of accesses, drawn the same way, gets
    the empty caption instead.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        transform: ImageTransform,
        captions: list,
        tokenize,
        micro_conditioning: bool = False,
        caption_dropout_rate: float = 0.0,
        **kwargs,
    ):
        super().__init__(dataset, image_column, transform, **kwargs)
        self.captions = captions
        self.tokenize = tokenize
        self.micro_conditioning = micro_conditioning
        self.caption_dropout_rate = caption_dropout_rate

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        pixels, crop_top_left = self.augmented(index, epoch)
        return {"pixel_values": pixels, **self.conditioning(index, epoch, crop_top_left)}

    def conditioning(self, index: int, epoch: int, crop_top_left: tuple[int, int]) -> dict:
        """The caption's tokens, and SDXL's time ids when asked for."""
        tokens = self.caption_tokens(index, epoch)
        if self.micro_conditioning:
            original, target = self.original_sizes[index], self.target_size(index)
            tokens["time_ids"] = torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)
        return tokens

    def caption_tokens(self, index: int, epoch: int) -> dict:
        """The tokenized caption of image ``index`` in ``epoch`` (one of several, drawn per epoch, or the empty
        caption at the dropout rate)."""
        caption = self.captions[index]
        if not isinstance(caption, str) or self.caption_dropout_rate:  # a draw: seed a generator only then
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index, 1))
            if not isinstance(caption, str):
                caption = caption[int(torch.randint(0, len(caption), (), generator=generator))]
            if float(torch.rand((), generator=generator)) < self.caption_dropout_rate:
                caption = ""
        tokens = self.tokenize(caption)
        return dict(tokens) if isinstance(tokens, dict) else {"input_ids": tokens}


class EpochShuffle(torch.utils.data.Sampler):
    """A shuffle that is a pure function of ``(seed, epoch)``, yielding ``(index, epoch)`` keys.

    Call :meth:`use_epoch` before each pass. The method is deliberately not
    called ``set_epoch``: Accelerate calls that with its own pass counter,
    which restarts at 0 after a resume.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        epoch, order, _ = self.draw()
        for index in order:
            yield index, epoch

    def draw(self) -> tuple[int, list[int], torch.Generator]:
        """(the epoch, its shuffled indices, the generator they came from, for any further draw of the epoch)."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return self.epoch, torch.randperm(self.size, generator=generator).tolist(), generator


#: The fewest S images a step gets by default. One or two S images a step make the negative risk's estimate
#: too noisy: on the text-to-image benchmark with 240 U images (default S batch 1), pu's rate was 0.825 over
#: three seeds, and 0.956 with 4 (docs/benchmark.md).
MIN_DEFAULT_SENSITIVE_BATCH = 4


def default_sensitive_batch_size(train_batch_size: int, num_unlabeled: int, num_sensitive: int) -> int:
    """S images per step that one loader over U and S mixed would give, on average, per U batch; at least 4.

    The floor never exceeds the U batch (a run at batch 1 keeps one S image a step) or S itself.
    """
    proportional = round(train_batch_size * num_sensitive / num_unlabeled)
    floor = min(MIN_DEFAULT_SENSITIVE_BATCH, train_batch_size, num_sensitive)
    return max(1, proportional, floor)


def endless(dataloader, sampler: EpochShuffle, start_batch: int = 0, skip_first_batches=None) -> Iterator:
    """Yield batches forever, pass after pass, each pass shuffled by ``sampler`` for its pass number.

    S is much smaller than U, so its stream cycles on its own. ``start_batch``
    batches are skipped first (a resumed run starts where the interrupted one
    stopped); ``skip_first_batches(loader, n)`` skips without loading, for
    example ``accelerator.skip_first_batches``.
    """
    pass_index, offset = divmod(start_batch, len(dataloader))
    while True:
        sampler.use_epoch(pass_index)
        if offset and skip_first_batches is not None:
            yield from skip_first_batches(dataloader, offset)
        else:
            yield from itertools.islice(dataloader, offset, None)
        pass_index, offset = pass_index + 1, 0
