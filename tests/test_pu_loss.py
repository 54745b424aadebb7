"""pu_loss against values worked out by hand from the paper's equations."""

import math

import pytest
import torch

from pu_loss import (
    bce_normal,
    bce_sensitive,
    compute_risk,
    flow_matching_snr,
    per_sample_diffusion_loss,
    pu_risk,
    supervised_risk,
    unsupervised_risk,
)


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def sensitive_bce_by_hand(loss):
    """Eq. (11), y = 1: -log(1 - exp(-l))."""
    return -math.log(1.0 - math.exp(-loss))


def sensitive_bce_grad_by_hand(loss):
    """d/dl of -log(1 - exp(-l)) = -exp(-l) / (1 - exp(-l)) = -1 / (exp(l) - 1)."""
    return -1.0 / (math.exp(loss) - 1.0)


# --------------------------------------------------------------------------- Eq. (8)


def test_per_sample_loss_sums_squared_error_over_non_batch_dims():
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # sample 0: 1 + 4 = 5; sample 1: 4 * 1 = 4
    assert per_sample_diffusion_loss(pred, target).tolist() == [5.0, 4.0]
    assert per_sample_diffusion_loss(pred, target, reduction="mean").tolist() == [1.25, 1.0]


def test_per_sample_loss_is_float32_for_half_inputs_and_rejects_bad_shapes():
    pred = torch.full((1, 4, 64, 64), 2.0, dtype=torch.float16)  # sum = 4 * 16384 = 65536 > fp16 max
    loss = per_sample_diffusion_loss(pred, torch.zeros_like(pred))
    assert loss.dtype == torch.float32 and loss.item() == 65536.0
    with pytest.raises(ValueError, match="shape"):
        per_sample_diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        per_sample_diffusion_loss(pred, pred, reduction="max")


# --------------------------------------------------------------------------- Eq. (10)-(11)


