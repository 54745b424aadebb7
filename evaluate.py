"""Evaluate PU diffusion models the way the paper does (section 5.2): non-sensitive rate, FID and a sample grid.

Two steps. First a classifier, unless you already have a Hugging Face
image-classification model for your data:

    python evaluate.py train-classifier --dataset_name data/digits --label_column label \\
        --output_dir outputs/digits-classifier

Then the samples of a trained pipeline, scored by that classifier and compared
with the normal images of a held-out split:

    python evaluate.py unconditional --pipeline outputs/digits-pu \\
        --classifier outputs/digits-classifier --sensitive_labels 1 3 5 7 9 \\
        --reference_dataset_name data/digits --reference_label_column label \\
        --fid_features classifier --output_dir outputs/digits-pu/evaluation

Text-to-image models are scored on images made from prompts (or from a CSV of
prompts with I2P's columns), with zero-shot CLIP (a normal text against a
sensitive one), any image classifier, or NudeNet (--judge nudenet):

    python evaluate.py text-to-image --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora sd-pu-lora --prompt "a photo of a dog" --images_per_prompt 50 \
        --clip_model openai/clip-vit-large-patch14 --normal_text "a photo of a cat" \
        --sensitive_text "a photo of a dog" --clip_score --output_dir sd-pu-lora/evaluation

The output folder gets ``metrics.json`` (written last, so a folder holding it
is complete), ``samples.png``, and tables to find what still leaks:
``per_class.csv`` (unconditional: samples per predicted class), or
``per_prompt.csv`` (rate and CLIP score of each prompt), ``per_image.csv``
(each image's seed, the judge's sensitive probability and its verdict) and
``results.md`` (the rate with its 95% interval, over all prompts and per
category, beside --baseline_metrics's).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pu_diffusion.checks import check_writable
from pu_diffusion.classifier import (
    check_classifier_quality,
    classifier_info,
    load_classifier,
    sensitive_class_ids,
    train_classifier,
)
from pu_diffusion.errors import InputError, read_json
from pu_diffusion.flags import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, UNIT_INTERVAL, show_ranges
from pu_diffusion.metrics import (
    channel_conversion,
    check_reference_matches,
    compute_fid,
    fid_of_each_group,
    judge_images,
    load_reference_images,
    make_fid,
    score_images,
)
from pu_diffusion.nudity import DEFAULT_THRESHOLD, EXPOSED_CLASSES, check_nudenet
from pu_diffusion.outputs import image_grid, write_json_atomically
from pu_diffusion.pipelines import (
    DTYPES,
    attention_processors,
    default_device,
    default_dtype,
    generate_from_prompts,
    generate_samples,
    load_text_to_image_pipeline,
    load_unconditional_pipeline,
    sample_shape,
)
from pu_diffusion.prompt_sets import Prompt, read_prompt_file
from pu_diffusion.reports import (
    class_rows,
    group_rows,
    image_rows,
    package_versions,
    prompt_rows,
    prompt_summaries,
    results_markdown,
    sampling_settings,
    write_csv,
)

logger = logging.getLogger("evaluate")

SCHEDULERS = ("ddpm", "ddim")
FID_FEATURES = ("inception", "classifier", "none")
METRICS_FILE = "metrics.json"
PER_CLASS_FILE, PER_PROMPT_FILE, PER_IMAGE_FILE = "per_class.csv", "per_prompt.csv", "per_image.csv"
RESULTS_FILE = "results.md"
JUDGES = ("clip", "classifier", "nudenet")


# --------------------------------------------------------------------------- arguments


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="A trained pipeline: a folder or a Hub id.")
    parser.add_argument("--num_samples", type=POSITIVE_INT, default=None, help="Default: as many as reference images.")
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=250, help="Samples generated per forward pass.")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="ddpm samples as trained.")
    parser.add_argument("--num_inference_steps", type=POSITIVE_INT, default=None, help="Default: 50, or T for ddpm.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")


def add_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--classifier", required=True, help="An image-classification model (folder or Hub id) for the rate."
    )
    parser.add_argument(
        "--sensitive_labels", nargs="+", required=True, help="Which of the classifier's labels are sensitive."
    )
    add_weak_classifier_flag(parser)


def add_weak_classifier_flag(parser) -> None:
    parser.add_argument(
        "--allow_weak_classifier",
        action="store_true",
        help="Score with a classifier whose recorded test results are near chance (refused by default).",
    )


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference_dataset_name", default=None, help="Held-out images for FID (Hub id or folder).")
    parser.add_argument("--reference_data_dir", default=None, help="... or an image folder.")
    parser.add_argument("--reference_split", default="test", help="Split of --reference_dataset_name.")
    parser.add_argument("--reference_image_column", default="image")
    parser.add_argument(
        "--reference_label_column",
        default=None,
        help="Drop the images whose label is in --sensitive_labels, keeping a normal-only reference (the paper's).",
    )
    parser.add_argument(
        "--fid_features",
        choices=FID_FEATURES,
        default="inception",
        help="inception: the standard FID (needs torch-fidelity and a download of its weights once); "
        "classifier: the classifier's penultimate features, reported as classifier_fid, works offline.",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train-classifier", help="Train and save an image classifier on a labeled dataset.")
    train.add_argument("--dataset_name", default=None, help="Labeled dataset: Hub id or local folder.")
    train.add_argument("--train_data_dir", default=None, help="... or an image folder (labels from sub-folders).")
    train.add_argument("--image_column", default="image")
    train.add_argument("--label_column", default="label")
    train.add_argument("--train_split", default="train")
    train.add_argument("--test_split", default="test", help="Split whose accuracy is reported.")
    train.add_argument(
        "--image_size", type=POSITIVE_INT, default=32, help="Images are resized to this before the network."
    )
    train.add_argument("--num_epochs", type=POSITIVE_INT, default=30)
    train.add_argument("--batch_size", type=POSITIVE_INT, default=64)
    train.add_argument("--learning_rate", type=POSITIVE_FLOAT, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output_dir", required=True)

    unconditional = commands.add_parser("unconditional", help="Score samples of an unconditional pipeline.")
    add_sampling_arguments(unconditional)
    add_classifier_arguments(unconditional)
    add_reference_arguments(unconditional)
    unconditional.add_argument("--grid_size", type=POSITIVE_INT, default=100, help="Samples shown in samples.png.")
    unconditional.add_argument("--output_dir", required=True)

    add_text_to_image_parser(commands)
    for subparser in commands.choices.values():
        show_ranges(subparser)

    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except InputError as error:
        parser.error(str(error))
    return args


def add_text_to_image_parser(commands) -> None:
    parser = commands.add_parser("text-to-image", help="Score images a text-to-image pipeline makes from prompts.")
    parser.add_argument("--pipeline", required=True, help="The base pipeline or a full fine-tune (folder or Hub id).")
    parser.add_argument("--lora", default=None, help="LoRA weights (folder or Hub id) loaded into --pipeline.")
    parser.add_argument("--prompt", nargs="+", default=None, help="Prompts to generate from.")
    parser.add_argument(
        "--prompt_file",
        default=None,
        help="... or a text file, one prompt per line, or a .csv with a prompt column and, as I2P has them,"
        " sd_seed, sd_guidance_scale and categories (each row drawn with its seed and guidance; rates per category).",
    )
    parser.add_argument("--images_per_prompt", type=POSITIVE_INT, default=10)
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=8, help="Images generated per forward pass.")
    parser.add_argument("--num_inference_steps", type=POSITIVE_INT, default=30)
    parser.add_argument("--guidance_scale", type=NON_NEGATIVE_FLOAT, default=7.5)
    parser.add_argument("--resolution", type=POSITIVE_INT, default=None, help="Image size. Default: the pipeline's.")
    parser.add_argument(
        "--max_sequence_length",
        type=POSITIVE_INT,
        default=None,
        help="SD3: T5's tokens per prompt. Default: the pipeline's 256, or its T5 tokenizer's length where shorter.",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: float16 on cuda, else float32.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    judge = parser.add_argument_group("what counts as sensitive: zero-shot CLIP, an image classifier, or NudeNet")
    judge.add_argument(
        "--judge",
        choices=JUDGES,
        default=None,
        help="Default: clip with --clip_model, classifier with --classifier. nudenet: NudeNet's detector"
        " (pip install -r requirements-nudenet.txt).",
    )
    judge.add_argument("--clip_model", default=None, help="A CLIP model (folder or Hub id) for the zero-shot rate.")
    judge.add_argument("--normal_text", nargs="+", default=None, help="Texts describing normal images.")
    judge.add_argument("--sensitive_text", nargs="+", default=None, help="Texts describing sensitive images.")
    judge.add_argument("--classifier", default=None, help="... or an image-classification model.")
    judge.add_argument("--sensitive_labels", nargs="+", default=None, help="With --classifier: its sensitive labels.")
    add_weak_classifier_flag(judge)
    judge.add_argument("--clip_score", action="store_true", help="Also the CLIP score of each image and its prompt.")
    judge.add_argument(
        "--nudenet_classes",
        nargs="+",
        default=list(EXPOSED_CLASSES),
        help="With --judge nudenet: the detector classes that make an image sensitive (default: the eight exposed"
        " classes erasure papers count).",
    )
    judge.add_argument(
        "--nudenet_threshold",
        type=UNIT_INTERVAL,
        default=DEFAULT_THRESHOLD,
        help="With --judge nudenet: the lowest detection score that counts.",
    )
    parser.add_argument(
        "--baseline_metrics",
        default=None,
        help="metrics.json of another text-to-image evaluation on the same prompts (the base model's): results.md"
        " shows its rates beside these.",
    )
    parser.add_argument(
        "--grid_images_per_prompt", type=POSITIVE_INT, default=4, help="Images per prompt in samples.png."
    )
    fid = parser.add_argument_group("FID of all the images made, against reference images (optional)")
    add_reference_arguments(fid)
    parser.add_argument("--output_dir", required=True)


def check_prompt_and_judge_arguments(args: argparse.Namespace) -> None:
    """Reads the prompts into ``args.prompt_set`` (and their texts into ``args.prompt``) and settles
    ``args.judge``."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise InputError("give the prompts with --prompt or --prompt_file (one of them)")
    if args.prompt_file is not None:
        if not Path(args.prompt_file).is_file():
            raise InputError(f"--prompt_file {args.prompt_file}: no such file")
        args.prompt_set = read_prompt_file(args.prompt_file)
        args.prompt = [prompt.text for prompt in args.prompt_set]
    else:
        args.prompt_set = [Prompt(text) for text in args.prompt]
    if args.baseline_metrics is not None:
        read_baseline_groups(args.baseline_metrics)
    check_judge_arguments(args)


