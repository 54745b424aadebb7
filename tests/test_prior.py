"""prior: Best Bin Estimation of the share of sensitive images in U, checked against hand counts and data
with a known share."""

import math

import numpy as np
import pytest
import torch

from pu_diffusion.prior import (
    DELTA,
    best_bin_estimate,
    bootstrap_interval,
    estimate_prior,
    fold_ids,
    top_bin_shares,
    wilson_bounds,
)


def test_top_bin_shares_count_scores_at_or_above_each_threshold():
    q_sensitive, q_unlabeled = top_bin_shares(np.array([4, 3, 2, 1.0]), np.array([5, 3, 1, 0.0]))
    # Thresholds from high to low: 5, 4, 3, 2, 1, 0.
    assert q_sensitive.tolist() == [0, 1 / 4, 2 / 4, 3 / 4, 1, 1]
    assert q_unlabeled.tolist() == [1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4, 1]


def test_wilson_bounds_match_the_textbook_values():
    lower, upper = wilson_bounds(np.array([0.0, 5.0]), 10, 1.96)
    assert upper[0] == pytest.approx(1.96**2 / (10 + 1.96**2))  # 0 of 10: upper bound z^2 / (n + z^2)
    assert lower[0] == pytest.approx(0.0, abs=1e-12)
    assert (lower[1], upper[1]) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # 5 of 10


def test_best_bin_takes_the_ratio_at_the_lowest_upper_bound():
    """Computed by hand from the bins: S has 20 scores of 2 and 20 of 1, U 4 of 2, 36 of 1 and 160 of 0."""
    sensitive = np.array([2.0] * 20 + [1.0] * 20)
    unlabeled = np.array([2.0] * 4 + [1.0] * 36 + [0.0] * 160)
    z = 2.5758293035489004  # the normal quantile at 1 - delta / 4 for the default delta, 0.02
    assert DELTA == 0.02

    def wilson(k, n, side):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return centre + side * half

    bounds = {c: wilson(ku, 200, +1) / wilson(ks, 40, -1) for c, ks, ku in ((2, 20, 4), (1, 40, 40), (0, 40, 200))}
    assert min(bounds, key=bounds.get) == 2  # the pure top bin: 4/200 of U against 20/40 of S
    assert best_bin_estimate(sensitive, unlabeled) == pytest.approx((4 / 200) / (20 / 40))


@pytest.mark.parametrize("share", [0.05, 0.1, 0.2])
def test_bbe_recovers_a_known_share_from_scores(share):
    """Scores with a pure top region: S uniform on [0.4, 1], normal images on [0, 0.6]."""
    rng = np.random.default_rng(0)
    num_unlabeled = 20000
    num_in_u = round(share * num_unlabeled)
    sensitive = rng.uniform(0.4, 1.0, 4000)
    unlabeled = np.concatenate([rng.uniform(0.4, 1.0, num_in_u), rng.uniform(0.0, 0.6, num_unlabeled - num_in_u)])
    assert best_bin_estimate(sensitive, unlabeled) == pytest.approx(share, abs=0.01)
    low, high = bootstrap_interval(sensitive, unlabeled, draws=50)
    assert low <= share <= high


def test_folds_are_balanced_and_seeded():
    first = fold_ids(103, 5, torch.Generator().manual_seed(1))
    again = fold_ids(103, 5, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert sorted(torch.bincount(first).tolist()) == [20, 20, 21, 21, 21]


def test_the_whole_estimator_finds_the_share_of_images_it_can_tell_apart():
    """8x8 images: sensitive ones hold a bright square, normal ones a bright bar; U holds 10% sensitive."""
    generator = torch.Generator().manual_seed(0)

    def images(count, sensitive):
        batch = torch.rand(count, 1, 8, 8, generator=generator) * 0.4 - 1
        rows = torch.randint(0, 4, (count,), generator=generator)
        for index, row in enumerate(rows.tolist()):
            if sensitive:
                batch[index, :, row : row + 4, 2:6] = 1.0
            else:
                batch[index, :, row : row + 4, 3:5] = 1.0
        return batch

    unlabeled = torch.cat([images(40, True), images(360, False)])
    estimate = estimate_prior(images(100, True), unlabeled, "pixels", folds=2, epochs=8)
    assert estimate.estimate == pytest.approx(0.1, abs=0.03)
    assert (estimate.num_unlabeled, estimate.num_sensitive, estimate.folds) == (400, 100, 2)
    assert estimate.low <= 0.1 <= estimate.high
