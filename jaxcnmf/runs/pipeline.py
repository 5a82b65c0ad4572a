"""The end-to-end job: data, network, probe set, coupled NMF, analyses, report.

``run(config, out)`` loads a dataset, loads (or trains) a CNN, draws a class-balanced probe
set, collects its pixels and layer activations, factorizes them jointly with
:func:`jaxcnmf.fit`, runs the analyses that need the network or the activations (the
k-means baseline and fidelity), saves everything to a run directory and writes
``report.html``. Each stage logs one line on stderr with its wall time, and the times go
to ``run.json``.

Every argument is checked before the first expensive stage, so a typo in a layer name
fails in seconds rather than after training. The run directory moves through three
states: ``run.json`` says ``"running"`` while work is under way, ``"failed"`` (with the
error) if a stage raised, and ``"complete"`` at the very end, when the file ``COMPLETE``
is also written; ``report.html`` is written through a temporary file, so an interrupted
run never leaves a report that looks finished.

The run directory's files and their layout are described in :mod:`jaxcnmf.runs.rundir`.

With ``RunConfig(store=DIR)`` (``analyze --store DIR``) the probe stage writes the views to
an on-disk store instead of memory (resuming an unfinished store of the same run, reusing a
complete one, refusing another run's: :mod:`jaxcnmf.runs.runstore`), the fits stream from
it and the baseline, the layers-only fit, fidelity and TCAV read from it. In memory remain
the probe images (uint8, as the dataset loader holds them), ``F``, labels and predictions,
a few blocks of the views, and the fidelity subset's activations of one layer.

Example:
    >>> from jaxcnmf import pipeline
    >>> report = pipeline.run(pipeline.demo_config(quick=True), "/tmp/demo")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# The run directory's names live in rundir; importing them here keeps ``pipeline.load_run``,
# ``pipeline.RUN_JSON``, ... working for code written before rundir existed.
from jaxcnmf.runs.rundir import (  # noqa: F401  (re-exported)
    ANALYSIS,
    CHECKPOINT_DIR,
    COMPLETE,
    FACTORIZATION,
    PROBE,
    REPORT,
    RUN_JSON,
    TCAV,
    TCAV_ARRAYS,
    SavedRun,
    check_out_dir,
    environment,
    files_under,
    holds_files,
    load_run,
    load_tcav,
    lock_run_dir,
    progress_bar,
    save_tcav,
    start_run_dir,
    write_bytes_atomic,
    write_json_atomic,
    written_files,
)

DEMO_LAYERS = ("conv2", "conv3", "pool")
DEFAULT_TCAV_TOP = 50
LOGITS = "fc"
PIXEL_MODES = ("auto", "rgb", "gray", "none")
# Solver defaults of demo and analyze, from measurement: with the KKT stopping rule, HALS
# at tol=1e-4 ends within 0.1% of its best objective in about 220 iterations on the demo's
# and the experiments' activation problems, while MU is not within 1% after 1000.
DEFAULT_METHOD = "hals"
DEFAULT_MAX_ITER = 500
STORE_DTYPES = ("float32", "bfloat16")
# Fidelity from a store runs the network on this many probe images (a random subset): it
# needs their layer activations in memory, one layer at a time.
DEFAULT_FIDELITY_IMAGES = 2000
# The RunConfig fields that describe a network to train: recorded only when one is trained.
TRAINING_FIELDS = ("model", "width", "epochs", "train_batch_size", "lr", "augment",
                   "schedule", "warmup", "label_smoothing")


def _settings_json(settings) -> dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(settings).items()
    }


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings of one run; every field is JSON-serialisable and lands in ``run.json``.

    Attributes:
        command: what started the run ("demo", "analyze", an experiment's name).
        dataset: "digits", "cifar10", "cifar100", an image folder or an .npz file.
        source: folder holding the dataset files, or None.
        checkpoint: a checkpoint from ``jaxcnmf train``; None trains ``model`` first.
            With ``model_module``, an orbax checkpoint of that network (see
            :mod:`jaxcnmf.nets.usermodel`), or None to use it as its builder returns it.
        model_module: the user's own network, ``"package.module:builder"``, imported from
            the working directory or ``PYTHONPATH``; the builder is called with
            ``num_classes`` and ``input_shape`` if it names them and returns a
            ``flax.nnx.Module``, a ``flax.linen.Module`` or a ``probe.from_function``
            adapter. None: one of ours (``checkpoint`` or ``model``).
        input_shape: with ``model_module``, ``(H, W, C)`` the network takes, checked
            against the dataset's images; None takes the dataset's.
        model, width, epochs, train_batch_size, lr, augment, schedule, warmup,
            label_smoothing: the network to train when ``checkpoint`` is None (``None``
            takes the trainer's default); ``to_json`` leaves them out otherwise.
        layers: layers to probe, in order; None probes every probe-able layer.
        split: "test" or "train", where the probe set comes from.
        per_class: probe images per class (None: the whole split).
        pixels: the pixel views: "auto" (one gray view when every probe image has equal
            red, green and blue, else one view per channel), "rgb", "gray" or "none";
            True means "rgb" and False "none".
        pooling: "flatten", "mean" or "max" for conv layers.
        devices: local devices the images are sharded over in the fit; None takes all
            of them (``jax.local_device_count()``), 1 fits on one device.
        rank, method, max_iter, tol, restarts, weights, unit_columns: passed to
            :func:`jaxcnmf.fit` (``weights`` is "balanced" or None).
        pixel_share: with balanced weights, the pixel views' share of the objective
            (the layers share the rest equally); None gives every view the same weight,
            as the paper's coupling does. 0.1 by the measurements in
            ``experiments/results/validity`` (it keeps latent images while costing little
            class purity); see :func:`view_weights`.
        group_lam: absolute group-lasso weight on F; 0 switches it off.
        group_lam_fraction: the group penalty as a fraction in (0, 1] of the smallest
            one that zeroes every group (``jaxcnmf.fit``'s ``group_lam_fraction``); the
            scale-free way to set it. At most one of the two is set.
        groups: "class" or "superclass", the image groups of the group penalty.
        baseline: run the k-means baseline (``analysis.json`` records ``"kmeans": null``
            without it).
        fidelity_ranks: ranks at which fidelity is measured besides ``rank``.
        batch_size: probing batch size.
        top_images: images shown per concept in the report.
        neighbours: K of the nearest-neighbour analysis.
        seed: seeds the probe subset, training and the solver.
        store: a directory for an on-disk activation store (``jaxcnmf.store``), for probe
            sets whose activations do not fit in memory: the probe stage writes it block
            by block (resuming an unfinished store of the same run, reusing a complete
            one), the fit streams from it, and the baseline, the layers-only fit,
            fidelity and TCAV read from it. None keeps the views in memory. With a store
            the fit streams over ``devices`` devices, with one start; a group penalty
            needs ``groups="class"`` and a probe set of runs of ``m`` images per class (a
            ``per_class`` one), and then blocks (and, over several devices, the devices'
            shares ``ceil(N / devices)``) of a multiple of ``m`` images, so that no class
            straddles two.
        store_dtype: "float32" or "bfloat16" (half the disk and reads; values rounded to
            8 bits of mantissa), the stored values' dtype.
        store_block_size: images per store block; None: ``store.default_block_size``
            (about 64 MiB of all views a block; with the group penalty, the largest
            multiple of the class size not above it) for a new store, the store's own when
            resuming one (an unfinished store resumes only with its own block size).
        fidelity_images: with ``store``, fidelity is measured on this many probe images
            (a random subset drawn with ``seed``; all of them when there are fewer); its
            size goes to ``analysis.json`` and the report. Without a store, on all of them.
    """

    command: str = "analyze"
    dataset: str = "digits"
    source: str | None = None
    checkpoint: str | None = None
    model_module: str | None = None
    input_shape: tuple[int, int, int] | None = None
    model: str = "small"
    width: float = 1.0
    epochs: int = 10
    train_batch_size: int = 128
    lr: float | None = None
    augment: bool = True
    schedule: str | None = None
    warmup: float | None = None
    label_smoothing: float | None = None
    layers: tuple[str, ...] | None = None
    split: str = "test"
    per_class: int | None = 100
    pixels: bool | str = "auto"
    pooling: str = "flatten"
    rank: int = 20
    method: str = DEFAULT_METHOD
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = 1e-4
    restarts: int = 1
    devices: int | None = None
    weights: str | None = "balanced"
    pixel_share: float | None = 0.1
    unit_columns: bool = False
    group_lam: float = 0.0
    group_lam_fraction: float | None = None
    groups: str = "class"
    baseline: bool = True
    fidelity_ranks: tuple[int, ...] = (2, 5, 10)
    batch_size: int = 256
    top_images: int = 8
    neighbours: int = 10
    seed: int = 0
    store: str | None = None
    store_dtype: str = "float32"
    store_block_size: int | None = None
    fidelity_images: int = DEFAULT_FIDELITY_IMAGES

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (tuples become lists), without the training
        settings when the network comes from a checkpoint or the user's module (they
        were never used)."""
        settings = _settings_json(self)
        if self.checkpoint is not None or self.model_module is not None:
            for name in TRAINING_FIELDS:
                settings.pop(name)
        return settings

    @property
    def trains(self) -> bool:
        """Whether the run trains its network (no checkpoint, no user module)."""
        return self.checkpoint is None and self.model_module is None

    @property
    def pixel_mode(self) -> str:
        """``pixels`` as one of "auto", "rgb", "gray", "none"."""
        if self.pixels is True:
            return "rgb"
        if self.pixels is False or self.pixels is None:
            return "none"
        return self.pixels

    @property
    def group_penalty(self) -> bool:
        """Whether the fit has a group penalty."""
        return self.group_lam > 0 or self.group_lam_fraction is not None


@dataclasses.dataclass(frozen=True)
class TcavConfig:
    """Settings of the TCAV step (``jaxcnmf tcav``, ``analyze --tcav``), see :mod:`jaxcnmf.tcav`.

    Concept i is the ``top`` probe images with the largest weight in row i of F; the
    classes are the probe set's own images of each class; random sets are drawn from the
    probe set minus the concept's images, so ``top`` may be at most a third of it. The
    settings as asked land in ``run.json`` under ``"tcav"``; what they resolved to (layers,
    classes, top) in ``tcav.json``.

    Attributes:
        layers: layers to test; None takes the second-to-last probed layer with a
            spatial output when two or more were probed, else the last one (the last
            probed layer when none has one). The last spatial layer of our networks
            (SmallCNN's conv3, ResNet-18's conv5_x) reaches the logits through a global
            average pool and a dense layer only, a linear map whose gradient is the same
            for every input, so its TCAV scores are all 0 or 1 (see
            :func:`jaxcnmf.tcav.run`).
        top: images per concept; None takes 50, or a third of the probe set when that is
            smaller.
        random_runs: R >= 2 random runs per concept.
        classes: class names to score; None scores every class of the probe set.
        correction: "bh" or "bonferroni", over the whole (layer, concept, class) grid.
        alpha: significance level after correction.
        cav_method: "logistic" or "mean_diff".
        seed: seeds the random sets and the held-out splits.

    Example:
        >>> TcavConfig(layers=("conv3",), random_runs=20).top is None  # 50 or N // 3
        True
    """

    layers: tuple[str, ...] | None = None
    top: int | None = None
    random_runs: int = 50
    classes: tuple[str, ...] | None = None
    correction: str = "bh"
    alpha: float = 0.05
    cav_method: str = "logistic"
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (tuples become lists)."""
        return _settings_json(self)


