"""The loss glue between a training step and pu_loss.py: the target, the noise band of the S terms, the SNR."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from pu_diffusion.errors import InputError
from pu_loss import RiskOutput, compute_risk, per_sample_diffusion_loss

#: The default noise band of the S terms, chosen on the digits (docs/benchmark.md) as t >= 100 of the linear
#: 1,000-step DDPM schedule: SNR(100) = 8.54, SNR(99) = 8.71. Under Stable Diffusion's scaled-linear schedule
#: it is t >= 99; under the cosine schedule t >= 203 (the same noise level, a later step).
DEFAULT_SENSITIVE_MAX_SNR = 8.6


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def set_prediction_type(noise_scheduler, args: argparse.Namespace) -> None:
    """--prediction_type overrides the pretrained scheduler's; a type we cannot train is refused at load."""
    if args.prediction_type:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    elif noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: its scheduler predicts"
            f" {noise_scheduler.config.prediction_type!r}; pass --prediction_type, one of {PREDICTION_TYPES}"
        )


def check_noise_band(noise_scheduler, args: argparse.Namespace) -> None:
    """The S terms' noise band must hold some timesteps of the schedule."""
    num_timesteps = noise_scheduler.config.num_train_timesteps
    if args.sensitive_min_timestep >= num_timesteps:
        raise InputError(
            f"--sensitive_min_timestep {args.sensitive_min_timestep}: the noise schedule has timesteps 0 to"
            f" {num_timesteps - 1}, so S would never count"
        )
    if args.sensitive_max_snr is not None:
        lowest = float(signal_to_noise(noise_scheduler).min())
        if lowest > args.sensitive_max_snr:
            raise InputError(
                f"--sensitive_max_snr {args.sensitive_max_snr:g}: the noise schedule's lowest signal-to-noise"
                f" ratio is {lowest:.4g}, so S would never count"
            )


def signal_to_noise(noise_scheduler) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) for every training timestep t of a DDPM-style scheduler."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.double()
    return (alphas_cumprod / (1 - alphas_cumprod)).float()


def diffusion_target(noise_scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The regression target of Eq. (8) for the scheduler's prediction type."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise InputError(f"--prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


@dataclass(frozen=True)
class LossSettings:
    """Everything the objective reads, settled once in ``main()``: the loss of the paper's Eq. (8)-(19) and
    our two options (the positive-risk weight and the noise band of the S terms)."""

    loss_type: str
    prior: float  # --prior, or its estimate for --prior auto
    nonnegative: str
    positive_risk_weight: float
    reduction: str = "sum"
    sensitive_max_snr: float | None = None  # the band by noise level; None: every draw
    sensitive_min_timestep: int = 0  # the band as t >= this; 0: not used

    @classmethod
    def from_flags(cls, args: argparse.Namespace, prior: float) -> LossSettings:
        """From the parsed flags (after ``checks.resolve_loss_options``) and the run's prior."""
        return cls(
            loss_type=args.loss_type,
            prior=prior,
            nonnegative=args.nonnegative,
            positive_risk_weight=args.positive_risk_weight,
            reduction=args.loss_reduction,
            sensitive_max_snr=args.sensitive_max_snr,
            sensitive_min_timestep=args.sensitive_min_timestep,
        )


def pu_objective(
    loss: LossSettings, noise_scheduler, model_pred, target, timesteps, num_unlabeled: int, weights=None
) -> RiskOutput:
    """Per-sample losses of one forward over cat([U, S]), then the risk that ``loss`` describes."""
    per_sample = weighted_losses(loss, model_pred, target, weights)
    return risk_of_losses(loss, noise_scheduler, per_sample, timesteps, num_unlabeled)


def weighted_losses(loss: LossSettings, model_pred, target, weights=None) -> torch.Tensor:
    """l(x) of Eq. (8) per sample; ``weights`` (one per sample, e.g. Min-SNR) scale each l(x) before the
    risk, so U and S terms are weighted alike."""
    per_sample = per_sample_diffusion_loss(model_pred, target, reduction=loss.reduction)
    return per_sample if weights is None else per_sample * weights


def risk_of_losses(
    loss: LossSettings, noise_scheduler, per_sample: torch.Tensor, timesteps, num_unlabeled: int
) -> RiskOutput:
    """The risk of per-sample losses of U then S (the first ``num_unlabeled`` are U's). ``timesteps`` place
    each sample in or out of the S terms' noise band."""
    return risk_in_band(loss, per_sample, noise_band(noise_scheduler, timesteps, loss), num_unlabeled)


def risk_in_band(loss: LossSettings, per_sample: torch.Tensor, in_band, num_unlabeled: int) -> RiskOutput:
    """The risk ``loss`` describes of per-sample losses of U then S; ``in_band`` (or None) marks the draws the
    S terms use."""
    return compute_risk(
        per_sample, num_unlabeled, loss.loss_type, loss.prior, loss.nonnegative, loss.positive_risk_weight, in_band
    )


def noise_band(noise_scheduler, timesteps: torch.Tensor, loss: LossSettings) -> torch.Tensor | None:
    """Which draws the S terms use: SNR(t) <= --sensitive_max_snr, or t >= --sensitive_min_timestep; None: all."""
    if loss.sensitive_min_timestep > 0:
        return timesteps >= loss.sensitive_min_timestep
    if loss.sensitive_max_snr is None:
        return None
    snr = signal_to_noise(noise_scheduler).to(timesteps.device)
    return snr[timesteps] <= loss.sensitive_max_snr
