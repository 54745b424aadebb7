"""beta, the share of sensitive images in U, estimated from U and S alone.

This is mixture proportion estimation: U's distribution is the mixture
``p_U = beta * p_S + (1 - beta) * p_N`` and only samples of p_U and p_S are
seen. We use Best Bin Estimation (BBE) of Garg et al., 2021, "Mixture
Proportion Estimation and PU Learning: A Modern Approach" (NeurIPS), written
from its description:

1. A classifier f is trained to tell S (label 1) from U (label 0). Its
   scores are taken out of fold (cross-fitting): each image is scored by a
   model that never saw it, so every image of U and S gets a held-out score.
2. For a threshold c, ``q_S(c)`` and ``q_U(c)`` are the shares of S's and U's
   scores at or above c. Since U's sensitive part scores like S and its normal
   part only adds, ``q_U(c) >= beta * q_S(c)``: each c gives an upper bound
   ``q_U(c) / q_S(c)`` on beta, tight where the top bin holds sensitive images
   only.
3. BBE picks the bin whose upper confidence bound on that ratio is lowest
   and returns ``q_U(c*) / q_S(c*)``. Garg et al. bound every bin with one
   DKW term; we bound each bin by its own binomial (Wilson) interval (see
   :func:`best_bin_estimate` for why).

The interval is a percentile bootstrap over the held-out scores.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pu_diffusion.errors import InputError
from pu_diffusion.image_files import image_channels

logger = logging.getLogger(__name__)

METHOD = "BBE (Garg et al., 2021) on cross-fitted S-vs-U classifier scores"


@dataclass(frozen=True)
class PriorEstimate:
    """What estimate_prior.py prints and writes to prior.json, and what a run records."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    features: str
    num_unlabeled: int
    num_sensitive: int
    folds: int

    def to_dict(self) -> dict:
        return asdict(self)


def top_bin_shares(sensitive_scores: np.ndarray, unlabeled_scores: np.ndarray):
    """For each candidate threshold c (every distinct score, high to low): q_S(c) and q_U(c), the shares of S's
    and U's scores >= c."""
    thresholds = np.unique(np.concatenate([sensitive_scores, unlabeled_scores]))[::-1]
    sensitive_sorted, unlabeled_sorted = np.sort(sensitive_scores), np.sort(unlabeled_scores)
    at_or_above_s = len(sensitive_sorted) - np.searchsorted(sensitive_sorted, thresholds, side="left")
    at_or_above_u = len(unlabeled_sorted) - np.searchsorted(unlabeled_sorted, thresholds, side="left")
    return at_or_above_s / len(sensitive_sorted), at_or_above_u / len(unlabeled_sorted)


def wilson_bounds(successes: np.ndarray, trials: int, z: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (Wilson, 1927): (lower, upper) for each count."""
    share = successes / trials
    centre = (share + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half = z / (1 + z**2 / trials) * np.sqrt(share * (1 - share) / trials + z**2 / (4 * trials**2))
    return centre - half, centre + half


#: Each bin's two Wilson bounds hold with probability 1 - DELTA / 4 each side. Chosen on the digits (0.1 left
#: outliers at a share of 0.2; 0.05 to 0.005 gave the same error) and reported on the shapes (docs/benchmark.md).
DELTA = 0.02


def best_bin_estimate(sensitive_scores: np.ndarray, unlabeled_scores: np.ndarray, delta: float = DELTA) -> float:
    """BBE: ``q_U(c*) / q_S(c*)`` at the threshold c* whose upper confidence bound on beta is lowest.

    Scores are higher for images more like S. The bound at c is
    ``upper(q_U(c)) / lower(q_S(c))``. Garg et al. bound every bin with one
    DKW term, ``sqrt(log(4/delta) / 2n)``; we use each bin's own binomial
    (Wilson) interval, which is much tighter where q_U is small. With a few
    hundred images in S, DKW's term is about 0.1 and pulls c* towards the
    largest bins, where normal images creep in: on the digits with 150 S
    images it overestimated every share by 0.03 to 0.05. The estimate is
    clipped to [0, 1].
    """
    sensitive_scores, unlabeled_scores = np.asarray(sensitive_scores), np.asarray(unlabeled_scores)
    q_sensitive, q_unlabeled = top_bin_shares(sensitive_scores, unlabeled_scores)
    z = float(normal_quantile(1 - delta / 4))  # two proportions, each bounded on both sides
    _, unlabeled_upper = wilson_bounds(q_unlabeled * len(unlabeled_scores), len(unlabeled_scores), z)
    sensitive_lower, _ = wilson_bounds(q_sensitive * len(sensitive_scores), len(sensitive_scores), z)
    usable = sensitive_lower > 0
    bound = np.full(len(q_sensitive), np.inf)
    bound[usable] = unlabeled_upper[usable] / sensitive_lower[usable]
    best = int(np.argmin(bound))
    return float(min(1.0, q_unlabeled[best] / q_sensitive[best]))


def normal_quantile(probability: float) -> float:
    from scipy.stats import norm

    return norm.ppf(probability)


def bootstrap_interval(
    sensitive_scores: np.ndarray,
    unlabeled_scores: np.ndarray,
    confidence: float = 0.9,
    draws: int = 200,
    seed: int = 0,
    delta: float = DELTA,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`best_bin_estimate`, resampling S's and U's held-out scores."""
    rng = np.random.default_rng(seed)
    estimates = [
        best_bin_estimate(
            rng.choice(sensitive_scores, size=len(sensitive_scores)),
            rng.choice(unlabeled_scores, size=len(unlabeled_scores)),
            delta,
        )
        for _ in range(draws)
    ]
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------- the S-vs-U classifier


class SmallConvNet(torch.nn.Module):
    """A four-layer CNN that scores an image (or a VAE latent) as S-like; any size, any channel count."""

    def __init__(self, channels: int, width: int = 48):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1),
            torch.nn.BatchNorm2d(width),
            torch.nn.GELU(),
            torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.BatchNorm2d(width),
            torch.nn.GELU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(2 * width),
            torch.nn.GELU(),
            torch.nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            torch.nn.BatchNorm2d(2 * width),
            torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(2 * width, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)


