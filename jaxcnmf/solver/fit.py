"""Public front door of the coupled NMF: ``fit``, ``FitResult``, ``load_result``.

Inputs are validated once here, outside ``jit``; the solver core (:mod:`jaxcnmf.solver`)
then runs as one compiled ``lax.while_loop`` (vmapped over restarts).

Example:
    >>> import numpy as np, jaxcnmf
    >>> rng = np.random.default_rng(0)
    >>> views = {"red": rng.random((64, 100)), "conv": rng.random((32, 100))}
    >>> res = jaxcnmf.fit(views, rank=4, max_iter=20, progress=False)
    >>> res.F.shape, res.loadings["conv"].shape
    ((4, 100), (32, 4))
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import sys
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnmf.solver import core, initialization, sharding
from jaxcnmf.solver.store import Store


class ConvergenceWarning(UserWarning):
    """The solver stopped at ``max_iter`` before the KKT tolerance was met."""


class DeadConceptWarning(UserWarning):
    """Some concepts of a fit are zero (they explain under ``1e-6`` of the weighted data)."""


# A concept whose rank-one term ``W_k F_k`` has a weighted norm below this share of the
# weighted data norm explains nothing a float32 fit can resolve.
_DEAD_SHARE = 1e-6
# Views whose largest entry is this far below the largest of all views would underflow
# when squared after the common rescaling (float32 squares stop at about 1e-38).
_SMALLEST_VIEW_RATIO = {"float32": 1e-15, "float64": 1e-150}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Internal weights and penalties must stay well inside the compute dtype's range.
_LARGEST_INTERNAL = {"float32": 1e30, "float64": 1e290}


_NEGATIVE_MODES = ("raise", "clip", "shift")
_DTYPES = ("float32", "float64")
_STORAGE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _run_one(views, F0, loadings0, groups, config):
    return core.run(core.init_state(views, F0, loadings0, config, groups), views, config)


_solve = jax.jit(_run_one, static_argnames="config")
_solve_restarts = jax.jit(jax.vmap(_run_one, in_axes=(None, 0, 0, None, None)),
                          static_argnums=4)
_solve_F = jax.jit(core.solve_F, static_argnames="config")
_nnls_F = jax.jit(core.nnls_F, static_argnames="config")
_residual_objective = jax.jit(core.residual_objective, static_argnames="config")
_final_restarts = jax.jit(
    jax.vmap(lambda v, F, L, g, c: core.residual_objective(v, F, L, c, g),
             in_axes=(None, 0, 0, None, None)), static_argnums=4)
_random_restarts = jax.jit(
    jax.vmap(initialization.random, in_axes=(0, None, None, None, None)),
    static_argnums=(2, 3, 4))


# ----------------------------------------------------------------------------- validation


def _name_views(views):
    if isinstance(views, dict):
        if not views:
            raise ValueError("views: expected at least one view, got an empty dict")
        # Names travel through JSON (save/load) and select views in transform: a
        # non-string key would come back as a different key.
        for name in views:
            if not isinstance(name, str):
                raise TypeError(f"views: expected string view names, got {name!r} "
                                f"({type(name).__name__})")
        return list(views.keys()), list(views.values())
    if isinstance(views, (list, tuple)):
        if not views:
            raise ValueError("views: expected at least one view, got an empty list")
        return [f"view{i}" for i in range(len(views))], list(views)
    raise TypeError(f"views: expected a dict name -> (rows, N) array or a list of arrays, "
                    f"got {type(views).__name__}")


@jax.jit
def _device_view_summary(X):
    """Non-finite count, negative count and minimum of a device view, in one program."""
    return (jnp.count_nonzero(~jnp.isfinite(X)), jnp.count_nonzero(X < 0), jnp.min(X))


def _check_view(name, X, negative):
    """One view as a float array, after the checks of its shape and values.

    A ``jax.Array`` stays on its device: its checks run there and only three summary
    numbers come back, so views collected on an accelerator never visit the host.
    """
    on_device = isinstance(X, jax.Array)
    xp = jnp if on_device else np
    if not on_device:
        X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"view {name!r}: expected a 2-D array (rows, N), got shape {X.shape}")
    if X.size == 0:
        raise ValueError(f"view {name!r} is empty: expected at least one row and one "
                         f"column, got shape {X.shape}")
    if X.dtype == bool or np.issubdtype(X.dtype, np.integer):
        warnings.warn(f"view {name!r}: converting {X.dtype} entries to float32",
                      UserWarning, stacklevel=3)
        X = X.astype(np.float32)
    elif not np.issubdtype(X.dtype, np.floating) and X.dtype.name != "bfloat16":
        raise TypeError(f"view {name!r}: expected real numbers, got dtype {X.dtype}")
    if on_device:
        bad, n_negative, minimum = jax.device_get(_device_view_summary(X))
    else:
        bad, n_negative = np.count_nonzero(~np.isfinite(X)), np.count_nonzero(X < 0)
        minimum = X.min() if n_negative else 0.0
    if bad:
        raise ValueError(f"view {name!r} contains {bad} NaN or Inf entries")
    if n_negative:
        minimum = float(minimum)
        if negative == "raise":
            raise ValueError(
                f"view {name!r} has {n_negative} negative entries (minimum {minimum:.4g}); "
                f"expected non-negative data, or pass negative='clip' or 'shift'")
        # A Python float keeps X's dtype (weak typing), as X - X.min() would, without a
        # second pass over the view.
        X = xp.maximum(X, 0) if negative == "clip" else X - minimum
    return X


def _check_views(views, negative):
    names, arrays = _name_views(views)
    arrays = [_check_view(name, X, negative) for name, X in zip(names, arrays)]
    n = arrays[0].shape[1]
    for name, X in zip(names[1:], arrays[1:]):
        if X.shape[1] != n:
            raise ValueError(
                f"views {names[0]!r} and {name!r} have different numbers of columns "
                f"(images): {n} vs {X.shape[1]}; expected the same N in every view")
    return tuple(names), arrays


def _check_choice(label, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{label}: expected one of {list(choices)}, got {value!r}")


def _check_number(label, value, minimum=0.0, integer=False):
    kind = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kind) or not np.isfinite(value) \
            or value < minimum:
        expected = "an integer" if integer else "a finite number"
        raise ValueError(f"{label}: expected {expected} >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def _view_weights(weights, names, arrays):
    if weights is None:
        return tuple(1.0 for _ in names)
    if isinstance(weights, str):
        _check_choice("weights", weights, ("balanced",))
        # A zero view has nothing to balance; weight 1 keeps its (zero) term finite.
        # Device views are summed on their device (float32 unless x64 is on) and come back
        # as numbers, not arrays.
        norms = [_sq_norm(X) for X in arrays]
        return tuple(1.0 / s if s > 0 else 1.0 for s in norms)
    if not isinstance(weights, dict):
        raise ValueError(f"weights: expected None, 'balanced' or a dict name -> weight, "
                         f"got {type(weights).__name__}")
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise ValueError(f"weights: unknown view(s) {unknown}, expected names among "
                         f"{list(names)}")
    result = []
    for name in names:
        w = weights.get(name, 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) \
                or not np.isfinite(w) or w <= 0:
            raise ValueError(f"weights[{name!r}]: expected a positive finite number, "
                             f"got {w!r}")
        result.append(float(w))
    return tuple(result)


@jax.jit
def _device_max_and_scaled_sq(X):
    top = jnp.max(X).astype(jnp.result_type(float))
    safe = jnp.where(top > 0, top, 1.0)
    return top, jnp.sum(jnp.square(X.astype(safe.dtype) / safe))


# Entries of a host view reduced at once by _max_and_sq_norm (8 MB of float64).
_BAND = 1 << 20


def _max_and_sq_norm(X):
    """Largest entry and ``||X||^2`` of a ``(rows, N)`` view as Python floats, without
    overflow or underflow.

    The sum is taken of ``(X / max X)^2`` (entries at most 1) and multiplied back by
    ``max^2`` in float64, so entries above 1.8e19 in float32 or of 1e-22 stay exact.
    Device arrays are reduced on their device; only two numbers come back.
    """
    if isinstance(X, jax.Array):
        top, scaled = (float(v) for v in jax.device_get(_device_max_and_scaled_sq(X)))
        return top, scaled
    top = float(np.max(X))
    if not top > 0:
        return top, 0.0
    # By row bands of about _BAND entries: whole-matrix temporaries (X / top, then its
    # float64 squares) were three times the view's size and took seconds at N = 100k.
    rows = max(1, _BAND // max(1, X.shape[1]))
    scaled = 0.0
    for start in range(0, X.shape[0], rows):
        band = np.asarray(X[start:start + rows], np.float64) / top
        scaled += float(np.einsum("ij,ij->", band, band))
    return top, scaled


def _config_record(config, names, view_weights, data_norm2, *, init, unit_columns,
                   **settings):
    """``FitResult.config``: the caller's settings (``settings``: method, rank, seed,
    penalties, group settings, max_iter, tol, restarts, negative, dtype, storage_dtype, as
    the caller gave or resolved them) with the view weights, the solver's ``eps`` and
    ``inner_iter`` from the internal ``config`` and the weighted data norm; shared by the
    in-memory and the streaming fit (which adds its store's fields)."""
    return {**settings, "init": init if isinstance(init, str) else "user",
            "weights": dict(zip(names, view_weights)), "unit_columns": bool(unit_columns),
            "eps": config.eps, "inner_iter": config.inner_iter,
            "weighted_data_sq_norm": data_norm2}


def _sq_norm(X):
    top, scaled = _max_and_sq_norm(X)
    return scaled * top * top if top > 0 else 0.0


def _check_group_penalty(group_lam, group_lam_fraction) -> tuple[float, float | None]:
    """``(group_lam, group_lam_fraction)`` checked: a non-negative penalty, or a fraction
    in (0, 1] of ``lambda_max`` (not both)."""
    group_lam = _check_number("group_lam", group_lam)
    if group_lam_fraction is None:
        return group_lam, None
    fraction = _check_number("group_lam_fraction", group_lam_fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"group_lam_fraction: expected a number in (0, 1], got "
                         f"{group_lam_fraction!r}")
    if group_lam > 0:
        raise ValueError(f"group_lam_fraction: expected either group_lam or "
                         f"group_lam_fraction, got both (group_lam={group_lam})")
    return group_lam, fraction


def _check_groups(groups, n, group_lam):
    if groups is None:
        if group_lam > 0:
            raise ValueError("groups: expected an int array (N,) of group ids when "
                             f"group_lam > 0, got None (group_lam={group_lam})")
        return None, 1
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != n:
        raise ValueError(f"groups: expected one id per image, shape ({n},), "
                         f"got shape {groups.shape}")
    if not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups: expected integer group ids, got dtype {groups.dtype}")
    if groups.min() < 0:
        raise ValueError(f"groups: expected non-negative group ids, got minimum "
                         f"{int(groups.min())}")
    # Only which images share a group matters: relabel to the ids present, so an id like
    # 2**32 + 1 neither overflows int32 nor makes billions of empty groups.
    _, dense = np.unique(groups, return_inverse=True)
    return dense.astype(np.int32).reshape(n), int(dense.max()) + 1 if n else 1


def _check_dtypes(dtype, storage_dtype):
    _check_choice("dtype", dtype, _DTYPES)
    if dtype == "float64" and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise ValueError("dtype='float64' needs 64-bit JAX: expected "
                         "jax.config.update('jax_enable_x64', True) before fitting, "
                         "got 64-bit mode disabled")
    if storage_dtype is None:
        return dtype
    _check_choice("storage_dtype", storage_dtype, _STORAGE_DTYPES)
    if storage_dtype == "float64" and dtype != "float64":
        raise ValueError("storage_dtype: expected a dtype no wider than dtype="
                         f"{dtype!r}, got 'float64'")
    return storage_dtype


def _scaled(X, scale, dtype):
    """``X / scale`` in ``dtype``, divided before any narrowing cast so nothing overflows."""
    if isinstance(X, jax.Array):
        wide = jnp.result_type(float) if X.dtype == jnp.float64 else jnp.float32
        return (X.astype(wide) / scale).astype(dtype)
    return jnp.asarray(sharding.divide_host(X, scale, dtype))


def concept_scale(loadings, weights=None):
    """Weighted norm of every concept's stacked loading column.

    Args:
        loadings: dict name -> ``(rows_v, rank)`` (or a sequence of them).
        weights: dict name -> view weight (or a sequence in the same order); default 1.

    Returns:
        ``(rank,)`` float64 ``sqrt(sum_v w_v ||W_v[:, k]||^2)``: the factor that makes
        ``scale[:, None] * F`` independent of how a fit split ``W F`` between its factors.

    Example:
        >>> concept_scale({"a": np.array([[3.0, 0.0], [4.0, 1.0]])})
        array([5., 1.])
    """
    if isinstance(loadings, dict):
        names = list(loadings)
        arrays = [np.asarray(loadings[name], np.float64) for name in names]
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, dict):
            weights = [float(weights[name]) for name in names]
    else:
        arrays = [np.asarray(W, np.float64) for W in loadings]
        weights = [1.0] * len(arrays) if weights is None else list(weights)
    return np.sqrt(sum(float(w) * np.sum(W * W, axis=0) for w, W in zip(weights, arrays)))


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class FitResult:
    """A fitted coupled NMF (host NumPy arrays).

    Attributes:
        F: ``(rank, N)`` float32 shared non-negative image embedding (float64 when the
            data's scale puts it beyond float32, e.g. float64 views near 1e40).
        loadings: dict view name -> ``(rows_v, rank)`` non-negative loadings (``P_i``/``O_j``).
        view_names: view names, in order.
        history: ``{"objective": (n_iter,), "rel_error": {name: (n_iter,)}}``.
        n_iter: iterations run.
        converged: whether the KKT tolerance was met before ``max_iter``.
        relative_errors: dict name -> ``||X_v - W_v F|| / ||X_v||`` at the end, computed
            from the residuals (exact also for near-exact fits; the history is assembled
            from Grams and, in float32, resolves about ``1e-7`` of ``||X||^2``).
        config: JSON-serialisable settings used (method, rank, seed, weights, ...).
        objective: final objective value, from the residuals.
        restarts: every restart's :class:`FitResult` (best first is not implied; index =
            restart number), or ``None`` when ``restarts=1``.
        stability: mean Hungarian-matched cosine of ``F`` rows between the best restart
            and each other one, or ``None`` when ``restarts=1``.
        devices: number of devices the fit ran on (its images sharded over them). When
            they span processes, ``F`` is the global ``jax.Array`` split over its columns
            like the views (no process can hold all of it) and :meth:`save` writes one
            file per process.

    Example:
        >>> res.reconstruct("red").shape  # doctest: +SKIP
        (64, 100)
    """

    F: np.ndarray
    loadings: dict
    view_names: tuple
    history: dict
    n_iter: int
    converged: bool
    relative_errors: dict
    config: dict
    objective: float
    restarts: list | None = None
    stability: float | None = None
    devices: int = 1

    def _solver_config(self, names, max_iter, tol):
        weights = tuple(self.config["weights"][name] for name in names)
        return core.SolverConfig(
            method=self.config["method"], rank=self.config["rank"], weights=weights,
            l1_F=self.config["l1_F"], l2_F=self.config["l2_F"], max_iter=max_iter,
            tol=tol, eps=self.config["eps"], dtype=self.config["dtype"])

    def transform(self, views, max_iter=200, tol=None, method="nnls", mesh=None, *,
                  use=None, progress=True):
        """Embed images with the loadings fixed: non-negative least squares for ``F``.

        Args:
            views: dict name -> ``(rows_v, N_new)`` holding any subset of the fitted view
                names (a list is read as all fitted views in order), or a
                :class:`jaxcnmf.store.Store`: then ``F`` is solved block by block of the
                store's columns (exact NNLS only; memory: ``F`` plus one block; two passes
                over the store, one for the data's scale and one to solve). Their
                fitted weights and ``F`` penalties are used; the group lasso is not.
            max_iter: bound on the ``F`` updates (``method="fit"`` only).
            tol: KKT tolerance; default the fit's ``tol`` (``method="fit"`` only).
            method: ``"nnls"`` (default): the exact solution by an active-set method on
                the QR factor of the loadings (:func:`jaxcnmf.solver.core.nnls_F`);
                ``"fit"``: the fit's own MU/HALS ``F`` updates, which stop early on
                ill-conditioned loadings.
            mesh: optional 1-D ``jax.sharding.Mesh`` to shard the images over, as in
                :func:`fit` (views already sharded over their columns are used as they are).
            use: with a store, the fitted views to embed from (default every fitted view);
                each must be in the store with its fitted number of rows.
            progress: with a store, a progress bar over its blocks.

        Returns:
            ``(rank, N_new)`` float32 embedding (float64 where the data's scale is beyond
            float32; a global ``jax.Array`` when the views span processes).

        Raises:
            ValueError: unknown views, or rows that differ from the fitted loadings' (the
                view is named); with a store also a fitted view the store lacks.

        Example:
            >>> F_new = res.transform({"conv": A_new})  # doctest: +SKIP
            >>> F_all = res.transform(store.open("acts/"))  # doctest: +SKIP
        """
        _check_choice("method", method, ("nnls", "fit"))
        if isinstance(views, Store):
            if method != "nnls":
                raise ValueError("method: expected 'nnls' for a store (the exact solution "
                                 "is column-separable, the fit's iterations are not), got "
                                 f"{method!r}")
            if mesh is not None:
                raise ValueError("mesh: a transform from a store runs on one device; pass "
                                 "mesh=None")
            return _transform_store(self, views, use, progress)
        if use is not None:
            raise ValueError("use: expected None for in-memory views (pass only the views "
                             "to embed from), got a value")
        if isinstance(views, (list, tuple)):
            if len(views) != len(self.view_names):
                raise ValueError(f"views: a list must hold all {len(self.view_names)} "
                                 f"fitted views in order, got {len(views)}")
            views = dict(zip(self.view_names, views))
        if not isinstance(views, dict) or not views:
            got = "an empty dict" if isinstance(views, dict) else type(views).__name__
            raise ValueError(f"views: expected a non-empty dict name -> (rows, N) array, "
                             f"got {got}")
        unknown = [name for name in views if name not in self.view_names]
        if unknown:
            raise ValueError(f"views: unknown view(s) {unknown}, expected names among "
                             f"{list(self.view_names)}")
        placement = sharding.plan(*_name_views(views), mesh)
        names, arrays = _check_views(views, self.config["negative"])
        for name, X in zip(names, arrays):
            rows = self.loadings[name].shape[0]
            if X.shape[0] != rows:
                raise ValueError(f"view {name!r}: expected {rows} rows as when fitted, "
                                 f"got {X.shape[0]}")
        tol = self.config["tol"] if tol is None else _check_number("tol", tol)
        max_iter = _check_number("max_iter", max_iter, 1, integer=True)
        config = self._solver_config(names, max_iter, tol)
        dtype = self.config["dtype"]
        # Solve for F / s on X / s with weights over their largest (the penalties follow),
        # so that no scale of data or weights can overflow or vanish in the solve.
        scale = max(_max_and_sq_norm(X)[0] for X in arrays) or 1.0
        top = max(config.weights)
        config = config._replace(
            weights=tuple(w / top for w in config.weights),
            l1_F=config.l1_F / (scale * top), l2_F=config.l2_F / top)
        if placement is not None:
            placement = placement.with_columns(arrays[0].shape[1])
            F = placement.transform(arrays, [self.loadings[name] for name in names], config,
                                    dtype, scale, method)
            return F if sharding.is_global(F) else _float32_if_representable(F)
        jviews = tuple(_scaled(X, scale, dtype) for X in arrays)
        loadings = tuple(jnp.asarray(self.loadings[name], dtype) for name in names)
        if method == "nnls":
            F = _nnls_F(jviews, loadings, config=config)
        else:
            F, _, _ = _solve_F(jviews, loadings, config=config)
        return _float32_if_representable(np.asarray(F, np.float64) * scale)

    def scaled_F(self):
        """``F`` with each row times its concept's weighted stacked loading norm.

        ``W F = (W D)(D^-1 F)`` for any positive diagonal ``D``, so comparisons across
        concepts of ``F`` itself (each image's strongest concept, purity, NMI) depend on
        how the solver split the scale. Row ``k`` of the result is
        ``sqrt(sum_v w_v ||W_v[:, k]||^2) * F[k]``, the same for every split.

        Returns:
            ``(rank, N)`` float64; when ``F`` is a global array spanning processes, a
            global array sharded like ``F``, in ``F``'s dtype.

        Example:
            >>> strongest = res.scaled_F().argmax(axis=0)  # doctest: +SKIP
        """
        scale = concept_scale(self.loadings, self.config["weights"])[:, None]
        if sharding.is_global(self.F):
            return self.F * jnp.asarray(scale, self.F.dtype)
        return scale * np.asarray(self.F, np.float64)

    def reconstruct(self, name, F=None):
        """``W_v F`` for one view.

        Args:
            name: a fitted view name.
            F: optional ``(rank, N')`` embedding (e.g. from :meth:`transform`); default the
                fitted ``F``.

        Returns:
            ``(rows_v, N')`` float32 reconstruction.

        Example:
            >>> res.reconstruct("conv").shape  # doctest: +SKIP
        """
        if name not in self.loadings:
            raise KeyError(f"view {name!r}: expected one of {list(self.view_names)}")
        F = self.F if F is None else np.asarray(F, np.float32)
        return self.loadings[name] @ F

    def summary(self):
        """A short human-readable description of the fit."""
        status = "converged" if self.converged else "stopped at max_iter"
        lines = [
            f"jaxcnmf fit: method {self.config['method']}, rank {self.config['rank']}, "
            f"N={self.F.shape[1]}, {len(self.view_names)} views",
            f"  {self.n_iter} iterations, {status}, objective {self.objective:.6g}",
        ]
        for name in self.view_names:
            lines.append(f"  {name:<16} rows {self.loadings[name].shape[0]:>7}  "
                         f"weight {self.config['weights'][name]:.3g}  "
                         f"rel. error {self.relative_errors[name]:.4f}")
        if self.stability is not None:
            lines.append(f"  stability over {len(self.restarts)} restarts: "
                         f"{self.stability:.4f}")
        return "\n".join(lines)

    def save(self, path):
        """Write factors, history and config to an ``.npz`` file (restarts are not kept).

        Args:
            path: file path; NumPy appends ``.npz`` when it is missing.

        When ``F`` is a global array spanning processes, every process must call
        ``save`` with the same ``path``; each writes ``<path>.process<i>-of-<count>.npz``
        (its columns of ``F`` and the replicated rest) and returns once all have written.
        :func:`load_result` reads them back.

        Returns:
            The path written (by this process), as a string.

        Example:
            >>> res.save("fit.npz"); jaxcnmf.load_result("fit.npz")  # doctest: +SKIP
        """
        meta = {
            "view_names": list(self.view_names), "n_iter": self.n_iter,
            "converged": self.converged, "relative_errors": self.relative_errors,
            "config": self.config, "objective": self.objective, "stability": self.stability,
            "devices": self.devices,
        }
        arrays = {f"loading_{i}": self.loadings[name]
                  for i, name in enumerate(self.view_names)}
        rel = np.stack([self.history["rel_error"][name] for name in self.view_names])
        F, parts = self.F, {}
        if sharding.is_global(F):
            # No process holds all of F: each writes its own columns and where they go.
            F, parts = sharding.process_part(F)
            path = sharding.part_path(path)
        np.savez(path, F=F, objective_history=self.history["objective"],
                 rel_error_history=rel, meta=np.array(json.dumps(meta)), **parts, **arrays)
        if parts:
            sharding.wait_for_processes("jaxcnmf FitResult.save")
        path = str(path)
        return path if path.endswith(".npz") else path + ".npz"


