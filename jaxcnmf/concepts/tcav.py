"""TCAV (Kim et al. 2018): test whether a network's class logits respond to a concept.

A concept activation vector (CAV) for concept C at layer l is the unit normal of a linear
classifier separating the layer's activations of C's images from those of random images,
pointing towards C. The sensitivity of class k's logit to C at an input is the directional
derivative of the logit along the CAV; the TCAV score is the fraction of class-k inputs
with a positive sensitivity. Scores of the concept's CAVs against R random sets are
compared with scores of R random-vs-random CAVs by a two-sided Welch t-test, and the
p-values are corrected across the whole (layer, concept, class) grid.

Why it is fast: the gradient of class k's logit with respect to every requested layer is
computed once per input (one backward pass per batch, all layers at once), and every CAV's
sensitivities are then one matrix product ``grads (n, D) @ cavs.T (D, R)``. All CAVs of a
concept (its R runs and R random-vs-random runs) are trained in one jitted, vmapped call.

Precision: TCAV scores are signs of small numbers; we compute at full precision so
results do not depend on the backend's default. Activations and gradients come from
:func:`jaxcnmf.nets.probe.layer_activations` and :func:`~jaxcnmf.nets.probe.layer_gradients`,
and CAV fits and sensitivities here, all traced under
:func:`~jaxcnmf.nets.probe.full_precision` (``jax.default_matmul_precision("float32")``),
so every float32 matmul and convolution runs in full float32 even where the backend would
otherwise use TF32 or bfloat16 passes (NVIDIA GPUs, TPUs); the sign of a sensitivity
near zero then no longer depends on the backend or on how the inputs were batched.

Running the network is :mod:`jaxcnmf.nets.probe`'s job; this module holds CAVs, scores,
their statistics, concept sets, the result and its figure. ``layer_shapes``,
``layer_activations`` and ``layer_gradients``, which lived here before, are re-exported
from probe so that ``tcav.layer_gradients(...)`` keeps working.

Layer choice: at a layer from which the network is linear to the logits (a global
average pool then a dense layer: SmallCNN's ``conv3``/``pool``, ResNet-18's
``conv5_x``/``avgpool``) a class logit's gradient is the same for every input, so every
score is 0 or 1; ``run`` warns (``TcavWarning``) and flags it in ``constant_gradient``.

Activations and CAVs live in the channel-major flattening of a layer's output,
``row = c*H*W + h*W + w`` (the same order as ``probe.collect(..., pooling="flatten")``);
gradients are flattened the same way.

Example:
    >>> from jaxcnmf import tcav
    >>> concepts = tcav.concepts_from_factors(res, probe_images, top=50)
    >>> result = tcav.run(model, variables, "conv2", concepts,
    ...                   classes={"cat": cat_images, "dog": dog_images},
    ...                   class_names=dataset.class_names, random_runs=50)
    >>> result.table()[0]["significant"]
    True
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcnmf.nets import probe

# Running the network (activations, gradients w.r.t. a layer, layer shapes) is
# jaxcnmf.nets.probe's job; these names lived here before and are re-exported for the
# code that imports them from tcav.
from jaxcnmf.nets.probe import layer_activations, layer_gradients, layer_shapes  # noqa: F401

CAV_METHODS = ("logistic", "mean_diff")
CORRECTIONS = ("bh", "bonferroni")

# Bytes of gathered activations one vmapped chunk of CAV fits may hold; bounds memory
# for wide layers while keeping chunks large enough for batched BLAS.
_CHUNK_BYTES = 64 * 2**20

# A class's logit gradients count as identical when every entry varies across the class's
# inputs by at most this fraction of the largest entry: float32 round-off of a linear head
# stays far below it, while a ReLU or max-pool after the layer zeroes whole entries.
_CONSTANT_RTOL = 1e-5


class TcavWarning(UserWarning):
    """TCAV scores that carry no per-input information (see :func:`run`)."""


class Cavs(NamedTuple):
    """CAVs of one concept (or random set) against R random sets.

    Attributes:
        vectors: (R, D) float32 unit normals pointing towards the concept.
        accuracies: (R,) float32 held-out accuracy of each linear classifier.
    """

    vectors: np.ndarray
    accuracies: np.ndarray


# --------------------------------------------------------------------------- CAV core


def _standardize(x: jax.Array, train: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Centre on the training rows' mean and divide by one global scale.

    One scalar (the RMS of the centred training entries) makes ``l2`` mean the same at
    every layer whatever its activation magnitude, and keeps the geometry isotropic, so
    the normal found in these coordinates is also the normal in the raw ones.
    """
    m = train.astype(x.dtype)
    n_train = jnp.maximum(m.sum(), 1.0)
    xc = x - (m @ x) / n_train
    scale = jnp.sqrt(jnp.sum((xc * m[:, None]) ** 2) / (n_train * x.shape[1]))
    return xc / jnp.where(scale > 0, scale, 1.0), m


