"""What the tests share: launching the repository's scripts as users do, tiny data and models built on the
spot, and readers of what a run wrote. Fixtures live in conftest.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pu_diffusion.loop import exit_on_error

os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent


def script_command(
    script: str, *args, launcher: str | None = None, num_processes: int = 1, mixed_precision: str = "no"
) -> list[str]:
    """The command line a user types: ``accelerate launch`` on CPU, or ``python`` for the file itself.

    By default several processes go through ``accelerate launch`` and one process runs the file with plain
    python (``--mixed_precision`` then goes to the script): a launcher is a second interpreter that imports
    torch, seconds per run. The tests of the launcher itself ask for it.
    """
    launcher = launcher or ("accelerate" if num_processes > 1 else "python")
    command = [sys.executable]
    if launcher == "python" and mixed_precision != "no":
        args = (*args, "--mixed_precision", mixed_precision)
    if launcher == "accelerate":
        command += [
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            mixed_precision,
            "--dynamo_backend",
            "no",
        ]
        if num_processes > 1:
            command += ["--multi_gpu"]
    return command + [str(REPO_ROOT / script), *map(str, args)]


SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


#: Scripts that one process runs inside the test process (see :func:`run_in_process`).
IN_PROCESS_SCRIPTS = (
    "train_pu_unconditional.py",
    "train_pu_text_to_image.py",
    "evaluate.py",
    "estimate_prior.py",
    "prepare_text_to_image_base.py",
    "make_text_to_image_data.py",
)


def run_script(
    script: str, *args, launcher: str | None = None, num_processes: int = 1, timeout: int = 600, **launch_options
):
    """Run one of the repository's scripts the way a user does, and return the finished process
    (:func:`script_command` says which launcher). One process of a training script or of evaluate.py runs in
    this process unless ``launcher`` asks for a real launch ("python" or "accelerate")."""
    if launcher is None and num_processes == 1 and script in IN_PROCESS_SCRIPTS:
        return run_in_process(script, *args, **launch_options)
    command = script_command(script, *args, launcher=launcher, num_processes=num_processes, **launch_options)
    try:
        return subprocess.run(
            command, cwd=REPO_ROOT, env=script_env(num_processes), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as timeout_error:
        # pytest would show a cut repr of the output; the end of stderr says where the run stopped.
        stderr = timeout_error.stderr or b""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        raise AssertionError(f"{script} ran past {timeout} s; the end of its stderr:\n{stderr[-6000:]}") from None


def start_script(script: str, *args, launcher: str | None = None, num_processes: int = 1) -> subprocess.Popen:
    """Like run_script, but return at once with the process running."""
    command = script_command(script, *args, launcher=launcher, num_processes=num_processes)
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=script_env(num_processes),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_in_process(script: str, *args, mixed_precision: str = "no") -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` without a new interpreter: the script's main runs here, as its ``__main__`` block
    runs it, with stdout, stderr and the log captured; a raw exception becomes exit code 1 and a traceback on
    stderr, as it would in a subprocess. A subprocess spends seconds importing torch, Diffusers and datasets
    before it starts; the tests of the launcher, of signals and of several processes still start one.
    Accelerate's process state is reset afterwards, so that the next run sets up its own."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback

    module = importlib.import_module(Path(script).stem)
    argv = [str(arg) for arg in args] + (["--mixed_precision", mixed_precision] if mixed_precision != "no" else [])
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                if script in ("evaluate.py", "make_text_to_image_data.py"):  # their main parses argv itself
                    exit_on_error(module.main, argv)
                else:
                    exit_on_error(module.main, module.parse_args(argv))
            except SystemExit as stop:
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
                returncode = stop.code if isinstance(stop.code, int) else (1 if stop.code else 0)
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        reset_accelerate_state()
    return subprocess.CompletedProcess([script, *argv], returncode, stdout.getvalue(), stderr.getvalue())


def steps_in_this_process(monkeypatch, protocol) -> None:
    """Make a benchmark module's ``run_command`` run each step that is one of our scripts in this process (one at
    a time, even with --jobs 2) and write its output to the step's log, as the real one does; any other command
    still gets a process. The real ``run_command`` (processes, logs, Ctrl-C) is tested on its own."""
    import threading

    launch = protocol.run_command
    one_at_a_time = threading.Lock()

    def run_here(command: list[str], log: Path, env: dict | None = None) -> None:
        script = Path(command[1]).name if len(command) > 1 else ""
        if command[0] != sys.executable or script not in IN_PROCESS_SCRIPTS:
            return launch(command, log, env)
        with one_at_a_time:
            result = run_in_process(script, *command[2:])
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")

    monkeypatch.setattr(protocol, "run_command", run_here)


def reset_accelerate_state() -> None:
    """Forget Accelerate's process state, as a new process starts without it: the next run in this process
    sets up its own (mixed precision, device)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def script_env(num_processes: int) -> dict:
    """Several processes on a machine without GPUs: torchrun's launcher with Accelerate told to use
    the CPU, which makes it pick the gloo backend."""
    return {**SCRIPT_ENV, "ACCELERATE_USE_CPU": "true"} if num_processes > 1 else SCRIPT_ENV


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    )


