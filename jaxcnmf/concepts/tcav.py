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
results do not depend on the backend's default. Activations, gradients, CAV fits and
sensitivities are traced under ``jax.default_matmul_precision("float32")``, so every
float32 matmul and convolution runs in full float32 even where the backend would
otherwise use TF32 or bfloat16 passes (NVIDIA GPUs, TPUs); the sign of a sensitivity
near zero then no longer depends on the backend or on how the inputs were batched.

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
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def _full_precision(fn):
    """``fn`` traced (or run eagerly) with full-precision float32 matmuls and convolutions.

    The precision is fixed inside the traced function, not by the caller, so a jitted
    ``fn`` compiles to the same program whatever context it is called from.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("float32"):
            return fn(*args, **kwargs)

    return wrapped


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
@_full_precision
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
@_full_precision
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


# ----------------------------------------------------------------- layer capture


def _to_float(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def _flatten(act: jax.Array) -> jax.Array:
    """Channel-major flattening of (B, H, W, C) (or (B, C)) to (B, D)."""
    return jnp.moveaxis(act, -1, 1).reshape(act.shape[0], -1)


def _forward(model, variables, x, layers, deltas=None):
    """Logits, with the outputs of direct children ``layers`` captured (and shifted)."""
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        scope = context.module.scope
        name = context.module.name
        if (
            context.method_name == "__call__"
            and scope is not None
            and len(scope.path) == 1
            and name in layers
            and name not in captured
        ):
            captured[name] = out
            if deltas is not None:
                out = out + deltas[name]
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return logits, captured


def _shapes(model, variables, image_shape) -> tuple[dict[str, tuple], int]:
    """Per-image output shapes of the direct children, and the number of logits."""
    shapes: dict[str, tuple] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        scope = context.module.scope
        if (
            context.method_name == "__call__"
            and scope is not None
            and len(scope.path) == 1
            and hasattr(out, "shape")
        ):
            shapes.setdefault(context.module.name, tuple(out.shape[1:]))
        return out

    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return shapes, int(np.prod(logits.shape[1:]))


def layer_shapes(model: nn.Module, variables: Any, image_shape: Sequence[int]) -> dict[str, tuple]:
    """Per-image output shapes of the model's direct children, in call order.

    Args:
        model: flax linen module, ``model.apply(variables, x, train=False)`` -> logits.
        variables: its variables.
        image_shape: (H, W, C) of one image.

    Returns:
        dict layer name -> per-image shape tuple.

    Example:
        >>> layer_shapes(models.small_cnn(10), variables, (32, 32, 3))["conv3"]
        (4, 4, 128)
    """
    return _shapes(model, variables, image_shape)[0]


@_full_precision
def _activations(model, variables, x, *, layers):
    _, captured = _forward(model, variables, x, layers)
    return tuple(_flatten(captured[name]) for name in layers)


@_full_precision
def _gradients(model, variables, x, labels, *, layers):
    """Gradient of each input's own class logit w.r.t. every layer: one backward pass.

    In eval mode inputs do not interact, so the gradient of the batch sum of the chosen
    logits with respect to a per-input shift of the layer output is, row by row, the
    gradient of that input's logit.
    """
    _, captured = jax.eval_shape(lambda: _forward(model, variables, x, layers))
    zeros = {name: jnp.zeros(captured[name].shape, captured[name].dtype) for name in layers}

    def picked(deltas):
        logits, _ = _forward(model, variables, x, layers, deltas)
        return jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1))

    grads = jax.grad(picked)(zeros)
    return tuple(_flatten(grads[name]) for name in layers)


def _build(fn, model, layers):
    return jax.jit(functools.partial(fn, model, layers=layers))


@functools.lru_cache(maxsize=32)
def _cached(fn, model, layers):
    return _build(fn, model, layers)


def _compiled(fn, model, layers):
    """A jitted ``fn`` bound to the model, reused across calls when the model hashes."""
    try:
        return _cached(fn, model, layers)
    except TypeError:
        return _build(fn, model, layers)


def _batched(fn, images: np.ndarray, batch_size: int, extra: np.ndarray | None = None):
    """Run ``fn`` over fixed-size padded batches (one compilation) and concatenate.

    A batch's outputs are copied to the host only after the next batch is dispatched, so
    the device computes while the host prepares and copies.
    """
    n = images.shape[0]
    size = min(batch_size, n)
    outs, pending = [], None
    for start in range(0, n, size):
        chunk = _to_float(images[start : start + size])
        pad = size - chunk.shape[0]
        args = [np.pad(chunk, [(0, pad)] + [(0, 0)] * (chunk.ndim - 1))]
        if extra is not None:
            args.append(np.pad(extra[start : start + size], (0, pad)))
        result = fn(*args)
        if pending is not None:
            outs.append([np.asarray(o)[: pending[1]] for o in pending[0]])
        pending = (result, size - pad)
    outs.append([np.asarray(o)[: pending[1]] for o in pending[0]])
    return [np.concatenate(parts) for parts in zip(*outs)]


def layer_activations(
    model: nn.Module, variables: Any, images: np.ndarray, layers: Sequence[str],
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Flattened (channel-major) activations of ``layers`` for ``images``.

    Args:
        model: flax linen module with the layers as direct named children.
        variables: its variables.
        images: (N, H, W, C) uint8 or float32 in [0, 1].
        layers: layer names.
        batch_size: images per forward pass.

    Returns:
        dict layer -> (N, D) float32, row order ``c*H*W + h*W + w``; computed at full
        float32 precision on every backend (see the module docstring).

    Example:
        >>> acts = layer_activations(model, variables, images, ["conv3", "pool"])
        >>> acts["conv3"].shape              # small CNN, width 1: (N, 128 * 4 * 4)
        (100, 2048)
    """
    layers = tuple(layers)
    fn = functools.partial(_compiled(_activations, model, layers), variables)
    return dict(zip(layers, _batched(fn, images, batch_size)))


