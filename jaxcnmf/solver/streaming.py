"""Streaming coupled NMF over an on-disk store: every iteration reads each column block once.

The ``F`` update is column-separable given the Grams (:mod:`jaxcnmf.solver.core`), so one
outer iteration of MU or HALS is one pass over the column blocks ``X_b`` of the store:

1. before the pass: ``G = sum_v w_v W_v^T W_v`` ``(rank, rank)``;
2. per block: ``B_b = sum_v w_v W_v^T X_vb``, ``F_b <- update(F_b, B_b, G)``, then add
   ``X_vb F_b^T`` to ``A_v`` ``(rows_v, rank)`` and ``F_b F_b^T`` to ``C`` before the block
   leaves memory;
3. after the pass: every ``W_v <- update(W_v, A_v, C)`` (the unit-ball step of
   ``core._update_W_ball`` when ``unit_columns`` meets ``F`` penalties), the objective and
   the KKT violation, from the same terms as :func:`jaxcnmf.solver.core.step`.

That is exactly the order of ``core.step`` (``F`` first, then the loadings from the new
``F``), with the same update functions, so the iterates equal the in-memory fit's up to the
order of floating-point summation over blocks. With ``unit_columns`` the rescaling of ``F``
is applied to each block when the next pass reads it (the same product as in memory).
The ``F`` block's KKT violation is column-separable (its step depends on ``G`` only), so it
is summed over the blocks; the loadings' needs ``A_v`` and ``C`` and is taken at the end
of the pass. The stop is the in-memory one: violation at most ``tol`` times its first value.

The problem is rescaled as in memory (:func:`jaxcnmf.solver.fit._internal_problem`): a
first pass takes every view's largest entry and norm, blocks are divided by the largest
entry of all views as they are read, and the objective by the weighted data norm; the
result is mapped back, and its objective and relative errors come from the residuals (one
more pass), as ``core.residual_objective`` gives them in memory.

Only ``F`` ``(rank, N)``, the loadings, ``A_v`` and a few blocks in flight are in memory.
Blocks are read (and checksummed, the first time) on a background thread, memory-mapped
in place where they can be (else padded to one chunk shape: padded columns of ``F`` are
held at zero, so they change no sum) and put on the device ahead of use; the host waits
for step ``j - 1`` after dispatching step ``j``, so at most ``_PREFETCH + 2`` chunks per
device exist at once.

With a mesh (``fit(store, ..., mesh=mesh)``) the columns are split over its devices as in
the in-memory sharded fit (:class:`_Layout`): every step of a pass gives each device one
chunk of its own columns, each device keeps its part of ``F`` and its own ``A_v``, ``C``
(``shard_map``: nothing crosses devices during the pass), and the devices' sums are added
once at the end of the pass. With ``jax.distributed`` each process reads only its own
devices' columns. Without a mesh it is the same code on one device.

The group lasso needs every group's columns within one chunk (a store block without a
mesh; ``fit`` refuses a group across chunks, naming it): the ``F`` sub-problem is separable
over groups, so each chunk takes the monotone FISTA step of ``core._fista_F`` on its own
(the same step size, from ``G``). Its keep-the-best tests see the chunk's part of the
sub-problem objective, not all columns' as in memory, so with several chunks the iterates
differ from the in-memory ones (each step still does not increase the objective); with one
chunk they are the same. ``group_lam_fraction`` takes ``lambda_max`` from one more pass
(``B`` at the unit-column starting loadings, per group, as ``fit._group_lam_max_internal``).

Not supported here (a clear error): several restarts.

Example:
    >>> import numpy as np, tempfile, jaxcnmf
    >>> from jaxcnmf import store
    >>> rng = np.random.default_rng(0)
    >>> views = {"red": rng.random((20, 50), dtype=np.float32),
    ...          "conv": rng.random((10, 50), dtype=np.float32)}
    >>> s = store.save(tempfile.mkdtemp() + "/acts", views, block_size=16)
    >>> res = jaxcnmf.fit(s, rank=3, init="random", max_iter=5, progress=False)  # doctest: +SKIP
    >>> res.F.shape  # doctest: +SKIP
    (3, 50)
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxcnmf.solver import core, initialization, sharding
from jaxcnmf.solver import fit as _front
from jaxcnmf.solver.store import Store, _numpy_dtype

# Blocks read ahead of the one being computed: two hide the read of the next block behind
# the compute of this one (double buffering) without growing memory further.
_PREFETCH = 2
_MODES = {"raise": "none", "clip": "clip", "shift": "shift"}
# Bytes of all views' stored values that one step of a pass reads per device: the store's
# blocks are taken together up to this size (a store written by ``probe.collect`` has
# blocks of one batch, a few MiB), so that each compiled step has enough work to hide
# its launch and the products run at the speed of the whole-matrix ones. About
# ``_PREFETCH + 2`` chunks per device are in memory at once; lower it to use less.
CHUNK_BYTES = 64 << 20
# The same on an accelerator, where a step's launch and host sync cost more against its
# compute, and the transfer (not the host's copy) bounds a pass read from the host.
ACCELERATOR_CHUNK_BYTES = 512 << 20
# Most store blocks a chunk holds as separate pieces, in place (see _Layout); smaller
# blocks are copied together (a step over more pieces would compile for longer).
_PIECES = 16
# Cache line: a chunk's rows are laid out an odd number of lines apart (see _width).
_LINE = 64


def _width(cols, itemsize):
    """Columns of a chunk's buffer holding ``cols`` columns of ``itemsize`` bytes.

    Rows a power of two bytes apart (``cols`` = 2048 float32, 8 KiB) fall into the same
    cache sets, and XLA's CPU product ``W^T X`` contracting over them ran 1.3-2x slower
    than with rows a few lines further apart (benchmarks/scale.py); so the row length is
    rounded up to an odd number of cache lines, the extra columns zero (like padding).
    """
    lines = -(-cols * itemsize // _LINE)
    lines += 1 - lines % 2
    return max(cols, lines * _LINE // itemsize)


# ----------------------------------------------------------------------------- layout


class _Layout:
    """Which columns each device streams, and the pieces ``F``-sized arrays are kept in.

    Device ``d`` of the 1-D mesh owns the columns ``[d * c, min((d + 1) * c, N))``,
    ``c = ceil(N / D)``, as in the in-memory sharded fit (:mod:`jaxcnmf.solver.sharding`),
    and reads them in chunks of ``cols`` columns: step ``j`` of a pass gives every device
    its ``j``-th chunk at once, so one step is a ``(rows_v, D * b)`` array split over the
    mesh. A chunk holds as many whole store blocks as fit in :data:`CHUNK_BYTES`
    (:data:`ACCELERATOR_CHUNK_BYTES` on an accelerator), at most ``c`` columns, and one
    block when that holds at least a quarter of it: without a mesh its boundaries are
    block boundaries; with one it may also take a device's boundary block only in part.

    * One block: used in place as stored (``b = cols``).
    * Two to :data:`_PIECES` blocks on one device (``pieces``; not for the group lasso):
      each block in place, the chunk a tuple of them per view (``b = cols``).
    * Otherwise the blocks are copied into a buffer ``b >= cols`` columns wide
      (:func:`_width`: rows an odd number of cache lines apart).

    Columns past the chunk's are zero padding, as are chunks past a device's columns. ``F``
    is a list of ``steps`` ``(rank, D * b)`` pieces, each device holding its own columns
    only. Without a mesh this is one device, and a short last chunk is used in place too:
    the kernels take blocks ``w <= b`` wide (:meth:`width`) with ``F`` pieces ``b`` wide,
    zero past ``w``.
    """

    def __init__(self, store, mesh, itemsize, pieces=True):
        self.mesh = mesh
        self.axis = mesh.axis_names[0]
        self.devices = list(mesh.devices.flat)
        self.count = len(self.devices)
        self.n = store.n
        self.c = -(-store.n // self.count)
        column_bytes = sum(store.rows.values()) * itemsize
        block_bytes = max(1, column_bytes * store.block_size)
        target = CHUNK_BYTES if self.devices[0].platform == "cpu" else ACCELERATOR_CHUNK_BYTES
        ratio = target // block_bytes
        # On one device, up to _PIECES blocks taken together stay in place as the pieces
        # of their chunk (the iteration's step runs over them in one call; the other
        # passes join them on the device): copying them every pass cost more than the
        # products. Not for the group lasso, whose F step needs a group's columns together.
        self.pieces = self.count == 1 and pieces and 2 <= ratio <= _PIECES \
            and store.block_size < self.c
        # Else a block of at least a quarter of the target is a chunk, used in place.
        per_chunk = ratio if self.pieces or 4 * block_bytes < target else 1
        self.block_size = store.block_size
        self.cols = min(per_chunk * store.block_size, self.c)
        # Blocks taken together otherwise are copied into a new buffer, laid out well; a
        # block on its own is used in place as stored.
        self.b = self.cols if per_chunk == 1 or self.pieces else _width(self.cols, itemsize)
        self.steps = -(-self.c // self.cols)
        # On one device with blocks used in place, the last chunk (a short last block, or
        # fewer pieces) is used in place too, at its own width: padding it to b would copy
        # it every pass.
        self.short_last = self.count == 1 and (per_chunk == 1 or self.pieces)
        me = jax.process_index()
        self.local = [d for d, device in enumerate(self.devices) if device.process_index == me]
        # Chunks kept on the devices between passes (set by keep_on_devices).
        self.chunk_bytes = column_bytes * self.b
        self.keep, self.kept = 0, {}
        self.reader = None  # the fit's _Reader, started by the first pass

    def close(self):
        """Stop the background reader (the end of a fit, or a pass left before its end)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def keep_on_devices(self, cache_bytes):
        """Keep the first steps' chunks on the devices, at most ``cache_bytes`` per device
        (None: none on a CPU, whose device reads the blocks in place from the page
        cache; else half of the memory free on this process's fullest device)."""
        if cache_bytes is None:
            cache_bytes = 0
            if self.devices[self.local[0]].platform != "cpu":
                free = []
                for d in self.local:
                    stats = self.devices[d].memory_stats() or {}
                    if "bytes_limit" in stats:
                        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
                cache_bytes = min(free) // 2 if free else 0
        self.keep = min(self.steps, int(cache_bytes) // max(1, self.chunk_bytes))
        return self.keep

    def sharding(self, spec):
        return NamedSharding(self.mesh, spec)

    def width(self, j):
        """Columns of step ``j``'s blocks per device: ``b``, or fewer for a short last
        chunk used in place (the kernels take ``F``-sized pieces ``b`` wide all the same)."""
        if self.short_last and j == self.steps - 1:
            start, stop = self.span(0, j)
            return stop - start
        return self.b

    def span(self, d, j):
        """``(start, stop)`` of device ``d``'s chunk ``j`` (``stop == start``: padding)."""
        start = d * self.c + j * self.cols
        return start, max(start, min(start + self.cols, (d + 1) * self.c, self.n))

    def global_array(self, shape, spec, pieces):
        """A global array from this process's per-device pieces (in ``self.local`` order)."""
        arrays = [jax.device_put(x, self.devices[d]) for d, x in zip(self.local, pieces)]
        return jax.make_array_from_single_device_arrays(shape, self.sharding(spec), arrays)

    def per_device(self, host):
        """``(D, *host.shape)`` zeros-like copies of ``host``, one per device (sums)."""
        host = np.asarray(host)
        return self.global_array((self.count,) + host.shape, P(self.axis),
                                 [host[None] for _ in self.local])

    def replicated(self, x):
        return jax.device_put(np.asarray(x), self.sharding(P()))

    def place(self, host, axis, dtype):
        """An array with ``N`` along ``axis`` as the list of ``steps`` pieces (this
        process's columns only), zero on padding."""
        host = np.moveaxis(np.asarray(host), axis, -1)
        spec = [None] * host.ndim
        spec[axis] = self.axis
        shape = list(host.shape[:-1])
        shape.insert(axis, self.count * self.b)
        shape = tuple(shape)
        parts = []
        for j in range(self.steps):
            pieces = []
            for d in self.local:
                start, stop = self.span(d, j)
                piece = np.zeros(host.shape[:-1] + (self.b,), dtype)
                piece[..., :stop - start] = host[..., start:stop]
                pieces.append(np.moveaxis(piece, -1, axis))
            parts.append(self.global_array(shape, P(*spec), pieces))
        return parts

    def gather(self, parts, axis):
        """The host array of ``N`` columns (along ``axis``) from :meth:`place`'s pieces,
        gathered from every process."""
        stacked = np.moveaxis(np.asarray(jax.device_get(_replicate(parts, self.mesh))),
                              axis + 1, -1)
        out = np.zeros(stacked.shape[1:-1] + (self.n,), stacked.dtype)
        for d in range(self.count):
            for j in range(self.steps):
                start, stop = self.span(d, j)
                out[..., start:stop] = stacked[j, ..., d * self.b:d * self.b + stop - start]
        return np.moveaxis(out, -1, axis)

    def padded(self, parts):
        """``(rank, D * c)`` split over the columns like the in-memory sharded fit's ``F``,
        from the pieces, each device concatenating its own (no communication)."""
        pieces = []
        for d in self.local:
            own = [next(s.data for s in part.addressable_shards
                        if s.device == self.devices[d]) for part in parts]
            own = [x[:, :self.cols] for x in own]
            pieces.append(jnp.concatenate(own, axis=1)[:, :self.c])
        return self.global_array((parts[0].shape[0], self.count * self.c),
                                 P(None, self.axis), pieces)


@functools.partial(jax.jit, static_argnames="mesh")
def _replicate(parts, mesh):
    return jax.lax.with_sharding_constraint(jnp.stack(parts), NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames="mesh")
def _total(per_device, mesh):
    """Sum over the leading (device) axis, replicated."""
    return jax.tree_util.tree_map(
        lambda a: jax.lax.with_sharding_constraint(jnp.sum(a, axis=0),
                                                   NamedSharding(mesh, P())), per_device)


def _shard_map(mesh, local, in_specs, out_specs):
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# ----------------------------------------------------------------------------- reading


# Host arrays at this alignment are used by the CPU device in place (``device_put`` makes
# no copy); others are copied once more.
_ALIGN = 64


def _aligned_zeros(shape, dtype):
    """A zero ``shape`` array of ``dtype`` whose data starts on an ``_ALIGN``-byte bound."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


def _host_chunk(store, start, stop, names, storage, width):
    """Columns ``start:stop`` of the views as ``(rows_v, width)`` host arrays, zero-padded.

    A chunk that is one whole block of the storage dtype is its memory map, not copied
    (its data is 64-byte aligned in the file, so a CPU device reads the pages in place and
    an accelerator's transfer reads them once). Any other chunk (padded, spanning blocks or
    converted to another dtype) is assembled in one copy into an aligned buffer.
    """
    storage = _numpy_dtype(storage)
    pieces = {name: [] for name in names}
    if stop > start:
        b = store.block_size
        for i in range(start // b, (stop - 1) // b + 1):
            first = i * b
            arrays = store.read_block(i, views=names)
            for name in names:
                pieces[name].append(arrays[name][:, max(start, first) - first:
                                                  min(stop, first + b) - first])
    out = []
    for name in names:
        parts = pieces[name]
        if len(parts) == 1 and parts[0].shape[1] == width and parts[0].dtype == storage \
                and parts[0].ctypes.data % _ALIGN == 0:
            out.append(parts[0])
            continue
        X = _aligned_zeros((store.rows[name], width), storage)
        at = 0
        for part in parts:
            X[:, at:at + part.shape[1]] = part  # converted to the storage dtype here
            at += part.shape[1]
        out.append(X)
    return tuple(out)


class _Reader:
    """One background thread reading the chunks of every pass of a fit, in pass order.

    Every pass (statistics, initialisation, iterations, residuals) reads the same chunks
    in the same order, so the thread runs on from one pass into the next: the first chunks
    of pass ``p + 1`` are read, verified (the first time), padded and sent to the devices
    while the end of pass ``p`` is computed. It stays at most ``_PREFETCH`` chunks ahead.
    Chunks ``j < layout.keep`` are read in the first pass only (later passes take them
    from ``layout.kept``). :meth:`close` stops it.
    """

    def __init__(self, store, layout, names, storage):
        self.ready = queue.Queue(maxsize=_PREFETCH)
        self.stop = threading.Event()
        self.passes = 0  # passes started by the consumer
        self.last = None  # the index of the fit's last pass, once known (see finish)
        skip_first = set(layout.kept)  # kept by an earlier reader: not read again
        valid = {}  # step -> (D,) real columns of each device's chunk

        def put(item):
            while not self.stop.is_set():
                try:
                    self.ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def read(j):
            spans = [layout.span(d, j) for d in layout.local]
            if layout.pieces:  # one device: its chunk's blocks in place, as pieces
                (a, z), = spans
                b = store.block_size
                parts = [_host_chunk(store, i * b, min((i + 1) * b, z), names, storage,
                                     min((i + 1) * b, z) - i * b)
                         for i in range(a // b, -(-z // b))]
                blocks = tuple(tuple(layout.global_array(X.shape, P(None, layout.axis), [X])
                                     for X in (part[v] for part in parts))
                               for v in range(len(names)))
            else:
                width = layout.width(j)
                chunks = [_host_chunk(store, a, z, names, storage, width) for a, z in spans]
                blocks = tuple(layout.global_array((store.rows[name], layout.count * width),
                                                   P(None, layout.axis), [c[v] for c in chunks])
                               for v, name in enumerate(names))
            if j not in valid:  # the same every pass: sent to the devices once
                valid[j] = layout.global_array((layout.count,), P(layout.axis),
                                               [np.array([z - a], np.int32) for a, z in spans])
            return j, blocks, valid[j]

        def work():
            try:
                skip = skip_first
                cycle = 0
                while not self.stop.is_set():
                    for j in range(layout.steps):
                        if self.stop.is_set():
                            return
                        if j not in skip:
                            put(read(j))
                    skip = set(range(layout.keep))
                    if len(skip) == layout.steps or (self.last is not None
                                                     and cycle >= self.last):
                        return
                    cycle += 1
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                put(err)

        self.thread = threading.Thread(target=work, name="jaxcnmf-store-reader", daemon=True)
        self.thread.start()

    def get(self, j):
        item = self.ready.get()
        if isinstance(item, BaseException):
            raise item
        if item[0] != j:  # cannot happen while passes are read whole (see _stream)
            raise RuntimeError(f"store reader out of step: chunk {item[0]}, expected {j}")
        return item

    def finish(self, passes_left):
        """Read no further than ``passes_left`` more passes (counting the one under way)."""
        self.last = self.passes + passes_left - 1

    def close(self):
        self.stop.set()
        self.thread.join()


def _stream(store, layout, names, storage):
    """Yield ``(j, blocks, n_valid)`` for every step of one pass (see :class:`_Reader`).

    ``blocks`` are ``(rows_v, D * b)`` arrays split over the mesh (each device its chunk
    ``j``), ``n_valid`` ``(D,)`` the real columns of each chunk. This process reads only
    its own devices' columns. The first ``layout.keep`` steps stay on the devices once
    read (``layout.kept``), and later passes take them from there. A pass left before its
    end (an error in the caller) stops the reader; the next pass starts a new one.
    """
    reader = layout.reader
    if reader is None and len(layout.kept) < layout.steps:
        reader = layout.reader = _Reader(store, layout, names, storage)
    if reader is not None:
        reader.passes += 1
    finished = False
    try:
        for j in range(layout.steps):
            if j in layout.kept:
                yield (j, *layout.kept[j])
                continue
            item = reader.get(j)
            if j < layout.keep:
                layout.kept[j] = item[1:]
            yield item
        finished = True
    finally:
        if not finished:
            layout.close()


@jax.jit
def _joined(blocks):
    """A chunk's pieces (per view, a tuple of in-place blocks) as one array per view."""
    return tuple(jnp.concatenate(parts, axis=1) for parts in blocks)


def _passes(store, layout, names, storage, desc, progress, pieces=False):
    """:func:`_stream` with a per-pass progress bar and bounded steps in flight.

    Yields ``(j, blocks, n_valid, hold)``; the caller passes the step's result to ``hold``
    so that the loop waits for step ``j - 1`` before taking step ``j + 1``. A chunk held
    as pieces (``layout.pieces``) comes joined into one array per view, or as its pieces
    (a tuple per view) with ``pieces`` (the iteration's step, which takes them apart).
    """
    bar = tqdm(total=layout.steps, desc=desc, unit="step", leave=False,
               disable=not progress, file=sys.stderr)
    previous = [None]

    def hold(result):
        if previous[0] is not None:
            jax.block_until_ready(previous[0])
        previous[0] = result
        bar.update(1)

    try:
        for j, blocks, n_valid in _stream(store, layout, names, storage):
            if layout.pieces and not pieces:
                blocks = _joined(blocks)
            yield j, blocks, n_valid, hold
        if previous[0] is not None:
            jax.block_until_ready(previous[0])
    finally:
        bar.close()


def _prepare(blocks, offsets, scale, mode, dtype):
    """The negative-value handling of ``fit(negative=...)`` and the internal rescaling.

    Blocks come back in their storage dtype divided by ``scale`` (the largest entry of all
    views, ``fit``'s ``_Problem.scale``), divided in float32 (float64 for float64 storage)
    before rounding back, as ``fit._scaled`` divides the in-memory views.
    """
    out = []
    for X, o in zip(blocks, offsets):
        if mode == "clip":
            X = jnp.maximum(X, 0)
        elif mode == "shift":
            X = (X.astype(dtype) - o).astype(X.dtype)
        wide = X.dtype if X.dtype == jnp.float64 else jnp.float32
        out.append((X.astype(wide) / scale.astype(wide)).astype(X.dtype))
    return tuple(out)


# ----------------------------------------------------------------------------- statistics


@functools.partial(jax.jit, static_argnames=("mode", "dtype", "mesh"))
def _block_stats(blocks, n_valid, offsets, mode, dtype, mesh):
    """Per device and view: sum, maximum, ``sum((X / max)^2)``, minimum and non-finite
    count of its chunk, ``(D, n_views, 5)``.

    The squares are taken of the chunk divided by its own maximum (entries at most 1), so
    that no float32 square overflows or underflows; the host combines the chunks in
    float64 (see :func:`_statistics`). An empty chunk gives 0, -inf, 0, inf, 0.
    """
    def local(blocks, n_valid, offsets):
        blocks = _prepare(blocks, offsets, jnp.ones((), dtype), mode, dtype)
        out = []
        for X in blocks:
            valid = jnp.arange(X.shape[1]) < n_valid[0]
            Xf = jnp.where(valid, X.astype(dtype), 0)
            top = jnp.max(jnp.where(valid, X.astype(dtype), -jnp.inf))
            safe = jnp.where(top > 0, top, 1.0)
            out.append(jnp.stack([
                jnp.sum(Xf), top, jnp.sum(jnp.square(Xf / safe)),
                jnp.min(jnp.where(valid, X.astype(dtype), jnp.inf)),
                jnp.count_nonzero(valid & ~jnp.isfinite(X)).astype(dtype)]))
        return jnp.stack(out)[None]

    axis = mesh.axis_names[0]
    return _shard_map(mesh, local, (P(None, axis), P(axis), P()), P(axis))(
        blocks, n_valid, offsets)


class _Stats(NamedTuple):
    """Per-view float64 statistics of one streamed pass (arrays of shape ``(n_views,)``)."""

    sums: np.ndarray      # sum of the entries
    tops: np.ndarray      # largest entry
    scaled: np.ndarray    # ||X_v / top_v||^2 (0 for a view without positive entries)
    minima: np.ndarray
    bad: np.ndarray       # number of NaN / Inf entries

    def sq_norms(self):
        return np.where(self.tops > 0, self.scaled * self.tops ** 2, 0.0)


def _statistics(store, layout, names, storage, offsets, mode, dtype, progress):
    """One pass: the :class:`_Stats` of every view (after ``mode``'s negative handling)."""
    per_step = []
    for _, blocks, n_valid, hold in _passes(store, layout, names, storage,
                                            "jaxcnmf: read store", progress):
        stats = _block_stats(blocks, n_valid, offsets, mode, dtype, layout.mesh)
        hold(stats)
        per_step.append(stats)
    per_block = np.asarray(jax.device_get(_replicate(per_step, layout.mesh)), np.float64)
    per_block = per_block.reshape((-1,) + per_block.shape[2:])  # (chunks, views, 5)
    block_tops = per_block[:, :, 1]
    tops = block_tops.max(0)
    # sum_b top_b^2 ||X_b / top_b||^2 / top^2, every ratio at most 1.
    ratio = np.where(tops > 0, np.maximum(block_tops, 0.0) / np.where(tops > 0, tops, 1.0),
                     0.0)
    scaled = np.sum(per_block[:, :, 2] * ratio ** 2, axis=0)
    return _Stats(per_block[:, :, 0].sum(0), tops, scaled, per_block[:, :, 3].min(0),
                  per_block[:, :, 4].sum(0))


# ----------------------------------------------------------------------------- initialisation


def _random_init(seed, sums, shapes, rank, dtype):
    """The draws and scales of ``initialization.random`` from streamed sums."""
    dtype = jnp.dtype(dtype)
    n = shapes[0][1]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes) + 1)
    total = jnp.asarray(sum(sums), dtype)
    count = sum(rows for rows, _ in shapes) * n
    F = jnp.sqrt(total / count / rank) * jnp.abs(jax.random.normal(keys[0], (rank, n), dtype))
    loadings = tuple(
        jnp.sqrt(jnp.asarray(s / (rows * n), dtype) / rank)
        * jnp.abs(jax.random.normal(k, (rows, rank), dtype))
        for k, s, (rows, _) in zip(keys[1:], sums, shapes))
    return F, loadings


