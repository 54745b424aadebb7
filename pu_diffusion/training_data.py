"""Loading U and S: image folders or datasets, the label split of the paper's protocol, and the data's fingerprint."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pu_diffusion.errors import InputError
from pu_diffusion.image_files import check_images, warn_about_left_out_files

logger = logging.getLogger(__name__)


#: Table 1 of the paper: U holds 10 normal images for each sensitive one.
PAPER_NORMAL_PER_SENSITIVE = 10


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


def resolve_label_values(
    dataset, label_column: str, labels: Sequence[str], flag: str = "--sensitive_labels", missing_ok: bool = False
) -> set:
    """Map the user's label strings to the values stored in ``label_column``.

    A ``ClassLabel`` column accepts class names or integer ids; any other
    column is matched on ``str(value)`` or, for numbers, on the number (so
    "1" finds 1.0). Every label must occur in the data (the error lists the
    values that do), unless ``missing_ok``: then absent labels match nothing.
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
        if (value is None or value not in present) and missing_ok:
            continue
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


def sensitive_mask(dataset, label_column: str, sensitive_labels: Sequence[str], missing_ok: bool = False) -> np.ndarray:
    values = resolve_label_values(dataset, label_column, sensitive_labels, missing_ok=missing_ok)
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


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integers: the same in every process, run and resume."""
    digest = hashlib.sha256(",".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
