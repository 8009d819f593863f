"""Thresholds for a target FPR (detector/calibration.py), checked against
the definitions and by simulation on scores whose true FPR is known."""

import numpy as np
import pytest
from scipy.stats import binom

from pathguard.detector.calibration import (allowed_exceedances, calibration_facts, fpr_threshold,
                                            fpr_upper_bound)


def test_confidence_zero_is_the_plain_quantile():
    scores = np.random.default_rng(0).normal(size=1001)
    assert fpr_threshold(scores, 0.05) == np.quantile(scores, 0.95, method="higher")


def test_the_bound_is_clopper_pearsons():
    # k = 0 has a closed form: 1 - (1 - c)^(1/n)
    assert fpr_upper_bound(0, 500, 0.95) == pytest.approx(1 - 0.05 ** (1 / 500), rel=1e-9)
    # at the bound p, seeing k or fewer has probability exactly 1 - c
    p = fpr_upper_bound(40, 1000, 0.95)
    assert binom.cdf(40, 1000, p) == pytest.approx(0.05, rel=1e-6)
    assert fpr_upper_bound(7, 7, 0.95) == 1.0


@pytest.mark.parametrize("n", [300, 1000, 4871])
def test_allowed_exceedances_is_the_largest_count_within_the_target(n):
    k = allowed_exceedances(n, 0.05, 0.95)
    assert fpr_upper_bound(k, n, 0.95) <= 0.05 < fpr_upper_bound(k + 1, n, 0.95)
    assert k < 0.05 * n  # the margin costs exceedances


def test_the_threshold_leaves_k_scores_above_it():
    scores = np.random.default_rng(1).permutation(np.arange(2000, dtype=float))
    k = allowed_exceedances(2000, 0.05, 0.95)
    threshold = fpr_threshold(scores, 0.05, 0.95)
    assert int((scores > threshold).sum()) == k
    facts = calibration_facts(scores, threshold, 0.05, 0.95)
    assert facts["scores_above"] == k and facts["fpr_upper_bound"] <= 0.05


def test_the_bound_holds_the_fpr_with_its_confidence():
    """Clean scores uniform on [0, 1]: a threshold t has true FPR 1 - t.
    Over 2,000 calibration samples of 1,000 scores, the 95%-confidence rule
    keeps the FPR at or below 5% about 95% of the time; the plain quantile
    only about half of the time (what the bound is for)."""
    rng = np.random.default_rng(2)
    samples = rng.random((2000, 1000))
    bounded = np.array([1 - fpr_threshold(s, 0.05, 0.95) for s in samples])
    plain = np.array([1 - fpr_threshold(s, 0.05) for s in samples])
    assert 0.93 <= np.mean(bounded <= 0.05) <= 0.99
    assert 0.35 <= np.mean(plain <= 0.05) <= 0.65
    assert bounded.mean() < plain.mean() <= 0.051


def test_too_few_images_for_the_bound_are_refused():
    # (1 - 0.05)^n <= 0.05 needs n >= 59
    assert allowed_exceedances(59, 0.05, 0.95) == 0
    with pytest.raises(ValueError, match="58 calibration images cannot bound a 0.05 false-positive rate at "
                                         "0.95 confidence: at least 59 are needed"):
        fpr_threshold(np.arange(58.0), 0.05, 0.95)
    with pytest.raises(ValueError, match="confidence must be in"):
        fpr_threshold(np.arange(100.0), 0.05, 1.0)
