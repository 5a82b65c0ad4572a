"""The user's own network: import its builder, build it, restore its orbax checkpoint.

``jaxcnmf analyze --model-module mypkg.models:build --checkpoint DIR`` probes a network
that is not one of ``jaxcnmf.models``. The builder contract:

* ``mypkg.models`` is imported as Python would from the current directory or
  ``PYTHONPATH``; ``build`` is a callable attribute of it.
* ``build`` is called with those of the keyword arguments ``num_classes`` (the dataset's
  number of classes) and ``input_shape`` (``(H, W, C)`` of one image) that its signature
  names (all of them if it takes ``**kwargs``); with none, as ``build()``.
* It returns one of:

  - a ``flax.nnx.Module``, ``model(x) -> logits``; the checkpoint holds its state,
    ``nnx.state(model)`` (or ``nnx.to_pure_dict`` of it), restored into the module the
    builder makes under ``nnx.eval_shape`` (no parameter is initialised first);
  - a ``flax.linen.Module``, ``model.apply(variables, x) -> logits``; the checkpoint
    holds its variables (``{"params": ..., "batch_stats": ...}``), checked against those
    ``model.init`` would create for ``input_shape``;
  - a function adapter, ``jaxcnmf.probe.from_function(apply_fn, params, layers)``; the
    checkpoint, if any, holds ``params`` (the tree the builder put there is the
    template).

  ``x`` is ``(B, H, W, C)`` float32 pixels in [0, 1]; logits are ``(B, num_classes)``.

* Without ``--checkpoint`` the network is used as the builder returns it (an NNX model
  or function adapter that loads its own weights); a Linen module needs one.

Checkpoints are orbax-checkpoint directories, the format the JAX ecosystem uses:
``save_orbax`` writes one the way a user's training code would
(``ocp.StandardCheckpointer().save(path, nnx.state(model))``); ``load_orbax`` reads one
into a built model. A directory written by ``orbax.checkpoint.CheckpointManager``
(numbered step folders, each with one item folder) is read at its latest step.

Example:
    >>> from jaxcnmf.nets import usermodel
    >>> usermodel.save_orbax(model, "/tmp/ckpt")                       # doctest: +SKIP
    >>> model = usermodel.load_orbax(MyCNN(rngs=nnx.Rngs(0)), "/tmp/ckpt")  # doctest: +SKIP
    >>> loaded = usermodel.load("mypkg.models:build", "/tmp/ckpt",
    ...                         num_classes=10, input_shape=(32, 32, 3))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Files of a pytree item written by orbax's StandardCheckpointer / PyTreeCheckpointer (a
# CheckpointManager's step folder has only _CHECKPOINT_METADATA, beside its items).
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")
# The leaf an NNX Variable becomes when orbax saves ``nnx.state(model)``.
_VALUE = "value"


class UserModel(NamedTuple):
    """A user's network, built and restored by :func:`load`.

    Attributes:
        model: what the builder returned (its state replaced by the checkpoint's when
            it is an NNX module).
        variables: the Linen variables from the checkpoint; None for NNX modules and
            function adapters (they hold their own, restored).
        kind: "nnx", "linen" or "function".
        spec: the builder, ``"module:name"``.
        checkpoint: the orbax directory read (the step's item folder), or None.
    """

    model: Any
    variables: Any
    kind: str
    spec: str
    checkpoint: Path | None


def _err(message: str) -> ValueError:
    return ValueError(f"model_module: {message}")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"mypkg.models:build"`` -> ``("mypkg.models", "build")``.

    Example:
        >>> parse_spec("mypkg.models:build")
        ('mypkg.models', 'build')
    """
    module, sep, name = str(spec).partition(":")
    if not sep or not module or not name or not all(
            part.isidentifier() for part in module.split(".") + name.split(".")):
        raise _err(f"expected MODULE:BUILDER, e.g. mypkg.models:build, got {spec!r}")
    return module, name


def import_builder(spec: str) -> Callable:
    """The builder named by ``spec``, imported from the current directory or ``PYTHONPATH``.

    Args:
        spec: ``"package.module:name"`` (``name`` may be dotted: ``"models:Zoo.build"``).

    Returns:
        The callable.

    Raises:
        ValueError: a malformed spec, a module that cannot be imported (or raises while
            importing), a missing attribute or one that is not callable; one line each,
            starting ``model-module:``.

    Example:
        >>> import_builder("mypkg.models:build")  # doctest: +SKIP
        <function build at 0x...>
    """
    module_name, name = parse_spec(spec)
    # The `jaxcnmf` console script does not put the working directory on sys.path, as
    # `python -m` does; a user's module beside their data should import either way.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise _err(f"cannot import {module_name} (no module named {err.name!r}); run "
                       "from the folder that holds it or add that folder to PYTHONPATH") from None
        raise _err(f"importing {module_name} failed: {type(err).__name__}: {err}") from None
    except Exception as err:  # the user's module may raise anything while importing
        raise _err(f"importing {module_name} failed: {type(err).__name__}: {err}") from None
    target = module
    for part in name.split("."):
        if not hasattr(target, part):
            raise _err(f"module {module_name} has no attribute {name!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _err(f"{spec} is not callable (type {type(target).__name__}); expected a "
                   "function that returns the network")
    return target


