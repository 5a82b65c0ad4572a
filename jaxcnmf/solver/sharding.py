"""The coupled NMF sharded over the image axis ``N``, on one or many devices and hosts.

Every view ``X_v`` ``(rows_v, N)`` and the embedding ``F`` ``(rank, N)`` are split over their
columns on a 1-D mesh; the loadings ``(rows_v, rank)`` are replicated. The solver core is
unchanged: it is compiled by XLA's SPMD partitioner over arrays placed with
``NamedSharding``, and every product of an iteration is then either local to a device's
images or a small partial sum (see :func:`iteration_blocks`). Nothing here schedules work;
JAX's own runtime does, also across processes after ``jax.distributed.initialize()``.

``N`` that the device count does not divide is padded with zero columns at the end. They
cannot change the fit: the views are zero there, ``F`` starts at zero there and
``SolverState.column_mask`` holds it at exactly zero after every update, so every sum over
images (``X_v F^T``, ``F F^T``, the penalties, the group norms) is the same as without them.

Example:
    >>> import jax, numpy as np, jaxcnmf  # doctest: +SKIP
    >>> mesh = jax.make_mesh((jax.device_count(),), ("n",))
    >>> res = jaxcnmf.fit({"conv": np.random.rand(64, 1001)}, rank=4, mesh=mesh)
    >>> res.F.shape, res.devices
    ((4, 1001), 4)
"""

from __future__ import annotations

import functools
import glob
import math
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcnmf.solver import core

_FLOAT32_MAX = float(np.finfo(np.float32).max)

# --------------------------------------------------------------------------- the iteration


def iteration_blocks(views, F, loadings, config):
    """The products of one iteration that a block of images contributes.

    They are what the sharded fit exchanges (and what a streaming fit over blocks of
    images would accumulate): per block ``b`` of columns, ``B_b = sum_v w_v W_v^T X_v[:, b]``
    stays with its images, while ``X_v[:, b] F[:, b]^T`` and ``F[:, b] F[:, b]^T`` are
    partial sums over images, added over blocks (here: over devices, by XLA's all-reduce).

    Args:
        views: tuple of ``(rows_v, n_b)`` blocks of the views' columns.
        F: ``(rank, n_b)`` the same block of ``F``.
        loadings: tuple of ``(rows_v, rank)``.
        config: :class:`~jaxcnmf.solver.core.SolverConfig`.

    Returns:
        dict with ``"B"`` ``(rank, n_b)`` (local), ``"G"`` ``(rank, rank)`` (no image
        axis), ``"XFt"`` tuple of ``(rows_v, rank)`` and ``"FFt"`` ``(rank, rank)``
        (partial sums over the block's images).

    Example:
        >>> parts = iteration_blocks(views, F, loadings, config)  # doctest: +SKIP
    """
    dtype = jnp.dtype(config.dtype)
    B, G = core.f_grams(views, loadings, config)
    XFt = tuple(core._dot_nt(X, F, dtype) for X in views)
    return {"B": B, "G": G, "XFt": XFt, "FFt": core._mm(F, F.T)}


def memory_per_device(rows, n, rank, devices=1, storage_bytes=4, restarts=1):
    """Bytes a fit needs on each device, to check before starting one.

    ``views + restarts * (4 F-sized arrays + 3 copies of the loadings)``, with F-sized
    arrays ``rank * ceil(N / devices) * 4`` bytes (``F``, ``W^T X``, the next ``F``, and
    the FISTA momentum or HALS row buffer) and the views ``sum(rows) * ceil(N / devices) *
    storage_bytes``. The NNDSVD start briefly adds ``N * (rank + 10) * 4`` bytes (its tall
    QR factor is replicated) and, with a storage dtype narrower than float32, the views
    again in float32. The final residual objective forms ``X_v - W_v F`` 256 rows at a
    time, one view and restart after another: ``min(256, rows_v) * ceil(N / devices) * 4``
    bytes more at the end (64 F-sized arrays at rank 1, not counted here).

    Args:
        rows: sequence of ``rows_v``, one per view.
        n: number of images ``N``.
        rank: number of concepts.
        devices: devices the images are sharded over.
        storage_bytes: bytes per view entry (4 for float32, 2 for bfloat16).
        restarts: restarts run at once.

    Returns:
        dict of bytes: ``"views"``, ``"factors"``, ``"nndsvd_extra"``, ``"total"``
        (``views + factors``; add ``nndsvd_extra`` for the default initialisation).

    Example:
        >>> memory_per_device([3072, 16384, 8192, 512], 1_000_000, 20, devices=8)["total"]
        14126758400
    """
    columns = math.ceil(n / devices)
    views = sum(rows) * columns * storage_bytes
    factors = restarts * (4 * rank * columns * 4 + 3 * sum(rows) * rank * 4)
    extra = n * (rank + 10) * 4
    if storage_bytes < 4:
        extra += sum(rows) * columns * 4
    return {"views": views, "factors": factors, "nndsvd_extra": extra,
            "total": views + factors}


