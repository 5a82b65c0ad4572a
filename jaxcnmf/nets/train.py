"""Train the models of ``jaxcnmf.models`` with optax, and save, resume and reload them.

SGD with (Nesterov) momentum, weight decay on kernels only, a cosine / one-cycle /
constant learning-rate schedule, and random-crop + flip augmentation done inside the
jitted step from a PRNG key. Pixels are fed as float32 in [0, 1] (``data.to_float``),
without mean/std normalisation, as in the paper.

After every epoch ``fit`` writes a checkpoint directory (``state.msgpack`` with params,
batch statistics, optimizer state, step, epoch and PRNG key; ``meta.json`` with the model
spec, dataset, class names, accuracy and history). The directory is replaced atomically,
so an interrupted run leaves the last complete epoch behind (``meta.json`` records the
SHA-256 of ``state.msgpack``, checked on every load), and ``fit(..., resume=True)``
continues from it with the same result as an uninterrupted run: the shuffling of epoch
``e`` is seeded by ``(seed, e)`` and the augmentation key of step ``t`` is
``fold_in(key, t)``, so neither depends on where the run started.

Example:
    >>> from jaxcnmf import data, models, train
    >>> ds = data.load("digits")
    >>> model = models.small_cnn(num_classes=ds.num_classes, width=0.25)
    >>> result = train.fit(model, ds.train, epochs=2, flip=False, eval_ds=ds.test,
    ...                    checkpoint_dir="runs/digits", progress=False)
    >>> ckpt = train.load_checkpoint("runs/digits")
    >>> train.evaluate(ckpt.model, ckpt.variables, ds.test) == result.accuracy
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from tqdm.auto import tqdm

from jaxcnmf.nets import data, models

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "onecycle", "constant")
CHECKPOINT_FORMAT = "jaxcnmf.train checkpoint"
# Version 2 adds ``state_sha256`` to meta.json, required from then on.
CHECKPOINT_VERSION = 2
STATE_FILE = "state.msgpack"
META_FILE = "meta.json"
# Refreshing the bar's loss/accuracy reads device values, so do it only this often.
_POSTFIX_EVERY = 20


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run; static (hashable) so the step can close over it.

    Attributes:
        epochs: passes over the training set, >= 1.
        batch_size: images per step; the last partial batch of an epoch is dropped.
        lr: peak learning rate.
        momentum: SGD momentum in [0, 1).
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient, applied to conv and dense kernels only.
        schedule: ``"cosine"`` (linear warm-up then cosine to 0), ``"onecycle"`` (cosine
            up from ``lr / 25`` then down to ``lr / 25e4``) or ``"constant"``.
        warmup: fraction of all steps spent rising to ``lr``, in [0, 1).
        label_smoothing: in [0, 1).
        augment: random crop with ``crop_padding`` zero pixels on each side, and flips.
        flip: random horizontal flips when ``augment`` (off for digits, which are not
            mirror-symmetric).
        crop_padding: pixels of zero padding before the random crop.
        seed: seeds initialisation, shuffling and augmentation.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    flip: bool = True
    crop_padding: int = 4
    seed: int = 0

    def __post_init__(self):
        def check(ok, name, expected):
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        check(is_int(self.epochs) and self.epochs >= 1, "epochs", "an integer >= 1")
        check(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        # An infinite rate or decay passes "> 0" and turns every weight into NaN at step 1.
        check(0 < self.lr < math.inf, "lr", "a finite number > 0")
        check(0 <= self.momentum < 1, "momentum", "a number in [0, 1)")
        check(0 <= self.weight_decay < math.inf, "weight_decay", "a finite number >= 0")
        check(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        check(0 <= self.warmup < 1, "warmup", "a fraction of the steps in [0, 1)")
        if self.schedule == "onecycle":
            check(self.warmup > 0, "warmup", "a fraction in (0, 1) for schedule='onecycle'")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "a number in [0, 1)")
        check(is_int(self.crop_padding) and self.crop_padding >= 0, "crop_padding", "an integer >= 0")
        check(is_int(self.seed), "seed", "an integer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss or non-finite weights; nothing of it was saved."""


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the batch-norm running statistics."""

    batch_stats: Any = None


class TrainResult(NamedTuple):
    """What ``fit`` returns.

    Attributes:
        model: the trained module.
        variables: ``{"params": ..., "batch_stats": ...}`` for ``model.apply``.
        history: per-epoch lists ``epoch``, ``train_loss``, ``train_acc``, ``eval_acc``
            (None without ``eval_ds``), ``lr`` (at the epoch's last step), ``seconds``
            (training only) and ``eval_seconds``.
        accuracy: eval accuracy after the last epoch, or None without ``eval_ds``.
        epochs: epochs completed.
        state: the final TrainState (params, batch stats, optimizer state, step).
        config: the TrainConfig used.
        checkpoint: the checkpoint directory, or None.
    """

    model: nn.Module
    variables: dict
    history: dict
    accuracy: float | None
    epochs: int
    state: TrainState
    config: TrainConfig
    checkpoint: Path | None


class Checkpoint(NamedTuple):
    """A checkpoint read back by ``load_checkpoint``.

    Attributes:
        model: the module rebuilt from the checkpoint's model spec.
        variables: ``{"params": ..., "batch_stats": ...}`` as jax arrays.
        meta: the contents of ``meta.json`` (model spec, dataset, class names,
            accuracy, epochs, history, training config).
        path: the directory read.
    """

    model: nn.Module
    variables: dict
    meta: dict
    path: Path


# --------------------------------------------------------------------------- optimiser


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the step, over ``epochs * steps_per_epoch`` steps."""
    total = config.epochs * steps_per_epoch
    warm = int(round(config.warmup * total))
    if config.schedule == "cosine" and warm:
        return optax.warmup_cosine_decay_schedule(0.0, config.lr, warm, total, end_value=0.0)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(config.lr, total)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, config.lr, pct_start=config.warmup)
    if warm:
        return optax.warmup_constant_schedule(0.0, config.lr, warm)
    return optax.constant_schedule(config.lr)


