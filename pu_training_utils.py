"""What both PU training scripts share: flags, checks, checkpoints, saving, model cards, the Hub.

The official Diffusers examples copy these pieces from script to script; here
they live once. Nothing in this module knows which model is trained.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pu_data
from pu_data import InputError
from pu_loss import LOSS_TYPES, NONNEGATIVE_MODES, REDUCTIONS, RiskOutput, compute_risk, per_sample_diffusion_loss

logger = logging.getLogger(__name__)

#: Never uploaded to the Hub: resumable training state and old validation images.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "step_*", "epoch_*", ".tmp-*", ".pu-diffusion.lock"]
#: Flags that define the objective: a resume must not change them.
OBJECTIVE_FLAGS = (
    "loss_type",
    "prior",
    "nonnegative",
    "loss_reduction",
    "positive_risk_weight",
    "sensitive_min_timestep",
)
#: Flags that define the data order: a resume that changes them trains on, but does not replay the run.
DATA_ORDER_FLAGS = ("seed", "train_batch_size", "sensitive_batch_size", "gradient_accumulation_steps")
CHECKPOINT_CONFIG = "training_config.json"
#: Files whose presence marks a finished model in an output folder.
FINISHED_MODEL_FILES = ("model_index.json", "pytorch_lora_weights.safetensors")


# --------------------------------------------------------------------------- value ranges


class Bounded:
    """An argparse ``type`` that converts with ``kind`` and refuses values outside a range.

    The range is declared once, here; argparse's message names the flag
    (``argument --learning_rate: must be > 0, got -0.001``) and
    :func:`show_ranges` puts it into ``--help``.
    """

    def __init__(self, kind, low=None, high=None, *, low_open=False, high_open=False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        self.constraint = " and ".join(parts)
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages

    def __call__(self, text: str):
        value = self.kind(text)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {self.constraint}, got {text}")
        return value


POSITIVE_INT = Bounded(int, 1)
NON_NEGATIVE_INT = Bounded(int, 0)
POSITIVE_FLOAT = Bounded(float, 0, low_open=True)
NON_NEGATIVE_FLOAT = Bounded(float, 0)
OPEN_UNIT_INTERVAL = Bounded(float, 0, 1, low_open=True, high_open=True)
UNIT_INTERVAL = Bounded(float, 0, 1)
ADAM_BETA = Bounded(float, 0, 1, high_open=True)


def show_ranges(parser: argparse.ArgumentParser) -> None:
    """Append each bounded flag's range to its --help line."""
    for action in parser._actions:
        if isinstance(action.type, Bounded):
            action.help = f"{action.help or ''} [{action.type.constraint}]".lstrip()


# --------------------------------------------------------------------------- arguments