# ---------------------------------------------------------------------------- validation


def _devices_of(mesh):
    return tuple(d.id for d in mesh.devices.flat)


def _column_axis(name, sharding):
    """The mesh axis a view's columns are split over, after the checks of its spec."""
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"view {name!r}: expected a NamedSharding over its columns, "
                         f"P(None, axis), got {type(sharding).__name__}")
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    rows, cols = spec
    if rows is not None:
        raise ValueError(f"view {name!r} is sharded over its rows (spec {sharding.spec}): "
                         f"expected its columns (images), P(None, axis)")
    if cols is None:
        raise ValueError(f"view {name!r} is replicated over its mesh (spec "
                         f"{sharding.spec}): expected its columns sharded, P(None, axis)")
    if isinstance(cols, tuple):
        if len(cols) != 1:
            raise ValueError(f"view {name!r}: expected its columns sharded over one mesh "
                             f"axis, got {cols}")
        cols = cols[0]
    return cols


def _check_mesh(mesh):
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh (e.g. jax.make_mesh((n,), "
                        f"('n',))), got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh: expected a 1-D mesh with one axis for the images, got "
                         f"axes {tuple(mesh.axis_names)} of shape {tuple(mesh.devices.shape)}")


def plan(names, views, mesh=None):
    """Check the mesh and the views' shardings; the placement of a sharded fit, or ``None``.

    Runs before anything is compiled. ``None`` (the unsharded path) when no mesh is given
    and no view is a ``jax.Array`` spread over several devices; otherwise the mesh is
    ``mesh`` or, by default, the one the sharded views are on.

    Args:
        names: view names, in order.
        views: the views as given (host arrays, single-device or sharded ``jax.Array``).
        mesh: ``None`` or a 1-D ``jax.sharding.Mesh``.

    Returns:
        :class:`Placement` (without the column count; see :meth:`Placement.with_columns`)
        or ``None``.

    Raises:
        ValueError / TypeError: a mesh with more than one axis, views sharded over rows,
        over another axis or other devices than the mesh, or sharded differently.
    """
    sharded = [(name, X) for name, X in zip(names, views)
               if isinstance(X, jax.Array) and len(X.sharding.device_set) > 1]
    if mesh is not None:
        _check_mesh(mesh)
    if mesh is None and not sharded:
        return None
    reference = None
    for name, X in sharded:
        if X.ndim != 2:
            continue  # the front door's shape check names it
        axis = _column_axis(name, X.sharding)
        view_mesh = X.sharding.mesh
        if reference is None:
            reference = (name, axis, _devices_of(view_mesh))
            if mesh is None:
                _check_mesh(view_mesh)
                mesh = view_mesh
            if axis not in mesh.axis_names:
                raise ValueError(f"mesh: expected the axis view {name!r} is sharded over, "
                                 f"{axis!r}, got a mesh with axis {mesh.axis_names[0]!r}")
            if _devices_of(view_mesh) != _devices_of(mesh):
                raise ValueError(f"mesh: expected the devices view {name!r} is on, "
                                 f"{list(_devices_of(view_mesh))}, got devices "
                                 f"{list(_devices_of(mesh))}")
        elif (axis, _devices_of(view_mesh)) != reference[1:]:
            raise ValueError(
                f"views {reference[0]!r} and {name!r} are sharded differently: expected "
                f"the same axis and devices, got {reference[1]!r} on {list(reference[2])} "
                f"and {axis!r} on {list(_devices_of(view_mesh))}")
    axis = mesh.axis_names[0]
    auto = Mesh(mesh.devices, (axis,), axis_types=(AxisType.Auto,))
    given = NamedSharding(mesh, P(None, axis))
    return Placement(mesh=auto, axis=axis, given=given, n=0, n_padded=0)


# ----------------------------------------------------------------------------- placement


class Placement(NamedTuple):
    """Where a sharded fit's arrays live (static and hashable: a jit argument).

    Attributes:
        mesh: the 1-D mesh with its axis in ``Auto`` mode (XLA's partitioner chooses the
            collectives), the same devices in the same order as the user's mesh.
        axis: name of the image axis.
        given: ``NamedSharding(user mesh, P(None, axis))``, the sharding ``F`` is returned in.
        n: number of real images ``N``.
        n_padded: ``N`` rounded up to a multiple of the device count.
    """

    mesh: Mesh
    axis: str
    given: NamedSharding
    n: int
    n_padded: int

    @property
    def device_count(self):
        return self.mesh.devices.size

    @property
    def columns(self):
        """Sharding of ``(rows, N)`` arrays: split over the columns."""
        return NamedSharding(self.mesh, P(None, self.axis))

    @property
    def replicated(self):
        return NamedSharding(self.mesh, P())

    def with_columns(self, n):
        """This placement for ``n`` images."""
        d = self.device_count
        return self._replace(n=int(n), n_padded=-(-int(n) // d) * d)

    # ----------------------------------------------------------------- inputs

    def _host_columns(self, X, dtype, spec, scale=None):
        """A host array (columns last) placed shard by shard, padded with zeros.

        Only each addressable shard's block is cast (divided by ``scale`` first, as
        :func:`divide_host`) and copied, never the whole array.
        """
        shape = X.shape[:-1] + (self.n_padded,)
        sharding = NamedSharding(self.mesh, spec)

        def block(index):
            cols = index[-1]
            start, stop = cols.start or 0, self.n_padded if cols.stop is None else cols.stop
            part = X[..., start:min(stop, self.n)]
            if scale is None:
                part = np.asarray(part, dtype=dtype)
            else:
                part = divide_host(part, scale, dtype)
            if stop > self.n:
                pad = [(0, 0)] * (part.ndim - 1) + [(0, stop - max(start, self.n))]
                part = np.pad(part, pad)
            return part

        return jax.make_array_from_callback(shape, sharding, block)

    def view(self, X, dtype, scale=1.0):
        """One view ``(rows_v, N)`` as a column-sharded ``(rows_v, n_padded)`` array of
        ``X / scale`` (the fit's internal rescaling) in ``dtype``."""
        dtype = jnp.dtype(dtype)
        if isinstance(X, jax.Array) and len(X.sharding.device_set) > 1:
            # Already split over the same devices (checked by plan): the same buffers
            # under the Auto-mode mesh, no copy; divided and cast where they are.
            X = jax.make_array_from_single_device_arrays(
                X.shape, self.columns, [s.data for s in X.addressable_shards])
            if X.dtype == dtype and scale == 1.0:
                return X
            return _divide(X, scale, dtype.name, self.columns)
        if isinstance(X, jax.Array):
            X = jax.device_get(X)
        return self._host_columns(X, dtype, P(None, self.axis), scale)

    def views(self, arrays, dtype, scale=1.0):
        return tuple(self.view(X, dtype, scale) for X in arrays)

    def groups(self, groups):
        """``(N,)`` host group ids as an ``(n_padded,)`` sharded array (padding: group 0)."""
        if groups is None:
            return None
        return self._host_columns(np.asarray(groups), np.int32, P(self.axis))

    def column_mask(self):
        """``(n_padded,)`` 1 on images, 0 on padding; ``None`` without padding."""
        if self.n_padded == self.n:
            return None
        return self._host_columns(np.ones(self.n, np.float32), np.float32, P(self.axis))

    def factors(self, F, loadings, stacked=False):
        """Initial factors placed: ``F`` split over its columns, the loadings replicated.

        ``F`` may have ``n`` columns (then padded with zeros) or ``n_padded``.
        """
        spec = P(None, None, self.axis) if stacked else P(None, self.axis)
        if F.shape[-1] != self.n_padded:
            F = self._host_columns(np.asarray(F), F.dtype, spec)
        else:
            F = jax.device_put(F, NamedSharding(self.mesh, spec))
        return F, tuple(jax.device_put(W, self.replicated) for W in loadings)

    # ----------------------------------------------------------------- solving

    def solve(self, views, F0, loadings0, groups, config):
        """``core.run`` from the given start; the final :class:`SolverState`."""
        return _solve(views, F0, loadings0, groups, self.column_mask(), config, self)

    def solve_restarts(self, views, F0, loadings0, groups, config):
        """:meth:`solve` vmapped over the leading ``(restarts,)`` axis of the factors."""
        return _solve_restarts(views, F0, loadings0, groups, self.column_mask(), config,
                               self)

    def final(self, views, F, loadings, groups, config):
        """``core.residual_objective`` of final factors, one ``F`` ``(rank, n_padded)`` or
        stacked ``(restarts, rank, n_padded)`` (then one restart at a time, since each
        residual is a view-sized temporary); replicated ``(value, rel_errors)``."""
        return _final(views, F, loadings, groups, config, self)

    def transform(self, arrays, loadings, config, dtype, scale=1.0, method="nnls"):
        """``F`` for new images with the loadings fixed, on column-sharded views of
        ``X / scale``: ``core.nnls_F`` (``method="nnls"``) or ``core.solve_F``
        (``"fit"``); ``(rank, N)`` times ``scale`` as :meth:`result_F`."""
        views = self.views(arrays, dtype, scale)
        loadings = tuple(jax.device_put(jnp.asarray(W, dtype), self.replicated)
                         for W in loadings)
        if method == "nnls":
            # Zero padding columns need no mask: their right-hand side is zero (or pushes
            # below zero under l1_F), so the active set stays empty and F is 0 there.
            F = _nnls_F(views, loadings, config, self)
        else:
            F = _solve_F(views, loadings, self.column_mask(), config, self)
        return self.result_F(F, scale)

    # ----------------------------------------------------------------- outputs

    def result_F(self, F, scale=1.0):
        """``scale * F`` without padding (``scale`` undoes the fit's rescaling).

        Returns:
            A host float64 ``(rank, N)`` array where this process can hold all of it (the
            caller narrows it to float32 when representable), else the global array in
            the sharding the views came with: float32, or float64 where ``scale * F``
            exceeds float32 (possible only for float64 data, hence with x64 enabled).
        """
        if not F.is_fully_addressable and self.n_padded == self.n:
            top = float(jax.device_get(_max(F))) * scale
            dtype = "float64" if top >= _FLOAT32_MAX else "float32"
            F = _times(F, scale, dtype, self.columns)
            return jax.make_array_from_single_device_arrays(
                F.shape, self.given, [s.data for s in F.addressable_shards])
        if not F.is_fully_addressable:
            # An uneven split has no sharding; rank x N is small enough to replicate.
            F = _unpad(F, self.n, NamedSharding(self.mesh, P()))
        return np.asarray(jax.device_get(F), np.float64)[:, :self.n] * scale


def _constrain(x, mesh, spec):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def divide_host(X, scale, dtype):
    """``X / scale`` of a host array in ``dtype``, divided in float32 (float64 for float64
    data) before any narrowing cast, so that nothing overflows (the fit's rescaling)."""
    X = np.asarray(X)
    wide = np.float64 if X.dtype == np.float64 else np.float32
    return (X.astype(wide, copy=False) / wide(scale)).astype(jnp.dtype(dtype), copy=False)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _divide(X, scale, dtype, sharding):
    """The device counterpart of :func:`divide_host`, shard by shard."""
    wide = jnp.result_type(float) if X.dtype == jnp.float64 else jnp.float32
    return jax.lax.with_sharding_constraint((X.astype(wide) / scale).astype(dtype), sharding)


@jax.jit
def _max(F):
    return jnp.max(F)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _times(F, scale, dtype, sharding):
    # Multiplied in the wide dtype, so that a float64 result does not round through float32.
    wide = jnp.promote_types(F.dtype, dtype)
    return jax.lax.with_sharding_constraint((F.astype(wide) * scale).astype(dtype), sharding)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _unpad(F, n, sharding):
    return jax.lax.with_sharding_constraint(F[:, :n], sharding)


def _placed_inputs(views, F0, loadings0, groups, mask, placement, batch=()):
    mesh, axis = placement.mesh, placement.axis
    views = tuple(_constrain(X, mesh, P(None, axis)) for X in views)
    F0 = _constrain(F0, mesh, P(*batch, None, axis))
    loadings0 = tuple(_constrain(W, mesh, P()) for W in loadings0)
    if groups is not None:
        groups = _constrain(groups, mesh, P(axis))
    if mask is not None:
        mask = _constrain(mask, mesh, P(axis))
    return views, F0, loadings0, groups, mask


def _placed_state(state, placement, batch=()):
    """``F`` stays split over the images; everything else (small) is replicated."""
    mesh, axis = placement.mesh, placement.axis
    replicated = jax.tree_util.tree_map(lambda a: _constrain(a, mesh, P()),
                                        state._replace(F=None, groups=None,
                                                       column_mask=None))
    return replicated._replace(F=_constrain(state.F, mesh, P(*batch, None, axis)),
                               groups=state.groups, column_mask=state.column_mask)


def _run_one(views, F0, loadings0, groups, mask, config):
    state = core.init_state(views, F0, loadings0, config, groups, column_mask=mask)
    return core.run(state, views, config)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _solve(views, F0, loadings0, groups, mask, config, placement):
    inputs = _placed_inputs(views, F0, loadings0, groups, mask, placement)
    return _placed_state(_run_one(*inputs, config), placement)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _solve_restarts(views, F0, loadings0, groups, mask, config, placement):
    inputs = _placed_inputs(views, F0, loadings0, groups, mask, placement, batch=(None,))
    states = jax.vmap(_run_one, in_axes=(None, 0, 0, None, None, None))(*inputs, config)
    return _placed_state(states, placement, batch=(None,))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _solve_F(views, loadings, mask, config, placement):
    mesh, axis = placement.mesh, placement.axis
    views = tuple(_constrain(X, mesh, P(None, axis)) for X in views)
    F, _, _ = core.solve_F(views, loadings, config, column_mask=mask)
    return _constrain(F, mesh, P(None, axis))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _nnls_F(views, loadings, config, placement):
    mesh, axis = placement.mesh, placement.axis
    views = tuple(_constrain(X, mesh, P(None, axis)) for X in views)
    return _constrain(core.nnls_F(views, loadings, config), mesh, P(None, axis))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _final(views, F, loadings, groups, config, placement):
    mesh, axis = placement.mesh, placement.axis
    views = tuple(_constrain(X, mesh, P(None, axis)) for X in views)
    if groups is not None:
        groups = _constrain(groups, mesh, P(axis))

    def one(args):
        F, loadings = args
        F = _constrain(F, mesh, P(None, axis))
        return core.residual_objective(views, F, loadings, config, groups)

    out = one((F, loadings)) if F.ndim == 2 else lax.map(one, (F, loadings))
    return jax.tree_util.tree_map(lambda a: _constrain(a, mesh, P()), out)


# ----------------------------------------------------------------- results across processes


def is_global(F):
    """Whether ``F`` is a ``jax.Array`` this process holds only part of."""
    return isinstance(F, jax.Array) and not F.is_fully_addressable


def row_norms(F):
    """``(rank,)`` host float64 norms of the rows of a (global) embedding."""
    return np.asarray(jax.device_get(_row_norms(F)), np.float64)


@jax.jit
def _row_norms(F):
    return jnp.linalg.norm(F.astype(jnp.promote_types(F.dtype, jnp.float32)), axis=1)


def row_cosines(F_a, F_b):
    """``(rank, rank)`` host cosines between the rows of two (global) embeddings."""
    return np.asarray(jax.device_get(_row_cosines(F_a, F_b)), np.float64)


@jax.jit
def _row_cosines(F_a, F_b):
    def unit(F):
        norms = jnp.linalg.norm(F, axis=1, keepdims=True)
        return F / jnp.where(norms > 0, norms, 1.0)

    return jnp.matmul(unit(F_a), unit(F_b).T, precision=jax.lax.Precision.HIGHEST)


def _part_path(path, process, count):
    base = str(path).removesuffix(".npz")
    return f"{base}.process{process}-of-{count}.npz"


def process_part(F):
    """This process's columns of a global ``F`` and the file entries that place them.

    Returns:
        ``(F_local, extra)``: ``(rank, n_local)`` host array (this process's columns in
        order) and ``{"columns": (n_local,) int64 global column indices, "n": N}``.
    """
    starts = {}
    for shard in F.addressable_shards:
        cols = shard.index[1]
        starts.setdefault(cols.start or 0, shard.data)
    order = sorted(starts)
    local = np.concatenate([np.asarray(starts[s]) for s in order], axis=1)
    columns = np.concatenate([np.arange(s, s + starts[s].shape[1]) for s in order])
    return local, {"columns": columns, "n": np.int64(F.shape[1])}


def part_path(path):
    """The file this process writes for ``path`` in a multi-process save."""
    return _part_path(path, jax.process_index(), jax.process_count())


def wait_for_processes(name):
    """Barrier across processes: every file of a per-process save exists afterwards."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def saved_parts(path):
    """The per-process files written for ``path``, in process order; ``[]`` if ``path``
    is a plain file or nothing was saved per process.

    Raises:
        FileNotFoundError: some of the processes' files are missing.
    """
    if os.path.exists(path):
        return []
    pattern = re.escape(_part_path(path, "PROCESS", "COUNT"))
    pattern = pattern.replace("PROCESS", r"(\d+)").replace("COUNT", r"(\d+)")
    found = {}
    for name in glob.glob(_part_path(path, "*", "*")):
        match = re.fullmatch(pattern, name)
        if match:
            found[(int(match.group(2)), int(match.group(1)))] = name
    if not found:
        return []
    count = max(c for c, _ in found)
    missing = [i for i in range(count) if (count, i) not in found]
    if missing:
        raise FileNotFoundError(f"{path}: expected one file per process, "
                                f"{_part_path(path, 'i', count)} for i in 0..{count - 1}, "
                                f"got none for process(es) {missing}")
    return [found[(count, i)] for i in range(count)]


def _part_error(path, field, message):
    return ValueError(f"{path}: field '{field}': {message}")


def _read_part(path, meta, check_F):
    """One process's file: ``(columns, F_local, n)`` after the checks of its fields."""
    with np.load(path, allow_pickle=False) as data:
        for field in ("meta", "F", "columns", "n"):
            if field not in data.files:
                raise _part_error(path, field, "missing (every process's file has it)")
        if meta is not None and str(data["meta"]) != meta:
            raise _part_error(path, "meta", "expected the same fit as process 0's file, "
                                            "got a different one")
        local = data["F"] if check_F is None else check_F(path, data["F"])
        columns, n = data["columns"], data["n"]
    if n.shape != () or n.dtype.kind not in "iu" or int(n) < 1:
        raise _part_error(path, "n", f"expected an int >= 1, got {n!r}")
    n = int(n)
    if columns.dtype.kind not in "iu" or columns.shape != (local.shape[1],):
        raise _part_error(path, "columns", f"expected {local.shape[1]} int column indices "
                                           f"(one per column of F), got dtype "
                                           f"{columns.dtype} shape {columns.shape}")
    if columns.size and (columns.min() < 0 or columns.max() >= n):
        raise _part_error(path, "columns", f"expected indices in [0, {n}), got "
                                           f"[{int(columns.min())}, {int(columns.max())}]")
    return columns, local, n


def load_F(parts, mesh=None, meta=None, check_F=None):
    """``F`` from per-process files: a host array of all columns, or, with a 1-D ``mesh``
    in a multi-process run, the global array built from this process's own file.

    Args:
        parts: the files, in process order (:func:`saved_parts`).
        mesh: ``None`` or a 1-D mesh (see :func:`jaxcnmf.load_result`).
        meta: the ``meta`` text every file must hold (the same fit), or ``None``.
        check_F: ``check_F(path, F_local) -> F_local``, the checks of one file's
            ``(rank, n_local)`` columns (dtype, rank, finite, non-negative), or ``None``.

    Raises:
        ValueError: a file's field is missing or malformed, or the files do not hold
            every column; the message names the file and the field.
    """
    if mesh is not None and jax.process_count() > 1:
        _check_mesh(mesh)
        _, local, n = _read_part(parts[jax.process_index()], meta, check_F)
        sharding = NamedSharding(mesh, P(None, mesh.axis_names[0]))
        return jax.make_array_from_process_local_data(sharding, local, (local.shape[0], n))
    blocks = [_read_part(part, meta, check_F) for part in parts]
    n = blocks[0][2]
    for part, (_, _, n_part) in zip(parts, blocks):
        if n_part != n:
            raise _part_error(part, "n", f"expected {n} images as in {parts[0]}, got {n_part}")
    F = np.zeros((blocks[0][1].shape[0], n), blocks[0][1].dtype)
    seen = np.zeros(n, bool)
    for columns, local, _ in blocks:
        F[:, columns] = local
        seen[columns] = True
    if not seen.all():
        raise ValueError(f"{parts[0]}: expected the files to hold all {n} columns of F, "
                         f"got {int(seen.sum())}")
    if mesh is not None:
        _check_mesh(mesh)
        F = jax.device_put(F, NamedSharding(mesh, P(None, mesh.axis_names[0])))
    return F
