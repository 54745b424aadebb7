"""The flow-matching step (SD3) against a reference written out here from the rectified-flow equations."""

import math

import pytest
import torch

from pu_diffusion.errors import InputError
from pu_diffusion.flow_matching import (
    FlowMatchingSettings,
    draw_sigmas,
    flow_matching_losses,
    loss_weights,
    noise_band,
    noisy_latents,
    prediction_and_target,
)
from pu_diffusion.objective import LossSettings, risk_in_band

#: The text-to-image defaults: PU with the absolute value, no positive risk, the band SNR <= 8.6.
TEXT_TO_IMAGE_LOSS = LossSettings(
    loss_type="pu", prior=0.1, nonnegative="abs", positive_risk_weight=0.0, sensitive_max_snr=8.6
)


def flow_scheduler(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def shifted_grid_sigma(index: torch.Tensor, shift: float, num_timesteps: int = 1000) -> torch.Tensor:
    """SD3's training grid by hand: t = N, N-1, ..., 1; s = t / N; sigma = shift s / (1 + (shift - 1) s)."""
    s = (num_timesteps - index.double()) / num_timesteps
    return (shift * s / (1 + (shift - 1) * s)).float()


def test_logit_normal_draws_are_the_grid_points_of_sigmoid_normal_u():
    settings = FlowMatchingSettings(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=0.7)
    timesteps, sigmas = draw_sigmas(flow_scheduler(), 64, settings, generator=torch.Generator().manual_seed(5))
    u = torch.sigmoid(torch.normal(0.3, 0.7, size=(64,), generator=torch.Generator().manual_seed(5)))
    expected = shifted_grid_sigma((u * 1000).long(), shift=3.0)
    assert torch.allclose(sigmas, expected, atol=1e-6)
    assert torch.allclose(timesteps, expected * 1000, atol=1e-3)  # the transformer's timestep is 1000 sigma


def test_the_mode_scheme_at_u_zero_takes_the_grids_last_point_not_past_it(monkeypatch):
    scheduler = flow_scheduler()
    # The mode scheme maps u = 0 to 1, which would be index 1000 of a 1000-point grid.
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros(2))
    _, sigmas = draw_sigmas(scheduler, 2, FlowMatchingSettings(weighting_scheme="mode"))
    assert sigmas.tolist() == pytest.approx([scheduler.sigmas[-1].item()] * 2)


