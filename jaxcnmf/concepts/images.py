"""Pixels (paper 4.1.3): latent images of each concept from the pixel loadings ``P_i``,
their median masks, and top images with the mask applied.

A pixel loading ``P_i`` is float (H*W, rank) with row ``h*W + w``.

Latent images and median masks need only the loadings; the top images themselves come
from the probe images or, for views on disk, from the store's pixel views
(:func:`store_images`, which reads only the blocks holding the images asked for).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jaxcnmf.concepts._common import _matrix, _safe_divide

__all__ = [
    "latent_images",
    "masked_images",
    "median_mask",
    "store_images",
]

# Pixel views as ``probe.collect`` names them, in channel order.
_PIXEL_VIEWS = (("red", "green", "blue"), ("gray",))

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


def store_images(store, indices) -> np.ndarray:
    """Images rebuilt from a store's pixel views, reading only the blocks that hold them.

    ``probe.collect(..., store=DIR)`` writes the pixels at full resolution as views
    ``"red"``, ``"green"``, ``"blue"`` (or ``"gray"`` for one-channel images) of ``(H*W,
    N)`` values in [0, 1], so an image is ``round(255 * value)``: exact for float32 and
    float16 stores, within one grey level for bfloat16. A store written without pixel
    views cannot give its images: index the source dataset with the same ``indices``
    (columns are images in probing order).

    Args:
        store: :class:`jaxcnmf.store.Store` with pixel views.
        indices: int (n,) image (column) indices, any order.

    Returns:
        uint8 (n, H, W, C), C = 3 (red, green, blue) or 1 (gray).

    Raises:
        ValueError: the store has no pixel views, or their shape is unknown.

    Example:
        >>> top = store_images(s, top_images(res.F, 8)[0])  # doctest: +SKIP
        >>> top.shape  # doctest: +SKIP
        (8, 32, 32, 3)
    """
    channels = next((names for names in _PIXEL_VIEWS
                     if all(name in store.rows for name in names)), None)
    if channels is None:
        raise ValueError(f"store {str(store.path)!r}: expected pixel views "
                         f"('red', 'green', 'blue' or 'gray') to rebuild images from, got "
                         f"views {list(store.views)}; index the source dataset instead")
    rows = store.rows[channels[0]]
    shape = store.shapes.get(channels[0])
    if shape is None or len(shape) < 2 or shape[0] * shape[1] != rows:
        image_shape = store.provenance.get("image_shape")
        shape = tuple(image_shape[:2]) if image_shape else None
    if shape is None or shape[0] * shape[1] != rows:
        raise ValueError(f"store {str(store.path)!r}: expected the image shape (H, W) of "
                         f"pixel view {channels[0]!r} ({rows} rows) in the manifest, got "
                         f"{store.shapes.get(channels[0])}")
    height, width = int(shape[0]), int(shape[1])
    arrays = store.read_columns(indices, views=channels)
    stacked = np.stack([np.asarray(arrays[name], np.float32) for name in channels], axis=-1)
    pixels = np.clip(np.rint(stacked * 255.0), 0, 255).astype(np.uint8)  # (H*W, n, C)
    return np.ascontiguousarray(
        pixels.transpose(1, 0, 2).reshape(-1, height, width, len(channels)))