def forwards_per_optimizer_step(script: str, *args, record_path: Path, num_processes: int = 1) -> list[int]:
    """Run ``script`` under tests/step_counter.py's hooks and return the UNet training forwards of each optimizer
    step; the run must succeed and leave no forward without its step. One process runs here (the hooks are
    removed after), several are launched under step_counter.py; then every process must have stepped after
    the same forwards."""
    if num_processes == 1:
        from tests import step_counter

        with step_counter.counting() as record:
            assert_ok(run_script(script, *args))
        assert record["forwards_after_last_step"] == 0
        return record["forwards_per_step"]
    return launch_counting_forwards(script, *args, record_path=record_path, num_processes=num_processes)[1]


def launch_counting_forwards(script: str, *args, record_path: Path, num_processes: int):
    """``accelerate launch`` of ``script`` on ``num_processes`` under tests/step_counter.py: (the finished launch,
    the UNet training forwards of each optimizer step, which every process must share)."""
    result = run_script("tests/step_counter.py", record_path, script, *args, num_processes=num_processes)
    assert_ok(result)
    return result, shared_forwards_per_step(record_path, num_processes)


def shared_forwards_per_step(record_path: Path, num_processes: int) -> list[int]:
    """What tests/step_counter.py recorded in each process of a launch: the UNet training forwards of each
    optimizer step, which every process must share, with no forward left without its step."""
    paths = [record_path] + [Path(f"{record_path}.rank{rank}") for rank in range(1, num_processes)]
    records = [json.loads(path.read_text()) for path in paths]
    assert all(record["forwards_after_last_step"] == 0 for record in records)
    assert all(record["forwards_per_step"] == records[0]["forwards_per_step"] for record in records)
    return records[0]["forwards_per_step"]


def signal_once_saved(process, checkpoint: Path, signal_number, timeout: float = 300) -> None:
    """Send the signal as soon as ``checkpoint`` exists, while the run is still training."""
    import time

    deadline = time.monotonic() + timeout
    while not checkpoint.is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal_number)


def tiny_unet_kwargs(channels: int = 1) -> dict:
    return {
        "sample_size": 8,
        "in_channels": channels,
        "out_channels": channels,
        "layers_per_block": 1,
        "block_out_channels": (8, 16),
        "norm_num_groups": 4,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    }


