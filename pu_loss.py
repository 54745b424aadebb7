"""Positive-unlabeled diffusion losses (Takahashi et al., ICLR 2025).

Each function below is one equation of the paper; the equation numbers refer
to "Positive-Unlabeled Diffusion Models for Preventing Sensitive Data
Generation". Everything here is a plain tensor function: no Diffusers or
Accelerate import, so the method can be read (and tested) on its own.

Notation: U is the unlabeled training data, S the small labeled sensitive set,
``l(x)`` the per-sample diffusion loss (the negative ELBO up to constants) and
``beta`` the class prior, the share of sensitive data in U.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_TYPES = ("pu", "supervised", "unsupervised")
NONNEGATIVE_MODES = ("nnpu", "abs", "none")
REDUCTIONS = ("sum", "mean")
LOG_2 = math.log(2.0)


def per_sample_diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Eq. (8): ``l(x) = ||target - model_pred||^2`` for each sample of the batch.

    ``target`` is the noise for epsilon-prediction, the velocity for
    v-prediction and the clean sample for sample-prediction; the caller picks
    it from the scheduler. One (t, noise) draw per sample is the usual
    single-sample Monte Carlo estimate of the expectation in Eq. (8).

    ``reduction="sum"`` (the paper's squared norm) sums over every non-batch
    dimension; ``"mean"`` divides that by the number of elements per sample.
    The result is float32 whatever the input dtype, because a sum over
    thousands of squared errors overflows float16.

    Returns a tensor of shape ``(batch,)``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)} and target {tuple(target.shape)} differ in shape")
    squared_error = (model_pred.float() - target.float()).pow(2).flatten(start_dim=1)
    return squared_error.sum(dim=1) if reduction == "sum" else squared_error.mean(dim=1)


def flow_matching_snr(sigmas: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio of a flow-matching draw, for the noise band on SD3-style models.

    The rectified-flow path of Stable Diffusion 3 and Flux is
    ``x_sigma = (1 - sigma) x_0 + sigma * noise``, so its SNR is
    ``((1 - sigma) / sigma)^2``: the same quantity as DDPM's
    ``alpha_bar / (1 - alpha_bar)``, and one SNR bound means one noise level
    under both. SNR <= 8.6 (the default band) is ``sigma >= 1 / (1 + sqrt(8.6))
    = 0.254``. The band then goes to ``compute_risk`` as ``in_band``.

    For the per-sample loss of flow matching, ``per_sample_diffusion_loss``
    takes the velocity target ``noise - x_0``, times the scheme's weight.
    Such weighted losses are ELBOs of noise-augmented data under monotone
    weightings (Kingma and Gao, NeurIPS 2023), so the negative risk keeps its
    meaning; the positive risk's ``-log(1 - exp(-l))`` reads ``l`` as a
    likelihood bound, which holds only approximately under other weightings.
    """
    sigmas = sigmas.double()
    return ((1 - sigmas) / sigmas).pow(2).float()


def bce_normal(per_sample_loss: torch.Tensor) -> torch.Tensor:
    """Eq. (11) with y = 0: ``-log p(y=0|x) = -log exp(-l) = l``."""
    return per_sample_loss


def bce_sensitive(per_sample_loss: torch.Tensor) -> torch.Tensor:
    """Eq. (11) with y = 1: ``-log p(y=1|x) = -log(1 - exp(-l))`` (Eq. 10).

    Two forms, each accurate on its side of ``l = log 2`` (Maechler, 2012,
    "Accurately computing log(1 - exp(-|a|))"): ``-log(-expm1(-l))`` where
    ``exp(-l)`` is close to 1, and ``-log1p(-exp(-l))`` where it is small, so
    the value keeps its relative precision (about ``exp(-l)``) for large ``l``
    instead of rounding to 0 beyond ``l ~ 17`` in float32. The term diverges as
    ``l -> 0``, so ``l`` is floored at the machine epsilon of its dtype: the
    value is then at most ``-log(eps)`` and the gradient at most ``1/eps`` in
    magnitude (1024 for float16, 128 for bfloat16), both finite in that dtype.
    Below the floor the gradient is the one at the floor, so a sample with a
    tiny loss is still pushed up rather than silently ignored. The arithmetic
    runs in at least float32 and the result is cast back to the input dtype.

    For a summed loss over thousands of pixels the term is ~0: expected, see
    the README.
    """
    floor = torch.finfo(per_sample_loss.dtype).eps
    compute_dtype = torch.promote_types(per_sample_loss.dtype, torch.float32)
    loss = per_sample_loss.to(compute_dtype)
    # Value clamped, gradient passed straight through: d(floored)/dl == 1.
    floored = loss + (floor - loss).clamp_min(0.0).detach()
    # Each form sees only its own side, so neither produces an inf or NaN for where() to hide.
    near_zero = -torch.log(-torch.expm1(-floored.clamp_max(LOG_2)))
    far_from_zero = -torch.log1p(-torch.exp(-floored.clamp_min(LOG_2)))
    return torch.where(floored <= LOG_2, near_zero, far_from_zero).to(per_sample_loss.dtype)


