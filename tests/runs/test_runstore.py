"""``jaxcnmf analyze --store``: probe into a store, fit by streaming, analyses and report from
it; a rerun reuses the store, an interrupted one resumes it, another run's is refused."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import optax
import pytest
from test_report import _error_line

import jaxcnmf
from jaxcnmf.nets import data, models, probe, train
from jaxcnmf.runs import cli, figures, pipeline, runstore
from jaxcnmf.solver import store

# A small analysis: 50 digits, the pool layer and the gray pixels, 2 blocks of 25 images.
ANALYZE = ["--layers", "pool", "--per-class", "5", "--rank", "3", "--max-iter", "20",
           "--fidelity-ranks", "3", "--batch-size", "16", "--store-block-size", "25",
           "--fidelity-images", "30"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained SmallCNN for the digits, saved as ``jaxcnmf train`` would (no training:
    the store's plumbing does not need a good network)."""
    model = models.small_cnn(10, width=0.25)
    state = train.create_train_state(model, jax.random.key(0), (32, 32, 1), optax.sgd(0.1))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    return train.save_checkpoint(path, model, state, epoch=0, key=jax.random.key(0),
                                 meta={"input_shape": [32, 32, 1], "dataset": "digits/train"})


@pytest.fixture(scope="module")
def stored_run(checkpoint, tmp_path_factory):
    """``jaxcnmf analyze --store`` end to end (figures built but not rendered: the report's
    text is what these tests read)."""
    base = tmp_path_factory.mktemp("stored")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "save_figure", _placeholder_figure)
        assert cli.main(["analyze", "--checkpoint", str(checkpoint), *ANALYZE,
                         "--store", str(base / "acts"), "--out", str(base / "run"),
                         "--quiet"]) == 0
    return base


def _placeholder_figure(fig, path, dpi=110):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.clear()
    path.write_bytes(b"\x89PNG placeholder")
    return path


def test_analyze_from_a_store_finds_the_in_memory_concepts(stored_run, checkpoint):
    run_dir, acts = stored_run / "run", stored_run / "acts"
    saved = pipeline.load_run(run_dir)
    record = saved.record
    assert record["status"] == "complete" and (run_dir / "COMPLETE").is_file()
    assert record["config"]["store"] == str(acts)
    assert record["store"] == {"path": str(acts.resolve()), "bytes": runstore.disk_bytes(acts),
                               "blocks": 2, "block_size": 25, "images": 50,
                               "dtype": "float32", "state": "written"}
    assert record["views"] == {"gray": [1024, 50], "pool": [record["views"]["pool"][0], 50]}
    assert saved.result.config["store"] == str(acts)
    # Every analysis ran from the store; fidelity on the asked subset.
    analysis = saved.network
    assert analysis["kmeans"]["k"] == 3 and len(analysis["kmeans"]["assignment"]) == 50
    assert analysis["without_pixels"]["n_iter"] >= 1
    assert analysis["fidelity_images"] == 30 and len(analysis["fidelity"]) == 1
    assert analysis["fidelity"][0]["n_images"] == 30 and analysis["fidelity"][0]["n_total"] == 50
    page = (run_dir / "report.html").read_text().replace("<wbr>", "")  # paths may break after a slash
    assert f"the fit streamed from {acts.resolve()}" in page and "2 blocks of 25 images" in page
    assert "Fidelity on 30 of 50 images" in page

    # The same fit in memory, from the views collect() gives for the saved probe images.
    ckpt = train.load_checkpoint(checkpoint)
    views = probe.collect(ckpt.model, ckpt.variables, saved.images, ["pool"], pixels="rgb",
                          batch_size=16, progress=False)
    config = pipeline.RunConfig(checkpoint=str(checkpoint), layers=("pool",), rank=3,
                                max_iter=20, seed=0)
    with pytest.warns(jaxcnmf.ConvergenceWarning):  # 20 iterations, as the run had
        in_memory = jaxcnmf.fit(views, 3, progress=False,
                                **pipeline._fit_settings(config, None, views))
    assert saved.result.n_iter == in_memory.n_iter
    scale = float(np.abs(in_memory.F).max())
    np.testing.assert_allclose(saved.result.F, in_memory.F, atol=1e-3 * scale)
    for name in views:
        np.testing.assert_allclose(saved.result.relative_errors[name],
                                   in_memory.relative_errors[name], rtol=1e-3)


