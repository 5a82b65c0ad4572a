"""Fidelity: the network's accuracy when a probed layer is replaced by its reconstruction
``O_j F`` inside the network, per layer and rank, against the original accuracy.

A layer view ``A_j`` is float (rows_j, N) in channel-major order, row ``c*H*W + h*W + w``
(see :func:`unflatten_activations`). Only :func:`fidelity` touches a model; it is a thin
wrapper over the model-free :func:`fidelity_from_logits_fn`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

from jaxcnmf.concepts._common import _labels, _matrix, _positive_int, _store_labels

__all__ = [
    "FidelityTable",
    "accuracy",
    "fidelity",
    "fidelity_from_logits_fn",
    "fidelity_from_store",
    "flatten_activations",
    "unflatten_activations",
]

def _layer_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"shape: expected (H, W, C) or (C,) with positive sizes, got {shape}")
    return shape


def unflatten_activations(A, shape) -> np.ndarray:
    """Layer view (rows, N) in channel-major order back to per-image activations.

    Row ``c*H*W + h*W + w`` of ``A`` holds channel ``c`` at pixel ``(h, w)`` (PyTorch's
    CHW flattening, as ``probe.collect(..., pooling="flatten")`` writes it).

    Args:
        A: (H*W*C, N) or, for a vector layer, (C, N).
        shape: per-image layer shape (H, W, C) or (C,).

    Returns:
        (N, H, W, C) or (N, C), A's dtype.

    Example:
        >>> A = np.arange(8).reshape(8, 1)  # C=2, H=2, W=2, one image
        >>> unflatten_activations(A, (2, 2, 2))[0, :, :, 1]
        array([[4, 5],
               [6, 7]])
    """
    A = np.asarray(A)
    shape = _layer_shape(shape)
    rows = math.prod(shape)
    if A.ndim != 2 or A.shape[0] != rows:
        raise ValueError(f"A: expected ({rows}, N) for layer shape {shape}, got {A.shape}")
    if len(shape) == 1:
        return A.T.copy()
    height, width, channels = shape
    return A.T.reshape(A.shape[1], channels, height, width).transpose(0, 2, 3, 1).copy()


def flatten_activations(activations) -> np.ndarray:
    """Per-image activations (N, H, W, C) or (N, C) to a layer view (rows, N).

    The inverse of :func:`unflatten_activations`: row ``c*H*W + h*W + w``.

    Args:
        activations: (N, H, W, C) or (N, C).

    Returns:
        (H*W*C, N) or (C, N), the input's dtype.

    Example:
        >>> acts = np.arange(8).reshape(1, 2, 2, 2)
        >>> flatten_activations(acts)[:, 0]
        array([0, 2, 4, 6, 1, 3, 5, 7])
    """
    acts = np.asarray(activations)
    if acts.ndim == 2:
        return acts.T.copy()
    if acts.ndim != 4:
        raise ValueError(f"activations: expected (N, H, W, C) or (N, C), got shape {acts.shape}")
    return acts.transpose(0, 3, 1, 2).reshape(acts.shape[0], -1).T.copy()



def accuracy(logits, labels) -> float:
    """Top-1 accuracy of (N, classes) logits against int (N,) labels."""
    logits = np.asarray(logits)
    labels = _labels(labels, logits.shape[0])
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, classes), got shape {logits.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if labels.size else 0.0


@dataclasses.dataclass(frozen=True)
class FidelityTable:
    """Accuracy of the network with one layer replaced by its reconstruction, per rank.

    Attributes:
        layer: the replaced layer.
        original_accuracy: accuracy with the layer's own activations.
        ranks: int64 (R,) ranks of the factorizations.
        accuracy: float64 (R,) accuracy with ``O_j F`` in place of the layer.
        relative_error: float64 (R,) ``||A_j - O_j F|| / ||A_j||`` on these images.
        n_images: images measured on when they are a subset of the probe set
            (:func:`fidelity_from_store`), else ``None`` (all of them).
        n_total: images in the probe set the subset was drawn from, or ``None``.
    """

    layer: str
    original_accuracy: float
    ranks: np.ndarray
    accuracy: np.ndarray
    relative_error: np.ndarray
    n_images: int | None = None
    n_total: int | None = None

    def to_rows(self) -> list[dict]:
        """One JSON-serialisable dict per rank (with ``n_images`` and ``n_total`` when
        measured on a subset)."""
        subset = {} if self.n_images is None else {"n_images": int(self.n_images),
                                                   "n_total": int(self.n_total)}
        return [
            {
                "layer": self.layer,
                "rank": int(r),
                "accuracy": float(a),
                "original_accuracy": self.original_accuracy,
                "accuracy_drop": self.original_accuracy - float(a),
                "relative_error": float(e),
                **subset,
            }
            for r, a, e in zip(self.ranks, self.accuracy, self.relative_error)
        ]


def _check_layer(A, O, shape):
    # float32 like the network: a flattened early layer can hold hundreds of MB.
    A = _matrix(A, "activations", dtype=np.float32)
    O = _matrix(O, "loadings", dtype=np.float32)
    shape = _layer_shape(shape)
    if A.shape[0] != math.prod(shape):
        raise ValueError(
            f"activations: expected {math.prod(shape)} rows for layer shape {shape}, "
            f"got {A.shape[0]}"
        )
    return A, _check_loadings(O, A.shape[0]), shape


def _check_loadings(O, rows: int) -> np.ndarray:
    O = _matrix(O, "loadings", dtype=np.float32)
    if O.shape[0] != rows:
        raise ValueError(f"loadings: expected {rows} rows to match activations, got {O.shape[0]}")
    return O


def _layer_accuracy(logits_fn, A: np.ndarray, labels: np.ndarray, shape) -> float:
    return accuracy(logits_fn(unflatten_activations(A, shape)), labels)


def _replaced_accuracy(logits_fn, A, labels, O, transform_fn, shape) -> tuple[float, float]:
    """(accuracy with ``O F`` in place of ``A``, relative error of ``O F``)."""
    F = np.asarray(transform_fn(A), dtype=np.float32)
    if F.shape != (O.shape[1], A.shape[1]):
        raise ValueError(
            f"transform_fn: expected F of shape {(O.shape[1], A.shape[1])}, got {F.shape}"
        )
    recon = O @ F
    norm = float(np.linalg.norm(A))
    rel_error = float(np.linalg.norm(A - recon)) / norm if norm > 0 else 0.0
    return _layer_accuracy(logits_fn, recon, labels, shape), rel_error


def fidelity_from_logits_fn(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    activations,
    labels,
    loadings,
    transform_fn: Callable[[np.ndarray], np.ndarray],
    shape: Sequence[int],
) -> tuple[float, float, float]:
    """Accuracy of a network fed ``O_j F`` instead of a layer's activations ``A_j``.

    Model-free core of :func:`fidelity`: ``F = transform_fn(A_j)`` embeds the images from
    this layer alone, and the reconstruction ``O_j F`` is unflattened and passed to
    ``logits_fn`` in place of the layer's output.

    Args:
        logits_fn: maps per-image float32 activations (N, *shape) to logits
            (N, classes), i.e. the rest of the network after the layer.
        activations: the layer view ``A_j`` (rows, N), channel-major rows.
        labels: int (N,) true classes.
        loadings: ``O_j`` (rows, rank).
        transform_fn: maps ``A_j`` (rows, N) to ``F`` (rank, N).
        shape: per-image layer shape (H, W, C) or (C,); ``prod(shape) == rows``.

    Returns:
        (original accuracy, reconstructed accuracy, relative reconstruction error).

    Example:
        >>> A = np.array([[1.0, 0.0], [0.0, 1.0]])
        >>> identity = lambda acts: acts
        >>> fidelity_from_logits_fn(identity, A, [0, 1], np.eye(2), lambda a: a, (2,))
        (1.0, 1.0, 0.0)
    """
    A, O, shape = _check_layer(activations, loadings, shape)
    labels = _labels(labels, A.shape[1])
    original = _layer_accuracy(logits_fn, A, labels, shape)
    return (original, *_replaced_accuracy(logits_fn, A, labels, O, transform_fn, shape))


def fidelity(
    model, variables, images, labels, results, layer: str, activations=None, shape=None
) -> FidelityTable:
    """Fidelity of one probed layer for one or several fitted factorizations (ranks).

    Glue over :func:`fidelity_from_logits_fn` with ``probe.intervene`` (the rest of the
    network) and ``FitResult.transform`` of this layer alone (``F`` from ``A_j`` only).

    Args:
        model: a Flax Linen module, a Flax NNX module or ``probe.from_function(...)``
            (see :mod:`jaxcnmf.nets.adapters`).
        variables: a Linen module's variables; ``None`` for NNX modules and functions.
        images: uint8 (N, H, W, C) (or float32 in [0, 1]) probe images.
        labels: int (N,) true classes.
        results: a ``FitResult`` or a sequence of them (one per rank) whose views include
            ``layer`` fitted with ``pooling="flatten"`` (or a vector layer).
        layer: the layer to replace.
        activations: the layer view (rows, N) of these images; collected with
            ``probe.collect(..., pooling="flatten")`` when None.
        shape: per-image layer shape; from ``probe.available_layers`` when None.

    Returns:
        :class:`FidelityTable` with one entry per result, in order of increasing rank.

    Example:
        >>> table = fidelity(model, variables, test.images, test.labels,
        ...                  [res5, res10, res20], "conv3")  # doctest: +SKIP
        >>> table.to_rows()  # doctest: +SKIP
    """
    from jaxcnmf.nets import probe

    results = list(results) if isinstance(results, (list, tuple)) else [results]
    if not results:
        raise ValueError("results: expected at least one FitResult, got none")
    for res in results:
        if layer not in res.loadings:
            raise ValueError(
                f"layer: expected one of the fitted views {tuple(res.loadings)}, got {layer!r}"
            )
    if shape is None:
        layers = probe.available_layers(model, tuple(np.shape(images)[1:]))
        if layer not in layers:
            raise ValueError(f"layer: expected one of {tuple(layers)}, got {layer!r}")
        shape = layers[layer]
    if activations is None:
        activations = probe.collect(
            model, variables, images, [layer], pixels=False, pooling="flatten", progress=False
        )[layer]

    def logits_fn(acts):
        return np.asarray(probe.intervene(model, variables, images, layer, acts))

    results.sort(key=lambda r: r.F.shape[0])
    A, _, shape = _check_layer(activations, results[0].loadings[layer], shape)
    labels = _labels(labels, A.shape[1])
    scores = []
    for res in results:
        O = _check_loadings(res.loadings[layer], A.shape[0])

        def transform_fn(X, res=res):
            return res.transform({layer: X})

        scores.append(_replaced_accuracy(logits_fn, A, labels, O, transform_fn, shape))
    return FidelityTable(
        layer=layer,
        original_accuracy=_layer_accuracy(logits_fn, A, labels, shape),
        ranks=np.array([r.F.shape[0] for r in results], dtype=np.int64),
        accuracy=np.array([s[0] for s in scores]),
        relative_error=np.array([s[1] for s in scores]),
    )


def fidelity_from_store(
    model, variables, store, results, layer: str, *, n_images: int = 2000, seed: int = 0,
    images=None, labels=None,
) -> FidelityTable:
    """:func:`fidelity` on a seeded random subset of a store's images.

    Reads the layer's columns of ``n_images`` images drawn without replacement (seeded)
    from the store (only the blocks holding them), and their images and labels, then runs
    :func:`fidelity` on them; the table records the subset's size and the store's ``N``.
    Memory is the subset's activations and images, whatever the store's size.

    Args:
        model, variables: the network the store was probed from.
        store: :class:`jaxcnmf.store.Store` holding ``layer`` unpooled (``"flatten"``) or
            a vector layer.
        results: a ``FitResult`` or a sequence of them whose views include ``layer``.
        layer: the layer to replace.
        n_images: subset size (all ``N`` if larger).
        seed: seed of the draw.
        images: the probe images ``(N, H, W, C)`` in store column order (e.g. a
            memory-mapped dataset; only the subset is read). Default: rebuilt from the
            store's pixel views (:func:`jaxcnmf.concepts.images.store_images`).
        labels: int (N,) classes; default the store's labels.

    Returns:
        :class:`FidelityTable` with ``n_images`` and ``n_total`` set.

    Raises:
        ValueError: ``layer`` not in the store (or its rows unlike the loadings'), pooled
            conv activations, no labels or images to be had (each named).

    Example:
        >>> table = fidelity_from_store(model, variables, store.open("acts/"), res,
        ...                             "conv4_x", n_images=1000)  # doctest: +SKIP
        >>> table.n_images, table.to_rows()[0]["accuracy"]  # doctest: +SKIP
    """
    from jaxcnmf.concepts.images import store_images

    where = f"store {str(store.path)!r}"
    if layer not in store.rows:
        raise ValueError(f"layer: expected one of the store's views {list(store.views)}, "
                         f"got {layer!r} ({where})")
    shape = store.shapes.get(layer)
    if shape is None:
        raise ValueError(f"layer {layer!r}: expected its per-image shape in the manifest of "
                         f"{where}, got none")
    shape = _layer_shape(shape)
    if store.rows[layer] != math.prod(shape):
        raise ValueError(f"layer {layer!r}: {where} holds it pooled ({store.rows[layer]} rows "
                         f"for layer shape {shape}); pooled conv activations cannot be put "
                         f"back into the network")
    for res in results if isinstance(results, (list, tuple)) else [results]:
        rows = np.shape(res.loadings.get(layer, np.zeros((0, 0))))[0]
        if layer in res.loadings and rows != store.rows[layer]:
            raise ValueError(f"view {layer!r}: expected {rows} rows as when fitted, got "
                             f"{store.rows[layer]} in {where}")
    n_images = _positive_int(n_images, "n_images")
    labels = _store_labels(labels, store, where)
    count = min(n_images, store.n)
    subset = np.sort(np.random.default_rng(seed).choice(store.n, count, replace=False))
    if images is None:
        subset_images = store_images(store, subset)
    else:
        if np.shape(images)[0] != store.n:
            raise ValueError(f"images: expected {store.n} images (the store's columns), got "
                             f"{np.shape(images)[0]}")
        subset_images = np.asarray(images[subset])
    activations = np.asarray(store.read_columns(subset, views=[layer])[layer], np.float32)
    table = fidelity(model, variables, subset_images, labels[subset], results, layer,
                     activations=activations, shape=shape)
    return dataclasses.replace(table, n_images=count, n_total=store.n)
