"""Streaming fit from a store: the same iterates as the in-memory fit, and its errors."""

import doctest
import warnings

import ml_dtypes
import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.solver import store, streaming
from jaxcnmf.solver.fit import ConvergenceWarning, DeadConceptWarning
from jaxcnmf.solver.store import StoreError

RANK = 3
N = 203
BLOCK = 50  # four full blocks and one of 3 columns, padded on the device
ITERS = 25


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    F = rng.random((RANK, N)) * (rng.random((RANK, N)) < 0.6)
    views = {"red": rng.random((30, RANK)) @ F, "conv": rng.random((20, RANK)) @ F}
    return {k: (X + 0.05 * rng.random(X.shape)).astype(np.float32) for k, X in views.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    views = _planted()
    s = store.save(tmp_path_factory.mktemp("s") / "acts", views, block_size=BLOCK)
    rng = np.random.default_rng(1)
    init = {"F": rng.random((RANK, N)) + 0.1,
            "loadings": {k: rng.random((X.shape[0], RANK)) + 0.1 for k, X in views.items()}}
    return views, s, init


def _both(views, s, **kwargs):
    options = {"rank": RANK, "max_iter": ITERS, "tol": 0.0, "progress": False}
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return jaxcnmf.fit(views, **options), jaxcnmf.fit(s, **options)


def _assert_same_iterates(memory, streamed, rtol=1e-5):
    assert streamed.n_iter == memory.n_iter
    assert streamed.view_names == memory.view_names
    scale = np.abs(memory.F).max()
    np.testing.assert_allclose(streamed.F, memory.F, rtol=rtol, atol=rtol * scale)
    for name in memory.view_names:
        W = memory.loadings[name]
        np.testing.assert_allclose(streamed.loadings[name], W, rtol=rtol,
                                   atol=rtol * np.abs(W).max(), err_msg=name)
    # The history is assembled from Grams, a difference of terms of size ||X||^2: in
    # float32 both fits resolve it to about 1e-7 of the weighted data norm (core's
    # SolverState docs), so compare on that scale; the final value is from the residuals.
    data = memory.config["weighted_data_sq_norm"]
    assert streamed.config["weighted_data_sq_norm"] == pytest.approx(data, rel=1e-6)
    np.testing.assert_allclose(streamed.history["objective"][:-1],
                               memory.history["objective"][:-1], rtol=0,
                               atol=max(1e-6, rtol / 10) * data)
    assert streamed.objective == pytest.approx(memory.objective, rel=rtol)
    assert streamed.history["objective"][-1] == streamed.objective
    for name in memory.view_names:
        assert streamed.relative_errors[name] == pytest.approx(memory.relative_errors[name],
                                                               rel=rtol)


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_streaming_equals_in_memory_from_the_same_start(method, data):
    views, s, init = data
    memory, streamed = _both(views, s, method=method, init=init)
    _assert_same_iterates(memory, streamed)
    assert streamed.config["store"] == str(s.path) and streamed.config["block_size"] == BLOCK
    # It is a real fit: the objective went down and the planted factors are explained.
    assert streamed.history["objective"][-1] < 0.1 * streamed.history["objective"][0]


@pytest.mark.parametrize("init", ["random", "nndsvda"])
def test_streamed_initialisations_equal_in_memory(init, data):
    views, s, _ = data
    memory, streamed = _both(views, s, method="hals", init=init, seed=3)
    _assert_same_iterates(memory, streamed)


def test_unit_columns_and_penalties(data):
    views, s, init = data
    memory, streamed = _both(views, s, method="mu", init=init, unit_columns=True, l1_F=0.1,
                             l2_F=0.05, l2_W=0.1, weights={"conv": 2.0})
    _assert_same_iterates(memory, streamed)


def test_bfloat16_store_equals_bfloat16_storage_in_memory(tmp_path, data):
    views, _, init = data
    s = store.save(tmp_path / "bf16", views, block_size=BLOCK, dtype="bfloat16")
    rounded = {k: X.astype(ml_dtypes.bfloat16).astype(np.float32) for k, X in views.items()}
    # The products round F to bfloat16 (core._dot_nt), so a float32 difference in the
    # last bit, from summing over blocks, can flip a rounding and grow over iterations:
    # two iterations agree closely, later ones only to bfloat16 precision.
    memory, streamed = _both(rounded, s, method="hals", init=init, storage_dtype="bfloat16",
                             max_iter=2)
    assert streamed.config["storage_dtype"] == "bfloat16"
    _assert_same_iterates(memory, streamed, rtol=1e-4)


def test_negative_values_raise_or_are_clipped_like_in_memory(tmp_path, data):
    views, _, init = data
    shifted = {"red": views["red"] - 0.02, "conv": views["conv"]}
    s = store.save(tmp_path / "neg", shifted, block_size=BLOCK)
    with pytest.raises(ValueError, match=r"view 'red' has negative entries \(minimum "
                                         r"-0\.0\d+\); expected non-negative data"):
        jaxcnmf.fit(s, rank=RANK, init=init, progress=False)
    memory, streamed = _both(shifted, s, method="mu", init=init, negative="clip",
                             max_iter=5)
    _assert_same_iterates(memory, streamed)


def test_converges_and_stops_like_in_memory(data):
    views, s, init = data
    memory, streamed = _both(views, s, method="hals", init=init, tol=1e-3, max_iter=200)
    assert memory.converged and streamed.converged
    # The KKT test (violation at most tol times its first value) stops both at the same
    # pass up to rounding of the violation near the tolerance.
    assert abs(streamed.n_iter - memory.n_iter) <= 1 and streamed.n_iter < 200
    if streamed.n_iter == memory.n_iter:
        # Tens of HALS iterations by two programs (block sums against whole-matrix
        # products) amplify rounding differences: equal to 1e-2 here, while a few
        # iterations agree to 1e-5 (the tests above).
        _assert_same_iterates(memory, streamed, rtol=1e-2)


def test_docstring_examples_run():
    assert doctest.testmod(streaming, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_errors(tmp_path, data):
    views, s, init = data
    with pytest.raises(ValueError, match=r"group_lam: the streaming fit .* expected 0, "
                                         r"got 0\.5"):
        jaxcnmf.fit(s, rank=RANK, groups=np.zeros(N, int), group_lam=0.5, progress=False)
    with pytest.raises(ValueError, match=r"restarts: the streaming fit .* expected 1, got 2"):
        jaxcnmf.fit(s, rank=RANK, restarts=2, progress=False)
    with pytest.raises(ValueError, match=r"rank: expected at most min\(N, total rows\) = 50"):
        jaxcnmf.fit(s, rank=51, progress=False)
    with pytest.raises(TypeError, match="expected a jaxcnmf.store.Store, got dict"):
        streaming.fit(views, rank=RANK)
    # A block damaged after opening is reported from the reading thread, block named.
    damaged = store.save(tmp_path / "bad", views, block_size=BLOCK)
    file = tmp_path / "bad" / "blocks" / "000003-00.npy"
    data = bytearray(file.read_bytes())
    data[-2] ^= 0x10
    file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"block 3 of view 'red' .*SHA-256 differs"):
        jaxcnmf.fit(damaged, rank=RANK, init=init, progress=False)


def test_dead_concept_and_max_iter_warn_at_the_caller(data):
    _, s, init = data
    # MU keeps an exact zero: a concept started at zero stays dead.
    dead = {"F": init["F"] * np.array([[1.0], [1.0], [0.0]]), "loadings": init["loadings"]}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        streamed = jaxcnmf.fit(s, rank=RANK, method="mu", init=dead, max_iter=3,
                               progress=False)
    messages = {w.category: str(w.message) for w in got}
    assert "1 of 3 concepts are zero at the end (concepts [2])" in messages[DeadConceptWarning]
    assert "max_iter=3 before the KKT violation fell to tol=0.0001" in \
        messages[ConvergenceWarning]
    assert all(w.filename == __file__ for w in got)
    assert not streamed.converged and streamed.n_iter == 3
    assert np.all(streamed.F[2] == 0)
