"""Pure solver core for coupled NMF: state pytree, config, MU / HALS / FISTA steps.

The model, for views ``X_v`` of shape ``(rows_v, N)`` sharing the image embedding ``F``
of shape ``(rank, N)``::

    sum_v w_v ||X_v - W_v F||_F^2 + l1_F sum(F) + l2_F ||F||_F^2
        + l2_W sum_v ||W_v||_F^2 + group_lam sum_k sum_g ||F[k, group g]||_2

with every factor non-negative. ``W_v`` (``loadings[v]``, shape ``(rows_v, rank)``) is the
paper's ``P_i`` for pixel views and ``O_j`` for layer views.

Everything here is a pure function of arrays, usable inside the caller's ``jit`` and
``vmap``. The code is written around the small Grams so that the image axis ``N`` can be
sharded later: an ``F`` update needs only ``sum_v w_v W_v^T X_v`` ``(rank, N)`` and
``sum_v w_v W_v^T W_v`` ``(rank, rank)``; a ``W_v`` update needs ``X_v F^T``
``(rows_v, rank)`` and ``F F^T`` ``(rank, rank)``; the objective is assembled from the same
products and the squared norms ``||X_v||^2`` computed once, never from residuals.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxcnmf import solver
    >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    >>> views = (jax.random.uniform(k1, (30, 50)), jax.random.uniform(k2, (20, 50)))
    >>> config = solver.SolverConfig(method="hals", rank=3, weights=(1.0, 1.0), max_iter=50)
    >>> F0 = jax.random.uniform(k3, (3, 50))
    >>> loadings0 = tuple(jnp.full((v.shape[0], 3), 0.5) for v in views)
    >>> state = solver.run(solver.init_state(views, F0, loadings0, config), views, config)
    >>> state.F.shape, int(state.iteration) <= 50
    ((3, 50), True)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("mu", "hals")

# Full float32 products on every backend: GPUs default to TF32, whose rounding breaks the
# monotone decrease of the updates and the "same answer on any backend" promise.
_HIGHEST = lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


class SolverConfig(NamedTuple):
    """Static, hashable solver settings (hyperparameters never live in the state).

    Attributes:
        method: ``"mu"`` (the paper's multiplicative updates) or ``"hals"`` (hierarchical
            alternating least squares, column by column).
        rank: number of concepts ``k``.
        weights: one positive weight ``w_v`` per view, in view order; ``()`` means all 1.
        l1_F: L1 penalty on ``F``.
        l2_F: squared-L2 penalty on ``F``.
        l2_W: squared-L2 penalty on every loading matrix.
        unit_columns: rescale so that the stacked loading matrix ``[W_1; ...; W_V]`` has
            unit-L2 columns after each step, moving the scale into ``F`` (the fit is kept).
        group_lam: group-lasso weight on ``F``; ``> 0`` replaces the ``F`` update by
            monotone FISTA with a non-negative group soft-threshold.
        n_groups: number of image groups (ids in ``[0, n_groups)``) for the group lasso.
        inner_iter: FISTA iterations per outer step when ``group_lam > 0``.
        max_iter: bound of the ``while_loop`` and length of the history buffers.
        tol: stop when ``|obj_prev - obj| <= tol * |obj_prev|``.
        eps: added to denominators only; also the floor HALS clips to, so that no
            component dies at exact zero.
        dtype: compute dtype name, ``"float32"`` or ``"float64"``.
    """

    method: str = "mu"
    rank: int = 10
    weights: tuple = ()
    l1_F: float = 0.0
    l2_F: float = 0.0
    l2_W: float = 0.0
    unit_columns: bool = False
    group_lam: float = 0.0
    n_groups: int = 1
    inner_iter: int = 10
    max_iter: int = 200
    tol: float = 1e-4
    eps: float = 1e-10
    dtype: str = "float32"


class SolverState(NamedTuple):
    """Arrays carried by the solver loop (a pytree; vmap over restarts works on it).

    Attributes:
        F: ``(rank, N)`` shared embedding.
        loadings: tuple of ``(rows_v, rank)`` loading matrices, in view order.
        groups: ``(N,)`` int32 group id of every image (zeros when unused).
        sq_norms: ``(n_views,)`` ``||X_v||_F^2``, computed once.
        iteration: int32 scalar, steps done.
        objective: scalar, objective after the last step (at the start: of the init).
        objective_history: ``(max_iter,)`` objective after each step, NaN beyond ``iteration``.
        rel_error_history: ``(n_views, max_iter)`` ``||X_v - W_v F|| / ||X_v||`` per step.
        converged: bool scalar, the relative-change test has passed.
        column_mask: ``None``, or ``(N,)`` with 1 on real images and 0 on the zero columns a
            sharded fit pads ``N`` with (see :mod:`jaxcnmf.solver.sharding`).
    """

    F: jax.Array
    loadings: tuple
    groups: jax.Array
    sq_norms: jax.Array
    iteration: jax.Array
    objective: jax.Array
    objective_history: jax.Array
    rel_error_history: jax.Array
    converged: jax.Array
    column_mask: jax.Array | None = None


def _as_tuple(views):
    if isinstance(views, dict):
        return tuple(views.values())
    return tuple(views)


def _weights(config, n_views):
    if config.weights:
        return tuple(float(w) for w in config.weights)
    return (1.0,) * n_views


def _dot_tn(W, X, dtype):
    """``W^T X`` with ``X`` kept in its storage dtype and accumulation in ``dtype``."""
    return lax.dot_general(W.astype(X.dtype), X, (((0,), (0,)), ((), ())),
                           precision=_HIGHEST, preferred_element_type=dtype)


def _dot_nt(X, F, dtype):
    """``X F^T`` with ``X`` kept in its storage dtype and accumulation in ``dtype``."""
    return lax.dot_general(X, F.astype(X.dtype), (((1,), (1,)), ((), ())),
                           precision=_HIGHEST, preferred_element_type=dtype)


def f_grams(views, loadings, config):
    """Summed products needed by an ``F`` update.

    Args:
        views: tuple of ``(rows_v, N)`` arrays.
        loadings: tuple of ``(rows_v, rank)`` arrays.
        config: :class:`SolverConfig`.

    Returns:
        ``(B, G)``: ``B = sum_v w_v W_v^T X_v`` of shape ``(rank, N)`` and
        ``G = sum_v w_v W_v^T W_v`` of shape ``(rank, rank)``.
    """
    dtype = jnp.dtype(config.dtype)
    weights = _weights(config, len(views))
    B = sum(w * _dot_tn(W, X, dtype) for w, W, X in zip(weights, loadings, views))
    G = sum(w * _mm(W.T, W) for w, W in zip(weights, loadings))
    return B, G


def _group_norms(F, groups, n_groups):
    """``(rank, n_groups)`` L2 norm of every concept's restriction to every group."""
    return jnp.sqrt(jax.ops.segment_sum((F * F).T, groups, num_segments=n_groups).T)


