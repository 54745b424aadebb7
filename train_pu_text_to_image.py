"""Fine-tune Stable Diffusion (SD 1.x/2.x, SDXL or SD3/3.5) with the positive-unlabeled (PU) loss, LoRA or full.

    accelerate launch --mixed_precision fp16 train_pu_text_to_image.py \
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir unlabeled/ --sensitive_data_dir sensitive/ --sensitive_prompt "a photo of a dog" \
        --use_lora --rank 4 --resolution 512 --train_batch_size 4 --gradient_checkpointing \
        --max_train_steps 1000 --validation_prompt "a photo of a dog" "a photo of a cat" --output_dir sd-pu-lora

The conditional ELBO of Eq. (20) in the latent space of the frozen VAE, the
text condition from the frozen text encoder(s); SD3 is trained by flow
matching (pu_diffusion/flow_matching.py). U's captions come from
--caption_column, S's from --sensitive_caption_column or one --sensitive_prompt.
See README.md and pu_loss.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from pu_diffusion.checkpoints import gathered_state_dict, register_model_hooks, resume_step
from pu_diffusion.checks import parse_and_check
from pu_diffusion.errors import InputError
from pu_diffusion.flags import (
    NON_NEGATIVE_FLOAT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    add_data_arguments,
    add_hub_arguments,
    add_pretrained_model_arguments,
    add_pu_arguments,
    add_training_arguments,
)
from pu_diffusion.loop import ema_weights, end_training, exit_on_error, model_to_save, train
from pu_diffusion.lora import (
    LORA_TARGET_MODULES,
    SD3_LORA_LAYERS,
    add_lora,
    add_lora_arguments,
    lora_description,
    lora_state_dict,
    register_lora_hooks,
    write_lora,
)
from pu_diffusion.objective import LossSettings, check_noise_band
from pu_diffusion.outputs import (
    SAMPLES_FILE,
    model_reference,
    output_dir_lock,
    public_reference,
    save_outputs_atomically,
    save_validation_images,
    upload_to_hub,
    write_model_card,
)
from pu_diffusion.prior import estimate_for_data, scores_for_data
from pu_diffusion.run_setup import (
    check_plan,
    enable_memory_savers,
    make_accelerator,
    make_ema,
    plan_run,
    prepare_for_training,
    settle_prior,
    settle_seed,
    settle_unlabeled_filter,
    start_trackers,
)
from pu_diffusion.sd3_flags import add_sd3_arguments, flow_settings
from pu_diffusion.text_to_image import (
    TextToImageRun,
    assign_buckets,
    captioned_dataset_factory,
    load_models,
    load_vae,
    place_models,
    training_step,
    with_cached_latents,
)
from pu_diffusion.training_data import data_fingerprint, derived_seed, load_training_sets

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    add_pretrained_model_arguments(
        model, "The Stable Diffusion pipeline to fine-tune (folder or Hub id).", required=True
    )
    add_lora_arguments(parser)
    add_sd3_arguments(parser)
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in float16); default: the pipeline's.",
    )
    model.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode U and S with the VAE once, before training, instead of at every step (without --center_crop"
        " each image keeps one random crop).",
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
    add_data_arguments(parser, with_captions=True)
    add_pu_arguments(parser, default_nonnegative="abs")
    add_training_arguments(parser)
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
    add_hub_arguments(parser)
    # The official text-to-image examples' defaults.
    parser.set_defaults(
        resolution=512,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        adam_beta1=0.9,
        adam_weight_decay=1e-2,
        image_interpolation_mode="lanczos",
    )
    return parse_and_check(parser, argv, check_text_to_image_arguments)


def check_text_to_image_arguments(args: argparse.Namespace) -> None:
    """What only this script needs; like the shared checks, before anything is loaded."""
    if args.use_ema and args.use_lora:
        raise InputError("--use_ema is for full fine-tuning; drop it with --use_lora")
    lora_flags = ("lora_alpha", "lora_layers", "use_dora", "upcast_before_saving")
    given = [flag for flag in lora_flags if getattr(args, flag)] + (["lora_dropout"] if args.lora_dropout else [])
    if given and not args.use_lora:
        raise InputError(f"--{given[0]} is a LoRA setting: add --use_lora")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
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


def register_checkpoint_hooks(accelerator, model, ema_model, use_lora: bool, folder: str) -> None:
    """checkpoint-N holds the LoRA adapters, or the UNet or SD3 transformer (``folder``, and its EMA) in
    Diffusers format."""
    if use_lora:
        register_lora_hooks(accelerator, model)
    else:
        register_model_hooks(accelerator, type(model), ema_model, subfolder=folder)


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- validation and saving

FAMILY_NAMES = {"sd": "Stable Diffusion", "sdxl": "Stable Diffusion XL", "sd3": "Stable Diffusion 3"}
FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "sd3"}


def validation_pipeline(args, run: TextToImageRun, unet):
    """The base pipeline around the models being trained, sampling with the training parameterisation."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        **{run.frozen.model_folder: unet},
        **run.frozen.components(),
        revision=args.revision,
        variant=args.variant,
    )
    match_training_scheduler(pipeline, run.noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def match_training_scheduler(pipeline, noise_scheduler) -> None:
    """The pipeline's sampler keeps its kind (PNDM, DDIM, ...) but takes what the model was trained to predict
    (--prediction_type) and the training schedule's zero-terminal-SNR setting. SD3's flow-matching sampler
    is kept as it is."""
    if "prediction_type" not in noise_scheduler.config:
        return
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
    with ema_weights(run), accelerator.autocast(), torch.inference_mode():
        for index, prompt in enumerate(args.validation_prompt):
            generator = torch.Generator(accelerator.device).manual_seed(derived_seed(run.plan.seed, index))
            output = pipeline(
                prompt,
                height=args.resolution,
                width=args.resolution,
                num_images_per_prompt=args.num_validation_images,
                num_inference_steps=args.validation_steps,
                generator=generator,
                output_type="np",
                **run.frozen.sampling_arguments(),
            )
            rows.append(output.images)
    unet.train()
    captions = [prompt for prompt in args.validation_prompt for _ in range(args.num_validation_images)]
    return save_validation_images(
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
                samples.save(folder / SAMPLES_FILE)
            write_text_to_image_card(folder, args, run, has_samples=samples is not None)

        save_outputs_atomically(args.output_dir, write)

    if args.use_lora:
        unet = accelerator.unwrap_model(run.model)
        # As in the Diffusers LoRA scripts: the final weights in the training dtype unless upcast.
        dtype = torch.float32 if args.upcast_before_saving else run.frozen.weight_dtype
        state = lora_state_dict(unet, state_dict=state, dtype=dtype)
        save(functools.partial(write_lora, unet=unet, state=state))
    else:
        # A VAE of its own goes into the saved pipeline, loaded again in its saved precision.
        vae = {"vae": load_vae(args)} if args.pretrained_vae_model_name_or_path else {}
        with model_to_save(accelerator, run, state) as unet:
            pipeline = run.frozen.pipeline_class.from_pretrained(
                args.pretrained_model_name_or_path,
                **{run.frozen.model_folder: unet},
                **run.frozen.absent,  # e.g. the T5 of an SD3 base saved without it
                **vae,
                revision=args.revision,
                variant=args.variant,
            )
            match_training_scheduler(pipeline, run.noise_scheduler)
            save(pipeline.save_pretrained)


def write_text_to_image_card(folder: Path, args, run: TextToImageRun, has_samples: bool) -> None:
    """The model card, written into ``folder`` (the save's staging folder)."""
    repo = model_reference(args, run.hub_repo_id)
    base = public_reference(args.pretrained_model_name_or_path)
    # An SD3 base saved without T5 loads only when told so; optional components (a safety checker) need not be.
    optional = run.frozen.pipeline_class._optional_components
    absent = "".join(f", {name}=None" for name in run.frozen.absent if name not in optional)
    if args.use_lora:
        load = f'pipeline = DiffusionPipeline.from_pretrained("{base}"{absent})\npipeline.load_lora_weights("{repo}")\n'
        if args.prediction_type:  # a LoRA file cannot carry the scheduler's setting
            load += f'pipeline.scheduler.register_to_config(prediction_type="{args.prediction_type}")\n'
    else:
        load = f'pipeline = DiffusionPipeline.from_pretrained("{repo}"{absent})\n'
    prompt = args.validation_prompt[0] if args.validation_prompt else "a photo"
    body = "## Use\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
    body += f"{load}image = pipeline({prompt!r}).images[0]\n```\n"
    if args.validation_prompt:
        body += "\n## Validation grid\n\nOne row per prompt, the same noise in every grid:\n\n"
        body += "".join(f"{row + 1}. {prompt}\n" for row, prompt in enumerate(args.validation_prompt))
        if (Path(args.output_dir) / "validation" / "before-training.png").exists():
            body += "\nBefore training (the base model):\n\n![before](validation/before-training.png)\n"
    write_model_card(
        folder,
        args,
        run.plan,
        base_model=args.pretrained_model_name_or_path,
        tags=[FAMILY_TAGS[run.frozen.family], "text-to-image", *(["lora"] if args.use_lora else [])],
        title=f"PU diffusion: {FAMILY_NAMES[run.frozen.family]} "
        + (f"LoRA ({lora_description(args)})" if args.use_lora else "fine-tune"),
        image=SAMPLES_FILE if has_samples else None,
        body=body,
    )


def end_of_epoch(accelerator, run: TextToImageRun, args, epoch: int, global_step: int) -> None:
    """A validation grid every --validation_epochs; after the last step, the grid, the model and the upload."""
    accelerator.wait_for_everyone()
    last = global_step >= run.plan.max_train_steps
    state = gathered_state_dict(accelerator, run.model) if last else None
    if accelerator.is_main_process:
        grid = None
        if args.validation_prompt and (last or (epoch + 1) % args.validation_epochs == 0):
            grid = validate(accelerator, run, args, f"step-{global_step:06d}", global_step)
        if last:
            save_model_and_card(accelerator, run, args, state, grid)
            if run.hub_repo_id:
                upload_to_hub(args, run.hub_repo_id, f"step {global_step}")
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> None:
    accelerator = make_accelerator(args)
    with output_dir_lock(args.output_dir, accelerator.is_main_process):
        seed = settle_seed(args)
        frozen, unet, noise_scheduler = load_models(args)  # SD3: unet is its transformer
        if not frozen.is_sd3:
            check_noise_band(noise_scheduler, args)
        if args.use_lora:
            args.lora_layers = args.lora_layers or (SD3_LORA_LAYERS if frozen.is_sd3 else LORA_TARGET_MODULES)
            add_lora(
                unet,
                args.rank,
                alpha=args.lora_alpha,
                dropout=args.lora_dropout,
                layers=args.lora_layers,
                use_dora=args.use_dora,
            )
        enable_memory_savers(unet, args)
        place_models(unet, frozen, accelerator.device, accelerator.mixed_precision, args)
        ema_model = make_ema(unet, args) if args.use_ema else None
        register_checkpoint_hooks(accelerator, unet, ema_model, args.use_lora, frozen.model_folder)

        with accelerator.main_process_first():
            unlabeled, sensitive = load_training_sets(args, seed)
        unlabeled, unlabeled_filter = settle_unlabeled_filter(
            accelerator, args, seed, unlabeled, len(sensitive) if sensitive is not None else 0,
            lambda: scores_for_data(unlabeled, sensitive, args, seed, frozen.vae, accelerator.device),
        )  # fmt: skip
        prior_estimate = settle_prior(
            accelerator,
            args,
            lambda: estimate_for_data(unlabeled, sensitive, args, seed, frozen.vae, accelerator.device),
        )
        fingerprint = data_fingerprint(unlabeled, sensitive, args.image_column)
        bucketing = assign_buckets(args, frozen, unlabeled, sensitive)
        unlabeled_batches = bucketing.num_batches("U", args.train_batch_size) if bucketing else None
        plan = plan_run(
            args, seed, unlabeled, sensitive, accelerator.num_processes, prior_estimate, fingerprint, unlabeled_batches,
            unlabeled_filter,
        )  # fmt: skip
        check_plan(accelerator, args, plan)
        trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
        make_dataset = captioned_dataset_factory(args, frozen, bucketing)
        if args.cache_latents:
            make_dataset = with_cached_latents(make_dataset, accelerator, frozen.vae, args)
        hub_repo_id = start_trackers(accelerator, args, plan, "train_pu_text_to_image")
        run = TextToImageRun(
            **prepare_for_training(
                accelerator, args, plan, unet, trainable, unlabeled, sensitive, make_dataset, ema_model
            ),
            frozen=frozen,
            flow=flow_settings(args) if frozen.is_sd3 else None,
            noise_scheduler=noise_scheduler,
            loss=LossSettings.from_flags(args, plan.prior),  # what the objective reads, fixed here
            base_model=args.pretrained_model_name_or_path,
            hub_repo_id=hub_repo_id,
        )

        first_step = resume_step(accelerator, args)
        if first_step == 0 and args.validation_prompt and accelerator.is_main_process:
            validate(accelerator, run, args, "before-training", 0)  # the base model, to compare against
        step = functools.partial(training_step, args=args)
        save = functools.partial(end_of_epoch, accelerator, run, args)
        # The loop lives in pu_diffusion/loop.py. Its two callbacks: training_step, from
        # pu_diffusion/text_to_image.py, for every micro-batch, and end_of_epoch (below) after each epoch.
        train(accelerator, run, args, first_step, training_step=step, end_of_epoch=save)
        end_training(accelerator, run)


if __name__ == "__main__":
    exit_on_error(main, parse_args())
