import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf.nets import models, probe

TINY = 0.125
N = 7  # with batch_size=3: two full batches and a partial one


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)


def _variables(model, channels=3):
    init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))
    variables = init(jnp.zeros((1, 32, 32, channels)))
    # Non-trivial running statistics, so inference mode is really exercised.
    stats = jax.tree.map(
        lambda s: s + 0.1 * jax.random.uniform(jax.random.key(3), s.shape), variables["batch_stats"]
    )
    return {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def small():
    model = models.small_cnn(10, width=TINY)
    return model, _variables(model)


def _reference(model, variables, x):
    """Every intermediate of one unbatched, unfiltered forward pass, NHWC numpy."""
    _, state = model.apply(
        variables, jnp.asarray(x), train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    return {k: np.asarray(v["__call__"][0]) for k, v in inter.items() if "__call__" in v}


def _float(images):
    return images.astype(np.float32) / np.float32(255)


# Two different compiled programs (batch shapes, fused vs op-by-op, uint8 vs float input)
# agree only to rounding: XLA chooses convolution algorithms and reduction orders per
# program and per machine, and 1-2 ulp differences were seen between machines of one kind.
# Results of one program run twice are compared exactly elsewhere (determinism).
RTOL, ATOL = 1e-5, 1e-6


def _assert_close(actual, expected, name=""):
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=name)


def _assert_matches(view, expected, layer_ndim, name):
    del layer_ndim  # spatial and pooled layers alike: a different program than the reference
    _assert_close(view, expected, name)


@pytest.mark.parametrize("pooling", probe.POOLINGS)
def test_collect_equals_direct_forward_pass(small, images, pooling):
    model, variables = small
    layers = ["conv2", "conv1", "pool"]
    # One batch: a spatial reduction's summation order depends on the batch shape, so the
    # reference pools the same (N, h, w, C) array.
    views = probe.collect(
        model, variables, images, layers, pooling=pooling, batch_size=N, progress=False
    )
    assert list(views) == ["red", "green", "blue", *layers]
    ref = _reference(model, variables, _float(images))
    for name in layers:
        act = ref[name]
        if act.ndim == 4:
            if pooling == "flatten":
                # Channel-major rows: row = c*h*w + i*w + j.
                act = act.transpose(0, 3, 1, 2).reshape(N, -1)
            else:
                act = getattr(jnp, pooling)(jnp.asarray(act), axis=(1, 2))
        assert views[name].dtype == np.float32
        _assert_matches(views[name], np.asarray(act).T, ref[name].ndim, name)


def test_last_partial_batch(small, images):
    model, variables = small
    layers = ["conv1", "conv3", "pool"]
    whole = probe.collect(model, variables, images, layers, batch_size=N, progress=False)
    # 7 images in batches of 3: the last batch is padded, and the padding dropped.
    parts = probe.collect(model, variables, images, layers, batch_size=3, progress=True)
    for name in whole:
        assert parts[name].shape == whole[name].shape
        _assert_close(parts[name], whole[name], name)


@pytest.mark.parametrize("pooling", probe.POOLINGS)
@pytest.mark.parametrize("batch_size", [3, 4, 16])
def test_device_output_equals_numpy_output(small, images, pooling, batch_size):
    model, variables = small
    layers = ["conv3", "conv1", "pool"]
    # 7 images: batches of 3 overlap in the last one, of 4 too, of 16 pad a single batch.
    kwargs = dict(pooling=pooling, batch_size=batch_size, progress=False)
    host = probe.collect(model, variables, images, layers, **kwargs)
    device = probe.collect(model, variables, images, layers, output="device", **kwargs)
    assert list(device) == list(host) == ["red", "green", "blue", *layers]
    # Image by image; a spatial mean's summation order follows the batch shape, so pooled
    # views are compared across batch sizes only through the (looser) test above.
    reference = probe.collect(model, variables, images, layers, batch_size=1, progress=False)
    for name in host:
        assert isinstance(device[name], jax.Array) and device[name].dtype == jnp.float32
        assert isinstance(host[name], np.ndarray) and host[name].flags.writeable
        _assert_close(np.asarray(device[name]), host[name], name)
        if pooling == "flatten" and name != "pool":
            _assert_close(host[name], reference[name], name)


def test_device_output_pixels_only_and_without_pixels(small, images):
    model, variables = small
    pixels = probe.collect(model, variables, images, [], output="device", progress=False)
    assert list(pixels) == ["red", "green", "blue"]
    x = _float(images)
    np.testing.assert_array_equal(np.asarray(pixels["green"]), x[..., 1].reshape(N, -1).T)
    views = probe.collect(model, variables, images, ["conv2"], pixels=False, output="device",
                          progress=False)
    assert list(views) == ["conv2"] and views["conv2"].shape == (8 * 8 * 8, N)


def test_flatten_row_order_by_index(small, images):
    model, variables = small
    view = probe.collect(model, variables, images, "conv2", pixels=False, progress=False)["conv2"]
    act = _reference(model, variables, _float(images))["conv2"]
    h, w, c = act.shape[1:]
    n, ci, i, j = 5, c - 1, 2, 3
    assert view[ci * h * w + i * w + j, n] == pytest.approx(act[n, i, j, ci], rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_collect_resnet_and_vgg_match_forward_pass(images, name):
    model = models.build(name, 10, TINY)
    variables = _variables(model)
    layers = list(models.probe_layers(model))
    views = probe.collect(model, variables, images[:2], layers, pixels=False, progress=False)
    ref = _reference(model, variables, _float(images[:2]))
    for layer in layers:
        act = ref[layer]
        flat = act.transpose(0, 3, 1, 2).reshape(2, -1) if act.ndim == 4 else act
        _assert_matches(views[layer], flat.T, act.ndim, layer)
        assert views[layer].min() >= 0, layer


def test_pixel_views_equal_images(small, images):
    model, variables = small
    views = probe.collect(model, variables, images, [], pixels=True, progress=False)
    x = _float(images)
    for c, name in enumerate(("red", "green", "blue")):
        assert views[name].shape == (32 * 32, N)
        np.testing.assert_array_equal(views[name], x[..., c].reshape(N, -1).T)
    assert views["red"][5 * 32 + 7, 2] == x[2, 5, 7, 0]
    gray = probe.pixel_views(x[..., :1])
    assert list(gray) == ["gray"]
    np.testing.assert_array_equal(gray["gray"], x[..., 0].reshape(N, -1).T)


def test_float_images_give_the_same_views(small, images):
    model, variables = small
    a = probe.collect(model, variables, images, ["conv3"], batch_size=4, progress=False)
    b = probe.collect(model, variables, _float(images), ["conv3"], batch_size=4, progress=False)
    for name in a:
        _assert_close(a[name], b[name], name)


def test_only_requested_layers_are_captured(small, images, monkeypatch):
    model, variables = small
    captured = []

    def spy_apply(self, *args, **kwargs):
        result = nn.Module.apply(self, *args, **kwargs)
        if kwargs.get("capture_intermediates"):
            captured.append(set(result[1]["intermediates"]))
        return result

    monkeypatch.setattr(type(model), "apply", spy_apply)
    jax.clear_caches()
    probe.collect(model, variables, images, ["conv3"], pixels=False, progress=False)
    assert captured and all(c == {"conv3"} for c in captured)


def test_available_layers_shapes_tiny():
    expected = {
        "small": {"conv1": (16, 16, 4), "conv2": (8, 8, 8), "conv3": (4, 4, 16), "pool": (16,), "fc": (10,)},
        "resnet18": {
            "conv1": (32, 32, 8),
            "conv2_x": (32, 32, 8),
            "conv3_x": (16, 16, 16),
            "conv4_x": (8, 8, 32),
            "conv5_x": (4, 4, 64),
            "avgpool": (64,),
            "fc": (10,),
        },
        "vgg11": {
            "block1": (16, 16, 8),
            "block2": (8, 8, 16),
            "block3": (4, 4, 32),
            "block4": (2, 2, 64),
            "block5": (1, 1, 64),
            "fc": (10,),
        },
    }
    for name, shapes in expected.items():
        got = probe.available_layers(models.build(name, 10, TINY), (32, 32, 1))
        assert list(got.items()) == list(shapes.items()), name


def test_intervene(small, images):
    model, variables = small
    x = _float(images)
    ref = _reference(model, variables, x)
    logits = np.asarray(model.apply(variables, x, train=False))
    own = probe.intervene(model, variables, images, "conv2", ref["conv2"], batch_size=3)
    assert own.shape == (N, 10) and own.dtype == np.float32
    np.testing.assert_allclose(own, logits, rtol=1e-5, atol=1e-6)
    zeros = probe.intervene(model, variables, images, "conv2", np.zeros_like(ref["conv2"]))
    assert np.abs(zeros - logits).max() > 1e-3
    # Zero activations: every image gets the same logits.
    np.testing.assert_allclose(zeros, np.broadcast_to(zeros[:1], zeros.shape), rtol=1e-5, atol=1e-6)


def test_layer_forward_gradient_matches_finite_differences(small, images):
    model, variables = small
    x = jnp.asarray(_float(images[:2]))
    act = jnp.asarray(_reference(model, variables, x)["conv2"])
    f = jax.jit(probe.layer_forward(model, variables, "conv2"))
    np.testing.assert_allclose(
        f(x, act), model.apply(variables, x, train=False), rtol=1e-5, atol=1e-6
    )
    # Central differences need float64 to resolve a 1e-6 step.
    with jax.enable_x64(True):
        variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        f = jax.jit(probe.layer_forward(model, variables64, "conv2"))
        x, act = jnp.asarray(x, jnp.float64), jnp.asarray(act, jnp.float64)

        def score(a):
            return f(x, a)[:, 3].sum()

        grad = jax.grad(score)(act)
        direction = jax.random.normal(jax.random.key(5), act.shape, jnp.float64)
        eps = 1e-6
        fd = (score(act + eps * direction) - score(act - eps * direction)) / (2 * eps)
        assert abs(float(jnp.vdot(grad, direction))) > 1e-3
        np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd), rtol=1e-6)