def check_judge_arguments(args: argparse.Namespace) -> None:
    uses_clip, uses_classifier = args.clip_model is not None, args.classifier is not None
    if args.judge == "nudenet":
        if uses_clip or uses_classifier:
            raise InputError(f"--judge nudenet and {'--clip_model' if uses_clip else '--classifier'}: give one judge")
        check_nudenet(args.nudenet_classes)
        if args.clip_score:
            raise InputError("--clip_score needs --clip_model (the CLIP judge)")
        return
    if uses_clip == uses_classifier:
        raise InputError(
            "the rate needs one judge: --clip_model with --normal_text/--sensitive_text, --classifier, or"
            " --judge nudenet"
        )
    inferred = "clip" if uses_clip else "classifier"
    if args.judge not in (None, inferred):
        raise InputError(f"--judge {args.judge} needs --{'clip_model' if args.judge == 'clip' else 'classifier'}")
    args.judge = inferred
    if uses_clip and not (args.normal_text and args.sensitive_text):
        raise InputError("--clip_model needs --normal_text and --sensitive_text for the zero-shot rate")
    if uses_classifier and not args.sensitive_labels:
        raise InputError("--classifier needs --sensitive_labels")
    if args.clip_score and not uses_clip:
        raise InputError("--clip_score needs --clip_model")
    if args.fid_features == "classifier" and has_reference(args) and not uses_classifier:
        raise InputError("--fid_features classifier needs --classifier (its features are the FID's)")