def test_the_path_runs_from_the_image_at_sigma_zero_to_the_noise_at_one():
    clean, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    noisy = noisy_latents(clean, noise, torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(noisy[0], clean[0]) and torch.equal(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.75 * clean[1] + 0.25 * noise[1])


def test_preconditioned_error_is_sigma_times_the_velocity_error():
    """x_sigma - sigma v - x_0 = sigma ((noise - x_0) - v): a perfect velocity is a perfect x_0 estimate."""
    clean, noise, output = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigmas = torch.tensor([0.2, 0.9])
    noisy = noisy_latents(clean, noise, sigmas)
    velocity_pred, velocity = prediction_and_target(output, noisy, clean, noise, sigmas, precondition_outputs=False)
    assert torch.equal(velocity_pred, output) and torch.allclose(velocity, noise - clean)
    x0_pred, x0 = prediction_and_target(output, noisy, clean, noise, sigmas, precondition_outputs=True)
    assert torch.equal(x0, clean)
    assert torch.allclose(x0_pred - x0, sigmas.view(-1, 1, 1, 1) * (velocity - output), atol=1e-6)
    perfect, _ = prediction_and_target(noise - clean, noisy, clean, noise, sigmas, precondition_outputs=True)
    assert torch.allclose(perfect, clean, atol=1e-6)


def test_loss_weights_by_hand():
    sigmas = torch.tensor([0.5, 0.25])
    assert loss_weights("sigma_sqrt", sigmas).tolist() == pytest.approx([4.0, 16.0])
    # cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)); at 0.5 the bracket is 0.5, at 0.25 it is 0.625.
    assert loss_weights("cosmap", sigmas).tolist() == pytest.approx([4 / math.pi, 3.2 / math.pi])
    for scheme in ("logit_normal", "mode", "none"):
        assert loss_weights(scheme, sigmas).tolist() == [1.0, 1.0]


def test_the_band_is_an_snr_bound_and_ddpm_timesteps_are_refused():
    sigmas = torch.tensor([0.2, 0.25, 0.26, 0.9])  # SNR 16, 9, 8.2, 0.012
    assert noise_band(sigmas, TEXT_TO_IMAGE_LOSS).tolist() == [False, False, True, True]
    every_draw = LossSettings(loss_type="pu", prior=0.1, nonnegative="abs", positive_risk_weight=0.0)
    assert noise_band(sigmas, every_draw) is None
    by_timestep = LossSettings(
        loss_type="pu", prior=0.1, nonnegative="abs", positive_risk_weight=0.0, sensitive_min_timestep=100
    )
    with pytest.raises(InputError, match="--sensitive_min_timestep 100: .* --sensitive_max_snr"):
        noise_band(sigmas, by_timestep)
    with pytest.raises(InputError, match="--weighting_scheme 'uniform'"):
        FlowMatchingSettings(weighting_scheme="uniform")


def reference_risk(output, clean, noise, sigmas, num_unlabeled, prior, max_snr, scheme, precondition):
    """The PU risk with |r| (the text-to-image default), written out image by image from the equations."""
    unlabeled_in, unlabeled_out, sensitive_in = [], [], []
    for i in range(len(sigmas)):
        sigma = sigmas[i]
        noisy = (1 - sigma) * clean[i] + sigma * noise[i]
        if precondition:
            error = (noisy - sigma * output[i]) - clean[i]
        else:
            error = output[i] - (noise[i] - clean[i])
        weight = {"sigma_sqrt": sigma**-2, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))}.get(scheme, 1.0)
        loss = weight * (error**2).sum()
        in_band = ((1 - sigma) / sigma) ** 2 <= max_snr
        if i < num_unlabeled:
            (unlabeled_in if in_band else unlabeled_out).append(loss)
        elif in_band:
            sensitive_in.append(loss)
    num_sensitive = len(sigmas) - num_unlabeled
    band_risk = sum(unlabeled_in) / num_unlabeled - prior * sum(sensitive_in) / num_sensitive
    return abs(band_risk) + sum(unlabeled_out) / num_unlabeled


@pytest.mark.parametrize("scheme, precondition", [("logit_normal", True), ("sigma_sqrt", False), ("cosmap", True)])
def test_risk_and_its_gradient_match_the_reference(scheme, precondition):
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(6, 4, 3, 3, generator=generator), torch.randn(6, 4, 3, 3, generator=generator)
    sigmas = torch.tensor([0.1, 0.3, 0.6, 0.95, 0.2, 0.7])  # U: 4 (one outside the band), S: 2 (one outside)
    output = torch.randn(6, 4, 3, 3, generator=generator, requires_grad=True)
    settings = FlowMatchingSettings(weighting_scheme=scheme, precondition_outputs=precondition)
    latents = (clean, noise, noisy_latents(clean, noise, sigmas))
    per_sample, in_band = flow_matching_losses(TEXT_TO_IMAGE_LOSS, settings, output, latents, sigmas)
    risk = risk_in_band(TEXT_TO_IMAGE_LOSS, per_sample, in_band, num_unlabeled=4)
    (ours,) = torch.autograd.grad(risk.loss, output)

    reference_output = output.detach().double().requires_grad_(True)
    reference = reference_risk(
        reference_output, clean.double(), noise.double(), sigmas.double(), 4, 0.1, 8.6, scheme, precondition
    )
    (expected,) = torch.autograd.grad(reference, reference_output)
    assert risk.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-6)
