"""Streaming fit from a store: the same iterates as the in-memory fit, and its errors."""

import doctest
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.solver import store, streaming
from jaxcnmf.solver.fit import ConvergenceWarning, DeadConceptWarning
from jaxcnmf.solver.store import StoreError

RANK = 3
N = 203
BLOCK = 50  # four full blocks and one of 3 columns (read in place at its own width)
ITERS = 25


@pytest.fixture(autouse=True, scope="module")
def one_block_per_step():
    """Every step reads one store block (the default takes this tiny store's blocks together
    into one step): the sums over several steps are what these tests compare."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming, "CHUNK_BYTES", 0)
        yield


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
    for negative in ("clip", "shift"):  # shifted, the padding of the last block is not 0
        memory, streamed = _both(shifted, s, method="mu", init=init, negative=negative,
                                 max_iter=5)
        _assert_same_iterates(memory, streamed)


def test_a_short_last_block_is_read_in_place_at_its_width(data):
    views, s, _ = data
    layout = streaming._Layout(s, jax.make_mesh((1,), ("n",)), 4)
    assert (layout.cols, layout.b, layout.steps) == (50, 50, 5)
    assert [layout.width(j) for j in range(5)] == [50, 50, 50, 50, 3]
    # No copy: the arrays handed to the device are the block files' memory maps.
    for j, (start, stop) in ((0, (0, 50)), (4, (200, 203))):
        chunk = streaming._host_chunk(s, start, stop, s.views, "float32", layout.width(j))
        mapped = s.read_block(j)
        for name, X in zip(s.views, chunk):
            assert X.shape == (views[name].shape[0], stop - start)
            assert isinstance(X.base, np.memmap) or isinstance(X, np.memmap)
            np.testing.assert_array_equal(X, mapped[name])
    # Converted to another storage dtype, it is copied at the same width.
    (X, *_), = [streaming._host_chunk(s, 200, 203, s.views, "bfloat16", 3)]
    assert X.shape == (views["red"].shape[0], 3) and X.dtype == ml_dtypes.bfloat16


def test_small_blocks_are_read_together_as_pieces_or_padded_chunks(data, monkeypatch):
    views, s, _ = data
    # Blocks of 50 columns x 50 rows float32 (10 kB): four are taken together, so a pass is
    # two steps, [0, 200) and [200, 203). On one device they stay in place as the pieces
    # of their chunk; for the group lasso (or with more than _PIECES blocks, or over
    # devices) each chunk is copied into 208 columns (rows of 13 cache lines; 200 columns
    # would be 12.5).
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 45_000)
    mesh = jax.make_mesh((1,), ("n",))
    layout = streaming._Layout(s, mesh, 4)
    assert (layout.pieces, layout.cols, layout.b, layout.steps) == (True, 200, 200, 2)
    assert [layout.width(j) for j in range(2)] == [200, 3]
    copied = streaming._Layout(s, mesh, 4, pieces=False)
    assert (copied.pieces, copied.cols, copied.b, copied.steps) == (False, 200, 208, 2)
    monkeypatch.setattr(streaming, "_PIECES", 3)
    assert not streaming._Layout(s, mesh, 4).pieces
    monkeypatch.setattr(streaming, "_PIECES", 16)
    assert streaming._width(2048, 4) == 2064 and streaming._width(2000, 4) == 2000
    assert streaming._width(4096, 2) == 4128 and streaming._width(3, 8) == 8
    # Pieces: the iterations step over them, the statistics, initialisation and residual
    # passes join them; the same iterates as in memory, MU and HALS.
    reads = []
    original = store.Store.read_block
    monkeypatch.setattr(store.Store, "read_block",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    memory, streamed = _both(views, s, method="hals", init="nndsvda", seed=1)
    _assert_same_iterates(memory, streamed)
    assert streamed.config["step_columns"] == 200 and reads[:5] == [0, 1, 2, 3, 4]
    memory, streamed = _both(views, s, method="mu", init="random", unit_columns=True,
                             l1_F=0.01)
    _assert_same_iterates(memory, streamed)
    # Pieces kept on the device: one call per pass over them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        kept = jaxcnmf.fit(s, rank=RANK, method="mu", init="random", unit_columns=True,
                           l1_F=0.01, max_iter=ITERS, tol=0.0, progress=False,
                           cache_bytes=10**6)
    assert kept.config["steps_kept_on_device"] == 2
    np.testing.assert_allclose(kept.F, streamed.F, rtol=1e-5, atol=1e-6 * streamed.F.max())
    # A group across two blocks of one chunk is fitted (copied chunks); one across two
    # chunks is refused.
    groups = np.repeat(np.arange(4), [40, 100, 60, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grouped = jaxcnmf.fit(s, rank=RANK, groups=groups, group_lam=0.1, max_iter=2,
                              progress=False)
    assert grouped.config["step_columns"] == 200
    with pytest.raises(ValueError, match=r"group 2 has images in blocks \[0, 200\) \(column "
                                         r"140\) and blocks \[200, 203\) \(column 200\)"):
        jaxcnmf.fit(s, rank=RANK, groups=np.repeat(np.arange(3), [40, 100, 63]),
                    group_lam=0.1, max_iter=2, progress=False)


def test_chunks_kept_on_the_device_are_not_read_again(data, monkeypatch):
    views, s, init = data
    reads = []
    original = store.Store.read_block
    monkeypatch.setattr(store.Store, "read_block",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    options = {"rank": RANK, "init": init, "max_iter": 3, "tol": 0.0, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = jaxcnmf.fit(s, **options)
        assert len(reads) == 5 * 5 and plain.config["steps_kept_on_device"] == 0  # CPU
        reads.clear()
        # Two chunks of 50 columns x 50 rows float32 fit in 20 kB: after the first pass
        # (statistics) only blocks 2-4 are read, by the 3 iterations and the residuals.
        kept = jaxcnmf.fit(s, cache_bytes=20_000, **options)
    assert reads == [0, 1, 2, 3, 4] + [2, 3, 4] * 4
    assert kept.config["steps_kept_on_device"] == 2
    np.testing.assert_allclose(kept.F, plain.F, rtol=1e-6, atol=1e-7 * plain.F.max())
    assert kept.objective == pytest.approx(plain.objective, rel=1e-6)
    # Every chunk kept: read once, and each iteration is one compiled call over the chunks.
    reads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = jaxcnmf.fit(s, cache_bytes=10**6, **options)
    assert reads == [0, 1, 2, 3, 4] and whole.config["steps_kept_on_device"] == 5
    np.testing.assert_allclose(whole.F, plain.F, rtol=1e-5, atol=1e-6 * plain.F.max())
    for name in views:
        np.testing.assert_allclose(whole.loadings[name], plain.loadings[name], rtol=1e-5,
                                   atol=1e-6 * plain.loadings[name].max())
    assert whole.objective == pytest.approx(plain.objective, rel=1e-5)
    with pytest.raises(ValueError, match=r"cache_bytes: expected an integer >= 0, got -1"):
        jaxcnmf.fit(s, cache_bytes=-1, **options)
    with pytest.raises(ValueError, match=r"cache_bytes: only for views from a store"):
        jaxcnmf.fit(views, cache_bytes=0, **options)


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
    with pytest.raises(ValueError, match=r"groups: group 0 has images in block \[0, 50\) "
                                         r"\(column 0\) and block \[50, 100\) \(column 50\)"):
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


# ------------------------------------------------- over devices and processes (subprocesses)

# Helpers and the subprocess conventions of the sharded in-memory fit's tests.
from test_sharding import PLANTED, _env, _result, _two_processes, planted

FOUR_STREAMING = PLANTED + """
import sys
from jaxcnmf import store
from jaxcnmf.solver import streaming
streaming.CHUNK_BYTES = 0  # one store block per step
mesh = jax.make_mesh((4,), ("n",))
# N = 203 over 4 devices: 51 columns each, read in chunks of 50 that straddle the store's
# blocks of 50, the last chunk of each device one column and 49 of padding.
views = planted(203)
s = store.save(sys.argv[1], views, block_size=50)
out = {}
for label, kw in {"mu": dict(method="mu", init="random", unit_columns=True, l1_F=0.01),
                  "hals": dict(method="hals", init="nndsvda", seed=2)}.items():
    kw = dict(rank=3, max_iter=20, tol=0.0, progress=False, **kw)
    one, four = jaxcnmf.fit(s, **kw), jaxcnmf.fit(s, mesh=mesh, **kw)
    out[label] = {"devices": [one.devices, four.devices], "shape": list(four.F.shape),
                  "F": rel(four.F, one.F),
                  "W": max(rel(four.loadings[k], one.loadings[k]) for k in views),
                  "history": rel(four.history["objective"], one.history["objective"]),
                  "objective": [one.objective, four.objective]}
