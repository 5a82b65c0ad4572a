"""Concepts against labels (paper 4.1.1): class and superclass shares, top images, purity,
NMI of each image's strongest concept, and the k-means baseline on the same activations.

``F`` is the shared embedding, float (rank, N): row ``k`` is concept ``k``, column ``n`` is
probe image ``n``; ``labels`` are int (N,) in ``[0, num_classes)``. Entropies are in bits.

Example:
    >>> import numpy as np
    >>> F = np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])
    >>> labels = np.array([0, 0, 1, 1])
    >>> class_shares(F, labels, 2)
    array([[1., 0.],
           [0., 1.]])
    >>> float(purity(F, labels)), float(nmi(strongest_concept(F), labels))
    (1.0, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from jaxcnmf.concepts._common import (
    _labels,
    _matrix,
    _positive_int,
    _safe_divide,
    _store_labels,
    entropy_bits,
)

__all__ = [
    "BaselineScores",
    "ConceptRecord",
    "class_shares",
    "cluster_purity",
    "concept_order",
    "concept_table",
    "entropy_bits",
    "kmeans_baseline",
    "nmi",
    "purity",
    "scaled_F",
    "strongest_concept",
    "top_images",
]

def class_shares(F, labels, num_classes: int) -> np.ndarray:
    """Share of each concept's mass ``F[k, :]`` that falls on each class.

    Args:
        F: non-negative (rank, N) embedding.
        labels: int (N,) class ids in ``[0, num_classes)``; pass coarse labels and the
            number of superclasses for superclass shares.
        num_classes: number of classes C.

    Returns:
        float64 (rank, C); each row sums to 1, except rows of all-zero concepts, which
        are all zero (not NaN). The probe set is expected to be class-balanced
        (``data.balanced_subset``); otherwise large classes get larger shares.

    Example:
        >>> class_shares(np.array([[1.0, 3.0], [0.0, 0.0]]), np.array([0, 1]), 2)
        array([[0.25, 0.75],
               [0.  , 0.  ]])
    """
    F = _matrix(F, "F", nonnegative=True)
    num_classes = _positive_int(num_classes, "num_classes")
    labels = _labels(labels, F.shape[1], num_classes=num_classes)
    mass = np.zeros((num_classes, F.shape[0]))
    np.add.at(mass, labels, F.T)
    mass = mass.T
    return _safe_divide(mass, mass.sum(axis=1, keepdims=True))


def top_images(F, k: int) -> np.ndarray:
    """Indices of the ``k`` images with the largest weight in each concept.

    Args:
        F: (rank, N) embedding.
        k: images per concept, ``1 <= k <= N``.

    Returns:
        int64 (rank, k), largest weight first.

    Example:
        >>> top_images(np.array([[0.1, 0.9, 0.5]]), 2)
        array([[1, 2]])
    """
    F = _matrix(F, "F")
    k = _positive_int(k, "k", upper=F.shape[1])
    # A stable sort on -F keeps ties in image order, so results are reproducible.
    return np.argsort(-F, axis=1, kind="stable")[:, :k].astype(np.int64)


def purity(F, labels, num_classes: int | None = None) -> float:
    """Mean top-class share over the concepts that carry mass (the paper's purity).

    Args:
        F: non-negative (rank, N) embedding.
        labels: int (N,) class ids.
        num_classes: number of classes; defaults to ``labels.max() + 1``.

    Returns:
        Purity in [0, 1]; 1 when every live concept puts all its mass on one class.
        All-zero concepts are left out (0.0 when every concept is zero).

    Example:
        >>> purity(np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]), np.array([0, 1, 1]))
        0.75
    """
    F = _matrix(F, "F", nonnegative=True)
    labels = _labels(labels, F.shape[1])
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    shares = class_shares(F, labels, num_classes)
    live = F.sum(axis=1) > 0
    if not live.any():
        return 0.0
    return float(shares[live].max(axis=1).mean())


def scaled_F(F, loadings, weights=None) -> np.ndarray:
    """``F`` made independent of how a fit split the scale between ``W`` and ``F``.

    ``W F = (W D)(D^-1 F)`` for any positive diagonal ``D``, so without unit loading
    columns "each image's strongest concept" (``argmax_k F[k, n]``), purity and NMI
    depend on an arbitrary choice of the solver. Row ``k`` of the result is ``F[k]``
    times ``sqrt(sum_v w_v ||W_v[:, k]||^2)`` (the stacked loading column's norm,
    weighted as in the fit), which every split gives alike. Analyses should assign
    concepts on this, whatever the fit's ``unit_columns`` setting.

    Args:
        F: non-negative (rank, N) embedding.
        loadings: dict view -> (rows_v, rank) loadings, or a sequence of them.
        weights: the fit's view weights (dict view -> weight, or a sequence in the
            loadings' order); default 1 for every view.

    Returns:
        float64 (rank, N).

    Example:
        >>> scaled_F(np.array([[1.0, 2.0], [4.0, 0.0]]), {"a": np.array([[3.0, 0.5]])})
        array([[3., 6.],
               [2., 0.]])
    """
    from jaxcnmf.solver.fit import concept_scale

    F = _matrix(F, "F", nonnegative=True)
    scale = concept_scale(loadings, weights)
    if scale.shape != (F.shape[0],):
        raise ValueError(f"loadings: expected {F.shape[0]} columns (the rank of F), got "
                         f"{scale.shape[0]}")
    return scale[:, None] * F


def strongest_concept(F) -> np.ndarray:
    """Each image's strongest concept: ``argmax_k F[k, n]``.

    Args:
        F: (rank, N) embedding.

    Returns:
        int64 (N,) concept ids; -1 for images whose column of ``F`` is all zero (no
        concept explains them).

    Example:
        >>> strongest_concept(np.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0]]))
        array([ 0,  1, -1])
    """
    F = _matrix(F, "F")
    best = np.argmax(F, axis=0).astype(np.int64)
    best[~np.any(F > 0, axis=0)] = -1
    return best


def nmi(a, b) -> float:
    """Normalized mutual information between two labelings (arithmetic normalisation).

    The same quantity as ``sklearn.metrics.normalized_mutual_info_score(a, b)``:
    ``I(a; b) / mean(H(a), H(b))``; 1.0 when both labelings are constant.

    Args:
        a: int (N,) labeling, e.g. :func:`strongest_concept`.
        b: int (N,) labeling, e.g. class labels.

    Returns:
        NMI in [0, 1].

    Example:
        >>> nmi(np.array([0, 0, 1, 1]), np.array([5, 5, 3, 3]))
        1.0
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(
            f"a, b: expected two 1-D labelings of equal length, got {a.shape} and {b.shape}"
        )
    if a.size == 0:
        raise ValueError("a, b: expected at least one element, got 0")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= a.size
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    ha, hb = entropy_bits(pa), entropy_bits(pb)
    if ha == 0.0 and hb == 0.0:
        return 1.0
    outer = pa[:, None] * pb[None, :]
    nz = joint > 0
    mutual = float(np.sum(joint[nz] * np.log2(joint[nz] / outer[nz])))
    return float(np.clip(mutual / ((ha + hb) / 2.0), 0.0, 1.0))


