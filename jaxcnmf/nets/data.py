"""Probe-set data: one dataset type and loaders for the formats users have.

A :class:`Dataset` holds uint8 images in NHWC layout with fine labels, class names and,
optionally, coarse (superclass) labels. :func:`load` returns the train and test splits of

- ``"digits"`` (the default): scikit-learn's bundled 8x8 handwritten digits, real data that
  ships inside the ``scikit-learn`` wheel and needs no files or network;
- ``"cifar10"`` / ``"cifar100"`` from the official CIFAR "python version" archives
  (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` or their extracted folders
  ``cifar-10-batches-py`` / ``cifar-100-python``), or from tensorflow-datasets;
- an image folder (one subfolder per class, or superclass/class folders);
- an ``.npz`` file of arrays.

Pixels stay uint8 until a model needs them; :func:`to_float` then scales them to [0, 1]
with no mean/std normalisation, which is what the coupled-NMF paper fed its networks and
keeps the pixel views non-negative.

Environment:
    ``JAXCNMF_DATA``: a folder searched for the official CIFAR archives (extracted or
    ``.tar.gz``) when ``load("cifar10")`` or ``load("cifar100")`` gets no ``source``;
    tensorflow-datasets is tried after it.

Example:
    >>> from jaxcnmf import data
    >>> ds = data.load("digits")
    >>> ds.train.images.shape[1:], ds.num_classes
    ((32, 32, 1), 10)
    >>> probe_set = data.balanced_subset(ds.test, per_class=30, seed=0)
    >>> len(probe_set), data.to_float(probe_set.images).dtype
    (300, dtype('float32'))
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

__all__ = [
    "KNOWN_DATASETS",
    "Dataset",
    "DatasetSplits",
    "balanced_subset",
    "channel_names",
    "load",
    "load_probe_set",
    "same_channels",
    "select_classes",
    "to_float",
]

KNOWN_DATASETS = ("digits", "cifar10", "cifar100")

IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)

_SPLITS = ("train", "test")
_DATA_ENV = "JAXCNMF_DATA"

# Official CIFAR python layout: folder inside the archive, its files per split, and the
# pickle keys of labels and names.
_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
        "meta": "batches.meta",
        "rows": {**{f"data_batch_{i}": 10000 for i in range(1, 6)}, "test_batch": 10000},
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ("train",),
        "test": ("test",),
        "meta": "meta",
        "rows": {"train": 50000, "test": 10000},
    },
}


@dataclass(frozen=True)
class Dataset:
    """Images with fine labels and, optionally, coarse (superclass) labels.

    Attributes:
        images: (N, H, W, C) uint8, C in {1, 3} (gray or RGB).
        labels: (N,) int64 fine labels in [0, num_classes).
        class_names: num_classes names, index = label.
        coarse_labels: (N,) int64 superclass labels in [0, len(superclass_names)), or
            None. Each fine class belongs to exactly one superclass.
        superclass_names: names of the superclasses (given together with
            ``coarse_labels``), or None.
        name: a short description such as ``"cifar10/test"``.

    Example:
        >>> import numpy as np
        >>> ds = Dataset(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 1, 0]), ("a", "b"))
        >>> ds.num_classes, len(ds.subset([1, 2]))
        (2, 2)
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    coarse_labels: np.ndarray | None = None
    superclass_names: tuple[str, ...] | None = None
    name: str = ""

    def __post_init__(self):
        where = f"Dataset {self.name!r}" if self.name else "Dataset"
        images = self.images
        if not isinstance(images, np.ndarray):
            raise TypeError(f"{where}: images: expected a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(
                f"{where}: images: expected dtype uint8 (pixels 0..255), got {images.dtype}"
            )
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"{where}: images: expected shape (N, H, W, C) with C in {{1, 3}}, "
                f"got {images.shape}"
            )
        class_names = _as_names(self.class_names, f"{where}: class_names")
        if not class_names:
            raise ValueError(f"{where}: class_names: expected at least one name, got none")
        labels = _as_labels(self.labels, f"{where}: labels", len(images), len(class_names))
        object.__setattr__(self, "class_names", class_names)
        object.__setattr__(self, "labels", labels)

        if (self.coarse_labels is None) != (self.superclass_names is None):
            given = "coarse_labels" if self.coarse_labels is not None else "superclass_names"
            raise ValueError(
                f"{where}: coarse_labels and superclass_names: expected both or neither, "
                f"got only {given}"
            )
        if self.coarse_labels is None:
            return
        superclass_names = _as_names(self.superclass_names, f"{where}: superclass_names")
        coarse = _as_labels(
            self.coarse_labels, f"{where}: coarse_labels", len(images), len(superclass_names)
        )
        pairs = np.unique(np.stack([labels, coarse]), axis=1)
        fine, counts = np.unique(pairs[0], return_counts=True)
        if np.any(counts > 1):
            bad = int(fine[np.argmax(counts > 1)])
            supers = [superclass_names[c] for c in pairs[1][pairs[0] == bad]]
            raise ValueError(
                f"{where}: coarse_labels: expected one superclass per class, got class "
                f"{class_names[bad]!r} (label {bad}) in superclasses {supers}"
            )
        object.__setattr__(self, "superclass_names", superclass_names)
        object.__setattr__(self, "coarse_labels", coarse)

    @property
    def num_classes(self) -> int:
        """Number of fine classes (``len(class_names)``), whether or not all occur."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices) -> Dataset:
        """The images at ``indices`` (ints or a boolean mask of length N), same names."""
        indices = np.asarray(indices)
        if indices.dtype != bool and not np.issubdtype(indices.dtype, np.integer):
            if indices.size:
                raise TypeError(f"indices: expected integers or booleans, got {indices.dtype}")
            indices = indices.astype(np.int64)
        coarse = None if self.coarse_labels is None else self.coarse_labels[indices]
        return dataclasses.replace(
            self,
            images=self.images[indices],
            labels=self.labels[indices],
            coarse_labels=coarse,
        )

    def class_counts(self) -> np.ndarray:
        """(num_classes,) int64 number of images per fine class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def summary(self) -> str:
        """One line: size, image shape, classes and per-class counts."""
        n, h, w, c = self.images.shape
        counts = self.class_counts()
        text = f"{self.name or 'dataset'}: {n} images {h}x{w}x{c} uint8, {self.num_classes} classes"
        if n:
            text += f" ({counts.min()}..{counts.max()} per class)"
        if self.superclass_names is not None:
            text += f", {len(self.superclass_names)} superclasses"
        return text


