"""Where a trained model's diffusion loss went up: per group of labeled images and per band of noise levels.

    python benchmarks/loss_by_noise.py \
        unsupervised=outputs/benchmark/runs/unsupervised-seed0 pu=outputs/benchmark/runs/pu-seed0
    python benchmarks/loss_by_noise.py pu=outputs/benchmark-shapes/runs/pu-seed0 \
        --data_dir data/shapes --sensitive_labels triangle star ring   # the labels after the pipelines

For each pipeline, the mean per-sample loss l(x) of Eq. (8) on five groups
of a labeled dataset, the digits by default (the label split of the training
script with ``--seed`` and its default split counts: U's
normal and sensitive parts, S, and the normal and sensitive test images), in
three bands of timesteps. Every pipeline sees the same noise and timesteps.
A PU model that learned the concept raises the loss on the sensitive test
images, not only on S; where it raised it (low t: fine detail, high t: the
coarse shape that decides the class) tells why samples did or did not change.

With --text_to_image the same table for the text-to-image benchmark's models
(benchmarks/text_to_image_protocol.py): the groups come from its fine-tuning
shapes and its split (U = 64 normal + 16 sensitive, S = 20), each image is
the VAE's latent mean, every loss is conditioned on the generic caption, and
a NAME=FOLDER that holds LoRA weights is loaded onto --base_dir:

    python benchmarks/loss_by_noise.py --text_to_image --data_dir data/shapes32-finetune \
        --base_dir outputs/shapes-sd base=outputs/shapes-sd \
        pu=outputs/benchmark-text-to-image/runs/lora-pu-seed0

A Stable Diffusion 3 base (``prepare_text_to_image_base.py --family sd3``)
is read the way its training reads it: the bands are of sigma, drawn
uniformly inside each, on the rectified flow ``x = (1 - sigma) x_0 + sigma
noise``, and l(x) is the preconditioned error ``||x_0 - (x - sigma v)||^2``
that ``--precondition_outputs`` (the default) trains, the text states those
of the pipeline's own ``encode_prompt``. The first band lies below the S
terms' default noise band (SNR > 8.6 is sigma < 0.254).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from text_to_image_protocol import SPLIT_COUNTS  # the text-to-image benchmark's split

from pu_diffusion.flags import POSITIVE_INT, show_ranges
from pu_diffusion.shapes import GENERIC_CAPTION, SENSITIVE_SHAPES
from pu_diffusion.training_data import sensitive_mask, split_by_label

ROOT = Path(__file__).resolve().parent.parent

SENSITIVE_LABELS = ["1", "3", "5", "7", "9"]
BANDS = ((0, 100), (100, 400), (400, 1000))
#: Flow matching's noise levels: below the S terms' default band (sigma < 0.254), then three within it; the
#: noisiest, where the sampler decides the shape, is where the class is won or lost.
SIGMA_BANDS = ((0.0, 0.254), (0.254, 0.5), (0.5, 0.75), (0.75, 1.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="NAME=FOLDER of a trained pipeline (or LoRA run), one or more.")
    parser.add_argument(
        "--data_dir", default=str(ROOT / "data" / "digits"), help="A labeled dataset (prepare_*.py); the digits."
    )
    parser.add_argument(
        "--sensitive_labels",
        nargs="+",
        default=SENSITIVE_LABELS,
        help="The sensitive labels the models were trained with (default: the digits' odd ones). Ignored with"
        " --text_to_image, whose split is the benchmark's.",
    )
    parser.add_argument("--seed", type=int, default=0, help="The --seed the models were trained with (the split).")
    parser.add_argument("--draws", type=POSITIVE_INT, default=8, help="(t, noise) draws per image and band.")
    parser.add_argument(
        "--text_to_image", action="store_true", help="Stable Diffusion models of the text-to-image benchmark."
    )
    parser.add_argument("--base_dir", default=None, help="With --text_to_image: the base the LoRA runs load onto.")
    parser.add_argument(
        "--max_sequence_length",
        type=POSITIVE_INT,
        default=None,
        help="SD3 with T5: T5's tokens, as trained. Default: its tokenizer's length, at most 77 (the training"
        " script's default).",
    )
    show_ranges(parser)
    args = parser.parse_args(argv)
    if args.text_to_image and args.base_dir is None:
        parser.error("--text_to_image needs --base_dir, the base its LoRA runs load onto")
    for item in args.pipelines:
        if "=" not in item:
            parser.error(f"{item!r}: give pipelines as NAME=FOLDER")
    return args


def label_groups(data_dir: str, seed: int, sensitive_labels, mode: str | None, counts: dict) -> dict[str, torch.Tensor]:
    """The five groups as (N, C, H, W) tensors in [-1, 1]: U's normal and sensitive parts and S, drawn as the
    training script draws them (``counts``: its --num_* flags), and the test split's normal and sensitive.
    ``mode``: the PIL mode the model reads; None: grey images stay grey (the digits), others become RGB."""
    import datasets

    data = datasets.load_dataset(data_dir)
    train, test = data["train"], data["test"]
    if mode is None:
        mode = "L" if train[0]["image"].mode == "L" else "RGB"
    split = split_by_label(sensitive_mask(train, "label", sensitive_labels), seed=seed, **counts)
    test_sensitive = sensitive_mask(test, "label", sensitive_labels)

    def pixels(dataset, indices) -> torch.Tensor:
        arrays = [np.asarray(dataset[int(i)]["image"].convert(mode), dtype=np.float32) for i in indices]
        stacked = torch.from_numpy(np.stack(arrays))
        return (stacked[:, None] if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)) / 127.5 - 1.0

    return {
        "U normal": pixels(train, split.unlabeled_normal),
        "U sensitive": pixels(train, split.unlabeled_sensitive),
        "S": pixels(train, split.labeled_sensitive),
        "test normal": pixels(test, np.flatnonzero(~test_sensitive)),
        "test sensitive": pixels(test, np.flatnonzero(test_sensitive)),
    }


@torch.inference_mode()
def mean_loss(
    unet, scheduler, images: torch.Tensor, band: tuple[int, int], draws: int, seed: int, caption=None
) -> float:
    """Mean of l(x) = ||eps - eps_theta(x_t, t)||^2 (summed over pixels) over images and draws, t in ``band``;
    ``caption``: the text encoder's states of one caption, for every image."""
    generator = torch.Generator().manual_seed(seed)
    conditioning = {} if caption is None else {"encoder_hidden_states": caption.expand(len(images), -1, -1)}
    losses = []
    for _ in range(draws):
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(band[0], band[1], (len(images),), generator=generator)
        prediction = unet(scheduler.add_noise(images, noise, timesteps), timesteps, **conditioning).sample
        losses.append(((prediction - noise) ** 2).sum(dim=(1, 2, 3)))
    return torch.cat(losses).mean().item()


