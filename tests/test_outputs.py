"""outputs: the Hub upload filter, atomic pipeline saves, staging clean-up, the output-folder lock, grids."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from pu_diffusion.errors import InputError
from pu_diffusion.outputs import (
    LOCK_FILE,
    OutputDirLock,
    clean_staging_folders,
    create_hub_repo,
    image_grid,
    log_images,
    save_outputs_atomically,
    upload_to_hub,
)


def test_checkpoints_are_never_uploaded_and_the_repo_privacy_is_honoured(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    for name in (
        "model_index.json",
        "unet/config.json",
        "README.md",
        "checkpoint-500/optimizer.bin",
        "checkpoint-500/unet/config.json",
        "validation/epoch-0001.png",
        ".tmp-pipeline-x/a.json",
        ".pu-diffusion.lock",
        "logs/train/events.out.tfevents.1",
        "logs/train/hparams.yml",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    calls = {}

    class Repo:
        repo_id = "user/out"

    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda repo_id, **kw: calls.update(create=(repo_id, kw)) or Repo()
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(upload=kw))
    args = argparse.Namespace(
        hub_model_id=None,
        output_dir=str(tmp_path),
        hub_private_repo=True,
        hub_token="t",
        logging_dir="logs",
        push_logs_to_hub=False,
    )

    repo_id = create_hub_repo(args)
    upload_to_hub(args, repo_id, "step 10")
    assert calls["create"] == (tmp_path.name, {"exist_ok": True, "private": True, "token": "t"})
    assert calls["upload"]["repo_id"] == "user/out"
    files = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=calls["upload"]["ignore_patterns"]))
    assert uploaded == {"model_index.json", "unet/config.json", "README.md", "validation/epoch-0001.png"}
    args.push_logs_to_hub = True  # asked for: the logs go too
    upload_to_hub(args, repo_id, "step 10")
    uploaded = set(filter_repo_objects(files, ignore_patterns=calls["upload"]["ignore_patterns"]))
    assert {"logs/train/events.out.tfevents.1", "logs/train/hparams.yml"} <= uploaded


def tiny_ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from tests.helpers import tiny_unet_kwargs

    return DDPMPipeline(unet=UNet2DModel(**tiny_unet_kwargs()), scheduler=DDPMScheduler())


def test_an_interrupted_pipeline_save_keeps_the_previous_pipeline_loadable(tmp_path):
    from diffusers import DiffusionPipeline

    pipeline = tiny_ddpm_pipeline()
    save_outputs_atomically(tmp_path, pipeline.save_pretrained)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    weights = (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def crash_half_way(folder, *args, **kwargs):
        (Path(folder) / "unet").mkdir(parents=True)
        (Path(folder) / "unet" / "config.json").write_text("{")
        raise KeyboardInterrupt

    pipeline.save_pretrained = crash_half_way
    with pytest.raises(KeyboardInterrupt):
        save_outputs_atomically(tmp_path, pipeline.save_pretrained)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path).unet, type(pipeline.unet))
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_first_pipeline_save_is_not_loadable_until_complete(tmp_path):
    pipeline = tiny_ddpm_pipeline()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    pipeline.save_pretrained = crash
    with pytest.raises(KeyboardInterrupt):
        save_outputs_atomically(tmp_path, pipeline.save_pretrained)
    assert not (tmp_path / "model_index.json").exists()


def test_staging_left_by_a_killed_save_is_cleaned_and_a_set_aside_component_put_back(tmp_path):
    """kill -9 skips the finally: the state is built by hand, as a kill between two renames leaves it."""
    from diffusers import DiffusionPipeline

    save_outputs_atomically(tmp_path, tiny_ddpm_pipeline().save_pretrained)
    staging = tmp_path / ".tmp-pipeline-killed"
    (staging / "replaced").mkdir(parents=True)
    (staging / "new" / "scheduler").mkdir(parents=True)
    (tmp_path / "unet").rename(staging / "replaced" / "unet")
    (tmp_path / ".tmp-checkpoint-7" / "unet").mkdir(parents=True)
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(tmp_path)

    clean_staging_folders(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
    assert DiffusionPipeline.from_pretrained(tmp_path).unet.config.block_out_channels == [8, 16]


def test_one_training_run_per_output_dir(tmp_path):
    lock = OutputDirLock(tmp_path / "out")
    assert "pid" in (tmp_path / "out" / LOCK_FILE).read_text()
    with pytest.raises(InputError, match="is in use by another training run"):
        OutputDirLock(tmp_path / "out")
    lock.release()
    assert not (tmp_path / "out").exists()  # created by the lock, left empty: removed

    # A lock file whose process is gone (no flock held) blocks nobody.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / LOCK_FILE).write_text("pid 999999 on elsewhere")
    OutputDirLock(tmp_path / "kept").release()
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_image_grid_enlarges_small_tiles_and_separates_them():
    images = np.zeros((5, 8, 8, 1))
    images[0] = 1.0  # first tile white
    grid = np.asarray(image_grid(images, min_tile=32, gap=2))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34)  # 2 rows x 3 columns of 32-px tiles
    assert (grid[2:34, 2:34] == 255).all() and (grid[2:34, 36:68] == 0).all()
    assert (grid[:2] == 128).all() and (grid[:, 34:36] == 128).all()
    # uint8 pixels are taken as they are: the same grid as their [0, 1] floats.
    assert np.array_equal(np.asarray(image_grid((images * 255).astype(np.uint8))), grid)


def test_validation_images_go_to_wandb_with_their_captions(monkeypatch):
    """--report_to wandb: each validation image is logged as a wandb.Image captioned with its prompt."""
    import sys
    import types

    logged = []
    fake_wandb = types.SimpleNamespace(Image=lambda pixels, caption: (pixels, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, step: logged.append((values, step)))
    images = np.stack([np.zeros((4, 4, 3)), np.ones((4, 4, 3))])
    log_images([tracker], images, step=7, captions=["a cat", "a dog"])
    ((values, step),) = logged
    assert step == 7
    assert [caption for _, caption in values["validation"]] == ["a cat", "a dog"]
    assert values["validation"][1][0].dtype == np.uint8 and values["validation"][1][0].max() == 255
