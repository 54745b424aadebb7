"""The frozen side of a text-to-image step: the VAE and text encoders of SD, SDXL or SD3, each family's text
states from a batch's token ids, and SD3's states of each distinct caption computed once."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


#: The pipelines this script fine-tunes, by model_index.json's class name: (family, the trained model's folder).
FAMILIES = {
    "StableDiffusionPipeline": ("sd", "unet"),
    "StableDiffusionXLPipeline": ("sdxl", "unet"),
    "StableDiffusion3Pipeline": ("sd3", "transformer"),
}


@dataclass(kw_only=True)
class FrozenModels:
    """What turns a batch into latents and text states: the VAE, the text encoder(s) and their tokenizer(s).
    SDXL adds a second CLIP (with projection); SD3 has two CLIPs with projection and an optional T5."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    family: str = "sd"  # sd, sdxl or sd3
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    text_encoder_3: torch.nn.Module | None = None  # SD3's T5, absent from bases saved without it
    tokenizer_3: object | None = None
    weight_dtype: torch.dtype = torch.float32
    joint_attention_dim: int = 0  # SD3: the width of the transformer's text states
    patch_size: int = 1  # SD3: latent pixels per side of one transformer token
    max_sequence_length: int = 77  # SD3: T5's tokens (zeros in their place without T5)
    text_states: PrecomputedTextStates | None = None  # SD3: each distinct caption's, computed once
    #: Components model_index.json lists as absent (an SD3 base saved without T5), as from_pretrained's None.
    absent: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def is_sd3(self) -> bool:
        return self.family == "sd3"

    @property
    def model_folder(self) -> str:
        """The trained model's folder and keyword in the pipeline: unet, or SD3's transformer."""
        return "transformer" if self.is_sd3 else "unet"

    def sampling_arguments(self) -> dict:
        """The pipeline call's arguments that make it condition as training does: SD3's T5 length (the
        pipeline's default, 256, may not be what was trained)."""
        return {"max_sequence_length": self.max_sequence_length} if self.is_sd3 else {}

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, next(name for name, (family, _) in FAMILIES.items() if family == self.family))

    def encoders(self) -> list[torch.nn.Module]:
        return [model for model in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if model is not None]

    def components(self) -> dict:
        """The frozen parts as pipeline components (``from_pretrained`` keyword arguments)."""
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if self.is_sd3:
            return {
                **parts,
                "text_encoder_2": self.text_encoder_2,
                "tokenizer_2": self.tokenizer_2,
                "text_encoder_3": self.text_encoder_3,
                "tokenizer_3": self.tokenizer_3,
            }
        if self.is_sdxl:
            return {**parts, "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        return {**parts, "safety_checker": None}


def encode_prompts(frozen: FrozenModels, batches: list[dict]) -> tuple[torch.Tensor, dict | None]:
    """(text states, added conditions). SD: the text encoder's last hidden states. SDXL, as its pipeline
    does: both encoders' penultimate hidden states side by side, the second's pooled projection, and the
    batch's time ids (original size, crop top-left, target size). SD3: see ``encode_sd3_prompts``."""
    if frozen.is_sd3:
        return encode_sd3_prompts(frozen, batches)
    input_ids = torch.cat([batch["input_ids"] for batch in batches])
    if not frozen.is_sdxl:
        return frozen.text_encoder(input_ids, return_dict=False)[0], None
    first = frozen.text_encoder(input_ids, output_hidden_states=True)
    second = frozen.text_encoder_2(torch.cat([batch["input_ids_2"] for batch in batches]), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    time_ids = torch.cat([batch["time_ids"] for batch in batches]).to(states.device)
    return states, {"text_embeds": second.text_embeds, "time_ids": time_ids}


def encode_sd3_prompts(frozen: FrozenModels, batches: list[dict]) -> tuple[torch.Tensor, dict]:
    """SD3's text states, as its pipeline's ``encode_prompt`` makes them: both CLIPs' penultimate hidden states
    side by side, zero-padded to the transformer's width, then T5's last hidden states (zeros without T5)
    after them along the sequence; the pooled projections are both CLIPs' side by side. Taken from
    :class:`PrecomputedTextStates` when the batches carry their rows."""

    def ids(key: str) -> torch.Tensor:
        return torch.cat([batch[key] for batch in batches])

    if frozen.text_states is not None and all("text_state_row" in batch for batch in batches):
        return frozen.text_states.lookup(ids("text_state_row"), frozen.text_encoder.device)
    first = frozen.text_encoder(ids("input_ids"), output_hidden_states=True)
    second = frozen.text_encoder_2(ids("input_ids_2"), output_hidden_states=True)
    clip_states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    if frozen.text_encoder_3 is not None:
        t5_states = frozen.text_encoder_3(ids("input_ids_3"))[0]
    else:
        shape = (len(clip_states), frozen.max_sequence_length, frozen.joint_attention_dim)
        t5_states = clip_states.new_zeros(shape)
    clip_states = torch.nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)
    return torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2), {"pooled_projections": pooled}


#: SD3's text states are computed once, before training, when U's or S's distinct captions number at most this
#: (kept on the CPU; T5-XXL's states of one caption take 2.7 MB in bfloat16); above it, at every step.
MAX_PRECOMPUTED_CAPTIONS = 1024


class PrecomputedTextStates:
    """SD3's text states and pooled projections of each distinct caption, computed once by
    :func:`encode_sd3_prompts`: U's and S's captions repeat from epoch to epoch (in the paper's setting all of
    U shares one), and SD3's three text encoders, T5 above all, cost more per step than its LoRA.

    Captions are encoded in sorted order, 16 at a time, so that every process and every resume computes the
    same states; a batch then carries each caption's row (``text_state_row``)."""

    def __init__(self, frozen: FrozenModels):
        self.frozen = frozen
        self.rows: dict[str, int] = {}
        self.states: list[torch.Tensor] = []
        self.pooled: list[torch.Tensor] = []

    def add(self, captions: set[str], tokenize) -> bool:
        """Encode the ``captions`` not yet held; False (and nothing kept) past MAX_PRECOMPUTED_CAPTIONS."""
        new = sorted(captions - self.rows.keys())
        if len(self.rows) + len(new) > MAX_PRECOMPUTED_CAPTIONS:
            return False
        device = self.frozen.text_encoder.device
        with torch.no_grad():
            for start in range(0, len(new), 16):
                chunk = new[start : start + 16]
                tokens = [tokenize(caption) for caption in chunk]
                batch = {key: torch.stack([row[key] for row in tokens]).to(device) for key in tokens[0]}
                states, added = encode_sd3_prompts(self.frozen, [batch])
                for caption, state, pooled in zip(chunk, states.cpu(), added["pooled_projections"].cpu(), strict=True):
                    self.rows[caption] = len(self.states)
                    self.states.append(state)
                    self.pooled.append(pooled)
        logger.info("SD3: text states of %d distinct captions computed once, before training", len(self.rows))
        return True

    def lookup(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        states = torch.stack([self.states[row] for row in rows.tolist()]).to(device)
        pooled = torch.stack([self.pooled[row] for row in rows.tolist()]).to(device)
        return states, {"pooled_projections": pooled}


def distinct_captions(captions: list, caption_dropout_rate: float) -> set[str]:
    """Every caption a dataset can give: each cell's (or each of a list's), and the empty one with dropout."""
    found = {text for caption in captions for text in ([caption] if isinstance(caption, str) else caption)}
    return found | ({""} if caption_dropout_rate else set())