def unconditional_model(folder: str, groups: dict[str, torch.Tensor]):
    """(unet, scheduler, groups, caption) of a DDPM pipeline: the groups are its inputs as they are."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    return unet, DDPMScheduler.from_pretrained(folder, subfolder="scheduler"), groups, None


@torch.inference_mode()
def text_to_image_model(folder: str, base_dir: str | None, groups: dict[str, torch.Tensor]):
    """(unet, scheduler, latent groups, caption states) of a Stable Diffusion pipeline, or of LoRA weights
    loaded onto ``base_dir``: each image becomes its VAE latent mean, scaled as in training."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(base_dir if is_lora(folder) else folder)
    if is_lora(folder):
        pipeline.load_lora_weights(folder)
    vae = pipeline.vae

    def latents(images: torch.Tensor) -> torch.Tensor:
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor

    tokens = pipeline.tokenizer(GENERIC_CAPTION, padding="max_length", return_tensors="pt").input_ids
    caption = pipeline.text_encoder(tokens)[0]
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)  # the training script's noise
    latent_groups = {name: latents(images) for name, images in groups.items()}
    return pipeline.unet.eval(), scheduler, latent_groups, caption


def is_lora(folder: str) -> bool:
    return (Path(folder) / "pytorch_lora_weights.safetensors").is_file()


def is_flow_matching(pipeline_dir: str) -> bool:
    """Whether a pipeline folder is a Stable Diffusion 3 one (model_index.json names the class)."""
    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    return index["_class_name"].startswith("StableDiffusion3")


