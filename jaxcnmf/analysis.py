"""Analyses of a coupled NMF of a probe set: what the concepts in ``F`` mean.

Everything here works on plain NumPy arrays so it can be scripted on any saved run:

- ``F`` is the shared embedding, float (rank, N): row ``k`` is concept ``k``, column ``n``
  is probe image ``n``.
- A layer loading ``O_j`` is (rows_j, rank); a pixel loading ``P_i`` is (H*W, rank) with
  row ``h*W + w``.
- A layer view ``A_j`` is (rows_j, N) in channel-major order, row ``c*H*W + h*W + w``
  (see :func:`unflatten_activations`).
- ``labels`` are int (N,) in ``[0, num_classes)``.

The sections follow the paper's Section 4: concepts from ``F`` (class shares, purity, NMI,
a k-means baseline), neurons per layer (cosine similarity of loading columns and its
spectrum), pixels (latent images and median masks), neighbours in ``F``-space, and the
fidelity of the reconstruction ``O_j F`` when it replaces a layer inside the network.
Entropies are in bits. Only :func:`fidelity` touches a model; it is a thin wrapper over
the model-free :func:`fidelity_from_logits_fn`.

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
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "METRICS",
    "AccuracyTable",
    "BaselineScores",
    "ConceptRecord",
    "FidelityTable",
    "LayerSummary",
    "NeighbourConcepts",
    "accuracy",
    "accuracy_vs_entropy",
    "class_shares",
    "cluster_purity",
    "concept_order",
    "concept_table",
    "entropy_bits",
    "fidelity",
    "fidelity_from_logits_fn",
    "flatten_activations",
    "kmeans_baseline",
    "latent_images",
    "layer_summary",
    "loading_similarity",
    "masked_images",
    "median_mask",
    "nearest_neighbours",
    "neighbour_concepts",
    "neighbour_entropy_all",
    "nmi",
    "purity",
    "similarity_spectrum",
    "strongest_concept",
    "top_images",
]

METRICS = ("cosine", "euclidean")  # distances in F-space for the neighbour analyses


# --------------------------------------------------------------------------- validation


def _matrix(x, name: str, *, nonnegative: bool = False, dtype=np.float64) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    if nonnegative and arr.size and arr.min() < 0:
        raise ValueError(f"{name}: expected non-negative values, got minimum {arr.min():.3g}")
    return arr


def _labels(labels, n: int, name: str = "labels", num_classes: int | None = None) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if n and arr.min() < 0:
        raise ValueError(f"{name}: expected labels >= 0, got {arr.min()}")
    if num_classes is not None and n and arr.max() >= num_classes:
        raise ValueError(
            f"{name}: expected labels < num_classes={num_classes}, got {arr.max()}"
        )
    return arr


def _positive_int(value, name: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}: expected at most {upper}, got {value}")
    return int(value)


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    return metric


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 wherever ``den`` is 0 (dead concepts, empty images)."""
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.result_type(num, den, np.float32))
    np.divide(num, den, out=out, where=den > 0)
    return out


