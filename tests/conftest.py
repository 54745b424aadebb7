"""Shared fixtures: tiny datasets and models built on the spot, and a launcher for the scripts.

Nothing is downloaded: HF_HUB_OFFLINE=1 is set for the tests and every
subprocess they start.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import text_to_image_step  # noqa: E402  (the tiny Stable Diffusion's configs live there, once)


def script_command(
    script: str, *args, launcher: str = "accelerate", num_processes: int = 1, mixed_precision: str = "no"
) -> list[str]:
    """The command line a user types: ``accelerate launch`` on CPU, or ``python`` for the file itself."""
    command = [sys.executable]
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


def run_script(
    script: str, *args, launcher: str = "accelerate", num_processes: int = 1, timeout: int = 600, **launch_options
):
    """Run one of the repository's scripts the way a user does, and return the finished process.

    ``launcher="accelerate"`` goes through ``accelerate launch`` on CPU;
    ``"python"`` runs the file directly (for argument and input errors).
    """
    command = script_command(script, *args, launcher=launcher, num_processes=num_processes, **launch_options)
    return subprocess.run(
        command, cwd=REPO_ROOT, env=script_env(num_processes), capture_output=True, text=True, timeout=timeout
    )


def start_script(script: str, *args, launcher: str = "accelerate", num_processes: int = 1) -> subprocess.Popen:
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


def script_env(num_processes: int) -> dict:
    """Several processes on a machine without GPUs: torchrun's launcher with Accelerate told to use
    the CPU, which makes it pick the gloo backend."""
    return {**SCRIPT_ENV, "ACCELERATE_USE_CPU": "true"} if num_processes > 1 else SCRIPT_ENV


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-6000:]}"
    )


def forwards_per_optimizer_step(script: str, *args, record_path: Path) -> list[int]:
    """Launch ``script`` under tests/step_counter.py and return the UNet training forwards of each optimizer
    step; the run must succeed and leave no forward without its step."""
    import json

    assert_ok(run_script("tests/step_counter.py", record_path, script, *args))
    record = json.loads(record_path.read_text())
    assert record["forwards_after_last_step"] == 0
    return record["forwards_per_step"]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The built-in demo data, written once per test session."""
    from pu_data import write_digits_dataset

    path = tmp_path_factory.mktemp("digits")
    write_digits_dataset(path)
    return path


@pytest.fixture(scope="session")
def tiny_unet_config(tmp_path_factory) -> Path:
    """A UNet2DModel config of a few thousand parameters, for 8x8 grayscale images."""
    from diffusers import UNet2DModel

    path = tmp_path_factory.mktemp("tiny_unet")
    UNet2DModel(**tiny_unet_kwargs()).save_config(path)
    return path


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
    import json

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


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory) -> Path:
    """A Stable Diffusion pipeline folder for 32 px images, built from configs (a few hundred thousand weights)."""
    import torch
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    unet, vae, text_encoder, scheduler, _, _ = text_to_image_step.build_models("tiny")
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer_files")),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def write_captioned_folder(path: Path, captions: list[str], size: int = 32, seed: int = 0) -> Path:
    """An image folder with metadata.jsonl: one random RGB image per caption, in the ``text`` column."""
    import json

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, caption in enumerate(captions):
        name = f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / name)
        rows.append(json.dumps({"file_name": name, "text": caption}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_clip_model(tmp_path_factory) -> Path:
    """A CLIPModel with its processor (tokenizer and 32 px image processor), built from configs."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    path = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    config = CLIPConfig(
        text_config=text_to_image_step.tiny_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32
    )
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer_files"))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
