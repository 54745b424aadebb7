"""How close ``--prior auto`` comes to the true share of sensitive images in U.

    python benchmarks/prior_accuracy.py                                  # digits and shapes, shares 0.05 0.1 0.2
    python benchmarks/prior_accuracy.py --datasets shapes --seeds 0 1 2 3 4

For each dataset, true share and seed, U gets all normal training images plus
as many sensitive ones as make the share, S a fixed number of other sensitive
images (the label-split flags), and estimate_prior.py's estimator runs on
them exactly as ``--prior auto`` does. Prints a markdown table: mean estimate,
mean absolute error, and how often the interval holds the true share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import estimate_prior  # noqa: E402
import pu_prior  # noqa: E402
from pu_data import load_training_sets  # noqa: E402

#: name -> (how to write it, its label flags, resolution)
DATASETS = {
    "digits": ("prepare_digits.py", ["1", "3", "5", "7", "9"], 8),
    "shapes": ("prepare_shapes.py", ["triangle", "star", "ring"], 16),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["digits", "shapes"])
    parser.add_argument("--shares", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--num_labeled_sensitive", type=int, default=150, help="|S| in every cell.")
    parser.add_argument("--data_root", default=str(ROOT / "data"), help="Datasets are written here if missing.")
    return parser.parse_args(argv)


def dataset_folder(name: str, data_root: Path) -> Path:
    folder = data_root / name
    if not (folder / "data").is_dir():
        import subprocess

        subprocess.run([sys.executable, DATASETS[name][0], "--output_dir", str(folder)], cwd=ROOT, check=True)
    return folder


def estimator_args(folder: Path, name: str, share: float, num_normal: int, num_sensitive: int, seed: int):
    _, sensitive_labels, resolution = DATASETS[name]
    num_unlabeled_sensitive = round(share / (1 - share) * num_normal)
    argv = ["--dataset_name", str(folder), "--label_column", "label", "--sensitive_labels", *sensitive_labels]
    argv += ["--num_unlabeled_sensitive", str(num_unlabeled_sensitive), "--num_labeled_sensitive", str(num_sensitive)]
    argv += ["--resolution", str(resolution), "--seed", str(seed), "--cache_dir", str(folder / ".cache")]
    return estimate_prior.parse_args(argv), num_unlabeled_sensitive / (num_normal + num_unlabeled_sensitive)


def normal_count(folder: Path, name: str) -> int:
    from datasets import load_dataset

    train = load_dataset(str(folder), split="train")
    sensitive_ids = {train.features["label"].str2int(label) for label in DATASETS[name][1]}
    return sum(label not in sensitive_ids for label in train["label"])


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = ["| dataset | true share | seeds | mean estimate | mean abs. error | interval holds the truth |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in args.datasets:
        folder = dataset_folder(name, Path(args.data_root))
        num_normal = normal_count(folder, name)
        for share in args.shares:
            estimates, errors, covered = [], [], 0
            for seed in args.seeds:
                start = time.perf_counter()
                run_args, true_share = estimator_args(folder, name, share, num_normal, args.num_labeled_sensitive, seed)
                unlabeled, sensitive = load_training_sets(run_args, seed)
                estimate = pu_prior.estimate_for_data(unlabeled, sensitive, run_args, seed)
                estimates.append(estimate.estimate)
                errors.append(abs(estimate.estimate - true_share))
                covered += estimate.low <= true_share <= estimate.high
                print(
                    f"{name} share {true_share:.3f} seed {seed}: {estimate.estimate:.3f}"
                    f" [{estimate.low:.3f}, {estimate.high:.3f}] ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            rows.append(
                f"| {name} | {share:g} | {len(args.seeds)} | {statistics.fmean(estimates):.3f} |"
                f" {statistics.fmean(errors):.3f} | {covered}/{len(args.seeds)} |"
            )
    print("\n" + "\n".join(rows))
    print(f"\n|S| = {args.num_labeled_sensitive}; U = every normal training image + the share's sensitive ones.")


if __name__ == "__main__":
    main()