def _penalty_F(F, groups, config):
    value = config.l1_F * jnp.sum(F) + config.l2_F * jnp.sum(F * F)
    if config.group_lam > 0:
        value = value + config.group_lam * jnp.sum(_group_norms(F, groups, config.n_groups))
    return value


def _fit_terms(sq_norm, cross, quad):
    """Clamped ``||X - W F||^2 = ||X||^2 - 2 tr(W^T X F^T) + tr(W^T W F F^T)``."""
    return jnp.maximum(sq_norm - 2.0 * cross + quad, 0.0)


def _rel_errors(sq_norms, fits):
    safe = jnp.where(sq_norms > 0, sq_norms, 1.0)
    return jnp.where(sq_norms > 0, jnp.sqrt(fits / safe), 0.0)


def _mu_F(F, B, G, config):
    denom = _mm(G, F) + 0.5 * config.l1_F + config.l2_F * F + config.eps
    return F * B / denom


def _hals_F(F, B, G, config):
    def update_row(k, F):
        numer = B[k] - _mm(G[k], F) - 0.5 * config.l1_F - config.l2_F * F[k]
        row = F[k] + numer / (G[k, k] + config.l2_F + config.eps)
        return F.at[k].set(jnp.maximum(row, config.eps))

    return lax.fori_loop(0, F.shape[0], update_row, F)


def _prox_group(V, step_size, groups, config):
    """Non-negative group soft-threshold: prox of ``step * lam * sum ||F_kg||`` on F >= 0."""
    Z = jnp.maximum(V, 0.0)
    norms = _group_norms(Z, groups, config.n_groups)
    safe = jnp.where(norms > 0, norms, 1.0)
    scale = jnp.where(norms > 0,
                      jnp.maximum(1.0 - step_size * config.group_lam / safe, 0.0), 0.0)
    return Z * scale[:, groups]


