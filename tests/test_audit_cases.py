"""The cases an outside audit found ending in a silent wrong result, lost data, a hang or a raw traceback,
one test (or more) each, numbered as in the audit; docs/reliability.md lists them."""

import argparse
import errno
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paper_protocol  # benchmarks/, on pytest's pythonpath
import pytest
import torch
from PIL import Image

import estimate_prior
import evaluate
import prepare_shapes
from pu_diffusion.classifier import check_classifier_quality, classifier_problems
from pu_diffusion.errors import InputError, OutputError
from pu_diffusion.lora import LORA_WEIGHTS, add_lora, lora_state_dict, write_lora
from pu_diffusion.outputs import save_outputs_atomically
from pu_diffusion.pipelines import load_text_to_image_pipeline
from pu_diffusion.prior import PriorEstimate, check_sizes, check_usable, cross_fitted_scores
from pu_diffusion.run_setup import RunPlan, check_plan, settle_prior, tracker_config
from tests.helpers import UNCONDITIONAL, assert_ok, run_script, tiny_run_args, write_image_folder
from tests.loss_flags import default_loss_flags

# --------------------------------------------------------------------------- 1, 3, 5: LoRA files


def write_lora_file(pipeline_dir: Path, folder: Path, dropout: float, layers=("to_q", "to_v"), dora=False) -> Path:
    """A LoRA with non-zero weights, its metadata carrying ``dropout`` as files written before the fix did."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    add_lora(unet, rank=4, dropout=dropout, layers=list(layers), use_dora=dora)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    state = lora_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )
    return folder


def generate_twice(pipeline) -> list[np.ndarray]:
    return [
        pipeline(
            "a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images
        for _ in range(2)
    ]


def loading_flags(pipeline, lora) -> argparse.Namespace:
    """What load_text_to_image_pipeline reads: the pipeline and its LoRA."""
    return argparse.Namespace(pipeline=str(pipeline), lora=str(lora), max_sequence_length=None)


def test_1_a_lora_with_dropout_gives_the_same_images_for_the_same_seed_in_evaluate(tiny_sd_pipeline, tmp_path):
    lora = write_lora_file(tiny_sd_pipeline, tmp_path / "lora", dropout=0.5)
    pipeline = load_text_to_image_pipeline(loading_flags(tiny_sd_pipeline, lora), "cpu", torch.float32)
    first, second = generate_twice(pipeline)
    assert np.array_equal(first, second)


def test_1_the_saved_lora_file_carries_no_dropout(tiny_sd_pipeline, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_pipeline, subfolder="unet")
    add_lora(unet, rank=4, dropout=0.3)
    write_lora(tmp_path, unet, lora_state_dict(unet))
    with safe_open(tmp_path / LORA_WEIGHTS, "pt") as saved:
        metadata = json.loads(saved.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_dropout"] == 0.0 and metadata["unet.r"] == 4
    assert unet.peft_config["default"].lora_dropout == 0.3  # training keeps its dropout


@pytest.mark.parametrize("dora", [False, True])
def test_3_a_lora_that_loads_in_full_is_accepted(tiny_sd_pipeline, tmp_path, dora):
    lora = write_lora_file(tiny_sd_pipeline, tmp_path / "lora", dropout=0.0, dora=dora)
    pipeline = load_text_to_image_pipeline(loading_flags(tiny_sd_pipeline, lora), "cpu", torch.float32)
    assert pipeline.unet.peft_config and all(not module.training for module in pipeline.unet.modules())


def test_3_a_lora_that_loads_only_in_part_is_refused(tiny_sd_pipeline, tmp_path):
    from safetensors.torch import load_file, save_file

    lora = write_lora_file(tiny_sd_pipeline, tmp_path / "lora", dropout=0.0)
    weights = load_file(lora / LORA_WEIGHTS)
    renamed = {(key.replace("to_v", "to_vv") if "up_blocks" in key else key): value for key, value in weights.items()}
    save_file(renamed, lora / LORA_WEIGHTS)
    with pytest.raises(InputError, match=r"--lora .*: only \d+ of its \d+ LoRA weights fit"):
        load_text_to_image_pipeline(loading_flags(tiny_sd_pipeline, lora), "cpu", torch.float32)


def test_3_a_lora_for_another_base_is_a_lora_error(tiny_sd_pipeline, tmp_path):
    from safetensors.torch import load_file, save_file

    lora = write_lora_file(tiny_sd_pipeline, tmp_path / "lora", dropout=0.0)
    weights = load_file(lora / LORA_WEIGHTS)
    save_file({key: torch.zeros(value.shape[0] + 3, 2) for key, value in weights.items()}, lora / LORA_WEIGHTS)
    with pytest.raises(InputError, match="--lora .*no LoRA weights this pipeline can load"):
        load_text_to_image_pipeline(loading_flags(tiny_sd_pipeline, lora), "cpu", torch.float32)


def test_5_every_lora_layer_name_must_match(tiny_sd_pipeline):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_pipeline, subfolder="unet")
    with pytest.raises(InputError, match="--lora_layers to_k,to_qq: to_qq names no module"):
        add_lora(unet, rank=4, layers=["to_k", "to_qq"])
    add_lora(unet, rank=4, layers=["to_k", "to_q"])
    assert set(unet.peft_config["default"].target_modules) == {"to_k", "to_q"}


# --------------------------------------------------------------------------- 2: --prior auto


def estimate(value: float, low: float, high: float) -> PriorEstimate:
    return PriorEstimate(value, low, high, 0.9, "BBE", "pixels at 8 px", 500, 100, 5)


@pytest.mark.parametrize(
    ("found", "reason"),
    [
        (estimate(0.0, 0.0, 0.01), "the estimate is 0: nothing in U scored like S"),
        (estimate(1.0, 0.95, 1.0), "the estimate is 1: the classifier could not tell S from U"),
        (estimate(0.503, 0.18, 0.84), "interval [0.180, 0.840] is 0.66 wide"),
    ],
)
def test_2_an_estimate_that_cannot_be_trained_with_is_refused_before_training(found, reason):
    with pytest.raises(InputError, match="Give the share yourself with --prior") as refused:
        check_usable(found)
    assert reason in str(refused.value)
    check_usable(estimate(0.11, 0.08, 0.14))  # an ordinary estimate passes


class OneProcess:
    num_processes, is_main_process = 1, True


def test_2_settle_prior_refuses_and_every_process_estimates(tmp_path):
    args = argparse.Namespace(
        prior="auto",
        loss_type="pu",
        resume_from_checkpoint=None,
        output_dir=str(tmp_path),
        prior_max_interval_width=0.2,
    )
    calls = []

    def estimate_once():
        calls.append(1)
        return estimate(1.0, 0.9, 1.0)

    class OtherRank:
        num_processes, is_main_process = 1, False  # one process, but not the main one: it estimates too

    with pytest.raises(InputError, match="--prior auto: 1.0000 cannot be trained with"):
        settle_prior(OtherRank(), args, estimate_once)
    assert calls == [1] and not (tmp_path / "prior.json").exists()


def test_2_too_small_an_s_is_refused_before_anything_loads(digits_dir, tmp_path):
    argv = tiny_run_args(digits_dir, "unused", tmp_path / "out", "--prior", "auto", "--num_labeled_sensitive", "10")
    import train_pu_unconditional

    with pytest.raises(SystemExit):
        train_pu_unconditional.parse_args(list(map(str, argv)))
    with pytest.raises(InputError, match="the estimate needs at least 50 in each"):
        check_sizes(440, 10, 5)


def separable_folders(root: Path) -> tuple[Path, Path]:
    """U: dark noise; S: bright noise. A classifier tells them apart at once, so nothing in U scores like S."""
    rng = np.random.default_rng(0)
    for name, low in (("u", 0), ("s", 200)):
        (root / name).mkdir(parents=True)
        for index in range(60):
            pixels = rng.integers(low, low + 40, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    return root / "u", root / "s"


def test_2_prior_auto_on_separable_data_stops_with_a_message_not_a_traceback(tiny_unet_config, tmp_path):
    unlabeled, sensitive = separable_folders(tmp_path)
    output_dir = tmp_path / "out"
    result = run_script(
        UNCONDITIONAL, "--train_data_dir", unlabeled, "--sensitive_data_dir", sensitive, "--resolution", "8",
        "--model_config_name_or_path", tiny_unet_config, "--prior", "auto", "--prior_folds", "2",
        "--prior_epochs", "3", "--max_train_steps", "2", "--output_dir", output_dir, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "error: --prior auto: 0.0000 cannot be trained with: the estimate is 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(output_dir.glob("checkpoint-*")) and not (output_dir / "model_index.json").exists()


# --------------------------------------------------------------------------- 3: evaluation's judges and reuse


def classifier_record(accuracy: float, predicted=None) -> dict:
    labels = [str(digit) for digit in range(10)]
    record = {"test_accuracy": accuracy, "labels": labels}
    if predicted is not None:
        predicted_counts = dict(zip(labels, predicted, strict=True))
        record.update(test_predicted_counts=predicted_counts, test_true_counts=dict.fromkeys(labels, 36))
    return record


def test_3_a_classifier_near_chance_is_refused_unless_allowed(tmp_path, caplog):
    (tmp_path / "classifier_metrics.json").write_text(json.dumps(classifier_record(0.108)))
    with pytest.raises(InputError, match=r"test accuracy 0.108 over 10 classes \(chance 0.100"):
        check_classifier_quality(str(tmp_path), allow_weak=False)
    check_classifier_quality(str(tmp_path), allow_weak=True)
    assert "scoring anyway: --allow_weak_classifier" in caplog.text
    argv = ["unconditional", "--pipeline", "p", "--classifier", str(tmp_path), "--sensitive_labels", "1"]
    with pytest.raises(SystemExit):
        evaluate.parse_args([*argv, "--num_samples", "4", "--fid_features", "none", "--output_dir", str(tmp_path)])


def test_3_a_classifier_that_never_predicts_a_class_is_refused():
    problems = classifier_problems(classifier_record(0.9, predicted=[36] * 9 + [2]))
    assert problems == ["it almost never predicts 9 on its test images"]
    assert classifier_problems(classifier_record(0.9, predicted=[36] * 10)) == []


def test_3_the_benchmark_evaluates_again_when_an_evaluation_flag_changes(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, log, env=None):
        commands.append(command[1])
        output = Path(command[command.index("--output_dir") + 1])
        output.mkdir(parents=True, exist_ok=True)
        if command[1] == "train_pu_unconditional.py":
            (output / "model_index.json").write_text("{}")
        elif command[2] == "train-classifier":
            (output / "classifier_metrics.json").write_text(json.dumps({"test_accuracy": 0.9, "epochs": command}))
        else:
            (output / "metrics.json").write_text(json.dumps({"non_sensitive_rate": 0.5, "samples": command}))

    monkeypatch.setattr(paper_protocol, "run_command", fake_run)
    base = ["--quick", "--output_dir", str(tmp_path), "--data_dir", str(tmp_path)]
    (tmp_path / "data").mkdir()

    def benchmark(*extra):
        args = paper_protocol.parse_args([*base, *extra])
        data, classifier = paper_protocol.prepare(tmp_path, args)
        run = paper_protocol.planned_runs(args)[0]
        return paper_protocol.train_and_evaluate(run, args, data, classifier)

    first = benchmark("--num_samples", "16")
    assert commands == ["evaluate.py", "train_pu_unconditional.py", "evaluate.py"]
    assert benchmark("--num_samples", "16") == first and len(commands) == 3  # all reused
    again = benchmark("--num_samples", "32")
    assert commands[3:] == ["evaluate.py"] and "32" in again["samples"]  # evaluated again, not retrained
    benchmark("--num_samples", "32", "--classifier_epochs", "2")
    assert commands[4:] == ["evaluate.py", "evaluate.py"]  # a new classifier, so a new evaluation
    benchmark("--num_samples", "32", "--classifier_epochs", "2", "--max_train_steps", "5")
    assert commands[6:] == ["train_pu_unconditional.py", "evaluate.py"]  # other training flags: trained again
    recorded = json.loads((tmp_path / "runs" / "unsupervised-seed0" / "benchmark_run.json").read_text())["command"]
    assert recorded[recorded.index("--max_train_steps") + 1] == "5"


# --------------------------------------------------------------------------- 4, 6: the data and the plan


def test_4_a_resume_on_changed_data_is_refused(tiny_unet_config, tmp_path):
    unlabeled = write_image_folder(tmp_path / "u", 16)
    sensitive = write_image_folder(tmp_path / "s", 4, seed=1)
    output_dir = tmp_path / "out"
    args = ["--train_data_dir", unlabeled, "--sensitive_data_dir", sensitive, "--resolution", "8"]
    args += ["--model_config_name_or_path", tiny_unet_config, "--train_batch_size", "4", "--sensitive_batch_size", "2"]
    args += ["--checkpointing_steps", "2", "--seed", "0", "--output_dir", output_dir]
    args += ["--save_images_epochs", "1000", "--save_model_epochs", "1000"]
    assert_ok(run_script(UNCONDITIONAL, *args, "--max_train_steps", "2"))
    saved = json.loads((output_dir / "checkpoint-2" / "training_config.json").read_text())
    assert saved["data_fingerprint"]["U"]["images"] == 16 and saved["data_fingerprint"]["S"]["images"] == 4

    write_image_folder(tmp_path / "extra", 1, seed=5)
    (tmp_path / "extra" / "000.png").rename(unlabeled / "new.png")
    resumed = run_script(UNCONDITIONAL, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 1
    assert "the data is not what the checkpoint was trained on (U: 16 images then, 17 now)" in resumed.stderr
    assert not (output_dir / "checkpoint-4").exists()


def test_4_the_same_data_gives_the_same_fingerprint_and_a_replaced_file_another(tmp_path):
    import datasets

    from pu_diffusion.training_data import data_fingerprint

    folder = write_image_folder(tmp_path / "u", 6)
    load = lambda: datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")  # noqa: E731
    first = data_fingerprint(load(), None, "image")
    assert first == data_fingerprint(load(), None, "image") and first["U"]["images"] == 6
    Image.new("L", (9, 9)).save(folder / "003.png")  # same name, other content and size
    assert data_fingerprint(load(), None, "image")["U"]["hash"] != first["U"]["hash"]


def test_6_processes_that_disagree_on_the_plan_stop_naming_what_differs(monkeypatch):
    import accelerate.utils

    args = argparse.Namespace(resume_from_checkpoint=None)
    plan = RunPlan(0, 100, 10, 2, 1e-4, 13, 50, 4, 0.1, data_fingerprint={"U": {"images": 100}})
    other = RunPlan(0, 120, 10, 2, 1e-4, 15, 50, 4, 0.1, data_fingerprint={"U": {"images": 120}})

    class TwoProcesses:
        num_processes = 2

    from dataclasses import asdict

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: [asdict(plan), asdict(other)])
    with pytest.raises(InputError, match="the 2 processes disagree on data_fingerprint, num_unlabeled_images"):
        check_plan(TwoProcesses(), args, plan)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: [asdict(plan), asdict(plan)])
    check_plan(TwoProcesses(), args, plan)  # the same plan everywhere passes


# --------------------------------------------------------------------------- 7, 8: data and outputs kept whole


def test_7_a_dataset_folder_is_not_silently_replaced(tmp_path, capsys):
    folder = tmp_path / "shapes"
    small = ["--output_dir", str(folder), "--images_per_class", "2"]
    prepare_shapes.main(small)
    written = (folder / "data" / "train-00000-of-00001.parquet").read_bytes()
    prepare_shapes.main(small)
    assert "it already holds this dataset" in capsys.readouterr().out
    with pytest.raises(InputError, match="already holds a dataset written with other settings; pass --overwrite"):
        prepare_shapes.main([*small, "--resolution", "8"])
    assert (folder / "data" / "train-00000-of-00001.parquet").read_bytes() == written
    prepare_shapes.main([*small, "--resolution", "8", "--overwrite"])
    assert json.loads((folder / "dataset_settings.json").read_text())["resolution"] == 8
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files"):
        prepare_shapes.main(["--output_dir", str(tmp_path / "mine"), "--overwrite"])
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("IoError(Os { code: 28, kind: StorageFull })")],
)
def test_8_a_full_disk_during_a_save_keeps_the_old_outputs_together_and_says_so(tmp_path, failure):
    def save(samples: str, fail: bool):
        def write(folder):
            (folder / "model_index.json").write_text(samples)
            Image.new("L", (4, 4), color=len(samples)).save(folder / "samples.png")
            if fail:
                raise failure

        save_outputs_atomically(str(tmp_path), write)

    save("old", fail=False)
    with pytest.raises(OutputError, match=f"no space left on device: the model could not be written in {tmp_path}"):
        save("newer", fail=True)
    assert (tmp_path / "model_index.json").read_text() == "old"
    assert Image.open(tmp_path / "samples.png").getpixel((0, 0)) == 3  # the old model's samples
    assert not list(tmp_path.glob(".tmp-*"))


def test_8_a_full_disk_during_a_checkpoint_names_the_folder_and_keeps_the_last_checkpoint(tmp_path):
    from pu_diffusion.checkpoints import save_checkpoint

    (tmp_path / "checkpoint-2").mkdir()

    class FullDisk:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            Path(folder).mkdir()
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: os error 28")

    args = argparse.Namespace(output_dir=str(tmp_path), checkpoints_total_limit=1)
    with pytest.raises(OutputError, match=f"no space left on device: checkpoint-4 could not be written in {tmp_path}"):
        save_checkpoint(FullDisk(), args, 4, {})
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.startswith(".")) == ["checkpoint-2"]


def test_8_a_save_without_new_samples_removes_the_old_ones(tmp_path):
    save_outputs_atomically(str(tmp_path), lambda f: Image.new("L", (2, 2)).save(f / "samples.png"))
    save_outputs_atomically(str(tmp_path), lambda f: (f / "model_index.json").write_text("{}"))
    assert not (tmp_path / "samples.png").exists()  # they showed another model


# --------------------------------------------------------------------------- 9: Ctrl-C stops the benchmark


def test_9_an_interrupted_run_stops_the_benchmark_and_nothing_queued_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_protocol, "STOPPING", threading.Event())
    started = []

    def train_and_score(run):
        started.append(run.seed)
        # SIG_DFL first: a shell that starts pytest in the background has it ignore SIGINT, and children inherit that.
        interrupt = (
            "import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGINT)"
        )
        interrupted = [sys.executable, "-c", interrupt]
        paper_protocol.run_command(interrupted, tmp_path / f"{run.seed}.log")
        return {"non_sensitive_rate": 1.0}

    runs = [paper_protocol.Run("pu", seed, "pu") for seed in range(3)]
    with pytest.raises(paper_protocol.Stopped):
        paper_protocol.run_all(runs, 1, train_and_score)
    assert started[0] == 0
    assert sorted(path.name for path in tmp_path.glob("*.log")) == ["0.log"]  # no other run launched a process
    with pytest.raises(paper_protocol.Stopped, match="not started"):
        paper_protocol.run_command([sys.executable, "-c", "pass"], tmp_path / "after.log")


def test_9_ctrl_c_to_the_benchmark_process_exits_130_without_starting_another_run(tmp_path):
    # A benchmark whose runs are slow stand-ins: a SIGINT to the benchmark must end it, not start the next run.
    script = tmp_path / "slow_benchmark.py"
    script.write_text(
        "import sys, signal, time\n"
        f"sys.path.insert(0, {str(Path(paper_protocol.__file__).parent)!r})\n"
        "import paper_protocol as p\n"
        "def train(run):\n"
        "    print('start', run.seed, flush=True)\n"
        "    sleep = 'import signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); time.sleep(30)'\n"
        "    p.run_command([sys.executable, '-c', sleep], p.Path(sys.argv[1]) / 'log')\n"
        "    return {'non_sensitive_rate': 1.0}\n"
        "signal.signal(signal.SIGTERM, signal.default_int_handler)\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal\n"
        "try:\n"
        "    p.run_all([p.Run('pu', s, 'pu') for s in range(3)], 1, train)\n"
        "except (KeyboardInterrupt, p.Stopped):\n"
        "    p.stop_running_steps(); sys.exit(130)\n"
    )
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not process.stdout.readline().startswith("start 0"):
        pass
    time.sleep(0.5)  # the run's stand-in is started
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "start 1" not in stdout


# --------------------------------------------------------------------------- 10: what a push publishes


def test_10_tracker_config_names_local_folders_by_their_name_only(tmp_path):
    secret = tmp_path / "private" / "sensitive-set"
    secret.mkdir(parents=True)
    args = argparse.Namespace(sensitive_data_dir=str(secret), dataset_name="user/data", hub_token="t", rank=4)
    plan = RunPlan(0, 1, 1, 1, 1e-4, 1, 1, 1, 0.1)
    config = tracker_config(args, plan)
    assert config["sensitive_data_dir"] == "sensitive-set (a local folder)"
    assert config["dataset_name"] == "user/data" and "hub_token" not in config
    assert str(tmp_path) not in json.dumps(config)


# --------------------------------------------------------------------------- 11: messages, not tracebacks


@pytest.mark.parametrize(
    ("parse", "argv", "flag"),
    [
        (paper_protocol.parse_args, ["--priors", "nan"], "--priors"),
        (paper_protocol.parse_args, ["--num_samples", "0"], "--num_samples"),
        (paper_protocol.parse_args, ["--jobs", "0"], "--jobs"),
        (estimate_prior.parse_args, ["--train_data_dir", "u", "--sensitive_data_dir", "s", "--prior_folds", "1"],
         "--prior_folds"),
        (prepare_shapes.parse_args, ["--test_fraction", "nan"], "--test_fraction"),
    ],
)  # fmt: skip
def test_11_numbers_out_of_range_are_refused_naming_the_flag(parse, argv, flag, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert f"argument {flag}" in capsys.readouterr().err


def test_11_other_scripts_flags_have_ranges_and_choices(capsys):
    import prior_accuracy
    import text_to_image_step

    import make_text_to_image_data
    import prepare_digits
    import train_pu_unconditional

    cases = [
        (prepare_digits.parse_args, ["--test_fraction", "1.5"], "--test_fraction"),
        (prior_accuracy.parse_args, ["--shares", "nan"], "--shares"),
        (text_to_image_step.parse_args, ["--model", "tiny", "--steps", "0"], "--steps"),
        (make_text_to_image_data.parse_args, ["--pipeline", "p", "--prompt", "x", "--output_dir", "o",
                                              "--guidance_scale", "nan"], "--guidance_scale"),
        (train_pu_unconditional.parse_args, ["--train_data_dir", "u", "--loss_type", "unsupervised",
                                             "--output_dir", "o", "--ddpm_beta_schedule", "cosine"],
         "--ddpm_beta_schedule"),
    ]  # fmt: skip
    for parse, argv, flag in cases:
        with pytest.raises(SystemExit):
            parse(argv)
        assert f"argument {flag}" in capsys.readouterr().err


def test_11_an_output_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        estimate_prior.parse_args(
            ["--train_data_dir", "u", "--sensitive_data_dir", "s", "--output_dir", f"{blocker}/x"]
        )
    assert "--output_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(
            [
                "text-to-image",
                "--pipeline",
                "p",
                "--prompt",
                "x",
                "--clip_model",
                "c",
                "--normal_text",
                "n",
                "--sensitive_text",
                "s",
                "--output_dir",
                str(blocker / "x"),
            ]
        )
    assert "is a file, so the folder cannot be made" in capsys.readouterr().err


def test_11_a_prompt_file_in_another_encoding_is_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("une photo d'un ch\xe2teau\n".encode("latin-1"))
    argv = ["text-to-image", "--pipeline", "p", "--prompt_file", str(prompts), "--clip_model", "c"]
    with pytest.raises(SystemExit):
        evaluate.parse_args([*argv, "--normal_text", "n", "--sensitive_text", "s", "--output_dir", str(tmp_path)])
    assert f"--prompt_file: {prompts} is not UTF-8 text" in capsys.readouterr().err


# --------------------------------------------------------------------------- smaller items


@pytest.mark.parametrize("extra", [{"loss_reduction": "mean"}, {"snr_gamma": 5.0}])
def test_paper_loss_with_options_the_paper_does_not_have_is_refused(extra):
    with pytest.raises(InputError, match="--paper_loss is the paper's loss as written"):
        default_loss_flags(paper_loss=True, **extra)


def test_the_prior_estimator_trains_on_the_device_it_is_given():
    images = torch.randn(20, 1, 8, 8)
    on_cpu = cross_fitted_scores(images[:10], images[10:], folds=2, epochs=1, device=torch.device("cpu"))
    default = cross_fitted_scores(images[:10], images[10:], folds=2, epochs=1)
    assert all(np.array_equal(a, b) for a, b in zip(on_cpu, default, strict=True))