def fit_scorer(
    sensitive: torch.Tensor, unlabeled: torch.Tensor, epochs: int, batch_size: int, seed: int, device="cpu"
) -> SmallConvNet:
    """Train S (1) against U (0), both classes weighted equally whatever their sizes.

    A fifth of each class is held back, and the weights of the epoch with the
    lowest held-back loss are kept: trained longer, the network memorises
    which sensitive images are in S and which in U, and the ranking BBE reads
    gets worse. Only S-vs-U labels are used, which a PU user has.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    s_val = fold_ids(len(sensitive), 5, generator) == 0
    u_val = fold_ids(len(unlabeled), 5, generator) == 0
    train_inputs, train_targets, train_weights = _weighted_classes(sensitive[~s_val], unlabeled[~u_val])
    val_inputs, val_targets, val_weights = _weighted_classes(sensitive[s_val], unlabeled[u_val])
    model = SmallConvNet(sensitive.shape[1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    best_loss, best_state = math.inf, copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_inputs), generator=generator)
        for start in range(0, len(train_inputs), batch_size):
            batch = order[start : start + batch_size]
            inputs = augment(train_inputs[batch], generator).to(device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(inputs), train_targets[batch].to(device), weight=train_weights[batch].to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                torch.from_numpy(score(model, val_inputs)).float(), val_targets, weight=val_weights
            ).item()
        if val_loss < best_loss:
            best_loss, best_state = val_loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def augment(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns, one draw per batch.

    Whether an image is sensitive rarely depends on its orientation, and with
    a few hundred S images the CNN needs the extra views (on the shapes they
    took the S-vs-U AUC from 0.80 to 0.87). Where orientation matters they
    cost a little: on the digits they turn a 6 into a 9, and the estimates
    still came within 0.012 of the truth (docs/benchmark.md).
    """
    turns = int(torch.randint(0, 4, (), generator=generator))
    inputs = torch.rot90(inputs, turns, dims=(-2, -1))
    return inputs.flip(-1) if torch.rand((), generator=generator) < 0.5 else inputs


def _weighted_classes(sensitive: torch.Tensor, unlabeled: torch.Tensor):
    """Inputs, 1/0 targets and weights that give S and U half of the loss each."""
    inputs = torch.cat([sensitive, unlabeled])
    targets = torch.cat([torch.ones(len(sensitive)), torch.zeros(len(unlabeled))])
    weights = torch.where(targets == 1, len(inputs) / (2 * len(sensitive)), len(inputs) / (2 * len(unlabeled)))
    return inputs, targets, weights


