"""Probe a trained CNN: the pixel matrices D_i and activation matrices A_j of a probe set.

The network is a ``jaxcnmf.models`` network or any other Flax Linen module, a Flax NNX
module, or a plain function (``from_function``); every forward pass goes through the
adapter interface of :mod:`jaxcnmf.nets.adapters`. A layer is a submodule's output named
by its path: ``"conv4_x"``, ``"avgpool"`` for our models, ``"backbone/stage3"`` in a
Linen module, ``"layer4.1.conv2"`` in an NNX module, a name the function returns.
``collect`` runs the model in inference mode in batches capturing only the requested layers,
pools inside the compiled function and writes each batch in place into preallocated
``(rows, N)`` float32 matrices on the device, so device memory is the outputs plus one
batch; they are either returned as jax arrays (``output="device"``, ready for
``jaxcnmf.fit`` without a trip through the host) or copied to the host once at the end.
Forward passes run at the backend's default matmul precision, as ``model.apply`` does:
the views are the network's own activations, which is what NMF should explain.
``intervene`` and ``layer_forward`` replace a layer's output to read off the logits, for
concept fidelity.
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
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcnmf.nets import adapters, data, models
from jaxcnmf.nets.adapters import Bound, ProbedFunction, adapt, from_function  # noqa: F401
from jaxcnmf.solver import store as _store

logger = logging.getLogger(__name__)

POOLINGS = ("flatten", "mean", "max")
OUTPUTS = ("numpy", "device")
PIXELS = ("rgb", "gray", "auto", "none")
NEGATIVES = ("raise", "clip", "shift")
PIXEL_NAMES = {c: data.channel_names(c) for c in (1, 3)}
# ITU-R BT.601 luma, Pillow's convert("L") weights, for one gray view of colour images.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# Fewer batches than this finish too fast for a progress bar to help.
_PROGRESS_MIN_BATCHES = 4


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


NetworkShapes = adapters.Traced

# Traced layer shapes per (adapter, image shape, variable shapes): tracing a network costs
# as much as compiling a small one, and every front door needs them.
_TRACES: dict[tuple, Any] = {}
_TRACES_MAX = 256


def _signature(state: Any) -> tuple:
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return tuple((jax.tree_util.keystr(p), tuple(np.shape(x)), str(getattr(x, "dtype", "")))
                 for p, x in leaves)


def _own_error(err: Exception) -> bool:
    return isinstance(err, ValueError) and str(err).startswith(("layers:", "apply_fn:"))


def _traced(net: Bound, image_shape: tuple[int, ...]) -> tuple[NetworkShapes | None, str]:
    """Every layer's shape and the logits' shape, or ``(None, message)`` saying why the
    network does not run on images of ``image_shape`` with these variables."""
    key = (net.adapter, image_shape, _signature(net.state))
    try:
        hash(key)
    except TypeError:  # an unhashable module: trace every time
        key = None
    if key is not None and key in _TRACES:
        return _TRACES[key]
    try:
        result = (net.adapter.trace(net.state, image_shape), "")
    except Exception as err:  # flax and lax raise their own shape errors; restate them
        if _own_error(err):
            raise
        result = (None, (
            f"images: per-image shape {image_shape} does not fit the model's variables "
            f"(were they made for images with another number of channels?): {err}"
        ))
    if key is not None:
        if len(_TRACES) >= _TRACES_MAX:
            _TRACES.pop(next(iter(_TRACES)))
        _TRACES[key] = result
    return result


def _shapes(net: Bound, image_shape: tuple[int, ...]) -> NetworkShapes:
    shapes, message = _traced(net, tuple(int(s) for s in image_shape))
    if message:
        raise ValueError(message)
    return shapes


def _probe_order(model: Any) -> tuple[str, ...]:
    if not isinstance(model, nn.Module):
        return ()
    try:
        return models.probe_layers(model)
    except ValueError:
        return ()


def _listing(net: Bound, image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The layers ``available_layers`` lists: for ``jaxcnmf.models``, the probe points in
    order and then the other direct children; for any other network every layer path, in
    call order. Linen modules are traced without their variables (``init``)."""
    adapter = net.adapter
    if isinstance(adapter, adapters.LinenAdapter):
        net = Bound(adapter, None)
    shapes = _shapes(net, image_shape).layers
    first = [n for n in _probe_order(getattr(adapter, "module", None)) if n in shapes]
    if not first:
        return dict(shapes)
    rest = [n for n in shapes if n not in first and "/" not in n]
    return {n: shapes[n] for n in first + rest}


