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
        unit_columns: constrain the stacked loading matrix ``[W_1; ...; W_V]`` to unit-L2
            columns, so that the ``F`` penalties act on a pinned scale. Without ``F``
            penalties the objective does not depend on the scale split and the columns are
            simply rescaled after each step (``F`` absorbs the norms). With ``l1_F``,
            ``l2_F`` or ``group_lam`` the loading step minimises over columns of norm at
            most 1 (a majorise-minimise step projected in the majoriser's metric), then
            live columns are scaled up to norm 1, which moves scale out of ``F`` and so
            never raises the objective; ``l2_W`` is then the constant
            ``l2_W * (live concepts)`` and does not enter the loading step.
        group_lam: group-lasso weight on ``F``; ``> 0`` replaces the ``F`` update by
            monotone FISTA with a non-negative group soft-threshold.
        n_groups: number of image groups (ids in ``[0, n_groups)``) for the group lasso.
        inner_iter: FISTA iterations per outer step when ``group_lam > 0``.
        max_iter: bound of the ``while_loop`` and length of the history buffers.
        tol: stop when the KKT violation (Frobenius norm of the gradient mapping of
            both blocks, each measured just before its update, as scikit-learn's ``cd``
            does) has fallen to ``tol`` times its value at the first step. Unlike a test
            on the objective's relative change, rounding cannot satisfy it early: in
            float32 the violation bottoms out near ``1e-7`` of its start, so a smaller
            ``tol`` runs to ``max_iter`` instead of stopping by accident.
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
        objective_history: ``(max_iter,)`` objective after each step, NaN beyond ``iteration``
            (assembled from Grams: in float32 accurate to about ``1e-7 sum_v w_v ||X_v||^2``;
            :func:`residual_objective` gives the exact value of a final state).
        rel_error_history: ``(n_views, max_iter)`` ``||X_v - W_v F|| / ||X_v||`` per step.
        converged: bool scalar, the KKT test has passed.
        violation: scalar, KKT violation measured in the last step.
        violation_init: scalar, KKT violation measured in the first step.
        failed: bool scalar, a non-finite objective or factor appeared; the loop stops and
            the factors are those of that step (the caller raises).
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
    violation: jax.Array
    violation_init: jax.Array
    failed: jax.Array
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
        violation=jnp.zeros((), dtype),
        violation_init=jnp.zeros((), dtype),
        failed=jnp.logical_not(jnp.isfinite(value)),
        column_mask=None if column_mask is None else jnp.asarray(column_mask, dtype),
    )


def _unit_columns(F, loadings):
    """Give the stacked loadings unit columns; ``F`` absorbs the norms so ``W_v F`` is kept."""
    norms = jnp.sqrt(sum(jnp.sum(W * W, axis=0) for W in loadings))
    scale = jnp.where(norms > 0, norms, 1.0)
    return F * scale[:, None], tuple(W / scale for W in loadings)


def _ball_mode(config):
    """Unit columns under ``F`` penalties: the loading step is constrained to the unit ball.

    Rescaling ``(W D, D^-1 F)`` keeps the fit but changes every ``F`` penalty, so an
    unconstrained loading step followed by a rescale can undo the ``F`` step's shrinkage
    and raise the objective. Without ``F`` penalties the rescale is free.
    """
    return config.unit_columns and (config.l1_F > 0 or config.l2_F > 0 or config.group_lam > 0)


