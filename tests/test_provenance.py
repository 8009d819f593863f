"""Detector v2 (detector/provenance.py): every channel against its
definition recomputed here with scikit-learn / numpy, the p-value
combination rules, the evidence the service reports, and the behaviour the
detectors exist for, on small synthetic class-structured batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pathguard.detector.base import Detector
from pathguard.detector.detectors import PATH_SCORES, make_detector
from pathguard.detector.paths import PathBatch
from pathguard.detector.provenance import (
    ChannelScore,
    exponential_tail,
    layer_view,
    parse_channel,
    shared_classifier_fits,
    silverman_bandwidth,
    upper_tail_log_p,
)
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

CLASSES = 3
WIDTHS = [6, 8]
BLOCK_DIMS = [5, 7, 9]


def synthetic(n: int, seed: int, shift_block0: float = 0.0, unsure: bool = False) -> PathBatch:
    """Rows whose every view carries the class: block features around class
    centres, gate logits around class patterns, confident logits.  With
    ``shift_block0`` the first block is moved off every class; with
    ``unsure`` the logits are nearly flat (the true class by a thin margin)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(7)
    labels = torch.arange(n) % CLASSES
    blocks = []
    for d in BLOCK_DIMS:
        centres = 3 * torch.randn(CLASSES, d, generator=fixed)
        blocks.append(centres[labels] + torch.randn(n, d, generator=gen))
    blocks[0] = blocks[0] + shift_block0
    patterns = torch.randn(CLASSES, sum(WIDTHS), generator=fixed).sign() * 2
    gate_logits = patterns[labels] + torch.randn(n, sum(WIDTHS), generator=gen)
    logits = torch.randn(n, CLASSES, generator=gen)
    if unsure:  # still the right class, by a thin margin
        logits = torch.zeros(n, CLASSES)
        logits[torch.arange(n), labels] = 0.05 + 0.05 * torch.rand(n, generator=gen)
    else:
        logits[torch.arange(n), labels] += 5.0
    # the blocks' spatial spreads: around a class-free level (with_spreads below varies them)
    spreads = [1.0 + 0.1 * torch.randn(n, d, generator=gen) for d in BLOCK_DIMS]
    return PathBatch(logits, (gate_logits > 0).float(), gate_logits, blocks[-1], list(WIDTHS), labels=labels,
                     blocks=blocks, spreads=spreads)


ALL_KINDS = ("value:block0", "evidence:block1", "agreement:block0+gates1", "confidence", "path",
             "knn:block1+block2")


@pytest.fixture(scope="module")
def fitted() -> ChannelScore:
    detector = ChannelScore(channels=ALL_KINDS, k=5, bank_size=200, max_fit=400, reference_fraction=0.25)
    return detector.fit(synthetic(500, seed=0)).calibrate(synthetic(300, seed=1))