def add_data_arguments(parser: argparse.ArgumentParser, with_captions: bool = False) -> None:
    group = parser.add_argument_group("data: U (unlabeled) and S (labeled sensitive)")
    group.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="U: a Hub dataset id or a local dataset folder. With --label_column, the labeled dataset"
        " that U and S are both drawn from.",
    )
    group.add_argument("--dataset_config_name", type=str, default=None, help="The config of --dataset_name.")
    group.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="U: an image folder (datasets' imagefolder layout). Ignored if --dataset_name is set.",
    )
    group.add_argument("--image_column", type=str, default="image", help="The column holding the images.")
    if with_captions:
        group.add_argument("--caption_column", type=str, default="text", help="The column holding U's captions.")
    group.add_argument(
        "--sensitive_dataset_name",
        type=str,
        default=None,
        help="S: a Hub dataset id or a local dataset folder of sensitive images only.",
    )
    group.add_argument(
        "--sensitive_data_dir",
        type=str,
        default=None,
        help="S: an image folder of sensitive images only. Ignored if --sensitive_dataset_name is set.",
    )
    if with_captions:
        group.add_argument("--sensitive_caption_column", type=str, default=None, help="The column of S's captions.")
        group.add_argument("--sensitive_prompt", type=str, default=None, help="One caption for every image of S.")
    group.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="Build U and S from one labeled --dataset_name, as in the paper's Table 1.",
    )
    group.add_argument(
        "--sensitive_labels",
        type=str,
        nargs="+",
        default=None,
        help="With --label_column: the label values (names or ids) that are sensitive.",
    )
    group.add_argument(
        "--num_unlabeled_normal",
        type=NON_NEGATIVE_INT,
        default=None,
        help="With --label_column: normal images drawn into U (default: all of them).",
    )
    group.add_argument(
        "--num_unlabeled_sensitive",
        type=NON_NEGATIVE_INT,
        default=None,
        help="With --label_column: sensitive images drawn into U (default: a tenth of the normal"
        " count, the paper's 10:1).",
    )
    group.add_argument(
        "--num_labeled_sensitive",
        type=NON_NEGATIVE_INT,
        default=None,
        help="With --label_column: sensitive images drawn into S, disjoint from U's (default: as many"
        " as U's sensitive ones).",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets go.")
    group.add_argument(
        "--resolution", type=POSITIVE_INT, default=64, help="Images are resized and cropped to this size."
    )
    group.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random window.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    group.add_argument(
        "--dataloader_num_workers", type=NON_NEGATIVE_INT, default=0, help="Data-loading subprocesses; 0: main."
    )


def add_pu_arguments(parser: argparse.ArgumentParser, default_nonnegative: str = "nnpu") -> None:
    group = parser.add_argument_group("PU loss (Takahashi et al., 2025)")
    group.add_argument(
        "--loss_type",
        choices=LOSS_TYPES,
        default="pu",
        help="pu: Eq. (19); supervised: Eq. (12), all of U taken as normal; unsupervised: Eq. (9),"
        " plain diffusion training, S unused.",
    )
    group.add_argument(
        "--prior",
        type=OPEN_UNIT_INTERVAL,
        default=0.1,
        help="beta, the share of sensitive data in U, in (0, 1). The paper uses 0.1.",
    )
    group.add_argument(
        "--nonnegative",
        choices=NONNEGATIVE_MODES,
        default=default_nonnegative,
        help="How the negative risk is kept >= 0: nnpu (Algorithm 1), abs (|r|), none (unbiased).",
    )
    group.add_argument(
        "--sensitive_batch_size",
        type=POSITIVE_INT,
        default=None,
        help="S images per step (default: train_batch_size * |S| / |U|, at least 1).",
    )
    group.add_argument(
        "--loss_reduction",
        choices=REDUCTIONS,
        default="sum",
        help="Per-sample loss of Eq. (8): sum over pixels (the paper) or mean.",
    )
    group.add_argument(
        "--positive_risk_weight",
        type=NON_NEGATIVE_FLOAT,
        default=1.0,
        help="Ours, not the paper's: scales beta * L^+_S in Eq. (18); 1 is the paper. On small images (the 8x8"
        " digits) 0 works better: see the README's benchmark section.",
    )
    group.add_argument(
        "--sensitive_min_timestep",
        type=NON_NEGATIVE_INT,
        default=0,
        help="Ours, not the paper's: the S terms and the nonnegative correction use only (t, noise) draws with"
        " t >= this; U's draws below it get the plain diffusion loss. 0 is the paper.",
    )


def loss_arguments(**overrides) -> argparse.Namespace:
    """The PU loss flags at their command-line defaults, then ``overrides`` (which may add other flags), for
    code that calls a training step without parsing a command line: the benchmarks and the tests."""
    parser = argparse.ArgumentParser(add_help=False)
    add_pu_arguments(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **overrides})


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, required=True, help="Where the model and checkpoints are written.")
    group.add_argument(
        "--overwrite_output_dir", action="store_true", help="Train even if --output_dir already holds a finished model."
    )
    group.add_argument("--seed", type=int, default=None, help="Seed for the U/S draws, training and samples.")
    group.add_argument("--train_batch_size", type=POSITIVE_INT, default=16, help="U images per step and device.")
    group.add_argument("--num_train_epochs", "--num_epochs", type=POSITIVE_INT, default=100, dest="num_train_epochs")
    group.add_argument(
        "--max_train_steps", type=POSITIVE_INT, default=None, help="If set, overrides --num_train_epochs."
    )
    group.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
    group.add_argument("--learning_rate", type=POSITIVE_FLOAT, default=1e-4)
    group.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps, batch size and process count.",
    )
    group.add_argument(
        "--lr_scheduler",
        type=str,
        default="cosine",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    group.add_argument("--lr_warmup_steps", type=NON_NEGATIVE_INT, default=500)
    group.add_argument("--adam_beta1", type=ADAM_BETA, default=0.95)
    group.add_argument("--adam_beta2", type=ADAM_BETA, default=0.999)
    group.add_argument("--adam_weight_decay", type=NON_NEGATIVE_FLOAT, default=1e-6)
    group.add_argument("--adam_epsilon", type=POSITIVE_FLOAT, default=1e-8)
    group.add_argument("--max_grad_norm", type=POSITIVE_FLOAT, default=1.0)
    group.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: what `accelerate launch` / `accelerate config` set.",
    )
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    group.add_argument("--ema_inv_gamma", type=POSITIVE_FLOAT, default=1.0)
    group.add_argument("--ema_power", type=POSITIVE_FLOAT, default=3 / 4)
    group.add_argument("--ema_max_decay", type=UNIT_INTERVAL, default=0.9999)
    group.add_argument(
        "--checkpointing_steps",
        type=POSITIVE_INT,
        default=500,
        help="Save a resumable checkpoint-N folder every N optimizer steps.",
    )
    group.add_argument("--checkpoints_total_limit", type=POSITIVE_INT, default=None, help="Keep at most this many.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint-N folder, or "latest" for the newest in --output_dir.',
    )
    group.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, inside --output_dir.")
    group.add_argument(
        "--report_to",
        "--logger",
        type=str,
        default="tensorboard",
        dest="report_to",
        help='"tensorboard", "wandb", "all" or "none".',
    )
    group.add_argument("--logging_steps", type=POSITIVE_INT, default=1, help="Log the loss components every N steps.")
    group.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the model (never the checkpoints).")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_model_id", type=str, default=None, help="Default: the name of --output_dir.")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository private.")


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def add_pretrained_model_arguments(group, what: str, required: bool = False) -> None:
    """--pretrained_model_name_or_path and the flags that go with it, as in the official examples."""
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None, required=required, help=what)
    group.add_argument("--revision", type=str, default=None, help="Revision of the pretrained pipeline.")
    group.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. fp16.")
    group.add_argument(
        "--prediction_type",
        choices=PREDICTION_TYPES,
        default=None,
        help="What the model predicts. Default: the pretrained scheduler's, else epsilon.",
    )
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")


