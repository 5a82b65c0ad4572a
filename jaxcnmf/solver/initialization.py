"""Initial factors for the coupled NMF: seeded random, NNDSVD / NNDSVDa, or user arrays.

All functions return ``(F, loadings)`` with ``F`` of shape ``(rank, N)`` and ``loadings`` a
tuple of ``(rows_v, rank)`` arrays in view order, in the requested float dtype.

Example:
    >>> import numpy as np
    >>> from jaxcnmf import initialization
    >>> views = (np.random.default_rng(0).random((30, 40)), np.ones((10, 40)))
    >>> F, loadings = initialization.nndsvd(views, rank=3, weights=(1.0, 1.0))
    >>> F.shape, [W.shape for W in loadings]
    ((3, 40), [(30, 3), (10, 3)])
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

INIT_NAMES = ("nndsvda", "nndsvd", "random")

# Randomized SVD settings: a few power iterations make the leading subspace accurate
# enough for an initialisation at a fraction of a full SVD's cost on tall stacked views.
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _float_views(views, dtype):
    return tuple(jnp.asarray(X).astype(dtype) for X in views)


def random(key, views, rank, dtype="float32", n_columns=None):
    """Seeded random factors: absolute normals scaled by ``sqrt(mean(X) / rank)``.

    ``F`` uses the mean over all views, each loading the mean of its own view, so every
    ``W_v F`` starts at the scale of ``X_v``. Pure JAX, so it can be vmapped over keys.

    Args:
        key: ``jax.random`` key.
        views: sequence of ``(rows_v, N)`` arrays.
        rank: number of concepts.
        dtype: float dtype of the result.
        n_columns: the number of real images when the views carry zero padding columns
            after them (a sharded fit); ``F`` is then drawn for those images alone, so it
            is the same whatever the padding, and is zero on the padding.

    Returns:
        ``(F, loadings)``: ``(rank, N)`` and a tuple of ``(rows_v, rank)``.

    Example:
        >>> F, loadings = random(jax.random.PRNGKey(0), views, rank=3)  # doctest: +SKIP
    """
    dtype = jnp.dtype(dtype)
    n = views[0].shape[1] if n_columns is None else n_columns
    total = sum(jnp.sum(X.astype(dtype)) for X in views)
    count = sum(X.shape[0] for X in views) * n
    keys = jax.random.split(key, len(views) + 1)
    F = jnp.sqrt(total / count / rank) * jnp.abs(jax.random.normal(keys[0], (rank, n), dtype))
    loadings = tuple(
        jnp.sqrt(jnp.mean(X.astype(dtype)) * (X.shape[1] / n) / rank)
        * jnp.abs(jax.random.normal(k, (X.shape[0], rank), dtype))
        for k, X in zip(keys[1:], views))
    return _pad_columns(F, views[0].shape[1]), loadings


def _pad_columns(F, width):
    """``F`` followed by zero columns up to ``width`` (no-op without padding)."""
    if F.shape[1] == width:
        return F
    return jnp.pad(F, ((0, 0), (0, width - F.shape[1])))


def _row_spans(blocks):
    """``(start, stop)`` of every block's rows in the row-stacked matrix."""
    offsets = np.cumsum([0] + [X.shape[0] for X in blocks])
    return list(zip(offsets[:-1], offsets[1:]))


def _randomized_svd(blocks, rank, key, n_columns=None):
    """Top ``rank`` singular triplets of the row-stacked ``blocks`` without stacking them.

    Only matmuls touch the blocks, so with blocks sharded over their columns each product
    is local or a ``(rows, width)`` partial sum. With ``n_columns``, the blocks' columns
    beyond it are zero padding: the test matrix is drawn for the real columns and padded
    with zero rows, which leaves every product, hence the result, as without padding.
    """
    n = blocks[0].shape[1] if n_columns is None else n_columns
    total_rows = sum(X.shape[0] for X in blocks)
    width = min(rank + _OVERSAMPLE, n, total_rows)

    def left(Y):
        return jnp.concatenate([_mm(X, Y) for X in blocks], axis=0)

    spans = _row_spans(blocks)

    def right(Q):
        return sum(_mm(X.T, Q[a:b]) for X, (a, b) in zip(blocks, spans))

    omega = _pad_columns(jax.random.normal(key, (n, width), blocks[0].dtype).T,
                         blocks[0].shape[1]).T
    Q, _ = jnp.linalg.qr(left(omega))
    for _ in range(_POWER_ITERATIONS):
        P, _ = jnp.linalg.qr(right(Q))
        Q, _ = jnp.linalg.qr(left(P))
    small = right(Q).T
    U_small, s, Vt = jnp.linalg.svd(small, full_matrices=False)
    return _mm(Q, U_small)[:, :rank], s[:rank], Vt[:rank]


