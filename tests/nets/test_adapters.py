"""Probing networks that are not ours: an NNX CNN, a Linen model with a nested block, a
plain function; each against a forward pass written out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnmf import fit
from jaxcnmf.concepts import fidelity
from jaxcnmf.nets import adapters, probe

N, H, K = 5, 8, 5  # images, side, classes; batch_size=2 gives a padded last batch
RTOL, ATOL = 1e-5, 1e-6  # two compiled programs agree to rounding only


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, H, H, 3), dtype=np.uint8)


def _float(images):
    return jnp.asarray(images.astype(np.float32) / np.float32(255))


def _flat(act):
    """(N, h, w, C) or (N, C) -> the collect view, (C*h*w, N) channel-major."""
    act = np.asarray(act)
    return np.moveaxis(act, -1, 1).reshape(act.shape[0], -1).T


# --------------------------------------------------------------------------- networks


def _random_like(shapes, seed):
    """Arrays N(0, 0.25) of the shapes of a pytree of shapes or abstract arrays, drawn by
    NumPy: eager JAX and flax initialisers compile op by op, seconds per layer here."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0, 0.5, getattr(a, "shape", a)), jnp.float32), shapes,
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(d, int) for d in a))


class _Block(nnx.Module):
    def __init__(self, cin, cout, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([_Block(3, 4, rngs), _Block(4, 6, rngs)])
        self.drop = nnx.Dropout(0.5)  # no rngs: it would fail in training mode
        self.head = nnx.Linear(6, K, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.drop(x.mean(axis=(1, 2))))


@pytest.fixture(scope="module")
def nnx_net():
    # Built abstractly and filled from NumPy: eager NNX initialisers compile op by op,
    # which costs seconds per layer.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _NNXNet(nnx.Rngs(0))))
    model = nnx.merge(graphdef, _random_like(state, seed=0))
    for i, block in enumerate(model.blocks):  # running statistics that matter in eval mode
        block.bn.mean[...] = 0.1 * (i + 1) * jnp.ones(block.bn.mean.shape)
        block.bn.var[...] = 1.5 * jnp.ones(block.bn.var.shape)
    return model  # left in training mode: the probe runs an eval-mode copy


@pytest.fixture(scope="module")
def nnx_eval(nnx_net):
    """The same network in eval mode, for the forward passes written out here."""
    model = nnx.clone(nnx_net)
    model.eval()
    return model


def _nnx_hand(model, x):
    """Layer outputs and logits of ``_NNXNet`` (in eval mode), one submodule at a time."""
    b0 = model.blocks[0]
    h0 = nnx.relu(b0.bn(b0.conv(x)))
    b1 = model.blocks[1]
    h1 = nnx.relu(b1.bn(b1.conv(h0)))
    return {"blocks.0": h0, "blocks.1": h1}, model.head(h1.mean(axis=(1, 2)))


def _nnx_tail(model, layer, h):
    if layer == "blocks.0":
        h = model.blocks[1](h)
    return model.head(h.mean(axis=(1, 2)))


class _Stage(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(self.features, (3, 3), strides=2, name="conv")(x))


class _Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Stage(6, name="stage2")(_Stage(4, name="stage1")(x))


class _LinenNet(nn.Module):
    """No ``train`` argument; the probe points are nested in ``backbone``."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(K, name="head")(_Backbone(name="backbone")(x).mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def linen_net():
    model = _LinenNet()
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, H, H, 3)))
    return model, _random_like(shapes, seed=1)


def _conv(params, x):
    return nn.Conv(params["kernel"].shape[-1], (3, 3), strides=2).apply({"params": params}, x)


def _linen_hand(variables, x):
    p = variables["params"]
    pre1 = _conv(p["backbone"]["stage1"]["conv"], x)
    h1 = nn.relu(pre1)
    h2 = nn.relu(_conv(p["backbone"]["stage2"]["conv"], h1))
    acts = {"backbone/stage1/conv": pre1, "backbone/stage1": h1, "backbone/stage2": h2,
            "backbone": h2}
    return acts, _linen_tail(variables, "backbone", h2)


def _linen_tail(variables, layer, h):
    p = variables["params"]
    if layer == "backbone/stage1":
        h = nn.relu(_conv(p["backbone"]["stage2"]["conv"], h))
    return nn.Dense(K).apply({"params": p["head"]}, h.mean(axis=(1, 2)))


def _fn_conv(w, x):
    return jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def apply_fn(params, x, replace=None):
    """The documented contract: (logits, {name: activation}); ``replace`` overrides."""
    replace = replace or {}
    h1 = replace.get("h1", jax.nn.relu(_fn_conv(params["w1"], x)))
    pre2 = _fn_conv(params["w2"], h1)
    h2 = replace.get("h2", jax.nn.relu(pre2))
    return h2.mean(axis=(1, 2)) @ params["w3"], {"h1": h1, "pre2": pre2, "h2": h2}


@pytest.fixture(scope="module")
def fn_net():
    params = _random_like({"w1": (3, 3, 3, 4), "w2": (3, 3, 4, 6), "w3": (6, K)}, seed=2)
    return probe.from_function(apply_fn, params, layers=("h1", "pre2", "h2"))


def _fn_tail(params, layer, h):
    if layer == "h1":
        h = jax.nn.relu(_fn_conv(params["w2"], h))
    return h.mean(axis=(1, 2)) @ params["w3"]


@pytest.fixture(scope="module")
def kinds(nnx_net, nnx_eval, linen_net, fn_net):
    """kind -> (model, variables, probed layers, hand forward, hand tail)."""
    model, variables = linen_net
    return {
        "nnx": (nnx_net, None, ("blocks.0", "blocks.1"),
                lambda x: _nnx_hand(nnx_eval, x),
                lambda layer, h: _nnx_tail(nnx_eval, layer, h)),
        "linen": (model, variables, ("backbone/stage1", "backbone"),
                  lambda x: _linen_hand(variables, x),
                  lambda layer, h: _linen_tail(variables, layer, h)),
        "function": (fn_net, None, ("h1", "h2"),
                     lambda x: apply_fn(fn_net.params, x)[::-1],
                     lambda layer, h: _fn_tail(fn_net.params, layer, h)),
    }


# ------------------------------------------------------------------------------ tests


def test_available_layers_paths_and_shapes_in_call_order(nnx_net, linen_net, fn_net):
    assert list(probe.available_layers(nnx_net, image_shape=(H, H, 3)).items()) == [
        ("blocks.0", (4, 4, 4)), ("blocks.0.conv", (4, 4, 4)), ("blocks.0.bn", (4, 4, 4)),
        ("blocks", (2, 2, 6)),  # the list of blocks: its last block's output
        ("blocks.1", (2, 2, 6)), ("blocks.1.conv", (2, 2, 6)), ("blocks.1.bn", (2, 2, 6)),
        ("drop", (6,)), ("head", (K,)),
    ]
    assert list(probe.available_layers(linen_net[0], image_shape=(H, H, 3)).items()) == [
        ("backbone", (2, 2, 6)), ("backbone/stage1", (4, 4, 4)),
        ("backbone/stage1/conv", (4, 4, 4)), ("backbone/stage2", (2, 2, 6)),
        ("backbone/stage2/conv", (2, 2, 6)), ("head", (K,)),
    ]
    assert list(probe.available_layers(fn_net, image_shape=(H, H, 3)).items()) == [
        ("h1", (4, 4, 4)), ("pre2", (2, 2, 6)), ("h2", (2, 2, 6))]
    shapes = probe.network_shapes(nnx_net, None, (H, H, 3))
    assert shapes.logits == (K,) and shapes.layers["blocks.1"] == (2, 2, 6)


@pytest.mark.parametrize("kind", ["nnx", "linen", "function"])
def test_collect_equals_hand_written_forward_pass(kinds, images, kind):
    model, variables, layers, hand, _ = kinds[kind]
    views = probe.collect(model, variables, images, list(layers), batch_size=2, progress=False)
    acts, _ = hand(_float(images))
    assert list(views) == ["red", "green", "blue", *layers]
    for layer in layers:
        np.testing.assert_allclose(views[layer], _flat(acts[layer]), rtol=RTOL, atol=ATOL,
                                   err_msg=layer)
    assert np.abs(views[layers[-1]]).max() > 0


def test_nnx_model_is_left_unchanged_and_state_can_be_given(nnx_net, images):
    before = jax.tree.map(np.asarray, nnx.state(nnx_net, nnx.Param))
    views = probe.collect(nnx_net, None, images, ["blocks.1", "blocks"], pixels=False,
                          progress=False)
    np.testing.assert_array_equal(views["blocks"], views["blocks.1"])
    assert type(nnx_net.blocks[0]) is _Block and type(nnx_net.blocks[0].conv) is nnx.Conv
    after = jax.tree.map(np.asarray, nnx.state(nnx_net, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    # Another state for the same graph: zero weights give zero activations.
    zeros = jax.tree.map(jnp.zeros_like, nnx.state(nnx_net))
    other = probe.collect(nnx_net, zeros, images, ["blocks.1"], pixels=False, progress=False)
    assert views["blocks.1"].max() > 0 and other["blocks.1"].max() == 0


@pytest.mark.parametrize("kind", ["nnx", "linen", "function"])
def test_intervention_with_true_activations_gives_the_models_logits(kinds, images, kind):
    model, variables, layers, hand, _ = kinds[kind]
    layer = layers[0]
    acts, logits = hand(_float(images))
    replaced = probe.intervene(model, variables, images, layer, np.asarray(acts[layer]),
                               batch_size=2)
    np.testing.assert_allclose(replaced, logits, rtol=RTOL, atol=ATOL)
    zeroed = probe.intervene(model, variables, images, layer, np.zeros_like(acts[layer]))
    assert np.abs(zeroed - np.asarray(logits)).max() > 1e-3


@pytest.mark.filterwarnings("ignore::jaxcnmf.solver.fit.ConvergenceWarning")
def test_fidelity_of_true_activations_is_the_models_accuracy(kinds, images):
    # One kind end to end (fit, transform and the table); intervene is the part that
    # differs between kinds and is checked for each above.
    model, _, layers, hand, _ = kinds["nnx"]
    acts, logits = hand(_float(images))
    labels = np.argmax(np.asarray(logits), axis=1)
    labels[3:] = (labels[3:] + 1) % K  # the model is right on 3 of 5 images
    view = _flat(acts[layers[1]])
    res = fit({layers[1]: view}, rank=2, max_iter=3, progress=False)
    table = fidelity.fidelity(model, None, images, labels, res, layers[1], activations=view)
    own = fidelity.accuracy(np.asarray(logits), labels)
    assert own == 0.6 and table.original_accuracy == own


@pytest.mark.parametrize("kind", ["nnx", "linen", "function"])
def test_layer_gradients_equal_grad_of_hand_split_model(kinds, images, kind):
    model, variables, layers, hand, tail = kinds[kind]
    labels = np.array([4, 0, 3, 1, 2])
    grads = probe.layer_gradients(model, variables, images, labels, list(layers), batch_size=2)
    acts, _ = hand(_float(images))
    for layer in layers:
        def picked(h, layer=layer):
            return jnp.sum(jnp.take_along_axis(tail(layer, h), labels[:, None], axis=1))

        with jax.default_matmul_precision("float32"):
            expected = jax.grad(picked)(acts[layer])
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(grads[layer], _flat(expected).T, rtol=1e-4, atol=1e-6,
                                   err_msg=layer)
    got = probe.layer_activations(model, variables, images, [layers[0]], batch_size=2)
    np.testing.assert_allclose(got[layers[0]], _flat(acts[layers[0]]).T, rtol=RTOL, atol=ATOL)


def test_negative_layer_refused_or_clipped_or_shifted(linen_net, images):
    model, variables = linen_net
    layer = "backbone/stage1/conv"
    raw = _flat(_linen_hand(variables, _float(images))[0][layer])
    assert raw.min() < 0
    with pytest.raises(ValueError) as err:
        probe.collect(model, variables, images, [layer], progress=False)
    assert str(err.value) == (
        f"layer {layer!r} has negative values (min {raw.min():.4g}); is it a pre-ReLU output? "
        "NMF needs non-negative views: probe the activation after it (its ReLU), or pass "
        "negative='clip' or negative='shift' (as jaxcnmf.fit does), or allow_negative=True "
        "to keep the values as they are")

    def run(**kw):
        return probe.collect(model, variables, images, [layer], pixels=False, batch_size=2,
                             progress=False, **kw)[layer]

    np.testing.assert_allclose(run(negative="clip"), np.maximum(raw, 0), rtol=RTOL, atol=ATOL)
    shifted = run(negative="shift", output="device")
    np.testing.assert_allclose(np.asarray(shifted), raw - raw.min(), rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(run(allow_negative=True), raw, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match=r"negative: expected one of \('raise', 'clip', 'shift'\), got 'abs'"):
        run(negative="abs")


def test_clip_with_store_and_shift_refused(linen_net, images, tmp_path):
    model, variables = linen_net
    layer = "backbone/stage1/conv"
    stored = probe.collect(model, variables, images, [layer], pixels=False, batch_size=2,
                           progress=False, negative="clip", store=str(tmp_path / "s"),
                           block_size=3)  # blocks of 3 columns from batches of 2
    raw = _flat(_linen_hand(variables, _float(images))[0][layer])
    np.testing.assert_allclose(stored.read_all([layer])[layer], np.maximum(raw, 0),
                               rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="negative: 'shift' needs the minimum over every image"):
        probe.collect(model, variables, images, [layer], store=str(tmp_path / "t"),
                      negative="shift", progress=False)


def test_unknown_layer_lists_available_paths(nnx_net, linen_net, fn_net, images):
    with pytest.raises(ValueError, match=(
            r"layers: unknown layer\(s\) \['blocks.2'\] for _NNXNet; available layers are "
            r"\['blocks.0', 'blocks.0.conv', 'blocks.0.bn', 'blocks', 'blocks.1', 'blocks.1.conv', "
            r"'blocks.1.bn', 'drop', 'head'\]")):
        probe.collect(nnx_net, None, images, ["blocks.2"], progress=False)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['stage1'\] for _LinenNet; available layers are \['backbone', 'backbone/stage1',"):
        probe.intervene(*linen_net, images, "stage1", np.zeros((N, 4, 4, 4)))
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['h3'\] for apply_fn; available layers are \['h1', 'pre2', 'h2'\]"):
        probe.layer_gradients(fn_net, None, images, np.zeros(N, int), ["h3"])
    with pytest.raises(ValueError, match=r"variables: expected the variables of the Linen module _LinenNet \(model.init\(...\)\), got None"):
        probe.collect(linen_net[0], None, images, ["backbone"], progress=False)
    with pytest.raises(ValueError, match="model: expected a flax.linen Module, a flax.nnx Module or probe.from_function"):
        probe.collect(object(), None, images, ["h1"], progress=False)


def test_function_without_replace_is_refused_for_interventions(images):
    def plain(params, x):
        h = jax.nn.relu(x * params)
        return h.mean(axis=(1, 2)), {"h": h}

    net = probe.from_function(plain, jnp.float32(2.0))
    assert probe.collect(net, None, images, ["h"], pixels=False, progress=False)["h"].shape == (
        H * H * 3, N)
    with pytest.raises(ValueError, match=r"apply_fn: plain does not take replace=\{name: array\}"):
        probe.intervene(net, None, images, "h", np.zeros((N, H, H, 3)))


def test_adapter_interface_directly(nnx_net, nnx_eval, images):
    net = adapters.adapt(nnx_net)
    x = _float(images)
    logits, acts = jax.jit(net.adapter.forward, static_argnums=2)(net.state, x, ("blocks.1",))
    hand_acts, hand_logits = _nnx_hand(nnx_eval, x)
    np.testing.assert_allclose(logits, hand_logits, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(acts["blocks.1"], hand_acts["blocks.1"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(net.forward_replaced(x, "blocks.1", hand_acts["blocks.1"]),
                               hand_logits, rtol=RTOL, atol=ATOL)
    assert net.layers((H, H, 3))["head"] == (K,)
