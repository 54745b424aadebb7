"""The checks that run on the parsed flags before anything is loaded or written."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

from pu_diffusion.checkpoints import (
    ADAPTER_FLAGS,
    CHECKPOINT_CONFIG,
    DATA_ORDER_FLAGS,
    OBJECTIVE_FLAGS,
    checkpoint_to_resume,
    saved_run_config,
)
from pu_diffusion.errors import InputError
from pu_diffusion.flags import add_pu_arguments, show_ranges
from pu_diffusion.objective import DEFAULT_SENSITIVE_MAX_SNR
from pu_diffusion.outputs import finished_model_file
from pu_diffusion.prior import check_sizes_from_flags, images_needed

logger = logging.getLogger(__name__)


def parse_and_check(parser: argparse.ArgumentParser, argv: list[str] | None, *script_checks) -> argparse.Namespace:
    """Parse a training script's command line, then run the shared checks and the script's own; a bad value
    ends in argparse's usage error naming the flag, before anything is loaded."""
    show_ranges(parser)
    args = parser.parse_args(argv)
    try:
        check_common_arguments(args)
        for check in script_checks:
            check(args)
    except InputError as error:
        parser.error(str(error))
    return args


def check_common_arguments(args: argparse.Namespace) -> None:
    """Checks that need no data: bad values fail here, before anything is loaded or written."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError("U is missing: give --dataset_name or --train_data_dir")
    check_sensitive_source(args)
    resolve_loss_options(args)
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise InputError(
            "--report_to wandb with --hub_token: a security risk of exposing your token (wandb records the"
            " command line); log in with `hf auth login` and drop --hub_token"
        )
    if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise InputError("--report_to wandb needs wandb: pip install wandb")
    if args.prior == "auto" and args.loss_type == "pu":
        check_sizes_from_flags(args)
    if args.filter_unlabeled is not None:
        check_filter_source(args)
    check_optimizer(args)
    _check_output_dir(args)


def pu_loss_flags(argv: list[str], default_nonnegative: str = "nnpu") -> argparse.Namespace:
    """The PU loss flags of ``argv`` and the rest at the scripts' defaults, settled as a script settles them;
    for code that runs a training step without a script's command line (the benchmarks)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_pu_arguments(parser, default_nonnegative)
    args = parser.parse_args(argv)
    resolve_loss_options(args)
    return args


def resolve_loss_options(args: argparse.Namespace) -> None:
    """Settle our two loss options: --paper_loss, else the flags given, else our defaults (at parse time).

    Afterwards ``positive_risk_weight`` is a number, and the band is
    ``sensitive_max_snr`` (None: every draw) or, when given,
    ``sensitive_min_timestep`` (0: not used).
    """
    band_flags = [flag for flag in ("sensitive_max_snr", "sensitive_min_timestep") if getattr(args, flag) is not None]
    if args.paper_loss:
        given = band_flags + (["positive_risk_weight"] if args.positive_risk_weight is not None else [])
        if getattr(args, "loss_reduction", "sum") != "sum":
            given.append(f"loss_reduction {args.loss_reduction}")
        if getattr(args, "snr_gamma", None):
            given.append("snr_gamma")
        if given:
            raise InputError(f"--paper_loss is the paper's loss as written (summed, unweighted); drop --{given[0]}")
    if len(band_flags) == 2:
        raise InputError("--sensitive_max_snr and --sensitive_min_timestep set the same band: give one")
    if args.positive_risk_weight is None:
        args.positive_risk_weight = 1.0 if args.paper_loss else 0.0
    if args.sensitive_min_timestep is None:
        args.sensitive_min_timestep = 0
        if args.sensitive_max_snr is None and not args.paper_loss:
            args.sensitive_max_snr = DEFAULT_SENSITIVE_MAX_SNR


def check_optimizer(args: argparse.Namespace) -> None:
    if args.optimizer != "prodigy":
        return
    if importlib.util.find_spec("prodigyopt") is None:
        raise InputError("--optimizer prodigy needs prodigyopt: pip install prodigyopt")
    if getattr(args, "use_8bit_adam", False):
        raise InputError("--use_8bit_adam is an AdamW; drop it with --optimizer prodigy")
    if args.learning_rate <= 0.1:
        logger.warning(
            "--optimizer prodigy with --learning_rate %g: Prodigy estimates the step size and scales it by the"
            " learning rate, so a value near 1.0 is usual",
            args.learning_rate,
        )