def model_kind(model: Any) -> str | None:
    """"nnx", "linen" or "function" for a network the probe can run; None otherwise."""
    import flax.linen as nn
    from flax import nnx

    if isinstance(model, nnx.Module):
        return "nnx"
    if isinstance(model, nn.Module):
        return "linen"
    try:
        from jaxcnmf.nets.adapters import ProbedFunction
    except ImportError:  # a jaxcnmf without function adapters
        return None
    return "function" if isinstance(model, ProbedFunction) else None


def _accepted(builder: Callable, kwargs: dict) -> list[str]:
    """The names of ``kwargs`` that ``builder``'s signature takes."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return list(kwargs)
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return [k for k in kwargs if k in names]


def build(builder: Callable, spec: str = "the builder", **kwargs) -> Any:
    """Call ``builder`` with those of ``kwargs`` (``num_classes``, ``input_shape``) it names.

    Args:
        builder: the user's callable.
        spec: its name for messages.
        **kwargs: ``num_classes`` (int) and ``input_shape`` (``(H, W, C)``) offered.

    Returns:
        The network: an NNX module, a Linen module or a function adapter.

    Raises:
        ValueError: the builder raised, or returned something else.

    Example:
        >>> build(lambda num_classes: MyCNN(num_classes, rngs=nnx.Rngs(0)),
        ...       num_classes=10, input_shape=(32, 32, 3))  # doctest: +SKIP
    """
    offered = {k: kwargs[k] for k in _accepted(builder, kwargs)}
    try:
        model = builder(**offered)
    except Exception as err:  # the user's code may raise anything
        call = ", ".join(f"{k}={v!r}" for k, v in offered.items())
        raise _err(f"{spec}({call}) raised {type(err).__name__}: {err}") from None
    if model_kind(model) is None:
        raise _err(f"{spec} returned an object of type {type(model).__name__}; expected a "
                   "flax.nnx.Module, a flax.linen.Module or jaxcnmf.probe.from_function(...)")
    return model


# ----------------------------------------------------------------------- orbax I/O


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _state_of(model_or_tree: Any) -> Any:
    from flax import nnx

    if isinstance(model_or_tree, nnx.Module):
        return nnx.state(model_or_tree)
    return model_or_tree


def save_orbax(model_or_variables: Any, path: str | os.PathLike, *,
               force: bool = False) -> Path:
    """Save an NNX module's state (or Linen variables) as an orbax checkpoint directory.

    The same call a user's training code makes,
    ``ocp.StandardCheckpointer().save(path, nnx.state(model))``, for tests and recipes.

    Args:
        model_or_variables: an ``nnx.Module`` (its ``nnx.state``) or a pytree of arrays
            (Linen ``variables``).
        path: the directory to create.
        force: replace an existing directory.

    Returns:
        The absolute path written.

    Example:
        >>> save_orbax(model, "/tmp/ckpt")  # doctest: +SKIP
        PosixPath('/tmp/ckpt')
    """
    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"checkpoint: {path} exists; pass force=True to replace it")
    checkpointer = _checkpointer()
    checkpointer.save(path, _state_of(model_or_variables), force=force)
    checkpointer.wait_until_finished()
    return path


def _is_orbax(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in _ORBAX_MARKERS)


def find_orbax(path: str | os.PathLike) -> Path | None:
    """The orbax item directory in ``path``: ``path`` itself, its only item folder (a
    CheckpointManager step), or that of its latest numbered step; None when there is none."""
    path = Path(path)
    if _is_orbax(path):
        return path.absolute()
    if not path.is_dir():
        return None
    items = [p for p in path.iterdir() if _is_orbax(p)]
    if len(items) == 1:
        return items[0].absolute()
    steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    if items or not steps:
        return None
    return find_orbax(max(steps, key=lambda p: int(p.name)))


def find_orbax_or_raise(path: str | os.PathLike) -> Path:
    """:func:`find_orbax`, raising when ``path`` is missing, a file or not orbax."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: no such directory {str(path)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint: expected a directory, got the file {str(path)!r}")
    found = find_orbax(path)
    if found is None:
        raise ValueError(
            f"checkpoint: {str(path)!r} is not an orbax checkpoint (no "
            f"{' or '.join(_ORBAX_MARKERS)}; save one with "
            "orbax.checkpoint.StandardCheckpointer().save(DIR, nnx.state(model)))"
        )
    return found


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree: Any) -> dict[str, Any]:
    """``{"layer3.conv.kernel": leaf}`` in tree order, the NNX ``.value`` level dropped so
    that a saved ``nnx.State`` and its pure dict name a weight alike."""
    flat = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [_key_name(entry) for entry in path]
        if len(keys) > 1 and keys[-1] == _VALUE:
            keys = keys[:-1]
        flat[".".join(keys)] = leaf
    return flat


