"""Stable Diffusion pieces shared by the script and the benchmarks: frozen models, their placement, the step."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from pu_diffusion import flow_matching
from pu_diffusion.batches import CaptionedImages, ImageTransform, read_captions
from pu_diffusion.buckets import Bucketing
from pu_diffusion.errors import InputError
from pu_diffusion.flow_matching import FlowMatchingSettings, draw_sigmas
from pu_diffusion.frozen_models import FAMILIES, FrozenModels, PrecomputedTextStates, distinct_captions, encode_prompts
from pu_diffusion.latent_cache import CachedLatents
from pu_diffusion.objective import diffusion_target, noise_band, risk_in_band, set_prediction_type, weighted_losses
from pu_diffusion.pipelines import SD3_SAMPLING_SEQUENCE_LENGTH, absent_components, t5_sequence_length
from pu_diffusion.run_setup import TrainingRun
from pu_diffusion.sd3_flags import DEFAULT_MAX_SEQUENCE_LENGTH, check_family_flags

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TextToImageRun(TrainingRun):
    """The shared loop's parts plus the frozen models (and SD3's flow-matching flags)."""

    frozen: FrozenModels
    flow: FlowMatchingSettings | None = None


def pipeline_config(args: argparse.Namespace) -> dict:
    """--pretrained_model_name_or_path's model_index.json."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
    except (OSError, ValueError) as error:
        raise InputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no model_index.json: {error}"
        ) from error


def pipeline_family(config: dict, source: str) -> str:
    """sd, sdxl or sd3, from model_index.json; another pipeline is refused, naming the ones we train."""
    name = config.get("_class_name", "")
    if name in FAMILIES:
        return FAMILIES[name][0]
    if "transformer" not in config:  # a pipeline saved under a custom class name: SD or SDXL by its encoders
        return "sdxl" if "text_encoder_2" in config else "sd"
    raise InputError(
        f"--pretrained_model_name_or_path {source}: a {name or 'transformer'} pipeline; this script fine-tunes"
        f" {', '.join(FAMILIES)}"
    )


def has_component(config: dict, name: str) -> bool:
    """Whether model_index.json lists ``name`` with a class (SD3 saved without T5 lists [null, null])."""
    entry = config.get(name)
    return bool(entry) and entry[0] is not None


def load_models(args: argparse.Namespace) -> tuple[FrozenModels, torch.nn.Module, object]:
    """(frozen models, trained model, noise scheduler) of the pretrained SD, SDXL or SD3 pipeline: the UNet and
    DDPM's scheduler, or SD3's transformer and flow-matching scheduler. The VAE from
    --pretrained_vae_model_name_or_path when given."""
    source = args.pretrained_model_name_or_path
    config = pipeline_config(args)
    family = pipeline_family(config, source)
    check_family_flags(args, family)
    try:
        frozen, model, noise_scheduler = (
            load_sd3_models(args, config) if family == "sd3" else load_unet_models(args, family)
        )
    except (OSError, ValueError) as error:
        parts = {
            "sd": "tokenizer/, text_encoder/, vae/, unet/",
            "sdxl": "tokenizer(_2)/, text_encoder(_2)/, vae/, unet/",
            "sd3": "tokenizer(_2, _3)/, text_encoder(_2, _3)/, vae/, transformer/",
        }[family]
        raise InputError(
            f"--pretrained_model_name_or_path {source}: not a complete {family.upper()} pipeline with {parts}"
            f" and scheduler/: {error}"
        ) from error
    frozen.absent = absent_components(config)
    return frozen, model, noise_scheduler


def load_unet_models(args: argparse.Namespace, family: str):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = args.pretrained_model_name_or_path
    hub_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    weights = {**hub_kwargs, "variant": args.variant}
    frozen = FrozenModels(
        family=family,
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub_kwargs),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        vae=load_vae(args),
    )
    if family == "sdxl":
        frozen.tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub_kwargs)
        frozen.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **weights
        )
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
    set_prediction_type(noise_scheduler, args)
    return frozen, unet, noise_scheduler