def _kernel_mask(params):
    # Decaying batch-norm scales and biases hurts small nets and is not what PyTorch
    # recipes for these models do.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with momentum and weight decay coupled to the gradient (as ``torch.optim.SGD``)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_kernel_mask),
        optax.sgd(make_schedule(config, steps_per_epoch), config.momentum, config.nesterov),
    )


@functools.lru_cache(maxsize=16)
def _apply_fn(model: nn.Module):
    # Bound methods compare by the identity of their module, so equal models need one
    # shared bound method for the jitted step (which sees it as static) to be reused.
    return model.apply


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module):
    return jax.jit(functools.partial(model.init, train=False))


# The optimizer is a static field of TrainState: reusing one object for equal settings
# lets a later run (a resume, or a test) reuse the compiled step.
_cached_optimizer = functools.lru_cache(maxsize=16)(make_optimizer)


def create_train_state(
    model: nn.Module, key: jax.Array, input_shape: tuple[int, int, int], tx
) -> TrainState:
    """Initialise ``model`` on a zero batch of ``input_shape`` (H, W, C) and wrap it."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = _jitted_init(model)(key, x)
    state = TrainState.create(
        apply_fn=_apply_fn(model),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
    )
    # A strongly typed step, as it comes back from a checkpoint, so resuming reuses the
    # compiled step instead of tracing it again.
    return state.replace(step=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------- steps


def augment_batch(key: jax.Array, images: jax.Array, padding: int, flip: bool) -> jax.Array:
    """Random crop after zero padding, and random horizontal flips, per image.

    Args:
        key: PRNG key.
        images: (B, H, W, C) float32.
        padding: zero pixels added on each side before cropping back to (H, W).
        flip: whether to flip half of the images left-right.

    Returns:
        (B, H, W, C) float32.
    """
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if padding:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * padding + 1)
        crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
        images = jax.vmap(crop)(padded, offsets)
    if flip:
        mirrored = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(mirrored, images[:, :, ::-1], images)
    return images


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy, (B, K) logits and (B,) int labels -> (B,)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(
    state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array, config: TrainConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a batch.

    Args:
        state: current TrainState.
        images: (B, H, W, C) float32 in [0, 1].
        labels: (B,) int32.
        key: the run's augmentation key; the step's own key is ``fold_in(key, state.step)``.
        config: TrainConfig (static).

    Returns:
        The new state and ``{"loss": sum of losses, "correct": number right, "count": B}``
        so that sums over an epoch give its means.
    """
    if config.augment:
        step_key = jax.random.fold_in(key, state.step)
        images = augment_batch(step_key, images, config.crop_padding, config.flip)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = cross_entropy(logits, labels, config.label_smoothing).mean()
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    n = labels.shape[0]
    metrics = {
        "loss": loss * n,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": jnp.asarray(n),
    }
    return state, metrics


@functools.lru_cache(maxsize=16)
def _jitted_train_step(config: TrainConfig):
    # The model travels in the state's static apply_fn, so runs with equal configs share
    # this function and only retrace for a new model.
    return jax.jit(functools.partial(train_step, config=config), donate_argnums=0)