def layer_gradients(
    model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
    layers: Sequence[str], batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Gradient of each image's logit ``labels[i]`` w.r.t. the flattened layers.

    Args:
        model: flax linen module with the layers as direct named children.
        variables: its variables.
        images: (N, H, W, C) uint8 or float32 in [0, 1].
        labels: (N,) int logit index per image.
        layers: layer names.
        batch_size: images per forward/backward pass.

    Returns:
        dict layer -> (N, D) float32, flattened like ``layer_activations``; computed at
        full float32 precision on every backend (see the module docstring).

    Example:
        >>> g = layer_gradients(model, variables, images, labels, ["conv3"])
        >>> g["conv3"].shape              # small CNN, width 1: (N, 128 * 4 * 4)
        (100, 2048)
    """
    layers = tuple(layers)
    fn = functools.partial(_compiled(_gradients, model, layers), variables)
    labels = np.asarray(labels, np.int32)
    return dict(zip(layers, _batched(fn, images, batch_size, extra=labels)))


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
        [hashlib.blake2b(_to_float(im).tobytes(), digest_size=16).digest() for im in images]
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
        stacklevel=3,
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
        model: flax linen module; ``model.apply(variables, x, train=False)`` -> logits.
        variables: its variables.
        layer: a layer name (a direct child of ``model``) or a list of them.
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

    first = _check_images("classes", next(iter(classes.values())), None)
    image_shape = first.shape[1:]
    shapes, num_logits = _shapes(model, variables, image_shape)
    for name in layers:
        if name not in shapes:
            raise ValueError(
                f"layer: expected one of the model's layers {tuple(shapes)}, got {name!r}"
            )

    class_keys, class_ids, class_images = [], [], []
    for key, images in classes.items():
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
        images = _check_images(f"classes[{key!r}]", images, image_shape)
        if images.shape[0] < 1:
            raise ValueError(f"classes[{key!r}]: expected at least 1 image, got 0")
        class_keys.append(str(key))
        class_ids.append(index)
        class_images.append(images)

    concept_names = tuple(concepts)
    concept_images = {
        name: _check_images(f"concepts[{name!r}]", images, image_shape)
        for name, images in concepts.items()
    }
    if pool is None:
        same_dtype = len({images.dtype for images in class_images}) == 1
        pool = np.concatenate(
            class_images if same_dtype else [_to_float(im) for im in class_images]
        )
    else:
        pool = _check_images("pool", pool, image_shape)
    for name, images in concept_images.items():
        n_r = images.shape[0] if random_size is None else int(random_size)
        _check_cav_options(cav_method, l2, cav_steps, holdout, images.shape[0], n_r)

    # Random sets: indices into the pool, disjoint from the concept's images.
    rng = np.random.default_rng(seed)
    pool_keys = _image_keys(pool)
    draws = {}
    for name in concept_names:
        images = concept_images[name]
        inside = np.isin(pool_keys, _image_keys(images))
        n_r = images.shape[0] if random_size is None else int(random_size)
        draws[name] = _draw_random_sets(
            np.flatnonzero(~inside), images.shape[0], n_r, int(random_runs), rng, name
        )
    used = np.unique(np.concatenate([a.ravel() for pair in draws.values() for a in pair]))
    remap = np.full(pool.shape[0], -1, np.int64)
    remap[used] = np.arange(used.size)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    _log(progress, f"activations of {used.size} random and "
         f"{sum(len(v) for v in concept_images.values())} concept images at {layers}")
    stacked = np.concatenate(
        [_to_float(pool[used])] + [_to_float(concept_images[n]) for n in concept_names]
    )
    acts = layer_activations(model, variables, stacked, layers, batch_size)
    timings["activations"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    labels = np.concatenate([np.full(len(im), i) for i, im in enumerate(class_images)])
    logit_ids = np.asarray(class_ids)[labels]
    inputs = np.concatenate([_to_float(im) for im in class_images])
    _log(progress, f"gradients of {inputs.shape[0]} class inputs ({len(class_ids)} classes)")
    grads = layer_gradients(model, variables, inputs, logit_ids, layers, batch_size)
    timings["gradients"] = time.perf_counter() - t0
    constant = np.stack(
        [constant_gradients(grads[name], labels, len(class_ids)) for name in layers]
    )
    for name, flags in zip(layers, constant):
        if flags.any():
            _warn_constant(name, class_keys, flags)

    n_l, n_c, n_k, runs = len(layers), len(concept_names), len(class_ids), int(random_runs)
    out = {key: np.zeros((n_l, n_c, n_k, runs), np.float32)
           for key in ("scores", "random_scores", "magnitudes", "random_magnitudes")}
    acc = np.zeros((n_l, n_c, runs), np.float32)
    random_acc = np.zeros((n_l, n_c, runs), np.float32)
    onehot = jax.nn.one_hot(jnp.asarray(labels), n_k, dtype=jnp.float32)
    # On the device once per layer, not once per concept.
    device_grads = {lname: jnp.asarray(grads[lname]) for lname in layers}
    timings["cavs"] = 0.0
    timings["scores"] = 0.0
    offset = used.size
    for ci, name in enumerate(concept_names):
        n_pos = concept_images[name].shape[0]
        own = np.arange(offset, offset + n_pos)
        offset += n_pos
        anchors, negatives = draws[name]
        pos_idx = np.concatenate([np.broadcast_to(own, (runs, n_pos)), remap[anchors]])
        neg_idx = np.concatenate([remap[negatives], remap[negatives]])
        for li, lname in enumerate(layers):
            t0 = time.perf_counter()
            _log(progress, f"{2 * runs} CAVs ({cav_method}) for {name!r} at {lname!r}")
            cavs = _cavs_from_indices(
                acts[lname], pos_idx, neg_idx, method=cav_method, l2=l2, steps=cav_steps,
                tol=1e-5, holdout=holdout, seed=seed + 1 + ci,
            )
            timings["cavs"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            scores, magnitudes = _class_scores(
                device_grads[lname], jnp.asarray(cavs.vectors), onehot
            )
            scores, magnitudes = np.asarray(scores), np.asarray(magnitudes)
            out["scores"][li, ci] = scores[:, :runs]
            out["random_scores"][li, ci] = scores[:, runs:]
            out["magnitudes"][li, ci] = magnitudes[:, :runs]
            out["random_magnitudes"][li, ci] = magnitudes[:, runs:]
            acc[li, ci] = cavs.accuracies[:runs]
            random_acc[li, ci] = cavs.accuracies[runs:]
            timings["scores"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    p_values = welch_pvalues(out["scores"], out["random_scores"])
    adjusted = adjust_pvalues(p_values, correction)
    timings["tests"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    _log(progress, f"done in {timings['total']:.2f}s; "
         f"{int((adjusted <= alpha).sum())}/{adjusted.size} cells significant")
    config = {
        "random_runs": runs, "random_size": random_size, "seed": seed,
        "cav_method": cav_method, "l2": l2, "cav_steps": cav_steps, "holdout": holdout,
        "correction": correction, "alpha": alpha, "class_logits": class_ids,
    }
    return TcavResult(
        layers=layers, concepts=concept_names, classes=tuple(class_keys),
        cav_accuracies=acc, random_cav_accuracies=random_acc, p_values=p_values,
        adjusted=adjusted, significant=adjusted <= alpha, correction=correction,
        alpha=alpha, timings=timings, config=config, constant_gradient=constant, **out,
    )


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
