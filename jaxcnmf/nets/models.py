"""The CNNs whose concepts we look for: a small CNN, ResNet-18 and VGG-11 (Flax linen).

All three take float32 NHWC images with pixels in [0, 1] (32x32, 1 or 3 channels) and
return float32 logits ``(B, num_classes)``. Batch norm uses its running statistics when
``train=False``, so ``variables = model.init(key, x, train=False)`` holds ``"params"`` and
``"batch_stats"``; training calls ``model.apply(variables, x, train=True,
mutable=["batch_stats"])``.

Every probe point is the output of a *direct* child of the top module, named after the
layer, and is post-ReLU (>= 0). That is what lets ``jaxcnmf.probe`` capture a layer with a
``capture_intermediates`` filter and replace it with ``flax.linen.intercept_methods``.

Probe points (``probe_layers``) and per-image shapes at ``width=1`` for 32x32 inputs:

========  ==========================================================================
small     conv1 (16,16,32), conv2 (8,8,64), conv3 (4,4,128), pool (128,)
resnet18  conv1 (32,32,64), conv2_x (32,32,64), conv3_x (16,16,128),
          conv4_x (8,8,256), conv5_x (4,4,512), avgpool (512,)
vgg11     block1 (16,16,64), block2 (8,8,128), block3 (4,4,256), block4 (2,2,512),
          block5 (1,1,512)
========  ==========================================================================

The last child of each model, ``fc``, gives the logits (not a probe point: it can be
negative).

Example:
    >>> import jax, jax.numpy as jnp
    >>> model = build("small", num_classes=10, width=0.25)
    >>> x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
    >>> probe_layers(model)
    ('conv1', 'conv2', 'conv3', 'pool')
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

MODEL_NAMES = ("small", "resnet18", "vgg11")

# He initialisation over fan-out, as torchvision initialises its ResNets and VGGs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier: ``max(1, round(channels * width))``."""
    return max(1, int(round(channels * width)))


def _batch_norm(train: bool) -> nn.BatchNorm:
    # PyTorch's defaults (momentum 0.1 there is 0.9 here), so results are comparable.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


def _conv3x3(features: int, strides: int = 1) -> nn.Conv:
    return nn.Conv(
        features,
        (3, 3),
        strides=strides,
        padding=1,
        use_bias=False,
        kernel_init=_conv_init,
    )


class ConvBlock(nn.Module):
    """``convs`` x (3x3 conv, batch norm, ReLU), then an optional 2x2 max-pool.

    Maps ``(B, H, W, C_in)`` to ``(B, H/2, W/2, features)`` when ``pool`` else
    ``(B, H, W, features)``; the output is >= 0.
    """

    features: int
    convs: int = 2
    pool: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for _ in range(self.convs):
            x = nn.relu(_batch_norm(train)(_conv3x3(self.features)(x)))
        if self.pool:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes: ``(B, H, W, C)`` -> ``(B, C)``."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.mean(x, axis=(1, 2))


