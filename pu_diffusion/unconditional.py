"""The unconditional model's pieces that the script and the benchmarks share: its data, default UNet and step."""

from __future__ import annotations

import torch

from pu_diffusion.batches import ImageTransform, TransformedImages
from pu_diffusion.objective import diffusion_target, pu_objective
from pu_diffusion.run_setup import TrainingRun


def image_dataset_factory(args, channels: int):
    """``make_dataset`` for the shared loaders: the images of one image column, transformed."""
    transform = ImageTransform(
        args.resolution, channels, args.center_crop, args.random_flip, args.image_interpolation_mode
    )

    def make_dataset(dataset, seed: int, source: str):
        return TransformedImages(dataset, args.image_column, transform, seed=seed, source=source)

    return make_dataset


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


def downsampling_factor(unet_config: dict) -> int:
    """How many times smaller a UNet2DModel's deepest feature map is: every down block but the last halves it."""
    return 2 ** (len(unet_config["down_block_types"]) - 1)


def training_step(run: TrainingRun, unlabeled_batch, sensitive_batch, generator=None):
    """One forward over cat([U batch, S batch]) and the PU risk of its per-sample losses."""
    noise_scheduler = run.noise_scheduler
    clean = unlabeled_batch if sensitive_batch is None else torch.cat([unlabeled_batch, sensitive_batch])
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator, device=clean.device
    )
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    model_pred = run.model(noisy, timesteps).sample
    target = diffusion_target(noise_scheduler, clean, noise, timesteps)
    return pu_objective(run.loss, noise_scheduler, model_pred, target, timesteps, unlabeled_batch.shape[0])