@dataclass(frozen=True)
class DatasetSplits:
    """A train and a test :class:`Dataset` sharing class names and image shape.

    Attributes:
        train: the training images (may hold zero images).
        test: the test images, from which probe sets are drawn.
        name: the dataset's name, e.g. ``"cifar100"``.
    """

    train: Dataset
    test: Dataset
    name: str = ""

    def __post_init__(self):
        for split in _SPLITS:
            if not isinstance(getattr(self, split), Dataset):
                raise TypeError(
                    f"DatasetSplits: {split}: expected a Dataset, got "
                    f"{type(getattr(self, split)).__name__}"
                )
        train, test = self.train, self.test
        for field in ("class_names", "superclass_names"):
            if getattr(train, field) != getattr(test, field):
                raise ValueError(
                    f"DatasetSplits {self.name!r}: {field}: expected the same in train and "
                    f"test, got {getattr(train, field)} and {getattr(test, field)}"
                )
        if len(train) and len(test) and train.images.shape[1:] != test.images.shape[1:]:
            raise ValueError(
                f"DatasetSplits {self.name!r}: images: expected the same (H, W, C) in train "
                f"and test, got {train.images.shape[1:]} and {test.images.shape[1:]}"
            )

    @property
    def num_classes(self) -> int:
        return self.test.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.test.class_names

    @property
    def superclass_names(self) -> tuple[str, ...] | None:
        return self.test.superclass_names

    def summary(self) -> str:
        """Two lines, one per split (see :meth:`Dataset.summary`)."""
        return f"{self.train.summary()}\n{self.test.summary()}"


def channel_names(num_channels: int) -> tuple[str, ...]:
    """Names of the pixel views for images with ``num_channels`` channels.

    Example:
        >>> channel_names(3), channel_names(1)
        (('red', 'green', 'blue'), ('gray',))
    """
    if num_channels == 3:
        return ("red", "green", "blue")
    if num_channels == 1:
        return ("gray",)
    raise ValueError(f"num_channels: expected 1 or 3, got {num_channels!r}")


def same_channels(images) -> bool:
    """Whether every pixel of every image has equal channels: gray pictures stored as RGB.

    Such images make three identical pixel views, which would give the duplicated data
    three times the weight of one gray view in a factorization.

    Args:
        images: (N, H, W, C) array, uint8 or float; C is 1 or 3.

    Returns:
        True when C is 1, or C is 3 and red == green == blue everywhere (exactly); False
        otherwise, and for an empty array of 3 channels.

    Example:
        >>> gray = np.repeat(np.arange(8, dtype=np.uint8).reshape(2, 2, 2, 1), 3, axis=-1)
        >>> same_channels(gray), same_channels(gray[..., ::-1] + np.array([0, 0, 1], np.uint8))
        (True, False)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images: expected shape (N, H, W, C) with C in {{1, 3}}, got {images.shape}"
        )
    if images.shape[-1] == 1:
        return True
    if images.shape[0] == 0:
        return False
    first = images[..., 0]
    return bool(np.array_equal(first, images[..., 1]) and np.array_equal(first, images[..., 2]))


def to_float(images) -> np.ndarray:
    """Scale uint8 pixels to float32 in [0, 1] (``x / 255``), with no mean/std normalisation.

    The paper fed its networks [0, 1] pixels; keeping them unnormalised also keeps the
    pixel views of the factorization non-negative.

    Args:
        images: uint8 array of any shape, typically (N, H, W, C).

    Returns:
        float32 array of the same shape with values in [0, 1].

    Example:
        >>> to_float(np.array([0, 51, 255], np.uint8))
        array([0. , 0.2, 1. ], dtype=float32)
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8 (pixels 0..255), got {images.dtype}")
    return images.astype(np.float32) / np.float32(255)


def balanced_subset(ds: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """Draw ``per_class`` images of every class without replacement, reproducibly.

    The result is ordered by class (all of class 0, then class 1, ...) and, within a class,
    by the images' original order. The same ``seed`` gives the same images.

    Args:
        ds: the dataset to draw from (usually a test split).
        per_class: images per class, >= 1 (the paper used 30).
        seed: seed of the random draw.

    Returns:
        A :class:`Dataset` of ``num_classes * per_class`` images with the same names.

    Example:
        >>> probe = balanced_subset(load("digits").test, per_class=5, seed=0)
        >>> probe.class_counts().tolist()
        [5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    """
    return ds.subset(
        _balanced_indices(ds.labels, ds.class_names, per_class, seed, ds.name or "dataset")
    )


def _check_per_class(per_class) -> None:
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class: expected an integer >= 1, got {per_class!r}")


def _balanced_indices(labels, class_names, per_class, seed, name) -> np.ndarray:
    """Indices :func:`balanced_subset` keeps, from the labels alone (no pixels needed)."""
    _check_per_class(per_class)
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=len(class_names))
    chosen = []
    for label, class_name in enumerate(class_names):
        if counts[label] < per_class:
            raise ValueError(
                f"balanced_subset: class {class_name!r} (label {label}) of {name}: "
                f"expected at least per_class={per_class} images, got {counts[label]}"
            )
        members = np.flatnonzero(labels == label)
        chosen.append(np.sort(rng.choice(members, size=per_class, replace=False)))
    return np.concatenate(chosen)


def load_probe_set(
    name_or_path: str | os.PathLike = "digits",
    source: str | os.PathLike | None = None,
    *,
    split: str = "test",
    per_class: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    channels: int | None = None,
    progress: bool = True,
) -> Dataset:
    """A probe set: one split, optionally a balanced draw of it, reading only what it needs.

    The same images, labels and order as
    ``balanced_subset(load(name_or_path, source, split=split, test_fraction=test_fraction,
    seed=split_seed, channels=channels), per_class, seed)`` (or the whole split when
    ``per_class`` is None). For an image folder, the split and the draw are made on the
    labels that its folder names give, and only the chosen files are opened and decoded:
    probing 30 images per class of a folder of 20,000 decodes 30 per class. Other sources
    are read as :func:`load` reads them.

    For an image folder, the checks that need the pixels (one image size, readable files)
    and the gray-or-RGB choice when ``channels`` is None apply to the chosen images only.

    Args:
        name_or_path, source, channels, progress: as for :func:`load`.
        split: "test" or "train": the split the probe set is drawn from.
        per_class: images per class (>= 1), or None for the whole split.
        seed: seed of the per-class draw (as :func:`balanced_subset`'s ``seed``).
        test_fraction, split_seed: the train/test split where the source has none (as
            :func:`load`'s ``test_fraction`` and ``seed``).

    Returns:
        A :class:`Dataset` of ``num_classes * per_class`` images (or the whole split).

    Raises:
        The errors of :func:`load` and :func:`balanced_subset`, with the same messages.

    Example:
        >>> probe = load_probe_set("digits", per_class=5, seed=1)
        >>> len(probe), probe.name
        (50, 'digits/test')
    """
    if split not in _SPLITS:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if per_class is not None:
        _check_per_class(per_class)  # before anything is read
    kwargs = {"test_fraction": test_fraction, "seed": split_seed, "channels": channels,
              "progress": progress}
    name = os.fspath(name_or_path)
    path = Path(name)
    if source is None and name not in KNOWN_DATASETS and path.is_dir() \
            and _cifar_name_of(path) is None:
        _check_load_args(split, test_fraction, channels)
        ds = _image_folder_probe_set(path, split, per_class, seed, test_fraction,
                                     split_seed, channels, progress)
        if ds is not None:
            return ds
    ds = load(name_or_path, source, split=split, **kwargs)
    return ds if per_class is None else balanced_subset(ds, per_class, seed)