class SmallCNN(nn.Module):
    """A lean VGG-style CNN that trains to useful CIFAR-10 accuracy on a laptop CPU.

    Blocks ``conv1``..``convK`` (one per entry of ``channels``), each ``convs_per_block``
    x (3x3 conv, BN, ReLU) then a 2x2 max-pool; ``pool`` averages the last block over
    space; ``fc`` gives the logits.

    Attributes:
        num_classes: number of logits.
        width: multiplier on every channel count.
        channels: base channels of each block (before ``width``).
        convs_per_block: 3x3 convolutions in each block.
    """

    num_classes: int = 10
    width: float = 1.0
    channels: Sequence[int] = (32, 64, 128)
    convs_per_block: int = 2

    arch: ClassVar[str] = "small"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i, c in enumerate(self.channels):
            x = ConvBlock(
                scaled(c, self.width), self.convs_per_block, name=f"conv{i + 1}"
            )(x, train)
        x = GlobalAvgPool(name="pool")(x)
        return nn.Dense(self.num_classes, name="fc")(x)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN and an identity (or 1x1) shortcut.

    ``(B, H, W, C_in)`` -> ``(B, H/strides, W/strides, features)``, post-ReLU.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = nn.relu(_batch_norm(train)(_conv3x3(self.features, self.strides)(x)))
        y = _batch_norm(train)(_conv3x3(self.features)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(
                self.features,
                (1, 1),
                strides=self.strides,
                use_bias=False,
                kernel_init=_conv_init,
            )(x)
            x = _batch_norm(train)(x)
        return nn.relu(x + y)


class ResStage(nn.Module):
    """``blocks`` basic blocks; the first one carries the stride."""

    features: int
    strides: int
    blocks: int = 2

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i in range(self.blocks):
            x = BasicBlock(self.features, self.strides if i == 0 else 1)(x, train)
        return x


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs, in the CIFAR layout of the paper.

    ``conv1`` is a 3x3 stem (64 channels, BN, ReLU, no max-pool); stages ``conv2_x``..
    ``conv5_x`` hold two basic blocks each (64/128/256/512 channels, strides 1/2/2/2);
    ``avgpool`` averages over space; ``fc`` gives the logits.

    Attributes:
        num_classes: number of logits.
        width: multiplier on every channel count.
    """

    num_classes: int = 10
    width: float = 1.0

    arch: ClassVar[str] = "resnet18"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = ConvBlock(scaled(64, self.width), convs=1, pool=False, name="conv1")(x, train)
        for i, (c, s) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2))):
            x = ResStage(scaled(c, self.width), s, name=f"conv{i + 2}_x")(x, train)
        x = GlobalAvgPool(name="avgpool")(x)
        return nn.Dense(self.num_classes, name="fc")(x)


_VGG11_BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGGBlock(nn.Module):
    """3x3 convs with BN and ReLU of the given widths, then a 2x2 max-pool."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for f in self.features:
            x = nn.relu(_batch_norm(train)(_conv3x3(f)(x)))
        return nn.max_pool(x, (2, 2), strides=(2, 2))


class VGG11(nn.Module):
    """VGG-11 with batch norm for 32x32 inputs.

    Blocks ``block1``..``block5`` of (64), (128), (256, 256), (512, 512), (512, 512)
    3x3 convs, each block ending in a max-pool (so ``block5`` is ``(1, 1, 512)``); ``fc``
    maps the flattened ``block5`` to the logits.

    Attributes:
        num_classes: number of logits.
        width: multiplier on every channel count.
    """

    num_classes: int = 10
    width: float = 1.0

    arch: ClassVar[str] = "vgg11"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        for i, block in enumerate(_VGG11_BLOCKS):
            feats = tuple(scaled(c, self.width) for c in block)
            x = VGGBlock(feats, name=f"block{i + 1}")(x, train)
        return nn.Dense(self.num_classes, name="fc")(x.reshape(x.shape[0], -1))


_CLASSES = {cls.arch: cls for cls in (SmallCNN, ResNet18, VGG11)}


def _check_name(name: str) -> type[nn.Module]:
    if name not in _CLASSES:
        raise ValueError(f"model name: expected one of {MODEL_NAMES}, got {name!r}")
    return _CLASSES[name]


def _is_number(value: Any) -> bool:
    # Strings and None would fail int() or ">" with a message that names no parameter.
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def build(name: str, num_classes: int = 10, width: float = 1.0, **kwargs: Any) -> nn.Module:
    """Build a model by name.

    Args:
        name: one of ``MODEL_NAMES`` (``"small"``, ``"resnet18"``, ``"vgg11"``).
        num_classes: number of logits, >= 1.
        width: multiplier on every channel count, > 0 (tests use 0.125).
        **kwargs: extra fields of the model class (``channels``, ``convs_per_block`` for
            ``"small"``).

    Returns:
        An unbound flax.linen Module mapping ``(B, 32, 32, C)`` float32 to
        ``(B, num_classes)`` float32 logits.

    Example:
        >>> build("resnet18", num_classes=100, width=0.5).width
        0.5
    """
    cls = _check_name(name)
    if not _is_number(num_classes) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
    if not _is_number(width) or not width > 0:
        raise ValueError(f"width: expected a number > 0, got {width!r}")
    allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes", "width"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(
            f"model {name!r}: unknown options {sorted(unknown)}, expected a subset of {sorted(allowed)}"
        )
    if "channels" in kwargs:
        kwargs["channels"] = tuple(int(c) for c in kwargs["channels"])
    return cls(num_classes=int(num_classes), width=float(width), **kwargs)


def small_cnn(num_classes: int = 10, width: float = 1.0, **kwargs: Any) -> SmallCNN:
    """``build("small", num_classes, width, **kwargs)``."""
    return build("small", num_classes, width, **kwargs)


def resnet18(num_classes: int = 10, width: float = 1.0) -> ResNet18:
    """``build("resnet18", num_classes, width)``."""
    return build("resnet18", num_classes, width)


def vgg11(num_classes: int = 10, width: float = 1.0) -> VGG11:
    """``build("vgg11", num_classes, width)``."""
    return build("vgg11", num_classes, width)


def spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable description that ``from_spec`` rebuilds the model from.

    Returns:
        ``{"name": ..., "num_classes": ..., "width": ..., <other fields>}``; tuples are
        written as lists.

    Example:
        >>> spec(build("vgg11", 100, 0.5))
        {'name': 'vgg11', 'num_classes': 100, 'width': 0.5}
    """
    arch = getattr(type(model), "arch", None)
    if arch not in _CLASSES:
        raise ValueError(
            f"model: expected one of the models of jaxcnmf.models {MODEL_NAMES}, "
            f"got {type(model).__name__}"
        )
    out: dict[str, Any] = {"name": arch}
    for f in dataclasses.fields(model):
        if f.name in ("parent", "name"):
            continue
        value = getattr(model, f.name)
        out[f.name] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def from_spec(spec_dict: dict[str, Any]) -> nn.Module:
    """Rebuild a model from ``spec(model)``.

    Example:
        >>> m = build("small", 10, 0.5, convs_per_block=1)
        >>> from_spec(spec(m)) == m
        True
    """
    if "name" not in spec_dict:
        raise ValueError(f"spec: expected a 'name' key, got keys {sorted(spec_dict)}")
    kwargs = dict(spec_dict)
    return build(kwargs.pop("name"), **kwargs)


def probe_layers(model: nn.Module) -> tuple[str, ...]:
    """Ordered names of the post-ReLU layers of ``model`` that can be probed.

    Example:
        >>> probe_layers(build("resnet18"))
        ('conv1', 'conv2_x', 'conv3_x', 'conv4_x', 'conv5_x', 'avgpool')
    """
    if isinstance(model, SmallCNN):
        return tuple(f"conv{i + 1}" for i in range(len(model.channels))) + ("pool",)
    if isinstance(model, ResNet18):
        return ("conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x", "avgpool")
    if isinstance(model, VGG11):
        return tuple(f"block{i + 1}" for i in range(len(_VGG11_BLOCKS)))
    raise ValueError(
        f"model: expected one of the models of jaxcnmf.models {MODEL_NAMES}, "
        f"got {type(model).__name__}"
    )