def available_layers(
    model: Any, input_shape: Sequence[int] = (32, 32, 3), *,
    image_shape: Sequence[int] | None = None, variables: Any = None,
) -> dict[str, tuple[int, ...]]:
    """Paths and per-image output shapes of the layers ``collect`` can read.

    Traces the model abstractly (``jax.eval_shape``): nothing is computed. What is listed
    (any nested path of a Linen or NNX module can be probed, listed or not):

    * ``jaxcnmf.models``: the probe points of ``models.probe_layers(model)`` in order, then
      the other direct children (``"fc"``, the logits, which may be negative);
    * another Linen module: every submodule whose ``__call__`` returns an array, by its
      path joined with ``/`` (``"backbone/stage3"``), in the order the model calls them;
    * an NNX module: likewise, by attribute path joined with ``.`` (``"layer4.1.conv1"``);
    * ``from_function(...)``: its names.

    Args:
        model: a Linen module (traced without variables), an NNX module, or
            ``from_function(...)``; see :mod:`jaxcnmf.nets.adapters`.
        input_shape: ``(H, W, C)`` of one image.
        image_shape: the same as ``input_shape`` (takes precedence when given).
        variables: for an NNX module, an ``nnx.State`` to use instead of its own.

    Returns:
        dict layer path -> shape of one image's activation, e.g. ``(8, 8, 256)`` or
        ``(512,)``.

    Example:
        >>> from jaxcnmf import models
        >>> available_layers(models.small_cnn(10))
        {'conv1': (16, 16, 32), 'conv2': (8, 8, 64), 'conv3': (4, 4, 128), 'pool': (128,), 'fc': (10,)}
    """
    shape = tuple(int(s) for s in (input_shape if image_shape is None else image_shape))
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape: expected (H, W, C) of positive sizes, got {shape}")
    return dict(_listing(adapt(model, variables), shape))


def network_shapes(model: Any, variables: Any, image_shape: Sequence[int]) -> NetworkShapes:
    """Per-image shapes of the listed layers of ``model`` and of its logits.

    Traces the forward pass with these variables abstractly, so the shapes are those of
    this network with these variables (variables that do not fit the images raise
    here, before anything is computed). The layers are those of ``available_layers``.

    Args:
        model: a Linen module, an NNX module or ``from_function(...)``.
        variables: its variables (``None`` for NNX modules and functions).
        image_shape: ``(H, W, C)`` of one image.

    Returns:
        NetworkShapes: ``layers`` (dict path -> shape) and ``logits``.

    Example:
        >>> network_shapes(models.small_cnn(10), variables, (32, 32, 3)).logits
        (10,)
    """
    net = adapt(model, variables)
    image_shape = tuple(int(s) for s in image_shape)
    traced = _shapes(net, image_shape)
    listed = _listing(net, image_shape)
    return NetworkShapes({n: traced.layers[n] for n in listed}, traced.logits)


