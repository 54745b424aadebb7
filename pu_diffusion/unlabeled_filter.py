"""U without the images that look most like S: a label-free clean-up of U before training.

The prior estimator's S-vs-U classifiers score every image of U held out
(cross-fitting: by a model that never saw it). U's sensitive images score
like S, so dropping U's top-scoring share removes most of them and few
normal ones, with no label beyond what a PU user has (which images are in
S). Why it is worth doing: trained long, the PU loss keeps fitting U's own
sensitive images, which its U term asks it to model; the S term pushes
away what S holds but cannot tell the model to forget images it sees in U
(docs/benchmark.md, "Longer training").

The training scripts apply it with ``--filter_unlabeled RULE``;
estimate_prior.py writes the filtered data with ``--write_filtered_data``
and ``--filter_fraction RULE``. The rule says how much to drop: the
estimated share (``estimate``), the upper end of its interval (``high``,
estimate_prior.py's default: a ranking is never perfect, so dropping no
more than U's sensitive share leaves some of it behind), or a fixed share.
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


def check_rule_usable(rule: str | float, problems: list[str], flag: str = "--filter_fraction") -> None:
    """A rule read off the estimate needs an estimate that can be used (see prior.estimate_problems)."""
    if rule in FRACTION_RULES and problems:
        raise InputError(
            f"{flag} {rule}: the estimate cannot be used ({'; '.join(problems)}); nothing was"
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


def filter_unlabeled(
    unlabeled, num_sensitive: int, unlabeled_scores, estimate, rule, label_column=None, sensitive_labels=None
) -> tuple[np.ndarray, FilterRecord]:
    """U's kept indices under ``rule``, given every U image's held-out score and the prior ``estimate`` made
    from them, and the record of what was dropped (audited where U still carries labels)."""
    fraction = drop_fraction(rule, estimate)
    kept = kept_indices(unlabeled_scores, fraction)
    record = FilterRecord(
        rule=str(rule),
        fraction=fraction,
        prior_estimate=estimate.to_dict(),
        unlabeled_before=len(unlabeled),
        unlabeled_kept=len(kept),
        sensitive_images=num_sensitive,
        dropped_indices=np.setdiff1d(np.arange(len(unlabeled)), kept).tolist(),
        audit=label_audit(unlabeled, kept, label_column, sensitive_labels),
    )
    return kept, record


def kept_from_record(record: dict, num_unlabeled: int, flag: str) -> np.ndarray:
    """The kept indices of a saved record (FilterRecord.to_dict()), on the U it was made for."""
    if record["unlabeled_before"] != num_unlabeled:
        raise InputError(
            f"{flag}: the resumed run's filter was made on {record['unlabeled_before']} images of U, and this U"
            f" has {num_unlabeled}; resume on the same data"
        )
    keep = np.ones(num_unlabeled, dtype=bool)
    keep[record["dropped_indices"]] = False
    return np.flatnonzero(keep)


def describe(record: dict) -> str:
    """One line for the log: how much of U was dropped, by which rule, and what the labels say where U has
    them."""
    dropped = record["unlabeled_before"] - record["unlabeled_kept"]
    line = f"dropped {dropped} of {record['unlabeled_before']} images of U ({record['rule']}: {record['fraction']:.4f})"
    audit = record.get("audit")
    if audit is not None:
        line += (
            f"; labels in U: {audit['sensitive_dropped']} of its {audit['sensitive_in_unlabeled']} sensitive"
            f" images dropped, and {audit['normal_dropped']} normal ones"
        )
    return line


def label_audit(unlabeled, kept: np.ndarray, label_column: str | None, sensitive_labels) -> dict | None:
    """Where U still carries its labels (a benchmark's label split), how many sensitive images the filter
    removed and how many normal ones it took with them; None for truly unlabeled data."""
    if not label_column or label_column not in unlabeled.column_names or not sensitive_labels:
        return None
    from pu_diffusion.training_data import sensitive_mask

    # A label split's U may hold only some of the sensitive labels (4 images of 5 classes, say).
    is_sensitive = sensitive_mask(unlabeled, label_column, sensitive_labels, missing_ok=True)
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
