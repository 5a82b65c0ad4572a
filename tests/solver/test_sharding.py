"""Sharded fit: 4 forced host devices against 1, two real processes, bad meshes/shardings.

The multi-device checks run in subprocesses, since XLA's host device count and
``jax.distributed`` are fixed when a process starts; each prints its findings as JSON.
"""

import inspect
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.solver import sharding

ROOT = pathlib.Path(__file__).resolve().parents[2]

def planted(n, seed=0):
    """Views ``W_v F`` with ``F`` (3, n), sparse enough to be identifiable, so that the
    fits compared agree because both are good, not by chance."""
    rng = np.random.default_rng(seed)
    F = rng.random((3, n)) * (rng.random((3, n)) < 0.6)
    W = rng.random((24, 3)) * (rng.random((24, 3)) < 0.6)
    W[:3] = np.eye(3)
    return {"red": np.float32(W @ F), "conv": np.float32(rng.random((16, 3)) @ F)}


def rel(a, b):
    """Largest difference relative to the largest entry of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 1:  # histories: a float32 plateau may stop one run a few steps earlier
        a, b = a[:min(len(a), len(b))], b[:min(len(a), len(b))]
    return float(np.abs(a - b).max() / np.abs(b).max())


# The subprocess scripts start with the same two functions.
PLANTED = ("import warnings, json, numpy as np, jax, jaxcnmf\n"
           "warnings.simplefilter('ignore')\n"
           + inspect.getsource(planted) + inspect.getsource(rel))

FOUR_DEVICES = PLANTED + """
import re
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxcnmf.solver import core, initialization, sharding
out = {"device_count": jax.device_count()}
mesh = jax.make_mesh((4,), ("n",))
# Each method, with and without group sparsity, N divisible by 4 and not: MU without
# groups on N = 403, MU with groups on N = 400, HALS with groups from nndsvda with two
# restarts on N = 403 (below), and HALS without groups on N = 403 (the padding check).
# Compiling dominates the run time, hence few, covering cases.
cases = {"mu_odd": (403, {}),
         "mu_group": (400, {"group_lam": 0.05, "unit_columns": True})}
for label, (n, options) in cases.items():
    views = planted(n)
    if "group_lam" in options:
        options = {**options, "groups": np.arange(n) % 4}
    kw = dict(rank=3, max_iter=60, tol=0.0, init="random", progress=False, **options)
    one = jaxcnmf.fit(views, **kw)
    four = jaxcnmf.fit(views, mesh=mesh, **kw)
    out[label] = {"devices": [one.devices, four.devices], "F": rel(four.F, one.F),
                  "F_shape": list(four.F.shape),
                  "W": max(rel(four.loadings[k], one.loadings[k]) for k in views),
                  "objective": [one.objective, four.objective],
                  "rel_errors": [[one.relative_errors[k], four.relative_errors[k]]
                                 for k in views],
                  "history": rel(four.history["objective"], one.history["objective"])}

# nndsvda on the sharded matrix, restarts and transform, with N not divisible.
views = planted(403)
kw = dict(rank=3, max_iter=40, tol=0.0, method="hals", restarts=2, progress=False,
          group_lam=0.05, unit_columns=True, groups=np.arange(403) % 4)
one, four = jaxcnmf.fit(views, **kw), jaxcnmf.fit(views, mesh=mesh, **kw)
out["nndsvda_restarts"] = {"F": rel(four.F, one.F), "stability": [one.stability,
                           four.stability], "restart1": rel(four.restarts[1].F,
                           one.restarts[1].F)}
new = planted(203, seed=1)
t1, t4 = one.transform(new), one.transform(new, mesh=mesh)
out["transform"] = {"F": rel(t4, t1), "shape": list(t4.shape)}
t1, t4 = one.transform(new, method="fit"), one.transform(new, mesh=mesh, method="fit")
out["transform_fit"] = {"F": rel(t4, t1), "shape": list(t4.shape)}

# The internal rescaling on the sharded path: data 1e25 times larger (whose squares
# overflow float32 without it) give 1e25 times the factors, the group penalty from
# group_lam_fraction and 1e50 times the objective.
kw = dict(rank=3, max_iter=40, tol=0.0, method="hals", init="random", progress=False,
          group_lam_fraction=0.05, unit_columns=True, groups=np.arange(403) % 4)
