"""One probing interface over three kinds of network: Linen modules, NNX modules, functions.

``jaxcnmf.nets.probe`` never calls a network directly: ``adapt(model, variables)`` turns
what the user has into an :class:`Adapter` (hashable, so it is a static argument of the
compiled probing functions) and its ``state`` (a pytree of arrays, traced), and every
forward pass goes through four pure functions of ``(state, x)``:

* ``trace(state, image_shape)`` -> :class:`Traced`: the per-image output shape of every
  probe-able layer, in call order, and of the logits, traced abstractly;
* ``forward(state, x, capture)`` -> ``(logits, {path: activation})``;
* ``forward_replaced(state, x, path, activation)`` -> logits with the layer's output
  replaced (concept fidelity);
* ``gradients(state, x, labels, paths)`` -> ``{path: d logit[labels] / d activation}``
  (TCAV).

``x`` is ``(B, H, W, C)`` float32 pixels in [0, 1]; activations are ``(B, *shape)`` as
the layer outputs them. A layer that is called more than once is probed at its first
call (captured, replaced or differentiated there), the one whose shape is listed.

The three kinds and their layer paths:

* **Linen** (``flax.linen.Module``, with its ``variables``): the output of any submodule's
  ``__call__``, named by its path in the module tree joined by ``/`` (``"conv4_x"``, a
  direct child; ``"backbone/stage3"``, nested). Captured with a ``capture_intermediates``
  filter on the module path, replaced and shifted with ``flax.linen.intercept_methods``.
  Run as ``model.apply(variables, x, train=False)`` (``train=`` only when ``__call__``
  takes it).
* **NNX** (``flax.nnx.Module``; ``variables`` ``None``, or an ``nnx.State`` to use instead
  of the module's own): the output of any submodule's ``__call__``, named by its attribute
  path joined by ``.``, list indices included (``"layer4.1.conv1"``); a list of modules
  that is not itself called (``nnx.List`` of blocks, a ResNet stage) also stands for its
  last element's output (``"layer3"`` is ``"layer3.1"``). The
  module is split (``nnx.split``); inside each traced function a merged copy is put in
  eval mode (``.eval()``: batch norm's running statistics, no dropout) and its submodules
  get, on that copy only, a subclass whose ``__call__`` reports its output to the probe.
  The user's class and object are not changed.
* **Functions** (:func:`from_function`): ``apply_fn(params, x)`` returns
  ``(logits, {name: activation})``; the probe-able layers are the names given. For
  interventions and gradients ``apply_fn`` also takes ``replace={name: array}`` and then
  uses that array in place of the named activation when computing everything after it::

      def apply_fn(params, x, replace=None):
          replace = replace or {}
          h3 = replace.get("h3", relu(conv(params["c3"], x)))
          h4 = replace.get("h4", relu(conv(params["c4"], h3)))
          return dense(params["fc"], h4.mean((1, 2))), {"h3": h3, "h4": h4}

  (under ``jit`` the replaced computation is dead code and is removed). A function that
  does not take ``replace`` can still be probed by ``collect``.

Example:
    >>> from flax import nnx
    >>> net = adapt(my_nnx_model, None)          # doctest: +SKIP
    >>> net.layers((32, 32, 3))                  # doctest: +SKIP
    {'stem': (32, 32, 16), 'layer1': (32, 32, 16), 'layer1.0.conv': ..., 'fc': (10,)}
    >>> logits, acts = net.forward(x, capture=("layer1",))   # doctest: +SKIP
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

KINDS = ("linen", "nnx", "function")


class Traced(NamedTuple):
    """Per-image output shapes of a network's layers, in call order, and of its logits.

    Attributes:
        layers: dict layer path -> per-image shape, e.g. ``(8, 8, 256)`` or ``(512,)``.
        logits: per-image shape of the network's output, e.g. ``(10,)``.
    """

    layers: dict[str, tuple[int, ...]]
    logits: tuple[int, ...]


def _picked_logit_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1))


def _per_image_shape(out: Any) -> tuple[int, ...] | None:
    if isinstance(out, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(out, "aval"):
        return tuple(out.shape[1:]) if len(out.shape) >= 1 else None
    return None


class Adapter:
    """A network's probing interface; subclasses are frozen dataclasses (hashable).

    The state (parameters, batch statistics) is never held here but passed to every
    method, so a compiled function keyed on the adapter serves every set of weights.
    """

    kind: str = ""

    @property
    def name(self) -> str:
        """The network's class or function name, for messages and provenance."""
        raise NotImplementedError

    def default_listing(self, traced: Traced) -> list[str]:
        """The paths ``available_layers`` lists (every one of ``traced`` by default)."""
        return list(traced.layers)

    def trace(self, state: Any, image_shape: tuple[int, ...]) -> Traced:
        """Shapes of every layer's first output and of the logits, for one image shape."""
        raise NotImplementedError

    def forward(self, state: Any, x: jax.Array, capture: tuple[str, ...] = ()
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits ``(B, K)`` and the outputs ``(B, *shape)`` of the ``capture`` layers."""
        raise NotImplementedError

    def forward_replaced(self, state: Any, x: jax.Array, path: str, activation: jax.Array
                         ) -> jax.Array:
        """Logits ``(B, K)`` with layer ``path``'s output replaced by ``activation``."""
        return self.forward_shifted(state, x, {path: activation}, replace=True)[0]

    def forward_shifted(self, state: Any, x: jax.Array, deltas: Mapping[str, jax.Array],
                        replace: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits with ``deltas[path]`` added to (``replace``: put in place of) each
        layer's output, and the layers' original outputs."""
        raise NotImplementedError

    def gradients(self, state: Any, x: jax.Array, labels: jax.Array, paths: tuple[str, ...]
                  ) -> dict[str, jax.Array]:
        """Gradient of each image's logit ``labels[i]`` w.r.t. each layer's output.

        In eval mode images do not interact, so the gradient of the batch sum of the
        picked logits with respect to a per-image shift of a layer is, row by row, the
        gradient of that image's logit: one backward pass for all layers.
        """
        _, captured = jax.eval_shape(lambda: self.forward(state, x, paths))
        zeros = {p: jnp.zeros(captured[p].shape, captured[p].dtype) for p in paths}

        def picked(deltas):
            return _picked_logit_sum(self.forward_shifted(state, x, deltas)[0], labels)

        return jax.grad(picked)(zeros)


# ------------------------------------------------------------------------------ Linen


def _linen_path(mdl: nn.Module) -> str:
    return "/".join(mdl.scope.path) if mdl.scope is not None else ""


@dataclasses.dataclass(frozen=True)
class LinenAdapter(Adapter):
    """A ``flax.linen`` module; layers are submodule paths joined by ``/``."""

    module: nn.Module
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    kind = "linen"

    @property
    def name(self) -> str:
        return type(self.module).__name__

    def _apply(self, state, x, **kwargs):
        return self.module.apply(state, x, **dict(self.call_kwargs), **kwargs)

    def trace(self, state, image_shape):
        order: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}

        def interceptor(next_fun, args, kwargs, context):
            path = _linen_path(context.module) if context.method_name == "__call__" else ""
            if path and path not in order:
                order.append(path)  # on entry: a block comes before the layers inside it
            out = next_fun(*args, **kwargs)
            shape = _per_image_shape(out)
            if path and shape is not None:
                shapes.setdefault(path, shape)
            return out

        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        if state is None:  # shapes without variables: init traced abstractly
            def run(x):
                return self.module.init_with_output(
                    jax.random.key(0), x, **dict(self.call_kwargs))[0]
            args = (x,)
        else:
            def run(state, x):
                return self._apply(state, x)
            args = (state, x)
        with nn.intercept_methods(interceptor):
            logits = jax.eval_shape(run, *args)
        return Traced({p: shapes[p] for p in order if p in shapes}, tuple(logits.shape[1:]))

    def forward(self, state, x, capture=()):
        if not capture:
            return self._apply(state, x), {}
        wanted = frozenset(capture)

        def keep(mdl: nn.Module, method_name: str) -> bool:
            return method_name == "__call__" and _linen_path(mdl) in wanted

        logits, variables = self._apply(state, x, capture_intermediates=keep,
                                        mutable=["intermediates"])
        inter = variables["intermediates"]
        captured = {}
        for path in capture:
            node = inter
            for key in path.split("/"):
                node = node[key]
            captured[path] = node["__call__"][0]
        return logits, captured

    def forward_shifted(self, state, x, deltas, replace=False):
        captured: dict[str, jax.Array] = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = _linen_path(context.module) if context.method_name == "__call__" else ""
            if path in deltas and path not in captured:
                captured[path] = out
                out = deltas[path] if replace else out + deltas[path]
            return out

        with nn.intercept_methods(interceptor):
            logits = self._apply(state, x)
        return logits, captured


def _linen_call_kwargs(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return ()
    return (("train", False),) if "train" in params else ()


# -------------------------------------------------------------------------------- NNX

# While an NNX forward pass is traced: {id(submodule): its paths} and the callback that
# sees (and may change) each probed submodule's output.
_NNX_PROBE: contextvars.ContextVar = contextvars.ContextVar("jaxcnmf_nnx_probe", default=None)


@functools.cache
def _reporting_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` passes its output through the active probe."""
    call = cls.__call__

    def __call__(self, *args, **kwargs):
        active = _NNX_PROBE.get()
        paths = active[0].get(id(self)) if active is not None else None
        if paths is None:
            return call(self, *args, **kwargs)
        for path in paths:
            active[1](path, None)  # entry: fixes the call order
        out = call(self, *args, **kwargs)
        for path in reversed(paths):  # the element's own path first, then a list's alias
            out = active[1](path, out)
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _nnx_path(path: tuple) -> str:
    return ".".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class NNXAdapter(Adapter):
    """A ``flax.nnx`` module given by its graph definition; layers are attribute paths
    joined by ``.`` (list indices included)."""

    graphdef: Any
    type_name: str = "Module"
    kind = "nnx"

    @property
    def name(self) -> str:
        return self.type_name

    def _run(self, state, x, on_output: Callable[[str, Any], Any]) -> jax.Array:
        model = nnx.merge(self.graphdef, state)
        model.eval()
        names: dict[int, tuple[str, ...]] = {}
        last: dict[tuple, tuple[int, Any]] = {}  # list path -> (index, element) of its last
        for path, sub in nnx.iter_modules(model):
            if not path or "__call__" not in dir(type(sub)):
                continue
            try:
                sub.__class__ = _reporting_class(type(sub))
            except TypeError:  # a class with __slots__ or a custom layout: not probe-able
                continue
            names[id(sub)] = (_nnx_path(path),)
            if isinstance(path[-1], int) and path[-1] >= last.get(path[:-1], (-1, None))[0]:
                last[path[:-1]] = (path[-1], sub)
        called = {n for group in names.values() for n in group}
        for parent, (_, sub) in last.items():
            alias = _nnx_path(parent)
            if alias not in called:  # a list of blocks stands for its last block's output
                names[id(sub)] = (alias, *names[id(sub)])
        token = _NNX_PROBE.set((names, on_output))
        try:
            return model(x)
        finally:
            _NNX_PROBE.reset(token)

    def trace(self, state, image_shape):
        order: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}

        def on_output(path, out):
            if out is None:
                if path not in order:
                    order.append(path)
                return out
            shape = _per_image_shape(out)
            if shape is not None:
                shapes.setdefault(path, shape)
            return out

        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        logits = jax.eval_shape(lambda s, x: self._run(s, x, on_output), state, x)
        return Traced({p: shapes[p] for p in order if p in shapes}, tuple(logits.shape[1:]))

    def forward(self, state, x, capture=()):
        captured: dict[str, jax.Array] = {}

        def on_output(path, out):
            if out is not None and path in capture and path not in captured:
                captured[path] = out
            return out

        return self._run(state, x, on_output), captured

    def forward_shifted(self, state, x, deltas, replace=False):
        captured: dict[str, jax.Array] = {}

        def on_output(path, out):
            if out is None or path not in deltas or path in captured:
                return out
            captured[path] = out
            return deltas[path] if replace else out + deltas[path]

        return self._run(state, x, on_output), captured


# --------------------------------------------------------------------------- functions


@dataclasses.dataclass(frozen=True)
class ProbedFunction:
    """A network given as a function, made by :func:`from_function`; pass it as the model.

    Attributes:
        apply_fn: ``apply_fn(params, x[, replace=...]) -> (logits, {name: activation})``.
        params: its parameters (any pytree of arrays).
        layers: the probe-able names, in the order the function computes them.
    """

    apply_fn: Callable
    params: Any
    layers: tuple[str, ...] | None


def from_function(apply_fn: Callable, params: Any, layers: Sequence[str] | None = None
                  ) -> ProbedFunction:
    """Wrap a plain JAX function as a network ``jaxcnmf.nets.probe`` can probe.

    Contract: ``apply_fn(params, x)`` with ``x`` ``(B, H, W, C)`` float32 in [0, 1]
    returns ``(logits, acts)``: logits ``(B, num_classes)`` and a dict name ->
    ``(B, *shape)`` activation. For ``intervene``/fidelity and TCAV gradients it also
    accepts ``replace={name: array}`` and then uses the array in place of that
    activation for everything computed after it (see the module docstring for a
    three-line pattern). It must be traceable by ``jax.jit``.

    Args:
        apply_fn: the function.
        params: its first argument.
        layers: names of ``acts`` to expose, in the order computed; every name ``acts``
            holds when None.

    Returns:
        a :class:`ProbedFunction`, to pass as ``model`` with ``variables=None``.

    Example:
        >>> net = from_function(apply_fn, params, layers=("h3", "h4"))  # doctest: +SKIP
        >>> probe.collect(net, None, images, ["h3"])                     # doctest: +SKIP
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a function (params, x) -> (logits, dict), "
                         f"got {type(apply_fn).__name__}")
    if layers is not None:
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"layers: expected a non-empty sequence of names, got {layers!r}")
    return ProbedFunction(apply_fn, params, layers)


@dataclasses.dataclass(frozen=True)
class FunctionAdapter(Adapter):
    """A function ``apply_fn(params, x[, replace=...]) -> (logits, {name: activation})``."""

    apply_fn: Callable
    names: tuple[str, ...] | None = None
    kind = "function"

    @property
    def name(self) -> str:
        return getattr(self.apply_fn, "__name__", type(self.apply_fn).__name__)

    def _call(self, state, x, **kwargs):
        out = self.apply_fn(state, x, **kwargs)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Mapping)):
            raise ValueError(
                f"apply_fn: expected {self.name}(params, x) to return (logits, "
                f"{{name: activation}}), got {type(out).__name__}"
            )
        return out[0], dict(out[1])

    def trace(self, state, image_shape):
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        logits, acts = jax.eval_shape(lambda s, x: self._call(s, x), state, x)
        names = tuple(acts) if self.names is None else self.names
        missing = [n for n in names if n not in acts]
        if missing:
            raise ValueError(f"layers: {self.name} returns no activation named {missing}; "
                             f"it returns {list(acts)}")
        shapes = {n: _per_image_shape(acts[n]) for n in names}
        return Traced({n: s for n, s in shapes.items() if s is not None},
                      tuple(logits.shape[1:]))

    def forward(self, state, x, capture=()):
        logits, acts = self._call(state, x)
        return logits, {p: acts[p] for p in capture}

    def _replaced(self, state, x, replace):
        try:
            return self._call(state, x, replace=dict(replace))
        except TypeError as err:
            if "replace" not in str(err):
                raise
            raise ValueError(
                f"apply_fn: {self.name} does not take replace={{name: array}}, which "
                f"interventions and gradients need; see jaxcnmf.nets.adapters.from_function"
            ) from None

    def forward_shifted(self, state, x, deltas, replace=False):
        if replace:
            return self._replaced(state, x, deltas)[0], {}
        _, acts = self._call(state, x)
        shifted = {p: acts[p] + d for p, d in deltas.items()}
        return self._replaced(state, x, shifted)[0], {p: acts[p] for p in deltas}

    def gradients(self, state, x, labels, paths):
        # A replaced layer cuts the graph before every later one, so each layer gets its
        # own backward pass (the forward pass to it is shared under jit).
        _, acts = self._call(state, x)
        grads = {}
        for path in paths:
            def picked(value, path=path):
                return _picked_logit_sum(self._replaced(state, x, {path: value})[0], labels)

            grads[path] = jax.grad(picked)(acts[path])
        return grads


# ------------------------------------------------------------------------------ adapt


class Bound(NamedTuple):
    """An adapter with its state: the probing interface of one network with its weights.

    Attributes:
        adapter: the hashable :class:`Adapter`.
        state: the pytree of arrays every method takes.
    """

    adapter: Adapter
    state: Any

    def layers(self, image_shape: Sequence[int] = (32, 32, 3)) -> dict[str, tuple[int, ...]]:
        """Every probe-able layer path -> per-image shape, in call order."""
        return self.adapter.trace(self.state, tuple(image_shape)).layers

    def forward(self, x, capture: Sequence[str] = ()):
        """``(logits, {path: activation})`` for float32 images ``x`` ``(B, H, W, C)``."""
        return self.adapter.forward(self.state, jnp.asarray(x, jnp.float32), tuple(capture))

    def forward_replaced(self, x, path: str, activation):
        """Logits with ``path``'s output replaced by ``activation`` ``(B, *shape)``."""
        return self.adapter.forward_replaced(self.state, jnp.asarray(x, jnp.float32), path,
                                             jnp.asarray(activation))

    def gradients(self, x, labels, paths: Sequence[str]) -> dict[str, jax.Array]:
        """Gradient of logit ``labels[i]`` of image ``i`` w.r.t. each layer's output."""
        return self.adapter.gradients(self.state, jnp.asarray(x, jnp.float32),
                                      jnp.asarray(labels, jnp.int32), tuple(paths))


def adapt(model: Any, variables: Any = None) -> Bound:
    """The probing interface of ``model``: a Linen or NNX module, or :func:`from_function`.

    Args:
        model: a ``flax.linen.Module`` (with ``variables``), a ``flax.nnx.Module``
            (``variables`` None, or an ``nnx.State`` to use instead of its own), or a
            :class:`ProbedFunction` (``variables`` None, or params to use instead).
        variables: see ``model``.

    Returns:
        :class:`Bound` ``(adapter, state)``.

    Example:
        >>> net = adapt(models.small_cnn(10), variables)     # doctest: +SKIP
        >>> net.layers()["conv3"]                            # doctest: +SKIP
        (4, 4, 128)
    """
    if isinstance(model, Bound):
        return model
    if isinstance(model, ProbedFunction):
        return Bound(FunctionAdapter(model.apply_fn, model.layers),
                     model.params if variables is None else variables)
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return Bound(NNXAdapter(graphdef, type(model).__name__),
                     state if variables is None else variables)
    if isinstance(model, nn.Module):
        return Bound(LinenAdapter(model, _linen_call_kwargs(model)), variables)
    raise ValueError(
        f"model: expected a flax.linen Module, a flax.nnx Module or "
        f"probe.from_function(apply_fn, params), got {type(model).__name__}"
    )
