"""What a run leaves in --output_dir besides checkpoints: pipelines saved atomically, the lock that keeps one
run per folder, validation grids, the model card and the Hub upload."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pu_diffusion.errors import InputError, reporting_full_disk
from pu_diffusion.unlabeled_filter import describe

logger = logging.getLogger(__name__)


#: Held by the run that writes an output folder (:class:`OutputDirLock`).
LOCK_FILE = ".pu-diffusion.lock"
#: Never uploaded to the Hub: resumable training state, old validation images, staging folders, the lock.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "step_*", "epoch_*", ".tmp-*", LOCK_FILE]
#: Files whose presence marks a finished model in an output folder.
FINISHED_MODEL_FILES = ("model_index.json", "pytorch_lora_weights.safetensors")
#: The saved model's samples, shown in its model card.
SAMPLES_FILE = "samples.png"


def finished_model_file(output_dir: str) -> str | None:
    """The first of FINISHED_MODEL_FILES that ``output_dir`` holds, or None."""
    return next((name for name in FINISHED_MODEL_FILES if (Path(output_dir) / name).exists()), None)


# --------------------------------------------------------------------------- outputs


def save_outputs_atomically(output_dir: str, write: Callable[[Path], None], what: str = "the model") -> None:
    """Write every output of one save (model, samples.png, model card) with ``write(folder)`` into a staging
    folder, then move them in together: the folder never holds a half-written model that loads, nor samples or
    a card of a model that was not saved, and what was saved before stays loadable until the new one is in.

    The writing is the slow part. The pieces then move in by renames, the
    model's marker file (``model_index.json`` or the LoRA file) last: a file
    replaces the old one at once, a folder (``unet/``) first moves the old one
    into the staging folder's ``replaced/``. A process killed between those two
    renames leaves the old folder there, and :func:`clean_staging_folders` puts
    it back at the next start. A ``samples.png`` left from an earlier save goes
    when this save writes none: it would show another model. A full disk ends in
    :class:`errors.OutputError` naming the folder, with the old outputs intact.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=output))
    try:
        written, replaced = staging / "new", staging / "replaced"
        written.mkdir()
        with reporting_full_disk(output, what):
            write(written)
        replaced.mkdir()
        if not (written / SAMPLES_FILE).exists() and (output / SAMPLES_FILE).exists():
            os.replace(output / SAMPLES_FILE, replaced / SAMPLES_FILE)
        for item in sorted(written.iterdir(), key=lambda p: p.name in FINISHED_MODEL_FILES):
            target = output / item.name
            if target.is_dir():
                os.replace(target, replaced / item.name)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def clean_staging_folders(output_dir: str) -> None:
    """Remove what a killed process left in --output_dir: .tmp-* staging folders of checkpoints, pipelines
    and LoRA files. A pipeline folder that a kill left in ``replaced/`` goes back into place first."""
    for staging in sorted(Path(output_dir).glob(".tmp-*")):
        for old in sorted((staging / "replaced").glob("*")):
            if not (Path(output_dir) / old.name).exists():
                logger.warning("putting back %s, left aside by an interrupted save", old.name)
                os.replace(old, Path(output_dir) / old.name)
        logger.info("removing %s, left by an interrupted run", staging)
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def output_dir_lock(output_dir: str, is_main_process: bool):
    """The main process holds :class:`OutputDirLock` for the block, after cleaning what a killed run left."""
    lock = OutputDirLock(output_dir) if is_main_process else None
    try:
        if lock is not None:
            clean_staging_folders(output_dir)
        yield
    finally:
        if lock is not None:
            lock.release()