def test_a_rerun_reuses_the_complete_store(stored_run, checkpoint, tmp_path, monkeypatch,
                                          capsys):
    acts = stored_run / "acts"
    before = {path: path.stat().st_mtime_ns for path in acts.rglob("*")}

    def no_probing(*args, **kwargs):
        raise AssertionError("probe.collect ran although the store was complete")

    def stop(views, config, probe_set, progress):
        assert isinstance(views, store.Store) and views.views == ("gray", "pool")
        raise ValueError("stopped after the probe stage")

    monkeypatch.setattr(probe, "collect", no_probing)
    monkeypatch.setattr(pipeline, "_factorize", stop)
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--checkpoint", str(checkpoint), *ANALYZE, "--store", str(acts),
                  "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"store: reusing the complete store {acts} of this checkpoint" in err
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["store"]["state"] == "reused" and record["probe_accuracy"] >= 0
    assert before == {path: path.stat().st_mtime_ns for path in acts.rglob("*")}


def test_a_store_of_other_layers_or_dtype_is_refused_in_one_line(stored_run, checkpoint,
                                                                 tmp_path, capsys):
    acts, out = stored_run / "acts", tmp_path / "run"
    argv = ["analyze", "--checkpoint", str(checkpoint), "--per-class", "5", "--rank", "3",
            "--batch-size", "16", "--store", str(acts), "--out", str(out), "--quiet"]
    line = _error_line(capsys, [*argv, "--layers", "conv3,pool"])
    assert line == (f"jaxcnmf: error: store: {acts} was written from layers pool; this run "
                    "has layers conv3, pool (choose another --store directory, or delete "
                    "that one)")
    line = _error_line(capsys, [*argv, "--layers", "pool", "--pixels", "none"])
    assert "was written from pixel views rgb; this run has pixel views none" in line
    line = _error_line(capsys, [*argv, "--layers", "pool", "--store-dtype", "bfloat16"])
    assert line == (f"jaxcnmf: error: store: {acts} holds float32 values; this run asks for "
                    "bfloat16 (pass --store-dtype float32, or choose another --store "
                    "directory)")
    assert not out.exists()  # refused before the run directory is made