def fit_rows(detector: ChannelScore, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``fit`` gave the channel models and the p-value references."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(detector.seed))[:detector.max_fit]
    n_ref = min(detector.max_reference, max(10, round(detector.reference_fraction * len(order))))
    return order[n_ref:], order[:n_ref]


def sklearn_log_proba(x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    scaler = StandardScaler().fit(x_fit)
    model = LogisticRegression(max_iter=2000, random_state=0).fit(scaler.transform(x_fit), y_fit)
    return model.predict_log_proba(scaler.transform(x))


def test_every_channel_is_its_definition(fitted):
    clean = synthetic(500, seed=0)
    rows, _ = fit_rows(fitted, len(clean))
    part = clean.subset(rows)
    y = part.labels.numpy()
    probe = synthetic(40, seed=5, shift_block0=1.5)
    pred = probe.predictions.numpy()
    got = fitted.channel_scores(probe).numpy()

    # value:block0: distance to the predicted class mean under the tied Ledoit-Wolf precision
    x = part.blocks[0].double().numpy()
    means = np.stack([x[y == c].mean(0) for c in range(CLASSES)])
    precision = LedoitWolf(assume_centered=True).fit(x - means[y]).precision_
    d = probe.blocks[0].double().numpy() - means[pred]
    np.testing.assert_allclose(got[:, 0], np.einsum("nf,fg,ng->n", d, precision, d), rtol=1e-6)

    # evidence:block1: -log P_block1(predicted class), a standardised multinomial logistic regression
    log_p1 = sklearn_log_proba(part.blocks[1].double().numpy(), y, probe.blocks[1].double().numpy())
    np.testing.assert_allclose(got[:, 1], -log_p1[np.arange(40), pred], rtol=1e-5, atol=1e-8)

    # agreement:block0+gates1: -log sum_c P_block0(c) P_gates1(c)
    log_p0 = sklearn_log_proba(x, y, probe.blocks[0].double().numpy())
    gates1 = layer_view(part, "gates1").numpy()
    log_pg = sklearn_log_proba(gates1, y, layer_view(probe, "gates1").numpy())
    agreement = -np.log(np.exp(log_p0 + log_pg).sum(1))
    np.testing.assert_allclose(got[:, 2], agreement, rtol=1e-5, atol=1e-8)

    # confidence: -log max softmax
    logits = probe.logits.double().numpy()
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(got[:, 3], -log_softmax.max(1), rtol=1e-9)

    # path: the logit-gauss distance of the profile
    np.testing.assert_allclose(got[:, 4], fitted.profile_.logit_distance(probe.gate_logits, probe.predictions))

    # knn (Deep k-NN): per layer, labels of the k nearest bank rows (L2-normalised) unlike the prediction
    bank_rows = torch.randperm(len(part), generator=torch.Generator().manual_seed(fitted.seed + 1))[:200]
    wrong = np.zeros(40)
    for i in (1, 2):
        def unit(a):
            return a / np.linalg.norm(a, axis=1, keepdims=True)
        bank = unit(part.blocks[i][bank_rows].double().numpy())
        nearest = NearestNeighbors(n_neighbors=5).fit(bank).kneighbors(
            unit(probe.blocks[i].double().numpy()), return_distance=False)
        wrong += (y[bank_rows.numpy()][nearest] != pred[:, None]).sum(1)
    np.testing.assert_array_equal(got[:, 5], wrong)


def test_p_values_are_conformal_in_the_small_bandwidth_limit():
    reference = torch.arange(100, dtype=torch.float64)
    scores = torch.tensor([-3.0, 10.5, 49.5, 88.5, 98.5, 250.0], dtype=torch.float64)
    log_p = upper_tail_log_p(scores, reference, bandwidth=1e-4)
    at_or_above = np.array([(reference.numpy() >= s).sum() for s in scores.numpy()])
    np.testing.assert_allclose(log_p.exp().numpy(), (1 + at_or_above) / 101, rtol=1e-9)
    # with the exponential tail: the same up to its threshold, then the +1 fades as exp(-(x - u) / beta)
    u, beta = exponential_tail(reference)
    assert u == 89.0 and beta == pytest.approx(np.mean(np.arange(90, 100) - 89.0))
    tailed = upper_tail_log_p(scores, reference, 1e-4, (u, beta)).exp().numpy()
    np.testing.assert_allclose(tailed[:4], (1 + at_or_above[:4]) / 101, rtol=1e-9)
    np.testing.assert_allclose(tailed[4:], (at_or_above[4:] + np.exp(-(scores[4:].numpy() - u) / beta)) / 101,
                               rtol=1e-9)
    # smoothed: monotone decreasing in the score, never 0, at most 1, and still falling far out
    grid = torch.linspace(-50, 400, 400, dtype=torch.float64)
    wide = upper_tail_log_p(grid, reference, 5.0, (u, beta))
    assert (wide[1:] < wide[:-1]).all() and wide.exp().min() > 0 and wide.exp().max() <= 1
    x = torch.tensor([300.0], dtype=torch.float64, requires_grad=True)
    upper_tail_log_p(x, reference, 1.0, (u, beta)).sum().backward()
    assert x.grad.item() == pytest.approx(-1 / beta, rel=1e-3)  # the attacker keeps a gradient


def test_silverman_bandwidth_is_the_rule_of_thumb():
    r = torch.from_numpy(np.random.default_rng(0).gamma(2.0, size=500))
    x = r.numpy()
    spread = min(x.std(ddof=1), (np.quantile(x, 0.75) - np.quantile(x, 0.25)) / 1.34)
    assert silverman_bandwidth(r) == pytest.approx(0.9 * spread * 500 ** -0.2)
    assert silverman_bandwidth(torch.ones(50, dtype=torch.float64)) > 0


def test_combination_rules(fitted):
    probe = synthetic(30, seed=6, shift_block0=2.0)
    log_p = np.log(fitted.channel_p_values(probe))
    np.testing.assert_allclose(fitted.score_samples(probe), -2 * log_p.sum(1), rtol=1e-9)
    min_p = ChannelScore(channels=ALL_KINDS[:4], combine="min-p", max_fit=400).fit(synthetic(500, seed=0))
    log_p = np.log(min_p.channel_p_values(probe))
    np.testing.assert_allclose(min_p.score_samples(probe), -log_p.min(1), rtol=1e-9)


def test_fusion_catches_what_each_channel_sees_and_names_it():
    fusion = make_detector("fusion", max_fit=600).fit(synthetic(600, seed=0)).calibrate(synthetic(400, seed=1))
    assert fusion.channels_ == ("value:block0", "confidence")
    clean = synthetic(200, seed=2)
    assert fusion.predict(clean).mean() < 0.15
    moved = synthetic(100, seed=3, shift_block0=4.0)  # strong attacks: the first block is off
    unsure = synthetic(99, seed=4, unsure=True)      # minimal attacks: the answer is unsure
    assert fusion.predict(moved).mean() > 0.9 and fusion.predict(unsure).mean() > 0.5
    assert {e["most_deviating"] for e in fusion.evidence(moved)} == {"value:block0"}
    flagged = fusion.predict(unsure)
    assert {e["most_deviating"] for e, f in zip(fusion.evidence(unsure), flagged) if f} == {"confidence"}
    evidence = fusion.evidence(clean)[0]
    assert set(evidence["p_values"]) == {"value:block0", "confidence"}
    assert all(0 < p <= 1 for p in evidence["p_values"].values())


def test_layer_classes_read_the_class_off_each_gated_layer(fitted):
    probe = synthetic(90, seed=8)
    classes, probs = fitted.layer_classes(probe)
    assert classes.shape == probs.shape == (90, len(WIDTHS))
    assert (classes == probe.labels.numpy()[:, None]).mean() > 0.9
    assert ((probs > 0) & (probs <= 1)).all()
    # the first path scores answer from the class effective paths (Jaccard)
    jaccard_based = make_detector("logit-gauss").fit(synthetic(300, seed=0))
    classes, sims = jaccard_based.layer_classes(probe)
    assert (classes == probe.labels.numpy()[:, None]).mean() > 0.9 and (sims <= 1).all()
    worst = jaccard_based.evidence(probe)[0]
    assert worst["most_deviating"].startswith("gated layer ") and worst["p_values"] is None


def test_an_image_scores_the_same_alone_and_in_a_batch(fitted):
    batch = synthetic(64, seed=9, shift_block0=0.5)
    together = fitted.score_samples(batch)
    alone = np.concatenate([fitted.score_samples(batch.subset([i])) for i in range(0, 64, 7)])
    np.testing.assert_allclose(alone, together[::7], rtol=1e-12)


def test_saved_and_loaded_gives_the_same_scores_and_evidence(fitted):
    again = Detector.from_saved(fitted.config(), fitted.state_tensors())
    probe = synthetic(50, seed=10, shift_block0=1.0)
    np.testing.assert_array_equal(again.score_samples(probe), fitted.score_samples(probe))
    assert again.evidence(probe) == fitted.evidence(probe) and again.channels_ == fitted.channels_
    assert all(t.dtype != torch.uint8 for t in fitted.state_tensors().values())


def test_score_is_differentiable_in_the_layers_for_the_adaptive_attack():
    detector = make_detector("fusion-fisher", max_fit=500).fit(synthetic(500, seed=0))
    probe = synthetic(10, seed=11)
    blocks = [b.clone().requires_grad_(True) for b in probe.blocks]
    logits = probe.logits.clone().requires_grad_(True)
    soft = PathBatch(logits, probe.paths, probe.gate_logits, probe.features, list(WIDTHS), blocks=blocks)
    detector.score_tensor(soft).sum().backward()
    assert blocks[0].grad.abs().sum() > 0 and blocks[1].grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_default_channels_follow_the_model():
    batch = synthetic(400, seed=0)
    evidence = make_detector("class-evidence", max_fit=400).fit(batch)
    assert evidence.channels_ == ("evidence:gates0", "evidence:gates1", "agreement:gates0+gates1")
    provenance = make_detector("provenance", max_fit=400).fit(batch)
    assert provenance.channels_ == ("value:block0", "value:block1", "value:block2", "value:gates0", "value:gates1",
                                    "agreement:block0+block1", "agreement:block1+block2")
    assert make_detector("path-knn", max_fit=400, k=5).fit(batch).channels_ == ("knn:block0+block1+block2",)
    assert {"class-evidence", "provenance", "path-knn", "fusion", "fusion-path", "fusion-fisher"} <= set(PATH_SCORES)
    with_path = make_detector("fusion-path", max_fit=400).fit(batch)
    assert with_path.channels_ == ("value:block0", "confidence", "path") and with_path.combine == "min-p"
    # min-p: the most deviating of its channels decides, so it is the smallest p-value's -log
    head = batch.subset(torch.arange(20))
    log_p = with_path.channel_log_p(head)
    np.testing.assert_allclose(with_path.score_samples(head), -log_p.min(1).values.numpy())


def with_spreads(batch: PathBatch, seed: int, noisy_block0: float = 0.0) -> PathBatch:
    """``batch`` with per-block spreads around a class-free level; with
    ``noisy_block0`` the first block's spreads are raised (what high-frequency
    noise does to a first convolution) while its means stay where they were."""
    gen = torch.Generator().manual_seed(seed)
    batch.spreads = [1.0 + 0.1 * torch.randn(len(batch), d, generator=gen) for d in BLOCK_DIMS]
    batch.spreads[0] = batch.spreads[0] + noisy_block0
    return batch


def test_spread_and_moments_views_and_the_fusion_that_reads_them():
    batch = with_spreads(synthetic(400, seed=0), seed=3)
    assert torch.equal(layer_view(batch, "spread2"), batch.spreads[2].double())
    assert torch.equal(layer_view(batch, "moments0"), torch.cat([batch.blocks[0], batch.spreads[0]], 1).double())
    moments = make_detector("fusion-moments", max_fit=400).fit(batch)
    assert moments.channels_ == ("value:moments0", "confidence", "path") and moments.combine == "min-p"
    # noise that leaves the first block's means alone: the mean-only fusion misses it, the moments see it
    clean, noisy = with_spreads(synthetic(60, seed=8), seed=9), with_spreads(synthetic(60, seed=8), seed=9,
                                                                              noisy_block0=1.0)
    mean_only = make_detector("fusion-path", max_fit=400).fit(batch)
    assert np.allclose(mean_only.score_samples(noisy), mean_only.score_samples(clean))
    assert (moments.score_samples(noisy) > moments.score_samples(clean)).all()
    assert make_detector("fusion-moments").fit(batch).evidence(noisy)[0]["most_deviating"] == "value:moments0"
    saved = Detector.from_saved(moments.config(), moments.state_tensors())
    np.testing.assert_allclose(saved.score_samples(noisy), moments.score_samples(noisy))
    batch.spreads = []
    with pytest.raises(ValueError, match="no block spreads"):
        layer_view(batch, "moments0")


def test_fusion_evidence_reads_the_middle_block():
    """fusion-evidence: the first block's moments, the confidence and the
    class evidence of block len(blocks) // 2 (block3 of vgg7's seven)."""
    batch = with_spreads(synthetic(400, seed=0), seed=3)
    detector = make_detector("fusion-evidence", max_fit=400).fit(batch)
    assert detector.channels_ == ("value:moments0", "confidence", "evidence:block1")
    assert detector.combine == "min-p"
    # a batch whose middle block's features point to another class than the prediction scores higher
    moved = with_spreads(synthetic(60, seed=8), seed=9)
    moved.blocks[1] = moved.blocks[1].roll(1, dims=0)
    same = with_spreads(synthetic(60, seed=8), seed=9)
    assert detector.score_samples(moved).mean() > detector.score_samples(same).mean()


def test_bad_channels_and_missing_blocks_are_refused_clearly():
    for spec, message in [("colour:block0", "kind"), ("value", "takes 1"), ("agreement:block0", "takes 2"),
                          ("knn", "at least one layer")]:
        with pytest.raises(ValueError, match=message):
            parse_channel(spec)
    with pytest.raises(ValueError, match="unknown layer"):
        ChannelScore(channels=("value:conv9",)).fit(synthetic(100, seed=0))
    with pytest.raises(ValueError, match="combine"):
        ChannelScore(channels=("confidence",), combine="mean").fit(synthetic(100, seed=0))
    no_blocks = synthetic(100, seed=0)
    no_blocks.blocks = []
    with pytest.raises(ValueError, match="block"):
        make_detector("fusion").fit(no_blocks)


def test_p_values_stay_finite_and_ordered_far_beyond_the_reference():
    reference = torch.arange(100, dtype=torch.float64)
    u, beta = exponential_tail(reference)
    far = torch.tensor([1e3, 1e5, 1e7], dtype=torch.float64)
    log_p = upper_tail_log_p(far, reference, 1.0, (u, beta))
    assert torch.isfinite(log_p).all() and (log_p[1:] < log_p[:-1]).all()
    np.testing.assert_allclose(log_p.numpy(), -(far.numpy() - u) / beta - np.log(101), rtol=1e-9)


def test_score_and_evidence_together_equal_them_apart(fitted):
    probe = synthetic(40, seed=12, shift_block0=1.0)
    scores, evidence = fitted.score_and_evidence(probe)
    np.testing.assert_array_equal(scores, fitted.score_samples(probe))
    assert evidence == fitted.evidence(probe)


def test_shared_classifier_fits_fit_each_classifier_once_and_change_nothing(monkeypatch):
    # what `pathguard fit --score auto` does: every channel score on one clean batch
    from pathguard.detector import baselines

    clean = synthetic(240, seed=0)
    names = [n for n in PATH_SCORES if issubclass(type(make_detector(n)), ChannelScore)]
    assert len(names) >= 3
    apart = {n: make_detector(n).fit(clean) for n in names}

    fits = []
    real_fit = baselines.SoftmaxRegression.fit.__func__

    def counting_fit(cls, x, labels, seed):
        fits.append(x.shape)
        return real_fit(cls, x, labels, seed)

    monkeypatch.setattr(baselines.SoftmaxRegression, "fit", classmethod(counting_fit))
    for n in names:
        make_detector(n).fit(clean)
    made_apart = len(fits)
    fits.clear()
    with shared_classifier_fits():
        shared = {n: make_detector(n).fit(clean) for n in names}
    # one fit per distinct (layer, rows, labels, seed): the per-layer path classifiers once for all
    assert 0 < len(fits) < made_apart and len(fits) == len(set(fits)), (len(fits), made_apart)
    probe = synthetic(30, seed=1, shift_block0=2.0)
    for n in names:
        a, b = apart[n].state_tensors(), shared[n].state_tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n
        assert np.array_equal(apart[n].score_samples(probe), shared[n].score_samples(probe)), n
    # each detector owns its copy (safetensors stores no tensor twice), and nothing is kept after the block
    first, second = shared[names[0]].path_classifiers_[0], shared[names[1]].path_classifiers_[0]
    assert first.coef.data_ptr() != second.coef.data_ptr()
    fits.clear()
    make_detector(names[0]).fit(clean)
    assert len(fits) > 0


def test_blocks_read_names_the_fitted_channels_blocks_and_unread_ones_fail_loudly(fitted):
    # ALL_KINDS read block0 (value, agreement), block1 (evidence, knn) and block2 (knn)
    assert fitted.blocks_read() == {0, 1, 2}
    narrow = ChannelScore(channels=("value:moments0", "confidence", "path"), max_fit=400, reference_fraction=0.25)
    assert narrow.blocks_read() is None  # not fitted: it may read any block
    narrow.fit(synthetic(500, seed=0))
    assert narrow.blocks_read() == {0}
    assert ChannelScore(channels=("confidence", "path"), max_fit=400).fit(synthetic(500, seed=0)).blocks_read() == set()
    # a batch whose unread blocks are (N, 0) placeholders scores as the full batch does ...
    batch = synthetic(40, seed=3)
    placeholders = PathBatch(batch.logits, batch.paths, batch.gate_logits, batch.features, batch.widths,
                             blocks=[batch.blocks[0]] + [torch.zeros(40, 0)] * 2,
                             spreads=[batch.spreads[0]] + [torch.zeros(40, 0)] * 2)
    assert np.array_equal(narrow.score_samples(placeholders), narrow.score_samples(batch))
    # ... and a detector that reads a placeholder fails instead of scoring zeros
    with pytest.raises(RuntimeError):
        fitted.score_samples(placeholders)