compiled = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *a, **k: compiled.append(event) if "compil" in event else None)
errors = {}
for label, mesh_ in {"two_axes": jax.make_mesh((2, 2), ("a", "b")), "not_a_mesh": "n"}.items():
    try:
        jaxcnmf.fit(s, rank=3, max_iter=2, progress=False, mesh=mesh_)
    except (ValueError, TypeError) as e:
        errors[label] = type(e).__name__ + ": " + str(e)
try:
    jaxcnmf.fit(s, rank=3, group_lam_fraction=0.1, groups=np.zeros(203, int), mesh=mesh)
except ValueError as e:
    errors["group_lasso"] = str(e)
out["errors"], out["compiled_during_errors"] = errors, len(compiled)
print("RESULT " + json.dumps(out))
"""


# Compiling dominates these runs; the programs compared are compiled alike.
_FAST = "--xla_backend_optimization_level=0"


@pytest.fixture(scope="module")
def four_streaming(tmp_path_factory):
    import subprocess
    import sys

    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4 " + _FAST)
    path = str(tmp_path_factory.mktemp("four") / "acts")
    proc = subprocess.run([sys.executable, "-c", FOUR_STREAMING, path], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    return _result(proc)


@pytest.mark.parametrize("method", ["mu", "hals"])
def test_streaming_over_four_devices_equals_one(four_streaming, method):
    got = four_streaming[method]
    assert got["devices"] == [1, 4] and got["shape"] == [3, 203]
    # The same updates; only the order of the sums over columns differs (per device, then
    # over the devices): float32 rounding over 20 iterations (HALS's history differs by
    # 0.9-1.3e-5 depending on whether one device pads its short last block).
    assert got["F"] < 1e-4 and got["W"] < 1e-4 and got["history"] < 5e-5, got
    assert abs(got["objective"][1] - got["objective"][0]) < 1e-5 * got["objective"][0]


def test_streaming_mesh_errors_before_compiling(four_streaming):
    errors = four_streaming["errors"]
    assert errors["two_axes"].startswith("ValueError: mesh: expected a 1-D mesh with one "
                                         "axis for the images, got axes ('a', 'b')")
    assert errors["not_a_mesh"].startswith("TypeError: mesh: expected a jax.sharding.Mesh")
    assert errors["group_lasso"].startswith(
        "groups: group 0 has images in device 0's chunk [0, 50) (column 0) and device 0's "
        "chunk [50, 51) (column 50)"), errors["group_lasso"]
    assert "with a mesh also on the devices' boundaries (multiples of ceil(N / devices) = " \
           "51)" in errors["group_lasso"]
    assert four_streaming["compiled_during_errors"] == 0


STREAM_WORKER = PLANTED + """
import sys
from jaxcnmf import store
from jaxcnmf.solver import streaming
streaming.CHUNK_BYTES = 0  # one store block per step
port, pid, path, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
mesh = jax.make_mesh((jax.device_count(),), ("n",))
s = store.open(path)
res = jaxcnmf.fit(s, rank=3, method="mu", init="random", max_iter=15, tol=0.0,
                  progress=False, mesh=mesh)