@torch.inference_mode()
def mean_flow_loss(transformer, images: torch.Tensor, band: tuple[float, float], draws: int, seed: int, caption):
    """Mean of l(x) = ||x_0 - (x_sigma - sigma v_theta)||^2 (summed over the latent) over images and draws,
    sigma uniform in ``band``; ``caption``: (text states, pooled projections) of one caption, for every image."""
    generator = torch.Generator().manual_seed(seed)
    states, pooled = (tensor.expand(len(images), *tensor.shape[1:]) for tensor in caption)
    losses = []
    for _ in range(draws):
        noise = torch.randn(images.shape, generator=generator)
        sigmas = band[0] + (band[1] - band[0]) * torch.rand(len(images), generator=generator)
        sigma = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - sigma) * images + sigma * noise
        velocity = transformer(
            hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=states, pooled_projections=pooled
        ).sample
        losses.append(((noisy - sigma * velocity - images) ** 2).sum(dim=(1, 2, 3)))
    return torch.cat(losses).mean().item()


@torch.inference_mode()
def sd3_model(folder: str, base_dir: str | None, groups: dict[str, torch.Tensor], max_sequence_length=None):
    """(transformer, latent groups, (text states, pooled projections) of the generic caption) of a Stable
    Diffusion 3 pipeline, or of LoRA weights loaded onto ``base_dir``; latents centred and scaled as trained."""
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(base_dir if is_lora(folder) else folder)
    if is_lora(folder):
        pipeline.load_lora_weights(folder)
    vae = pipeline.vae

    def latents(images: torch.Tensor) -> torch.Tensor:
        return (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor

    if max_sequence_length is None:
        t5_length = pipeline.tokenizer_3.model_max_length if pipeline.tokenizer_3 is not None else 77
        max_sequence_length = min(t5_length, 77)
    states, _, pooled, _ = pipeline.encode_prompt(
        GENERIC_CAPTION, GENERIC_CAPTION, GENERIC_CAPTION, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )  # fmt: skip
    latent_groups = {name: latents(images) for name, images in groups.items()}
    return pipeline.transformer.eval(), latent_groups, (states, pooled)


def band_losses(folder: str, args: argparse.Namespace, groups: dict[str, torch.Tensor], flow: bool):
    """{group (its size): [mean l in each band]} of one NAME=FOLDER pipeline; every model sees the same draws."""
    if flow:
        transformer, inputs, caption = sd3_model(folder, args.base_dir, groups, args.max_sequence_length)
        bands = SIGMA_BANDS

        def loss_in(images, band):
            return mean_flow_loss(transformer, images, band, args.draws, args.seed, caption)

    else:
        if args.text_to_image:
            unet, scheduler, inputs, caption = text_to_image_model(folder, args.base_dir, groups)
        else:
            unet, scheduler, inputs, caption = unconditional_model(folder, groups)
        bands = BANDS

        def loss_in(images, band):
            return mean_loss(unet, scheduler, images, band, args.draws, args.seed, caption)

    return {f"{group} ({len(images)})": [loss_in(images, band) for band in bands] for group, images in inputs.items()}


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.text_to_image:
        groups = label_groups(args.data_dir, args.seed, SENSITIVE_SHAPES, "RGB", SPLIT_COUNTS)
    else:
        groups = label_groups(args.data_dir, args.seed, args.sensitive_labels, None, {})
    flow = args.text_to_image and is_flow_matching(args.base_dir)
    if flow:
        header = " | ".join(f"sigma in [{low:g}, {high:g})" for low, high in SIGMA_BANDS)
    else:
        header = " | ".join(f"t in [{low}, {high})" for low, high in BANDS)
    lines = [f"| model | group | {header} |", "|" + " --- |" * (header.count("|") + 3)]
    print("\n".join(lines), flush=True)
    for item in args.pipelines:
        name, folder = item.split("=", 1)
        for group, values in band_losses(folder, args, groups, flow).items():
            lines.append(f"| {name} | {group} | " + " | ".join(f"{value:.2f}" for value in values) + " |")
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