def demo_config(*, quick: bool = False, method: str = DEFAULT_METHOD,
                max_iter: int | None = None, pixels: bool | str = "auto",
                seed: int = 0) -> RunConfig:
    """Settings of ``jaxcnmf demo``: a small CNN on the bundled digits, rank 10.

    Args:
        quick: a reduced run for smoke tests (1 epoch, narrow network, 10 images per class,
            no fidelity fits).
        method: "hals" (default) or "mu".
        max_iter: most solver iterations; None takes 500.
        pixels: as :class:`RunConfig`'s ``pixels``.
        seed: seeds everything.

    Returns:
        RunConfig.

    Example:
        >>> demo_config(quick=True).per_class
        10
    """
    if quick:
        return RunConfig(
            command="demo", dataset="digits", model="small", width=0.25, epochs=1,
            train_batch_size=64, layers=DEMO_LAYERS, per_class=10, rank=10, method=method,
            max_iter=DEFAULT_MAX_ITER if max_iter is None else max_iter, pixels=pixels,
            fidelity_ranks=(), top_images=4, neighbours=5, seed=seed,
        )
    return RunConfig(
        command="demo", dataset="digits", model="small", width=0.5, epochs=4,
        train_batch_size=64, layers=DEMO_LAYERS, per_class=30, rank=10, method=method,
        max_iter=DEFAULT_MAX_ITER if max_iter is None else max_iter, pixels=pixels,
        fidelity_ranks=(5,), top_images=6, neighbours=10, seed=seed,
    )


class _Stages:
    """Logs one line per stage and records its wall time in seconds."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    def log(self, message: str) -> None:
        if self.progress:
            print(f"[jaxcnmf] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str, what: str):
        self.log(f"{name}: {what}")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.log(f"{name}: done in {self.seconds[name]:.1f} s")


def _ours(model) -> bool:
    """Whether ``model`` is one of ``jaxcnmf.models`` (else the user's own network)."""
    from jaxcnmf.nets import models

    try:
        models.probe_layers(model)
    except ValueError:
        return False
    return True


def _layer_shapes(model, variables, image_shape) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of the probe-able layers: for our networks their probe points
    first (``probe.available_layers``), for the user's every submodule in call order."""
    from jaxcnmf.nets import probe

    if _ours(model):
        return probe.available_layers(model, input_shape=tuple(image_shape))
    return probe.available_layers(model, image_shape=tuple(image_shape), variables=variables)


def _check_layers(model, layers, name: str = "layers", *, variables=None,
                  image_shape=None) -> tuple[str, ...]:
    """``layers`` as a tuple of distinct probe-able layers of ``model`` (None: all of them);
    errors name the parameter ``name``. The user's networks (``image_shape`` given) list
    their layers by tracing a forward pass."""
    from jaxcnmf.nets import models

    if _ours(model):
        available = models.probe_layers(model)
    else:
        available = tuple(_layer_shapes(model, variables, image_shape))
    if layers is None:
        return available
    layers = tuple(layers)
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        raise ValueError(
            f"{name}: unknown layer {unknown[0]!r} for model {type(model).__name__}; "
            f"expected some of {', '.join(available)}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: expected distinct names, got {', '.join(layers)}")
    return layers


def _check_config(config: RunConfig) -> None:
    """Checks that need no data: they fail before anything is loaded."""
    _mesh(config)
    if config.split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {config.split!r}")
    if config.groups not in ("class", "superclass"):
        raise ValueError(f"groups: expected 'class' or 'superclass', got {config.groups!r}")
    if config.pixel_mode not in PIXEL_MODES:
        raise ValueError(f"pixels: expected True, False or one of {', '.join(PIXEL_MODES)}, "
                         f"got {config.pixels!r}")
    if config.pixel_share is not None and not (
            isinstance(config.pixel_share, (int, float)) and 0 < config.pixel_share < 1):
        raise ValueError(f"pixel_share: expected a fraction in (0, 1) or None, got "
                         f"{config.pixel_share!r}")
    if config.group_lam_fraction is not None:
        if not 0 < config.group_lam_fraction <= 1:
            raise ValueError(f"group_lam_fraction: expected a fraction in (0, 1], got "
                             f"{config.group_lam_fraction!r}")
        if config.group_lam > 0:
            raise ValueError(f"group_lam_fraction: expected either group_lam or "
                             f"group_lam_fraction, got both (group_lam={config.group_lam})")
    if config.model_module is not None and config.layers is None:
        # Every submodule of a user's network is probe-able, pre-activation ones too.
        raise ValueError("layers: expected the layers to probe in your network (--layers "
                         "a,b; every submodule's output is a layer, named by its path)")
    if config.layers is not None and not config.layers:
        # The analyses (k-means baseline, neurons per layer, fidelity) are about layers.
        raise ValueError("layers: expected at least one layer, got none")
    if config.checkpoint is not None and not Path(config.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint: {config.checkpoint} does not exist")
    if config.store is not None:
        _check_store_config(config)
    elif config.store_block_size is not None:
        raise ValueError(f"store_block_size: expected None without store, got "
                         f"{config.store_block_size!r}")
    _check_user_model(config)


def _check_store_config(config: RunConfig) -> None:
    """What a run from a store cannot do, said before anything is loaded."""
    if config.store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype: expected one of {', '.join(STORE_DTYPES)}, got "
                         f"{config.store_dtype!r}")
    if config.group_penalty and config.groups == "superclass":
        raise ValueError("store: the fit streamed from a store has the group penalty only "
                         "when no group's images straddle two blocks, and the probe set "
                         "is ordered by class, so a superclass's classes are not contiguous; "
                         "use --groups class, or fit in memory without --store")
    if config.restarts != 1:
        raise ValueError(f"restarts: the fit streamed from a store runs one start; expected "
                         f"1, got {config.restarts}")
    if isinstance(config.fidelity_images, bool) or not isinstance(config.fidelity_images, int) \
            or config.fidelity_images < 1:
        raise ValueError(f"fidelity_images: expected a positive integer, got "
                         f"{config.fidelity_images!r}")
    block_size = config.store_block_size
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"store_block_size: expected a positive integer or None, got "
                         f"{block_size!r}")
    path = Path(config.store)
    if path.exists() and not path.is_dir():
        raise ValueError(f"store: {path} exists and is not a directory; expected a new "
                         "directory or a store written by an earlier run")


