"""Fine-tune Stable Diffusion (SD 1.x/2.x or SDXL) with the positive-unlabeled (PU) loss, LoRA or full.

    accelerate launch --mixed_precision fp16 train_pu_text_to_image.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir unlabeled/ --sensitive_data_dir sensitive/ --sensitive_prompt "a photo of a dog" \
        --use_lora --rank 4 --resolution 512 --train_batch_size 4 --gradient_checkpointing \
        --max_train_steps 1000 --validation_prompt "a photo of a dog" "a photo of a cat" --output_dir sd-pu-lora

The conditional ELBO of Eq. (20) in the latent space of the frozen VAE, the
text condition from the frozen text encoder; U's captions come from
--caption_column, S's from --sensitive_caption_column or one --sensitive_prompt.
See README.md and pu_loss.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

import pu_checkpoints
import pu_data
import pu_flags
import pu_latent_cache
import pu_lora
import pu_outputs
import pu_prior
import pu_training
from pu_data import InputError
from pu_flags import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    pu_flags.add_pretrained_model_arguments(
        model, "The Stable Diffusion pipeline to fine-tune (folder or Hub id).", required=True
    )
    pu_lora.add_lora_arguments(parser)
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in float16); default: the pipeline's.",
    )
    model.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode U and S with the VAE once, before training, instead of at every step (needs --center_crop).",
    )
    model.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs a GPU).")
    model.add_argument(
        "--noise_offset", type=NON_NEGATIVE_FLOAT, default=0.0, help="Scale of the per-channel noise offset."
    )
    model.add_argument(
        "--snr_gamma",
        type=POSITIVE_FLOAT,
        default=None,
        help="Min-SNR weighting (Hang et al., 2023) of each sample's loss; 5.0 is the usual value.",
    )
    pu_flags.add_data_arguments(parser, with_captions=True)
    pu_flags.add_pu_arguments(parser, default_nonnegative="abs")
    pu_flags.add_training_arguments(parser)
    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_prompt",
        type=str,
        nargs="+",
        default=None,
        help="Prompts for the validation grids; add a sensitive one to watch the concept disappear.",
    )
    validation.add_argument(
        "--num_validation_images", type=POSITIVE_INT, default=4, help="Images per validation prompt."
    )
    validation.add_argument(
        "--validation_epochs", type=POSITIVE_INT, default=1, help="A validation grid every N epochs."
    )
    validation.add_argument(
        "--validation_steps", type=POSITIVE_INT, default=30, help="Denoising steps of validation images."
    )
    pu_flags.add_hub_arguments(parser)
    # The official text-to-image examples' defaults.
    parser.set_defaults(
        resolution=512,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        adam_beta1=0.9,
        adam_weight_decay=1e-2,
        image_interpolation_mode="lanczos",
    )
    return pu_flags.parse_and_check(parser, argv, check_text_to_image_arguments)


def check_text_to_image_arguments(args: argparse.Namespace) -> None:
    """What only this script needs; like the shared checks, before anything is loaded."""
    if args.use_ema and args.use_lora:
        raise InputError("--use_ema is for full fine-tuning; drop it with --use_lora")
    lora_flags = ("lora_alpha", "use_dora", "upcast_before_saving")
    given = [flag for flag in lora_flags if getattr(args, flag)] + (["lora_dropout"] if args.lora_dropout else [])
    if given and not args.use_lora:
        raise InputError(f"--{given[0]} is a LoRA setting: add --use_lora")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.cache_latents and not args.center_crop:
        raise InputError(
            "--cache_latents encodes each image once, so a random crop would be the same in every epoch: add"
            " --center_crop (images already at --resolution are not cropped at all)"
        )
    if args.sensitive_prompt is not None and args.sensitive_caption_column is not None:
        raise InputError("--sensitive_prompt and --sensitive_caption_column: give one")
    own_sensitive_source = args.sensitive_dataset_name or args.sensitive_data_dir
    if own_sensitive_source and args.loss_type != "unsupervised":
        if args.sensitive_prompt is None and args.sensitive_caption_column is None:
            raise InputError(
                "S needs captions: give --sensitive_caption_column (a column of S) or --sensitive_prompt (one"
                " caption for all of S)"
            )


# --------------------------------------------------------------------------- model


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
class TextToImageRun(pu_training.TrainingRun, FrozenModels):
    """The shared loop's parts plus the frozen models."""


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
    pu_flags.set_prediction_type(noise_scheduler, args)
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