def load_sd3_models(args: argparse.Namespace, config: dict):
    """SD3's two CLIPs (with projection), its T5 when the base has one, the transformer and the flow-matching
    scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    source = args.pretrained_model_name_or_path
    hub_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    weights = {**hub_kwargs, "variant": args.variant}
    transformer = SD3Transformer2DModel.from_pretrained(source, subfolder="transformer", **weights)
    frozen = FrozenModels(
        family="sd3",
        vae=load_vae(args),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub_kwargs),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", **weights),
        tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **hub_kwargs),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **weights),
        joint_attention_dim=transformer.config.joint_attention_dim,
        patch_size=transformer.config.patch_size,
        max_sequence_length=args.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
    )
    if has_component(config, "text_encoder_3"):
        from transformers import AutoTokenizer, T5EncoderModel

        frozen.tokenizer_3 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", **hub_kwargs)
        frozen.text_encoder_3 = T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **weights)
        if args.max_sequence_length is None:
            frozen.max_sequence_length = t5_sequence_length(frozen.tokenizer_3, DEFAULT_MAX_SEQUENCE_LENGTH)
    elif args.max_sequence_length is None:
        # The pipeline puts this many rows of zeros where T5's states go; training attends over as many.
        frozen.max_sequence_length = SD3_SAMPLING_SEQUENCE_LENGTH
    else:
        raise InputError(
            f"--max_sequence_length {args.max_sequence_length}: it sets T5's tokens, and"
            f" {source} has no text_encoder_3 (T5)"
        )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler", **hub_kwargs)
    return frozen, transformer, scheduler


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
    SDXL's and SD3's own VAEs stay float32, as in the official SDXL and SD3
    scripts (SDXL's overflows in float16); a --pretrained_vae_model_name_or_path
    one is cast.
    """
    from diffusers.training_utils import cast_training_params

    weight_dtype = weight_dtype_for(mixed_precision)
    frozen.weight_dtype = weight_dtype
    for model in (frozen.vae, *frozen.encoders()):
        model.requires_grad_(False)
        model.to(device, dtype=weight_dtype)
    if frozen.family in ("sdxl", "sd3") and args.pretrained_vae_model_name_or_path is None:
        frozen.vae.to(dtype=torch.float32)
    if args.use_lora:
        unet.to(device, dtype=weight_dtype)
        cast_training_params(unet, dtype=torch.float32)
    else:
        unet.to(device)
    trained = f"LoRA rank {unet.peft_config['default'].r}" if args.use_lora else f"the full {type(unet).__name__}"
    logger.info("%s trained in float32, frozen weights in %s (VAE %s)", trained, weight_dtype, frozen.vae.dtype)


