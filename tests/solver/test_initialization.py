"""Initialisation: NNDSVD(a) on weighted stacked views, seeded random, user arrays."""

import jax
import numpy as np
import pytest

from jaxcnmf.solver import initialization

N = 40


def _views(seed=0, rank=3):
    rng = np.random.default_rng(seed)
    F = rng.random((rank, N))
    return tuple(np.float32(rng.random((rows, rank)) @ F) for rows in (25, 10))


def test_nndsvd_is_exact_on_rank_one_views_whatever_the_weights():
    rng = np.random.default_rng(1)
    f = rng.random(N)
    views = tuple(np.float32(np.outer(rng.random(rows), f)) for rows in (25, 10))
    F, loadings = initialization.nndsvd(views, 1, weights=(4.0, 0.25))
    for X, W in zip(views, loadings):
        np.testing.assert_allclose(np.asarray(W @ F), X, rtol=1e-3, atol=1e-5)


def test_nndsvd_has_zeros_and_nndsvda_fills_them_with_the_mean():
    views = _views()
    F, loadings = initialization.nndsvd(views, 3, weights=(1.0, 1.0))
    Fa, loadings_a = initialization.nndsvd(views, 3, weights=(1.0, 1.0), variant="nndsvda")
    F, Fa = np.asarray(F), np.asarray(Fa)
    assert np.any(F == 0) and np.all(Fa > 0)
    assert all(np.all(np.asarray(W) >= 0) for W in loadings)
    assert all(np.all(np.asarray(W) > 0) for W in loadings_a)
    mean = np.mean(np.concatenate(views))
    np.testing.assert_allclose(Fa[F == 0], mean, rtol=1e-5)
    np.testing.assert_array_equal(Fa[F > 0], F[F > 0])


def test_nndsvd_leading_component_explains_most_of_the_data():
    views = _views()
    F, loadings = initialization.nndsvd(views, 3, weights=(1.0, 1.0))
    stacked = np.concatenate(views)
    approx = np.concatenate([np.asarray(W @ F) for W in loadings])
    assert np.linalg.norm(stacked - approx) < 0.2 * np.linalg.norm(stacked)


def test_nndsvd_of_zero_views_is_finite():
    views = (np.zeros((6, N), np.float32), np.zeros((4, N), np.float32))
    for variant in ("nndsvd", "nndsvda"):
        F, loadings = initialization.nndsvd(views, 2, weights=(1.0, 1.0), variant=variant)
        assert np.all(np.isfinite(np.asarray(F)))
        assert all(np.all(np.isfinite(np.asarray(W))) for W in loadings)


def test_random_is_seeded_non_negative_and_scaled():
    views = _views()
    a = initialization.random(jax.random.PRNGKey(3), views, 3)
    b = initialization.random(jax.random.PRNGKey(3), views, 3)
    c = initialization.random(jax.random.PRNGKey(4), views, 3)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))
    F, loadings = a
    assert np.all(np.asarray(F) >= 0)
    for X, W in zip(views, loadings):
        ratio = np.mean(np.asarray(W @ F)) / np.mean(X)
        assert 0.2 < ratio < 5.0


def test_user_factors_are_checked_by_name_and_shape():
    shapes = [(25, N), (10, N)]
    F0 = np.ones((3, N))
    good = {"F": F0, "loadings": {"a": np.ones((25, 3)), "b": np.ones((10, 3))}}
    F, loadings = initialization.user(good, ("a", "b"), shapes, 3)
    assert F.shape == (3, N) and [W.shape for W in loadings] == [(25, 3), (10, 3)]
    with pytest.raises(ValueError, match=r"init\['F'\]: expected shape \(3, 40\), got \(3, 39\)"):
        initialization.user({**good, "F": np.ones((3, N - 1))}, ("a", "b"), shapes, 3)
    with pytest.raises(ValueError, match=r"missing loadings for view\(s\) \['b'\]"):
        initialization.user({"F": F0, "loadings": {"a": np.ones((25, 3))}}, ("a", "b"),
                            shapes, 3)
    bad = {"F": F0, "loadings": {"a": -np.ones((25, 3)), "b": np.ones((10, 3))}}
    with pytest.raises(ValueError, match=r"init\['loadings'\]\['a'\]: expected non-negative"):
        initialization.user(bad, ("a", "b"), shapes, 3)
    with pytest.raises(ValueError, match="expected a dict with keys 'F' and 'loadings'"):
        initialization.user({"F": F0}, ("a", "b"), shapes, 3)
    extra = {"F": F0, "loadings": [np.ones((25, 3)), np.ones((10, 3)), np.ones((5, 3))]}
    with pytest.raises(ValueError, match=r"init\['loadings'\]: expected 2 arrays, .* got 3"):
        initialization.user(extra, ("a", "b"), shapes, 3)