small = jaxcnmf.fit(views, **kw)
big = jaxcnmf.fit({k: v * np.float32(1e25) for k, v in views.items()}, mesh=mesh, **kw)
out["rescaled"] = {"F": rel(np.float64(big.F) / 1e25, small.F), "dtype": str(big.F.dtype),
                   "objective": big.objective / 1e50 / small.objective,
                   "group_lam": big.config["group_lam"] / 1e25 / small.config["group_lam"],
                   "rel_errors": max(abs(big.relative_errors[k] - small.relative_errors[k])
                                     for k in views)}

# Random start: the same draws whatever the padding and placement.
placement = sharding.plan(["a", "b"], list(views.values()), mesh).with_columns(403)
jviews = placement.views(list(views.values()), "float32")
F_one, _ = initialization.random(jax.random.PRNGKey(3), tuple(views.values()), 3)
F_four, _ = initialization.random(jax.random.PRNGKey(3), jviews, 3, "float32", 403)
F_four = np.asarray(F_four)
out["random_init"] = {"shape": list(F_four.shape), "F": rel(F_four[:, :403], F_one),
                      "padding_max": float(np.abs(F_four[:, 403:]).max())}

# What crosses devices in one compiled fit: every collective's shapes. The same program
# then shows the padding inert: HALS floors F at eps, but the padding stays exactly 0.
config = core.SolverConfig(method="hals", rank=3, max_iter=3, l1_F=0.01)
F0, L0 = placement.factors(*initialization.random(jax.random.PRNGKey(0), jviews, 3,
                                                   "float32", 403))
mask = placement.column_mask()
compiled = sharding._solve.lower(jviews, F0, L0, None, mask, config, placement).compile()
state = compiled(jviews, F0, L0, None, mask)
out["padding"] = {"F_pad_max": float(np.abs(np.asarray(state.F)[:, 403:]).max()),
                  "F_min": float(np.asarray(state.F)[:, :403].min())}
# Tuples of six or more shapes carry /*index=5*/ comments, whose '=' the pattern stops at.
text = re.sub(r"/\\*index=\\d+\\*/", "", compiled.as_text())
found = re.findall(r"= ([^=]*?) (all-reduce|all-gather|all-to-all|collective-permute|"
                   r"reduce-scatter)[-a-z]*\\(", text)
out["collectives"] = sorted({kind + " " + shapes for shapes, kind in found})

# Bad meshes and shardings: the messages, and that nothing was compiled for them.
def error(views, mesh=None):
    try:
        jaxcnmf.fit(views, rank=3, max_iter=2, progress=False, mesh=mesh)
    except (ValueError, TypeError) as e:
        return type(e).__name__ + ": " + str(e)
    return None

X = planted(400)
cols = NamedSharding(mesh, P(None, "n"))
col = {k: jax.device_put(v, cols) for k, v in X.items()}
other = jax.make_mesh((4,), ("x",))
two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("n",))
compiled = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *a, **k: compiled.append(event) if "compil" in event else None)
compiled.clear()
out["errors"] = {
    "two_axes": error(X, jax.make_mesh((2, 2), ("a", "b"))),
    "not_a_mesh": error(X, "n"),
    "rows": error({"red": jax.device_put(X["red"], NamedSharding(mesh, P("n", None))),
                   "conv": col["conv"]}),
    "replicated": error({"red": jax.device_put(X["red"], NamedSharding(mesh, P())),
                         "conv": col["conv"]}),
    "axis": error(col, other),
    "different": error({"red": col["red"],
                        "conv": jax.device_put(X["conv"], NamedSharding(two, P(None, "n")))}),
    "devices": error(col, two),
}
out["compiled_during_errors"] = len(compiled)
jax.jit(lambda x: x * 2)(np.ones(3))
out["compiled_control"] = len(compiled)
print("RESULT " + json.dumps(out))
"""

WORKER = PLANTED + """
import sys, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
port, pid, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
mesh = jax.make_mesh((jax.device_count(),), ("n",))
full = planted(300)
mine = slice(150 * pid, 150 * (pid + 1))  # this process never builds the other half
sharding = NamedSharding(mesh, P(None, "n"))
views = {k: jax.make_array_from_process_local_data(sharding, v[:, mine], v.shape)
         for k, v in full.items()}
