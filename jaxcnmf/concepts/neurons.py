"""Neurons per layer (paper 4.1.2): cosine similarity of a layer loading's columns, its
sorted spectrum, and a per-layer summary.

A layer loading ``O_j`` is float (rows_j, rank): column ``k`` says which neurons of layer j
carry concept ``k``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxcnmf.concepts._common import _matrix, _positive_int, _safe_divide

__all__ = [
    "LayerSummary",
    "layer_summary",
    "loading_similarity",
    "similarity_spectrum",
]

def loading_similarity(O) -> np.ndarray:
    """Cosine similarity between the columns (concepts) of a loading matrix.

    Args:
        O: (rows, rank) loading ``O_j`` of a layer.

    Returns:
        float64 (rank, rank), symmetric, entries in [-1, 1] (in [0, 1] for non-negative
        loadings). An all-zero column has similarity 0 with every column, itself included.

    Example:
        >>> loading_similarity(np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
        array([[1., 1., 0.],
               [1., 1., 0.],
               [0., 0., 0.]])
    """
    O = _matrix(O, "O")
    unit = _safe_divide(O, np.linalg.norm(O, axis=0, keepdims=True))
    return np.clip(unit.T @ unit, -1.0, 1.0)


def similarity_spectrum(S) -> np.ndarray:
    """Eigenvalues of a symmetric similarity matrix, largest first.

    Uses ``numpy.linalg.eigvalsh`` (real eigenvalues of a symmetric matrix). The paper's
    code used ``eigvals``, which returns them unsorted and possibly complex, so its
    "largest eigenvalues" were not reliably the largest.

    Args:
        S: symmetric (rank, rank) matrix, e.g. from :func:`loading_similarity`.

    Returns:
        float64 (rank,) sorted descending; for a cosine similarity they sum to the number
        of non-zero columns, and ``rank`` identical columns give ``[rank, 0, ..., 0]``.

    Example:
        >>> similarity_spectrum(np.ones((3, 3))).round(6) + 0.0
        array([3., 0., 0.])
    """
    S = _matrix(S, "S")
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"S: expected a square matrix, got shape {S.shape}")
    if not np.allclose(S, S.T, atol=1e-8):
        raise ValueError("S: expected a symmetric matrix, got an asymmetric one")
    return np.linalg.eigvalsh(S)[::-1].copy()


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """How the concepts share neurons, layer by layer (the paper's Figure on eigenvalues).

    Attributes:
        layers: layer names in order.
        order: int64 (rank,) concept order applied to every ``similarity``.
        similarity: layer -> (rank, rank) cosine similarity, rows/columns in ``order``.
        eigenvalues: layer -> (rank,) eigenvalues, largest first.
        largest: float64 (L,) largest eigenvalue per layer (``rank`` if all concepts use
            the same neurons, 1 if they use disjoint ones).
        top_k_mean: float64 (L,) mean of the ``top_k`` largest eigenvalues per layer.
        identity_distance: float64 (L,) ``||S - I||_F`` per layer (0 for disjoint
            neurons).
        top_k: the K of ``top_k_mean``.
    """

    layers: tuple[str, ...]
    order: np.ndarray
    similarity: dict[str, np.ndarray]
    eigenvalues: dict[str, np.ndarray]
    largest: np.ndarray
    top_k_mean: np.ndarray
    identity_distance: np.ndarray
    top_k: int

    def to_rows(self) -> list[dict]:
        """One JSON-serialisable dict per layer: layer, largest, top_k_mean, identity_distance."""
        return [
            {
                "layer": layer,
                "largest_eigenvalue": float(self.largest[i]),
                f"top_{self.top_k}_mean": float(self.top_k_mean[i]),
                "identity_distance": float(self.identity_distance[i]),
            }
            for i, layer in enumerate(self.layers)
        ]


def layer_summary(
    loadings_by_layer: Mapping[str, np.ndarray], top_k: int = 3, order=None
) -> LayerSummary:
    """Similarity heatmaps, spectra and the per-layer summary across layers.

    Args:
        loadings_by_layer: layer name -> (rows_j, rank) loading ``O_j``, in layer order
            (pass only layer views, not pixel views).
        top_k: K for the mean of the top K eigenvalues (clipped to rank).
        order: optional (rank,) concept order for the heatmaps, e.g. from
            :func:`concept_order`; default identity. Eigenvalues do not depend on it.

    Returns:
        :class:`LayerSummary`.

    Example:
        >>> s = layer_summary({"conv": np.eye(4)[:, :2], "fc": np.ones((3, 2))})
        >>> s.largest, s.identity_distance.round(3)
        (array([1., 2.]), array([0.   , 1.414]))
    """
    if not isinstance(loadings_by_layer, Mapping) or not loadings_by_layer:
        raise ValueError(
            "loadings_by_layer: expected a non-empty dict name -> (rows, rank), "
            f"got {loadings_by_layer!r:.60}"
        )
    top_k = _positive_int(top_k, "top_k")
    sims, eigs, rank = {}, {}, None
    for name, O in loadings_by_layer.items():
        O = _matrix(O, f"loadings_by_layer[{name!r}]")
        if rank is not None and O.shape[1] != rank:
            raise ValueError(
                f"loadings_by_layer[{name!r}]: expected {rank} columns, got {O.shape[1]}"
            )
        rank = O.shape[1]
        sims[name] = loading_similarity(O)
        eigs[name] = similarity_spectrum(sims[name])
    if order is None:
        order = np.arange(rank, dtype=np.int64)
    order = np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(rank)):
        raise ValueError(f"order: expected a permutation of range({rank}), got {order.tolist()}")
    k = min(top_k, rank)
    layers = tuple(sims)
    return LayerSummary(
        layers=layers,
        order=order,
        similarity={name: S[np.ix_(order, order)] for name, S in sims.items()},
        eigenvalues=eigs,
        largest=np.array([eigs[n][0] for n in layers]),
        top_k_mean=np.array([eigs[n][:k].mean() for n in layers]),
        identity_distance=np.array([np.linalg.norm(sims[n] - np.eye(rank)) for n in layers]),
        top_k=top_k,
    )