@functools.partial(jax.jit, static_argnames=("scales", "mode", "dtype", "mesh"))
def _left_block(acc, blocks, Y_b, offsets, data_scale, scales, mode, dtype, mesh):
    """``acc + M_b Y_b`` per device for the weighted row-stacked chunk ``M_b``;
    ``acc`` ``(D, R, width)``, ``Y_b`` ``(D * b, width)`` split over the mesh."""
    def local(acc, blocks, Y_b, offsets, data_scale):
        blocks = _prepare(blocks, offsets, data_scale, mode, dtype)
        Y_b = Y_b[:blocks[0].shape[1]]  # a short last block: its rows of Y only
        parts = [s * initialization._mm(X.astype(dtype), Y_b) for s, X in zip(scales, blocks)]
        return acc + jnp.concatenate(parts, axis=0)[None]

    axis = mesh.axis_names[0]
    return _shard_map(mesh, local, (P(axis), P(None, axis), P(axis, None), P(), P()),
                      P(axis))(acc, blocks, Y_b, offsets, data_scale)


@functools.partial(jax.jit, static_argnames=("scales", "spans", "b", "mode", "dtype", "mesh"))
def _right_block(blocks, Q, offsets, data_scale, scales, spans, b, mode, dtype, mesh):
    """``M_b^T Q`` ``(D * b, width)`` (split over the mesh) for the weighted row-stacked
    chunks ``M_b`` (a short last block's product zero-padded to ``b`` rows)."""
    def local(blocks, Q, offsets, data_scale):
        blocks = _prepare(blocks, offsets, data_scale, mode, dtype)
        out = sum(s * initialization._mm(X.astype(dtype).T, Q[start:stop])
                  for s, X, (start, stop) in zip(scales, blocks, spans))
        return jnp.pad(out, ((0, b - out.shape[0]), (0, 0)))

    axis = mesh.axis_names[0]
    return _shard_map(mesh, local, (P(None, axis), P(), P(), P()), P(axis, None))(
        blocks, Q, offsets, data_scale)