res = jaxcnmf.fit(views, rank=3, method="mu", max_iter=50, tol=0.0, progress=False)
saved = res.save(path)
back = jaxcnmf.load_result(path, mesh=mesh)
local = np.concatenate([np.asarray(s.data) for s in res.F.addressable_shards], axis=1)
back_local = np.concatenate([np.asarray(s.data) for s in back.F.addressable_shards], axis=1)
print("RESULT " + json.dumps({
    "process_count": jax.process_count(), "devices": res.devices,
    "global": not res.F.is_fully_addressable, "same_sharding": res.F.sharding == sharding,
    "shape": list(res.F.shape), "saved": saved, "reloaded": rel(back_local, local),
    "n_iter": res.n_iter, "objective": res.objective, "rel_errors": res.relative_errors,
    "scaled_F_global": not res.scaled_F().is_fully_addressable}), flush=True)
jax.distributed.shutdown()
"""


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def four():
    # Optimisation level 0 halves XLA's compile time, which dominates; both fits compared
    # are compiled alike.
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                         "--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    return _result(proc)


@pytest.mark.parametrize("case", ["mu_odd", "mu_group"])
def test_four_devices_fit_like_one(four, case):
    assert four["device_count"] == 4
    got = four[case]
    assert got["devices"] == [1, 4]
    assert got["F_shape"][1] == (403 if "odd" in case else 400)
    # Only the order of the sums over images differs: float32 rounding, grown over 60
    # iterations (FISTA's monotone choice can flip on a tie).
    assert got["F"] < 2e-3 and got["W"] < 2e-3 and got["history"] < 2e-3, got
    # The final objective and errors come from the residuals, on the sharded views too
    # (agreeing like the factors they are computed from).
    assert abs(got["objective"][1] - got["objective"][0]) < 1e-4 * got["objective"][0]
    assert all(abs(a - b) < 2e-3 * b for a, b in got["rel_errors"]), got["rel_errors"]


def test_sharded_nndsvda_restarts_and_transform_match(four):
    got = four["nndsvda_restarts"]
    assert got["F"] < 2e-3 and got["restart1"] < 2e-3, got
    assert abs(got["stability"][0] - got["stability"][1]) < 1e-4
    assert four["transform"]["shape"] == [3, 203] and four["transform"]["F"] < 1e-3
    assert four["transform_fit"]["shape"] == [3, 203]
    assert four["transform_fit"]["F"] < 1e-3, four["transform_fit"]


def test_sharded_fit_is_rescaled_like_the_unsharded_one(four):
    got = four["rescaled"]
    assert got["dtype"] == "float32"  # 1e25 * F is within float32's range
    assert got["F"] < 2e-3, got
    assert abs(got["objective"] - 1.0) < 1e-4 and abs(got["group_lam"] - 1.0) < 1e-5, got
    assert got["rel_errors"] < 1e-4, got


def test_random_start_is_the_same_draw_whatever_the_sharding(four):
    got = four["random_init"]
    assert got["shape"] == [3, 404]  # 403 images padded to a multiple of 4
    assert got["F"] < 1e-6 and got["padding_max"] == 0.0


def test_zero_padding_columns_stay_exactly_zero(four):
    # The fits above (N = 403 on 4 devices) agree with the unpadded ones; this is why:
    # HALS floors every real entry at eps > 0, yet the padding stays exactly zero, so it
    # adds nothing to F F^T, X F^T or the penalties.
    got = four["padding"]
    assert got["F_min"] > 0.0 and got["F_pad_max"] == 0.0


def test_only_small_partial_sums_cross_devices(four):
    # rows 24 and 16, rank 3: (rows_v, rank), (rank, rank) and scalars; no image axis
    # (404 padded, 101 per device) and no all-gather.
    assert four["collectives"], "expected some all-reduce"
    for entry in four["collectives"]:
        assert entry.startswith("all-reduce"), entry
        dims = [int(d) for shape in re.findall(r"\[([\d,]*)\]", entry)
                for d in shape.split(",") if d]
        assert all(d in (24, 16, 3, 0, 1) for d in dims), entry


def test_bad_meshes_and_shardings_raise_before_compiling(four):
    errors = four["errors"]
    assert errors["two_axes"].startswith("ValueError: mesh: expected a 1-D mesh with one "
                                         "axis for the images, got axes ('a', 'b')")
    assert errors["not_a_mesh"].startswith("TypeError: mesh: expected a jax.sharding.Mesh")
    assert errors["rows"].startswith("ValueError: view 'red' is sharded over its rows")
    assert errors["replicated"].startswith("ValueError: view 'red' is replicated")
    assert errors["axis"] == ("ValueError: mesh: expected the axis view 'red' is sharded "
                              "over, 'n', got a mesh with axis 'x'")
    assert errors["different"].startswith("ValueError: views 'red' and 'conv' are sharded "
                                          "differently")
    assert errors["devices"] == ("ValueError: mesh: expected the devices view 'red' is on, "
                                 "[0, 1, 2, 3], got devices [0, 1]")
    assert four["compiled_during_errors"] == 0 and four["compiled_control"] > 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(worker, args, env):
    """Run ``worker`` as processes 0 and 1 of a ``jax.distributed`` job (coordinator on a
    free local port); returns each one's JSON result."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", worker, port, str(i), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            proc.kill()
        outs.append(_result(subprocess.CompletedProcess(proc.args, proc.returncode,
                                                        stdout, stderr)))
    return outs


