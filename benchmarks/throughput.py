"""Training-step speed and memory: unsupervised (U only) against PU (U + S), same images per step.

    python benchmarks/throughput.py                 # small and medium UNet, CPU (or the GPU if there is one)
    python benchmarks/throughput.py --steps 50 --repeats 5 --threads 2

Prints a markdown table: images per second of a full training step (forward,
backward, optimizer; the median run and the range over runs), peak memory,
the PU/unsupervised ratio (the median of the ratios of back-to-back runs), the share of a
step spent in the PU loss arithmetic, and the share of a step that the real
data loaders (digits data, the training script's own loaders) would add.
Each configuration runs in a process of its own, so that its peak memory is
its own. It measures the training script's own functions, not copies.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from pu_diffusion.builtin_datasets import write_digits_dataset
from pu_diffusion.checks import pu_loss_flags
from pu_diffusion.flags import POSITIVE_INT, show_ranges
from pu_diffusion.objective import LossSettings
from pu_diffusion.run_setup import seeded_loader
from pu_diffusion.unconditional import default_unet_config, image_dataset_factory, training_step
from pu_loss import compute_risk

#: name -> (resolution, U images per step, S images per step). The small one is the demo's.
MODELS = {"small": (8, 128, 12), "medium": (16, 64, 6)}
LOSS_TYPES = ("unsupervised", "pu")


def one_configuration(model_name: str, loss_type: str, steps: int, device: str) -> dict:
    """Time ``steps`` training steps after 3 warm-up steps; return the measurements."""
    from diffusers import DDPMScheduler, UNet2DModel

    resolution, num_unlabeled, num_sensitive = MODELS[model_name]
    torch.manual_seed(0)
    unet = UNet2DModel(**default_unet_config(resolution, channels=1)).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    args = pu_loss_flags(["--loss_type", loss_type])  # the unconditional script's defaults
    images = torch.rand(num_unlabeled + num_sensitive, 1, resolution, resolution, device=device) * 2 - 1
    # Same images per step: the unsupervised baseline takes all of them as U.
    if loss_type == "pu":
        unlabeled, sensitive = images[:num_unlabeled], images[num_unlabeled:]
    else:
        unlabeled, sensitive = images, None

    run = argparse.Namespace(
        model=unet, noise_scheduler=scheduler, loss=LossSettings.from_flags(args, prior=args.prior)
    )

    def step():
        risk = training_step(run, unlabeled, sensitive)
        risk.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    step_seconds = (time.perf_counter() - start) / steps
    return {
        "model": model_name,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "resolution": resolution,
        "loss_type": loss_type,
        "images_per_step": len(images),
        "step_ms": step_seconds * 1e3,
        "images_per_second": len(images) / step_seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "loss_arithmetic_share": loss_arithmetic_seconds(num_unlabeled, num_sensitive, loss_type, device)
        / step_seconds,
        "data_wait_share": data_seconds_per_step(resolution, num_unlabeled, num_sensitive, loss_type)
        / (step_seconds + data_seconds_per_step(resolution, num_unlabeled, num_sensitive, loss_type)),
    }


def loss_arithmetic_seconds(num_unlabeled: int, num_sensitive: int, loss_type: str, device: str) -> float:
    """Seconds per step of the risk computation on per-sample losses, forward and backward."""
    losses = torch.rand(num_unlabeled + num_sensitive, device=device, requires_grad=True)
    count = num_unlabeled if loss_type == "pu" else num_unlabeled + num_sensitive
    repeats = 200
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        compute_risk(losses, count, loss_type, 0.1, "nnpu").loss.backward()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


_DATA_CACHE: dict = {}


def data_seconds_per_step(resolution: int, num_unlabeled: int, num_sensitive: int, loss_type: str) -> float:
    """Seconds to fetch one step's batches from the training script's loaders (main process, no workers)."""
    key = (resolution, num_unlabeled, num_sensitive, loss_type)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    import datasets

    with tempfile.TemporaryDirectory() as folder:
        write_digits_dataset(folder)
        train = datasets.load_dataset(folder, split="train")
        options = argparse.Namespace(
            resolution=resolution,
            center_crop=False,
            random_flip=True,
            image_column="image",
            dataloader_num_workers=0,
            image_interpolation_mode="bilinear",  # the unconditional script's default
        )
        unlabeled_batch = num_unlabeled if loss_type == "pu" else num_unlabeled + num_sensitive
        make_dataset = image_dataset_factory(options, channels=1)
        loaders = [seeded_loader(options, make_dataset(train, 0, "U"), unlabeled_batch, 0, drop_last=True)[0]]
        if loss_type == "pu":
            loaders.append(seeded_loader(options, make_dataset(train, 1, "S"), num_sensitive, 1, True)[0])
        streams = [iter(loader) for loader in loaders]
        batches = min(len(loader) for loader in loaders)
        start = time.perf_counter()
        for _ in range(batches):
            for stream in streams:
                next(stream)
        _DATA_CACHE[key] = (time.perf_counter() - start) / batches
    return _DATA_CACHE[key]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def median_run(measurements: list[dict]) -> dict:
    """The run with the median images per second."""
    ordered = sorted(measurements, key=lambda run: run["images_per_second"])
    return ordered[len(ordered) // 2]


def table(results: list[dict]) -> str:
    lines = [
        "| model | params | px | loss | images/step | ms/step | images/s (range) | PU / unsup. | peak MB"
        " | loss math | data wait |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        low, high = r["range"]
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['resolution']} | {r['loss_type']} |"
            f" {r['images_per_step']} | {r['step_ms']:.1f} | {r['images_per_second']:.0f} ({low:.0f}-{high:.0f}) |"
            f" {r['ratio']:.3f} |"
            f" {r['peak_memory_mb']:.0f} | {r['loss_arithmetic_share']:.2%} | {r['data_wait_share']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=POSITIVE_INT, default=30, help="Timed steps per configuration.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--repeats",
        type=POSITIVE_INT,
        default=3,
        help="Runs per configuration, interleaved; the table shows the median.",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "LOSS"), help=argparse.SUPPRESS)
    show_ranges(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_configuration(*args.one, args.steps, args.device)))
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so that drift in machine load hits every configuration
        for model_name in args.models:
            for loss_type in LOSS_TYPES:
                command = [
                    sys.executable,
                    __file__,
                    "--one",
                    model_name,
                    loss_type,
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                ]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs.setdefault((model_name, loss_type), []).append(json.loads(output.strip().splitlines()[-1]))
    results = []
    for (model_name, _), measurements in runs.items():
        result = median_run(measurements)
        speeds = [run["images_per_second"] for run in measurements]
        baseline = runs[(model_name, "unsupervised")]
        # Ratio within each repeat (the two runs ran back to back), then the median over repeats.
        ratios = sorted(
            m["images_per_second"] / b["images_per_second"] for m, b in zip(measurements, baseline, strict=True)
        )
        results.append({**result, "range": (min(speeds), max(speeds)), "ratio": ratios[len(ratios) // 2]})
    print(
        f"device: {args.device}, torch threads: {args.threads or torch.get_num_threads()}, steps: {args.steps},"
        f" median of {args.repeats} runs\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
