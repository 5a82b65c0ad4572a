"""Tests for jaxcnmf.concepts.labels: class and superclass shares, purity, NMI, concept tables, the k-means baseline."""

import json

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from jaxcnmf.concepts.labels import class_shares, cluster_purity, concept_order, concept_table, kmeans_baseline, nmi, purity, strongest_concept, top_images


def aligned_F(num_classes=3, per_class=4, seed=0):
    """F whose concept k lives only on the images of class k."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    F = np.zeros((num_classes, labels.size))
    F[labels, np.arange(labels.size)] = rng.uniform(0.5, 2.0, labels.size)
    return F, labels


def test_class_shares_aligned_concepts_are_one_hot():
    F, labels = aligned_F()
    np.testing.assert_allclose(class_shares(F, labels, 3), np.eye(3))


def test_class_shares_mixed_row_and_zero_row_without_nan():
    F = np.array([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    labels = np.array([0, 0, 1, 2])
    shares = class_shares(F, labels, 3)
    np.testing.assert_allclose(shares, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    assert not np.isnan(shares).any()


def test_purity_and_nmi_are_one_for_aligned_concepts():
    F, labels = aligned_F()
    assert purity(F, labels) == pytest.approx(1.0)
    assert nmi(strongest_concept(F), labels) == pytest.approx(1.0)


def test_purity_of_a_mixed_concept_and_ignores_dead_concepts():
    F = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert purity(F, np.array([0, 1, 1])) == pytest.approx(0.75)
    assert purity(np.zeros((2, 3)), np.array([0, 1, 1])) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_nmi_agrees_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, 50)
    b = np.where(rng.random(50) < 0.6, a, rng.integers(0, 6, 50))
    assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


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
    assert nmi(np.array(a), np.array(b)) == pytest.approx(expected)


def test_strongest_concept_marks_empty_images():
    F = np.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0]])
    np.testing.assert_array_equal(strongest_concept(F), [0, 1, -1])


def test_top_images_largest_first():
    F = np.array([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(top_images(F, 3), [[1, 3, 2], [0, 1, 2]])


def test_concept_table_records():
    F = np.array([[1.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]])
    labels = np.array([0, 1, 2, 2])
    coarse = np.array([0, 0, 1, 1])
    records = concept_table(
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
        concept_table(F, labels, ["a", "b", "c"], coarse_labels=labels)


def test_concept_order_groups_by_dominant_class_then_share():
    # Concepts 0 and 2 are class 1 (2 purer), concept 1 is class 0.
    F = np.array([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = np.array([0, 1, 2])
    np.testing.assert_array_equal(concept_order(F, labels), [1, 2, 0])
    by_mass = concept_order(np.array([[1.0], [3.0], [2.0]]))
    np.testing.assert_array_equal(by_mass, [1, 2, 0])


def test_kmeans_baseline_recovers_clusters_and_normalises_views():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    centres = rng.uniform(0, 1, (3, 6)) * 5
    X = (centres[labels] + rng.uniform(0, 0.05, (30, 6))).T
    scores = kmeans_baseline(X, labels, k=3, seed=0)
    assert scores.nmi == pytest.approx(1.0) and scores.purity == pytest.approx(1.0)
    assert scores.assignment.shape == (30,)
    Y = rng.uniform(0, 1, (4, 30))
    small = kmeans_baseline({"a": X, "b": Y}, labels, k=3, seed=1)
    scaled = kmeans_baseline({"a": X, "b": 1000.0 * Y}, labels, k=3, seed=1)
    np.testing.assert_array_equal(small.assignment, scaled.assignment)




def test_cluster_purity_scores_hard_assignments_and_skips_unassigned_images():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_purity(np.array([0, 0, 1, 1, 2, 2]), labels) == 1.0
    # Cluster 0 holds labels (0, 0, 1): 2/3; cluster 1 holds (1, 2): 1/2; -1 is ignored.
    assert cluster_purity(np.array([0, 0, 0, 1, 1, -1]), labels) == pytest.approx(
        (2 / 3 + 1 / 2) / 2)
    assert cluster_purity(np.full(6, -1), labels) == 0.0
    # The same number for a concept assignment from F and for a k-means assignment.
    F = np.array([[5.0, 4.0, 0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0, 3.0, 1.0]])
    assert cluster_purity(strongest_concept(F), labels) == pytest.approx(
        (1.0 + 0.5) / 2)


def test_scaled_F_gives_the_same_assignment_for_every_scale_split():
    from jaxcnmf.concepts.labels import scaled_F

    rng = np.random.default_rng(0)
    F = rng.random((4, 60))
    loadings = {"a": rng.random((10, 4)), "b": rng.random((6, 4))}
    weights = {"a": 0.5, "b": 2.0}
    labels = rng.integers(0, 3, 60)
    D = np.array([1e-3, 5.0, 0.2, 40.0])
    split = {name: W * D for name, W in loadings.items()}
    F_split = F / D[:, None]
    # The raw argmax changes with the split; the scaled one must not.
    assert not np.array_equal(strongest_concept(F), strongest_concept(F_split))
    a, b = scaled_F(F, loadings, weights), scaled_F(F_split, split, weights)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_array_equal(strongest_concept(a), strongest_concept(b))
    assert purity(a, labels) == pytest.approx(purity(b, labels))
    norms = np.sqrt(0.5 * np.sum(loadings["a"] ** 2, 0) + 2.0 * np.sum(loadings["b"] ** 2, 0))
    np.testing.assert_allclose(a, norms[:, None] * F)
    with pytest.raises(ValueError, match=r"loadings: expected 4 columns \(the rank of F\), got 3"):
        scaled_F(F, {"a": loadings["a"][:, :3]})


def test_kmeans_baseline_from_a_store_equals_in_memory(tmp_path):
    from jaxcnmf.solver import store

    # The shapes of test_kmeans_baseline_recovers_clusters_and_normalises_views (30 points
    # of 6 dimensions, k=3): its compiled k-means serves both calls.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    conv = (np.eye(3)[labels].T.repeat(2, axis=0) + 0.2 * rng.random((6, 30))).astype(np.float32)
    red = rng.random((4, 30), dtype=np.float32)
    s = store.save(tmp_path / "s", {"red": red, "conv": conv}, labels=labels, block_size=8)
    memory = kmeans_baseline({"conv": conv}, labels, k=3)
    disk = kmeans_baseline(s, None, k=3, views=["conv"])
    np.testing.assert_array_equal(disk.assignment, memory.assignment)
    assert disk.nmi == pytest.approx(memory.nmi) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="views: expected None for in-memory activations"):
        kmeans_baseline({"conv": conv}, labels, k=3, views=["conv"])


def test_class_shares_and_similarity_of_a_fit_from_a_store(tmp_path):
    # They read only F and the loadings, so a streamed fit serves them as a fit in memory.
    import warnings

    import jaxcnmf
    from jaxcnmf.concepts.neurons import loading_similarity
    from jaxcnmf.solver import store

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 15)
    F = np.eye(2)[labels].T + 0.1 * rng.random((2, 30))
    views = {"red": (rng.random((8, 2)) @ F).astype(np.float32),
             "conv": (rng.random((6, 2)) @ F).astype(np.float32)}
    init = {"F": rng.random((2, 30)), "loadings": {k: rng.random((X.shape[0], 2))
                                                   for k, X in views.items()}}
    s = store.save(tmp_path / "s", views, labels=labels, block_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = {"rank": 2, "method": "hals", "init": init, "max_iter": 15, "progress": False}
        disk, memory = jaxcnmf.fit(s, **options), jaxcnmf.fit(views, **options)
    np.testing.assert_allclose(class_shares(disk.F, s.labels, 2),
                               class_shares(memory.F, labels, 2), atol=1e-4)
    np.testing.assert_allclose(loading_similarity(disk.loadings["conv"]),
                               loading_similarity(memory.loadings["conv"]), atol=1e-4)
    assert purity(disk.F, s.labels, 2) == pytest.approx(purity(memory.F, labels, 2), abs=1e-4)