class _Signed(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(4, name="linear")(x.reshape(x.shape[0], -1))
        return nn.Dense(2, name="fc")(nn.relu(x))


def test_negative_layer_error_and_allow_negative(images):
    model = _Signed()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"layer 'linear' has negative values \(min -?[0-9.]+\); is it a pre-ReLU output\? NMF needs non-negative views: probe the activation after it \(its ReLU\), or pass negative='clip' or negative='shift' \(as jaxcnmf.fit does\), or allow_negative=True to keep the values as they are"):
        probe.collect(model, variables, images, ["linear"], progress=False)
    views = probe.collect(model, variables, images, ["linear"], allow_negative=True, progress=False)
    assert views["linear"].shape == (4, N) and views["linear"].min() < 0
    # The minimum is tracked on the device across batches, so a single negative image in
    # a middle batch is caught; the check names the layer and its minimum.
    signed = images.copy()
    signed[:] = 0
    variables = jax.tree.map(jnp.zeros_like, variables)
    bias = variables["params"]["linear"]["bias"].at[2].set(-0.5)
    variables["params"]["linear"]["bias"] = bias
    with pytest.raises(ValueError, match=r"layer 'linear' has negative values \(min -0.5\)"):
        probe.collect(model, variables, signed, ["linear"], batch_size=3, output="device",
                      progress=False)