_CONFIG_TYPES = {
    "method": str, "rank": int, "weights": dict, "unit_columns": bool, "l1_F": float,
    "l2_F": float, "l2_W": float, "group_lam": float, "max_iter": int, "tol": float,
    "negative": str, "dtype": str, "eps": float,
}


def _store_view_names(res, store, use):
    """The fitted views to read from ``store``, each checked to be there with its rows."""
    names = list(res.view_names) if use is None else list(use)
    if not names:
        raise ValueError("use: expected at least one fitted view name, got none")
    unknown = [name for name in names if name not in res.loadings]
    if unknown:
        raise ValueError(f"use: unknown view(s) {unknown}, expected names among "
                         f"{list(res.view_names)}")
    for name in names:
        if name not in store.rows:
            raise ValueError(f"view {name!r}: fitted, but not in the store {str(store.path)!r} "
                             f"(its views: {list(store.views)}); pass use=[...] to embed "
                             f"from the others")
        rows = res.loadings[name].shape[0]
        if store.rows[name] != rows:
            raise ValueError(f"view {name!r}: expected {rows} rows as when fitted, got "
                             f"{store.rows[name]} in the store {str(store.path)!r}")
    return names


def _store_block(store, i, names, negative, minima=None):
    """Block ``i`` of ``names`` as float arrays (float64 stays float64), after the checks
    of :func:`_check_view`; ``minima`` (``"shift"``) are the views' minima over the store."""
    out = []
    for name, X in store.read_block(i, views=names).items():
        X = np.asarray(X, np.float64 if X.dtype == np.float64 else np.float32)
        if minima is not None:
            X = X - minima[name] if minima[name] < 0 else X
        out.append(_check_view(name, X, negative))
    return out


