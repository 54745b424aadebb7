"""U without the images that look most like S: a label-free clean-up of U before training.

The prior estimator's S-vs-U classifiers score every image of U held out
(cross-fitting: by a model that never saw it). U's sensitive images score
like S, so dropping U's top-scoring share removes most of them and few
normal ones, with no label beyond what a PU user has (which images are in
S). Why it is worth doing: trained long, the PU loss keeps fitting U's own
sensitive images, which its U term asks it to model; the S term pushes
away what S holds but cannot tell the model to forget images it sees in U
(docs/benchmark.md, "Longer training").

How much to drop is the rule ``--filter_fraction``: the estimated share
(``estimate``), the upper end of its interval (``high``, the default: a
ranking is never perfect, so dropping no more than U's sensitive share
leaves some of it behind), or a fixed share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pu_diffusion.builtin_datasets import replace_folder
from pu_diffusion.errors import InputError

FRACTION_RULES = ("estimate", "high")

#: What the folder written by :func:`write_filtered_data` holds, besides its record.
UNLABELED_FOLDER, SENSITIVE_FOLDER, RECORD_FILE = "unlabeled", "sensitive", "filter.json"


def drop_fraction(rule: str | float, estimate) -> float:
    """The share of U to drop under ``rule``, given the prior ``estimate`` (a PriorEstimate)."""
    if rule == "estimate":
        return estimate.estimate
    if rule == "high":
        return estimate.high
    return float(rule)


def check_rule_usable(rule: str | float, problems: list[str]) -> None:
    """A rule read off the estimate needs an estimate that can be used (see prior.estimate_problems)."""
    if rule in FRACTION_RULES and problems:
        raise InputError(
            f"--filter_fraction {rule}: the estimate cannot be used ({'; '.join(problems)}); nothing was"
            " filtered. Give the share of U to drop as a number instead."
        )


def kept_indices(unlabeled_scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of U, in their order, without the ``round(fraction * len(U))`` highest-scoring ones (ties go
    to the earlier image, so the choice is a pure function of the scores)."""
    scores = np.asarray(unlabeled_scores, dtype=float)
    dropped = np.argsort(-scores, kind="stable")[: round(fraction * len(scores))]
    keep = np.ones(len(scores), dtype=bool)
    keep[dropped] = False
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class FilterRecord:
    """filter.json: the rule, what it dropped, and (where U carries labels) how many of those were sensitive."""

    rule: str
    fraction: float
    prior_estimate: dict
    unlabeled_before: int
    unlabeled_kept: int
    sensitive_images: int
    dropped_indices: list
    audit: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def label_audit(unlabeled, kept: np.ndarray, label_column: str | None, sensitive_labels) -> dict | None:
    """Where U still carries its labels (a benchmark's label split), how many sensitive images the filter
    removed and how many normal ones it took with them; None for truly unlabeled data."""
    if not label_column or label_column not in unlabeled.column_names or not sensitive_labels:
        return None
    from pu_diffusion.training_data import sensitive_mask

    is_sensitive = sensitive_mask(unlabeled, label_column, sensitive_labels)
    keep = np.zeros(len(unlabeled), dtype=bool)
    keep[kept] = True
    return {
        "sensitive_in_unlabeled": int(is_sensitive.sum()),
        "sensitive_dropped": int((is_sensitive & ~keep).sum()),
        "normal_dropped": int((~is_sensitive & ~keep).sum()),
        "sensitive_share_before": float(is_sensitive.mean()),
        "sensitive_share_after": float(is_sensitive[keep].mean()) if keep.any() else 0.0,
    }


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse, before any image is scored, a --write_filtered_data folder that holds something."""
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise InputError(
            f"--write_filtered_data {folder}: the folder is not empty; choose another or add --overwrite_filtered_data"
        )


def write_filtered_data(folder: Path, unlabeled, sensitive, kept: np.ndarray, record: FilterRecord) -> None:
    """U's kept rows and S as two ``save_to_disk`` datasets (every column, images embedded) and filter.json.

    Written beside ``folder`` and swapped in only when complete (as the built-in datasets are), so an
    interrupted write keeps the old folder and never leaves one that looks finished.
    """

    def write(staging: Path) -> None:
        unlabeled.select(kept).save_to_disk(str(staging / UNLABELED_FOLDER))
        sensitive.save_to_disk(str(staging / SENSITIVE_FOLDER))

    replace_folder(Path(folder), record.to_dict(), RECORD_FILE, write)
