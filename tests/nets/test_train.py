"""Tests for jaxcnmf.train: learning, checkpoints, resume, rebuild, augmentation, errors.

Tiny models (width 0.125) on a few hundred digits keep the whole file to seconds of CPU.
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf.nets import data, models, train

EPOCHS = 3
SETTINGS = dict(batch_size=32, lr=0.05, flip=False, seed=3, progress=False)


def tiny(num_classes=10):
    return models.small_cnn(num_classes, width=0.125)


@pytest.fixture(scope="module")
def digits():
    splits = data.load("digits", progress=False)
    return splits.train.subset(np.arange(192)), splits.test.subset(np.arange(100))


@pytest.fixture(scope="module")
def straight(digits, tmp_path_factory):
    """An uninterrupted run with a checkpoint, shared by the round-trip tests."""
    train_ds, test_ds = digits
    ckpt = tmp_path_factory.mktemp("straight") / "ckpt"
    result = train.fit(tiny(), train_ds, epochs=EPOCHS, eval_ds=test_ds, checkpoint_dir=ckpt,
                       meta={"note": "test"}, **SETTINGS)
    return result, ckpt


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_training_lowers_the_loss_on_digits(straight):
    result, _ = straight
    loss = result.history["train_loss"]
    assert len(loss) == EPOCHS and np.all(np.isfinite(loss))
    assert loss[-1] < loss[0] - 0.1
    assert result.state.step == EPOCHS * (192 // 32)


def test_history_and_meta_record_the_run(straight, digits):
    result, ckpt = straight
    h = result.history
    assert h["epoch"] == list(range(1, EPOCHS + 1)) and len(h["eval_acc"]) == EPOCHS
    assert result.accuracy == h["eval_acc"][-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["model"] == models.spec(tiny())
    assert meta["model_name"] == "small" and meta["width"] == 0.125 and meta["num_classes"] == 10
    assert meta["dataset"] == digits[0].name
    assert meta["class_names"] == list(digits[0].class_names)
    assert meta["superclass_names"] is None
    assert meta["accuracy"] == result.accuracy and meta["epochs"] == EPOCHS
    assert meta["history"] == json.loads(json.dumps(h))
    assert meta["note"] == "test" and meta["config"]["batch_size"] == 32


def test_checkpoint_rebuilds_model_with_identical_logits(straight, digits):
    result, ckpt = straight
    loaded = train.load_checkpoint(ckpt)
    assert loaded.model == result.model
    assert_trees_equal(loaded.variables, result.variables)
    images = digits[1].images
    np.testing.assert_array_equal(
        train.predict(loaded.model, loaded.variables, images),
        train.predict(result.model, result.variables, images),
    )
    assert train.evaluate(loaded.model, loaded.variables, digits[1]) == result.accuracy


@pytest.mark.parametrize("half_swapped", [False, True])
def test_resume_after_interruption_equals_straight_run(straight, digits, tmp_path, monkeypatch,
                                                       half_swapped):
    result, _ = straight
    train_ds, test_ds = digits
    ckpt = tmp_path / "ckpt"
    save = train.save_checkpoint
    run_epoch = train.run_epoch
    epochs_run = []

    def counted(*args, **kwargs):
        epochs_run.append(args[2])
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "run_epoch", counted)

    def save_then_crash(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.fit(tiny(), train_ds, epochs=EPOCHS, eval_ds=test_ds, checkpoint_dir=ckpt,
                  meta={"note": "test"}, **SETTINGS)
    assert json.loads((ckpt / "meta.json").read_text())["epochs"] == 1
    if half_swapped:
        # A crash between the two renames of the replacement leaves only ckpt.old.
        ckpt.rename(tmp_path / "ckpt.old")
    monkeypatch.setattr(train, "save_checkpoint", save)
    resumed = train.fit(tiny(), train_ds, epochs=EPOCHS, eval_ds=test_ds, checkpoint_dir=ckpt,
                        meta={"note": "test"}, **SETTINGS)
    assert epochs_run == [1, *range(2, EPOCHS + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_trees_equal(resumed.variables, result.variables)
    assert_trees_equal(resumed.state.opt_state, result.state.opt_state)
    assert resumed.history["train_loss"] == result.history["train_loss"]
    assert resumed.history["eval_acc"] == result.history["eval_acc"]


def test_finished_checkpoint_is_returned_without_training(straight, digits, monkeypatch):
    result, ckpt = straight
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run should not train again")

    monkeypatch.setattr(train, "run_epoch", no_training)
    again = train.fit(tiny(), digits[0], epochs=EPOCHS, eval_ds=digits[1], checkpoint_dir=ckpt,
                      meta={"note": "test"}, **SETTINGS)
    assert_trees_equal(again.variables, result.variables)
    assert again.history == json.loads(json.dumps(result.history))


def test_resuming_a_different_run_is_refused(straight, digits):
    _, ckpt = straight
    settings = dict(SETTINGS, lr=0.1)
    with pytest.raises(ValueError, match="holds a different run.*config"):
        train.fit(tiny(), digits[0], epochs=EPOCHS, checkpoint_dir=ckpt, **settings)


def test_checkpoint_replaced_atomically_leaves_no_temporaries(straight):
    _, ckpt = straight
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "state.msgpack"]


def test_half_swapped_checkpoint_is_still_found(straight, tmp_path):
    _, ckpt = straight
    old = tmp_path / "ckpt.old"
    old.mkdir()
    for f in ckpt.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    assert train.load_checkpoint(tmp_path / "ckpt").path == old


def test_augment_crops_are_windows_of_the_padded_image():
    images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 2))
    out = np.asarray(train.augment_batch(jax.random.key(1), images, padding=2, flip=False))
    padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for i in range(16):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if np.array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 8])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 4


def test_augment_flips_some_images_and_keeps_the_rest():
    images = jax.random.uniform(jax.random.key(0), (32, 8, 8, 1))
    out = np.asarray(train.augment_batch(jax.random.key(2), images, padding=0, flip=True))
    same = [np.array_equal(o, x) for o, x in zip(out, np.asarray(images))]
    mirrored = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, np.asarray(images))]
    assert all(s != m for s, m in zip(same, mirrored))
    assert 4 < sum(mirrored) < 28
    unchanged = train.augment_batch(jax.random.key(2), images, padding=0, flip=False)
    np.testing.assert_array_equal(unchanged, images)


def test_weight_decay_reaches_kernels_only():
    config = train.TrainConfig(epochs=1, weight_decay=0.1, momentum=0.0, nesterov=False,
                               schedule="constant", lr=1.0)
    tx = train.make_optimizer(config, steps_per_epoch=10)
    state = train.create_train_state(tiny(), jax.random.key(0), (32, 32, 1), tx)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    updates, _ = tx.update(zeros, state.opt_state, state.params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = path[-1].key
        p = state.params
        for k in path:
            p = p[k.key]
        if name == "kernel":
            np.testing.assert_allclose(u, -0.1 * p, rtol=1e-6)
        else:
            assert name in ("bias", "scale") and not np.any(u)


@pytest.mark.parametrize("schedule", train.SCHEDULES)
def test_schedules_peak_at_lr(schedule):
    config = train.TrainConfig(epochs=4, lr=0.2, schedule=schedule,
                               warmup=0.25 if schedule == "onecycle" else 0.0)
    lrs = np.array([float(train.make_schedule(config, 25)(t)) for t in range(100)])
    assert lrs.max() == pytest.approx(0.2, rel=1e-3)
    if schedule == "onecycle":
        assert np.argmax(lrs) == 25 and lrs[0] < 0.02 and lrs[-1] < 1e-3
    elif schedule == "cosine":
        assert lrs[0] == pytest.approx(0.2) and lrs[-1] < 1e-3 and np.all(np.diff(lrs) <= 0)


def test_predict_pads_the_last_batch(straight, digits):
    result, _ = straight
    images = digits[1].images[:23]
    whole = train.predict(result.model, result.variables, images, batch_size=23)
    batched = train.predict(result.model, result.variables, images, batch_size=8)
    assert batched.shape == (23, 10) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-5)
    floats = train.predict(result.model, result.variables, data.to_float(images), batch_size=23)
    np.testing.assert_allclose(floats, whole, rtol=1e-5, atol=1e-5)


def test_experiment_script_writes_checkpoint_and_summary(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "experiments"))
    sys.modules.pop("train", None)
    import train as script

    out = tmp_path / "run"
    # The settings of SETTINGS, so that the step compiled for the other tests is reused.
    summary = script.main(["--data", "digits", "--width", "0.125", "--epochs", str(EPOCHS),
                           "--batch-size", "32", "--lr", "0.05", "--seed", "3",
                           "--max-train", "192", "--max-eval", "100",
                           "--out", str(out), "--no-progress"])
    sys.modules.pop("train", None)
    written = json.loads((out / "summary.json").read_text())
    assert written["epochs"] == summary["epochs"] == EPOCHS and written["train_images"] == 192
    assert written["eval_images"] == 100 and 0 <= written["accuracy"] <= 1
    assert written["images_per_second"] > 0
    assert train.load_checkpoint(out / "ckpt").meta["config"]["flip"] is False


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "epochs: expected an integer >= 1, got 0"),
        (dict(epochs=1.5), "epochs: expected an integer >= 1"),
        (dict(epochs=1, lr=0), "lr: expected a finite number > 0, got 0"),
        (dict(epochs=1, lr=float("inf")), "lr: expected a finite number > 0, got inf"),
        (dict(epochs=1, lr=float("nan")), "lr: expected a finite number > 0, got nan"),
        (dict(epochs=1, weight_decay=float("inf")), "weight_decay: expected a finite number >= 0"),
        (dict(epochs=1, schedule="linear"), "schedule: expected one of"),
        (dict(epochs=1, warmup=1.0), "warmup: expected a fraction"),
        (dict(epochs=1, momentum=1.0), "momentum: expected a number in"),
        (dict(epochs=1, lr="fast"), "lr: expected a number, got 'fast'"),
        (dict(epochs=1, weight_decay=None), "weight_decay: expected a number, got None"),
        (dict(epochs=1, batch_size=500), "batch_size: expected at most the 192 training images"),
    ],
)
def test_bad_settings_are_named(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train.fit(tiny(), digits[0], progress=False, **kwargs)


def test_class_count_mismatch_is_reported(digits):
    with pytest.raises(ValueError, match="model has 5 outputs but the dataset .* has 10 classes"):
        train.fit(tiny(5), digits[0], epochs=1, progress=False)
    first = digits[0].subset(np.flatnonzero(digits[0].labels < 5))
    five = data.Dataset(first.images, first.labels, first.class_names[:5], name="five")
    with pytest.raises(ValueError, match="eval_ds: the model has 5 outputs .* has 10 classes"):
        train.fit(tiny(5), five, epochs=1, eval_ds=digits[1], progress=False)


def test_empty_and_malformed_datasets_are_refused(digits):
    empty = digits[0].subset(np.array([], np.int64))
    with pytest.raises(ValueError, match="train_ds: expected at least one image"):
        train.fit(tiny(), empty, epochs=1, progress=False)
    with pytest.raises(TypeError, match="train_ds: expected a jaxcnmf.data.Dataset"):
        train.fit(tiny(), digits[0].images, epochs=1, progress=False)
    rgb = digits[1].subset(np.arange(10))
    rgb = type(rgb)(np.repeat(rgb.images, 3, axis=-1), rgb.labels, rgb.class_names)
    with pytest.raises(ValueError, match=r"eval_ds.images: expected images of shape \(32, 32, 1\)"):
        train.fit(tiny(), digits[0], epochs=1, eval_ds=rgb, progress=False)


def test_missing_and_foreign_checkpoints(tmp_path, digits):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        train.load_checkpoint(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileNotFoundError, match="not a jaxcnmf checkpoint .missing meta.json"):
        train.load_checkpoint(tmp_path / "other")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        train.fit(tiny(), digits[0], epochs=1, checkpoint_dir=tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_checkpoints_are_reported(straight, tmp_path):
    _, ckpt = straight
    truncated = copy_checkpoint(ckpt, tmp_path / "truncated")
    state = truncated / "state.msgpack"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ValueError, match="state.msgpack' does not match the state_sha256"):
        train.load_checkpoint(truncated)
    # A version-1 checkpoint has no checksum: msgpack itself finds the truncation.
    meta = json.loads((truncated / "meta.json").read_text())
    del meta["state_sha256"]
    meta["version"] = 1
    (truncated / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="state.msgpack' is corrupt or truncated"):
        train.load_checkpoint(truncated)

    bad_meta = copy_checkpoint(ckpt, tmp_path / "bad_meta")
    (bad_meta / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json' is corrupt"):
        train.load_checkpoint(bad_meta)

    wrong_model = copy_checkpoint(ckpt, tmp_path / "wrong_model")
    meta = json.loads((wrong_model / "meta.json").read_text())
    meta["model"]["width"] = 0.25
    (wrong_model / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the model"):
        train.load_checkpoint(wrong_model)


def test_checkpoints_need_a_model_of_jaxcnmf_models(digits, tmp_path):
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    with pytest.raises(ValueError, match="checkpoint_dir: .*jaxcnmf.models"):
        train.fit(Linear(), digits[0], epochs=1, checkpoint_dir=tmp_path / "c", progress=False)


# --------------------------------------------------------------------------- hostile inputs


def _rewrite_state(ckpt: Path, change) -> None:
    """Apply ``change`` to the restored state dict and write it back with a valid checksum."""
    import hashlib

    from flax import serialization

    raw = serialization.msgpack_restore((ckpt / "state.msgpack").read_bytes())
    change(raw)
    payload = serialization.msgpack_serialize(raw)
    (ckpt / "state.msgpack").write_bytes(payload)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["state_sha256"] = hashlib.sha256(payload).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_flipped_bit_and_nonfinite_weights_are_refused_on_load(straight, tmp_path):
    _, ckpt = straight
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["version"] == 2 and len(meta["state_sha256"]) == 64

    flipped = copy_checkpoint(ckpt, tmp_path / "flipped")
    raw = bytearray((flipped / "state.msgpack").read_bytes())
    raw[len(raw) // 2] ^= 0x40
    (flipped / "state.msgpack").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"state.msgpack' does not match the state_sha256 recorded in meta.json"):
        train.load_checkpoint(flipped)

    def poison(raw):
        kernel = np.array(raw["state"]["params"]["fc"]["kernel"])
        kernel.flat[0] = np.nan
        raw["state"]["params"]["fc"]["kernel"] = kernel

    nan = copy_checkpoint(ckpt, tmp_path / "nan")
    _rewrite_state(nan, poison)
    with pytest.raises(ValueError, match=r"the weights in '.*state.msgpack' hold NaN or infinity \(in \[\"\['params'\]\['fc'\]\['kernel'\]\"\]\)"):
        train.load_checkpoint(nan)

    unsigned = copy_checkpoint(ckpt, tmp_path / "unsigned")
    meta_file = unsigned / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "state_sha256"}))
    with pytest.raises(ValueError, match=r"meta.json'?: state_sha256: expected the 64 hex digits"):
        train.load_checkpoint(unsigned)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("input_shape", "abc", r"meta.json'?: input_shape: expected \[H, W, C\] of positive integers with C 1 or 3, got 'abc'"),
        ("input_shape", [32, 32], r"input_shape: expected \[H, W, C\].*got \[32, 32\]"),
        ("model", "abc", r"meta.json'?: model: expected a model spec \(an object\), got str 'abc'"),
        ("model", {"name": ["x"]}, r"meta.json'?: model: "),
        ("version", 99, r"meta.json'?: version: expected an integer in \[1, 2\], got 99"),
    ],
)
def test_edited_meta_is_one_error_naming_the_field(straight, tmp_path, field, value, match):
    _, ckpt = straight
    edited = copy_checkpoint(ckpt, tmp_path / "edited")
    meta = json.loads((edited / "meta.json").read_text())
    meta[field] = value
    (edited / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        train.load_checkpoint(edited)


def test_diverged_training_stops_with_an_error_and_keeps_the_last_good_epoch(digits, tmp_path,
                                                                          monkeypatch):
    run_epoch = train.run_epoch

    def diverging(state, *args, **kwargs):
        state, totals, seconds = run_epoch(state, *args, **kwargs)
        if args[1] == 2:  # the epoch number: weights blow up in epoch 2
            params = jax.tree_util.tree_map(lambda x: x * jnp.inf, state.params)
            state = state.replace(params=params)
        return state, totals, seconds

    monkeypatch.setattr(train, "run_epoch", diverging)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(train.TrainingDiverged, match=r"training diverged in epoch 2/3: NaN or infinity in \['params'\].*lr=0.05 is probably too large.*ckpt' still holds epoch 1"):
        train.fit(tiny(), digits[0], epochs=EPOCHS, checkpoint_dir=ckpt, **SETTINGS)
    assert json.loads((ckpt / "meta.json").read_text())["epochs"] == 1
    assert issubclass(train.TrainingDiverged, ValueError)  # the CLI's one-line errors


def test_nonfinite_loss_stops_training(digits, monkeypatch):
    run_epoch = train.run_epoch

    def nan_loss(*args, **kwargs):
        state, totals, seconds = run_epoch(*args, **kwargs)
        return state, dict(totals, loss=float("nan")), seconds

    monkeypatch.setattr(train, "run_epoch", nan_loss)
    with pytest.raises(train.TrainingDiverged, match=r"epoch 1/3: NaN or infinity in the loss \(mean loss nan\).*nothing was saved"):
        train.fit(tiny(), digits[0], epochs=EPOCHS, **SETTINGS)


def test_replacing_a_checkpoint_keeps_the_only_copy_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import os

    old = tmp_path / "ckpt.old"
    old.mkdir()
    (old / "meta.json").write_text("previous")
    replace = os.replace

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(train.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        train._write_dir_atomically(tmp_path / "ckpt", {"meta.json": b"new"})
    assert (old / "meta.json").read_text() == "previous"
    monkeypatch.setattr(train.os, "replace", replace)
    train._write_dir_atomically(tmp_path / "ckpt", {"meta.json": b"new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "meta.json").read_bytes() == b"new"


def test_resume_settings_rebuild_the_run(straight, digits, tmp_path, monkeypatch):
    result, ckpt = straight
    half = tmp_path / "ckpt"
    copy_checkpoint(ckpt, tmp_path / "ckpt.old")
    settings = train.resume_settings(half)
    assert settings["checkpoint"] == tmp_path / "ckpt.old" and settings["epochs_done"] == EPOCHS
    assert settings["model"] == tiny() and settings["dataset"] == digits[0].name
    fit_kwargs = {k: v for k, v in SETTINGS.items() if k != "progress"}
    assert {k: settings["fit"][k] for k in fit_kwargs} == fit_kwargs

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run should not train again")

    monkeypatch.setattr(train, "run_epoch", no_training)
    again = train.fit(settings["model"], digits[0], eval_ds=digits[1], checkpoint_dir=half,
                      meta={"note": "test"}, progress=False, **settings["fit"])
    assert_trees_equal(again.variables, result.variables)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        train.resume_settings(tmp_path / "nowhere")


def test_epoch_compiles_once_with_a_log_line_and_then_reuses_the_step(digits, capsys):
    train_ds = digits[0]
    kwargs = dict(epochs=1, batch_size=32, augment=False, progress=True, seed=5)
    train._COMPILED.clear()
    train.fit(tiny(), train_ds, **kwargs)
    first = "".join(capsys.readouterr())
    train.fit(tiny(), train_ds, **kwargs)
    second = "".join(capsys.readouterr())
    assert "compiling the training step" in first and "compiled in" in first
    # Same model, settings and batch shape: the compiled step is reused, no second compile.
    assert "compiling the training step" not in second
