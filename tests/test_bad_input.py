"""Bad input: a clear error naming the flag, a non-zero exit, before training, and no model written."""

import pytest

import train_pu_unconditional
from tests.helpers import refusal, run_script, write_image_folder

SCRIPT = "train_pu_unconditional.py"
ODD = ["1", "3", "5", "7", "9"]


def label_split_args(digits_dir, *extra):
    return [
        "--dataset_name",
        digits_dir,
        "--label_column",
        "label",
        "--resolution",
        "8",
        "--max_train_steps",
        "1",
        *extra,
    ]


CASES = {
    "no S for pu": (lambda d, t: ["--dataset_name", d, "--resolution", "8"], "--sensitive_dataset_name"),
    "no S for supervised": (
        lambda d, t: ["--dataset_name", d, "--loss_type", "supervised"],
        "--loss_type supervised needs",
    ),
    "S folder missing": (
        lambda d, t: ["--dataset_name", d, "--sensitive_data_dir", t / "missing"],
        "--sensitive_data_dir",
    ),
    "S folder empty": (lambda d, t: ["--dataset_name", d, "--sensitive_data_dir", t / "empty"], "holds no files"),
    "label absent": (lambda d, t: label_split_args(d, "--sensitive_labels", "1", "11"), "--sensitive_labels"),
    "too many normal": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--num_unlabeled_normal", "100000"),
        "--num_unlabeled_normal",
    ),
    "too many sensitive": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--num_labeled_sensitive", "100000"),
        "--num_labeled_sensitive",
    ),
    "no S drawn": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--num_labeled_sensitive", "0"),
        "--num_labeled_sensitive",
    ),
    "label column absent": (
        lambda d, t: ["--dataset_name", d, "--label_column", "digit", "--sensitive_labels", "1"],
        "--label_column",
    ),
    "image column absent": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--image_column", "img"),
        "--image_column",
    ),
    "prior zero": (lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--prior", "0"), "--prior"),
    "prior one": (lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--prior", "1.0"), "--prior"),
    "filter without S": (
        lambda d, t: ["--dataset_name", d, "--loss_type", "unsupervised", "--filter_unlabeled", "high"],
        "--filter_unlabeled needs labeled sensitive data S",
    ),
    "filter with too small an S": (
        lambda d, t: label_split_args(
            d, "--sensitive_labels", *ODD, "--num_labeled_sensitive", "20", "--filter_unlabeled", "0.1"
        ),
        "--filter_unlabeled with --num_labeled_sensitive 20: scoring U needs at least 50 images in S",
    ),  # fmt: skip
    "filter share one": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--filter_unlabeled", "1"),
        "--filter_unlabeled",
    ),
    "sensitive batch zero": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--sensitive_batch_size", "0"),
        "--sensitive_batch_size",
    ),
    "positive risk weight negative": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--positive_risk_weight", "-1"),
        "--positive_risk_weight",
    ),
    "sensitive min timestep negative": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--sensitive_min_timestep", "-1"),
        "--sensitive_min_timestep",
    ),
    "sensitive min timestep past the schedule": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--sensitive_min_timestep", "1000"),
        "--sensitive_min_timestep 1000: the noise schedule has timesteps 0 to 999",
    ),
    "counts without labels": (
        lambda d, t: ["--dataset_name", d, "--num_unlabeled_normal", "5", "--loss_type", "unsupervised"],
        "need --label_column",
    ),
    "U folder missing": (
        lambda d, t: ["--train_data_dir", t / "missing", "--sensitive_data_dir", t / "s"],
        "--train_data_dir",
    ),
    "U folder empty": (
        lambda d, t: ["--train_data_dir", t / "empty", "--sensitive_data_dir", t / "s"],
        "holds no files",
    ),
    "no U": (lambda d, t: ["--sensitive_data_dir", t / "s"], "--dataset_name or --train_data_dir"),
    "unknown prediction type": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--prediction_type", "x0"),
        "--prediction_type",
    ),
    "image column holds no images": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--image_column", "label"),
        "--image_column 'label'",
    ),
    "epochs zero": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--num_train_epochs", "0"),
        "argument --num_train_epochs/--num_epochs: must be >= 1, got 0",
    ),
    "epochs negative": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--num_epochs", "-1"),
        "argument --num_train_epochs/--num_epochs: must be >= 1, got -1",
    ),
    "learning rate negative": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--learning_rate=-0.001"),
        "argument --learning_rate: must be > 0, got -0.001",
    ),
    "adam beta one": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--adam_beta2", "1"),
        "argument --adam_beta2: must be >= 0 and < 1, got 1",
    ),
    "grad norm zero": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--max_grad_norm", "0"),
        "argument --max_grad_norm: must be > 0, got 0",
    ),
    "prior not a number": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--prior", "nan"),
        "argument --prior: must be > 0 and < 1, got nan",
    ),
    "resolution of MNIST for the default UNet": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--resolution", "28"),
        "--resolution 28: the UNet halves its input 3 times, so the resolution must be a multiple of 8; 24 or 32",
    ),
    "resolution 10 for the default UNet": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--resolution", "10"),
        "--resolution 10: the UNet halves its input 2 times, so the resolution must be a multiple of 4; 8 or 12",
    ),
    "missing checkpoint": (
        lambda d, t: label_split_args(d, "--sensitive_labels", *ODD, "--resume_from_checkpoint", "checkpoint-7"),
        "--resume_from_checkpoint",
    ),
}


@pytest.mark.parametrize("where", ["file", "below a file", "unwritable"])
def test_an_output_dir_that_cannot_be_written_fails_before_any_work(where, tmp_path, digits_dir, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    output_dir = {
        "file": tmp_path / "a_file",
        "below a file": tmp_path / "a_file" / "out",
        "unwritable": "/proc/pu-diffusion-test/out",  # not writable even for root
    }[where]
    argv = [*label_split_args(str(digits_dir), "--sensitive_labels", *ODD), "--output_dir", output_dir]
    message = refusal(train_pu_unconditional, [*argv, "--report_to", "none"], capsys)
    assert f"--output_dir {output_dir}:" in message
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_early_naming_the_flag(case, tmp_path, digits_dir, capsys):
    (tmp_path / "empty").mkdir()
    write_image_folder(tmp_path / "s", 2)
    build_args, expected = CASES[case]
    output_dir = tmp_path / "out"
    message = refusal(
        train_pu_unconditional, [*build_args(str(digits_dir), tmp_path), "--output_dir", output_dir], capsys
    )
    assert expected in message
    # Nothing was written: no model, no checkpoint, no logs.
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--sensitive_data_dir", "s"], "error: U is missing"),  # refused by main's checks
        (["--train_data_dir", "u", "--prior", "nan"], "argument --prior: must be > 0 and < 1, got nan"),  # by argparse
    ],
)
def test_a_user_sees_the_message_and_a_failing_exit_code(argv, expected, tmp_path):
    """What the in-process checks above stand for: a real launch exits non-zero with the message, no traceback."""
    result = run_script(SCRIPT, *argv, "--output_dir", tmp_path / "out", launcher="python", timeout=120)
    assert result.returncode in (1, 2)
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