def _check_user_model(config: RunConfig) -> None:
    """The user's network, before any data: its module imports, its checkpoint is orbax
    (and an orbax checkpoint comes with a module to build its network)."""
    from jaxcnmf.nets import train, usermodel

    if config.model_module is None:
        if config.checkpoint is not None and train.find_checkpoint(config.checkpoint) is None \
                and usermodel.is_orbax_checkpoint(config.checkpoint):
            raise ValueError(
                f"checkpoint: {config.checkpoint} is an orbax checkpoint, which holds weights "
                "but not the network; name the network with --model-module MODULE:BUILDER"
            )
        if config.input_shape is not None:
            raise ValueError("input_shape: only for a network of model_module (our "
                             "checkpoints record their own)")
        return
    shape = config.input_shape
    if shape is not None and not (
            len(shape) == 3 and all(isinstance(v, int) and v >= 1 for v in shape)
            and shape[2] in (1, 3)):
        raise ValueError(f"input_shape: expected (H, W, C) of positive integers with C 1 or "
                         f"3, got {shape!r}")
    usermodel.import_builder(config.model_module)
    if config.checkpoint is not None:
        if train.find_checkpoint(config.checkpoint) is not None:
            raise ValueError(
                f"checkpoint: {config.checkpoint} was written by 'jaxcnmf train' and "
                "rebuilds its own network; leave out --model-module, or pass an orbax "
                "checkpoint of your network"
            )
        usermodel.find_orbax_or_raise(config.checkpoint)


def _check_tcav_config(tcav_config: TcavConfig) -> None:
    """TCAV checks that need no data."""
    from jaxcnmf.concepts import tcav

    if tcav_config.random_runs < 2:
        raise ValueError(f"random_runs: expected an integer >= 2, got {tcav_config.random_runs}")
    if tcav_config.top is not None and tcav_config.top < 1:
        raise ValueError(f"top: expected a positive integer, got {tcav_config.top}")
    if tcav_config.correction not in tcav.CORRECTIONS:
        raise ValueError(f"correction: expected one of {', '.join(tcav.CORRECTIONS)}, "
                         f"got {tcav_config.correction!r}")
    if tcav_config.cav_method not in tcav.CAV_METHODS:
        raise ValueError(f"cav: expected one of {', '.join(tcav.CAV_METHODS)}, "
                         f"got {tcav_config.cav_method!r}")
    if not 0 < tcav_config.alpha < 1:
        raise ValueError(f"alpha: expected a level in (0, 1), got {tcav_config.alpha}")


def _check_tcav_probe(tcav_config: TcavConfig, n_images: int, class_names) -> None:
    """TCAV checks against the probe set: concept size, class names."""
    limit, top = n_images // 3, _tcav_top(tcav_config, n_images)
    if top > limit or limit < 1:
        raise ValueError(
            f"top: expected 1 <= top <= {limit} (a third of the {n_images} probe images: "
            f"each random run draws two sets of top images from outside the concept), "
            f"got {top}"
        )
    if tcav_config.classes is not None:
        unknown = [name for name in tcav_config.classes if name not in class_names]
        if unknown:
            raise ValueError(f"classes: unknown class {unknown[0]!r}; expected 'all' or some "
                             f"of {', '.join(class_names)}")
        if len(set(tcav_config.classes)) != len(tcav_config.classes):
            raise ValueError(f"classes: expected distinct names, got "
                             f"{', '.join(tcav_config.classes)}")


