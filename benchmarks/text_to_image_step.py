"""Step time and peak memory of train_pu_text_to_image.py's training step, per mixed-precision mode.

    python benchmarks/text_to_image_step.py --model sd15 --mixed_precision fp16 bf16 --gradient_checkpointing
    python benchmarks/text_to_image_step.py --model tiny --resolution 32 --mixed_precision no bf16   # any CPU
    python benchmarks/text_to_image_step.py --model sd3-medium --mixed_precision bf16 --latents cached

``--model sd15`` builds Stable Diffusion 1.5's architecture from configs
(UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters) with random
weights: time and memory do not depend on the weight values, so nothing
is downloaded and a machine without Hub access can measure it. ``tiny`` is
the tests' model (``tests/conftest.py`` builds its pipeline from here).
``--model sd3-medium`` builds SD3-medium's MMDiT (2B parameters) and its
16-channel VAE; the text states come from the table that
``train_pu_text_to_image.py`` computes once per caption, so the three text
encoders (T5-XXL among them) are not built and not timed. ``tiny-sd3`` is the
tests' SD3.
Each configuration runs in a process of its own, through Accelerate as the
script does (LoRA by default, one U and one S image per step, the PU loss
with ``abs``), and reports the median of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from throughput import peak_memory_mb, synchronize

from pu_diffusion.checks import pu_loss_flags
from pu_diffusion.flags import NON_NEGATIVE_INT, POSITIVE_INT, show_ranges
from pu_diffusion.flow_matching import FlowMatchingSettings
from pu_diffusion.frozen_models import PrecomputedTextStates
from pu_diffusion.lora import LORA_TARGET_MODULES, SD3_LORA_LAYERS, add_lora
from pu_diffusion.objective import LossSettings
from pu_diffusion.text_to_image import FrozenModels, place_models, training_step

SD3_MODELS = ("sd3-medium", "tiny-sd3")


def tiny_text_config():
    """The tests' CLIP text encoder. Token ids of their byte-level tokenizer: <|startoftext|> 0,
    <|endoftext|> 1 (also padding)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=520, max_position_embeddings=16, projection_dim=32,
    )  # fmt: skip


def build_models(model: str):
    """(unet, vae, text_encoder, noise_scheduler, vocabulary size) with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if model == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        )  # fmt: skip
        text = CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
        )  # fmt: skip
    else:
        unet = UNet2DConditionModel(
            sample_size=16, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        )  # fmt: skip
        vae = AutoencoderKL(
            latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8, sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        )  # fmt: skip
        text = tiny_text_config()
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
    )
    return unet, vae, CLIPTextModel(text), scheduler, text.vocab_size, text.max_position_embeddings


def build_sd3_models(model: str):
    """(transformer, VAE, flow-matching scheduler, text-state width, pooled width) with random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if model == "sd3-medium":
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192,
        )  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, sample_size=1024,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
        )  # fmt: skip
    else:
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        )  # fmt: skip
        vae = build_models("tiny")[1]
        vae.register_to_config(shift_factor=0.1)
    config = transformer.config
    return (
        transformer,
        vae,
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        config.joint_attention_dim,
        config.pooled_projection_dim,
    )


def sd3_frozen_models(vae, text_width: int, pooled_width: int) -> FrozenModels:
    """SD3's frozen side for the step: the VAE, and one caption's text states (77 CLIP and 77 T5 rows, as the
    SD3 scripts' --max_sequence_length) in the table the script fills before training. The tiny CLIPs stand in
    for the encoders, which the table makes the step skip."""
    from transformers import CLIPTextModelWithProjection

    clip = CLIPTextModelWithProjection(tiny_text_config())
    frozen = FrozenModels(family="sd3", vae=vae, text_encoder=clip, tokenizer=None, text_encoder_2=clip)
    frozen.text_states = PrecomputedTextStates(frozen)
    frozen.text_states.rows = {"a caption": 0}
    frozen.text_states.states = [torch.randn(2 * 77, text_width)]
    frozen.text_states.pooled = [torch.randn(pooled_width)]
    return frozen


def cast_text_states(frozen: FrozenModels) -> None:
    """The table in the encoders' dtype, as the script computes it."""
    table = frozen.text_states
    table.states = [state.to(frozen.weight_dtype) for state in table.states]
    table.pooled = [pooled.to(frozen.weight_dtype) for pooled in table.pooled]