def _streamed_svd(store, layout, names, storage, offsets, data_scale, mode, rank, weights,
                  seed, dtype, progress):
    """Top ``rank`` singular triplets of ``[sqrt(w_v) X_v]`` by the randomized SVD of
    ``initialization`` (same test matrix, oversampling and power iterations), each product
    with the data one pass over the store: ``2 + 2 * power iterations`` passes.

    The tall ``(N, width)`` factors are whole on every process (as the in-memory sharded
    fit's), their QR taken on the host's first device; the products with the data are
    split over the mesh like the views.
    """
    n = store.n
    rows = [store.rows[name] for name in names]
    scales = tuple(float(np.sqrt(w)) for w in weights)
    spans = tuple((int(a), int(z)) for a, z in initialization._row_spans(
        [np.empty((r, 0)) for r in rows]))
    width = min(rank + initialization._OVERSAMPLE, n, sum(rows))
    desc = "jaxcnmf: init (svd)"

    def left(Y):  # (N, width) -> (R, width)
        pieces = layout.place(Y, 0, np.dtype(dtype))
        acc = layout.per_device(np.zeros((sum(rows), width), dtype))
        for j, blocks, _, hold in _passes(store, layout, names, storage, desc, progress):
            acc = _left_block(acc, blocks, pieces[j], offsets, data_scale, scales, mode,
                              dtype, layout.mesh)
            hold(acc)
        return jnp.asarray(jax.device_get(_total(acc, layout.mesh)))

    def right(Q):  # (R, width) -> (N, width)
        Q = layout.replicated(Q)
        parts = []
        for _, blocks, _, hold in _passes(store, layout, names, storage, desc, progress):
            parts.append(_right_block(blocks, Q, offsets, data_scale, scales, spans, layout.b,
                                      mode, dtype, layout.mesh))
            hold(parts[-1])
        return jnp.asarray(layout.gather(parts, 0))

    omega = jax.random.normal(jax.random.PRNGKey(seed), (n, width), dtype)
    Q, _ = jnp.linalg.qr(left(omega))
    for _ in range(initialization._POWER_ITERATIONS):
        P_, _ = jnp.linalg.qr(right(Q))
        Q, _ = jnp.linalg.qr(left(P_))
    small = right(Q).T
    U_small, s, Vt = jnp.linalg.svd(small, full_matrices=False)
    return initialization._mm(Q, U_small)[:, :rank], s[:rank], Vt[:rank], scales, spans


