"""Tests for jaxcnmf.concepts.neurons: loading similarity, its spectrum and the layer summary."""

import numpy as np
import pytest

from jaxcnmf.concepts.neurons import layer_summary, loading_similarity, similarity_spectrum


def test_identical_loading_columns_give_similarity_one_and_rank_eigenvalue():
    O = np.tile(np.array([[1.0], [2.0], [0.5]]), (1, 4)) * np.array([1.0, 2.0, 3.0, 4.0])
    S = loading_similarity(O)
    np.testing.assert_allclose(S, np.ones((4, 4)))
    np.testing.assert_allclose(similarity_spectrum(S), [4.0, 0, 0, 0], atol=1e-12)


def test_disjoint_loadings_give_identity_and_zero_column_is_safe():
    O = np.zeros((5, 3))
    O[0, 0] = 2.0
    O[3, 1] = 1.0
    S = loading_similarity(O)
    np.testing.assert_allclose(S, np.diag([1.0, 1.0, 0.0]))
    assert not np.isnan(S).any()


def test_similarity_spectrum_is_sorted_and_matches_eigvals():
    rng = np.random.default_rng(0)
    S = loading_similarity(rng.random((8, 5)))
    eig = similarity_spectrum(S)
    assert np.all(np.diff(eig) <= 0)
    np.testing.assert_allclose(eig, np.sort(np.linalg.eigvals(S).real)[::-1], atol=1e-10)
    with pytest.raises(ValueError, match="symmetric"):
        similarity_spectrum(np.triu(np.ones((3, 3))))


def test_layer_summary_values_and_order():
    disjoint = np.eye(4)[:, :3]
    shared = np.ones((2, 3))
    summary = layer_summary({"conv": disjoint, "fc": shared}, top_k=2, order=[2, 0, 1])
    assert summary.layers == ("conv", "fc")
    np.testing.assert_allclose(summary.largest, [1.0, 3.0])
    np.testing.assert_allclose(summary.top_k_mean, [1.0, 1.5])
    np.testing.assert_allclose(summary.identity_distance, [0.0, np.sqrt(6.0)])
    partial = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    s = layer_summary({"x": partial}, order=[2, 0, 1])
    full = loading_similarity(partial)
    np.testing.assert_allclose(s.similarity["x"], full[np.ix_([2, 0, 1], [2, 0, 1])])
    assert len(summary.to_rows()) == 2 and "top_2_mean" in summary.to_rows()[0]
    with pytest.raises(ValueError, match="expected 3 columns"):
        layer_summary({"a": disjoint, "b": np.ones((2, 2))})
    with pytest.raises(ValueError, match="order: expected a permutation"):
        layer_summary({"a": disjoint}, order=[0, 0, 1])
