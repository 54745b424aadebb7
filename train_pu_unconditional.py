"""Train or fine-tune an unconditional DDPM with the positive-unlabeled (PU) loss.

    accelerate launch train_pu_unconditional.py \
        --dataset_name ylecun/mnist --label_column label --sensitive_labels 1 3 5 7 9 \
        --resolution 32 --output_dir ddpm-pu-mnist

The model learns U's normal data and unlearns S: see README.md and pu_loss.py.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pu_data
import pu_training_utils as common
from pu_data import InputError

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Fine-tune this DDPM pipeline (folder or Hub id): its unet and scheduler.",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained pipeline.")
    model.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    model.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="UNet2DModel config (folder or Hub id) to train from scratch. Default: a UNet sized by --resolution.",
    )
    model.add_argument(
        "--prediction_type",
        choices=PREDICTION_TYPES,
        default=None,
        help="What the model predicts. Default: the pretrained scheduler's, else epsilon.",
    )
    model.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion steps T (from scratch).")
    model.add_argument("--ddpm_beta_schedule", type=str, default="linear", help="Beta schedule (from scratch).")
    model.add_argument(
        "--ddpm_num_inference_steps", type=int, default=1000, help="Denoising steps for the validation samples."
    )
    model.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    common.add_data_arguments(parser)
    common.add_pu_arguments(parser)
    common.add_training_arguments(parser)
    validation = parser.add_argument_group("validation and saving")
    validation.add_argument("--eval_batch_size", type=int, default=16, help="Images in each validation grid.")
    validation.add_argument("--save_images_epochs", type=int, default=10, help="Validation grid every N epochs.")
    validation.add_argument("--save_model_epochs", type=int, default=10, help="Save the pipeline every N epochs.")
    common.add_hub_arguments(parser)
    args = parser.parse_args(argv)
    try:
        common.check_common_arguments(args)
        if args.pretrained_model_name_or_path and args.model_config_name_or_path:
            raise InputError("--pretrained_model_name_or_path and --model_config_name_or_path: give one")
        for flag in ("eval_batch_size", "save_images_epochs", "save_model_epochs", "ddpm_num_inference_steps"):
            if getattr(args, flag) < 1:
                raise InputError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    except InputError as error:
        parser.error(str(error))
    return args


# --------------------------------------------------------------------------- data


def make_dataloader(args, dataset, batch_size: int, channels: int, seed: int, source: str, drop_last: bool):
    """A loader over ``dataset`` whose order and augmentation are functions of (seed, epoch) alone."""
    transform = pu_data.ImageTransform(args.resolution, channels, args.center_crop, args.random_flip)
    sampler = pu_data.EpochShuffle(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        pu_data.TransformedImages(dataset, args.image_column, transform, seed=seed, source=source),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=args.dataloader_num_workers,
    )
    return loader, sampler


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
        if args.prediction_type:
            scheduler.register_to_config(prediction_type=args.prediction_type)
        elif scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise InputError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: its scheduler predicts"
                f" {scheduler.config.prediction_type!r}; pass --prediction_type, one of {PREDICTION_TYPES}"
            )
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


def image_channels(dataset, image_column: str) -> int:
    return 1 if dataset[0][image_column].mode in pu_data.GRAYSCALE_MODES else 3


# --------------------------------------------------------------------------- validation and saving


def make_pipeline(accelerator, unet, ema_model, noise_scheduler):
    """A DDPMPipeline on the EMA weights when EMA is on (a copy, so training weights stay untouched)."""
    from diffusers import DDPMPipeline

    unet = accelerator.unwrap_model(unet)
    if ema_model is not None:
        unet = copy.deepcopy(unet)
        ema_model.copy_to(unet.parameters())
    return DDPMPipeline(unet=unet, scheduler=copy.deepcopy(noise_scheduler))


def generate_validation_grid(accelerator, pipeline, args, epoch: int, global_step: int) -> None:
    generator = torch.Generator(device="cpu").manual_seed(args.seed or 0)
    images = pipeline(
        generator=generator,
        batch_size=args.eval_batch_size,
        num_inference_steps=args.ddpm_num_inference_steps,
        output_type="np",
    ).images
    path = common.save_validation_images(accelerator, images, args.output_dir, f"epoch-{epoch:04d}", global_step)
    logger.info("validation grid: %s", path)


def save_model(pipeline, args, base_model: str | None) -> None:
    common.save_pipeline_atomically(pipeline, args.output_dir)
    has_samples = (Path(args.output_dir) / "samples.png").exists()
    common.write_model_card(
        args.output_dir,
        args,
        base_model=base_model,
        tags=["unconditional-image-generation", "ddpm"],
        title="PU diffusion: unconditional DDPM",
        image="samples.png" if has_samples else None,
        body=(
            "## Use\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipeline = DiffusionPipeline.from_pretrained("{args.hub_model_id or args.output_dir}")\n'
            "images = pipeline(batch_size=16).images\n```\n"
        ),
    )


# --------------------------------------------------------------------------- training


@dataclass
class Run:
    """What the training loop works on, prepared by Accelerate."""

    unet: torch.nn.Module
    noise_scheduler: object
    ema_model: object | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    unlabeled_loader: torch.utils.data.DataLoader
    unlabeled_sampler: pu_data.EpochShuffle
    sensitive_loader: torch.utils.data.DataLoader | None
    sensitive_sampler: pu_data.EpochShuffle | None
    steps_per_epoch: int
    base_model: str | None
    hub_repo_id: str | None = None


def main(args: argparse.Namespace) -> None:
    accelerator = common.make_accelerator(args)
    common.settle_seed(accelerator, args)
    with accelerator.main_process_first():
        unlabeled, sensitive = pu_data.load_training_sets(args)
    args.num_unlabeled_images = len(unlabeled)
    args.num_sensitive_images = len(sensitive) if sensitive is not None else 0
    run = prepare_run(accelerator, args, unlabeled, sensitive)

    if accelerator.is_main_process:
        accelerator.init_trackers("train_pu_unconditional", config=tracker_config(args))
        if args.push_to_hub:
            run.hub_repo_id = common.create_hub_repo(args)
    logger.info(
        "U: %d images, S: %d images, %d steps of %d U + %s S images per process",
        args.num_unlabeled_images,
        args.num_sensitive_images,
        args.max_train_steps,
        args.train_batch_size,
        args.sensitive_batch_size,
    )
    train(accelerator, run, args)
    accelerator.end_training()


def prepare_run(accelerator, args, unlabeled, sensitive) -> Run:
    """Model, EMA, loaders, optimizer and learning-rate schedule, passed through accelerator.prepare."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet, noise_scheduler, base_model = load_model(args, image_channels(unlabeled, args.image_column))
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema_model = None
    if args.use_ema:
        ema_model = EMAModel(
            unet.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=type(unet),
            model_config=unet.config,
        )
    common.register_model_hooks(accelerator, type(unet), ema_model)

    channels = unet.config.in_channels
    unlabeled_loader, unlabeled_sampler = make_dataloader(
        args, unlabeled, args.train_batch_size, channels, pu_data.derived_seed(args.seed, 0), "U", drop_last=False
    )
    sensitive_loader = sensitive_sampler = None
    if sensitive is not None:
        if args.sensitive_batch_size is None:
            args.sensitive_batch_size = pu_data.default_sensitive_batch_size(
                args.train_batch_size, len(unlabeled), len(sensitive)
            )
        sensitive_loader, sensitive_sampler = make_dataloader(
            args,
            sensitive,
            args.sensitive_batch_size,
            channels,
            pu_data.derived_seed(args.seed, 1),
            "S",
            # Full S batches only; an S smaller than one batch still gives one batch per pass.
            drop_last=len(sensitive) >= args.sensitive_batch_size,
        )
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    steps_per_epoch, max_train_steps = common.training_schedule(
        math.ceil(len(unlabeled_loader) / accelerator.num_processes), args
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, unlabeled_loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, unlabeled_loader, lr_scheduler
    )
    # PU risks are computed per process on its own U and S shards; DDP then averages the
    # gradients. Each shard is an unbiased mini-batch estimate, as in the single-process case.
    if sensitive_loader is not None:
        sensitive_loader = accelerator.prepare(sensitive_loader)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    return Run(
        unet,
        noise_scheduler,
        ema_model,
        optimizer,
        lr_scheduler,
        unlabeled_loader,
        unlabeled_sampler,
        sensitive_loader,
        sensitive_sampler,
        steps_per_epoch,
        base_model,
    )