@functools.partial(jax.jit, static_argnames=("scales", "spans", "variant", "dtype"))
def _nndsvd_factors(U, s, Vt, stacked_sum, scales, spans, variant, dtype):
    """NNDSVD(a) factors from the SVD, as ``initialization.nndsvd`` builds them."""
    W, F = initialization.svd_factors(U, s, Vt, stacked_sum / (U.shape[0] * Vt.shape[1]),
                                      variant)
    loadings = tuple(W[a:b] / scale for scale, (a, b) in zip(scales, spans))
    return F.astype(dtype), tuple(W.astype(dtype) for W in loadings)


# ----------------------------------------------------------------------------- iteration


class _Sums(NamedTuple):
    """What one pass accumulates over the chunks, per device (a leading ``(D,)`` axis,
    split over the mesh; summed over the devices once, at the end of the pass)."""

    A: tuple       # per view X_v F^T (rows_v, rank), with the updated F
    C: jax.Array   # F F^T (rank, rank), updated F
    S1: jax.Array  # (rank,) row sums of the updated F (for the l1_F term)
    S2: jax.Array  # (rank,) row sums of its squares (for the l2_F term)
    S3: jax.Array  # (rank,) sums of its group norms (for the group lasso; groups in chunks)
    violation_F: jax.Array  # squared F gradient mapping before the update (column-separable)
    sq: jax.Array  # (n_views,) ||X'_v||^2 of the rescaled views, as stored (every pass alike)


def _zero_sums(layout, rows, rank, dtype):
    zeros = functools.partial(np.zeros, dtype=dtype)
    return jax.tree_util.tree_map(layout.per_device, _Sums(
        tuple(zeros((r, rank)) for r in rows), zeros((rank, rank)), zeros(rank),
        zeros(rank), zeros(rank), zeros(()), zeros(len(rows))))


@functools.partial(jax.jit, static_argnames="config")
def _gram(loadings, config):
    weights = core._weights(config, len(loadings))
    return sum(w * core._mm(W.T, W) for w, W in zip(weights, loadings))


@functools.partial(jax.jit, static_argnames=("config", "mode", "norms", "mesh"),
                   donate_argnames="sums")
def _block_step(sums, F_b, scale, blocks, n_valid, groups_b, loadings, G, offsets,
                data_scale, config, mode, norms, mesh):
    """Update every device's chunk of ``F`` ``(rank, D * b)`` and add its share to its
    ``sums`` (``sums.sq`` only when ``norms``); nothing crosses devices. ``groups_b``
    ``(D * b,)`` int32: the columns' group ids within their chunk (``[0,
    config.n_groups)``; used when ``config.group_lam > 0``)."""
    def local(sums, F_b, blocks, n_valid, groups_b, scale, loadings, G, offsets, data_scale):
        sums = jax.tree_util.tree_map(lambda a: a[0], sums)
        sums, F_new = _local_step(sums, F_b, scale, blocks, n_valid[0], groups_b, loadings,
                                  G, offsets, data_scale, config, mode, norms)
        return jax.tree_util.tree_map(lambda a: a[None], sums), F_new

    axis = mesh.axis_names[0]
    cols = P(None, axis)
    return _shard_map(mesh, local, (P(axis), cols, cols, P(axis), P(axis), P(), P(), P(),
                                    P(), P()),
                      (P(axis), cols))(sums, F_b, blocks, n_valid, groups_b, scale, loadings,
                                       G, offsets, data_scale)