@dataclass
class RiskOutput:
    """What one mini-batch risk evaluation returns.

    ``loss`` is what to back-propagate; on an nnPU correction step that is
    ``-r``, while ``objective`` is the value of Eq. (19) itself,
    ``w * beta * L^+_S + max(0, r)``. The other fields are detached
    components for logging; they stay on the device so that logging them
    every step does not force a host synchronisation.
    """

    loss: torch.Tensor
    unlabeled_loss: torch.Tensor  # L^-_U: mean over U of l
    sensitive_loss: torch.Tensor | None = None  # L^-_S: mean over S of l
    positive_risk: torch.Tensor | None = None  # L^+_S: mean over S of BCE(x, 1)
    negative_risk: torch.Tensor | None = None  # r = L^-_U - beta * L^-_S
    correction: torch.Tensor | None = None  # 1.0 where the nnPU ascent step fired
    objective: torch.Tensor | None = None  # the value of Eq. (19); differs from loss on nnPU ascent steps

    def to_log_dict(self) -> dict[str, torch.Tensor]:
        """The non-empty components, keyed by the names used in TensorBoard."""
        fields = {
            "loss": self.loss.detach(),
            "unlabeled_loss": self.unlabeled_loss,
            "sensitive_loss": self.sensitive_loss,
            "positive_risk": self.positive_risk,
            "negative_risk": self.negative_risk,
            "nnpu_correction": self.correction,
            "pu_objective": self.objective,
        }
        return {name: value for name, value in fields.items() if value is not None}


def _require_sensitive(sensitive_losses: torch.Tensor | None, loss_type: str) -> torch.Tensor:
    if sensitive_losses is None or sensitive_losses.numel() == 0:
        raise ValueError(
            f"loss_type={loss_type!r} needs at least one labeled sensitive sample per batch, got an empty S batch"
        )
    return sensitive_losses


def unsupervised_risk(unlabeled_losses: torch.Tensor) -> RiskOutput:
    """Eq. (9): ``mean_U l``. Standard diffusion training; S is ignored."""
    unlabeled_loss = unlabeled_losses.mean()
    return RiskOutput(loss=unlabeled_loss, unlabeled_loss=unlabeled_loss.detach())


def supervised_risk(unlabeled_losses: torch.Tensor, sensitive_losses: torch.Tensor) -> RiskOutput:
    """Eq. (12): ``mean_U BCE(x, 0) + mean_S BCE(x, 1)``, treating all of U as normal."""
    sensitive_losses = _require_sensitive(sensitive_losses, "supervised")
    unlabeled_loss = bce_normal(unlabeled_losses).mean()
    positive_risk = bce_sensitive(sensitive_losses).mean()
    return RiskOutput(
        loss=unlabeled_loss + positive_risk,
        unlabeled_loss=unlabeled_loss.detach(),
        sensitive_loss=sensitive_losses.mean().detach(),
        positive_risk=positive_risk.detach(),
    )


