"""An on-disk activation store: views of shape ``(rows_v, N)`` kept as column blocks.

For probe sets whose views do not fit in memory: ``jaxcnmf.nets.probe.collect(...,
store=DIR)`` writes the views block by block as it goes (blocks of ``default_block_size``
columns unless told otherwise, each computed in several batches), and
``jaxcnmf.fit(store)`` streams the blocks through the solver
(:mod:`jaxcnmf.solver.streaming`).

Format (version 1), a directory::

    manifest.json              # see below; the only file a reader needs to start
    labels.npy                 # optional (N,) int64 labels of the images
    blocks/BBBBBB-VV.npy       # block B (6 digits) of view number VV (2 digits, manifest order)
    blocks/BBBBBB.json         # written after block B's .npy files (resumable writes only)

Each ``.npy`` file is a plain NumPy array (``np.load(f, mmap_mode="r")`` works, no pickle) of
shape ``(rows_v, stop - start)`` in C order, holding columns ``start:stop`` of view ``v``
with ``start = B * block_size`` and ``stop = min(start + block_size, N)``. ``bfloat16``
blocks are stored as their ``uint16`` bit patterns (the upper half of the float32 bits), so
NumPy reads them without ``ml_dtypes``; :meth:`Store.read_block` returns them as
``ml_dtypes.bfloat16``.

``manifest.json`` holds ``format`` ("jaxcnmf-store"), ``version``, ``n``, ``block_size``,
``n_blocks``, ``dtype`` (a NumPy/JAX dtype name: ``"bfloat16"``, ``"float16"``,
``"float32"``, ``"float64"``), ``views`` (a list of ``{"name", "rows", "shape"}``, shape
being the layer's per-image shape or ``null``), ``labels`` (``{"file", "sha256", "bytes"}``
or ``null``), ``class_names``, ``superclasses``, ``provenance`` (free JSON: checkpoint,
layers, pooling, ...), ``complete`` and, once complete, ``blocks``: per block ``columns``
``[start, stop]`` and ``files``, one ``{"file", "sha256", "bytes"}`` per view.

Every file is written under a temporary name, flushed to disk and renamed, so a block file
is either whole or absent; a block counts as written when its record ``BBBBBB.json``
exists (written, the same way, after its ``.npy`` files). An interrupted writer resumes at
the first missing block. A reader refuses an incomplete store, a missing or truncated file
(sizes are checked on :func:`open`), a tampered file (its SHA-256 is checked the first time
the block is read, and by :meth:`Store.verify`) and a manifest that disagrees with the
files, naming the block, view and file.

Example:
    >>> import numpy as np, tempfile
    >>> from jaxcnmf import store
    >>> views = {"red": np.ones((4, 10), np.float32), "conv": np.zeros((3, 10), np.float32)}
    >>> path = tempfile.mkdtemp() + "/acts"
    >>> s = store.save(path, views, block_size=4)
    >>> s.n, s.n_blocks, s.rows, [a.shape for a in s.read_block(2).values()]
    (10, 3, {'red': 4, 'conv': 3}, [(4, 2), (3, 2)])
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import mmap
import os
import pathlib
import shutil

import ml_dtypes
import numpy as np

FORMAT = "jaxcnmf-store"
VERSION = 1
DTYPES = ("bfloat16", "float16", "float32", "float64")
MANIFEST = "manifest.json"
# The default block holds about this many bytes of all views together: large enough that
# per-block overheads vanish, small enough that a few blocks in flight fit anywhere.
DEFAULT_BLOCK_BYTES = 64 * 2**20

# Fields that must agree between a store being resumed and the writer resuming it.
_IDENTITY = ("n", "block_size", "dtype", "views", "labels", "class_names", "superclasses",
             "provenance")


class StoreError(ValueError):
    """A store on disk is incomplete, damaged, or disagrees with its manifest."""


def _numpy_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _disk_dtype(name):
    """The dtype the ``.npy`` files hold: ``uint16`` bit patterns stand for bfloat16."""
    return np.dtype("<u2") if name == "bfloat16" else np.dtype(name).newbyteorder("<")


def _block_file(block, view_index):
    return f"blocks/{block:06d}-{view_index:02d}.npy"


def _record_file(block):
    return f"blocks/{block:06d}.json"


def _atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` via a flushed temporary file and a rename."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with builtins.open(tmp, "wb") as f:  # this module defines its own open
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _file_record(relative, data):
    return {"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _json_bytes(obj):
    return (json.dumps(obj, indent=1) + "\n").encode()


def _check_dtype(dtype):
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    return name


def default_block_size(total_rows, n, dtype):
    """Columns per block of about ``DEFAULT_BLOCK_BYTES`` of all views, at most ``n``.

    The count is rounded down to rows of an odd number of 64-byte cache lines (4080, not
    4096, float32 columns): the streaming fit reads blocks in place, and rows a power of
    two bytes apart fall into the same cache sets, which made XLA's CPU product ``W^T X``
    1.3-2x slower (``benchmarks/scale.py --streaming``).
    """
    itemsize = _numpy_dtype(dtype).itemsize
    size = max(1, DEFAULT_BLOCK_BYTES // max(1, total_rows * itemsize))
    per_line = 64 // itemsize
    lines = size // per_line
    if lines >= 1:
        lines -= 1 - lines % 2
        size = lines * per_line
    return int(min(size, n))


# ----------------------------------------------------------------------------- reading


class Store:
    """A store opened for reading (see the module docstring for the format).

    Attributes:
        path: the store's directory (``pathlib.Path``).
        views: view names, in order.
        rows: dict view name -> ``rows_v``.
        shapes: dict view name -> per-image layer shape (tuple) or ``None``.
        n: number of images (columns) ``N``.
        dtype: dtype name of the stored values (``"bfloat16"``, ``"float32"``, ...).
        block_size: columns per block (the last block may hold fewer).
        n_blocks: ``ceil(N / block_size)``.
        labels: ``(N,)`` int64 labels or ``None``.
        class_names, superclasses: lists from the manifest, or ``None``.
        provenance: dict from the manifest (checkpoint, layers, pooling, ...).
        manifest: the whole manifest (a dict).

    Example:
        >>> s = store.open("acts/")  # doctest: +SKIP
        >>> for i in range(s.n_blocks):  # doctest: +SKIP
        ...     arrays = s.read_block(i)  # name -> (rows_v, b_i)
    """

    def __init__(self, path, manifest):
        self.path = pathlib.Path(path)
        self.manifest = manifest
        self.views = tuple(v["name"] for v in manifest["views"])
        self.rows = {v["name"]: int(v["rows"]) for v in manifest["views"]}
        self.shapes = {v["name"]: None if v.get("shape") is None else tuple(v["shape"])
                       for v in manifest["views"]}
        self.n = int(manifest["n"])
        self.dtype = manifest["dtype"]
        self.block_size = int(manifest["block_size"])
        self.n_blocks = int(manifest["n_blocks"])
        self.class_names = manifest.get("class_names")
        self.superclasses = manifest.get("superclasses")
        self.provenance = manifest.get("provenance") or {}
        self._verified = set()
        self.labels = None
        if manifest.get("labels"):
            self.labels = np.array(self._mapped(manifest["labels"], "labels", (self.n,),
                                                np.dtype("<i8")))

    def __repr__(self):
        views = ", ".join(f"{name} ({self.rows[name]})" for name in self.views)
        return (f"Store({str(self.path)!r}, N={self.n}, dtype={self.dtype}, "
                f"{self.n_blocks} blocks of {self.block_size}, views: {views})")

    def columns(self, i):
        """``(start, stop)`` of the columns block ``i`` holds."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) \
                or not 0 <= i < self.n_blocks:
            raise IndexError(f"block: expected an integer in [0, {self.n_blocks}), got {i!r}")
        start = int(i) * self.block_size
        return start, min(start + self.block_size, self.n)

    def _mapped(self, record, what, expected_shape, expected_dtype):
        """The file of ``record`` as a read-only memory map, after its checks.

        Size and SHA-256 are checked the first time a file is read through this ``Store``;
        shape and dtype against the manifest every time (they cost nothing).
        """
        path = self.path / record["file"]
        if record["file"] not in self._verified:
            _check_size(self.path, record, what)
            with builtins.open(path, "rb") as f, \
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                digest = hashlib.sha256(data).hexdigest()
            if digest != record["sha256"]:
                raise StoreError(f"store {str(self.path)!r}: {what} ({record['file']}): "
                                 f"SHA-256 differs from the manifest's (the file was "
                                 f"changed or corrupted after it was written)")
            self._verified.add(record["file"])
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise StoreError(f"{what} ({path}): not a valid .npy file: {err}") from err
        _check_header(array.shape, array.dtype, path, what, expected_shape, expected_dtype)
        return array

    def read_block(self, i, views=None):
        """The arrays of block ``i``, memory-mapped from its files (no copy is made).

        The first read of each file in this ``Store`` checks its size and SHA-256 against
        the manifest; later reads map the file without hashing it again. Copy an array
        (``np.array``) to keep it beyond the store's life on disk.

        Args:
            i: block index in ``[0, n_blocks)``.
            views: view names to read (default all, in store order).

        Returns:
            dict view name -> read-only ``(rows_v, stop - start)`` array of :attr:`dtype`
            (``ml_dtypes.bfloat16`` for bfloat16 stores).

        Raises:
            StoreError: a file is truncated, tampered with, or disagrees with the manifest
                (shape or dtype); the message names the block, view and file.

        Example:
            >>> arrays = s.read_block(0)  # doctest: +SKIP
        """
        start, stop = self.columns(i)
        names = self.views if views is None else tuple(views)
        unknown = [name for name in names if name not in self.rows]
        if unknown:
            raise KeyError(f"views: unknown view(s) {unknown}, expected names among "
                           f"{list(self.views)}")
        files = self.manifest["blocks"][i]["files"]
        out = {}
        for name in names:
            array = self._mapped(files[self.views.index(name)], f"block {i} of view {name!r}",
                                 (self.rows[name], stop - start), _disk_dtype(self.dtype))
            out[name] = array.view(_numpy_dtype(self.dtype)) if self.dtype == "bfloat16" \
                else array
        return out

    def blocks(self, view=None):
        """Iterate over the blocks in order.

        Args:
            view: a view name: yield its ``(rows_v, b_i)`` arrays; ``None``: yield the dict
                of all views of each block (as :meth:`read_block`).

        Example:
            >>> total = sum(float(b.sum()) for b in s.blocks("conv"))  # doctest: +SKIP
        """
        for i in range(self.n_blocks):
            if view is None:
                yield self.read_block(i)
            else:
                yield self.read_block(i, views=(view,))[view]

    def read_columns(self, indices, views=None):
        """Given columns (images) of some views, reading only the blocks that hold them.

        For the analyses that need a few images' values (top images of a concept, a random
        subset for fidelity): memory is the result plus one block per view at a time.

        Args:
            indices: int array-like ``(n,)`` of column indices in ``[0, N)``, any order,
                repeats allowed.
            views: view names to read (default all, in store order).

        Returns:
            dict view name -> ``(rows_v, n)`` array of :attr:`dtype` (a copy), column ``j``
            being column ``indices[j]`` of the view.

        Raises:
            ValueError: ``indices`` not 1-D integers or out of range.
            KeyError: an unknown view name (named).

        Example:
            >>> top = s.read_columns([7, 3, 41], views=["red"])["red"]  # doctest: +SKIP
            >>> top.shape  # doctest: +SKIP
            (1024, 3)
        """
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices: expected a 1-D array of integer column indices, got "
                             f"shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            bad = int(idx[(idx < 0) | (idx >= self.n)][0])
            raise ValueError(f"indices: expected column indices in [0, {self.n}), got {bad}")
        names = self.views if views is None else tuple(views)
        unknown = [name for name in names if name not in self.rows]
        if unknown:
            raise KeyError(f"views: unknown view(s) {unknown}, expected names among "
                           f"{list(self.views)}")
        out = {name: np.empty((self.rows[name], idx.size), _numpy_dtype(self.dtype))
               for name in names}
        which = idx // self.block_size
        for i in np.unique(which):
            here = np.flatnonzero(which == i)
            start, _ = self.columns(int(i))
            for name, array in self.read_block(int(i), views=names).items():
                out[name][:, here] = array[:, idx[here] - start]
        return out

    def read_all(self, views=None):
        """Whole views in memory, ``(rows_v, N)`` each (for stores that fit in memory).

        Example:
            >>> views = s.read_all()  # doctest: +SKIP
        """
        names = self.views if views is None else tuple(views)
        out = {name: np.empty((self.rows[name], self.n), _numpy_dtype(self.dtype))
               for name in names}
        for i in range(self.n_blocks):
            start, stop = self.columns(i)
            for name, array in self.read_block(i, views=names).items():
                out[name][:, start:stop] = array
        return out

    def verify(self):
        """Check the size and SHA-256 of every file (one full read of the store).

        Raises:
            StoreError: naming the first damaged block, view and file.
        """
        for i in range(self.n_blocks):
            self.read_block(i)


