"""Unlabeled (U) and labeled sensitive (S) training data for PU diffusion.

U and S come either from two sources (a Hub dataset, a local dataset folder or
an image folder each), or from one labeled dataset split the way the paper
does (its Table 1): disjoint random draws of normal and sensitive images into
U, and of further sensitive images into S. The test split's normal images,
obtained the same way, are the reference set for evaluation.

Transforms use PIL, NumPy and torch only (torchvision is not required).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pu_errors import InputError, read_json
from pu_images import check_images, entry_name, to_8bit, warn_about_left_out_files

logger = logging.getLogger(__name__)

#: Table 1 of the paper: U holds 10 normal images for each sensitive one.
PAPER_NORMAL_PER_SENSITIVE = 10


# --------------------------------------------------------------------------- loading


def _is_saved_to_disk(path: Path) -> bool:
    """True for a folder written by ``Dataset(Dict).save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_image_dataset(
    dataset_name: str | None,
    data_dir: str | None,
    *,
    name_flag: str,
    dir_flag: str,
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
):
    """Load one split of a dataset from the Hub, a local dataset folder, or an image folder.

    ``dataset_name`` wins over ``data_dir``, as in the official examples. The
    flag names are only used in error messages.
    """
    import datasets

    if dataset_name is not None:
        local = Path(dataset_name)
        try:
            if local.is_dir() and _is_saved_to_disk(local):
                loaded = datasets.load_from_disk(str(local))
                if isinstance(loaded, datasets.DatasetDict):
                    if split not in loaded:
                        raise InputError(f"{name_flag} {dataset_name}: no split {split!r} (has {list(loaded)})")
                    loaded = loaded[split]
                dataset = loaded
            else:
                dataset = datasets.load_dataset(dataset_name, config_name, cache_dir=cache_dir, split=split)
        except InputError:
            raise
        except Exception as error:  # datasets raises many types; all mean "cannot load this"
            raise InputError(f"{name_flag} {dataset_name}: could not load split {split!r}: {error}") from error
        source = f"{name_flag} {dataset_name}"
    else:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise InputError(f"{dir_flag} {data_dir}: no such folder")
        if not any(p.is_file() for p in folder.rglob("*")):
            raise InputError(f"{dir_flag} {data_dir}: the folder holds no files")
        try:
            dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir, split="train")
        except Exception as error:
            raise InputError(f"{dir_flag} {data_dir}: could not read it as an image folder: {error}") from error
        source = f"{dir_flag} {data_dir}"
        warn_about_left_out_files(folder, dataset, source)
    if len(dataset) == 0:
        raise InputError(f"{source}: the dataset is empty")
    return dataset


def require_column(dataset, column: str, flag: str, source: str) -> None:
    if column not in dataset.column_names:
        raise InputError(f"{flag} {column!r}: no such column in {source} (columns: {dataset.column_names})")


# --------------------------------------------------------------------------- label split (paper, Table 1)


def resolve_label_values(dataset, label_column: str, labels: Sequence[str], flag: str = "--sensitive_labels") -> set:
    """Map the user's label strings to the values stored in ``label_column``.

    A ``ClassLabel`` column accepts class names or integer ids; any other
    column is matched on ``str(value)`` or, for numbers, on the number (so
    "1" finds 1.0). Every label must occur in the data; the error lists the
    values that do.
    """
    from datasets import ClassLabel

    feature = dataset.features[label_column]
    present = {value for value in dataset.unique(label_column) if not _is_missing_label(value, feature)}
    resolved = set()
    for label in labels:
        if isinstance(feature, ClassLabel) and label in feature.names:
            value = feature.str2int(label)
        else:
            matches = [v for v in present if str(v) == str(label) or _same_number(v, label)]
            value = matches[0] if matches else None
        if value is None or value not in present:
            shown = sorted(present, key=str)
            if isinstance(feature, ClassLabel):
                shown = [f"{feature.int2str(v)} (id {v})" for v in sorted(present)]
            raise InputError(
                f"{flag}: label {label!r} does not occur in column {label_column!r}; its values are"
                f" {', '.join(map(str, shown[:20]))}{' ...' if len(shown) > 20 else ''}"
            )
        resolved.add(value)
    return resolved