def train(accelerator, run: Run, args: argparse.Namespace) -> None:
    """The loop: one optimizer step per U batch (times accumulation), each paired with an S batch.

    Data order, augmentation and each batch's noise and timesteps are functions
    of (seed, epoch, batch), so a run resumed from checkpoint-N replays the
    uninterrupted run from step N on.
    """
    global_step = common.resume_step(accelerator, args)
    batches_per_epoch = len(run.unlabeled_loader)
    first_epoch = global_step // run.steps_per_epoch
    skip_batches = (global_step % run.steps_per_epoch) * args.gradient_accumulation_steps
    sensitive_stream = None
    if run.sensitive_loader is not None:
        sensitive_stream = pu_data.endless(
            run.sensitive_loader,
            run.sensitive_sampler,
            first_epoch * batches_per_epoch + skip_batches,
            accelerator.skip_first_batches,
        )
    stop = common.StopRequest()
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, args.num_train_epochs):
        run.unet.train()
        run.unlabeled_sampler.use_epoch(epoch)
        start = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(run.unlabeled_loader, start) if start else run.unlabeled_loader
        for batch_index, unlabeled_batch in enumerate(loader, start=start):
            sensitive_batch = next(sensitive_stream) if sensitive_stream is not None else None
            generator = torch.Generator(accelerator.device).manual_seed(
                pu_data.derived_seed(args.seed, epoch, batch_index, accelerator.process_index)
            )
            with accelerator.accumulate(run.unet):
                risk = training_step(run.unet, run.noise_scheduler, unlabeled_batch, sensitive_batch, args, generator)
                accelerator.backward(risk.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.unet.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if run.ema_model is not None:
                run.ema_model.step(run.unet.parameters())
            global_step += 1
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                common.check_finite(risk, global_step, args.output_dir)
                logs = common.log_risk(accelerator, risk, run.lr_scheduler.get_last_lr()[0], global_step)
                progress.set_postfix(loss=f"{logs['loss']:.4g}")
            if global_step % args.checkpointing_steps == 0:
                common.save_checkpoint(accelerator, args, global_step)
            if stop.requested(accelerator):
                interrupt(accelerator, args, global_step, stop.signal_number)
            if global_step >= args.max_train_steps:
                break
        end_of_epoch(accelerator, run, args, epoch, global_step)
        if global_step >= args.max_train_steps:
            break
    stop.restore()
    progress.close()


def interrupt(accelerator, args, global_step: int, signal_number: int | None) -> None:
    """Save the state of the last finished step (unless just saved) and stop."""
    if not (Path(args.output_dir) / f"checkpoint-{global_step}").is_dir():
        common.save_checkpoint(accelerator, args, global_step)
    accelerator.end_training()
    number = signal_number or signal.SIGTERM
    raise common.TrainingInterrupted(
        f"interrupted by {signal.Signals(number).name} after step {global_step}; checkpoint-{global_step} is in"
        f" {args.output_dir}: continue with --resume_from_checkpoint latest",
        number,
    )


def training_step(unet, noise_scheduler, unlabeled_batch, sensitive_batch, args, generator=None):
    """One forward over cat([U batch, S batch]) and the PU risk of its per-sample losses."""
    clean = unlabeled_batch if sensitive_batch is None else torch.cat([unlabeled_batch, sensitive_batch])
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=clean.device
    )
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    model_pred = unet(noisy, timesteps).sample
    target = common.diffusion_target(noise_scheduler, clean, noise, timesteps)
    return common.pu_objective(model_pred, target, unlabeled_batch.shape[0], args)


def end_of_epoch(accelerator, run: Run, args: argparse.Namespace, epoch: int, global_step: int) -> None:
    """Validation grid and pipeline save on their epoch schedules, and always after the last step."""
    accelerator.wait_for_everyone()
    last = global_step >= args.max_train_steps
    if accelerator.is_main_process:
        images_due = last or (epoch + 1) % args.save_images_epochs == 0
        model_due = last or (epoch + 1) % args.save_model_epochs == 0
        if images_due or model_due:
            pipeline = make_pipeline(accelerator, run.unet, run.ema_model, run.noise_scheduler)
            if images_due:
                generate_validation_grid(accelerator, pipeline, args, epoch, global_step)
            if model_due:
                save_model(pipeline, args, run.base_model)
                if run.hub_repo_id:
                    common.upload_to_hub(args, run.hub_repo_id, f"step {global_step}")
    accelerator.wait_for_everyone()


def tracker_config(args: argparse.Namespace) -> dict:
    """The run's flags for TensorBoard's hparams (scalars and strings only), without the Hub token."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in vars(args).items()
        if key != "hub_token"
    }


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (InputError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    except common.TrainingInterrupted as interruption:
        print(f"stopped: {interruption}", file=sys.stderr)
        sys.exit(interruption.exit_code)
