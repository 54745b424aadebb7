"""benchmarks/paper_protocol.py end to end on a few steps, and its statistics by hand."""

import argparse
import json
import subprocess
import sys
import threading
import time

import loss_by_noise  # benchmarks/ is on pytest's pythonpath
import paper_protocol
import pytest
import torch

from tests.helpers import reset_accelerate_state, steps_in_this_process, tiny_unet_kwargs


def fake_run(name, seed, rate, fid):
    return paper_protocol.Run(name, seed, "pu", metrics={"non_sensitive_rate": rate, "classifier_fid": fid})


def test_summary_means_and_sample_standard_deviations_by_hand():
    runs = [fake_run("pu", 0, 0.9, 4.0), fake_run("pu", 1, 1.0, 6.0), fake_run("unsupervised", 0, 0.8, 5.0)]
    summary = paper_protocol.summarize(runs)
    assert list(summary) == ["pu", "unsupervised"]
    assert summary["pu"]["rate_mean"] == pytest.approx(0.95)
    assert summary["pu"]["rate_std"] == pytest.approx(0.0707107, rel=1e-5)  # sqrt(((0.05)^2 * 2) / 1)
    assert summary["pu"]["fid_std"] == pytest.approx(1.4142136, rel=1e-6)
    assert summary["unsupervised"]["rate_std"] == 0.0


def test_welch_t_test_by_hand():
    # means 2 and 5, variances 1 and 1, n = 3 each: t = -3 / sqrt(1/3 + 1/3) = -3.674
    assert paper_protocol.welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]).startswith("t = -3.67")
    assert paper_protocol.welch_t_test([1.0], [2.0, 3.0]).startswith("n/a")


def test_quick_benchmark_writes_its_table_chart_and_grids(digits_dir, tmp_path, capsys, monkeypatch):
    """The benchmark and its training and evaluation steps run in this process (the steps one at a time)."""
    steps_in_this_process(monkeypatch, paper_protocol)
    output_dir = tmp_path / "benchmark"
    argv = ["--quick", "--data_dir", str(digits_dir), "--output_dir", str(output_dir), "--classifier_epochs", "2"]
    argv += ["--max_train_steps", "3", "--num_samples", "16"]
    paper_protocol.main([*argv, "--jobs", "2"])
    printed = capsys.readouterr().out
    assert "2 runs, 2 at a time" in printed
    report = (output_dir / "results.md").read_text()
    assert "| unsupervised | 0 |" in report and "| pu | 0 |" in report
    assert report in printed  # the table is printed
    # The PU row trains with the training script's defaults, and the report says so.
    assert "PU flags: none (the training script's defaults)." in report
    assert "Dataset digits at 8 px, sensitive labels 1 3 5 7 9." in report
    card = (output_dir / "runs" / "pu-seed0" / "README.md").read_text()
    assert "| prior (beta) | 0.1 |" in card
    assert "| positive risk weight (ours; 1 = paper) | 0.0 |" in card
    assert "| noise band of the S terms (ours; paper: all) | SNR <= 8.6 |" in card
    results = json.loads((output_dir / "results.json").read_text())
    for method in ("unsupervised", "pu"):
        metrics = json.loads((output_dir / "runs" / f"{method}-seed0" / "evaluation" / "metrics.json").read_text())
        assert results["summary"][method]["rate"] == [metrics["non_sensitive_rate"]]
        assert metrics["num_samples"] == 16
    from PIL import Image

    chart, grids = Image.open(output_dir / "chart.png"), Image.open(output_dir / "grids.png")
    single = Image.open(output_dir / "runs" / "pu-seed0" / "evaluation" / "samples.png")
    assert grids.width > 2 * single.width and chart.width > 0

    # A second call reuses the finished runs instead of training and evaluating again.
    metrics_file = output_dir / "runs" / "pu-seed0" / "evaluation" / "metrics.json"
    written = metrics_file.stat().st_mtime_ns
    paper_protocol.main(argv)
    assert metrics_file.stat().st_mtime_ns == written

    # A filtered method: estimate_prior.py writes the seed's filtered U and S, and the run trains on them.
    filtered = ["--methods", "pu-filtered", "--seeds", "0", "--no_oracle", "--filter_fraction", "0.1"]
    paper_protocol.main([*argv[1:], *filtered, "--filter_args=--prior_folds 2 --prior_epochs 1"])
    record = json.loads((output_dir / "filtered" / "seed0" / "data" / "filter.json").read_text())
    assert record["unlabeled_kept"] == record["unlabeled_before"] - round(0.1 * record["unlabeled_before"])
    command = json.loads((output_dir / "runs" / "pu-filtered-seed0" / "benchmark_run.json").read_text())["command"]
    assert str(output_dir / "filtered" / "seed0" / "data" / "unlabeled") in command and "--label_column" not in command
    report = (output_dir / "results.md").read_text()
    assert "| pu-filtered | 0 |" in report
    audit = record["audit"]
    assert (
        f"seed 0: 0.100 of U, {audit['sensitive_dropped']} of its {audit['sensitive_in_unlabeled']} sensitive" in report
    )
    # Other flags: tests/test_audit_cases.py::test_3_... checks what is trained or evaluated again.