def select_classes(ds: Dataset, classes: Sequence[str | int]) -> Dataset:
    """Keep only the images of ``classes``, relabelled 0..k-1 in the order given.

    Useful for out-of-distribution splits: train on some classes, probe with all of them.
    Image order is kept; coarse labels and superclass names are kept unchanged.

    Args:
        ds: the dataset.
        classes: k >= 1 distinct class names or label ids of ``ds``; the i-th becomes
            label i and keeps its name.

    Returns:
        A :class:`Dataset` with ``class_names`` of length k and labels in [0, k).

    Example:
        >>> ds = Dataset(np.zeros((3, 8, 8, 1), np.uint8), np.array([0, 1, 2]), ("a", "b", "c"))
        >>> sub = select_classes(ds, ["c", 0])
        >>> sub.class_names, sub.labels.tolist()
        (('c', 'a'), [1, 0])
    """
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes:
        raise ValueError(
            f"classes: expected a non-empty list of class names or ids, got {classes!r}"
        )
    ids = []
    for item in classes:
        if isinstance(item, str):
            if item not in ds.class_names:
                raise ValueError(
                    f"classes: expected names in {ds.class_names} of {ds.name or 'dataset'}, "
                    f"got {item!r}"
                )
            ids.append(ds.class_names.index(item))
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if not 0 <= item < ds.num_classes:
                raise ValueError(
                    f"classes: expected ids in [0, {ds.num_classes}), got {item!r}"
                )
            ids.append(int(item))
        else:
            raise ValueError(f"classes: expected a class name or int id, got {item!r}")
    if len(set(ids)) != len(ids):
        dups = sorted({ds.class_names[i] for i in ids if ids.count(i) > 1})
        raise ValueError(f"classes: expected distinct classes, got {dups} more than once")
    remap = np.full(ds.num_classes, -1, np.int64)
    remap[ids] = np.arange(len(ids))
    keep = remap[ds.labels] >= 0
    sub = ds.subset(keep)
    return dataclasses.replace(
        sub, labels=remap[sub.labels], class_names=tuple(ds.class_names[i] for i in ids)
    )


