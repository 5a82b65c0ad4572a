"""k-means in JAX for the baseline the concepts are compared with: all restarts in one call.

The baseline clusters the same activations as the factorization (N points of dimension
D, tens of thousands for a conv layer). scikit-learn's ``KMeans`` runs its restarts one after
another on the CPU; here k-means++ seeding and Lloyd iterations are pure functions of
arrays, vmapped over restarts and compiled once, so every restart shares each pass over
the data and the whole baseline runs on whatever device JAX uses.

For views on disk (:class:`jaxcnmf.store.Store`), :func:`kmeans_store` seeds and restarts
on a seeded sample of the columns held in memory, then runs Lloyd passes over the store's
column blocks: memory is the sample, the centers and one block, whatever ``N``.

Example:
    >>> import numpy as np
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]], np.float32)
    >>> result = kmeans(X, k=2, n_init=3, seed=0)
    >>> sorted(np.bincount(result.assignment).tolist()), result.inertia < 0.02
    ([2, 2], True)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KMeansResult", "kmeans", "kmeans_store"]

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


def _check_settings(n, k, n_init, max_iter, tol):
    for name, value, low in (("k", k, 1), ("n_init", n_init, 1), ("max_iter", max_iter, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    if k > n:
        raise ValueError(f"k: expected at most the number of points ({n}), got {k}")
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: expected a finite number >= 0, got {tol!r}")


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
    _check_settings(X.shape[0], k, n_init, max_iter, tol)
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


# The in-memory sample that seeds a k-means of a store holds about this many bytes.
_SAMPLE_BYTES = 256 * 2**20


def store_points(store, indices=None, *, views: Sequence[str] | None = None, block=None,
                 unit_columns: bool = True) -> np.ndarray:
    """Points of a k-means of a store: its columns, views stacked, as float32 rows.

    Args:
        store: :class:`jaxcnmf.store.Store`.
        indices: int (n,) columns to read (:meth:`Store.read_columns`); or
        block: a block index to read instead (exactly one of the two).
        views: view names to stack (default all, in store order).
        unit_columns: scale each view's columns to unit L2 norm before stacking (an
            all-zero column stays zero), as :func:`jaxcnmf.concepts.labels.kmeans_baseline`
            does in memory.

    Returns:
        float32 (n, sum of the views' rows).

    Raises:
        ValueError: a view holds NaN or Inf (named).
    """
    if (indices is None) == (block is None):
        raise ValueError("store_points: expected exactly one of indices and block")
    names = list(store.views if views is None else views)
    arrays = (store.read_block(block, views=names) if indices is None
              else store.read_columns(indices, views=names))
    parts = []
    for name in names:
        X = np.asarray(arrays[name], np.float32)
        if not np.isfinite(X).all():
            raise ValueError(f"store view {name!r}: expected finite values, got NaN or Inf")
        if unit_columns:
            norms = np.linalg.norm(X, axis=0, keepdims=True)
            X = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
        parts.append(X)
    return np.ascontiguousarray(np.concatenate(parts, axis=0).T)


@jax.jit
def _block_pass(X, valid, centers):
    """One block's share of a Lloyd pass: cluster sums, counts, inertia and assignment."""
    d = _sq_distances(X, jnp.sum(X**2, axis=1), centers)
    nearest = jnp.argmin(d, axis=1)
    members = jax.nn.one_hot(nearest, centers.shape[0], dtype=X.dtype) * valid[:, None]
    sums = jnp.matmul(members.T, X, precision=_HIGHEST)
    inertia = jnp.sum(jnp.min(d, axis=1) * valid)
    return sums, jnp.sum(members, axis=0), inertia, nearest


def _store_pass(store, names, unit_columns, centers, desc, progress):
    """Lloyd statistics of ``centers`` over every block: (sums, counts, inertia, assignment)."""
    from tqdm.auto import tqdm

    centers = jnp.asarray(centers)
    sums = jnp.zeros_like(centers)
    counts = jnp.zeros(centers.shape[0], centers.dtype)
    inertia = jnp.zeros((), centers.dtype)
    assignment = np.empty(store.n, np.int64)
    pending = []
    for i in tqdm(range(store.n_blocks), desc=desc, unit="block", leave=False,
                  disable=not progress, file=sys.stderr):
        start, stop = store.columns(i)
        X = store_points(store, block=i, views=names, unit_columns=unit_columns)
        pad = store.block_size - X.shape[0]
        valid = jnp.asarray(np.arange(store.block_size) < X.shape[0], X.dtype)
        s, c, e, nearest = _block_pass(jnp.asarray(np.pad(X, ((0, pad), (0, 0)))), valid,
                                       centers)
        sums, counts, inertia = sums + s, counts + c, inertia + e
        pending.append((start, stop, nearest))
        if len(pending) > 1:  # fetch the previous block's assignment while this one runs
            a, b, near = pending.pop(0)
            assignment[a:b] = np.asarray(near)[: b - a]
    for a, b, near in pending:
        assignment[a:b] = np.asarray(near)[: b - a]
    return sums, counts, float(inertia), assignment


def kmeans_store(store, k: int, *, views: Sequence[str] | None = None, n_init: int = 10,
                 max_iter: int = 300, max_passes: int = 30, tol: float = 1e-4, seed: int = 0,
                 sample: int | None = None, unit_columns: bool = True,
                 progress: bool = True) -> KMeansResult:
    """k-means of a store's columns (views stacked), reading the store block by block.

    1. A seeded random sample of ``sample`` columns is read into memory and clustered by
       :func:`kmeans` (k-means++ seeding, ``n_init`` restarts, Lloyd to convergence).
    2. If the sample is the whole store that is the result: the same as :func:`kmeans` of
       the stacked views in memory. Otherwise Lloyd passes over the store's blocks start
       from the best restart's centers (each pass reads every block once; the centers move
       to the means of their points) until they move less than the tolerance or after
       ``max_passes``; a last pass assigns every column and sums the inertia.

    Memory: the sample (``sample x D`` float32), ``k x D`` centers, one block and the
    ``(N,)`` assignment; nothing grows with ``N`` beyond that.

    Args:
        store: :class:`jaxcnmf.store.Store`.
        k: number of clusters, ``1 <= k <= N``.
        views: views to stack (default all, in store order), e.g. the layers only.
        n_init, max_iter, tol, seed: as :func:`kmeans` (on the sample); ``tol`` is also
            the stop of the passes over the store (times the sample's mean variance).
        max_passes: Lloyd passes over the store at most.
        sample: columns in the in-memory sample; default all ``N`` when they fit in about
            256 MiB, else as many as do (at least ``50 * k``).
        unit_columns: scale each view's columns to unit norm first (see
            :func:`store_points`).
        progress: a progress bar per pass.

    Returns:
        :class:`KMeansResult`: ``assignment`` (N,) and ``inertia`` over all columns;
        ``n_iter`` Lloyd iterations on the sample plus passes over the store;
        ``inertias`` of the restarts, on the sample.

    Example:
        >>> result = kmeans_store(store.open("acts/"), 10, views=["conv4_x"])  # doctest: +SKIP
        >>> result.assignment.shape, result.inertia  # doctest: +SKIP
    """
    names = list(store.views if views is None else views)
    unknown = [name for name in names if name not in store.rows]
    if unknown or not names:
        raise ValueError(f"views: expected names among the store's views "
                         f"{list(store.views)}, got {names}")
    n, dims = store.n, sum(store.rows[name] for name in names)
    _check_settings(n, k, n_init, max_iter, tol)
    if isinstance(max_passes, bool) or not isinstance(max_passes, (int, np.integer)) \
            or max_passes < 1:
        raise ValueError(f"max_passes: expected an integer >= 1, got {max_passes!r}")
    if sample is None:
        sample = min(n, max(50 * int(k), _SAMPLE_BYTES // (4 * dims)))
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) \
            or not k <= sample <= n:
        raise ValueError(f"sample: expected an integer in [k={k}, N={n}], got {sample!r}")
    rng = np.random.default_rng(seed)
    indices = np.arange(n) if sample == n else np.sort(rng.choice(n, int(sample), replace=False))
    X = store_points(store, indices, views=names, unit_columns=unit_columns)
    seeded = kmeans(X, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
    if sample == n:
        return seeded
    abs_tol = float(tol) * float(np.mean(np.var(X, axis=0)))
    del X
    centers = jnp.asarray(seeded.centers)
    passes = 0
    while passes < max_passes:
        sums, counts, _, _ = _store_pass(store, names, unit_columns, centers,
                                         f"k-means pass {passes + 1}", progress)
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)
        shift = float(jnp.sum((new - centers) ** 2))
        centers, passes = new, passes + 1
        if shift <= abs_tol:
            break
    _, _, inertia, assignment = _store_pass(store, names, unit_columns, centers,
                                            "k-means assignment", progress)
    return KMeansResult(assignment=assignment, centers=np.asarray(centers), inertia=inertia,
                        n_iter=seeded.n_iter + passes, inertias=seeded.inertias)