def test_errors(small, images):
    model, variables = small
    collect = lambda imgs=images, layers=("conv1",), **kw: probe.collect(  # noqa: E731
        model, variables, imgs, list(layers), progress=False, **kw
    )
    with pytest.raises(ValueError, match=r"layers: unknown layer\(s\) \['conv9'\].*available layers are \['conv1', 'conv2', 'conv3', 'pool', 'fc'\]"):
        collect(layers=["conv9"])
    with pytest.raises(ValueError, match=r"pooling: expected one of \('flatten', 'mean', 'max'\), got 'sum'"):
        collect(pooling="sum")
    with pytest.raises(ValueError, match=r"output: expected one of \('numpy', 'device'\), got 'cuda'"):
        collect(output="cuda")
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got 0"):
        collect(batch_size=0)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1, got None"):
        collect(batch_size=None)
    with pytest.raises(ValueError, match=r"images: expected an array of shape \(N, H, W, C\), got 3 dimensions"):
        collect(images[0])
    with pytest.raises(ValueError, match=r"images: expected 1 \(gray\) or 3 \(RGB\) channels"):
        collect(np.zeros((2, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match=r"images: expected float pixels in \[0, 1\].*got values in \[0, 255\]"):
        collect(images.astype(np.float32))
    with pytest.raises(ValueError, match="images: expected dtype uint8 or float32 in \\[0, 1\\], got int64"):
        collect(images.astype(np.int64))
    with pytest.raises(ValueError, match=r"images: expected 32x32 images.*got shape \(7, 28, 28, 3\)"):
        collect(images[:, :28, :28])
    with pytest.raises(ValueError, match=r"images: per-image shape \(32, 32, 1\) does not fit"):
        collect(images[..., :1])
    with pytest.raises(ValueError, match="layers: expected distinct names"):
        collect(layers=["conv1", "conv1"])
    with pytest.raises(ValueError, match=r"activations: expected shape \(7, 8, 8, 8\) for layer 'conv2', got \(7, 8, 8, 4\)"):
        probe.intervene(model, variables, images, "conv2", np.zeros((N, 8, 8, 4)))
    f = probe.layer_forward(model, variables, "pool")
    with pytest.raises(ValueError, match=r"activations: expected shape \(2, 16\) for layer 'pool', got \(2, 8\)"):
        f(jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="layers: unknown layer"):
        probe.layer_forward(model, variables, "avgpool")


# ------------------------------------------------ full-precision activations and gradients


def test_layer_activations_match_collect_flattening(small, images):
    model, variables = small
    # batch_size 4 of N=7: a full batch and a padded one.
    ours = probe.layer_activations(model, variables, images, ["conv2", "pool"], batch_size=4)
    theirs = probe.collect(model, variables, images, ["conv2", "pool"], pixels=False,
                           pooling="flatten", batch_size=4, progress=False)
    for layer in ("conv2", "pool"):
        assert ours[layer].shape == theirs[layer].T.shape and ours[layer].dtype == np.float32
        _assert_close(ours[layer], theirs[layer].T, layer)


def test_layer_gradients_match_grad_through_layer_forward(small, images):
    # Two routes to d logit_label / d layer: layer_gradients' shifted capture of both
    # layers in one backward pass, and jax.grad through layer_forward's replaced output.
    model, variables = small
    labels = np.arange(N) % 10
    grads = probe.layer_gradients(model, variables, images, labels, ["conv2", "pool"],
                                  batch_size=3)
    ref = _reference(model, variables, _float(images))
    for layer in ("conv2", "pool"):
        forward = probe.layer_forward(model, variables, layer)

        def picked(a, forward=forward):
            logits = forward(jnp.asarray(_float(images)), a)
            return jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1))

        expected = np.asarray(jax.grad(picked)(jnp.asarray(ref[layer])))
        # Channel-major, as collect flattens: (N, C, ...) rows.
        expected = np.moveaxis(expected, -1, 1).reshape(N, -1)
        assert grads[layer].shape == expected.shape
        np.testing.assert_allclose(grads[layer], expected, rtol=1e-4, atol=1e-6, err_msg=layer)
        assert np.abs(expected).max() > 0


