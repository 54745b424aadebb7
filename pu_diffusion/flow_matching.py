"""The PU risk on flow-matching models (Stable Diffusion 3 / 3.5): Diffusers' SD3 training step, then our risk.

The step follows Diffusers' SD3 scripts (``train_dreambooth_lora_sd3.py``):
sigma is drawn by ``--weighting_scheme``, the latents move along the rectified
flow ``x_sigma = (1 - sigma) x_0 + sigma * noise``, the transformer predicts
the velocity ``noise - x_0`` (or, with ``--precondition_outputs``, its output
is turned into an estimate of ``x_0``), and each squared error is weighted by
the scheme. Each image's weighted error summed over the latent is the ``l(x)``
of Eq. (8), and the PU risk (Eq. 18-19) is taken over them as for DDPM.

The noise band of the S terms is read as an SNR, ``((1 - sigma) / sigma)^2``
(``pu_loss.flow_matching_snr``), so ``--sensitive_max_snr 8.6`` means the
noise level it means under DDPM: sigma >= 0.254. ``--sensitive_min_timestep``
counts DDPM steps and is refused here.

``train_pu_text_to_image.py`` calls it for SD3 bases (``text_to_image.flow_losses_of``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pu_diffusion.errors import InputError
from pu_diffusion.objective import LossSettings, weighted_losses
from pu_loss import flow_matching_snr

#: ``--weighting_scheme`` of Diffusers' SD3 scripts: how sigma is drawn (logit_normal, mode) or how each
#: draw's squared error is weighted (sigma_sqrt, cosmap); none: uniform draws, weight 1.
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass(frozen=True)
class FlowMatchingSettings:
    """The SD3 scripts' flow-matching flags, with their defaults."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise InputError(f"--weighting_scheme {self.weighting_scheme!r}: use one of {WEIGHTING_SCHEMES}")


def draw_sigmas(
    noise_scheduler, batch_size: int, settings: FlowMatchingSettings, generator=None, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas), one per image, from the training grid of a ``FlowMatchEulerDiscreteScheduler``.

    A uniform ``u`` in [0, 1) (logit-normal or mode-shaped by the scheme) picks
    a point of the scheduler's grid, whose shift (SD3: 3.0) then holds.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        settings.weighting_scheme,
        batch_size,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        device=device,
        generator=generator,
    )
    num_timesteps = noise_scheduler.config.num_train_timesteps
    # The mode scheme maps u = 0 to 1; the grid's last point stands for it.
    indices = (u * num_timesteps).long().clamp(max=num_timesteps - 1).cpu()
    timesteps = noise_scheduler.timesteps[indices].to(device)
    sigmas = noise_scheduler.sigmas[indices].to(device=device, dtype=torch.float32)
    return timesteps, sigmas


def per_image(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One sigma per image, shaped to broadcast over ``like``'s channels and pixels."""
    return sigmas.view(-1, *[1] * (like.ndim - 1)).to(like.dtype)


def noisy_latents(clean: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow path: ``x_sigma = (1 - sigma) x_0 + sigma * noise``."""
    sigma = per_image(sigmas, clean)
    return (1 - sigma) * clean + sigma * noise


def prediction_and_target(model_output, noisy, clean, noise, sigmas, precondition_outputs: bool):
    """What the squared error compares. Velocity: ``(output, noise - x_0)``. Preconditioned, as in EDM and the
    SD3 scripts: ``(x_sigma - sigma * output, x_0)``, whose error is sigma times the velocity's."""
    if precondition_outputs:
        return noisy - per_image(sigmas, model_output) * model_output, clean
    return model_output, noise - clean


def loss_weights(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """One weight per image: sigma^-2 (sigma_sqrt), 2 / (pi (1 - 2 sigma + 2 sigma^2)) (cosmap), else 1."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()).reshape(-1)


def noise_band(sigmas: torch.Tensor, loss: LossSettings) -> torch.Tensor | None:
    """Which draws the S terms use: SNR ``((1 - sigma) / sigma)^2 <= --sensitive_max_snr``; None: every draw."""
    if loss.sensitive_min_timestep > 0:
        raise InputError(
            f"--sensitive_min_timestep {loss.sensitive_min_timestep}: it counts DDPM timesteps, which a"
            " flow-matching model does not have; give the band as --sensitive_max_snr (8.6: sigma >= 0.254)"
        )
    if loss.sensitive_max_snr is None:
        return None
    return flow_matching_snr(sigmas) <= loss.sensitive_max_snr


def flow_matching_losses(
    loss: LossSettings,
    settings: FlowMatchingSettings,
    model_output: torch.Tensor,
    latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sigmas: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weighted l(x) per image, which draws are in the S terms' band) of one forward; ``latents`` are the
    (clean, noise, noisy) latents of its images. ``objective.risk_in_band`` turns them into the risk."""
    clean, noise, noisy = latents
    prediction, target = prediction_and_target(
        model_output.float(), noisy.float(), clean, noise, sigmas, settings.precondition_outputs
    )
    per_sample = weighted_losses(loss, prediction, target, loss_weights(settings.weighting_scheme, sigmas))
    return per_sample, noise_band(sigmas, loss)