def _tcav_top(tcav_config: TcavConfig, n_images: int) -> int:
    return min(DEFAULT_TCAV_TOP, n_images // 3) if tcav_config.top is None else tcav_config.top


def _tcav_layers(model, tcav_config: TcavConfig, probed, image_shape,
                 variables=None) -> tuple[str, ...]:
    """The layers to test: the requested ones (any probe-able layer) or the default.

    The default skips the last probed spatial layer when an earlier one was probed: in
    our networks it feeds a linear head (average pool, dense), where every TCAV score is
    0 or 1.
    """
    if tcav_config.layers is None:
        shapes = _layer_shapes(model, variables, image_shape)
        spatial = [layer for layer in probed if len(shapes[layer]) == 3]
        if len(spatial) >= 2:
            return (spatial[-2],)
        return ((spatial or list(probed))[-1],)
    return _check_layers(model, tcav_config.layers, name="layer", variables=variables,
                         image_shape=image_shape)


def _check_probe_set(config: RunConfig, probe_set) -> None:
    """Checks against the probe set: ranks, groups."""
    n_images = len(probe_set.labels)
    for name, ranks in (("rank", (config.rank,)), ("fidelity_ranks", config.fidelity_ranks)):
        for rank in ranks:
            if not 1 <= rank <= n_images:
                raise ValueError(
                    f"{name}: expected 1 <= rank <= {n_images} (the number of probe images), "
                    f"got {rank}; lower the rank or raise --per-class"
                )
    if config.group_penalty and config.groups == "superclass" \
            and probe_set.coarse_labels is None:
        raise ValueError(
            f"groups: 'superclass' needs a dataset with coarse labels; "
            f"{config.dataset!r} has none (use --groups class)"
        )
    _store_class_size(config, probe_set.labels)


def _store_class_size(config: RunConfig, labels) -> int | None:
    """With a store and a group penalty (on classes), the images per class ``m``; else None.

    The streamed group lasso needs no class across two of its steps: it holds when the
    probe set is one run of ``m`` images per class (a ``per_class`` one, ordered by class)
    and blocks and the devices' shares ``ceil(N / devices)`` are multiples of ``m``. What
    breaks that is refused here, before any probing.
    """
    if config.store is None or not config.group_penalty:
        return None
    labels = np.asarray(labels)
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(labels)) + 1, [len(labels)]]))
    if len(runs) != len(np.unique(labels)):
        raise ValueError("store: the group penalty from a store needs each class's probe "
                         "images together, and this probe set has classes split between "
                         "other classes' images (pass --per-class N for a probe set ordered "
                         "by class, or fit in memory without --store)")
    if runs.min() != runs.max():
        raise ValueError(f"store: the group penalty from a store needs as many probe images "
                         f"in every class, and this probe set has {runs.min()} to "
                         f"{runs.max()} (pass --per-class N for a balanced probe set, or fit "
                         f"in memory without --store)")
    m = int(runs[0])
    size = config.store_block_size
    if size is not None and size % m:
        raise ValueError(f"store: the group penalty from a store needs whole classes in "
                         f"every block, and --store-block-size {size} is not a multiple of "
                         f"the {m} images per class (pass --store-block-size "
                         f"{max(m, size // m * m)}, or leave it out)")
    mesh = _mesh(config)
    devices = 1 if mesh is None else mesh.size
    share = -(-len(labels) // devices)
    if share % m:
        raise ValueError(f"store: the group penalty from a store needs whole classes on "
                         f"every device, and {devices} devices get ceil({len(labels)} / "
                         f"{devices}) = {share} probe images each, not a multiple of the {m} "
                         f"images per class (choose --devices so that it is, or fit in "
                         f"memory without --store)")
    return m


def _store_rows(config: RunConfig, model, variables, layers, pixels, image_shape) -> int:
    """Rows of all views the probe stage writes to the store (with our networks' logits),
    as ``probe.collect`` counts them for its default block size."""
    from jaxcnmf.nets import probe

    shapes = _layer_shapes(model, variables, image_shape)
    probed = layers + (() if config.model_module is not None else (LOGITS,))
    rows = sum(probe._view_rows(shapes[name], config.pooling) for name in probed)
    h, w, c = image_shape
    return rows + h * w * {"none": 0, "gray": 1}.get(pixels, c)


def _class_block_size(default: int, class_size: int) -> int:
    """The largest multiple of ``class_size`` not above ``default`` (at least
    ``class_size``): blocks of whole classes, for the group penalty from a store."""
    return max(class_size, default // class_size * class_size)


def _load_network(config: RunConfig):
    """The model, its variables (None when it still has to be trained) and its record.

    A network to be trained is built with one class, so that its layers can be checked
    before the data are read; ``_fit_classes`` gives it the dataset's classes.
    """
    from jaxcnmf.nets import models, train

    if config.checkpoint is None:
        return models.build(config.model, 1, config.width), None, {
            "model_name": config.model, "width": config.width}
    checkpoint = train.load_checkpoint(config.checkpoint)
    return checkpoint.model, checkpoint.variables, _model_record(checkpoint.meta,
                                                                 str(checkpoint.path))


def _load_user_network(config: RunConfig, image_shape: tuple[int, ...], num_classes: int):
    """The user's network (``config.model_module``), built for the dataset and restored
    from ``config.checkpoint``; its variables (Linen) or None; and its run.json record.

    Checks that the network takes the dataset's images and has one logit per class.
    """
    from jaxcnmf.nets import usermodel

    spec = config.model_module
    shape = tuple(config.input_shape or image_shape)
    if shape != tuple(image_shape):
        raise ValueError(
            f"input_shape: the network takes images of shape {shape} but dataset "
            f"{config.dataset!r} has {tuple(image_shape)}; probe it with a dataset of "
            f"{shape[0]}x{shape[1]} images with {shape[2]} channel(s)"
        )
    loaded = usermodel.load(spec, config.checkpoint, num_classes=num_classes,
                            input_shape=shape)
    _check_logits(loaded, shape, num_classes, f"dataset {config.dataset!r}")
    record = {"module": spec, "kind": loaded.kind,
              "checkpoint": None if loaded.checkpoint is None else str(loaded.checkpoint),
              "num_classes": num_classes, "input_shape": list(shape)}
    return loaded.model, loaded.variables, record


def _check_logits(loaded, image_shape, num_classes: int, where: str) -> None:
    """The user's network runs on ``image_shape`` images and has one logit per class."""
    from jaxcnmf.nets import probe

    try:
        logits = probe.network_shapes(loaded.model, loaded.variables, image_shape).logits
    except Exception as err:  # the user's forward pass may fail in any way on these images
        raise ValueError(f"model_module: the network built by {loaded.spec} does not run "
                         f"on images of shape {image_shape} ({where}): "
                         f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
    if tuple(logits) != (num_classes,):
        raise ValueError(
            f"model_module: the network built by {loaded.spec} outputs shape "
            f"{tuple(logits)} per image; {where} has {num_classes} classes, so expected "
            f"({num_classes},) logits"
        )


def _fit_classes(config: RunConfig, model, trained: bool, num_classes: int):
    if not trained:
        return model.clone(num_classes=num_classes)
    if model.num_classes != num_classes:
        raise ValueError(
            f"checkpoint: the network has {model.num_classes} classes but dataset "
            f"{config.dataset!r} has {num_classes}"
        )
    return model


def _model_record(meta: dict, checkpoint: str) -> dict[str, Any]:
    """The checkpoint facts the report shows (not its history or optimiser settings)."""
    keys = ("model_name", "width", "num_classes", "dataset", "accuracy", "epochs", "input_shape")
    return {"checkpoint": checkpoint, **{key: meta[key] for key in keys if key in meta}}


def _train(config: RunConfig, model, splits, checkpoint_dir: Path, progress: bool):
    """Train ``model`` on the train split; returns its variables and the model record."""
    result = _fit_network(model, splits, checkpoint_dir, epochs=config.epochs,
                          batch_size=config.train_batch_size, lr=config.lr,
                          augment=config.augment, schedule=config.schedule,
                          warmup=config.warmup, label_smoothing=config.label_smoothing,
                          seed=config.seed, progress=progress)
    return result.variables, {
        "model_name": config.model, "width": config.width, "checkpoint": str(checkpoint_dir),
        "num_classes": splits.num_classes, "accuracy": result.accuracy, "epochs": result.epochs,
    }


def _fit_network(network, splits, checkpoint_dir: Path, *, epochs: int, batch_size: int,
                 lr: float | None, augment: bool, seed: int, progress: bool,
                 schedule: str | None = None, warmup: float | None = None,
                 label_smoothing: float | None = None, resume: bool = False, **extra):
    """``train.fit`` on the train split, scored on the test split; None takes fit's default.

    ``resume=False`` starts from scratch; ``resume=True`` continues the checkpoint in
    ``checkpoint_dir`` (``extra`` then carries the rest of its recorded settings).
    """
    from jaxcnmf.nets import train

    optional = {"lr": lr, "schedule": schedule, "warmup": warmup,
                "label_smoothing": label_smoothing}
    extra.setdefault("flip", _flips(splits))
    return train.fit(
        network, splits.train, epochs=epochs, batch_size=batch_size, augment=augment,
        eval_ds=splits.test, checkpoint_dir=checkpoint_dir, resume=resume, seed=seed,
        progress=progress, **extra,
        **{name: value for name, value in optional.items() if value is not None},
    )


def _flips(splits) -> bool:
    # Mirrored digits are different symbols; photographs keep their class when mirrored.
    return splits.name != "digits"


# train_model's settings and the values they take when neither given nor resumed.
_TRAIN_DEFAULTS = {"model": "small", "epochs": 10, "width": 1.0, "batch_size": 128,
                   "lr": None, "augment": True, "schedule": None, "warmup": None,
                   "label_smoothing": None}


def _resumed_settings(checkpoint_dir: Path, given: dict[str, Any]):
    """The model and fit settings recorded in ``checkpoint_dir``; a given setting that
    differs from the recorded one is an error (resuming continues the same run)."""
    from jaxcnmf.nets import train

    if train.find_checkpoint(checkpoint_dir) is None:
        raise FileNotFoundError(
            f"resume: no checkpoint to resume in {checkpoint_dir} (nor {checkpoint_dir}.old); "
            "train without --resume to start one"
        )
    settings = train.resume_settings(checkpoint_dir)
    recorded = {**settings["fit"], "model": settings["meta"].get("model_name"),
                "width": settings["meta"].get("width")}
    for name, value in given.items():
        if value is not None and name in recorded and recorded[name] != value:
            raise ValueError(
                f"{name}: the checkpoint in {settings['checkpoint']} was trained with "
                f"{recorded[name]!r}, got {value!r}; --resume continues that run with its "
                "own settings (leave the option out, or start over with --force)"
            )
    return settings


def train_model(*, model: str | None = None, dataset: str | None = None, source=None, out,
                epochs: int | None = None, width: float | None = None,
                batch_size: int | None = None, lr: float | None = None,
                augment: bool | None = None, schedule: str | None = None,
                warmup: float | None = None, label_smoothing: float | None = None,
                seed: int = 0, force: bool = False, resume: bool = False,
                progress: bool = True) -> Path:
    """Train a network and save it to ``out/ckpt`` (``jaxcnmf train``).

    Args:
        model: "small" (default), "resnet18" or "vgg11".
        dataset, source: as for :func:`jaxcnmf.data.load` (dataset default: "digits", or
            the checkpoint's when resuming).
        out: output directory; receives ``ckpt/`` and ``train.json`` (history, accuracy,
            wall time).
        epochs, width, batch_size, lr, augment, schedule, warmup, label_smoothing, seed:
            training settings; None takes the default (epochs 10, width 1, batch 128,
            augment on, the trainer's lr, schedule, warm-up and label smoothing), or with
            ``resume`` the checkpoint's own.
        force: start over in an ``out`` that holds files.
        resume: continue the training checkpointed in ``out/ckpt`` (or the ``ckpt.old``
            copy a crash left); a given setting must equal the recorded one.
        progress: progress bars and per-epoch lines.

    Returns:
        Path of the checkpoint directory, for ``RunConfig(checkpoint=...)``.

    Raises:
        FileExistsError: ``out`` holds files (a checkpoint among them) without ``force``
            or ``resume``, or another run holds its lock.
        FileNotFoundError: ``resume`` without a checkpoint in ``out``.

    Example:
        >>> train_model(out="/tmp/digits", epochs=1)  # doctest: +SKIP
        PosixPath('/tmp/digits/ckpt')
    """
    from jaxcnmf.nets import data, models, train

    given = {"model": model, "epochs": epochs, "width": width, "batch_size": batch_size,
             "lr": lr, "augment": augment, "schedule": schedule, "warmup": warmup,
             "label_smoothing": label_smoothing}
    out = Path(out)
    checkpoint_dir = out / CHECKPOINT_DIR
    if resume:
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"output directory: {out} exists and is not a directory")
        settings = _resumed_settings(checkpoint_dir, given)
        network, fit_settings = settings["model"], dict(settings["fit"])
        model, width = settings["meta"].get("model_name", "?"), settings["meta"].get("width")
        epochs = fit_settings.pop("epochs")
        # The checkpoint names the split it trained on ("cifar10/train").
        recorded = settings["dataset"].removesuffix("/train")
        dataset = dataset or recorded or "digits"
    else:
        found = train.find_checkpoint(checkpoint_dir)
        if found is not None and not force:
            raise FileExistsError(
                f"output directory {out} already holds a checkpoint ({found}); pass --resume "
                "to continue its training, --force to start over, or choose another --out"
            )
        check_out_dir(out, force)
        values = {name: _TRAIN_DEFAULTS[name] if value is None else value
                  for name, value in given.items()}
        model, epochs, width = values["model"], values["epochs"], values["width"]
        network = models.build(model, 1, width)  # fails on a bad name before data is read
        fit_settings = {name: values[name] for name in ("batch_size", "lr", "augment",
                                                       "schedule", "warmup",
                                                       "label_smoothing")}
        fit_settings["seed"] = seed
        dataset = dataset or "digits"
    stages = _Stages(progress)
    with stages("data", f"loading {dataset}"):
        splits = data.load(dataset, source=source, progress=progress)
    if not resume:
        network = network.clone(num_classes=splits.num_classes)
    with lock_run_dir(out):
        verb = "resuming" if resume else "training"
        with stages("train", f"{verb} {model} on {dataset}, {epochs} epochs"):
            result = _fit_network(network, splits, checkpoint_dir, epochs=epochs,
                                  resume=resume, progress=progress, **fit_settings)
        write_json_atomic(out / "train.json", {
            "model": model, "dataset": dataset, "width": width, "epochs": result.epochs,
            "accuracy": result.accuracy, "history": result.history,
            "seconds": stages.seconds, "resumed": resume, "environment": environment(),
        })
    stages.log(f"test accuracy {result.accuracy:.4f}")  # the path itself goes to stdout
    return checkpoint_dir


def _group_ids(config: RunConfig, probe_set):
    if not config.group_penalty:
        return None
    if config.groups == "superclass":
        return np.asarray(probe_set.coarse_labels)
    return np.asarray(probe_set.labels)


def run(config: RunConfig, out: str | os.PathLike, *, force: bool = False,
        progress: bool = True, tcav: TcavConfig | None = None) -> Path:
    """Run every stage and write the run directory ``out``.

    Args:
        config: the settings (see :class:`RunConfig`).
        out: the run directory; created, or reused when it holds no files.
        force: overwrite a run directory that already holds files.
        progress: progress bars and one log line per stage on stderr.
        tcav: when given, a last stage tests the concepts with TCAV (as
            :func:`run_tcav` does) before the report is drawn.

    Returns:
        Path of ``report.html``.

    Raises:
        FileExistsError: ``out`` is not a directory, holds files and ``force`` is False,
            or another run holds its lock (see :func:`jaxcnmf.runs.rundir.lock_run_dir`).
        FileNotFoundError: a missing checkpoint or dataset.
        ValueError: an unknown dataset or layer, a rank larger than the probe set, or any
            other setting the library rejects (all raised before training); or a group
            penalty that zeroes every concept (the run is then marked "failed").

    Warns:
        DeadConceptWarning: some concepts are empty at the end of the fit (one warning,
            in RunConfig words; ``run.json`` and ``analysis.json`` record
            ``"dead_concepts"``).

    ``run.json``'s status ends "complete", "failed" (with ``"error"``) or "interrupted"
    (KeyboardInterrupt; the CLI turns SIGTERM into one).

    Example:
        >>> run(demo_config(quick=True), "/tmp/demo").name  # doctest: +SKIP
        'report.html'
    """
    from jaxcnmf.nets import data

    _check_config(config)
    if tcav is not None:
        _check_tcav_config(tcav)
    out = check_out_dir(out, force)
    stages = _Stages(progress)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    user = config.model_module is not None
    if not user:  # our networks are checked before the data are read
        with stages("model", "loading the checkpoint" if config.checkpoint
                    else "building the network"):
            model, variables, meta = _load_network(config)
            layers = _check_layers(model, config.layers)

    with stages("data", f"loading {config.dataset} and a balanced probe set"):
        if not user and variables is None:  # training needs both splits
            splits = data.load(config.dataset, source=config.source, progress=progress)
            probe_set = getattr(splits, config.split)
            if config.per_class is not None:
                probe_set = data.balanced_subset(probe_set, config.per_class, seed=config.seed)
            dataset_name = splits.name
        else:
            # The same images as above, but an image folder decodes only the probe set's.
            splits = None
            probe_set = data.load_probe_set(config.dataset, config.source, split=config.split,
                                            per_class=config.per_class, seed=config.seed,
                                            progress=progress)
            dataset_name = probe_set.name.rpartition("/")[0]
    _check_probe_set(config, probe_set)
    if user:  # the builder may want the dataset's classes and image shape
        with stages("model", f"building {config.model_module}"
                    + (f", restoring {config.checkpoint}" if config.checkpoint else "")):
            model, variables, meta = _load_user_network(
                config, tuple(probe_set.images.shape[1:]), probe_set.num_classes)
            layers = _check_layers(model, config.layers, variables=variables,
                                   image_shape=meta["input_shape"])
    else:
        model = _fit_classes(config, model, variables is not None, probe_set.num_classes)
    analysed = _analysis_subset(config, probe_set.labels)
    if tcav is not None:
        _check_tcav_probe(tcav, len(probe_set.labels) if analysed is None else len(analysed),
                          probe_set.class_names)
        tcav_layers = _tcav_layers(model, tcav, layers, probe_set.images.shape[1:],
                                   variables)

    pixels = _pixel_mode(config, probe_set.images, stages)
    if config.store is not None and (variables is not None or user):
        # A store of another checkpoint or probe set is refused before the run starts.
        _store_plan(config, meta["checkpoint"], model, variables, layers, pixels, probe_set)
    record = {
        "status": "running",
        "started": started,
        "config": config.to_json(),
        "dataset": {
            "name": dataset_name or config.dataset,
            "class_names": list(probe_set.class_names),
            "superclass_names": list(probe_set.superclass_names or ()),
            "split": config.split,
            "probe_images": int(len(probe_set.labels)),
            "image_shape": list(probe_set.images.shape[1:]),
        },
        "model": {"name": type(model).__name__, **meta},
        "layers": list(layers),
        "pixels": pixels,
        **({} if tcav is None else {"tcav": tcav.to_json()}),
        "seconds": stages.seconds,
        "environment": environment(),
    }
    with lock_run_dir(out):
        start_run_dir(out, record)
        before = files_under(out)  # the user's own files, which the run leaves alone

        def save_record():
            record["files"] = _outside_store(written_files(out, before, [RUN_JSON]), out,
                                             config.store)
            write_json_atomic(out / RUN_JSON, record)

        try:
            report_path = _run_stages(config, tcav, out, stages, record, save_record, model,
                                      variables, splits, probe_set, layers, pixels,
                                      tcav_layers if tcav is not None else None, progress)
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            record["error"] = "KeyboardInterrupt: interrupted (Ctrl-C or SIGTERM)"
            save_record()
            raise
        except BaseException as err:
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"
            save_record()
            raise
    return report_path


def _outside_store(files, out: Path, store) -> list[str]:
    """``files`` (relative to ``out``) without those of a store inside ``out``: a store
    outlives its run, so ``--force`` (which deletes what a run wrote) leaves it to be
    resumed or reused."""
    if store is None:
        return files
    try:
        inside = Path(store).resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return files
    return [f for f in files if f != inside and not f.startswith(inside + "/")]


def _pixel_mode(config: RunConfig, images, stages) -> str:
    """The pixel views for these probe images: "rgb", "gray" or "none" ("auto" resolved,
    with one log line when it collapses gray-as-RGB pictures to one gray view)."""
    from jaxcnmf.nets import data

    mode = config.pixel_mode
    if images.shape[-1] == 1:
        return "none" if mode == "none" else "rgb"  # one channel is the one gray view
    if mode == "auto":
        if data.same_channels(images):
            stages.log("pixels: red, green and blue are equal in every probe image (gray "
                       "pictures stored as RGB); using one gray pixel view (--pixels rgb "
                       "keeps three)")
            return "gray"
        return "rgb"
    return mode


def _run_stages(config, tcav, out, stages, record, save_record, model, variables, splits,
                probe_set, layers, pixels, tcav_layers, progress) -> Path:
    """The stages after the run directory is set up; ``record`` is updated as they go."""
    from jaxcnmf.nets import probe, usermodel
    from jaxcnmf.runs import report

    if config.trains:
        with stages("train", f"{config.model} on {config.dataset}, {config.epochs} epochs"):
            variables, trained = _train(config, model, splits, out / CHECKPOINT_DIR,
                                        progress)
            record["model"].update(trained)
    store_plan = None
    if config.store is not None:
        store_plan = _store_plan(config, record["model"]["checkpoint"], model, variables,
                                 layers, pixels, probe_set, stages)
    with stages("probe", f"{len(probe_set.labels)} images, layers {', '.join(layers)}"
                         + ("" if config.store is None else f", into the store {config.store}")):
        if config.store is None and config.model_module is None:
            # The logits come from the same forward pass; they are the one view that may
            # be negative, and they are not factorized.
            views = probe.collect(
                model, variables, probe_set.images, layers + (LOGITS,), pixels=pixels,
                pooling=config.pooling, batch_size=config.batch_size, progress=progress,
                allow_negative=True,
            )
            predictions = views.pop(LOGITS).argmax(axis=0)
        elif config.store is None:
            # The user's logits need not be any layer's output; a layer with negative
            # values (pre-activation) is refused with the advice to probe the one after.
            views = probe.collect(
                model, variables, probe_set.images, layers, pixels=pixels,
                pooling=config.pooling, batch_size=config.batch_size, progress=progress,
            )
            predictions = usermodel.predict(model, variables, probe_set.images,
                                            config.batch_size).argmax(axis=1)
        else:
            views, predictions, record["store"] = _probe_to_store(
                config, store_plan, model, variables, probe_set, splits, layers, pixels,
                progress)
    record["views"] = {name: list(_view_shape(views, name)) for name in _view_names(views)}
    record["probe_accuracy"] = float(np.mean(predictions == probe_set.labels))

    with stages("factorize", f"rank {config.rank}, {config.method}, {len(record['views'])} "
                             f"views" + ("" if config.store is None else ", streamed")):
        result, dead = _factorize(views, config, probe_set, progress)
    result.save(out / FACTORIZATION)
    np.savez_compressed(
        out / PROBE,
        images=probe_set.images,
        labels=probe_set.labels,
        coarse_labels=(probe_set.coarse_labels if probe_set.coarse_labels is not None
                       else np.full(len(probe_set.labels), -1)),
        predictions=predictions,
    )
    record["factorization"] = {
        "n_iter": int(result.n_iter),
        "converged": bool(result.converged),
        "relative_errors": {k: float(v) for k, v in result.relative_errors.items()},
        "stability": None if result.stability is None else float(result.stability),
        "devices": int(result.devices),
        "dead_concepts": dead,
        "group_lam": float(result.config.get("group_lam", 0.0)),
        "group_lam_fraction": result.config.get("group_lam_fraction"),
    }

    analyses = {"kmeans": None, "dead_concepts": dead, "without_pixels": None}
    with_pixels = any(name not in layers for name in _view_names(views))
    if config.baseline:
        with stages("baseline", f"k-means with k={config.rank} on {', '.join(layers)}"
                                + (", and the same fit without the pixel views"
                                   if with_pixels else "")):
            analyses["kmeans"] = _kmeans(config, views, probe_set, layers, progress)
            if with_pixels:
                analyses["without_pixels"] = _without_pixels(config, views, probe_set, layers)
    with stages("fidelity", "fidelity per layer and rank"):
        analyses.update(_fidelity(config, model, variables, views, result, probe_set,
                                  layers, progress))
    write_json_atomic(out / ANALYSIS, analyses)
    if tcav is not None:
        with stages("tcav", f"{config.rank} concepts at {', '.join(tcav_layers)}, "
                            f"{tcav.random_runs} random runs"):
            _tcav_step(tcav, tcav_layers, model, variables, result, probe_set.images,
                       probe_set.labels, probe_set.class_names, out, progress,
                       pool=_analysis_subset(config, probe_set.labels))
    save_record()

    with stages("report", "figures, tables and report.html"):
        # Drawn from the saved files, as `jaxcnmf report` does, so a re-draw is identical.
        report_path = report.write_report(out, progress=progress, status="complete")
    record["status"] = "complete"
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    save_record()
    write_bytes_atomic(out / COMPLETE, (record["finished"] + "\n").encode())
    record["files"] = sorted(set(record["files"]) | {COMPLETE})
    write_json_atomic(out / RUN_JSON, record)
    return report_path


def _store_identity(config: RunConfig, checkpoint, variables, layers, pixels) -> dict[str, Any]:
    from jaxcnmf.runs import runstore

    return runstore.identity(
        checkpoint=checkpoint, variables=variables, layers=layers,
        pooling=config.pooling, pixels=pixels, dataset=config.dataset, split=config.split,
        per_class=config.per_class, seed=config.seed)


def _network_weights(model, variables):
    """The pytree of a network's weights, whatever its kind: Linen variables, an NNX
    module's state, a function's params (what the store's identity hashes)."""
    from jaxcnmf.nets import adapters

    return adapters.adapt(model, variables).state


def _store_plan(config: RunConfig, checkpoint, model, variables, layers, pixels, probe_set,
                stages=None):
    """Check ``config.store`` against this run and say (with ``stages``, in a log line)
    what the probe stage will do with it; returns the plan and the run's identity.

    With the group penalty a new store's default block size is whole classes, and a
    store written before with blocks of another size is refused.
    """
    from jaxcnmf.runs import runstore
    from jaxcnmf.solver import store

    identity = _store_identity(config, checkpoint, _network_weights(model, variables), layers,
                               pixels)
    plan = runstore.plan(config.store, identity, dtype=config.store_dtype,
                         block_size=config.store_block_size)
    class_size = _store_class_size(config, probe_set.labels)
    if class_size is not None and plan.block_size is None:
        image_shape = tuple(probe_set.images.shape[1:])
        rows = _store_rows(config, model, variables, layers, pixels, image_shape)
        default = store.default_block_size(rows, len(probe_set.labels), config.store_dtype)
        plan = plan._replace(block_size=_class_block_size(default, class_size))
    elif class_size is not None and plan.block_size % class_size:
        raise ValueError(f"store: {config.store} has blocks of {plan.block_size} images, not "
                         f"a multiple of the {class_size} images per class, so classes "
                         f"straddle blocks and the group penalty cannot stream from it "
                         f"(choose another --store directory)")
    if stages is not None and plan.state == "reuse":
        stages.log(f"store: reusing the complete store {config.store} of this checkpoint, "
                   f"layers and probe set ({plan.n_blocks} blocks); probing is skipped")
    elif stages is not None and plan.state == "resume":
        stages.log(f"store: resuming the unfinished store {config.store}: {plan.written} of "
                   f"{plan.n_blocks} blocks written, probing the rest")
    return plan, identity


def _probe_to_store(config: RunConfig, store_plan, model, variables, probe_set, splits,
                    layers, pixels, progress):
    """The probe stage with a store: write (or resume, or reuse) it, then read back the
    network's predictions from its logits view.

    Returns the store without the logits view (what the fit streams), the ``(N,)``
    predictions and ``run.json``'s ``"store"`` record.
    """
    from jaxcnmf.nets import probe
    from jaxcnmf.runs import runstore
    from jaxcnmf.solver import store

    plan, identity = store_plan
    if plan.state == "reuse":
        s = store.open(config.store)
    else:
        superclasses = list(probe_set.superclass_names or ()) or None
        # Our networks' logits are their layer "fc", stored as one more view; a user's
        # network is run once more for them, and its layers must be non-negative.
        user = config.model_module is not None
        s = probe.collect(
            model, variables, probe_set.images, layers + (() if user else (LOGITS,)),
            pixels=pixels, pooling=config.pooling, batch_size=config.batch_size,
            progress=progress, allow_negative=not user, store=config.store,
            dtype=config.store_dtype, block_size=plan.block_size,
            store_info={"labels": np.asarray(probe_set.labels, np.int64),
                        "class_names": list(probe_set.class_names),
                        "superclasses": superclasses, "provenance": identity})
    # One pass: the predictions, and the norms the view weights need (kept on the store).
    if config.model_module is None:
        predictions, _ = runstore.scan(s, LOGITS)
    else:
        from jaxcnmf.nets import usermodel

        runstore.scan(s)
        predictions = usermodel.predict(model, variables, probe_set.images,
                                        config.batch_size).argmax(axis=1)
    state = {"new": "written", "resume": "resumed", "reuse": "reused"}[plan.state]
    views = runstore.select(s, [name for name in s.views if name != LOGITS])
    return views, predictions, runstore.describe(s, state)


def _view_shape(views, name) -> tuple[int, int]:
    """``(rows, N)`` of a view of a dict of views or of a store."""
    if isinstance(views, dict):
        return tuple(views[name].shape)
    return views.rows[name], views.n


def _analysis_subset(config, labels) -> np.ndarray | None:
    """With a store, the probe images fidelity and TCAV run on: ``fidelity_images`` of
    them at random (drawn with the seed, in probe order); None (all) without a store or
    when there are no more than that.

    ``config`` is a :class:`RunConfig` or its ``to_json`` dict (a saved run's).
    """
    get = config.get if isinstance(config, dict) else functools.partial(getattr, config)
    n, size = len(labels), get("fidelity_images", DEFAULT_FIDELITY_IMAGES)
    if get("store", None) is None or n <= size:
        return None
    rng = np.random.default_rng(get("seed", 0))
    return np.sort(rng.choice(n, size=size, replace=False))


def _factorize(views, config: RunConfig, probe_set, progress: bool):
    """``jaxcnmf.fit`` with the run's settings; returns the result and how many of its
    concepts are empty (then warned about once, in the run's words)."""
    import jaxcnmf
    from jaxcnmf.solver import fit as solver

    with warnings.catch_warnings():
        # fit's own warning names library internals; the one below names the setting.
        warnings.simplefilter("ignore", solver.DeadConceptWarning)
        result = jaxcnmf.fit(views, config.rank, progress=progress,
                             **_fit_settings(config, probe_set, views))
    dead = int(np.sum(~solver._live_mask(result)))
    if dead:
        if config.group_lam_fraction is not None:
            where, hint = f"group_lam_fraction {config.group_lam_fraction:g}", "fraction"
        elif config.group_lam > 0:
            where, hint = f"group_lam {config.group_lam:g}", "value"
        else:
            where, hint = f"rank {config.rank}", "rank"
        warnings.warn(f"{dead} of {config.rank} concepts are empty at {where}; try a "
                      f"smaller {hint}", solver.DeadConceptWarning, stacklevel=3)
    return result, dead


def _mesh(config: RunConfig):
    """The 1-D mesh over ``config.devices`` local devices, or None for one device."""
    import jax

    available = jax.local_device_count()
    devices = available if config.devices is None else config.devices
    if isinstance(devices, bool) or not isinstance(devices, int) or not 1 <= devices <= available:
        raise ValueError(f"devices: expected an integer from 1 to the {available} local "
                         f"device(s), got {config.devices!r}")
    if devices == 1:
        return None
    return jax.make_mesh((devices,), ("n",), devices=jax.local_devices()[:devices])


PIXEL_VIEWS = frozenset({"red", "green", "blue", "gray"})


def view_weights(config: RunConfig, views) -> str | dict[str, float] | None:
    """The fit's view weights: ``config.weights``, with the pixel views' share set.

    Balanced weights give each view ``1 / ||X_v||^2`` (every view the same total weight);
    with ``pixel_share`` the pixel views together get that share of the objective and the
    layer views the rest, in equal parts. ``views`` is a dict of ``(rows_v, N)`` arrays or
    a :class:`jaxcnmf.store.Store` (its norms then take one pass over its blocks).
    """
    names = _view_names(views)
    pixels = [name for name in names if name in PIXEL_VIEWS]
    layers = [name for name in names if name not in PIXEL_VIEWS]
    if config.weights != "balanced" or config.pixel_share is None or not pixels or not layers:
        return config.weights
    if isinstance(views, dict):
        norms = {name: float(np.sum(np.square(np.asarray(X, np.float64))))
                 for name, X in views.items()}
    else:  # a store: the norms of its first scan, else one pass over its blocks
        from jaxcnmf.runs import runstore

        norms = runstore.sq_norms(views)
    weights = {}
    for name in names:
        norm = norms[name] or 1.0
        part = config.pixel_share / len(pixels) if name in pixels else \
            (1.0 - config.pixel_share) / len(layers)
        weights[name] = part / norm
    return weights


def _view_names(views) -> tuple[str, ...]:
    """The view names of a dict of views or of a store."""
    return tuple(views) if isinstance(views, dict) else tuple(views.views)


def _fit_settings(config: RunConfig, probe_set, views) -> dict[str, Any]:
    return dict(mesh=_mesh(config),
        method=config.method, max_iter=config.max_iter, tol=config.tol, seed=config.seed,
        weights=view_weights(config, views), unit_columns=config.unit_columns,
        groups=_group_ids(config, probe_set), group_lam=config.group_lam,
        group_lam_fraction=config.group_lam_fraction, restarts=config.restarts,
    )


def _without_pixels(config, views, probe_set, layers) -> dict[str, Any]:
    """The same fit of the layer views alone: what coupling the pixels in costs or gains."""
    import jaxcnmf
    from jaxcnmf.concepts.labels import cluster_purity, nmi, strongest_concept

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer_views = _layer_views(views, layers)
        res = jaxcnmf.fit(layer_views, config.rank, progress=False,
                          **{**_fit_settings(config, probe_set, layer_views), "restarts": 1})
    assignment = strongest_concept(res.scaled_F())
    return {"nmi": nmi(assignment, probe_set.labels),
            "purity": cluster_purity(assignment, probe_set.labels), "n_iter": int(res.n_iter)}


def _layer_views(views, layers):
    """The layer views alone: a dict of them, or the store restricted to them (a streamed
    fit of it reads those views only)."""
    if isinstance(views, dict):
        return {layer: views[layer] for layer in layers}
    from jaxcnmf.runs import runstore

    return runstore.select(views, layers)


def _kmeans(config, views, probe_set, layers, progress: bool = False) -> dict[str, Any]:
    """The k-means baseline on the layer activations (it needs them: not redone later).

    From a store, mini-batch style: seeded on an in-memory sample of its columns, then
    Lloyd passes over its blocks (:func:`jaxcnmf.concepts.kmeans.kmeans_store`).
    """
    from jaxcnmf.concepts.labels import kmeans_baseline

    if isinstance(views, dict):
        baseline = kmeans_baseline(_layer_views(views, layers), probe_set.labels,
                                   k=config.rank, seed=config.seed)
    else:
        baseline = kmeans_baseline(views, probe_set.labels, k=config.rank, seed=config.seed,
                                   views=list(layers), progress=progress)
    return {"k": config.rank, "nmi": baseline.nmi, "purity": baseline.purity,
            "views": list(layers), "assignment": baseline.assignment.tolist()}


def _fidelity(config, model, variables, views, result, probe_set, layers, progress):
    """Fidelity per layer and rank (it needs the network: not redone later).

    From a store, the fits at the other ranks stream from it too, and the network runs on
    ``fidelity_images`` probe images drawn with the seed (the images of
    :func:`_analysis_subset`), whose activations are read from the store one layer at a
    time (:func:`jaxcnmf.concepts.fidelity.fidelity_from_store`).
    """
    import jaxcnmf
    from jaxcnmf.concepts.fidelity import fidelity, fidelity_from_store

    shapes = _layer_shapes(model, variables, probe_set.images.shape[1:])
    # A pooled conv layer cannot be put back into the network, so it has no fidelity.
    replaceable = [l for l in layers if config.pooling == "flatten" or len(shapes[l]) == 1]
    ranks = sorted(set(config.fidelity_ranks) - {config.rank})
    fits = [result]
    if replaceable:
        settings = {**_fit_settings(config, probe_set, views), "restarts": 1}
        for rank in progress_bar(ranks, progress, "fidelity fits"):
            fits.append(jaxcnmf.fit(views, rank, progress=False, **settings))
    rows = []
    for layer in progress_bar(replaceable, progress, "fidelity"):
        if isinstance(views, dict):
            table = fidelity(model, variables, probe_set.images, probe_set.labels, fits,
                             layer, activations=views[layer], shape=shapes[layer])
        else:
            table = fidelity_from_store(model, variables, views, fits, layer,
                                        n_images=config.fidelity_images, seed=config.seed,
                                        images=probe_set.images, labels=probe_set.labels)
        rows.extend(table.to_rows())
    subset = _analysis_subset(config, probe_set.labels)
    return {
        "fidelity": rows,
        "fidelity_skipped": [l for l in layers if l not in replaceable],
        "fidelity_images": len(probe_set.labels) if subset is None else len(subset),
    }


def _tcav_step(tcav_config: TcavConfig, layers, model, variables, result, images, labels,
               class_names, out: Path, progress: bool, pool=None):
    """Concepts from F's top images, classes from the probe set; TCAV; save the result.

    ``pool``: indices of the probe images the classes and the random sets come from
    (None: all; a run from a store passes its analysis subset, which bounds the images
    whose activations and gradients TCAV holds). The concepts are always the top images
    of all of F.
    """
    from jaxcnmf.concepts import tcav

    class_names = tuple(class_names)
    concepts_images = images
    if pool is not None:
        images, labels = images[pool], labels[pool]
    classes = {name: images[labels == class_names.index(name)]
               for name in tcav_config.classes or class_names}
    empty = [name for name, members in classes.items() if not len(members)]
    if tcav_config.classes is not None and empty:
        raise ValueError(f"classes: class {empty[0]!r} has no probe images")
    classes = {name: members for name, members in classes.items() if len(members)}
    top = _tcav_top(tcav_config, len(images))
    concepts = tcav.concepts_from_factors(result, concepts_images, top=top)
    scores = tcav.run(
        model, variables, list(layers), concepts, classes, class_names=class_names,
        random_runs=tcav_config.random_runs, pool=images, seed=tcav_config.seed,
        cav_method=tcav_config.cav_method, correction=tcav_config.correction,
        alpha=tcav_config.alpha, progress=progress,
    )
    scores = dataclasses.replace(scores, config={**scores.config, "top": top})
    save_tcav(out, scores)
    return scores


def _saved_network(saved, class_names) -> tuple[Any, Any]:
    """The saved run's network and its variables: the user's, re-built from the module
    and orbax checkpoint named in run.json, or ours, from its checkpoint."""
    from jaxcnmf.nets import train, usermodel

    recorded = saved.record.get("model", {})
    if recorded.get("module"):
        checkpoint = recorded.get("checkpoint")
        if checkpoint and not Path(checkpoint).exists():
            raise FileNotFoundError(
                f"checkpoint: TCAV needs the run's network; the orbax checkpoint {checkpoint} "
                "named in run.json is gone"
            )
        shape = tuple(recorded.get("input_shape") or saved.images.shape[1:])
        loaded = usermodel.load(recorded["module"], checkpoint,
                                num_classes=len(class_names), input_shape=shape)
        _check_logits(loaded, shape, len(class_names), "the run")
        return loaded.model, loaded.variables
    checkpoint = train.load_checkpoint(_run_checkpoint(saved))
    if checkpoint.model.num_classes != len(class_names):
        raise ValueError(
            f"checkpoint: the network at {checkpoint.path} has "
            f"{checkpoint.model.num_classes} classes but the run has {len(class_names)}"
        )
    return checkpoint.model, checkpoint.variables


def _run_checkpoint(saved) -> Path:
    """The saved run's network: its own ``ckpt/``, else the checkpoint run.json names."""
    own = saved.path / CHECKPOINT_DIR
    if own.is_dir():
        return own
    recorded = saved.record.get("model", {}).get("checkpoint")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    raise FileNotFoundError(
        f"checkpoint: TCAV needs the run's network; found neither {own} nor {recorded} "
        "(the checkpoint named in run.json)"
    )


def run_tcav(run_dir: str | os.PathLike, tcav_config: TcavConfig = TcavConfig(), *,
             progress: bool = True) -> Path:
    """Test a saved run's concepts with TCAV and re-draw its report (``jaxcnmf tcav``).

    Reads the run's factorization, probe set and network (its ``ckpt/`` or the checkpoint
    named in ``run.json``), scores every concept (the ``top`` images of a row of F) for
    every chosen class, writes ``tcav.json``, ``tcav.npz`` and the wall time to
    ``run.json``, and re-draws ``report.html``, whose TCAV section shows the heatmaps and
    the table of significant cells (also ``tables/tcav.csv``, ``figures/tcav_<layer>.png``).

    Args:
        run_dir: a directory written by :func:`run`.
        tcav_config: the TCAV settings (see :class:`TcavConfig`).
        progress: one log line per stage on stderr.

    Returns:
        Path of ``report.html``.

    Raises:
        FileNotFoundError: not a run directory, a run that stopped before its results
            were saved, or a network that is no longer where the run found it.
        ValueError: an unknown layer or class, ``top`` above a third of the probe set,
            fewer than two random runs, or any other setting the library rejects; all
            raised before any TCAV work.

    Example:
        >>> run_tcav("runs/demo", TcavConfig(top=30, random_runs=20))  # doctest: +SKIP
        PosixPath('runs/demo/report.html')
    """
    from jaxcnmf.runs import report

    _check_tcav_config(tcav_config)
    saved = load_run(run_dir)
    class_names = tuple(saved.record["dataset"]["class_names"])
    pool = _analysis_subset(saved.record["config"], saved.labels)
    _check_tcav_probe(tcav_config, len(saved.labels) if pool is None else len(pool),
                      class_names)
    stages = _Stages(progress)
    with stages("model", "loading the run's network"):
        model, variables = _saved_network(saved, class_names)
        layers = _tcav_layers(model, tcav_config, saved.record["layers"],
                              saved.images.shape[1:], variables)
    rank = saved.result.F.shape[0]
    with lock_run_dir(saved.path):
        before = files_under(saved.path)
        with stages("tcav", f"{rank} concepts at {', '.join(layers)}, "
                            f"{tcav_config.random_runs} random runs"):
            _tcav_step(tcav_config, layers, model, variables, saved.result, saved.images,
                       saved.labels, class_names, saved.path, progress, pool=pool)
        record = saved.record
        record["tcav"] = tcav_config.to_json()
        record.setdefault("seconds", {})["tcav"] = stages.seconds["tcav"]
        record["files"] = written_files(saved.path, before, record.get("files", ()))
        write_json_atomic(saved.path / RUN_JSON, record)
        with stages("report", "re-drawing report.html with the TCAV section"):
            path = report.write_report(saved.path, progress=progress)
        record["files"] = written_files(saved.path, before, record["files"])
        write_json_atomic(saved.path / RUN_JSON, record)
    return path