def load(
    name_or_path: str | os.PathLike = "digits",
    source: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    channels: int | None = None,
    download: bool = False,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DatasetSplits | Dataset:
    """Load a dataset's train and test splits as uint8 NHWC images with labels and names.

    Sources, chosen by ``name_or_path``:

    - ``"digits"``: scikit-learn's bundled 1797 handwritten digits. Each 8x8 image with
      values 0..16 becomes 32x32 by repeating every pixel 4x4 (nearest neighbour, so the
      digit keeps the whole field of view the 32x32 models expect) and is scaled to 0..255
      (``round(v * 255 / 16)``); one channel ``"gray"``; classes ``"0"``..``"9"``; a fixed
      stratified split (``test_fraction``, ``seed``).
    - ``"cifar10"`` / ``"cifar100"``: with ``source``, the official python-version data:
      a folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` or the official
      ``.tar.gz``, that folder itself, or the ``.tar.gz`` file (read in place, never
      extracted). Without ``source``: the folder ``$JAXCNMF_DATA`` searched the same way,
      then tensorflow-datasets (``data_dir``; ``download=True`` lets it download and
      prepare). CIFAR-100 carries fine labels, coarse labels and both name lists.
    - a path to an official CIFAR folder or archive, as above.
    - a path to an image folder: ``ROOT/<class>/<image>``, or
      ``ROOT/<superclass>/<class>/<image>`` (coarse labels from the superclass folders),
      optionally under ``ROOT/train/`` and ``ROOT/test/`` (a split without its folder is
      empty). Classes (and superclasses) are numbered in sorted name order. All images
      must share one size; they become RGB, or gray (one channel) when every image is
      gray, unless ``channels`` says which. Without train/test folders the split is
      stratified (``test_fraction``, ``seed``).
    - a path to an ``.npz`` file with either ``images`` (N, H, W[, C]) uint8 and ``labels``
      (alias ``fine_labels``), split stratified by ``test_fraction``/``seed``; or
      ``train_images``, ``train_labels``, ``test_images``, ``test_labels``. Optional:
      ``coarse_labels`` (or ``train_coarse_labels``/``test_coarse_labels``),
      ``class_names``, ``superclass_names`` (string arrays; default ``"0"``, ``"1"``, ...).

    Args:
        name_or_path: a name in :data:`KNOWN_DATASETS` or a path as above.
        source: where ``"cifar10"``/``"cifar100"`` live (folder or ``.tar.gz``).
        split: None for both splits, or ``"train"``/``"test"`` to load and return only that
            :class:`Dataset` (the other split is not read).
        test_fraction: share of the images held out as test where the source has no
            split of its own, in (0, 1); every class gives the same share, up to rounding.
        seed: seed of that split.
        channels: image folders only: 3 (RGB) or 1 (gray); None decides from the images.
        download: let tensorflow-datasets download and prepare a missing dataset.
        data_dir: tensorflow-datasets' data folder (its default when None).
        progress: show a progress bar for loads that take more than a couple of seconds.

    Returns:
        :class:`DatasetSplits`, or the one :class:`Dataset` asked for by ``split``.

    Raises:
        FileNotFoundError: a named file or folder is missing, or a CIFAR dataset is found
            neither locally nor prepared in tensorflow-datasets.
        ValueError: unknown name, corrupt or truncated file (named in the message), images
            of the wrong shape, dtype or size, labels out of range or not integers, a file
            or array header declaring more than the format allows or the file holds
            (refused before anything that size is allocated), unnamed class ids far beyond
            the number of images, an image over Pillow's decompression-bomb limit.

    Example:
        >>> ds = load("digits")
        >>> ds.train.images.dtype, ds.test.images.shape, ds.class_names[:3]
        (dtype('uint8'), (359, 32, 32, 1), ('0', '1', '2'))
    """
    _check_load_args(split, test_fraction, channels)
    splits = _SPLITS if split is None else (split,)
    name = os.fspath(name_or_path)

    if name in KNOWN_DATASETS:
        if channels is not None:
            raise ValueError(
                f"channels: only image folders are converted, expected None for {name!r}, "
                f"got {channels!r}"
            )
        if name == "digits":
            if source is not None:
                raise ValueError(
                    f"source: 'digits' ships with scikit-learn and takes no source, got {source!r}"
                )
            result = _load_digits(test_fraction, seed)
        else:
            result = _load_cifar(name, source, splits, download, data_dir, progress)
    else:
        if source is not None:
            raise ValueError(
                f"source: expected None when loading the path {name!r} (source goes with "
                f"'cifar10' or 'cifar100'), got {source!r}"
            )
        path = Path(name)
        if not path.exists():
            looks_like_path = os.sep in name or "/" in name or path.suffix
            if looks_like_path:
                raise FileNotFoundError(f"no such file or folder: {str(path)!r}")
            raise ValueError(
                f"unknown dataset {name!r}: expected one of {', '.join(KNOWN_DATASETS)}, "
                "or the path of an image folder, an .npz file or an official CIFAR "
                "folder or .tar.gz"
            )
        cifar_name = _cifar_name_of(path)
        is_folder = cifar_name is None and path.is_dir()
        if channels is not None and not is_folder:
            raise ValueError(
                f"channels: only image folders are converted, expected None for {name!r}, "
                f"got {channels!r}"
            )
        if cifar_name is not None:
            result = _load_cifar(cifar_name, path, splits, download, data_dir, progress)
        elif is_folder:
            result = _load_image_folder(path, splits, test_fraction, seed, channels, progress)
        elif path.suffix == ".npz":
            result = _load_npz(path, test_fraction, seed)
        else:
            raise ValueError(
                f"{str(path)!r}: expected an image folder, an .npz file, or an official "
                f"CIFAR folder or archive ({', '.join(c['archive'] for c in _CIFAR.values())})"
            )
    if split is not None:
        return getattr(result, split)
    return result


# ----------------------------------------------------------------------------- validation


def _check_load_args(split, test_fraction, channels) -> None:
    if split is not None and split not in _SPLITS:
        raise ValueError(f"split: expected None, 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected None, 1 or 3, got {channels!r}")


def _as_names(names, where: str) -> tuple[str, ...]:
    if isinstance(names, np.ndarray) and names.ndim == 1:
        names = names.tolist()
    if not isinstance(names, (list, tuple)):
        raise ValueError(
            f"{where}: expected a list of names, got {type(names).__name__} {_short(names)}"
        )
    out = []
    for i, n in enumerate(names):
        if isinstance(n, bytes):
            try:
                n = n.decode()
            except UnicodeDecodeError:
                raise ValueError(f"{where}[{i}]: expected UTF-8 text, got {_short(n)}") from None
        elif isinstance(n, (int, np.integer)) and not isinstance(n, bool):
            n = str(n)
        elif not isinstance(n, str):
            raise ValueError(
                f"{where}[{i}]: expected a name (str), got {type(n).__name__} {_short(n)}"
            )
        out.append(str(n))
    out = tuple(out)
    if len(set(out)) != len(out):
        dupes = sorted({n for n in out if out.count(n) > 1})
        raise ValueError(f"{where}: expected unique names, got duplicates {_short(dupes)}")
    return out


def _as_labels(labels, where: str, n: int, num: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size == 0 and labels.dtype.kind == "f":
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected an integer array, got dtype {labels.dtype}")
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{where}: expected values in [0, {num}), got {labels.max()}")
    if labels.shape != (n,):
        raise ValueError(f"{where}: expected shape ({n},) to match images, got {labels.shape}")
    if n and (labels.min() < 0 or labels.max() >= num):
        bad = labels[(labels < 0) | (labels >= num)][0]
        raise ValueError(f"{where}: expected values in [0, {num}), got {bad}")
    return labels.astype(np.int64, copy=False)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int):
    """(train_idx, test_idx), each sorted: round(N * test_fraction) test images spread
    over the classes in proportion to their sizes, so even tiny classes are sampled fairly.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    by_class = np.argsort(shuffled, kind="stable")
    counts = np.bincount(shuffled) if len(labels) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
    rank = np.empty(len(labels), np.float64)
    rank[by_class] = np.arange(len(labels)) - np.repeat(starts, counts)
    # An image's place within its (shuffled) class as a fraction of the class size: taking
    # the smallest fractions first draws every class at the same rate.
    position = (rank + 0.5) / counts[shuffled]
    n_test = int(round(len(labels) * test_fraction))
    pick = np.lexsort((rng.random(len(labels)), position))[:n_test]
    is_test = np.zeros(len(labels), bool)
    is_test[order[pick]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _split_dataset(ds: Dataset, name: str, test_fraction: float, seed: int) -> DatasetSplits:
    train_idx, test_idx = _stratified_split(ds.labels, test_fraction, seed)
    return DatasetSplits(
        train=dataclasses.replace(ds.subset(train_idx), name=f"{name}/train"),
        test=dataclasses.replace(ds.subset(test_idx), name=f"{name}/test"),
        name=name,
    )


def _progress(iterable, progress: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm

    # delay: only loads that last a couple of seconds show a bar.
    return tqdm(iterable, desc=desc, total=total, disable=not progress, delay=2.0, unit="img")


# ----------------------------------------------------------------------------- digits


def _load_digits(test_fraction: float, seed: int) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    ds = Dataset(
        images=pixels.repeat(4, axis=1).repeat(4, axis=2)[..., None],
        labels=bunch.target.astype(np.int64),
        class_names=tuple(str(n) for n in bunch.target_names),
        name="digits",
    )
    return _split_dataset(ds, "digits", test_fraction, seed)


# ----------------------------------------------------------------------------- CIFAR


# Declared sizes are checked against these before anything is read or allocated: a few
# bytes of pickle can otherwise ask for gigabytes (``bytes(2**31)``, an array header of
# shape (350000, 3072)) and a small .tar.gz can inflate to any size.
_CIFAR_ROW = 3072
# Bytes per image beyond its pixels: the official files spend about 32 on the label and
# file name; the rest is headroom for other writers of the format.
_ROW_EXTRA = 256
_FILE_SLACK = 1 << 20
_META_MAX_BYTES = 1 << 20
# The official archives hold 5 (CIFAR-100) or 9 (CIFAR-10) members.
_ARCHIVE_MAX_MEMBERS = 64


def _member_limit(name: str, member: str) -> tuple[int, int]:
    """(largest file size in bytes, largest number of images) of an official member."""
    spec = _CIFAR[name]
    if member == spec["meta"]:
        return _META_MAX_BYTES, 0
    rows = spec["rows"][member]
    return rows * (_CIFAR_ROW + _ROW_EXTRA) + _FILE_SLACK, rows


def _short(value, limit: int = 60) -> str:
    """A repr of ``value`` for an error message, cut to ``limit`` characters.

    Only a prefix of a long str/bytes/sequence is formatted, so a value of gigabytes costs
    no more than a short one.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {type(value).__name__} long)"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        head = ", ".join(_short(v, 20) for v in value[:4])
        return f"[{head}, ...] ({type(value).__name__} of {len(value)})"
    if isinstance(value, np.ndarray) and value.size > 8:
        return f"array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _clip(text: str, limit: int = 200) -> str:
    """Plain text for an error message, cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _NdarrayType:
    """Stands in for ``numpy.ndarray`` in a CIFAR pickle.

    numpy pickles name the type only as the first argument of ``_reconstruct``; calling it
    directly would allocate any shape the file declares.
    """

    def __init__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing numpy.ndarray(...): not how numpy pickles arrays")


# Plain numbers only: object arrays would allocate one entry per declared element before
# checking the data, and void dtypes take their size from the file.
_PICKLE_DTYPE_KINDS = frozenset("biuf")


def _safe_dtype(obj, align=False, copy=True):
    dtype = np.dtype(obj, align=bool(align), copy=True)
    if dtype.kind not in _PICKLE_DTYPE_KINDS or dtype.itemsize > 16:
        raise pickle.UnpicklingError(f"refusing numpy dtype {_clip(str(dtype), 40)}: not a CIFAR array")
    return dtype


def _safe_reconstruct(subtype, shape, typecode):
    # numpy's own pickles reconstruct an empty array and then fill it from the bytes in
    # the file (``__setstate__`` checks the byte count), so nothing else is needed.
    if subtype is not _NdarrayType or tuple(shape) != (0,):
        raise pickle.UnpicklingError(
            f"refusing to reconstruct an array of shape {_short(shape)}: numpy pickles "
            "start from shape (0,)"
        )
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _safe_frombuffer(buffer, dtype, shape, order):
    dtype = _safe_dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if not isinstance(buffer, (bytes, bytearray)) or count * dtype.itemsize != len(buffer):
        raise pickle.UnpicklingError(
            f"refusing an array of shape {_short(shape)}: its data holds "
            f"{len(buffer) if isinstance(buffer, (bytes, bytearray)) else '?'} bytes"
        )
    return np.frombuffer(buffer, dtype).reshape(shape, order=order).copy()


def _safe_scalar(dtype, data=None):
    dtype = _safe_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("refusing a numpy scalar whose bytes do not fit its dtype")
    return np.frombuffer(data, dtype)[0]


def _safe_bytes(*args):
    # Python 3 pickles (protocol < 3) write b"" as bytes(); bytes(n) would allocate n.
    if args:
        raise pickle.UnpicklingError("refusing bytes(...) with arguments: not a CIFAR value")
    return b""


def _safe_encode(text, encoding="utf-8", errors="strict"):
    # Protocol < 3 writes bytes as _codecs.encode(text, "latin1"): the text is in the file.
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing codecs.encode other than of text to latin1")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR files (dicts, lists, numpy arrays) and nothing else.

    The official format is a pickle; refusing every other global keeps a tampered file from
    running code on load, and the allowed ones are wrapped so that a declared size is
    checked against the bytes actually in the file before anything is allocated.
    """

    _ALLOWED: ClassVar[dict] = {
        ("numpy", "ndarray"): _NdarrayType,
        ("numpy", "dtype"): _safe_dtype,
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy.core.multiarray", "scalar"): _safe_scalar,
        ("numpy._core.multiarray", "scalar"): _safe_scalar,
        ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
        ("_codecs", "encode"): _safe_encode,
        ("codecs", "encode"): _safe_encode,
        ("__builtin__", "bytes"): _safe_bytes,
        ("builtins", "bytes"): _safe_bytes,
    }

    def find_class(self, module, name):
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing to load {_clip(module, 40)}.{_clip(name, 40)}: not a CIFAR array"
            )
        return found


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError, MemoryError, OverflowError) as err:
        raise ValueError(
            f"{where}: corrupt or truncated CIFAR pickle ({_clip(str(err))})"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_cifar_file(file: Path, name: str, member: str) -> dict:
    limit, _ = _member_limit(name, member)
    size = file.stat().st_size
    if size > limit:
        raise ValueError(
            f"{str(file)!r}: expected at most {limit} bytes for the official {name} "
            f"{member}, got {size}"
        )
    return _unpickle(file.read_bytes(), str(file))


def _cifar_name_of(path: Path) -> str | None:
    """'cifar10'/'cifar100' when ``path`` is an official CIFAR folder or archive."""
    for name, spec in _CIFAR.items():
        if path.name in (spec["folder"], spec["archive"]):
            return name
        if path.is_dir() and (path / spec["meta"]).is_file() and (path / spec["test"][0]).is_file():
            return name
    return None


def _find_cifar(name: str, where: Path) -> Path | None:
    """The extracted folder or archive of ``name`` at or directly inside ``where``."""
    spec = _CIFAR[name]
    if where.is_file():
        return where
    if (where / spec["meta"]).is_file():
        return where
    for candidate in (where / spec["folder"], where / spec["archive"]):
        if candidate.exists():
            return candidate
    return None


def _load_cifar(name, source, splits, download, data_dir, progress):
    spec = _CIFAR[name]
    if source is not None:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"source: no such file or folder: {str(source)!r}")
        found = _find_cifar(name, source)
        if found is None:
            raise FileNotFoundError(
                f"source: expected {str(source)!r} to be or to contain {spec['folder']!r} or "
                f"{spec['archive']!r}, found neither"
            )
        return _read_cifar_python(name, found, splits)
    looked = []
    env = os.environ.get(_DATA_ENV)
    if env and not Path(env).is_dir():
        looked.append(f"${_DATA_ENV}={env} (not a folder)")
    elif env:
        found = _find_cifar(name, Path(env))
        if found is not None:
            return _read_cifar_python(name, found, splits)
        looked.append(f"${_DATA_ENV}={env} (no {spec['folder']} or {spec['archive']} there)")
    else:
        looked.append(f"${_DATA_ENV} (not set)")
    return _load_tfds(name, splits, download, data_dir, progress, looked)


