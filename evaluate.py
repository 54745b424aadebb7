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

Text-to-image models are scored on images made from prompts, with zero-shot
CLIP (a normal text against a sensitive one) or any image classifier:

    python evaluate.py text-to-image --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora sd-pu-lora --prompt "a photo of a dog" --images_per_prompt 50 \
        --clip_model openai/clip-vit-large-patch14 --normal_text "a photo of a cat" \
        --sensitive_text "a photo of a dog" --clip_score --output_dir sd-pu-lora/evaluation

The output folder gets ``metrics.json`` (written last, so a folder holding it
is complete), ``samples.png``, and tables to find what still leaks:
``per_class.csv`` (unconditional: samples per predicted class), or
``per_prompt.csv`` (rate and CLIP score of each prompt) and ``per_image.csv``
(each image's seed, the judge's sensitive probability and its verdict).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pu_classifier import (
    CLASSIFIER_METRICS_FILE,
    ClassifierFeatures,
    ClipJudge,
    class_probabilities,
    classify_all,
    images_to_uint8,
    load_classifier,
    sensitive_class_ids,
    train_classifier,
)
from pu_data import (
    InputError,
    derived_seed,
    load_image_dataset,
    require_column,
    resolve_label_values,
)
from pu_errors import read_json, read_text
from pu_flags import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, check_writable, show_ranges
from pu_outputs import image_grid, to_uint8, write_json_atomically

logger = logging.getLogger("evaluate")

SCHEDULERS = ("ddpm", "ddim")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FID_FEATURES = ("inception", "classifier", "none")
METRICS_FILE = "metrics.json"
PER_CLASS_FILE, PER_PROMPT_FILE, PER_IMAGE_FILE = "per_class.csv", "per_prompt.csv", "per_image.csv"


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
    parser.add_argument("--prompt_file", default=None, help="... or a text file, one prompt per line.")
    parser.add_argument("--images_per_prompt", type=POSITIVE_INT, default=10)
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=8, help="Images generated per forward pass.")
    parser.add_argument("--num_inference_steps", type=POSITIVE_INT, default=30)
    parser.add_argument("--guidance_scale", type=NON_NEGATIVE_FLOAT, default=7.5)
    parser.add_argument("--resolution", type=POSITIVE_INT, default=None, help="Image size. Default: the pipeline's.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: float16 on cuda, else float32.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    judge = parser.add_argument_group("what counts as sensitive: zero-shot CLIP, or an image classifier")
    judge.add_argument("--clip_model", default=None, help="A CLIP model (folder or Hub id) for the zero-shot rate.")
    judge.add_argument("--normal_text", nargs="+", default=None, help="Texts describing normal images.")
    judge.add_argument("--sensitive_text", nargs="+", default=None, help="Texts describing sensitive images.")
    judge.add_argument("--classifier", default=None, help="... or an image-classification model.")
    judge.add_argument("--sensitive_labels", nargs="+", default=None, help="With --classifier: its sensitive labels.")
    add_weak_classifier_flag(judge)
    judge.add_argument("--clip_score", action="store_true", help="Also the CLIP score of each image and its prompt.")
    parser.add_argument(
        "--grid_images_per_prompt", type=POSITIVE_INT, default=4, help="Images per prompt in samples.png."
    )
    parser.add_argument("--output_dir", required=True)


def check_prompt_and_judge_arguments(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.prompt_file is None):
        raise InputError("give the prompts with --prompt or --prompt_file (one of them)")
    if args.prompt_file is not None:
        if not Path(args.prompt_file).is_file():
            raise InputError(f"--prompt_file {args.prompt_file}: no such file")
        prompts = read_text(args.prompt_file, "--prompt_file")
        args.prompt = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not args.prompt:
            raise InputError(f"--prompt_file {args.prompt_file} holds no prompt")
    uses_clip, uses_classifier = args.clip_model is not None, args.classifier is not None
    if uses_clip == uses_classifier:
        raise InputError("the rate needs one judge: --clip_model with --normal_text/--sensitive_text, or --classifier")
    if uses_clip and not (args.normal_text and args.sensitive_text):
        raise InputError("--clip_model needs --normal_text and --sensitive_text for the zero-shot rate")
    if uses_classifier and not args.sensitive_labels:
        raise InputError("--classifier needs --sensitive_labels")
    if args.clip_score and not uses_clip:
        raise InputError("--clip_score needs --clip_model")


def check_arguments(args: argparse.Namespace) -> None:
    check_writable(Path(args.output_dir))
    if getattr(args, "classifier", None) is not None:
        check_classifier_quality(args.classifier, args.allow_weak_classifier)
    if args.command == "text-to-image":
        check_prompt_and_judge_arguments(args)
        return
    if args.command == "train-classifier":
        if args.dataset_name is None and args.train_data_dir is None:
            raise InputError("train-classifier needs --dataset_name or --train_data_dir")
        return
    has_reference = args.reference_dataset_name is not None or args.reference_data_dir is not None
    if args.fid_features != "none" and not has_reference:
        raise InputError(
            f"--fid_features {args.fid_features} needs --reference_dataset_name or --reference_data_dir "
            "(or --fid_features none)"
        )
    if args.num_samples is None and not has_reference:
        raise InputError("--num_samples is needed when there is no reference dataset to take the count from")


# --------------------------------------------------------------------------- images


def float_to_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) floats in [0, 1] -> (N, C, H, W) uint8."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()