def _subproblem(Z, B, G, groups, config):
    """Objective of the ``F`` sub-problem with the loadings fixed, less the constant."""
    smooth = jnp.sum(Z * _mm(G, Z)) - 2.0 * jnp.sum(B * Z)
    return smooth + _penalty_F(Z, groups, config)


def _fista_F(F, B, G, groups, config):
    """Monotone FISTA (Beck & Teboulle's MFISTA) on the F sub-problem with W fixed.

    The momentum restarts every outer step because the Lipschitz constant
    ``2 (lambda_max(G) + l2_F)`` changes with the loadings; keeping the best iterate makes
    the F update never increase the objective.
    """
    lipschitz = 2.0 * (jnp.linalg.eigvalsh(G)[-1] + config.l2_F) + config.eps
    step_size = 1.0 / lipschitz

    def subproblem(Z):
        return _subproblem(Z, B, G, groups, config)

    def body(_, carry):
        X, Y, t, fx = carry
        grad = 2.0 * (_mm(G, Y) - B) + config.l1_F + 2.0 * config.l2_F * Y
        Z = _prox_group(Y - step_size * grad, step_size, groups, config)
        fz = subproblem(Z)
        better = fz <= fx
        X_new = jnp.where(better, Z, X)
        f_new = jnp.where(better, fz, fx)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        Y_new = X_new + (t / t_new) * (Z - X_new) + ((t - 1.0) / t_new) * (X_new - X)
        return X_new, Y_new, t_new, f_new

    one = jnp.ones((), F.dtype)
    X, _, _, _ = lax.fori_loop(0, config.inner_iter, body, (F, F, one, subproblem(F)))
    return X


def _update_F(F, B, G, groups, config):
    if config.group_lam > 0:
        return _fista_F(F, B, G, groups, config)
    if config.method == "hals":
        return _hals_F(F, B, G, config)
    return _mu_F(F, B, G, config)


def _update_W(W, A, C, weight, config):
    """One update of a view's loadings from ``A = X F^T`` and ``C = F F^T``."""
    ridge = config.l2_W / weight
    if config.method == "hals":
        At, Wt = A.T, W.T

        def update_col(k, Wt):
            numer = At[k] - _mm(C[k], Wt) - ridge * Wt[k]
            col = Wt[k] + numer / (C[k, k] + ridge + config.eps)
            return Wt.at[k].set(jnp.maximum(col, config.eps))

        return lax.fori_loop(0, W.shape[1], update_col, Wt).T
    return W * A / (_mm(W, C) + ridge * W + config.eps)


def _objective_from_terms(F, loadings, groups, sq_norms, crosses, quads, config):
    fits = jnp.stack([_fit_terms(s, c, q) for s, c, q in zip(sq_norms, crosses, quads)])
    weights = jnp.asarray(_weights(config, len(loadings)), F.dtype)
    value = jnp.sum(weights * fits) + _penalty_F(F, groups, config)
    value = value + config.l2_W * sum(jnp.sum(W * W) for W in loadings)
    return value, _rel_errors(sq_norms, fits)


def _cross_and_quad(views, F, loadings, config):
    """Per view ``tr(W^T X F^T)`` and ``tr(W^T W F F^T)``, the inputs of :func:`_fit_terms`."""
    dtype = jnp.dtype(config.dtype)
    C = _mm(F, F.T)
    crosses = tuple(jnp.sum(W * _dot_nt(X, F, dtype)) for X, W in zip(views, loadings))
    quads = tuple(jnp.sum(_mm(W.T, W) * C) for W in loadings)
    return crosses, quads


def _prepared(views, F, loadings, groups, config):
    """Views as a tuple, factors in the compute dtype, int32 group ids and ``||X_v||^2``."""
    views = _as_tuple(views)
    dtype = jnp.dtype(config.dtype)
    F = jnp.asarray(F, dtype)
    loadings = tuple(jnp.asarray(W, dtype) for W in _as_tuple(loadings))
    groups = (jnp.zeros(F.shape[1], jnp.int32) if groups is None
              else jnp.asarray(groups, jnp.int32))
    sq_norms = jnp.stack([jnp.sum(jnp.square(X.astype(dtype))) for X in views])
    return views, F, loadings, groups, sq_norms


