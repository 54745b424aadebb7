"""Fixtures: tiny datasets and models built once per session. Helpers live in helpers.py.

Nothing is downloaded: HF_HUB_OFFLINE=1 is set for the tests and every
subprocess they start.
"""

import os
from pathlib import Path

# Under pytest-xdist (make test runs two workers on the two cores) each worker and the scripts it starts
# keep to one thread: two processes whose OpenMP threads spin on the same cores run many times slower.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest
import text_to_image_step  # benchmarks/, on pytest's pythonpath

from tests.helpers import tiny_t5_tokenizer, tiny_unet_kwargs, write_captioned_folder, write_tiny_clip_tokenizer

#: make test's two workers take whole files (--dist loadfile) in collection order (--no-loadscope-reorder),
#: each the next file as it runs out. Longest first (by --durations), the short files fill in at the end and
#: both workers finish at about the same time; in alphabetical order the longest came last.
LONGEST_FILES_FIRST = (
    "test_train_text_to_image.py",
    "test_text_to_image_base.py",
    "test_train_unconditional.py",
    "test_reliability.py",
    "test_train_sd3.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The built-in demo data, written once per test session."""
    from pu_diffusion.builtin_datasets import write_digits_dataset

    path = tmp_path_factory.mktemp("digits")
    write_digits_dataset(path)
    return path


@pytest.fixture(scope="session")
def captioned_data(tmp_path_factory):
    """U: six cats and two dogs (the sensitive concept, mixed in); S: three dogs with no captions."""
    root = tmp_path_factory.mktemp("captioned")
    unlabeled = write_captioned_folder(root / "u", ["a photo of a cat"] * 6 + ["a photo of a dog"] * 2)
    sensitive = write_captioned_folder(root / "s", ["unused"] * 3, seed=1)
    (sensitive / "metadata.jsonl").unlink()  # S needs no captions of its own with --sensitive_prompt
    return unlabeled, sensitive


@pytest.fixture(scope="session")
def tiny_unet_config(tmp_path_factory) -> Path:
    """A UNet2DModel config of a few thousand parameters, for 8x8 grayscale images."""
    from diffusers import UNet2DModel

    path = tmp_path_factory.mktemp("tiny_unet")
    UNet2DModel(**tiny_unet_kwargs()).save_config(path)
    return path


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


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tmp_path_factory) -> Path:
    """A Stable Diffusion XL pipeline folder for 32 px images, built from configs: two tiny CLIP text encoders
    (the second with projection), a UNet with SDXL's text-and-time conditioning."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = tmp_path_factory.mktemp("tiny_sdxl")
    torch.manual_seed(0)
    text_config = text_to_image_step.tiny_text_config()  # hidden size 32, projection 32
    _, vae, _, _, _, _ = text_to_image_step.build_models("tiny")
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )  # fmt: skip
    tokenizer = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("sdxl_tokenizer_files"))
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
    )
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory) -> Path:
    """A Stable Diffusion 3 pipeline folder for 32 px images, built from configs: two tiny CLIP text encoders
    with projection and a tiny T5, an MMDiT transformer of two joint blocks (the last has no text output
    projection), a flow-matching scheduler with SD3's shift."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("tiny_sd3")
    torch.manual_seed(0)
    text_config = text_to_image_step.tiny_text_config()  # hidden size 32, projection 32
    _, vae, _, _, _, _ = text_to_image_step.build_models("tiny")
    vae.register_to_config(shift_factor=0.1)  # SD3's VAE centres its latents; any shift shows it is applied
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
    )  # fmt: skip
    t5_tokenizer = tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=37, num_layers=1, num_heads=2))
    tokenizer = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("sd3_tokenizer_files"))
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_without_t5(tiny_sd3_pipeline, tmp_path_factory) -> Path:
    """The same SD3 base saved without its T5, as model_index.json then lists it: [null, null]."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("tiny_sd3_no_t5") / "pipeline"
    shutil.copytree(tiny_sd3_pipeline, path, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((path / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (path / "model_index.json").write_text(json.dumps(index))
    return path
