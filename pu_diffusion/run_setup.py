"""Setting up a training run: the plan, the accelerator, the seed and prior, loaders, optimizer, EMA, trackers."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pu_diffusion.batches import EpochShuffle, default_sensitive_batch_size
from pu_diffusion.buckets import BucketBatches
from pu_diffusion.checkpoints import (
    ADAPTER_FLAGS,
    DATA_ORDER_FLAGS,
    OBJECTIVE_FLAGS,
    resumed_config_value,
    resumed_prior_estimate,
    resumed_seed,
)
from pu_diffusion.errors import InputError
from pu_diffusion.objective import LossSettings
from pu_diffusion.outputs import create_hub_repo, public_name, write_json_atomically
from pu_diffusion.prior import check_usable, estimate_problems, logged_estimate
from pu_diffusion.training_data import derived_seed
from pu_diffusion.unlabeled_filter import check_rule_usable, describe, filter_unlabeled, kept_from_record

logger = logging.getLogger(__name__)

#: What --filter_unlabeled dropped from U, in --output_dir (a checkpoint's training_config.json has it too).
UNLABELED_FILTER_FILE = "unlabeled_filter.json"


@dataclass(frozen=True)
class RunPlan:
    """What the flags come to once the data is known. main() computes it where a reader sees it and passes it
    on; ``args`` keeps what the user typed."""

    seed: int
    num_unlabeled_images: int
    num_sensitive_images: int
    sensitive_batch_size: int | None  # S images per step and process; None without S
    learning_rate: float  # after --scale_lr
    steps_per_epoch: int  # optimizer steps per pass over U
    max_train_steps: int
    num_train_epochs: int
    prior: float  # --prior, or its estimate for --prior auto
    prior_estimate: dict | None = None  # what --prior auto found (PriorEstimate.to_dict())
    data_fingerprint: dict | None = None  # data_fingerprint of U and S
    unlabeled_filter: dict | None = None  # what --filter_unlabeled dropped (FilterRecord.to_dict())


def plan_run(
    args: argparse.Namespace,
    seed: int,
    unlabeled,
    sensitive,
    num_processes: int,
    prior_estimate: dict | None = None,
    data_fingerprint: dict | None = None,
    unlabeled_batches: int | None = None,
    unlabeled_filter: dict | None = None,
) -> RunPlan:
    """The default --sensitive_batch_size, the learning rate after --scale_lr, and the step counts: an epoch
    of U gives ceil(batches per process / --gradient_accumulation_steps) steps; --max_train_steps, when
    given, wins over --num_train_epochs. With --prior auto the prior is ``prior_estimate``'s.
    ``unlabeled_batches`` is U's batch count per epoch when it is not ceil(images / --train_batch_size)
    (aspect-ratio buckets)."""
    sensitive_batch_size = None
    if sensitive is not None:
        sensitive_batch_size = args.sensitive_batch_size or default_sensitive_batch_size(
            args.train_batch_size, len(unlabeled), len(sensitive)
        )
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    unlabeled_batches = unlabeled_batches or math.ceil(len(unlabeled) / args.train_batch_size)
    batches_per_process = math.ceil(unlabeled_batches / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    return RunPlan(
        seed=seed,
        num_unlabeled_images=len(unlabeled),
        num_sensitive_images=len(sensitive) if sensitive is not None else 0,
        sensitive_batch_size=sensitive_batch_size,
        learning_rate=learning_rate,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_train_steps,
        num_train_epochs=math.ceil(max_train_steps / steps_per_epoch),
        prior=prior_estimate["estimate"] if prior_estimate is not None else args.prior,
        prior_estimate=prior_estimate,
        data_fingerprint=data_fingerprint,
        unlabeled_filter=unlabeled_filter,
    )


def check_plan(accelerator, args: argparse.Namespace, plan: RunPlan) -> None:
    """Before training: a resume continues on the data its checkpoint was trained on, and every process has
    the same plan. Without the second check, ranks with other data or flags would wait for each other at
    the first step that one of them does not take, with no message."""
    from accelerate.utils import gather_object

    saved = resumed_config_value(args, "data_fingerprint")
    if saved is not None and plan.data_fingerprint is not None and saved != plan.data_fingerprint:
        changed = [
            _data_change(name, saved.get(name, {}), now)
            for name, now in plan.data_fingerprint.items()
            if saved.get(name) != now
        ]
        raise InputError(
            f"--resume_from_checkpoint: the data is not what the checkpoint was trained on ({'; '.join(changed)});"
            " the resumed run would not replay it. Restore the data, or start a new --output_dir"
        )
    if accelerator.num_processes == 1:
        return
    plans = gather_object([asdict(plan)])
    differing = sorted(key for key in plans[0] if any(other[key] != plans[0][key] for other in plans[1:]))
    if differing:
        values = "; ".join(
            f"{key}: {[other[key] for other in plans]}" for key in differing if key != "data_fingerprint"
        )
        raise InputError(
            f"the {len(plans)} processes disagree on {', '.join(differing)} ({values or 'the data differs'}):"
            " every process must see the same data and flags"
        )


def _data_change(name: str, then: dict, now: dict) -> str:
    """ "U: 16 images then, 17 now", with "(files changed)" when only what the images are changed."""
    change = f"{name}: {then.get('images')} images then, {now['images']} now"
    return change if then.get("images") != now["images"] else f"{change} (files changed)"


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
    # Every process says what it runs as (the official examples' first log line): a launcher config that the
    # machine cannot honour (FSDP on CPUs runs as plain DDP) shows here.
    logger.info("process %d of %d: %s", accelerator.process_index, accelerator.num_processes, accelerator.state)
    if args.allow_tf32:
        allow_tf32()
    import datasets
    import diffusers

    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    return accelerator


def allow_tf32() -> None:
    """--allow_tf32: TF32 for float32 matrix products and convolutions (Ampere and newer GPUs)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    logger.info("--allow_tf32: float32 matrix products and convolutions may use TF32")


