import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf.nets import models

TINY = 0.125


def _init(model, channels=3, batch=2):
    x = jax.random.uniform(jax.random.key(1), (batch, 32, 32, channels), jnp.float32)
    return x, model.init(jax.random.key(0), x, train=False)


def _direct_outputs(model, variables, x):
    _, state = model.apply(
        variables,
        x,
        train=False,
        capture_intermediates=lambda mdl, _: len(mdl.scope.path) == 1,
        mutable=["intermediates"],
    )
    return {k: v["__call__"][0] for k, v in state["intermediates"].items()}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_logits_and_probe_points(name):
    model = models.build(name, num_classes=7, width=TINY)
    x, variables = _init(model)
    assert set(variables) == {"params", "batch_stats"}
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    outs = _direct_outputs(model, variables, x)
    # Every probe point is a direct child, post-ReLU; fc is the logits.
    assert set(models.probe_layers(model)) | {"fc"} == set(outs)
    for layer in models.probe_layers(model):
        assert float(outs[layer].min()) >= 0.0, layer
    # Captured in a second, separately compiled call: equal to rounding.
    np.testing.assert_allclose(outs["fc"], logits, rtol=1e-5, atol=1e-6)


def test_shapes_at_full_width():
    expected = {
        "small": {"conv1": (16, 16, 32), "conv2": (8, 8, 64), "conv3": (4, 4, 128), "pool": (128,)},
        "resnet18": {
            "conv1": (32, 32, 64),
            "conv2_x": (32, 32, 64),
            "conv3_x": (16, 16, 128),
            "conv4_x": (8, 8, 256),
            "conv5_x": (4, 4, 512),
            "avgpool": (512,),
        },
        "vgg11": {
            "block1": (16, 16, 64),
            "block2": (8, 8, 128),
            "block3": (4, 4, 256),
            "block4": (2, 2, 512),
            "block5": (1, 1, 512),
        },
    }
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    for name, shapes in expected.items():
        model = models.build(name)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
        outs = jax.eval_shape(lambda v, x: _direct_outputs(model, v, x), variables, x)
        assert models.probe_layers(model) == tuple(shapes)
        assert {k: outs[k].shape[1:] for k in shapes} == shapes


def test_resnet18_has_paper_parameter_count():
    model = models.resnet18(10)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    # The PyTorch CIFAR ResNet-18 the paper used has 11,173,962 parameters.
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 11_173_962


def test_width_multiplier_scales_channels():
    assert models.scaled(64, TINY) == 8
    assert models.scaled(3, 0.01) == 1
    model = models.small_cnn(10, width=0.5, channels=(8, 16), convs_per_block=1)
    x, variables = _init(model)
    outs = _direct_outputs(model, variables, x)
    assert models.probe_layers(model) == ("conv1", "conv2", "pool")
    assert outs["conv2"].shape == (2, 8, 8, 8)
    assert outs["pool"].shape == (2, 8)


def test_gray_input_and_train_mode_updates_batch_stats():
    model = models.small_cnn(3, width=TINY)
    x, variables = _init(model, channels=1)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 3)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize(
    "model",
    [
        models.build("small", 10, 0.5, channels=(16, 32), convs_per_block=1),
        models.build("resnet18", 100, TINY),
        models.build("vgg11", 20, 0.25),
    ],
)
def test_spec_round_trip_through_json(model):
    spec = json.loads(json.dumps(models.spec(model)))
    assert models.from_spec(spec) == model


def test_errors():
    with pytest.raises(ValueError, match=r"model name: expected one of \('small', 'resnet18', 'vgg11'\), got 'alexnet'"):
        models.build("alexnet")
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 1, got 0"):
        models.build("small", 0)
    with pytest.raises(ValueError, match="width: expected a number > 0, got -1"):
        models.build("vgg11", 10, -1)
    with pytest.raises(ValueError, match="num_classes: expected an integer >= 1, got 'ten'"):
        models.build("small", "ten")
    with pytest.raises(ValueError, match="width: expected a number > 0, got None"):
        models.build("small", 10, None)
    with pytest.raises(ValueError, match=r"unknown options \['depth'\]"):
        models.build("resnet18", 10, depth=34)
    with pytest.raises(ValueError, match="expected a 'name' key"):
        models.from_spec({"width": 1.0})
    with pytest.raises(ValueError, match="got Dense"):
        models.probe_layers(models.nn.Dense(3))
