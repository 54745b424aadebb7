"""Write the second built-in dataset: procedurally drawn RGB shapes, a labeled dataset folder.

    python prepare_shapes.py --output_dir data/shapes                   # 16 px, 600 images per shape
    python prepare_shapes.py --output_dir data/shapes32 --resolution 32
    python prepare_shapes.py --output_dir data/shapes32-captioned --resolution 32 --captions

Six shapes (circle, square, cross, triangle, star, ring) in random colours,
sizes, positions and rotations on textured backgrounds; deterministic from
``--seed``. The folder loads with ``datasets.load_dataset`` (train and test
splits, ``image`` and ``label`` columns), so the training scripts take it as
``--dataset_name data/shapes --label_column label --sensitive_labels triangle star ring``.
With ``--captions`` a ``text`` column describes each image ("a photo of a small
dark blue star on stripes"), or, for ``--generic_caption_share`` of them, says
only "a photo of a shape": the text-to-image base model's data.
A folder that already holds the same dataset is kept; one with another is
refused unless ``--overwrite``.
"""

import argparse
import sys

from pu_diffusion.builtin_datasets import write_builtin_dataset
from pu_diffusion.errors import InputError
from pu_diffusion.flags import OPEN_UNIT_INTERVAL, POSITIVE_INT, UNIT_INTERVAL, show_ranges
from pu_diffusion.shapes import write_shapes_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/shapes", help="Where to write the dataset.")
    parser.add_argument("--resolution", type=POSITIVE_INT, default=16, help="Image size in pixels.")
    parser.add_argument("--images_per_class", type=POSITIVE_INT, default=600, help="Images of each shape.")
    parser.add_argument(
        "--test_fraction", type=OPEN_UNIT_INTERVAL, default=0.2, help="Share of each shape's images in the test split."
    )
    parser.add_argument("--seed", type=int, default=0, help="Every image is a function of the seed, shape and index.")
    parser.add_argument("--captions", action="store_true", help="Add a text column of captions.")
    parser.add_argument(
        "--generic_caption_share",
        type=UNIT_INTERVAL,
        default=0.3,
        help="With --captions: the share of images captioned only 'a photo of a shape'.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a dataset written with other settings.")
    show_ranges(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = {
        "dataset": "shapes",
        **{key: value for key, value in vars(args).items() if key not in ("output_dir", "overwrite")},
    }
    if not args.captions:
        del settings["generic_caption_share"]  # a folder written before captions existed stays the same dataset
    counts = write_builtin_dataset(
        args.output_dir,
        settings,
        lambda folder: write_shapes_dataset(
            folder,
            args.resolution,
            args.images_per_class,
            args.test_fraction,
            args.seed,
            args.generic_caption_share if args.captions else None,
        ),
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