def _stored_shapes(checkpointer, path: Path) -> dict[str, tuple[int, ...]]:
    try:
        metadata = checkpointer.metadata(path)
    except Exception as err:  # orbax raises many types for unreadable directories
        raise ValueError(f"checkpoint: cannot read the orbax metadata in {str(path)!r} "
                         f"({type(err).__name__}: {str(err)[:200]})") from None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return {key: tuple(getattr(leaf, "shape", ()) or ())
            for key, leaf in _flat(tree).items()}


def _first_mismatch(stored: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
    for key, shape in expected.items():
        if key not in stored:
            return f"{key!r} is in the model but not in the checkpoint"
        if tuple(stored[key]) != tuple(shape):
            return (f"{key!r} has shape {tuple(stored[key])} in the checkpoint but "
                    f"{tuple(shape)} in the model")
    extra = [key for key in stored if key not in expected]
    if extra:
        return f"{extra[0]!r} is in the checkpoint but not in the model"
    return None


def _restore_into(template: Any, path: Path, what: str) -> Any:
    """The checkpoint's arrays in ``template``'s tree structure, checked key by key."""
    checkpointer = _checkpointer()
    expected = _flat(template)
    mismatch = _first_mismatch(_stored_shapes(checkpointer, path),
                               {k: tuple(getattr(v, "shape", np.shape(v)))
                                for k, v in expected.items()})
    if mismatch:
        raise ValueError(f"checkpoint: the state in {str(path)!r} does not match {what}: "
                         f"{mismatch}")
    stored = _flat(checkpointer.restore(path))
    leaves = []
    for key, leaf in expected.items():
        value = stored[key]
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jax.dtypes.prng_key):
            value = jnp.asarray(value, dtype)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


def load_orbax(model: Any, path: str | os.PathLike, *,
               input_shape: tuple[int, int, int] = (32, 32, 3), what: str = "the model"):
    """Restore an orbax checkpoint into a built network.

    Args:
        model: an ``nnx.Module`` (its state is replaced in place, ``nnx.update``) or a
            ``flax.linen.Module`` (variables checked against ``model.init``'s, traced
            abstractly for ``input_shape``).
        path: an orbax checkpoint directory (or a CheckpointManager directory: its
            latest step).
        input_shape: ``(H, W, C)`` of one image, for a Linen module's variable shapes.
        what: the model's name in messages.

    Returns:
        The NNX module itself, restored; for a Linen module, its variables.

    Raises:
        FileNotFoundError / NotADirectoryError: no such directory.
        ValueError: not an orbax checkpoint, or its tree does not match the model's
            (the message names the first mismatched key, e.g. ``'fc.kernel' has shape
            (64, 10) in the checkpoint but (64, 100) in the model``).

    Example:
        >>> model = load_orbax(MyCNN(rngs=nnx.Rngs(0)), "/tmp/ckpt")  # doctest: +SKIP
        >>> variables = load_orbax(linen_model, "/tmp/linen_ckpt")    # doctest: +SKIP
    """
    import flax.linen as nn
    from flax import nnx

    path = find_orbax_or_raise(path)
    if isinstance(model, nnx.Module):
        state = nnx.state(model)
        nnx.update(model, _restore_into(state, path, what))
        return model
    if isinstance(model, nn.Module):
        x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        takes_train = "train" in inspect.signature(type(model).__call__).parameters
        init = functools.partial(model.init, **({"train": False} if takes_train else {}))
        try:
            template = jax.eval_shape(init, jax.random.key(0), x)
        except Exception as err:  # flax's own errors; restate them with the input shape
            raise ValueError(f"model_module: {what} does not run on input_shape "
                             f"{tuple(input_shape)}: {type(err).__name__}: "
                             f"{str(err)[:200]}") from None
        return _restore_into(dict(template), path, what)
    raise ValueError(f"checkpoint: expected a flax.nnx.Module or flax.linen.Module to "
                     f"restore into, got {type(model).__name__}")


