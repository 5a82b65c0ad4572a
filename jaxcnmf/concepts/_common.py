"""Input checks and small numeric helpers shared by the concept analyses (NumPy only)."""

from __future__ import annotations


import numpy as np

METRICS = ("cosine", "euclidean")  # distances in F-space for the neighbour analyses

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


def _store_labels(labels, store, where: str) -> np.ndarray:
    """``labels`` checked against ``store.n``, or the store's own labels when None."""
    if labels is None:
        if store.labels is None:
            raise ValueError(f"labels: expected (N,) class ids, got None and {where} holds "
                             f"no labels")
        labels = store.labels
    return _labels(labels, store.n)


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
