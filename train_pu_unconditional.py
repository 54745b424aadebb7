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

import pu_checkpoints
import pu_data
import pu_flags
import pu_images
import pu_outputs
import pu_prior
import pu_training
from pu_data import InputError
from pu_flags import POSITIVE_INT

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    pu_flags.add_pretrained_model_arguments(
        model, "Fine-tune this DDPM pipeline (folder or Hub id): its unet and scheduler."
    )
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
    pu_flags.add_data_arguments(parser)
    pu_flags.add_pu_arguments(parser)
    pu_flags.add_training_arguments(parser)
    validation = parser.add_argument_group("validation and saving")
    validation.add_argument("--eval_batch_size", type=POSITIVE_INT, default=16, help="Images in each validation grid.")
    validation.add_argument(
        "--save_images_epochs", type=POSITIVE_INT, default=10, help="Validation grid every N epochs."
    )
    validation.add_argument(
        "--save_model_epochs", type=POSITIVE_INT, default=10, help="Save the pipeline every N epochs."
    )
    pu_flags.add_hub_arguments(parser)
    return pu_flags.parse_and_check(parser, argv, check_model_arguments)


def check_model_arguments(args: argparse.Namespace) -> None:
    if args.pretrained_model_name_or_path and args.model_config_name_or_path:
        raise InputError("--pretrained_model_name_or_path and --model_config_name_or_path: give one")
    check_resolution(args)


# --------------------------------------------------------------------------- data


def image_dataset(args, channels: int):
    """``make_dataset`` for the shared loaders: the images of one image column, transformed."""
    transform = pu_data.ImageTransform(
        args.resolution, channels, args.center_crop, args.random_flip, args.image_interpolation_mode
    )

    def make_dataset(dataset, seed: int, source: str):
        return pu_data.TransformedImages(dataset, args.image_column, transform, seed=seed, source=source)

    return make_dataset


# --------------------------------------------------------------------------- model


def default_unet_config(resolution: int, channels: int) -> dict:
    """A UNet2DModel sized by resolution: ~0.7M parameters at 8 px, ~1.1M at 16, ~36M at 32 (the paper's)."""
    if resolution <= 8:
        widths, attention, layers, groups = (32, 64), (False, True), 1, 8
    elif resolution <= 16:
        widths, attention, layers, groups = (32, 64, 64), (False, False, True), 1, 8
    elif resolution <= 32:
        # The size of google/ddpm-cifar10-32, the architecture the paper trains at 32 px.
        widths, attention, layers, groups = (128, 256, 256, 256), (False, True, False, False), 2, 32
    else:
        widths, attention, layers, groups = (128, 128, 256, 256, 512, 512), (False,) * 4 + (True, False), 2, 32
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "layers_per_block": layers,
        "block_out_channels": widths,
        "norm_num_groups": groups,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
    }


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
        pu_flags.set_prediction_type(scheduler, args)
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


def downsampling_factor(unet_config: dict) -> int:
    """How many times smaller a UNet2DModel's deepest feature map is: every down block but the last halves it."""
    return 2 ** (len(unet_config["down_block_types"]) - 1)


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


def make_pipeline(unet, run: pu_training.TrainingRun):
    """A DDPMPipeline on the trained UNet (from ``pu_training.model_to_save``)."""
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
    return pu_outputs.save_validation_images(accelerator, images, args.output_dir, f"epoch-{epoch:04d}", global_step)


def save_pipeline_and_card(pipeline, args, run: pu_training.TrainingRun, samples=None) -> None:
    """The pipeline, its samples (a grid of this model, if one was made) and the model card, saved together."""

    def write(folder: Path) -> None:
        pipeline.save_pretrained(folder)
        if samples is not None:
            samples.save(folder / pu_outputs.SAMPLES_FILE)
        pu_outputs.write_model_card(
            folder,
            args,
            run.plan,
            base_model=run.base_model,
            tags=["unconditional-image-generation", "ddpm"],
            title="PU diffusion: unconditional DDPM",
            image=pu_outputs.SAMPLES_FILE if samples is not None else None,
            body=(
                "## Use\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
                f'pipeline = DiffusionPipeline.from_pretrained("{pu_outputs.model_reference(args, run.hub_repo_id)}")\n'
                "images = pipeline(batch_size=16).images\n```\n"
            ),
        )

    pu_outputs.save_outputs_atomically(args.output_dir, write)