def _check_header(shape, dtype, path, what, expected_shape, expected_dtype):
    if tuple(shape) != tuple(expected_shape):
        raise StoreError(f"{what} ({path}): expected shape {tuple(expected_shape)} from the "
                         f"manifest, got {tuple(shape)}")
    if np.dtype(dtype) != expected_dtype:
        raise StoreError(f"{what} ({path}): expected dtype {expected_dtype.str} from the "
                         f"manifest, got {np.dtype(dtype).str}")


def _load_manifest(path):
    path = pathlib.Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"store {str(path)!r}: expected a directory holding "
                                f"{MANIFEST}, found none")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:
        raise StoreError(f"store {str(path)!r}: {MANIFEST} is not valid JSON: {err}") from err
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest, path):
    """Types and consistency of the manifest's fields; errors name the field."""
    where = f"store {str(path)!r}: manifest field"

    def need(field, ok, expected):
        if field not in manifest or not ok(manifest[field]):
            got = repr(manifest[field]) if field in manifest else "nothing"
            raise StoreError(f"{where} {field!r}: expected {expected}, got {got}")

    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    need("format", lambda x: x == FORMAT, repr(FORMAT))
    need("version", lambda x: x == VERSION, VERSION)
    need("n", positive_int, "a positive integer")
    need("block_size", positive_int, "a positive integer")
    need("dtype", lambda x: x in DTYPES, f"one of {list(DTYPES)}")
    need("views", lambda x: isinstance(x, list) and x and all(
        isinstance(v, dict) and isinstance(v.get("name"), str) and positive_int(v.get("rows"))
        for v in x), "a non-empty list of {'name': str, 'rows': int >= 1, 'shape': ...}")
    names = [v["name"] for v in manifest["views"]]
    if len(set(names)) != len(names):
        raise StoreError(f"{where} 'views': expected distinct names, got {names}")
    n_blocks = -(-manifest["n"] // manifest["block_size"])
    need("n_blocks", lambda x: x == n_blocks,
         f"ceil(n / block_size) = {n_blocks} (n={manifest['n']}, "
         f"block_size={manifest['block_size']})")
    need("complete", lambda x: isinstance(x, bool), "true or false")
    if manifest["complete"]:
        need("blocks", lambda x: isinstance(x, list) and len(x) == n_blocks,
             f"a list of {n_blocks} block records")
        for i, record in enumerate(manifest["blocks"]):
            start = i * manifest["block_size"]
            columns = [start, min(start + manifest["block_size"], manifest["n"])]
            if record.get("columns") != columns:
                raise StoreError(f"{where} 'blocks'[{i}]: expected columns {columns}, got "
                                 f"{record.get('columns')!r}")
            files = record.get("files")
            if not isinstance(files, list) or len(files) != len(names):
                raise StoreError(f"{where} 'blocks'[{i}]: expected one file record per view "
                                 f"({len(names)}), got {files!r}")


def open(path):
    """Open a complete store for reading.

    Checks the manifest's fields and that every block file exists with its recorded size;
    contents are checked (SHA-256) the first time each block is read.

    Args:
        path: the store's directory.

    Returns:
        :class:`Store`.

    Raises:
        FileNotFoundError: no manifest at ``path``.
        StoreError: the store is incomplete (the first missing block is named), a manifest
            field is invalid (named), or a block file is missing or has the wrong size
            (block, view and file named).

    Example:
        >>> s = store.open("acts/")  # doctest: +SKIP
        >>> s.views, s.n, s.dtype  # doctest: +SKIP
    """
    path = pathlib.Path(path)
    manifest = _load_manifest(path)
    if not manifest["complete"]:
        written = _written_blocks(path, manifest)
        missing = [i for i in range(manifest["n_blocks"]) if i not in written]
        raise StoreError(
            f"store {str(path)!r} is incomplete: {manifest['n_blocks'] - len(missing)} of "
            f"{manifest['n_blocks']} blocks written, first missing block "
            f"{missing[0] if missing else 'none (not finished)'}; resume writing with "
            f"store.Writer or probe.collect(store=...)")
    names = [v["name"] for v in manifest["views"]]
    for i, record in enumerate(manifest["blocks"]):
        for name, file in zip(names, record["files"]):
            _check_size(path, file, f"block {i} of view {name!r}")
    if manifest.get("labels"):
        _check_size(path, manifest["labels"], "labels")
    return Store(path, manifest)


def _check_size(path, record, what):
    file = path / record["file"]
    if not file.is_file():
        raise StoreError(f"store {str(path)!r}: {what}: file {record['file']} is missing")
    size = file.stat().st_size
    if size != record["bytes"]:
        raise StoreError(f"store {str(path)!r}: {what} ({record['file']}): expected "
                         f"{record['bytes']} bytes as recorded in the manifest, got {size} "
                         f"(truncated or half-written)")


def _written_blocks(path, manifest):
    """Block index -> its record, for every block whose record and files are all whole."""
    written = {}
    for i in range(manifest["n_blocks"]):
        file = path / _record_file(i)
        if not file.is_file():
            continue
        try:
            record = json.loads(file.read_text())
        except ValueError:
            continue
        files = record.get("files", [])
        if len(files) == len(manifest["views"]) and all(
                (path / f["file"]).is_file()
                and (path / f["file"]).stat().st_size == f["bytes"] for f in files):
            written[i] = record
    return written


# ----------------------------------------------------------------------------- writing


def _jsonable(value, label):
    if value is None:
        return None
    try:
        return json.loads(json.dumps(value))
    except TypeError as err:
        raise ValueError(f"{label}: expected JSON-serialisable values, got {err}") from err


class Writer:
    """Writes a store block by block; resumes a store left unfinished at ``path``.

    Args:
        path: the store's directory (created if missing).
        views: dict view name -> ``rows_v`` (int), in store order.
        n: number of images ``N``.
        block_size: columns per block; default about 64 MiB of all views per block.
        dtype: stored dtype name, one of ``DTYPES`` (values are rounded to it on write).
        shapes: optional dict view name -> per-image layer shape, for the manifest.
        labels: optional ``(N,)`` integer labels.
        class_names, superclasses: optional lists of names (JSON).
        provenance: optional JSON dict (checkpoint, layers, pooling, ...).

    If ``path`` already holds a store with the same manifest fields, writing resumes:
    :attr:`missing` lists the blocks still to write. A store with different fields is
    refused (the field is named); so is a non-empty directory that is not a store.

    Example:
        >>> w = store.Writer("acts/", {"red": 1024, "conv": 512}, n=10_000,
        ...                  block_size=256)  # doctest: +SKIP
        >>> for i in w.missing:  # doctest: +SKIP
        ...     start, stop = w.columns(i)
        ...     w.write_block(i, {"red": R[:, start:stop], "conv": A[:, start:stop]})
        >>> s = w.finish()  # doctest: +SKIP
    """

    def __init__(self, path, views, n, *, block_size=None, dtype="float32", shapes=None,
                 labels=None, class_names=None, superclasses=None, provenance=None):
        self.path = pathlib.Path(path)
        if not isinstance(views, dict) or not views:
            raise ValueError(f"views: expected a non-empty dict name -> rows, got {views!r}")
        for name, rows in views.items():
            if not isinstance(name, str) or isinstance(rows, bool) \
                    or not isinstance(rows, (int, np.integer)) or rows < 1:
                raise ValueError(f"views[{name!r}]: expected a str name and rows >= 1, "
                                 f"got {rows!r}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected an integer >= 1, got {n!r}")
        n = int(n)
        dtype = _check_dtype(dtype)
        if block_size is None:
            block_size = default_block_size(sum(int(r) for r in views.values()), n, dtype)
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
                or block_size < 1:
            raise ValueError(f"block_size: expected an integer >= 1, got {block_size!r}")
        shapes = shapes or {}
        self._labels = None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels: expected ({n},) integers, got shape "
                                 f"{labels.shape} dtype {labels.dtype}")
            self._labels = _npy_bytes(labels.astype("<i8"))
        manifest = {
            "format": FORMAT, "version": VERSION, "n": n, "block_size": int(block_size),
            "n_blocks": -(-n // int(block_size)), "dtype": dtype,
            "views": [{"name": name, "rows": int(rows),
                       "shape": None if shapes.get(name) is None
                       else [int(s) for s in shapes[name]]}
                      for name, rows in views.items()],
            "labels": None if self._labels is None else _file_record("labels.npy",
                                                                     self._labels),
            "class_names": _jsonable(class_names, "class_names"),
            "superclasses": _jsonable(superclasses, "superclasses"),
            "provenance": _jsonable(provenance, "provenance") or {},
            "complete": False,
        }
        self.manifest = manifest
        self.n_blocks = manifest["n_blocks"]
        self._records = self._start()

    def _start(self):
        path = self.path
        if (path / MANIFEST).is_file():
            existing = _load_manifest(path)
            for field in _IDENTITY:
                if existing.get(field) != self.manifest[field]:
                    raise StoreError(
                        f"store {str(path)!r}: cannot resume: manifest field {field!r} is "
                        f"{existing.get(field)!r} on disk, expected {self.manifest[field]!r} "
                        f"for this write; use another directory or delete the store")
            if existing["complete"]:
                self.manifest = existing
                return {i: r for i, r in enumerate(existing["blocks"])}
            return _written_blocks(path, existing)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"store {str(path)!r}: expected a missing or empty "
                                  f"directory or an unfinished store, got a non-empty "
                                  f"directory without {MANIFEST}")
        (path / "blocks").mkdir(parents=True, exist_ok=True)
        if self._labels is not None:
            _atomic_write(path / "labels.npy", self._labels)
        _atomic_write(path / MANIFEST, _json_bytes(self.manifest))
        return {}

    @property
    def missing(self):
        """Indices of the blocks not yet written, in order."""
        return [i for i in range(self.n_blocks) if i not in self._records]

    @property
    def complete(self):
        return bool(self.manifest["complete"])

    def columns(self, i):
        """``(start, stop)`` of the columns block ``i`` holds."""
        start = i * self.manifest["block_size"]
        return start, min(start + self.manifest["block_size"], self.manifest["n"])

    def write_block(self, i, arrays):
        """Write block ``i``: every view's ``(rows_v, stop - start)`` columns.

        Values are rounded to the store's dtype. Each file is written to a temporary name
        and renamed; the block's record follows its files, so an interruption leaves the
        block whole or absent.

        Args:
            i: block index in ``[0, n_blocks)``.
            arrays: dict view name -> array-like ``(rows_v, stop - start)`` (NumPy or JAX).

        Raises:
            ValueError: unknown or missing view, wrong shape, or the store is complete.
        """
        if self.complete:
            raise ValueError(f"store {str(self.path)!r} is complete; expected an unfinished "
                             f"store to write block {i} into")
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) \
                or not 0 <= i < self.n_blocks:
            raise ValueError(f"block: expected an integer in [0, {self.n_blocks}), got {i!r}")
        i = int(i)
        names = [v["name"] for v in self.manifest["views"]]
        if set(arrays) != set(names):
            raise ValueError(f"arrays: expected exactly the views {names}, got "
                             f"{list(arrays)}")
        start, stop = self.columns(i)
        stored = _numpy_dtype(self.manifest["dtype"])
        files = []
        for index, view in enumerate(self.manifest["views"]):
            array = np.asarray(arrays[view["name"]])
            expected = (view["rows"], stop - start)
            if array.shape != expected:
                raise ValueError(f"arrays[{view['name']!r}] of block {i}: expected shape "
                                 f"{expected}, got {array.shape}")
            array = array.astype(stored, copy=False)
            if self.manifest["dtype"] == "bfloat16":
                array = array.view(np.uint16)
            data = _npy_bytes(array.astype(_disk_dtype(self.manifest["dtype"]), copy=False))
            relative = _block_file(i, index)
            _atomic_write(self.path / relative, data)
            files.append(_file_record(relative, data))
        record = {"columns": [start, stop], "files": files}
        _atomic_write(self.path / _record_file(i), _json_bytes(record))
        self._records[i] = record

    def finish(self):
        """Mark the store complete (all block records into the manifest) and open it.

        Returns:
            :class:`Store`.

        Raises:
            StoreError: blocks are still missing (the first is named).
        """
        if not self.complete:
            missing = self.missing
            if missing:
                raise StoreError(f"store {str(self.path)!r}: cannot finish: "
                                 f"{len(missing)} block(s) missing, first missing block "
                                 f"{missing[0]}")
            manifest = dict(self.manifest, complete=True,
                            blocks=[self._records[i] for i in range(self.n_blocks)])
            _atomic_write(self.path / MANIFEST, _json_bytes(manifest))
            self.manifest = manifest
            # The manifest now holds every record; the per-block files were for resuming.
            for i in range(self.n_blocks):
                (self.path / _record_file(i)).unlink(missing_ok=True)
        return open(self.path)


