"""Neighbours in F-space: an image's nearest neighbours (cosine or Euclidean), the mix of
their strongest concepts and its entropy, and the network's accuracy against that entropy.

``F`` is float (rank, N); a column is an image's embedding. Entropies are in bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxcnmf.concepts._common import METRICS, _matrix, _metric, _positive_int, _safe_divide, entropy_bits
from jaxcnmf.concepts.labels import strongest_concept

__all__ = [
    "METRICS",
    "AccuracyTable",
    "NeighbourConcepts",
    "accuracy_vs_entropy",
    "nearest_neighbours",
    "neighbour_concepts",
    "neighbour_entropy_all",
]


# Candidates compared with a chunk of queries at once: the distance matrix in memory is
# (queries, _CANDIDATES), never (queries, N), so memory does not grow with N beyond F.
_CANDIDATES = 8192


def _points(F: np.ndarray, metric: str) -> np.ndarray:
    """(N, rank) images as points: unit rows for the cosine (a zero row stays zero)."""
    X = F.T
    if metric == "cosine":
        return _safe_divide(X, np.linalg.norm(X, axis=1, keepdims=True))
    return X


def _distances(P: np.ndarray, queries: np.ndarray, start: int, stop: int,
               metric: str) -> np.ndarray:
    """(len(queries), stop - start) distances between images ``queries`` and
    ``start:stop`` (``P`` from :func:`_points`)."""
    Q, X = P[queries], P[start:stop]
    if metric == "cosine":
        return 1.0 - Q @ X.T
    squared = (Q**2).sum(1)[:, None] + (X**2).sum(1)[None, :] - 2.0 * Q @ X.T
    return np.sqrt(np.maximum(squared, 0.0))


def _nearest(F: np.ndarray, queries: np.ndarray, k: int, metric: str,
             candidates: int | None = None) -> np.ndarray:
    """(len(queries), k) nearest images of each query, nearest first, self excluded.

    The candidates are scanned in chunks of ``candidates`` images (default
    ``_CANDIDATES``), keeping a running top-``k`` per query; ties are broken by the
    smaller image index.
    """
    candidates = _CANDIDATES if candidates is None else candidates
    P = _points(F, metric)
    n, q = P.shape[0], len(queries)
    best_d = np.full((q, k), np.inf)
    best_i = np.full((q, k), n, dtype=np.int64)
    rows = np.arange(q)[:, None]
    for start in range(0, n, candidates):
        stop = min(start + candidates, n)
        dist = _distances(P, queries, start, stop, metric)
        inside = (queries >= start) & (queries < stop)
        dist[np.flatnonzero(inside), queries[inside] - start] = np.inf
        take = min(k, stop - start)
        part = np.argpartition(dist, take - 1, axis=1)[:, :take]
        d = np.concatenate([best_d, np.take_along_axis(dist, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        order = np.lexsort((i, d), axis=1)[:, :k]
        best_d, best_i = d[rows, order], i[rows, order]
    return best_i


def nearest_neighbours(F, index: int, k: int, metric: str = "cosine") -> np.ndarray:
    """The ``k`` images nearest to image ``index`` in F-space (columns of ``F``).

    Args:
        F: (rank, N) embedding.
        index: query image, in ``[0, N)``.
        k: number of neighbours, ``1 <= k < N``; the query itself is excluded.
        metric: "cosine" (1 - cosine similarity; an all-zero column is at distance 1
            from everything) or "euclidean".

    Returns:
        int64 (k,) image indices, nearest first.

    Example:
        >>> F = np.array([[1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 1.0]])
        >>> nearest_neighbours(F, 0, 2)
        array([1, 3])
    """
    F = _matrix(F, "F")
    n = F.shape[1]
    if not 0 <= int(index) < n:
        raise ValueError(f"index: expected an image index in [0, {n}), got {index}")
    k = _positive_int(k, "k", upper=n - 1)
    return _nearest(F, np.array([int(index)]), k, _metric(metric))[0].astype(np.int64)


def _concept_counts(strongest: np.ndarray, rank: int) -> np.ndarray:
    """(..., rank) counts of concept ids along the last axis of ``strongest`` (-1 ignored)."""
    return (strongest[..., None] == np.arange(rank)).sum(axis=-2).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class NeighbourConcepts:
    """The strongest concepts among an image's neighbours.

    Attributes:
        index: the query image.
        neighbours: int64 (k,) neighbour indices, nearest first.
        distribution: float64 (rank,) share of neighbours whose strongest concept is k
            (all zero if no neighbour has any concept).
        entropy_bits: entropy of ``distribution`` (0 when all neighbours agree).
        metric: "cosine" or "euclidean".
    """

    index: int
    neighbours: np.ndarray
    distribution: np.ndarray
    entropy_bits: float
    metric: str


def neighbour_concepts(F, index: int, k: int, metric: str = "cosine") -> NeighbourConcepts:
    """Distribution of the strongest concepts among an image's ``k`` nearest neighbours.

    Args:
        F: (rank, N) embedding.
        index: query image.
        k: number of neighbours (query excluded).
        metric: "cosine" or "euclidean".

    Returns:
        :class:`NeighbourConcepts`.

    Example:
        >>> F = np.array([[1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 1.0]])
        >>> neighbour_concepts(F, 2, 1).distribution
        array([0., 1.])
    """
    neighbours = nearest_neighbours(F, index, k, metric)
    F = _matrix(F, "F")
    counts = _concept_counts(strongest_concept(F)[neighbours], F.shape[0])
    distribution = _safe_divide(counts, counts.sum())
    entropy = float(entropy_bits(distribution))
    return NeighbourConcepts(int(index), neighbours, distribution, entropy, metric)


def neighbour_entropy_all(F, k: int, metric: str = "cosine", chunk_size: int = 1024) -> np.ndarray:
    """:func:`neighbour_concepts` entropy for every image, computed in chunks of queries.

    Args:
        F: (rank, N) embedding.
        k: number of neighbours, ``1 <= k < N``.
        metric: "cosine" or "euclidean".
        chunk_size: queries per chunk; memory is ``F`` plus about
            ``chunk_size * min(N, 8192)`` floats (candidates are scanned in chunks too,
            never an ``N x N`` matrix), so it suits an ``F`` of millions of images.

    Returns:
        float64 (N,) entropies in bits, in ``[0, log2(min(k, rank))]``.

    Example:
        >>> F = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
        >>> neighbour_entropy_all(F, 1)
        array([0., 0., 0., 0.])
    """
    F = _matrix(F, "F")
    rank, n = F.shape
    k = _positive_int(k, "k", upper=n - 1)
    metric = _metric(metric)
    chunk_size = _positive_int(chunk_size, "chunk_size")
    strongest = strongest_concept(F)
    out = np.empty(n)
    for start in range(0, n, chunk_size):
        queries = np.arange(start, min(start + chunk_size, n))
        counts = _concept_counts(strongest[_nearest(F, queries, k, metric)], rank)
        out[queries] = entropy_bits(_safe_divide(counts, counts.sum(axis=1, keepdims=True)))
    return out


@dataclasses.dataclass(frozen=True)
class AccuracyTable:
    """The network's accuracy in bins of neighbour entropy.

    Attributes:
        edges: float64 (B + 1,) bin edges; bin b holds ``edges[b] <= e < edges[b+1]``
            (the last bin also holds its right edge).
        count: int64 (B,) images per bin.
        accuracy: float64 (B,) accuracy per bin, NaN for empty bins.
        overall: accuracy over all images.
    """

    edges: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    overall: float

    def to_rows(self) -> list[dict]:
        """One JSON-serialisable dict per bin (accuracy None for empty bins)."""
        return [
            {
                "entropy_low": float(self.edges[b]),
                "entropy_high": float(self.edges[b + 1]),
                "count": int(self.count[b]),
                "accuracy": None if self.count[b] == 0 else float(self.accuracy[b]),
            }
            for b in range(len(self.count))
        ]


def accuracy_vs_entropy(entropy, correct, bins: int | Sequence[float] = 5) -> AccuracyTable:
    """Bin images by neighbour entropy and report the network's accuracy in each bin.

    Args:
        entropy: float (N,) per-image entropy, e.g. :func:`neighbour_entropy_all`.
        correct: bool (N,) whether the network classifies each image correctly.
        bins: number of equal-width bins over ``[min, max]`` of ``entropy``, or the
            increasing bin edges.

    Returns:
        :class:`AccuracyTable`.

    Example:
        >>> t = accuracy_vs_entropy([0.0, 0.1, 1.0, 0.9], [True, True, False, True], bins=2)
        >>> t.count, t.accuracy
        (array([2, 2]), array([1. , 0.5]))
    """
    entropy = np.asarray(entropy, dtype=np.float64)
    correct = np.asarray(correct)
    if entropy.ndim != 1 or entropy.size == 0:
        raise ValueError(f"entropy: expected a non-empty 1-D array, got shape {entropy.shape}")
    if correct.shape != entropy.shape:
        raise ValueError(f"correct: expected shape {entropy.shape}, got {correct.shape}")
    correct = correct.astype(bool)
    if np.ndim(bins) == 0:
        n_bins = _positive_int(bins, "bins")
        lo, hi = float(entropy.min()), float(entropy.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"bins: expected at least two increasing edges, got {edges.tolist()}")
    which = np.clip(np.searchsorted(edges, entropy, side="right") - 1, 0, len(edges) - 2)
    inside = (entropy >= edges[0]) & (entropy <= edges[-1])
    count = np.bincount(which[inside], minlength=len(edges) - 1)
    hits = np.bincount(which[inside], weights=correct[inside], minlength=len(edges) - 1)
    acc = np.full(len(count), np.nan)
    np.divide(hits, count, out=acc, where=count > 0)
    return AccuracyTable(edges, count.astype(np.int64), acc, float(correct.mean()))