def _transform_store(res, store, use, progress):
    """:meth:`FitResult.transform` of a store: exact NNLS, one block of columns at a time.

    A first pass takes every view's largest entry (and minimum, for ``negative="shift"``)
    so the solve is scaled as in memory; the second solves each block, zero-padded to the
    block size so that one compiled program serves all.
    """
    from tqdm.auto import tqdm

    names = _store_view_names(res, store, use)
    negative = res.config["negative"]
    minima = None
    if negative == "shift":
        minima = dict.fromkeys(names, 0.0)
        for i in range(store.n_blocks):
            for name, X in store.read_block(i, views=names).items():
                minima[name] = min(minima[name], float(np.min(X)))
    scale = 0.0
    for i in range(store.n_blocks):
        for X in _store_block(store, i, names, negative, minima):
            scale = max(scale, float(np.max(X)))
    scale = scale or 1.0
    # The in-memory defaults (unused by NNLS): the same static config shares its compile.
    config = res._solver_config(tuple(names), 200, res.config["tol"])
    top = max(config.weights)
    config = config._replace(weights=tuple(w / top for w in config.weights),
                             l1_F=config.l1_F / (scale * top), l2_F=config.l2_F / top)
    dtype = res.config["dtype"]
    loadings = tuple(jnp.asarray(res.loadings[name], dtype) for name in names)
    F = np.empty((config.rank, store.n), np.float32)
    for i in tqdm(range(store.n_blocks), desc="transform", unit="block", leave=False,
                  disable=not progress, file=sys.stderr):
        start, stop = store.columns(i)
        pad = store.block_size - (stop - start)
        jviews = tuple(_scaled(np.pad(X, ((0, 0), (0, pad))), scale, dtype)
                       for X in _store_block(store, i, names, negative, minima))
        F_b = np.asarray(_nnls_F(jviews, loadings, config=config), np.float64)
        F_b = F_b[:, :stop - start] * scale
        if F.dtype == np.float32 and np.max(F_b, initial=0.0) >= _FLOAT32_MAX:
            F = F.astype(np.float64)
        F[:, start:stop] = F_b
    return F


