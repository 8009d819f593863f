"""The stronger unsupervised baselines (issue 11) against their papers'
definitions, each recomputed here directly with numpy / scipy /
scikit-learn on small synthetic tensors: energy (Liu et al. 2020),
multi-layer Mahalanobis (Lee et al. 2018), deep k-NN (Sun et al. 2022) and
NIC (Ma et al. 2019), whose stored-as-tensors models must give
scikit-learn's own decision functions."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import torch
from pathguard.detector.artifacts import atomic_save_tensors, load_tensors
from pathguard.detector.base import Detector
from pathguard.detector.baselines import (
    KNN,
    NIC,
    Energy,
    Mahalanobis,
    MultiLayerMahalanobis,
    OneClassRBF,
    Projection,
    SoftmaxRegression,
    fit_split,
)
from pathguard.detector.paths import PathBatch
from scipy.special import logsumexp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

CLASSES = 3


def synthetic(n: int, seed: int, dims=(12, 7, 5), labelled: bool = True, shift: float = 0.0) -> PathBatch:
    """Class-structured rows: every layer a class centre plus noise of its
    own scale; ``blocks`` and ``activations`` hold the same layers."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(99)
    labels = torch.arange(n) % CLASSES
    layers = []
    for d in dims:
        centres = 3 * torch.randn(CLASSES, d, generator=fixed)
        mixing = torch.randn(d, d, generator=fixed) / d ** 0.5 + torch.eye(d)
        layers.append(centres[labels] + torch.randn(n, d, generator=gen) @ mixing + shift)
    logits = torch.randn(n, CLASSES, generator=gen)
    logits[torch.arange(n), labels] += 3.0
    features = layers[-1]
    return PathBatch(logits, torch.zeros(n, 0), torch.zeros(n, 0), features, [],
                     labels=labels if labelled else None, blocks=list(layers), activations=list(layers))


def round_trip(detector: Detector, tmp_path) -> Detector:
    atomic_save_tensors(tmp_path / "state.safetensors", detector.state_tensors())
    config = json.loads(json.dumps(detector.config()))
    return Detector.from_saved(config, load_tensors(tmp_path / "state.safetensors"))


# ------------------------------------------------------------------ energy


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_energy_is_minus_t_logsumexp_of_logits_over_t(temperature):
    batch = synthetic(50, seed=0)
    batch.logits = 10 * batch.logits  # large logits: logsumexp must be the stable form
    expected = -temperature * logsumexp(batch.logits.double().numpy() / temperature, axis=1)
    got = Energy(temperature=temperature).fit(batch).score_samples(batch)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-10)


def test_energy_is_low_for_a_confident_answer():
    confident = torch.tensor([[12.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.1, 0.0, 0.05]])
    batch = synthetic(2, seed=0)
    batch.logits = torch.cat([confident, unsure])
    scores = Energy().fit(batch).score_samples(batch)
    assert scores[0] < scores[1]  # in-distribution = low energy = less suspicious


# ------------------------------------------------- multi-layer Mahalanobis


