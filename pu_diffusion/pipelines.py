"""Loading trained pipelines (full or LoRA) and sampling images from them, for evaluation and data making."""

from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pu_diffusion.errors import InputError, read_json
from pu_diffusion.outputs import to_uint8
from pu_diffusion.prompt_sets import Prompt
from pu_diffusion.training_data import derived_seed

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_pipeline_folder(name_or_path: str) -> None:
    """A local pipeline folder must hold a folder for each component its model_index.json lists; Diffusers
    would otherwise complain about a config.json without saying which component is missing."""
    folder = Path(name_or_path)
    index = folder / "model_index.json"
    if not index.is_file():
        return  # a Hub id, or not a pipeline at all: from_pretrained says so
    listed = read_json(index, f"--pipeline {name_or_path}")
    missing = [
        name
        for name, value in listed.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise InputError(
            f"--pipeline {name_or_path}: model_index.json lists {', '.join(missing)}, but the folder has no"
            f" {', '.join(name + '/' for name in missing)}"
        )


def absent_components(config: dict) -> dict:
    """None for each component model_index.json lists as absent ([null, null]), such as the T5 of an SD3 base
    saved without it: ``DiffusionPipeline.from_pretrained`` refuses such a folder unless it is told so."""
    return {
        name: None
        for name, value in config.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is None
    }


def load_unconditional_pipeline(name_or_path: str, scheduler: str, device: str):
    """A pipeline with a ``unet`` and a ``scheduler``, with the sampling scheduler swapped in."""
    from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline

    check_pipeline_folder(name_or_path)
    try:
        pipeline = DiffusionPipeline.from_pretrained(name_or_path)
    except Exception as error:  # diffusers raises OSError, ValueError, EnvironmentError for "not a pipeline"
        raise InputError(f"--pipeline {name_or_path}: not a diffusion pipeline: {error}") from error
    components = pipeline.components
    if "unet" not in components or "scheduler" not in components or "text_encoder" in components:
        raise InputError(
            f"--pipeline {name_or_path}: a {type(pipeline).__name__} is not an unconditional (DDPM-style) pipeline"
        )
    scheduler_cls = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
    pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def attention_processors(unet) -> list[str]:
    """Names of the attention implementations in use (AttnProcessor2_0 means PyTorch SDPA)."""
    from diffusers.models.attention_processor import Attention

    return sorted({type(module.processor).__name__ for module in unet.modules() if isinstance(module, Attention)})


@torch.inference_mode()
def generate_samples(pipeline, num_samples: int, batch_size: int, num_inference_steps: int, seed: int):
    """Sample in batches; batch b draws its noise from a generator seeded with (seed, b).

    Returns (N, C, H, W) uint8 samples and the samples per second.
    """
    from tqdm.auto import tqdm

    batches = []
    start = time.perf_counter()
    for index, first in enumerate(tqdm(range(0, num_samples, batch_size), desc="sampling")):
        generator = torch.Generator(device="cpu").manual_seed(derived_seed(seed, index))
        images = pipeline(
            batch_size=min(batch_size, num_samples - first),
            generator=generator,
            num_inference_steps=num_inference_steps,
            output_type="np",
        ).images
        batches.append(float_to_uint8(images))
    elapsed = time.perf_counter() - start
    return torch.cat(batches), num_samples / elapsed


def sample_shape(pipeline) -> tuple[int, int, int]:
    config = pipeline.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    return (config.out_channels, size, size)


#: StableDiffusion3Pipeline's T5 tokens per prompt when its call is given none (max_sequence_length).
SD3_SAMPLING_SEQUENCE_LENGTH = 256


def t5_sequence_length(tokenizer, default: int) -> int:
    """T5's tokens per caption where none are asked for: ``default``, or the tokenizer's own length where that is
    shorter (a small base's word tokenizer), since every token past it would be padding."""
    return min(default, getattr(tokenizer, "model_max_length", None) or default)


def sampling_arguments(pipeline, max_sequence_length: int | None) -> dict:
    """What a text-to-image pipeline's call takes besides the prompt to sample as its model was trained: SD3's
    T5 length (--max_sequence_length, else :func:`t5_sequence_length` of its T5 tokenizer; without T5 the
    pipeline's own rows of zeros). Refused on pipelines that take no such length."""
    if "max_sequence_length" not in inspect.signature(pipeline.__call__).parameters:
        if max_sequence_length is not None:
            raise InputError(f"--max_sequence_length: {type(pipeline).__name__} has no T5 length to set")
        return {}
    if max_sequence_length is None and getattr(pipeline, "tokenizer_3", None) is not None:
        max_sequence_length = t5_sequence_length(pipeline.tokenizer_3, SD3_SAMPLING_SEQUENCE_LENGTH)
    return {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}


def load_text_to_image_pipeline(args: argparse.Namespace, device: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    check_pipeline_folder(args.pipeline)
    try:
        # Cast after loading: the loading keyword changed name (torch_dtype -> dtype) across Diffusers versions.
        config = DiffusionPipeline.load_config(args.pipeline)
        pipeline = DiffusionPipeline.from_pretrained(args.pipeline, **absent_components(config))
    except (OSError, ValueError) as error:
        raise InputError(f"--pipeline {args.pipeline}: not a diffusion pipeline: {error}") from error
    if not hasattr(pipeline, "tokenizer"):
        raise InputError(f"--pipeline {args.pipeline}: {type(pipeline).__name__} takes no prompts")
    sampling_arguments(pipeline, args.max_sequence_length)  # refused here, before any weights move
    if args.lora is not None:
        load_lora_in_full(pipeline, args.lora)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # LoRA layers arrive in training mode: their dropout would differ on every call
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device=device, dtype=dtype)


def load_lora_in_full(pipeline, lora: str) -> None:
    """``load_lora_weights``, refused unless every LoRA weight of the file found its layer: Diffusers only warns
    about the others, and a LoRA loaded in part would be scored as if it were the trained model."""
    from peft.utils import get_peft_model_state_dict

    try:
        state_dict = pipeline.lora_state_dict(lora)
        state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict  # (weights, alphas) for SD
        pipeline.load_lora_weights(lora)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise InputError(
            f"--lora {lora}: no LoRA weights this pipeline can load (a LoRA for another base?): {error}"
        ) from error
    in_file = sum(1 for key in state_dict if "lora" in key and not key.endswith(".alpha"))
    loaded = sum(
        len(get_peft_model_state_dict(component, adapter_name=adapter))
        for component in pipeline.components.values()
        if isinstance(component, torch.nn.Module)
        for adapter in getattr(component, "peft_config", {})
    )
    if loaded < in_file:
        raise InputError(
            f"--lora {lora}: only {loaded} of its {in_file} LoRA weights fit {type(pipeline).__name__}'s layers;"
            " it was trained for another base model or another --lora_layers"
        )


def default_device(device: str | None) -> str:
    """--device, else cuda when there is one, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dtype: str | None, device: str) -> torch.dtype:
    """--dtype, else float16 on cuda and float32 elsewhere."""
    return DTYPES[dtype] if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)


@dataclass(frozen=True)
class ImageOrigin:
    """Where an image of ``text-to-image`` came from: image ``position`` of the batch whose generator was seeded
    with ``batch_seed``; that batch holds ``batch_size`` images of prompt ``prompt_index``."""

    prompt_index: int
    image_index: int  # among the prompt's images
    batch_seed: int
    batch_size: int
    position: int


def noise_seed(args: argparse.Namespace, prompt: Prompt, prompt_index: int, batch_index: int) -> int:
    """The seed of a batch's noise: (--seed, p, b) for prompt p's batch b; for a prompt whose row gives a seed
    (an I2P CSV), that seed for its first batch, as those benchmarks draw their image, then (seed, b)."""
    if prompt.seed is None:
        return derived_seed(args.seed, prompt_index, batch_index)
    return prompt.seed if batch_index == 0 else derived_seed(prompt.seed, batch_index)


@torch.inference_mode()
def generate_from_prompts(pipeline, args: argparse.Namespace, device: str, prompts: list[Prompt] | None = None):
    """--images_per_prompt images of each prompt, prompt after prompt, each batch seeded by :func:`noise_seed`
    and guided by the prompt's own guidance scale if its row gives one, else --guidance_scale. ``prompts``
    default to --prompt's. Returns (N, C, H, W) uint8 images, images/s and each image's :class:`ImageOrigin`."""
    from tqdm.auto import tqdm

    prompts = prompts if prompts is not None else [Prompt(text) for text in args.prompt]
    call_arguments = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    call_arguments.update(sampling_arguments(pipeline, args.max_sequence_length))
    batches, origins = [], []
    start = time.perf_counter()
    for prompt_index, prompt in enumerate(tqdm(prompts, desc="prompts")):
        for batch_index, first in enumerate(range(0, args.images_per_prompt, args.batch_size)):
            seed = noise_seed(args, prompt, prompt_index, batch_index)
            batch_size = min(args.batch_size, args.images_per_prompt - first)
            images = pipeline(
                prompt.text,
                num_images_per_prompt=batch_size,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=prompt.guidance_or(args.guidance_scale),
                generator=torch.Generator(device).manual_seed(seed),
                output_type="np",
                **call_arguments,
            ).images
            batches.append(float_to_uint8(images))
            origins += [
                ImageOrigin(prompt_index, first + position, seed, batch_size, position)
                for position in range(batch_size)
            ]
    images = torch.cat(batches)
    return images, len(images) / (time.perf_counter() - start), origins


def float_to_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) floats in [0, 1] -> (N, C, H, W) uint8."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()
