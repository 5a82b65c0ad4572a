"""Probe a trained CNN: the pixel matrices D_i and activation matrices A_j of a probe set.

A layer is the output of a direct child of the model's top module, named as in
``jaxcnmf.models`` (``"conv4_x"``, ``"avgpool"``, ...). ``collect`` runs the model in
inference mode in batches with ``capture_intermediates`` filtered to the requested layers,
pools inside the compiled function and writes each batch in place into preallocated
``(rows, N)`` float32 matrices on the device, so device memory is the outputs plus one
batch; they are either returned as jax arrays (``output="device"``, ready for
``jaxcnmf.fit`` without a trip through the host) or copied to the host once at the end.
Forward passes run at the backend's default matmul precision, as ``model.apply`` does:
the views are the network's own activations, which is what NMF should explain.
``intervene`` and ``layer_forward`` replace a layer's output
(``flax.linen.intercept_methods``) to read off the logits, for concept fidelity.
``layer_activations`` and ``layer_gradients`` (the gradient of each image's class logit
with respect to named layers, one backward pass for all of them) run at full float32
precision on every backend, for TCAV, whose scores are signs of small numbers.
``available_layers``, ``network_shapes`` and ``layer_shapes`` read the layers' shapes
without computing anything. This is the one module that runs a network.

Row orders (``N`` images of ``H x W`` pixels):

* pixel views ``"red"``, ``"green"``, ``"blue"`` (or ``"gray"``): ``(H*W, N)``,
  row ``h*W + w``;
* a layer of shape ``(h, w, C)`` with ``pooling="flatten"``: ``(C*h*w, N)``, row
  ``c*h*w + i*w + j`` (channel-major, as PyTorch flattens ``CHW``);
* ``pooling="mean"`` or ``"max"`` over space: ``(C, N)``; vector layers such as
  ``avgpool`` are ``(C, N)`` under every pooling.

Example:
    >>> import jax, numpy as np
    >>> from jaxcnmf import models, probe
    >>> model = models.small_cnn(10, width=0.25)
    >>> variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    >>> images = np.zeros((5, 32, 32, 3), np.uint8)
    >>> views = probe.collect(model, variables, images, ["conv3", "pool"], progress=False)
    >>> {k: v.shape for k, v in views.items()}
    {'red': (1024, 5), 'green': (1024, 5), 'blue': (1024, 5), 'conv3': (512, 5), 'pool': (32, 5)}
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcnmf.nets import data, models
from jaxcnmf.solver import store as _store

logger = logging.getLogger(__name__)

POOLINGS = ("flatten", "mean", "max")
OUTPUTS = ("numpy", "device")
PIXELS = ("rgb", "gray", "auto", "none")
PIXEL_NAMES = {c: data.channel_names(c) for c in (1, 3)}
# ITU-R BT.601 luma, Pillow's convert("L") weights, for one gray view of colour images.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Fewer batches than this finish too fast for a progress bar to help.
_PROGRESS_MIN_BATCHES = 4


def _is_direct_child(mdl: nn.Module) -> bool:
    return mdl.scope is not None and len(mdl.scope.path) == 1


def _layer_filter(layers: tuple[str, ...]) -> Callable[[nn.Module, str], bool]:
    def keep(mdl: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and mdl.name in layers and _is_direct_child(mdl)

    return keep


def float_pixels(images: Any) -> np.ndarray:
    """Images as float32 pixels in [0, 1], converted on the host.

    uint8 is scaled as :func:`jaxcnmf.data.to_float` does (``x / 255`` in float32); any
    other dtype is cast to float32 (no copy when it already is). On the host on purpose:
    under jit XLA turns ``/ 255`` into ``* (1 / 255)``, which moves half the pixel values
    by one ulp.

    Args:
        images: ``(N, H, W, C)`` (or any shape) uint8, or float in [0, 1].

    Returns:
        float32 array of the same shape.

    Example:
        >>> float_pixels(np.array([0, 51, 255], np.uint8)).tolist()
        [0.0, 0.20000000298023224, 1.0]
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return data.to_float(images)
    return images.astype(np.float32, copy=False)


def _to_float_traced(x: jnp.ndarray) -> jnp.ndarray:
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / jnp.float32(255)
    return x.astype(jnp.float32)


# ------------------------------------------------------------------------ layer shapes


class NetworkShapes(NamedTuple):
    """Per-image output shapes of a network's direct children and of its logits.

    Attributes:
        layers: dict layer name -> per-image shape, e.g. ``(8, 8, 256)`` or ``(512,)``,
            in the order the network calls them.
        logits: per-image shape of the network's output, e.g. ``(10,)``.
    """

    layers: dict[str, tuple[int, ...]]
    logits: tuple[int, ...]