def _logistic_normal(
    x: jax.Array, y: jax.Array, train: jax.Array, l2: float, max_steps: int, tol: float
) -> tuple[jax.Array, jax.Array]:
    """L2-regularised logistic regression; returns (normal (D,), margins (n,)).

    Minimises ``mean_train log-loss(z w + b) + l2/2 ||w||^2`` with an unpenalised
    intercept. By the representer theorem ``w`` lies in the span of the centred
    training rows, so the problem is solved exactly in that n-dimensional span
    (an isometry, so conditioning is unchanged) with optax's L-BFGS: the D-dimensional
    work is one Gram matrix, and the iterations cost O(n^2) whatever the layer width.
    """
    z, m = _standardize(x, train)
    zt = z * m[:, None]
    evals, evecs = jnp.linalg.eigh(zt @ zt.T)
    keep = evals > evals[-1] * 1e-6
    root = jnp.sqrt(jnp.where(keep, evals, 1.0))
    n_train = jnp.maximum(m.sum(), 1.0)
    # In the eigenbasis the Hessian at zero is diagonal, lambda/(4 n) + l2; dividing by its
    # square root makes it the identity, which cuts L-BFGS iterations several-fold.
    precond = jnp.sqrt(jnp.where(keep, evals, 0.0) / (4 * n_train) + l2)
    feats = evecs * (jnp.where(keep, root, 0.0) / precond)

    def loss(params):
        gamma, b = params
        logit = feats @ gamma + b
        ll = optax.sigmoid_binary_cross_entropy(logit, y)
        return jnp.sum(ll * m) / n_train + 0.5 * l2 * jnp.sum((gamma / precond) ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        params, state, k = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=loss
        )
        return optax.apply_updates(params, updates), state, k + 1

    def going(carry):
        _, state, k = carry
        grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return (k == 0) | ((k < max_steps) & (grad_norm >= tol))

    params = (jnp.zeros(x.shape[0], x.dtype), jnp.zeros((), x.dtype))
    params, _, _ = jax.lax.while_loop(going, step, (params, opt.init(params), 0))
    gamma, b = params
    w = zt.T @ (evecs @ jnp.where(keep, gamma / (precond * root), 0.0))
    return w, z @ w + b