def settle_seed(args: argparse.Namespace) -> int:
    """--seed, else the resumed checkpoint's, else a drawn one, the same in every process; also seeds torch.

    Everything random in training derives from it (U/S draws, data order,
    augmentation, noise), so the seed is logged and saved with each checkpoint.
    """
    from accelerate.utils import broadcast_object_list, set_seed

    seed = args.seed if args.seed is not None else resumed_seed(args)
    if seed is None:
        seed = broadcast_object_list([int.from_bytes(os.urandom(4), "little")])[0]
        logger.info("no --seed given: using %d", seed)
    set_seed(seed)
    return seed


def settle_prior(accelerator, args: argparse.Namespace, estimate: Callable) -> dict | None:
    """For --prior auto with the PU loss: the estimate of the checkpoint being resumed, else ``estimate()``
    (a :class:`PriorEstimate`), refused when it cannot be trained with; it goes to prior.json in
    --output_dir. None for a numeric --prior."""
    if args.prior != "auto" or args.loss_type != "pu":
        return None
    saved = resumed_prior_estimate(args)
    if saved is not None:
        logger.info("--prior auto: %.4f, as estimated when the resumed run started", saved["estimate"])
        return saved

    def usable_estimate() -> dict:
        found = estimate()
        check_usable(found, args.prior_max_interval_width)
        return found.to_dict()

    found = main_process_result(accelerator, usable_estimate)
    if accelerator.is_main_process:
        write_json_atomically(Path(args.output_dir) / "prior.json", found)
    return found


