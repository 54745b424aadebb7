"""Interruption, resume, determinism, numerical safety and messy image folders."""

import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

import train_pu_unconditional
from tests.helpers import UNCONDITIONAL as SCRIPT
from tests.helpers import (
    assert_ok,
    load_and_sample,
    refusal,
    run_script,
    scalars,
    signal_once_saved,
    start_script,
    tiny_run_args,
    write_image_folder,
)

# Long enough that a run signalled at checkpoint-3 is still training when the signal arrives.
STEPS = 60
# Random crops (8 px images at 6 px) and flips, EMA: everything random that a resume must replay.
AUGMENTED = [
    "--resolution",
    "6",
    "--random_flip",
    "--use_ema",
    "--save_images_epochs",
    "1000",
    "--save_model_epochs",
    "1000",
    "--max_train_steps",
    str(STEPS),
]


def loss_trace(output_dir):
    return dict(scalars(output_dir)["loss"])


def test_same_seed_gives_the_same_loss_trace(tmp_path, digits_dir, tiny_unet_config):
    traces = []
    for name in ("a", "b"):
        args = tiny_run_args(digits_dir, tiny_unet_config, tmp_path / name, "--max_train_steps", "6", "--random_flip")
        assert_ok(run_script(SCRIPT, *args))
        traces.append(loss_trace(tmp_path / name))
    assert list(traces[0]) == list(range(1, 7))
    assert traces[0] == traces[1]
    other = tmp_path / "other-seed"
    args = tiny_run_args(digits_dir, tiny_unet_config, other, "--max_train_steps", "6", "--random_flip")
    args[args.index("--seed") + 1] = "1"
    assert_ok(run_script(SCRIPT, *args))
    assert loss_trace(other) != traces[0]


def interruptible_args(digits_dir, tiny_unet_config, output_dir, *extra):
    base = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "3", *extra)
    base[base.index("--resolution") + 1] = "6"
    return base + AUGMENTED


@pytest.fixture(scope="module")
def uninterrupted_run(digits_dir, tiny_unet_config, tmp_path_factory) -> Path:
    """The run that each interrupted and resumed one must replay, trained once for both signals."""
    # No launcher anywhere in these tests (plain python, so the signal reaches the training process; the
    # other runs in this process): a launcher that sets another CPU thread count changes float rounding.
    reference = tmp_path_factory.mktemp("uninterrupted") / "reference"
    assert_ok(run_script(SCRIPT, *interruptible_args(digits_dir, tiny_unet_config, reference)))
    return reference


def assert_stopped_and_replayed_by_resume(process, stderr, interrupted, reference, signal_number, resume_args):
    """The run stopped on the signal at a checkpoint, wrote no final model, and its resume (in this process)
    gives the uninterrupted run's numbers exactly."""
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert "stopped: interrupted by" in stderr and "--resume_from_checkpoint latest" in stderr
    step = max(int(p.name.split("-")[1]) for p in interrupted.glob("checkpoint-*"))
    assert 3 <= step < STEPS
    assert not (interrupted / "model_index.json").exists()  # no final model from an interrupted run
    assert not list(interrupted.glob(".tmp-*"))

    assert_ok(run_script(SCRIPT, *resume_args))  # in this process
    # Same data order, augmentation, noise and state: the same numbers, not merely close ones.
    assert loss_trace(interrupted) == loss_trace(reference)
    assert sorted(loss_trace(interrupted)) == list(range(1, STEPS + 1))
    final_reference = load_and_sample(reference)[0].unet.state_dict()
    final_resumed = load_and_sample(interrupted)[0].unet.state_dict()
    assert all(torch.equal(final_resumed[name], weight) for name, weight in final_reference.items())