def _precisions(jaxpr):
    """``precision`` of every matmul and convolution in a jaxpr and its sub-jaxprs."""
    import jax.extend

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_precisions(sub))
    return found


def test_activations_and_gradients_run_at_full_precision(small):
    # The CPU always computes float32 products in full, so the traced programs are what
    # can be checked: each product must carry HIGHEST rather than the backend's default,
    # which is TF32 on NVIDIA GPUs (TCAV's scores are signs of small numbers).
    model, variables = small
    x = jnp.zeros((2, 32, 32, 3))
    layers = ("conv2", "pool")
    programs = [
        jax.make_jaxpr(probe._compiled(probe._activations, model, layers))(variables, x),
        jax.make_jaxpr(probe._compiled(probe._gradients, model, layers))(
            variables, x, jnp.zeros(2, jnp.int32)
        ),
    ]
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for program in programs:
        found = _precisions(program.jaxpr)
        assert found and all(p == highest for p in found), found


class _CallOrder(nn.Module):
    """Children called in an order that is not alphabetical; not a jaxcnmf model."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(3, (3, 3), strides=2, name="zeta")(x))
        x = nn.relu(nn.Conv(5, (3, 3), name="alpha")(x))
        return nn.Dense(4, name="mid")(x.mean(axis=(1, 2)))


def test_layer_shapes_in_call_order_with_logits():
    model = _CallOrder()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    expected = {"zeta": (4, 4, 3), "alpha": (4, 4, 5), "mid": (4,)}
    shapes = probe.network_shapes(model, variables, (8, 8, 1))
    assert list(shapes.layers.items()) == list(expected.items())
    assert shapes.logits == (4,)
    assert probe.layer_shapes(model, variables, (8, 8, 1)) == shapes.layers
    # Without variables, the same shapes and order (no probe points to put first).
    assert list(probe.available_layers(model, (8, 8, 1)).items()) == list(expected.items())


def test_layer_shapes_agree_with_available_layers(small):
    model, variables = small
    assert list(probe.layer_shapes(model, variables, (32, 32, 3)).items()) == list(
        probe.available_layers(model, (32, 32, 3)).items())


# --------------------------------------------------------------------------- gray pictures stored as RGB


def test_auto_pixels_collapse_identical_channels_to_one_gray_view(small, images, caplog):
    model, variables = small
    gray_rgb = np.repeat(images[..., :1], 3, axis=-1)
    with caplog.at_level("INFO", logger="jaxcnmf.nets.probe"):
        views = probe.collect(model, variables, gray_rgb, ["conv3"], pixels="auto",
                              batch_size=3, progress=False)
    assert list(views) == ["gray", "conv3"]
    np.testing.assert_array_equal(views["gray"], probe.pixel_views(images[..., :1])["gray"])
    assert "red, green and blue are equal in all 7 images" in caplog.text
    rgb = probe.collect(model, variables, gray_rgb, ["conv3"], batch_size=3, progress=False)
    assert list(rgb) == ["red", "green", "blue", "conv3"]
    np.testing.assert_array_equal(views["conv3"], rgb["conv3"])
    device = probe.collect(model, variables, gray_rgb, ["conv3"], pixels="auto", batch_size=3,
                           progress=False, output="device")
    assert list(device) == ["gray", "conv3"]
    np.testing.assert_array_equal(np.asarray(device["gray"]), views["gray"])


def test_auto_pixels_keep_colour_and_gray_gives_luma(small, images):
    model, variables = small
    assert list(probe.collect(model, variables, images, ["pool"], pixels="auto",
                              progress=False)) == ["red", "green", "blue", "pool"]
    gray = probe.pixel_views(images, pixels="gray")["gray"]
    expected = (images.astype(np.float32) / 255) @ np.array([0.299, 0.587, 0.114], np.float32)
    _assert_close(gray, expected.reshape(N, -1).T)
    assert list(probe.collect(model, variables, images, ["pool"], pixels="none",
                              progress=False)) == ["pool"]
    assert list(probe.pixel_views(images[..., :1], pixels="auto")) == ["gray"]
    with pytest.raises(ValueError, match=r"pixels: expected True, False or one of \('rgb', 'gray', 'auto', 'none'\), got 'grey'"):
        probe.collect(model, variables, images, ["pool"], pixels="grey", progress=False)


@pytest.mark.parametrize("pixels", ["gray", "auto", "none"])
def test_collect_to_a_store_honours_pixels(small, images, pixels, tmp_path):
    model, variables = small
    gray_rgb = np.repeat(images[..., :1], 3, axis=-1)  # "auto" gives one gray view
    source = images if pixels == "gray" else gray_rgb
    expected = probe.collect(model, variables, source, ["pool"], pixels=pixels, batch_size=3,
                             progress=False)
    s = probe.collect(model, variables, source, ["pool"], pixels=pixels, batch_size=3,
                      progress=False, store=tmp_path / "acts", block_size=4)
    assert s.views == tuple(expected) and s.n_blocks == 2  # blocks of 4 and 3 images
    for name, X in s.read_all().items():
        _assert_close(X, expected[name])
