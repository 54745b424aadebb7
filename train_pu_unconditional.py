"""Train or fine-tune an unconditional DDPM with the positive-unlabeled (PU) loss.

    accelerate launch train_pu_unconditional.py \
        --dataset_name ylecun/mnist --label_column label --sensitive_labels 1 3 5 7 9 \
        --resolution 32 --output_dir ddpm-pu-mnist

The model learns U's normal data and unlearns S: see README.md and pu_loss.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
from pathlib import Path

import torch

from pu_diffusion.checkpoints import gathered_state_dict, register_model_hooks, resume_step
from pu_diffusion.checks import parse_and_check
from pu_diffusion.errors import InputError
from pu_diffusion.flags import (
    POSITIVE_INT,
    add_data_arguments,
    add_hub_arguments,
    add_pretrained_model_arguments,
    add_pu_arguments,
    add_training_arguments,
)
from pu_diffusion.image_files import image_channels
from pu_diffusion.loop import end_training, exit_on_error, model_to_save, train
from pu_diffusion.objective import LossSettings, check_noise_band, set_prediction_type
from pu_diffusion.outputs import (
    SAMPLES_FILE,
    model_reference,
    output_dir_lock,
    save_outputs_atomically,
    save_validation_images,
    upload_to_hub,
    write_model_card,
)
from pu_diffusion.prior import estimate_for_data, scores_for_data
from pu_diffusion.run_setup import (
    TrainingRun,
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
from pu_diffusion.training_data import data_fingerprint, load_training_sets
from pu_diffusion.unconditional import default_unet_config, downsampling_factor, image_dataset_factory, training_step

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    add_pretrained_model_arguments(model, "Fine-tune this DDPM pipeline (folder or Hub id): its unet and scheduler.")
    model.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="UNet2DModel config (folder or Hub id) to train from scratch. Default: a UNet sized by --resolution.",
    )
    model.add_argument("--ddpm_num_steps", type=POSITIVE_INT, default=1000, help="Diffusion steps T (from scratch).")
    model.add_argument(
        "--ddpm_beta_schedule",
        choices=("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
        default="linear",
        help="Beta schedule (from scratch).",
    )
    model.add_argument(
        "--ddpm_num_inference_steps",
        type=POSITIVE_INT,
        default=1000,
        help="Denoising steps for the validation samples.",
    )
    add_data_arguments(parser)
    add_pu_arguments(parser)
    add_training_arguments(parser)
    validation = parser.add_argument_group("validation and saving")
    validation.add_argument("--eval_batch_size", type=POSITIVE_INT, default=16, help="Images in each validation grid.")
    validation.add_argument(
        "--save_images_epochs", type=POSITIVE_INT, default=10, help="Validation grid every N epochs."
    )
    validation.add_argument(
        "--save_model_epochs", type=POSITIVE_INT, default=10, help="Save the pipeline every N epochs."
    )
    add_hub_arguments(parser)
    return parse_and_check(parser, argv, check_model_arguments)


def check_model_arguments(args: argparse.Namespace) -> None:
    if args.pretrained_model_name_or_path and args.model_config_name_or_path:
        raise InputError("--pretrained_model_name_or_path and --model_config_name_or_path: give one")
    check_resolution(args)


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- model


def load_model(args: argparse.Namespace, data_channels: int):
    """(unet, noise_scheduler, base model name or None)."""
    from diffusers import DDPMScheduler, UNet2DModel

    if args.pretrained_model_name_or_path:
        hub_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
        try:
            unet = UNet2DModel.from_pretrained(
                args.pretrained_model_name_or_path, subfolder="unet", variant=args.variant, **hub_kwargs
            )
            scheduler = DDPMScheduler.from_pretrained(
                args.pretrained_model_name_or_path, subfolder="scheduler", **hub_kwargs
            )
        except (OSError, ValueError) as error:
            raise InputError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: not a DDPM pipeline with"
                f" unet/ and scheduler/: {error}"
            ) from error
        set_prediction_type(scheduler, args)
        return unet, scheduler, args.pretrained_model_name_or_path
    if args.model_config_name_or_path:
        config = UNet2DModel.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir)
        unet = UNet2DModel.from_config(config)
    else:
        unet = UNet2DModel(**default_unet_config(args.resolution, data_channels))
    scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type or "epsilon",
    )
    return unet, scheduler, None


def unet_config_for_check(args: argparse.Namespace) -> dict | None:
    """The UNet's config without its weights, or None where it cannot be read yet (load_model then says why)."""
    from diffusers import UNet2DModel

    try:
        if args.pretrained_model_name_or_path:
            return UNet2DModel.load_config(
                args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, cache_dir=args.cache_dir
            )
        if args.model_config_name_or_path:
            return UNet2DModel.load_config(args.model_config_name_or_path, cache_dir=args.cache_dir)
    except (OSError, ValueError):
        return None
    return default_unet_config(args.resolution, 1)


def check_resolution(args: argparse.Namespace) -> None:
    """--resolution must survive the UNet's halvings; the nearest sizes that do are named. Checked before any
    data is loaded."""
    config = unet_config_for_check(args)
    if config is None or args.resolution % downsampling_factor(config) == 0:
        return
    chosen = args.pretrained_model_name_or_path or args.model_config_name_or_path

    def fits(size: int) -> bool:  # the default UNet's depth itself depends on the resolution
        return size % downsampling_factor(config if chosen else default_unet_config(size, 1)) == 0

    below = next((size for size in range(args.resolution - 1, 0, -1) if fits(size)), None)
    above = next(size for size in range(args.resolution + 1, 2 * args.resolution + 64) if fits(size))
    nearest = f"{below} or {above}" if below else str(above)
    raise InputError(
        f"--resolution {args.resolution}: the UNet halves its input {len(config['down_block_types']) - 1} times,"
        f" so the resolution must be a multiple of {downsampling_factor(config)}; {nearest} would work"
    )