def write_image_folder(path: Path, count: int, size: int = 8, mode: str = "L", seed: int = 0) -> Path:
    """``count`` random PNG images in an image folder."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    channels = {"L": (size, size), "RGB": (size, size, 3)}[mode]
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8)).save(path / f"{index:03d}.png")
    return path


def write_tiny_clip_tokenizer(path: Path, model_max_length: int = 16):
    """A CLIPTokenizer whose vocabulary is the 256 byte symbols (plus their word-final forms), no merges."""

    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # The byte-to-symbol map of byte-level BPE: printable bytes stand for themselves, the rest from 256 up.
    others = [byte for byte in range(256) if byte not in printable]
    symbols = [chr(code) for code in printable] + [chr(256 + index) for index in range(len(others))]
    vocabulary = ["<|startoftext|>", "<|endoftext|>", *symbols, *(symbol + "</w>" for symbol in symbols)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=model_max_length)


def tiny_t5_tokenizer():
    """A T5-style tokenizer (words, then </s>; padded with <pad>) over the words of the tests' captions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "a photo of cat dog shape".split()
    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: index + 3 for index, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def write_captioned_folder(path: Path, captions: list[str], size: int = 32, seed: int = 0) -> Path:
    """An image folder with metadata.jsonl: one random RGB image per caption, in the ``text`` column."""

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, caption in enumerate(captions):
        name = f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------- unconditional runs

UNCONDITIONAL = "train_pu_unconditional.py"
ODD = ["1", "3", "5", "7", "9"]


def tiny_run_args(digits_dir, tiny_unet_config, output_dir, *extra):
    """U = 40 even + 4 odd digits, S = 6 odd digits; 6 U batches of 8 per epoch."""
    return [
        "--dataset_name",
        digits_dir,
        "--label_column",
        "label",
        "--sensitive_labels",
        *ODD,
        "--num_unlabeled_normal",
        "40",
        "--num_unlabeled_sensitive",
        "4",
        "--num_labeled_sensitive",
        "6",
        "--resolution",
        "8",
        "--model_config_name_or_path",
        tiny_unet_config,
        "--train_batch_size",
        "8",
        "--sensitive_batch_size",
        "2",
        "--lr_warmup_steps",
        "0",
        "--learning_rate",
        "1e-3",
        "--ddpm_num_inference_steps",
        "2",
        "--eval_batch_size",
        "4",
        "--seed",
        "0",
        "--output_dir",
        output_dir,
        *extra,
    ]


def scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars written under output_dir/logs: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return values


def load_and_sample(output_dir: Path):
    from diffusers import DDPMPipeline, DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    assert isinstance(pipeline, DDPMPipeline)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    return pipeline, images


def resume_from_a_copy(script: str, run_args, reference: Path, resumed: Path, checkpoint: str) -> tuple[dict, dict]:
    """Train ``reference`` in full, then resume a new folder that holds only a copy of its ``checkpoint``;
    return both loss traces ({step: loss}). ``run_args(output_dir, *extra)`` builds the command line; both
    runs start with plain python, as a launcher that sets another thread count changes float rounding."""
    import shutil

    assert_ok(run_script(script, *run_args(reference)))
    resumed.mkdir()
    shutil.copytree(reference / checkpoint, resumed / checkpoint)
    assert_ok(run_script(script, *run_args(resumed, "--resume_from_checkpoint", "latest")))
    return dict(scalars(reference)["loss"]), dict(scalars(resumed)["loss"])


def refusal(script_module, argv, capsys) -> str:
    """Run a training script's ``main`` in this process, as ``python script.py ARGV`` runs it, expecting it to
    refuse the input before training; return the message a user reads. A subprocess costs seconds of imports
    per case; the exit code and message of a real launch are checked once per script elsewhere. A refusal
    after the accelerator is made leaves Accelerate's state set; it is reset, as run_in_process resets it."""
    import pytest

    try:
        with pytest.raises(SystemExit) as stop:
            exit_on_error(script_module.main, script_module.parse_args([str(arg) for arg in argv]))
    finally:
        reset_accelerate_state()
    assert stop.value.code not in (0, None)
    code = stop.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


def text_to_image_run_args(pipeline, data, output_dir, *extra) -> list:
    """train_pu_text_to_image.py's flags for a short run on the tests' captioned data (U, S)."""
    unlabeled, sensitive = data
    return [
        "--pretrained_model_name_or_path", pipeline, "--train_data_dir", unlabeled, "--sensitive_data_dir", sensitive,
        "--sensitive_prompt", "a photo of a dog", "--resolution", "32", "--train_batch_size", "4",
        "--learning_rate", "1e-2", "--seed", "0", "--output_dir", output_dir, *extra,
    ]  # fmt: skip