def eval_step(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """Inference-mode logits: (B, H, W, C) float32 -> (B, K) float32."""
    return model.apply(variables, images, train=False)


@functools.lru_cache(maxsize=16)
def _jitted_eval(model: nn.Module):
    # Modules are hashable dataclasses, so each model compiles once per batch shape.
    return jax.jit(functools.partial(eval_step, model))


# --------------------------------------------------------------------------- inference


def _check_images(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name}: expected a 4-d array (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"{name}: expected uint8 pixels or floats in [0, 1], got dtype {images.dtype}"
        )
    return images


def _as_float(images: np.ndarray) -> np.ndarray:
    return data.to_float(images) if images.dtype == np.uint8 else images.astype(np.float32)


def predict(model: nn.Module, variables: dict, images, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` in inference mode, in batches.

    Args:
        model: a flax module taking ``(B, H, W, C)`` float32 and ``train``.
        variables: ``{"params": ..., "batch_stats": ...}``.
        images: (N, H, W, C) uint8 (scaled by ``data.to_float``) or float in [0, 1].
        batch_size: images per forward pass; the last batch is zero-padded so that one
            compiled function serves every batch.

    Returns:
        (N, K) float32 logits.

    Example:
        >>> logits = predict(model, variables, ds.test.images)   # doctest: +SKIP
    """
    images = _check_images(images, "images")
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("images: expected at least one image, got 0")
    fn = _jitted_eval(model)
    batch_size = min(batch_size, n)
    outs = []
    for start in range(0, n, batch_size):
        x = _as_float(images[start : start + batch_size])
        if x.shape[0] < batch_size:
            pad = np.zeros((batch_size - x.shape[0], *x.shape[1:]), np.float32)
            x = np.concatenate([x, pad])
        outs.append(fn(variables, x))
    return np.concatenate([np.asarray(o) for o in outs])[:n].astype(np.float32)


def evaluate(model: nn.Module, variables: dict, ds, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on a Dataset.

    Args:
        model: a flax module.
        variables: its variables.
        ds: a ``data.Dataset`` (uint8 images (N, H, W, C), labels (N,)).
        batch_size: images per forward pass.

    Returns:
        Accuracy in [0, 1] as a Python float.

    Example:
        >>> evaluate(ckpt.model, ckpt.variables, ds.test)   # doctest: +SKIP
        0.97
    """
    _check_dataset(ds, "ds")
    logits = predict(model, variables, ds.images, batch_size)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(ds.labels)))


# --------------------------------------------------------------------------- checkpoints


def _model_spec(model: nn.Module) -> dict[str, Any]:
    try:
        return models.spec(model)
    except ValueError as err:
        raise ValueError(
            "checkpoint_dir: checkpoints record the model so it can be rebuilt, which needs "
            f"a model of jaxcnmf.models; {err}"
        ) from None


def _is_checkpoint(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / STATE_FILE).is_file()


def find_checkpoint(path) -> Path | None:
    """The checkpoint directory that ``load_checkpoint`` and ``fit(resume=True)`` read.

    That is ``path`` itself, or ``<path>.old`` when a crash between the two renames of
    the atomic replacement left only the previous copy; None when neither is a checkpoint.

    Example:
        >>> find_checkpoint("runs/never-written") is None   # doctest: +SKIP
        True
    """
    path = Path(path)
    if _is_checkpoint(path):
        return path
    previous = path.with_name(path.name + ".old")
    if not path.exists() and _is_checkpoint(previous):
        return previous
    return None


def _resolve_checkpoint(path) -> Path:
    path = Path(path)
    found = find_checkpoint(path)
    if found is not None:
        return found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: no such directory {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint: expected a directory, got the file {str(path)!r}")
    missing = [f for f in (META_FILE, STATE_FILE) if not (path / f).is_file()]
    raise FileNotFoundError(
        f"checkpoint: {str(path)!r} is not a jaxcnmf checkpoint (missing {', '.join(missing)})"
    )


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"checkpoint: {str(file)!r} is corrupt (not valid JSON: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or "model" not in meta:
        raise ValueError(
            f"checkpoint: {str(file)!r} is not the meta file of a jaxcnmf checkpoint "
            f"(expected format {CHECKPOINT_FORMAT!r} and a model spec)"
        )
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CHECKPOINT_VERSION:
        raise ValueError(
            f"checkpoint: {str(file)!r}: version: expected an integer in [1, "
            f"{CHECKPOINT_VERSION}], got {_short(version)}"
        )
    if version >= 2:
        digest = meta.get("state_sha256")
        if not (isinstance(digest, str) and len(digest) == 64):
            raise ValueError(
                f"checkpoint: {str(file)!r}: state_sha256: expected the 64 hex digits of "
                f"{STATE_FILE}'s SHA-256, got {_short(digest)}"
            )
    return meta


def _short(value: Any, limit: int = 60) -> str:
    # Edited files can hold anything; an error message shows only the start of it.
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _model_from_meta(meta: dict, file: Path) -> nn.Module:
    spec = meta["model"]
    if not isinstance(spec, dict):
        raise ValueError(
            f"checkpoint: {str(file)!r}: model: expected a model spec (an object), got "
            f"{type(spec).__name__} {_short(spec)}"
        )
    try:
        return models.from_spec(spec)
    except (ValueError, TypeError) as err:
        raise ValueError(f"checkpoint: {str(file)!r}: model: {err}") from None


def _input_shape(meta: dict, file: Path) -> tuple[int, int, int]:
    shape = meta.get("input_shape")
    if shape is None:
        return (32, 32, 3)  # checkpoints written before input_shape was recorded
    ok = (
        isinstance(shape, list) and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        and shape[2] in (1, 3)
    )
    if not ok:
        raise ValueError(
            f"checkpoint: {str(file)!r}: input_shape: expected [H, W, C] of positive integers "
            f"with C 1 or 3, got {_short(shape)}"
        )
    return tuple(shape)


def _nonfinite(tree) -> list[str]:
    """Paths of the floating-point leaves of ``tree`` that hold a NaN or an infinity."""
    paths, flags = [], []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        paths.append(jax.tree_util.keystr(path))
        # Device leaves are reduced where they live and fetched together, once.
        flags.append(np.isfinite(leaf).all() if isinstance(leaf, np.ndarray)
                     else jnp.all(jnp.isfinite(leaf)))
    return [p for p, ok in zip(paths, jax.device_get(flags)) if not ok]


def _read_state(path: Path, meta: dict) -> dict[str, Any]:
    file = path / STATE_FILE
    payload = file.read_bytes()
    expected = meta.get("state_sha256")
    if expected is not None and hashlib.sha256(payload).hexdigest() != expected:
        raise ValueError(
            f"checkpoint: {str(file)!r} does not match the state_sha256 recorded in "
            f"{META_FILE}: the file was changed or damaged after it was written"
        )
    try:
        raw = serialization.msgpack_restore(payload)
    except Exception as err:  # msgpack raises several unrelated types on bad bytes
        raise ValueError(f"checkpoint: {str(file)!r} is corrupt or truncated ({err})") from None
    if not isinstance(raw, dict) or not {"state", "epoch", "key"} <= set(raw):
        raise ValueError(
            f"checkpoint: {str(file)!r} is corrupt: expected entries state, epoch and key"
        )
    return raw


def _check_tree_matches(loaded, expected, what: str, file: Path) -> None:
    flat_loaded = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    flat_expected = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    if flat_loaded != flat_expected:
        missing = sorted(set(flat_expected) - set(flat_loaded))[:3]
        extra = sorted(set(flat_loaded) - set(flat_expected))[:3]
        shapes = [
            f"{k}: expected {flat_expected[k]}, got {flat_loaded[k]}"
            for k in sorted(set(flat_loaded) & set(flat_expected))
            if flat_loaded[k] != flat_expected[k]
        ][:3]
        raise ValueError(
            f"checkpoint: {what} in {str(file)!r} do not match the model in its meta.json "
            f"(missing {missing}, unexpected {extra}, shapes {shapes})"
        )


def _write_dir_atomically(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    # os.mkdir (unlike tempfile.mkdtemp) honours the umask, so others can read the result.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}"
    os.mkdir(tmp)
    for name, payload in files.items():
        with open(tmp / name, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    # A non-empty directory cannot be renamed over, so the old copy steps aside first.
    previous = path.with_name(path.name + ".old")
    if path.exists():
        if previous.exists():
            shutil.rmtree(previous)
        os.replace(path, previous)
    # Without ``path``, an existing ``.old`` is the last good copy (a crash came between
    # the renames): it stays until the new copy is in place.
    os.replace(tmp, path)
    shutil.rmtree(previous, ignore_errors=True)


def _check_writable_checkpoint_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"checkpoint_dir: expected a directory, got the file {str(path)!r}")
    if path.is_dir() and any(path.iterdir()):
        meta = path / META_FILE
        try:
            ours = json.loads(meta.read_text()).get("format") == CHECKPOINT_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(
                f"checkpoint_dir: {str(path)!r} exists and is not a jaxcnmf checkpoint; "
                "refusing to overwrite it, choose an empty or new directory"
            )


def save_checkpoint(
    path, model: nn.Module, state: TrainState, *, epoch: int, key: jax.Array, meta: dict | None = None
) -> Path:
    """Write a checkpoint directory, replacing any previous one atomically.

    Args:
        path: the checkpoint directory (created with its parents).
        model: a model of ``jaxcnmf.models`` (its spec is recorded so that
            ``load_checkpoint`` can rebuild it).
        state: the TrainState (params, batch stats, optimizer state, step).
        epoch: epochs completed.
        key: the run's augmentation PRNG key.
        meta: extra JSON-serialisable entries for ``meta.json`` (dataset, accuracy, ...).

    Returns:
        The directory written, holding ``state.msgpack`` and ``meta.json``.
    """
    path = Path(path)
    _check_writable_checkpoint_dir(path)
    spec = _model_spec(model)
    bad = _nonfinite({"params": state.params, "batch_stats": state.batch_stats})
    if bad:
        raise TrainingDiverged(
            f"state: expected finite weights, got NaN or infinity in {bad[:3]}; not saving "
            f"a checkpoint to {str(path)!r}"
        )
    payload = serialization.to_bytes(
        {"state": state, "epoch": int(epoch), "key": np.asarray(jax.random.key_data(key))}
    )
    full_meta = {
        "format": CHECKPOINT_FORMAT,
        "model": spec,
        "model_name": spec["name"],
        "width": spec.get("width"),
        "num_classes": spec.get("num_classes"),
        "epoch": int(epoch),
        "step": int(state.step),
        **(meta or {}),
        # Last, so that no entry of ``meta`` can replace it.
        "version": CHECKPOINT_VERSION,
        "state_sha256": hashlib.sha256(payload).hexdigest(),
    }
    try:
        meta_bytes = json.dumps(full_meta, indent=1).encode()
    except TypeError as err:
        raise ValueError(f"meta: expected JSON-serialisable values, {err}") from None
    _write_dir_atomically(path, {STATE_FILE: payload, META_FILE: meta_bytes})
    return path


def load_checkpoint(path) -> Checkpoint:
    """Rebuild a model and its variables from a checkpoint directory alone.

    Args:
        path: a directory written by ``fit`` or ``save_checkpoint``.

    Returns:
        Checkpoint(model, variables, meta, path).

    Raises:
        FileNotFoundError: no directory, or a directory without ``meta.json`` /
            ``state.msgpack``.
        ValueError: a corrupt or truncated file, a ``state.msgpack`` that does not match
            the SHA-256 in ``meta.json``, a bad model spec or ``input_shape``, weights
            that do not fit the model, or weights holding NaN or infinity.

    Example:
        >>> ckpt = load_checkpoint("/work/runs/c10_small/ckpt")   # doctest: +SKIP
        >>> ckpt.meta["accuracy"], ckpt.meta["class_names"][:2]   # doctest: +SKIP
        (0.81, ['airplane', 'automobile'])
    """
    path = _resolve_checkpoint(path)
    meta = _read_meta(path)
    model = _model_from_meta(meta, path / META_FILE)
    shape = _input_shape(meta, path / META_FILE)
    raw = _read_state(path, meta)
    state = raw["state"]
    if not isinstance(state, dict) or "params" not in state:
        raise ValueError(f"checkpoint: {str(path / STATE_FILE)!r} is corrupt: no params")
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    try:
        expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    except Exception as err:  # flax's shape errors; restate them with the file
        raise ValueError(
            f"checkpoint: {str(path / META_FILE)!r}: the model does not run on input_shape "
            f"{list(shape)} ({str(err)[:200]})"
        ) from None
    expected = {"params": expected["params"], "batch_stats": expected.get("batch_stats", {})}
    _check_tree_matches(variables, expected, "the weights", path / STATE_FILE)
    _check_finite(variables, "the weights", path / STATE_FILE)
    return Checkpoint(model, jax.tree_util.tree_map(jnp.asarray, variables), meta, path)


def resume_settings(path) -> dict[str, Any]:
    """The model and ``fit`` settings of the run checkpointed in ``path``, to continue it.

    ``fit(model, train_ds, checkpoint_dir=path, resume=True, **settings["fit"])`` with the
    same data picks up after ``settings["epochs_done"]``; a larger ``epochs`` extends the
    run only where the schedule allows (it is part of the config, so changing it is
    refused as a different run). Reads ``<path>.old`` when a crash left only that copy.

    Args:
        path: a checkpoint directory written by ``fit``.

    Returns:
        ``{"checkpoint": Path read, "model": the rebuilt module, "fit": keyword arguments
        of fit (epochs, batch_size, lr, momentum, nesterov, weight_decay, schedule, warmup,
        label_smoothing, augment, flip, seed), "epochs_done": int, "dataset": str,
        "meta": the whole meta.json}``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a meta.json without a valid training config (named in the message).

    Example:
        >>> s = resume_settings("runs/c10/ckpt")                         # doctest: +SKIP
        >>> fit(s["model"], ds.train, checkpoint_dir="runs/c10/ckpt", **s["fit"])  # doctest: +SKIP
    """
    found = _resolve_checkpoint(path)
    meta = _read_meta(found)
    file = found / META_FILE
    model = _model_from_meta(meta, file)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ValueError(
            f"checkpoint: {str(file)!r}: config: expected the training settings fit records, "
            f"got {_short(config)}"
        )
    try:
        config = TrainConfig(**config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint: {str(file)!r}: config: {_short(str(err), 200)}") from None
    epochs_done = meta.get("epoch")
    if not isinstance(epochs_done, int) or isinstance(epochs_done, bool) or epochs_done < 0:
        raise ValueError(
            f"checkpoint: {str(file)!r}: epoch: expected an integer >= 0, got {_short(epochs_done)}"
        )
    settings = config.to_dict()
    # fit has no crop_padding argument: it always pads by the TrainConfig default.
    settings.pop("crop_padding")
    return {"checkpoint": found, "model": model, "fit": settings, "epochs_done": epochs_done,
            "dataset": str(meta.get("dataset", "")), "meta": meta}


def _check_finite(tree, what: str, file: Path) -> None:
    bad = _nonfinite(tree)
    if bad:
        raise ValueError(
            f"checkpoint: {what} in {str(file)!r} hold NaN or infinity (in {bad[:3]}"
            f"{' and more' if len(bad) > 3 else ''}); was it written by a diverged run?"
        )


def _restore_train_state(
    path: Path, template: TrainState, meta: dict
) -> tuple[TrainState, int, jax.Array]:
    raw = _read_state(path, meta)
    target = {
        "state": serialization.to_state_dict(template),
        "epoch": 0,
        "key": np.zeros_like(jax.random.key_data(jax.random.key(0))),
    }
    _check_tree_matches(raw, target, "the training state", path / STATE_FILE)
    _check_finite(raw["state"], "the training state", path / STATE_FILE)
    state = serialization.from_state_dict(template, raw["state"])
    return state, int(raw["epoch"]), jax.random.wrap_key_data(jnp.asarray(raw["key"]))


# --------------------------------------------------------------------------- fit


def run_epoch(
    state: TrainState,
    ds,
    epoch: int,
    key: jax.Array,
    config: TrainConfig,
    steps: int,
    desc: str = "",
    progress: bool = True,
) -> tuple[TrainState, dict[str, float], float]:
    """One pass over ``ds`` in ``steps`` batches shuffled by ``(config.seed, epoch)``.

    With ``progress`` the running loss is read every few steps anyway, and the epoch stops
    early once it is NaN or infinite (``fit`` then raises ``TrainingDiverged``).

    Returns:
        The new state, the epoch's sums ``{"loss", "correct", "count"}`` and its seconds.
    """
    step_fn = _jitted_train_step(config)
    images, labels = ds.images, np.asarray(ds.labels, np.int32)
    order = np.random.default_rng((config.seed, epoch)).permutation(images.shape[0])
    batches = order[: steps * config.batch_size].reshape(steps, config.batch_size)
    totals = {"loss": 0.0, "correct": 0, "count": 0}
    first = (state, data.to_float(images[batches[0]]), labels[batches[0]], key)
    step = _compiled_step(step_fn, first, progress)
    start = time.perf_counter()
    # smoothing=0: the rate is the epoch's average. Steps are dispatched asynchronously and
    # the host waits only when it reads the loss, so a moving average swings wildly.
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress,
               smoothing=0)
    for i, idx in enumerate(bar):
        state, metrics = step(state, data.to_float(images[idx]), labels[idx], key)
        totals = jax.tree_util.tree_map(jnp.add, totals, metrics)
        if progress and (i + 1) % _POSTFIX_EVERY == 0:
            count = float(totals["count"])
            loss = float(totals["loss"]) / count
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{float(totals['correct']) / count:.3f}")
            if not math.isfinite(loss):
                break  # diverged: the caller sees the non-finite sum and stops
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    bar.close()
    return state, totals, time.perf_counter() - start


# Compiled training steps by (step function, argument structure and shapes): compiling
# ahead of the first step makes the compile a visible stage of its own, not a stalled bar.
_COMPILED: dict = {}


def _compiled_step(step_fn, args, progress: bool):
    """``step_fn`` compiled for ``args``' shapes, with a log line while it compiles."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (step_fn, tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
    if key not in _COMPILED:
        t0 = time.perf_counter()
        if progress:
            tqdm.write("compiling the training step (once per model and batch shape) ...")
        if len(_COMPILED) >= 8:
            _COMPILED.clear()
        _COMPILED[key] = step_fn.lower(*args).compile()
        if progress:
            tqdm.write(f"compiled in {time.perf_counter() - t0:.1f} s")
    return _COMPILED[key]


def _check_dataset(ds, name: str) -> None:
    for attr in ("images", "labels"):
        if not hasattr(ds, attr):
            raise TypeError(f"{name}: expected a jaxcnmf.data.Dataset, got {type(ds).__name__}")
    images = ds.images
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(
            f"{name}.images: expected a uint8 array (N, H, W, C), got "
            f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image, got an empty dataset")
    labels = np.asarray(ds.labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name}.labels: expected integers of shape ({images.shape[0]},), got "
            f"{labels.dtype} {labels.shape}"
        )


def _num_classes(ds) -> int:
    return len(ds.class_names) if getattr(ds, "class_names", None) else int(np.max(ds.labels)) + 1


def _check_fit_inputs(model, train_ds, eval_ds, config: TrainConfig) -> int:
    _check_dataset(train_ds, "train_ds")
    shape = train_ds.images.shape[1:]
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    try:
        logits, _ = jax.eval_shape(
            functools.partial(model.init_with_output, train=False), jax.random.key(0), x
        )
    except Exception as err:
        raise ValueError(f"model: cannot run on train_ds images of shape {shape}: {err}") from None
    outputs = logits.shape[-1]
    for name, ds in (("train_ds", train_ds), ("eval_ds", eval_ds)):
        if ds is None:
            continue
        if name == "eval_ds":
            _check_dataset(ds, name)
            if ds.images.shape[1:] != shape:
                raise ValueError(
                    f"eval_ds.images: expected images of shape {shape} like train_ds, "
                    f"got {ds.images.shape[1:]}"
                )
        classes = _num_classes(ds)
        labels = np.asarray(ds.labels)
        if classes != outputs:
            raise ValueError(
                f"{name}: the model has {outputs} outputs but the dataset "
                f"{getattr(ds, 'name', '')!r} has {classes} classes"
            )
        if labels.min() < 0 or labels.max() >= outputs:
            raise ValueError(
                f"{name}.labels: expected values in [0, {outputs}), got "
                f"[{labels.min()}, {labels.max()}]"
            )
    n = train_ds.images.shape[0]
    if n < config.batch_size:
        raise ValueError(
            f"batch_size: expected at most the {n} training images (the last partial "
            f"batch is dropped), got {config.batch_size}"
        )
    return n // config.batch_size


def _dataset_meta(ds, n_eval: int | None) -> dict[str, Any]:
    superclasses = getattr(ds, "superclass_names", None)
    return {
        "dataset": getattr(ds, "name", "") or "",
        "class_names": list(getattr(ds, "class_names", None) or []),
        "superclass_names": list(superclasses) if superclasses else None,
        "input_shape": list(ds.images.shape[1:]),
        "train_images": int(ds.images.shape[0]),
        "eval_images": n_eval,
    }


def _check_resumable(meta: dict, expected: dict, path: Path) -> None:
    keys = ("model", "config", "dataset", "train_images", "input_shape")
    differ = [k for k in keys if meta.get(k) != expected.get(k)]
    if differ:
        details = "; ".join(f"{k}: checkpoint {meta.get(k)!r}, now {expected.get(k)!r}" for k in differ)
        raise ValueError(
            f"checkpoint_dir: {str(path)!r} holds a different run ({details}); pass "
            "resume=False to start over or choose another checkpoint_dir"
        )


def _as_number(name: str, value: Any) -> float:
    # float() alone would fail with a message that names no parameter.
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None


def _check_converging(totals, variables, epoch, epochs, config, ckpt_path) -> None:
    """Raise TrainingDiverged when the epoch's loss or the weights are not finite."""
    loss = totals["loss"] / max(totals["count"], 1)
    bad = [] if math.isfinite(loss) else ["the loss"]
    bad += _nonfinite(variables)[:3]
    if not bad:
        return
    kept = (
        f"; {str(ckpt_path)!r} still holds epoch {epoch - 1}"
        if ckpt_path is not None and epoch > 1 else "; nothing was saved"
    )
    raise TrainingDiverged(
        f"training diverged in epoch {epoch}/{epochs}: NaN or infinity in "
        f"{', '.join(bad)} (mean loss {loss:.4g}); lr={config.lr:g} is probably too large "
        f"for this model and schedule{kept}"
    )


def _empty_history() -> dict[str, list]:
    keys = ("epoch", "train_loss", "train_acc", "eval_acc", "lr", "seconds", "eval_seconds")
    return {k: [] for k in keys}


def fit(
    model: nn.Module,
    train_ds,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    warmup: float | None = None,
    label_smoothing: float = 0.0,
    augment: bool = True,
    flip: bool = True,
    eval_ds=None,
    checkpoint_dir=None,
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    meta: dict | None = None,
) -> TrainResult:
    """Train ``model`` on a Dataset with SGD, evaluating and checkpointing every epoch.

    Args:
        model: a flax module ``__call__(x, train)`` with batch norm (``jaxcnmf.models``;
            any module trains, but checkpoints need one of ``jaxcnmf.models``).
        train_ds: ``data.Dataset`` with uint8 images (N, H, W, C) and labels (N,).
        epochs: passes over ``train_ds``, >= 1.
        batch_size: images per step (the last partial batch of each epoch is dropped).
        lr, momentum, nesterov, weight_decay, schedule, label_smoothing: see TrainConfig.
        warmup: fraction of the steps spent warming up; default 0 for ``"cosine"`` and
            ``"constant"``, 0.25 for ``"onecycle"``.
        augment: random 4-pixel-padded crops (and flips if ``flip``).
        flip: random horizontal flips; turn off for digits and text.
        eval_ds: optional Dataset evaluated after each epoch.
        checkpoint_dir: directory rewritten after every epoch; None for no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (it
            must come from the same model, data and settings; ``<checkpoint_dir>.old`` is
            used when a crash during its replacement left only that copy); False starts
            over.
        seed: seeds initialisation, shuffling and augmentation.
        progress: a progress bar per epoch and one summary line per epoch on stderr.
        meta: extra JSON-serialisable entries for the checkpoint's ``meta.json``.

    Returns:
        TrainResult(model, variables, history, accuracy, epochs, state, config, checkpoint).

    Raises:
        TrainingDiverged: (a ValueError) an epoch ended with a NaN or infinite loss or
            weights; that epoch is not saved, the checkpoint keeps the one before.
        ValueError: bad settings or data, or a checkpoint of a different run.

    Example:
        >>> ds = data.load("digits")                                    # doctest: +SKIP
        >>> model = models.small_cnn(num_classes=10, width=0.25)        # doctest: +SKIP
        >>> fit(model, ds.train, epochs=3, flip=False, eval_ds=ds.test).accuracy  # doctest: +SKIP
        0.95
    """
    if warmup is None:
        warmup = 0.25 if schedule == "onecycle" else 0.0
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=_as_number("lr", lr),
        momentum=_as_number("momentum", momentum),
        nesterov=bool(nesterov),
        weight_decay=_as_number("weight_decay", weight_decay),
        schedule=schedule,
        warmup=_as_number("warmup", warmup),
        label_smoothing=_as_number("label_smoothing", label_smoothing),
        augment=bool(augment),
        flip=bool(flip),
        seed=seed,
    )
    steps_per_epoch = _check_fit_inputs(model, train_ds, eval_ds, config)
    ckpt_path = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run_meta = {
        **_dataset_meta(train_ds, None if eval_ds is None else int(eval_ds.images.shape[0])),
        "config": config.to_dict(),
    }
    if ckpt_path is not None:
        run_meta["model"] = _model_spec(model)
        _check_writable_checkpoint_dir(ckpt_path)
        reserved = set(run_meta) | {"format", "version", "model_name", "width", "num_classes",
                                    "epoch", "step", "accuracy", "epochs", "history"}
        clash = sorted(set(meta or {}) & reserved)
        if clash:
            raise ValueError(f"meta: expected keys other than the reserved {clash}")

    init_key, aug_key = jax.random.split(jax.random.key(seed))
    tx = _cached_optimizer(config, steps_per_epoch)
    state = create_train_state(model, init_key, train_ds.images.shape[1:], tx)
    history = _empty_history()
    done = 0
    found = find_checkpoint(ckpt_path) if ckpt_path is not None and resume else None
    if found is not None:
        previous = _read_meta(found)
        _check_resumable(previous, run_meta, found)
        state, done, aug_key = _restore_train_state(found, state, previous)
        history = {k: list(previous.get("history", {}).get(k, [])) for k in _empty_history()}
        if progress:
            tqdm.write(f"resuming from {found} after epoch {done}/{epochs}")

    schedule_fn = make_schedule(config, steps_per_epoch)
    for epoch in range(done + 1, epochs + 1):
        state, totals, seconds = run_epoch(
            state, train_ds, epoch, aug_key, config, steps_per_epoch,
            desc=f"epoch {epoch}/{epochs}", progress=progress,
        )
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        _check_converging(totals, variables, epoch, epochs, config, ckpt_path)
        eval_acc, eval_seconds = None, None
        if eval_ds is not None:
            t0 = time.perf_counter()
            eval_acc = evaluate(model, variables, eval_ds)
            eval_seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "train_loss": totals["loss"] / totals["count"],
            "train_acc": totals["correct"] / totals["count"],
            "eval_acc": eval_acc,
            "lr": float(schedule_fn(int(state.step) - 1)),
            "seconds": seconds,
            "eval_seconds": eval_seconds,
        }
        for k, v in row.items():
            history[k].append(v)
        line = (
            f"epoch {epoch}/{epochs}  loss {row['train_loss']:.4f}  train acc "
            f"{row['train_acc']:.4f}  eval acc "
            f"{'-' if eval_acc is None else f'{eval_acc:.4f}'}  "
            f"{seconds:.1f} s ({steps_per_epoch * batch_size / seconds:.0f} img/s)"
        )
        logger.info(line)
        if progress:
            tqdm.write(line)
        if ckpt_path is not None:
            save_checkpoint(
                ckpt_path,
                model,
                state,
                epoch=epoch,
                key=aug_key,
                meta={
                    **run_meta,
                    "accuracy": eval_acc,
                    "train_accuracy": row["train_acc"],
                    "epochs": epoch,
                    "history": history,
                    **(meta or {}),
                },
            )

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    last = history["eval_acc"][-1] if history["eval_acc"] else None
    return TrainResult(model, variables, history, last, epochs, state, config, ckpt_path)
