"""Stable Diffusion pieces shared by the script and the benchmarks: frozen models, their placement, the step."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from pu_diffusion.batches import CaptionedImages, ImageTransform, read_captions
from pu_diffusion.buckets import Bucketing
from pu_diffusion.errors import InputError
from pu_diffusion.latent_cache import CachedLatents
from pu_diffusion.objective import diffusion_target, risk_of_losses, set_prediction_type, weighted_losses
from pu_diffusion.run_setup import TrainingRun

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FrozenModels:
    """What turns a batch into latents and text states: the VAE, the text encoder(s) and their tokenizer(s).
    SDXL has a second tokenizer and text encoder (with projection), which SD lacks."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    weight_dtype: torch.dtype = torch.float32

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline

    def components(self) -> dict:
        """The frozen parts as pipeline components (``from_pretrained`` keyword arguments)."""
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if self.is_sdxl:
            return {**parts, "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        return {**parts, "safety_checker": None}


@dataclass(kw_only=True)
class TextToImageRun(TrainingRun):
    """The shared loop's parts plus the frozen models."""

    frozen: FrozenModels


def is_sdxl_pipeline(args: argparse.Namespace) -> bool:
    """Whether --pretrained_model_name_or_path is an SDXL pipeline (it has a second text encoder)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError) as error:
        raise InputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no model_index.json: {error}"
        ) from error
    return "text_encoder_2" in config


def load_models(args: argparse.Namespace) -> tuple[FrozenModels, torch.nn.Module, object]:
    """(frozen models, UNet, DDPM noise scheduler) of the pretrained SD or SDXL pipeline; the VAE from
    --pretrained_vae_model_name_or_path when given."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = args.pretrained_model_name_or_path
    sdxl = is_sdxl_pipeline(args)
    hub_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    weights = {**hub_kwargs, "variant": args.variant}
    try:
        frozen = FrozenModels(
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub_kwargs),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
            vae=load_vae(args),
        )
        if sdxl:
            frozen.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub_kwargs)
            frozen.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **weights
            )
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
    except (OSError, ValueError) as error:
        parts = "tokenizer(_2)/, text_encoder(_2)/" if sdxl else "tokenizer/, text_encoder/"
        raise InputError(
            f"--pretrained_model_name_or_path {source}: not a Stable Diffusion{' XL' if sdxl else ''} pipeline"
            f" with {parts}, vae/, unet/ and scheduler/: {error}"
        ) from error
    set_prediction_type(noise_scheduler, args)
    return frozen, unet, noise_scheduler


def load_vae(args: argparse.Namespace):
    """The pipeline's VAE, or --pretrained_vae_model_name_or_path (e.g. SDXL's fp16-safe VAE)."""
    from diffusers import AutoencoderKL

    if args.pretrained_vae_model_name_or_path is None:
        return AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder="vae",
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )
    try:
        return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        raise InputError(f"--pretrained_vae_model_name_or_path: not an AutoencoderKL: {error}") from error


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def place_models(unet, frozen: FrozenModels, device, mixed_precision: str, args) -> None:
    """Frozen weights in the mixed-precision dtype, trainable ones in float32 (sets ``frozen.weight_dtype``).

    The mode comes from the accelerator (``accelerate launch --mixed_precision``
    or ``--mixed_precision``), so either way of asking works. Trainable
    parameters stay float32 because the optimizer cannot update float16
    weights under a gradient scaler, and bfloat16 ones lose small updates.
    SDXL's own VAE stays float32, as in the official SDXL script (it
    overflows in float16); a --pretrained_vae_model_name_or_path one is cast.
    """
    from diffusers.training_utils import cast_training_params

    weight_dtype = weight_dtype_for(mixed_precision)
    frozen.weight_dtype = weight_dtype
    for model in (frozen.vae, frozen.text_encoder, frozen.text_encoder_2):
        if model is not None:
            model.requires_grad_(False)
            model.to(device, dtype=weight_dtype)
    if frozen.is_sdxl and args.pretrained_vae_model_name_or_path is None:
        frozen.vae.to(dtype=torch.float32)
    if args.use_lora:
        unet.to(device, dtype=weight_dtype)
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device)
    trained = f"LoRA rank {unet.peft_config['default'].r}" if args.use_lora else "the full UNet"
    logger.info("%s trained in float32, frozen weights in %s (VAE %s)", trained, weight_dtype, frozen.vae.dtype)