def one_configuration(options: argparse.Namespace, mixed_precision: str, latents: str) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=options.device == "cpu")
    torch.manual_seed(0)
    flow = None
    if options.model in SD3_MODELS:
        unet, vae, scheduler, text_width, pooled_width = build_sd3_models(options.model)
        frozen = sd3_frozen_models(vae, text_width, pooled_width)
        total = sum(p.numel() for module in (unet, vae) for p in module.parameters())
        vocabulary, text_length, flow = 2, 2, FlowMatchingSettings()
    else:
        unet, vae, text_encoder, scheduler, vocabulary, text_length = build_models(options.model)
        total = sum(p.numel() for module in (unet, vae, text_encoder) for p in module.parameters())
        frozen = FrozenModels(vae=vae, text_encoder=text_encoder, tokenizer=None)
    if options.full:
        unet.requires_grad_(True)
    else:
        add_lora(unet, options.rank, layers=SD3_LORA_LAYERS if flow else LORA_TARGET_MODULES)
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    flags = argparse.Namespace(use_lora=not options.full, pretrained_vae_model_name_or_path=None)
    place_models(unet, frozen, accelerator.device, accelerator.mixed_precision, flags)
    if flow is not None:
        cast_text_states(frozen)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    loss_args = pu_loss_flags([], default_nonnegative="abs")  # the text-to-image script's defaults
    loss_args.noise_offset, loss_args.snr_gamma = 0.0, None
    loss = LossSettings.from_flags(loss_args, prior=0.1)
    run = SimpleNamespace(frozen=frozen, model=unet, noise_scheduler=scheduler, loss=loss, flow=flow)

    def batch(size: int) -> dict:
        pixels = torch.rand(size, 3, options.resolution, options.resolution, device=accelerator.device) * 2 - 1
        text = {"input_ids": torch.randint(0, vocabulary, (size, text_length), device=accelerator.device)}
        if flow is not None:  # the caption's row in the table of text states
            text["text_state_row"] = torch.zeros(size, dtype=torch.long)
        if latents == "cached":  # what --cache_latents serves: the VAE ran once, before training
            with torch.no_grad():
                parameters = vae.encode(pixels.to(vae.dtype)).latent_dist.parameters
            return {"latent_parameters": parameters, **text}
        return {"pixel_values": pixels, **text}

    unlabeled, sensitive = batch(options.batch_size), batch(options.sensitive_batch_size)
    generator = torch.Generator(accelerator.device).manual_seed(0)

    def step() -> None:
        risk = training_step(run, unlabeled, sensitive, loss_args, generator)
        accelerator.backward(risk.loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(options.warmup):
        step()
    timings = []
    for _ in range(options.steps):
        synchronize(str(accelerator.device))
        start = time.perf_counter()
        step()
        synchronize(str(accelerator.device))
        timings.append(time.perf_counter() - start)
    step_seconds = sorted(timings)[len(timings) // 2]
    return {
        "mixed_precision": mixed_precision,
        "latents": latents,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": total,
        "images_per_step": options.batch_size + options.sensitive_batch_size,
        "step_ms": step_seconds * 1e3,
        "images_per_second": (options.batch_size + options.sensitive_batch_size) / step_seconds,
        "peak_memory_mb": peak_memory_mb(str(accelerator.device)),
        "device": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu",
    }


def table(options: argparse.Namespace, results: list[dict]) -> str:
    what = (
        f"full {'transformer' if options.model in SD3_MODELS else 'UNet'}"
        if options.full
        else f"LoRA rank {options.rank}"
    )
    checkpointing = "on" if options.gradient_checkpointing else "off"
    lines = [
        f"{options.model}, {options.resolution} px, {what}, gradient checkpointing {checkpointing},"
        f" {options.batch_size} U + {options.sensitive_batch_size} S images per step, device {results[0]['device']},"
        f" median of {options.steps} steps",
        "",
        "| mixed precision | latents | trainable / total params | ms/step | images/s | peak memory (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['mixed_precision']} | {r['latents']} | {r['trainable_parameters']:,}"
            f" / {r['total_parameters'] / 1e6:.1f}M | {r['step_ms']:.1f} | {r['images_per_second']:.2f}"
            f" | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "tiny", *SD3_MODELS), default="sd15")
    parser.add_argument("--mixed_precision", nargs="+", choices=("no", "fp16", "bf16"), default=["fp16", "bf16"])
    parser.add_argument("--resolution", type=POSITIVE_INT, default=512)
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=1, help="U images per step.")
    parser.add_argument("--sensitive_batch_size", type=POSITIVE_INT, default=1, help="S images per step.")
    parser.add_argument("--full", action="store_true", help="Train the whole UNet instead of LoRA adapters.")
    parser.add_argument("--rank", type=POSITIVE_INT, default=4)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=POSITIVE_INT, default=10, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=NON_NEGATIVE_INT, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--latents",
        nargs="+",
        choices=("encoded", "cached"),
        default=["encoded", "cached"],
        help="encoded: the VAE encodes every step's images; cached: they come from --cache_latents.",
    )
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # one (mixed precision, latents) configuration
    show_ranges(parser)
    args = parser.parse_args(argv)
    if args.device == "cpu" and ("fp16" in args.mixed_precision or (args.one and args.one[0] == "fp16")):
        parser.error("--mixed_precision fp16 needs a GPU; on the CPU use no or bf16")
    return args


def main(argv: list[str] | None = None) -> str:
    options = parse_args(argv)
    if options.one:
        print(json.dumps(one_configuration(options, *options.one)))
        return ""
    results = []
    passed_on = list(argv if argv is not None else sys.argv[1:])
    for mode in options.mixed_precision:
        for latents in options.latents:
            command = [sys.executable, __file__, *passed_on, "--one", mode, latents]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
    report = table(options, results)
    print(report)
    return report


if __name__ == "__main__":
    main()
