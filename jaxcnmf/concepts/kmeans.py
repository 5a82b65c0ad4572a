"""k-means in JAX for the baseline the concepts are compared with: all restarts in one call.

The baseline clusters the same activations as the factorization (N points of dimension
D, tens of thousands for a conv layer). scikit-learn's ``KMeans`` runs its restarts one after
another on the CPU; here k-means++ seeding and Lloyd iterations are pure functions of
arrays, vmapped over restarts and compiled once, so every restart shares each pass over
the data and the whole baseline runs on whatever device JAX uses.

Example:
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], np.float32)
    >>> result = kmeans(X, k=2, n_init=3, seed=0)
    >>> sorted(np.bincount(result.assignment).tolist()), result.inertia < 0.02
    ([2, 2], True)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KMeansResult", "kmeans"]

_HIGHEST = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """The best of the restarts.

    Attributes:
        assignment: int64 (N,) cluster of each point.
        centers: float32 (k, D) cluster means.
        inertia: sum of squared distances of the points to their centers.
        n_iter: Lloyd iterations the best restart ran.
        inertias: float (n_init,) final inertia of every restart.
    """

    assignment: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int
    inertias: np.ndarray


def _sq_distances(X, sq_norms, centers):
    """(N, k) squared distances, from the (N, k) product: never an (N, k, D) difference."""
    cross = jnp.matmul(X, centers.T, precision=_HIGHEST)
    return jnp.maximum(sq_norms[:, None] - 2.0 * cross + jnp.sum(centers**2, axis=1)[None, :], 0.0)


def _seed(key, X, sq_norms, k):
    """k-means++ seeding: each next center drawn with probability proportional to D(x)^2."""
    n = X.shape[0]
    key, first_key = jax.random.split(key)
    first = X[jax.random.randint(first_key, (), 0, n)]
    centers = jnp.zeros((k, X.shape[1]), X.dtype).at[0].set(first)
    closest = _sq_distances(X, sq_norms, first[None, :])[:, 0]

    def add(i, carry):
        centers, closest, key = carry
        key, draw = jax.random.split(key)
        # All points coincide with a center: any point will do (uniform draw).
        logits = jnp.where(jnp.sum(closest) > 0, jnp.log(closest), 0.0)
        center = X[jax.random.categorical(draw, logits)]
        closest = jnp.minimum(closest, _sq_distances(X, sq_norms, center[None, :])[:, 0])
        return centers.at[i].set(center), closest, key

    centers, _, _ = jax.lax.fori_loop(1, k, add, (centers, closest, key))
    return centers


def _lloyd(X, sq_norms, centers, max_iter, tol):
    """Lloyd iterations until the centers move less than ``tol`` (squared, summed)."""
    k = centers.shape[0]

    def cond(carry):
        _, shift, it = carry
        return (it < max_iter) & (shift > tol)

    def body(carry):
        centers, _, it = carry
        nearest = jnp.argmin(_sq_distances(X, sq_norms, centers), axis=1)
        members = jax.nn.one_hot(nearest, k, dtype=X.dtype)
        counts = jnp.sum(members, axis=0)
        sums = jnp.matmul(members.T, X, precision=_HIGHEST)
        # An empty cluster keeps its center (it may win points back next pass).
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)
        return new, jnp.sum((new - centers) ** 2), it + 1

    centers, _, it = jax.lax.while_loop(cond, body, (centers, jnp.asarray(jnp.inf, X.dtype), 0))
    d = _sq_distances(X, sq_norms, centers)
    return jnp.argmin(d, axis=1), centers, jnp.sum(jnp.min(d, axis=1)), it


@functools.partial(jax.jit, static_argnames=("k", "max_iter"))
def _restarts(X, keys, tol, *, k, max_iter):
    sq_norms = jnp.sum(X**2, axis=1)

    def one(key):
        return _lloyd(X, sq_norms, _seed(key, X, sq_norms, k), max_iter, tol)

    return jax.vmap(one)(keys)


def kmeans(X, k: int, *, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0) -> KMeansResult:
    """k-means (k-means++ seeding, Lloyd iterations), ``n_init`` restarts in one compiled call.

    Args:
        X: float (N, D) points, one per row (converted to float32).
        k: number of clusters, 1 <= k <= N.
        n_init: restarts; the one with the lowest inertia is returned.
        max_iter: Lloyd iterations per restart at most.
        tol: stop when the centers' summed squared move falls below ``tol`` times the mean
            per-feature variance of ``X`` (scikit-learn's convention).
        seed: seed of the k-means++ draws.

    Returns:
        :class:`KMeansResult` of the best restart.
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X: expected a non-empty (N, D) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X: expected finite values, got NaN or Inf")
    n = X.shape[0]
    for name, value, low in (("k", k, 1), ("n_init", n_init, 1), ("max_iter", max_iter, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if k > n:
        raise ValueError(f"k: expected at most the number of points ({n}), got {k}")
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite number >= 0, got {tol!r}")
    abs_tol = float(tol) * float(np.mean(np.var(X, axis=0)))
    keys = jax.random.split(jax.random.PRNGKey(seed), int(n_init))
    assignment, centers, inertia, n_iter = jax.device_get(
        _restarts(jnp.asarray(X), keys, jnp.float32(abs_tol), k=int(k), max_iter=int(max_iter)))
    best = int(np.argmin(inertia))
    return KMeansResult(
        assignment=np.asarray(assignment[best], np.int64),
        centers=np.asarray(centers[best]),
        inertia=float(inertia[best]),
        n_iter=int(n_iter[best]),
        inertias=np.asarray(inertia, np.float64),
    )