def test_runs_go_jobs_at_a_time_and_fine_tuning_waits_for_its_pretrained_models():
    args = paper_protocol.parse_args(["--protocol", "finetune", "--methods", "unsupervised", "pu", "--seeds", "0", "1"])
    runs = paper_protocol.planned_runs(args)
    lock, running, events = threading.Lock(), [0], []

    def train_and_score(run):
        with lock:
            running[0] += 1
            events.append(("start", run.name, running[0]))
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            events.append(("end", run.name, running[0]))
        return {"non_sensitive_rate": 0.5 + run.seed}

    paper_protocol.run_all(runs, 2, train_and_score)
    assert [run.metrics["non_sensitive_rate"] for run in runs] == [0.5] * 4 + [1.5] * 4
    starts = [event for event in events if event[0] == "start"]
    assert max(count for _, _, count in starts) == 2  # two at a time, never more
    last_pretrained_end = max(i for i, event in enumerate(events) if event[:2] == ("end", "pretrained"))
    first_other_start = min(i for i, event in enumerate(events) if event[0] == "start" and event[1] != "pretrained")
    assert last_pretrained_end < first_other_start


def test_a_failed_run_stops_the_runs_still_queued():
    runs = [paper_protocol.Run(f"run {number}", 0, "pu") for number in range(5)]
    started = []

    def train_and_score(run):
        started.append(run.name)
        if run.name == "run 0":
            sys.exit("failed")
        time.sleep(0.2)
        return {"non_sensitive_rate": 1.0}

    with pytest.raises(SystemExit, match="failed"):
        paper_protocol.run_all(runs, 2, train_and_score)
    assert len(started) <= 3  # run 0, run 1 beside it, perhaps run 2 taking run 0's place; never the rest