def test_bce_terms_match_eq_11():
    losses = leaf([0.5, 2.0, 7.0])
    assert bce_normal(losses).tolist() == [0.5, 2.0, 7.0]
    values = bce_sensitive(losses)
    for value, loss in zip(values.tolist(), [0.5, 2.0, 7.0], strict=True):
        assert value == pytest.approx(sensitive_bce_by_hand(loss), rel=1e-12)
    values.sum().backward()
    for grad, loss in zip(losses.grad.tolist(), [0.5, 2.0, 7.0], strict=True):
        assert grad == pytest.approx(sensitive_bce_grad_by_hand(loss), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss_value", [0.0, 1e-8, 1e-3, 1.0, 1e5])
def test_bce_sensitive_is_finite_with_finite_gradient(dtype, loss_value):
    losses = torch.tensor([loss_value], dtype=dtype, requires_grad=True)
    value = bce_sensitive(losses)
    value.sum().backward()
    assert value.dtype == dtype
    assert torch.isfinite(value).all()
    assert torch.isfinite(losses.grad).all()
    # Minimising the term must never lower l: the gradient is <= 0 everywhere.
    assert losses.grad.item() <= 0.0


@pytest.mark.parametrize("loss_value", [0.5, math.log(2.0), 1.0, 10.0, 20.0, 40.0, 80.0])
def test_bce_sensitive_keeps_its_relative_precision_in_float32(loss_value):
    """-log(1 - exp(-l)) ~ exp(-l) for large l: float32 must keep that, not round it to 0 (float64 by hand)."""
    loss = torch.tensor(loss_value, dtype=torch.float32, requires_grad=True)
    stored = float(loss.detach())  # the float32 value, in float64 arithmetic from here
    value = bce_sensitive(loss)
    assert value.item() == pytest.approx(-math.log1p(-math.exp(-stored)), rel=1e-6, abs=0)
    value.backward()
    assert loss.grad.item() == pytest.approx(-1.0 / math.expm1(stored), rel=1e-5, abs=0)


def test_bce_sensitive_keeps_pushing_below_its_floor():
    """Below the dtype's epsilon the value is the floor's, and the gradient is the floor's, not zero."""
    eps = torch.finfo(torch.float32).eps
    losses = torch.tensor([0.0, 1e-12], requires_grad=True)
    value = bce_sensitive(losses)
    value.sum().backward()
    expected = -math.log(-math.expm1(-eps))
    assert value.tolist() == pytest.approx([expected, expected], rel=1e-5)
    assert losses.grad.tolist() == pytest.approx([sensitive_bce_grad_by_hand(eps)] * 2, rel=1e-3)


# --------------------------------------------------------------------------- Eq. (9) and (12)


def test_unsupervised_risk_is_mean_over_u():
    risk = unsupervised_risk(leaf([1.0, 2.0, 6.0]))
    assert risk.loss.item() == pytest.approx(3.0)
    assert set(risk.to_log_dict()) == {"loss", "unlabeled_loss"}


def test_supervised_risk_matches_eq_12():
    unlabeled, sensitive = leaf([1.0, 3.0]), leaf([2.0, 4.0])
    risk = supervised_risk(unlabeled, sensitive)
    expected = 2.0 + (sensitive_bce_by_hand(2.0) + sensitive_bce_by_hand(4.0)) / 2
    assert risk.loss.item() == pytest.approx(expected, rel=1e-12)
    risk.loss.backward()
    assert unlabeled.grad.tolist() == [0.5, 0.5]
    assert sensitive.grad.tolist() == pytest.approx(
        [sensitive_bce_grad_by_hand(2.0) / 2, sensitive_bce_grad_by_hand(4.0) / 2], rel=1e-9
    )


# --------------------------------------------------------------------------- Eq. (18)-(19), Algorithm 1


def test_nnpu_positive_branch_minimises_the_unbiased_risk():
    # L^-_U = 2, L^-_S = 2, beta = 0.1: r = 2 - 0.2 = 1.8 >= 0, so the loss is beta * L^+_S + r.
    unlabeled, sensitive = leaf([1.0, 3.0]), leaf([2.0])
    risk = pu_risk(unlabeled, sensitive, prior=0.1, nonnegative="nnpu")
    assert risk.negative_risk.item() == pytest.approx(1.8)
    assert risk.positive_risk.item() == pytest.approx(sensitive_bce_by_hand(2.0))
    assert risk.loss.item() == pytest.approx(0.1 * sensitive_bce_by_hand(2.0) + 1.8, rel=1e-12)
    assert risk.correction.item() == 0.0
    assert risk.objective.item() == risk.loss.item()
    risk.loss.backward()
    assert unlabeled.grad.tolist() == [0.5, 0.5]
    # d/dl_S [beta * BCE1(l_S) - beta * l_S]
    assert sensitive.grad.item() == pytest.approx(0.1 * sensitive_bce_grad_by_hand(2.0) - 0.1, rel=1e-9)


def test_nnpu_negative_branch_steps_on_minus_r():
    # L^-_U = 0.5, L^-_S = 10, beta = 0.1: r = 0.5 - 1.0 = -0.5 < 0, so the loss is -r = 0.5.
    unlabeled, sensitive = leaf([0.5, 0.5]), leaf([10.0])
    risk = pu_risk(unlabeled, sensitive, prior=0.1, nonnegative="nnpu")
    assert risk.negative_risk.item() == pytest.approx(-0.5)
    assert risk.loss.item() == pytest.approx(0.5)
    assert risk.correction.item() == 1.0
    # What is logged as the objective is Eq. (19)'s value, beta * L^+_S + max(0, r), not the -r stepped on.
    assert risk.objective.item() == pytest.approx(0.1 * sensitive_bce_by_hand(10.0), rel=1e-12)
    risk.loss.backward()
    # Gradient of -(L^-_U - beta L^-_S): a descent step raises l on U and lowers it on S,
    # pushing r back up towards 0. The positive risk takes no part in this step.
    assert unlabeled.grad.tolist() == [-0.5, -0.5]
    assert sensitive.grad.item() == pytest.approx(0.1)


def test_abs_uses_the_absolute_negative_risk():
    unlabeled, sensitive = leaf([0.5, 0.5]), leaf([10.0])
    risk = pu_risk(unlabeled, sensitive, prior=0.1, nonnegative="abs")
    assert risk.loss.item() == pytest.approx(0.1 * sensitive_bce_by_hand(10.0) + 0.5, rel=1e-12)
    assert risk.correction is None
    risk.loss.backward()
    assert unlabeled.grad.tolist() == [-0.5, -0.5]
    assert sensitive.grad.item() == pytest.approx(0.1 * sensitive_bce_grad_by_hand(10.0) + 0.1, rel=1e-9)


def test_none_keeps_the_negative_unbiased_estimate():
    risk = pu_risk(leaf([0.5, 0.5]), leaf([10.0]), prior=0.1, nonnegative="none")
    assert risk.loss.item() == pytest.approx(0.1 * sensitive_bce_by_hand(10.0) - 0.5, rel=1e-12)


# --------------------------------------------------------------------------- our options (defaults: the paper)


def test_positive_risk_weight_scales_only_the_positive_term():
    # Same numbers as the nnpu positive branch above: r = 1.8; with w = 0 the loss is r alone.
    unlabeled, sensitive = leaf([1.0, 3.0]), leaf([2.0])
    risk = pu_risk(unlabeled, sensitive, prior=0.1, nonnegative="nnpu", positive_weight=0.0)
    assert risk.loss.item() == pytest.approx(1.8, rel=1e-12)
    assert risk.positive_risk.item() == pytest.approx(sensitive_bce_by_hand(2.0))  # still logged
    risk.loss.backward()
    assert sensitive.grad.item() == pytest.approx(-0.1, rel=1e-12)  # only -beta * d(L^-_S)/dl

    half = pu_risk(leaf([1.0, 3.0]), leaf([2.0]), prior=0.1, nonnegative="abs", positive_weight=0.5)
    assert half.loss.item() == pytest.approx(0.5 * 0.1 * sensitive_bce_by_hand(2.0) + 1.8, rel=1e-12)


def test_timestep_band_keeps_s_and_the_correction_inside_it():
    # U = [1 (in), 3 (out), 5 (in)], S = [2 (in), 40 (out)], beta = 0.1, w = 1.
    # r_band = (1 + 5) / 3 - 0.1 * 2 / 2 = 1.9; U outside the band: 3 / 3 = 1; L^+_S = BCE1(2) / 2.
    unlabeled, sensitive = leaf([1.0, 3.0, 5.0]), leaf([2.0, 40.0])
    in_band = torch.tensor([True, False, True])
    risk = pu_risk(unlabeled, sensitive, 0.1, "nnpu", 1.0, in_band, torch.tensor([True, False]))
    expected = 0.1 * sensitive_bce_by_hand(2.0) / 2 + 1.9 + 1.0
    assert risk.negative_risk.item() == pytest.approx(1.9, rel=1e-12)
    assert risk.loss.item() == pytest.approx(expected, rel=1e-12)
    assert risk.unlabeled_loss.item() == pytest.approx(3.0)  # logged over all of U
    risk.loss.backward()
    assert unlabeled.grad.tolist() == pytest.approx([1 / 3] * 3)
    assert sensitive.grad.tolist() == pytest.approx([(0.1 * sensitive_bce_grad_by_hand(2.0) - 0.1) / 2, 0.0])


def test_timestep_band_correction_fires_on_the_band_alone():
    # r_band = 0.5 / 2 - 0.1 * 10 / 1 = -0.75 < 0: minimise -r_band, plus U outside the band (8 / 2 = 4).
    unlabeled, sensitive = leaf([0.5, 8.0]), leaf([10.0])
    risk = pu_risk(unlabeled, sensitive, 0.1, "nnpu", 1.0, torch.tensor([True, False]), torch.tensor([True]))
    assert risk.correction.item() == 1.0
    assert risk.loss.item() == pytest.approx(0.75 + 4.0, rel=1e-12)
    risk.loss.backward()
    # The band's U sample is pushed up, U outside it is still fitted, S is pulled down.
    assert unlabeled.grad.tolist() == pytest.approx([-0.5, 0.5])
    assert sensitive.grad.item() == pytest.approx(0.1)


def test_defaults_and_a_band_holding_everything_are_the_paper():
    losses = leaf([1.0, 3.0, 2.0, 0.3])
    paper = compute_risk(losses, 2, "pu", 0.1, "nnpu")
    everything = compute_risk(losses, 2, "pu", 0.1, "nnpu", 1.0, torch.ones(4, dtype=torch.bool))
    assert everything.loss.item() == pytest.approx(paper.loss.item(), rel=1e-12)
    # compute_risk splits the band like the losses: U = [1, 3] in, S = [2 in, 0.3 out].
    split = compute_risk(losses, 2, "pu", 0.1, "none", 0.0, torch.tensor([True, True, True, False]))
    assert split.loss.item() == pytest.approx(2.0 - 0.1 * 2.0 / 2, rel=1e-12)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="positive_weight"):
        pu_risk(leaf([1.0]), leaf([1.0]), 0.1, positive_weight=-1.0)
    with pytest.raises(ValueError, match="both"):
        pu_risk(leaf([1.0]), leaf([1.0]), 0.1, unlabeled_in_band=torch.tensor([True]))


