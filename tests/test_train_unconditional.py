"""train_pu_unconditional.py, launched with `accelerate launch` on tiny models, then judged by what it saved."""

import argparse
import json
import re
import signal

import numpy as np
import pytest
import torch

import train_pu_unconditional
from tests.helpers import (
    ODD,
    assert_ok,
    forwards_per_optimizer_step,
    load_and_sample,
    refusal,
    resume_from_a_copy,
    run_script,
    scalars,
    shared_forwards_per_step,
    signal_once_saved,
    start_script,
    tiny_run_args,
    tiny_unet_kwargs,
    write_image_folder,
)
from tests.helpers import UNCONDITIONAL as SCRIPT


def test_pu_run_saves_a_loadable_pipeline_card_grid_and_logs(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--max_train_steps", "4", "--use_ema")
    assert_ok(run_script(SCRIPT, *args, launcher="accelerate"))  # as users launch it

    assert json.loads((output_dir / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipeline, images = load_and_sample(output_dir)
    assert images.shape == (2, 8, 8, 1)
    assert pipeline.unet.config.block_out_channels == [8, 16]

    card = (output_dir / "README.md").read_text()
    for expected in (
        "pu-diffusion",
        "| loss type | pu |",
        "| prior (beta) | 0.1 |",
        "| nonnegative | nnpu |",
        "| positive risk weight (ours; 1 = paper) | 0.0 |",
        "| noise band of the S terms (ours; paper: all) | SNR <= 8.6 |",
        "| images in U, S | 44, 6 |",
        "trained from scratch",
        "DiffusionPipeline.from_pretrained",
    ):
        assert expected in card
    assert (output_dir / "samples.png").is_file()
    assert list((output_dir / "validation").glob("epoch-*.png"))
    assert not list(output_dir.glob(".tmp-*"))

    logged = scalars(output_dir)
    for tag in ("loss", "positive_risk", "negative_risk", "nnpu_correction", "unlabeled_loss", "sensitive_loss"):
        assert [step for step, _ in logged[tag]] == [1, 2, 3, 4], tag
    assert all(value in (0.0, 1.0) for _, value in logged["nnpu_correction"])


class ZeroUNet(torch.nn.Module):
    def forward(self, noisy, timesteps):
        return argparse.Namespace(sample=torch.zeros_like(noisy))


def test_training_step_applies_our_options_to_the_drawn_timesteps():
    """With a zero prediction each l(x) is the squared noise; replaying the draws gives the band by hand."""
    from diffusers import DDPMScheduler

    from pu_diffusion.objective import LossSettings
    from pu_diffusion.unconditional import training_step
    from pu_loss import compute_risk
    from tests.loss_flags import default_loss_flags

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unlabeled, sensitive = torch.rand(6, 1, 8, 8), torch.rand(3, 1, 8, 8)
    args = {"prior": 0.9, "nonnegative": "none", "positive_risk_weight": 0.0}  # the run's prior (0.3) is used

    def run(**band):
        loss = LossSettings.from_flags(default_loss_flags(**args, **band), prior=0.3)
        return argparse.Namespace(model=ZeroUNet(), noise_scheduler=scheduler, loss=loss)

    generator = torch.Generator().manual_seed(5)
    noise = torch.randn((9, 1, 8, 8), generator=generator)
    timesteps = torch.randint(0, 1000, (9,), generator=generator)
    per_sample = (noise**2).sum(dim=(1, 2, 3))
    in_band = timesteps >= 500
    assert 0 < in_band[6:].sum() < 3  # this seed puts S on both sides of the band's edge

    banded = training_step(run(sensitive_min_timestep=500), unlabeled, sensitive, generator.manual_seed(5))
    everywhere = training_step(run(sensitive_min_timestep=0), unlabeled, sensitive, generator.manual_seed(5))
    # The same band by noise level: SNR(t) <= SNR(500) holds exactly for t >= 500.
    alphas_cumprod = scheduler.alphas_cumprod.double()
    snr_at_500 = float((alphas_cumprod / (1 - alphas_cumprod))[500])
    by_noise_level = training_step(run(sensitive_max_snr=snr_at_500), unlabeled, sensitive, generator.manual_seed(5))
    assert banded.loss.item() == pytest.approx(compute_risk(per_sample, 6, "pu", 0.3, "none", 0.0, in_band).loss.item())
    assert by_noise_level.loss.item() == banded.loss.item()
    assert everywhere.loss.item() == pytest.approx(compute_risk(per_sample, 6, "pu", 0.3, "none", 0.0).loss.item())
    assert banded.loss.item() != pytest.approx(everywhere.loss.item())


def test_prior_auto_is_estimated_once_recorded_and_reused_on_resume(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--prior", "auto", "--checkpointing_steps", "2")
    # The estimator needs at least 50 images in S and in U; trained for 2 epochs its interval is too wide to be
    # trusted by default.
    args += ["--prior_folds", "2", "--prior_epochs", "2", "--prior_max_interval_width", "1"]
    args += ["--num_labeled_sensitive", "50", "--num_unlabeled_normal", "60"]
    first = run_script(SCRIPT, *args, "--max_train_steps", "2")
    assert_ok(first)
    assert "estimated prior (share of sensitive images in U)" in first.stderr

    estimate = json.loads((output_dir / "prior.json").read_text())
    assert (estimate["num_unlabeled"], estimate["num_sensitive"], estimate["folds"]) == (64, 50, 2)
    assert estimate["method"].startswith("BBE") and estimate["features"] == "pixels at 8 px"
    assert 0 <= estimate["low"] <= estimate["high"] <= 1 and 0 <= estimate["estimate"] <= 1
    saved = json.loads((output_dir / "checkpoint-2" / "training_config.json").read_text())
    assert saved["prior"] == "auto" and saved["prior_estimate"] == estimate
    assert saved["prior_value"] == estimate["estimate"]
    card = (output_dir / "README.md").read_text()
    assert f"| prior (beta) | {estimate['estimate']:.4f}, estimated (--prior auto; 90% interval" in card

    (output_dir / "prior.json").unlink()  # the resume must take the checkpoint's estimate, not make a new one
    resumed = run_script(SCRIPT, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_ok(resumed)
    assert "as estimated when the resumed run started" in resumed.stderr
    assert "estimated prior (share" not in resumed.stderr and not (output_dir / "prior.json").exists()
    final = json.loads((output_dir / "checkpoint-4" / "training_config.json").read_text())
    assert final["prior_estimate"] == estimate


def test_filter_unlabeled_drops_the_most_s_like_images_records_them_and_keeps_them_dropped_on_resume(
    tmp_path, digits_dir, tiny_unet_config, monkeypatch, capsys
):
    """--filter_unlabeled with fixed held-out scores (U's 4 sensitive digits score highest): a share of 4/64
    drops exactly those, as the record, the log, the card and the checkpoint say; a resume keeps the same U."""
    from pu_diffusion.prior import HeldOutScores

    def fixed_scores(unlabeled, sensitive, args, seed, vae=None, device="cpu"):
        is_sensitive = np.isin(unlabeled["label"], [int(label) for label in ODD])
        scores = np.where(is_sensitive, 0.9, 0.1) + np.linspace(0, 0.01, len(unlabeled))
        return HeldOutScores(np.full(len(sensitive), 0.9), scores, "pixels at 8 px", 5)

    monkeypatch.setattr(train_pu_unconditional, "scores_for_data", fixed_scores)
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "2")
    args += ["--filter_unlabeled", "0.0625", "--num_labeled_sensitive", "50", "--num_unlabeled_normal", "60"]
    first = run_script(SCRIPT, *args, "--max_train_steps", "2")
    assert_ok(first)

    record = json.loads((output_dir / "unlabeled_filter.json").read_text())
    assert (record["unlabeled_before"], record["unlabeled_kept"], record["fraction"]) == (64, 60, 0.0625)
    assert record["audit"]["sensitive_dropped"] == 4 and record["audit"]["normal_dropped"] == 0
    assert "dropped 4 of 64 images of U (0.0625: 0.0625); labels in U: 4 of its 4 sensitive" in first.stderr
    assert "U: 60 images, S: 50 images" in first.stderr
    card = (output_dir / "README.md").read_text()
    assert "| images in U, S | 60, 50 |" in card and "| U filtered first (ours) | dropped 4 of 64 images" in card
    saved = json.loads((output_dir / "checkpoint-2" / "training_config.json").read_text())
    assert saved["filter_unlabeled"] == 0.0625 and saved["unlabeled_filter"] == record

    monkeypatch.setattr(train_pu_unconditional, "scores_for_data", None)  # a resume must not score again
    (output_dir / "unlabeled_filter.json").unlink()
    resumed = run_script(SCRIPT, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert_ok(resumed)
    assert "--filter_unlabeled: as filtered when the resumed run started, dropped 4 of 64" in resumed.stderr
    assert sorted(step for step, _ in scalars(output_dir)["loss"]) == [1, 2, 3, 4]
    other = [*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--filter_unlabeled", "high"]
    refused = refusal(train_pu_unconditional, other, capsys)
    assert "--filter_unlabeled high: checkpoint-4 was trained with --filter_unlabeled 0.0625" in refused


def test_filter_unlabeled_trains_as_a_run_on_estimate_prior_filtered_data_does(tmp_path, digits_dir, tiny_unet_config):
    """One command (--filter_unlabeled) and the two-step route (estimate_prior.py --write_filtered_data, then
    training on its folders) drop the same images and train the same UNet, bit for bit on one machine."""
    split = ["--dataset_name", digits_dir, "--label_column", "label", "--sensitive_labels", *ODD, "--resolution", "8"]
    split += ["--num_unlabeled_normal", "60", "--num_unlabeled_sensitive", "4", "--num_labeled_sensitive", "50"]
    scoring = ["--prior_folds", "2", "--prior_epochs", "2", "--seed", "0"]
    folder = tmp_path / "filtered"
    assert_ok(
        run_script("estimate_prior.py", *split, *scoring, "--output_dir", tmp_path / "prior",
                   "--write_filtered_data", folder, "--filter_fraction", "0.1")
    )  # fmt: skip
    one_command = tmp_path / "one"
    args = tiny_run_args(digits_dir, tiny_unet_config, one_command, "--max_train_steps", "3", *scoring[:4])
    args += ["--num_labeled_sensitive", "50", "--num_unlabeled_normal", "60", "--filter_unlabeled", "0.1"]
    assert_ok(run_script(SCRIPT, *args))
    two_steps = tmp_path / "two"
    split_flags = dict.fromkeys(["--label_column", "--num_unlabeled_normal", "--num_unlabeled_sensitive"], 1)
    split_flags |= {"--num_labeled_sensitive": 1, "--sensitive_labels": len(ODD), "--filter_unlabeled": 1}
    on_folders = []
    position = 0
    while position < len(args):  # the same flags without the label split and the filter, on the folders
        flag = args[position]
        if flag in split_flags:
            position += 1 + split_flags[flag]
            continue
        on_folders.append(flag)
        position += 1
    on_folders[on_folders.index("--dataset_name") + 1] = folder / "unlabeled"
    on_folders[on_folders.index("--output_dir") + 1] = two_steps
    assert_ok(run_script(SCRIPT, *on_folders, "--sensitive_dataset_name", folder / "sensitive"))

    made_here = json.loads((one_command / "unlabeled_filter.json").read_text())
    written = json.loads((folder / "filter.json").read_text())
    assert made_here["dropped_indices"] == written["dropped_indices"] and len(written["dropped_indices"]) == 6
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (one_command / weights).read_bytes() == (two_steps / weights).read_bytes()


def test_checkpoint_limit_and_resume_continue_the_global_step(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    common = tiny_run_args(
        digits_dir,
        tiny_unet_config,
        output_dir,
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--use_ema",
    )
    assert_ok(run_script(SCRIPT, *common, "--max_train_steps", "6"))
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # The checkpoint's model is in Diffusers format.
    from diffusers import UNet2DModel

    assert UNet2DModel.from_pretrained(output_dir / "checkpoint-6" / "unet").config.sample_size == 8

    result = run_script(SCRIPT, *common, "--max_train_steps", "9", "--resume_from_checkpoint", "latest")
    assert_ok(result)
    assert "resuming from" in result.stdout + result.stderr
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    steps = sorted(step for step, _ in scalars(output_dir)["loss"])
    assert steps == list(range(1, 10))  # 1-6 from the first run, 7-9 after resuming


def test_resume_from_a_named_checkpoint(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    common = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "2")
    assert_ok(run_script(SCRIPT, *common, "--max_train_steps", "4"))
    result = run_script(SCRIPT, *common, "--max_train_steps", "5", "--resume_from_checkpoint", "checkpoint-2")
    assert_ok(result)
    steps = [step for step, _ in scalars(output_dir)["loss"]]
    assert steps.count(3) == 2 and steps.count(4) == 2 and 5 in steps  # steps 3-4 ran again from checkpoint-2


@pytest.mark.parametrize(
    ("loss_type", "tags", "absent"),
    [
        ("unsupervised", {"loss", "unlabeled_loss"}, {"positive_risk", "sensitive_loss"}),
        ("supervised", {"loss", "unlabeled_loss", "positive_risk", "sensitive_loss"}, {"negative_risk"}),
    ],
)
def test_baseline_loss_types(tmp_path, digits_dir, tiny_unet_config, loss_type, tags, absent):
    output_dir = tmp_path / loss_type
    assert_ok(
        run_script(
            SCRIPT,
            *tiny_run_args(
                digits_dir, tiny_unet_config, output_dir, "--max_train_steps", "2", "--loss_type", loss_type
            ),
        )
    )
    logged = set(scalars(output_dir))
    assert tags <= logged and not absent & logged
    assert f"| loss type | {loss_type} |" in (output_dir / "README.md").read_text()
    load_and_sample(output_dir)


def test_abs_mode_with_sample_prediction(tmp_path, digits_dir, tiny_unet_config):
    output_dir = tmp_path / "out"
    assert_ok(
        run_script(
            SCRIPT,
            *tiny_run_args(
                digits_dir,
                tiny_unet_config,
                output_dir,
                "--max_train_steps",
                "2",
                "--nonnegative",
                "abs",
                "--prediction_type",
                "sample",
            ),
        )
    )
    pipeline, _ = load_and_sample(output_dir)
    assert pipeline.scheduler.config.prediction_type == "sample"
    assert "nnpu_correction" not in scalars(output_dir)


def test_fine_tuning_a_saved_pipeline(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction")
    DDPMPipeline(unet=UNet2DModel(**tiny_unet_kwargs(channels=3)), scheduler=scheduler).save_pretrained(base)
    unlabeled = write_image_folder(tmp_path / "u", 12, mode="RGB", seed=1)
    sensitive = write_image_folder(tmp_path / "s", 3, size=10, mode="RGB", seed=2)
    output_dir = tmp_path / "out"

    result = run_script(
        SCRIPT,
        "--pretrained_model_name_or_path",
        base,
        "--train_data_dir",
        unlabeled,
        "--sensitive_data_dir",
        sensitive,
        "--resolution",
        "8",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "3",
        "--lr_warmup_steps",
        "0",
        "--learning_rate",
        "1e-2",
        "--ddpm_num_inference_steps",
        "2",
        "--eval_batch_size",
        "2",
        "--output_dir",
        output_dir,
        "--seed",
        "0",
    )
    assert_ok(result)
    pipeline, images = load_and_sample(output_dir)
    assert images.shape == (2, 8, 8, 3)
    assert pipeline.scheduler.config.num_train_timesteps == 50
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    tuned = pipeline.unet.state_dict()
    original = UNet2DModel.from_pretrained(base / "unet").state_dict()
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[name], original[name]) for name in tuned)
    assert f"| base model | {base.name} (a local folder) |" in (output_dir / "README.md").read_text()
    assert "| images in U, S | 12, 3 |" in (output_dir / "README.md").read_text()


def test_a_finished_model_is_not_overwritten_without_the_flag(tmp_path, digits_dir, tiny_unet_config, capsys):
    output_dir = tmp_path / "out"
    args = tiny_run_args(digits_dir, tiny_unet_config, output_dir, "--max_train_steps", "1")
    assert_ok(run_script(SCRIPT, *args))
    before = (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert "--overwrite_output_dir" in refusal(train_pu_unconditional, args, capsys)
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert_ok(run_script(SCRIPT, *args, "--overwrite_output_dir", "--learning_rate", "1e-1"))
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != before


@pytest.mark.slow
def test_two_processes_accumulate_stop_together_on_sigterm_and_resume(tmp_path, digits_dir, tiny_unet_config):
    """accelerate launch --num_processes 2 (gloo), stopped as a cluster's scheduler stops a job and resumed.

    U's 6 batches are sharded, 3 per process and epoch, so with accumulation 2 each process steps after 2 of
    them, then after 1, and both step together. SIGTERM to the launcher, once checkpoint-4 is written, stops
    both processes after the same step with a checkpoint that holds both processes' random states."""
    output_dir = tmp_path / "out"
    args = tiny_run_args(
        digits_dir, tiny_unet_config, output_dir, "--checkpointing_steps", "2", "--use_ema",
        "--save_images_epochs", "1", "--gradient_accumulation_steps", "2",
    )  # fmt: skip
    record = tmp_path / "record.json"
    counted = ["tests/step_counter.py", record, SCRIPT, *args, "--max_train_steps", "100000"]
    launch = start_script(*counted, num_processes=2)
    signal_once_saved(launch, output_dir / "checkpoint-4", signal.SIGTERM)
    _, stderr = launch.communicate(timeout=300)
    assert launch.returncode != 0
    assert stderr.count("U: 44 images, S: 6 images") == 2  # both processes trained
    stops = re.findall(r"stopped: interrupted by SIGTERM after step (\d+)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    stop = int(stops[0])
    assert shared_forwards_per_step(record, num_processes=2) == ([2, 1] * stop)[:stop]
    last = output_dir / f"checkpoint-{stop}"
    assert {p.name for p in last.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert not list(output_dir.glob(".tmp-*")) and not (output_dir / "model_index.json").exists()
    # 2 steps an epoch; the stop comes right after a step, before that epoch's grid.
    grids = sorted(p.name for p in (output_dir / "validation").glob("*.png"))
    assert grids == [f"epoch-{epoch:04d}.png" for epoch in range((stop - 1) // 2)]

    resumed = ["--max_train_steps", str(stop + 2), "--resume_from_checkpoint", "latest"]
    assert_ok(run_script(SCRIPT, *args, *resumed, num_processes=2))
    assert sorted(step for step, _ in scalars(output_dir)["loss"]) == list(range(1, stop + 3))
    _, images = load_and_sample(output_dir)
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize(("accumulation", "expected"), [(1, [1] * 12), (2, [2] * 6), (4, [4, 2, 4, 2])])
def test_gradient_accumulation_steps_after_every_accumulated_u_batches(
    tmp_path, digits_dir, tiny_unet_config, accumulation, expected
):
    """6 U batches an epoch, 2 epochs, and an S pass of 3 batches, which ends inside accumulation cycles."""
    output_dir = tmp_path / "out"
    args = tiny_run_args(
        digits_dir, tiny_unet_config, output_dir, "--num_train_epochs", "2",
        "--gradient_accumulation_steps", str(accumulation),
    )  # fmt: skip
    steps = forwards_per_optimizer_step(SCRIPT, *args, record_path=tmp_path / "record.json")
    assert steps == expected
    assert [step for step, _ in scalars(output_dir)["loss"]] == list(range(1, len(expected) + 1))
    assert f"| steps, batch (U + S) | {len(expected)}, 8 + 2 |" in (output_dir / "README.md").read_text()


def test_resume_inside_an_epoch_with_accumulation_replays_the_run(tmp_path, digits_dir, tiny_unet_config):
    """checkpoint-1 of an accumulation of 4 sits after 4 of the epoch's 6 U batches (and 4 S batches, one
    pass and a third)."""

    def args(output_dir, *extra):
        return tiny_run_args(
            digits_dir, tiny_unet_config, output_dir, "--num_train_epochs", "2", "--gradient_accumulation_steps",
            "4", "--checkpointing_steps", "1", "--random_flip", *extra,
        )  # fmt: skip

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference_trace, resumed_trace = resume_from_a_copy(SCRIPT, args, reference, resumed, "checkpoint-1")
    assert sorted(resumed_trace) == [2, 3, 4]
    assert all(resumed_trace[step] == reference_trace[step] for step in (2, 3, 4))
    final_reference = load_and_sample(reference)[0].unet.state_dict()
    final_resumed = load_and_sample(resumed)[0].unet.state_dict()
    assert all(torch.equal(final_resumed[name], weight) for name, weight in final_reference.items())


@pytest.mark.parametrize(("resolution", "low", "high"), [(8, 0.6e6, 0.8e6), (16, 1.0e6, 1.3e6), (32, 35e6, 36.5e6)])
def test_default_unet_sizes(resolution, low, high):
    from diffusers import UNet2DModel

    from pu_diffusion.unconditional import default_unet_config

    model = UNet2DModel(**default_unet_config(resolution, channels=1 if resolution < 32 else 3))
    parameters = sum(p.numel() for p in model.parameters())
    assert low <= parameters <= high
    sample = torch.zeros(1, model.config.in_channels, resolution, resolution)
    assert model(sample, torch.tensor([10])).sample.shape == sample.shape