def sample_latents(frozen: FrozenModels, batches: list[dict], generator=None) -> torch.Tensor:
    """A draw from each image's VAE latent distribution, encoded now or taken from --cache_latents."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_parameters" in batches[0]:
        latent_dist = DiagonalGaussianDistribution(torch.cat([batch["latent_parameters"] for batch in batches]))
    else:
        pixel_values = torch.cat([batch["pixel_values"] for batch in batches])
        latent_dist = frozen.vae.encode(pixel_values.to(frozen.vae.dtype)).latent_dist
    # SD3's VAE centres its latents (shift_factor) before scaling them; SD's and SDXL's have no shift.
    shift = frozen.vae.config.get("shift_factor") or 0.0
    return (latent_dist.sample(generator=generator).float() - shift) * frozen.vae.config.scaling_factor


def training_step(run: TextToImageRun, unlabeled_batch, sensitive_batch, args, generator=None):
    """Eq. (20): the model's per-sample losses on U and S with their captions, then the PU risk.

    One forward over cat([U, S]) latents; with --aspect_ratio_buckets the U
    and S batches may come from buckets of different sizes, and then each
    gets its own forward (the risk only needs each image's loss).
    """
    batches = [unlabeled_batch] if sensitive_batch is None else [unlabeled_batch, sensitive_batch]
    one_size = len({image_size(batch) for batch in batches}) == 1
    groups = [batches] if one_size else [[batch] for batch in batches]
    losses_of = flow_losses_of if run.frozen.is_sd3 else diffusion_losses_of
    losses, bands = zip(*(losses_of(run, group, args, generator) for group in groups), strict=True)
    in_band = None if bands[0] is None else torch.cat(bands)
    return risk_in_band(run.loss, torch.cat(losses), in_band, num_unlabeled=len(unlabeled_batch["input_ids"]))


def image_size(batch: dict) -> tuple[int, ...]:
    """The (height, width) of a batch's pixels or cached latents."""
    images = batch["latent_parameters"] if "latent_parameters" in batch else batch["pixel_values"]
    return tuple(images.shape[-2:])


def diffusion_losses_of(run: TextToImageRun, batches: list[dict], args, generator=None):
    """(weighted l(x) per image, which are in the S terms' noise band) of one UNet forward over the batches'
    images, of one size."""
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
    losses = weighted_losses(run.loss, model_pred.float(), target, weights)
    return losses, noise_band(run.noise_scheduler, timesteps, run.loss)


def flow_losses_of(run: TextToImageRun, batches: list[dict], args, generator=None):
    """The same for SD3's transformer, by flow matching (pu_diffusion/flow_matching.py): sigma drawn by
    --weighting_scheme, the velocity (or, preconditioned, x_0) regressed, each error weighted by the scheme."""
    with torch.no_grad():
        latents = sample_latents(run.frozen, batches, generator)
        text_states, pooled = encode_prompts(run.frozen, batches)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps, sigmas = draw_sigmas(run.noise_scheduler, len(latents), run.flow, generator, latents.device)
    noisy = flow_matching.noisy_latents(latents, noise, sigmas)
    output = run.model(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=text_states,
        pooled_projections=pooled["pooled_projections"],
        return_dict=False,
    )[0]
    return flow_matching.flow_matching_losses(run.loss, run.flow, output, (latents, noise, noisy), sigmas)


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
    """``make_dataset`` for the shared loaders: images with their tokenized captions (for each tokenizer, and
    with SDXL's size and crop conditioning when the base is SDXL), each at its bucket's size with
    --aspect_ratio_buckets."""
    transform = ImageTransform(args.resolution, 3, args.center_crop, args.random_flip, args.image_interpolation_mode)

    def token_ids(tokenizer, caption: str, max_length: int | None = None) -> torch.Tensor:
        return tokenizer(
            caption,
            max_length=max_length or tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]

    def tokenize(caption: str):
        if frozen.family == "sd":
            return token_ids(frozen.tokenizer, caption)
        tokens = {
            "input_ids": token_ids(frozen.tokenizer, caption),
            "input_ids_2": token_ids(frozen.tokenizer_2, caption),
        }
        if frozen.text_encoder_3 is not None:  # SD3's T5, at --max_sequence_length
            tokens["input_ids_3"] = token_ids(frozen.tokenizer_3, caption, frozen.max_sequence_length)
        return tokens

    text_states = PrecomputedTextStates(frozen) if frozen.is_sd3 else None

    def tokenize_with_row(caption: str):
        return {**tokenize(caption), "text_state_row": torch.tensor(text_states.rows[caption])}

    def make_dataset(dataset, seed: int, source: str):
        # S drawn from U's labeled dataset (--label_column) has U's caption column.
        column, flag = args.caption_column, "--caption_column"
        if source == "S" and args.label_column is None:
            column, flag = args.sensitive_caption_column, "--sensitive_caption_column"
        prompt = args.sensitive_prompt if source == "S" else None
        captions = read_captions(dataset, column, prompt, flag)
        precomputed = text_states is not None and text_states.add(
            distinct_captions(captions, args.caption_dropout_rate), tokenize
        )
        if precomputed:
            frozen.text_states = text_states
        return CaptionedImages(
            dataset,
            args.image_column,
            transform,
            captions,
            tokenize_with_row if precomputed else tokenize,
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
    # A bucket's sides must give whole latent pixels, and on SD3 whole transformer patches of them.
    pixels_per_step = 2 ** (len(frozen.vae.config.block_out_channels) - 1) * frozen.patch_size
    datasets = {"U": unlabeled, "S": sensitive}
    bucketing = Bucketing.of(args.aspect_ratio_buckets, pixels_per_step, datasets, args.image_column)
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
