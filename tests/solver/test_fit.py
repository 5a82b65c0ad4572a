"""Public fit: planted recovery, restarts, transform, save/load, and every bad input."""

import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import jaxcnmf
from jaxcnmf.solver.fit import ConvergenceWarning

RANK = 3
N = 80


def _planted(seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    F = rng.random((RANK, N)) * (rng.random((RANK, N)) < 0.5)
    # Disjoint supports in one view make the factors identifiable.
    W_red = rng.random((30, RANK)) * (rng.random((30, RANK)) < 0.5)
    W_red[:RANK] = np.eye(RANK)
    W_conv = rng.random((20, RANK))
    views = {"red": W_red @ F, "conv": W_conv @ F}
    views = {k: (X + noise * X.mean() * rng.random(X.shape)).astype(np.float32)
             for k, X in views.items()}
    return views, F


def _matched_cosine(A, B):
    def unit(M):
        return M / np.maximum(np.linalg.norm(M, axis=1, keepdims=True), 1e-12)

    cos = unit(A) @ unit(B).T
    rows, cols = linear_sum_assignment(-cos)
    return cos[rows, cols].min()


def _fit(views, **kwargs):
    options = dict(rank=RANK, max_iter=400, tol=1e-7, progress=False)
    options.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return jaxcnmf.fit(views, **options)


@pytest.fixture(scope="module")
def hals_fit():
    views, F = _planted()
    return views, F, _fit(views, method="hals")


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_planted_factors_are_recovered(method, hals_fit):
    views, F = _planted()
    res = hals_fit[2] if method == "hals" else _fit(views, method=method, max_iter=1500,
                                                    tol=1e-9)
    assert _matched_cosine(res.F, F) >= 0.99
    assert max(res.relative_errors.values()) < 0.02


def test_planted_factors_are_recovered_under_noise():
    views, F = _planted(seed=1, noise=0.05)
    res = _fit(views, method="hals")
    assert _matched_cosine(res.F, F) >= 0.9
    assert max(res.relative_errors.values()) < 0.1


def test_result_fields_and_history(hals_fit):
    views, _, res = hals_fit
    assert res.view_names == ("red", "conv")
    assert res.F.shape == (RANK, N) and res.F.dtype == np.float32
    assert res.loadings["red"].shape == (30, RANK) and res.loadings["conv"].shape == (20, RANK)
    assert res.history["objective"].shape == (res.n_iter,)
    assert res.history["rel_error"]["conv"].shape == (res.n_iter,)
    assert res.relative_errors["red"] == pytest.approx(res.history["rel_error"]["red"][-1])
    direct = np.linalg.norm(views["red"] - res.reconstruct("red")) / np.linalg.norm(views["red"])
    assert res.relative_errors["red"] == pytest.approx(direct, abs=1e-3)
    assert res.config["method"] == "hals" and res.config["weights"] == {"red": 1.0, "conv": 1.0}
    assert "rel. error" in res.summary()


def test_same_seed_gives_the_same_result():
    views, _ = _planted(noise=0.05)
    a = _fit(views, init="random", seed=7, max_iter=30)
    b = _fit(views, init="random", seed=7, max_iter=30)
    np.testing.assert_array_equal(a.F, b.F)


def test_vmapped_restarts_equal_seeds_run_one_by_one():
    views, _ = _planted(noise=0.05)
    res = _fit(views, method="mu", init="random", seed=5, restarts=3, max_iter=30)
    assert len(res.restarts) == 3 and 0 < res.stability <= 1 + 1e-6
    for i, restart in enumerate(res.restarts):
        single = _fit(views, method="mu", init="random", seed=5 + i, max_iter=30)
        np.testing.assert_allclose(restart.F, single.F, rtol=1e-4, atol=1e-6)
        assert restart.n_iter == single.n_iter
    best = min(r.objective for r in res.restarts)
    assert res.objective == best


def test_transform_of_training_views_reproduces_F(hals_fit):
    views, _, res = hals_fit
    F_all = res.transform(views)
    F_conv = res.transform({"conv": views["conv"]})
    for F_new in (F_all, F_conv):
        cos = np.sum(F_new * res.F, axis=1) / (np.linalg.norm(F_new, axis=1)
                                              * np.linalg.norm(res.F, axis=1))
        # The fit's F is its last iterate (KKT tolerance 1e-4), transform's the exact NNLS
        # answer for the final loadings: close, not equal.
        assert np.all(cos > 0.97)
    with pytest.raises(ValueError, match=r"unknown view\(s\) \['blue'\]"):
        res.transform({"blue": views["conv"]})
    with pytest.raises(ValueError, match=r"tol: expected a finite number >= 0.0, got -1"):
        res.transform({"conv": views["conv"]}, tol=-1)
    with pytest.raises(ValueError, match="views: expected a non-empty dict .* got an empty dict"):
        res.transform({})


def test_save_load_round_trip(hals_fit, tmp_path):
    views, _, res = hals_fit
    path = res.save(tmp_path / "fit")
    assert path.endswith("fit.npz")
    back = jaxcnmf.load_result(path)
    np.testing.assert_array_equal(back.F, res.F)
    for name in res.view_names:
        np.testing.assert_array_equal(back.loadings[name], res.loadings[name])
        np.testing.assert_array_equal(back.history["rel_error"][name],
                                      res.history["rel_error"][name])
    np.testing.assert_array_equal(back.history["objective"], res.history["objective"])
    assert back.view_names == res.view_names and back.config == res.config
    assert (back.n_iter, back.converged, back.objective) == (res.n_iter, res.converged,
                                                              res.objective)
    np.testing.assert_allclose(back.transform({"conv": views["conv"]}),
                               res.transform({"conv": views["conv"]}))


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_zero_rows_columns_and_views_never_give_nan(method):
    views, _ = _planted(noise=0.05)
    views["red"][3] = 0.0
    views["red"][:, 5] = 0.0
    views["conv"][:, 5] = 0.0
    views["blank"] = np.zeros((7, N), np.float32)
    res = _fit(views, method=method, weights="balanced", unit_columns=True, max_iter=40)
    assert np.all(np.isfinite(res.F))
    assert all(np.all(np.isfinite(W)) for W in res.loadings.values())
    assert np.all(np.isfinite(res.history["objective"]))
    assert res.relative_errors["blank"] == 0.0
    assert res.config["weights"]["blank"] == 1.0
    expected = 1.0 / np.sum(views["conv"].astype(np.float64) ** 2)
    assert res.config["weights"]["conv"] == pytest.approx(expected)


def test_list_views_integer_data_and_negative_options():
    views, _ = _planted(noise=0.05)
    counts = np.round(views["red"] * 10).astype(np.int64)
    with pytest.warns(UserWarning, match="view 'view0': converting int64 entries to float32"):
        res = _fit([counts, views["conv"]], max_iter=20)
    assert res.view_names == ("view0", "view1")
    shifted = views["conv"] - 1.0
    clipped = _fit({"red": views["red"], "conv": shifted}, negative="clip", max_iter=20)
    assert clipped.config["negative"] == "clip"
    res_shift = _fit({"red": views["red"], "conv": shifted}, negative="shift", max_iter=20)
    reference = _fit({"red": views["red"], "conv": shifted - shifted.min()}, max_iter=20)
    np.testing.assert_allclose(res_shift.F, reference.F, rtol=1e-5)


def test_device_views_fit_like_host_views_without_a_host_copy():
    import jax
    import jax.numpy as jnp
    from jaxcnmf.solver import fit as factorization

    views, _ = _planted(noise=0.05)
    device = {k: jnp.asarray(v) for k, v in views.items()}
    # Implicit device-to-host copies (np.asarray) are refused; the summary numbers come
    # back through an explicit device_get.
    with jax.transfer_guard_device_to_host("disallow"):
        _, arrays = factorization._check_views(device, "raise")
        factorization._view_weights("balanced", ("red", "conv"), arrays)
    assert all(isinstance(X, jax.Array) for X in arrays)
    # Host and device inputs take different preprocessing paths: equal to rounding.
    close = dict(rtol=1e-5, atol=1e-6)
    for kwargs in ({}, {"weights": {"conv": 2.0}}):
        a, b = _fit(views, max_iter=30, **kwargs), _fit(device, max_iter=30, **kwargs)
        np.testing.assert_allclose(a.F, b.F, **close)
        for name in views:
            np.testing.assert_allclose(a.loadings[name], b.loadings[name], **close)
    shifted = {"red": views["red"], "conv": views["conv"] - 1.0}
    shifted_device = {k: jnp.asarray(v) for k, v in shifted.items()}
    for mode in ("clip", "shift"):
        a = _fit(shifted, negative=mode, max_iter=30)
        b = _fit(shifted_device, negative=mode, max_iter=30)
        np.testing.assert_allclose(a.F, b.F, **close)
    with pytest.raises(ValueError, match=r"view 'conv' has \d+ negative entries \(minimum -"):
        _fit(shifted_device)
    bad = device["red"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="view 'red' contains 1 NaN or Inf entries"):
        _fit({"red": bad})


def test_host_norms_are_exact_by_bands(monkeypatch):
    import jax

    from jaxcnmf.solver import fit as solver

    # Bands of 40 entries over 7 x 13 views: 3 rows a band, the last band one row.
    monkeypatch.setattr(solver, "_BAND", 40)
    rng = np.random.default_rng(3)
    for X in (rng.random((7, 13)).astype(np.float32),
              np.where(rng.random((7, 13)) < 0.5, 3e19, 1e-22).astype(np.float32),
              rng.random((7, 13)) * 1e-300, np.zeros((7, 13), np.float32)):
        top, scaled = solver._max_and_sq_norm(X)
        ref = np.asarray(X, np.float64)
        assert top == ref.max()
        expected = np.sum(np.square(ref / ref.max())) if ref.max() > 0 else 0.0
        assert scaled == pytest.approx(expected, rel=1e-12), X.dtype
        # The device path (one reduction in float32) agrees to float32 rounding.
        if X.dtype == np.float32:
            assert solver._max_and_sq_norm(jax.device_put(X))[1] == pytest.approx(
                expected, rel=1e-6, abs=1e-30)


def test_max_iter_warns_and_progress_prints_two_lines(capsys):
    views, _ = _planted(noise=0.05)
    with pytest.warns(ConvergenceWarning, match="stopped at max_iter=3"):
        res = jaxcnmf.fit(views, RANK, max_iter=3, progress=True)
    assert res.n_iter == 3 and not res.converged
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("jaxcnmf: fitting 2 views, N=80, rank 3, method mu")
    assert err[1].startswith("jaxcnmf: done in") and "3 iterations" in err[1]


def test_bfloat16_storage_fits_like_float32(hals_fit):
    views, _, res = hals_fit
    low = _fit(views, method="hals", storage_dtype="bfloat16")
    assert low.config["storage_dtype"] == "bfloat16"
    for name in views:
        assert low.relative_errors[name] < res.relative_errors[name] + 0.02


def _good():
    return _planted()[0]


def _bad_inputs():
    views = _good()
    yield ({"red": -views["red"], "conv": views["conv"]}, {},
           r"view 'red' has \d+ negative entries \(minimum -[\d.]+\); expected non-negative")
    nan = views["conv"].copy()
    nan[0, 0], nan[1, 1] = np.nan, np.inf
    yield {"red": views["red"], "conv": nan}, {}, "view 'conv' contains 2 NaN or Inf entries"
    yield ({"red": views["red"], "conv": views["conv"][:, :-1]}, {},
           r"views 'red' and 'conv' have different numbers of columns \(images\): 80 vs 79")
    yield ({"red": views["red"], "conv": np.zeros((0, N))}, {},
           r"view 'conv' is empty: expected at least one row and one column, got shape \(0, 80\)")
    yield {"red": views["red"][0]}, {}, r"view 'red': expected a 2-D array \(rows, N\)"
    yield {}, {}, "views: expected at least one view, got an empty dict"
    yield views, {"rank": 0}, "rank: expected an integer >= 1, got 0"
    yield views, {"rank": 81}, r"rank: expected at most min\(N, total rows\) = 50, got 81"
    yield views, {"method": "als"}, r"method: expected one of \['mu', 'hals'\], got 'als'"
    yield views, {"init": "svd"}, r"init: expected one of \['nndsvda', 'nndsvd', 'random'\]"
    yield views, {"weights": "equal"}, r"weights: expected one of \['balanced'\], got 'equal'"
    yield (views, {"weights": {"blue": 1.0}},
           r"weights: unknown view\(s\) \['blue'\], expected names among \['red', 'conv'\]")
    yield views, {"weights": {"red": -1.0}}, r"weights\['red'\]: expected a positive finite"
    yield (views, {"groups": np.zeros(N - 1, int), "group_lam": 1.0},
           r"groups: expected one id per image, shape \(80,\), got shape \(79,\)")
    yield (views, {"groups": np.full(N, -1), "group_lam": 1.0},
           "groups: expected non-negative group ids, got minimum -1")
    yield views, {"group_lam": 1.0}, "groups: expected an int array"
    yield views, {"negative": "abs"}, r"negative: expected one of \['raise', 'clip', 'shift'\]"
    yield views, {"l2_W": -0.1}, "l2_W: expected a finite number >= 0.0, got -0.1"
    yield views, {"restarts": 0}, "restarts: expected an integer >= 1, got 0"
    yield views, {"dtype": "float64"}, "dtype='float64' needs 64-bit JAX"
    yield views, {"dtype": "int8"}, r"dtype: expected one of \['float32', 'float64'\]"
    yield (views, {"init": {"F": np.ones((RANK, N))}},
           "init: expected a dict with keys 'F' and 'loadings'")


@pytest.mark.parametrize("views, kwargs, message", list(_bad_inputs()))
def test_bad_input_raises_a_message_naming_it(views, kwargs, message):
    options = {"rank": RANK, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxcnmf.fit(views, **options)


def test_non_numeric_view_is_a_type_error():
    with pytest.raises(TypeError, match="view 'red': expected real numbers, got dtype"):
        jaxcnmf.fit({"red": np.full((4, 5), "a")}, 1, progress=False)


# ------------------------------------------------------- group penalty on a usable scale


def _grouped():
    views, F = _planted(noise=0.05)
    return views, np.arange(N) % 4


def test_lambda_max_is_the_smallest_penalty_that_zeroes_every_group():
    views, groups = _grouped()
    rng = np.random.default_rng(0)
    loadings = {name: rng.random((X.shape[0], RANK)) for name, X in views.items()}
    lam = jaxcnmf.solver.fit.lambda_max(views, loadings, groups)
    # Prox-gradient from F = 0 with the loadings fixed (unit stacked columns).
    norms = np.sqrt(sum(np.sum(W ** 2, 0) for W in loadings.values()))
    B = sum((W / norms).T @ views[name].astype(np.float64) for name, W in loadings.items())
    for factor, stays_zero in ((1.001, True), (0.95, False)):
        V = np.maximum(2 * B, 0)  # minus the gradient at F = 0
        block = [np.linalg.norm(V[:, groups == g], axis=1) for g in range(4)]
        assert (np.max(block) <= factor * lam) == stays_zero


def test_group_fraction_of_one_zeroes_everything_and_says_so():
    views, groups = _grouped()
    with pytest.raises(ValueError, match=r"every one of the 3 concepts is zero at the end.*"
                                         r"use a smaller group_lam_fraction"):
        _fit(views, method="hals", unit_columns=True, groups=groups, group_lam_fraction=1.0,
             max_iter=50)
    with pytest.raises(ValueError, match=r"group_lam_fraction: expected a number in \(0, 1\]"):
        _fit(views, groups=groups, group_lam_fraction=1.5)
    with pytest.raises(ValueError, match="expected either group_lam or group_lam_fraction"):
        _fit(views, groups=groups, group_lam=1.0, group_lam_fraction=0.1)


def test_group_fraction_is_scale_free_and_recorded():
    views, groups = _grouped()
    a = _fit(views, method="hals", unit_columns=True, groups=groups, group_lam_fraction=0.1,
             max_iter=60)
    b = _fit({k: v * np.float32(1e6) for k, v in views.items()}, method="hals",
             unit_columns=True, groups=groups, group_lam_fraction=0.1, max_iter=60)
    assert a.config["group_lam"] == pytest.approx(0.1 * a.config["group_lam_max"])
    assert b.config["group_lam_max"] == pytest.approx(1e6 * a.config["group_lam_max"], rel=1e-3)
    # Same penalty relative to the data: the same fit up to rounding-driven drift of an
    # unconverged 60-step FISTA run (an absolute group_lam would zero everything at 1e6).
    np.testing.assert_allclose(b.F / 1e6, a.F, rtol=2e-2, atol=2e-3 * a.F.max())
    for name in views:
        assert b.relative_errors[name] == pytest.approx(a.relative_errors[name], rel=1e-2)


def test_group_path_reports_each_step_and_warns_about_dead_concepts():
    views, groups = _grouped()
    steps = jaxcnmf.solver.fit.group_path(views, RANK, groups, fractions=(0.01, 0.3, 0.9),
                                          method="hals", max_iter=60)
    assert [s.fraction for s in steps][:2] == [0.01, 0.3]
    lives = [s.live_concepts for s in steps]
    assert lives[0] == RANK and lives == sorted(lives, reverse=True)
    zeros = [s.zero_groups for s in steps]
    assert zeros == sorted(zeros) and zeros[-1] > zeros[0]
    assert all(set(s.relative_errors) == {"red", "conv"} for s in steps)
    lam_max = steps[0].result.config["group_lam_max"]
    for s in steps:
        assert s.group_lam == pytest.approx(s.fraction * lam_max)


def test_a_fit_with_dead_concepts_warns():
    views, _ = _planted(noise=0.05)
    rng = np.random.default_rng(0)
    F0 = rng.random((RANK, N)) + 0.1
    F0[2] = 0.0   # MU never moves an exact zero: concept 2 stays dead
    init = {"F": F0, "loadings": {k: rng.random((v.shape[0], RANK)) + 0.1
                                  for k, v in views.items()}}
    with pytest.warns(jaxcnmf.solver.fit.DeadConceptWarning,
                      match=r"1 of 3 concepts are zero at the end \(concepts \[2\]\)"):
        _fit(views, method="mu", init=init, max_iter=20)


def test_transform_defaults_to_exact_nnls(hals_fit):
    from scipy.optimize import nnls

    views, _, res = hals_fit
    F_new = res.transform({"conv": views["conv"][:, :20]})
    W = res.loadings["conv"].astype(np.float64)
    reference = np.stack([nnls(W, views["conv"][:, j].astype(np.float64))[0]
                          for j in range(20)], axis=1)
    assert np.linalg.norm(F_new - reference) < 1e-3 * np.linalg.norm(reference)
    iterative = res.transform({"conv": views["conv"][:, :20]}, method="fit")
    assert iterative.shape == F_new.shape


def test_transform_from_a_store_equals_in_memory(tmp_path, hals_fit):
    from jaxcnmf import store

    views, _, res = hals_fit
    # Shapes the other transform tests compile: all views in one block of N columns, and
    # "conv" alone in blocks of 20.
    whole = store.save(tmp_path / "whole", views)
    F_disk = res.transform(whole, progress=False)
    assert F_disk.shape == (RANK, N) and F_disk.dtype == np.float32
    np.testing.assert_allclose(F_disk, res.transform(views), rtol=1e-5, atol=1e-6)
    s = store.save(tmp_path / "s", views, block_size=20)
    F_conv = res.transform(s, use=["conv"], progress=False)
    np.testing.assert_allclose(F_conv, res.transform({"conv": views["conv"]}), rtol=1e-5,
                               atol=1e-6)
    # A last block of 10 columns is padded to 20 and cut: the same columns come back (up
    # to rounding: the data's largest entry, which scales the solve, differs).
    short = store.save(tmp_path / "short", {k: X[:, :70] for k, X in views.items()},
                       block_size=20)
    np.testing.assert_allclose(res.transform(short, use=["conv"], progress=False),
                               F_conv[:, :70], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method: expected 'nnls' for a store"):
        res.transform(s, method="fit")
    with pytest.raises(ValueError, match="use: expected None for in-memory views"):
        res.transform(views, use=["conv"])


def test_transform_from_a_store_that_does_not_match_names_the_view(tmp_path, hals_fit):
    from jaxcnmf import store

    views, _, res = hals_fit
    missing = store.save(tmp_path / "a", {"conv": views["conv"]})
    with pytest.raises(ValueError, match="view 'red': fitted, but not in the store"):
        res.transform(missing)
    wrong = store.save(tmp_path / "b", {"red": views["red"], "conv": views["conv"][:-2]})
    with pytest.raises(ValueError, match="view 'conv': expected 20 rows as when fitted, "
                                         "got 18 in the store"):
        res.transform(wrong)
    with pytest.raises(ValueError, match=r"use: unknown view\(s\) \['blue'\]"):
        res.transform(wrong, use=["blue"])