def _ball_project(targets, metrics, n_newton=30):
    """Minimise ``sum_v sum_i d_vi (w_vi - z_vi)^2`` over ``sum_v ||w_v[:, k]||^2 <= 1``.

    ``targets`` ``z_v`` (non-negative) and ``metrics`` ``d_v`` (positive) are arrays of one
    shape per view whose axis 0 is summed in the norm (vectors: one column; matrices:
    one norm per column). The minimiser is ``w = d z / (d + mu)`` with the smallest
    ``mu >= 0`` that makes the norm at most 1, found by Newton's method on
    ``1 / ||w(mu)|| - 1``, which is concave and increasing in ``mu`` (More & Sorensen), so
    the iterates approach the root from the left; a last radial shrink makes the norm
    exactly 1 where Newton stopped short.
    """
    def norm2(mu):
        return sum(jnp.sum(jnp.square(d * z / (d + mu)), axis=0)
                   for z, d in zip(targets, metrics))

    def slope(mu):
        return sum(jnp.sum(-2.0 * jnp.square(d * z) / (d + mu) ** 3, axis=0)
                   for z, d in zip(targets, metrics))

    def newton(_, mu):
        n2, dn2 = norm2(mu), slope(mu)
        outside = n2 > 1.0
        safe_n2 = jnp.where(outside, n2, 1.0)
        psi = lax.rsqrt(safe_n2) - 1.0
        dpsi = -0.5 * safe_n2 ** -1.5 * jnp.where(outside, dn2, -1.0)
        return jnp.where(outside, jnp.maximum(mu - psi / dpsi, mu), mu)

    mu = lax.fori_loop(0, n_newton, newton, jnp.zeros_like(norm2(0.0)))
    projected = [d * z / (d + mu) for z, d in zip(targets, metrics)]
    norm = jnp.sqrt(sum(jnp.sum(w * w, axis=0) for w in projected))
    shrink = jnp.where(norm > 1.0, 1.0 / jnp.where(norm > 1.0, norm, 1.0), 1.0)
    return [w * shrink for w in projected]


def _update_W_ball(loadings, As, C, weights, config):
    """Loading step on the unit ball of the stacked columns, all views at once.

    HALS: each column's exact minimiser over ``{w >= 0, ||w|| <= 1}`` (the column
    problem is separable with curvature ``w_v C_kk`` per view). MU: the minimiser over the
    same set of the diagonal quadratic majoriser whose unconstrained minimiser is the
    multiplicative update. Either way the fit does not increase.
    """
    eps = config.eps
    if config.method == "hals":
        def update_col(k, Ws):
            targets, metrics = [], []
            for W, A, w in zip(Ws, As, weights):
                residual = A[:, k] - _mm(W, C[:, k]) + W[:, k] * C[k, k]
                targets.append(jnp.maximum(residual / (C[k, k] + eps), eps))
                metrics.append(jnp.full_like(residual, w * (C[k, k] + eps)))
            cols = _ball_project(targets, metrics)
            return tuple(W.at[:, k].set(col) for W, col in zip(Ws, cols))

        return lax.fori_loop(0, C.shape[0], update_col, tuple(loadings))
    targets, metrics = [], []
    for W, A, w in zip(loadings, As, weights):
        WC = _mm(W, C) + eps
        targets.append(W * A / WC)
        # Entries at exact zero stay zero whatever their metric; 1 keeps it finite.
        metrics.append(w * jnp.where(W > 0, WC / jnp.where(W > 0, W, 1.0), 1.0))
    return tuple(_ball_project(targets, metrics))


def _f_violation(F, B, G, groups, config):
    """Squared norm of the ``F`` block's gradient mapping (0 exactly at a KKT point)."""
    lipschitz = 2.0 * (jnp.linalg.eigvalsh(G)[-1] + config.l2_F) + config.eps
    grad = 2.0 * (_mm(G, F) - B) + config.l1_F + 2.0 * config.l2_F * F
    trial = F - grad / lipschitz
    if config.group_lam > 0:
        projected = _prox_group(trial, 1.0 / lipschitz, groups, config)
    else:
        projected = jnp.maximum(trial, 0.0)
    return jnp.sum(jnp.square(lipschitz * (F - projected)))