def _unit(x):
    norm = jnp.linalg.norm(x, axis=0)
    return x / jnp.where(norm > 0, norm, 1.0), norm


def nndsvd(views, rank, weights, variant="nndsvd", seed=0, dtype="float32", n_columns=None):
    """NNDSVD (Boutsidis & Gallopoulos, 2008) of the weighted stacked views.

    The SVD is taken of ``[sqrt(w_1) X_1; ...; sqrt(w_V) X_V]``, which gives ``F`` and the
    stacked loadings; each view's block is divided by ``sqrt(w_v)`` again so that
    ``W_v F`` approximates ``X_v`` itself. ``"nndsvda"`` replaces the exact zeros of both
    factors by the mean of the stacked matrix, since multiplicative updates never move an
    exact zero.

    Args:
        views: sequence of ``(rows_v, N)`` non-negative arrays.
        rank: number of concepts, at most ``min(N, total rows)``.
        weights: one positive weight per view.
        variant: ``"nndsvd"`` or ``"nndsvda"``.
        seed: seed of the randomized SVD's test matrix (the result is deterministic).
        dtype: float dtype of the result.
        n_columns: the number of real images when the views end with zero padding columns
            (a sharded fit); ``F`` is then zero on the padding.

    Returns:
        ``(F, loadings)``: ``(rank, N)`` and a tuple of ``(rows_v, rank)``.

    Example:
        >>> F, loadings = nndsvd(views, 3, (1.0, 1.0), variant="nndsvda")  # doctest: +SKIP
    """
    views = tuple(jnp.asarray(X) for X in views)
    weights = tuple(float(w) for w in weights)
    return _nndsvd(views, jax.random.PRNGKey(seed), rank, weights, variant,
                   jnp.dtype(dtype).name, n_columns)


def svd_factors(U, s, Vt, mean, variant):
    """NNDSVD(a) factors ``(W, F)`` from a rank-``k`` SVD ``U diag(s) Vt`` of the stacked views.

    Each singular pair is split into its positive and negative parts and the larger one kept
    (Boutsidis and Gallopoulos); ``"nndsvda"`` fills the zeros with ``mean``, the stacked
    matrix's mean entry, so that multiplicative updates can move every entry.

    Args:
        U: ``(rows, k)``; s: ``(k,)``; Vt: ``(k, N)``.
        mean: scalar mean entry of the stacked, weighted views (used by ``"nndsvda"``).
        variant: ``"nndsvd"`` or ``"nndsvda"``.

    Returns:
        ``W`` ``(rows, k)`` and ``F`` ``(k, N)``, non-negative.
    """
    V = Vt.T
    up, un = _unit(jnp.maximum(U, 0.0))
    vp, vn = _unit(jnp.maximum(V, 0.0))
    um, unn = _unit(jnp.maximum(-U, 0.0))
    vm, vnn = _unit(jnp.maximum(-V, 0.0))
    positive = un * vn >= unn * vnn
    sigma = jnp.where(positive, un * vn, unn * vnn)
    W = jnp.where(positive, up, um)
    H = jnp.where(positive, vp, vm)
    # The leading singular pair of a non-negative matrix has one sign: take its magnitude.
    W = W.at[:, 0].set(jnp.abs(U[:, 0]))
    H = H.at[:, 0].set(jnp.abs(V[:, 0]))
    sigma = sigma.at[0].set(1.0)
    amplitude = jnp.sqrt(s * sigma)
    W = W * amplitude
    F = (H * amplitude).T
    if variant == "nndsvda":
        W = jnp.where(W > 0, W, mean)
        F = jnp.where(F > 0, F, mean)
    return W, F


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _nndsvd(views, key, rank, weights, variant, dtype, n_columns=None):
    scales = [float(np.sqrt(w)) for w in weights]
    blocks = tuple(s * X for s, X in zip(scales, _float_views(views, dtype)))
    U, s, Vt = _randomized_svd(blocks, rank, key, n_columns)
    n = Vt.shape[1] if n_columns is None else n_columns
    W, F = svd_factors(U, s, Vt, sum(jnp.sum(b) for b in blocks) / (U.shape[0] * n), variant)
    if variant == "nndsvda" and n_columns is not None:
        F = F * (jnp.arange(F.shape[1]) < n_columns)
    loadings = tuple(W[a:b] / scale for scale, (a, b) in zip(scales, _row_spans(blocks)))
    return F.astype(dtype), loadings