def cluster_purity(assignment: np.ndarray, labels: np.ndarray) -> float:
    """Hard purity of a clustering: mean over clusters of the share of its commonest label.

    Scores NMF concepts (``assignment = strongest_concept(F)``) and k-means clusters on the
    same footing; :func:`purity` instead weighs each image by its concept weight.

    Args:
        assignment: (N,) int cluster of every image; ``-1`` (no concept) is ignored.
        labels: (N,) int labels.

    Returns:
        Purity in [0, 1]; 0 when no image has a cluster.

    Example:
        >>> cluster_purity(np.array([0, 0, 1, 1]), np.array([3, 3, 3, 5]))
        0.75
    """
    assignment = np.asarray(assignment)
    labels = np.asarray(labels)
    shares = []
    for cluster in np.unique(assignment[assignment >= 0]):
        counts = np.bincount(labels[assignment == cluster])
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares)) if shares else 0.0


@dataclasses.dataclass(frozen=True)
class BaselineScores:
    """Scores of a clustering of the probe images against their labels.

    Attributes:
        nmi: NMI of the cluster assignment and the labels.
        purity: mean over clusters of the share of the most common label (the same
            definition as :func:`purity` for hard assignments).
        assignment: int64 (N,) cluster ids.
    """

    nmi: float
    purity: float
    assignment: np.ndarray