def test_two_processes_fit_like_one_and_save_one_file_each(tmp_path):
    path = str(tmp_path / "fit.npz")
    outs = _two_processes(WORKER, [path], _env())
    for i, got in enumerate(outs):
        assert got["process_count"] == 2 and got["devices"] == 2
        assert got["global"] and got["same_sharding"] and got["shape"] == [3, 300]
        assert got["saved"] == str(tmp_path / f"fit.process{i}-of-2.npz")
        assert got["reloaded"] == 0.0 and got["scaled_F_global"]
    views = planted(300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = jaxcnmf.fit(views, rank=3, method="mu", max_iter=50, tol=0.0, progress=False)
    for got in outs:
        assert abs(got["objective"] - one.objective) < 1e-4 * one.objective
        for name in views:
            assert abs(got["rel_errors"][name] - one.relative_errors[name]) < 1e-5
    back = jaxcnmf.load_result(path)  # all processes' files, assembled on this host
    assert back.devices == 2 and back.n_iter == one.n_iter == outs[0]["n_iter"]
    assert isinstance(back.F, np.ndarray) and back.F.shape == (3, 300)
    np.testing.assert_allclose(back.F, one.F, rtol=1e-4, atol=1e-4 * one.F.max())
    for name in views:
        np.testing.assert_allclose(back.loadings[name], one.loadings[name], rtol=1e-4,
                                   atol=1e-4 * one.loadings[name].max())


def test_missing_process_file_is_named(tmp_path):
    np.savez(tmp_path / "fit.process0-of-2.npz", F=np.zeros((1, 1)))
    with pytest.raises(FileNotFoundError, match=r"expected one file per process.*got none "
                                                r"for process\(es\) \[1\]"):
        jaxcnmf.load_result(str(tmp_path / "fit.npz"))


def test_one_device_mesh_and_plain_path_agree():
    rng = np.random.default_rng(0)
    views = {"a": np.float32(rng.random((10, 3)) @ rng.random((3, 50)))}
    mesh = jax.make_mesh((1,), ("n",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = jaxcnmf.fit(views, rank=2, max_iter=20, progress=False)
        meshed = jaxcnmf.fit(views, rank=2, max_iter=20, progress=False, mesh=mesh)
    assert plain.devices == meshed.devices == 1
    np.testing.assert_allclose(meshed.F, plain.F, rtol=1e-5, atol=1e-6)
    assert sharding.plan(["a"], [views["a"]]) is None


def test_memory_formula_counts_views_and_factors():
    got = sharding.memory_per_device([100, 50], n=1000, rank=4, devices=4, storage_bytes=2)
    assert got["views"] == 150 * 250 * 2
    assert got["factors"] == 4 * 4 * 250 * 4 + 3 * 150 * 4 * 4
    assert got["nndsvd_extra"] == 1000 * 14 * 4 + 150 * 250 * 4
    assert got["total"] == got["views"] + got["factors"]


def test_iteration_blocks_add_up_over_image_blocks():
    from jaxcnmf.solver import core

    views = tuple(planted(60).values())
    rng = np.random.default_rng(1)
    F = np.float32(rng.random((3, 60)))
    loadings = tuple(np.float32(rng.random((X.shape[0], 3))) for X in views)
    config = core.SolverConfig(rank=3, weights=(2.0, 0.5))
    whole = sharding.iteration_blocks(views, F, loadings, config)
    halves = [sharding.iteration_blocks(tuple(X[:, s] for X in views), F[:, s], loadings,
                                        config) for s in (slice(0, 25), slice(25, 60))]
    B = np.concatenate([np.asarray(h["B"]) for h in halves], axis=1)
    np.testing.assert_allclose(B, whole["B"], rtol=1e-6)
    np.testing.assert_allclose(halves[0]["G"], whole["G"], rtol=1e-6)
    np.testing.assert_allclose(halves[0]["FFt"] + halves[1]["FFt"], whole["FFt"], rtol=1e-5)
    for v in range(2):
        np.testing.assert_allclose(halves[0]["XFt"][v] + halves[1]["XFt"][v],
                                   whole["XFt"][v], rtol=1e-5)
    np.testing.assert_allclose(whole["XFt"][0], views[0] @ F.T, rtol=1e-5)


# ------------------------------------------- per-process files, checked like one file


@pytest.fixture(scope="module")
def small_fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return jaxcnmf.fit(planted(40), rank=3, max_iter=20, progress=False)


def _write_parts(res, tmp_path, **tamper):
    """``res`` saved as two processes would: each file its columns of ``F`` (process 0
    the odd ones, to check the placement), ``columns``, ``n`` and the rest. ``tamper``
    maps ``field`` to a replacement in process 1's file."""
    whole = res.save(tmp_path / "whole.npz")
    with np.load(whole) as data:
        arrays = {k: data[k] for k in data.files}
    n = arrays["F"].shape[1]
    for i, columns in enumerate((np.arange(1, n, 2), np.arange(0, n, 2))):
        part = {**arrays, "F": arrays["F"][:, columns], "columns": columns, "n": np.int64(n)}
        if i == 1:
            part.update(tamper)
        np.savez(tmp_path / f"fit.process{i}-of-2.npz", **part)
    return str(tmp_path / "fit.npz")


def test_per_process_files_are_assembled(small_fit, tmp_path):
    back = jaxcnmf.load_result(_write_parts(small_fit, tmp_path))
    np.testing.assert_array_equal(back.F, small_fit.F)
    assert back.devices == 1 and back.n_iter == small_fit.n_iter


def test_every_per_process_file_is_checked(small_fit, tmp_path):
    F1 = small_fit.F[:, 0::2].copy()
    F1[1, 2] = -0.5
    path = _write_parts(small_fit, tmp_path, F=F1)
    with pytest.raises(ValueError, match=r"fit\.process1-of-2\.npz: field 'F': expected "
                                         r"non-negative entries, got minimum -0\.5"):
        jaxcnmf.load_result(path)
    path = _write_parts(small_fit, tmp_path, F=np.ones((4, 20), np.float32))
    with pytest.raises(ValueError, match=r"process1-of-2\.npz: field 'F': expected shape "
                                         r"\(3, 20\), got \(4, 20\)"):
        jaxcnmf.load_result(path)
    path = _write_parts(small_fit, tmp_path, columns=np.arange(20) + 30)
    with pytest.raises(ValueError, match=r"process1-of-2\.npz: field 'columns': expected "
                                         r"indices in \[0, 40\), got \[30, 49\]"):
        jaxcnmf.load_result(path)
    path = _write_parts(small_fit, tmp_path, meta=np.array('{"view_names": ["other"]}'))
    with pytest.raises(ValueError, match=r"process1-of-2\.npz: field 'meta': expected the "
                                         r"same fit as process 0's file"):
        jaxcnmf.load_result(path)
    path = _write_parts(small_fit, tmp_path, columns=np.arange(1, 40, 2))
    with pytest.raises(ValueError, match=r"expected the files to hold all 40 columns of F, "
                                         r"got 20"):
        jaxcnmf.load_result(path)


def test_devices_is_saved_and_checked(small_fit, tmp_path):
    import dataclasses

    path = dataclasses.replace(small_fit, devices=4).save(tmp_path / "fit.npz")
    assert jaxcnmf.load_result(path).devices == 4
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta["devices"] = 0
    np.savez(path, **{**arrays, "meta": np.array(json.dumps(meta))})
    with pytest.raises(ValueError, match=r"field 'meta\.devices': expected an int >= 1, "
                                         r"got 0"):
        jaxcnmf.load_result(path)
    del meta["devices"]  # a file from before sharding: one device
    np.savez(path, **{**arrays, "meta": np.array(json.dumps(meta))})
    assert jaxcnmf.load_result(path).devices == 1