def settle_unlabeled_filter(
    accelerator, args: argparse.Namespace, seed: int, unlabeled, num_sensitive: int, scores: Callable
):
    """--filter_unlabeled: (U without its most S-like images, the record of what was dropped), the record
    being the resumed checkpoint's if there is one, else made from ``scores()`` (a :class:`HeldOutScores`)
    and written to unlabeled_filter.json in --output_dir. (U, None) without the flag."""
    if args.filter_unlabeled is None:
        return unlabeled, None
    record = resumed_config_value(args, "unlabeled_filter")
    if record is not None:
        logger.info("--filter_unlabeled: as filtered when the resumed run started, %s", describe(record))
    else:

        def filter_record() -> dict:
            # The scorers reseed torch; training goes on from the state set_seed left, so that a run with the
            # flag trains as a run on estimate_prior.py's filtered data does, bit for bit.
            with torch.random.fork_rng():
                held_out = scores()
            estimate = logged_estimate(held_out, args.prior_confidence, seed)
            problems = estimate_problems(estimate, args.prior_max_interval_width)
            check_rule_usable(args.filter_unlabeled, problems, "--filter_unlabeled")
            _, made = filter_unlabeled(
                unlabeled, num_sensitive, held_out.unlabeled, estimate, args.filter_unlabeled,
                getattr(args, "label_column", None), getattr(args, "sensitive_labels", None),
            )  # fmt: skip
            return made.to_dict()

        record = main_process_result(accelerator, filter_record)
        logger.info("--filter_unlabeled: %s", describe(record))
        if accelerator.is_main_process:
            write_json_atomically(Path(args.output_dir) / UNLABELED_FILTER_FILE, record)
    return unlabeled.select(kept_from_record(record, len(unlabeled), "--filter_unlabeled")), record


