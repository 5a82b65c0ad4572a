"""Tests for jaxcnmf.concepts.kmeans: planted clusters, scikit-learn's inertia, errors."""

import doctest

import numpy as np
import pytest
from sklearn.cluster import KMeans

from jaxcnmf.concepts import kmeans as kmeans_module
from jaxcnmf.concepts.kmeans import kmeans


def _blobs(n_per=40, k=4, dim=30, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 3
    labels = np.repeat(np.arange(k), n_per)
    return (centers[labels] + spread * rng.normal(size=(labels.size, dim))).astype(np.float32), labels


def test_docstring_example_runs():
    assert doctest.testmod(kmeans_module).failed == 0


def test_recovers_planted_clusters():
    X, labels = _blobs()
    result = kmeans(X, 4, n_init=5, seed=0)
    # Same partition up to renaming: each planted cluster maps to exactly one found cluster.
    pairs = set(zip(labels.tolist(), result.assignment.tolist()))
    assert len(pairs) == 4 and len({b for _, b in pairs}) == 4
    assert result.inertias.shape == (5,) and result.inertia == pytest.approx(result.inertias.min())


def test_inertia_matches_scikit_learn_on_overlapping_clusters():
    X, _ = _blobs(n_per=60, k=6, dim=20, spread=2.5, seed=1)
    ours = kmeans(X, 6, n_init=10, seed=0)
    ref = KMeans(6, n_init=10, random_state=0).fit(X)
    # Both are local optima of the same objective: within 2% of each other.
    assert ours.inertia <= ref.inertia_ * 1.02
    centers = np.stack([X[ours.assignment == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(ours.centers, centers, rtol=1e-4, atol=1e-4)
    recomputed = ((X - centers[ours.assignment]) ** 2).sum()
    assert ours.inertia == pytest.approx(recomputed, rel=1e-4)


def test_identical_points_and_k_equal_n():
    X = np.ones((5, 3), np.float32)
    result = kmeans(X, 2, n_init=2)
    assert np.isfinite(result.inertia) and result.inertia == pytest.approx(0.0, abs=1e-6)
    distinct = np.eye(4, dtype=np.float32)
    assert sorted(kmeans(distinct, 4, n_init=3).assignment.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(X=np.ones(3), k=1), r"X: expected a non-empty \(N, D\) array, got shape \(3,\)"),
        (dict(X=np.full((2, 2), np.nan), k=1), "X: expected finite values"),
        (dict(X=np.ones((2, 2)), k=3), r"k: expected at most the number of points \(2\), got 3"),
        (dict(X=np.ones((2, 2)), k=0), "k: expected an integer >= 1, got 0"),
        (dict(X=np.ones((2, 2)), k=1, n_init=1.5), "n_init: expected an integer >= 1, got 1.5"),
        (dict(X=np.ones((2, 2)), k=1, tol=-1.0), "tol: expected a finite number >= 0"),
    ],
)
def test_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmeans(**kwargs)


def test_kmeans_store_equals_in_memory_and_streams_to_the_same_quality(tmp_path):
    from jaxcnmf.concepts.kmeans import kmeans_store, store_points
    from jaxcnmf.solver import store

    # The overlapping clusters of test_inertia_matches_scikit_learn_on_overlapping_clusters
    # (its compiled k-means serves the in-memory calls here).
    X, _ = _blobs(n_per=60, k=6, dim=20, spread=2.5, seed=1)
    noise = np.random.default_rng(1).random((5, X.shape[0]), dtype=np.float32)
    s = store.save(tmp_path / "s", {"pix": noise, "conv": X.T}, block_size=100)
    points = store_points(s, np.arange(s.n), views=["conv"], unit_columns=False)
    np.testing.assert_array_equal(points, X)
    memory = kmeans(X, 6, n_init=10, seed=0)
    # The sample is the whole store: the in-memory result itself.
    whole = kmeans_store(s, 6, views=["conv"], unit_columns=False, progress=False)
    np.testing.assert_array_equal(whole.assignment, memory.assignment)
    # Seeded on a quarter of the columns, then Lloyd passes over the 4 blocks.
    streamed = kmeans_store(s, 6, views=["conv"], sample=90, unit_columns=False,
                            progress=False)
    assert streamed.assignment.shape == (360,) and streamed.n_iter > 0
    assert streamed.inertia <= 1.03 * memory.inertia
    d = ((X[:, None, :] - streamed.centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(streamed.assignment, d.argmin(1))
    np.testing.assert_allclose(streamed.inertia, d.min(1).sum(), rtol=1e-4)
    with pytest.raises(ValueError, match=r"views: expected names among the store's views"):
        kmeans_store(s, 6, views=["fc"])
    with pytest.raises(ValueError, match=r"sample: expected an integer in \[k=6, N=360\]"):
        kmeans_store(s, 6, sample=2)