def _w_violation(loadings, As, C, weights, config):
    """Squared norm of the loadings' gradient mapping, summed over views."""
    ball = _ball_mode(config)
    top = jnp.linalg.eigvalsh(C)[-1]
    ridge = 0.0 if ball else config.l2_W
    lipschitz = [2.0 * (w * top + ridge) + config.eps for w in weights]
    if ball:
        # One step for all views, so that the joint projection is a gradient mapping.
        common = lipschitz[0]
        for value in lipschitz[1:]:
            common = jnp.maximum(common, value)
        lipschitz = [common] * len(weights)
    projected = [jnp.maximum(W - (2.0 * w * (_mm(W, C) - A) + 2.0 * ridge * W) / L, 0.0)
                 for W, A, w, L in zip(loadings, As, weights, lipschitz)]
    if ball:
        norms = jnp.sqrt(sum(jnp.sum(P * P, axis=0) for P in projected))
        projected = [P / jnp.maximum(norms, 1.0) for P in projected]
    # (L * (W - P))^2, not L^2 * (W - P)^2: L alone can exceed sqrt(float32 max).
    return sum(jnp.sum(jnp.square(L * (W - P)))
               for W, P, L in zip(loadings, projected, lipschitz))


def step(state, views, config):
    """One outer iteration: update ``F``, then every loading.

    The KKT violation of each block is measured just before that block is updated (at no
    extra pass over the views), and ``converged`` is set when their combined norm has
    fallen to ``config.tol`` times its first value. ``failed`` is set when the objective
    or the violation is not finite.

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
    violation_F = _f_violation(state.F, B, G, state.groups, config)
    F = _update_F(state.F, B, G, state.groups, config)
    if state.column_mask is not None:
        # HALS floors F at eps; padding must stay exactly zero to leave F F^T unchanged.
        F = F * state.column_mask
    C = _mm(F, F.T)
    As = tuple(_dot_nt(X, F, dtype) for X in views)
    violation_W = _w_violation(state.loadings, As, C, weights, config)
    if _ball_mode(config):
        loadings = _update_W_ball(state.loadings, As, C, weights, config)
    else:
        loadings = tuple(_update_W(W, A, C, w, config)
                         for W, A, w in zip(state.loadings, As, weights))
    crosses = [jnp.sum(W * A) for W, A in zip(loadings, As)]
    quads = [jnp.sum(_mm(W.T, W) * C) for W in loadings]
    if config.unit_columns:
        # The rescaling keeps every W_v F, hence the cross and quadratic terms above; in
        # ball mode it scales columns up, moving scale out of F (penalties can only drop).
        F, loadings = _unit_columns(F, loadings)
    value, rel = _objective_from_terms(F, loadings, state.groups, state.sq_norms,
                                       crosses, quads, config)
    violation = jnp.sqrt(violation_F + violation_W)
    i = state.iteration
    violation_init = jnp.where(i == 0, violation, state.violation_init)
    converged = violation <= config.tol * violation_init
    failed = jnp.logical_not(jnp.isfinite(value) & jnp.isfinite(violation))
    return state._replace(
        F=F,
        loadings=loadings,
        iteration=i + 1,
        objective=value,
        objective_history=state.objective_history.at[i].set(value),
        rel_error_history=state.rel_error_history.at[:, i].set(rel),
        converged=converged,
        violation=violation,
        violation_init=violation_init,
        failed=failed,
    )


def run(state, views, config):
    """Iterate :func:`step` in one ``lax.while_loop`` until converged or ``max_iter``.

    Args:
        state: :class:`SolverState` from :func:`init_state` (or a previous ``run``).
        views: tuple (or dict) of ``(rows_v, N)`` arrays.
        config: :class:`SolverConfig` (static).

    Returns:
        The final :class:`SolverState`; ``iteration``, ``converged`` and ``failed`` say how
        it ended (a non-finite value stops the loop at once, with no host sync).

    Example:
        >>> final = jax.jit(run, static_argnums=2)(state, views, config)  # doctest: +SKIP
    """
    views = _as_tuple(views)

    def keep_going(s):
        done = jnp.logical_or(s.converged, s.failed)
        return jnp.logical_and(jnp.logical_not(done), s.iteration < config.max_iter)

    return lax.while_loop(keep_going, lambda s: step(s, views, config), state)


def solve_F(views, loadings, config, F0=None, column_mask=None):
    """``F`` with the loadings fixed by the fit's own updates (MU / HALS, no group lasso).

    Runs only the ``F`` updates of ``config.method`` in one ``lax.while_loop`` until the
    ``F`` block's KKT violation falls to ``config.tol`` times its start; ``B`` and ``G``
    are computed once since the loadings do not move. :func:`nnls_F` solves the same
    problem exactly and is what ``FitResult.transform`` uses by default.

    Args:
        views: tuple of ``(rows_v, N)`` arrays, any subset of the fitted views.
        loadings: tuple of the matching ``(rows_v, rank)`` loadings.
        config: :class:`SolverConfig`; ``weights`` must match ``views``.
        F0: optional ``(rank, N)`` start; default is a clipped ridge least-squares solution.
        column_mask: optional ``(N,)``, 0 on zero padding columns (kept at exactly zero).

    Returns:
        ``(F, n_iter, converged)``: ``(rank, N)`` in ``config.dtype``, an int32 scalar
        (updates run) and a bool scalar (the KKT test passed).

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
    start_violation = _f_violation(F0, B, G, None, plain)

    def body(carry):
        F, i, _ = carry
        F = _update_F(F, B, G, None, plain)
        if column_mask is not None:
            F = F * column_mask
        done = _f_violation(F, B, G, None, plain) <= config.tol ** 2 * start_violation
        return F, i + 1, done

    def keep_going(carry):
        _, i, done = carry
        return jnp.logical_and(jnp.logical_not(done), i < config.max_iter)

    start = (F0, jnp.zeros((), jnp.int32), start_violation == 0)
    F, n_iter, done = lax.while_loop(keep_going, body, start)
    return F, n_iter, done