def read_baseline_groups(path: str) -> list[dict]:
    """The rate groups of --baseline_metrics, an earlier evaluation's metrics.json."""
    if not Path(path).is_file():
        raise InputError(f"--baseline_metrics {path}: no such file")
    metrics = read_json(path, "--baseline_metrics")
    if not isinstance(metrics, dict) or "groups" not in metrics:
        raise InputError(f"--baseline_metrics {path}: not the metrics.json of an evaluate.py text-to-image run")
    return metrics["groups"]


def has_reference(args: argparse.Namespace) -> bool:
    return args.reference_dataset_name is not None or args.reference_data_dir is not None


def check_arguments(args: argparse.Namespace) -> None:
    check_writable(Path(args.output_dir))
    if getattr(args, "classifier", None) is not None:
        check_classifier_quality(args.classifier, args.allow_weak_classifier)
    if args.command == "text-to-image":
        check_prompt_and_judge_arguments(args)
        return  # without a reference no FID is computed, whatever --fid_features says
    if args.command == "train-classifier":
        if args.dataset_name is None and args.train_data_dir is None:
            raise InputError("train-classifier needs --dataset_name or --train_data_dir")
        return
    if args.fid_features != "none" and not has_reference(args):
        raise InputError(
            f"--fid_features {args.fid_features} needs --reference_dataset_name or --reference_data_dir "
            "(or --fid_features none)"
        )
    if args.num_samples is None and not has_reference(args):
        raise InputError("--num_samples is needed when there is no reference dataset to take the count from")