def save(path, views, *, labels=None, block_size=None, dtype=None, shapes=None,
         class_names=None, superclasses=None, provenance=None, overwrite=False):
    """Write in-memory views to a new store.

    Args:
        path: directory to create (must be missing or empty unless ``overwrite``).
        views: dict name -> ``(rows_v, N)`` array (NumPy, JAX or anything ``np.asarray``
            takes), all with the same ``N``.
        labels: optional ``(N,)`` integer labels.
        block_size: columns per block; default about 64 MiB of all views per block.
        dtype: stored dtype name; default the views' dtype when it is one of ``DTYPES``,
            else ``"float32"``.
        shapes, class_names, superclasses, provenance: manifest metadata (see
            :class:`Writer`).
        overwrite: replace an existing store at ``path``.

    Returns:
        :class:`Store` opened on the result.

    Example:
        >>> s = store.save("small/", {"red": D, "conv": A}, labels=y)  # doctest: +SKIP
    """
    if not isinstance(views, dict) or not views:
        raise ValueError(f"views: expected a non-empty dict name -> (rows, N) array, got "
                         f"{type(views).__name__}")
    arrays = {}
    for name, X in views.items():
        shape = np.shape(X)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"view {name!r}: expected a 2-D array (rows, N), got shape "
                             f"{shape}")
        arrays[name] = X
    n = np.shape(next(iter(arrays.values())))[1]
    for name, X in arrays.items():
        if np.shape(X)[1] != n:
            raise ValueError(f"view {name!r}: expected N={n} columns as the first view, got "
                             f"{np.shape(X)[1]}")
    if dtype is None:
        first = np.dtype(getattr(next(iter(arrays.values())), "dtype", np.float32)).name
        dtype = first if first in DTYPES else "float32"
    path = pathlib.Path(path)
    if (path / MANIFEST).is_file():
        if not overwrite:
            raise FileExistsError(f"store {str(path)!r} exists; pass overwrite=True to "
                                  f"replace it")
        _load_manifest(path)  # only a store is ever removed
        shutil.rmtree(path)
    writer = Writer(path, {name: np.shape(X)[0] for name, X in arrays.items()}, n,
                    block_size=block_size, dtype=dtype, shapes=shapes, labels=labels,
                    class_names=class_names, superclasses=superclasses,
                    provenance=provenance)
    for i in writer.missing:
        start, stop = writer.columns(i)
        writer.write_block(i, {name: X[:, start:stop] for name, X in arrays.items()})
    return writer.finish()