def test_an_interrupted_store_resumes_at_its_first_missing_block(checkpoint, tmp_path,
                                                                monkeypatch):
    # The store inside the run directory: rerunning with force redoes the run, not the store.
    out = tmp_path / "run"
    acts = out / "acts"
    config = pipeline.RunConfig(checkpoint=str(checkpoint), layers=("pool",), per_class=5,
                                rank=3, batch_size=16, store=str(acts), store_block_size=16)
    original, written = store.Writer.write_block, []

    def interrupted(self, i, arrays):
        if i == 2:
            raise KeyboardInterrupt
        original(self, i, arrays)

    monkeypatch.setattr(store.Writer, "write_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, out, progress=False)
    assert not any("acts" in f for f in json.loads((out / "run.json").read_text())["files"])
    with pytest.raises(store.StoreError, match="2 of 4 blocks written, first missing block 2"):
        store.open(acts)

    def counted(self, i, arrays):
        written.append(i)
        original(self, i, arrays)

    def stop(views, config, probe_set, progress):
        raise RuntimeError("stopped after the probe stage")

    monkeypatch.setattr(store.Writer, "write_block", counted)
    monkeypatch.setattr(pipeline, "_factorize", stop)
    with pytest.raises(ValueError, match=r"started with block size 16; this run has "
                                         r"--store-block-size 8 \(resume with "):
        pipeline.run(dataclasses.replace(config, store_block_size=8), out, force=True,
                     progress=False)
    assert written == []
    # Resumed with another batch size and the store's own block size (none given).
    resumed_config = dataclasses.replace(config, batch_size=8, store_block_size=None)
    with pytest.raises(RuntimeError, match="stopped after the probe stage"):
        pipeline.run(resumed_config, out, force=True, progress=False)
    assert written == [2, 3]
    record = json.loads((out / "run.json").read_text())
    assert record["store"]["state"] == "resumed"
    # The resumed store holds what one uninterrupted probe gives.
    ckpt = train.load_checkpoint(checkpoint)
    probe_set = data.balanced_subset(data.load("digits").test, 5, seed=0)
    expected = probe.collect(ckpt.model, ckpt.variables, probe_set.images, ["pool", "fc"],
                             pixels="rgb", batch_size=16, progress=False, allow_negative=True)
    resumed = store.open(acts)
    for name, X in resumed.read_all().items():
        np.testing.assert_allclose(X, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(resumed.labels, probe_set.labels)


def test_plan_names_the_difference(tmp_path):
    identity = {"checkpoint": "/c", "weights_sha256": "a" * 64, "probed_layers": ["pool"],
                "pooling": "flatten", "pixel_views": "rgb", "dataset": "digits",
                "split": "test", "per_class": 5, "seed": 0}
    path = tmp_path / "acts"
    assert runstore.plan(path, identity, dtype="float32") == ("new", 0, 0, None)
    assert runstore.plan(path, identity, dtype="float32", block_size=8).block_size == 8
    writer = store.Writer(path, {"pool": 4}, 40, block_size=16,
                          provenance={**identity, "batch_size": 16})
    writer.write_block(0, {"pool": np.ones((4, 16))})
    for asked in (None, 16):  # resumed with the store's own block size
        assert runstore.plan(path, identity, dtype="float32", block_size=asked) \
            == ("resume", 1, 3, 16)
    with pytest.raises(ValueError) as err:
        runstore.plan(path, identity, dtype="float32", block_size=32)
    assert str(err.value) == (f"store: {path} is unfinished and was started with block size "
                              "16; this run has --store-block-size 32 (resume with "
                              "--store-block-size 16 or without it, or choose another "
                              "--store directory)")
    for field, value, words in (
            ("weights_sha256", "b" * 64, ("network weights with SHA-256 aaaaaaaaaaaa; this "
                                         "run has network weights with SHA-256 bbbbbbbbbbbb")),
            ("seed", 1, "seed 0; this run has seed 1"),
            ("checkpoint", "/d", "checkpoint /c; this run has checkpoint /d")):
        with pytest.raises(ValueError, match=f"was written from {words}"):
            runstore.plan(path, {**identity, field: value}, dtype="float32")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no manifest.json"):
        runstore.plan(tmp_path / "other", identity, dtype="float32")


@pytest.mark.parametrize("changes, message", [
    ({"group_lam_fraction": 0.1, "groups": "superclass"}, (
        "store: the fit streamed from a store has the group penalty only when no group's "
        "images straddle two blocks, and the probe set is ordered by class, so a "
        "superclass's classes are not contiguous; use --groups class, or fit in memory "
        "without --store")),
    ({"restarts": 2}, ("restarts: the fit streamed from a store runs one start; expected 1, "
                      "got 2")),
    ({"store_dtype": "float16"}, "store_dtype: expected one of float32, bfloat16"),
    ({"store_block_size": 0}, "store_block_size: expected a positive integer or None, got 0"),
])
def test_what_a_store_cannot_do_is_refused_before_any_work(changes, message, tmp_path):
    config = pipeline.RunConfig(store=str(tmp_path / "acts"), **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipeline._check_store_config(config)


def test_store_options_need_store(capsys):
    line = _error_line(capsys, ["analyze", "--checkpoint", "c", "--out", "o",
                                "--store-dtype", "bfloat16"])
    assert line == "jaxcnmf: error: --store-dtype needs --store"
    line = _error_line(capsys, ["analyze", "--checkpoint", "c", "--out", "o",
                                "--store-block-size", "64"])
    assert line == "jaxcnmf: error: --store-block-size needs --store"


def test_tcav_from_a_store_draws_classes_and_random_sets_from_the_subset(monkeypatch):
    from jaxcnmf.concepts import tcav

    labels = np.arange(60) % 3
    images = np.arange(60, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1),
                                                                         np.uint8)
    config = pipeline.RunConfig(store="acts", fidelity_images=24, seed=0)
    pool = pipeline._analysis_subset(config, labels)
    assert len(pool) == 24 and np.all(np.diff(pool) > 0)
    assert pipeline._analysis_subset(config.to_json(), labels).tolist() == pool.tolist()
    assert pipeline._analysis_subset(pipeline.RunConfig(fidelity_images=24), labels) is None
    F = np.zeros((2, 60))
    F[0, 50:55], F[1, 3:8] = 1.0, 1.0  # the concepts' top images lie outside the subset too
    seen = {}

    def fake_run(model, variables, layers, concepts, classes, **kwargs):
        seen.update(concepts=concepts, classes=classes, pool=kwargs["pool"])
        raise RuntimeError("stop")

    monkeypatch.setattr(tcav, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop"):
        pipeline._tcav_step(pipeline.TcavConfig(top=5), ("pool",), None, None, F, images,
                            labels, ("a", "b", "c"), Path("."), False, pool=pool)
    assert sorted(seen["concepts"]["concept0"][:, 0, 0, 0].tolist()) == [50, 51, 52, 53, 54]
    np.testing.assert_array_equal(seen["pool"][:, 0, 0, 0], pool)
    np.testing.assert_array_equal(seen["classes"]["b"][:, 0, 0, 0], pool[labels[pool] == 1])


def test_scan_gives_predictions_and_norms_in_one_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    views = {"gray": rng.random((6, 11)), "pool": rng.random((4, 11)),
             "fc": rng.normal(size=(3, 11))}
    s = store.save(tmp_path / "acts", views, block_size=4)
    predicted, norms = runstore.scan(s, "fc")
    np.testing.assert_array_equal(predicted, views["fc"].argmax(axis=0))
    layers = runstore.select(s, ["pool"])
    assert layers.views == ("pool",) and layers.n_blocks == 3
    np.testing.assert_allclose(layers.read_all()["pool"], views["pool"].astype(np.float32))
    monkeypatch.setattr(runstore, "scan", None)  # the norms are known: no second pass
    for name in ("gray", "pool"):
        expected = float(np.sum(views[name].astype(np.float32).astype(np.float64) ** 2))
        assert norms[name] == pytest.approx(expected, rel=1e-12)
        assert runstore.sq_norms(runstore.select(s, [name])) == {name: norms[name]}


def test_analyze_from_a_store_with_the_group_penalty_on_classes(stored_run, checkpoint,
                                                                tmp_path, monkeypatch, capsys):
    # The store of 10 classes of 5 digits in blocks of 25 is reused: no class straddles two.
    acts, out = stored_run / "acts", tmp_path / "run"
    argv = ["analyze", "--checkpoint", str(checkpoint), *ANALYZE, "--group-sparse", "0.1",
            "--store", str(acts), "--no-baseline", "--quiet"]
    monkeypatch.setattr(figures, "save_figure", _placeholder_figure)
    assert cli.main([*argv, "--out", str(out)]) == 0
    saved = pipeline.load_run(out)
    record = saved.record
    assert record["status"] == "complete" and record["store"]["block_size"] == 25
    page = (out / "report.html").read_text()
    assert "0.1 of lambda_max (group_lam " in page and " over class" in page

    # The same group fit in memory: the same penalty, the same class-concept pairs zeroed.
    ckpt = train.load_checkpoint(checkpoint)
    views = probe.collect(ckpt.model, ckpt.variables, saved.images, ["pool"], pixels="rgb",
                          batch_size=16, progress=False)
    config = pipeline.RunConfig(checkpoint=str(checkpoint), layers=("pool",), rank=3,
                                max_iter=20, seed=0, group_lam_fraction=0.1)
    with pytest.warns(jaxcnmf.ConvergenceWarning):
        in_memory = jaxcnmf.fit(views, 3, progress=False, **pipeline._fit_settings(
            config, SimpleNamespace(labels=saved.labels), views))
    group_lam = record["factorization"]["group_lam"]
    assert group_lam > 0
    assert group_lam == pytest.approx(in_memory.config["group_lam"], rel=1e-4)
    # Without the penalty F moves by 15% of its largest entry; the streamed group lasso
    # sums in another order, which moves it by about 0.2% after 20 iterations.
    scale = float(np.abs(in_memory.F).max())
    np.testing.assert_allclose(saved.result.F, in_memory.F, atol=5e-3 * scale)
    zeroed = [np.linalg.norm(F.reshape(3, 10, 5), axis=2) == 0
              for F in (saved.result.F, in_memory.F)]
    assert zeroed[1].any()
    np.testing.assert_array_equal(*zeroed)

    # The default block size holds whole classes, of the rows of all views collect() writes.
    rows = pipeline._store_rows(config, ckpt.model, ckpt.variables, ("pool",), "rgb",
                                (32, 32, 1))
    assert rows == sum(store.open(acts).rows.values())
    assert [pipeline._class_block_size(d, 5) for d in (4080, 53, 50, 3)] == [4080, 50, 50, 5]

    # A store whose blocks are not whole classes, or such a block size, is refused first.
    monkeypatch.setattr(probe, "collect", None)
    monkeypatch.setattr(runstore, "plan", lambda *args, **kwargs: runstore.Plan(
        "reuse", 4, 4, 16))
    argv = [*argv, "--out", str(tmp_path / "refused")]
    line = _error_line(capsys, argv)
    assert line == (f"jaxcnmf: error: store: {acts} has blocks of 16 images, not a multiple "
                    "of the 5 images per class, so classes straddle blocks and the group "
                    "penalty cannot stream from it (choose another --store directory)")
    line = _error_line(capsys, [*argv, "--store-block-size", "12"])
    assert line == ("jaxcnmf: error: store: the group penalty from a store needs whole "
                    "classes in every block, and --store-block-size 12 is not a multiple of "
                    "the 5 images per class (pass --store-block-size 10, or leave it out)")
    assert not (tmp_path / "refused").exists()


def test_the_group_penalty_from_a_store_needs_runs_of_whole_classes(monkeypatch):
    config = pipeline.RunConfig(store="acts", group_lam_fraction=0.1, store_block_size=4)
    assert pipeline._store_class_size(config, [0, 0, 1, 1, 2, 2]) == 2
    assert pipeline._store_class_size(dataclasses.replace(config, store=None), [0, 1]) is None
    with pytest.raises(ValueError) as err:
        pipeline._store_class_size(config, [0, 0, 1, 1, 0, 0])
    assert str(err.value) == (
        "store: the group penalty from a store needs each class's probe images together, and "
        "this probe set has classes split between other classes' images (pass --per-class N "
        "for a probe set ordered by class, or fit in memory without --store)")
    with pytest.raises(ValueError, match=r"needs as many probe images in every class, and "
                                         r"this probe set has 2 to 3 \(pass --per-class N"):
        pipeline._store_class_size(config, [0, 0, 1, 1, 1])
    # Over 4 devices, 12 images give 3 each: not whole classes of 2.
    monkeypatch.setattr(pipeline, "_mesh", lambda config: SimpleNamespace(size=4))
    with pytest.raises(ValueError) as err:
        pipeline._store_class_size(config, np.repeat(np.arange(6), 2))
    assert str(err.value) == (
        "store: the group penalty from a store needs whole classes on every device, and 4 "
        "devices get ceil(12 / 4) = 3 probe images each, not a multiple of the 2 images per "
        "class (choose --devices so that it is, or fit in memory without --store)")
    assert pipeline._store_class_size(config, np.repeat(np.arange(4), 2)) == 2