def _read_cifar_python(name: str, path: Path, splits) -> DatasetSplits:
    spec = _CIFAR[name]
    wanted = {spec["meta"], *(f for s in splits for f in spec[s])}
    if path.is_dir():
        files = {}
        for member in sorted(wanted):
            file = path / member
            if not file.is_file():
                raise FileNotFoundError(
                    f"{str(file)!r}: missing file of the official {name} layout"
                )
            files[member] = _read_cifar_file(file, name, member)
    else:
        files = _read_cifar_archive(name, path, wanted)

    meta = files[spec["meta"]]
    where = f"{path}:{spec['meta']}"
    if name == "cifar10":
        class_names = _names_from(meta, "label_names", where)
        superclass_names = None
    else:
        class_names = _names_from(meta, "fine_label_names", where)
        superclass_names = _names_from(meta, "coarse_label_names", where)

    datasets = {}
    for split in _SPLITS:
        if split not in splits:
            datasets[split] = _empty_like(class_names, superclass_names, 3, f"{name}/{split}")
            continue
        images, labels, coarse = [], [], []
        for member in spec[split]:
            batch = files[member]
            where = f"{path}:{member}"
            fine_key = "labels" if name == "cifar10" else "fine_labels"
            for key in ("data", fine_key) + (() if name == "cifar10" else ("coarse_labels",)):
                if key not in batch:
                    raise ValueError(
                        f"{where}: expected key {key!r}, got keys {_short(sorted(map(str, batch)))}"
                    )
            _, rows = _member_limit(name, member)
            images.append(_cifar_rows_to_nhwc(batch["data"], where, rows))
            labels.append(_cifar_labels(batch[fine_key], f"{where}: {fine_key}", rows))
            if name == "cifar100":
                coarse.append(_cifar_labels(batch["coarse_labels"], f"{where}: coarse_labels", rows))
        try:
            datasets[split] = Dataset(
                images=np.concatenate(images),
                labels=np.concatenate(labels),
                class_names=class_names,
                coarse_labels=np.concatenate(coarse) if coarse else None,
                superclass_names=superclass_names,
                name=f"{name}/{split}",
            )
        except ValueError as err:
            files_read = ", ".join(spec[split])
            raise ValueError(f"{str(path)!r} ({files_read}): {err}") from None
    return DatasetSplits(name=name, **datasets)