def _load_error(path, field, message):
    return ValueError(f"{path}: field '{field}': {message}")


def _checked_array(path, field, array, shape):
    if array.dtype.kind != "f":
        raise _load_error(path, field, f"expected a float array, got dtype {array.dtype}")
    if array.shape != shape:
        raise _load_error(path, field, f"expected shape {shape}, got {array.shape}")
    return array


def _checked_factor(path, field, array, shape):
    array = _checked_array(path, field, array, shape)
    if not np.all(np.isfinite(array)):
        raise _load_error(path, field, "expected finite entries, got NaN or Inf")
    if np.any(array < 0):
        raise _load_error(path, field, f"expected non-negative entries, got minimum "
                                       f"{float(array.min()):.4g}")
    return array


def _checked_config(path, config, names):
    if not isinstance(config, dict):
        raise _load_error(path, "config", f"expected a dict, got {type(config).__name__}")
    for key, kind in _CONFIG_TYPES.items():
        value = config.get(key)
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and np.isfinite(value)) if kind is float else isinstance(value, kind)
        if kind is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise _load_error(path, f"config.{key}",
                              f"expected {kind.__name__}, got {value!r}")
    _choices = {"method": core.METHODS, "negative": _NEGATIVE_MODES, "dtype": _DTYPES}
    for key, choices in _choices.items():
        if config[key] not in choices:
            raise _load_error(path, f"config.{key}",
                              f"expected one of {list(choices)}, got {config[key]!r}")
    for key in ("l1_F", "l2_F", "l2_W", "group_lam", "tol", "eps"):
        if config[key] < 0:
            raise _load_error(path, f"config.{key}", f"expected >= 0, got {config[key]!r}")
    if config["rank"] < 1:
        raise _load_error(path, "config.rank", f"expected >= 1, got {config['rank']!r}")
    weights = config["weights"]
    if sorted(weights) != sorted(names):
        raise _load_error(path, "config.weights",
                          f"expected one weight per view {list(names)}, got {sorted(weights)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) \
                or w <= 0:
            raise _load_error(path, f"config.weights[{name!r}]",
                              f"expected a positive finite number, got {w!r}")


def load_result(path, mesh=None):
    """Read a :class:`FitResult` written by :meth:`FitResult.save`, checking every field.

    Args:
        path: ``.npz`` file, or the path given to ``save`` by every process of a
            multi-process fit (its per-process files are found next to it).
        mesh: for per-process files only: with a 1-D mesh in a multi-process run, each
            process reads only its own file and ``F`` is the global array; otherwise
            ``F`` is assembled on the host from all the files.

    Returns:
        :class:`FitResult` (with ``restarts=None``).

    Raises:
        ValueError: a field is missing, has the wrong shape or type, or holds negative
            or non-finite factors; the message names the file and the field.

    Example:
        >>> res = jaxcnmf.load_result("fit.npz")  # doctest: +SKIP
    """
    parts = sharding.saved_parts(path)
    if parts:
        # A multi-process save: process 0's file holds the replicated fields checked
        # here; every file's F part (and its column placement) is checked by load_F.
        path = parts[0]
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        for field in ("meta", "F", "objective_history", "rel_error_history"):
            if field not in files:
                raise _load_error(path, field, "missing")
        try:
            meta = json.loads(str(data["meta"]))
        except ValueError as error:
            raise _load_error(path, "meta", f"expected JSON, got an unreadable value "
                                            f"({error})") from None
        if not isinstance(meta, dict):
            raise _load_error(path, "meta", f"expected a JSON object, got "
                                            f"{type(meta).__name__}")
        names = meta.get("view_names")
        if not isinstance(names, list) or not names \
                or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise _load_error(path, "meta.view_names",
                              f"expected a non-empty list of distinct strings, got {names!r}")
        names = tuple(names)
        config = meta.get("config")
        _checked_config(path, config, names)
        rank = config["rank"]
        F = _checked_F(path, data["F"], rank)
        meta_text = str(data["meta"])
        loadings = {}
        for i, name in enumerate(names):
            field = f"loading_{i}"
            if field not in files:
                raise _load_error(path, field, f"missing (loadings of view {name!r})")
            W = data[field]
            rows = W.shape[0] if W.ndim == 2 else -1
            loadings[name] = _checked_factor(path, f"{field} ({name!r})", W, (rows, rank))
        n_iter = meta.get("n_iter")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
            raise _load_error(path, "meta.n_iter", f"expected an int >= 0, got {n_iter!r}")
        objective_history = _checked_array(path, "objective_history",
                                           data["objective_history"], (n_iter,))
        rel = _checked_array(path, "rel_error_history", data["rel_error_history"],
                             (len(names), n_iter))
    history = {"objective": objective_history,
               "rel_error": {name: rel[i] for i, name in enumerate(names)}}
    if not isinstance(meta.get("converged"), bool):
        raise _load_error(path, "meta.converged", f"expected a bool, got "
                                                  f"{meta.get('converged')!r}")
    errors = meta.get("relative_errors")
    if not isinstance(errors, dict) or sorted(errors) != sorted(names) or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and np.isfinite(e)
            and e >= 0 for e in errors.values()):
        raise _load_error(path, "meta.relative_errors",
                          f"expected a finite non-negative number per view, got {errors!r}")
    objective = meta.get("objective")
    if isinstance(objective, bool) or not isinstance(objective, (int, float)) \
            or not np.isfinite(objective):
        raise _load_error(path, "meta.objective", f"expected a finite number, got "
                                                  f"{objective!r}")
    stability = meta.get("stability")
    if stability is not None and (isinstance(stability, bool)
                                  or not isinstance(stability, (int, float))):
        raise _load_error(path, "meta.stability", f"expected a number or null, got "
                                                  f"{stability!r}")
    devices = meta.get("devices", 1)  # absent from files saved before sharding existed
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise _load_error(path, "meta.devices", f"expected an int >= 1, got {devices!r}")
    if parts:
        F = sharding.load_F(parts, mesh, meta_text,
                            lambda part, local: _checked_F(part, local, rank))
    return FitResult(F=F, loadings=loadings, view_names=names, history=history,
                     n_iter=n_iter, converged=meta["converged"], relative_errors=errors,
                     config=config, objective=float(objective), stability=stability,
                     devices=devices)


