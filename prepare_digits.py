"""Write the built-in demo data: scikit-learn's bundled 8x8 digits as a labeled dataset folder.

    python prepare_digits.py --output_dir data/digits

The folder loads with ``datasets.load_dataset("data/digits")`` (train and test
splits, ``image`` and ``label`` columns), so the training scripts take it as
``--dataset_name data/digits``. A folder that already holds the same dataset is
kept; one with another is refused unless ``--overwrite``.
"""

import argparse
import sys

from pu_diffusion.builtin_datasets import write_builtin_dataset, write_digits_dataset
from pu_diffusion.errors import InputError
from pu_diffusion.flags import OPEN_UNIT_INTERVAL, show_ranges


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/digits", help="Where to write the dataset.")
    parser.add_argument(
        "--test_fraction", type=OPEN_UNIT_INTERVAL, default=0.2, help="Share of images in the test split."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the stratified train/test split.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a dataset written with other settings.")
    show_ranges(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = {"dataset": "digits", "test_fraction": args.test_fraction, "seed": args.seed}
    counts = write_builtin_dataset(
        args.output_dir,
        settings,
        lambda folder: write_digits_dataset(folder, args.test_fraction, args.seed),
        args.overwrite,
    )
    if counts is None:
        print(f"kept {args.output_dir}: it already holds this dataset ({settings})")
    else:
        print(f"wrote {args.output_dir}: {counts} ({settings})")


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        sys.exit(f"error: {error}")
