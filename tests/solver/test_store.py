"""On-disk store: round trip, resumable writing, damaged and mismatched stores, probing."""

import doctest
import hashlib
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxcnmf
from jaxcnmf.nets import models, probe
from jaxcnmf.solver import store
from jaxcnmf.solver.store import StoreError

N = 10
BLOCK = 4  # blocks of 4, 4 and 2 columns


@pytest.fixture
def views():
    rng = np.random.default_rng(0)
    return {"red": rng.random((5, N), dtype=np.float32),
            "conv": rng.random((3, N), dtype=np.float32)}


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_docstring_examples_run():
    assert doctest.testmod(store, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0


def test_round_trip_float32_with_metadata(tmp_path, views):
    s = store.save(tmp_path / "acts", views, block_size=BLOCK, labels=np.arange(N) % 3,
                   class_names=["a", "b", "c"], superclasses=["x", "x", "y"],
                   shapes={"conv": (1, 1, 3)}, provenance={"checkpoint": "ckpt/7"})
    assert jaxcnmf.store is store  # the public name
    again = store.open(tmp_path / "acts")
    assert (again.views, again.n, again.dtype, again.n_blocks) == (("red", "conv"), N,
                                                                   "float32", 3)
    assert again.rows == {"red": 5, "conv": 3}
    assert again.shapes == {"red": None, "conv": (1, 1, 3)}
    np.testing.assert_array_equal(again.labels, np.arange(N) % 3)
    assert again.class_names == ["a", "b", "c"] and again.superclasses == ["x", "x", "y"]
    assert again.provenance == {"checkpoint": "ckpt/7"}
    assert [again.columns(i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    for name, X in again.read_all().items():
        np.testing.assert_array_equal(X, views[name])
    last = again.read_block(2)
    assert [a.shape for a in last.values()] == [(5, 2), (3, 2)]
    np.testing.assert_array_equal(list(again.blocks("conv"))[1], views["conv"][:, 4:8])
    # Plain NumPy reads a block file memory-mapped, without pickle.
    raw = np.load(tmp_path / "acts" / "blocks" / "000001-01.npy", mmap_mode="r",
                  allow_pickle=False)
    np.testing.assert_array_equal(raw, views["conv"][:, 4:8])
    np.testing.assert_array_equal(s.read_block(1)["red"], views["red"][:, 4:8])


def test_round_trip_bfloat16_is_rounded_once(tmp_path, views):
    s = store.save(tmp_path / "acts", views, block_size=BLOCK, dtype="bfloat16")
    expected = {k: X.astype(ml_dtypes.bfloat16) for k, X in views.items()}
    for name, X in s.read_all().items():
        assert X.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(X, expected[name])
    # On disk: uint16 bit patterns, readable without ml_dtypes.
    raw = np.load(tmp_path / "acts" / "blocks" / "000000-00.npy")
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw, expected["red"][:, :4].view(np.uint16))


def test_resumed_writing_equals_uninterrupted_writing(tmp_path, views):
    whole = store.save(tmp_path / "whole", views, block_size=BLOCK, labels=np.arange(N))
    rows = {k: X.shape[0] for k, X in views.items()}

    def block(i):
        return {k: X[:, i * BLOCK:(i + 1) * BLOCK] for k, X in views.items()}

    first = store.Writer(tmp_path / "part", rows, N, block_size=BLOCK, labels=np.arange(N))
    first.write_block(0, block(0))
    # Interrupted while writing block 2: one view's file renamed, no block record yet,
    # and a temporary file left behind.
    (tmp_path / "part" / "blocks" / "000002-00.npy").write_bytes(b"\x93NUMPY partial")
    (tmp_path / "part" / "blocks" / "000002-01.npy.tmp-1").write_bytes(b"partial")
    with pytest.raises(StoreError, match=r"incomplete: 1 of 3 blocks written, first "
                                         r"missing block 1"):
        store.open(tmp_path / "part")

    resumed = store.Writer(tmp_path / "part", rows, N, block_size=BLOCK,
                           labels=np.arange(N))
    assert resumed.missing == [1, 2]
    for i in resumed.missing:
        resumed.write_block(i, block(i))
    part = resumed.finish()
    assert _manifest(tmp_path / "part") == _manifest(tmp_path / "whole")
    for i in range(3):
        for (_, a), (_, b) in zip(part.read_block(i).items(), whole.read_block(i).items()):
            np.testing.assert_array_equal(a, b)
    # A finished store resumed again has nothing left to write.
    assert store.Writer(tmp_path / "part", rows, N, block_size=BLOCK,
                        labels=np.arange(N)).missing == []


def test_resume_with_other_settings_names_the_field(tmp_path, views):
    rows = {k: X.shape[0] for k, X in views.items()}
    store.Writer(tmp_path / "acts", rows, N, block_size=BLOCK)
    with pytest.raises(StoreError, match=r"manifest field 'block_size' is 4 on disk, "
                                         r"expected 5"):
        store.Writer(tmp_path / "acts", rows, N, block_size=5)
    with pytest.raises(StoreError, match=r"manifest field 'dtype' is 'float32' on disk"):
        store.Writer(tmp_path / "acts", rows, N, block_size=BLOCK, dtype="bfloat16")


def test_corrupt_block_is_refused_with_its_name(tmp_path, views):
    store.save(tmp_path / "acts", views, block_size=BLOCK)
    file = tmp_path / "acts" / "blocks" / "000001-01.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    s = store.open(tmp_path / "acts")  # same size: found when read
    s.read_block(0)
    with pytest.raises(StoreError, match=r"block 1 of view 'conv' \(blocks/000001-01.npy\): "
                                         r"SHA-256 differs"):
        s.read_block(1)
    with pytest.raises(StoreError, match=r"block 1 of view 'conv'"):
        store.open(tmp_path / "acts").verify()


def test_truncated_and_missing_blocks_are_refused_on_open(tmp_path, views):
    store.save(tmp_path / "acts", views, block_size=BLOCK)
    file = tmp_path / "acts" / "blocks" / "000002-00.npy"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[:-3])
    with pytest.raises(StoreError, match=rf"block 2 of view 'red' \(blocks/000002-00.npy\): "
                                         rf"expected {size} bytes as recorded in the "
                                         rf"manifest, got {size - 3}"):
        store.open(tmp_path / "acts")
    file.unlink()
    with pytest.raises(StoreError, match=r"block 2 of view 'red': file "
                                         r"blocks/000002-00.npy is missing"):
        store.open(tmp_path / "acts")


def _edit_manifest(path, edit):
    manifest = _manifest(path)
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_mismatch_names_the_field_or_block(tmp_path, views):
    path = tmp_path / "acts"
    store.save(path, views, block_size=BLOCK)
    _edit_manifest(path, lambda m: m["views"][1].update(rows=4))
    with pytest.raises(StoreError, match=r"block 0 of view 'conv' .*expected shape \(4, 4\) "
                                         r"from the manifest, got \(3, 4\)"):
        store.open(path).read_block(0)
    _edit_manifest(path, lambda m: m["views"][1].update(rows=3) or m.update(n=12))
    with pytest.raises(StoreError, match=r"manifest field 'blocks'\[2\]: expected columns "
                                         r"\[8, 12\], got \[8, 10\]"):
        store.open(path)
    _edit_manifest(path, lambda m: m.update(n=10, n_blocks=4))
    with pytest.raises(StoreError, match=r"manifest field 'n_blocks': expected ceil\(n / "
                                         r"block_size\) = 3"):
        store.open(path)
    _edit_manifest(path, lambda m: m.update(n_blocks=3, dtype="int8"))
    with pytest.raises(StoreError, match=r"manifest field 'dtype': expected one of"):
        store.open(path)


def test_writer_and_save_errors(tmp_path, views):
    store.save(tmp_path / "acts", views, block_size=BLOCK)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        store.save(tmp_path / "acts", views)
    s = store.save(tmp_path / "acts", {"red": views["red"]}, overwrite=True)
    assert s.views == ("red",) and s.block_size == N
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="non-empty directory without manifest.json"):
        store.save(tmp_path / "other", views)
    w = store.Writer(tmp_path / "new", {"red": 5}, N, block_size=BLOCK)
    with pytest.raises(ValueError, match=r"arrays\['red'\] of block 2: expected shape "
                                         r"\(5, 2\), got \(5, 4\)"):
        w.write_block(2, {"red": views["red"][:, :4]})
    with pytest.raises(StoreError, match="cannot finish: 3 block\\(s\\) missing, first "
                                         "missing block 0"):
        w.finish()
    with pytest.raises(ValueError, match=r"dtype: expected one of"):
        store.save(tmp_path / "x", views, dtype="int8")