def _stack_views(activations) -> np.ndarray:
    """(rows, N) matrix with each view's columns scaled to unit norm, views stacked."""
    if isinstance(activations, Mapping):
        items = list(activations.items())
    else:
        items = [("activations", activations)]
    if not items:
        raise ValueError("activations: expected at least one view, got none")
    blocks = []
    n = None
    for name, view in items:
        # float32: layer views can be large and k-means does not need more precision.
        label = f"activations[{name!r}]" if len(items) > 1 else "activations"
        view = _matrix(view, label, dtype=np.float32)
        if n is not None and view.shape[1] != n:
            raise ValueError(f"activations[{name!r}]: expected {n} columns, got {view.shape[1]}")
        n = view.shape[1]
        # Unit columns per view: every layer and every image weigh the same, whatever the
        # layer's width and activation scale.
        blocks.append(_safe_divide(view, np.linalg.norm(view, axis=0, keepdims=True)))
    return np.concatenate(blocks, axis=0)


def kmeans_baseline(activations, labels, k: int, seed: int = 0, n_init: int = 10, *,
                    views: Sequence[str] | None = None, progress: bool = False
                    ) -> BaselineScores:
    """k-means on the same activations as the NMF: the report's baseline for NMI and purity.

    Args:
        activations: a layer view (rows, N), or a dict name -> (rows_v, N) of layer views;
            each view's columns are scaled to unit L2 norm before the views are stacked,
            so the clustering sees the same information as the factorization. Or a
            :class:`jaxcnmf.store.Store`: its ``views`` are clustered block by block
            (:func:`jaxcnmf.concepts.kmeans.kmeans_store`; identical to the in-memory
            baseline while the stacked views fit in its 256 MiB sample).
        labels: int (N,) class ids (with a store, ``None`` takes the store's labels).
        k: number of clusters (use the NMF rank for a fair comparison).
        seed: k-means seed.
        n_init: k-means restarts (the best inertia is kept), all in one compiled call
            (:func:`jaxcnmf.concepts.kmeans.kmeans`).
        views: with a store, the views to stack (default all; pass the layers to leave the
            pixel views out, as the pipeline's baseline does).
        progress: with a store, a progress bar per pass over it.

    Returns:
        :class:`BaselineScores` with NMI, purity and the (N,) assignment.

    Example:
        >>> X = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
        >>> kmeans_baseline(X, np.array([0, 0, 1, 1]), k=2).nmi
        1.0
    """
    from jaxcnmf.concepts.kmeans import kmeans, kmeans_store
    from jaxcnmf.solver.store import Store

    if isinstance(activations, Store):
        labels = _store_labels(labels, activations, f"the store {str(activations.path)!r}")
        k = _positive_int(k, "k", upper=activations.n)
        n_init = _positive_int(n_init, "n_init")
        assignment = kmeans_store(activations, k, views=views, n_init=n_init, seed=seed,
                                  progress=progress).assignment
        return BaselineScores(nmi(assignment, labels), cluster_purity(assignment, labels),
                              assignment)
    if views is not None:
        raise ValueError("views: expected None for in-memory activations (pass only the "
                         "views to cluster), got a value")
    X = _stack_views(activations)
    labels = _labels(labels, X.shape[1])
    k = _positive_int(k, "k", upper=X.shape[1])
    n_init = _positive_int(n_init, "n_init")
    assignment = kmeans(X.T, k, n_init=n_init, seed=seed).assignment
    return BaselineScores(nmi(assignment, labels), cluster_purity(assignment, labels), assignment)


@dataclasses.dataclass(frozen=True)
class ConceptRecord:
    """One concept's summary row (see :func:`concept_table`).

    Attributes:
        concept: concept id (row of ``F``).
        mass: share of the total mass of ``F`` in this row, in [0, 1].
        top_classes: ((class name, share), ...) largest share first.
        entropy_bits: entropy of the concept's class distribution in bits.
        entropy_normalized: ``entropy_bits / log2(C)``, in [0, 1] (0 when C == 1).
        top_images: int64 (n_images,) indices of the images with the largest weight.
        top_superclasses: like ``top_classes`` for coarse labels, or None.
        superclass_entropy_bits: entropy of the superclass distribution, or None.
    """

    concept: int
    mass: float
    top_classes: tuple[tuple[str, float], ...]
    entropy_bits: float
    entropy_normalized: float
    top_images: np.ndarray
    top_superclasses: tuple[tuple[str, float], ...] | None = None
    superclass_entropy_bits: float | None = None

    def to_dict(self) -> dict:
        """JSON-serialisable flat dict (lists for tuples and arrays), e.g. for CSV rows."""
        out = dataclasses.asdict(self)
        out["top_classes"] = [[name, float(share)] for name, share in self.top_classes]
        out["top_images"] = [int(i) for i in self.top_images]
        if self.top_superclasses is not None:
            out["top_superclasses"] = [[n, float(s)] for n, s in self.top_superclasses]
        return out


