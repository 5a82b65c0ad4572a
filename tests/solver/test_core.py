"""Solver core: NumPy agreement, monotone objective, unit columns, group lasso, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf.solver import core as solver

RANK = 3
N = 48
ROWS = (20, 12)


def _planted(seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    F = rng.random((RANK, N)) * (rng.random((RANK, N)) < 0.6)
    views = tuple(rng.random((rows, RANK)) @ F + noise * rng.random((rows, N)) for rows in ROWS)
    return views


def _start(seed=1):
    rng = np.random.default_rng(seed)
    F0 = rng.random((RANK, N)) + 0.1
    loadings0 = tuple(rng.random((rows, RANK)) + 0.1 for rows in ROWS)
    return F0, loadings0


def _solve(views, config, groups=None, seed=1):
    F0, loadings0 = _start(seed)
    views = tuple(jnp.asarray(X, config.dtype) for X in views)
    return jax.jit(lambda v: solver.run(solver.init_state(v, F0, loadings0, config, groups),
                                        v, config))(views)


def _numpy_mu(views, F, loadings, weights, l1_F, l2_F, l2_W, eps, n_iter):
    """The paper's multiplicative updates written out plainly in float64."""
    loadings = list(loadings)
    for _ in range(n_iter):
        numer = sum(w * W.T @ X for w, W, X in zip(weights, loadings, views))
        gram = sum(w * W.T @ W for w, W in zip(weights, loadings))
        F = F * numer / (gram @ F + l1_F / 2 + l2_F * F + eps)
        for v, (w, X) in enumerate(zip(weights, views)):
            W = loadings[v]
            loadings[v] = W * (X @ F.T) / (W @ (F @ F.T) + l2_W / w * W + eps)
    return F, loadings


def test_mu_matches_numpy_float64_reference():
    views = _planted(noise=0.05)
    F0, loadings0 = _start()
    weights = (0.7, 2.0)
    config = solver.SolverConfig(method="mu", rank=RANK, weights=weights, l1_F=0.05,
                                 l2_F=0.02, l2_W=0.03, max_iter=10, tol=0.0,
                                 dtype="float64")
    with jax.enable_x64(True):
        state = _solve(views, config)
        F_jax = np.asarray(state.F)
        loadings_jax = [np.asarray(W) for W in state.loadings]
        assert state.F.dtype == jnp.float64
    F_ref, loadings_ref = _numpy_mu(views, F0, loadings0, weights, 0.05, 0.02, 0.03,
                                    config.eps, 10)
    assert int(state.iteration) == 10
    np.testing.assert_allclose(F_jax, F_ref, rtol=1e-5)
    for W_jax, W_ref in zip(loadings_jax, loadings_ref):
        np.testing.assert_allclose(W_jax, W_ref, rtol=1e-5)


@pytest.mark.parametrize("method", ["mu", "hals"])
@pytest.mark.parametrize("unit_columns", [False, True])
def test_objective_never_increases(method, unit_columns):
    config = solver.SolverConfig(method=method, rank=RANK, weights=(1.0, 3.0),
                                 unit_columns=unit_columns, max_iter=60, tol=0.0)
    state = _solve(_planted(noise=0.1), config)
    history = np.asarray(state.objective_history)[: int(state.iteration)]
    assert np.all(np.isfinite(history)) and len(history) > 10
    assert np.all(np.diff(history) <= 1e-5 * history[:-1])
    assert history[-1] < 0.5 * history[0]


def test_objective_from_grams_matches_residuals():
    views = _planted(noise=0.1)
    F0, loadings0 = _start()
    config = solver.SolverConfig(rank=RANK, weights=(0.5, 2.0), l1_F=0.1, l2_F=0.2, l2_W=0.3)
    value, rel = solver.objective(tuple(jnp.asarray(X, jnp.float32) for X in views), F0,
                                  loadings0, config)
    residuals = [np.sum((X - W @ F0) ** 2) for X, W in zip(views, loadings0)]
    expected = (0.5 * residuals[0] + 2.0 * residuals[1] + 0.1 * F0.sum()
                + 0.2 * np.sum(F0 ** 2) + 0.3 * sum(np.sum(W ** 2) for W in loadings0))
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rel), [np.sqrt(r / np.sum(X ** 2))
                                                 for r, X in zip(residuals, views)], rtol=1e-4)