def _same_number(value, label: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        return float(label) == float(value)
    except ValueError:
        return False


def _is_missing_label(value, feature) -> bool:
    """None, or ClassLabel's -1 (how datasets stores a missing class)."""
    from datasets import ClassLabel

    return value is None or (isinstance(feature, ClassLabel) and value == -1)


def drop_unlabeled_rows(dataset, label_column: str, source: str):
    """Rows without a label are neither normal nor sensitive: they are left out of the split, with a warning."""
    feature = dataset.features[label_column]
    missing = [index for index, value in enumerate(dataset[label_column]) if _is_missing_label(value, feature)]
    if not missing:
        return dataset
    missing_set = set(missing)
    logger.warning(
        "%s: %d row(s) have no --label_column %r value (e.g. rows %s) and are left out of U and S",
        source,
        len(missing),
        label_column,
        ", ".join(map(str, missing[:3])),
    )
    return dataset.select([index for index in range(len(dataset)) if index not in missing_set])


@dataclass
class LabelSplit:
    """Row indices of the three disjoint draws from one labeled dataset."""

    unlabeled_normal: np.ndarray
    unlabeled_sensitive: np.ndarray
    labeled_sensitive: np.ndarray

    @property
    def unlabeled(self) -> np.ndarray:
        return np.concatenate([self.unlabeled_normal, self.unlabeled_sensitive])


def split_by_label(
    is_sensitive: np.ndarray,
    num_unlabeled_normal: int | None = None,
    num_unlabeled_sensitive: int | None = None,
    num_labeled_sensitive: int | None = None,
    seed: int | None = None,
) -> LabelSplit:
    """Draw U (normal + sensitive) and S from one labeled dataset, disjointly.

    Defaults follow Table 1 of the paper: U takes every normal image, then one
    sensitive image for each ``PAPER_NORMAL_PER_SENSITIVE`` normal ones, and S
    as many sensitive images again. The draw is reproducible with ``seed``.
    """
    is_sensitive = np.asarray(is_sensitive, dtype=bool)
    normal_pool = np.flatnonzero(~is_sensitive)
    sensitive_pool = np.flatnonzero(is_sensitive)
    if num_unlabeled_normal is None:
        num_unlabeled_normal = len(normal_pool)
    if num_unlabeled_sensitive is None:
        num_unlabeled_sensitive = num_unlabeled_normal // PAPER_NORMAL_PER_SENSITIVE
    if num_labeled_sensitive is None:
        num_labeled_sensitive = num_unlabeled_sensitive
    for flag, value in (
        ("--num_unlabeled_normal", num_unlabeled_normal),
        ("--num_unlabeled_sensitive", num_unlabeled_sensitive),
        ("--num_labeled_sensitive", num_labeled_sensitive),
    ):
        if value < 0:
            raise InputError(f"{flag} must be >= 0, got {value}")
    if num_unlabeled_normal + num_unlabeled_sensitive == 0:
        raise InputError("--num_unlabeled_normal and --num_unlabeled_sensitive: U would be empty")
    if num_unlabeled_normal > len(normal_pool):
        raise InputError(f"--num_unlabeled_normal {num_unlabeled_normal}: the data has only {len(normal_pool)} normal")
    if num_unlabeled_sensitive + num_labeled_sensitive > len(sensitive_pool):
        raise InputError(
            f"--num_unlabeled_sensitive {num_unlabeled_sensitive} + --num_labeled_sensitive {num_labeled_sensitive}"
            f" = {num_unlabeled_sensitive + num_labeled_sensitive}: the data has only {len(sensitive_pool)} sensitive"
        )
    rng = np.random.default_rng(seed)
    normal_draw = rng.permutation(normal_pool)
    sensitive_draw = rng.permutation(sensitive_pool)
    return LabelSplit(
        unlabeled_normal=np.sort(normal_draw[:num_unlabeled_normal]),
        unlabeled_sensitive=np.sort(sensitive_draw[:num_unlabeled_sensitive]),
        labeled_sensitive=np.sort(
            sensitive_draw[num_unlabeled_sensitive : num_unlabeled_sensitive + num_labeled_sensitive]
        ),
    )


def sensitive_mask(dataset, label_column: str, sensitive_labels: Sequence[str]) -> np.ndarray:
    values = resolve_label_values(dataset, label_column, sensitive_labels)
    return np.array([label in values for label in dataset[label_column]], dtype=bool)


def normal_reference_split(
    dataset_name: str,
    label_column: str,
    sensitive_labels: Sequence[str],
    split: str = "test",
    config_name: str | None = None,
    cache_dir: str | None = None,
):
    """The normal-only images of a held-out split: the reference set of the evaluation.

    Uses the same label semantics as training, and a split other than the
    training one, so evaluation never sees a training image.
    """
    dataset = load_image_dataset(
        dataset_name,
        None,
        name_flag="--dataset_name",
        dir_flag="--train_data_dir",
        split=split,
        config_name=config_name,
        cache_dir=cache_dir,
    )
    require_column(dataset, label_column, "--label_column", f"--dataset_name {dataset_name}")
    dataset = drop_unlabeled_rows(dataset, label_column, f"--dataset_name {dataset_name} ({split})")
    normal = np.flatnonzero(~sensitive_mask(dataset, label_column, sensitive_labels))
    return dataset.select(normal)


def _load_source(dataset_name, data_dir, name_flag: str, dir_flag: str, args):
    """One of U or S, checked for its image column; returns (dataset, description for messages)."""
    dataset = load_image_dataset(
        dataset_name,
        data_dir,
        name_flag=name_flag,
        dir_flag=dir_flag,
        config_name=getattr(args, "dataset_config_name", None) if name_flag == "--dataset_name" else None,
        cache_dir=args.cache_dir,
    )
    source = f"{name_flag} {dataset_name}" if dataset_name else f"{dir_flag} {data_dir}"
    require_column(dataset, args.image_column, "--image_column", source)
    return check_images(dataset, args.image_column, args.resolution, source), source


def load_training_sets(args, seed: int | None = None):
    """U and S as ``datasets.Dataset`` objects from the training scripts' data flags.

    S comes from its own source, or from the label split of U's dataset
    (``--label_column``, drawn with ``seed``, by default --seed). It is None
    for ``--loss_type unsupervised``, which does not use it.
    """
    unlabeled, source = _load_source(args.dataset_name, args.train_data_dir, "--dataset_name", "--train_data_dir", args)
    if getattr(args, "caption_column", None):
        require_column(unlabeled, args.caption_column, "--caption_column", source)
    sensitive = None
    if args.label_column is not None:
        require_column(unlabeled, args.label_column, "--label_column", source)
        unlabeled = drop_unlabeled_rows(unlabeled, args.label_column, source)
        split = split_by_label(
            sensitive_mask(unlabeled, args.label_column, args.sensitive_labels),
            args.num_unlabeled_normal,
            args.num_unlabeled_sensitive,
            args.num_labeled_sensitive,
            seed=args.seed if seed is None else seed,
        )
        logger.info(
            "label split: U = %d normal + %d sensitive, S = %d sensitive",
            len(split.unlabeled_normal),
            len(split.unlabeled_sensitive),
            len(split.labeled_sensitive),
        )
        if len(split.labeled_sensitive):
            sensitive = unlabeled.select(split.labeled_sensitive)
        unlabeled = unlabeled.select(split.unlabeled)
    elif args.loss_type != "unsupervised":
        sensitive, sensitive_source = _load_source(
            args.sensitive_dataset_name,
            args.sensitive_data_dir,
            "--sensitive_dataset_name",
            "--sensitive_data_dir",
            args,
        )
        if getattr(args, "sensitive_caption_column", None):
            require_column(sensitive, args.sensitive_caption_column, "--sensitive_caption_column", sensitive_source)
    unlabeled = limit_unlabeled(
        unlabeled, getattr(args, "max_train_samples", None), args.seed if seed is None else seed
    )
    if args.loss_type == "unsupervised":
        return unlabeled, None  # S, even when drawn, takes no part in Eq. (9)
    if sensitive is None:
        raise InputError(f"--num_labeled_sensitive: --loss_type {args.loss_type} needs at least one image in S")
    return unlabeled, sensitive


def data_fingerprint(unlabeled, sensitive, image_column: str) -> dict:
    """What U and S hold, for a resume to compare: each one's image count and a hash of its images' file names
    and sizes (of their bytes where a dataset stores them). Images added, removed or replaced between a
    checkpoint and its resume change it; the order of the rows does too, since it is the data order."""
    return {
        name: {"images": len(dataset), "hash": _images_hash(dataset, image_column)}
        for name, dataset in (("U", unlabeled), ("S", sensitive))
        if dataset is not None
    }


def _images_hash(dataset, image_column: str) -> str:
    import datasets

    if not isinstance(dataset.features[image_column], datasets.Image):
        return dataset._fingerprint  # not an image feature: datasets' own hash of the data's origin
    digest = hashlib.blake2b(digest_size=16)
    files = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    for batch in files.iter(batch_size=1024):
        for image in batch[image_column]:
            if image["bytes"] is not None:
                digest.update(hashlib.blake2b(image["bytes"], digest_size=16).digest())
            else:
                digest.update(f"{os.path.basename(image['path'])}:{os.path.getsize(image['path'])}".encode())
    return digest.hexdigest()


def limit_unlabeled(unlabeled, max_train_samples: int | None, seed: int | None):
    """--max_train_samples: a random subset of U of that size, drawn with the run's seed (S stays whole)."""
    if max_train_samples is None or len(unlabeled) <= max_train_samples:
        return unlabeled
    kept = np.random.default_rng(derived_seed(seed or 0, 2)).permutation(len(unlabeled))[:max_train_samples]
    logger.info("--max_train_samples %d: training on %d of U's %d images", max_train_samples, len(kept), len(unlabeled))
    return unlabeled.select(np.sort(kept))


# --------------------------------------------------------------------------- transforms


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integers: the same in every process, run and resume."""
    digest = hashlib.sha256(",".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
    """PIL image -> float tensor in [-1, 1] of shape (channels, resolution, resolution).

    Two stages: :meth:`prepare` is deterministic (convert to grayscale or RGB,
    dropping any alpha channel; resize the shorter side to ``resolution`` with
    ``interpolation``, enlarging smaller images) and can be cached;
    :meth:`augment` crops the centre or a random window and flips at random,
    with the random choices drawn from ``generator``.
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
        self.mode = "L" if channels == 1 else "RGB"
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = INTERPOLATION_MODES[interpolation]

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.augment(self.prepare(image), generator)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """uint8 tensor (channels, height, width), shorter side == resolution."""
        image = to_8bit(image).convert(self.mode)
        width, height = image.size
        scale = self.resolution / min(width, height)
        if scale != 1.0:
            size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
            image = image.resize(size, self.resample)
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def augment(self, prepared: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.augment_with_crop(prepared, generator)[0]

    def augment_with_crop(self, prepared: torch.Tensor, generator: torch.Generator | None = None):
        """(pixels, (top, left)): the augmented image and where its window starts in the prepared image, as seen
        after the flip (SDXL's crop conditioning)."""
        top, left = self.crop_offset(prepared.shape[-2:], generator)
        flip = self.draw_flip(generator)
        seen_left = self.mirrored_left(prepared.shape[-1], left) if flip else left
        return self.to_pixels(self.window(prepared, top, left), flip), (top, seen_left)

    def mirrored_left(self, width: int, left: int) -> int:
        """The left edge of a window once the image is mirrored."""
        return width - left - self.resolution

    def draw_flip(self, generator: torch.Generator | None) -> bool:
        """Whether this access mirrors the image (drawn after the crop; cached latents draw it the same way)."""
        return self.random_flip and bool(torch.rand((), generator=generator) < 0.5)

    @staticmethod
    def to_pixels(cropped: torch.Tensor, flip: bool) -> torch.Tensor:
        """uint8 (channels, resolution, resolution) -> floats in [-1, 1], mirrored if ``flip``."""
        tensor = cropped.float()
        if flip:
            tensor = tensor.flip(-1)
        return tensor / 127.5 - 1.0

    def crop_offset(self, size, generator: torch.Generator | None = None) -> tuple[int, int]:
        """(top, left) of the centre (--center_crop; ``generator`` is not used) or of a random window."""
        height, width = size
        if self.center_crop:
            return (height - self.resolution) // 2, (width - self.resolution) // 2
        top = int(torch.randint(0, height - self.resolution + 1, (), generator=generator))
        left = int(torch.randint(0, width - self.resolution + 1, (), generator=generator))
        return top, left

    def crop(self, tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.window(tensor, *self.crop_offset(tensor.shape[-2:], generator))

    def window(self, tensor: torch.Tensor, top: int, left: int) -> torch.Tensor:
        """The ``resolution``-square window of ``tensor`` whose top-left corner is (top, left)."""
        return tensor[:, top : top + self.resolution, left : left + self.resolution]


#: Datasets whose prepared (decoded and resized) images fit in this many bytes are kept in memory.
PRELOAD_BUDGET_BYTES = 2**30


class TransformedImages(torch.utils.data.Dataset):
    """A torch view of one image column of a ``datasets.Dataset``, transformed on access.

    Keys are ``(index, epoch)`` pairs from :class:`EpochShuffle` (a plain
    index means epoch 0). The augmentation of an image is seeded by
    ``(seed, epoch, index)``, so it does not depend on what was loaded before:
    a resumed run, or a data-loader worker, draws the same crop and flip.

    Small datasets are decoded and resized once, up front, when their square
    size estimate fits ``PRELOAD_BUDGET_BYTES``: decoding a PNG per access
    otherwise costs more than a training step of a small model.
    """

    def __init__(self, dataset, image_column: str, transform: ImageTransform, seed: int = 0, source: str = ""):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.source = source
        channels = 1 if transform.mode == "L" else 3
        self.original_sizes: dict[int, tuple[int, int]] = {}  # (height, width) before resizing, once decoded
        self.prepared = None
        if len(dataset) * channels * transform.resolution**2 <= PRELOAD_BUDGET_BYTES:
            self.prepared = [self._prepare(index) for index in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> torch.Tensor:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        return self.augmented(index, epoch)[0]

    def augmented(self, index: int, epoch: int):
        """(pixels, crop top-left) of image ``index`` in ``epoch``: :meth:`ImageTransform.augment_with_crop`."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index))
        return self.transform.augment_with_crop(self.prepared_image(index), generator)

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
        return self.transform.prepare(image)


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
    seeded by ``(seed, epoch, index)`` like the augmentation.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        transform: ImageTransform,
        captions: list,
        tokenize,
        micro_conditioning: bool = False,
        **kwargs,
    ):
        super().__init__(dataset, image_column, transform, **kwargs)
        self.captions = captions
        self.tokenize = tokenize
        self.micro_conditioning = micro_conditioning

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        pixels, crop_top_left = self.augmented(index, epoch)
        return {"pixel_values": pixels, **self.conditioning(index, epoch, crop_top_left)}

    def conditioning(self, index: int, epoch: int, crop_top_left: tuple[int, int]) -> dict:
        """The caption's tokens, and SDXL's time ids when asked for."""
        tokens = self.caption_tokens(index, epoch)
        if self.micro_conditioning:
            resolution = self.transform.resolution
            size = self.original_sizes[index]
            tokens["time_ids"] = torch.tensor([*size, *crop_top_left, resolution, resolution], dtype=torch.float32)
        return tokens

    def caption_tokens(self, index: int, epoch: int) -> dict:
        """The tokenized caption of image ``index`` in ``epoch`` (one of several, drawn per epoch)."""
        caption = self.captions[index]
        if not isinstance(caption, str):
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, index, 1))
            caption = caption[int(torch.randint(0, len(caption), (), generator=generator))]
        tokens = self.tokenize(caption)
        return dict(tokens) if isinstance(tokens, dict) else {"input_ids": tokens}


# --------------------------------------------------------------------------- batching


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
        epoch = self.epoch
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
        for index in torch.randperm(self.size, generator=generator).tolist():
            yield index, epoch


def default_sensitive_batch_size(train_batch_size: int, num_unlabeled: int, num_sensitive: int) -> int:
    """S images per step that one loader over U and S mixed would give, on average, per U batch.

    At least 1, so that every step sees S.
    """
    return max(1, round(train_batch_size * num_sensitive / num_unlabeled))


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


# --------------------------------------------------------------------------- demo data


#: What a built-in dataset folder records about how it was written, so that a second write can tell.
DATASET_SETTINGS = "dataset_settings.json"
_DATASET_FILES = {"data", "README.md", DATASET_SETTINGS}


def write_builtin_dataset(output_dir, settings: dict, write, overwrite: bool = False) -> dict | None:
    """Write a built-in dataset with ``write(folder)`` into ``output_dir`` and return what ``write`` returns (the
    rows per split); None when the folder already holds the same dataset (nothing is written).

    A folder that holds another dataset is refused unless ``overwrite``, so that runs keyed on its path never
    mix two datasets; a folder with anything else in it is never replaced. The dataset is written into a
    staging folder beside it and renamed into place, so an interrupted write leaves nothing that looks whole.
    """
    target = Path(output_dir)
    if target.exists():
        if not target.is_dir():
            raise InputError(f"--output_dir {output_dir} is a file")
        held = {entry.name for entry in target.iterdir()}
        if held:
            recorded = target / DATASET_SETTINGS
            if recorded.is_file() and read_json(recorded, f"--output_dir {output_dir}") == settings:
                return None
            if not held <= _DATASET_FILES:
                raise InputError(f"--output_dir {output_dir} holds other files ({', '.join(sorted(held))[:200]})")
            if not overwrite:
                raise InputError(
                    f"--output_dir {output_dir} already holds a dataset written with other settings; pass"
                    " --overwrite to replace it (runs trained on the old one then no longer match its data)"
                )
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.absolute().parent))
    try:
        counts = write(staging)
        (staging / DATASET_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def write_digits_dataset(output_dir: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write scikit-learn's bundled 8x8 digits as a labeled dataset folder.

    The folder holds ``data/train-*.parquet`` and ``data/test-*.parquet`` with
    an ``image`` column (8x8 grayscale PNG) and a ``label`` column (class
    names "0".."9"), so ``datasets.load_dataset(output_dir)`` reads it like a
    Hub dataset. The split is stratified by digit and seeded. Returns the
    number of rows per split.
    """
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # The bundled images hold intensities 0..16; scale them to 8-bit grayscale.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=digits.target)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    data_dir = Path(output_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, split_idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        columns = {
            "image": [Image.fromarray(images[i]) for i in split_idx],
            "label": [int(digits.target[i]) for i in split_idx],
        }
        Dataset.from_dict(columns, features=features).to_parquet(str(data_dir / f"{split}-00000-of-00001.parquet"))
        counts[split] = len(split_idx)
    (Path(output_dir) / "README.md").write_text(
        "# digits\n\nscikit-learn's bundled 8x8 handwritten digits (`sklearn.datasets.load_digits`), "
        f"split stratified by label with seed {seed}: {json.dumps(counts)}.\n"
    )
    return counts
