"""Thresholds for a target false-positive rate, from held-out clean scores.

The plain rule (``confidence=0``) takes the (1 - target) quantile of the
calibration scores: the FPR on new clean images is then target on average,
but any one calibration sample puts it above or below by the quantile's
noise (at 5% and 4,871 images, a standard error of 0.3 points), so about
half of the thresholds fitted this way break the promise.

With ``confidence=c`` (e.g. 0.95) the threshold is raised until the
one-sided Clopper-Pearson upper c-bound of the FPR, given the k calibration
scores above it out of n, is at most the target: the largest k with
P(Binomial(n, target) <= k) <= 1 - c.  Under exchangeability that holds the
true FPR at or below the target with probability c (a "training-conditional"
guarantee, as in Vovk 2012 and the PAC prediction sets of Park et al. 2020),
paid for by a slightly higher threshold.  It does not protect against a shift
between the calibration images and the deployment's.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta, binom


def allowed_exceedances(n: int, target_fpr: float, confidence: float) -> int:
    """The most calibration scores (of n) that may lie above the threshold
    while the Clopper-Pearson upper ``confidence`` bound of the FPR stays at
    or below ``target_fpr``.  Raises ValueError when even k = 0 is too many
    (n < log(1 - confidence) / log(1 - target_fpr))."""
    k = np.arange(n + 1)
    ok = np.flatnonzero(binom.cdf(k, n, target_fpr) <= 1.0 - confidence)
    if len(ok) == 0:
        need = int(np.ceil(np.log(1.0 - confidence) / np.log(1.0 - target_fpr)))
        raise ValueError(f"{n} calibration images cannot bound a {target_fpr:g} false-positive rate at "
                         f"{confidence:g} confidence: at least {need} are needed (or lower the confidence)")
    return int(ok[-1])


def fpr_upper_bound(exceedances: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper ``confidence`` bound of a rate seen as
    ``exceedances`` of ``n``."""
    if exceedances >= n:
        return 1.0
    return float(beta.ppf(confidence, exceedances + 1, n - exceedances))


def fpr_threshold(scores: np.ndarray, target_fpr: float, confidence: float = 0.0) -> float:
    """The threshold (flag = score > threshold) for ``target_fpr`` on clean
    scores: the plain 'higher' (1 - target) quantile when confidence is 0,
    else the (n - k)-th smallest score with k = allowed_exceedances, so that
    at most k calibration scores lie above it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if len(scores) == 0:
        raise ValueError("calibration needs at least one clean score")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if confidence == 0.0:
        return float(np.quantile(scores, 1.0 - target_fpr, method="higher"))
    k = allowed_exceedances(len(scores), target_fpr, confidence)
    return float(scores[len(scores) - k - 1])


def calibration_facts(scores: np.ndarray, threshold: float, target_fpr: float, confidence: float) -> dict:
    """What a threshold means on its own calibration scores (for the
    bundle's profile and model card)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    above = int((scores > threshold).sum())
    facts = {"rule": "clopper-pearson upper bound" if confidence else "quantile",
             "confidence": confidence, "calibration_fpr": above / len(scores), "scores_above": above}
    if confidence:
        facts["fpr_upper_bound"] = fpr_upper_bound(above, len(scores), confidence)
    return facts
