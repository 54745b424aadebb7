"""Where a trained model's diffusion loss went up: per group of digits images and per band of noise levels.

    python benchmarks/loss_by_noise.py \
        unsupervised=outputs/benchmark/runs/unsupervised-seed0 pu=outputs/benchmark/runs/pu-seed0

For each pipeline, the mean per-sample loss l(x) of Eq. (8) on five groups
of the digits (the label split of the training script with ``--seed``: U's
normal and sensitive parts, S, and the normal and sensitive test images), in
three bands of timesteps. Every pipeline sees the same noise and timesteps.
A PU model that learned the concept raises the loss on the sensitive test
images, not only on S; where it raised it (low t: fine detail, high t: the
coarse shape that decides the class) tells why samples did or did not change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pu_diffusion.flags import POSITIVE_INT, show_ranges
from pu_diffusion.training_data import sensitive_mask, split_by_label

ROOT = Path(__file__).resolve().parent.parent

SENSITIVE_LABELS = ["1", "3", "5", "7", "9"]
BANDS = ((0, 100), (100, 400), (400, 1000))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="+", help="NAME=FOLDER of a trained DDPM pipeline, one or more.")
    parser.add_argument("--data_dir", default=str(ROOT / "data" / "digits"), help="The digits dataset folder.")
    parser.add_argument("--seed", type=int, default=0, help="The --seed the models were trained with (the split).")
    parser.add_argument("--draws", type=POSITIVE_INT, default=8, help="(t, noise) draws per image and band.")
    show_ranges(parser)
    args = parser.parse_args(argv)
    for item in args.pipelines:
        if "=" not in item:
            parser.error(f"{item!r}: give pipelines as NAME=FOLDER")
    return args


def digit_groups(data_dir: str, seed: int) -> dict[str, torch.Tensor]:
    """The five groups as (N, 1, 8, 8) tensors in [-1, 1]."""
    import datasets

    data = datasets.load_dataset(data_dir)
    train, test = data["train"], data["test"]
    split = split_by_label(sensitive_mask(train, "label", SENSITIVE_LABELS), seed=seed)
    test_sensitive = sensitive_mask(test, "label", SENSITIVE_LABELS)

    def pixels(dataset, indices) -> torch.Tensor:
        arrays = [np.asarray(dataset[int(i)]["image"].convert("L"), dtype=np.float32) for i in indices]
        return torch.from_numpy(np.stack(arrays))[:, None] / 127.5 - 1.0

    return {
        "U normal": pixels(train, split.unlabeled_normal),
        "U sensitive": pixels(train, split.unlabeled_sensitive),
        "S": pixels(train, split.labeled_sensitive),
        "test normal": pixels(test, np.flatnonzero(~test_sensitive)),
        "test sensitive": pixels(test, np.flatnonzero(test_sensitive)),
    }


@torch.inference_mode()
def mean_loss(unet, scheduler, images: torch.Tensor, band: tuple[int, int], draws: int, seed: int) -> float:
    """Mean of l(x) = ||eps - eps_theta(x_t, t)||^2 (summed over pixels) over images and draws, t in ``band``."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(draws):
        noise = torch.randn(images.shape, generator=generator)
        timesteps = torch.randint(band[0], band[1], (len(images),), generator=generator)
        prediction = unet(scheduler.add_noise(images, noise, timesteps), timesteps).sample
        losses.append(((prediction - noise) ** 2).sum(dim=(1, 2, 3)))
    return torch.cat(losses).mean().item()


def main(argv: list[str] | None = None) -> list[str]:
    from diffusers import DDPMScheduler, UNet2DModel

    args = parse_args(argv)
    groups = digit_groups(args.data_dir, args.seed)
    header = "| model | group | " + " | ".join(f"t in [{low}, {high})" for low, high in BANDS) + " |"
    lines = [header, "|" + " --- |" * (len(BANDS) + 2)]
    print("\n".join(lines), flush=True)
    for item in args.pipelines:
        name, folder = item.split("=", 1)
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        for group, images in groups.items():
            values = [mean_loss(unet, scheduler, images, band, args.draws, args.seed) for band in BANDS]
            lines.append(f"| {name} | {group} ({len(images)}) | " + " | ".join(f"{v:.2f}" for v in values) + " |")
            print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