def register_checkpoint_hooks(accelerator, unet, ema_model, use_lora: bool) -> None:
    """checkpoint-N holds the LoRA adapters, or the UNet (and its EMA) in Diffusers format."""
    if use_lora:
        pu_lora.register_lora_hooks(accelerator, unet)
    else:
        pu_checkpoints.register_model_hooks(accelerator, type(unet), ema_model)


# --------------------------------------------------------------------------- data


def captioned_dataset(args, frozen: FrozenModels):
    """``make_dataset`` for the shared loaders: images with their tokenized captions (for both tokenizers and
    with SDXL's size and crop conditioning when the base is SDXL)."""
    transform = pu_data.ImageTransform(
        args.resolution, 3, args.center_crop, args.random_flip, args.image_interpolation_mode
    )

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
        captions = pu_data.read_captions(dataset, column, prompt, flag)
        return pu_data.CaptionedImages(
            dataset,
            args.image_column,
            transform,
            captions,
            tokenize,
            micro_conditioning=frozen.is_sdxl,
            seed=seed,
            source=source,
        )

    return make_dataset


def with_cached_latents(make_dataset, accelerator, vae, args):
    """``make_dataset`` whose images are encoded once by the VAE (--cache_latents); see pu_latent_cache."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(accelerator.device, vae.dtype)).latent_dist.parameters

    def make_cached(dataset, seed: int, source: str):
        return pu_latent_cache.CachedLatents(
            make_dataset(dataset, seed, source),
            encode,
            batch_size=args.train_batch_size,
            folder=args.output_dir,
            show_progress=accelerator.is_local_main_process,
        )

    return make_cached


# --------------------------------------------------------------------------- training


def sample_latents(run: TextToImageRun, batches: list[dict], generator=None) -> torch.Tensor:
    """A draw from each image's VAE latent distribution, encoded now or taken from --cache_latents."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "latent_parameters" in batches[0]:
        latent_dist = DiagonalGaussianDistribution(torch.cat([batch["latent_parameters"] for batch in batches]))
    else:
        pixel_values = torch.cat([batch["pixel_values"] for batch in batches])
        latent_dist = run.vae.encode(pixel_values.to(run.vae.dtype)).latent_dist
    return latent_dist.sample(generator=generator).float() * run.vae.config.scaling_factor


def training_step(run: TextToImageRun, unlabeled_batch, sensitive_batch, args, generator=None):
    """Eq. (20): one UNet forward over cat([U, S]) latents with their captions, then the PU risk."""
    batches = [unlabeled_batch] if sensitive_batch is None else [unlabeled_batch, sensitive_batch]
    with torch.no_grad():
        latents = sample_latents(run, batches, generator)
        text_states, added_conditions = encode_prompts(run, batches)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if args.noise_offset:
        offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=latents.device)
        noise = noise + args.noise_offset * offset
    num_timesteps = run.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred = run.model(noisy, timesteps, text_states, added_cond_kwargs=added_conditions, return_dict=False)[0]
    target = pu_training.diffusion_target(run.noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(run.noise_scheduler, timesteps, args.snr_gamma) if args.snr_gamma else None
    num_unlabeled = len(unlabeled_batch["input_ids"])
    return pu_training.pu_objective(run, model_pred.float(), target, timesteps, num_unlabeled, weights)


def encode_prompts(run: TextToImageRun, batches: list[dict]) -> tuple[torch.Tensor, dict | None]:
    """(text states, SDXL's added conditions). SD: the text encoder's last hidden states. SDXL, as its pipeline
    does: both encoders' penultimate hidden states side by side, the second's pooled projection, and the
    batch's time ids (original size, crop top-left, target size)."""
    input_ids = torch.cat([batch["input_ids"] for batch in batches])
    if not run.is_sdxl:
        return run.text_encoder(input_ids, return_dict=False)[0], None
    first = run.text_encoder(input_ids, output_hidden_states=True)
    second = run.text_encoder_2(torch.cat([batch["input_ids_2"] for batch in batches]), output_hidden_states=True)
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


# --------------------------------------------------------------------------- validation and saving


def validation_pipeline(args, run: TextToImageRun, unet):
    """The base pipeline around the models being trained, sampling with the training parameterisation."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=unet, **run.components(), revision=args.revision, variant=args.variant
    )
    match_training_scheduler(pipeline, run.noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def match_training_scheduler(pipeline, noise_scheduler) -> None:
    """The pipeline's sampler keeps its kind (PNDM, DDIM, ...) but takes what the model was trained to predict
    (--prediction_type) and the training schedule's zero-terminal-SNR setting."""
    overrides = {"prediction_type": noise_scheduler.config.prediction_type}
    if "rescale_betas_zero_snr" in pipeline.scheduler.config:
        overrides["rescale_betas_zero_snr"] = noise_scheduler.config.get("rescale_betas_zero_snr", False)
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **overrides)