def set_prediction_type(noise_scheduler, args: argparse.Namespace) -> None:
    """--prediction_type overrides the pretrained scheduler's; a type we cannot train is refused at load."""
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    elif noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: its scheduler predicts"
            f" {noise_scheduler.config.prediction_type!r}; pass --prediction_type, one of {PREDICTION_TYPES}"
        )


def check_timestep_band(noise_scheduler, args: argparse.Namespace) -> None:
    """--sensitive_min_timestep must leave S some timesteps of the schedule."""
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if args.sensitive_min_timestep >= num_timesteps:
        raise InputError(
            f"--sensitive_min_timestep {args.sensitive_min_timestep}: the noise schedule has timesteps 0 to"
            f" {num_timesteps - 1}, so S would never count"
        )


def check_common_arguments(args: argparse.Namespace) -> None:
    """Checks that need no data: bad values fail here, before anything is loaded or written."""
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError("U is missing: give --dataset_name or --train_data_dir")
    _check_sensitive_source(args)
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise InputError("--hub_token with --report_to wandb would expose the token; use `hf auth login` instead")
    _check_output_dir(args)


def _check_sensitive_source(args: argparse.Namespace) -> None:
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


def _check_output_dir(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    _check_writable(output_dir)
    finished = [name for name in FINISHED_MODEL_FILES if (output_dir / name).exists()]
    if finished and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise InputError(
            f"--output_dir {args.output_dir} already holds a finished model ({finished[0]}); pass"
            " --overwrite_output_dir to replace it or --resume_from_checkpoint to continue it"
        )
    _check_resumed_run(args)


def _check_writable(output_dir: Path) -> None:
    """--output_dir must be a folder we can write in (or be creatable), known before any work starts.

    Nothing is created: a probe folder is made in the nearest existing
    ancestor and removed at once.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir}: exists and is not a folder")
    ancestor = output_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"--output_dir {output_dir}: {ancestor} is a file, so the folder cannot be made")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tmp-write-check-", dir=ancestor))
    except OSError as error:
        raise InputError(f"--output_dir {output_dir}: cannot write in {ancestor} ({error.strerror})") from error


def _check_resumed_run(args: argparse.Namespace) -> None:
    """A resume must continue the same objective; it takes the checkpoint's seed when none is given."""
    if not args.resume_from_checkpoint:
        return
    checkpoint = checkpoint_to_resume(args, warn=False)
    if checkpoint is None:
        return  # as in the official examples: "latest" with nothing to resume starts fresh
    config_file = checkpoint / CHECKPOINT_CONFIG
    if not config_file.is_file():
        logger.warning(
            "%s has no %s: cannot check that the resume continues the same run", checkpoint, CHECKPOINT_CONFIG
        )
        return
    saved = json.loads(config_file.read_text())
    for key in OBJECTIVE_FLAGS:
        if key in saved and saved[key] != getattr(args, key):
            raise InputError(
                f"--{key} {getattr(args, key)}: {checkpoint.name} was trained with --{key} {saved[key]}; a resume"
                " continues the same objective (start a new --output_dir to train with another)"
            )
    if args.seed is None:
        args.seed = saved.get("seed")
    for key in DATA_ORDER_FLAGS:
        if saved.get(key) is not None and getattr(args, key) is not None and saved[key] != getattr(args, key):
            logger.warning(
                "--%s %s differs from %s's %s: the data order will not replay the interrupted run",
                key,
                getattr(args, key),
                checkpoint.name,
                saved[key],
            )


# --------------------------------------------------------------------------- training pieces


def diffusion_target(noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The regression target of Eq. (8) for the scheduler's prediction type."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise InputError(f"--prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def pu_objective(
    model_pred, target, timesteps, num_unlabeled: int, args: argparse.Namespace, weights=None
) -> RiskOutput:
    """Per-sample losses of one forward over cat([U, S]), then the risk chosen by --loss_type.

    ``weights`` (one per sample, e.g. Min-SNR) scale each l(x) of Eq. (8) before
    the risk, so U and S terms are weighted alike. ``timesteps`` place each
    sample in or out of the --sensitive_min_timestep band.
    """
    per_sample = per_sample_diffusion_loss(model_pred, target, reduction=args.loss_reduction)
    if weights is not None:
        per_sample = per_sample * weights
    in_band = timesteps >= args.sensitive_min_timestep if args.sensitive_min_timestep > 0 else None
    return compute_risk(
        per_sample, num_unlabeled, args.loss_type, args.prior, args.nonnegative, args.positive_risk_weight, in_band
    )


def check_finite(logs: dict[str, torch.Tensor], global_step: int, output_dir: str) -> None:
    """Stop with a message when the step's loss is NaN or infinite; the last checkpoint stays as it is.

    ``logs`` are the step's risk components (``RiskOutput.to_log_dict``).
    """
    if not torch.isfinite(logs["loss"]).item():
        components = {name: float(value) for name, value in logs.items()}
        raise FloatingPointError(
            f"the loss is not finite at step {global_step} ({components}); training stopped. The last"
            f" checkpoint-N in {output_dir} is intact: lower --learning_rate (or try --nonnegative abs) and"
            " resume with --resume_from_checkpoint latest"
        )


def training_schedule(num_batches_per_epoch: int, args: argparse.Namespace) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps); sets args.num_train_epochs to match."""
    steps_per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    return steps_per_epoch, args.max_train_steps


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project_config = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import datasets
    import diffusers

    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    return accelerator


def settle_seed(accelerator, args: argparse.Namespace) -> int:
    """Use --seed (or the resumed checkpoint's); without one draw a seed, the same in every process.

    Everything random in training derives from it (U/S draws, data order,
    augmentation, noise), so the seed is logged and saved with each checkpoint.
    """
    from accelerate.utils import broadcast_object_list, set_seed

    if args.seed is None:
        args.seed = broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]
        logger.info("no --seed given: using %d", args.seed)
    set_seed(args.seed)
    return args.seed


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was saved."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop after the current optimizer step.

    The loop then saves a checkpoint and exits. A second signal stops at once;
    checkpoints are written atomically, so the last one stays intact even then.
    """

    def __init__(self):
        self.signal_number = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = number

    def requested(self, accelerator) -> bool:
        """Whether any process was signalled. Several processes agree through one small all-reduce
        per step; a single process needs no synchronisation."""
        if accelerator.num_processes == 1:
            return self.signal_number is not None
        if self.signal_number is not None:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def log_risk(accelerator, logs: dict[str, torch.Tensor], lr: float, global_step: int) -> dict[str, float]:
    values = {name: float(value) for name, value in logs.items()}
    values["lr"] = lr
    accelerator.log(values, step=global_step)
    return values


# --------------------------------------------------------------------------- the training loop


@dataclass(kw_only=True)
class TrainingRun:
    """What the shared training loop works on, after ``accelerator.prepare``.

    ``model`` is the module the optimizer updates (the UNet, with or without
    LoRA adapters); ``trainable_parameters`` are what is clipped and averaged
    by EMA. Scripts subclass this for the parts only they use.
    """

    model: torch.nn.Module
    trainable_parameters: list
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    unlabeled_loader: torch.utils.data.DataLoader
    unlabeled_sampler: pu_data.EpochShuffle
    sensitive_loader: torch.utils.data.DataLoader | None
    sensitive_sampler: pu_data.EpochShuffle | None
    steps_per_epoch: int
    ema_model: object | None = None
    base_model: str | None = None
    hub_repo_id: str | None = None


def make_training_loaders(
    args: argparse.Namespace, unlabeled, sensitive, make_dataset: Callable, num_processes: int = 1
):
    """U and S loaders whose order and augmentation are functions of (seed, epoch) alone.

    ``make_dataset(dataset, seed, source)`` turns a ``datasets.Dataset`` into
    the torch dataset the script trains on. Fills in the default
    ``--sensitive_batch_size``. Returns (U loader, U sampler, S loader, S sampler);
    the S pair is None without S.
    """
    unlabeled_seed = pu_data.derived_seed(args.seed, 0)
    unlabeled_loader, unlabeled_sampler = seeded_loader(
        args, make_dataset(unlabeled, unlabeled_seed, "U"), args.train_batch_size, unlabeled_seed, drop_last=False
    )
    if sensitive is None:
        return unlabeled_loader, unlabeled_sampler, None, None
    if args.sensitive_batch_size is None:
        args.sensitive_batch_size = pu_data.default_sensitive_batch_size(
            args.train_batch_size, len(unlabeled), len(sensitive)
        )
    sensitive_seed = pu_data.derived_seed(args.seed, 1)
    sensitive_loader, sensitive_sampler = seeded_loader(
        args,
        make_dataset(sensitive, sensitive_seed, "S"),
        args.sensitive_batch_size,
        sensitive_seed,
        # Full S batches only, as long as every process gets one. An S smaller than that keeps its
        # short last batch, which Accelerate's sharding completes from the start of S.
        drop_last=len(sensitive) >= args.sensitive_batch_size * num_processes,
    )
    return unlabeled_loader, unlabeled_sampler, sensitive_loader, sensitive_sampler


def seeded_loader(args, dataset, batch_size: int, seed: int, drop_last: bool):
    sampler = pu_data.EpochShuffle(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=args.dataloader_num_workers
    )
    return loader, sampler


def make_optimizer(args: argparse.Namespace, parameters, num_processes: int) -> torch.optim.Optimizer:
    """AdamW (8-bit with --use_8bit_adam), after --scale_lr."""
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    optimizer_cls = torch.optim.AdamW
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    return optimizer_cls(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_ema(unet, args: argparse.Namespace):
    """An EMA of the UNet's weights (--use_ema), saved with the checkpoints by :func:`register_model_hooks`."""
    from diffusers.training_utils import EMAModel

    return EMAModel(
        unet.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=type(unet),
        model_config=unet.config,
    )


@contextlib.contextmanager
def ema_weights(run: TrainingRun):
    """The trained model with its EMA weights swapped in (--use_ema), for validation and saving; the
    training weights are put back, exactly, on leaving."""
    if run.ema_model is None:
        yield
        return
    run.ema_model.store(run.trainable_parameters)
    run.ema_model.copy_to(run.trainable_parameters)
    try:
        yield
    finally:
        run.ema_model.restore(run.trainable_parameters)


def make_lr_scheduler(args: argparse.Namespace, optimizer, num_batches_per_process: int, num_processes: int):
    """(optimizer steps per epoch, the learning-rate schedule over --max_train_steps)."""
    from diffusers.optimization import get_scheduler

    steps_per_epoch, max_train_steps = training_schedule(num_batches_per_process, args)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )
    return steps_per_epoch, lr_scheduler


def prepare_for_training(accelerator, args, unet, trainable: list, unlabeled, sensitive, make_dataset, ema_model):
    """Loaders, optimizer and learning-rate schedule for ``trainable``, passed through accelerator.prepare.

    Returns the shared fields of :class:`TrainingRun`. PU risks are computed
    per process on its own U and S shards and DDP averages the gradients:
    each shard's risk is an unbiased mini-batch estimate, as with one process.
    """
    unlabeled_loader, unlabeled_sampler, sensitive_loader, sensitive_sampler = make_training_loaders(
        args, unlabeled, sensitive, make_dataset, accelerator.num_processes
    )
    optimizer = make_optimizer(args, trainable, accelerator.num_processes)
    steps_per_epoch, lr_scheduler = make_lr_scheduler(
        args, optimizer, math.ceil(len(unlabeled_loader) / accelerator.num_processes), accelerator.num_processes
    )
    unet, optimizer, unlabeled_loader, lr_scheduler = accelerator.prepare(
        unet, optimizer, unlabeled_loader, lr_scheduler
    )
    if sensitive_loader is not None:
        sensitive_loader = accelerator.prepare(sensitive_loader)
    if ema_model is not None:
        ema_model.to(accelerator.device)
    return {
        "model": unet,
        "trainable_parameters": trainable,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "unlabeled_loader": unlabeled_loader,
        "unlabeled_sampler": unlabeled_sampler,
        "sensitive_loader": sensitive_loader,
        "sensitive_sampler": sensitive_sampler,
        "steps_per_epoch": steps_per_epoch,
        "ema_model": ema_model,
    }


def run_training(
    args, tracker_name: str, prepare_run, training_step, end_of_epoch, before_training: Callable | None = None
) -> None:
    """The main() of both scripts: accelerator, seed, U and S, the script's models, trackers, Hub repo, loop.

    ``prepare_run(accelerator, args, unlabeled, sensitive)`` builds the
    script's :class:`TrainingRun`; ``training_step(run, U batch, S batch, args,
    generator)`` and ``end_of_epoch(accelerator, run, args, epoch, step)`` are
    called by :func:`train`; ``before_training(accelerator, run, args)`` runs once
    before the first step.
    """
    accelerator = make_accelerator(args)
    lock = OutputDirLock(args.output_dir) if accelerator.is_main_process else None
    try:
        if lock is not None:
            clean_staging_folders(args.output_dir)
        _run(accelerator, args, tracker_name, prepare_run, training_step, end_of_epoch, before_training)
    finally:
        if lock is not None:
            lock.release()


def _run(accelerator, args, tracker_name, prepare_run, training_step, end_of_epoch, before_training) -> None:
    settle_seed(accelerator, args)
    with accelerator.main_process_first():
        unlabeled, sensitive = pu_data.load_training_sets(args)
    args.num_unlabeled_images = len(unlabeled)
    args.num_sensitive_images = len(sensitive) if sensitive is not None else 0
    run = prepare_run(accelerator, args, unlabeled, sensitive)
    if accelerator.is_main_process:
        accelerator.init_trackers(tracker_name, config=tracker_config(args))
        if args.push_to_hub:
            run.hub_repo_id = create_hub_repo(args)
    logger.info(
        "U: %d images, S: %d images, %d steps of %d U + %s S images per process",
        args.num_unlabeled_images,
        args.num_sensitive_images,
        args.max_train_steps,
        args.train_batch_size,
        args.sensitive_batch_size,
    )
    if before_training is not None:
        before_training(accelerator, run, args)
    train(
        accelerator,
        run,
        args,
        training_step=lambda run, unlabeled_batch, sensitive_batch, generator: training_step(
            run, unlabeled_batch, sensitive_batch, args, generator
        ),
        end_of_epoch=lambda epoch, global_step: end_of_epoch(accelerator, run, args, epoch, global_step),
    )
    accelerator.end_training()


def exit_on_error(main: Callable, args: argparse.Namespace) -> None:
    """Run a script's main: bad input and NaN stop with "error: ...", a signal with its exit code."""
    try:
        main(args)
    except (InputError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    except TrainingInterrupted as interruption:
        print(f"stopped: {interruption}", file=sys.stderr)
        sys.exit(interruption.exit_code)


def accumulation_cycle(batch_index: int, num_batches: int, accumulation_steps: int) -> tuple[bool, int]:
    """(whether micro-batch ``batch_index`` of an epoch ends an optimizer step, how many micro-batches that
    step averages).

    Each optimizer step covers ``accumulation_steps`` consecutive U batches; the
    last step of an epoch covers what is left, so an epoch of ``num_batches``
    gives ``ceil(num_batches / accumulation_steps)`` steps whatever the size of S.
    """
    cycle_start = batch_index - batch_index % accumulation_steps
    cycle_length = min(accumulation_steps, num_batches - cycle_start)
    return batch_index == cycle_start + cycle_length - 1, cycle_length


def train(accelerator, run: TrainingRun, args: argparse.Namespace, training_step: Callable, end_of_epoch: Callable):
    """The loop: one optimizer step per --gradient_accumulation_steps U batches, each paired with an S batch.

    ``training_step(run, unlabeled_batch, sensitive_batch, generator)`` returns
    the step's :class:`RiskOutput`; ``end_of_epoch(epoch, global_step)`` does the
    script's validation and saving. Data order, augmentation and each batch's
    noise and timesteps are functions of (seed, epoch, batch), so a run resumed
    from checkpoint-N replays the uninterrupted run from step N on.

    The loop decides itself when gradients are synchronised and the optimizer
    steps (:func:`accumulation_cycle`), instead of ``accelerator.accumulate``:
    Accelerate would follow the prepared loader that started iterating last,
    which is the S stream, and step at the end of each pass over S.
    """
    global_step = resume_step(accelerator, args)
    if global_step >= args.max_train_steps:
        finish_trained_run(accelerator, args, global_step, end_of_epoch, run.steps_per_epoch)
        return
    first_epoch = global_step // run.steps_per_epoch
    skip_batches = (global_step % run.steps_per_epoch) * args.gradient_accumulation_steps
    sensitive_stream = None
    if run.sensitive_loader is not None:
        sensitive_stream = pu_data.endless(
            run.sensitive_loader,
            run.sensitive_sampler,
            first_epoch * len(run.unlabeled_loader) + skip_batches,
            accelerator.skip_first_batches,
        )
    stop = StopRequest()
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    cycle_logs = CycleAverage()
    for epoch in range(first_epoch, args.num_train_epochs):
        run.model.train()
        run.unlabeled_sampler.use_epoch(epoch)
        start = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(run.unlabeled_loader, start) if start else run.unlabeled_loader
        for batch_index, unlabeled_batch in enumerate(loader, start=start):
            sensitive_batch = next(sensitive_stream) if sensitive_stream is not None else None
            generator = torch.Generator(accelerator.device).manual_seed(
                pu_data.derived_seed(args.seed, epoch, batch_index, accelerator.process_index)
            )
            sync, cycle_length = accumulation_cycle(
                batch_index, len(run.unlabeled_loader), args.gradient_accumulation_steps
            )
            # The optimizer and schedule wrappers (and DeepSpeed's engine) read this flag.
            accelerator.sync_gradients = sync
            with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
                risk = training_step(run, unlabeled_batch, sensitive_batch, generator)
                # accelerator.backward divides by --gradient_accumulation_steps; a short last cycle of the
                # epoch averages over the micro-batches it has.
                accelerator.backward(risk.loss * (args.gradient_accumulation_steps / cycle_length))
            cycle_logs.add(risk)
            if not sync:
                continue
            accelerator.clip_grad_norm_(run.trainable_parameters, args.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            if run.ema_model is not None:
                run.ema_model.step(run.trainable_parameters)
            global_step += 1
            progress.update(1)
            _after_step(accelerator, run, args, cycle_logs.pop(), global_step, progress, stop)
            if global_step >= args.max_train_steps:
                break
        end_of_epoch(epoch, global_step)
        if global_step >= args.max_train_steps:
            break
    stop.restore()
    progress.close()


class CycleAverage:
    """The logged risk components of one optimizer step: their mean over its accumulated micro-batches."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, risk: RiskOutput) -> None:
        for name, value in risk.to_log_dict().items():
            self._sums[name] = self._sums[name] + value.detach() if name in self._sums else value.detach()
        self._count += 1

    def pop(self) -> dict[str, torch.Tensor]:
        means = {name: total / self._count for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


def finish_trained_run(accelerator, args, global_step: int, end_of_epoch: Callable, steps_per_epoch: int) -> None:
    """A resume whose checkpoint already reached --max_train_steps trains nothing more.

    If the run was stopped between its last checkpoint and its final save,
    the final model is written from the checkpoint; a run that finished
    stays as it is.
    """
    finished = [name for name in FINISHED_MODEL_FILES if (Path(args.output_dir) / name).exists()]
    if finished:
        accelerator.print(
            f"step {global_step} of --max_train_steps {args.max_train_steps} is done and {args.output_dir} holds"
            f" the finished model ({finished[0]}): nothing to do"
        )
        return
    accelerator.print(f"step {global_step} is the last one: saving the final model from the checkpoint")
    end_of_epoch((global_step - 1) // steps_per_epoch, global_step)


def _after_step(accelerator, run: TrainingRun, args, logs: dict, global_step: int, progress, stop) -> None:
    """Logging (it synchronises with the device, hence only every --logging_steps), checkpoints, signals."""
    if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
        check_finite(logs, global_step, args.output_dir)
        values = log_risk(accelerator, logs, run.lr_scheduler.get_last_lr()[0], global_step)
        progress.set_postfix(loss=f"{values['loss']:.4g}")
    if global_step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, args, global_step)
    if stop.requested(accelerator):
        interrupt(accelerator, args, global_step, stop.signal_number)


def interrupt(accelerator, args, global_step: int, signal_number: int | None) -> None:
    """Save the state of the last finished step (unless just saved) and stop."""
    if not (Path(args.output_dir) / f"checkpoint-{global_step}").is_dir():
        save_checkpoint(accelerator, args, global_step)
    accelerator.end_training()
    number = signal_number or signal.SIGTERM
    raise TrainingInterrupted(
        f"interrupted by {signal.Signals(number).name} after step {global_step}; checkpoint-{global_step} is in"
        f" {args.output_dir}: continue with --resume_from_checkpoint latest",
        number,
    )


def tracker_config(args: argparse.Namespace) -> dict:
    """The run's flags for TensorBoard's hparams (scalars and strings only), without the Hub token."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else str(value)
        for key, value in vars(args).items()
        if key != "hub_token"
    }


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


def save_checkpoint(accelerator, args: argparse.Namespace, global_step: int) -> Path:
    """accelerator.save_state into checkpoint-N, atomically, then prune to --checkpoints_total_limit.

    The state is written to a hidden staging folder and renamed into place,
    so an interruption mid-save never leaves a checkpoint-N that looks
    complete; old checkpoints are removed only once the new one is in place.
    The run's objective and data settings go beside it (``training_config.json``),
    so a resume can check that it continues the same run.
    """
    output_dir = Path(args.output_dir)
    final, staging = output_dir / f"checkpoint-{global_step}", output_dir / f".tmp-checkpoint-{global_step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_config = {key: getattr(args, key, None) for key in (*OBJECTIVE_FLAGS, *DATA_ORDER_FLAGS)}
        # What a complete checkpoint holds, so a resume can tell one that lost a file.
        run_config["files"] = {
            path.relative_to(staging).as_posix(): path.stat().st_size
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        (staging / CHECKPOINT_CONFIG).write_text(json.dumps(run_config, indent=2))
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
    config_file = path / CHECKPOINT_CONFIG
    if not config_file.is_file():
        return []
    listed = json.loads(config_file.read_text()).get("files", {})
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


def resume_step(accelerator, args: argparse.Namespace) -> int:
    """Load --resume_from_checkpoint and return its global step (0 when starting fresh)."""
    if not args.resume_from_checkpoint:
        return 0
    path = checkpoint_to_resume(args)
    if path is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting fresh")
        args.resume_from_checkpoint = None
        return 0
    accelerator.print(f"resuming from {path}")
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"--resume_from_checkpoint: {path} cannot be loaded ({error})") from error
    return checkpoint_step(path)


def register_model_hooks(accelerator, model_cls, ema_model=None, subfolder: str = "unet") -> None:
    """Save checkpoints' models in Diffusers format (checkpoint-N/unet loads with from_pretrained)."""

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(output_dir, f"{subfolder}_ema"))
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, subfolder))
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