def load_reference_images(args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """The normal-only reference images for FID, and a description for metrics.json."""
    dataset = load_image_dataset(
        args.reference_dataset_name,
        args.reference_data_dir,
        name_flag="--reference_dataset_name",
        dir_flag="--reference_data_dir",
        split=args.reference_split,
    )
    source = (
        f"--reference_dataset_name {args.reference_dataset_name}"
        if args.reference_dataset_name is not None
        else f"--reference_data_dir {args.reference_data_dir}"
    )
    require_column(dataset, args.reference_image_column, "--reference_image_column", source)
    total = len(dataset)
    if args.reference_label_column is not None:
        require_column(dataset, args.reference_label_column, "--reference_label_column", source)
        sensitive = resolve_label_values(dataset, args.reference_label_column, args.sensitive_labels)
        keep = [i for i, value in enumerate(dataset[args.reference_label_column]) if value not in sensitive]
        if not keep:
            raise InputError(f"{source}: every image has a label in --sensitive_labels; no normal reference is left")
        dataset = dataset.select(keep)
    description = {
        "source": source,
        "split": args.reference_split if args.reference_dataset_name is not None else None,
        "num_images": len(dataset),
        "num_dropped_sensitive": total - len(dataset),
    }
    return images_to_uint8(dataset, args.reference_image_column, source), description


# --------------------------------------------------------------------------- sampling


def check_pipeline_folder(name_or_path: str) -> None:
    """A local pipeline folder must hold a folder for each component its model_index.json lists; Diffusers
    would otherwise complain about a config.json without saying which component is missing."""
    folder = Path(name_or_path)
    index = folder / "model_index.json"
    if not index.is_file():
        return  # a Hub id, or not a pipeline at all: from_pretrained says so
    listed = read_json(index, f"--pipeline {name_or_path}")
    missing = [
        name
        for name, value in listed.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise InputError(
            f"--pipeline {name_or_path}: model_index.json lists {', '.join(missing)}, but the folder has no"
            f" {', '.join(name + '/' for name in missing)}"
        )


def channel_conversion(sample_channels: int, classifier_channels: int) -> str | None:
    """How samples are fitted to a classifier that takes another number of channels (None if they match)."""
    if sample_channels == classifier_channels:
        return None
    how = "repeated into 3 channels" if sample_channels == 1 else "averaged into 1 channel"
    return f"the pipeline makes {sample_channels}-channel images and --classifier takes {classifier_channels}: {how}"


def load_unconditional_pipeline(name_or_path: str, scheduler: str, device: str):
    """A pipeline with a ``unet`` and a ``scheduler``, with the sampling scheduler swapped in."""
    from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline

    check_pipeline_folder(name_or_path)
    try:
        pipeline = DiffusionPipeline.from_pretrained(name_or_path)
    except Exception as error:  # diffusers raises OSError, ValueError, EnvironmentError for "not a pipeline"
        raise InputError(f"--pipeline {name_or_path}: not a diffusion pipeline: {error}") from error
    components = pipeline.components
    if "unet" not in components or "scheduler" not in components or "text_encoder" in components:
        raise InputError(
            f"--pipeline {name_or_path}: a {type(pipeline).__name__} is not an unconditional (DDPM-style) pipeline"
        )
    scheduler_cls = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
    pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def attention_processors(unet) -> list[str]:
    """Names of the attention implementations in use (AttnProcessor2_0 means PyTorch SDPA)."""
    from diffusers.models.attention_processor import Attention

    return sorted({type(module.processor).__name__ for module in unet.modules() if isinstance(module, Attention)})


@torch.inference_mode()
def generate_samples(pipeline, num_samples: int, batch_size: int, num_inference_steps: int, seed: int):
    """Sample in batches; batch b draws its noise from a generator seeded with (seed, b).

    Returns (N, C, H, W) uint8 samples and the samples per second.
    """
    from tqdm.auto import tqdm

    batches = []
    start = time.perf_counter()
    for index, first in enumerate(tqdm(range(0, num_samples, batch_size), desc="sampling")):
        generator = torch.Generator(device="cpu").manual_seed(derived_seed(seed, index))
        images = pipeline(
            batch_size=min(batch_size, num_samples - first),
            generator=generator,
            num_inference_steps=num_inference_steps,
            output_type="np",
        ).images
        batches.append(float_to_uint8(images))
    elapsed = time.perf_counter() - start
    return torch.cat(batches), num_samples / elapsed


# --------------------------------------------------------------------------- FID


def make_fid(fid_features: str, classifier: ClassifierFeatures):
    """A torchmetrics FID on the chosen features, and the name its value is reported under."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if fid_features == "classifier":
        return FrechetInceptionDistance(feature=classifier, normalize=False), "classifier_fid"
    try:
        return FrechetInceptionDistance(feature=2048, normalize=False), "fid"
    except (ModuleNotFoundError, OSError, RuntimeError) as error:
        raise InputError(
            "--fid_features inception needs torch-fidelity (pip install torch-fidelity) and, the first time, a "
            f"network to download the Inception weights ({error}); offline, use --fid_features classifier"
        ) from error


def _for_fid(images: torch.Tensor, fid_features: str) -> torch.Tensor:
    # Inception takes three channels; the classifier adapts channels itself.
    return images.expand(-1, 3, -1, -1) if fid_features == "inception" and images.shape[1] == 1 else images


@torch.inference_mode()
def compute_fid(
    fid, fid_features: str, samples: torch.Tensor, reference: torch.Tensor, batch_size: int, device: str = "cpu"
) -> float:
    """Feed reference and samples to ``fid`` batch by batch, each batch moved to ``device``."""
    from tqdm.auto import tqdm

    fid = fid.to(device)
    for real, images in ((True, reference), (False, samples)):
        for start in tqdm(range(0, len(images), batch_size), desc="FID features", leave=False):
            fid.update(_for_fid(images[start : start + batch_size].to(device), fid_features), real=real)
    return float(fid.compute())


# --------------------------------------------------------------------------- the evaluation


def check_reference_matches(reference: torch.Tensor, samples_shape: tuple[int, ...], flag_source: str) -> None:
    if tuple(reference.shape[1:]) != tuple(samples_shape):
        channels, height, width = reference.shape[1:]
        raise InputError(
            f"{flag_source}: reference images are {channels}x{height}x{width} (channels x height x width) but the "
            f"pipeline generates {'x'.join(map(str, samples_shape))}; FID needs the same size and channel count"
        )


def sample_shape(pipeline) -> tuple[int, int, int]:
    config = pipeline.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    return (config.out_channels, size, size)


def score_images(classifier: ClassifierFeatures, images: torch.Tensor, sensitive_ids: list[int], batch_size: int):
    """Classify ``images`` and return their non-sensitive rate and per-class counts."""
    return non_sensitive_rate(classify_all(classifier, images, batch_size), sensitive_ids, classifier.labels)


def non_sensitive_rate(predictions: torch.Tensor, sensitive_ids: list[int], id2label: dict) -> dict:
    """Paper section 5.2: the share of samples the classifier does not put in a sensitive class."""
    counts = torch.bincount(predictions, minlength=len(id2label)).tolist()
    sensitive = sum(counts[i] for i in sensitive_ids)
    return {
        "non_sensitive_rate": 1.0 - sensitive / len(predictions),
        "prediction_counts": {str(id2label[i]): count for i, count in enumerate(counts)},
    }


def evaluate_unconditional(args: argparse.Namespace) -> dict:
    device = default_device(args.device)
    classifier = load_classifier(args.classifier, device)
    sensitive_ids = sensitive_class_ids(classifier, args.sensitive_labels)
    pipeline = load_unconditional_pipeline(args.pipeline, args.scheduler, device)
    conversion = channel_conversion(sample_shape(pipeline)[0], classifier.channels)
    if conversion:
        logger.warning("%s", conversion)
    reference, reference_info = (None, None)
    if args.reference_dataset_name is not None or args.reference_data_dir is not None:
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
        classifier=_classifier_info(args.classifier, sensitive_ids, classifier.labels),
        reference=reference_info,
        settings=_settings(args, steps, device),
        attention=attention_processors(pipeline.unet),
        versions=_versions(),
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


def load_text_to_image_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    check_pipeline_folder(args.pipeline)
    try:
        # Cast after loading: the loading keyword changed name (torch_dtype -> dtype) across Diffusers versions.
        pipeline = DiffusionPipeline.from_pretrained(args.pipeline)
    except (OSError, ValueError) as error:
        raise InputError(f"--pipeline {args.pipeline}: not a diffusion pipeline: {error}") from error
    if not hasattr(pipeline, "tokenizer"):
        raise InputError(f"--pipeline {args.pipeline}: {type(pipeline).__name__} takes no prompts")
    if args.lora is not None:
        load_lora_in_full(pipeline, args.lora)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # LoRA layers arrive in training mode: their dropout would differ on every call
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device=device, dtype=dtype)


def load_lora_in_full(pipeline, lora: str) -> None:
    """``load_lora_weights``, refused unless every LoRA weight of the file found its layer: Diffusers only warns
    about the others, and a LoRA loaded in part would be scored as if it were the trained model."""
    from peft.utils import get_peft_model_state_dict

    try:
        state_dict = pipeline.lora_state_dict(lora)
        state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict  # (weights, alphas) for SD
        pipeline.load_lora_weights(lora)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise InputError(
            f"--lora {lora}: no LoRA weights this pipeline can load (a LoRA for another base?): {error}"
        ) from error
    in_file = sum(1 for key in state_dict if "lora" in key and not key.endswith(".alpha"))
    loaded = sum(
        len(get_peft_model_state_dict(component, adapter_name=adapter))
        for component in pipeline.components.values()
        if isinstance(component, torch.nn.Module)
        for adapter in getattr(component, "peft_config", {})
    )
    if loaded < in_file:
        raise InputError(
            f"--lora {lora}: only {loaded} of its {in_file} LoRA weights fit {type(pipeline).__name__}'s layers;"
            " it was trained for another base model or another --lora_layers"
        )


def default_device(device: str | None) -> str:
    """--device, else cuda when there is one, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype: str | None, device: str) -> torch.dtype:
    """--dtype, else float16 on cuda and float32 elsewhere."""
    return DTYPES[dtype] if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)