def validate(accelerator, run: TextToImageRun, args, tag: str, global_step: int):
    """One grid (returned, and written to validation/): a row of --num_validation_images per
    --validation_prompt, the same noise every time."""
    unet = accelerator.unwrap_model(run.model)
    pipeline = validation_pipeline(args, run, unet)
    rows = []
    unet.eval()
    with pu_training.ema_weights(run), accelerator.autocast(), torch.inference_mode():
        for index, prompt in enumerate(args.validation_prompt):
            generator = torch.Generator(accelerator.device).manual_seed(pu_data.derived_seed(run.plan.seed, index))
            output = pipeline(
                prompt,
                height=args.resolution,
                width=args.resolution,
                num_images_per_prompt=args.num_validation_images,
                num_inference_steps=args.validation_steps,
                generator=generator,
                output_type="np",
            )
            rows.append(output.images)
    unet.train()
    captions = [prompt for prompt in args.validation_prompt for _ in range(args.num_validation_images)]
    return pu_outputs.save_validation_images(
        accelerator,
        np.concatenate(rows),
        args.output_dir,
        tag,
        global_step,
        columns=args.num_validation_images,
        captions=captions,
    )


def save_model_and_card(accelerator, run: TextToImageRun, args, state: dict | None = None, samples=None) -> None:
    """LoRA: the adapter weights; full: a StableDiffusionPipeline folder (EMA weights if kept). With them, the
    samples (the last validation grid) and the card, all saved together.

    ``state`` is the UNet's gathered state dict under DeepSpeed or FSDP, else None.
    """

    def save(write_model) -> None:
        def write(folder: Path) -> None:
            write_model(folder)
            if samples is not None:
                samples.save(folder / pu_outputs.SAMPLES_FILE)
            write_text_to_image_card(folder, args, run, has_samples=samples is not None)

        pu_outputs.save_outputs_atomically(args.output_dir, write)

    if args.use_lora:
        unet = accelerator.unwrap_model(run.model)
        # As in the Diffusers LoRA scripts: the final weights in the training dtype unless upcast.
        dtype = torch.float32 if args.upcast_before_saving else run.weight_dtype
        state = pu_lora.lora_state_dict(unet, state_dict=state, dtype=dtype)
        save(functools.partial(pu_lora.write_lora, unet=unet, state=state))
    else:
        # A VAE of its own goes into the saved pipeline, loaded again in its saved precision.
        vae = {"vae": load_vae(args)} if args.pretrained_vae_model_name_or_path else {}
        with pu_training.model_to_save(accelerator, run, state) as unet:
            pipeline = run.pipeline_class.from_pretrained(
                args.pretrained_model_name_or_path, unet=unet, **vae, revision=args.revision, variant=args.variant
            )
            match_training_scheduler(pipeline, run.noise_scheduler)
            save(pipeline.save_pretrained)


def write_text_to_image_card(folder: Path, args, run: TextToImageRun, has_samples: bool) -> None:
    """The model card, written into ``folder`` (the save's staging folder)."""
    repo = pu_outputs.model_reference(args, run.hub_repo_id)
    base = pu_outputs.public_reference(args.pretrained_model_name_or_path)
    if args.use_lora:
        load = f'pipeline = DiffusionPipeline.from_pretrained("{base}")\npipeline.load_lora_weights("{repo}")\n'
        if args.prediction_type:  # a LoRA file cannot carry the scheduler's setting
            load += f'pipeline.scheduler.register_to_config(prediction_type="{args.prediction_type}")\n'
    else:
        load = f'pipeline = DiffusionPipeline.from_pretrained("{repo}")\n'
    prompt = args.validation_prompt[0] if args.validation_prompt else "a photo"
    body = "## Use\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
    body += f"{load}image = pipeline({prompt!r}).images[0]\n```\n"
    if args.validation_prompt:
        body += "\n## Validation grid\n\nOne row per prompt, the same noise in every grid:\n\n"
        body += "".join(f"{row + 1}. {prompt}\n" for row, prompt in enumerate(args.validation_prompt))
        if (Path(args.output_dir) / "validation" / "before-training.png").exists():
            body += "\nBefore training (the base model):\n\n![before](validation/before-training.png)\n"
    pu_outputs.write_model_card(
        folder,
        args,
        run.plan,
        base_model=args.pretrained_model_name_or_path,
        tags=[
            "stable-diffusion-xl" if run.is_sdxl else "stable-diffusion",
            "text-to-image",
            *(["lora"] if args.use_lora else []),
        ],
        title=f"PU diffusion: Stable Diffusion{' XL' if run.is_sdxl else ''} "
        + (f"LoRA ({pu_lora.lora_description(args)})" if args.use_lora else "fine-tune"),
        image=pu_outputs.SAMPLES_FILE if has_samples else None,
        body=body,
    )