# --------------------------------------------------------------------------- training


def main(args: argparse.Namespace) -> None:
    accelerator = pu_training.make_accelerator(args)
    with pu_outputs.output_dir_lock(args.output_dir, accelerator.is_main_process):
        seed = pu_training.settle_seed(accelerator, args)
        with accelerator.main_process_first():
            unlabeled, sensitive = pu_data.load_training_sets(args, seed)
        prior_estimate = pu_training.settle_prior(
            accelerator,
            args,
            lambda: pu_prior.estimate_for_data(unlabeled, sensitive, args, seed, device=accelerator.device),
        )
        fingerprint = pu_data.data_fingerprint(unlabeled, sensitive, args.image_column)
        plan = pu_training.plan_run(
            args, seed, unlabeled, sensitive, accelerator.num_processes, prior_estimate, fingerprint
        )
        pu_training.check_plan(accelerator, args, plan)

        sources = [(unlabeled, "U")] + ([(sensitive, "S")] if sensitive is not None else [])
        unet, noise_scheduler, base_model = load_model(args, pu_images.image_channels(sources, args.image_column))
        pu_flags.check_noise_band(noise_scheduler, args)
        pu_training.enable_memory_savers(unet, args)
        ema_model = pu_training.make_ema(unet, args) if args.use_ema else None
        pu_checkpoints.register_model_hooks(accelerator, type(unet), ema_model)

        make_dataset = image_dataset(args, unet.config.in_channels)
        hub_repo_id = pu_training.start_trackers(accelerator, args, plan, "train_pu_unconditional")
        run = pu_training.TrainingRun(
            **pu_training.prepare_for_training(
                accelerator, args, plan, unet, list(unet.parameters()), unlabeled, sensitive, make_dataset, ema_model
            ),
            noise_scheduler=noise_scheduler,
            loss=pu_training.LossSettings.from_flags(args, plan.prior),  # what the objective reads, fixed here
            base_model=base_model,
            hub_repo_id=hub_repo_id,
        )

        first_step = pu_checkpoints.resume_step(accelerator, args)
        save = functools.partial(end_of_epoch, accelerator, run, args)
        # The loop (pu_training.train) calls training_step for every micro-batch and end_of_epoch after each epoch.
        pu_training.train(accelerator, run, args, first_step, training_step=training_step, end_of_epoch=save)
        pu_training.end_training(accelerator, run)


def training_step(run: pu_training.TrainingRun, unlabeled_batch, sensitive_batch, generator=None):
    """One forward over cat([U batch, S batch]) and the PU risk of its per-sample losses."""
    noise_scheduler = run.noise_scheduler
    clean = unlabeled_batch if sensitive_batch is None else torch.cat([unlabeled_batch, sensitive_batch])
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=clean.device
    )
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    model_pred = run.model(noisy, timesteps).sample
    target = pu_training.diffusion_target(noise_scheduler, clean, noise, timesteps)
    return pu_training.pu_objective(run, model_pred, target, timesteps, unlabeled_batch.shape[0])


def end_of_epoch(
    accelerator, run: pu_training.TrainingRun, args: argparse.Namespace, epoch: int, global_step: int
) -> None:
    """Validation grid and pipeline save on their epoch schedules, and always after the last step."""
    accelerator.wait_for_everyone()
    last = global_step >= run.plan.max_train_steps
    images_due = last or (epoch + 1) % args.save_images_epochs == 0
    model_due = last or (epoch + 1) % args.save_model_epochs == 0
    state = pu_checkpoints.gathered_state_dict(accelerator, run.model) if images_due or model_due else None
    if accelerator.is_main_process:
        if images_due or model_due:
            with pu_training.model_to_save(accelerator, run, state) as unet:
                pipeline = make_pipeline(unet, run)
                grid = None
                if images_due:
                    grid = generate_validation_grid(accelerator, pipeline, args, run.plan.seed, epoch, global_step)
                if model_due:
                    save_pipeline_and_card(pipeline, args, run, grid)
        if model_due and run.hub_repo_id:
            pu_outputs.upload_to_hub(args, run.hub_repo_id, f"step {global_step}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    pu_training.exit_on_error(main, parse_args())