def load(spec: str, checkpoint: str | os.PathLike | None, *, num_classes: int | None = None,
         input_shape: tuple[int, int, int] | None = None) -> UserModel:
    """Import ``spec``'s builder, build the network and restore ``checkpoint`` into it.

    Args:
        spec: ``"package.module:builder"``, see the module docstring for the contract.
        checkpoint: an orbax checkpoint directory, or None to use the network as built.
        num_classes, input_shape: offered to the builder.

    Returns:
        UserModel(model, variables, kind, spec, checkpoint).

    Raises:
        ValueError: as :func:`import_builder`, :func:`build` and :func:`load_orbax`; a
            Linen module without a checkpoint.
        FileNotFoundError: no such checkpoint directory.

    Example:
        >>> load("mypkg.models:build", "runs/ckpt", num_classes=10)  # doctest: +SKIP
    """
    builder = import_builder(spec)
    offered = {k: v for k, v in {"num_classes": num_classes, "input_shape": input_shape}.items()
               if v is not None}
    if checkpoint is not None:
        path = find_orbax_or_raise(checkpoint)
        abstract = _abstract_nnx(builder, offered)
        if abstract is not None:  # the checkpoint's arrays go straight into the graph
            from flax import nnx

            graphdef, state = nnx.split(abstract)
            model = nnx.merge(graphdef, _restore_into(state, path, f"the model built by {spec}"))
            return UserModel(model, None, "nnx", spec, path)
    model = build(builder, spec, **offered)
    kind = model_kind(model)
    what = f"the model built by {spec}"
    if checkpoint is None:
        if kind == "linen":
            raise _err(f"{spec} returned a flax.linen.Module, whose variables live outside "
                       "it; pass --checkpoint DIR with them (an orbax checkpoint)")
        return UserModel(model, None, kind, spec, None)
    if kind == "function":
        params = _restore_into(model.params, path, what)
        return UserModel(dataclasses.replace(model, params=params), None, kind, spec, path)
    restored = load_orbax(model, path, input_shape=input_shape or (32, 32, 3), what=what)
    variables = restored if kind == "linen" else None
    return UserModel(model, variables, kind, spec, path)


def _abstract_nnx(builder: Callable, offered: dict) -> Any:
    """The builder's NNX module with abstract arrays (``nnx.eval_shape``: no parameter is
    initialised, which on a CPU costs more than restoring them), or None when the builder
    does not build an NNX module that way (then it is called as usual)."""
    from flax import nnx

    kwargs = {k: offered[k] for k in _accepted(builder, offered)}
    try:
        abstract = nnx.eval_shape(lambda: builder(**kwargs))
    except Exception:  # anything else is reported by the ordinary call that follows
        return None
    return abstract if isinstance(abstract, nnx.Module) else None


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an orbax checkpoint (itself, or a CheckpointManager's step)."""
    return find_orbax(path) is not None


@functools.partial(jax.jit, static_argnames=("adapter",))
def _logits_batch(adapter, state, x):
    return adapter.forward(state, x)[0]


def predict(model: Any, variables: Any, images: Any, batch_size: int = 256) -> np.ndarray:
    """The network's logits for ``images``, run as the probe runs it (eval mode).

    Args:
        model, variables: as for :func:`jaxcnmf.probe.collect` (any of the three kinds).
        images: ``(N, H, W, C)`` uint8 or float32 in [0, 1].
        batch_size: images per forward pass (the last batch is padded, so one compiled
            shape serves all).

    Returns:
        ``(N, num_classes)`` float32 numpy logits.

    Example:
        >>> predict(model, None, images).argmax(axis=1)  # doctest: +SKIP
    """
    from jaxcnmf.nets import adapters, probe

    net = adapters.adapt(model, variables)
    pixels = probe.float_pixels(images)  # on the host, as collect scales them
    n = len(pixels)
    b = max(1, min(int(batch_size), n))
    out = []
    for start in range(0, n, b):
        batch = pixels[start:start + b]
        if len(batch) < b:
            batch = np.concatenate([batch, np.zeros((b - len(batch), *batch.shape[1:]),
                                                    batch.dtype)])
        out.append(_logits_batch(net.adapter, net.state, batch)[:min(b, n - start)])
    return np.asarray(jnp.concatenate(out), np.float32)