def user(init, view_names, shapes, rank, dtype="float32"):
    """Check and convert user-given factors ``{"F": ..., "loadings": {name: ...}}``.

    Args:
        init: dict with ``"F"`` ``(rank, N)`` and ``"loadings"`` mapping every view name to
            a ``(rows_v, rank)`` array (a sequence in view order is accepted too).
        view_names: names of the views, in order.
        shapes: ``(rows_v, N)`` of every view.
        rank: number of concepts.
        dtype: float dtype of the result.

    Returns:
        ``(F, loadings)`` as JAX arrays.

    Raises:
        ValueError: a key is missing, a shape is wrong, an entry is negative or not finite,
            or ``F`` or all loadings are zero.

    Example:
        >>> F, L = user({"F": F0, "loadings": {"a": W0}}, ("a",), [(5, 8)], 2)  # doctest: +SKIP
    """
    if not isinstance(init, dict) or set(init) != {"F", "loadings"}:
        keys = sorted(init) if isinstance(init, dict) else type(init).__name__
        raise ValueError(f"init: expected a dict with keys 'F' and 'loadings', got {keys}")
    n = shapes[0][1]
    loadings = init["loadings"]
    if not isinstance(loadings, dict):
        loadings = list(loadings)
        # zip would drop extra entries silently.
        if len(loadings) != len(view_names):
            raise ValueError(f"init['loadings']: expected {len(view_names)} arrays, one per "
                             f"view in order {list(view_names)}, got {len(loadings)}")
        loadings = dict(zip(view_names, loadings))
    missing = [name for name in view_names if name not in loadings]
    if missing:
        raise ValueError(f"init['loadings']: missing loadings for view(s) {missing}")
    unknown = [name for name in loadings if name not in view_names]
    if unknown:
        raise ValueError(f"init['loadings']: unknown view(s) {unknown}, expected names "
                         f"among {list(view_names)}")
    arrays = {"init['F']": (np.asarray(init["F"], np.float64), (rank, n))}
    for name, (rows, _) in zip(view_names, shapes):
        arrays[f"init['loadings'][{name!r}]"] = (np.asarray(loadings[name], np.float64),
                                                 (rows, rank))
    for label, (array, expected) in arrays.items():
        if array.shape != expected:
            raise ValueError(f"{label}: expected shape {expected}, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{label}: contains NaN or Inf")
        if np.any(array < 0):
            raise ValueError(f"{label}: expected non-negative entries, got minimum "
                             f"{array.min():.4g}")
    # Every update multiplies by the current factors (MU) or starts from their products
    # (HALS's first F step sees W^T X = 0): an all-zero start can only stay zero.
    labels = list(arrays)
    if not np.any(arrays[labels[0]][0]):
        raise ValueError("init['F']: expected a non-zero starting point, got all zeros")
    if not any(np.any(arrays[label][0]) for label in labels[1:]):
        raise ValueError("init['loadings']: expected a non-zero starting point, got all "
                         "zeros in every view")
    values = [jnp.asarray(a, dtype) for a, _ in arrays.values()]
    return values[0], tuple(values[1:])
