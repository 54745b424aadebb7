"""Stable Diffusion 3's flags in train_pu_text_to_image.py: the SD3 scripts' names and defaults, and which
flags mean nothing for the base's family (refused before any weights load)."""

from __future__ import annotations

import argparse

from pu_diffusion import flow_matching
from pu_diffusion.errors import InputError
from pu_diffusion.flags import POSITIVE_FLOAT, POSITIVE_INT
from pu_diffusion.flow_matching import FlowMatchingSettings

#: T5's tokens per caption on SD3 (--max_sequence_length), as in Diffusers' SD3 scripts.
DEFAULT_MAX_SEQUENCE_LENGTH = 77
#: Flags of the UNet families (SD, SDXL) that mean nothing on SD3, with the value that counts as not given.
UNET_ONLY_FLAGS = {"snr_gamma": None, "prediction_type": None, "noise_offset": 0.0, "sensitive_min_timestep": 0}
#: SD3's flags (Diffusers' SD3 scripts' names), None unless given.
SD3_FLAGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs", "max_sequence_length")


def add_sd3_arguments(parser: argparse.ArgumentParser) -> None:
    """The flow-matching flags of Diffusers' SD3 scripts, same names and defaults; refused on SD and SDXL."""
    group = parser.add_argument_group("Stable Diffusion 3 (refused on SD and SDXL)")
    group.add_argument(
        "--weighting_scheme",
        choices=flow_matching.WEIGHTING_SCHEMES,
        default=None,
        help="How sigma is drawn (logit_normal, mode) or each error weighted (sigma_sqrt, cosmap). Default:"
        " logit_normal. The PU risk takes each image's weighted error as its loss l: an ELBO of noise-augmented"
        " data where the weighting is monotone in the noise level (Kingma and Gao, NeurIPS 2023), so the S terms"
        " keep their meaning; --paper_loss's -log(1 - exp(-l)) reads l as a likelihood bound, which holds only"
        " approximately under other weightings.",
    )
    group.add_argument("--logit_mean", type=float, default=None, help="logit_normal's mean (default 0.0).")
    group.add_argument("--logit_std", type=POSITIVE_FLOAT, default=None, help="logit_normal's std (default 1.0).")
    group.add_argument("--mode_scale", type=float, default=None, help="The mode scheme's scale (default 1.29).")
    group.add_argument(
        "--precondition_outputs",
        type=int,
        choices=(0, 1),
        default=None,
        help="1 (default): regress x_0 from the output, as in EDM; 0: the velocity.",
    )
    group.add_argument(
        "--max_sequence_length",
        type=POSITIVE_INT,
        default=None,
        help=f"T5's tokens per caption (default {DEFAULT_MAX_SEQUENCE_LENGTH}); refused without T5.",
    )


def check_family_flags(args: argparse.Namespace, family: str) -> None:
    """A flag that means nothing for the base's family is refused, naming it, before any weights load."""
    if family == "sd3":
        given = [flag for flag, unset in UNET_ONLY_FLAGS.items() if getattr(args, flag, unset) != unset]
        if given:
            raise InputError(
                f"--{given[0]} is for DDPM-trained UNets (SD, SDXL); {args.pretrained_model_name_or_path} is SD3,"
                " trained by flow matching (its flags: --weighting_scheme, --precondition_outputs; the S terms'"
                " band: --sensitive_max_snr)"
            )
        return
    given = [flag for flag in SD3_FLAGS if getattr(args, flag, None) is not None]
    if given:
        raise InputError(
            f"--{given[0]} is a Stable Diffusion 3 flag; {args.pretrained_model_name_or_path} is {family.upper()}"
        )


def flow_settings(args: argparse.Namespace) -> FlowMatchingSettings:
    """The SD3 flags given, the SD3 scripts' defaults for the rest."""
    given = {
        flag: getattr(args, flag)
        for flag in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
        if getattr(args, flag) is not None
    }
    if args.precondition_outputs is not None:
        given["precondition_outputs"] = bool(args.precondition_outputs)
    return FlowMatchingSettings(**given)