def test_compute_risk_splits_one_forward_into_u_and_s():
    losses = leaf([1.0, 3.0, 2.0])  # U = [1, 3], S = [2]
    risk = compute_risk(losses, num_unlabeled=2, loss_type="pu", prior=0.1, nonnegative="nnpu")
    assert risk.unlabeled_loss.item() == pytest.approx(2.0)
    assert risk.sensitive_loss.item() == pytest.approx(2.0)
    assert compute_risk(losses, 2, "unsupervised").loss.item() == pytest.approx(2.0)
    assert set(risk.to_log_dict()) == {
        "loss",
        "unlabeled_loss",
        "sensitive_loss",
        "positive_risk",
        "negative_risk",
        "nnpu_correction",
        "pu_objective",
    }


@pytest.mark.parametrize("loss_type", ["pu", "supervised"])
def test_empty_sensitive_batch_is_rejected(loss_type):
    with pytest.raises(ValueError, match="empty S batch"):
        compute_risk(leaf([1.0, 2.0]), num_unlabeled=2, loss_type=loss_type)


@pytest.mark.parametrize("prior", [0.0, 1.0, -0.1])
def test_prior_outside_the_open_unit_interval_is_rejected(prior):
    with pytest.raises(ValueError, match="prior"):
        pu_risk(leaf([1.0]), leaf([1.0]), prior=prior)