_RESIDUAL_ROWS = 256


def _residual_sq(X, W, F, dtype):
    """``||X - W F||^2`` summed over blocks of ``_RESIDUAL_ROWS`` rows (the rows are never
    split over devices, so a block of a column-sharded view is local)."""
    rows, block = X.shape[0], _RESIDUAL_ROWS
    if rows <= block:
        return jnp.sum(jnp.square(X.astype(dtype) - _mm(W, F)))

    def body(i, total):
        # The last block is shifted back to fit; rows an earlier block had are masked.
        start = jnp.minimum(i * block, rows - block)
        Xb = lax.dynamic_slice_in_dim(X, start, block, 0).astype(dtype)
        Wb = lax.dynamic_slice_in_dim(W, start, block, 0)
        per_row = jnp.sum(jnp.square(Xb - _mm(Wb, F)), axis=1)
        fresh = start + jnp.arange(block) >= i * block
        return total + jnp.sum(jnp.where(fresh, per_row, 0.0))

    return lax.fori_loop(0, -(-rows // block), body, jnp.zeros((), dtype))


def residual_objective(views, F, loadings, config, groups=None):
    """Objective and relative errors from the residuals ``X_v - W_v F`` themselves.

    The Gram form used inside the loop subtracts terms of size ``||X_v||^2``, so in
    float32 a near-exact fit's error is lost to rounding; here every residual is formed
    and squared, which costs one ``(rows_v, N)`` product per view: use it once, on a
    final state. The residual is formed ``_RESIDUAL_ROWS`` rows at a time, so that it
    needs no second view-sized buffer (the sharded fit of a probe set that fills the
    devices' memory evaluates it too).

    Args:
        views: tuple (or dict) of ``(rows_v, N)`` arrays.
        F: ``(rank, N)``.
        loadings: tuple of ``(rows_v, rank)``.
        config: :class:`SolverConfig`.
        groups: ``(N,)`` int group ids, needed when ``config.group_lam > 0``.

    Returns:
        ``(value, rel_errors)`` as :func:`objective`.

    Example:
        >>> value, rel = residual_objective(views, state.F, state.loadings, config)  # doctest: +SKIP
    """
    views, F, loadings, groups, sq_norms = _prepared(views, F, loadings, groups, config)
    dtype = jnp.dtype(config.dtype)
    fits = jnp.stack([_residual_sq(X, W, F, dtype) for X, W in zip(views, loadings)])
    weights = jnp.asarray(_weights(config, len(loadings)), dtype)
    value = jnp.sum(weights * fits) + _penalty_F(F, groups, config)
    value = value + config.l2_W * sum(jnp.sum(W * W) for W in loadings)
    return value, _rel_errors(sq_norms, fits)


def _masked_lstsq(R, c, mask, identity_scale):
    """``argmin ||R[:, P] s_P - c||`` with ``s`` zero off ``P`` (``mask``), by one QR.

    Columns outside ``P`` are replaced by scaled unit vectors in extra rows, which are
    orthogonal to everything else, so their coefficients come out exactly zero while the
    matrix keeps full column rank and a shape that does not depend on ``P``.
    """
    rank = R.shape[1]
    keep = mask.astype(R.dtype)
    A = jnp.concatenate([R * keep[None, :], identity_scale * jnp.diag(1.0 - keep)])
    rhs = jnp.concatenate([c, jnp.zeros(rank, R.dtype)])
    Q, T = jnp.linalg.qr(A)
    s = jax.scipy.linalg.solve_triangular(T, _mm(Q.T, rhs), lower=False)
    return s * keep


def _lawson_hanson(R, c, max_outer):
    """Non-negative least squares ``min_{f >= 0} ||R f - c||`` of one column (Lawson-Hanson).

    ``R`` ``(m, rank)`` and ``c`` ``(m,)``; returns ``f`` ``(rank,)``. Written with fixed
    shapes (a passive-set mask) and two nested ``while_loop`` s so that it vmaps over
    columns.
    """
    rank = R.shape[1]
    tiny = jnp.finfo(R.dtype).eps
    scale = jnp.linalg.norm(R) / jnp.sqrt(rank)
    norm_R = jnp.linalg.norm(R)

    def noise(f):
        # A tenth of the worst-case rounding of R^T (c - R f) (Frobenius norms overstate it
        # by far more): a noise-driven entry then fails to enter and stops the loop
        # ("stuck"), while nearly collinear columns with small true gains still enter.
        return 0.1 * tiny * norm_R * (jnp.linalg.norm(c) + norm_R * jnp.linalg.norm(f))

    def dual(f):
        return _mm(R.T, c - _mm(R, f))

    def inner(carry):
        f, mask, s, it = carry
        blocking = mask & (s <= 0)
        ratio = jnp.where(blocking, f / jnp.where(blocking, f - s, 1.0), jnp.inf)
        alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
        f = f + alpha * (s - f)
        mask = mask & (f > tiny * jnp.max(jnp.abs(f)))
        f = jnp.where(mask, f, 0.0)
        return f, mask, _masked_lstsq(R, c, mask, scale), it + 1

    def inner_going(carry):
        _, mask, s, it = carry
        return jnp.any(mask & (s <= 0)) & (it < rank)

    def outer(carry):
        f_before, mask_before, w, it, _ = carry
        j = jnp.argmax(jnp.where(mask_before, -jnp.inf, w))
        mask = mask_before.at[j].set(True)
        s = _masked_lstsq(R, c, mask, scale)
        # Rounding can make the entering coefficient non-positive: stop rather than cycle,
        # keeping the iterate from before the entry. The inner loop is skipped then: its
        # step ratio would be 0 / 0 for the entering entry (f_j = s_j = 0), a NaN that
        # zeroed the whole column.
        stuck = s[j] <= 0
        f, mask, s, _ = lax.while_loop(inner_going, inner,
                                       (f_before, mask, s, jnp.where(stuck, rank, 0)))
        f = jnp.where(stuck, f_before, jnp.where(mask, jnp.maximum(s, 0.0), 0.0))
        mask = jnp.where(stuck, mask_before, mask)
        return f, mask, dual(f), it + 1, stuck

    def outer_going(carry):
        f, mask, w, it, stuck = carry
        return jnp.any(~mask & (w > noise(f))) & (it < max_outer) & ~stuck

    f0 = jnp.zeros(rank, R.dtype)
    start = (f0, jnp.zeros(rank, bool), dual(f0), 0, False)
    f, _, _, _, _ = lax.while_loop(outer_going, outer, start)
    return f


def nnls_F(views, loadings, config, max_outer=None):
    """Exact non-negative least squares for ``F`` with the loadings fixed (``transform``).

    Solves ``min_{F >= 0} sum_v w_v ||X_v - W_v F||^2 + l1_F sum(F) + l2_F ||F||^2`` (no
    group lasso) column by column with the Lawson-Hanson active-set method, vmapped over
    the ``N`` columns. It works on the QR factor ``R`` of the weighted stacked loadings
    ``[sqrt(w_v) W_v]`` and on ``Q^T X`` ``(rank, N)``, never on the Gram ``G = R^T R``,
    so in float32 the error grows with ``cond(W)``, not ``cond(W)^2``: with ``cond(W)``
    ~600 the embedding agrees with ``scipy.optimize.nnls`` to about ``1e-5``.

    Args:
        views: tuple of ``(rows_v, N)`` arrays, any subset of the fitted views.
        loadings: tuple of the matching ``(rows_v, rank)`` loadings.
        config: :class:`SolverConfig`; ``weights`` must match ``views``.
        max_outer: bound on active-set changes per column; default ``3 * rank``.

    Returns:
        ``(rank, N)`` in ``config.dtype``.

    Example:
        >>> F = nnls_F(views, loadings, config)  # doctest: +SKIP
    """
    views = _as_tuple(views)
    dtype = jnp.dtype(config.dtype)
    weights = _weights(config, len(views))
    loadings = tuple(jnp.asarray(W, dtype) for W in loadings)
    rank = loadings[0].shape[1]
    blocks = [jnp.sqrt(jnp.asarray(w, dtype)) * W for w, W in zip(weights, loadings)]
    if config.l2_F > 0:
        ridge = jnp.sqrt(jnp.asarray(config.l2_F, dtype))
    else:
        # A ridge far below rounding keeps R square and invertible when the loadings are
        # rank deficient, without moving a well-posed solution.
        ridge = 1e-3 * jnp.sqrt(jnp.finfo(dtype).eps) * jnp.linalg.norm(
            jnp.concatenate(blocks))
    blocks.append(ridge * jnp.eye(rank, dtype=dtype))
    Q, R = jnp.linalg.qr(jnp.concatenate(blocks))
    offsets = [0]
    for W in loadings:
        offsets.append(offsets[-1] + W.shape[0])
    c = sum(jnp.sqrt(jnp.asarray(w, dtype)) * _dot_tn(Q[a:b], X, dtype)
            for w, X, a, b in zip(weights, views, offsets[:-1], offsets[1:]))
    if config.l1_F > 0:
        # l1 sum(f) is linear on f >= 0: it shifts R^T c by -l1 / 2.
        shift = jax.scipy.linalg.solve_triangular(
            R.T, jnp.full((rank,), 0.5 * config.l1_F, dtype), lower=True)
        c = c - shift[:, None]
    max_outer = 3 * rank if max_outer is None else max_outer
    solve = jax.vmap(lambda col: _lawson_hanson(R, col, max_outer), in_axes=1, out_axes=1)
    return solve(c)