def _trace_shapes(forward: Callable, *args) -> NetworkShapes:
    """Shapes of what ``forward(*args)`` computes, traced abstractly (``jax.eval_shape``).

    The one place that reads layer shapes: an interceptor records the first output of
    every direct child's ``__call__`` in call order (a child called twice keeps its first
    shape, the one ``collect`` and the gradients see).
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (context.method_name == "__call__" and _is_direct_child(context.module)
                and hasattr(out, "shape")):
            shapes.setdefault(context.module.name, tuple(out.shape[1:]))
        return out

    with nn.intercept_methods(interceptor):
        logits = jax.eval_shape(forward, *args)
    return NetworkShapes(shapes, tuple(logits.shape[1:]))


@functools.lru_cache(maxsize=64)
def _layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Layer shapes of ``model`` for one input shape, without variables (``model.init``
    traced abstractly); the probe points of ``models.probe_layers`` first, in order."""

    def init(x):
        return model.init_with_output(jax.random.key(0), x, train=False)[0]

    shapes = _trace_shapes(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)).layers
    first = [n for n in _probe_order(model) if n in shapes]
    return {n: shapes[n] for n in first + [n for n in shapes if n not in first]}


def _probe_order(model: nn.Module) -> tuple[str, ...]:
    try:
        return models.probe_layers(model)
    except ValueError:
        return ()


