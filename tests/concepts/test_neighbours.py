"""Tests for jaxcnmf.concepts.neighbours: neighbours in F-space, their concept mix, accuracy against entropy."""

import numpy as np
import pytest

from jaxcnmf.concepts.neighbours import accuracy_vs_entropy, nearest_neighbours, neighbour_concepts, neighbour_entropy_all


def clustered_F(rank=3, per=6, seed=0):
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(rank), per)
    F = rng.uniform(0.0, 0.05, (rank, clusters.size))
    F[clusters, np.arange(clusters.size)] += rng.uniform(1.0, 2.0, clusters.size)
    return F, clusters


def test_nearest_neighbours_exclude_self_and_depend_on_metric():
    F = np.array([[1.0, 10.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    cos = nearest_neighbours(F, 0, 2, "cosine")
    euc = nearest_neighbours(F, 0, 2, "euclidean")
    np.testing.assert_array_equal(cos, [1, 2])
    np.testing.assert_array_equal(euc, [2, 3])
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbours(F, 0, 2, "manhattan")
    with pytest.raises(ValueError, match="k: expected at most 3"):
        nearest_neighbours(F, 0, 4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_neighbour_distribution_of_clustered_F_is_pure(metric):
    F, clusters = clustered_F()
    result = neighbour_concepts(F, 7, k=5, metric=metric)
    assert set(result.neighbours.tolist()) <= set(np.flatnonzero(clusters == 1).tolist()) - {7}
    np.testing.assert_allclose(result.distribution, [0.0, 1.0, 0.0])
    assert result.entropy_bits == 0.0
    entropy = neighbour_entropy_all(F, 5, metric)
    np.testing.assert_array_equal(entropy, np.zeros(F.shape[1]))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_neighbour_entropy_all_matches_per_image_in_chunks(metric):
    F = np.random.default_rng(1).random((4, 23))
    expected = [neighbour_concepts(F, i, 6, metric).entropy_bits for i in range(23)]
    np.testing.assert_allclose(neighbour_entropy_all(F, 6, metric, chunk_size=5), expected)


def test_accuracy_vs_entropy_bins():
    entropy = np.array([0.0, 0.2, 0.4, 1.8, 2.0, 2.0])
    correct = np.array([True, True, False, False, True, False])
    table = accuracy_vs_entropy(entropy, correct, bins=[0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(table.count, [3, 0, 3])
    np.testing.assert_allclose(table.accuracy, [2 / 3, np.nan, 1 / 3])
    assert table.overall == pytest.approx(0.5)
    assert table.to_rows()[1]["accuracy"] is None
    constant = accuracy_vs_entropy(np.zeros(4), np.ones(4, bool), bins=3)
    assert constant.count.sum() == 4 and constant.accuracy[0] == 1.0


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_neighbours_equal_a_full_distance_matrix(metric, monkeypatch):
    from jaxcnmf.concepts import neighbours

    rng = np.random.default_rng(2)
    F = rng.random((4, 90))
    X = F.T / np.linalg.norm(F.T, axis=1, keepdims=True) if metric == "cosine" else F.T
    if metric == "cosine":
        full = 1.0 - X @ X.T
    else:
        full = np.sqrt(np.maximum(((X[:, None] - X[None]) ** 2).sum(-1), 0.0))
    np.fill_diagonal(full, np.inf)
    expected = np.argsort(full, axis=1, kind="stable")[:, :5]
    # Candidates in chunks of 13 (the last one short), queries in chunks of 7.
    np.testing.assert_array_equal(neighbours._nearest(F, np.arange(90), 5, metric, 13),
                                  expected)
    entropy = neighbour_entropy_all(F, 5, metric, chunk_size=7)
    monkeypatch.setattr(neighbours, "_CANDIDATES", 13)
    np.testing.assert_array_equal(neighbour_entropy_all(F, 5, metric, chunk_size=7), entropy)
    assert nearest_neighbours(F, 40, 5, metric).tolist() == expected[40].tolist()
