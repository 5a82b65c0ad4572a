"""The user's own network: builder import and contract, orbax checkpoints saved and restored."""

import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcnmf.nets import usermodel

# A user's module, as it would sit beside their data: conftest's TINY_NNX_MODULE (an NNX
# CNN with nested blocks and batch norm), then a Linen model with a nested backbone, and
# builders that go wrong.
USER_MODULE = '''
import flax.linen as nn
import jax.numpy as jnp

from jaxcnmf.nets import probe



class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(5, (3, 3), strides=4, name="conv")(x))


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Stage(name="stage")(x)


class LinenNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        h = Backbone(name="backbone")(nn.relu(nn.Conv(4, (3, 3), name="stem")(x)))
        return nn.Dense(self.num_classes, name="head")(h.mean((1, 2)))


def build_linen(num_classes):
    return LinenNet(num_classes)


def build_any(**kwargs):
    return TinyCNN(kwargs["num_classes"], kwargs["input_shape"][-1])


def apply_fn(params, x, replace=None):
    h = (replace or {}).get("h", jnp.maximum(x.mean((1, 2)) @ params["w"], 0))
    return h @ params["v"], {"h": h}


def build_function(num_classes):
    params = {"w": jnp.zeros((1, 4)), "v": jnp.zeros((4, num_classes))}
    return probe.from_function(apply_fn, params, layers=("h",))


def broken():
    raise RuntimeError("no weights here")


def wrong():
    return 42


not_callable = 3
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory, tiny_nnx_module):
    """The module ``usernets_lib`` on sys.path for this file's tests."""
    folder = tmp_path_factory.mktemp("usermodule")
    (folder / "usernets_lib.py").write_text(tiny_nnx_module + textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(folder))
    yield sys.modules.get("usernets_lib") or __import__("usernets_lib")
    sys.path.remove(str(folder))
    sys.modules.pop("usernets_lib", None)


def _same(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_nnx_state_round_trips_through_orbax(user_module, tmp_path):
    saved = user_module.TinyCNN(10, 1, seed=7)
    saved.layer1.norm.mean[...] = jnp.arange(4.0)  # batch statistics travel too
    usermodel.save_orbax(saved, tmp_path / "ckpt")
    built = user_module.TinyCNN(10, 1, seed=0)
    assert not _same(nnx.state(built), nnx.state(saved))
    restored = usermodel.load_orbax(built, tmp_path / "ckpt")
    assert restored is built
    assert _same(nnx.state(built), nnx.state(saved))


def test_pure_dict_and_checkpoint_manager_layouts_load(user_module, tmp_path):
    import orbax.checkpoint as ocp

    saved = user_module.TinyCNN(10, 1, seed=3)
    usermodel.save_orbax(nnx.to_pure_dict(nnx.state(saved)), tmp_path / "pure")
    assert _same(nnx.state(usermodel.load_orbax(user_module.TinyCNN(10, 1), tmp_path / "pure")),
                 nnx.state(saved))
    # CheckpointManager: numbered steps, one item folder each; the latest step is read.
    with ocp.CheckpointManager(tmp_path / "managed") as manager:
        for step, seed in ((1, 4), (2, 5)):
            state = nnx.state(user_module.TinyCNN(10, 1, seed=seed))
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    loaded = usermodel.load_orbax(user_module.TinyCNN(10, 1), tmp_path / "managed")
    assert _same(nnx.state(loaded), nnx.state(user_module.TinyCNN(10, 1, seed=5)))


def test_linen_variables_round_trip_and_are_checked_against_init(user_module, tmp_path):
    model = user_module.LinenNet(10)
    variables = model.init(jax.random.key(3), jnp.zeros((1, 32, 32, 1)))
    usermodel.save_orbax(variables, tmp_path / "linen")
    restored = usermodel.load_orbax(model, tmp_path / "linen", input_shape=(32, 32, 1))
    assert _same(restored, dict(variables))
    with pytest.raises(ValueError, match=r"'params\.stem\.kernel' has shape \(3, 3, 1, 4\) in "
                                         r"the checkpoint but \(3, 3, 3, 4\) in the model"):
        usermodel.load_orbax(model, tmp_path / "linen", input_shape=(32, 32, 3))


def test_linen_builder_with_orbax_variables_is_probed_by_nested_path(user_module, tmp_path):
    from jaxcnmf.nets import probe

    model = user_module.LinenNet(10)
    variables = model.init(jax.random.key(5), jnp.zeros((1, 32, 32, 1)))
    usermodel.save_orbax(variables, tmp_path / "linen")
    loaded = usermodel.load("usernets_lib:build_linen", tmp_path / "linen", num_classes=10,
                            input_shape=(32, 32, 1))
    assert loaded.kind == "linen" and loaded.checkpoint == tmp_path / "linen"
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
    views = probe.collect(loaded.model, loaded.variables, images, ["backbone/stage"],
                          pixels=False, progress=False)
    # By hand: the stem, then the backbone's stage, with the saved parameters.
    params = variables["params"]
    x = images.astype(np.float32) / 255
    h = nn.relu(nn.Conv(4, (3, 3)).apply({"params": params["stem"]}, x))
    h = nn.relu(nn.Conv(5, (3, 3), strides=4).apply({"params": params["backbone"]["stage"]["conv"]},
                                                       h))
    np.testing.assert_allclose(views["backbone/stage"],
                               np.moveaxis(np.asarray(h), -1, 1).reshape(6, -1).T,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(usermodel.predict(loaded.model, loaded.variables, images,
                                                 batch_size=4),
                               model.apply(variables, x), rtol=1e-5, atol=1e-6)


def test_function_adapter_params_restore_from_orbax(user_module, tmp_path):
    rng = np.random.default_rng(2)
    params = {"w": rng.random((1, 4), np.float32), "v": rng.random((4, 10), np.float32)}
    usermodel.save_orbax(params, tmp_path / "fn")
    loaded = usermodel.load("usernets_lib:build_function", tmp_path / "fn", num_classes=10)
    assert loaded.kind == "function"
    assert _same(loaded.model.params, params)


def test_mismatched_trees_name_the_first_key(user_module, tmp_path):
    usermodel.save_orbax(user_module.TinyCNN(10, 1), tmp_path / "ten")
    with pytest.raises(ValueError) as err:
        usermodel.load_orbax(user_module.TinyCNN(5, 1), tmp_path / "ten")
    assert str(err.value) == (
        f"checkpoint: the state in {str(tmp_path / 'ten')!r} does not match the model: "
        "'fc.bias' has shape (10,) in the checkpoint but (5,) in the model")
    # Keys in the model's state order (NNX sorts attributes by name).
    with pytest.raises(ValueError, match=r"'fc\.bias' is in the model but not in the "
                                         r"checkpoint"):
        usermodel.load_orbax(user_module.TinyCNN(10, 1), _linen_checkpoint(user_module, tmp_path))


def _linen_checkpoint(user_module, tmp_path):
    model = user_module.LinenNet(10)
    return usermodel.save_orbax(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))),
                                tmp_path / "linen_for_nnx")


def test_not_an_orbax_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"is not an orbax checkpoint \(no "
                                         r"_METADATA or manifest.ocdbt"):
        usermodel.load_orbax(nn.Dense(3), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint: no such directory"):
        usermodel.load_orbax(nn.Dense(3), tmp_path / "missing")
    assert not usermodel.is_orbax_checkpoint(tmp_path / "empty")


def test_builder_receives_the_keywords_it_names(user_module):
    model = usermodel.build(user_module.build, num_classes=3, input_shape=(32, 32, 1))
    assert model.fc.out_features == 3 and model.layer1.conv.in_features == 1
    linen = usermodel.build(user_module.build_linen, num_classes=4, input_shape=(8, 8, 1))
    assert linen.num_classes == 4
    assert usermodel.build(user_module.build_any, num_classes=2,
                           input_shape=(8, 8, 1)).fc.out_features == 2
    assert usermodel.model_kind(model) == "nnx" and usermodel.model_kind(linen) == "linen"


@pytest.mark.parametrize("spec, message", [
    ("usernets_lib", ("model_module: expected MODULE:BUILDER, e.g. mypkg.models:build, "
                      "got 'usernets_lib'")),
    ("no_such_pkg.models:build", ("model_module: cannot import no_such_pkg.models (no module "
                                  "named 'no_such_pkg'); run from the folder that holds it "
                                  "or add that folder to PYTHONPATH")),
    ("usernets_lib:missing", "model_module: module usernets_lib has no attribute 'missing'"),
    ("usernets_lib:not_callable", ("model_module: usernets_lib:not_callable is not callable "
                                   "(type int); expected a function that returns the "
                                   "network")),
])
def test_import_errors(user_module, spec, message):
    with pytest.raises(ValueError) as err:
        usermodel.import_builder(spec)
    assert str(err.value) == message


def test_builder_errors(user_module):
    with pytest.raises(ValueError) as err:
        usermodel.load("usernets_lib:broken", None)
    assert str(err.value) == ("model_module: usernets_lib:broken() raised RuntimeError: "
                              "no weights here")
    with pytest.raises(ValueError) as err:
        usermodel.load("usernets_lib:wrong", None)
    assert str(err.value) == ("model_module: usernets_lib:wrong returned an object of type "
                              "int; expected a flax.nnx.Module, a flax.linen.Module or "
                              "jaxcnmf.probe.from_function(...)")
    with pytest.raises(ValueError, match="returned a flax.linen.Module, whose variables live "
                                         "outside it; pass --checkpoint DIR"):
        usermodel.load("usernets_lib:build_linen", None, num_classes=10)