# Most steps a pass over chunks kept on the devices runs as one compiled call (the steps
# are unrolled in it: compile time grows with their number).
_FUSED_STEPS = 16


@functools.partial(jax.jit, static_argnames=("config", "mode", "norms", "mesh"),
                   donate_argnames="sums")
def _kept_pass(sums, F_parts, scale, chunks, group_parts, loadings, G, offsets, data_scale,
               config, mode, norms, mesh):
    """:func:`_block_step` over every chunk of a pass in one call, ``chunks`` the
    ``(blocks, n_valid)`` kept on the devices; returns the sums and the new ``F`` pieces.
    On an accelerator this saves a launch and a host round trip per step."""
    out = []
    for F_b, (blocks, n_valid), groups_b in zip(F_parts, chunks, group_parts):
        sums, F_b = _block_step(sums, F_b, scale, blocks, n_valid, groups_b, loadings, G,
                                offsets, data_scale, config, mode, norms, mesh)
        out.append(F_b)
    return sums, tuple(out)


def _block_products(blocks, loadings, offsets, data_scale, config, mode):
    """``B_b = sum_v w_v W_v^T X_vb`` ``(rank, width)`` of one chunk, with the blocks as
    the sums take them and the factor ``inv`` that their products still need."""
    dtype = jnp.dtype(config.dtype)
    weights = core._weights(config, len(blocks))
    # Division by the data scale folded into the products where the storage is at least
    # as wide as float32 (X / s rounds the same to within an ulp): the block is not
    # rewritten every pass. Narrower storage is divided and rounded as in memory.
    fold = mode == "none" and all(jnp.finfo(X.dtype).bits >= 32 for X in blocks)
    inv = (1.0 / data_scale).astype(dtype) if fold else jnp.ones((), dtype)
    if not fold:
        blocks = _prepare(blocks, offsets, data_scale, mode, dtype)
    products = [core._dot_tn(W, X, dtype) * inv for W, X in zip(loadings, blocks)]
    # Summed as core.f_grams sums them, so the F update sees the same B.
    return sum(w * P_ for w, P_ in zip(weights, products)), blocks, inv


def _local_step(sums, F_b, scale, blocks, n_valid, groups_b, loadings, G, offsets,
                data_scale, config, mode, norms=True):
    """One chunk on one device: its ``F_b`` updated and its share added to ``sums``
    (``||X'_v||^2`` to ``sums.sq`` only when ``norms``: it is the same every pass).

    With the group lasso every group lies within one chunk (``fit`` checks), and the
    ``F`` sub-problem is separable over groups, so the chunk's monotone FISTA
    (``core._fista_F``, the in-memory step size ``1 / L`` from ``G``) is a valid step on
    its own; its keep-the-best decisions test this chunk's part of the sub-problem
    objective, where the in-memory step tests all columns at once.
    """
    dtype = jnp.dtype(config.dtype)
    b = F_b.shape[1]
    if isinstance(blocks[0], tuple):
        # A chunk's pieces (store blocks in place): each updates its columns of F in turn
        # (the F update is column-separable; no group lasso here, see _Layout).
        out, at = [], 0
        for piece in zip(*blocks):
            w = piece[0].shape[1]
            n_piece = jnp.clip(n_valid - at, 0, w)
            sums, F_new = _local_step(sums, F_b[:, at:at + w], scale, piece, n_piece,
                                      groups_b[at:at + w], loadings, G, offsets, data_scale,
                                      config, mode, norms)
            out.append(F_new)
            at += w
        F_new = jnp.concatenate(out, axis=1)
        return sums, jnp.pad(F_new, ((0, 0), (0, b - at)))
    w = blocks[0].shape[1]
    if w < b:
        # A short last block used in place: its columns of F only (zero past them).
        sums, F_new = _local_step(sums, F_b[:, :w], scale, blocks, n_valid, groups_b[:w],
                                  loadings, G, offsets, data_scale, config, mode, norms)
        return sums, jnp.pad(F_new, ((0, 0), (0, b - w)))
    if config.unit_columns:
        F_b = F_b * scale[:, None]
    B, blocks, inv = _block_products(blocks, loadings, offsets, data_scale, config, mode)
    valid = jnp.arange(F_b.shape[1]) < n_valid
    # Padded columns get F = 0 and B = 0 (shifted data is not zero there): their gradient
    # l1_F >= 0 projects to 0, so they add nothing to the violation or the FISTA tests.
    B = jnp.where(valid, B, 0)
    # The F block's gradient mapping is column by column, or group by group (its step
    # 1 / L depends on G only), so its squared norm is a sum over blocks.
    violation = core._f_violation(F_b, B, G, groups_b, config)
    F_new = core._update_F(F_b, B, G, groups_b, config)
    # HALS floors entries at eps: keep the padded columns at zero so they add nothing.
    F_new = jnp.where(valid, F_new, 0)
    if config.group_lam > 0:
        group_norms = jnp.sum(core._group_norms(F_new, groups_b, config.n_groups), axis=1)
    else:
        group_norms = jnp.zeros_like(sums.S3)
    sums = _Sums(
        A=tuple(A + core._dot_nt(X, F_new, dtype) * inv for A, X in zip(sums.A, blocks)),
        C=sums.C + core._mm(F_new, F_new.T),
        S1=sums.S1 + jnp.sum(F_new, axis=1),
        S2=sums.S2 + jnp.sum(F_new * F_new, axis=1),
        S3=sums.S3 + group_norms,
        violation_F=sums.violation_F + violation,
        # Of the rescaled views as rounded to the storage dtype, as core._prepared takes
        # them in memory (with bfloat16 the rounding moves ||X'||^2 by more than the fit).
        # Padded columns are zero as stored but not once shifted: they are left out.
        sq=sums.sq + jnp.stack([jnp.sum(jnp.square(jnp.where(valid, X.astype(dtype), 0) * inv))
                                for X in blocks]) if norms else sums.sq,
    )
    return sums, F_new


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _end_pass(loadings, sums, config, mesh):
    """Loading updates after a pass, the objective and the KKT violation, as ``core.step``,
    from the devices' sums (added here: the pass's one exchange, ``(rows_v, rank)`` per
    view and a few ``(rank, rank)`` and smaller terms)."""
    sums = _total(sums, mesh)
    sq_norms = sums.sq
    weights = core._weights(config, len(loadings))
    violation_W = core._w_violation(loadings, sums.A, sums.C, weights, config)
    if core._ball_mode(config):
        new = list(core._update_W_ball(loadings, sums.A, sums.C, weights, config))
    else:
        new = [core._update_W(W, A, sums.C, w, config)
               for W, A, w in zip(loadings, sums.A, weights)]
    crosses = [jnp.sum(W * A) for W, A in zip(new, sums.A)]
    quads = [jnp.sum(core._mm(W.T, W) * sums.C) for W in new]
    scale = jnp.ones_like(sums.S1)
    if config.unit_columns:
        # As core._unit_columns; F's blocks take the scale when the next pass reads them.
        norms = jnp.sqrt(sum(jnp.sum(W * W, axis=0) for W in new))
        scale = jnp.where(norms > 0, norms, 1.0)
        new = [W / scale for W in new]
    fits = jnp.stack([core._fit_terms(s, c, q) for s, c, q in zip(sq_norms, crosses, quads)])
    penalty = config.l1_F * jnp.sum(scale * sums.S1) + config.l2_F * jnp.sum(
        scale * scale * sums.S2) + config.group_lam * jnp.sum(scale * sums.S3)
    value = (jnp.sum(jnp.asarray(weights, fits.dtype) * fits) + penalty
             + config.l2_W * sum(jnp.sum(W * W) for W in new))
    violation = jnp.sqrt(sums.violation_F + violation_W)
    out = (tuple(new), scale, value, core._rel_errors(sq_norms, fits), violation, sq_norms)
    return jax.tree_util.tree_map(
        lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P())), out)


@functools.partial(jax.jit, static_argnames="mesh")
def _rescale(F_b, scale, mesh):
    return jax.lax.with_sharding_constraint(F_b * scale[:, None],
                                            NamedSharding(mesh, P(None, mesh.axis_names[0])))