# --------------------------------------------------------------------------- sampling


# --------------------------------------------------------------------------- FID


# --------------------------------------------------------------------------- the evaluation


def evaluate_unconditional(args: argparse.Namespace) -> dict:
    device = default_device(args.device)
    classifier = load_classifier(args.classifier, device)
    sensitive_ids = sensitive_class_ids(classifier, args.sensitive_labels)
    pipeline = load_unconditional_pipeline(args.pipeline, args.scheduler, device)
    conversion = channel_conversion(sample_shape(pipeline)[0], classifier.channels)
    if conversion:
        logger.warning("%s", conversion)
    reference, reference_info = (None, None)
    if has_reference(args):
        reference, reference_info = load_reference_images(args)
        check_reference_matches(reference, sample_shape(pipeline), reference_info["source"])
    fid, fid_name = make_fid(args.fid_features, classifier) if args.fid_features != "none" else (None, None)

    num_samples = args.num_samples or len(reference)
    steps = args.num_inference_steps or (
        50 if args.scheduler == "ddim" else pipeline.scheduler.config.num_train_timesteps
    )
    samples, samples_per_second = generate_samples(pipeline, num_samples, args.batch_size, steps, args.seed)
    # Samples stay on the CPU; the classifier and the FID move each batch to the device.
    metrics = score_images(classifier, samples, sensitive_ids, args.batch_size)
    if fid is not None:
        metrics[fid_name] = compute_fid(fid, args.fid_features, samples, reference, 500, device)
    metrics.update(
        num_samples=num_samples,
        samples_per_second=samples_per_second,
        classifier=classifier_info(args.classifier, sensitive_ids, classifier.labels),
        reference=reference_info,
        settings=sampling_settings(args, steps, device),
        attention=attention_processors(pipeline.unet),
        versions=package_versions(),
    )
    if conversion:
        metrics["channel_conversion"] = conversion
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image_grid(samples[: args.grid_size].permute(0, 2, 3, 1).numpy()).save(output_dir / "samples.png")
    sensitive_labels = metrics["classifier"]["sensitive_labels"]
    write_csv(output_dir / PER_CLASS_FILE, class_rows(metrics["prediction_counts"], sensitive_labels))
    write_json_atomically(output_dir / METRICS_FILE, metrics)
    return metrics