class OutputDirLock:
    """One training run per --output_dir: an exclusive ``flock`` on a lock file inside it.

    The operating system drops the lock when the process ends, however it
    ends, so a lock file left by a killed run blocks nobody. On release the
    lock file goes, and so does the folder if this run created it and left
    nothing else in it (a run refused for bad input writes nothing).
    """

    def __init__(self, output_dir: str):
        import fcntl

        self.output_dir = Path(output_dir)
        self.created = not self.output_dir.exists()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / LOCK_FILE
        self.handle = open(self.path, "a+")  # held open, and locked, for the whole run
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise InputError(
                f"--output_dir {output_dir} is in use by another training run ({owner}); wait for it to end or"
                " choose another folder"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.handle.flush()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.handle.close()  # closing drops the flock
        if self.created and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (what pipelines return with output_type="np") -> uint8 pixels."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, min_tile: int = 32, gap: int = 2, columns: int | None = None):
    """(N, H, W, C) floats in [0, 1], or uint8 pixels -> one PIL grid, as square as N allows
    unless ``columns`` is given.

    Tiles smaller than ``min_tile`` pixels are enlarged by a whole factor
    (nearest neighbour, so an 8x8 digit stays sharp), with a gap between them.
    """
    from PIL import Image

    pixels = images if images.dtype == np.uint8 else to_uint8(images)
    count, height, width, channels = pixels.shape
    factor = max(1, math.ceil(min_tile / max(height, width)))
    pixels = pixels.repeat(factor, axis=1).repeat(factor, axis=2)
    cols = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    tile_h, tile_w = height * factor, width * factor
    grid = np.full((rows * (tile_h + gap) + gap, cols * (tile_w + gap) + gap, channels), 128, dtype=np.uint8)
    for index, tile in enumerate(pixels):
        top, left = gap + (index // cols) * (tile_h + gap), gap + (index % cols) * (tile_w + gap)
        grid[top : top + tile_h, left : left + tile_w] = tile
    return Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)


def save_validation_images(
    accelerator,
    images: np.ndarray,
    output_dir: str,
    tag: str,
    step: int,
    columns: int | None = None,
    captions: list[str] | None = None,
):
    """Save a grid to output_dir/validation/<tag>.png, log the images, and return the grid. The grid becomes
    samples.png only with a model save (:func:`save_outputs_atomically`), so that it shows the saved model."""
    grid = image_grid(images, columns=columns)
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.png"
    with reporting_full_disk(folder, f"the validation grid {path.name}"):
        grid.save(path)
    log_images(accelerator.trackers, images, step, captions)
    logger.info("validation grid: %s", path)
    return grid


def log_images(trackers, images: np.ndarray, step: int, captions: list[str] | None = None) -> None:
    """The validation images (N, H, W, C in [0, 1]) to TensorBoard and to wandb, each image with its caption."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(images).transpose(0, 3, 1, 2), step)
        elif tracker.name == "wandb":
            import wandb

            names = captions or [f"image {index}" for index in range(len(images))]
            logged = [wandb.Image(to_uint8(image), caption=name) for image, name in zip(images, names, strict=True)]
            tracker.log({"validation": logged}, step=step)


def prior_description(plan) -> str:
    estimate = plan.prior_estimate
    if estimate is None:
        return f"{plan.prior}"
    return (
        f"{estimate['estimate']:.4f}, estimated (--prior auto; {round(100 * estimate['confidence'])}% interval"
        f" {estimate['low']:.4f} to {estimate['high']:.4f}; {estimate['method']}, {estimate['features']})"
    )


def noise_band_description(args) -> str:
    if args.sensitive_min_timestep:
        return f"t >= {args.sensitive_min_timestep}"
    if args.sensitive_max_snr is None:
        return "all"
    return f"SNR <= {args.sensitive_max_snr:g}"


def write_model_card(
    output_dir: str,
    args: argparse.Namespace,
    plan,
    *,
    base_model: str | None,
    tags: list[str],
    title: str,
    body: str = "",
    image: str | None = None,
) -> Path:
    """README.md with the training data, the loss and how to load the model; ``plan`` is the run's
    ``run_setup.RunPlan`` (data sizes, steps, S batch size, learning rate)."""
    from huggingface_hub import ModelCard, ModelCardData

    datasets = [d for d in (args.dataset_name, args.sensitive_dataset_name) if d and not is_local(d)]
    card_data = ModelCardData(
        base_model=base_model if base_model and not is_local(base_model) else None,
        datasets=datasets or None,
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "pu-diffusion", "positive-unlabeled", *tags],
    )
    sensitive = public_name(args.sensitive_dataset_name or args.sensitive_data_dir)
    if args.label_column:
        sensitive = f"labels {args.sensitive_labels} of `{args.label_column}` in {public_name(args.dataset_name)}"
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {title}",
        "",
        "Trained with positive-unlabeled diffusion (Takahashi et al., ICLR 2025): the ELBO of normal data is"
        " maximised, estimated from the unlabeled data U and the labeled sensitive data S, and the ELBO of S is"
        " minimised.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model | {public_name(base_model) or 'trained from scratch'} |",
        f"| unlabeled data U | {public_name(args.dataset_name or args.train_data_dir)} |",
        f"| sensitive data S | {sensitive or 'none (unsupervised)'} |",
        f"| images in U, S | {plan.num_unlabeled_images}, {plan.num_sensitive_images} |",
        *([f"| U filtered first (ours) | {describe(plan.unlabeled_filter)} |"] if plan.unlabeled_filter else []),
        f"| loss type | {args.loss_type} |",
        f"| prior (beta) | {prior_description(plan)} |",
        f"| nonnegative | {args.nonnegative} |",
        f"| loss reduction | {args.loss_reduction} |",
        f"| positive risk weight (ours; 1 = paper) | {args.positive_risk_weight} |",
        f"| noise band of the S terms (ours; paper: all) | {noise_band_description(args)} |",
        f"| steps, batch (U + S) | {plan.max_train_steps}, {args.train_batch_size} + {plan.sensitive_batch_size} |",
        f"| learning rate | {plan.learning_rate} ({args.lr_scheduler}) |",
        f"| EMA | {args.use_ema} |",
        "",
    ]
    if image:
        lines += [f"![samples]({image})", ""]
    card = ModelCard("\n".join(lines) + "\n" + body)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def is_local(name_or_path: str) -> bool:
    """A path on this machine rather than a Hub id (a Hub id may look like a relative path: check the disk)."""
    return os.path.isabs(name_or_path) or os.path.exists(name_or_path)


def public_name(name_or_path: str | None) -> str | None:
    """How a card or an upload names a model or data: a Hub id as it is, a local path by its folder's name
    only. Local paths say who ran it and where (the sensitive set's folder among them) and help no reader."""
    if name_or_path is None or not is_local(name_or_path):
        return name_or_path
    return f"{public_reference(name_or_path)} (a local folder)"


def public_reference(name_or_path: str) -> str:
    """What a card's code loads: a Hub id, or a local folder by its name alone."""
    return Path(name_or_path).resolve().name if is_local(name_or_path) else name_or_path


def model_reference(args: argparse.Namespace, hub_repo_id: str | None) -> str:
    """What a card's snippet loads: the Hub repository that was created, else the output folder as given."""
    if hub_repo_id:
        return hub_repo_id
    return args.output_dir if not os.path.isabs(args.output_dir) else Path(args.output_dir).name


def create_hub_repo(args: argparse.Namespace) -> str:
    from huggingface_hub import create_repo

    repo_id = args.hub_model_id or Path(args.output_dir).name
    return create_repo(repo_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id


def upload_to_hub(args: argparse.Namespace, repo_id: str, commit_message: str) -> None:
    from huggingface_hub import upload_folder

    # The logs' hparams hold every flag; they go up only when asked for (and then without local paths:
    # run_setup.tracker_config).
    logs = [] if args.push_logs_to_hub else [f"{args.logging_dir.strip('/')}/**", args.logging_dir.strip("/")]
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        ignore_patterns=HUB_IGNORE_PATTERNS + logs,
        token=args.hub_token,
    )


def write_json_atomically(path: Path, content: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(staging, path)