def available_layers(
    model: nn.Module, input_shape: Sequence[int] = (32, 32, 3)
) -> dict[str, tuple[int, ...]]:
    """Names and per-image output shapes of the layers ``collect`` can read.

    Traces the model abstractly (``jax.eval_shape``): no parameters are created and nothing
    is computed. The probe points of ``models.probe_layers(model)`` come first, in order,
    then any other direct child (``"fc"``, the logits, which may be negative) in the order
    the model calls them.

    Args:
        model: a flax.linen Module taking ``(B, *input_shape)`` and ``train=``.
        input_shape: ``(H, W, C)`` of one image.

    Returns:
        dict layer name -> shape of one image's activation, e.g. ``(8, 8, 256)`` or
        ``(512,)``.

    Example:
        >>> from jaxcnmf import models
        >>> available_layers(models.small_cnn(10))
        {'conv1': (16, 16, 32), 'conv2': (8, 8, 64), 'conv3': (4, 4, 128), 'pool': (128,), 'fc': (10,)}
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape: expected (H, W, C) of positive sizes, got {input_shape}")
    return dict(_layer_shapes(model, input_shape))


def network_shapes(model: nn.Module, variables: Any, image_shape: Sequence[int]) -> NetworkShapes:
    """Per-image shapes of every direct child of ``model`` and of its logits.

    Traces ``model.apply(variables, x, train=False)`` abstractly, so the shapes are those
    of this network with these variables (variables that do not fit the images raise
    flax's error here, before anything is computed).

    Args:
        model: flax linen module, ``model.apply(variables, x, train=False)`` -> logits.
        variables: its variables.
        image_shape: ``(H, W, C)`` of one image.

    Returns:
        NetworkShapes: ``layers`` (dict name -> shape, in call order) and ``logits``.

    Example:
        >>> network_shapes(models.small_cnn(10), variables, (32, 32, 3)).logits
        (10,)
    """
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return _trace_shapes(lambda v, x: model.apply(v, x, train=False), variables, x)


def layer_shapes(model: nn.Module, variables: Any, image_shape: Sequence[int]) -> dict[str, tuple]:
    """Per-image output shapes of the model's direct children, in call order.

    ``network_shapes(...).layers``; also importable as ``jaxcnmf.tcav.layer_shapes``,
    where it lived before.

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
    return network_shapes(model, variables, image_shape).layers


def _view_rows(shape: tuple[int, ...], pooling: str) -> int:
    if pooling == "flatten":
        return int(np.prod(shape))
    return shape[-1]


def _pool(act: jnp.ndarray, pooling: str) -> jnp.ndarray:
    """``(B, *spatial, C)`` -> ``(rows, B)`` in the documented row order."""
    spatial = tuple(range(1, act.ndim - 1))
    if pooling != "flatten" and spatial:
        # A reduction fused into the layer's own kernels sums in another order than one
        # over the finished activation; the barrier keeps pooled values reproducible.
        act = jax.lax.optimization_barrier(act)
    if pooling == "mean" and spatial:
        act = jnp.mean(act, axis=spatial)
    elif pooling == "max" and spatial:
        act = jnp.max(act, axis=spatial)
    # Channel first, then the spatial axes, then the batch: channel-major rows.
    perm = (act.ndim - 1, *range(1, act.ndim - 1), 0)
    return jnp.transpose(act, perm).reshape(-1, act.shape[0])


def _probe_views(model, variables, x, layers, pooling, n_valid):
    """Views ``(rows, n_valid)`` of the first ``n_valid`` images of ``x``, layer minima."""
    _, state = model.apply(
        variables,
        x,
        train=False,
        capture_intermediates=_layer_filter(layers),
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    views, minima = {}, []
    for name in layers:
        act = inter[name]["__call__"][0]
        views[name] = _pool(act, pooling)[:, :n_valid]
        # Over the raw activation, not the pooled view: a mean can hide negative entries.
        minima.append(jnp.min(act[:n_valid]))
    return views, jnp.stack(minima)


@functools.partial(
    jax.jit,
    static_argnames=("model", "layers", "pooling", "pixels", "n_valid"),
    donate_argnames=("buffers", "minima"),
)
def _probe_into(model, variables, x, start, buffers, minima, layers, pooling, pixels, n_valid):
    """Write one batch's views into columns ``start:start + n_valid`` of the donated buffers.

    The buffers are updated in place on the device, so the only transfer per batch is
    the images; the running minima stay there too, checked once after the last batch.
    """
    views, batch_minima = _probe_views(model, variables, x, layers, pooling, n_valid)
    if pixels:
        # x already holds the host's float pixels: these rows are exact copies of them.
        flat = x[:n_valid].reshape(n_valid, -1, x.shape[-1])
        for i, name in enumerate(PIXEL_NAMES[x.shape[-1]]):
            views[name] = flat[:, :, i].T
    buffers = {
        name: jax.lax.dynamic_update_slice(buf, views[name], (0, start))
        for name, buf in buffers.items()
    }
    return buffers, jnp.minimum(minima, batch_minima)


def _check_images(images: Any, model: nn.Module) -> np.ndarray:
    """Validate ``images`` once, outside jit; returns it as a uint8 or float32 array."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(
            f"images: expected an array of shape (N, H, W, C), got {arr.ndim} dimensions "
            f"with shape {arr.shape}"
        )
    n, h, w, c = arr.shape
    if n < 1:
        raise ValueError(f"images: expected at least one image, got shape {arr.shape}")
    if c not in PIXEL_NAMES:
        raise ValueError(
            f"images: expected 1 (gray) or 3 (RGB) channels last, NHWC, got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
        lo, hi = float(arr.min()), float(arr.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"images: expected float pixels in [0, 1] (or uint8 in [0, 255]), got values "
                f"in [{lo:.4g}, {hi:.4g}]; scale with jaxcnmf.data.to_float"
            )
    else:
        raise ValueError(f"images: expected dtype uint8 or float32 in [0, 1], got {arr.dtype}")
    if _probe_order(model) and (h, w) != (32, 32):
        raise ValueError(f"images: expected 32x32 images, shape (N, 32, 32, C), got shape {arr.shape}")
    return arr


_INPUT_CHECKS: dict[tuple, str] = {}


def _check_input_channels(model: nn.Module, variables: Mapping, image_shape: tuple) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    signature = tuple((jax.tree_util.keystr(p), tuple(np.shape(x))) for p, x in leaves)
    message = _input_mismatch(model, tuple(image_shape), signature, variables)
    if message:
        raise ValueError(message)


def _input_mismatch(model, image_shape, signature, variables) -> str:
    # Tracing the whole model costs as much as compiling a small one; remember the verdict
    # for each (model, image shape, variable shapes).
    key = (model, image_shape, signature)
    if key not in _INPUT_CHECKS:
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        try:
            jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
            _INPUT_CHECKS[key] = ""
        except Exception as err:  # flax raises its own shape errors; restate them
            _INPUT_CHECKS[key] = (
                f"images: per-image shape {image_shape} does not fit the model's variables "
                f"(were they made for images with another number of channels?): {err}"
            )
    return _INPUT_CHECKS[key]


def _check_layers(model: nn.Module, layers: Any, image_shape: tuple) -> tuple[str, ...]:
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: expected distinct names, got {list(layers)}")
    shapes = _layer_shapes(model, image_shape)
    unknown = [name for name in layers if name not in shapes]
    if unknown:
        raise ValueError(
            f"layers: unknown layer(s) {unknown} for {type(model).__name__}; available "
            f"layers are {list(shapes)}"
        )
    return layers


def _check_batch_size(batch_size: Any) -> int:
    try:
        ok = (not isinstance(batch_size, bool) and int(batch_size) == batch_size
              and batch_size >= 1)
    except (TypeError, ValueError, OverflowError):  # None, "abc", NaN, inf
        ok = False
    if not ok:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _batch_starts(n: int, batch_size: int) -> list[int]:
    # Every batch is full: a last partial batch instead starts at n - batch_size and
    # recomputes a few images, so one compiled shape writes whole column blocks in place.
    if n <= batch_size:
        return [0]
    starts = list(range(0, n - batch_size + 1, batch_size))
    if starts[-1] + batch_size < n:
        starts.append(n - batch_size)
    return starts


def _progress(starts: Sequence[int], progress: bool, desc: str):
    show = progress and len(starts) >= _PROGRESS_MIN_BATCHES
    return tqdm(starts, desc=desc, unit="batch", leave=False) if show else starts


def _pad_rows(block: np.ndarray, size: int) -> np.ndarray:
    """``block`` with zero rows appended up to ``size`` rows."""
    if block.shape[0] < size:
        pad = np.zeros((size - block.shape[0], *block.shape[1:]), block.dtype)
        block = np.concatenate([block, pad])
    return block


def _padded(images: np.ndarray, start: int, batch_size: int) -> tuple[np.ndarray, int]:
    """Images ``start:start + batch_size`` as float pixels, zero-padded to ``batch_size``
    (one compiled shape for the whole run), and how many of them are real."""
    block = float_pixels(images[start : start + batch_size])
    return _pad_rows(block, batch_size), block.shape[0]


def _map_batches(fn: Callable, batch_size: int, images: np.ndarray, *extra: np.ndarray
                 ) -> list[np.ndarray]:
    """``fn(images, *extra)`` over fixed-size, zero-padded batches, outputs concatenated.

    ``images`` become float pixels one batch at a time (a whole uint8 pool never exists as
    float32); the ``extra`` arrays (labels, activations) are batched alongside as they are.
    ``fn`` returns a tuple of ``(batch_size, ...)`` arrays; the padding rows are dropped.
    A batch's outputs are copied to the host only after the next batch is dispatched, so
    the device computes while the host prepares and copies.
    """
    outs, pending = [], None
    for start in range(0, images.shape[0], batch_size):
        block, n_valid = _padded(images, start, batch_size)
        result = fn(block, *(_pad_rows(e[start : start + batch_size], batch_size) for e in extra))
        if pending is not None:
            outs.append([np.asarray(o)[: pending[1]] for o in pending[0]])
        pending = (result, n_valid)
    outs.append([np.asarray(o)[: pending[1]] for o in pending[0]])
    return [np.concatenate(parts) for parts in zip(*outs)]


def _pixel_mode(pixels: Any, images: np.ndarray) -> str:
    """Resolve ``pixels`` to ``"rgb"``, ``"gray"`` or ``"none"`` for these images."""
    if pixels is True:
        return "rgb"
    if pixels is False or pixels is None:
        return "none"
    if pixels not in PIXELS:
        raise ValueError(f"pixels: expected True, False or one of {PIXELS}, got {pixels!r}")
    if images.shape[-1] == 1 and pixels != "none":
        return "rgb"  # one channel is already the one gray view
    if pixels != "auto":
        return pixels
    if data.same_channels(images):
        logger.info(
            "pixels: red, green and blue are equal in all %d images (gray pictures stored "
            "as RGB); using one 'gray' pixel view instead of three identical ones",
            images.shape[0],
        )
        return "gray"
    return "rgb"


def pixel_views(images: np.ndarray, pixels: str = "rgb") -> dict[str, np.ndarray]:
    """Pixel matrices of ``images``: one ``(H*W, N)`` float32 matrix per channel, or one gray.

    Args:
        images: ``(N, H, W, C)`` uint8, or float in [0, 1]; ``C`` is 1 or 3.
        pixels: ``"rgb"``: a view per channel; ``"gray"``: one ``"gray"`` view, the
            channel itself when the channels are equal (gray pictures stored as RGB) and
            otherwise the luma ``0.299 R + 0.587 G + 0.114 B``; ``"auto"``: ``"gray"`` when
            every pixel's channels are equal (saying so in an INFO log line), else
            ``"rgb"``. One-channel images always give the one ``"gray"`` view.

    Returns:
        ``{"red", "green", "blue"}`` or ``{"gray"}`` -> ``(H*W, N)`` float32, row
        ``h*W + w``, values in [0, 1].

    Example:
        >>> pixel_views(np.zeros((2, 32, 32, 1), np.uint8))["gray"].shape
        (1024, 2)
        >>> list(pixel_views(np.zeros((2, 32, 32, 3), np.uint8), pixels="auto"))
        ['gray']
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in PIXEL_NAMES:
        raise ValueError(
            f"images: expected shape (N, H, W, C) with C in {{1, 3}}, got {arr.shape}"
        )
    mode = _pixel_mode(pixels, arr)
    if mode == "none":
        raise ValueError("pixels: expected 'rgb', 'gray' or 'auto' for pixel views, got 'none'")
    n, h, w, c = arr.shape
    flat = float_pixels(arr.reshape(n, h * w, c))
    if mode == "gray":
        gray = flat[:, :, 0] if data.same_channels(arr) else flat @ _LUMA
        return {"gray": np.ascontiguousarray(gray.T)}
    return {name: np.ascontiguousarray(flat[:, :, i].T) for i, name in enumerate(PIXEL_NAMES[c])}


def collect(
    model: nn.Module,
    variables: Mapping,
    images: Any,
    layers: str | Sequence[str],
    pixels: bool = True,
    pooling: str = "flatten",
    batch_size: int = 256,
    progress: bool = True,
    allow_negative: bool = False,
    output: str = "numpy",
    store: str | None = None,
    dtype: str = "float32",
    store_info: Mapping | None = None,
) -> dict[str, np.ndarray] | dict[str, jax.Array] | _store.Store:
    """Pixel and activation matrices of a probe set, ready for ``jaxcnmf.fit``.

    Runs ``model`` in inference mode (``train=False``: batch-norm running statistics) in
    batches of ``batch_size`` with only the requested layers captured; pooling happens
    inside the compiled function and each batch is written in place into device buffers
    of the outputs (when ``N`` is not a multiple of ``batch_size`` the last batch is the
    last ``batch_size`` images, a few computed twice). Nothing is read back until every
    batch has been dispatched; the negative-value check runs once, at the end.

    Args:
        model: a ``jaxcnmf.models`` network (or any linen Module whose layers are direct
            children and that takes ``train=``).
        variables: its variables (``"params"``, ``"batch_stats"``).
        images: ``(N, H, W, C)`` uint8 (scaled by ``/ 255``) or float in [0, 1]; ``C`` is
            1 or 3; 32x32 for ``jaxcnmf.models``.
        layers: layer name or names, see ``available_layers``.
        pixels: which pixel views to put first: ``True`` or ``"rgb"`` (one per channel),
            ``"gray"`` (one gray view), ``"auto"`` (one gray view when every image's
            channels are equal, else one per channel), ``False`` or ``"none"`` (no pixel
            views); see ``pixel_views``.
        pooling: ``"flatten"`` (every unit), ``"mean"`` or ``"max"`` (one row per
            channel, for large probe sets).
        batch_size: images per forward pass.
        progress: show a progress bar when there are several batches.
        allow_negative: accept layers with negative values (pre-ReLU or logits); the
            solver then needs ``negative="clip"`` or ``"shift"``.
        output: ``"numpy"`` (host arrays, copied from the device once at the end) or
            ``"device"`` (jax arrays left on the default device, for ``jaxcnmf.fit`` on an
            accelerator); both hold the same numbers. Ignored with ``store``.
        store: a directory: write the views there as an on-disk store
            (``jaxcnmf.store``), one block of ``batch_size`` columns per batch as it goes,
            and return the opened store instead of the views; memory is then one batch.
            An interrupted run resumes at the first missing block when called again with
            the same arguments.
        dtype: dtype of the stored values (``"float32"``, ``"bfloat16"``, ``"float16"``);
            only with ``store``.
        store_info: optional manifest metadata for ``store``: ``labels`` ``(N,)``,
            ``class_names``, ``superclasses``, ``provenance`` (e.g. ``{"checkpoint": ...}``;
            model, layers, pooling and batch size are recorded anyway).

    Returns:
        dict view name -> ``(rows, N)`` float32 numpy array (``jax.Array`` with
        ``output="device"``): pixel views first (``"red"``,
        ``"green"``, ``"blue"`` or ``"gray"``, ``(H*W, N)``), then each layer in the order
        asked (``(C*h*w, N)`` for ``"flatten"``, ``(C, N)`` otherwise). Row orders are in
        the module docstring. With ``store``: the :class:`jaxcnmf.store.Store` written,
        holding the same numbers (rounded to ``dtype``).

    Raises:
        ValueError: bad ``images``, unknown layer, unknown ``pooling`` or ``pixels``,
            ``batch_size`` < 1, unknown ``output``, or a layer with negative values while ``allow_negative``
            is False.

    Example:
        >>> import jax
        >>> from jaxcnmf import models
        >>> model = models.resnet18(10, width=0.125)
        >>> variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
        >>> views = collect(model, variables, np.zeros((3, 32, 32, 3), np.uint8),
        ...                 ["conv5_x", "avgpool"], pooling="mean", progress=False)
        >>> [(k, v.shape) for k, v in views.items()][3:]
        [('conv5_x', (64, 3)), ('avgpool', (64, 3))]
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
    batch_size = _check_batch_size(batch_size)
    arr = _check_images(images, model)
    image_shape = arr.shape[1:]
    layers = _check_layers(model, layers, image_shape)
    mode = _pixel_mode(pixels, arr)
    if not layers and mode == "none":
        raise ValueError("layers: expected at least one layer when pixels=False, got none")
    if layers:
        _check_input_channels(model, variables, image_shape)
    if store is not None:
        return _collect_to_store(model, variables, arr, layers, mode, pooling, batch_size,
                                 progress, allow_negative, store, dtype, store_info)
    if dtype != "float32":
        raise ValueError(f"dtype: expected 'float32' without store=..., got {dtype!r}")

    n = arr.shape[0]
    if not layers:
        views = pixel_views(arr, mode)
        return views if output == "numpy" else {k: jnp.asarray(v) for k, v in views.items()}
    # A gray view is made on the host; per-channel views are copied inside the forward pass.
    host_pixels = pixel_views(arr, "gray") if mode == "gray" else {}
    pixels = mode == "rgb"

    shapes = _layer_shapes(model, image_shape)
    h, w, c = image_shape
    rows = {name: h * w for name in PIXEL_NAMES[c]} if pixels else {}
    rows.update({name: _view_rows(shapes[name], pooling) for name in layers})
    buffers = {name: jnp.zeros((r, n), jnp.float32) for name, r in rows.items()}
    minima = jnp.full((len(layers),), jnp.inf, jnp.float32)
    n_valid = min(n, batch_size)
    # Each call is dispatched asynchronously: the host converts the next batch while the
    # device computes, and nothing comes back until the loop has finished.
    for start in _progress(_batch_starts(n, batch_size), progress, "probe"):
        block, _ = _padded(arr, start, batch_size)
        buffers, minima = _probe_into(
            model, variables, block, np.int32(start), buffers, minima,
            layers=layers, pooling=pooling, pixels=pixels, n_valid=n_valid,
        )

    _check_minima(layers, jax.device_get(minima), allow_negative)
    # jax hands dicts back in sorted key order; restore the documented one.
    buffers = {name: buffers[name] for name in rows}
    if output == "device":
        return {**{k: jnp.asarray(v) for k, v in host_pixels.items()}, **buffers}
    # Every view crosses to the host once, at the end: per-batch copies into column blocks
    # of host arrays cost far more than the forward passes on an accelerator. All
    # transfers start together; then each view is copied into a writable array (fetched
    # jax arrays are read-only) and its device buffer freed, so the peak is the outputs
    # plus one view.
    for buf in buffers.values():
        buf.copy_to_host_async()
    return {**host_pixels, **{name: np.array(buffers.pop(name)) for name in rows}}


_probe_block = jax.jit(_probe_views, static_argnames=("model", "layers", "pooling", "n_valid"))


def _check_minima(layers, minima, allow_negative):
    for name, lowest in zip(layers, np.asarray(minima).tolist()):
        if lowest < 0 and not allow_negative:
            raise ValueError(
                f"layer {name!r} has negative values (min {lowest:.4g}); is it a pre-ReLU "
                f"layer? NMF needs non-negative views. Pass allow_negative=True to collect "
                f"it anyway and factorize with jaxcnmf.fit(..., negative='clip') or "
                f"negative='shift'"
            )


def _collect_to_store(model, variables, arr, layers, pixels, pooling, batch_size, progress,
                      allow_negative, path, dtype, info):
    """``collect`` writing one store block per batch; returns the opened store.

    Block ``i`` holds columns ``i * b : (i + 1) * b`` with ``b = min(batch_size, N)``; the
    last, partial block is cut from a full batch of the last ``b`` images, as ``collect``
    computes it, so one compiled shape serves every block. The host writes block ``i - 1``
    while the device computes block ``i``.
    """
    n, h, w, c = arr.shape
    b = min(batch_size, n)
    shapes = _layer_shapes(model, arr.shape[1:]) if layers else {}
    # ``pixels`` is the resolved mode: "rgb" (a view per channel), "gray" or "none".
    pixel_names = {"none": (), "gray": ("gray",)}.get(pixels, PIXEL_NAMES[c])
    rows = {name: h * w for name in pixel_names}
    rows.update({name: _view_rows(shapes[name], pooling) for name in layers})
    view_shapes = {name: (h, w) for name in pixel_names}
    view_shapes.update({name: shapes[name] for name in layers})
    info = dict(info or {})
    unknown = sorted(set(info) - {"labels", "class_names", "superclasses", "provenance"})
    if unknown:
        raise ValueError(f"store_info: unknown key(s) {unknown}, expected labels, "
                         f"class_names, superclasses, provenance")
    provenance = {"model": type(model).__name__, "layers": list(layers), "pooling": pooling,
                  "pixels": pixels, "image_shape": [h, w, c], "batch_size": b,
                  **(info.get("provenance") or {})}
    writer = _store.Writer(path, rows, n, block_size=b, dtype=dtype, shapes=view_shapes,
                           labels=info.get("labels"), class_names=info.get("class_names"),
                           superclasses=info.get("superclasses"), provenance=provenance)

    def write(i, views, minima, first):
        start, stop = writer.columns(i)
        if layers:
            views, minima = jax.device_get((views, minima))
            _check_minima(layers, minima, allow_negative)
        pix = pixel_views(arr[start:stop], pixels) if pixel_names else {}
        writer.write_block(i, {name: pix[name] if name in pix
                               else views[name][:, start - first:stop - first]
                               for name in rows})

    pending = None
    for i in _progress(writer.missing, progress, "probe"):
        start, _ = writer.columns(i)
        first = min(start, n - b)
        views = minima = None
        if layers:
            block, _ = _padded(arr, first, batch_size)
            views, minima = _probe_block(model, variables, block, layers=layers,
                                         pooling=pooling, n_valid=b)
        if pending is not None:
            write(*pending)
        pending = (i, views, minima, first)
    if pending is not None:
        write(*pending)
    return writer.finish()


def _replace_output(layer: str, activations: jnp.ndarray):
    def interceptor(next_fun, args, kwargs, context):
        mdl = context.module
        if context.method_name == "__call__" and mdl.name == layer and _is_direct_child(mdl):
            return activations
        return next_fun(*args, **kwargs)

    return interceptor


def _forward_replaced(model, variables, x, layer, activations):
    with nn.intercept_methods(_replace_output(layer, activations)):
        return model.apply(variables, _to_float_traced(x), train=False)


_intervene_batch = jax.jit(_forward_replaced, static_argnames=("model", "layer"))


def _check_activations(activations: Any, layer: str, shape: tuple, n: int | None) -> None:
    got = tuple(np.shape(activations))
    expected = ("N" if n is None else n, *shape)
    if len(got) != len(expected) or got[1:] != shape or (n is not None and got[0] != n):
        raise ValueError(
            f"activations: expected shape {expected} for layer {layer!r}, got {got}"
        )


def intervene(
    model: nn.Module,
    variables: Mapping,
    images: Any,
    layer: str,
    activations: Any,
    batch_size: int = 256,
) -> np.ndarray:
    """Logits with the output of ``layer`` replaced by ``activations``.

    Args:
        model, variables: as for ``collect``.
        images: ``(N, H, W, C)`` uint8 or float in [0, 1] (they fix the shapes; the layers
            before ``layer`` do not change the result).
        layer: name of a direct child, see ``available_layers``.
        activations: ``(N, *layer_shape)`` float, e.g. ``(N, 8, 8, 256)`` for ResNet-18's
            ``conv4_x`` (NHWC, as the layer outputs it, not the ``collect`` row order).
        batch_size: images per forward pass.

    Returns:
        ``(N, num_classes)`` float32 numpy logits, from forward passes at the backend's
        default matmul precision, as ``model.apply`` computes them.

    Example:
        >>> import jax
        >>> from jaxcnmf import models
        >>> model = models.small_cnn(10, width=0.25)
        >>> variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
        >>> images = np.zeros((4, 32, 32, 3), np.uint8)
        >>> intervene(model, variables, images, "pool", np.zeros((4, 32), np.float32)).shape
        (4, 10)
    """
    batch_size = _check_batch_size(batch_size)
    arr = _check_images(images, model)
    (layer,) = _check_layers(model, (layer,), arr.shape[1:])
    _check_input_channels(model, variables, arr.shape[1:])
    shape = _layer_shapes(model, arr.shape[1:])[layer]
    _check_activations(activations, layer, shape, arr.shape[0])
    acts = np.asarray(activations, np.float32)

    (logits,) = _map_batches(
        lambda x, a: (_intervene_batch(model, variables, x, layer, a),), batch_size, arr, acts
    )
    return logits.astype(np.float32, copy=False)


def layer_forward(
    model: nn.Module, variables: Mapping, layer: str
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Pure function ``(images, activations) -> logits`` with ``layer``'s output replaced.

    For gradients with respect to a layer (TCAV) and for concept fidelity. Works under
    ``jax.jit``, ``jax.grad`` and ``jax.vmap``; under ``jit`` the layers before ``layer``
    are dead code and are removed.

    Args:
        model, variables: as for ``collect``.
        layer: name of a direct child, see ``available_layers``.

    Returns:
        ``f(images, activations)``: ``images`` ``(B, H, W, C)`` float32 in [0, 1] (uint8
        is scaled inside, where XLA's ``* (1/255)`` may differ from ``collect`` by an
        ulp), ``activations`` ``(B, *layer_shape)`` float32 -> logits
        ``(B, num_classes)`` float32. A wrong activation shape raises ``ValueError``
        when ``f`` is traced. ``f`` runs at the backend's default matmul precision
        (TF32 on NVIDIA GPUs); where the sign of a small gradient matters, call it under
        ``jax.default_matmul_precision("float32")``, or use :func:`layer_gradients`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxcnmf import models
        >>> model = models.small_cnn(10, width=0.25)
        >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        >>> f = layer_forward(model, variables, "pool")
        >>> g = jax.grad(lambda a: f(jnp.zeros((2, 32, 32, 3)), a)[:, 3].sum())
        >>> g(jnp.ones((2, 32))).shape
        (2, 32)
    """
    if not isinstance(layer, str):
        raise ValueError(f"layer: expected a layer name (str), got {layer!r}")
    _check_layers(model, (layer,), (32, 32, 3))

    def forward(images: jnp.ndarray, activations: jnp.ndarray) -> jnp.ndarray:
        shape = _layer_shapes(model, tuple(images.shape[1:]))[layer]
        _check_activations(activations, layer, shape, images.shape[0])
        return _forward_replaced(model, variables, images, layer, activations)

    return forward


# ---------------------------------------- activations and gradients at full precision


def full_precision(fn: Callable) -> Callable:
    """``fn`` traced (or run eagerly) with full-precision float32 matmuls and convolutions.

    Inside, every float32 product runs in full float32 even where the backend would use
    TF32 or bfloat16 passes (NVIDIA GPUs, TPUs). The precision is fixed inside the traced
    function, not by the caller, so a jitted ``fn`` compiles to the same program whatever
    context it is called from. TCAV needs it: its scores are signs of small numbers.

    Example:
        >>> dot = jax.jit(full_precision(lambda a, b: a @ b))
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("float32"):
            return fn(*args, **kwargs)

    return wrapped


def _flatten(act: jax.Array) -> jax.Array:
    """Channel-major flattening of (B, H, W, C) (or (B, C)) to (B, D)."""
    return jnp.moveaxis(act, -1, 1).reshape(act.shape[0], -1)


def _forward_captured(model, variables, x, layers, deltas=None):
    """Logits, with the outputs of direct children ``layers`` captured (and shifted by
    ``deltas[name]`` when given, which is what gradients with respect to a layer take)."""
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = context.module.name
        if (context.method_name == "__call__" and _is_direct_child(context.module)
                and name in layers and name not in captured):
            captured[name] = out
            if deltas is not None:
                out = out + deltas[name]
        return out

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return logits, captured


@full_precision
def _activations(model, variables, x, *, layers):
    _, captured = _forward_captured(model, variables, x, layers)
    return tuple(_flatten(captured[name]) for name in layers)


@full_precision
def _gradients(model, variables, x, labels, *, layers):
    """Gradient of each input's own class logit w.r.t. every layer: one backward pass.

    In eval mode inputs do not interact, so the gradient of the batch sum of the chosen
    logits with respect to a per-input shift of the layer output is, row by row, the
    gradient of that input's logit.
    """
    _, captured = jax.eval_shape(lambda: _forward_captured(model, variables, x, layers))
    zeros = {name: jnp.zeros(captured[name].shape, captured[name].dtype) for name in layers}

    def picked(deltas):
        logits, _ = _forward_captured(model, variables, x, layers, deltas)
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


def layer_activations(
    model: nn.Module, variables: Any, images: np.ndarray, layers: Sequence[str],
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Flattened (channel-major) activations of ``layers`` for ``images``, at full precision.

    Unlike ``collect`` (the network's own activations at the backend's default precision,
    as views for the factorization), every product here runs in full float32 on every
    backend (see :func:`full_precision`): these are what TCAV's CAVs are trained on. Also
    importable as ``jaxcnmf.tcav.layer_activations``, where it lived before.

    Args:
        model: flax linen module with the layers as direct named children.
        variables: its variables.
        images: (N, H, W, C) uint8 or float32 in [0, 1].
        layers: layer names.
        batch_size: images per forward pass.

    Returns:
        dict layer -> (N, D) float32, row order ``c*H*W + h*W + w`` (the transpose of
        ``collect(..., pooling="flatten")``'s view).

    Example:
        >>> acts = layer_activations(model, variables, images, ["conv3", "pool"])
        >>> acts["conv3"].shape              # small CNN, width 1: (N, 128 * 4 * 4)
        (100, 2048)
    """
    layers = tuple(layers)
    fn = functools.partial(_compiled(_activations, model, layers), variables)
    return dict(zip(layers, _map_batches(fn, min(batch_size, len(images)), images)))


def layer_gradients(
    model: nn.Module, variables: Any, images: np.ndarray, labels: np.ndarray,
    layers: Sequence[str], batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Gradient of each image's logit ``labels[i]`` w.r.t. the flattened layers.

    One backward pass per batch for all layers at once, at full float32 precision on
    every backend (see :func:`full_precision`). Also importable as
    ``jaxcnmf.tcav.layer_gradients``, where it lived before.

    Args:
        model: flax linen module with the layers as direct named children.
        variables: its variables.
        images: (N, H, W, C) uint8 or float32 in [0, 1].
        labels: (N,) int logit index per image.
        layers: layer names.
        batch_size: images per forward/backward pass.

    Returns:
        dict layer -> (N, D) float32, flattened like ``layer_activations``.

    Example:
        >>> g = layer_gradients(model, variables, images, labels, ["conv3"])
        >>> g["conv3"].shape              # small CNN, width 1: (N, 128 * 4 * 4)
        (100, 2048)
    """
    layers = tuple(layers)
    fn = functools.partial(_compiled(_gradients, model, layers), variables)
    labels = np.asarray(labels, np.int32)
    return dict(zip(layers, _map_batches(fn, min(batch_size, len(images)), images, labels)))