@functools.partial(jax.jit, static_argnames=("config", "mode", "mesh"))
def _block_residual(fits, F_b, blocks, n_valid, loadings, offsets, data_scale, config, mode,
                    mesh):
    """``fits + [||X_vb - W_v F_b||^2 per view, sum(F_b), sum(F_b^2)]`` per device, the
    residual terms as ``core.residual_objective`` forms them; ``fits`` ``(D, n_views + 2)``.

    Padded columns (past ``n_valid``, zero in ``F_b``; zero in ``X`` as stored but not
    once shifted) are left out.
    """
    dtype = jnp.dtype(config.dtype)

    def local(fits, F_b, blocks, n_valid, loadings, offsets, data_scale):
        blocks = _prepare(blocks, offsets, data_scale, mode, dtype)
        F_b = F_b[:, :blocks[0].shape[1]]  # a short last block: its columns only
        valid = jnp.arange(F_b.shape[1]) < n_valid[0]
        terms = [jnp.sum(jnp.square(jnp.where(valid, X.astype(dtype) - core._mm(W, F_b), 0)))
                 for X, W in zip(blocks, loadings)]
        return fits + jnp.stack(terms + [jnp.sum(F_b), jnp.sum(F_b * F_b)])[None]

    axis = mesh.axis_names[0]
    return _shard_map(mesh, local,
                      (P(axis), P(None, axis), P(None, axis), P(axis), P(), P(), P()),
                      P(axis))(fits, F_b, blocks, n_valid, loadings, offsets, data_scale)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _residual_value(loadings, fits, sq_norms, config, mesh):
    """Objective and relative errors from the streamed residual terms ``fits``."""
    fits = _total(fits, mesh)
    fits, (s1, s2) = fits[:-2], fits[-2:]
    weights = jnp.asarray(core._weights(config, len(loadings)), fits.dtype)
    value = jnp.sum(weights * fits) + config.l1_F * s1 + config.l2_F * s2
    value = value + config.l2_W * sum(jnp.sum(W * W) for W in loadings)
    return value, core._rel_errors(sq_norms, fits)


# ----------------------------------------------------------------------------- group lasso


def _chunk_groups(layout, groups, dense, sharded):
    """Every column's group id within its chunk, and the most groups one chunk holds.

    ``groups`` ``(N,)`` are the caller's ids (named in the error), ``dense`` the same
    relabelled to ``[0, n_groups)``. The streamed group lasso updates each chunk's ``F`` on
    its own, which is exact only when no group has columns in two chunks: such a group is
    refused (the first by its first column), saying how to write the store.

    Returns:
        ``(local, count)``: ``local`` ``(N,)`` int32 ids in ``[0, count)`` per chunk.
    """
    n = layout.n
    chunk = np.zeros(n, np.int64)
    local = np.zeros(n, np.int32)
    count = 1
    for d in range(layout.count):
        for j in range(layout.steps):
            start, stop = layout.span(d, j)
            if stop > start:
                chunk[start:stop] = d * layout.steps + j
                _, inverse = np.unique(dense[start:stop], return_inverse=True)
                local[start:stop] = inverse.reshape(-1)
                count = max(count, int(inverse.max()) + 1)
    n_groups = int(dense.max()) + 1
    low = np.full(n_groups, np.iinfo(np.int64).max)
    high = np.full(n_groups, -1)
    first = np.full(n_groups, n)
    np.minimum.at(low, dense, chunk)
    np.maximum.at(high, dense, chunk)
    np.minimum.at(first, dense, np.arange(n))
    straddling = np.flatnonzero(low != high)
    if straddling.size:
        g = straddling[np.argmin(first[straddling])]
        a = int(first[g])
        b = int(np.flatnonzero((dense == g) & (chunk != chunk[a]))[0])

        def where(column):
            d, j = divmod(int(chunk[column]), layout.steps)
            start, stop = layout.span(d, j)
            name = (f"device {d}'s chunk" if sharded else
                    "block" if layout.cols == layout.block_size else "blocks")
            return f"{name} [{start}, {stop})"

        devices = (f", with a mesh also on the devices' boundaries (multiples of "
                   f"ceil(N / devices) = {layout.c})" if sharded else "")
        raise ValueError(
            f"groups: group {groups[a].item()!r} has images in {where(a)} (column {a}) and "
            f"{where(b)} (column {b}); the streamed group lasso needs every group's images "
            f"within one block of the store: write the store sorted by group with block "
            f"boundaries on group boundaries (store.save(..., block_size=...)){devices}, "
            f"or fit in memory")
    return local, count


@functools.partial(jax.jit, static_argnames=("config", "mode", "mesh"))
def _block_lam_max(blocks, n_valid, groups_b, loadings, offsets, data_scale, config, mode,
                   mesh):
    """Per device ``max_{k, g} ||max(2 B[k, g] - l1_F, 0)||`` over the groups of its chunk
    (``fit._group_lam_max_internal`` for one chunk), ``(D,)``."""
    def local(blocks, n_valid, groups_b, loadings, offsets, data_scale):
        B, _, _ = _block_products(blocks, loadings, offsets, data_scale, config, mode)
        B = jnp.where(jnp.arange(B.shape[1]) < n_valid[0], B, 0)
        positive = jnp.maximum(2.0 * B - config.l1_F, 0.0)
        groups_b = groups_b[:B.shape[1]]  # a short last block: its columns only
        return jnp.max(core._group_norms(positive, groups_b, config.n_groups))[None]

    axis = mesh.axis_names[0]
    return _shard_map(mesh, local, (P(None, axis), P(axis), P(axis), P(), P(), P()),
                      P(axis))(blocks, n_valid, groups_b, loadings, offsets, data_scale)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _chunk_group_norms(total, F_b, groups_b, config, mesh):
    """``total + sum_{k, g} ||F_b[k, g]||`` per device (``(D,)``), groups within chunks."""
    def local(total, F_b, groups_b):
        return total + jnp.sum(core._group_norms(F_b, groups_b, config.n_groups))

    axis = mesh.axis_names[0]
    return _shard_map(mesh, local, (P(axis), P(None, axis), P(axis)), P(axis))(
        total, F_b, groups_b)


@functools.partial(jax.jit, static_argnames=("config", "mesh"))
def _with_group_penalty(final, total, config, mesh):
    value, rel = final
    return value + config.group_lam * _total(total, mesh), rel


# ----------------------------------------------------------------------------- front door