def test_parallel_runs_share_the_cores_unless_the_user_set_the_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(paper_protocol.os, "cpu_count", lambda: 8)
    assert paper_protocol.thread_environment(2)["OMP_NUM_THREADS"] == "4"
    assert paper_protocol.thread_environment(16)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in paper_protocol.thread_environment(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert paper_protocol.thread_environment(2)["OMP_NUM_THREADS"] == "3"
    with pytest.raises(SystemExit):
        paper_protocol.parse_args(["--jobs", "0"])


class ZeroPrediction(torch.nn.Module):
    def forward(self, noisy, timesteps):
        return argparse.Namespace(sample=torch.zeros_like(noisy))


def test_finetune_protocol_pretrains_once_per_seed_and_starts_every_row_from_it(tmp_path):
    args = paper_protocol.parse_args(
        ["--dataset", "shapes", "--protocol", "finetune", "--seeds", "3", "--output_dir", str(tmp_path)]
        + ["--max_train_steps", "7", "--pretrain_steps", "11", "--pu_args=--positive_risk_weight 1"]
    )
    runs = paper_protocol.planned_runs(args)
    assert [run.name for run in runs] == ["pretrained", "unsupervised", "supervised", "pu", "pu-paper", "oracle"]
    commands = {
        run.name: paper_protocol.training_command(run, args, "data/shapes", tmp_path / run.name) for run in runs
    }
    pretrained_folder = str(tmp_path / "runs" / "pretrained-seed3")
    assert "--pretrained_model_name_or_path" not in commands["pretrained"]
    assert commands["pretrained"][commands["pretrained"].index("--max_train_steps") + 1] == "11"
    for name in ("unsupervised", "supervised", "pu", "pu-paper", "oracle"):
        command = commands[name]
        assert command[command.index("--pretrained_model_name_or_path") + 1] == pretrained_folder
        assert command[command.index("--max_train_steps") + 1] == "7"
        assert command[command.index("--sensitive_labels") + 1 : command.index("--resolution")] == [
            "triangle", "star", "ring"
        ]  # fmt: skip
        assert command[command.index("--resolution") + 1] == "16"
    assert commands["pu"][commands["pu"].index("--positive_risk_weight") + 1] == "1"
    assert "--paper_loss" in commands["pu-paper"] and "--positive_risk_weight" not in commands["pu-paper"]
    assert commands["oracle"][commands["oracle"].index("--num_unlabeled_sensitive") + 1] == "0"


def test_the_label_split_sizes_go_to_every_method_and_the_oracle_keeps_no_sensitive_images(tmp_path):
    """U's true share is set through the split (issue: priors against the true share); the flags a run passes
    last are the ones argparse keeps."""
    args = paper_protocol.parse_args(
        ["--seeds", "0", "--output_dir", str(tmp_path), "--num_unlabeled_sensitive", "178"]
        + ["--num_labeled_sensitive", "71", "--priors", "0.4"]
    )
    runs = paper_protocol.planned_runs(args)

    def last_value(command: list[str], flag: str) -> str:
        return command[len(command) - 1 - command[::-1].index(flag) + 1]

    for run in runs:
        command = paper_protocol.training_command(run, args, "data/digits", tmp_path / "run")
        expected = "0" if run.name == "oracle" else "178"
        assert last_value(command, "--num_unlabeled_sensitive") == expected, run.name
        assert last_value(command, "--num_labeled_sensitive") == "71", run.name
    default = paper_protocol.parse_args(["--output_dir", str(tmp_path)])
    pu = next(run for run in paper_protocol.planned_runs(default) if run.name == "pu")
    assert "--num_unlabeled_sensitive" not in paper_protocol.training_command(pu, default, "data/digits", tmp_path)


def test_the_filtered_methods_train_on_their_seeds_filtered_data_made_once(tmp_path, monkeypatch):
    args = paper_protocol.parse_args(
        ["--dataset", "shapes", "--seeds", "1", "--output_dir", str(tmp_path), "--num_labeled_sensitive", "71"]
        + ["--methods", "unsupervised-filtered", "pu-filtered", "--filter_fraction", "estimate"]
    )
    runs = {run.name: run for run in paper_protocol.planned_runs(args)}
    assert set(runs) == {"unsupervised-filtered", "pu-filtered", "oracle"}
    data = tmp_path / "filtered" / "seed1" / "data"
    filter_command = paper_protocol.filter_command(args, "data/shapes", 1)
    assert filter_command[1] == "estimate_prior.py" and filter_command[filter_command.index("--seed") + 1] == "1"
    assert filter_command[filter_command.index("--num_labeled_sensitive") + 1] == "71"  # the methods' split
    assert filter_command[filter_command.index("--filter_fraction") + 1] == "estimate"
    assert filter_command[filter_command.index("--write_filtered_data") + 1] == str(data)
    for name, loss_type in (("unsupervised-filtered", "unsupervised"), ("pu-filtered", "pu")):
        command = paper_protocol.training_command(runs[name], args, "data/shapes", tmp_path / name)
        assert command[command.index("--dataset_name") + 1] == str(data / "unlabeled")
        assert command[command.index("--loss_type") + 1] == loss_type
        assert "--label_column" not in command and "--num_labeled_sensitive" not in command
        assert ("--sensitive_dataset_name" in command) == (loss_type == "pu")
    pu = paper_protocol.training_command(runs["pu-filtered"], args, "data/shapes", tmp_path)
    assert pu[pu.index("--sensitive_dataset_name") + 1] == str(data / "sensitive")

    launched = []

    def slow_filter(command, log, env=None):
        launched.append(command)
        log.parent.mkdir(parents=True, exist_ok=True)  # as the real one does
        time.sleep(0.2)  # long enough for the second thread to arrive while the first is writing

    monkeypatch.setattr(paper_protocol, "run_command", slow_filter)
    threads = [threading.Thread(target=paper_protocol.filter_once, args=(args, "data/shapes", 1)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert launched == [filter_command]  # one write for the seed's two methods
    paper_protocol.filter_once(args, "data/shapes", 1)
    assert len(launched) == 1  # made by the same command: reused
    args.filter_fraction = "high"
    paper_protocol.filter_once(args, "data/shapes", 1)
    assert len(launched) == 2  # another rule: written again


def test_a_dataset_of_ones_own_needs_its_labels_and_size():
    with pytest.raises(SystemExit):
        paper_protocol.parse_args(["--dataset", "some/folder"])
    args = paper_protocol.parse_args(["--dataset", "some/folder", "--sensitive_labels", "cat", "--resolution", "32"])
    assert args.sensitive_labels == ["cat"] and args.output_dir.endswith("benchmark-folder")


def test_loss_by_noise_level_matches_the_squared_noise_of_a_zero_prediction():
    """With a model that predicts zeros, l(x) of Eq. (8) is the summed squared noise of each draw."""
    from diffusers import DDPMScheduler

    images = torch.rand(5, 1, 8, 8) * 2 - 1
    value = loss_by_noise.mean_loss(ZeroPrediction(), DDPMScheduler(), images, (0, 100), draws=3, seed=7)
    generator = torch.Generator().manual_seed(7)
    expected = []
    for _ in range(3):
        noise = torch.randn(images.shape, generator=generator)
        torch.randint(0, 100, (5,), generator=generator)
        expected.append((noise**2).sum(dim=(1, 2, 3)))
    assert value == pytest.approx(torch.cat(expected).mean().item(), rel=1e-6)


def test_loss_by_noise_level_table_covers_every_group_of_the_label_split(digits_dir, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    DDPMPipeline(unet=UNet2DModel(**tiny_unet_kwargs()), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "m")
    lines = loss_by_noise.main([f"tiny={tmp_path / 'm'}", "--data_dir", str(digits_dir), "--draws", "1"])
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[1] for row in rows] == [
        "U normal (713)", "U sensitive (71)", "S (71)", "test normal (178)", "test sensitive (182)",
    ]  # fmt: skip
    assert all(float(cell.strip(" |")) > 0 for row in rows for cell in row[2:])


def test_loss_by_noise_reads_an_rgb_dataset_with_the_sensitive_labels_it_is_given(tmp_path):
    """The shapes' split: the groups hold exactly the images of the given labels, in RGB, in [-1, 1]."""
    import numpy as np
    from datasets import load_dataset
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from pu_diffusion.shapes import SENSITIVE_SHAPES, SHAPES, write_shapes_dataset

    write_shapes_dataset(tmp_path / "shapes", resolution=8, images_per_class=10, test_fraction=0.2, seed=1)
    labels = list(SENSITIVE_SHAPES)
    groups = loss_by_noise.label_groups(str(tmp_path / "shapes"), 0, labels, None, {})
    test = load_dataset(str(tmp_path / "shapes"))["test"]
    sensitive = [row["image"] for row in test if SHAPES[row["label"]] in labels]
    expected = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image in sensitive]))
    assert torch.equal(groups["test sensitive"], expected.permute(0, 3, 1, 2) / 127.5 - 1.0)
    assert groups["test normal"].shape == (6, 3, 8, 8) and len(groups["U normal"]) == 24

    unet = UNet2DModel(**tiny_unet_kwargs(channels=3))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "m")
    argv = [f"tiny={tmp_path / 'm'}", "--data_dir", str(tmp_path / "shapes"), "--draws", "1", "--sensitive_labels"]
    rows = [line.split(" | ") for line in loss_by_noise.main(argv + labels)[2:]]
    assert [row[1] for row in rows][3:] == ["test normal (6)", "test sensitive (6)"]
    assert all(float(cell.strip(" |")) > 0 for row in rows for cell in row[2:])