def _mean_diff_normal(x: jax.Array, y: jax.Array, train: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Difference of the class means; the threshold sits half-way between them."""
    pos = (train & (y > 0.5)).astype(x.dtype)
    neg = (train & (y < 0.5)).astype(x.dtype)
    mean_pos = (pos @ x) / jnp.maximum(pos.sum(), 1.0)
    mean_neg = (neg @ x) / jnp.maximum(neg.sum(), 1.0)
    w = mean_pos - mean_neg
    return w, x @ w - w @ (mean_pos + mean_neg) / 2


def _fit_one(
    acts: jax.Array,
    pos_idx: jax.Array,
    neg_idx: jax.Array,
    train: jax.Array,
    method: str,
    l2: float,
    max_steps: int,
    tol: float,
) -> tuple[jax.Array, jax.Array]:
    """One CAV from rows ``pos_idx`` (concept) vs ``neg_idx`` (random) of ``acts``."""
    x = jnp.concatenate([acts[pos_idx], acts[neg_idx]])
    y = jnp.concatenate(
        [jnp.ones(pos_idx.shape[0], acts.dtype), jnp.zeros(neg_idx.shape[0], acts.dtype)]
    )
    if method == "logistic":
        w, margins = _logistic_normal(x, y, train, l2, max_steps, tol)
    else:
        w, margins = _mean_diff_normal(x, y, train)
    # Held-out rows score the classifier; with no held-out rows the training rows do.
    held = jnp.where(jnp.any(~train), ~train, train).astype(acts.dtype)
    correct = ((margins > 0) == (y > 0.5)).astype(acts.dtype)
    accuracy = jnp.sum(correct * held) / jnp.sum(held)
    norm = jnp.linalg.norm(w)
    return w / jnp.where(norm > 0, norm, 1.0), accuracy


@functools.partial(jax.jit, static_argnames=("method", "max_steps", "chunk"))
@probe.full_precision
def _fit_cavs(acts, pos_idx, neg_idx, train, *, method, l2, max_steps, tol, chunk):
    """All CAVs in one call: ``lax.map`` over runs, vmapped ``chunk`` at a time."""
    fit = functools.partial(
        _fit_one, acts, method=method, l2=l2, max_steps=max_steps, tol=tol
    )
    return jax.lax.map(lambda a: fit(*a), (pos_idx, neg_idx, train), batch_size=chunk)


def _split_masks(n_pos: int, n_neg: int, runs: int, holdout: float, seed: int) -> np.ndarray:
    """(runs, n_pos + n_neg) bool training masks, stratified, fresh for every run."""
    rng = np.random.default_rng(seed)
    masks = np.ones((runs, n_pos + n_neg), bool)
    if holdout == 0:
        return masks
    offset = 0
    for n in (n_pos, n_neg):
        n_test = min(n - 1, max(1, int(round(holdout * n))))
        order = np.argsort(rng.random((runs, n)), axis=1)
        np.put_along_axis(masks[:, offset : offset + n], order[:, :n_test], False, axis=1)
        offset += n
    return masks


def _check_cav_options(method, l2, steps, holdout, n_pos, n_neg):
    if method not in CAV_METHODS:
        raise ValueError(f"cav method: expected one of {CAV_METHODS}, got {method!r}")
    if not l2 > 0:
        raise ValueError(f"l2: expected a positive float, got {l2!r}")
    if int(steps) < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout: expected a fraction in [0, 1), got {holdout!r}")
    need = 2 if holdout > 0 else 1
    if n_pos < need or n_neg < need:
        raise ValueError(
            f"CAV sets: expected at least {need} examples on each side "
            f"(holdout={holdout}), got {n_pos} concept and {n_neg} random"
        )


def _chunk(n_rows: int, dim: int, runs: int) -> int:
    return int(max(1, min(runs, _CHUNK_BYTES // max(1, 4 * n_rows * dim))))


def _bucket(n: int) -> int:
    """``n`` rounded up to a quarter-octave step, so varying pool sizes reuse compilations."""
    step = max(1, (1 << (int(n).bit_length() - 1)) // 4)
    return -(-int(n) // step) * step


def _cavs_from_indices(acts, pos_idx, neg_idx, *, method, l2, steps, tol, holdout, seed):
    runs = pos_idx.shape[0]
    acts = np.asarray(acts, np.float32)
    acts = np.pad(acts, [(0, _bucket(acts.shape[0]) - acts.shape[0]), (0, 0)])
    masks = _split_masks(pos_idx.shape[1], neg_idx.shape[1], runs, holdout, seed)
    chunk = _chunk(pos_idx.shape[1] + neg_idx.shape[1], acts.shape[1], runs)
    # Pad the runs to a multiple of the chunk so lax.map compiles one vmapped body only.
    pad = (-runs) % chunk
    pos_idx, neg_idx, masks = (
        np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (pos_idx, neg_idx, masks)
    )
    vectors, accuracies = _fit_cavs(
        jnp.asarray(acts),
        jnp.asarray(pos_idx, jnp.int32),
        jnp.asarray(neg_idx, jnp.int32),
        jnp.asarray(masks),
        method=method,
        l2=float(l2),
        max_steps=int(steps),
        tol=float(tol),
        chunk=chunk,
    )
    return Cavs(np.asarray(vectors)[:runs], np.asarray(accuracies)[:runs])


def train_cavs(
    concept_acts: np.ndarray,
    random_acts: np.ndarray,
    *,
    method: str = "logistic",
    l2: float = 0.01,
    steps: int = 500,
    tol: float = 1e-5,
    holdout: float = 0.2,
    seed: int = 0,
) -> Cavs:
    """Train R CAVs, concept vs each of R random sets, in one jitted vmapped call.

    ``"logistic"``: L2-regularised logistic regression (mean log-loss +
    ``l2/2 ||w||^2``, unpenalised intercept) on inputs centred on the training mean and
    divided by one global scale (the RMS of the centred entries, so ``l2`` means the
    same at every layer and directions are unchanged), solved with optax L-BFGS in the
    span of the training rows (exact by the representer theorem), preconditioned by the
    Hessian at zero, until the gradient norm in those coordinates is below ``tol`` or
    after ``steps`` iterations. ``"mean_diff"``: the
    difference of the class means (no fitting). Each run holds out a fresh stratified
    ``holdout`` fraction of both sides to measure accuracy (with ``holdout=0`` the
    accuracy is on the training rows).

    Args:
        concept_acts: (n_c, D) activations of the concept's examples.
        random_acts: (R, n_r, D) activations of R random sets.
        method: "logistic" or "mean_diff".
        l2: L2 penalty of the logistic regression.
        steps: maximum L-BFGS iterations.
        tol: gradient-norm tolerance of L-BFGS.
        holdout: fraction of each side held out, in [0, 1).
        seed: seed of the held-out splits.

    Returns:
        Cavs with vectors (R, D) float32 unit normals pointing towards the concept and
        accuracies (R,) float32.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> cavs = train_cavs(rng.normal(size=(20, 8)) + 2, rng.normal(size=(5, 20, 8)))
        >>> cavs.vectors.shape, cavs.accuracies.shape
        ((5, 8), (5,))
    """
    concept_acts = np.asarray(concept_acts, np.float32)
    random_acts = np.asarray(random_acts, np.float32)
    if concept_acts.ndim != 2:
        raise ValueError(f"concept_acts: expected shape (n_c, D), got {concept_acts.shape}")
    if random_acts.ndim != 3 or random_acts.shape[2] != concept_acts.shape[1]:
        raise ValueError(
            f"random_acts: expected shape (R, n_r, {concept_acts.shape[1]}), "
            f"got {random_acts.shape}"
        )
    runs, n_r, dim = random_acts.shape
    n_c = concept_acts.shape[0]
    _check_cav_options(method, l2, steps, holdout, n_c, n_r)
    if runs < 1:
        raise ValueError("random_acts: expected at least one random set, got 0")
    acts = np.concatenate([concept_acts, random_acts.reshape(runs * n_r, dim)])
    pos_idx = np.broadcast_to(np.arange(n_c), (runs, n_c))
    neg_idx = n_c + np.arange(runs * n_r).reshape(runs, n_r)
    return _cavs_from_indices(
        acts, pos_idx, neg_idx, method=method, l2=l2, steps=steps, tol=tol,
        holdout=holdout, seed=seed,
    )


# ------------------------------------------------------------- sensitivities and scores


def sensitivities(grads: np.ndarray, cavs: np.ndarray) -> np.ndarray:
    """Directional derivatives of each input's logit along each CAV.

    Args:
        grads: (n, D) gradients of a class logit with respect to the layer activations
            (flattened channel-major), one row per input.
        cavs: (R, D) CAVs.

    Returns:
        (n, R) float32 ``grads @ cavs.T``, at full float32 precision on every backend.

    Example:
        >>> sensitivities(np.eye(2), np.array([[1., 0.]])).ravel().tolist()
        [1.0, 0.0]
    """
    sens = jnp.matmul(
        jnp.asarray(grads, jnp.float32), jnp.asarray(cavs, jnp.float32).T,
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(sens)


@jax.jit
@probe.full_precision
def _class_scores(grads, cavs, onehot):
    """TCAV scores and magnitude scores of every CAV for every class at once."""
    sens = grads @ cavs.T
    counts = jnp.maximum(onehot.sum(0), 1.0)[:, None]
    scores = onehot.T @ (sens > 0).astype(sens.dtype) / counts
    positive = onehot.T @ jnp.maximum(sens, 0.0)
    total = onehot.T @ jnp.abs(sens)
    magnitudes = jnp.where(total > 0, positive / jnp.where(total > 0, total, 1.0), 0.0)
    return scores, magnitudes


def tcav_scores(
    grads: np.ndarray, cavs: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """TCAV scores of every CAV for every class from per-input gradients.

    ``scores[k, r]`` is the fraction of inputs of class k whose logit-k sensitivity along
    CAV r is positive (TCAV_Q). ``magnitudes[k, r]`` is Kim et al.'s magnitude variant:
    the sum of the positive sensitivities over the sum of their absolute values (0 when
    every sensitivity is 0).

    Args:
        grads: (n, D) gradient of each input's own class logit w.r.t. the layer.
        cavs: (R, D) CAVs.
        labels: (n,) int class position of each input in [0, num_classes).
        num_classes: number of classes.

    Returns:
        (scores, magnitudes), each (num_classes, R) float32.

    Example:
        >>> s, m = tcav_scores(np.array([[1.], [-1.]]), np.array([[1.]]), np.array([0, 1]), 2)
        >>> s.ravel().tolist(), m.ravel().tolist()
        ([1.0, 0.0], [1.0, 0.0])
    """
    onehot = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)
    scores, magnitudes = _class_scores(
        jnp.asarray(grads, jnp.float32), jnp.asarray(cavs, jnp.float32), onehot
    )
    return np.asarray(scores), np.asarray(magnitudes)


# ------------------------------------------------------------------------ significance


def adjust_pvalues(p_values: np.ndarray, method: str = "bh") -> np.ndarray:
    """Multiple-testing correction over all entries of ``p_values``.

    ``"bonferroni"``: ``min(1, m p)``. ``"bh"``: Benjamini-Hochberg step-up,
    ``p_(i) m / i`` made monotone from the largest p down and capped at 1.
    NaN p-values (untestable cells) count as 1.

    Args:
        p_values: array of any shape of raw p-values in [0, 1].
        method: "bh" or "bonferroni".

    Returns:
        float64 array of the same shape.

    Example:
        >>> adjust_pvalues(np.array([0.01, 0.04, 0.03]), "bh").round(3).tolist()
        [0.03, 0.04, 0.04]
    """
    if method not in CORRECTIONS:
        raise ValueError(f"method: expected a correction in {CORRECTIONS}, got {method!r}")
    p = np.nan_to_num(np.asarray(p_values, np.float64), nan=1.0)
    flat = p.ravel()
    m = flat.size
    if method == "bonferroni":
        return np.minimum(1.0, flat * m).reshape(p.shape)
    order = np.argsort(flat, kind="stable")
    ranked = flat[order] * m / np.arange(1, m + 1)
    ranked = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    adjusted = np.empty_like(flat)
    adjusted[order] = ranked
    return adjusted.reshape(p.shape)


def welch_pvalues(concept_scores: np.ndarray, random_scores: np.ndarray) -> np.ndarray:
    """Two-sided Welch t-test p-values along the last axis (runs).

    Cells where both samples are constant and equal are untestable: p = 1.

    Args:
        concept_scores: (..., R) TCAV scores of the concept's CAVs.
        random_scores: (..., R') TCAV scores of random-vs-random CAVs.

    Returns:
        (...) float64 p-values.

    Example:
        >>> welch_pvalues(np.array([0.9, 1.0, 0.95]), np.array([0.4, 0.6, 0.5])) < 0.01
        True
    """
    from scipy import stats

    # Constant samples (e.g. every CAV scoring 1) are expected, not a precision problem.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(concept_scores, random_scores, axis=-1, equal_var=False)
    return np.nan_to_num(np.asarray(result.pvalue, np.float64), nan=1.0)


# ------------------------------------------------------------------ concept sets


def concepts_from_factors(
    res_or_F: Any, images: np.ndarray, top: int = 50, names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The top-``top`` images of each concept (row of F) as concept image sets.

    Args:
        res_or_F: a FitResult (its ``F``) or an array (rank, N).
        images: (N, H, W, C) the probe images F's columns refer to.
        top: images per concept.
        names: concept names (default "concept0", "concept1", ...).

    Returns:
        dict name -> (top, H, W, C) images, strongest first, in row order of F.

    Example:
        >>> concepts = concepts_from_factors(res, probe_images, top=50)
        >>> {k: v.shape for k, v in concepts.items()}["concept0"]
        (50, 32, 32, 3)
    """
    F = np.asarray(getattr(res_or_F, "F", res_or_F))
    images = np.asarray(images)
    if F.ndim != 2:
        raise ValueError(f"F: expected shape (rank, N), got {F.shape}")
    if images.ndim != 4 or images.shape[0] != F.shape[1]:
        raise ValueError(
            f"images: expected shape ({F.shape[1]}, H, W, C) matching F's columns, "
            f"got {images.shape}"
        )
    if not 1 <= top <= F.shape[1]:
        raise ValueError(f"top: expected an int in [1, {F.shape[1]}], got {top!r}")
    names = [f"concept{i}" for i in range(F.shape[0])] if names is None else list(names)
    if len(names) != F.shape[0] or len(set(names)) != len(names):
        raise ValueError(f"names: expected {F.shape[0]} distinct names, got {names!r}")
    order = np.argsort(-F, axis=1, kind="stable")[:, :top]
    return {name: images[idx] for name, idx in zip(names, order)}


def _image_keys(images: np.ndarray) -> np.ndarray:
    """A content hash per image (of its [0, 1] float pixels, so uint8 and float copies
    of an image match), to find a concept's images inside the pool."""
    return np.array(
        [hashlib.blake2b(probe.float_pixels(im).tobytes(), digest_size=16).digest() for im in images]
    )


def _draw_random_sets(eligible, n_anchor, n_neg, runs, rng, concept):
    """(runs, n_anchor) anchors and (runs, n_neg) negatives, disjoint within a run."""
    need = n_anchor + n_neg
    if eligible.size < need:
        raise ValueError(
            f"pool: concept {concept!r} needs {n_anchor} + {n_neg} distinct random images "
            f"per run (a random anchor set and a random set), got {eligible.size} pool "
            "images outside the concept; pass a larger pool or a smaller random_size"
        )
    order = np.argsort(rng.random((runs, eligible.size)), axis=1)[:, :need]
    picked = eligible[order]
    return picked[:, :n_anchor], picked[:, n_anchor:]


# ------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True)
class TcavResult:
    """TCAV scores over a (layer, concept, class) grid with their significance.

    Attributes:
        layers, concepts, classes: names along the grid's axes.
        scores: (L, C, K, R) float32 TCAV scores of the concept's R CAVs.
        random_scores: (L, C, K, R) float32 scores of the R random-vs-random CAVs.
        magnitudes, random_magnitudes: (L, C, K, R) float32 magnitude-variant scores.
        cav_accuracies, random_cav_accuracies: (L, C, R) float32 held-out accuracies.
        p_values: (L, C, K) float64 raw two-sided Welch t-test p-values.
        adjusted: (L, C, K) float64 p-values corrected across the whole grid.
        significant: (L, C, K) bool, ``adjusted <= alpha``.
        correction: "bh" or "bonferroni"; alpha: the level.
        timings: seconds per stage; config: settings used (JSON-serialisable).
        constant_gradient: (L, K) bool, the class's logit gradient at the layer is the
            same for all its inputs, so its scores are 0 or 1 (see ``run``); None for
            results saved before the flag existed.
    """

    layers: tuple[str, ...]
    concepts: tuple[str, ...]
    classes: tuple[str, ...]
    scores: np.ndarray
    random_scores: np.ndarray
    magnitudes: np.ndarray
    random_magnitudes: np.ndarray
    cav_accuracies: np.ndarray
    random_cav_accuracies: np.ndarray
    p_values: np.ndarray
    adjusted: np.ndarray
    significant: np.ndarray
    correction: str
    alpha: float
    timings: dict
    config: dict
    constant_gradient: np.ndarray | None = None

    def table(self) -> list[dict]:
        """One row per (layer, concept, class): scores, p-values, significance.

        Returns:
            list of dicts with keys layer, concept, class, mean_score, std_score,
            random_mean, magnitude, cav_accuracy, p_value, p_adjusted, significant,
            constant_gradient (False when the result has no flags).
        """
        constant = (np.zeros(self.significant.shape[::2], bool)
                    if self.constant_gradient is None else self.constant_gradient)
        rows = []
        for li, layer in enumerate(self.layers):
            for ci, concept in enumerate(self.concepts):
                for ki, cls in enumerate(self.classes):
                    rows.append(
                        {
                            "layer": layer,
                            "concept": concept,
                            "class": cls,
                            "mean_score": float(self.scores[li, ci, ki].mean()),
                            "std_score": float(self.scores[li, ci, ki].std()),
                            "random_mean": float(self.random_scores[li, ci, ki].mean()),
                            "magnitude": float(self.magnitudes[li, ci, ki].mean()),
                            "cav_accuracy": float(self.cav_accuracies[li, ci].mean()),
                            "p_value": float(self.p_values[li, ci, ki]),
                            "p_adjusted": float(self.adjusted[li, ci, ki]),
                            "significant": bool(self.significant[li, ci, ki]),
                            "constant_gradient": bool(constant[li, ki]),
                        }
                    )
        return rows

    def to_csv(self, path) -> None:
        """Write ``table()`` as CSV with a header row."""
        rows = self.table()
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def heatmap_matrix(self, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean TCAV score and significance mask of one layer (default: the first).

        Returns:
            (means (C, K) float64, significant (C, K) bool), concepts x classes.
        """
        layer = self.layers[0] if layer is None else layer
        if layer not in self.layers:
            raise ValueError(f"layer: expected one of {self.layers}, got {layer!r}")
        li = self.layers.index(layer)
        return self.scores[li].mean(-1).astype(np.float64), self.significant[li].copy()


# ---------------------------------------------------------------------------- run


def constant_gradients(
    grads: np.ndarray, labels: np.ndarray, num_classes: int, rtol: float = _CONSTANT_RTOL
) -> np.ndarray:
    """Which classes have the same logit gradient for all of their inputs.

    A class counts when it has at least two inputs and every gradient entry varies across
    them by at most ``rtol`` times the largest absolute entry of the class (all-zero
    gradients count too). It happens when the network is linear from the layer to the
    logits (a global average pool then a dense layer, or a vector layer before the
    classifier): every sensitivity of the class along a CAV then has the same sign, so
    its TCAV scores are exactly 0 or 1.

    Args:
        grads: (n, D) gradient of each input's own class logit w.r.t. the layer.
        labels: (n,) int class position of each input in [0, num_classes).
        num_classes: number of classes.
        rtol: relative tolerance.

    Returns:
        (num_classes,) bool.

    Example:
        >>> constant_gradients(np.array([[1., 2.], [1., 2.], [0., 1.], [1., 1.]]),
        ...                    np.array([0, 0, 1, 1]), 2).tolist()
        [True, False]
    """
    grads = np.asarray(grads)
    labels = np.asarray(labels)
    flags = np.zeros(num_classes, bool)
    for k in range(num_classes):
        members = grads[labels == k]
        if members.shape[0] < 2:
            continue
        spread = float(np.max(members.max(0) - members.min(0), initial=0.0))
        flags[k] = spread <= rtol * float(np.max(np.abs(members), initial=0.0))
    return flags


def _warn_constant(layer: str, classes: Sequence[str], flags: np.ndarray) -> None:
    which = "every class" if flags.all() else "classes " + ", ".join(
        name for name, flag in zip(classes, flags) if flag)
    warnings.warn(
        f"TCAV at layer {layer!r}: the class-logit gradient is the same for every input of "
        f"{which}, so the network is linear from this layer to those logits (e.g. a global "
        "average pool then a dense layer). Every input of such a class has the same sign "
        "of sensitivity along a CAV and its TCAV scores are exactly 0 or 1, however the "
        "concept relates to the images; pick an earlier layer, with a non-linearity "
        "between it and the logits.",
        TcavWarning,
        # Up through _constant_per_layer and run to run's caller.
        stacklevel=4,
    )


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[tcav] {message}", file=sys.stderr, flush=True)


def _check_images(name: str, images: Any, image_shape: tuple | None) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name}: expected images (n, H, W, C), got shape {images.shape}")
    if image_shape is not None and images.shape[1:] != image_shape:
        raise ValueError(f"{name}: expected images of shape {image_shape}, got {images.shape[1:]}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"{name}: expected uint8 or float images, got {images.dtype}")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{name}: expected float pixels in [0, 1], got "
                             f"[{images.min():.3g}, {images.max():.3g}]")
    return images


def run(
    model: nn.Module,
    variables: Any,
    layer: str | Sequence[str],
    concepts: Mapping[str, np.ndarray],
    classes: Mapping[Any, np.ndarray],
    *,
    class_names: Sequence[str] | None = None,
    random_runs: int = 100,
    random_size: int | None = None,
    pool: np.ndarray | None = None,
    seed: int = 0,
    cav_method: str = "logistic",
    l2: float = 0.01,
    cav_steps: int = 500,
    holdout: float = 0.2,
    correction: str = "bh",
    alpha: float = 0.05,
    batch_size: int = 256,
    progress: bool = True,
) -> TcavResult:
    """TCAV scores and their significance for every (layer, concept, class).

    For each concept, ``random_runs`` pairs of disjoint random sets are drawn (seeded)
    from ``pool`` minus the concept's own images (matched by content): run r trains the
    concept-vs-random CAV (concept vs set r) and a random-vs-random CAV (a random anchor
    of the concept's size vs set r). Class-k inputs are scored with the gradient of logit
    k, computed once per input for all layers. Each cell's R concept scores are tested
    against its R random scores (two-sided Welch t-test) and the p-values corrected over
    the whole grid; a cell is significant when its corrected p-value is <= ``alpha``.

    A concept set is fixed while the random-vs-random anchors are fresh in every run, so a
    set of random images whose mean happens to lie slightly along a class's gradient is
    a real, small effect that many runs can declare significant (a property of Kim et
    al.'s test, not of this implementation): read significance together with the mean
    score's distance from the random mean (``table()`` reports both).

    Every matmul and convolution runs at full float32 precision, whatever the backend's
    default (see the module docstring): scores are signs of small numbers.

    Layers that feed a linear head give 0/1 scores. When the network is linear from a
    layer to the logits (SmallCNN's ``conv3`` or ``pool``, ResNet-18's ``conv5_x`` or
    ``avgpool``: a global average pool, then the dense classifier), a class logit's
    gradient with respect to that layer is the same for every input, so every input of
    the class has the same sign of sensitivity along a CAV and each score is exactly 0
    or 1: it says on which side of the class's one gradient the CAV lies, not how many
    images the concept moves. ``run`` detects this per (layer, class) (see
    ``constant_gradients``), issues a ``TcavWarning`` naming the layer, and records it
    in ``constant_gradient`` and in ``table()``'s rows. Test such networks at an earlier
    layer, with a non-linearity (ReLU, max-pool) between it and the logits.

    Args:
        model: a Flax Linen module (run as ``model.apply(variables, x, train=False)``),
            a Flax NNX module or ``probe.from_function(...)``; see
            :mod:`jaxcnmf.nets.adapters`.
        variables: a Linen module's variables; ``None`` for NNX modules and functions.
        layer: a layer path (see ``probe.available_layers``) or a list of them.
        concepts: dict concept name -> (n_c, H, W, C) images (uint8 or float in [0, 1]).
        classes: dict class -> (n_k, H, W, C) images of that class. Keys are logit
            indices (int) or names found in ``class_names``.
        class_names: the model's class names in logit order (needed for str keys).
        random_runs: R >= 2 random runs per concept.
        random_size: images per random set (default: the concept's size).
        pool: (M, H, W, C) images random sets are drawn from (default: the union of
            the class images).
        seed: seed of the random sets and held-out splits.
        cav_method: "logistic" or "mean_diff" (see ``train_cavs``).
        l2, cav_steps, holdout: logistic CAV options (see ``train_cavs``).
        correction: "bh" (Benjamini-Hochberg) or "bonferroni".
        alpha: significance level after correction.
        batch_size: images per forward/backward pass.
        progress: log each stage with its time to stderr.

    Returns:
        TcavResult with scores (L, C, K, R), p-values and significance (L, C, K), and
        constant_gradient (L, K).

    Warns:
        TcavWarning: a layer where some class's logit gradients are identical across
            its inputs, so that class's scores are all 0 or 1.

    Example:
        >>> result = run(model, variables, ["conv1", "conv2"], {"stripes": striped},
        ...              {0: airplanes, 1: cars}, random_runs=20, pool=probe_images)
        >>> result.heatmap_matrix("conv2")[0].shape
        (1, 2)
    """
    t_start = time.perf_counter()
    layers = _check_options(layer, concepts, classes, random_runs, correction, alpha,
                            batch_size)
    grid = _check_inputs(model, variables, layers, concepts, classes, class_names, pool)
    for images in grid.concept_images.values():
        n_r = images.shape[0] if random_size is None else int(random_size)
        _check_cav_options(cav_method, l2, cav_steps, holdout, images.shape[0], n_r)
    random = _draw_random(grid, random_size, int(random_runs), seed)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    acts = _activations_per_layer(model, variables, grid, random, batch_size, progress)
    timings["activations"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels, grads = _gradients_per_layer(model, variables, grid, batch_size, progress)
    timings["gradients"] = time.perf_counter() - t0
    constant = _constant_per_layer(grid, labels, grads)

    cav_options = {"method": cav_method, "l2": l2, "steps": cav_steps, "holdout": holdout}
    out, timings["cavs"], timings["scores"] = _score_grid(
        grid, random, acts, grads, labels, cav_options, seed, progress)

    t0 = time.perf_counter()
    p_values, adjusted = _statistics(out, correction)
    timings["tests"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    _log(progress, f"done in {timings['total']:.2f}s; "
         f"{int((adjusted <= alpha).sum())}/{adjusted.size} cells significant")
    config = {
        "random_runs": int(random_runs), "random_size": random_size, "seed": seed,
        "cav_method": cav_method, "l2": l2, "cav_steps": cav_steps, "holdout": holdout,
        "correction": correction, "alpha": alpha, "class_logits": grid.class_ids,
    }
    return TcavResult(
        layers=layers, concepts=grid.concept_names, classes=tuple(grid.class_keys),
        p_values=p_values, adjusted=adjusted, significant=adjusted <= alpha,
        correction=correction, alpha=alpha, timings=timings, config=config,
        constant_gradient=constant, **out,
    )


# Each step of ``run``, in the order it takes them.


class _Grid(NamedTuple):
    """``run``'s checked inputs: the layers, the classes and concepts, the random pool."""

    layers: tuple[str, ...]
    class_keys: list[str]  # the classes' names as the result shows them
    class_ids: list[int]  # logit index of each class
    class_images: list[np.ndarray]  # (n_k, H, W, C) each
    concept_names: tuple[str, ...]
    concept_images: dict[str, np.ndarray]  # name -> (n_c, H, W, C)
    pool: np.ndarray  # (M, H, W, C) images the random sets are drawn from


class _RandomSets(NamedTuple):
    """Each concept's random sets, as rows of the pool and of its activations."""

    draws: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> anchors, negatives (runs, n)
    used: np.ndarray  # (U,) the pool rows any set uses, sorted
    remap: np.ndarray  # (M,) pool row -> row of the activations (-1: unused)

    @property
    def runs(self) -> int:
        return next(iter(self.draws.values()))[0].shape[0]


def _check_options(layer, concepts, classes, random_runs, correction, alpha, batch_size
                   ) -> tuple[str, ...]:
    """The checks that need neither the network nor the images; returns the layers."""
    layers = (layer,) if isinstance(layer, str) else tuple(layer)
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layer: expected a name or a list of distinct names, got {layer!r}")
    if not isinstance(concepts, Mapping) or not concepts:
        raise ValueError("concepts: expected a non-empty dict name -> images")
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError("classes: expected a non-empty dict class -> images")
    if int(random_runs) != random_runs or random_runs < 2:
        raise ValueError(f"random_runs: expected an int >= 2, got {random_runs!r}")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a level in (0, 1), got {alpha!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    return layers


def _check_inputs(model, variables, layers, concepts, classes, class_names, pool) -> _Grid:
    """Layers against the network, class keys against its logits, every image set."""
    first = _check_images("classes", next(iter(classes.values())), None)
    image_shape = first.shape[1:]
    shapes = probe.network_shapes(model, variables, image_shape)
    for name in layers:
        if name not in shapes.layers:
            raise ValueError(
                f"layer: expected one of the model's layers {tuple(shapes.layers)}, "
                f"got {name!r}"
            )
    num_logits = int(np.prod(shapes.logits))
    class_keys, class_ids, class_images = [], [], []
    for key, images in classes.items():
        class_ids.append(_logit_index(key, class_names, num_logits))
        images = _check_images(f"classes[{key!r}]", images, image_shape)
        if images.shape[0] < 1:
            raise ValueError(f"classes[{key!r}]: expected at least 1 image, got 0")
        class_keys.append(str(key))
        class_images.append(images)

    concept_images = {
        name: _check_images(f"concepts[{name!r}]", images, image_shape)
        for name, images in concepts.items()
    }
    if pool is None:
        same_dtype = len({images.dtype for images in class_images}) == 1
        pool = np.concatenate(
            class_images if same_dtype else [probe.float_pixels(im) for im in class_images]
        )
    else:
        pool = _check_images("pool", pool, image_shape)
    return _Grid(layers, class_keys, class_ids, class_images, tuple(concepts),
                 concept_images, pool)


def _logit_index(key, class_names, num_logits: int) -> int:
    """The logit of a ``classes`` key: an int index, or a name found in ``class_names``."""
    if isinstance(key, (int, np.integer)):
        index = int(key)
    elif class_names is not None and key in tuple(class_names):
        index = tuple(class_names).index(key)
    else:
        known = "no class_names given" if class_names is None else tuple(class_names)
        raise ValueError(
            f"classes: expected int logit indices or names in class_names ({known}), "
            f"got {key!r}"
        )
    if not 0 <= index < num_logits:
        raise ValueError(f"classes: expected logit indices in [0, {num_logits}), got {key!r}")
    return index


def _draw_random(grid: _Grid, random_size, runs: int, seed: int) -> _RandomSets:
    """Random sets: indices into the pool, disjoint from each concept's own images."""
    rng = np.random.default_rng(seed)
    pool_keys = _image_keys(grid.pool)
    draws = {}
    for name in grid.concept_names:
        images = grid.concept_images[name]
        inside = np.isin(pool_keys, _image_keys(images))
        n_r = images.shape[0] if random_size is None else int(random_size)
        draws[name] = _draw_random_sets(
            np.flatnonzero(~inside), images.shape[0], n_r, runs, rng, name
        )
    used = np.unique(np.concatenate([a.ravel() for pair in draws.values() for a in pair]))
    remap = np.full(grid.pool.shape[0], -1, np.int64)
    remap[used] = np.arange(used.size)
    return _RandomSets(draws, used, remap)


def _activations_per_layer(model, variables, grid: _Grid, random: _RandomSets, batch_size,
                           progress) -> dict[str, np.ndarray]:
    """Activations of the random sets' images, then of each concept's, at every layer:
    layer -> (U + sum n_c, D), the rows ``_score_grid`` indexes."""
    _log(progress, f"activations of {random.used.size} random and "
         f"{sum(len(v) for v in grid.concept_images.values())} concept images at "
         f"{grid.layers}")
    stacked = np.concatenate(
        [probe.float_pixels(grid.pool[random.used])]
        + [probe.float_pixels(grid.concept_images[n]) for n in grid.concept_names]
    )
    return probe.layer_activations(model, variables, stacked, grid.layers, batch_size)


def _gradients_per_layer(model, variables, grid: _Grid, batch_size, progress
                         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each class input's class position (n,) and the gradient of its own class logit,
    layer -> (n, D), for every layer in one backward pass."""
    labels = np.concatenate([np.full(len(im), i) for i, im in enumerate(grid.class_images)])
    logit_ids = np.asarray(grid.class_ids)[labels]
    inputs = np.concatenate([probe.float_pixels(im) for im in grid.class_images])
    _log(progress, f"gradients of {inputs.shape[0]} class inputs ({len(grid.class_ids)} "
         "classes)")
    grads = probe.layer_gradients(model, variables, inputs, logit_ids, grid.layers, batch_size)
    return labels, grads


def _constant_per_layer(grid: _Grid, labels, grads) -> np.ndarray:
    """(L, K) ``constant_gradients`` flags; warns once for every layer with any."""
    constant = np.stack([
        constant_gradients(grads[name], labels, len(grid.class_ids)) for name in grid.layers
    ])
    for name, flags in zip(grid.layers, constant):
        if flags.any():
            _warn_constant(name, grid.class_keys, flags)
    return constant


def _score_grid(grid: _Grid, random: _RandomSets, acts, grads, labels, cav_options, seed,
                progress) -> tuple[dict[str, np.ndarray], float, float]:
    """CAVs of every (concept, layer) and their scores for every class.

    Returns the arrays of ``TcavResult`` (scores, random_scores, magnitudes,
    random_magnitudes (L, C, K, R); cav_accuracies, random_cav_accuracies (L, C, R)) and
    the seconds spent training CAVs and scoring them.
    """
    runs = random.runs
    n_l, n_c, n_k = len(grid.layers), len(grid.concept_names), len(grid.class_ids)
    out = {key: np.zeros((n_l, n_c, n_k, runs), np.float32)
           for key in ("scores", "random_scores", "magnitudes", "random_magnitudes")}
    out["cav_accuracies"] = np.zeros((n_l, n_c, runs), np.float32)
    out["random_cav_accuracies"] = np.zeros((n_l, n_c, runs), np.float32)
    onehot = jax.nn.one_hot(jnp.asarray(labels), n_k, dtype=jnp.float32)
    # On the device once per layer, not once per concept.
    device_grads = {lname: jnp.asarray(grads[lname]) for lname in grid.layers}
    cav_seconds = score_seconds = 0.0
    for ci, (name, (pos_idx, neg_idx)) in enumerate(_cav_rows(grid, random, runs)):
        for li, lname in enumerate(grid.layers):
            t0 = time.perf_counter()
            _log(progress, f"{2 * runs} CAVs ({cav_options['method']}) for {name!r} at "
                 f"{lname!r}")
            cavs = _cavs_from_indices(acts[lname], pos_idx, neg_idx, tol=1e-5,
                                      seed=seed + 1 + ci, **cav_options)
            cav_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            scores, magnitudes = _class_scores(
                device_grads[lname], jnp.asarray(cavs.vectors), onehot
            )
            scores, magnitudes = np.asarray(scores), np.asarray(magnitudes)
            # The first R CAVs are the concept's, the last R the random-vs-random ones.
            out["scores"][li, ci] = scores[:, :runs]
            out["random_scores"][li, ci] = scores[:, runs:]
            out["magnitudes"][li, ci] = magnitudes[:, :runs]
            out["random_magnitudes"][li, ci] = magnitudes[:, runs:]
            out["cav_accuracies"][li, ci] = cavs.accuracies[:runs]
            out["random_cav_accuracies"][li, ci] = cavs.accuracies[runs:]
            score_seconds += time.perf_counter() - t0
    return out, cav_seconds, score_seconds


def _cav_rows(grid: _Grid, random: _RandomSets, runs: int):
    """For each concept, its name and the activation rows of its 2R CAVs' two sides:
    (2R, n_c) positives (the concept R times, then R random anchors) and (2R, n_r)
    negatives (the R random sets, twice)."""
    offset = random.used.size
    for name in grid.concept_names:
        n_pos = grid.concept_images[name].shape[0]
        own = np.arange(offset, offset + n_pos)
        offset += n_pos
        anchors, negatives = random.draws[name]
        pos_idx = np.concatenate([np.broadcast_to(own, (runs, n_pos)), random.remap[anchors]])
        neg_idx = np.concatenate([random.remap[negatives], random.remap[negatives]])
        yield name, (pos_idx, neg_idx)


def _statistics(out: dict[str, np.ndarray], correction: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw and corrected p-values (L, C, K) of concept against random scores."""
    p_values = welch_pvalues(out["scores"], out["random_scores"])
    return p_values, adjust_pvalues(p_values, correction)


# -------------------------------------------------------------------------- figure


def figure(result: TcavResult, layer: str | None = None, path=None, ax=None):
    """Concept x class heatmap of mean TCAV scores; non-significant cells hatched grey.

    Args:
        result: a TcavResult.
        layer: which layer (default: the first).
        path: if given, save the figure there.
        ax: an existing matplotlib Axes to draw on.

    Returns:
        the matplotlib Figure.

    Example:
        >>> figure(result, layer="conv2", path="tcav_conv2.png")
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    means, significant = result.heatmap_matrix(layer)
    n_c, n_k = means.shape
    layer = layer or result.layers[0]
    title = f"TCAV scores at {layer}\n(hatched: not significant)"
    if ax is None:
        # Wide enough for the concept names, the grid and the colour bar, and for the
        # title's longer line (about 0.08 inch per tick-label character, 0.1 per title
        # character at matplotlib's default sizes).
        names = max(len(str(name)) for name in result.concepts)
        chars = max(len(line) for line in title.splitlines())
        width = max(1.6 + 0.08 * names + 0.6 * n_k, 1.0 + 0.1 * chars)
        # A bare Figure (no pyplot) draws with Agg and leaves the user's backend alone.
        fig = Figure(figsize=(width, 1.4 + 0.45 * n_c))
        ax = fig.subplots()
    else:
        fig = ax.figure
    image = ax.imshow(np.where(significant, means, np.nan), cmap="viridis", vmin=0, vmax=1)
    for ci in range(n_c):
        for ki in range(n_k):
            if not significant[ci, ki]:
                ax.add_patch(Rectangle(
                    (ki - 0.5, ci - 0.5), 1, 1, facecolor="0.85", edgecolor="0.6",
                    hatch="//", linewidth=0))
            ax.text(ki, ci, f"{means[ci, ki]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if significant[ci, ki] and means[ci, ki] < 0.6 else "black")
    ax.set_xticks(range(n_k), result.classes, rotation=45, ha="right")
    ax.set_yticks(range(n_c), result.concepts)
    ax.set_xlabel("class")
    ax.set_ylabel("concept")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig
