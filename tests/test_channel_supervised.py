"""The supervised detector on detector v2's channels (detector/channel_supervised.py).

Its combiner is checked against scikit-learn's logistic regression (same
objective) where the bound w >= 0 does not bind, against the optimality
conditions where it does, and on the property it exists for: an attack
that *looks more normal* than clean images on a channel during training
cannot teach it to score an unseen attack that deviates there below clean
images.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from test_detector_contract import observations

from pathguard.detector.channel_supervised import (
    ChannelSupervisedDetector,
    fit_nonnegative_logistic,
    wide_channels,
)
from pathguard.detector.detectors import make_detector


def deviations(n: int, shift: tuple[float, float], seed: int) -> np.ndarray:
    """-log p-like features (>= 0): exponential noise, shifted per channel."""
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0, size=(n, 2)) + np.asarray(shift)


def test_equals_scikit_learn_where_the_bound_does_not_bind():
    x = np.concatenate([deviations(300, (0.0, 0.0), 0), deviations(300, (1.5, 0.7), 1)])
    y = np.r_[np.zeros(300), np.ones(300)]
    w, b = fit_nonnegative_logistic(x, y, C=0.5)
    reference = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x, y)
    assert (reference.coef_[0] > 0).all()  # the unconstrained optimum is feasible
    np.testing.assert_allclose(w, reference.coef_[0], rtol=1e-4, atol=1e-5)
    assert b == pytest.approx(reference.intercept_[0], rel=1e-4, abs=1e-5)


def test_a_binding_bound_is_optimal():
    """Channel 1 is *lower* for the adversarial rows: the unconstrained fit
    gives it a negative weight, ours 0, and the objective's gradient there
    points into the bound (KKT)."""
    x = np.concatenate([deviations(300, (0.0, 1.0), 2), deviations(300, (1.5, 0.0), 3)])
    y = np.r_[np.zeros(300), np.ones(300)]
    assert LogisticRegression(C=1.0).fit(x, y).coef_[0][1] < 0
    w, b = fit_nonnegative_logistic(x, y, C=1.0)
    assert w[0] > 0 and w[1] == 0.0
    sign = np.where(y > 0, 1.0, -1.0)
    margin = sign * (x @ w + b)
    gradient = x.T @ (-sign / (1 + np.exp(margin))) + w  # d objective / d w, C = 1
    assert gradient[1] >= 0  # increasing w[1] would increase the objective
    assert abs(gradient[0]) < 1e-3 and abs(np.sum(-sign / (1 + np.exp(margin)))) < 1e-3


def test_a_prior_pulls_the_weights_towards_it_and_is_optimal():
    """prior = 1: the penalty is ||w - 1||^2 / 2 (scripts/supervised_combiner_check.py's
    "shrunk towards equal weights"); with little data weight (small C) the weights stay near 1,
    and the optimality conditions hold, bound included."""
    x = np.concatenate([deviations(300, (0.0, 1.0), 2), deviations(300, (1.5, 0.0), 3)])
    y = np.r_[np.zeros(300), np.ones(300)]
    sign = np.where(y > 0, 1.0, -1.0)
    for C, near in ((1e-4, 0.05), (1.0, None)):
        w, b = fit_nonnegative_logistic(x, y, C=C, prior=1.0)
        margin = sign * (x @ w + b)
        g = -sign / (1 + np.exp(margin))
        gradient = C * (x.T @ g) + (w - 1.0)
        free = w > 0
        np.testing.assert_allclose(gradient[free], 0.0, atol=1e-3)
        assert (gradient[~free] >= 0).all()
        assert abs(C * g.sum()) < 1e-3
        if near is not None:
            np.testing.assert_allclose(w, 1.0, atol=near)
    # prior 0 is the plain penalty, bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(fit_nonnegative_logistic(x, y, C=1.0),
                                                   fit_nonnegative_logistic(x, y, C=1.0, prior=0.0)))
    with pytest.raises(ValueError, match="prior must be >= 0"):
        fit_nonnegative_logistic(x, y, C=1.0, prior=-1.0)


def test_deviating_more_on_any_channel_never_lowers_the_score():
    """The same clean images, pushed further on channel 1 only (an unseen
    attack's trace): the unconstrained fit, taught by a seen attack that
    looks *more* normal there, scores every one of them lower than clean;
    with w >= 0 none is scored lower."""
    clean = deviations(400, (0.0, 1.0), 4)
    seen = deviations(400, (2.0, 0.0), 5)
    unseen = clean + np.array([0.0, 3.0])
    x, y = np.concatenate([clean, seen]), np.r_[np.zeros(400), np.ones(400)]
    unconstrained = LogisticRegression().fit(x, y)
    assert (unconstrained.decision_function(unseen) < unconstrained.decision_function(clean)).all()
    w, b = fit_nonnegative_logistic(x, y, C=1.0)
    assert (unseen @ w + b >= clean @ w + b).all()


def test_fits_its_own_channels_on_half_of_the_clean_rows():
    clean, odd = observations(400, seed=0), observations(200, seed=1, outlier=True)
    detector = make_detector("channels-supervised", seed=3).fit(clean, odd)
    assert detector.channel_score_.channels_ == wide_channels(clean)
    assert set(detector.channel_weights()) == set(wide_channels(clean))
    assert all(w >= 0 for w in detector.channel_weights().values())
    assert sum(detector.channel_weights().values()) > 0
    scores_clean = detector.score_samples(observations(200, seed=7))
    scores_odd = detector.score_samples(observations(200, seed=8, outlier=True))
    assert np.median(scores_odd) > np.quantile(scores_clean, 0.95)


def test_uses_a_given_fitted_channel_score_as_it_is():
    clean, odd = observations(400, seed=0), observations(200, seed=1, outlier=True)
    channels = make_detector("channels", channels=("value:block0", "confidence"), seed=0).fit(clean)
    detector = ChannelSupervisedDetector(channels_from=channels).fit(clean, odd)
    assert detector.channel_score_ is channels
    batch = observations(50, seed=9)
    linear = (-channels.channel_log_p(batch)).numpy() @ detector.weights_ + detector.intercept_
    scores = detector.score_samples(batch)
    # without a guard the score is the learnt linear score's p-value: the same order
    order = np.argsort(linear)
    assert (np.diff(scores[order]) >= 0).all() and len(np.unique(scores)) > 40
    with pytest.raises(ValueError, match="fitted ChannelScore"):
        ChannelSupervisedDetector(channels_from=make_detector("channels", channels=("confidence",))).fit(clean, odd)
    with pytest.raises(ValueError, match="differ"):
        ChannelSupervisedDetector(channels=("confidence",), channels_from=channels).fit(clean, odd)


def test_the_guard_and_the_learnt_part_are_combined_by_min_p(tmp_path):
    """score = -log min(p_learnt, p_guard); the guard's state travels with
    the detector's (safetensors + JSON, no pickle)."""
    import json

    from pathguard.detector.artifacts import atomic_save_tensors, load_tensors
    from pathguard.detector.base import Detector

    clean, odd = observations(400, seed=0), observations(200, seed=1, outlier=True)
    guard = make_detector("max-softmax").fit(clean)
    detector = ChannelSupervisedDetector(guard_from=guard, seed=2).fit(clean, odd).calibrate(observations(300, 2))
    batch = observations(60, seed=5, outlier=True)
    parts = detector.part_log_p(batch)
    assert parts.shape == (60, 2)
    np.testing.assert_array_equal(detector.score_samples(batch), (-parts.min(dim=1).values).numpy())
    atomic_save_tensors(tmp_path / "state.safetensors", detector.state_tensors())
    config = json.loads(json.dumps(detector.config()))
    loaded = Detector.from_saved(config, load_tensors(tmp_path / "state.safetensors"))
    assert loaded.guard_.name == "max-softmax"
    np.testing.assert_array_equal(loaded.score_samples(batch), detector.score_samples(batch))
    with pytest.raises(ValueError, match="unsupervised"):
        ChannelSupervisedDetector(guard_from=detector).fit(clean, odd)
    with pytest.raises(ValueError, match="reads"):
        ChannelSupervisedDetector(guard_from=make_detector("nic").fit(clean)).fit(clean, odd)


def test_needs_every_block():
    clean, odd = observations(100, seed=0), observations(50, seed=1, outlier=True)
    clean.blocks, odd.blocks = [], []
    with pytest.raises(ValueError, match="blocks"):
        make_detector("channels-supervised").fit(clean, odd)


def test_refuses_a_bad_c():
    with pytest.raises(ValueError, match="C must be"):
        make_detector("channels-supervised", C=0.0).fit(observations(100, seed=0),
                                                        observations(50, seed=1, outlier=True))