def test_unit_columns_keep_the_fit_and_normalise_stacked_loadings():
    views = tuple(jnp.asarray(X, jnp.float32) for X in _planted(noise=0.1))
    F0, loadings0 = _start()
    plain = solver.SolverConfig(method="hals", rank=RANK, weights=(1.0, 1.0), max_iter=5)
    unit = plain._replace(unit_columns=True)
    a = solver.step(solver.init_state(views, F0, loadings0, plain), views, plain)
    b = solver.step(solver.init_state(views, F0, loadings0, unit), views, unit)
    for Wa, Wb in zip(a.loadings, b.loadings):
        np.testing.assert_allclose(np.asarray(Wb) @ np.asarray(b.F),
                                   np.asarray(Wa) @ np.asarray(a.F), rtol=1e-4)
    stacked = np.concatenate([np.asarray(W) for W in b.loadings])
    np.testing.assert_allclose(np.linalg.norm(stacked, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(b.objective), float(a.objective), rtol=1e-5)


def _zero_groups(F, groups):
    return sum(int(np.all(F[k, groups == g] == 0)) for k in range(F.shape[0])
               for g in np.unique(groups))


def test_group_lasso_zeroes_more_groups_as_lambda_grows():
    # Unit columns pin the scale of F; without them the penalty only moves scale into W.
    views = _planted(noise=0.05)
    groups = np.arange(N) % 4
    zeros = []
    for lam in (1.0, 3.0, 10.0):
        config = solver.SolverConfig(method="hals", rank=RANK, weights=(1.0, 1.0),
                                     unit_columns=True, group_lam=lam, n_groups=4,
                                     max_iter=40, tol=1e-6)
        state = _solve(views, config, groups)
        assert np.isfinite(float(state.objective))
        zeros.append(_zero_groups(np.asarray(state.F), groups))
    assert zeros[0] < zeros[1] < zeros[2]


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_group_lasso_objective_never_increases(method):
    groups = np.arange(N) % 4
    config = solver.SolverConfig(method=method, rank=RANK, weights=(1.0, 2.0), l1_F=0.1,
                                 group_lam=3.0, n_groups=4, max_iter=40, tol=0.0)
    state = _solve(_planted(noise=0.05), config, groups)
    history = np.asarray(state.objective_history)[: int(state.iteration)]
    assert np.all(np.isfinite(history)) and len(history) > 5
    assert np.all(np.diff(history) <= 1e-5 * history[:-1])


def test_group_lambda_zero_equals_plain_solver():
    views = _planted(noise=0.05)
    groups = np.arange(N) % 4
    plain = solver.SolverConfig(method="mu", rank=RANK, weights=(1.0, 1.0), max_iter=20)
    grouped = plain._replace(group_lam=0.0, n_groups=4)
    a = _solve(views, plain)
    b = _solve(views, grouped, groups)
    # Two programs (the grouped one has the FISTA branch compiled in): equal to rounding.
    np.testing.assert_allclose(np.asarray(a.F), np.asarray(b.F), rtol=1e-5, atol=1e-6)


def test_group_prox_is_nonnegative_group_soft_threshold():
    config = solver.SolverConfig(group_lam=1.0, n_groups=2)
    V = jnp.array([[3.0, 4.0, -1.0, 0.5], [-2.0, 0.1, 0.2, 0.0]])
    groups = jnp.array([0, 0, 1, 1])
    out = np.asarray(solver._prox_group(V, 0.5, groups, config))
    # Row 0, group 0: z = (3, 4), ||z|| = 5, scale 1 - 0.5 / 5 = 0.9.
    np.testing.assert_allclose(out[0, :2], [2.7, 3.6], rtol=1e-6)
    # Row 0, group 1: z = (0, 0.5) has norm 0.5 <= 0.5, so it vanishes.
    np.testing.assert_array_equal(out[0, 2:], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)


def test_init_step_run_inside_user_jit_and_vmap():
    views = tuple(jnp.asarray(X, jnp.float32) for X in _planted(noise=0.05))
    config = solver.SolverConfig(method="mu", rank=RANK, weights=(1.0, 1.0), max_iter=15,
                                 tol=0.0)
    starts = [_start(seed) for seed in (1, 2, 3)]

    @jax.jit
    def user_code(v, F0, loadings0):
        state = solver.init_state(v, F0, loadings0, config)
        state = solver.step(state, v, config)
        return solver.run(state, v, config)

    singles = [user_code(views, F0, loadings0) for F0, loadings0 in starts]
    F0s = jnp.stack([F0 for F0, _ in starts])
    loadings0s = tuple(jnp.stack([L[v] for _, L in starts]) for v in range(len(ROWS)))
    batched = jax.jit(jax.vmap(user_code, in_axes=(None, 0, 0)))(views, F0s, loadings0s)
    for i, single in enumerate(singles):
        assert int(single.iteration) == 15
        np.testing.assert_allclose(np.asarray(batched.F[i]), np.asarray(single.F), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(batched.objective_history[i]),
                                   np.asarray(single.objective_history), rtol=1e-5)


def test_run_stops_on_tolerance_and_pads_history():
    config = solver.SolverConfig(method="hals", rank=RANK, weights=(1.0, 1.0), max_iter=500,
                                 tol=1e-3)
    state = _solve(_planted(noise=0.05), config)
    n = int(state.iteration)
    assert bool(state.converged) and 1 < n < 500
    history = np.asarray(state.objective_history)
    assert np.all(np.isfinite(history[:n])) and np.all(np.isnan(history[n:]))
    assert float(state.violation) <= 1e-3 * float(state.violation_init)


def test_bfloat16_storage_accumulates_in_float32():
    views = _planted(noise=0.05)
    config = solver.SolverConfig(method="hals", rank=RANK, weights=(1.0, 1.0), max_iter=30,
                                 tol=0.0)
    F0, loadings0 = _start()
    low = tuple(jnp.asarray(X, jnp.bfloat16) for X in views)
    state = jax.jit(lambda v: solver.run(solver.init_state(v, F0, loadings0, config), v,
                                         config))(low)
    reference = _solve(views, config)
    assert state.F.dtype == jnp.float32
    rel = np.asarray(state.rel_error_history)[:, -1]
    rel_ref = np.asarray(reference.rel_error_history)[:, -1]
    np.testing.assert_allclose(rel, rel_ref, atol=0.02)


def test_solve_F_recovers_embedding_with_fixed_loadings():
    rng = np.random.default_rng(3)
    F = rng.random((RANK, N))
    loadings = tuple(rng.random((rows, RANK)) for rows in ROWS)
    views = tuple(jnp.asarray(W @ F, jnp.float32) for W in loadings)
    for method in ("mu", "hals"):
        config = solver.SolverConfig(method=method, rank=RANK, weights=(1.0, 1.0),
                                     max_iter=500, tol=1e-9)
        F_hat, _, _ = jax.jit(solver.solve_F, static_argnames="config")(
            views, loadings, config=config)
        np.testing.assert_allclose(np.asarray(F_hat), F, rtol=2e-2, atol=2e-2)


# ------------------------------------------------- unit columns under F penalties (issue 10)


def _numpy_group_objective(F, B, G, groups, lam, l1):
    """F sub-problem objective (less the constant ||X||_w^2) in float64."""
    norms = [np.sqrt(np.sum(F[:, groups == g] ** 2, axis=1)) for g in np.unique(groups)]
    return (np.sum(F * (G @ F)) - 2 * np.sum(B * F) + l1 * F.sum() + lam * np.sum(norms))


def _numpy_prox_gradient(B, G, groups, lam, l1, n_iter=20000):
    """Plain proximal gradient (ISTA) on the F sub-problem, from zero, in float64."""
    step = 1.0 / (2 * np.linalg.eigvalsh(G)[-1])
    F = np.zeros_like(B)
    for _ in range(n_iter):
        V = np.maximum(F - step * (2 * (G @ F - B) + l1), 0.0)
        for g in np.unique(groups):
            block = V[:, groups == g]
            norm = np.sqrt(np.sum(block ** 2, axis=1, keepdims=True))
            V[:, groups == g] = block * np.maximum(1 - step * lam / np.maximum(norm, 1e-300), 0)
        F = V
    return F


@pytest.mark.parametrize("method", ["hals", "mu"])
def test_group_lasso_with_unit_columns_ends_stationary_and_decreases(method):
    views = _planted(noise=0.05)
    groups = np.arange(N) % 4
    weights = (1.0, 2.0)
    # float64, so that monotonicity is tested far below float32 rounding of the objective.
    config = solver.SolverConfig(method=method, rank=RANK, weights=weights, unit_columns=True,
                                 group_lam=2.0, l1_F=0.1, n_groups=4, max_iter=400, tol=0.0,
                                 dtype="float64")
    with jax.enable_x64(True):
        state = _solve(views, config, groups)
        history = np.asarray(state.objective_history)[: int(state.iteration)]
        state = jax.device_get(state)
    # The stated objective (fit + penalties on the unit-column scale) never rises.
    assert np.all(np.diff(history) <= 1e-10 * history[:-1])
    loadings = [np.asarray(W, np.float64) for W in state.loadings]
    np.testing.assert_allclose(np.linalg.norm(np.concatenate(loadings), axis=0), 1.0,
                               rtol=1e-5)
    F = np.asarray(state.F, np.float64)
    B = sum(w * W.T @ X for w, W, X in zip(weights, loadings, views))
    G = sum(w * W.T @ W for w, W in zip(weights, loadings))
    F_ref = _numpy_prox_gradient(B, G, groups, 2.0, 0.1)
    constant = sum(w * np.sum(X ** 2) for w, X in zip(weights, views))
    ours = constant + _numpy_group_objective(F, B, G, groups, 2.0, 0.1)
    best = constant + _numpy_group_objective(F_ref, B, G, groups, 2.0, 0.1)
    assert ours - best < 1e-3 * best


def test_ball_projection_is_the_weighted_projection():
    rng = np.random.default_rng(0)
    z = [rng.random(5) * 3, rng.random(4) * 2]
    d = [np.full(5, 0.5), np.full(4, 4.0)]
    out = solver._ball_project([jnp.asarray(a) for a in z], [jnp.asarray(a) for a in d])
    w = np.concatenate([np.asarray(a) for a in out])
    assert np.linalg.norm(w) == pytest.approx(1.0, rel=1e-5)
    # KKT of min sum d (w - z)^2 s.t. ||w|| <= 1: d (w - z) + mu w = 0 with one mu >= 0.
    mu = np.concatenate([dd * (zz - np.asarray(o)) / np.asarray(o) for zz, dd, o in
                         zip(z, d, out)])
    np.testing.assert_allclose(mu, mu[0], rtol=1e-4)
    assert mu[0] > 0


# ------------------------------------------------------------------ stopping (issue 10)


def test_rounding_cannot_fake_the_kkt_stop():
    config = solver.SolverConfig(method="hals", rank=RANK, weights=(1.0, 1.0))
    # An exact planted problem in float32: the objective stalls at rounding level long
    # before the KKT violation reaches 1e-12 of its start, so the run must not stop.
    exact = config._replace(tol=1e-12, max_iter=150)
    state = _solve(_planted(noise=0.0), exact)
    assert int(state.iteration) == 150 and not bool(state.converged)


def test_residual_objective_is_exact_on_a_near_exact_fit():
    rng = np.random.default_rng(4)
    F = rng.random((RANK, N))
    loadings = tuple(rng.random((rows, RANK)) for rows in ROWS)
    views = tuple(W @ F + 1e-5 * rng.random((W.shape[0], N)) for W in loadings)
    config = solver.SolverConfig(rank=RANK, weights=(1.0, 1.0))
    v32 = tuple(jnp.asarray(X, jnp.float32) for X in views)
    _, rel = solver.residual_objective(v32, F, loadings, config)
    F32, L32 = np.float32(F).astype(np.float64), [np.float32(W).astype(np.float64)
                                                  for W in loadings]
    X32 = [np.float32(X).astype(np.float64) for X in views]
    expected = [np.linalg.norm(X - W @ F32) / np.linalg.norm(X) for X, W in zip(X32, L32)]
    np.testing.assert_allclose(np.asarray(rel), expected, rtol=1e-3)


# --------------------------------------------------------------- NNLS transform (issue 10)


def test_nnls_F_matches_scipy_on_ill_conditioned_loadings():
    from scipy.optimize import nnls

    rng = np.random.default_rng(0)
    rank, n = 6, 120
    loadings = [rng.random((40, rank)), rng.random((30, rank))]
    for W in loadings:
        # Two nearly collinear concepts: condition number in the hundreds.
        W[:, 1] = 0.99 * W[:, 0] + 0.012 * rng.random(W.shape[0])
    stacked = np.concatenate(loadings)
    assert 300 < np.linalg.cond(stacked) < 1000
    F = rng.random((rank, n)) * (rng.random((rank, n)) < 0.3)
    views = [np.maximum(W @ F + 0.05 * rng.random((W.shape[0], n)) - 0.04, 0)
             for W in loadings]
    x = np.concatenate(views)
    reference = np.stack([nnls(stacked, x[:, j])[0] for j in range(n)], axis=1)
    assert np.mean(reference == 0) > 0.4
    config = solver.SolverConfig(rank=rank, weights=(1.0, 1.0))
    ours = np.asarray(jax.jit(solver.nnls_F, static_argnames="config")(
        tuple(jnp.asarray(X, jnp.float32) for X in views),
        tuple(jnp.asarray(W, jnp.float32) for W in loadings), config=config))
    assert np.linalg.norm(ours - reference) < 1e-3 * np.linalg.norm(reference)


# ------------------------------------------- zero padding of a sharded fit (issues 10 + 12)

PAD = 5


def _padded(arrays):
    """Arrays with ``PAD`` zero columns appended, as a sharded fit pads ``N``."""
    return tuple(np.pad(np.asarray(A), ((0, 0), (0, PAD))) for A in arrays)


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_masked_zero_padding_changes_nothing_under_the_kkt_stop(method):
    # HALS floors F at eps, FISTA moves every entry: only the mask keeps the padding at 0,
    # and then every sum over images, so the KKT violation and its stop, is unchanged.
    views = _planted(noise=0.05)
    F0, loadings0 = _start()
    groups = np.arange(N) % 3
    config = solver.SolverConfig(method=method, rank=RANK, weights=(0.7, 2.0), l1_F=0.01,
                                 group_lam=0.02, n_groups=3, unit_columns=True,
                                 max_iter=300, tol=1e-3, dtype="float64")
    mask = np.r_[np.ones(N), np.zeros(PAD)]
    run = jax.jit(lambda v, F, g, m: solver.run(
        solver.init_state(v, F, loadings0, config, g, column_mask=m), v, config))
    with jax.enable_x64(True):
        plain = run(views, F0, groups, None)
        padded = run(_padded(views), _padded([F0])[0], np.r_[groups, np.zeros(PAD, int)],
                     mask)
        assert bool(plain.converged) and int(plain.iteration) < 300
        assert int(padded.iteration) == int(plain.iteration)
        assert np.all(np.asarray(padded.F)[:, N:] == 0.0)
        np.testing.assert_allclose(np.asarray(padded.F)[:, :N], plain.F, rtol=1e-9,
                                   atol=1e-12)
        for name in ("violation", "violation_init", "objective"):
            np.testing.assert_allclose(getattr(padded, name), getattr(plain, name),
                                       rtol=1e-9)


def test_solve_F_with_a_column_mask_solves_the_unpadded_problem():
    rng = np.random.default_rng(5)
    loadings = tuple(rng.random((rows, RANK)) for rows in ROWS)
    views = tuple(W @ rng.random((RANK, N)) + 0.05 * rng.random((W.shape[0], N))
                  for W in loadings)
    config = solver.SolverConfig(method="hals", rank=RANK, weights=(1.0, 0.5), l1_F=0.02,
                                 max_iter=400, tol=1e-4, dtype="float64")
    solve = jax.jit(solver.solve_F, static_argnames="config")
    with jax.enable_x64(True):
        F, n_iter, ok = solve(views, loadings, config=config)
        F_pad, n_pad, ok_pad = solve(_padded(views), loadings, config=config,
                                     column_mask=np.r_[np.ones(N), np.zeros(PAD)])
    assert bool(ok) and bool(ok_pad) and int(n_pad) == int(n_iter)
    assert np.all(np.asarray(F_pad)[:, N:] == 0.0)
    np.testing.assert_allclose(np.asarray(F_pad)[:, :N], F, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("l1_F", [0.0, 0.05])
def test_nnls_F_needs_no_mask_zero_columns_give_zero(l1_F):
    # Why the sharded transform passes no column mask to nnls_F.
    rng = np.random.default_rng(6)
    loadings = tuple(jnp.asarray(rng.random((rows, RANK)), jnp.float32) for rows in ROWS)
    views = tuple(jnp.asarray(np.asarray(W) @ rng.random((RANK, N)), jnp.float32)
                  for W in loadings)
    config = solver.SolverConfig(rank=RANK, weights=(1.0, 1.0), l1_F=l1_F)
    nnls = jax.jit(solver.nnls_F, static_argnames="config")
    F = np.asarray(nnls(views, loadings, config=config))
    F_pad = np.asarray(nnls(_padded(views), loadings, config=config))
    assert np.all(F_pad[:, N:] == 0.0)
    np.testing.assert_allclose(F_pad[:, :N], F, rtol=1e-6, atol=1e-7)


def test_residual_objective_in_row_blocks_matches_numpy(monkeypatch):
    # 20 and 12 rows in blocks of 8: full blocks, and a last block shifted back to fit.
    monkeypatch.setattr(solver, "_RESIDUAL_ROWS", 8)
    rng = np.random.default_rng(7)
    views = _planted(noise=0.1)
    F = rng.random((RANK, N))
    loadings = tuple(rng.random((rows, RANK)) for rows in ROWS)
    config = solver.SolverConfig(rank=RANK, weights=(0.5, 2.0), dtype="float64")
    with jax.enable_x64(True):
        value, rel = solver.residual_objective(views, F, loadings, config)
    fits = [np.sum((X - W @ F) ** 2) for X, W in zip(views, loadings)]
    np.testing.assert_allclose(value, 0.5 * fits[0] + 2.0 * fits[1], rtol=1e-12)
    np.testing.assert_allclose(rel, [np.sqrt(f) / np.linalg.norm(X)
                                     for f, X in zip(fits, views)], rtol=1e-12)


def test_lawson_hanson_keeps_its_iterate_when_the_entering_coefficient_is_zero():
    # A transform column whose second entering coefficient rounds to exactly -0.0 (float32
    # bits from a fit): the inner step's ratio was then 0 / 0, and the NaN zeroed the
    # column instead of keeping the optimum found before the entry.
    from scipy.optimize import nnls

    from jaxcnmf.solver import core

    R = np.array([[3236757166, 3232336310, 3231478378], [0, 1083451167, 1064229858],
                  [0, 0, 3227889554]], np.uint32).view(np.float32)
    c = np.array([3205279008, 1037486041, 3201206341], np.uint32).view(np.float32)
    f = np.asarray(core._lawson_hanson(jnp.asarray(R), jnp.asarray(c), 9))
    reference = nnls(R.astype(np.float64), c.astype(np.float64))[0]
    np.testing.assert_allclose(f, reference, atol=1e-6)
    assert f[2] > 0.1