def fit(views, rank, *, method="mu", max_iter=200, tol=1e-4, seed=0, init="nndsvda",
        weights=None, unit_columns=False, l1_F=0.0, l2_F=0.0, l2_W=0.0, groups=None,
        group_lam=0.0, group_lam_fraction=None, restarts=1, negative="raise",
        dtype="float32", storage_dtype=None, progress=True, mesh=None, cache_bytes=None):
    """Coupled NMF of the views in a store, streaming its column blocks (one read per pass).

    ``jaxcnmf.fit(store, ...)`` calls this; the arguments and the result are those of
    :func:`jaxcnmf.solver.fit.fit`, with these differences: ``views`` is a
    :class:`jaxcnmf.store.Store`; ``restarts`` must be 1; ``storage_dtype`` defaults to
    the store's dtype. The iterates equal those of the in-memory fit from the same start
    (to float rounding of the sums over blocks). The group lasso (``groups`` with
    ``group_lam`` or ``group_lam_fraction``) needs every group's columns within one store
    block (within one chunk of one device with a mesh; a group across them is refused):
    each block then takes its own monotone FISTA step, so with several blocks the iterates
    differ from the in-memory ones while the objective still does not increase.

    With a 1-D ``mesh`` the columns are split over its devices as in the in-memory sharded
    fit: device ``d`` streams the columns ``[d * c, (d + 1) * c)``, ``c = ceil(N / D)``, in
    chunks of ``block_size``, every device one chunk per step, and keeps its part of ``F``;
    each device adds its own ``X_v F^T`` and ``F F^T``, and the devices' sums are added once
    per pass (``(rows_v, rank)`` per view and ``(rank, rank)``). After
    ``jax.distributed.initialize()`` and with a mesh over all processes' devices, every
    process reads only its own devices' columns of the store (it may be on a disk shared
    by all, or each process's part on its own disk with the same manifest) and the result
    is as the in-memory sharded fit's: ``F`` a global array split over the columns (or
    whole on every process when ``D`` does not divide ``N``), saved one file per process.
    The initial ``F`` and the randomized SVD's ``(N, rank + 10)`` factors are briefly whole
    on every process.

    Passes over the store: one to check the values and take their maxima and norms (two
    with ``negative="clip"``/``"shift"`` on data that has negatives), ten for
    ``init="nndsvd"`` or ``"nndsvda"`` (randomized SVD), one for ``group_lam_fraction``'s
    ``lambda_max``, one per iteration, and one for the final objective from the residuals.

    Memory: ``F`` ``(rank, N)`` float32, the loadings and ``X_v F^T`` (``2 * rows_v * rank``
    floats per view), and about ``_PREFETCH + 2`` blocks of
    ``block_size * sum_v rows_v`` stored values (per device with a mesh); independent of
    ``N`` beyond ``F``.

    Args:
        views: :class:`jaxcnmf.store.Store` (from ``store.open``).
        rank, method, max_iter, tol, seed, init, weights, unit_columns, l1_F, l2_F, l2_W,
            negative, dtype, storage_dtype, progress: as for ``jaxcnmf.fit``;
            ``progress`` shows one bar per pass.
        mesh: ``None`` (one device) or a 1-D ``jax.sharding.Mesh`` to split the columns
            over (see above).
        groups, group_lam, group_lam_fraction: as for ``jaxcnmf.fit``, with every
            group's columns within one block (see above).
        restarts: accepted for the same signature; ``restarts > 1`` is refused.
        cache_bytes: chunks kept on each device between passes, at most this many bytes
            per device (the first steps of a pass; the rest are read every pass).
            ``None``: none on a CPU (its device reads the store's pages in place from the
            operating system's cache), else half of the device memory free at the start:
            a store that fits there crosses from the host once. ``0`` reads every chunk
            every pass.

    Returns:
        :class:`jaxcnmf.FitResult` (``config`` also holds ``"store"`` and ``"block_size"``).

    Raises:
        ValueError / TypeError: as ``jaxcnmf.fit``, naming the parameter or view; a mesh
            that is not 1-D or holds none of this process's devices.
        FloatingPointError: a non-finite value appeared (the loop stops at that pass).

    Warns:
        ConvergenceWarning, DeadConceptWarning: as ``jaxcnmf.fit``.

    Example:
        >>> res = jaxcnmf.fit(store.open("acts/"), rank=20, method="hals")  # doctest: +SKIP
    """
    if not isinstance(views, Store):
        raise TypeError(f"views: expected a jaxcnmf.store.Store, got {type(views).__name__}")
    s = views
    names = s.views
    shapes = [(s.rows[name], s.n) for name in names]
    _front._check_choice("negative", negative, _front._NEGATIVE_MODES)
    rank = _front._check_number("rank", rank, 1, integer=True)
    if rank > min(s.n, sum(r for r, _ in shapes)):
        raise ValueError(f"rank: expected at most min(N, total rows) = "
                         f"{min(s.n, sum(r for r, _ in shapes))}, got {rank}")
    _front._check_choice("method", method, core.METHODS)
    if not isinstance(init, dict):
        _front._check_choice("init", init, initialization.INIT_NAMES)
    max_iter = _front._check_number("max_iter", max_iter, 1, integer=True)
    tol = _front._check_number("tol", tol)
    seed = _front._check_number("seed", seed, 0, integer=True)
    restarts = _front._check_number("restarts", restarts, 1, integer=True)
    if restarts != 1:
        raise ValueError(f"restarts: the streaming fit (views from a store) runs one start; "
                         f"expected 1, got {restarts}")
    l1_F, l2_F, l2_W = (_front._check_number(label, value) for label, value in
                        (("l1_F", l1_F), ("l2_F", l2_F), ("l2_W", l2_W)))
    group_lam, group_lam_fraction = _front._check_group_penalty(group_lam, group_lam_fraction)
    wants_groups = group_lam > 0 or group_lam_fraction is not None
    dense, n_groups = _front._check_groups(
        groups, s.n, group_lam if group_lam_fraction is None else group_lam_fraction)
    storage = _front._check_dtypes(dtype, s.dtype if storage_dtype is None else storage_dtype)
    mode = _MODES[negative]
    placement = _placement(mesh, s.n)  # before anything is compiled
    itemsize = _numpy_dtype(storage).itemsize
    if placement is None:
        device = jax.local_devices()[0]
        layout = _Layout(s, Mesh(np.array([device]), ("n",), axis_types=(AxisType.Auto,)),
                         itemsize, pieces=not wants_groups)
    else:
        layout = _Layout(s, placement.mesh, itemsize, pieces=not wants_groups)
    if cache_bytes is not None:
        cache_bytes = _front._check_number("cache_bytes", cache_bytes, 0, integer=True)
    try:
        kept = layout.keep_on_devices(cache_bytes)
        if wants_groups:
            local_groups, chunk_groups = _chunk_groups(layout, np.asarray(groups), dense,
                                                       placement is not None)
        else:
            local_groups, chunk_groups = np.zeros(s.n, np.int32), 1

        if progress:
            where = "" if placement is None else f" over {layout.count} devices"
            on_device = (f", {kept} of {layout.steps} steps kept on the device"
                         f"{'s' if layout.count > 1 else ''} after the first read" if kept else "")
            print(f"jaxcnmf: streaming fit of {len(names)} views from {str(s.path)!r}, N={s.n} "
                  f"in {s.n_blocks} blocks of {s.block_size}{where}, read in steps of "
                  f"{layout.cols} columns{on_device}, rank {rank}, method {method}, max_iter "
                  f"{max_iter}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        zeros = np.zeros(len(names), dtype)
        stats = _statistics(s, layout, names, storage, layout.replicated(zeros), "none", dtype,
                            progress)
        for name, minimum, bad in zip(names, stats.minima, stats.bad):
            if bad:
                raise ValueError(f"view {name!r} contains {int(bad)} NaN or Inf entries")
            if minimum < 0 and negative == "raise":
                raise ValueError(
                    f"view {name!r} has negative entries (minimum {minimum:.4g}); expected "
                    f"non-negative data, or pass negative='clip' or 'shift'")
        if np.any(stats.minima < 0):
            # Only views with negatives move, as in the in-memory fit.
            offsets = layout.replicated(np.minimum(stats.minima, 0.0).astype(dtype))
            stats = _statistics(s, layout, names, storage, offsets, mode, dtype, progress)
        else:
            offsets = layout.replicated(zeros)
            mode = "none"
        view_weights = _weights(weights, names, stats.sq_norms())
        # The in-memory fit's rescaling (views by their largest entry, objective by the
        # weighted data norm), from the streamed maxima and norms.
        problem, internal_weights, data_norm2 = _front._internal_problem_from_stats(
            names, list(zip(stats.tops, stats.scaled)), view_weights, dtype)
        config = core.SolverConfig(
            method=method, rank=rank, weights=view_weights, l1_F=l1_F, l2_F=l2_F, l2_W=l2_W,
            unit_columns=bool(unit_columns), group_lam=group_lam, n_groups=chunk_groups,
            max_iter=max_iter, tol=tol, dtype=dtype)
        config = _front._internal_config(config, problem, internal_weights, dtype)
        config_dict = _front._config_record(
            config, names, view_weights, data_norm2, method=method, rank=rank, seed=seed,
            init=init, unit_columns=unit_columns, l1_F=l1_F, l2_F=l2_F, l2_W=l2_W,
            group_lam=group_lam, group_lam_fraction=group_lam_fraction, group_lam_max=None,
            n_groups=n_groups if groups is not None else 0, max_iter=max_iter, tol=tol,
            restarts=1, negative=negative, dtype=dtype, storage_dtype=storage)
        config_dict.update({"store": str(s.path), "block_size": s.block_size,
                            "step_columns": layout.cols, "steps_kept_on_device": kept})
        data_scale = layout.replicated(np.asarray(problem.scale, dtype))

        if isinstance(init, dict):
            # The caller's F is on the data's scale; the solver's is on the rescaled one.
            init = {**init, "F": np.asarray(init["F"], np.float64) / problem.scale}
            F0, loadings0 = initialization.user(init, names, shapes, rank, dtype)
        elif init == "random":
            F0, loadings0 = _random_init(seed, [float(x) / problem.scale for x in stats.sums],
                                         shapes, rank, dtype)
        else:
            U, sv, Vt, scales, spans = _streamed_svd(s, layout, names, storage, offsets,
                                                     data_scale, mode, rank, internal_weights,
                                                     seed, dtype, progress)
            stacked_sum = jnp.asarray(sum(c * x / problem.scale
                                          for c, x in zip(scales, stats.sums)), dtype)
            F0, loadings0 = _nndsvd_factors(U, sv, Vt, stacked_sum, scales, spans, init, dtype)
        # Each chunk's group ids within it, placed like F (the padding in group 0, F = 0 there).
        group_parts = layout.place(local_groups, 0, np.dtype(np.int32))
        if group_lam_fraction is not None:
            # fit._group_lam_max_internal from one more pass: every group lies in one chunk.
            norms = jnp.sqrt(sum(jnp.sum(W * W, axis=0) for W in loadings0))
            unit = tuple(layout.replicated(W / jnp.where(norms > 0, norms, 1.0))
                         for W in loadings0)
            tops = []
            for j, blocks, n_valid, hold in _passes(s, layout, names, storage,
                                                    "jaxcnmf: group lambda_max", progress):
                tops.append(_block_lam_max(blocks, n_valid, group_parts[j], unit, offsets,
                                           data_scale, config._replace(max_iter=1, tol=0.0),
                                           mode, layout.mesh))
                hold(tops[-1])
            lam_max_internal = float(np.max(jax.device_get(_replicate(tops, layout.mesh))))
            config = config._replace(group_lam=group_lam_fraction * lam_max_internal)
            config_dict["group_lam_max"] = lam_max_internal * problem.norm / problem.scale
            config_dict["group_lam"] = group_lam_fraction * config_dict["group_lam_max"]

        # The compiled pass functions do not read max_iter or tol: keep them out of their
        # static config, so another max_iter or tol does not compile them again.
        kernel = config._replace(max_iter=1, tol=0.0)
        mesh_ = layout.mesh
        # F in this process's chunks only; the whole start is dropped here.
        F_parts = layout.place(np.asarray(F0), 1, np.dtype(dtype))
        del F0
        loadings = tuple(layout.replicated(W) for W in loadings0)
        scale = layout.replicated(np.ones(rank, dtype))
        rows = [r for r, _ in shapes]
        objective_history, rel_history = [], []
        violation_init, converged, failed = None, False, False
        # Every device's ||X'_v||^2, summed in the first pass and carried into the next ones
        # (it is the same every pass: reading the blocks once more for it would cost a third
        # of a pass).
        sq = None
        zero_sums = _zero_sums(layout, rows, rank, dtype)
        # One bar over the iterations (each reading pass also shows its own, per step).
        passes_bar = tqdm(total=max_iter, desc="jaxcnmf: iterations", unit="pass", leave=False,
                          disable=not progress, file=sys.stderr)
        for iteration in range(max_iter):
            G = _gram(loadings, kernel)
            # Fresh sums each pass, copied on the devices (the steps donate them).
            acc = jax.tree_util.tree_map(jnp.copy, zero_sums)
            if sq is not None:
                acc = acc._replace(sq=sq)
            if len(layout.kept) == layout.steps <= _FUSED_STEPS:
                # Every chunk on the devices: the whole pass is one compiled call.
                chunks = tuple(layout.kept[j] for j in range(layout.steps))
                acc, F_new = _kept_pass(acc, tuple(F_parts), scale, chunks,
                                        tuple(group_parts), loadings, G, offsets, data_scale,
                                        kernel, mode, sq is None, mesh_)
                F_parts = list(F_new)
            else:
                for j, blocks, n_valid, hold in _passes(
                        s, layout, names, storage, f"jaxcnmf: pass {iteration + 1}", progress,
                        pieces=True):
                    acc, F_parts[j] = _block_step(acc, F_parts[j], scale, blocks, n_valid,
                                                  group_parts[j], loadings, G, offsets,
                                                  data_scale, kernel, mode, sq is None, mesh_)
                    hold(F_parts[j])
            sq = acc.sq
            loadings, scale, value, rel, violation, jsq = _end_pass(loadings, acc, kernel, mesh_)
            # One host sync per pass (core.run tests the same values inside its loop).
            value, rel, violation = (np.asarray(x, np.float64)
                                     for x in jax.device_get((value, rel, violation)))
            objective_history.append(float(value))
            rel_history.append(rel)
            passes_bar.update(1)
            if violation_init is None:
                violation_init = float(violation)
            failed = not (np.isfinite(value) and np.isfinite(violation))
            converged = bool(violation <= tol * violation_init)
            if failed or converged:
                break
        passes_bar.close()
        n_iter = len(objective_history)
        if failed:
            raise FloatingPointError(
                f"jaxcnmf.fit: the streaming solver produced NaN or Inf at iteration {n_iter} "
                f"and stopped; the inputs were finite and rescaled by {problem.scale:.3g} "
                f"(objective by {problem.norm:.3g}), so a step overflowed: internal weights "
                f"{dict(zip(names, config.weights))}, l1_F {config.l1_F:.3g}, l2_F "
                f"{config.l2_F:.3g}, l2_W {config.l2_W:.3g}, group_lam {config.group_lam:.3g}")

        if config.unit_columns:
            F_parts = [_rescale(F_b, scale, mesh_) for F_b in F_parts]
        # The reported objective and errors come from the residuals (one more pass), as the
        # in-memory fit's core.residual_objective: the Gram form loses near-exact fits.
        fits = layout.per_device(np.zeros(len(names) + 2, dtype))
        if layout.reader is not None:
            layout.reader.finish(1)  # the last pass: nothing is read beyond it
        for j, blocks, n_valid, hold in _passes(s, layout, names, storage,
                                                "jaxcnmf: final objective", progress):
            fits = _block_residual(fits, F_parts[j], blocks, n_valid, loadings, offsets,
                                   data_scale, kernel, mode, mesh_)
            hold(fits)
        final = _residual_value(loadings, fits, jsq, kernel, mesh_)
        if kernel.group_lam > 0:
            total = layout.per_device(np.zeros((), dtype))
            for F_b, groups_b in zip(F_parts, group_parts):
                total = _chunk_group_norms(total, F_b, groups_b, kernel, mesh_)
            final = _with_group_penalty(final, total, kernel, mesh_)
        F = layout.padded(F_parts)  # (rank, D * c), split like the in-memory sharded F
        del F_parts
        if not np.isfinite(float(jax.device_get(final[0]))):
            raise FloatingPointError(
                f"jaxcnmf.fit: the final objective of the streaming fit is not finite after "
                f"{n_iter} iterations (data rescaled by {problem.scale:.3g}, objective by "
                f"{problem.norm:.3g})")
        # The in-memory fit's result builder, fed a host state of the streamed run.
        state = core.SolverState(
            F=F, loadings=loadings, groups=None, sq_norms=jsq,
            iteration=np.int32(n_iter), objective=objective_history[-1],
            objective_history=np.asarray(objective_history, np.float64),
            rel_error_history=np.stack(rel_history, axis=1), converged=converged,
            violation=violation, violation_init=violation_init, failed=False)
        result = _front._result(state, tuple(names), config_dict, problem, final, placement)
        if progress:
            errors = ", ".join(f"{k} {v:.4f}" for k, v in result.relative_errors.items())
            status = "converged" if converged else "max_iter reached"
            print(f"jaxcnmf: done in {time.perf_counter() - start:.1f} s, {result.n_iter} "
                  f"passes ({status}), rel. errors {errors}", file=sys.stderr, flush=True)
        _front._check_live(result, stacklevel=4)
        if not result.converged:
            warnings.warn(f"jaxcnmf.fit stopped at max_iter={max_iter} before the KKT "
                          f"violation fell to tol={tol} of its start; increase max_iter or tol",
                          _front.ConvergenceWarning, stacklevel=3)
        return result
    finally:
        layout.close()  # the background reader


def _placement(mesh, n):
    """The sharded fit's placement for ``mesh`` (``None`` without one), after its checks."""
    if mesh is None:
        return None
    placement = sharding.plan([], [], mesh).with_columns(n)
    if not any(d.process_index == jax.process_index() for d in placement.mesh.devices.flat):
        raise ValueError(f"mesh: expected some of this process's devices (process "
                         f"{jax.process_index()}), got devices "
                         f"{[d.id for d in placement.mesh.devices.flat]}")
    return placement


def _weights(weights, names, sq_norms):
    """View weights as ``fit`` gives them, ``"balanced"`` from the streamed norms."""
    if isinstance(weights, str):
        _front._check_choice("weights", weights, ("balanced",))
        return tuple(1.0 / float(q) if q > 0 else 1.0 for q in sq_norms)
    # Other forms need no data; a placeholder per view satisfies the shared checker.
    return _front._view_weights(weights, names, [None] * len(names))