def _read_cifar_archive(name: str, path: Path, wanted: set[str]) -> dict:
    """Unpickle the ``wanted`` members of an official .tar.gz in one pass, in memory.

    Each member's size comes from its tar header, so it is checked against the format
    before a byte of it is decompressed.
    """
    folder = _CIFAR[name]["folder"]
    files = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for count, member in enumerate(archive, 1):
                if count > _ARCHIVE_MAX_MEMBERS:
                    raise ValueError(
                        f"{str(path)!r}: expected the few members of the official archive, "
                        f"got more than {_ARCHIVE_MAX_MEMBERS}"
                    )
                base = member.name.rsplit("/", 1)[-1]
                if not (member.isfile() and base in wanted and base not in files):
                    continue
                limit, _ = _member_limit(name, base)
                if member.size > limit:
                    raise ValueError(
                        f"{str(path)!r}: member {_short(member.name)}: expected at most "
                        f"{limit} bytes for the official {name} {base}, got {member.size}"
                    )
                raw = archive.extractfile(member).read()
                files[base] = _unpickle(raw, f"{path}:{member.name}")
                if len(files) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{str(path)!r}: corrupt or truncated archive ({err})") from err
    missing = sorted(wanted - set(files))
    if missing:
        raise ValueError(
            f"{str(path)!r}: expected members {[f'{folder}/{m}' for m in missing]} "
            "of the official archive, not found"
        )
    return files


def _names_from(meta: dict, key: str, where: str) -> tuple[str, ...]:
    if key not in meta:
        raise ValueError(f"{where}: expected key {key!r}, got keys {_short(sorted(map(str, meta)))}")
    return _as_names(meta[key], f"{where}: {key}")


