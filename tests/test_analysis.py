"""Tests for jaxcnmf.analysis: planted cases whose answers are known."""

import doctest
import json
import sys
import types

import numpy as np
import pytest
from scipy.optimize import nnls
from sklearn.metrics import normalized_mutual_info_score

from jaxcnmf import analysis


def aligned_F(num_classes=3, per_class=4, seed=0):
    """F whose concept k lives only on the images of class k."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    F = np.zeros((num_classes, labels.size))
    F[labels, np.arange(labels.size)] = rng.uniform(0.5, 2.0, labels.size)
    return F, labels


def test_docstring_examples_run():
    result = doctest.testmod(analysis, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20
    assert result.failed == 0


# ------------------------------------------------------------------ concepts from F


def test_class_shares_aligned_concepts_are_one_hot():
    F, labels = aligned_F()
    np.testing.assert_allclose(analysis.class_shares(F, labels, 3), np.eye(3))


def test_class_shares_mixed_row_and_zero_row_without_nan():
    F = np.array([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    labels = np.array([0, 0, 1, 2])
    shares = analysis.class_shares(F, labels, 3)
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert not np.isnan(shares).any()


def test_purity_and_nmi_are_one_for_aligned_concepts():
    F, labels = aligned_F()
    assert analysis.purity(F, labels) == pytest.approx(1.0)
    assert analysis.nmi(analysis.strongest_concept(F), labels) == pytest.approx(1.0)


def test_purity_of_a_mixed_concept_and_ignores_dead_concepts():
    F = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert analysis.purity(F, np.array([0, 1, 1])) == pytest.approx(0.75)
    assert analysis.purity(np.zeros((2, 3)), np.array([0, 1, 1])) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_nmi_agrees_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, 50)
    b = np.where(rng.random(50) < 0.6, a, rng.integers(0, 6, 50))
    assert analysis.nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


@pytest.mark.parametrize(
    "a, b",
    [
        ([0, 0, 0], [1, 1, 1]),
        ([0, 0, 0], [0, 1, 2]),
        ([0, 1, 2], [2, 0, 1]),
        ([-1, 3, 3], [0, 1, 1]),
    ],
)
def test_nmi_edge_cases_agree_with_sklearn(a, b):
    expected = normalized_mutual_info_score(a, b)
    assert analysis.nmi(np.array(a), np.array(b)) == pytest.approx(expected)


def test_strongest_concept_marks_empty_images():
    F = np.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0]])
    np.testing.assert_array_equal(analysis.strongest_concept(F), [0, 1, -1])


def test_top_images_largest_first():
    F = np.array([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(analysis.top_images(F, 3), [[1, 3, 2], [0, 1, 2]])


def test_concept_table_records():
    F = np.array([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    labels = np.array([0, 1, 2, 2])
    coarse = np.array([0, 0, 1, 1])
    records = analysis.concept_table(
        F, labels, ["cat", "dog", "car"], coarse, ["animal", "vehicle"], top=2, n_images=2
    )
    assert [r.concept for r in records] == [0, 1, 2]
    first, dead, third = records
    assert first.top_classes == (("dog", 0.75), ("cat", 0.25))
    assert first.entropy_bits == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))
    assert first.entropy_normalized == pytest.approx(first.entropy_bits / np.log2(3))
    assert first.top_superclasses == (("animal", 1.0),)
    np.testing.assert_array_equal(first.top_images, [1, 0])
    assert first.mass == pytest.approx(4 / 8)
    assert dead.top_classes == () and dead.entropy_bits == 0.0 and dead.mass == 0.0
    assert third.top_classes == (("car", 1.0),) and third.entropy_bits == 0.0
    row = json.loads(json.dumps(first.to_dict()))
    assert row["top_classes"][0] == ["dog", 0.75] and row["top_images"] == [1, 0]


def test_concept_table_requires_superclass_names_with_coarse_labels():
    F, labels = aligned_F()
    with pytest.raises(ValueError, match="superclass_names"):
        analysis.concept_table(F, labels, ["a", "b", "c"], coarse_labels=labels)


def test_concept_order_groups_by_dominant_class_then_share():
    # Concepts 0 and 2 are class 1 (2 purer), concept 1 is class 0.
    F = np.array([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1, 2])
    np.testing.assert_array_equal(analysis.concept_order(F, labels), [1, 2, 0])
    by_mass = analysis.concept_order(np.array([[1.0], [3.0], [2.0]]))
    np.testing.assert_array_equal(by_mass, [1, 2, 0])


def test_kmeans_baseline_recovers_clusters_and_normalises_views():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    centres = rng.uniform(0, 1, (3, 6)) * 5
    X = (centres[labels] + rng.uniform(0, 0.05, (30, 6))).T
    scores = analysis.kmeans_baseline(X, labels, k=3, seed=0)
    assert scores.nmi == pytest.approx(1.0) and scores.purity == pytest.approx(1.0)
    assert scores.assignment.shape == (30,)
    Y = rng.uniform(0, 1, (4, 30))
    small = analysis.kmeans_baseline({"a": X, "b": Y}, labels, k=3, seed=1)
    scaled = analysis.kmeans_baseline({"a": X, "b": 1000.0 * Y}, labels, k=3, seed=1)
    np.testing.assert_array_equal(small.assignment, scaled.assignment)


# ---------------------------------------------------------------- neurons per layer


def test_identical_loading_columns_give_similarity_one_and_rank_eigenvalue():
    O = np.tile(np.array([[1.0], [2.0], [0.5]]), (1, 4)) * np.array([1.0, 2.0, 3.0, 4.0])
    S = analysis.loading_similarity(O)
    np.testing.assert_allclose(S, np.ones((4, 4)))
    np.testing.assert_allclose(analysis.similarity_spectrum(S), [4.0, 0, 0, 0], atol=1e-12)


def test_disjoint_loadings_give_identity_and_zero_column_is_safe():
    O = np.zeros((5, 3))
    O[0, 0] = 2.0
    O[3, 1] = 1.0
    S = analysis.loading_similarity(O)
    np.testing.assert_allclose(S, np.diag([1.0, 1.0, 0.0]))
    assert not np.isnan(S).any()


def test_similarity_spectrum_is_sorted_and_matches_eigvals():
    rng = np.random.default_rng(0)
    S = analysis.loading_similarity(rng.random((8, 5)))
    eig = analysis.similarity_spectrum(S)
    assert np.all(np.diff(eig) <= 0)
    np.testing.assert_allclose(eig, np.sort(np.linalg.eigvals(S).real)[::-1], atol=1e-10)
    with pytest.raises(ValueError, match="symmetric"):
        analysis.similarity_spectrum(np.triu(np.ones((3, 3))))


def test_layer_summary_values_and_order():
    disjoint = np.eye(4)[:, :3]
    shared = np.ones((2, 3))
    summary = analysis.layer_summary({"conv": disjoint, "fc": shared}, top_k=2, order=[2, 0, 1])
    assert summary.layers == ("conv", "fc")
    np.testing.assert_allclose(summary.largest, [1.0, 3.0])
    np.testing.assert_allclose(summary.top_k_mean, [1.0, 1.5])
    np.testing.assert_allclose(summary.identity_distance, [0.0, np.sqrt(6.0)])
    partial = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    s = analysis.layer_summary({"x": partial}, order=[2, 0, 1])
    full = analysis.loading_similarity(partial)
    np.testing.assert_allclose(s.similarity["x"], full[np.ix_([2, 0, 1], [2, 0, 1])])
    assert len(summary.to_rows()) == 2 and "top_2_mean" in summary.to_rows()[0]
    with pytest.raises(ValueError, match="expected 3 columns"):
        analysis.layer_summary({"a": disjoint, "b": np.ones((2, 2))})
    with pytest.raises(ValueError, match="order: expected a permutation"):
        analysis.layer_summary({"a": disjoint}, order=[0, 0, 1])


# --------------------------------------------------------------------------- pixels


def test_known_latent_image_comes_back_after_scaling():
    rng = np.random.default_rng(0)
    H, W, rank = 4, 5, 2
    planted = rng.random((rank, H, W, 3))
    planted[:, 0, 0, :] = 0.0
    planted[:, -1, -1, :] = 1.0
    # P_i column k is the concept's channel image flattened row-major (row h*W + w), at
    # an arbitrary positive scale and offset that min-max scaling must undo.
    loadings = {
        name: 7.0 * planted[..., c].reshape(rank, H * W).T + 0.3
        for c, name in enumerate(["red", "green", "blue"])
    }
    latent = analysis.latent_images(loadings, (H, W, 3))
    assert latent.shape == (rank, H, W, 3)
    np.testing.assert_allclose(latent, planted, atol=1e-12)


def test_latent_images_constant_channel_gives_zeros_and_checks_shape():
    latent = analysis.latent_images({"gray": np.ones((6, 2))}, (2, 3))
    np.testing.assert_array_equal(latent, np.zeros((2, 2, 3, 1)))
    with pytest.raises(ValueError, match="expected 6 rows"):
        analysis.latent_images({"gray": np.ones((5, 2))}, (2, 3))


def test_median_mask_and_masked_images():
    latent = np.arange(8, dtype=float).reshape(1, 2, 4, 1)
    mask = analysis.median_mask(latent)
    np.testing.assert_array_equal(mask[0], [[False, False, False, False], [True, True, True, True]])
    assert not analysis.median_mask(np.ones((1, 2, 2, 3))).any()
    images = np.full((2, 2, 4, 3), 100, np.uint8)
    out = analysis.masked_images(images, mask[0], background=0.5)
    assert out.dtype == np.uint8
    assert (out[:, 1] == 100).all() and (out[:, 0] == 50).all()


# ----------------------------------------------------------------------- neighbours


def clustered_F(rank=3, per=6, seed=0):
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(rank), per)
    F = rng.uniform(0.0, 0.05, (rank, clusters.size))
    F[clusters, np.arange(clusters.size)] += rng.uniform(1.0, 2.0, clusters.size)
    return F, clusters


def test_nearest_neighbours_exclude_self_and_depend_on_metric():
    F = np.array([[1.0, 10.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    cos = analysis.nearest_neighbours(F, 0, 2, "cosine")
    euc = analysis.nearest_neighbours(F, 0, 2, "euclidean")
    np.testing.assert_array_equal(cos, [1, 2])
    np.testing.assert_array_equal(euc, [2, 3])
    with pytest.raises(ValueError, match="metric"):
        analysis.nearest_neighbours(F, 0, 2, "manhattan")
    with pytest.raises(ValueError, match="k: expected at most 3"):
        analysis.nearest_neighbours(F, 0, 4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_neighbour_distribution_of_clustered_F_is_pure(metric):
    F, clusters = clustered_F()
    result = analysis.neighbour_concepts(F, 7, k=5, metric=metric)
    assert set(result.neighbours.tolist()) <= set(np.flatnonzero(clusters == 1).tolist()) - {7}
    np.testing.assert_allclose(result.distribution, [0.0, 1.0, 0.0])
    assert result.entropy_bits == 0.0
    entropy = analysis.neighbour_entropy_all(F, 5, metric)
    np.testing.assert_array_equal(entropy, np.zeros(F.shape[1]))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_neighbour_entropy_all_matches_per_image_in_chunks(metric):
    F = np.random.default_rng(1).random((4, 23))
    expected = [analysis.neighbour_concepts(F, i, 6, metric).entropy_bits for i in range(23)]
    np.testing.assert_allclose(analysis.neighbour_entropy_all(F, 6, metric, chunk_size=5), expected)


def test_accuracy_vs_entropy_bins():
    entropy = np.array([0.0, 0.2, 0.4, 1.8, 2.0, 2.0])
    correct = np.array([True, True, False, False, True, False])
    table = analysis.accuracy_vs_entropy(entropy, correct, bins=[0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(table.count, [3, 0, 3])
    np.testing.assert_allclose(table.accuracy, [2 / 3, np.nan, 1 / 3])
    assert table.overall == pytest.approx(0.5)
    assert table.to_rows()[1]["accuracy"] is None
    constant = analysis.accuracy_vs_entropy(np.zeros(4), np.ones(4, bool), bins=3)
    assert constant.count.sum() == 4 and constant.accuracy[0] == 1.0


# ------------------------------------------------------------------------- fidelity


def test_flatten_unflatten_channel_major_round_trip():
    H, W, C, N = 2, 3, 4, 5
    acts = np.random.default_rng(0).random((N, H, W, C))
    A = analysis.flatten_activations(acts)
    assert A.shape == (C * H * W, N)
    n, c, h, w = 3, 2, 1, 2
    assert A[c * H * W + h * W + w, n] == acts[n, h, w, c]
    np.testing.assert_array_equal(analysis.unflatten_activations(A, (H, W, C)), acts)
    vec = np.arange(6.0).reshape(2, 3)
    back = analysis.unflatten_activations(analysis.flatten_activations(vec), (3,))
    np.testing.assert_array_equal(back, vec)
    with pytest.raises(ValueError, match=r"expected \(24, N\)"):
        analysis.unflatten_activations(A[:-1], (H, W, C))


def linear_network(num_classes=3, shape=(2, 2, 3), per_class=20, seed=0):
    """An exactly rank-``num_classes`` layer and a linear head that reads its concepts.

    ``A = O_true F_true`` with each image's strongest concept equal to its label, and
    logits ``= pinv(O_true) A = F_true``, so the network is right on every image.
    """
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape))
    labels = np.repeat(np.arange(num_classes), per_class)
    F_true = rng.uniform(0.0, 0.3, (num_classes, labels.size))
    F_true[labels, np.arange(labels.size)] += 1.0
    O_true = rng.uniform(0.0, 1.0, (rows, num_classes))
    A = O_true @ F_true
    head = np.linalg.pinv(O_true)

    def logits_fn(acts):
        assert acts.shape == (labels.size, *shape) and acts.dtype == np.float32
        return (head @ analysis.flatten_activations(acts)).T

    return A, labels, O_true, logits_fn, shape


def nnls_transform(O):
    return lambda A: np.stack([nnls(O, col)[0] for col in A.T], axis=1)


def test_fidelity_full_rank_of_exactly_low_rank_layer_keeps_accuracy():
    A, labels, O_true, logits_fn, shape = linear_network()
    original, replaced, rel = analysis.fidelity_from_logits_fn(
        logits_fn, A, labels, O_true, nnls_transform(O_true), shape
    )
    assert original == 1.0
    assert replaced == 1.0
    assert rel < 1e-5


def test_fidelity_rank_one_drops_accuracy():
    A, labels, _, logits_fn, shape = linear_network()
    # Best non-negative rank-1 approximation: the Perron singular vector.
    u = np.abs(np.linalg.svd(A, full_matrices=False)[0][:, :1])
    original, replaced, rel = analysis.fidelity_from_logits_fn(
        logits_fn, A, labels, u, nnls_transform(u), shape
    )
    assert original == 1.0
    # A rank-1 reconstruction gives every image the same logit direction: one class.
    assert replaced <= 1 / 3 + 1e-9
    assert rel > 0.05


def test_fidelity_wrapper_uses_probe_and_transform(monkeypatch):
    A, labels, O_true, logits_fn, shape = linear_network()
    images = np.zeros((labels.size, 4, 4, 1), np.uint8)
    calls = []

    def intervene(model, variables, imgs, layer, acts):
        calls.append(layer)
        assert imgs is images
        return logits_fn(acts)

    fake_probe = types.SimpleNamespace(
        available_layers=lambda model, input_shape: {"conv": shape},
        collect=lambda model, variables, imgs, layers, pixels, pooling, progress: {"conv": A},
        intervene=intervene,
    )
    import jaxcnmf

    monkeypatch.setitem(sys.modules, "jaxcnmf.probe", fake_probe)
    monkeypatch.setattr(jaxcnmf, "probe", fake_probe, raising=False)

    class FakeResult:
        def __init__(self, O):
            self.loadings = {"conv": O}
            self.F = np.zeros((O.shape[1], labels.size))
            self._transform = nnls_transform(O)

        def transform(self, views):
            assert set(views) == {"conv"}
            return self._transform(views["conv"])

    u = np.abs(np.linalg.svd(A, full_matrices=False)[0][:, :1])
    fits = [FakeResult(O_true), FakeResult(u)]
    table = analysis.fidelity(None, None, images, labels, fits, "conv")
    assert table.layer == "conv" and table.original_accuracy == 1.0
    np.testing.assert_array_equal(table.ranks, [1, 3])
    assert table.accuracy[0] <= 1 / 3 + 1e-9 and table.accuracy[1] == 1.0
    assert table.relative_error[1] < 1e-5 < table.relative_error[0]
    assert calls == ["conv"] * 3
    rows = json.loads(json.dumps(table.to_rows()))
    assert rows[1]["accuracy_drop"] == 0.0
    with pytest.raises(ValueError, match="layer: expected one of the fitted views"):
        analysis.fidelity(None, None, images, labels, FakeResult(u), "fc")


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: analysis.class_shares(np.ones(3), [0, 1, 2], 3), "F: expected a 2-D array"),
        (lambda: analysis.class_shares(-np.ones((2, 3)), [0, 1, 2], 3), "F: expected non-neg"),
        (lambda: analysis.class_shares(np.ones((2, 3)), [0, 1], 3), r"labels: expected shape \(3,\)"),
        (lambda: analysis.class_shares(np.ones((2, 3)), [0, 1, 5], 3), "labels: expected labels < num"),
        (lambda: analysis.top_images(np.ones((2, 3)), 4), "k: expected at most 3"),
        (lambda: analysis.nmi(np.zeros(3), np.zeros(4)), "a, b: expected two 1-D labelings"),
        (lambda: analysis.loading_similarity(np.array([[np.nan]])), "O: expected finite values"),
        (lambda: analysis.masked_images(np.zeros((1, 2, 2, 1)), np.ones((2, 2))), "images: expected"),
        (lambda: analysis.accuracy_vs_entropy([0.0, 1.0], [True], 2), r"correct: expected shape"),
    ],
)
def test_error_messages_name_the_parameter(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cluster_purity_scores_hard_assignments_and_skips_unassigned_images():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert analysis.cluster_purity(np.array([0, 0, 1, 1, 2, 2]), labels) == 1.0
    # Cluster 0 holds labels (0, 0, 1): 2/3; cluster 1 holds (1, 2): 1/2; -1 is ignored.
    assert analysis.cluster_purity(np.array([0, 0, 0, 1, 1, -1]), labels) == pytest.approx(
        (2 / 3 + 1 / 2) / 2)
    assert analysis.cluster_purity(np.full(6, -1), labels) == 0.0
    # The same number for a concept assignment from F and for a k-means assignment.
    F = np.array([[5.0, 4.0, 0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0, 3.0, 1.0]])
    assert analysis.cluster_purity(analysis.strongest_concept(F), labels) == pytest.approx(
        (1.0 + 0.5) / 2)