def test_flow_matching_snr_is_the_squared_signal_to_noise_amplitude_ratio():
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.0])
    # (1 - sigma)^2 / sigma^2 by hand: 0, 1, (0.75 / 0.25)^2 = 9, (0.9 / 0.1)^2 = 81, infinite without noise.
    assert flow_matching_snr(sigmas).tolist() == pytest.approx([0.0, 1.0, 9.0, 81.0, math.inf])


def test_the_default_band_is_the_same_noise_level_under_ddpm_and_flow_matching():
    """A DDPM draw and a flow-matching draw at SNR 8.6 mix their sample and noise in the same ratio."""
    max_snr = 8.6
    sigma_edge = 1 / (1 + math.sqrt(max_snr))
    assert sigma_edge == pytest.approx(0.2543, abs=1e-4)
    just_inside, just_outside = torch.tensor([sigma_edge + 1e-4]), torch.tensor([sigma_edge - 1e-4])
    assert flow_matching_snr(just_inside).item() <= max_snr < flow_matching_snr(just_outside).item()
    alpha_bar = max_snr / (1 + max_snr)  # DDPM's SNR alpha_bar / (1 - alpha_bar) = 8.6
    ddpm_ratio = math.sqrt(alpha_bar) / math.sqrt(1 - alpha_bar)
    flow_ratio = (1 - sigma_edge) / sigma_edge
    assert ddpm_ratio == pytest.approx(flow_ratio)