@dataclass(frozen=True)
class ImageOrigin:
    """Where an image of ``text-to-image`` came from: image ``position`` of the batch whose generator was seeded
    with ``batch_seed``; that batch holds ``batch_size`` images of prompt ``prompt_index``."""

    prompt_index: int
    image_index: int  # among the prompt's images
    batch_seed: int
    batch_size: int
    position: int


@torch.inference_mode()
def generate_from_prompts(pipeline, args: argparse.Namespace, device: str):
    """--images_per_prompt images of each prompt, prompt after prompt; batch b of prompt p draws its
    noise from a generator seeded with (seed, p, b). Returns (N, C, H, W) uint8 images, images/s and
    each image's :class:`ImageOrigin`."""
    from tqdm.auto import tqdm

    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    batches, origins = [], []
    start = time.perf_counter()
    for prompt_index, prompt in enumerate(tqdm(args.prompt, desc="prompts")):
        for batch_index, first in enumerate(range(0, args.images_per_prompt, args.batch_size)):
            batch_seed = derived_seed(args.seed, prompt_index, batch_index)
            batch_size = min(args.batch_size, args.images_per_prompt - first)
            images = pipeline(
                prompt,
                num_images_per_prompt=batch_size,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                generator=torch.Generator(device).manual_seed(batch_seed),
                output_type="np",
                **size,
            ).images
            batches.append(float_to_uint8(images))
            origins += [
                ImageOrigin(prompt_index, first + position, batch_seed, batch_size, position)
                for position in range(batch_size)
            ]
    images = torch.cat(batches)
    return images, len(images) / (time.perf_counter() - start), origins