# --------------------------------------------------------------------------- validation and saving


def make_pipeline(unet, run: TrainingRun):
    """A DDPMPipeline on the trained UNet (from ``model_to_save``)."""
    from diffusers import DDPMPipeline

    return DDPMPipeline(unet=unet, scheduler=copy.deepcopy(run.noise_scheduler))


def generate_validation_grid(accelerator, pipeline, args, seed: int, epoch: int, global_step: int):
    """The validation grid of this epoch (also written to validation/), as a PIL image."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = pipeline(
        generator=generator,
        batch_size=args.eval_batch_size,
        num_inference_steps=args.ddpm_num_inference_steps,
        output_type="np",
    ).images
    return save_validation_images(accelerator, images, args.output_dir, f"epoch-{epoch:04d}", global_step)


def save_pipeline_and_card(pipeline, args, run: TrainingRun, samples=None) -> None:
    """The pipeline, its samples (a grid of this model, if one was made) and the model card, saved together."""

    def write(folder: Path) -> None:
        pipeline.save_pretrained(folder)
        if samples is not None:
            samples.save(folder / SAMPLES_FILE)
        write_model_card(
            folder,
            args,
            run.plan,
            base_model=run.base_model,
            tags=["unconditional-image-generation", "ddpm"],
            title="PU diffusion: unconditional DDPM",
            image=SAMPLES_FILE if samples is not None else None,
            body=(
                "## Use\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
                f'pipeline = DiffusionPipeline.from_pretrained("{model_reference(args, run.hub_repo_id)}")\n'
                "images = pipeline(batch_size=16).images\n```\n"
            ),
        )

    save_outputs_atomically(args.output_dir, write)


# --------------------------------------------------------------------------- training


def main(args: argparse.Namespace) -> None:
    accelerator = make_accelerator(args)
    with output_dir_lock(args.output_dir, accelerator.is_main_process):
        seed = settle_seed(args)
        with accelerator.main_process_first():
            unlabeled, sensitive = load_training_sets(args, seed)
        unlabeled, unlabeled_filter = settle_unlabeled_filter(
            accelerator, args, seed, unlabeled, len(sensitive) if sensitive is not None else 0,
            lambda: scores_for_data(unlabeled, sensitive, args, seed, device=accelerator.device),
        )  # fmt: skip
        prior_estimate = settle_prior(
            accelerator,
            args,
            lambda: estimate_for_data(unlabeled, sensitive, args, seed, device=accelerator.device),
        )
        fingerprint = data_fingerprint(unlabeled, sensitive, args.image_column)
        plan = plan_run(
            args, seed, unlabeled, sensitive, accelerator.num_processes, prior_estimate, fingerprint,
            unlabeled_filter=unlabeled_filter,
        )  # fmt: skip
        check_plan(accelerator, args, plan)

        sources = [(unlabeled, "U")] + ([(sensitive, "S")] if sensitive is not None else [])
        unet, noise_scheduler, base_model = load_model(args, image_channels(sources, args.image_column))
        check_noise_band(noise_scheduler, args)
        enable_memory_savers(unet, args)
        ema_model = make_ema(unet, args) if args.use_ema else None
        register_model_hooks(accelerator, type(unet), ema_model)

        make_dataset = image_dataset_factory(args, unet.config.in_channels)
        hub_repo_id = start_trackers(accelerator, args, plan, "train_pu_unconditional")
        run = TrainingRun(
            **prepare_for_training(
                accelerator, args, plan, unet, list(unet.parameters()), unlabeled, sensitive, make_dataset, ema_model
            ),
            noise_scheduler=noise_scheduler,
            loss=LossSettings.from_flags(args, plan.prior),  # what the objective reads, fixed here
            base_model=base_model,
            hub_repo_id=hub_repo_id,
        )

        first_step = resume_step(accelerator, args)
        save = functools.partial(end_of_epoch, accelerator, run, args)
        # The loop lives in pu_diffusion/loop.py. Its two callbacks: training_step, from
        # pu_diffusion/unconditional.py, for every micro-batch, and end_of_epoch (below) after each epoch.
        train(accelerator, run, args, first_step, training_step=training_step, end_of_epoch=save)
        end_training(accelerator, run)


def end_of_epoch(accelerator, run: TrainingRun, args: argparse.Namespace, epoch: int, global_step: int) -> None:
    """Validation grid and pipeline save on their epoch schedules, and always after the last step."""
    accelerator.wait_for_everyone()
    last = global_step >= run.plan.max_train_steps
    images_due = last or (epoch + 1) % args.save_images_epochs == 0
    model_due = last or (epoch + 1) % args.save_model_epochs == 0
    state = gathered_state_dict(accelerator, run.model) if images_due or model_due else None
    if accelerator.is_main_process:
        if images_due or model_due:
            with model_to_save(accelerator, run, state) as unet:
                pipeline = make_pipeline(unet, run)
                grid = None
                if images_due:
                    grid = generate_validation_grid(accelerator, pipeline, args, run.plan.seed, epoch, global_step)
                if model_due:
                    save_pipeline_and_card(pipeline, args, run, grid)
        if model_due and run.hub_repo_id:
            upload_to_hub(args, run.hub_repo_id, f"step {global_step}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    exit_on_error(main, parse_args())