def _cifar_labels(values, where: str, rows: int) -> np.ndarray:
    """Labels of a CIFAR batch as int64, refusing anything but a list or array of ints.

    ``np.asarray(..., dtype=int64)`` would turn 0.5 into 0 and "3" into 3 silently.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu" and not (values.size == 0 and values.ndim == 1):
            raise ValueError(f"{where}: expected integer labels, got dtype {values.dtype}")
        return values.astype(np.int64).reshape(-1)
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"{where}: expected a list of integer labels, got {type(values).__name__} "
            f"{_short(values)}"
        )
    if len(values) > rows:
        raise ValueError(f"{where}: expected at most {rows} labels, got {len(values)}")
    for i, v in enumerate(values):
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            raise ValueError(
                f"{where}[{i}]: expected an integer label, got {type(v).__name__} {_short(v)}"
            )
        if not -(2**63) <= v < 2**63:
            raise ValueError(f"{where}[{i}]: expected a class id, got {_short(v)}")
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _cifar_rows_to_nhwc(data, where: str, rows: int) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise ValueError(
            f"{where}: data: expected a uint8 array of shape (N, 3072), got "
            f"{type(data).__name__} {_short(data)}"
        )
    if data.size == 0:
        return np.zeros((0, 32, 32, 3), np.uint8)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_ROW:
        raise ValueError(
            f"{where}: data: expected uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if data.shape[0] > rows:
        raise ValueError(
            f"{where}: data: expected at most {rows} images of the official file, got "
            f"{data.shape[0]}"
        )
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _empty_like(class_names, superclass_names, num_channels, name, size=(32, 32)) -> Dataset:
    return Dataset(
        images=np.zeros((0, *size, num_channels), np.uint8),
        labels=np.zeros(0, np.int64),
        class_names=class_names,
        coarse_labels=None if superclass_names is None else np.zeros(0, np.int64),
        superclass_names=superclass_names,
        name=name,
    )


# ----------------------------------------------------------------------------- tfds


def _not_found(name: str, looked: Sequence[str]) -> FileNotFoundError:
    spec = _CIFAR[name]
    return FileNotFoundError(
        f"{name}: not found. Looked in: {'; '.join(looked)}.\n"
        f"Either pass source=DIR where DIR holds {spec['archive']} (the official python "
        f"version) or its extracted {spec['folder']}/ folder (or set ${_DATA_ENV}=DIR), or "
        f"prepare it with tensorflow-datasets: "
        f"load({name!r}, download=True) or `tfds build {name}`."
    )


def _load_tfds(name, splits, download, data_dir, progress, looked) -> DatasetSplits:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise _not_found(name, [*looked, "tensorflow-datasets (not installed)"]) from None
    builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    if not builder.is_prepared():
        if not download:
            tfds_place = f"tensorflow-datasets at {builder.data_dir} (not prepared)"
            raise _not_found(name, [*looked, tfds_place])
        builder.download_and_prepare(file_format="array_record")
    features = builder.info.features
    class_names = tuple(features["label"].names)
    superclass_names = tuple(features["coarse_label"].names) if name == "cifar100" else None
    datasets = {}
    for split in _SPLITS:
        if split not in splits:
            datasets[split] = _empty_like(class_names, superclass_names, 3, f"{name}/{split}")
            continue
        images, labels, coarse = _read_tfds_split(tfds, builder, split, name, progress)
        datasets[split] = Dataset(
            images=images,
            labels=labels,
            class_names=class_names,
            coarse_labels=coarse,
            superclass_names=superclass_names,
            name=f"{name}/{split}",
        )
    return DatasetSplits(name=name, **datasets)


def _read_tfds_split(tfds, builder, split, name, progress):
    has_coarse = name == "cifar100"
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:
        # Prepared as TFRecord: only readable through tf.data.
        try:
            arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        except ImportError as err:
            raise ImportError(
                f"{name}: tensorflow-datasets holds it as TFRecord, which needs tensorflow "
                f"to read ({err}); install tensorflow, or prepare it again with "
                "file_format='array_record'"
            ) from err
        coarse = np.asarray(arrays["coarse_label"]) if has_coarse else None
        return np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"]), coarse
    n = len(source)
    images = np.zeros((n, *builder.info.features["image"].shape), np.uint8)
    labels = np.zeros(n, np.int64)
    coarse = np.zeros(n, np.int64) if has_coarse else None
    for i in _progress(range(n), progress, f"{name}/{split}"):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
        if has_coarse:
            coarse[i] = example["coarse_label"]
    return images, labels, coarse


# ----------------------------------------------------------------------------- image folder


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _visible_children(folder: Path):
    """(image files, folders) directly in ``folder``, hidden names skipped, each in
    natural name order.

    ``os.scandir`` reports each entry's type from the directory listing itself, so a
    folder of 20,000 images costs no stat call per file (a symlink is followed, as
    ``Path.is_file`` does).
    """
    files, dirs = [], []
    with os.scandir(folder) as listing:
        for entry in listing:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(entry.name)
    return ([folder / n for n in sorted(files, key=_natural_key)],
            [folder / n for n in sorted(dirs, key=_natural_key)])


def _scan_class_tree(root: Path):
    """[(superclass or None, class, image path)] under ``root``; raises on mixed layouts."""
    entries = []
    _, dirs = _visible_children(root)
    if not dirs:
        raise ValueError(f"{str(root)!r}: expected one subfolder per class, found none")
    for top in dirs:
        images, subdirs = _visible_children(top)
        if images and subdirs:
            raise ValueError(
                f"{str(top)!r}: expected either images (a class folder) or class folders (a "
                f"superclass folder), got both"
            )
        if subdirs:
            for sub in subdirs:
                entries.extend((top.name, sub.name, p) for p in _visible_children(sub)[0])
        else:
            entries.extend((None, top.name, p) for p in images)
    nested = {sup is not None for sup, _, _ in entries}
    if len(nested) > 1:
        raise ValueError(
            f"{str(root)!r}: expected all class folders at the same depth (either "
            "ROOT/<class>/ or ROOT/<superclass>/<class>/), got both"
        )
    return entries


@dataclass(frozen=True)
class _FolderIndex:
    """An image folder's files and labels, from its folder names alone (nothing decoded).

    ``entries`` maps "all" (no train/test folders) or each split present to its
    [(superclass or None, class, path)], in file order.
    """

    name: str
    has_splits: bool
    entries: dict
    class_names: tuple[str, ...]
    superclass_names: tuple[str, ...] | None

    def labels(self, key: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[c] for _, c, _ in self.entries[key]], np.int64)

    def coarse_labels(self, key: str) -> np.ndarray | None:
        if self.superclass_names is None:
            return None
        index = {s: i for i, s in enumerate(self.superclass_names)}
        return np.array([index[s] for s, _, _ in self.entries[key]], np.int64)


def _index_image_folder(root: Path) -> _FolderIndex:
    has_splits = (root / "train").is_dir() or (root / "test").is_dir()
    # Names come from every split's folders, so loading one split numbers classes the same.
    if has_splits:
        trees = {s: _scan_class_tree(root / s) for s in _SPLITS if (root / s).is_dir()}
    else:
        trees = {"all": _scan_class_tree(root)}
    all_entries = [e for entries in trees.values() for e in entries]
    if not all_entries:
        raise ValueError(
            f"{str(root)!r}: expected image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}), found none"
        )
    class_to_super = {}
    for sup, cls, _ in all_entries:
        if class_to_super.setdefault(cls, sup) != sup:
            raise ValueError(
                f"{str(root)!r}: class {cls!r}: expected one superclass, got "
                f"{class_to_super[cls]!r} and {sup!r}"
            )
    nested = next(iter(class_to_super.values())) is not None
    return _FolderIndex(
        name=root.name,
        has_splits=has_splits,
        entries=trees,
        class_names=tuple(sorted(class_to_super)),
        superclass_names=tuple(sorted(set(class_to_super.values()))) if nested else None,
    )


def _load_image_folder(root, splits, test_fraction, seed, channels, progress) -> DatasetSplits:
    index = _index_image_folder(root)
    name = index.name
    read = [k for k in index.entries if k == "all" or k in splits]
    paths = [p for key in read for _, _, p in index.entries[key]]
    if paths:
        images = _read_images(paths, channels, progress, name)
    else:  # only an absent split asked for: it takes its image shape from the other's
        first = next(p for entries in index.entries.values() for _, _, p in entries)
        images = _read_images([first], channels, progress, name)[:0]
    offset, datasets = 0, {}
    for key in read:
        count = len(index.entries[key])
        datasets[key] = Dataset(
            images=images[offset:offset + count],
            labels=index.labels(key),
            class_names=index.class_names,
            coarse_labels=index.coarse_labels(key),
            superclass_names=index.superclass_names,
            name=f"{name}/{key}",
        )
        offset += count
    if not index.has_splits:
        return _split_dataset(datasets["all"], name, test_fraction, seed)
    for split in _SPLITS:
        if split not in datasets:
            datasets[split] = _empty_like(
                index.class_names, index.superclass_names, images.shape[-1],
                f"{name}/{split}", images.shape[1:3],
            )
    return DatasetSplits(name=name, **datasets)


def _image_folder_probe_set(root, split, per_class, seed, test_fraction, split_seed,
                            channels, progress) -> Dataset | None:
    """The probe set :func:`load_probe_set` describes, decoding only its images; None
    when it would hold no image (the caller then takes the eager path, whose empty
    dataset takes its image shape from the other split)."""
    index = _index_image_folder(root)
    key = split if index.has_splits else "all"
    entries = index.entries.get(key, [])
    labels = index.labels(key) if entries else np.zeros(0, np.int64)
    if index.has_splits:
        positions = np.arange(len(entries))
    else:
        # The split load() makes, from the labels alone.
        train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed)
        positions = test_idx if split == "test" else train_idx
    if per_class is not None:
        positions = positions[_balanced_indices(
            labels[positions], index.class_names, per_class, seed, f"{index.name}/{split}"
        )]
    if len(positions) == 0:
        return None
    coarse = index.coarse_labels(key)
    return Dataset(
        images=_read_images([entries[i][2] for i in positions], channels, progress, index.name),
        labels=labels[positions],
        class_names=index.class_names,
        coarse_labels=None if coarse is None else coarse[positions],
        superclass_names=index.superclass_names,
        name=f"{index.name}/{split}",
    )


def _read_images(paths, channels, progress, desc) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    first_size, out, all_gray = None, None, True
    for i, path in enumerate(_progress(paths, progress, desc, total=len(paths))):
        try:
            # Pillow only warns between its pixel limit and twice it; either way a
            # picture that large is no probe image, and decoding it could take gigabytes.
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
            with img:
                # The size is in the header: compare it before decoding any pixels.
                size = img.size
                if first_size is not None and size != first_size:
                    raise ValueError(
                        f"{str(path)!r}: expected every image to be {first_size[0]}x"
                        f"{first_size[1]} (width x height) like {str(paths[0])!r}, got "
                        f"{size[0]}x{size[1]}"
                    )
                img.load()
                if first_size is None:
                    first_size = size
                    out = np.zeros((len(paths), size[1], size[0], 3), np.uint8)
                all_gray &= img.mode in ("1", "L", "LA", "I", "I;16", "F")
                out[i] = np.asarray(img.convert("RGB"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(
                f"{str(path)!r}: image too large to decode safely, over Pillow's "
                f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
                f"({_clip(str(err), 120)})"
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if isinstance(err, ValueError) and str(err).startswith(repr(str(path))):
                raise  # ours, already naming the file
            # Pillow raises ValueError too, e.g. for a PNG text chunk that inflates too far.
            raise ValueError(
                f"{str(path)!r}: unreadable or corrupt image ({_clip(str(err))})"
            ) from None
    gray = channels == 1 if channels is not None else all_gray
    if gray:
        # Converting gray to RGB repeats the value, so one channel keeps it exactly; a
        # colour image asked for as gray uses Pillow's luma weights, matching convert("L").
        if all_gray:
            return np.ascontiguousarray(out[..., :1])
        weights = np.array([299, 587, 114], np.uint32)
        return ((out.astype(np.uint32) @ weights + 500) // 1000).astype(np.uint8)[..., None]
    return out


# ----------------------------------------------------------------------------- npz


# Deflate cannot inflate by more than about 1032:1, so a larger stated size is forged.
_DEFLATE_MAX_RATIO = 1032


def _check_npz_sizes(path: Path) -> None:
    """Refuse members whose .npy header declares more bytes than the member holds.

    ``np.load`` allocates the declared shape before reading the data, so a header
    claiming (10**6, 10**6, 3) in a file of a few hundred bytes would ask for terabytes.
    """
    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            stored = info.compress_type == zipfile.ZIP_STORED
            most = info.compress_size if stored else info.compress_size * _DEFLATE_MAX_RATIO + 1024
            if info.file_size > most:
                raise ValueError(
                    f"{str(path)!r}: {_clip(key, 60)}: the archive states {info.file_size} "
                    f"bytes for {info.compress_size} compressed bytes, more than compression "
                    "allows; the file is corrupt"
                )
            with archive.open(info) as member:
                version = npy.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = npy.read_array_header_1_0(member)
                else:
                    shape, _, dtype = npy.read_array_header_2_0(member)
                header = member.tell()
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size - header:
                raise ValueError(
                    f"{str(path)!r}: {_clip(key, 60)}: the header declares shape "
                    f"{_short(shape)} of {dtype} ({declared} bytes), but the file holds "
                    f"{info.file_size - header} bytes of data; the file is corrupt or truncated"
                )


def _load_npz(path: Path, test_fraction: float, seed: int) -> DatasetSplits:
    try:
        _check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, MemoryError) as err:
        message = err.args[0] if isinstance(err, ValueError) and err.args else ""
        if isinstance(message, str) and message.startswith(repr(str(path))):
            raise
        raise ValueError(
            f"{str(path)!r}: corrupt or truncated .npz file ({_clip(str(err))})"
        ) from None
    name = path.stem

    def pick(prefix: str):
        images_key = f"{prefix}images"
        if images_key not in arrays:
            return None
        label_keys = [k for k in (f"{prefix}labels", f"{prefix}fine_labels") if k in arrays]
        if not label_keys:
            raise ValueError(
                f"{str(path)!r}: expected key {prefix}labels next to {images_key}, "
                f"got keys {sorted(arrays)}"
            )
        labels_key = label_keys[0]
        images = arrays[images_key]
        if images.ndim == 3:
            images = images[..., None]
        coarse_key = f"{prefix}coarse_labels"
        for key in (labels_key, coarse_key):
            if key in arrays and arrays[key].dtype.kind not in "iu" and arrays[key].size:
                raise ValueError(
                    f"{str(path)!r}: {key}: expected integer class ids, got dtype "
                    f"{arrays[key].dtype}"
                )
        return images, arrays[labels_key], arrays.get(coarse_key), images_key

    parts = {s: pick(f"{s}_") for s in _SPLITS}
    whole = pick("")
    if whole is None and None in parts.values():
        raise ValueError(
            f"{str(path)!r}: expected keys images and labels, or train_images, train_labels, "
            f"test_images and test_labels, got keys {sorted(arrays)}"
        )
    all_labels = [p[1] for p in ([whole] if whole else parts.values())]
    all_coarse = [p[2] for p in ([whole] if whole else parts.values())]
    n_images = sum(len(p[0]) for p in ([whole] if whole else parts.values()))
    class_names = _npz_names(arrays, "class_names", all_labels, n_images, path)
    has_coarse = any(c is not None for c in all_coarse)
    superclass_names = (
        _npz_names(arrays, "superclass_names", all_coarse, n_images, path) if has_coarse else None
    )

    def make(part, split_name):
        images, labels, coarse, images_key = part
        if images.dtype != np.uint8:
            raise ValueError(
                f"{str(path)!r}: {images_key}: expected dtype uint8 (pixels 0..255), "
                f"got {images.dtype}"
            )
        try:
            return Dataset(images, labels, class_names, coarse, superclass_names, name=split_name)
        except ValueError as err:
            raise ValueError(f"{str(path)!r}: {err}") from None

    if whole is not None:
        return _split_dataset(make(whole, name), name, test_fraction, seed)
    return DatasetSplits(
        train=make(parts["train"], f"{name}/train"),
        test=make(parts["test"], f"{name}/test"),
        name=name,
    )


# Without names, classes are numbered 0..largest id; ids beyond this many (or beyond the
# number of images, if larger) are refused rather than turned into millions of classes.
_MAX_UNNAMED_CLASSES = 1000


def _npz_names(arrays, key, label_arrays, n_images: int, path: Path) -> tuple[str, ...]:
    if key in arrays:
        names = arrays[key]
        if names.ndim > 1:
            raise ValueError(
                f"{str(path)!r}: {key}: expected a 1-d array of names, got shape {names.shape}"
            )
        return _as_names(names.reshape(-1).tolist(), f"{str(path)!r}: {key}")
    # Without names, name classes by number up to the largest label seen.
    label_arrays = [a for a in label_arrays if a is not None and np.size(a)]
    largest = max((int(np.max(a)) for a in label_arrays), default=0)
    limit = max(_MAX_UNNAMED_CLASSES, n_images)
    if largest >= limit:
        ids = "labels" if key == "class_names" else "coarse_labels"
        raise ValueError(
            f"{str(path)!r}: {ids}: class id {largest} would make {largest + 1} classes for "
            f"{n_images} images; expected ids below {limit}: number the classes "
            f"0..K-1, or store a {key} array naming every id"
        )
    return tuple(str(i) for i in range(largest + 1))