# --------------------------------------------------------------------------- outputs


def save_pipeline_atomically(pipeline, output_dir: str) -> None:
    """Write a pipeline so that the folder never holds a half-written one that loads, and a pipeline
    saved before stays loadable until the new one is in place.

    The pipeline is written to a staging folder beside its target (the slow
    part). Its pieces are then moved in by renames, ``model_index.json`` last:
    a file replaces the old one at once, a folder (``unet/``) first moves the
    old one into the staging folder's ``replaced/``. A process killed between
    those two renames leaves the old folder there, and
    :func:`clean_staging_folders` puts it back at the next start.
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=output))
    try:
        written, replaced = staging / "new", staging / "replaced"
        pipeline.save_pretrained(written)
        replaced.mkdir()
        for item in sorted(written.iterdir(), key=lambda p: p.name == "model_index.json"):
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


LOCK_FILE = ".pu-diffusion.lock"


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
    accelerator, images: np.ndarray, output_dir: str, tag: str, step: int, columns: int | None = None
) -> Path:
    """Save a grid to output_dir/validation/<tag>.png and output_dir/samples.png, and log it."""
    grid = image_grid(images, columns=columns)
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.png"
    grid.save(path)
    grid.save(Path(output_dir) / "samples.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(images).transpose(0, 3, 1, 2), step)
    return path


def write_model_card(
    output_dir: str,
    args: argparse.Namespace,
    *,
    base_model: str | None,
    tags: list[str],
    title: str,
    body: str = "",
    image: str | None = None,
) -> Path:
    """README.md with the training data, the loss and how to load the model."""
    from huggingface_hub import ModelCard, ModelCardData

    datasets = [d for d in (args.dataset_name, args.sensitive_dataset_name) if d and not os.path.isdir(d)]
    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "pu-diffusion", "positive-unlabeled", *tags],
    )
    sensitive = args.sensitive_dataset_name or args.sensitive_data_dir
    if args.label_column:
        sensitive = f"labels {args.sensitive_labels} of `{args.label_column}` in {args.dataset_name}"
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
        f"| base model | {base_model or 'trained from scratch'} |",
        f"| unlabeled data U | {args.dataset_name or args.train_data_dir} |",
        f"| sensitive data S | {sensitive or 'none (unsupervised)'} |",
        f"| images in U, S | {args.num_unlabeled_images}, {args.num_sensitive_images} |",
        f"| loss type | {args.loss_type} |",
        f"| prior (beta) | {args.prior} |",
        f"| nonnegative | {args.nonnegative} |",
        f"| loss reduction | {args.loss_reduction} |",
        f"| positive risk weight (ours; 1 = paper) | {args.positive_risk_weight} |",
        f"| S terms from timestep (ours; 0 = paper) | {args.sensitive_min_timestep} |",
        f"| steps, batch (U + S) | {args.max_train_steps}, {args.train_batch_size} + {args.sensitive_batch_size} |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler}) |",
        f"| EMA | {args.use_ema} |",
        "",
    ]
    if image:
        lines += [f"![samples]({image})", ""]
    card = ModelCard("\n".join(lines) + "\n" + body)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def create_hub_repo(args: argparse.Namespace) -> str:
    from huggingface_hub import create_repo

    repo_id = args.hub_model_id or Path(args.output_dir).name
    return create_repo(repo_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id


def upload_to_hub(args: argparse.Namespace, repo_id: str, commit_message: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        ignore_patterns=HUB_IGNORE_PATTERNS,
        token=args.hub_token,
    )
