"""The training run both scripts share: accelerator, seed, loaders, optimizer, EMA, the loop and its signals.

Nothing here knows which model is trained: each script passes its own
training step and end-of-epoch saving to :func:`train`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pu_data
import pu_prior
from pu_checkpoints import (
    ADAPTER_FLAGS,
    DATA_ORDER_FLAGS,
    OBJECTIVE_FLAGS,
    full_model,
    resumed_config_value,
    resumed_prior_estimate,
    resumed_seed,
    save_checkpoint,
)
from pu_data import InputError
from pu_errors import OutputError
from pu_flags import signal_to_noise
from pu_loss import RiskOutput, compute_risk, per_sample_diffusion_loss
from pu_outputs import create_hub_repo, finished_model_file, public_name, write_json_atomically

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class LossSettings:
    """Everything the objective reads, settled once in ``main()``: the loss of the paper's Eq. (8)-(19) and
    our two options (the positive-risk weight and the noise band of the S terms)."""

    loss_type: str
    prior: float  # --prior, or its estimate for --prior auto
    nonnegative: str
    positive_risk_weight: float
    reduction: str = "sum"
    sensitive_max_snr: float | None = None  # the band by noise level; None: every draw
    sensitive_min_timestep: int = 0  # the band as t >= this; 0: not used

    @classmethod
    def from_flags(cls, args: argparse.Namespace, prior: float) -> LossSettings:
        """From the parsed flags (after ``pu_flags.resolve_loss_options``) and the run's prior."""
        return cls(
            loss_type=args.loss_type,
            prior=prior,
            nonnegative=args.nonnegative,
            positive_risk_weight=args.positive_risk_weight,
            reduction=args.loss_reduction,
            sensitive_max_snr=args.sensitive_max_snr,
            sensitive_min_timestep=args.sensitive_min_timestep,
        )


def pu_objective(run: TrainingRun, model_pred, target, timesteps, num_unlabeled: int, weights=None) -> RiskOutput:
    """Per-sample losses of one forward over cat([U, S]), then the risk of ``run.loss`` (:class:`LossSettings`).

    ``weights`` (one per sample, e.g. Min-SNR) scale each l(x) of Eq. (8) before
    the risk, so U and S terms are weighted alike. ``timesteps`` place each
    sample in or out of the S terms' noise band.
    """
    loss = run.loss
    per_sample = per_sample_diffusion_loss(model_pred, target, reduction=loss.reduction)
    if weights is not None:
        per_sample = per_sample * weights
    in_band = noise_band(run.noise_scheduler, timesteps, loss)
    return compute_risk(
        per_sample, num_unlabeled, loss.loss_type, loss.prior, loss.nonnegative, loss.positive_risk_weight, in_band
    )


def noise_band(noise_scheduler, timesteps: torch.Tensor, loss: LossSettings) -> torch.Tensor | None:
    """Which draws the S terms use: SNR(t) <= --sensitive_max_snr, or t >= --sensitive_min_timestep; None: all."""
    if loss.sensitive_min_timestep > 0:
        return timesteps >= loss.sensitive_min_timestep
    if loss.sensitive_max_snr is None:
        return None
    snr = signal_to_noise(noise_scheduler).to(timesteps.device)
    return snr[timesteps] <= loss.sensitive_max_snr


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
    prior_estimate: dict | None = None  # what --prior auto found (pu_prior.PriorEstimate.to_dict())
    data_fingerprint: dict | None = None  # pu_data.data_fingerprint of U and S