# ----------------------------------------------------------------------------- probing


@pytest.fixture(scope="module")
def small():
    model = models.small_cnn(10, width=0.125)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        jnp.zeros((1, 32, 32, 3)))
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    return model, variables, images


def test_collect_to_store_equals_collect(tmp_path, small):
    model, variables, images = small
    kwargs = {"layers": ["conv2", "pool"], "batch_size": 3, "progress": False}
    expected = probe.collect(model, variables, images, **kwargs)
    # Blocks of 5 and 2 columns: the first block's second batch is cut at its end, the
    # second block's one batch ends at N (images 4:7, keeping 5:7).
    s = probe.collect(model, variables, images, **kwargs, store=tmp_path / "f32",
                      block_size=5,
                      store_info={"labels": np.arange(7), "provenance": {"checkpoint": "c"}})
    assert s.views == tuple(expected) and s.block_size == 5 and s.n_blocks == 2
    assert s.provenance["checkpoint"] == "c" and s.provenance["layers"] == ["conv2", "pool"]
    assert s.provenance["batch_size"] == 3
    assert s.shapes["conv2"] == (8, 8, 8) and s.shapes["red"] == (32, 32)
    for name, X in s.read_all().items():
        np.testing.assert_allclose(X, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    half = probe.collect(model, variables, images, **kwargs, store=tmp_path / "bf16",
                         dtype="bfloat16")
    assert half.dtype == "bfloat16"
    assert half.block_size == store.default_block_size(sum(half.rows.values()), 7, "bfloat16")
    for name, X in half.read_all().items():
        np.testing.assert_allclose(X.astype(np.float32), expected[name], rtol=2 ** -8,
                                   err_msg=name)
    with pytest.raises(ValueError, match=r"dtype: expected 'float32' without store"):
        probe.collect(model, variables, images, **kwargs, dtype="bfloat16")


def test_collect_blocks_need_not_be_whole_batches(tmp_path, small):
    model, variables, images = small
    images = np.concatenate([images, images[:4] // 2])  # N = 11: blocks of 4, 4 and 3
    kwargs = {"layers": ["pool"], "batch_size": 3, "progress": False}
    expected = probe.collect(model, variables, images, **kwargs)
    s = probe.collect(model, variables, images, **kwargs, store=tmp_path / "acts",
                      block_size=4)
    assert [s.columns(i) for i in range(s.n_blocks)] == [(0, 4), (4, 8), (8, 11)]
    for name, X in s.read_all().items():
        np.testing.assert_allclose(X, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError) as err:
        probe.collect(model, variables, images, **kwargs, block_size=4)
    assert str(err.value) == ("block_size: expected None without store=... (it sets the "
                              "columns per store block), got 4")
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match=rf"block_size: expected an integer >= 1 or None, "
                                             rf"got {bad!r}"):
            probe.collect(model, variables, images, **kwargs, store=tmp_path / "bad",
                          block_size=bad)


def test_interrupted_collect_resumes_at_the_first_missing_block(tmp_path, small,
                                                                monkeypatch):
    model, variables, images = small
    kwargs = {"layers": ["pool"], "progress": False, "store": tmp_path / "acts",
              "block_size": 3}
    written = []
    original = store.Writer.write_block

    def failing(self, i, arrays):
        if i == 1 and "interrupted" not in written:
            written.append("interrupted")
            raise KeyboardInterrupt
        written.append(i)
        return original(self, i, arrays)

    monkeypatch.setattr(store.Writer, "write_block", failing)
    with pytest.raises(KeyboardInterrupt):
        probe.collect(model, variables, images, batch_size=3, **kwargs)
    # Blocks do not depend on the batches: another batch size resumes the store.
    s = probe.collect(model, variables, images, batch_size=2, **kwargs)
    assert written == [0, "interrupted", 1, 2]
    assert s.provenance["batch_size"] == 3  # that of the call that started the store
    expected = probe.collect(model, variables, images, layers=["pool"], batch_size=3,
                             progress=False)
    for name, X in s.read_all().items():
        np.testing.assert_allclose(X, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    digest = hashlib.sha256((tmp_path / "acts" / "manifest.json").read_bytes()).hexdigest()
    probe.collect(model, variables, images, batch_size=3, **kwargs)  # finished: no rewrite
    assert written == [0, "interrupted", 1, 2]
    assert hashlib.sha256((tmp_path / "acts" / "manifest.json").read_bytes()).hexdigest() \
        == digest


def test_read_columns_reads_the_given_columns_in_order(tmp_path, views):
    s = store.save(tmp_path / "s", views, block_size=BLOCK)
    idx = [9, 0, 5, 5, 3]  # last, first, middle blocks; a repeat
    got = s.read_columns(idx)
    for name, X in views.items():
        np.testing.assert_array_equal(got[name], X[:, idx])
    assert list(s.read_columns(np.array([2]), views=["conv"])) == ["conv"]
    assert s.read_columns([], views=["red"])["red"].shape == (5, 0)
    b = store.save(tmp_path / "b", views, block_size=BLOCK, dtype="bfloat16")
    np.testing.assert_array_equal(b.read_columns(idx)["red"],
                                  views["red"][:, idx].astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match=r"indices: expected column indices in \[0, 10\), got 10"):
        s.read_columns([1, 10])
    with pytest.raises(ValueError, match="indices: expected a 1-D array of integer"):
        s.read_columns([0.5])
    with pytest.raises(KeyError, match=r"unknown view\(s\) \['blue'\]"):
        s.read_columns([1], views=["blue"])