def numpy_min_mahalanobis(train: np.ndarray, labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Lee et al. 2018, eq. 1-2: class means, the tied covariance
    (1/N) sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T, and
    M(x) = min_c (x - mu_c)^T Sigma^-1 (x - mu_c)."""
    means = np.stack([train[labels == c].mean(0) for c in range(CLASSES)])
    centred = train - means[labels]
    inverse = np.linalg.inv(centred.T @ centred / len(train))
    d = query[:, None, :] - means[None]
    return np.einsum("ncf,fg,ncg->nc", d, inverse, d).min(1)


def test_multi_layer_mahalanobis_is_the_standardised_equal_weight_mean_of_per_block_scores():
    train, query = synthetic(300, seed=0), synthetic(40, seed=1, shift=0.7)
    detector = MultiLayerMahalanobis().fit(train)
    labels = train.labels.numpy()
    per_layer_train = [numpy_min_mahalanobis(f.numpy().astype(np.float64), labels, f.numpy().astype(np.float64))
                       for f in train.blocks]
    per_layer_query = [numpy_min_mahalanobis(f.numpy().astype(np.float64), labels, q.numpy().astype(np.float64))
                       for f, q in zip(train.blocks, query.blocks)]
    expected = np.mean([(q - t.mean()) / t.std(ddof=1) for t, q in zip(per_layer_train, per_layer_query)], axis=0)
    np.testing.assert_allclose(detector.score_samples(query), expected, rtol=1e-8)
    np.testing.assert_allclose(detector.layer_scores(query).numpy(), np.stack(per_layer_query, 1), rtol=1e-8)
    assert detector.view_ == "blocks"


def test_one_block_gives_the_single_layer_mahalanobis_up_to_standardisation():
    train, query = synthetic(300, seed=0, dims=(6,)), synthetic(30, seed=2, dims=(6,))
    single = Mahalanobis().fit(train).score_samples(query)
    multi = MultiLayerMahalanobis().fit(train)
    standardised = (single - float(multi.centre_[0])) / float(multi.spread_[0])
    np.testing.assert_allclose(multi.score_samples(query), standardised, rtol=1e-9)


def test_multi_layer_mahalanobis_uses_predictions_without_labels_and_refuses_another_view(tmp_path):
    train = synthetic(300, seed=0, labelled=False)
    detector = MultiLayerMahalanobis(source="blocks").fit(train)
    labelled = MultiLayerMahalanobis(source="blocks").fit(synthetic(300, seed=0))
    assert not torch.equal(detector.means_[0], labelled.means_[0])  # predictions differ from labels somewhere
    loaded = round_trip(detector, tmp_path)
    query = synthetic(20, seed=4)
    np.testing.assert_array_equal(loaded.score_samples(query), detector.score_samples(query))
    query.blocks = []
    with pytest.raises(ValueError, match="blocks=True"):
        detector.score_samples(query)
    with pytest.raises(ValueError, match="dimensions"):
        detector.score_samples(synthetic(20, seed=4, dims=(12, 7)))


def test_multi_layer_mahalanobis_refuses_full_activations_too_wide_for_a_covariance():
    batch = synthetic(50, seed=0, dims=(3,))
    batch.blocks, batch.activations = [], [torch.randn(50, 5000), batch.features]
    with pytest.raises(ValueError, match="blocks=True"):
        MultiLayerMahalanobis().fit(batch)


# --------------------------------------------------------------------- KNN


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_is_the_distance_to_the_kth_normalised_training_neighbour(k):
    train, query = synthetic(400, seed=0), synthetic(60, seed=1, shift=0.5)
    bank, q = (f.double().numpy() for f in (train.features, query.features))
    bank, q = bank / np.linalg.norm(bank, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    expected = NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(q)[0][:, k - 1]
    got = KNN(k=k, chunk=16).fit(train).score_samples(query)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_knn_ignores_the_feature_norm_and_needs_k_training_rows():
    train, query = synthetic(100, seed=0), synthetic(10, seed=1)
    detector = KNN(k=7).fit(train)
    scaled = synthetic(10, seed=1)
    scaled.features = 5.0 * scaled.features
    np.testing.assert_allclose(detector.score_samples(scaled), detector.score_samples(query), rtol=1e-6)
    with pytest.raises(ValueError, match="k=50"):
        KNN().fit(synthetic(30, seed=0))


# --------------------------------------------------------------------- NIC


def test_one_class_rbf_tensors_give_sklearns_decision_function():
    rng = np.random.default_rng(0)
    x, held_out = rng.normal(size=(300, 6)), 1.5 * rng.normal(size=(100, 6))
    model = OneClassSVM(kernel="rbf", nu=0.1, gamma="scale").fit(x)
    ours = OneClassRBF.fit(x, nu=0.1)  # gamma = 1 / (d Var x): sklearn's "scale"
    expected = model.decision_function(held_out)
    np.testing.assert_allclose(ours.decision(torch.from_numpy(held_out)).numpy(), expected, atol=1e-6)
    copied = OneClassRBF.from_sklearn(OneClassSVM(nu=0.2, gamma=0.3).fit(x), 0.3)
    np.testing.assert_allclose(copied.decision(torch.from_numpy(held_out)).numpy(),
                               OneClassSVM(nu=0.2, gamma=0.3).fit(x).decision_function(held_out), atol=1e-6)


def test_projection_and_softmax_tensors_give_sklearns_transform_and_probabilities():
    rng = np.random.default_rng(1)
    x, held_out = rng.normal(size=(200, 9)) * np.arange(1, 10), rng.normal(size=(50, 9)) * 3
    pca = PCA(n_components=4, random_state=0).fit(x)
    np.testing.assert_allclose(Projection.from_sklearn(pca)(torch.from_numpy(held_out)).numpy(),
                               pca.transform(held_out), atol=1e-9)
    for classes in (3, 2):
        labels = (x[:, 0] > 0).astype(int) + (classes == 3) * (x[:, 1] > 0)
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0)).fit(x, labels)
        ours = SoftmaxRegression.fit(x, labels, seed=0)
        np.testing.assert_allclose(ours.proba(torch.from_numpy(held_out)).numpy(), pipeline.predict_proba(held_out),
                                   atol=1e-6)


def sklearn_nic_invariants(train: PathBatch, query: PathBatch, detector: NIC) -> np.ndarray:
    """NIC's invariants rebuilt from scikit-learn objects on the same rows."""
    rows, _ = fit_split(len(train), detector.max_fit, detector.holdout, detector.seed)
    labels = train.predictions[rows].numpy()
    values, probs = [], []
    for a, q in zip(train.activations, query.activations):
        x = a[rows].double().numpy()
        pca = PCA(n_components=min(detector.n_components, x.shape[1]), random_state=detector.seed).fit(x)
        z, zq = pca.transform(x), pca.transform(q.double().numpy())
        values.append(-OneClassSVM(nu=detector.nu, gamma="scale").fit(z).decision_function(zq))
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=detector.seed)).fit(z, labels)
        probs.append((lr.predict_proba(z), lr.predict_proba(zq)))
    provenance = [-OneClassSVM(nu=detector.nu, gamma="scale").fit(np.hstack([p[0], n[0]]))
                  .decision_function(np.hstack([p[1], n[1]])) for p, n in pairwise(probs)]
    return np.stack(values + provenance, 1)


