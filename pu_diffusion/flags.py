"""The scripts' command-line flags and their ranges: argparse only, nothing is checked or loaded here."""

from __future__ import annotations

import argparse

from pu_diffusion.batches import INTERPOLATION_MODES
from pu_diffusion.buckets import parse_buckets
from pu_diffusion.objective import DEFAULT_SENSITIVE_MAX_SNR, PREDICTION_TYPES
from pu_diffusion.prior import MAX_INTERVAL_WIDTH
from pu_diffusion.unlabeled_filter import FRACTION_RULES
from pu_loss import LOSS_TYPES, NONNEGATIVE_MODES, REDUCTIONS


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
            "--caption_dropout_rate",
            type=UNIT_INTERVAL,
            default=0.0,
            help="Share of captions replaced by the empty caption, in U and S alike, so that classifier-free"
            " guidance keeps working (and PU also acts on the unconditional model guidance starts from).",
        )
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
    if with_captions:
        group.add_argument(
            "--aspect_ratio_buckets",
            type=parse_buckets,
            default=None,
            help="Train at several sizes, 'h1,w1;h2,w2;...' (e.g. '512,512;384,640;640,384'): each image goes to"
            " the bucket nearest its aspect ratio, is resized to cover it and cropped to it; a batch holds one"
            " bucket. --resolution is then not used for training.",
        )
    group.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random window.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    group.add_argument(
        "--image_interpolation_mode",
        choices=sorted(INTERPOLATION_MODES),
        default="bilinear",
        help="The filter that resizes images to --resolution.",
    )
    group.add_argument(
        "--max_train_samples",
        type=POSITIVE_INT,
        default=None,
        help="Train on a random subset of U of this size (for quick runs); S is used whole.",
    )
    group.add_argument(
        "--dataloader_num_workers", type=NON_NEGATIVE_INT, default=0, help="Data-loading subprocesses; 0: main."
    )


def fraction_rule(text: str) -> str | float:
    """--filter_fraction: a rule's name (``estimate``, ``high``) or a share in (0, 1)."""
    return text if text in FRACTION_RULES else OPEN_UNIT_INTERVAL(text)


def prior_value(text: str) -> float | str:
    """--prior: "auto" or a share in (0, 1)."""
    return "auto" if text == "auto" else OPEN_UNIT_INTERVAL(text)


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
        type=prior_value,
        default=0.1,
        help="beta, the share of sensitive data in U, in (0, 1) (the paper uses 0.1), or auto: estimated from"
        " U and S before training, as estimate_prior.py does.",
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
        help="S images per step (default: train_batch_size * |S| / |U|, at least 4 but not above the U batch or |S|).",
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
        default=None,
        help="Ours, not the paper's: scales beta * L^+_S in Eq. (18). Default 0 (1 with --paper_loss): at small"
        " image sizes the positive risk pushes S hardest where l is small; see docs/benchmark.md.",
    )
    group.add_argument(
        "--sensitive_max_snr",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help="Ours, not the paper's: the S terms and the nonnegative correction use only (t, noise) draws whose"
        f" signal-to-noise ratio alpha_bar / (1 - alpha_bar) is at most this; U's other draws get the plain"
        f" diffusion loss. Default {DEFAULT_SENSITIVE_MAX_SNR:g} (timestep 100 of the linear 1,000-step"
        " schedule); inf, or --paper_loss, uses every draw.",
    )
    group.add_argument(
        "--sensitive_min_timestep",
        type=NON_NEGATIVE_INT,
        default=None,
        help="The same band as a timestep index, t >= this (its meaning depends on the schedule); replaces"
        " --sensitive_max_snr.",
    )
    group.add_argument(
        "--paper_loss",
        action="store_true",
        help="The paper's loss: positive risk weight 1 and the S terms at every noise level (our two options off),"
        " with the summed per-sample loss of Eq. (8). With --nonnegative nnpu it is Eq. (19) and Algorithm 1;"
        " with abs (the text-to-image default) the paper's Stable Diffusion variant.",
    )
    group.add_argument(
        "--filter_unlabeled",
        type=fraction_rule,
        default=None,
        metavar="{estimate,high,SHARE}",
        help="Ours, not the paper's: before training, drop from U its images that look most like S (held-out"
        " scores of the prior estimator's S-vs-U classifiers), as estimate_prior.py --write_filtered_data does:"
        " 'high' (the upper end of the estimate's interval), 'estimate', or a share in (0, 1). Needs S and the"
        " estimator's image counts. Default: train on all of U.",
    )
    add_prior_estimation_arguments(parser)


def add_prior_estimation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prior estimation (--prior auto)")
    group.add_argument(
        "--prior_folds", type=Bounded(int, 2), default=5, help="Cross-fitting folds of the S-vs-U classifier."
    )
    group.add_argument(
        "--prior_epochs", type=POSITIVE_INT, default=40, help="Most training epochs of each fold's classifier."
    )
    group.add_argument(
        "--prior_confidence", type=OPEN_UNIT_INTERVAL, default=0.9, help="Coverage of the bootstrap interval."
    )
    group.add_argument(
        "--prior_max_interval_width",
        type=UNIT_INTERVAL,
        default=MAX_INTERVAL_WIDTH,
        help="--prior auto refuses an estimate whose interval is wider than this (too uncertain to train with).",
    )


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
    group.add_argument(
        "--optimizer",
        choices=["adamw", "prodigy"],
        default="adamw",
        help="prodigy (pip install prodigyopt) adapts the step size itself: use --learning_rate 1.0.",
    )
    group.add_argument("--adam_beta1", type=ADAM_BETA, default=0.95)
    group.add_argument("--adam_beta2", type=ADAM_BETA, default=0.999)
    group.add_argument("--adam_weight_decay", type=NON_NEGATIVE_FLOAT, default=1e-6)
    group.add_argument("--adam_epsilon", type=POSITIVE_FLOAT, default=1e-8)
    group.add_argument(
        "--prodigy_beta3",
        type=ADAM_BETA,
        default=None,
        help="Prodigy's coefficient for its step-size estimate; default: sqrt(--adam_beta2).",
    )
    group.add_argument("--prodigy_decouple", type=true_or_false, default=True, help="AdamW-style weight decay.")
    group.add_argument("--prodigy_use_bias_correction", type=true_or_false, default=True)
    group.add_argument(
        "--prodigy_safeguard_warmup",
        type=true_or_false,
        default=True,
        help="Leave the learning rate out of the step-size estimate during warm-up.",
    )
    group.add_argument("--max_grad_norm", type=POSITIVE_FLOAT, default=1.0)
    group.add_argument(
        "--allow_tf32",
        action="store_true",
        help="TF32 matrix products on Ampere and newer GPUs: faster, slightly less precise.",
    )
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


def true_or_false(text: str) -> bool:
    """A boolean flag's value as the Diffusers scripts take it (``--prodigy_decouple False``)."""
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {text}")
    return lowered in ("true", "1")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the model (never the checkpoints).")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_model_id", type=str, default=None, help="Default: the name of --output_dir.")
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repository private.")
    group.add_argument(
        "--push_logs_to_hub",
        action="store_true",
        help="Also upload --logging_dir (TensorBoard logs; local paths in them are cut to folder names).",
    )


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