def _top_named(shares_row: np.ndarray, names: Sequence[str], top: int) -> tuple:
    order = np.argsort(-shares_row, kind="stable")[:top]
    return tuple((str(names[c]), float(shares_row[c])) for c in order if shares_row[c] > 0)


def concept_table(
    F,
    labels,
    class_names: Sequence[str],
    coarse_labels=None,
    superclass_names: Sequence[str] | None = None,
    top: int = 3,
    n_images: int = 8,
) -> list[ConceptRecord]:
    """Per-concept summary: mass, top classes with shares, entropy, top images.

    Args:
        F: non-negative (rank, N) embedding.
        labels: int (N,) class ids in ``[0, len(class_names))``.
        class_names: C names.
        coarse_labels: optional int (N,) superclass ids.
        superclass_names: names of the superclasses; required with ``coarse_labels``.
        top: number of top classes (and superclasses) to list; classes with zero share
            are not listed.
        n_images: number of top images (clipped to N).

    Returns:
        ``rank`` :class:`ConceptRecord`, in concept order.

    Example:
        >>> F = np.array([[1.0, 3.0], [2.0, 0.0]])
        >>> rec = concept_table(F, np.array([0, 1]), ["cat", "dog"])[0]
        >>> rec.top_classes, round(rec.entropy_bits, 3)
        ((('dog', 0.75), ('cat', 0.25)), 0.811)
    """
    F = _matrix(F, "F", nonnegative=True)
    num_classes = len(class_names)
    shares = class_shares(F, labels, num_classes)
    top = _positive_int(top, "top")
    images = top_images(F, min(_positive_int(n_images, "n_images"), F.shape[1]))
    entropy = entropy_bits(shares)
    max_entropy = math.log2(num_classes) if num_classes > 1 else 1.0
    total = F.sum()
    mass = F.sum(axis=1) / total if total > 0 else np.zeros(F.shape[0])
    coarse_shares = coarse_entropy = None
    if coarse_labels is not None:
        if superclass_names is None:
            raise ValueError("superclass_names: expected names with coarse_labels, got None")
        coarse_shares = class_shares(F, coarse_labels, len(superclass_names))
        coarse_entropy = entropy_bits(coarse_shares)
    records = []
    for k in range(F.shape[0]):
        records.append(
            ConceptRecord(
                concept=k,
                mass=float(mass[k]),
                top_classes=_top_named(shares[k], class_names, top),
                entropy_bits=float(entropy[k]),
                entropy_normalized=float(entropy[k] / max_entropy) if num_classes > 1 else 0.0,
                top_images=images[k],
                top_superclasses=(
                    None if coarse_shares is None
                    else _top_named(coarse_shares[k], superclass_names, top)
                ),
                superclass_entropy_bits=(
                    None if coarse_entropy is None else float(coarse_entropy[k])
                ),
            )
        )
    return records


def concept_order(F, labels=None, num_classes: int | None = None) -> np.ndarray:
    """A display order of the concepts, the same for every layer's heatmap.

    With labels, concepts are grouped by dominant class (class id ascending) and, within a
    class, by decreasing top-class share, so concepts of the same class sit together.
    Without labels, concepts are ordered by decreasing mass ``F[k, :].sum()``. Ties keep
    concept order.

    Args:
        F: non-negative (rank, N) embedding.
        labels: optional int (N,) class ids.
        num_classes: number of classes; defaults to ``labels.max() + 1``.

    Returns:
        int64 (rank,) permutation; ``S[np.ix_(order, order)]`` reorders a similarity.

    Example:
        >>> concept_order(np.array([[1.0, 0.0], [0.0, 5.0]]), np.array([1, 0]))
        array([1, 0])
    """
    F = _matrix(F, "F", nonnegative=True)
    if labels is None:
        return np.argsort(-F.sum(axis=1), kind="stable").astype(np.int64)
    labels = _labels(labels, F.shape[1])
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    shares = class_shares(F, labels, num_classes)
    dominant = shares.argmax(axis=1)
    return np.lexsort((-shares.max(axis=1), dominant)).astype(np.int64)
