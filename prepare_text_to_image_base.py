"""Train a small Stable Diffusion pipeline from nothing, on a CPU: the text-to-image benchmark's base model.

    python prepare_text_to_image_base.py --output_dir models/shapes-sd
    python prepare_text_to_image_base.py --family sd3 --output_dir models/shapes-sd3   # SD3-shaped, flow matching

1. Writes the built-in shapes at 32 px with captions (prepare_shapes.py
   --captions): "a photo of a small dark blue star on stripes", or for some
   images only "a photo of a shape", so that this prompt draws all six shapes.
2. Builds the pipeline's parts from their configs (pu_diffusion/small_pipeline.py):
   a word tokenizer from the captions, a CLIP text encoder as initialised from
   --seed, a VAE trained here on the images, a UNet, a DDIM scheduler; saved
   with save_pretrained in --output_dir's sibling "<name>-init".
3. Trains the UNet with this project's own train_pu_text_to_image.py
   --loss_type unsupervised (full fine-tuning, Min-SNR weighting, a tenth of
   the captions dropped so that classifier-free guidance works), which
   writes the pipeline to --output_dir.

With --family sd3 the pipeline is SD3's shape instead: two CLIP text encoders
with projection and a T5 (all three small and untrained; T5's word tokenizer
is as long as the longest caption), a VAE whose latents are centred
(shift_factor), an MMDiT transformer trained by flow matching (the SD3
scripts' defaults; no Min-SNR, which is DDPM's) and a flow-matching
scheduler. It loads with StableDiffusion3Pipeline.from_pretrained; sample it
with max_sequence_length set to T5's length, as the training script and
evaluate.py do by themselves.

The result loads with StableDiffusionPipeline.from_pretrained as a Hub model
does, so the text-to-image script and evaluate.py take it as
--pretrained_model_name_or_path / --pipeline. Each stage that is already done
with the same settings is kept, so a second call costs nothing.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pu_diffusion.builtin_datasets import made_with, replace_folder, write_builtin_dataset
from pu_diffusion.checks import check_writable
from pu_diffusion.errors import InputError
from pu_diffusion.flags import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, UNIT_INTERVAL, show_ranges
from pu_diffusion.outputs import finished_model_file
from pu_diffusion.shapes import GENERIC_CAPTION, PARAPHRASES, write_shapes_dataset
from pu_diffusion.small_pipeline import (
    autoencoder,
    denoiser,
    flow_scheduler,
    flow_transformer,
    noise_scheduler,
    t5_encoder,
    t5_word_tokenizer,
    text_encoder,
    train_autoencoder,
    write_word_tokenizer,
)

logger = logging.getLogger(__name__)
RESOLUTION = 32
INIT_SETTINGS = "base_settings.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="models/shapes-sd", help="Where the trained pipeline is written.")
    parser.add_argument("--data_dir", default="data/shapes32-captioned", help="Where the captioned shapes go.")
    parser.add_argument("--images_per_class", type=POSITIVE_INT, default=1000, help="Images of each shape.")
    parser.add_argument(
        "--generic_caption_share",
        type=UNIT_INTERVAL,
        default=0.3,
        help=f"Share of the images captioned only {GENERIC_CAPTION!r}.",
    )
    parser.add_argument("--vae_steps", type=NON_NEGATIVE_INT, default=1000, help="Steps of VAE training.")
    parser.add_argument(
        "--unet_steps", type=POSITIVE_INT, default=5000, help="Steps of the UNet's (SD3: transformer's) training."
    )
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=64, help="Images per step, VAE and UNet.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="The UNet's peak learning rate.")
    parser.add_argument(
        "--caption_dropout_rate",
        type=UNIT_INTERVAL,
        default=0.1,
        help="Share of captions dropped in UNet training, so that classifier-free guidance works.",
    )
    parser.add_argument(
        "--snr_gamma",
        type=POSITIVE_FLOAT,
        default=None,
        help="Min-SNR weighting of the UNet's loss (Hang et al., 2023): the noisy steps, where the shape is"
        " decided, weigh more than the fine detail. Default 5.0; DDPM's, refused with --family sd3.",
    )
    parser.add_argument(
        "--family",
        choices=("sd", "sd3"),
        default="sd",
        help="sd: a UNet trained as DDPM; sd3: an MMDiT transformer trained by flow matching.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Data, initialisations and training follow from it.")
    parser.add_argument(
        "--train_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="Everything after it goes to train_pu_text_to_image.py as given (last, so it overrides).",
    )
    show_ranges(parser)
    args = parser.parse_args(argv)
    if args.family == "sd3" and args.snr_gamma is not None:
        parser.error("--snr_gamma is DDPM's Min-SNR weighting; --family sd3 trains by flow matching")
    args.snr_gamma = args.snr_gamma or 5.0
    try:
        for flag in ("output_dir", "data_dir"):
            check_writable(Path(getattr(args, flag)), f"--{flag}")
    except InputError as error:
        parser.error(str(error))
    return args


def init_folder(args: argparse.Namespace) -> Path:
    output = Path(args.output_dir)
    return output.with_name(output.name + "-init")


def write_data(args: argparse.Namespace) -> None:
    settings = {
        "dataset": "shapes",
        "resolution": RESOLUTION,
        "images_per_class": args.images_per_class,
        "test_fraction": 0.2,
        "seed": args.seed,
        "captions": True,
        "generic_caption_share": args.generic_caption_share,
    }
    write_builtin_dataset(
        args.data_dir,
        settings,
        lambda folder: write_shapes_dataset(
            folder, RESOLUTION, args.images_per_class, 0.2, args.seed, args.generic_caption_share
        ),
    )


def init_settings(args: argparse.Namespace) -> dict:
    settings = {"data_dir": str(Path(args.data_dir).resolve()), "vae_steps": args.vae_steps, "seed": args.seed}
    return settings if args.family == "sd" else {**settings, "family": args.family, "t5": "caption words"}


def build_initial_pipeline(args: argparse.Namespace) -> Path:
    """The pipeline before UNet training (trained VAE, random UNet), or the one already built with these
    settings. Written beside its final place and renamed, so a stopped build leaves nothing that loads."""
    folder = init_folder(args)
    if made_with(folder, init_settings(args), INIT_SETTINGS, str(folder)):
        logger.info("keeping %s: built with the same settings", folder)
        return folder
    from datasets import load_dataset

    train = load_dataset(args.data_dir, split="train")
    captions = [*train["text"], *PARAPHRASES]
    with tempfile.TemporaryDirectory() as tokenizer_files:
        tokenizer = write_word_tokenizer(Path(tokenizer_files), captions)
    vae = autoencoder(args.seed)
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in train["image"]])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    sd3 = args.family == "sd3"
    error = train_autoencoder(vae, images, args.vae_steps, args.batch_size, args.seed, centre=sd3)
    logger.info("VAE: squared reconstruction error %.4f, scaling factor %.3f", error, vae.config.scaling_factor)
    pipeline = sd3_pipeline(tokenizer, captions, vae, args.seed) if sd3 else sd_pipeline(tokenizer, vae, args.seed)
    replace_folder(folder, init_settings(args), INIT_SETTINGS, pipeline.save_pretrained)
    return folder


def sd_pipeline(tokenizer, vae, seed: int):
    from diffusers import StableDiffusionPipeline

    encoder = text_encoder(len(tokenizer), tokenizer.model_max_length, seed)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=denoiser(encoder.config.hidden_size, seed),
        scheduler=noise_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd3_pipeline(tokenizer, captions: list[str], vae, seed: int):
    """Two CLIP encoders (with projection; the second from another seed) sharing the word tokenizer, and a T5
    whose word tokenizer is as long as the longest caption: the transformer's text stream is then about as
    long as its 64 image tokens, where a base without T5 would attend over 256 rows of zeros (the pipeline's
    default) and train four times slower."""
    from diffusers import StableDiffusion3Pipeline

    first = text_encoder(len(tokenizer), tokenizer.model_max_length, seed, with_projection=True)
    second = text_encoder(len(tokenizer), tokenizer.model_max_length, seed + 1, with_projection=True)
    t5_tokenizer = t5_word_tokenizer(captions)
    joint_width = first.config.hidden_size + second.config.hidden_size
    return StableDiffusion3Pipeline(
        transformer=flow_transformer(first.config.hidden_size, seed),
        scheduler=flow_scheduler(),
        vae=vae,
        text_encoder=first,
        tokenizer=tokenizer,
        text_encoder_2=second,
        tokenizer_2=tokenizer,
        text_encoder_3=t5_encoder(len(t5_tokenizer), joint_width, seed + 2),
        tokenizer_3=t5_tokenizer,
    )


def unet_training_command(args: argparse.Namespace, initial: Path) -> list[str]:
    """train_pu_text_to_image.py, full fine-tuning of the random UNet on every caption (no S: unsupervised)."""
    command = [sys.executable, str(Path(__file__).with_name("train_pu_text_to_image.py"))]
    command += ["--pretrained_model_name_or_path", str(initial), "--dataset_name", args.data_dir]
    command += ["--caption_column", "text", "--resolution", str(RESOLUTION), "--center_crop", "--cache_latents"]
    command += ["--loss_type", "unsupervised", "--train_batch_size", str(args.batch_size)]
    command += ["--learning_rate", str(args.learning_rate), "--lr_scheduler", "cosine", "--lr_warmup_steps", "200"]
    command += ["--max_train_steps", str(args.unet_steps), "--checkpointing_steps", "1000"]
    command += ["--checkpoints_total_limit", "1", "--logging_steps", "100", "--seed", str(args.seed)]
    command += ["--use_ema", "--ema_max_decay", "0.999", "--resume_from_checkpoint", "latest"]
    command += ["--caption_dropout_rate", str(args.caption_dropout_rate)]
    if args.family == "sd":  # Min-SNR is DDPM's; SD3 trains with the flow-matching defaults
        command += ["--snr_gamma", str(args.snr_gamma)]
    return command + ["--output_dir", args.output_dir, *args.train_args]


def main(args: argparse.Namespace) -> None:
    if finished_model_file(args.output_dir):
        print(f"kept {args.output_dir}: it already holds a trained pipeline")
        return
    write_data(args)
    initial = build_initial_pipeline(args)
    subprocess.run(unet_training_command(args, initial), check=True)
    if args.family == "sd3":
        from transformers import AutoTokenizer

        length = AutoTokenizer.from_pretrained(args.output_dir, subfolder="tokenizer_3").model_max_length
        print(f"wrote {args.output_dir}: StableDiffusion3Pipeline.from_pretrained({args.output_dir!r}),"
              f" sampled with max_sequence_length={length}")  # fmt: skip
    else:
        print(f"wrote {args.output_dir}: StableDiffusionPipeline.from_pretrained({args.output_dir!r})")


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    cli_args = parse_args()
    try:
        main(cli_args)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"error: the UNet's training stopped (exit code {error.returncode}); see above") from None