@pytest.fixture
def step_configurations_in_this_process(monkeypatch) -> list:
    """text_to_image_step.py's configurations run in this process, Accelerate's state reset after each, as a
    new process would start without it; the list collects each one's (mixed precision, latents)."""
    import contextlib
    import io

    import text_to_image_step

    launch = subprocess.run
    configurations = []

    def in_this_process(command, **kwargs):
        if command[:2] != [sys.executable, text_to_image_step.__file__]:
            return launch(command, **kwargs)
        configurations.append(command[-2:])
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                text_to_image_step.main(command[2:])
        finally:
            reset_accelerate_state()
        return subprocess.CompletedProcess(command, 0, printed.getvalue(), "")

    monkeypatch.setattr(subprocess, "run", in_this_process)
    return configurations


def test_text_to_image_step_benchmark_reports_each_mixed_precision_mode_and_latent_source(
    step_configurations_in_this_process,
):
    """One row per (mode, latents), counting exactly the LoRA parameters the script trains."""
    import text_to_image_step

    from pu_diffusion.lora import add_lora

    argv = ["--model", "tiny", "--resolution", "32", "--mixed_precision", "no", "bf16", "--steps", "2"]
    report = text_to_image_step.main([*argv, "--warmup", "1", "--gradient_checkpointing"])
    configurations = step_configurations_in_this_process
    assert configurations == [["no", "encoded"], ["no", "cached"], ["bf16", "encoded"], ["bf16", "cached"]]
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith(("| no ", "| bf16 "))]
    assert [(row[0], row[1]) for row in rows] == [
        ("| no", "encoded"), ("| no", "cached"), ("| bf16", "encoded"), ("| bf16", "cached")
    ]  # fmt: skip
    unet = text_to_image_step.build_models("tiny")[0]
    add_lora(unet, rank=4)
    lora_parameters = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert all(row[2].startswith(f"{lora_parameters:,} / ") for row in rows)
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)  # ms/step, images/s
    assert "gradient checkpointing on" in report


