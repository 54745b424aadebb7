"""Writing the built-in datasets (the digits; the shapes are drawn in shapes.py) as saved datasets."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pu_diffusion.errors import InputError, read_json

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
            if made_with(target, settings, DATASET_SETTINGS, f"--output_dir {output_dir}"):
                return None
            if not held <= _DATASET_FILES:
                raise InputError(f"--output_dir {output_dir} holds other files ({', '.join(sorted(held))[:200]})")
            if not overwrite:
                raise InputError(
                    f"--output_dir {output_dir} already holds a dataset written with other settings; pass"
                    " --overwrite to replace it (runs trained on the old one then no longer match its data)"
                )
    return replace_folder(target, settings, DATASET_SETTINGS, write)


def made_with(folder: Path, settings: dict, settings_file: str, named: str) -> bool:
    """Whether ``folder`` was written by :func:`replace_folder` with these ``settings``."""
    recorded = folder / settings_file
    return recorded.is_file() and read_json(recorded, named) == settings


def replace_folder(target: Path, settings: dict, settings_file: str, write):
    """Write a folder with ``write(staging)`` beside ``target``, record ``settings`` in it, then swap it in for
    ``target``: a stopped write leaves no folder whose settings file says it is whole. Returns what
    ``write`` returns."""
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.absolute().parent))
    try:
        written = write(staging)
        (staging / settings_file).write_text(json.dumps(settings, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


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