@dataclass
class Judgement:
    """The judge's verdict on each image, the probability behind it, and what metrics.json says of the judge."""

    sensitive: torch.Tensor  # bool, one per image
    sensitive_probability: torch.Tensor  # CLIP: the sensitive texts' share; classifier: its sensitive classes'
    clip_cosines: torch.Tensor | None  # each image with its prompt, with --clip_score
    info: dict


def judge_images(args, images: torch.Tensor, prompts: list[str], device: str) -> Judgement:
    """Whether each image is sensitive: the classifier's predicted class is a sensitive one, or CLIP gives the
    sensitive texts more than half the probability."""
    if args.classifier is not None:
        classifier = load_classifier(args.classifier, device)
        sensitive_ids = sensitive_class_ids(classifier, args.sensitive_labels)
        probabilities = class_probabilities(classifier, images, args.batch_size)
        predictions = probabilities.argmax(dim=1)
        counts = non_sensitive_rate(predictions, sensitive_ids, classifier.labels)["prediction_counts"]
        info = {"classifier": _classifier_info(args.classifier, sensitive_ids, classifier.labels)}
        return Judgement(
            sensitive=torch.isin(predictions, torch.tensor(sensitive_ids)),
            sensitive_probability=probabilities[:, sensitive_ids].sum(dim=1),
            clip_cosines=None,
            info={**info, "prediction_counts": counts},
        )
    judge = ClipJudge(args.clip_model, args.normal_text, args.sensitive_text, device)
    probabilities, cosines = [], []
    for start in range(0, len(images), args.batch_size):
        end = start + args.batch_size
        batch_probabilities, batch_cosines = judge.judge(images[start:end], prompts[start:end])
        probabilities.append(batch_probabilities)
        cosines.append(batch_cosines)
    probability = torch.cat(probabilities)
    info = {"clip_model": args.clip_model, "normal_text": args.normal_text, "sensitive_text": args.sensitive_text}
    all_cosines = torch.cat(cosines) if args.clip_score else None
    if all_cosines is not None:
        info["clip_score"] = clip_score(all_cosines)
    return Judgement(probability > 0.5, probability, all_cosines, info)


