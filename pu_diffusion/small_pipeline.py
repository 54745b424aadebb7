"""A small Stable Diffusion pipeline built from nothing, for CPUs and for machines without the Hub.

Every part is the class a Hub checkpoint uses (``CLIPTokenizer``,
``CLIPTextModel``, ``AutoencoderKL``, ``UNet2DConditionModel``, a DDIM
scheduler), so ``StableDiffusionPipeline.from_pretrained`` loads the folder
and every flag of the text-to-image script works on it. Only the sizes are
small: 32 px images, 8 x 8 x 4 latents, a word vocabulary from the captions.
The text encoder stays as initialised from the seed (the UNet learns to read
it); the VAE is trained here on the images.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Special tokens of CLIP's tokenizer: start, end (also the padding).
START, END = "<|startoftext|>", "<|endoftext|>"


def caption_words(captions: list[str]) -> list[str]:
    """The distinct words of the captions, as CLIP's tokenizer splits and lower-cases them, sorted."""
    return sorted({word for caption in captions for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", caption.lower())})


def write_word_tokenizer(folder: Path, captions: list[str]):
    """A CLIPTokenizer for ``captions``, written to ``folder``: its merges build each of their words from the
    first letter on, and its length fits the longest caption.

    Byte-pair encoding applies the lowest-ranked merge anywhere in a word, so
    a word whose inside starts another word ("ri" in "stripes", from "ring")
    can end up in a few pieces; every piece is in the vocabulary, so each
    caption still has one fixed token sequence. Single letters are in it too,
    so an unseen word is spelled out.
    """
    from transformers import CLIPTokenizer

    words = caption_words(captions)
    letters = sorted({letter for word in words for letter in word} | set("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = [START, END, *letters, *(letter + "</w>" for letter in letters)]
    merges = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        joined = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{joined} {piece}")
            joined += piece
            if joined not in vocabulary:
                vocabulary.append(joined)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    longest = max(len(tokenizer.tokenize(caption)) for caption in captions)
    tokenizer.model_max_length = longest + 2  # + the start and end tokens
    logger.info("tokenizer: %d words, %d tokens, captions up to %d tokens", len(words), len(vocabulary), longest)
    return tokenizer


def text_encoder(vocabulary_size: int, max_length: int, seed: int, with_projection: bool = False):
    """A two-layer CLIP text encoder of width 64, initialised from ``seed``; with its pooled projection (width
    64) for SD3."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocabulary_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=64,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_word_tokenizer(captions: list[str]):
    """A T5-style tokenizer for ``captions`` (one token per word, then ``</s>``, padded with ``<pad>``; an unseen
    word is ``<unk>``) whose length fits the longest caption, so that SD3's T5 stream is as short as the
    captions: StableDiffusion3Pipeline's default of 256 tokens would be four times the rest of the sequence."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocabulary = {token: index for index, token in enumerate([*specials, *caption_words(captions)])}
    words = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.model_max_length = max(len(tokenizer(caption).input_ids) for caption in captions)
    return tokenizer


def t5_encoder(vocabulary_size: int, width: int, seed: int):
    """A two-layer T5 encoder of ``width`` (SD3 reads T5's states at the transformer's joint attention width),
    initialised from ``seed`` and left so, as the CLIPs are."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocabulary_size, d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2, num_heads=4
    )
    return T5EncoderModel(config).eval()


def autoencoder(seed: int):
    """An AutoencoderKL from 32 x 32 x 3 images to 8 x 8 x 4 latents (two downsamplings)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )


def denoiser(cross_attention_dim: int, seed: int):
    """A UNet2DConditionModel on 8 x 8 x 4 latents with cross-attention at every level."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def flow_transformer(text_width: int, seed: int):
    """An SD3Transformer2DModel (MMDiT) on 8 x 8 x 4 latents, one token per latent pixel, six joint blocks of
    width 128; its text input is two CLIP encoders' states side by side (2 x ``text_width``)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=128,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=8,
    )


def flow_scheduler():
    """SD3's flow-matching sampler without its shift: SD3 shifts sigma up (3.0) for 128 x 128 latents, whose
    pixels share more of their neighbours' information than 8 x 8 ones do."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def noise_scheduler():
    """Stable Diffusion's noise schedule as a DDIMScheduler: training reads it as DDPM's, and sampling takes
    DDIM's few steps."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def train_autoencoder(
    vae, images: torch.Tensor, steps: int, batch_size: int, seed: int, kl_weight: float = 1e-6, centre=False
):
    """Fit ``vae`` to ``images`` (N x 3 x 32 x 32 in [-1, 1]): squared error plus a small KL term, as Stable
    Diffusion's VAE has (without its perceptual and adversarial terms). Sets ``scaling_factor`` so that the
    latents the denoiser sees have unit standard deviation, and with ``centre`` (SD3's VAE) ``shift_factor``
    so that they have zero mean. Returns the last 100 steps' mean squared error."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    vae.train()
    errors = []
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        error = torch.nn.functional.mse_loss(reconstruction, batch)
        loss = error + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        errors.append(error.item())
        if (step + 1) % 200 == 0:
            logger.info("VAE step %d/%d: squared error %.4f", step + 1, steps, sum(errors[-200:]) / 200)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images[:1024].split(256)])
    shift = float(latents.mean()) if centre else None
    vae.register_to_config(scaling_factor=float(1 / (latents - (shift or 0.0)).std()), shift_factor=shift)
    return sum(errors[-100:]) / min(100, len(errors))
