"""checkpoint-N folders: saved atomically with the files they hold, found and checked for a resume."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from pu_diffusion.errors import InputError, reporting_full_disk

logger = logging.getLogger(__name__)


#: Flags that define the objective: a resume must not change them.
OBJECTIVE_FLAGS = (
    "loss_type",
    "prior",
    "filter_unlabeled",
    "nonnegative",
    "loss_reduction",
    "positive_risk_weight",
    "sensitive_min_timestep",
    "sensitive_max_snr",
)
#: The adapters a checkpoint holds (train_pu_text_to_image.py): a resume must build the same ones.
ADAPTER_FLAGS = ("use_lora", "rank", "lora_alpha", "lora_dropout", "lora_layers", "use_dora")
#: Flags that define the data order: a resume that changes them trains on, but does not replay the run.
DATA_ORDER_FLAGS = (
    "seed",
    "train_batch_size",
    "sensitive_batch_size",
    "gradient_accumulation_steps",
    "aspect_ratio_buckets",  # train_pu_text_to_image.py only
)
CHECKPOINT_CONFIG = "training_config.json"


# --------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def list_checkpoints(output_dir: str) -> list[Path]:
    """checkpoint-N folders of output_dir, oldest first."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(folders, key=checkpoint_step)


def named_checkpoint(args: argparse.Namespace) -> Path:
    """The folder --resume_from_checkpoint names: a path, or a checkpoint-N inside --output_dir."""
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        path = Path(args.output_dir) / path.name
    if not path.is_dir() or checkpoint_step(path) is None:
        raise InputError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint-N folder")
    return path


def save_checkpoint(accelerator, args: argparse.Namespace, global_step: int, run_config: dict) -> Path:
    """accelerator.save_state into checkpoint-N, atomically, then prune to --checkpoints_total_limit.

    The state is written to a hidden staging folder and renamed into place,
    so an interruption mid-save never leaves a checkpoint-N that looks
    complete; old checkpoints are removed only once the new one is in place.
    ``run_config``, the run's objective and data settings, goes beside it
    (``training_config.json``) with the list of the checkpoint's files, so a
    resume can check that it continues the same run from a complete state.
    """
    output_dir = Path(args.output_dir)
    final, staging = output_dir / f"checkpoint-{global_step}", output_dir / f".tmp-checkpoint-{global_step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    with reporting_full_disk(output_dir, f"checkpoint-{global_step}"):
        accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # What a complete checkpoint holds, so a resume can tell one that lost a file.
        files = {
            path.relative_to(staging).as_posix(): path.stat().st_size
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        with reporting_full_disk(output_dir, f"checkpoint-{global_step}"):
            (staging / CHECKPOINT_CONFIG).write_text(json.dumps({**run_config, "files": files}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                logger.info("removing old checkpoint %s", old)
                shutil.rmtree(old)
        logger.info("saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


def missing_from_checkpoint(path: Path) -> list[str]:
    """The files that ``path``'s training_config.json lists and that are gone or changed in size.

    Checkpoints written before the list existed cannot be checked: nothing is reported for them.
    """
    listed = (saved_run_config(path) or {}).get("files", {})
    missing = []
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            missing.append(f"{name} (missing)")
        elif file.stat().st_size != size:
            missing.append(f"{name} ({file.stat().st_size} bytes, written with {size})")
    return missing


def checkpoint_to_resume(args: argparse.Namespace, warn: bool = True) -> Path | None:
    """The checkpoint --resume_from_checkpoint asks for, or None for "latest" with none in --output_dir.

    A named checkpoint that lost files is an error that lists them; "latest"
    falls back to the newest complete checkpoint, with a warning for each it
    passes over.
    """
    if args.resume_from_checkpoint != "latest":
        path = named_checkpoint(args)
        missing = missing_from_checkpoint(path)
        if missing:
            raise InputError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint}: {path} is incomplete: {', '.join(missing)}"
            )
        return path
    checkpoints = list_checkpoints(args.output_dir)
    for path in reversed(checkpoints):
        missing = missing_from_checkpoint(path)
        if not missing:
            return path
        if warn:
            logger.warning("%s is incomplete (%s): trying the one before it", path, ", ".join(missing))
    if checkpoints:
        raise InputError(
            f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_dir} (each of"
            f" {', '.join(p.name for p in checkpoints)} lost files); start a new --output_dir"
        )
    return None


def saved_run_config(path: Path) -> dict | None:
    """A checkpoint's training_config.json, or None for one written before it existed."""
    config_file = path / CHECKPOINT_CONFIG
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def resumed_config_value(args: argparse.Namespace, key: str):
    """``key`` of the training_config.json of the checkpoint --resume_from_checkpoint continues, if there is one."""
    if not args.resume_from_checkpoint:
        return None
    path = checkpoint_to_resume(args, warn=False)
    saved = saved_run_config(path) if path is not None else None
    return saved.get(key) if saved else None


def resumed_seed(args: argparse.Namespace) -> int | None:
    """The seed of the run being resumed: a resume without --seed continues with it."""
    return resumed_config_value(args, "seed")


def resumed_prior_estimate(args: argparse.Namespace) -> dict | None:
    """The --prior auto estimate of the run being resumed: the objective must not change on a resume."""
    return resumed_config_value(args, "prior_estimate")


def resume_step(accelerator, args: argparse.Namespace) -> int:
    """Load --resume_from_checkpoint and return its global step (0 when starting fresh)."""
    if not args.resume_from_checkpoint:
        return 0
    path = checkpoint_to_resume(args)
    if path is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting fresh")
        return 0
    accelerator.print(f"resuming from {path}")
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"--resume_from_checkpoint: {path} cannot be loaded ({error})") from error
    return checkpoint_step(path)


def gathered_state_dict(accelerator, model) -> dict | None:
    """The model's whole state dict where DeepSpeed or FSDP shard its weights (on the main process; the others
    get what Accelerate gives them), else None: the unwrapped model holds its weights. Gathering is a
    collective, so every process must call this, not only the one that saves."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return None
    return accelerator.get_state_dict(model)


def full_model(accelerator, model, state: dict | None):
    """The unwrapped model, or with a gathered ``state`` a copy of it built from its config that holds it
    (under ZeRO-3 or FSDP the unwrapped model's own tensors are shards)."""
    unwrapped = accelerator.unwrap_model(model)
    if state is None:
        return unwrapped
    copy = type(unwrapped).from_config(unwrapped.config)
    copy.load_state_dict(state)
    return copy


def register_model_hooks(accelerator, model_cls, ema_model=None, subfolder: str = "unet") -> None:
    """Save checkpoints' models in Diffusers format (checkpoint-N/unet loads with from_pretrained).

    Under DeepSpeed and FSDP, Accelerate saves and loads its own sharded copy
    for the resume; the Diffusers folder is then written from the gathered weights.
    """

    def save_model_hook(models, weights, output_dir):
        states = [gathered_state_dict(accelerator, model) for model in models]
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, f"{subfolder}_ema"))
            for model, state in zip(models, states, strict=True):
                full_model(accelerator, model, state).save_pretrained(os.path.join(output_dir, subfolder))
        # Everything is saved above: stop Accelerate from saving the same weights again.
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        if ema_model is not None:
            loaded_ema = type(ema_model).from_pretrained(os.path.join(input_dir, f"{subfolder}_ema"), model_cls)
            ema_model.load_state_dict(loaded_ema.state_dict())
            ema_model.to(accelerator.device)
            del loaded_ema
        while models:
            model = models.pop()
            loaded = model_cls.from_pretrained(input_dir, subfolder=subfolder)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
