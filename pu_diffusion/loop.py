"""The training loop both scripts share, with its logging, NaN stop, checkpoints and signals.

Nothing here knows which model is trained: each script passes its own
training step and end-of-epoch saving to :func:`train`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pu_diffusion.batches import endless
from pu_diffusion.checkpoints import full_model, save_checkpoint
from pu_diffusion.errors import InputError, OutputError
from pu_diffusion.outputs import finished_model_file
from pu_diffusion.run_setup import RunPlan, TrainingRun, checkpoint_config
from pu_diffusion.training_data import derived_seed
from pu_loss import RiskOutput


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
    :func:`checkpoints.gathered_state_dict`), a copy that holds it."""
    if state is None:
        with ema_weights(run):
            yield accelerator.unwrap_model(run.model)
        return
    model = full_model(accelerator, run.model, state)
    if run.ema_model is not None:
        run.ema_model.copy_to(model.parameters())
    yield model


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
        sensitive_stream = endless(
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
                derived_seed(plan.seed, epoch, batch_index, accelerator.process_index)
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
            log_check_and_checkpoint(accelerator, run, args, cycle_logs.pop(), global_step, progress, stop)
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


def log_check_and_checkpoint(accelerator, run: TrainingRun, args, logs: dict, global_step: int, progress, stop) -> None:
    """After each optimizer step: the log and the NaN stop (every --logging_steps, since reading the loss
    synchronises with the device), the checkpoint when one is due, and a stop when a signal came."""
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


def exit_on_error(main: Callable, args: argparse.Namespace) -> None:
    """Run a script's main: bad input and NaN stop with "error: ...", a signal with its exit code."""
    try:
        main(args)
    except (InputError, OutputError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    except TrainingInterrupted as interruption:
        print(f"stopped: {interruption}", file=sys.stderr)
        sys.exit(interruption.exit_code)