def _checked_F(path, F, rank):
    """``F`` (or one process's columns of it) after the checks of :func:`_checked_factor`."""
    if F.ndim != 2:
        raise _load_error(path, "F", f"expected shape (rank={rank}, N), got {F.shape}")
    return _checked_factor(path, "F", F, (rank, F.shape[1]))


def _float32_if_representable(F):
    """float32, or float64 where the data's own scale (e.g. 1e40) is beyond float32."""
    return F.astype(np.float32) if np.max(F, initial=0.0) < _FLOAT32_MAX else F


def _result(state, names, config_dict, problem, final, placement=None):
    """:class:`FitResult` of one state, mapped back to the caller's scale.

    ``problem`` holds the internal rescaling (``F = scale * F'``, objective ``= norm *``
    internal objective); ``final`` the residual-based internal objective and relative
    errors of this state. With a ``placement`` (sharded fit) ``F`` comes back without its
    padding, or stays a global array when no process can hold all of it.
    """
    F = None if placement is None else placement.result_F(state.F, problem.scale)
    if placement is not None:
        # F is already out; groups and the column mask are split over the images (they
        # cannot be fetched across processes) and are not part of the result.
        state = state._replace(F=None, groups=None, column_mask=None)
    # One transfer for the whole state, not one blocking read per field.
    state, final = jax.device_get((state, final))
    n_iter = int(state.iteration)
    objective = np.asarray(state.objective_history, np.float64)[:n_iter] * problem.norm
    rel = np.asarray(state.rel_error_history, np.float64)[:, :n_iter].copy()
    value = float(final[0]) * problem.norm
    final_rel = np.asarray(final[1], np.float64)
    if n_iter:
        objective[-1] = value
        rel[:, -1] = final_rel
    if F is None:
        F = np.asarray(state.F, np.float64) * problem.scale
    if not sharding.is_global(F):
        F = _float32_if_representable(F)
    return FitResult(
        F=F,
        loadings={name: np.asarray(W, np.float32) for name, W in zip(names, state.loadings)},
        view_names=names,
        history={"objective": objective,
                 "rel_error": {name: rel[i] for i, name in enumerate(names)}},
        n_iter=n_iter,
        converged=bool(state.converged) and not bool(state.failed),
        relative_errors={name: float(final_rel[i]) for i, name in enumerate(names)},
        config=config_dict,
        objective=value,
        devices=1 if placement is None else placement.device_count,
    )