def main_process_result(accelerator, compute: Callable):
    """``compute()`` on every process, then the main process's result (or its refusal) for all.

    Every process computes, so that none waits in a collective for as long as it takes (on real data that
    can outlast the process group's timeout); sharing the main process's result makes all train with the
    same one, and a refusal stops them all."""
    from accelerate.utils import broadcast_object_list

    try:
        outcome = [compute(), None]
    except InputError as error:
        outcome = [None, str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise InputError(outcome[1])
    return outcome[0]


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
    unlabeled_sampler: EpochShuffle
    sensitive_loader: torch.utils.data.DataLoader | None
    sensitive_sampler: EpochShuffle | None
    plan: RunPlan
    loss: LossSettings
    ema_model: object | None = None
    base_model: str | None = None
    hub_repo_id: str | None = None


def make_training_loaders(
    args: argparse.Namespace, plan: RunPlan, unlabeled, sensitive, make_dataset: Callable, num_processes: int = 1
):
    """U and S loaders whose order and augmentation are functions of (seed, epoch) alone.

    ``make_dataset(dataset, seed, source)`` turns a ``datasets.Dataset`` into
    the torch dataset the script trains on. Returns (U loader, U sampler,
    S loader, S sampler); the S pair is None without S.
    """
    unlabeled_seed = derived_seed(plan.seed, 0)
    unlabeled_loader, unlabeled_sampler = seeded_loader(
        args, make_dataset(unlabeled, unlabeled_seed, "U"), args.train_batch_size, unlabeled_seed, drop_last=False
    )
    if sensitive is None:
        return unlabeled_loader, unlabeled_sampler, None, None
    sensitive_seed = derived_seed(plan.seed, 1)
    sensitive_loader, sensitive_sampler = seeded_loader(
        args,
        make_dataset(sensitive, sensitive_seed, "S"),
        plan.sensitive_batch_size,
        sensitive_seed,
        # Full S batches only, as long as every process gets one. An S smaller than that keeps its
        # short last batch, which Accelerate's sharding completes from the start of S.
        drop_last=len(sensitive) >= plan.sensitive_batch_size * num_processes,
    )
    return unlabeled_loader, unlabeled_sampler, sensitive_loader, sensitive_sampler


def seeded_loader(args, dataset, batch_size: int, seed: int, drop_last: bool):
    """A loader and its sampler. With --aspect_ratio_buckets (the dataset has ``target_sizes``) the batches
    hold one bucket each, and a bucket's last batch may be short whatever ``drop_last`` says."""
    if getattr(dataset, "target_sizes", None) is not None:
        batch_sampler = BucketBatches(dataset.target_sizes, batch_size, seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=args.dataloader_num_workers
        )
        return loader, batch_sampler
    sampler = EpochShuffle(len(dataset), seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=args.dataloader_num_workers
    )
    return loader, sampler


def make_optimizer(args: argparse.Namespace, parameters, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW (8-bit with --use_8bit_adam), or Prodigy with --optimizer prodigy."""
    if args.optimizer == "prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(
            parameters,
            lr=learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    optimizer_cls = torch.optim.AdamW
    if getattr(args, "use_8bit_adam", False):
        import bitsandbytes

        optimizer_cls = bitsandbytes.optim.AdamW8bit
    return optimizer_cls(
        parameters,
        lr=learning_rate,
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


def make_lr_scheduler(args: argparse.Namespace, optimizer, max_train_steps: int, num_processes: int):
    """The learning-rate schedule over ``max_train_steps`` (Accelerate steps it once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )


def prepare_for_training(
    accelerator, args, plan: RunPlan, unet, trainable: list, unlabeled, sensitive, make_dataset, ema_model
) -> dict:
    """Loaders, optimizer and learning-rate schedule for ``trainable``, passed through accelerator.prepare.

    Returns the shared fields of :class:`TrainingRun`. PU risks are computed
    per process on its own U and S shards and DDP averages the gradients:
    each shard's risk is an unbiased mini-batch estimate, as with one process.
    """
    unlabeled_loader, unlabeled_sampler, sensitive_loader, sensitive_sampler = make_training_loaders(
        args, plan, unlabeled, sensitive, make_dataset, accelerator.num_processes
    )
    optimizer = make_optimizer(args, trainable, plan.learning_rate)
    lr_scheduler = make_lr_scheduler(args, optimizer, plan.max_train_steps, accelerator.num_processes)
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
        "plan": plan,
        "ema_model": ema_model,
    }


def enable_memory_savers(unet, args: argparse.Namespace) -> None:
    """--enable_xformers_memory_efficient_attention and --gradient_checkpointing."""
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()


def start_trackers(accelerator, args: argparse.Namespace, plan: RunPlan, project: str) -> str | None:
    """TensorBoard (or --report_to) with the flags and the plan, the Hub repository; returns its id."""
    logger.info(
        "U: %d images, S: %d images, %d steps of %d U + %s S images per process",
        plan.num_unlabeled_images,
        plan.num_sensitive_images,
        plan.max_train_steps,
        args.train_batch_size,
        plan.sensitive_batch_size,
    )
    if not accelerator.is_main_process:
        return None
    accelerator.init_trackers(project, config=tracker_config(args, plan))
    return create_hub_repo(args) if args.push_to_hub else None


def tracker_config(args: argparse.Namespace, plan: RunPlan) -> dict:
    """The run's flags and plan for TensorBoard's hparams (scalars and strings only), without the Hub token."""
    values = {**vars(args), **{f"plan_{key}": value for key, value in asdict(plan).items()}}
    return {key: _hparam(value) for key, value in values.items() if key != "hub_token"}


def _hparam(value):
    """A value as TensorBoard's hparams take it; a local path by its folder's name, as the model card has it."""
    if isinstance(value, str):
        return public_name(value)
    return value if isinstance(value, (int, float, bool)) else str(value)


def checkpoint_config(args: argparse.Namespace, plan: RunPlan) -> dict:
    """What a checkpoint records so that a resume can check it continues the same run."""
    config = {key: getattr(args, key, None) for key in OBJECTIVE_FLAGS + ADAPTER_FLAGS}
    # --prior auto is resolved once, at the start; a resume reuses this estimate.
    config.update(prior_value=plan.prior, prior_estimate=plan.prior_estimate, data_fingerprint=plan.data_fingerprint)
    config.update(unlabeled_filter=plan.unlabeled_filter)  # reused by a resume, so that U stays the same
    # The data order as run: the plan's value where it settled one (seed, S batch size), else the flag.
    config.update({key: getattr(plan, key, getattr(args, key, None)) for key in DATA_ORDER_FLAGS})
    return config