def check_sensitive_source(args: argparse.Namespace) -> None:
    label_flags = ("num_unlabeled_normal", "num_unlabeled_sensitive", "num_labeled_sensitive", "sensitive_labels")
    if args.label_column is None:
        given = [f"--{flag}" for flag in label_flags if getattr(args, flag) is not None]
        if given:
            raise InputError(f"{', '.join(given)} need --label_column")
    else:
        if args.dataset_name is None:
            raise InputError("--label_column needs a labeled --dataset_name to draw U and S from")
        if not args.sensitive_labels:
            raise InputError("--label_column needs --sensitive_labels: which labels are sensitive")
        if args.sensitive_dataset_name or args.sensitive_data_dir:
            raise InputError("--label_column draws S from --dataset_name; drop --sensitive_dataset_name/_data_dir")
    has_sensitive = args.label_column or args.sensitive_dataset_name or args.sensitive_data_dir
    if args.loss_type != "unsupervised" and not has_sensitive:
        raise InputError(
            f"--loss_type {args.loss_type} needs labeled sensitive data S: give --sensitive_dataset_name,"
            " --sensitive_data_dir, or --label_column with --sensitive_labels"
        )


def check_filter_source(args: argparse.Namespace) -> None:
    """--filter_unlabeled scores U against S: it needs S, as large as the prior estimator needs."""
    if not (args.label_column or args.sensitive_dataset_name or args.sensitive_data_dir):
        raise InputError(
            "--filter_unlabeled needs labeled sensitive data S to score U against: give --sensitive_dataset_name,"
            " --sensitive_data_dir, or --label_column with --sensitive_labels"
        )
    needed = images_needed(args.prior_folds)
    if getattr(args, "num_labeled_sensitive", None) is not None and args.num_labeled_sensitive < needed:
        raise InputError(
            f"--filter_unlabeled with --num_labeled_sensitive {args.num_labeled_sensitive}: scoring U needs at"
            f" least {needed} images in S"
        )


def _check_output_dir(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    check_writable(output_dir)
    finished = finished_model_file(output_dir)
    if finished and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise InputError(
            f"--output_dir {args.output_dir} already holds a finished model ({finished}); pass"
            " --overwrite_output_dir to replace it or --resume_from_checkpoint to continue it"
        )
    _check_resumed_run(args)


def check_writable(output_dir: Path, flag: str = "--output_dir") -> None:
    """--output_dir must be a folder we can write in (or be creatable), known before any work starts.

    Nothing is created: a probe folder is made in the nearest existing
    ancestor and removed at once.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"{flag} {output_dir}: exists and is not a folder")
    ancestor = output_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {output_dir}: {ancestor} is a file, so the folder cannot be made")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-write-check-", dir=ancestor))
    except OSError as error:
        raise InputError(f"{flag} {output_dir}: cannot write in {ancestor} ({error.strerror})") from error


def _check_resumed_run(args: argparse.Namespace) -> None:
    """A resume must continue the same objective, and is warned when it will not replay the data order."""
    if not args.resume_from_checkpoint:
        return
    checkpoint = checkpoint_to_resume(args, warn=False)
    if checkpoint is None:
        return  # as in the official examples: "latest" with nothing to resume starts fresh
    saved = saved_run_config(checkpoint)
    if saved is None:
        logger.warning(
            "%s has no %s: cannot check that the resume continues the same run", checkpoint, CHECKPOINT_CONFIG
        )
        return
    if saved.get("lora_layers") is not None and getattr(args, "lora_layers", False) is None:
        args.lora_layers = saved["lora_layers"]  # not given: the checkpoint's (its model's default, SD or SD3)
    for key in OBJECTIVE_FLAGS + ADAPTER_FLAGS:
        if key in saved and saved[key] != getattr(args, key, None):
            raise InputError(
                f"--{key} {getattr(args, key, None)}: {checkpoint.name} was trained with --{key} {saved[key]}; a"
                " resume continues the same objective and model (start a new --output_dir to train another)"
            )
    for key in DATA_ORDER_FLAGS:
        now = json.loads(json.dumps(getattr(args, key, None)))  # as the checkpoint stored it: tuples as lists
        if saved.get(key) is not None and now is not None and saved[key] != now:
            logger.warning(
                "--%s %s differs from %s's %s: the data order will not replay the interrupted run",
                key,
                now,
                checkpoint.name,
                saved[key],
            )