# --------------------------------------------------------------------------- text-to-image


def evaluate_text_to_image(args: argparse.Namespace) -> dict:
    device = default_device(args.device)
    pipeline = load_text_to_image_pipeline(args, device, default_dtype(args.dtype, device))
    images, images_per_second, origins = generate_from_prompts(pipeline, args, device, args.prompt_set)
    prompts = [args.prompt[origin.prompt_index] for origin in origins]
    judgement = judge_images(args, images, prompts, device)
    per_prompt = prompt_rows(args.prompt_set, judgement, args.images_per_prompt)
    groups = group_rows(args.prompt_set, judgement, args.images_per_prompt)
    fid, prompt_fids = text_to_image_fid(args, images, device)
    metrics = {
        "non_sensitive_rate": 1.0 - judgement.sensitive.float().mean().item(),
        "non_sensitive_rate_ci95": [groups[0]["ci95_low"], groups[0]["ci95_high"]],
        "groups": groups,
        "per_prompt": prompt_summaries(per_prompt, judgement, args.images_per_prompt, prompt_fids),
        **judgement.info,
        **fid,
        "num_images": len(images),
        "images_per_second": images_per_second,
        "settings": sampling_settings(args, args.num_inference_steps, device),
        "versions": package_versions(),
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shown = min(args.grid_images_per_prompt, args.images_per_prompt)
    grid = images.view(len(args.prompt), args.images_per_prompt, *images.shape[1:])[:, :shown].flatten(0, 1)
    image_grid(grid.permute(0, 2, 3, 1).numpy(), columns=shown).save(output_dir / "samples.png")
    write_csv(output_dir / PER_PROMPT_FILE, per_prompt)
    write_csv(output_dir / PER_IMAGE_FILE, image_rows(args.prompt_set, origins, judgement, args.guidance_scale))
    baseline = read_baseline_groups(args.baseline_metrics) if args.baseline_metrics is not None else None
    (output_dir / RESULTS_FILE).write_text(results_markdown(groups, baseline))
    write_json_atomically(output_dir / METRICS_FILE, metrics)
    return metrics


def text_to_image_fid(args: argparse.Namespace, images, device: str) -> tuple[dict, list[dict] | None]:
    """({fid or classifier_fid: of all the images, reference: what it was}, [{the same name: each prompt's}]),
    or ({}, None) without a reference."""
    if not has_reference(args) or args.fid_features == "none":
        return {}, None
    reference, reference_info = load_reference_images(args)
    check_reference_matches(reference, tuple(images.shape[1:]), reference_info["source"])
    classifier = load_classifier(args.classifier, device) if args.fid_features == "classifier" else None
    fid, fid_name = make_fid(args.fid_features, classifier)
    # One metric, so the reference's features are computed once: all the images, then each prompt's.
    groups = [images, *images.split(args.images_per_prompt)]
    overall, *per_prompt = fid_of_each_group(fid, args.fid_features, groups, reference, 500, device)
    return {fid_name: overall, "reference": reference_info}, [{fid_name: value} for value in per_prompt]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        if args.command == "train-classifier":
            metrics = train_classifier(args)
            print(f"test accuracy {metrics['test_accuracy']:.4f}; classifier saved to {args.output_dir}")
        else:
            evaluation = evaluate_unconditional if args.command == "unconditional" else evaluate_text_to_image
            metrics = evaluation(args)
            shown = ("non_sensitive_rate", "fid", "classifier_fid", "clip_score")
            summary = {key: metrics[key] for key in shown if key in metrics}
            print(json.dumps(summary), f"-> {Path(args.output_dir) / METRICS_FILE}")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
