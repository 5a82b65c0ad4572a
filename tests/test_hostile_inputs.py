"""Hostile and unlucky inputs (issue 11): each case once failed silently; keep them fixed.

Sections are owned by the parts of the library they exercise; add yours under a heading.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.solver import core
from jaxcnmf.solver.fit import ConvergenceWarning

# =============================================================================== solver

RANK = 3
N = 60


def _planted(seed=0):
    rng = np.random.default_rng(seed)
    F = rng.random((RANK, N)) * (rng.random((RANK, N)) < 0.6)
    return {"red": (rng.random((25, RANK)) @ F + 0.02 * rng.random((25, N))).astype(np.float32),
            "conv": (rng.random((15, RANK)) @ F + 0.02 * rng.random((15, N))).astype(np.float32)}


def _fit(views, **kwargs):
    options = {"rank": RANK, "max_iter": 60, "progress": False, "method": "hals", **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return jaxcnmf.fit(views, **options)


def _finite(res):
    assert np.all(np.isfinite(res.F)) and np.isfinite(res.objective)
    assert all(np.all(np.isfinite(W)) for W in res.loadings.values())
    assert all(np.isfinite(e) for e in res.relative_errors.values())


@pytest.fixture(scope="module")
def reference():
    return _fit(_planted())


def test_float32_entries_above_1e19_fit_or_are_refused_by_name():
    views = {k: v.copy() for k, v in _planted().items()}
    for X in views.values():
        X[0, 0] = 3e19   # its square overflows float32
    res = _fit(views)
    _finite(res)
    assert all(e < 1.0 for e in res.relative_errors.values())
    # One outlier 1e19 times the other view's scale: that view's squares would underflow
    # in the common rescaling, so it is refused by name rather than fitted as zero.
    views["conv"] = _planted()["conv"]
    with pytest.raises(ValueError, match=r"view 'conv': its largest entry .* times the "
                                         r"largest entry of view 'red' \(3e\+19\)"):
        _fit(views)


def test_float64_views_beyond_float32_range_fit_like_scaled_views(reference):
    views = {k: v.astype(np.float64) * 1e40 for k, v in _planted().items()}
    res = _fit(views)
    _finite(res)
    assert res.F.dtype == np.float64   # F carries the data's scale, beyond float32
    np.testing.assert_allclose(res.F / 1e40, reference.F, rtol=1e-3, atol=1e-4 * reference.F.max())
    for name in views:
        assert res.relative_errors[name] == pytest.approx(reference.relative_errors[name],
                                                          rel=1e-3)


def test_float16_storage_of_values_above_65504():
    views = {k: v * 1e6 for k, v in _planted().items()}
    res = _fit(views, storage_dtype="float16")
    _finite(res)
    assert max(res.relative_errors.values()) < 0.1


def test_balanced_weights_on_a_tiny_norm_view():
    views = _planted()
    views["tiny"] = views["conv"][:4] * np.float32(1e-12)
    res = _fit(views, weights="balanced")
    _finite(res)
    assert res.relative_errors["tiny"] < 0.5


def test_extreme_weights_are_finite_or_refused():
    res = _fit(_planted(), weights={"red": 1e20, "conv": 1e-6})
    _finite(res)
    with pytest.raises(ValueError, match=r"weights: the weighted views span a factor .* "
                                         r"expected at most 1e\+30 in float32"):
        _fit(_planted(), weights={"red": 1e35, "conv": 1e-6})


def test_view_too_small_to_share_a_float32_problem_is_named():
    views = _planted()
    views["dust"] = np.full((3, N), 1e-30, np.float32)
    with pytest.raises(ValueError, match=r"view 'dust': its largest entry 1e-30 is .* times "
                                         r"the largest entry of view"):
        _fit(views)


def test_a_nan_in_the_loop_stops_it_and_sets_failed():
    views = tuple(jnp.asarray(X) for X in _planted().values())
    # A weight whose products overflow float32: the first objective is inf.
    config = core.SolverConfig(method="mu", rank=RANK, weights=(3e38, 1.0), max_iter=50,
                               tol=0.0)
    rng = np.random.default_rng(0)
    F0 = rng.random((RANK, N)) + 1.0
    L0 = tuple(rng.random((X.shape[0], RANK)) + 1.0 for X in views)
    state = jax.jit(lambda v: core.run(core.init_state(v, F0, L0, config), v, config))(views)
    assert bool(state.failed) and int(state.iteration) <= 1


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_fit_does_not_depend_on_the_data_scale(method):
    views = _planted()
    base = _fit(views, method=method, max_iter=80)
    for c in (1e-22, 1e-8, 1e8):
        res = _fit({k: v * np.float32(c) for k, v in views.items()}, method=method,
                   max_iter=80)
        _finite(res)
        np.testing.assert_allclose(res.F / c, base.F, rtol=2e-3, atol=2e-4 * base.F.max())
        for name in views:
            assert res.relative_errors[name] == pytest.approx(base.relative_errors[name],
                                                              rel=1e-3, abs=1e-6)
        assert res.objective == pytest.approx(base.objective * c * c, rel=1e-3)


def test_mu_on_small_scale_data_does_not_collapse():
    res = _fit({k: v * np.float32(1e-8) for k, v in _planted().items()}, method="mu")
    assert res.F.max() > 0 and max(res.relative_errors.values()) < 0.2


def test_all_zero_starting_point_is_refused():
    views = _planted()
    zero_F = {"F": np.zeros((RANK, N)), "loadings": {k: np.ones((v.shape[0], RANK))
                                                     for k, v in views.items()}}
    with pytest.raises(ValueError, match=r"init\['F'\]: expected a non-zero starting point, "
                                         r"got all zeros"):
        _fit(views, init=zero_F)
    zero_W = {"F": np.ones((RANK, N)), "loadings": {k: np.zeros((v.shape[0], RANK))
                                                    for k, v in views.items()}}
    with pytest.raises(ValueError, match=r"init\['loadings'\]: expected a non-zero starting"):
        _fit(views, init=zero_W)


def test_zero_factorization_of_nonzero_data_is_never_converged():
    views = _planted()
    # MU cannot move exact zeros: a start with one live concept whose loadings are zero
    # in every view has nothing to grow from.
    init = {"F": np.ones((RANK, N)), "loadings": {k: np.zeros((v.shape[0], RANK))
                                                  for k, v in views.items()}}
    init["loadings"]["red"][0, 0] = 1e-30
    with pytest.raises(ValueError, match="every one of the 3 concepts is zero at the end"):
        _fit(views, init=init, method="mu")


def test_non_string_view_names_are_refused():
    views = _planted()
    with pytest.raises(TypeError, match=r"views: expected string view names, got 0 \(int\)"):
        _fit({0: views["red"], "conv": views["conv"]})


def _saved(reference, tmp_path):
    return reference.save(tmp_path / "fit")


def _tamper(path, **replace):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(replace)
    np.savez(path, **arrays)
    return path


def test_load_result_refuses_negative_loadings(reference, tmp_path):
    W = reference.loadings["red"].copy()
    W[0, 0] = -1.0
    path = _tamper(_saved(reference, tmp_path), loading_0=W)
    with pytest.raises(ValueError, match=r"field 'loading_0 \('red'\)': expected non-negative "
                                         r"entries, got minimum -1"):
        jaxcnmf.load_result(path)


def test_load_result_refuses_wrong_shapes_and_non_finite(reference, tmp_path):
    path = _tamper(_saved(reference, tmp_path), F=np.ones((9, N), np.float32))
    with pytest.raises(ValueError, match=r"field 'F': expected shape \(3, 60\), got \(9, 60\)"):
        jaxcnmf.load_result(path)
    path = _tamper(_saved(reference, tmp_path), loading_1=np.ones((15, 9), np.float32))
    with pytest.raises(ValueError, match=r"field 'loading_1 \('conv'\)': expected shape "
                                         r"\(15, 3\), got \(15, 9\)"):
        jaxcnmf.load_result(path)
    F = reference.F.copy()
    F[0, 0] = np.nan
    path = _tamper(_saved(reference, tmp_path), F=F)
    with pytest.raises(ValueError, match="field 'F': expected finite entries"):
        jaxcnmf.load_result(path)


def test_load_result_refuses_a_tampered_config(reference, tmp_path):
    import json

    path = _saved(reference, tmp_path)
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
    meta["config"]["method"] = "als"
    _tamper(path, meta=np.array(json.dumps(meta)))
    with pytest.raises(ValueError, match=r"field 'config.method': expected one of \['mu', "
                                         r"'hals'\], got 'als'"):
        jaxcnmf.load_result(path)