def layer_shapes(model: Any, variables: Any, image_shape: Sequence[int]) -> dict[str, tuple]:
    """Per-image output shapes of the model's listed layers, in call order.

    ``network_shapes(...).layers``; also importable as ``jaxcnmf.tcav.layer_shapes``,
    where it lived before.

    Args:
        model: a Linen module, an NNX module or ``from_function(...)``.
        variables: its variables (``None`` for NNX modules and functions).
        image_shape: (H, W, C) of one image.

    Returns:
        dict layer path -> per-image shape tuple.

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


def _probe_views(adapter, state, x, layers, pooling, n_valid):
    """Views ``(rows, n_valid)`` of the first ``n_valid`` images of ``x``, layer minima."""
    _, captured = adapter.forward(state, x, layers)
    views, minima = {}, []
    for name in layers:
        act = captured[name]
        views[name] = _pool(act, pooling)[:, :n_valid]
        # Over the raw activation, not the pooled view: a mean can hide negative entries.
        minima.append(jnp.min(act[:n_valid]))
    return views, jnp.stack(minima)


@functools.partial(
    jax.jit,
    static_argnames=("adapter", "layers", "pooling", "pixels", "n_valid"),
    donate_argnames=("buffers", "minima"),
)
def _probe_into(adapter, state, x, start, buffers, minima, layers, pooling, pixels, n_valid):
    """Write one batch's views into columns ``start:start + n_valid`` of the donated buffers.

    The buffers are updated in place on the device, so the only transfer per batch is
    the images; the running minima stay there too, checked once after the last batch.
    """
    views, batch_minima = _probe_views(adapter, state, x, layers, pooling, n_valid)
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


def _check_images(images: Any, model: Any) -> np.ndarray:
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


def _check_input_channels(net: Bound, image_shape: tuple) -> None:
    """The network runs on images of ``image_shape`` with its variables (traced once)."""
    if isinstance(net.adapter, adapters.LinenAdapter) and net.state is None:
        raise ValueError(f"variables: expected the variables of the Linen module "
                         f"{net.adapter.name} (model.init(...)), got None")
    _shapes(net, tuple(image_shape))


def _check_layers(net: Bound, layers: Any, image_shape: tuple) -> tuple[str, ...]:
    """``layers`` as a tuple of distinct layer paths the network has; any traced path is
    accepted, the message lists those ``available_layers`` lists."""
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    if not all(isinstance(name, str) for name in layers):
        raise ValueError(f"layers: expected layer paths (str), got {list(layers)}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: expected distinct names, got {list(layers)}")
    if not layers:
        return layers
    listed = _listing(net, tuple(image_shape))
    unknown = [name for name in layers if name not in listed]
    if unknown:
        adapter = net.adapter
        probe_net = Bound(adapter, None) if isinstance(adapter, adapters.LinenAdapter) else net
        known = _shapes(probe_net, tuple(image_shape)).layers
        unknown = [name for name in unknown if name not in known]
    if unknown:
        raise ValueError(
            f"layers: unknown layer(s) {unknown} for {net.adapter.name}; available "
            f"layers are {list(listed)}"
        )
    return layers


def _is_positive_int(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and int(value) == value and value >= 1
    except (TypeError, ValueError, OverflowError):  # None, "abc", NaN, inf
        return False


def _check_batch_size(batch_size: Any) -> int:
    if not _is_positive_int(batch_size):
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
    model: Any,
    variables: Any,
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
    negative: str = "raise",
    block_size: int | None = None,
) -> dict[str, np.ndarray] | dict[str, jax.Array] | _store.Store:
    """Pixel and activation matrices of a probe set, ready for ``jaxcnmf.fit``.

    Runs ``model`` in inference mode (``train=False``: batch-norm running statistics) in
    batches of ``batch_size`` with only the requested layers captured; pooling happens
    inside the compiled function and each batch is written in place into device buffers
    of the outputs (when ``N`` is not a multiple of ``batch_size`` the last batch is the
    last ``batch_size`` images, a few computed twice). Nothing is read back until every
    batch has been dispatched; the negative-value check runs once, at the end.

    Args:
        model: a ``jaxcnmf.models`` network or any other ``flax.linen`` module, a
            ``flax.nnx`` module, or ``from_function(apply_fn, params, layers)``; see
            :mod:`jaxcnmf.nets.adapters` for how each is run and how its layers are named.
        variables: a Linen module's variables (``"params"``, ``"batch_stats"``);
            ``None`` for NNX modules and functions (or an ``nnx.State``/params to use
            instead of their own).
        images: ``(N, H, W, C)`` uint8 (scaled by ``/ 255``) or float in [0, 1]; ``C`` is
            1 or 3; 32x32 for ``jaxcnmf.models``.
        layers: layer path or paths (``"conv4_x"``, ``"backbone/stage3"``,
            ``"layer4.1"``), see ``available_layers``.
        pixels: which pixel views to put first: ``True`` or ``"rgb"`` (one per channel),
            ``"gray"`` (one gray view), ``"auto"`` (one gray view when every image's
            channels are equal, else one per channel), ``False`` or ``"none"`` (no pixel
            views); see ``pixel_views``.
        pooling: ``"flatten"`` (every unit), ``"mean"`` or ``"max"`` (one row per
            channel, for large probe sets).
        batch_size: images per forward pass.
        progress: show a progress bar when there are several batches.
        allow_negative: keep layers with negative values (pre-ReLU or logits) as they
            are; the solver then needs ``negative="clip"`` or ``"shift"``.
        negative: what to do with a layer that has negative values (a pre-ReLU output):
            ``"raise"`` (refuse it, advising to probe the activation after it),
            ``"clip"`` (set negative entries of its view to 0) or ``"shift"`` (subtract
            its view's minimum), as ``jaxcnmf.fit(..., negative=...)`` does; views with no
            negative entry are left alone. ``"shift"`` needs every image first, so it
            cannot be combined with ``store``.
        output: ``"numpy"`` (host arrays, copied from the device once at the end) or
            ``"device"`` (jax arrays left on the default device, for ``jaxcnmf.fit`` on an
            accelerator); both hold the same numbers. Ignored with ``store``.
        store: a directory: write the views there as an on-disk store
            (``jaxcnmf.store``), block by block as it goes, and return the opened store
            instead of the views; memory is then about one block. An interrupted run
            resumes at the first missing block when called again with the same arguments
            (``batch_size`` may differ: blocks do not depend on it).
        dtype: dtype of the stored values (``"float32"``, ``"bfloat16"``, ``"float16"``);
            only with ``store``.
        block_size: columns per store block, only with ``store``; default
            ``store.default_block_size`` (about 64 MiB of all views a block, rows of an odd
            number of cache lines). Each block is computed as batches of ``batch_size``
            images; when ``block_size`` is not a multiple of it, one batch per block
            computes a few images that the block does not keep.
        store_info: optional manifest metadata for ``store``: ``labels`` ``(N,)``,
            ``class_names``, ``superclasses``, ``provenance`` (e.g. ``{"checkpoint": ...}``;
            model, layers, pooling and batch size are recorded anyway; the block size
            is the manifest's ``block_size``).

    Returns:
        dict view name -> ``(rows, N)`` float32 numpy array (``jax.Array`` with
        ``output="device"``): pixel views first (``"red"``,
        ``"green"``, ``"blue"`` or ``"gray"``, ``(H*W, N)``), then each layer in the order
        asked (``(C*h*w, N)`` for ``"flatten"``, ``(C, N)`` otherwise). Row orders are in
        the module docstring. With ``store``: the :class:`jaxcnmf.store.Store` written,
        holding the same numbers (rounded to ``dtype``).

    Raises:
        ValueError: bad ``images``, unknown layer, unknown ``pooling`` or ``pixels``,
            ``batch_size`` < 1, ``block_size`` < 1 or without ``store``, unknown
            ``output`` or ``negative``, or a layer with negative values with
            ``negative="raise"`` and ``allow_negative`` False.

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
    if negative not in NEGATIVES:
        raise ValueError(f"negative: expected one of {NEGATIVES}, got {negative!r}")
    if negative == "shift" and store is not None:
        raise ValueError(
            "negative: 'shift' needs the minimum over every image before the first block is "
            "written, so it cannot be used with store=...; use negative='clip', or "
            "allow_negative=True and jaxcnmf.fit(..., negative='shift')"
        )
    batch_size = _check_batch_size(batch_size)
    block_size = _check_block_size(block_size)
    if block_size is not None and store is None:
        raise ValueError(f"block_size: expected None without store=... (it sets the columns "
                         f"per store block), got {block_size}")
    net = adapt(model, variables)
    arr = _check_images(images, model)
    image_shape = arr.shape[1:]
    if layers:
        _check_input_channels(net, image_shape)
    layers = _check_layers(net, layers, image_shape)
    mode = _pixel_mode(pixels, arr)
    if not layers and mode == "none":
        raise ValueError("layers: expected at least one layer when pixels=False, got none")
    keep = "keep" if allow_negative else negative
    if store is not None:
        return _collect_to_store(net, arr, layers, mode, pooling, batch_size, block_size,
                                 progress, keep, store, dtype, store_info)
    if dtype != "float32":
        raise ValueError(f"dtype: expected 'float32' without store=..., got {dtype!r}")

    n = arr.shape[0]
    if not layers:
        views = pixel_views(arr, mode)
        return views if output == "numpy" else {k: jnp.asarray(v) for k, v in views.items()}
    # A gray view is made on the host; per-channel views are copied inside the forward pass.
    host_pixels = pixel_views(arr, "gray") if mode == "gray" else {}
    pixels = mode == "rgb"

    shapes = _shapes(net, image_shape).layers
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
            net.adapter, net.state, block, np.int32(start), buffers, minima,
            layers=layers, pooling=pooling, pixels=pixels, n_valid=n_valid,
        )

    negatives = _check_minima(layers, jax.device_get(minima), keep)
    # jax hands dicts back in sorted key order; restore the documented one.
    buffers = {name: buffers[name] for name in rows}
    for name in negatives:
        buffers[name] = _non_negative(buffers[name], keep)
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


_probe_block = jax.jit(_probe_views, static_argnames=("adapter", "layers", "pooling", "n_valid"))


def _check_minima(layers, minima, negative: str) -> list[str]:
    """Refuse layers with negative values (``negative="raise"``); the names of those that
    have some otherwise (for ``"clip"`` and ``"shift"``)."""
    found = []
    for name, lowest in zip(layers, np.asarray(minima).tolist()):
        if lowest >= 0:
            continue
        if negative == "raise":
            raise ValueError(
                f"layer {name!r} has negative values (min {lowest:.4g}); is it a pre-ReLU "
                f"output? NMF needs non-negative views: probe the activation after it (its "
                f"ReLU), or pass negative='clip' or negative='shift' (as jaxcnmf.fit does), "
                f"or allow_negative=True to keep the values as they are"
            )
        found.append(name)
    return found


@functools.partial(jax.jit, static_argnames="negative", donate_argnums=0)
def _non_negative(view: jax.Array, negative: str) -> jax.Array:
    """``view`` with negative entries set to 0 (``"clip"``) or shifted by its minimum
    (``"shift"``), as ``jaxcnmf.fit`` treats them; ``"keep"`` leaves it alone."""
    if negative == "clip":
        return jnp.maximum(view, 0)
    if negative == "shift":
        return view - jnp.minimum(jnp.min(view), 0)
    return view


def _check_block_size(block_size: Any) -> int | None:
    if block_size is None:
        return None
    if not _is_positive_int(block_size):
        raise ValueError(f"block_size: expected an integer >= 1 or None, got {block_size!r}")
    return int(block_size)


def _block_batches(start: int, stop: int, n: int, batch_size: int) -> list[tuple[int, int, int]]:
    """The batches computing columns ``start:stop``: ``(first, lo, hi)`` per batch, which
    computes columns ``first:first + b`` (``b = min(batch_size, n)``) and keeps ``lo:hi``.

    Every batch has the one compiled shape: a batch crossing ``stop`` is computed whole and
    cut (at most one batch of waste per block); one crossing ``n`` ends at ``n`` instead, as
    ``collect``'s last batch does.
    """
    b = min(batch_size, n)
    return [(min(lo, n - b), lo, min(lo + b, stop)) for lo in range(start, stop, b)]


def _started_batch_size(path) -> int | None:
    """The batch size recorded by the ``collect`` that started the store at ``path`` (None
    when there is no store yet): a resumed store keeps it, whatever the batch size now."""
    path = pathlib.Path(path)
    if not (path / _store.MANIFEST).is_file():
        return None
    recorded = (_store._load_manifest(path).get("provenance") or {}).get("batch_size")
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None


def _collect_to_store(net, arr, layers, pixels, pooling, batch_size, block_size, progress,
                      negative, path, dtype, info):
    """``collect`` writing store blocks of ``block_size`` columns; returns the opened store.

    ``block_size`` None is ``store.default_block_size`` of all views (about 64 MiB a block).
    Each block is computed as batches of ``batch_size`` images of one compiled shape
    (:func:`_block_batches`); every batch of block ``i`` is dispatched before the host
    fetches and writes block ``i - 1``, so the device computes while the host writes, and
    the host holds about one block. Blocks do not depend on the batches beyond float
    rounding, so an unfinished store resumes with any ``batch_size``; the provenance keeps
    the batch size of the call that started it.
    """
    n, h, w, c = arr.shape
    b = min(batch_size, n)
    shapes = _shapes(net, arr.shape[1:]).layers if layers else {}
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
    if block_size is None:
        block_size = _store.default_block_size(sum(rows.values()), n, _store._check_dtype(dtype))
    started = _started_batch_size(path)
    provenance = {"model": net.adapter.name, "model_kind": net.adapter.kind,
                  "layers": list(layers), "pooling": pooling, "negative": negative,
                  "pixels": pixels, "image_shape": [h, w, c],
                  "batch_size": b if started is None else started,
                  **(info.get("provenance") or {})}
    writer = _store.Writer(path, rows, n, block_size=block_size, dtype=dtype,
                           shapes=view_shapes, labels=info.get("labels"),
                           class_names=info.get("class_names"),
                           superclasses=info.get("superclasses"), provenance=provenance)
    missing = writer.missing
    total = sum(len(_block_batches(*writer.columns(i), n, batch_size)) for i in missing)
    show = progress and bool(layers) and total >= _PROGRESS_MIN_BATCHES
    bar = tqdm(total=total, desc="probe", unit="batch", leave=False, disable=not show)

    def dispatch(i):
        """Start every batch of block ``i`` on the device; nothing is waited for."""
        if not layers:
            return []
        outputs = []
        for first, lo, hi in _block_batches(*writer.columns(i), n, batch_size):
            block, _ = _padded(arr, first, batch_size)
            outputs.append((_probe_block(net.adapter, net.state, block, layers=layers,
                                         pooling=pooling, n_valid=b), lo - first, hi - first))
            bar.update(1)
        return outputs

    def write(i, outputs):
        start, stop = writer.columns(i)
        views = {name: np.empty((rows[name], stop - start), np.float32) for name in layers}
        lowest = np.full(len(layers), np.inf, np.float32)
        column = 0
        fetched = jax.device_get([batch for batch, _, _ in outputs])  # one transfer a block
        for (batch, minima), (_, lo, hi) in zip(fetched, outputs):
            for name in layers:
                views[name][:, column:column + hi - lo] = batch[name][:, lo:hi]
            lowest = np.minimum(lowest, minima)
            column += hi - lo
        for name in _check_minima(layers, lowest, negative):
            if negative == "clip":  # "shift" is refused with store=
                np.maximum(views[name], 0, out=views[name])
        if pixel_names:
            views.update(pixel_views(arr[start:stop], pixels))
        writer.write_block(i, {name: views[name] for name in rows})

    pending = None
    with bar:
        for i in missing:
            outputs = dispatch(i)
            if pending is not None:
                write(*pending)
            pending = (i, outputs)
        if pending is not None:
            write(*pending)
    return writer.finish()


def _forward_replaced(adapter, state, x, layer, activations):
    return adapter.forward_replaced(state, _to_float_traced(x), layer, activations)


_intervene_batch = jax.jit(_forward_replaced, static_argnames=("adapter", "layer"))


def _check_activations(activations: Any, layer: str, shape: tuple, n: int | None) -> None:
    got = tuple(np.shape(activations))
    expected = ("N" if n is None else n, *shape)
    if len(got) != len(expected) or got[1:] != shape or (n is not None and got[0] != n):
        raise ValueError(
            f"activations: expected shape {expected} for layer {layer!r}, got {got}"
        )


def intervene(
    model: Any,
    variables: Any,
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
        layer: a layer path, see ``available_layers``.
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
    net = adapt(model, variables)
    arr = _check_images(images, model)
    _check_input_channels(net, arr.shape[1:])
    (layer,) = _check_layers(net, (layer,), arr.shape[1:])
    shape = _shapes(net, arr.shape[1:]).layers[layer]
    _check_activations(activations, layer, shape, arr.shape[0])
    acts = np.asarray(activations, np.float32)

    (logits,) = _map_batches(
        lambda x, a: (_intervene_batch(net.adapter, net.state, x, layer, a),),
        batch_size, arr, acts,
    )
    return logits.astype(np.float32, copy=False)


def layer_forward(
    model: Any, variables: Any, layer: str
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Pure function ``(images, activations) -> logits`` with ``layer``'s output replaced.

    For gradients with respect to a layer (TCAV) and for concept fidelity. Works under
    ``jax.jit``, ``jax.grad`` and ``jax.vmap``; under ``jit`` the layers before ``layer``
    are dead code and are removed.

    Args:
        model, variables: as for ``collect``.
        layer: a layer path, see ``available_layers``.

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
    net = adapt(model, variables)
    if _probe_order(model):  # our models take 32x32 images: check the name now
        _check_layers(net, (layer,), (32, 32, 3))

    def forward(images: jnp.ndarray, activations: jnp.ndarray) -> jnp.ndarray:
        image_shape = tuple(images.shape[1:])
        _check_layers(net, (layer,), image_shape)
        shape = _shapes(net, image_shape).layers[layer]
        _check_activations(activations, layer, shape, images.shape[0])
        return _forward_replaced(net.adapter, net.state, images, layer, activations)

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


@full_precision
def _activations(adapter, state, x, *, layers):
    _, captured = adapter.forward(state, x, layers)
    return tuple(_flatten(captured[name]) for name in layers)


@full_precision
def _gradients(adapter, state, x, labels, *, layers):
    """Gradient of each input's own class logit w.r.t. every layer (``Adapter.gradients``:
    one backward pass for all of them where the network allows)."""
    grads = adapter.gradients(state, x, labels, layers)
    return tuple(_flatten(grads[name]) for name in layers)


def _build(fn, adapter, layers):
    return jax.jit(functools.partial(fn, adapter, layers=layers))


@functools.lru_cache(maxsize=32)
def _cached(fn, adapter, layers):
    return _build(fn, adapter, layers)


def _compiled(fn, model, layers):
    """A jitted ``fn(state, ...)`` bound to the network (an adapter, or a model to adapt),
    reused across calls when the adapter hashes."""
    adapter = model if isinstance(model, adapters.Adapter) else adapt(model, None).adapter
    try:
        return _cached(fn, adapter, layers)
    except TypeError:
        return _build(fn, adapter, layers)


def _checked_net(model, variables, images, layers) -> tuple[Bound, tuple[str, ...]]:
    net = adapt(model, variables)
    image_shape = tuple(np.shape(images)[1:])
    _check_input_channels(net, image_shape)
    return net, _check_layers(net, layers, image_shape)


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
        model: a Linen module, an NNX module or ``from_function(...)``.
        variables: its variables (``None`` for NNX modules and functions).
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
    net, layers = _checked_net(model, variables, images, layers)
    fn = functools.partial(_compiled(_activations, net.adapter, layers), net.state)
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
        model: a Linen module, an NNX module or ``from_function(...)``.
        variables: its variables (``None`` for NNX modules and functions).
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
    net, layers = _checked_net(model, variables, images, layers)
    fn = functools.partial(_compiled(_gradients, net.adapter, layers), net.state)
    labels = np.asarray(labels, np.int32)
    return dict(zip(layers, _map_batches(fn, min(batch_size, len(images)), images, labels)))