def test_nic_invariants_are_sklearns_value_and_provenance_svms():
    train, query = synthetic(260, seed=0, dims=(20, 9, 6, 3)), synthetic(40, seed=5, dims=(20, 9, 6, 3), shift=0.5)
    detector = NIC(n_components=8, combine="square").fit(train)
    got = detector.invariant_scores(query).numpy()
    assert got.shape == (40, 4 + 3)
    np.testing.assert_allclose(got, sklearn_nic_invariants(train, query, detector), atol=1e-6)
    standard = (got - detector.centre_.numpy()) / detector.spread_.numpy()
    np.testing.assert_allclose(detector.score_samples(query), (standard ** 2).mean(1), atol=1e-9)
    assert detector.final_ is None and "final.support" not in detector.state_tensors()


def test_nic_provenance_flags_a_layer_that_follows_another_class():
    """Every layer alone looks clean, but layer 1 follows another class
    than layer 0: only the provenance invariant should object."""
    train = synthetic(400, seed=0, dims=(8, 8))
    detector = NIC(n_components=8).fit(train)
    clean, mixed = synthetic(60, seed=6, dims=(8, 8)), synthetic(60, seed=6, dims=(8, 8))
    other = synthetic(60, seed=7, dims=(8, 8))
    mixed.activations = [clean.activations[0], other.activations[1].roll(1, dims=0)]  # class of the next row
    inv_clean, inv_mixed = detector.invariant_scores(clean), detector.invariant_scores(mixed)
    assert inv_mixed[:, 2].median() > inv_clean[:, 2].quantile(0.95)  # provenance of the pair
    assert inv_mixed[:, 1].median() < inv_clean[:, 1].quantile(0.95)  # layer 1's values alone look clean


def test_nic_combines_with_the_papers_final_svm_round_trips_and_refuses_other_layers(tmp_path):
    train, query = synthetic(200, seed=0), synthetic(30, seed=8, shift=0.4)
    detector = NIC(n_components=5).fit(train)
    assert detector.combine == "svm"
    _, held_out = fit_split(len(train), detector.max_fit, detector.holdout, detector.seed)
    standard_fit = ((detector.invariant_scores(train.subset(held_out)) - detector.centre_) / detector.spread_).numpy()
    final = OneClassSVM(nu=detector.nu, gamma="scale").fit(standard_fit)  # the final SVM, as sklearn fits it
    standard = ((detector.invariant_scores(query) - detector.centre_) / detector.spread_).numpy()
    np.testing.assert_allclose(detector.score_samples(query), -final.decision_function(standard), atol=1e-6)
    loaded = round_trip(detector, tmp_path)
    assert loaded.final_ is not None and loaded.get_params() == detector.get_params()
    np.testing.assert_array_equal(loaded.score_samples(query), detector.score_samples(query))
    with pytest.raises(ValueError, match="dimensions"):
        detector.score_samples(synthetic(5, seed=0, dims=(12, 7)))


@pytest.mark.parametrize("dims", [(4,), (10, 6), (16, 12, 8, 6, 4, 3)])
def test_multi_layer_detectors_take_any_number_of_layers(dims):
    train, query = synthetic(150, seed=0, dims=dims), synthetic(10, seed=1, dims=dims)
    for detector in (NIC(n_components=4), MultiLayerMahalanobis()):
        scores = detector.fit(train).score_samples(query)
        assert scores.shape == (10,) and np.isfinite(scores).all()
    assert NIC(n_components=4).fit(train).invariant_scores(query).shape == (10, 2 * len(dims) - 1)


def test_nic_fits_on_at_most_max_fit_rows_and_holds_some_back():
    models, combine = fit_split(1000, max_fit=300, holdout=0.3, seed=0)
    assert len(models) == 210 and len(combine) == 90
    assert len(set(models.tolist()) | set(combine.tolist())) == 300
    assert torch.equal(fit_split(1000, 300, 0.3, 0)[0], models)
    with pytest.raises(ValueError, match="clean examples"):
        NIC().fit(synthetic(12, seed=0))
