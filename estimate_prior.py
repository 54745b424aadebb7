"""Estimate beta, the share of sensitive images in U, from U and S alone, and write prior.json.

    python estimate_prior.py --dataset_name data/digits --label_column label \
        --sensitive_labels 1 3 5 7 9 --resolution 8 --output_dir prior-digits

    python estimate_prior.py --train_data_dir my_images --sensitive_data_dir my_sensitive \
        --resolution 512 --features vae --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --output_dir prior-mine

It takes the training scripts' data flags. A small CNN learns to tell S from
U with cross-fitting (each image scored by a model that never saw it) and
Best Bin Estimation turns the held-out scores into beta (see pu_diffusion/prior.py).
``--prior auto`` in both training scripts runs the same estimate first.
Features: the images themselves at up to 32 px (``pixels``), or the latents of
a Stable Diffusion VAE (``vae``), which see more than 32 px can show.

With ``--write_filtered_data DIR`` it also writes U without the images that
the same held-out scores rank most like S (``--filter_fraction`` of U; see
pu_diffusion/unlabeled_filter.py), and S beside it, to train on:

    python estimate_prior.py --dataset_name data/shapes --label_column label \
        --sensitive_labels triangle star ring --resolution 16 --output_dir prior-shapes \
        --write_filtered_data filtered-shapes
    python train_pu_unconditional.py --dataset_name filtered-shapes/unlabeled \
        --sensitive_dataset_name filtered-shapes/sensitive --resolution 16 --output_dir model
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pu_diffusion.checks import check_sensitive_source, check_writable
from pu_diffusion.errors import InputError
from pu_diffusion.flags import add_data_arguments, add_prior_estimation_arguments, fraction_rule, show_ranges
from pu_diffusion.outputs import write_json_atomically
from pu_diffusion.prior import estimate_problems, logged_estimate, scores_for_data
from pu_diffusion.training_data import load_training_sets
from pu_diffusion.unlabeled_filter import (
    check_output_folder,
    check_rule_usable,
    describe,
    filter_unlabeled,
    write_filtered_data,
)

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    add_prior_estimation_arguments(parser)
    parser.add_argument("--output_dir", default=".", help="prior.json is written here.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the label split and the folds.")
    parser.add_argument(
        "--features",
        choices=("pixels", "vae"),
        default="pixels",
        help="What the classifier sees: the images at up to 32 px, or their latents from the VAE of"
        " --pretrained_model_name_or_path.",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path", default=None, help="With --features vae: a Stable Diffusion pipeline."
    )
    parser.add_argument("--revision", default=None, help="Revision of --pretrained_model_name_or_path.")
    parser.add_argument(
        "--write_filtered_data",
        default=None,
        help="Also write U without its most S-like images (DIR/unlabeled), S (DIR/sensitive) and filter.json, as"
        " datasets that the training scripts read with --dataset_name and --sensitive_dataset_name.",
    )
    parser.add_argument(
        "--filter_fraction",
        type=fraction_rule,
        default="high",
        help="Share of U that --write_filtered_data drops, highest scores first: 'estimate' (the estimated"
        " prior), 'high' (the upper end of its interval) or a number in (0, 1).",
    )
    parser.add_argument(
        "--overwrite_filtered_data", action="store_true", help="Replace what --write_filtered_data holds."
    )
    show_ranges(parser)
    args = parser.parse_args(argv)
    args.loss_type = "pu"  # S is needed
    try:
        if args.dataset_name is None and args.train_data_dir is None:
            raise InputError("U is missing: give --dataset_name or --train_data_dir")
        check_sensitive_source(args)
        check_writable(Path(args.output_dir))
        if args.features == "vae" and args.pretrained_model_name_or_path is None:
            raise InputError("--features vae needs --pretrained_model_name_or_path (a pipeline with a vae/ folder)")
        if args.write_filtered_data is not None:
            check_output_folder(Path(args.write_filtered_data), args.overwrite_filtered_data)
    except InputError as error:
        parser.error(str(error))
    return args


def load_vae(args: argparse.Namespace):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)


def main(args: argparse.Namespace) -> None:
    unlabeled, sensitive = load_training_sets(args, args.seed)
    vae = load_vae(args) if args.features == "vae" else None
    scores = scores_for_data(unlabeled, sensitive, args, args.seed, vae)
    estimate = logged_estimate(scores, args.prior_confidence, args.seed)
    problems = estimate_problems(estimate, args.prior_max_interval_width)
    output = Path(args.output_dir) / "prior.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(output, {**estimate.to_dict(), "problems": problems})
    print(
        f"prior (share of sensitive images in U): {estimate.estimate:.4f}"
        f" [{estimate.low:.4f}, {estimate.high:.4f}] ({round(100 * estimate.confidence)}% bootstrap interval)"
    )
    print(f"U: {estimate.num_unlabeled} images, S: {estimate.num_sensitive}; written to {output}")
    for problem in problems:
        print(f"WARNING: do not train with this estimate: {problem}", file=sys.stderr)
    if problems:
        print("WARNING: --prior auto would refuse it; give --prior yourself.", file=sys.stderr)
    if args.write_filtered_data is not None:
        check_rule_usable(args.filter_fraction, problems)
        write_filtered(args, unlabeled, sensitive, scores.unlabeled, estimate)


def write_filtered(args: argparse.Namespace, unlabeled, sensitive, unlabeled_scores, estimate) -> None:
    """--write_filtered_data: U without its top --filter_fraction by held-out score, S, and filter.json."""
    kept, record = filter_unlabeled(
        unlabeled, len(sensitive), unlabeled_scores, estimate, args.filter_fraction, args.label_column,
        args.sensitive_labels,
    )  # fmt: skip
    write_filtered_data(Path(args.write_filtered_data), unlabeled, sensitive, kept, record)
    print(f"filtered U: {describe(record.to_dict())}; written to {args.write_filtered_data}")


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cli_args = parse_args()
    try:
        main(cli_args)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
