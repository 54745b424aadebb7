"""LoRA for the text-to-image script: its flags, the adapters, and their files in the Diffusers LoRA format.

The output is what the Diffusers LoRA scripts write: ``pytorch_lora_weights.safetensors``
with the adapter's config as metadata, so ``pipeline.load_lora_weights(folder)``
rebuilds the same adapter (rank, alpha, dropout, DoRA, target modules).
"""

from __future__ import annotations

import argparse

import torch

from pu_diffusion.checkpoints import gathered_state_dict
from pu_diffusion.errors import InputError
from pu_diffusion.flags import POSITIVE_FLOAT, POSITIVE_INT, UNIT_INTERVAL

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
#: The attention projections that get LoRA adapters, as in the official LoRA example.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
#: --lora_layers on SD3 unless given: the SD3 LoRA script's, every projection of the joint attention.
SD3_LORA_LAYERS = [
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
]  # fmt: skip


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of the whole UNet.")
    group.add_argument("--rank", type=POSITIVE_INT, default=4, help="LoRA rank.")
    group.add_argument("--lora_alpha", type=POSITIVE_FLOAT, default=None, help="LoRA scale numerator; default: --rank.")
    group.add_argument("--lora_dropout", type=UNIT_INTERVAL, default=0.0, help="Dropout in the LoRA layers.")
    group.add_argument(
        "--lora_layers",
        type=module_names,
        default=None,
        help="Comma-separated names of the modules that get adapters (default: the attention projections,"
        f" {','.join(LORA_TARGET_MODULES)}; on SD3 those of the SD3 LoRA script, the joint attention's eight).",
    )
    group.add_argument("--use_dora", action="store_true", help="Weight-decomposed LoRA (DoRA, Liu et al., 2024).")
    group.add_argument(
        "--upcast_before_saving",
        action="store_true",
        help="Save the final LoRA weights in float32; by default they are saved in the mixed-precision dtype.",
    )


def module_names(text: str) -> list[str]:
    """--lora_layers: "to_q,to_v" -> ["to_q", "to_v"]."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one module, e.g. to_q,to_v")
    return names


def add_lora(
    unet, rank: int, *, alpha: float | None = None, dropout: float = 0.0, layers=LORA_TARGET_MODULES, use_dora=False
) -> None:
    """Freeze the UNet and add trainable LoRA (or DoRA) adapters to the modules named in ``layers``."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=dropout,
        use_dora=use_dora,
        init_lora_weights="gaussian",
        target_modules=list(layers),
    )
    check_layer_names(unet, layers)
    try:
        unet.add_adapter(config)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise InputError(f"--lora_layers {','.join(layers)}: {error}") from error


def check_layer_names(model, layers) -> None:
    """Every --lora_layers name must name modules of the model (peft's own check passes when any one does, and
    drops the rest, a typo among them, without a word). A name matches a module whose dotted path ends with it."""
    paths = [name for name, _ in model.named_modules()]
    unmatched = [layer for layer in layers if not any(path == layer or path.endswith("." + layer) for path in paths)]
    if unmatched:
        default = SD3_LORA_LAYERS if lora_format(model)[1] == "transformer" else LORA_TARGET_MODULES
        raise InputError(
            f"--lora_layers {','.join(layers)}: {', '.join(unmatched)} names no module of the {type(model).__name__}"
            f" (its attention projections are {','.join(default)})"
        )


def lora_state_dict(unet, state_dict: dict | None = None, dtype: torch.dtype | None = None) -> dict:
    """The UNet's LoRA weights under the names ``load_lora_weights`` expects, optionally cast to ``dtype``.

    ``state_dict`` is the whole UNet's, gathered by ``accelerator.get_state_dict``
    where DeepSpeed or FSDP shard it; by default the unwrapped UNet's own.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, state_dict=state_dict)
    if lora_format(unet)[1] == "unet":  # SD's loader reads the Diffusers names; SD3's reads PEFT's, unconverted
        state = convert_state_dict_to_diffusers(state)
    return {name: tensor.to(dtype) if dtype else tensor for name, tensor in state.items()}


def lora_format(model) -> tuple[object, str]:
    """(the pipeline class whose save_lora_weights / lora_state_dict we use, the key prefix): SD3's transformer,
    or a UNet (SD and SDXL read the same file)."""
    import diffusers

    if type(model).__name__ == "SD3Transformer2DModel":
        return diffusers.StableDiffusion3Pipeline, "transformer"
    return diffusers.StableDiffusionPipeline, "unet"


def write_lora(folder, unet, state: dict) -> None:
    """pytorch_lora_weights.safetensors with the adapter's config (rank, alpha, DoRA, modules) as metadata,
    so that ``load_lora_weights`` rebuilds the same adapter.

    The metadata's dropout is 0: it is a training setting, and ``load_lora_weights`` would build dropout
    layers that a pipeline never switches to eval mode, so the same seed would give other images each time.
    """
    pipeline_class, prefix = lora_format(unet)
    metadata = {**unet.peft_config["default"].to_dict(), "lora_dropout": 0.0}
    pipeline_class.save_lora_weights(
        folder, **{f"{prefix}_lora_layers": state, f"{prefix}_lora_adapter_metadata": metadata}
    )


def register_lora_hooks(accelerator, unet) -> None:
    """checkpoint-N holds the adapters as pytorch_lora_weights.safetensors; a resume loads them back exactly."""
    from diffusers.training_utils import cast_training_params
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    def save_model_hook(models, weights, output_dir):
        states = [gathered_state_dict(accelerator, model) for model in models]
        if accelerator.is_main_process:
            for model, state in zip(models, states, strict=True):
                unwrapped = accelerator.unwrap_model(model)
                write_lora(output_dir, unwrapped, lora_state_dict(unwrapped, state_dict=state))
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            pipeline_class, prefix = lora_format(model)
            state_dict = pipeline_class.lora_state_dict(input_dir)
            state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict  # SD: (weights, alphas)
            model_state = {
                key.removeprefix(f"{prefix}."): value
                for key, value in state_dict.items()
                if key.startswith(f"{prefix}.")
            }
            result = set_peft_model_state_dict(
                model, convert_unet_state_dict_to_peft(model_state), adapter_name="default"
            )
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise InputError(
                    f"{input_dir}: LoRA weights that fit no adapter of this {type(model).__name__}: {unexpected[:5]}"
                )
            cast_training_params(model, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def lora_description(args) -> str:
    """ "rank 4", with the alpha when it is not the rank, and DoRA when used."""
    parts = [f"rank {args.rank}"]
    if args.lora_alpha and args.lora_alpha != args.rank:
        parts.append(f"alpha {args.lora_alpha:g}")
    if args.use_dora:
        parts.append("DoRA")
    return ", ".join(parts)
