"""Streaming fit with the group lasso: groups within blocks, against the in-memory fit."""

import warnings

import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.solver import store, streaming
from jaxcnmf.solver.fit import ConvergenceWarning

RANK = 3
N = 200
BLOCK = 50
GROUPS = np.repeat(np.arange(8), 25)  # sorted, two groups in every block of 50


@pytest.fixture(autouse=True, scope="module")
def one_block_per_step():
    """Every step reads one store block, as a store of large blocks is read."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming, "CHUNK_BYTES", 0)
        yield


def _planted(seed=0):
    """Group-sparse F: every group uses two of the three concepts."""
    rng = np.random.default_rng(seed)
    F = rng.random((RANK, N))
    for g in range(8):
        F[g % RANK, GROUPS == g] = 0.0
    views = {"red": rng.random((30, RANK)) @ F, "conv": rng.random((20, RANK)) @ F}
    return {k: (X + 0.05 * rng.random(X.shape)).astype(np.float32) for k, X in views.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    views = _planted()
    root = tmp_path_factory.mktemp("g")
    rng = np.random.default_rng(1)
    init = {"F": rng.random((RANK, N)) + 0.1,
            "loadings": {k: rng.random((X.shape[0], RANK)) + 0.1 for k, X in views.items()}}
    return (views, store.save(root / "blocks", views, block_size=BLOCK),
            store.save(root / "one", views, block_size=N), init)


def _fit(views, method, init):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return jaxcnmf.fit(views, rank=RANK, method=method, init=init, groups=GROUPS,
                           group_lam_fraction=0.2, unit_columns=True, max_iter=60, tol=1e-4,
                           progress=False)


@pytest.fixture(scope="module")
def in_memory(data):
    views, _, _, init = data
    return {method: _fit(views, method, init) for method in ("mu", "hals")}


def test_one_block_gives_the_in_memory_iterates_and_lambda_max(data, in_memory):
    # One block: the chunk's FISTA is the in-memory one, decisions and all.
    views, _, one, init = data
    memory, streamed = in_memory["hals"], _fit(one, "hals", init)
    assert streamed.config["group_lam_max"] == pytest.approx(memory.config["group_lam_max"],
                                                             rel=1e-5)
    assert streamed.config["group_lam"] == pytest.approx(memory.config["group_lam"], rel=1e-5)
    assert streamed.config["n_groups"] == memory.config["n_groups"] == 8
    assert streamed.n_iter == memory.n_iter < 60
    # Two compiled programs: float32 rounding of ~10 iterations (a different keep-the-best
    # decision of FISTA would move F by orders of magnitude more).
    np.testing.assert_allclose(streamed.F, memory.F, rtol=1e-4, atol=1e-5 * memory.F.max())
    for name in views:
        W = memory.loadings[name]
        np.testing.assert_allclose(streamed.loadings[name], W, rtol=1e-4,
                                   atol=1e-5 * W.max())
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-5)
    np.testing.assert_allclose(streamed.history["objective"], memory.history["objective"],
                               rtol=1e-5)


def _numpy_prox_gradient(B, G, groups, lam, n_iter=20000):
    """Plain proximal gradient (ISTA) on the F sub-problem, from zero, in float64."""
    step = 1.0 / (2 * np.linalg.eigvalsh(G)[-1])
    member = (groups[:, None] == np.unique(groups)[None]).astype(np.float64)  # (N, groups)
    F = np.zeros_like(B)
    for _ in range(n_iter):
        V = np.maximum(F - step * 2 * (G @ F - B), 0.0)
        norms = np.sqrt((V * V) @ member)  # (rank, groups)
        F = V * (np.maximum(1 - step * lam / np.maximum(norms, 1e-300), 0) @ member.T)
    return F


def _sub_objective(F, B, G, groups, lam):
    norms = [np.linalg.norm(F[:, groups == g], axis=1) for g in np.unique(groups)]
    return np.sum(F * (G @ F)) - 2 * np.sum(B * F) + lam * np.sum(norms)


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_blocks_are_monotone_stationary_and_match_the_in_memory_objective(method, data,
                                                                          in_memory):
    # Per-block FISTA keeps the best iterate of each block, not of all columns: not the
    # in-memory iterates, but a monotone descent to a stationary point of the same problem.
    views, s, _, init = data
    memory, streamed = in_memory[method], _fit(s, method, init)
    lam = streamed.config["group_lam"]
    # lambda_max from the streamed pass (the same unit-column start as in memory).
    assert lam == pytest.approx(memory.config["group_lam"], rel=1e-5)
    history = streamed.history["objective"]
    assert np.all(np.diff(history[:-1]) <= 1e-6 * history[0])
    assert streamed.objective == pytest.approx(memory.objective, rel=1e-3)
    # Some (concept, group) blocks are exactly zero, as in memory.
    norms = np.stack([np.linalg.norm(streamed.F[:, GROUPS == g], axis=1) for g in range(8)])
    assert np.sum(norms == 0) >= 4
    # The final F solves the F sub-problem at the final loadings (to 0.1% of its value).
    loadings = [streamed.loadings[k].astype(np.float64) for k in views]
    X = [views[k].astype(np.float64) for k in views]
    B = sum(W.T @ V for W, V in zip(loadings, X))
    G = sum(W.T @ W for W in loadings)
    F = streamed.F.astype(np.float64)
    reference = _numpy_prox_gradient(B, G, GROUPS, lam)
    constant = sum(np.sum(V ** 2) for V in X)
    ours = constant + _sub_objective(F, B, G, GROUPS, lam)
    best = constant + _sub_objective(reference, B, G, GROUPS, lam)
    assert ours - best < 1e-3 * best


def test_a_group_across_blocks_is_refused_with_the_fix(data):
    _, s, _, _ = data
    groups = np.repeat(np.arange(5), 40) + 10  # group 11 spans columns 40-79
    with pytest.raises(ValueError, match=(
            r"^groups: group 11 has images in block \[0, 50\) \(column 40\) and block "
            r"\[50, 100\) \(column 50\); the streamed group lasso needs every group's images "
            r"within one block of the store: write the store sorted by group with block "
            r"boundaries on group boundaries \(store.save\(..., block_size=...\)\), or fit "
            r"in memory$")):
        jaxcnmf.fit(s, rank=RANK, groups=groups, group_lam_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="expected either group_lam or group_lam_fraction"):
        jaxcnmf.fit(s, rank=RANK, groups=GROUPS, group_lam=1.0, group_lam_fraction=0.1)
    with pytest.raises(ValueError, match="groups: expected an int array"):
        jaxcnmf.fit(s, rank=RANK, group_lam=1.0)