def test_text_to_image_step_benchmark_times_an_sd3_transformer_on_its_text_state_table(
    step_configurations_in_this_process,
):
    """SD3: the transformer's LoRA on the SD3 script's layers, its text states from the table (no encoder)."""
    import text_to_image_step

    from pu_diffusion.lora import SD3_LORA_LAYERS, add_lora

    argv = ["--model", "tiny-sd3", "--resolution", "32", "--mixed_precision", "no", "bf16", "--latents", "cached"]
    report = text_to_image_step.main([*argv, "--steps", "1", "--warmup", "0"])
    assert step_configurations_in_this_process == [["no", "cached"], ["bf16", "cached"]]
    transformer = text_to_image_step.build_sd3_models("tiny-sd3")[0]
    add_lora(transformer, rank=4, layers=SD3_LORA_LAYERS)
    lora_parameters = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith(("| no ", "| bf16 "))]
    assert len(rows) == 2 and all(row[2].startswith(f"{lora_parameters:,} / ") for row in rows)
    assert report.startswith("tiny-sd3, 32 px, LoRA rank 4")


def test_prior_accuracy_reports_each_delta_from_cached_scores(digits_dir, tmp_path, capsys):
    import numpy as np
    import prior_accuracy

    from pu_diffusion.prior import MAX_INTERVAL_WIDTH, best_bin_estimate, bootstrap_interval

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir)
    rng = np.random.default_rng(0)
    sensitive = rng.uniform(0.4, 1.0, 300)
    unlabeled = np.concatenate([rng.uniform(0.4, 1.0, 100), rng.uniform(0.0, 0.6, 900)])
    (tmp_path / "out" / "scores").mkdir(parents=True)
    np.savez(tmp_path / "out" / "scores" / "digits-0.1-0-s300.npz", s=sensitive, u=unlabeled, true=0.1)
    prior_accuracy.main(
        ["--datasets", "digits", "--shares", "0.1", "--seeds", "0", "--deltas", "0.1", "0.02"]
        + ["--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
        + ["--num_labeled_sensitive", "300"]
    )
    printed = capsys.readouterr().out
    for delta in (0.1, 0.02):
        estimate = best_bin_estimate(sensitive, unlabeled, delta)
        low, high = bootstrap_interval(sensitive, unlabeled, delta=delta)
        covered = int(low <= 0.1 <= high)
        refused = int(high - low > MAX_INTERVAL_WIDTH or estimate in (0.0, 1.0))
        assert (
            f"| digits | 300 | 0.100 | {delta:g} | 1 | {estimate:.3f} | {abs(estimate - 0.1):.3f} | {covered}/1 |"
            f" {high - low:.3f} | {refused}/1 |" in printed
        )