saved = res.save(out)
print("RESULT " + json.dumps({
    "devices": res.devices, "global": not res.F.is_fully_addressable,
    "shape": list(res.F.shape), "saved": saved, "n_iter": res.n_iter,
    "objective": res.objective, "read": sorted(s._verified)}), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_each_stream_their_half(tmp_path):
    views = planted(300)
    s = store.save(tmp_path / "acts", views, block_size=50)
    out = str(tmp_path / "fit.npz")
    outs = _two_processes(STREAM_WORKER, [str(s.path), out], _env(XLA_FLAGS=_FAST))
    for i, got in enumerate(outs):
        assert got["devices"] == 2 and got["global"] and got["shape"] == [3, 300]
        assert got["saved"] == str(tmp_path / f"fit.process{i}-of-2.npz")
        # 300 columns in blocks of 50: process 0 reads blocks 0-2, process 1 blocks 3-5.
        blocks = {int(name.split("/")[1][:6]) for name in got["read"]}
        assert blocks == set(range(3 * i, 3 * i + 3)), got["read"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = jaxcnmf.fit(s, rank=3, method="mu", init="random", max_iter=15, tol=0.0,
                          progress=False)
    back = jaxcnmf.load_result(out)  # both processes' files, assembled here
    assert back.devices == 2 and back.n_iter == one.n_iter == 15
    np.testing.assert_allclose(back.F, one.F, rtol=1e-4, atol=1e-5 * one.F.max())
    for name in views:
        np.testing.assert_allclose(back.loadings[name], one.loadings[name], rtol=1e-4,
                                   atol=1e-5 * one.loadings[name].max())
    assert abs(outs[0]["objective"] - one.objective) < 1e-5 * one.objective
