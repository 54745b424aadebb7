"""How close ``--prior auto`` comes to the true share of sensitive images in U.

    python benchmarks/prior_accuracy.py                                  # digits and shapes, shares 0.05 0.1 0.2
    python benchmarks/prior_accuracy.py --datasets shapes --seeds 0 1 2 3 4
    python benchmarks/prior_accuracy.py --deltas 0.1 0.02 0.005          # the bin rule's confidence, compared

For each dataset, true share and seed, U gets all normal training images plus
as many sensitive ones as make the share, and S a fixed number of other
sensitive images (the label-split flags). The cross-fitted S-vs-U scores are
computed as ``--prior auto`` computes them and kept in ``--output_dir``
(``scores/*.npz``), so a second call, or one with other ``--deltas``, only
redoes the cheap last step. Prints a markdown table: mean estimate, mean
absolute error, and how often the bootstrap interval holds the true share.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pu_diffusion.flags import (
    OPEN_UNIT_INTERVAL,
    POSITIVE_INT,
    add_data_arguments,
    add_prior_estimation_arguments,
    show_ranges,
)
from pu_diffusion.image_files import image_channels
from pu_diffusion.prior import (
    DELTA,
    PriorEstimate,
    best_bin_estimate,
    bootstrap_interval,
    cross_fitted_scores,
    estimate_problems,
    pixel_inputs,
)
from pu_diffusion.training_data import load_training_sets

ROOT = Path(__file__).resolve().parent.parent

#: name -> (the script that writes it, its sensitive labels, its resolution)
DATASETS = {
    "digits": ("prepare_digits.py", ["1", "3", "5", "7", "9"], 8),
    "shapes": ("prepare_shapes.py", ["triangle", "star", "ring"], 16),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["digits", "shapes"])
    parser.add_argument("--shares", nargs="+", type=OPEN_UNIT_INTERVAL, default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--deltas", nargs="+", type=OPEN_UNIT_INTERVAL, default=[DELTA])
    parser.add_argument("--num_labeled_sensitive", type=POSITIVE_INT, default=150, help="|S| in every cell.")
    parser.add_argument("--data_root", default=str(ROOT / "data"), help="Datasets are written here if missing.")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "prior-accuracy"))
    show_ranges(parser)
    return parser.parse_args(argv)


def dataset_folder(name: str, data_root: Path) -> Path:
    folder = data_root / name
    if not (folder / "data").is_dir():
        subprocess.run([sys.executable, DATASETS[name][0], "--output_dir", str(folder)], cwd=ROOT, check=True)
    return folder


def normal_count(folder: Path, name: str) -> int:
    from datasets import load_dataset

    train = load_dataset(str(folder), split="train")
    sensitive_ids = {train.features["label"].str2int(label) for label in DATASETS[name][1]}
    return sum(label not in sensitive_ids for label in train["label"])


def estimator_args(folder: Path, name: str, share: float, num_normal: int, num_sensitive: int):
    """The data and estimator flags of estimate_prior.py for one cell, and the share of sensitive images they
    give U."""
    _, sensitive_labels, resolution = DATASETS[name]
    num_unlabeled_sensitive = round(share / (1 - share) * num_normal)
    argv = ["--dataset_name", str(folder), "--label_column", "label", "--sensitive_labels", *sensitive_labels]
    argv += ["--num_unlabeled_sensitive", str(num_unlabeled_sensitive), "--num_labeled_sensitive", str(num_sensitive)]
    argv += ["--resolution", str(resolution)]
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    add_prior_estimation_arguments(parser)
    return parser.parse_args(argv), num_unlabeled_sensitive / (num_normal + num_unlabeled_sensitive)


def cell_scores(cache: Path, folder: Path, name: str, share: float, num_normal: int, args, seed: int):
    """(S scores, U scores, true share) of one cell, from the cache or computed as --prior auto does."""
    if cache.is_file():
        saved = np.load(cache)
        return saved["s"], saved["u"], float(saved["true"])
    run_args, true_share = estimator_args(folder, name, share, num_normal, args.num_labeled_sensitive)
    unlabeled, sensitive = load_training_sets(run_args, seed)
    channels = image_channels([(unlabeled, "U"), (sensitive, "S")], "image")
    inputs = [pixel_inputs(data, "image", run_args.resolution, channels) for data in (sensitive, unlabeled)]
    sensitive_scores, unlabeled_scores = cross_fitted_scores(
        *inputs, folds=run_args.prior_folds, epochs=run_args.prior_epochs, seed=seed
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, s=sensitive_scores, u=unlabeled_scores, true=true_share)
    return sensitive_scores, unlabeled_scores, true_share


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = ["| dataset | S images | true share | delta | seeds | mean estimate | mean abs. error"
            " | interval holds the truth | mean interval width | refused by --prior auto |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in args.datasets:
        folder = dataset_folder(name, Path(args.data_root))
        num_normal = normal_count(folder, name)
        for share in args.shares:
            cells = []
            for seed in args.seeds:
                start = time.perf_counter()
                cache = Path(args.output_dir) / "scores" / f"{name}-{share:g}-{seed}-s{args.num_labeled_sensitive}.npz"
                cells.append(cell_scores(cache, folder, name, share, num_normal, args, seed))
                print(f"{name} share {share:g} seed {seed}: scores ready ({time.perf_counter() - start:.0f} s)")
            for delta in args.deltas:
                estimates, errors, widths, covered, refused = [], [], [], 0, 0
                for sensitive_scores, unlabeled_scores, true_share in cells:
                    estimate = best_bin_estimate(sensitive_scores, unlabeled_scores, delta)
                    low, high = bootstrap_interval(sensitive_scores, unlabeled_scores, delta=delta)
                    estimates.append(estimate)
                    errors.append(abs(estimate - true_share))
                    widths.append(high - low)
                    covered += low <= true_share <= high
                    found = PriorEstimate(estimate, low, high, 0.9, "", "", 0, 0, 0)
                    refused += bool(estimate_problems(found))
                rows.append(
                    f"| {name} | {args.num_labeled_sensitive} | {cells[0][2]:.3f} | {delta:g} | {len(cells)} |"
                    f" {statistics.fmean(estimates):.3f} | {statistics.fmean(errors):.3f} | {covered}/{len(cells)} |"
                    f" {statistics.fmean(widths):.3f} | {refused}/{len(cells)} |"
                )
    print("\n" + "\n".join(rows))
    print(f"\n|S| = {args.num_labeled_sensitive}; U = every normal training image + the share's sensitive ones.")


if __name__ == "__main__":
    main()