def end_of_epoch(accelerator, run: TextToImageRun, args, epoch: int, global_step: int) -> None:
    """A validation grid every --validation_epochs; after the last step, the grid, the model and the upload."""
    accelerator.wait_for_everyone()
    last = global_step >= run.plan.max_train_steps
    state = pu_checkpoints.gathered_state_dict(accelerator, run.model) if last else None
    if accelerator.is_main_process:
        grid = None
        if args.validation_prompt and (last or (epoch + 1) % args.validation_epochs == 0):
            grid = validate(accelerator, run, args, f"step-{global_step:06d}", global_step)
        if last:
            save_model_and_card(accelerator, run, args, state, grid)
            if run.hub_repo_id:
                pu_outputs.upload_to_hub(args, run.hub_repo_id, f"step {global_step}")
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    accelerator = pu_training.make_accelerator(args)
    with pu_outputs.output_dir_lock(args.output_dir, accelerator.is_main_process):
        seed = pu_training.settle_seed(accelerator, args)
        frozen, unet, noise_scheduler = load_models(args)
        pu_flags.check_noise_band(noise_scheduler, args)
        if args.use_lora:
            pu_lora.add_lora(
                unet,
                args.rank,
                alpha=args.lora_alpha,
                dropout=args.lora_dropout,
                layers=args.lora_layers,
                use_dora=args.use_dora,
            )
        pu_training.enable_memory_savers(unet, args)
        place_models(unet, frozen, accelerator.device, accelerator.mixed_precision, args)
        ema_model = pu_training.make_ema(unet, args) if args.use_ema else None
        register_checkpoint_hooks(accelerator, unet, ema_model, args.use_lora)

        with accelerator.main_process_first():
            unlabeled, sensitive = pu_data.load_training_sets(args, seed)
        prior_estimate = pu_training.settle_prior(
            accelerator,
            args,
            lambda: pu_prior.estimate_for_data(unlabeled, sensitive, args, seed, frozen.vae, accelerator.device),
        )
        fingerprint = pu_data.data_fingerprint(unlabeled, sensitive, args.image_column)
        plan = pu_training.plan_run(
            args, seed, unlabeled, sensitive, accelerator.num_processes, prior_estimate, fingerprint
        )
        pu_training.check_plan(accelerator, args, plan)
        trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
        make_dataset = captioned_dataset(args, frozen)
        if args.cache_latents:
            make_dataset = with_cached_latents(make_dataset, accelerator, frozen.vae, args)
        hub_repo_id = pu_training.start_trackers(accelerator, args, plan, "train_pu_text_to_image")
        run = TextToImageRun(
            **pu_training.prepare_for_training(
                accelerator, args, plan, unet, trainable, unlabeled, sensitive, make_dataset, ema_model
            ),
            **{field.name: getattr(frozen, field.name) for field in fields(FrozenModels)},
            noise_scheduler=noise_scheduler,
            loss=pu_training.LossSettings.from_flags(args, plan.prior),  # what the objective reads, fixed here
            base_model=args.pretrained_model_name_or_path,
            hub_repo_id=hub_repo_id,
        )

        first_step = pu_checkpoints.resume_step(accelerator, args)
        if first_step == 0 and args.validation_prompt and accelerator.is_main_process:
            validate(accelerator, run, args, "before-training", 0)  # the base model, to compare against
        step = functools.partial(training_step, args=args)
        save = functools.partial(end_of_epoch, accelerator, run, args)
        # The loop (pu_training.train) calls training_step for every micro-batch and end_of_epoch after each epoch.
        pu_training.train(accelerator, run, args, first_step, training_step=step, end_of_epoch=save)
        pu_training.end_training(accelerator, run)


if __name__ == "__main__":
    pu_training.exit_on_error(main, parse_args())