def _objective(views, F, loadings, groups, sq_norms, config):
    crosses, quads = _cross_and_quad(views, F, loadings, config)
    return _objective_from_terms(F, loadings, groups, sq_norms, crosses, quads, config)


def objective(views, F, loadings, config, groups=None):
    """Objective value and per-view relative errors of given factors.

    Args:
        views: tuple (or dict) of ``(rows_v, N)`` non-negative arrays.
        F: ``(rank, N)``.
        loadings: tuple of ``(rows_v, rank)``.
        config: :class:`SolverConfig` (weights, penalties, dtype).
        groups: ``(N,)`` int group ids, needed when ``config.group_lam > 0``.

    Returns:
        ``(value, rel_errors)``: scalar objective and ``(n_views,)`` relative errors.

    Example:
        >>> value, rel = objective(views, state.F, state.loadings, config)  # doctest: +SKIP
    """
    return _objective(*_prepared(views, F, loadings, groups, config), config)


def init_state(views, F0, loadings0, config, groups=None, column_mask=None):
    """Build the solver state from initial factors.

    Args:
        views: tuple (or dict) of ``(rows_v, N)`` non-negative arrays (any float dtype;
            bfloat16 views are multiplied with float32 accumulation).
        F0: ``(rank, N)`` non-negative initial embedding.
        loadings0: tuple of ``(rows_v, rank)`` non-negative initial loadings.
        config: :class:`SolverConfig`.
        groups: optional ``(N,)`` int group ids in ``[0, config.n_groups)``.
        column_mask: optional ``(N,)``, 0 on padding columns (zero in the views and in
            ``F0``), which every step then keeps at exactly zero.

    Returns:
        :class:`SolverState` with empty histories and the objective of the initial factors.

    Example:
        >>> state = init_state(views, F0, loadings0, config)  # doctest: +SKIP
    """
    views, F, loadings, groups, sq_norms = _prepared(views, F0, loadings0, groups, config)
    value, _ = _objective(views, F, loadings, groups, sq_norms, config)
    dtype = jnp.dtype(config.dtype)
    return SolverState(
        F=F,
        loadings=loadings,
        groups=groups,
        sq_norms=sq_norms,
        iteration=jnp.zeros((), jnp.int32),
        objective=value,
        objective_history=jnp.full((config.max_iter,), jnp.nan, dtype),
        rel_error_history=jnp.full((len(views), config.max_iter), jnp.nan, dtype),
        converged=jnp.zeros((), bool),
        column_mask=None if column_mask is None else jnp.asarray(column_mask, dtype),
    )


def _unit_columns(F, loadings):
    """Give the stacked loadings unit columns; ``F`` absorbs the norms so ``W_v F`` is kept."""
    norms = jnp.sqrt(sum(jnp.sum(W * W, axis=0) for W in loadings))
    scale = jnp.where(norms > 0, norms, 1.0)
    return F * scale[:, None], tuple(W / scale for W in loadings)


def step(state, views, config):
    """One outer iteration: update ``F``, then every loading in view order.

    Args:
        state: :class:`SolverState`.
        views: tuple (or dict) of ``(rows_v, N)`` arrays, the same as for ``init_state``.
        config: :class:`SolverConfig` (static).

    Returns:
        The next :class:`SolverState`, with its objective and relative errors recorded.

    Example:
        >>> state = jax.jit(step, static_argnums=2)(state, views, config)  # doctest: +SKIP
    """
    views = _as_tuple(views)
    dtype = jnp.dtype(config.dtype)
    weights = _weights(config, len(views))
    B, G = f_grams(views, state.loadings, config)
    F = _update_F(state.F, B, G, state.groups, config)
    if state.column_mask is not None:
        # HALS floors F at eps; padding must stay exactly zero to leave F F^T unchanged.
        F = F * state.column_mask
    C = _mm(F, F.T)
    loadings, crosses, quads = [], [], []
    for X, W, w in zip(views, state.loadings, weights):
        A = _dot_nt(X, F, dtype)
        W = _update_W(W, A, C, w, config)
        loadings.append(W)
        crosses.append(jnp.sum(W * A))
        quads.append(jnp.sum(_mm(W.T, W) * C))
    loadings = tuple(loadings)
    if config.unit_columns:
        # The rescaling keeps every W_v F, hence the cross and quadratic terms above.
        F, loadings = _unit_columns(F, loadings)
    value, rel = _objective_from_terms(F, loadings, state.groups, state.sq_norms,
                                       crosses, quads, config)
    previous = state.objective
    converged = jnp.abs(previous - value) <= config.tol * jnp.abs(previous)
    i = state.iteration
    return state._replace(
        F=F,
        loadings=loadings,
        iteration=i + 1,
        objective=value,
        objective_history=state.objective_history.at[i].set(value),
        rel_error_history=state.rel_error_history.at[:, i].set(rel),
        converged=converged,
    )


