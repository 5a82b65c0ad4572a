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
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnmf.solver import core, initialization, sharding


class ConvergenceWarning(UserWarning):
    """The solver stopped at ``max_iter`` before the relative-change tolerance was met."""


_NEGATIVE_MODES = ("raise", "clip", "shift")
_DTYPES = ("float32", "float64")
_STORAGE_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _run_one(views, F0, loadings0, groups, config):
    return core.run(core.init_state(views, F0, loadings0, config, groups), views, config)


_solve = jax.jit(_run_one, static_argnames="config")
_solve_restarts = jax.jit(jax.vmap(_run_one, in_axes=(None, 0, 0, None, None)),
                          static_argnums=4)
_solve_F = jax.jit(core.solve_F, static_argnames="config")
_random_restarts = jax.jit(
    jax.vmap(initialization.random, in_axes=(0, None, None, None, None)),
    static_argnums=(2, 3, 4))


# ----------------------------------------------------------------------------- validation


def _name_views(views):
    if isinstance(views, dict):
        if not views:
            raise ValueError("views: expected at least one view, got an empty dict")
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
        norms = jax.device_get([
            jnp.sum(jnp.square(X), dtype=jnp.result_type(float)) if isinstance(X, jax.Array)
            else np.sum(np.square(X, dtype=np.float64)) for X in arrays])
        norms = [float(s) for s in norms]
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
    return groups.astype(np.int32), int(groups.max()) + 1


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


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class FitResult:
    """A fitted coupled NMF (host NumPy arrays).

    Attributes:
        F: ``(rank, N)`` float32 shared non-negative image embedding.
        loadings: dict view name -> ``(rows_v, rank)`` non-negative loadings (``P_i``/``O_j``).
        view_names: view names, in order.
        history: ``{"objective": (n_iter,), "rel_error": {name: (n_iter,)}}``.
        n_iter: iterations run.
        converged: whether the relative-change tolerance was met before ``max_iter``.
        relative_errors: dict name -> ``||X_v - W_v F|| / ||X_v||`` at the end.
        config: JSON-serialisable settings used (method, rank, seed, weights, ...).
        objective: final objective value.
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

    def transform(self, views, max_iter=200, tol=None, mesh=None):
        """Embed images with the loadings fixed: non-negative least squares for ``F``.

        Args:
            views: dict name -> ``(rows_v, N_new)`` holding any subset of the fitted view
                names (a list is read as all fitted views in order). Their fitted weights
                and ``F`` penalties are used; the group lasso is not.
            max_iter: bound on the ``F`` updates.
            tol: relative-change tolerance; default the fit's ``tol``.
            mesh: optional 1-D ``jax.sharding.Mesh`` to shard the images over, as in
                :func:`fit` (views already sharded over their columns are used as they are).

        Returns:
            ``(rank, N_new)`` float32 embedding (a global ``jax.Array`` when the views span
            processes).

        Example:
            >>> F_new = res.transform({"conv": A_new})  # doctest: +SKIP
        """
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
        if placement is not None:
            placement = placement.with_columns(arrays[0].shape[1])
            return placement.transform(arrays, [self.loadings[name] for name in names],
                                       config, dtype)
        jviews = tuple(jnp.asarray(X, dtype) for X in arrays)
        loadings = tuple(jnp.asarray(self.loadings[name], dtype) for name in names)
        F, _, _ = _solve_F(jviews, loadings, config=config)
        return np.asarray(F, np.float32)

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


def load_result(path, mesh=None):
    """Read a :class:`FitResult` written by :meth:`FitResult.save`.

    Args:
        path: ``.npz`` file, or the path given to ``save`` by every process of a
            multi-process fit (its per-process files are found next to it).
        mesh: for per-process files only: with a 1-D mesh in a multi-process run, each
            process reads only its own file and ``F`` is the global array; otherwise
            ``F`` is assembled on the host from all the files.

    Returns:
        :class:`FitResult` (with ``restarts=None``).

    Example:
        >>> res = jaxcnmf.load_result("fit.npz")  # doctest: +SKIP
    """
    parts = sharding.saved_parts(path)
    with np.load(parts[0] if parts else path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        names = tuple(meta["view_names"])
        loadings = {name: data[f"loading_{i}"] for i, name in enumerate(names)}
        rel = data["rel_error_history"]
        history = {"objective": data["objective_history"],
                   "rel_error": {name: rel[i] for i, name in enumerate(names)}}
        F = data["F"]
    if parts:
        F = sharding.load_F(parts, mesh)
    return FitResult(F=F, loadings=loadings, view_names=names, history=history,
                     n_iter=meta["n_iter"], converged=meta["converged"],
                     relative_errors=meta["relative_errors"], config=meta["config"],
                     objective=meta["objective"], stability=meta["stability"],
                     devices=meta.get("devices", 1))


def _result(state, names, config_dict, placement=None):
    # A sharded F comes back without its padding, or stays global across processes.
    F = None if placement is None else placement.result_F(state.F)
    # One transfer for the whole state, not one blocking read per field.
    state = jax.device_get(state if F is None else state._replace(F=None))
    n_iter = int(state.iteration)
    objective = np.asarray(state.objective_history, np.float64)[:n_iter]
    rel = np.asarray(state.rel_error_history, np.float64)[:, :n_iter]
    return FitResult(
        F=np.asarray(state.F, np.float32) if F is None else F,
        loadings={name: np.asarray(W, np.float32) for name, W in zip(names, state.loadings)},
        view_names=names,
        history={"objective": objective,
                 "rel_error": {name: rel[i] for i, name in enumerate(names)}},
        n_iter=n_iter,
        converged=bool(state.converged),
        relative_errors={name: float(rel[i, -1]) for i, name in enumerate(names)},
        config=config_dict,
        objective=float(objective[-1]),
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
        group_lam=0.0, restarts=1, negative="raise", dtype="float32", storage_dtype=None,
        progress=True, mesh=None):
    """Coupled NMF of views sharing their columns: ``X_v ~ W_v F`` for every view ``v``.

    Minimises ``sum_v w_v ||X_v - W_v F||^2 + l1_F |F|_1 + l2_F ||F||^2
    + l2_W sum_v ||W_v||^2 + group_lam sum_k sum_g ||F[k, group g]||_2`` over
    non-negative factors.

    Args:
        views: dict name -> ``(rows_v, N)`` non-negative array (pixel channels, layer
            activations), or a list (named ``"view0"``, ``"view1"``, ...).
        rank: number of concepts, ``1 <= rank <= min(N, total rows)``.
        method: ``"mu"`` (the paper's multiplicative updates) or ``"hals"`` (faster).
        max_iter: most iterations; reaching it warns with :class:`ConvergenceWarning`.
        tol: stop when the objective changes by less than ``tol`` relative.
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
            ``l1_F``/``l2_F``/``l2_W`` the rescaling can raise those penalty terms.
        l1_F, l2_F, l2_W: penalties (>= 0).
        groups: ``(N,)`` int group ids (e.g. class labels) for the group lasso.
        group_lam: group-lasso weight (> 0 needs ``groups``); ``F`` is then updated by
            monotone FISTA. Combine it with ``unit_columns=True`` (or ``l2_W``): otherwise
            the loadings can grow to let ``F`` shrink without zeroing any group.
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
            that cannot change the fit. See :mod:`jaxcnmf.solver.sharding`.

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError / TypeError: invalid views or parameters (the message names which).

    Example:
        >>> res = fit({"red": D, "conv": A}, rank=10, method="hals")  # doctest: +SKIP
        >>> res.F.shape, res.loadings["conv"].shape, res.relative_errors["red"]
    """
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
    group_lam = _check_number("group_lam", group_lam)
    view_weights = _view_weights(weights, names, arrays)
    groups, n_groups = _check_groups(groups, n, group_lam)
    storage = _check_dtypes(dtype, storage_dtype)

    config = core.SolverConfig(
        method=method, rank=rank, weights=view_weights, l1_F=l1_F, l2_F=l2_F, l2_W=l2_W,
        unit_columns=bool(unit_columns), group_lam=group_lam, n_groups=n_groups,
        max_iter=max_iter, tol=tol, dtype=dtype)
    config_dict = {
        "method": method, "rank": rank, "seed": seed,
        "init": init if isinstance(init, str) else "user",
        "weights": dict(zip(names, view_weights)), "unit_columns": bool(unit_columns),
        "l1_F": l1_F, "l2_F": l2_F, "l2_W": l2_W, "group_lam": group_lam,
        "n_groups": n_groups if groups is not None else 0, "max_iter": max_iter, "tol": tol,
        "restarts": restarts, "negative": negative, "dtype": dtype,
        "storage_dtype": storage, "eps": config.eps, "inner_iter": config.inner_iter,
    }
    if placement is None:
        jviews = tuple(jnp.asarray(X, storage) for X in arrays)
        jgroups = None if groups is None else jnp.asarray(groups)
    else:
        placement = placement.with_columns(n)
        jviews, jgroups = placement.views(arrays, storage), placement.groups(groups)

    if progress:
        print(f"jaxcnmf: fitting {len(names)} views, N={n}, rank {rank}, method {method}, "
              f"{restarts} restart(s), max_iter {max_iter} (compiling, then one run)",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    F0, loadings0 = _initial_factors(init, names, arrays, jviews, rank, view_weights, seed,
                                     restarts, dtype, placement)
    if restarts == 1:
        solve = _solve if placement is None else placement.solve
        state = solve(jviews, F0[0], tuple(W[0] for W in loadings0), jgroups, config=config)
        results = [_result(state, names, config_dict, placement)]
    else:
        solve = _solve_restarts if placement is None else placement.solve_restarts
        states = solve(jviews, F0, loadings0, jgroups, config)
        states = jax.device_get(states) if placement is None else states
        results = [_result(jax.tree_util.tree_map(lambda a, i=i: a[i], states), names,
                           {**config_dict, "seed": seed + i}, placement)
                   for i in range(restarts)]
    objectives = np.array([r.objective if np.isfinite(r.objective) else np.inf
                           for r in results])
    best_index = int(np.argmin(objectives))
    best = results[best_index]
    if restarts > 1:
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
    if not best.converged:
        warnings.warn(f"jaxcnmf.fit stopped at max_iter={max_iter} before the relative "
                      f"objective change fell below tol={tol}; increase max_iter or tol",
                      ConvergenceWarning, stacklevel=2)
    return best
