"""Write the built-in demo data: scikit-learn's bundled 8x8 digits as a labeled dataset folder.

    python prepare_digits.py --output_dir data/digits

The folder loads with ``datasets.load_dataset("data/digits")`` (train and test
splits, ``image`` and ``label`` columns), so the training scripts take it as
``--dataset_name data/digits``.
"""

import argparse

from pu_data import write_digits_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/digits", help="Where to write the dataset.")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="Share of images in the test split.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the stratified train/test split.")
    args = parser.parse_args()
    counts = write_digits_dataset(args.output_dir, args.test_fraction, args.seed)
    print(f"wrote {args.output_dir}: {counts}")


if __name__ == "__main__":
    main()