@pytest.mark.slow
def test_an_interrupted_and_resumed_run_replays_the_uninterrupted_one(
    tmp_path, digits_dir, tiny_unet_config, uninterrupted_run
):
    """Ctrl-C (SIGINT); SIGTERM, a scheduler's stop, is the test after this one."""
    interrupted = tmp_path / "interrupted"
    args = interruptible_args(digits_dir, tiny_unet_config, interrupted)
    process = start_script(SCRIPT, *args, launcher="python")
    signal_once_saved(process, interrupted / "checkpoint-3", signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    resume = [*args, "--resume_from_checkpoint", "latest"]
    assert_stopped_and_replayed_by_resume(process, stderr, interrupted, uninterrupted_run, signal.SIGINT, resume)


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_trains_and_sigterm_stops_the_first_for_an_exact_resume(
    tmp_path, digits_dir, tiny_unet_config, uninterrupted_run
):
    """One launch serves both checks: paused (SIGSTOP) once checkpoint-3 is written, so that it is surely still
    training when a second run on its output folder is tried, then stopped by SIGTERM and resumed."""
    output_dir = tmp_path / "out"
    args = interruptible_args(digits_dir, tiny_unet_config, output_dir)
    first = start_script(SCRIPT, *args, launcher="python")
    second_args = [*args, "--resume_from_checkpoint", "latest"]
    second_args[second_args.index("--seed") + 1] = "1"
    try:
        signal_once_saved(first, output_dir / "checkpoint-3", signal.SIGSTOP)
        second = run_script(SCRIPT, *second_args)  # in this process: the lock is between processes
        assert first.poll() is None  # still there, so the refusal above was the lock's
    finally:
        first.send_signal(signal.SIGTERM)  # delivered when the run continues
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert f"--output_dir {output_dir} is in use by another training run (pid {first.pid}" in second.stderr
    assert not (output_dir / ".pu-diffusion.lock").exists()  # gone with the run that held it

    resume = [*args, "--resume_from_checkpoint", "latest"]
    assert_stopped_and_replayed_by_resume(first, stderr, output_dir, uninterrupted_run, signal.SIGTERM, resume)


@pytest.fixture(scope="module")
def two_step_run(digits_dir, tiny_unet_config, tmp_path_factory):
    """One run of 2 steps with checkpoint-2, shared by the tests that only try to resume it and are refused."""
    output_dir = tmp_path_factory.mktemp("two_steps") / "out"
    args = tiny_run_args(
        digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "2", "--max_train_steps", "2"
    )
    assert_ok(run_script(SCRIPT, *args))
    return args, output_dir


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--loss_type", "supervised"), ("--prior", "0.2"), ("--nonnegative", "abs"), ("--sensitive_min_timestep", "10")],
)
def test_resume_refuses_another_objective(two_step_run, flag, value, capsys):
    base, output_dir = two_step_run
    state = (output_dir / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    changed = [*base, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", flag, value]
    assert f"{flag} {value}: checkpoint-2 was trained with {flag}" in refusal(train_pu_unconditional, changed, capsys)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (output_dir / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == state


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    args = tiny_run_args(
        digits_dir, tiny_unet_config, output_dir, "--max_train_steps", "20", "--checkpointing_steps", "1"
    )
    args[args.index("--learning_rate") + 1] = "1e30"  # the first Adam step blows the weights up
    result = run_script(SCRIPT, *args)
    assert result.returncode != 0
    assert "the loss is not finite at step 2" in result.stderr
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (output_dir / "model_index.json").exists()


def test_messy_image_folders_are_cleaned_or_explained(tmp_path):
    unlabeled = write_image_folder(tmp_path / "u", 10, seed=1)
    sensitive = write_image_folder(tmp_path / "s", 2, size=5, mode="RGB", seed=2)  # smaller than --resolution
    Image.new("RGBA", (12, 9), (200, 10, 10, 128)).save(sensitive / "rgba.png")
    (sensitive / "broken.png").write_bytes(b"\x89PNG but not really")
    (sensitive / "notes.txt").write_text("not an image")
    output_dir = tmp_path / "out"
    result = run_script(
        SCRIPT,
        "--train_data_dir",
        unlabeled,
        "--sensitive_data_dir",
        sensitive,
        "--resolution",
        "8",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "2",
        "--ddpm_num_inference_steps",
        "2",
        "--eval_batch_size",
        "2",
        "--seed",
        "0",
        "--output_dir",
        output_dir,
    )
    assert_ok(result)
    assert "skipping 1 unreadable image(s), e.g." in result.stderr and "broken.png" in result.stderr
    assert "2 image(s) are smaller than --resolution 8 and will be enlarged" in result.stderr
    assert "| images in U, S | 10, 3 |" in (output_dir / "README.md").read_text()

    (tmp_path / "all_broken").mkdir()
    (tmp_path / "all_broken" / "a.png").write_bytes(b"garbage")
    refused = run_script(
        SCRIPT,
        "--train_data_dir",
        unlabeled,
        "--sensitive_data_dir",
        tmp_path / "all_broken",
        "--output_dir",
        tmp_path / "refused",
        timeout=120,
    )
    assert refused.returncode != 0
    assert "--sensitive_data_dir" in refused.stderr and "none of its 1 images can be read" in refused.stderr
    assert not (tmp_path / "refused").exists()


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--max_train_steps", "2")
    result = run_script(SCRIPT, *args, "--resume_from_checkpoint", "latest")
    assert_ok(result)
    assert "no checkpoint in" in result.stdout + result.stderr
    assert sorted(loss_trace(output_dir)) == [1, 2]


def test_resume_with_another_batch_size_warns_that_it_will_not_replay(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "2")
    assert_ok(run_script(SCRIPT, *args, "--max_train_steps", "2"))
    args[args.index("--train_batch_size") + 1] = "4"
    result = run_script(SCRIPT, *args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert_ok(result)
    assert "--train_batch_size 4 differs from checkpoint-2's 8: the data order will not replay" in result.stderr
    assert sorted(loss_trace(output_dir)) == [1, 2, 3]


def unet_weights(output_dir):
    return (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_an_incomplete_checkpoint_is_named_and_latest_falls_back_to_a_complete_one(
    tmp_path, digits_dir, tiny_unet_config
):
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "1")
    assert_ok(run_script(SCRIPT, *args, "--max_train_steps", "3"))
    (output_dir / "checkpoint-3" / "optimizer.bin").unlink()
    (output_dir / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"cut")

    named = run_script(SCRIPT, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-3")
    assert named.returncode != 0 and "Traceback" not in named.stderr
    assert "checkpoint-3 is incomplete: optimizer.bin (missing)" in named.stderr

    latest = run_script(SCRIPT, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_ok(latest)
    assert "checkpoint-3 is incomplete (optimizer.bin (missing))" in latest.stderr
    assert "checkpoint-2 is incomplete (unet/diffusion_pytorch_model.safetensors (3 bytes" in latest.stderr
    assert "resuming from" in latest.stdout and "checkpoint-1" in latest.stdout
    steps = [step for step, _ in scalars(output_dir)["loss"]]
    assert steps.count(2) == 2 and steps.count(4) == 1  # steps 2-4 ran again from checkpoint-1


def test_a_finished_run_resumed_again_stays_finished(tmp_path, digits_dir, tiny_unet_config):
    """The last step (3) is not at an epoch boundary (6 batches an epoch) and has its checkpoint."""
    output_dir = tmp_path / "out"
    args = tiny_run_args(
        digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "3", "--max_train_steps", "3"
    )
    assert_ok(run_script(SCRIPT, *args))
    weights, card = unet_weights(output_dir), (output_dir / "README.md").read_text()

    again = run_script(SCRIPT, *args, "--resume_from_checkpoint", "latest")
    assert_ok(again)
    assert "nothing to do" in again.stdout
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    assert unet_weights(output_dir) == weights and (output_dir / "README.md").read_text() == card
    assert sorted(loss_trace(output_dir)) == [1, 2, 3]


def test_a_run_stopped_before_its_final_save_is_finished_by_resume(tmp_path, digits_dir, tiny_unet_config):
    """As if killed during the final validation grid: checkpoint-3 is there, the model is not."""
    import shutil

    output_dir = tmp_path / "out"
    args = tiny_run_args(
        digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "3", "--max_train_steps", "3"
    )
    assert_ok(run_script(SCRIPT, *args))
    weights = unet_weights(output_dir)
    for name in ("model_index.json", "README.md", "samples.png"):
        (output_dir / name).unlink()
    for name in ("unet", "scheduler", "validation"):
        shutil.rmtree(output_dir / name)

    assert_ok(run_script(SCRIPT, *args, "--resume_from_checkpoint", "latest"))
    assert load_and_sample(output_dir)[1].shape == (2, 8, 8, 1)
    assert unet_weights(output_dir) == weights
    assert "| steps, batch (U + S) | 3, 8 + 2 |" in (output_dir / "README.md").read_text()
    assert (output_dir / "samples.png").is_file()
    assert sorted(loss_trace(output_dir)) == [1, 2, 3]  # no step trained twice


def test_a_grayscale_image_sorting_first_does_not_make_a_colour_folder_grayscale(tmp_path):
    unlabeled = write_image_folder(tmp_path / "u", 5, mode="RGB", seed=1)
    Image.new("L", (8, 8), 90).save(unlabeled / "000-gray.png")
    output_dir = tmp_path / "out"
    result = run_script(
        SCRIPT, "--train_data_dir", unlabeled, "--loss_type", "unsupervised", "--resolution", "8",
        "--train_batch_size", "3", "--max_train_steps", "1", "--ddpm_num_inference_steps", "1",
        "--eval_batch_size", "1", "--seed", "0", "--output_dir", output_dir,
    )  # fmt: skip
    assert_ok(result)
    assert "1 of 6 images are grayscale" in result.stderr and "000-gray.png" in result.stderr
    assert load_and_sample(output_dir)[0].unet.config.in_channels == 3