@torch.no_grad()
def score(model: SmallConvNet, inputs: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    device = next(model.parameters()).device
    batches = [model(inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)]
    return torch.cat(batches).numpy()


def fold_ids(count: int, folds: int, generator: torch.Generator) -> torch.Tensor:
    """A random fold number in 0..folds-1 for each of ``count`` items, the folds as equal as can be."""
    return (torch.arange(count) % folds)[torch.randperm(count, generator=generator)]


def cross_fitted_scores(
    sensitive: torch.Tensor,
    unlabeled: torch.Tensor,
    folds: int = 5,
    epochs: int = 40,
    batch_size: int = 128,
    seed: int = 0,
    device="cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out scores of every S and U input: fold k is scored by a model trained on the other folds."""
    generator = torch.Generator().manual_seed(seed)
    sensitive_fold, unlabeled_fold = (
        fold_ids(len(sensitive), folds, generator),
        fold_ids(len(unlabeled), folds, generator),
    )
    sensitive_scores, unlabeled_scores = np.zeros(len(sensitive)), np.zeros(len(unlabeled))
    for fold in range(folds):
        model = fit_scorer(
            sensitive[sensitive_fold != fold],
            unlabeled[unlabeled_fold != fold],
            epochs,
            batch_size,
            seed + fold,
            device,
        )
        sensitive_scores[(sensitive_fold == fold).numpy()] = score(model, sensitive[sensitive_fold == fold])
        unlabeled_scores[(unlabeled_fold == fold).numpy()] = score(model, unlabeled[unlabeled_fold == fold])
    return sensitive_scores, unlabeled_scores


@dataclass(frozen=True)
class HeldOutScores:
    """Every S and U image's cross-fitted score (higher: more like S) and what the classifiers saw."""

    sensitive: np.ndarray
    unlabeled: np.ndarray
    features: str
    folds: int


def estimate_from_scores(scores: HeldOutScores, confidence: float = 0.9, seed: int = 0) -> PriorEstimate:
    """BBE on held-out scores, with its bootstrap interval."""
    low, high = bootstrap_interval(scores.sensitive, scores.unlabeled, confidence, seed=seed)
    return PriorEstimate(
        estimate=best_bin_estimate(scores.sensitive, scores.unlabeled),
        low=low,
        high=high,
        confidence=confidence,
        method=METHOD,
        features=scores.features,
        num_unlabeled=len(scores.unlabeled),
        num_sensitive=len(scores.sensitive),
        folds=scores.folds,
    )


def estimate_prior(
    sensitive: torch.Tensor,
    unlabeled: torch.Tensor,
    features: str,
    folds: int = 5,
    epochs: int = 40,
    confidence: float = 0.9,
    seed: int = 0,
    device="cpu",
) -> PriorEstimate:
    """BBE on cross-fitted scores of S and U (tensors of images or latents, N x C x H x W, roughly unit scale);
    the classifiers train on ``device``."""
    if len(sensitive) < folds or len(unlabeled) < folds:
        raise ValueError(f"S ({len(sensitive)}) and U ({len(unlabeled)}) need at least {folds} images each")
    sensitive_scores, unlabeled_scores = cross_fitted_scores(
        sensitive, unlabeled, folds, epochs, seed=seed, device=device
    )
    return estimate_from_scores(HeldOutScores(sensitive_scores, unlabeled_scores, features, folds), confidence, seed)


# --------------------------------------------------------------------------- when not to use the estimate

#: Below this many S images (or U images) the estimator is refused: with 10 S images and a true share of 0.091
#: it gave 0.503 [0.18, 0.84] on the digits; measured at 10 to 150 in docs/reliability.md.
MIN_SENSITIVE_IMAGES = 50

#: An interval wider than this is too wide to train with: a prior off by half of it changes what PU removes.
MAX_INTERVAL_WIDTH = 0.3


def estimate_problems(estimate: PriorEstimate, max_width: float = MAX_INTERVAL_WIDTH) -> list[str]:
    """Why ``estimate`` should not be trained with; empty when it can be.

    An estimate of 0 means the classifier found nothing in U that looks like S
    (S too easy to tell apart); 1 means it could not tell S from U at all. Both
    are outside the open interval (0, 1) that the PU risk needs.
    """
    problems = []
    if estimate.estimate <= 0.0:
        problems.append("the estimate is 0: nothing in U scored like S (S may not be the kind of image U holds)")
    elif estimate.estimate >= 1.0:
        problems.append("the estimate is 1: the classifier could not tell S from U (S and U look alike)")
    width = estimate.high - estimate.low
    if width > max_width:
        problems.append(
            f"its {round(100 * estimate.confidence)}% interval [{estimate.low:.3f}, {estimate.high:.3f}] is"
            f" {width:.2f} wide (more than --prior_max_interval_width {max_width:g}): too uncertain to act on;"
            " more S images narrow it"
        )
    return problems


def check_usable(estimate: PriorEstimate, max_width: float = MAX_INTERVAL_WIDTH) -> None:
    """--prior auto: refuse, before training, an estimate that the PU risk cannot use or should not trust."""
    problems = estimate_problems(estimate, max_width)
    if problems:
        raise InputError(
            f"--prior auto: {estimate.estimate:.4f} cannot be trained with: {'; '.join(problems)}."
            " Give the share yourself with --prior (the paper's default is 0.1)."
        )


# --------------------------------------------------------------------------- what the classifier sees

#: Pixel features are taken at most this size: enough to tell classes apart, cheap on a CPU.
PIXEL_FEATURE_SIZE = 32


def pixel_inputs(dataset, image_column: str, resolution: int, channels: int) -> torch.Tensor:
    """Images of one column as N x C x H x W in [-1, 1], centre-cropped to min(resolution, 32) px."""
    from pu_diffusion.batches import ImageTransform

    transform = ImageTransform(min(resolution, PIXEL_FEATURE_SIZE), channels, center_crop=True)
    return torch.stack([transform(image) for image in dataset[image_column]])


@torch.no_grad()
def vae_inputs(dataset, image_column: str, resolution: int, vae, batch_size: int = 16) -> torch.Tensor:
    """VAE latents (the latent mean, scaled as the UNet sees it) of one image column at ``resolution`` px."""
    from pu_diffusion.batches import ImageTransform

    transform = ImageTransform(resolution, 3, center_crop=True)
    device, dtype = vae.device, vae.dtype
    latents = []
    images = dataset[image_column]
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([transform(image) for image in images[start : start + batch_size]])
        encoded = vae.encode(pixels.to(device, dtype)).latent_dist.mean
        latents.append((encoded * vae.config.scaling_factor).float().cpu())
    return torch.cat(latents)


def images_needed(folds: int) -> int:
    """The fewest images of S (and of U) the estimate is made from: the minimum, and two per fold."""
    return max(MIN_SENSITIVE_IMAGES, 2 * folds)


def check_sizes(num_unlabeled: int, num_sensitive: int, folds: int) -> None:
    """Refuse, before any image is read, an S or U too small to estimate the prior from."""
    needed = images_needed(folds)
    if min(num_sensitive, num_unlabeled) < needed:
        raise InputError(
            f"estimating the prior: S has {num_sensitive} images and U {num_unlabeled}; the estimate needs at least"
            f" {needed} in each (below that it is too far off to use). Give the share yourself with --prior."
        )


def check_sizes_from_flags(args) -> None:
    """The same check at parse time, where --num_labeled_sensitive already says how large S will be."""
    if getattr(args, "num_labeled_sensitive", None) is not None:
        needed = images_needed(args.prior_folds)
        if args.num_labeled_sensitive < needed:
            raise InputError(
                f"--num_labeled_sensitive {args.num_labeled_sensitive}: estimating the prior needs at least"
                f" {needed} images in S (below that it is too far off to use). Give the share with --prior."
            )


def scores_for_data(unlabeled, sensitive, args, seed: int, vae=None, device="cpu") -> HeldOutScores:
    """Cross-fitted scores of U and S as the scripts load them (``datasets.Dataset`` objects), with the
    --prior_folds and --prior_epochs of ``args``; ``vae`` switches to latent features. The S-vs-U
    classifiers train on ``device`` (the accelerator's, in the training scripts)."""
    if vae is not None:
        inputs = [vae_inputs(data, args.image_column, args.resolution, vae) for data in (sensitive, unlabeled)]
        features = "vae latents"
    else:
        channels = image_channels([(unlabeled, "U"), (sensitive, "S")], args.image_column)
        inputs = [pixel_inputs(data, args.image_column, args.resolution, channels) for data in (sensitive, unlabeled)]
        features = f"pixels at {min(args.resolution, PIXEL_FEATURE_SIZE)} px"
    check_sizes(len(unlabeled), len(sensitive), args.prior_folds)
    sensitive_scores, unlabeled_scores = cross_fitted_scores(
        *inputs, args.prior_folds, args.prior_epochs, seed=seed, device=device
    )
    return HeldOutScores(sensitive_scores, unlabeled_scores, features, args.prior_folds)


def estimate_for_data(unlabeled, sensitive, args, seed: int, vae=None, device="cpu") -> PriorEstimate:
    """The estimate from :func:`scores_for_data`, with the --prior_confidence of ``args``, logged."""
    return logged_estimate(scores_for_data(unlabeled, sensitive, args, seed, vae, device), args.prior_confidence, seed)


def logged_estimate(scores: HeldOutScores, confidence: float, seed: int) -> PriorEstimate:
    """:func:`estimate_from_scores`, and the estimate with its interval in the log."""
    estimate = estimate_from_scores(scores, confidence, seed)
    logger.info(
        "estimated prior (share of sensitive images in U): %.4f, %d%% interval [%.4f, %.4f] (%s)",
        estimate.estimate,
        round(100 * estimate.confidence),
        estimate.low,
        estimate.high,
        estimate.features,
    )
    return estimate