def plan_run(
    args: argparse.Namespace,
    seed: int,
    unlabeled,
    sensitive,
    num_processes: int,
    prior_estimate: dict | None = None,
    data_fingerprint: dict | None = None,
) -> RunPlan:
    """The default --sensitive_batch_size, the learning rate after --scale_lr, and the step counts: an epoch
    of U gives ceil(batches per process / --gradient_accumulation_steps) steps; --max_train_steps, when
    given, wins over --num_train_epochs. With --prior auto the prior is ``prior_estimate``'s."""
    sensitive_batch_size = None
    if sensitive is not None:
        sensitive_batch_size = args.sensitive_batch_size or pu_data.default_sensitive_batch_size(
            args.train_batch_size, len(unlabeled), len(sensitive)
        )
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    batches_per_process = math.ceil(math.ceil(len(unlabeled) / args.train_batch_size) / num_processes)
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


def settle_seed(accelerator, args: argparse.Namespace) -> int:
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
    (a :class:`pu_prior.PriorEstimate`), refused when it cannot be trained with; it goes to prior.json in
    --output_dir. None for a numeric --prior.

    Every process runs the estimate, so that none waits in a collective for as long as it takes (on real
    data that can outlast the process group's timeout); the main process's result is then shared, so that
    all train with the same prior, and so is its refusal.
    """
    from accelerate.utils import broadcast_object_list

    if args.prior != "auto" or args.loss_type != "pu":
        return None
    saved = resumed_prior_estimate(args)
    if saved is not None:
        logger.info("--prior auto: %.4f, as estimated when the resumed run started", saved["estimate"])
        return saved
    try:
        found = estimate()
        pu_prior.check_usable(found, args.prior_max_interval_width)
        outcome = [found.to_dict(), None]
    except InputError as error:
        outcome = [None, str(error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise InputError(outcome[1])
    if accelerator.is_main_process:
        write_json_atomically(Path(args.output_dir) / "prior.json", outcome[0])
    return outcome[0]


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
    unlabeled_seed = pu_data.derived_seed(plan.seed, 0)
    unlabeled_loader, unlabeled_sampler = seeded_loader(
        args, make_dataset(unlabeled, unlabeled_seed, "U"), args.train_batch_size, unlabeled_seed, drop_last=False
    )
    if sensitive is None:
        return unlabeled_loader, unlabeled_sampler, None, None
    sensitive_seed = pu_data.derived_seed(plan.seed, 1)
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
    sampler = pu_data.EpochShuffle(len(dataset), seed)
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


@contextlib.contextmanager
def model_to_save(accelerator, run: TrainingRun, state: dict | None = None):
    """The trained model as validation and saving should see it, with its EMA weights when kept: the unwrapped
    model with the EMA swapped in and back out, or, given a gathered ``state`` (DeepSpeed, FSDP:
    :func:`pu_checkpoints.gathered_state_dict`), a copy that holds it."""
    if state is None:
        with ema_weights(run):
            yield accelerator.unwrap_model(run.model)
        return
    model = full_model(accelerator, run.model, state)
    if run.ema_model is not None:
        run.ema_model.copy_to(model.parameters())
    yield model


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


def exit_on_error(main: Callable, args: argparse.Namespace) -> None:
    """Run a script's main: bad input and NaN stop with "error: ...", a signal with its exit code."""
    try:
        main(args)
    except (InputError, OutputError, FloatingPointError) as error:
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


def train(
    accelerator,
    run: TrainingRun,
    args: argparse.Namespace,
    first_step: int,
    training_step: Callable,
    end_of_epoch: Callable,
) -> None:
    """The loop: one optimizer step per --gradient_accumulation_steps U batches, each paired with an S batch.

    It starts after ``first_step`` (a resumed checkpoint's step, else 0).
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
    plan, global_step = run.plan, first_step
    if global_step >= plan.max_train_steps:
        finish_trained_run(accelerator, args, plan, global_step, end_of_epoch)
        return
    first_epoch = global_step // plan.steps_per_epoch
    skip_batches = (global_step % plan.steps_per_epoch) * args.gradient_accumulation_steps
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
        range(plan.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    cycle_logs = CycleAverage()
    for epoch in range(first_epoch, plan.num_train_epochs):
        run.model.train()
        run.unlabeled_sampler.use_epoch(epoch)
        start = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(run.unlabeled_loader, start) if start else run.unlabeled_loader
        for batch_index, unlabeled_batch in enumerate(loader, start=start):
            sensitive_batch = next(sensitive_stream) if sensitive_stream is not None else None
            generator = torch.Generator(accelerator.device).manual_seed(
                pu_data.derived_seed(plan.seed, epoch, batch_index, accelerator.process_index)
            )
            sync, cycle_length = accumulation_cycle(
                batch_index, len(run.unlabeled_loader), args.gradient_accumulation_steps
            )
            # The optimizer and schedule wrappers (and DeepSpeed's engine) read this flag.
            accelerator.sync_gradients = sync
            with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
                risk = training_step(run, unlabeled_batch, sensitive_batch, generator=generator)
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
            if global_step >= plan.max_train_steps:
                break
        end_of_epoch(epoch, global_step)
        if global_step >= plan.max_train_steps:
            break
    stop.restore()
    progress.close()


def end_training(accelerator, run: TrainingRun) -> None:
    """Close the trackers and the process group, releasing the DDP wrapper first.

    DDP's reducer holds a reference to the gloo process group. Were it the
    last one, the group would be destroyed from the reducer's destructor,
    which keeps the GIL while it waits for gloo's worker thread; a worker
    still finishing the last barrier needs the GIL to free that barrier's
    tensors, and the process hangs at exit (seen in CI with two CPU
    processes). Released here, the reducer is never the last owner.
    """
    accelerator.wait_for_everyone()
    run.model = accelerator.unwrap_model(run.model)
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


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


def finish_trained_run(accelerator, args, plan: RunPlan, global_step: int, end_of_epoch: Callable) -> None:
    """A resume whose checkpoint already reached --max_train_steps trains nothing more.

    If the run was stopped between its last checkpoint and its final save,
    the final model is written from the checkpoint; a run that finished
    stays as it is.
    """
    finished = finished_model_file(args.output_dir)
    if finished:
        accelerator.print(
            f"step {global_step} of --max_train_steps {plan.max_train_steps} is done and {args.output_dir} holds"
            f" the finished model ({finished}): nothing to do"
        )
        return
    accelerator.print(f"step {global_step} is the last one: saving the final model from the checkpoint")
    end_of_epoch((global_step - 1) // plan.steps_per_epoch, global_step)


def _after_step(accelerator, run: TrainingRun, args, logs: dict, global_step: int, progress, stop) -> None:
    """Logging (it synchronises with the device, hence only every --logging_steps), checkpoints, signals."""
    if global_step % args.logging_steps == 0 or global_step == run.plan.max_train_steps:
        check_finite(logs, global_step, args.output_dir)
        values = log_risk(accelerator, logs, run.lr_scheduler.get_last_lr()[0], global_step)
        progress.set_postfix(loss=f"{values['loss']:.4g}")
    if global_step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, args, global_step, checkpoint_config(args, run.plan))
    if stop.requested(accelerator):
        interrupt(accelerator, args, run.plan, global_step, stop.signal_number)


def interrupt(accelerator, args, plan: RunPlan, global_step: int, signal_number: int | None) -> None:
    """Save the state of the last finished step (unless just saved) and stop."""
    if not (Path(args.output_dir) / f"checkpoint-{global_step}").is_dir():
        save_checkpoint(accelerator, args, global_step, checkpoint_config(args, plan))
    accelerator.end_training()
    number = signal_number or signal.SIGTERM
    raise TrainingInterrupted(
        f"interrupted by {signal.Signals(number).name} after step {global_step}; checkpoint-{global_step} is in"
        f" {args.output_dir}: continue with --resume_from_checkpoint latest",
        number,
    )


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
    # The data order as run: the plan's value where it settled one (seed, S batch size), else the flag.
    config.update({key: getattr(plan, key) if hasattr(plan, key) else getattr(args, key) for key in DATA_ORDER_FLAGS})
    return config