def _matched_cosine(F_a, F_b):
    """Mean cosine of the rows of two embeddings under the best one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    def unit(F):
        norms = np.linalg.norm(F, axis=1, keepdims=True)
        return F / np.where(norms > 0, norms, 1.0)

    if sharding.is_global(F_a):
        cosines = sharding.row_cosines(F_a, F_b)
    else:
        cosines = unit(F_a.astype(np.float64)) @ unit(F_b.astype(np.float64)).T
    rows, cols = linear_sum_assignment(-cosines)
    return float(cosines[rows, cols].mean())


def _initial_factors(init, names, arrays, jviews, rank, weights, seed, restarts, dtype,
                     placement=None):
    """Stacked ``(restarts, ...)`` initial factors; restart ``i`` uses seed ``seed + i``.

    Restart 0 uses ``init``; with ``"nndsvd"``, ``"nndsvda"`` or user arrays the further
    restarts are random initialisations (seeds ``seed + 1, ...``), so that the stability
    score measures genuinely different starting points.

    With a ``placement`` (sharded fit) the views are zero-padded to ``placement.n_padded``
    columns; the factors are drawn for the ``placement.n`` real images, zero on the padding.
    """
    n_columns = None if placement is None else placement.n
    n_random = restarts if init == "random" else restarts - 1
    first = 0 if init == "random" else 1
    parts_F, parts_L = [], []
    if init != "random":
        if isinstance(init, dict):
            F, loadings = initialization.user(init, names, [X.shape for X in arrays], rank,
                                              dtype)
        else:
            F, loadings = initialization.nndsvd(jviews, rank, weights, variant=init,
                                                seed=seed, dtype=dtype, n_columns=n_columns)
        if placement is not None:
            F, loadings = placement.factors(F, loadings)
        parts_F.append(F[None])
        parts_L.append(tuple(W[None] for W in loadings))
    if n_random:
        keys = jnp.stack([jax.random.PRNGKey(seed + first + i) for i in range(n_random)])
        F, loadings = _random_restarts(keys, jviews, rank, dtype, n_columns)
        if placement is not None:
            F, loadings = placement.factors(F, loadings, stacked=True)
        parts_F.append(F)
        parts_L.append(tuple(loadings))
    F0 = jnp.concatenate(parts_F)
    loadings0 = tuple(jnp.concatenate([p[v] for p in parts_L]) for v in range(len(names)))
    return F0, loadings0


def fit(views, rank, *, method="mu", max_iter=200, tol=1e-4, seed=0, init="nndsvda",
        weights=None, unit_columns=False, l1_F=0.0, l2_F=0.0, l2_W=0.0, groups=None,
        group_lam=0.0, group_lam_fraction=None, restarts=1, negative="raise",
        dtype="float32", storage_dtype=None, progress=True, mesh=None, cache_bytes=None):
    """Coupled NMF of views sharing their columns: ``X_v ~ W_v F`` for every view ``v``.

    Minimises ``sum_v w_v ||X_v - W_v F||^2 + l1_F |F|_1 + l2_F ||F||^2
    + l2_W sum_v ||W_v||^2 + group_lam sum_k sum_g ||F[k, group g]||_2`` over
    non-negative factors (with ``unit_columns=True``: subject to unit stacked loading
    columns). Internally the views are divided by their largest entry and the objective
    by ``sum_v w_v ||X_v||^2`` (weights and penalties follow, so the minimiser is the
    same); results are mapped back, so a fit of ``c * X`` is ``c`` times the fit of ``X``
    and no data scale overflows, underflows or lets ``eps`` dominate.

    Args:
        views: dict name -> ``(rows_v, N)`` non-negative array (pixel channels, layer
            activations), or a list (named ``"view0"``, ``"view1"``, ...), or a
            :class:`jaxcnmf.store.Store` on disk (streamed: :mod:`jaxcnmf.solver.streaming`).
        rank: number of concepts, ``1 <= rank <= min(N, total rows)``.
        method: ``"mu"`` (the paper's multiplicative updates) or ``"hals"`` (faster).
        max_iter: most iterations; reaching it warns with :class:`ConvergenceWarning`.
        tol: stop when the KKT violation (projected-gradient norm of both blocks) falls
            to ``tol`` times its value at the first step; rounding cannot meet it early.
        seed: seed of the initialisation; restart ``i`` uses ``seed + i``.
        init: ``"nndsvda"``, ``"nndsvd"``, ``"random"`` or
            ``{"F": (rank, N), "loadings": {name: (rows_v, rank)}}``.
        weights: ``None`` (all 1), ``"balanced"`` (``1 / ||X_v||^2``) or dict name -> weight.
        unit_columns: after every step, give the stacked loadings ``[W_1; ...; W_V]``
            unit-L2 columns (with one view exactly the paper's constraint on ``W``). The
            column norms are multiplied into the rows of ``F``, so every ``W_v F`` and the
            fit are unchanged; the authors' code discards the scale, which changes the fit.
            With several views one scale per concept cannot make every view's columns
            unit at once without changing some ``W_v F``, hence the stacked norm. With
            ``l1_F``/``l2_F``/``group_lam`` the objective is minimised subject to unit
            stacked columns (the ``F`` penalties act on the normalised ``F``): the loading
            step is a projected step onto columns of norm <= 1, then live columns are
            scaled up to 1, and the objective decreases monotonically to a stationary
            point; ``l2_W`` is then the constant ``l2_W * rank`` and has no effect.
        l1_F, l2_F, l2_W: penalties (>= 0).
        groups: ``(N,)`` int group ids (e.g. class labels) for the group lasso.
        group_lam: absolute group-lasso weight (> 0 needs ``groups``); ``F`` is then
            updated by monotone FISTA. Combine it with ``unit_columns=True`` (or
            ``l2_W``): otherwise the loadings can grow to let ``F`` shrink without zeroing
            any group.
        group_lam_fraction: the group penalty as a fraction in ``(0, 1]`` of
            :func:`lambda_max` at the starting loadings scaled to unit stacked columns
            (the smallest penalty that makes ``F = 0`` optimal there), as glmnet's and
            scikit-learn's ``alpha_max``; fractions of 0.01-0.3 are the useful range on
            any data scale. Give it or ``group_lam``, not both. The config records
            ``group_lam`` (absolute), ``group_lam_fraction`` and ``group_lam_max``.
        restarts: number of initialisations run in one vmapped call; restart ``i`` starts
            from seed ``seed + i``. With ``init="nndsvd(a)"`` or user arrays restart 0 uses
            them and the others start at random (so they genuinely differ). The lowest
            objective wins (``config["best_restart"]``); all are kept in ``restarts`` with
            a ``stability`` score (mean matched cosine of ``F`` rows to the best).
        negative: what to do with negative entries: ``"raise"``, ``"clip"`` to 0, or
            ``"shift"`` each view by its minimum.
        dtype: compute dtype, ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).
        storage_dtype: dtype the views are kept in, e.g. ``"bfloat16"`` (products still
            accumulate in ``dtype``); default ``dtype``.
        progress: print one line before and one after the compiled run.
        mesh: a 1-D ``jax.sharding.Mesh`` to shard the images (columns) over: host views
            are placed split over their columns, ``F`` likewise, the loadings replicated.
            Views that are already ``jax.Array`` s sharded over their columns (also global
            arrays spanning processes) are used as they are, and their mesh is the
            default. ``N`` the device count does not divide is padded with zero columns
            that cannot change the fit. See :mod:`jaxcnmf.solver.sharding`. With a store,
            each device streams its own columns (with ``jax.distributed``, each process
            reads only its devices' part of the store; :mod:`jaxcnmf.solver.streaming`).
        cache_bytes: with a store only: bytes of its chunks kept on each device between
            passes (``None``: none on a CPU, half the free memory of an accelerator; see
            :func:`jaxcnmf.solver.streaming.fit`).

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError / TypeError: invalid views or parameters (the message names which);
            views whose scales cannot share one float32 problem; every concept zero at
            the end (e.g. too large a group penalty: the message suggests a smaller
            ``group_lam_fraction``).
        FloatingPointError: a non-finite value appeared in the loop (it stops at once).

    Warns:
        ConvergenceWarning: ``max_iter`` reached.
        DeadConceptWarning: some (not all) concepts are zero at the end.

    Example:
        >>> res = fit({"red": D, "conv": A}, rank=10, method="hals")  # doctest: +SKIP
        >>> res.F.shape, res.loadings["conv"].shape, res.relative_errors["red"]
    """
    if isinstance(views, Store):
        # Views on disk: one streamed pass over the store's column blocks per iteration.
        from jaxcnmf.solver import streaming  # imports this module, so not at the top

        return streaming.fit(
            views, rank, method=method, max_iter=max_iter, tol=tol, seed=seed, init=init,
            weights=weights, unit_columns=unit_columns, l1_F=l1_F, l2_F=l2_F, l2_W=l2_W,
            groups=groups, group_lam=group_lam, group_lam_fraction=group_lam_fraction,
            restarts=restarts, negative=negative, dtype=dtype, storage_dtype=storage_dtype,
            progress=progress, mesh=mesh, cache_bytes=cache_bytes)
    if cache_bytes is not None:
        raise ValueError(f"cache_bytes: only for views from a store (jaxcnmf.store.open), "
                         f"got {cache_bytes!r} with views in memory")
    best = _fit(views, rank, method=method, max_iter=max_iter, tol=tol, seed=seed,
                init=init, weights=weights, unit_columns=unit_columns, l1_F=l1_F,
                l2_F=l2_F, l2_W=l2_W, groups=groups, group_lam=group_lam,
                group_lam_fraction=group_lam_fraction, restarts=restarts,
                negative=negative, dtype=dtype, storage_dtype=storage_dtype,
                progress=progress, mesh=mesh)
    _check_live(best, stacklevel=3)
    if not best.converged:
        warnings.warn(f"jaxcnmf.fit stopped at max_iter={best.config['max_iter']} before "
                      f"the KKT violation fell to tol={best.config['tol']} of its start; "
                      f"increase max_iter or tol", ConvergenceWarning, stacklevel=2)
    return best


class _Problem(NamedTuple):
    """Internal rescaling: ``X = scale * X'``, ``F = scale * F'``, objective ``= norm * J'``."""

    scale: float
    norm: float


def _live_mask(res):
    """``(rank,)`` bool: concepts whose weighted term ``||W_k|| ||F_k||`` is not negligible."""
    strength = concept_scale(res.loadings, res.config["weights"]) * _row_norms(res.F)
    total = np.sqrt(res.config.get("weighted_data_sq_norm", 0.0))
    return strength > _DEAD_SHARE * total if total > 0 else np.ones_like(strength, bool)


def _row_norms(F):
    """``(rank,)`` float64 norms of the rows of ``F``, also of a global array."""
    if sharding.is_global(F):
        return sharding.row_norms(F)
    return np.linalg.norm(np.asarray(F, np.float64), axis=1)


def _check_live(res, stacklevel):
    live = _live_mask(res)
    if live.all():
        return
    rank = live.size
    if res.config.get("group_lam", 0.0) > 0:
        hint = (f"the group penalty (group_lam={res.config['group_lam']:.4g}, "
                f"group_lam_fraction={res.config.get('group_lam_fraction')}) is too large "
                f"for these data; use a smaller group_lam_fraction (see group_path)")
    else:
        hint = "check the data and the starting point"
    if not live.any():
        raise ValueError(f"jaxcnmf.fit: every one of the {rank} concepts is zero at the "
                         f"end, so the fit explains nothing of the (non-zero) data: {hint}")
    dead = [int(k) for k in np.flatnonzero(~live)]
    warnings.warn(f"jaxcnmf.fit: {len(dead)} of {rank} concepts are zero at the end "
                  f"(concepts {dead}): {hint}", DeadConceptWarning, stacklevel=stacklevel)


def _internal_problem(names, arrays, view_weights, dtype):
    """The rescaling that makes the problem O(1), checked to fit the compute dtype."""
    return _internal_problem_from_stats(names, [_max_and_sq_norm(X) for X in arrays],
                                        view_weights, dtype)


def _internal_problem_from_stats(names, stats, view_weights, dtype):
    """:func:`_internal_problem` from every view's ``(max entry, ||X_v / max||^2)``."""
    scale = max(top for top, _ in stats)
    if scale <= 0:
        return _Problem(1.0, 1.0), tuple(view_weights), 0.0
    smallest = _SMALLEST_VIEW_RATIO[dtype]
    largest_name = names[int(np.argmax([top for top, _ in stats]))]
    for name, (top, _) in zip(names, stats):
        if 0 < top < smallest * scale:
            raise ValueError(
                f"view {name!r}: its largest entry {top:.3g} is {top / scale:.3g} times the "
                f"largest entry of view {largest_name!r} ({scale:.3g}); expected views within "
                f"a factor {1 / smallest:.0e} of each other in {dtype} (their squares would "
                f"underflow): rescale the view and its weight, or use dtype='float64'")
    data_norm2 = sum(w * sq * top * top for w, (top, sq) in zip(view_weights, stats))
    norm = data_norm2
    internal = tuple(w * scale * scale / norm for w in view_weights)
    largest = _LARGEST_INTERNAL[dtype]
    ratio = max(internal) / min(internal)
    if ratio > largest:
        raise ValueError(f"weights: the weighted views span a factor {ratio:.3g}; expected "
                         f"at most {largest:.0e} in {dtype}, got weights "
                         f"{dict(zip(names, view_weights))}")
    return _Problem(scale, norm), internal, data_norm2


def _internal_config(config, problem, internal_weights, dtype):
    """Weights and penalties of the rescaled problem (see :class:`_Problem`)."""
    s, z = problem.scale, problem.norm
    values = {"l1_F": config.l1_F * s / z, "l2_F": config.l2_F * s * s / z,
              "l2_W": config.l2_W / z, "group_lam": config.group_lam * s / z}
    largest = _LARGEST_INTERNAL[dtype]
    for label, value in values.items():
        if not np.isfinite(value) or value > largest:
            raise ValueError(f"{label}: {getattr(config, label):.4g} is out of range for "
                             f"data of scale {s:.3g} in {dtype}; expected a penalty whose "
                             f"rescaled value {value:.3g} is below {largest:.0e}")
    return config._replace(weights=tuple(internal_weights), **values)


def _group_lam_max_internal(jviews, loadings, groups, n_groups, config):
    """:func:`lambda_max` of the rescaled problem at the given loadings (unit columns)."""
    norms = jnp.sqrt(sum(jnp.sum(W * W, axis=0) for W in loadings))
    loadings = tuple(W / jnp.where(norms > 0, norms, 1.0) for W in loadings)
    B, _ = core.f_grams(jviews, loadings, config)
    positive = jnp.maximum(2.0 * B - config.l1_F, 0.0)
    block = jnp.sqrt(jax.ops.segment_sum((positive * positive).T, groups,
                                         num_segments=n_groups).T)
    return float(jnp.max(block))


def _fit(views, rank, *, method, max_iter, tol, seed, init, weights, unit_columns, l1_F,
         l2_F, l2_W, groups, group_lam, group_lam_fraction, restarts, negative, dtype,
         storage_dtype, progress, mesh):
    """:func:`fit` without the final warnings and dead-concept checks (for paths)."""
    _check_choice("negative", negative, _NEGATIVE_MODES)
    placement = sharding.plan(*_name_views(views), mesh)  # before anything is compiled
    names, arrays = _check_views(views, negative)
    n = arrays[0].shape[1]
    total_rows = sum(X.shape[0] for X in arrays)
    rank = _check_number("rank", rank, 1, integer=True)
    if rank > min(n, total_rows):
        raise ValueError(f"rank: expected at most min(N, total rows) = "
                         f"{min(n, total_rows)}, got {rank}")
    _check_choice("method", method, core.METHODS)
    if not isinstance(init, dict):
        _check_choice("init", init, initialization.INIT_NAMES)
    max_iter = _check_number("max_iter", max_iter, 1, integer=True)
    tol = _check_number("tol", tol)
    seed = _check_number("seed", seed, 0, integer=True)
    restarts = _check_number("restarts", restarts, 1, integer=True)
    l1_F, l2_F, l2_W = (_check_number(label, value) for label, value in
                        (("l1_F", l1_F), ("l2_F", l2_F), ("l2_W", l2_W)))
    group_lam, group_lam_fraction = _check_group_penalty(group_lam, group_lam_fraction)
    view_weights = _view_weights(weights, names, arrays)
    wants_groups = group_lam if group_lam_fraction is None else group_lam_fraction
    groups, n_groups = _check_groups(groups, n, wants_groups)
    storage = _check_dtypes(dtype, storage_dtype)
    problem, internal_weights, data_norm2 = _internal_problem(names, arrays, view_weights,
                                                              dtype)

    config = core.SolverConfig(
        method=method, rank=rank, weights=view_weights, l1_F=l1_F, l2_F=l2_F, l2_W=l2_W,
        unit_columns=bool(unit_columns), group_lam=group_lam, n_groups=n_groups,
        max_iter=max_iter, tol=tol, dtype=dtype)
    config = _internal_config(config, problem, internal_weights, dtype)
    if placement is None:
        jviews = tuple(_scaled(X, problem.scale, storage) for X in arrays)
        jgroups = None if groups is None else jnp.asarray(groups)
    else:
        placement = placement.with_columns(n)
        jviews = placement.views(arrays, storage, problem.scale)
        jgroups = placement.groups(groups)
    if isinstance(init, dict) and "F" in init:
        # The caller's F is on the data's scale; the solver's is on the rescaled one.
        init = {**init, "F": np.asarray(init["F"], np.float64) / problem.scale}

    if progress:
        print(f"jaxcnmf: fitting {len(names)} views, N={n}, rank {rank}, method {method}, "
              f"{restarts} restart(s), max_iter {max_iter} (compiling, then one run)",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    F0, loadings0 = _initial_factors(init, names, arrays, jviews, rank, internal_weights,
                                     seed, restarts, dtype, placement)
    lam_max = None
    if group_lam_fraction is not None:
        lam_max_internal = _group_lam_max_internal(
            jviews, tuple(W[0] for W in loadings0), jgroups, n_groups, config)
        config = config._replace(group_lam=group_lam_fraction * lam_max_internal)
        lam_max = lam_max_internal * problem.norm / problem.scale
        group_lam = group_lam_fraction * lam_max
    config_dict = _config_record(
        config, names, view_weights, data_norm2, method=method, rank=rank, seed=seed,
        init=init, unit_columns=unit_columns, l1_F=l1_F, l2_F=l2_F, l2_W=l2_W,
        group_lam=group_lam, group_lam_fraction=group_lam_fraction, group_lam_max=lam_max,
        n_groups=n_groups if groups is not None else 0, max_iter=max_iter, tol=tol,
        restarts=restarts, negative=negative, dtype=dtype, storage_dtype=storage)
    if placement is None:
        if restarts == 1:
            states = jax.tree_util.tree_map(
                lambda a: a[None], _solve(jviews, F0[0], tuple(W[0] for W in loadings0),
                                          jgroups, config=config))
        else:
            states = _solve_restarts(jviews, F0, loadings0, jgroups, config)
        finals = _final_restarts(jviews, states.F, states.loadings, jgroups, config)
        states, finals = jax.device_get((states, finals))
    elif restarts == 1:
        # Kept on the devices (F may span processes); _result fetches what it can.
        state = placement.solve(jviews, F0[0], tuple(W[0] for W in loadings0), jgroups,
                                config)
        states, finals = state, placement.final(jviews, state.F, state.loadings, jgroups,
                                                config)
    else:
        states = placement.solve_restarts(jviews, F0, loadings0, jgroups, config)
        finals = placement.final(jviews, states.F, states.loadings, jgroups, config)
    results, failures = [], []
    for i in range(restarts):
        if placement is not None and restarts == 1:
            state, final = states, finals
        else:
            state = jax.tree_util.tree_map(lambda a, i=i: a[i], states)
            final = jax.tree_util.tree_map(lambda a, i=i: a[i], finals)
        failed, value, iteration = jax.device_get((state.failed, final[0], state.iteration))
        if bool(failed) or not np.isfinite(value):
            failures.append((i, int(iteration)))
        results.append(_result(state, names, {**config_dict, "seed": seed + i}, problem,
                               final, placement))
    if len(failures) == restarts:
        i, step = failures[0]
        raise FloatingPointError(
            f"jaxcnmf.fit: the solver produced NaN or Inf at iteration {step} (restart {i}) "
            f"and stopped; the inputs were finite and rescaled by {problem.scale:.3g} "
            f"(objective by {problem.norm:.3g}), so a step overflowed: internal weights "
            f"{dict(zip(names, config.weights))}, l1_F {config.l1_F:.3g}, l2_F "
            f"{config.l2_F:.3g}, l2_W {config.l2_W:.3g}, group_lam {config.group_lam:.3g}")
    objectives = np.array([np.inf if (i in {f for f, _ in failures})
                           or not np.isfinite(r.objective) else r.objective
                           for i, r in enumerate(results)])
    best_index = int(np.argmin(objectives))
    best = results[best_index]
    if restarts == 1:
        best = dataclasses.replace(best, config=config_dict)
    else:
        others = [r for r in results if r is not best]
        best = dataclasses.replace(
            best, config={**config_dict, "best_restart": best_index}, restarts=results,
            stability=float(np.mean([_matched_cosine(best.F, r.F) for r in others])))
    elapsed = time.perf_counter() - start

    if progress:
        errors = ", ".join(f"{name} {err:.4f}" for name, err in best.relative_errors.items())
        status = "converged" if best.converged else "max_iter reached"
        print(f"jaxcnmf: done in {elapsed:.1f} s, {best.n_iter} iterations ({status}), "
              f"rel. errors {errors}", file=sys.stderr, flush=True)
    return best


def lambda_max(views, loadings, groups, *, weights=None, l1_F=0.0):
    """The smallest group penalty that makes ``F = 0`` optimal for the given loadings.

    With the loadings fixed (scaled to unit stacked columns, the scale at which
    ``unit_columns=True`` pins the penalty), ``F = 0`` minimises the ``F`` sub-problem iff
    ``group_lam >= max_{k, g} ||max(2 B[k, group g] - l1_F, 0)||_2`` with
    ``B = sum_v w_v W_v^T X_v``: the non-negative group soft-threshold of the negative
    gradient at ``F = 0``.

    Args:
        views: dict name -> ``(rows_v, N)`` non-negative array.
        loadings: dict name -> ``(rows_v, rank)`` non-negative loadings (same names).
        groups: ``(N,)`` int group ids.
        weights: as in :func:`fit`.
        l1_F: the L1 penalty of the fit.

    Returns:
        float, on the scale of the given data.

    Example:
        >>> lam = lambda_max(views, res.loadings, labels)  # doctest: +SKIP
    """
    names, arrays = _check_views(views, "raise")
    if not isinstance(loadings, dict) or sorted(loadings) != sorted(names):
        got = sorted(loadings) if isinstance(loadings, dict) else type(loadings).__name__
        raise ValueError(f"loadings: expected a dict with the views' names {list(names)}, "
                         f"got {got}")
    n = arrays[0].shape[1]
    groups, n_groups = _check_groups(groups, n, 1.0)
    view_weights = _view_weights(weights, names, arrays)
    l1_F = _check_number("l1_F", l1_F)
    B = 0.0
    norms = np.sqrt(sum(np.sum(np.asarray(loadings[name], np.float64) ** 2, axis=0)
                        for name in names))
    norms = np.where(norms > 0, norms, 1.0)
    for w, name, X in zip(view_weights, names, arrays):
        W = np.asarray(loadings[name], np.float64) / norms
        B = B + w * (W.T @ np.asarray(X, np.float64))
    positive = np.maximum(2.0 * B - l1_F, 0.0)
    sums = np.zeros((positive.shape[0], n_groups))
    np.add.at(sums.T, groups, (positive ** 2).T)
    return float(np.sqrt(sums.max()))


@dataclasses.dataclass
class PathStep:
    """One fit of :func:`group_path`.

    Attributes:
        fraction: the ``group_lam_fraction`` of this step.
        group_lam: the absolute penalty used.
        live_concepts: concepts that are not zero.
        zero_groups: ``(concept, group)`` blocks of ``F`` that are exactly zero.
        objective: final objective.
        relative_errors: dict view -> relative error.
        result: the :class:`FitResult`.
    """

    fraction: float
    group_lam: float
    live_concepts: int
    zero_groups: int
    objective: float
    relative_errors: dict
    result: FitResult


def group_path(views, rank, groups, fractions=(0.003, 0.01, 0.03, 0.1, 0.3), **options):
    """Fits along a path of group penalties, each warm-started from the previous one.

    Fractions are of one :func:`lambda_max`, that of the first fit's starting loadings,
    so the steps are comparable; they run from small to large (a concept zeroed by a
    penalty stays zero under a larger one), and the path stops after the first fraction
    at which every concept is zero. Read ``live_concepts`` and ``zero_groups`` (and your
    own purity or fidelity of ``result``) to pick a fraction.

    Args:
        views: as in :func:`fit`.
        rank: number of concepts.
        groups: ``(N,)`` int group ids.
        fractions: increasing fractions in ``(0, 1]``.
        **options: any other :func:`fit` keyword (``unit_columns=True`` is the default
            here, since it pins the scale the penalty acts on).

    Returns:
        list of :class:`PathStep`.

    Example:
        >>> for s in group_path(views, 10, labels):  # doctest: +SKIP
        ...     print(s.fraction, s.live_concepts, s.zero_groups, s.relative_errors)
    """
    fractions = [_check_number("fractions", f) for f in fractions]
    increasing = all(b > a for a, b in itertools.pairwise(fractions))
    if not fractions or any(not 0 < f <= 1 for f in fractions) or not increasing:
        raise ValueError(f"fractions: expected increasing numbers in (0, 1], got "
                         f"{list(fractions)}")
    for key in ("group_lam", "group_lam_fraction", "groups"):
        if key in options:
            raise ValueError(f"{key}: set by group_path, expected it not among the options")
    options = {"unit_columns": True, "progress": False, **options}
    steps, previous, lam_max_value = [], None, None
    for fraction in fractions:
        if previous is None:
            res = _fit_quietly(views, rank, groups=groups, group_lam_fraction=fraction,
                               **options)
            lam_max_value = res.config["group_lam_max"]
        else:
            warm = {**options, "init": {"F": previous.F, "loadings": previous.loadings},
                    "restarts": 1}
            res = _fit_quietly(views, rank, groups=groups,
                               group_lam=fraction * lam_max_value, **warm)
            res.config.update(group_lam_fraction=fraction, group_lam_max=lam_max_value)
        live = int(_live_mask(res).sum())
        ids = np.asarray(groups)
        zero = sum(int(np.all(res.F[k, ids == g] == 0)) for k in range(res.F.shape[0])
                   for g in np.unique(ids))
        steps.append(PathStep(fraction, float(res.config["group_lam"]), live, zero,
                              res.objective, dict(res.relative_errors), res))
        if live == 0:
            break
        previous = res
    return steps


def _fit_quietly(views, rank, **options):
    # fit's keyword defaults, so that a path step takes exactly the options fit does.
    defaults = {name: p.default for name, p in inspect.signature(fit).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "cache_bytes"}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"group_path: unknown fit option(s) {unknown}")
    return _fit(views, rank, **{**defaults, **options})