def pu_risk(
    unlabeled_losses: torch.Tensor,
    sensitive_losses: torch.Tensor,
    prior: float,
    nonnegative: str = "nnpu",
    positive_weight: float = 1.0,
    unlabeled_in_band: torch.Tensor | None = None,
    sensitive_in_band: torch.Tensor | None = None,
) -> RiskOutput:
    """The PU risk of Eq. (18), with the correction of its negative part.

    On a mini-batch, with ``beta = prior``:

    - ``L^+_S = mean_S BCE(x, 1)`` (positive risk),
    - ``L^-_U = mean_U BCE(x, 0) = mean_U l``,
    - ``L^-_S = mean_S BCE(x, 0) = mean_S l``,
    - ``r = L^-_U - beta * L^-_S``, the estimate of ``(1-beta) E_N[l] >= 0`` (Eq. 16).

    ``nonnegative`` chooses what to do with ``r``, which can go negative on a
    mini-batch and then over-fits (Kiryo et al., 2017):

    - ``"nnpu"``: Eq. (19) as trained by Algorithm 1. If ``r >= 0`` minimise
      ``beta * L^+_S + r``; otherwise minimise ``-r``, i.e. step so as to
      raise ``r`` back towards 0 (lines 4-7 of Algorithm 1).
    - ``"abs"``: ``beta * L^+_S + |r|`` (Hammoudeh & Lowd, 2020); the paper's
      choice for Stable Diffusion.
    - ``"none"``: the unbiased estimate ``beta * L^+_S + r`` of Eq. (17).

    The branch is chosen with ``torch.where`` on the device, so there is no
    host synchronisation; gradients flow only through the selected branch.

    Two options of ours, not the paper's; their defaults give Eq. (18) exactly:

    - ``positive_weight`` ``w`` scales the positive risk: ``w * beta * L^+_S``.
      In the paper's setting ``l`` sums thousands of squared errors, so
      ``L^+_S = -log(1 - exp(-l))`` is about 0 and ``w`` does not matter. On
      small images ``l`` is small at high noise levels, where ``L^+_S`` and
      its gradient are large; ``w = 0`` gives the paper's large-image regime.
    - ``unlabeled_in_band`` / ``sensitive_in_band`` (booleans, one per
      sample; e.g. ``t >= t_min``) limit the PU correction to a band of noise
      levels. The S terms count only samples in the band, and
      ``L^-_U`` and ``L^-_S`` become band sums divided by the batch sizes:
      ``r_band = sum_U[in] l / n_U - beta * sum_S[in] l / n_S`` estimates
      ``(1-beta) E_N[l 1(in)]``. U's samples outside the band add the plain
      diffusion loss ``sum_U[out] l / n_U``, outside the correction. Without
      masks every sample is in the band.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    if nonnegative not in NONNEGATIVE_MODES:
        raise ValueError(f"nonnegative must be one of {NONNEGATIVE_MODES}, got {nonnegative!r}")
    if positive_weight < 0:
        raise ValueError(f"positive_weight must be >= 0, got {positive_weight}")
    sensitive_losses = _require_sensitive(sensitive_losses, "pu")
    if (unlabeled_in_band is None) != (sensitive_in_band is None):
        raise ValueError("give both unlabeled_in_band and sensitive_in_band, or neither")

    all_unlabeled_loss = bce_normal(unlabeled_losses).mean()
    sensitive_positive = bce_sensitive(sensitive_losses)
    plain_loss = None
    if unlabeled_in_band is None:
        unlabeled_loss = all_unlabeled_loss
    else:
        # Masked by multiplication, not indexing: shapes stay fixed and nothing waits on the host.
        unlabeled_loss = (unlabeled_losses * unlabeled_in_band).mean()
        plain_loss = (unlabeled_losses * ~unlabeled_in_band).mean()
        sensitive_losses = sensitive_losses * sensitive_in_band
        sensitive_positive = sensitive_positive * sensitive_in_band
    positive_risk = sensitive_positive.mean()
    sensitive_loss = bce_normal(sensitive_losses).mean()
    negative_risk = unlabeled_loss - prior * sensitive_loss
    weighted_positive = positive_weight * prior * positive_risk
    unbiased = weighted_positive + negative_risk

    correction = None
    if nonnegative == "nnpu":
        fired = negative_risk < 0
        loss = torch.where(fired, -negative_risk, unbiased)
        objective = weighted_positive + negative_risk.clamp_min(0.0)
        correction = fired.float()
    elif nonnegative == "abs":
        loss = objective = weighted_positive + negative_risk.abs()
    else:
        loss = objective = unbiased
    if plain_loss is not None:
        loss, objective = loss + plain_loss, objective + plain_loss

    return RiskOutput(
        loss=loss,
        unlabeled_loss=all_unlabeled_loss.detach(),
        sensitive_loss=sensitive_loss.detach(),
        positive_risk=positive_risk.detach(),
        negative_risk=negative_risk.detach(),
        correction=correction,
        objective=objective.detach(),
    )


def compute_risk(
    per_sample_losses: torch.Tensor,
    num_unlabeled: int,
    loss_type: str = "pu",
    prior: float = 0.1,
    nonnegative: str = "nnpu",
    positive_weight: float = 1.0,
    in_band: torch.Tensor | None = None,
) -> RiskOutput:
    """Split the losses of one forward pass over ``cat([U batch, S batch])`` and apply ``loss_type``.

    The model runs once on the concatenation, so ``per_sample_losses[:num_unlabeled]``
    belong to U and the rest to S; ``in_band`` (one boolean per sample, same
    order) is split the same way for ``pu_risk``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0 < num_unlabeled <= per_sample_losses.shape[0]:
        raise ValueError(f"num_unlabeled={num_unlabeled} does not fit a batch of {per_sample_losses.shape[0]}")
    unlabeled_losses = per_sample_losses[:num_unlabeled]
    sensitive_losses = per_sample_losses[num_unlabeled:]
    if loss_type == "unsupervised":
        return unsupervised_risk(unlabeled_losses)
    if loss_type == "supervised":
        return supervised_risk(unlabeled_losses, sensitive_losses)
    unlabeled_in_band = sensitive_in_band = None
    if in_band is not None:
        unlabeled_in_band, sensitive_in_band = in_band[:num_unlabeled], in_band[num_unlabeled:]
    return pu_risk(
        unlabeled_losses, sensitive_losses, prior, nonnegative, positive_weight, unlabeled_in_band, sensitive_in_band
    )