def entropy_bits(p, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along ``axis`` (0 log 0 = 0).

    Args:
        p: non-negative array; each slice along ``axis`` sums to 1 or is all zero
            (an all-zero slice has entropy 0).
        axis: the axis holding the distribution.

    Returns:
        float64 array of ``p``'s shape without ``axis``.

    Example:
        >>> float(entropy_bits(np.array([0.5, 0.5, 0.0])))
        1.0
    """
    p = np.asarray(p, dtype=np.float64)
    logp = np.zeros_like(p)
    np.log2(p, out=logp, where=p > 0)
    return -np.sum(p * logp, axis=axis) + 0.0


# --------------------------------------------------------------------- concepts from F


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


def kmeans_baseline(activations, labels, k: int, seed: int = 0, n_init: int = 10) -> BaselineScores:
    """k-means on the same activations as the NMF: the report's baseline for NMI and purity.

    Args:
        activations: a layer view (rows, N), or a dict name -> (rows_v, N) of layer views;
            each view's columns are scaled to unit L2 norm before the views are stacked,
            so the clustering sees the same information as the factorization.
        labels: int (N,) class ids.
        k: number of clusters (use the NMF rank for a fair comparison).
        seed: k-means seed.
        n_init: k-means restarts (the best inertia is kept).

    Returns:
        :class:`BaselineScores` with NMI, purity and the (N,) assignment.

    Example:
        >>> X = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
        >>> kmeans_baseline(X, np.array([0, 0, 1, 1]), k=2).nmi
        1.0
    """
    from sklearn.cluster import KMeans

    X = _stack_views(activations)
    labels = _labels(labels, X.shape[1])
    k = _positive_int(k, "k", upper=X.shape[1])
    n_init = _positive_int(n_init, "n_init")
    model = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
    assignment = model.fit_predict(X.T).astype(np.int64)
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


# ------------------------------------------------------------------- neurons per layer


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


# ------------------------------------------------------------------------------ pixels


def latent_images(
    pixel_loadings: Mapping[str, np.ndarray], image_shape: Sequence[int]
) -> np.ndarray:
    """Each concept's latent image from the pixel loadings ``P_i`` (paper 4.1.3).

    Args:
        pixel_loadings: channel name -> (H*W, rank) loading, row ``h*W + w``, in channel
            order ("red", "green", "blue" or "gray").
        image_shape: (H, W) or (H, W, C) with C the number of channels.

    Returns:
        float64 (rank, H, W, C): for each concept, each channel min-max scaled to [0, 1]
        (a constant channel becomes 0).

    Example:
        >>> P = {"gray": np.array([[0.0], [2.0], [4.0], [1.0]])}
        >>> latent_images(P, (2, 2))[0, ..., 0]
        array([[0.  , 0.5 ],
               [1.  , 0.25]])
    """
    if not isinstance(pixel_loadings, Mapping) or not pixel_loadings:
        raise ValueError("pixel_loadings: expected a non-empty dict channel -> (H*W, rank)")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"image_shape: expected (H, W) or (H, W, C), got {image_shape}")
    if len(shape) == 3 and shape[2] != len(pixel_loadings):
        raise ValueError(
            f"image_shape: expected {len(pixel_loadings)} channels to match pixel_loadings, "
            f"got {shape[2]}"
        )
    height, width = shape[:2]
    channels = []
    for name, P in pixel_loadings.items():
        P = _matrix(P, f"pixel_loadings[{name!r}]")
        if P.shape[0] != height * width:
            raise ValueError(
                f"pixel_loadings[{name!r}]: expected {height * width} rows (H*W), got {P.shape[0]}"
            )
        if channels and P.shape[1] != channels[0].shape[1]:
            raise ValueError(
                f"pixel_loadings[{name!r}]: expected {channels[0].shape[1]} columns, "
                f"got {P.shape[1]}"
            )
        lo, hi = P.min(axis=0, keepdims=True), P.max(axis=0, keepdims=True)
        channels.append(_safe_divide(P - lo, hi - lo))
    stacked = np.stack(channels, axis=-1)  # (H*W, rank, C)
    return stacked.transpose(1, 0, 2).reshape(-1, height, width, len(channels))


def median_mask(latent) -> np.ndarray:
    """Pixels of each latent image brighter than that image's median (paper 4.1.3).

    Args:
        latent: (rank, H, W, C) latent images (from :func:`latent_images`); channels are
            averaged before thresholding.

    Returns:
        bool (rank, H, W): True where the channel mean is strictly above its median, so
        at most half the pixels are kept and a constant image keeps none.

    Example:
        >>> median_mask(np.array([[[[0.0], [1.0]], [[2.0], [3.0]]]]))[0]
        array([[False, False],
               [ True,  True]])
    """
    latent = np.asarray(latent, dtype=np.float64)
    if latent.ndim != 4:
        raise ValueError(f"latent: expected (rank, H, W, C), got shape {latent.shape}")
    intensity = latent.mean(axis=-1)
    median = np.median(intensity.reshape(intensity.shape[0], -1), axis=1)
    return intensity > median[:, None, None]


def masked_images(images, mask, background: float = 0.15) -> np.ndarray:
    """Images with the pixels outside a mask dimmed, to see what a concept looks at.

    Args:
        images: uint8 (n, H, W, C) images.
        mask: bool (H, W) applied to every image, or (n, H, W) one per image.
        background: brightness factor in [0, 1] for pixels outside the mask (0 = black;
            a little context helps reading the overlay).

    Returns:
        uint8 (n, H, W, C).

    Example:
        >>> imgs = np.full((1, 1, 2, 1), 200, np.uint8)
        >>> masked_images(imgs, np.array([[True, False]]), background=0.0)[0, 0, :, 0]
        array([200,   0], dtype=uint8)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 (n, H, W, C), got {images.dtype} {images.shape}")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape not in (images.shape[1:3], images.shape[:3]):
        raise ValueError(
            f"mask: expected shape {images.shape[1:3]} or {images.shape[:3]}, got {mask.shape}"
        )
    if not 0.0 <= background <= 1.0:
        raise ValueError(f"background: expected a value in [0, 1], got {background}")
    factor = np.where(mask, 1.0, background)[..., None]
    return np.round(images * factor).astype(np.uint8)


# -------------------------------------------------------------------------- neighbours


def _distances(F: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """(len(queries), N) distances in F-space between images ``queries`` and all images."""
    X = F.T
    if metric == "cosine":
        unit = _safe_divide(X, np.linalg.norm(X, axis=1, keepdims=True))
        return 1.0 - unit[queries] @ unit.T
    Q = X[queries]
    squared = (Q**2).sum(1)[:, None] + (X**2).sum(1)[None, :] - 2.0 * Q @ X.T
    return np.sqrt(np.maximum(squared, 0.0))


def _nearest(F: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """(len(queries), k) nearest images of each query, nearest first, self excluded."""
    dist = _distances(F, queries, metric)
    dist[np.arange(len(queries)), queries] = np.inf
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    within = np.take_along_axis(dist, part, axis=1)
    return np.take_along_axis(part, np.argsort(within, axis=1, kind="stable"), axis=1)


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
        chunk_size: queries per chunk; memory is about ``chunk_size * N`` floats.

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


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of (N, classes) logits against int (N,) labels."""
    logits = np.asarray(logits)
    labels = _labels(labels, logits.shape[0])
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (N, classes), got shape {logits.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if labels.size else 0.0


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


# ---------------------------------------------------------------------------- fidelity


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


@dataclasses.dataclass(frozen=True)
class FidelityTable:
    """Accuracy of the network with one layer replaced by its reconstruction, per rank.

    Attributes:
        layer: the replaced layer.
        original_accuracy: accuracy with the layer's own activations.
        ranks: int64 (R,) ranks of the factorizations.
        accuracy: float64 (R,) accuracy with ``O_j F`` in place of the layer.
        relative_error: float64 (R,) ``||A_j - O_j F|| / ||A_j||`` on these images.
    """

    layer: str
    original_accuracy: float
    ranks: np.ndarray
    accuracy: np.ndarray
    relative_error: np.ndarray

    def to_rows(self) -> list[dict]:
        """One JSON-serialisable dict per rank."""
        return [
            {
                "layer": self.layer,
                "rank": int(r),
                "accuracy": float(a),
                "original_accuracy": self.original_accuracy,
                "accuracy_drop": self.original_accuracy - float(a),
                "relative_error": float(e),
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
        model: flax module from ``jaxcnmf.models``.
        variables: its variables.
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
    from jaxcnmf import probe

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