def run(state, views, config):
    """Iterate :func:`step` in one ``lax.while_loop`` until converged or ``max_iter``.

    Args:
        state: :class:`SolverState` from :func:`init_state` (or a previous ``run``).
        views: tuple (or dict) of ``(rows_v, N)`` arrays.
        config: :class:`SolverConfig` (static).

    Returns:
        The final :class:`SolverState`; ``iteration`` and ``converged`` say how it ended.

    Example:
        >>> final = jax.jit(run, static_argnums=2)(state, views, config)  # doctest: +SKIP
    """
    views = _as_tuple(views)

    def keep_going(s):
        return jnp.logical_and(jnp.logical_not(s.converged), s.iteration < config.max_iter)

    return lax.while_loop(keep_going, lambda s: step(s, views, config), state)


def solve_F(views, loadings, config, F0=None, column_mask=None):
    """Non-negative least squares for ``F`` with the loadings fixed (``transform``).

    Runs only the ``F`` updates of ``config.method`` (group lasso not applied) in one
    ``lax.while_loop``; ``B`` and ``G`` are computed once since the loadings do not move.

    Args:
        views: tuple of ``(rows_v, N)`` arrays, any subset of the fitted views.
        loadings: tuple of the matching ``(rows_v, rank)`` loadings.
        config: :class:`SolverConfig`; ``weights`` must match ``views``.
        F0: optional ``(rank, N)`` start; default is a clipped ridge least-squares solution.
        column_mask: optional ``(N,)``, 0 on zero padding columns (kept at exactly zero).

    Returns:
        ``(F, n_iter, converged)``: ``(rank, N)`` in ``config.dtype``, an int32 scalar
        (updates run) and a bool scalar (the relative-change test passed).

    Example:
        >>> F, n_iter, ok = solve_F(views, loadings, config)  # doctest: +SKIP
    """
    views = _as_tuple(views)
    dtype = jnp.dtype(config.dtype)
    loadings = tuple(jnp.asarray(W, dtype) for W in loadings)
    B, G = f_grams(views, loadings, config)
    rank = G.shape[0]
    if F0 is None:
        ridge = 1e-6 * jnp.trace(G) / rank + config.eps
        F0 = jnp.linalg.solve(G + ridge * jnp.eye(rank, dtype=dtype), B)
        # MU cannot leave exact zeros, so start strictly positive.
        if column_mask is None:
            F0 = jnp.maximum(F0, 1e-3 * jnp.maximum(jnp.mean(jnp.abs(F0)), config.eps))
        else:
            # The floor is taken over the real images only, as without the padding.
            mean = jnp.sum(jnp.abs(F0) * column_mask) / (rank * jnp.sum(column_mask))
            F0 = jnp.maximum(F0, 1e-3 * jnp.maximum(mean, config.eps))
    F0 = jnp.asarray(F0, dtype)
    if column_mask is not None:
        column_mask = jnp.asarray(column_mask, dtype)
        F0 = F0 * column_mask
    plain = config._replace(group_lam=0.0)

    def value(F):
        return _subproblem(F, B, G, None, plain)

    def body(carry):
        F, i, previous, _ = carry
        F = _update_F(F, B, G, None, plain)
        if column_mask is not None:
            F = F * column_mask
        current = value(F)
        done = jnp.abs(previous - current) <= config.tol * jnp.abs(previous)
        return F, i + 1, current, done

    def keep_going(carry):
        _, i, _, done = carry
        return jnp.logical_and(jnp.logical_not(done), i < config.max_iter)

    start = (F0, jnp.zeros((), jnp.int32), value(F0), jnp.zeros((), bool))
    F, n_iter, _, done = lax.while_loop(keep_going, body, start)
    return F, n_iter, done
