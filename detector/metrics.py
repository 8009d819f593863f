"""Detection metrics: thin, checked wrappers over scikit-learn.

Positives (label 1) are adversarial examples; larger scores = more suspicious.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _check(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("metrics need at least one negative and one positive score")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("scores must be finite")
    return np.concatenate([neg, pos]), np.concatenate([np.zeros(len(neg)), np.ones(len(pos))])


def tpr_at_fpr(neg, pos, fpr: float = 0.05) -> float:
    """Largest true-positive rate over operating points whose FPR <= fpr."""
    scores, labels = _check(neg, pos)
    fprs, tprs, _ = roc_curve(labels, scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


def detection_metrics(neg, pos, fpr: float = 0.05) -> dict:
    scores, labels = _check(neg, pos)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        f"tpr_at_{int(round(fpr * 100))}fpr": tpr_at_fpr(neg, pos, fpr),
        "negatives": int(len(np.asarray(neg))),
        "positives": int(len(np.asarray(pos))),
    }


def roc_points(neg, pos) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = _check(neg, pos)
    fprs, tprs, _ = roc_curve(labels, scores)
    return fprs, tprs


def auroc_standard_error(auroc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUROC measured on ``positives`` and ``negatives``
    independent scores (Hanley & McNeil 1982, Radiology 143: exponential
    approximation of the two pair-wise variance terms).  It needs only the
    figures a report keeps, so two reports on different samples, e.g. two
    models' evaluations, can be compared without their raw scores."""
    if not 0.0 <= auroc <= 1.0:
        raise ValueError(f"auroc must be in [0, 1], got {auroc}")
    if positives < 1 or negatives < 1:
        raise ValueError("an AUROC needs at least one positive and one negative")
    a = float(auroc)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    variance = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    return float(np.sqrt(max(variance, 0.0)))


def proportion_standard_error(rate: float, n: int) -> float:
    """Binomial standard error of a rate measured on ``n`` independent trials."""
    if not 0.0 <= rate <= 1.0 or n < 1:
        raise ValueError(f"need a rate in [0, 1] and n >= 1, got {rate}, {n}")
    return float(np.sqrt(rate * (1.0 - rate) / n))