def sample_latents(frozen: FrozenModels, batches: list[dict], generator=None) -> torch.Tensor:
    """A draw from each image's VAE latent distribution, encoded now or taken from --cache_latents."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_parameters" in batches[0]:
        latent_dist = DiagonalGaussianDistribution(torch.cat([batch["latent_parameters"] for batch in batches]))
    else:
        pixel_values = torch.cat([batch["pixel_values"] for batch in batches])
        latent_dist = frozen.vae.encode(pixel_values.to(frozen.vae.dtype)).latent_dist
    return latent_dist.sample(generator=generator).float() * frozen.vae.config.scaling_factor


def training_step(run: TextToImageRun, unlabeled_batch, sensitive_batch, args, generator=None):
    """Eq. (20): the UNet's per-sample losses on U and S with their captions, then the PU risk.

    One forward over cat([U, S]) latents; with --aspect_ratio_buckets the U
    and S batches may come from buckets of different sizes, and then each
    gets its own forward (the risk only needs each image's loss).
    """
    batches = [unlabeled_batch] if sensitive_batch is None else [unlabeled_batch, sensitive_batch]
    one_size = len({image_size(batch) for batch in batches}) == 1
    groups = [batches] if one_size else [[batch] for batch in batches]
    losses, timesteps = zip(*(losses_of(run, group, args, generator) for group in groups), strict=True)
    num_unlabeled = len(unlabeled_batch["input_ids"])
    return risk_of_losses(run.loss, run.noise_scheduler, torch.cat(losses), torch.cat(timesteps), num_unlabeled)


def image_size(batch: dict) -> tuple[int, ...]:
    """The (height, width) of a batch's pixels or cached latents."""
    images = batch["latent_parameters"] if "latent_parameters" in batch else batch["pixel_values"]
    return tuple(images.shape[-2:])


def losses_of(run: TextToImageRun, batches: list[dict], args, generator=None):
    """(weighted l(x) per image, timesteps) of one UNet forward over the batches' images, of one size."""
    with torch.no_grad():
        latents = sample_latents(run.frozen, batches, generator)
        text_states, added_conditions = encode_prompts(run.frozen, batches)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if args.noise_offset:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device)
        noise = noise + args.noise_offset * offset
    num_timesteps = run.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = run.model(noisy, timesteps, text_states, added_cond_kwargs=added_conditions, return_dict=False)[0]
    target = diffusion_target(run.noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(run.noise_scheduler, timesteps, args.snr_gamma) if args.snr_gamma else None
    return weighted_losses(run.loss, model_pred.float(), target, weights), timesteps


def encode_prompts(frozen: FrozenModels, batches: list[dict]) -> tuple[torch.Tensor, dict | None]:
    """(text states, SDXL's added conditions). SD: the text encoder's last hidden states. SDXL, as its pipeline
    does: both encoders' penultimate hidden states side by side, the second's pooled projection, and the
    batch's time ids (original size, crop top-left, target size)."""
    input_ids = torch.cat([batch["input_ids"] for batch in batches])
    if not frozen.is_sdxl:
        return frozen.text_encoder(input_ids, return_dict=False)[0], None
    first = frozen.text_encoder(input_ids, output_hidden_states=True)
    second = frozen.text_encoder_2(torch.cat([batch["input_ids_2"] for batch in batches]), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.cat([batch["time_ids"] for batch in batches]).to(states.device)
    return states, {"text_embeds": second.text_embeds, "time_ids": time_ids}


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights, min(SNR, gamma) / SNR for epsilon (/ (SNR + 1) for v), one per sample.

    For epsilon the weight is written min(1, gamma / SNR): the same number, and
    at a zero-terminal-SNR schedule's last step (SNR = 0) it is 1, the limit
    its neighbours approach, where min(SNR, gamma) / SNR would be 0 / 0.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (snr_gamma / snr).clamp(max=1.0)
    clipped = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # sample prediction: an x0 loss is the epsilon loss divided by SNR


def captioned_dataset_factory(args, frozen: FrozenModels, bucketing: Bucketing | None = None):
    """``make_dataset`` for the shared loaders: images with their tokenized captions (for both tokenizers and
    with SDXL's size and crop conditioning when the base is SDXL), each at its bucket's size with
    --aspect_ratio_buckets."""
    transform = ImageTransform(args.resolution, 3, args.center_crop, args.random_flip, args.image_interpolation_mode)

    def token_ids(tokenizer, caption: str) -> torch.Tensor:
        return tokenizer(
            caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids[0]

    def tokenize(caption: str):
        if not frozen.is_sdxl:
            return token_ids(frozen.tokenizer, caption)
        return {
            "input_ids": token_ids(frozen.tokenizer, caption),
            "input_ids_2": token_ids(frozen.tokenizer_2, caption),
        }

    def make_dataset(dataset, seed: int, source: str):
        # S drawn from U's labeled dataset (--label_column) has U's caption column.
        column, flag = args.caption_column, "--caption_column"
        if source == "S" and args.label_column is None:
            column, flag = args.sensitive_caption_column, "--sensitive_caption_column"
        prompt = args.sensitive_prompt if source == "S" else None
        captions = read_captions(dataset, column, prompt, flag)
        return CaptionedImages(
            dataset,
            args.image_column,
            transform,
            captions,
            tokenize,
            micro_conditioning=frozen.is_sdxl,
            caption_dropout_rate=args.caption_dropout_rate,
            seed=seed,
            source=source,
            target_sizes=bucketing.target_sizes[source] if bucketing is not None else None,
        )

    return make_dataset


def assign_buckets(args, frozen: FrozenModels, unlabeled, sensitive) -> Bucketing | None:
    """Each image's --aspect_ratio_buckets bucket, from its file's header; None without the flag."""
    if args.aspect_ratio_buckets is None:
        return None
    vae_scale_factor = 2 ** (len(frozen.vae.config.block_out_channels) - 1)
    datasets = {"U": unlabeled, "S": sensitive}
    bucketing = Bucketing.of(args.aspect_ratio_buckets, vae_scale_factor, datasets, args.image_column)
    logger.info("--aspect_ratio_buckets: images per bucket: %s", bucketing.describe())
    return bucketing


def with_cached_latents(make_dataset, accelerator, vae, args):
    """``make_dataset`` whose images are encoded once by the VAE (--cache_latents); see latent_cache.py."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist.parameters

    def make_cached(dataset, seed: int, source: str):
        return CachedLatents(
            make_dataset(dataset, seed, source),
            encode,
            batch_size=args.train_batch_size,
            folder=args.output_dir,
            show_progress=accelerator.is_local_main_process,
        )

    return make_cached