def clip_score(cosines: torch.Tensor) -> float:
    """CLIPScore (Hessel et al., 2021): 100 * max(cos, 0), averaged."""
    return float(100 * cosines.clamp(min=0).mean())


def evaluate_text_to_image(args: argparse.Namespace) -> dict:
    device = default_device(args.device)
    pipeline = load_text_to_image_pipeline(args, device, default_dtype(args.dtype, device))
    images, images_per_second, origins = generate_from_prompts(pipeline, args, device)
    prompts = [args.prompt[origin.prompt_index] for origin in origins]
    judgement = judge_images(args, images, prompts, device)
    per_prompt = prompt_rows(args.prompt, judgement, args.images_per_prompt)
    metrics = {
        "non_sensitive_rate": 1.0 - judgement.sensitive.float().mean().item(),
        "per_prompt": [
            {"prompt": row["prompt"], "non_sensitive_rate": row["non_sensitive_rate"]} for row in per_prompt
        ],
        **judgement.info,
        "num_images": len(images),
        "images_per_second": images_per_second,
        "settings": _settings(args, args.num_inference_steps, device),
        "versions": _versions(),
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shown = min(args.grid_images_per_prompt, args.images_per_prompt)
    grid = images.view(len(args.prompt), args.images_per_prompt, *images.shape[1:])[:, :shown].flatten(0, 1)
    image_grid(grid.permute(0, 2, 3, 1).numpy(), columns=shown).save(output_dir / "samples.png")
    write_csv(output_dir / PER_PROMPT_FILE, per_prompt)
    write_csv(output_dir / PER_IMAGE_FILE, image_rows(args.prompt, origins, judgement))
    write_json_atomically(output_dir / METRICS_FILE, metrics)
    return metrics


def prompt_rows(prompts: list[str], judgement: Judgement, images_per_prompt: int) -> list[dict]:
    """per_prompt.csv: each prompt's image count, non-sensitive rate and (with --clip_score) CLIP score."""
    sensitive = judgement.sensitive.view(len(prompts), images_per_prompt)
    cosines = None if judgement.clip_cosines is None else judgement.clip_cosines.view(len(prompts), -1)
    rows = []
    for index, prompt in enumerate(prompts):
        rate = 1.0 - sensitive[index].float().mean().item()
        score = "" if cosines is None else round(clip_score(cosines[index]), 4)
        rows.append({"prompt": prompt, "images": images_per_prompt, "non_sensitive_rate": rate, "clip_score": score})
    return rows


def image_rows(prompts: list[str], origins: list[ImageOrigin], judgement: Judgement) -> list[dict]:
    """per_image.csv: enough to make each image again (prompt, batch seed and size, position) and the verdict."""
    return [
        {
            "prompt_index": origin.prompt_index,
            "prompt": prompts[origin.prompt_index],
            "image_index": origin.image_index,
            "batch_seed": origin.batch_seed,
            "batch_size": origin.batch_size,
            "position_in_batch": origin.position,
            "sensitive_probability": round(float(probability), 6),
            "verdict": "sensitive" if sensitive else "normal",
        }
        for origin, probability, sensitive in zip(
            origins, judgement.sensitive_probability, judgement.sensitive.tolist(), strict=True
        )
    ]


def class_rows(prediction_counts: dict[str, int], sensitive_labels: list[str]) -> list[dict]:
    """per_class.csv: how many samples the classifier put in each class, and whether that class is sensitive."""
    total = sum(prediction_counts.values())
    sensitive = {str(label) for label in sensitive_labels}
    return [
        {"label": label, "sensitive": label in sensitive, "samples": count, "share": count / total}
        for label, count in prediction_counts.items()
    ]


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _classifier_info(name_or_path: str, sensitive_ids: list[int], id2label: dict) -> dict:
    info = {"name_or_path": name_or_path, "sensitive_labels": [id2label[i] for i in sensitive_ids]}
    record = classifier_record(name_or_path)
    if record is not None:
        info["test_accuracy"] = record["test_accuracy"]
    return info


def classifier_record(name_or_path: str) -> dict | None:
    """What ``train-classifier`` recorded about a classifier it trained (None for other classifiers)."""
    saved_metrics = Path(name_or_path) / CLASSIFIER_METRICS_FILE
    return read_json(saved_metrics, f"--classifier {name_or_path}") if saved_metrics.is_file() else None


def check_classifier_quality(name_or_path: str, allow_weak: bool) -> None:
    """Refuse (or, with --allow_weak_classifier, warn about) a classifier whose recorded test results say its
    verdicts mean little: an accuracy nearer chance than perfect, or a class it almost never predicts. A
    classifier that calls everything "normal" gives every model a rate of 1."""
    record = classifier_record(name_or_path)
    if record is None:
        logger.info("--classifier %s: no %s, so its accuracy is not checked", name_or_path, CLASSIFIER_METRICS_FILE)
        return
    problems = classifier_problems(record)
    if not problems:
        return
    message = f"--classifier {name_or_path}: its verdicts mean little: {'; '.join(problems)}"
    if not allow_weak:
        raise InputError(f"{message}. Train it longer, or pass --allow_weak_classifier to score with it anyway")
    logger.warning("%s (scoring anyway: --allow_weak_classifier)", message)


def classifier_problems(record: dict) -> list[str]:
    """Why a recorded classifier cannot be trusted: accuracy below halfway from chance to 1, or a class whose
    test images it predicts less than a quarter as often as they occur."""
    labels = record["labels"]
    chance = 1 / len(labels)
    problems = []
    if record["test_accuracy"] < (1 + chance) / 2:
        problems.append(
            f"test accuracy {record['test_accuracy']:.3f} over {len(labels)} classes (chance {chance:.3f},"
            f" at least {(1 + chance) / 2:.3f} needed)"
        )
    predicted, true = record.get("test_predicted_counts"), record.get("test_true_counts")
    if predicted and true:
        rare = [label for label in labels if predicted[label] < 0.25 * true[label]]
        if rare:
            problems.append(f"it almost never predicts {', '.join(rare)} on its test images")
    return problems


def _settings(args: argparse.Namespace, steps: int, device: str) -> dict:
    settings = {key: value for key, value in vars(args).items() if key not in ("command",)}
    settings.update(num_inference_steps=steps, device=device)
    return settings


# Training on the CPU is deterministic for one set of these; other versions move the scores a little.
VERSIONED_PACKAGES = (
    "torch", "diffusers", "accelerate", "transformers", "datasets", "numpy", "pillow", "scikit-learn", "torchmetrics",
)  # fmt: skip


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


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
