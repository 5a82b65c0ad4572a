"""The pipeline's front door and run-directory lifecycle: checks before work, failures."""

import json
import os
import signal
import time
import warnings

import numpy as np
import pytest

from jaxcnmf.nets import train
from jaxcnmf.runs import cli, pipeline


def _previous_complete_run(out):
    out.mkdir()
    (out / "report.html").write_text("<html>an earlier, finished report</html>")
    (out / "COMPLETE").write_text("earlier\n")
    (out / "figures").mkdir()
    (out / "figures" / "class_shares.png").write_bytes(b"earlier figure")
    (out / "figures" / "my_own.png").write_bytes(b"the user's")  # never listed by a run
    (out / "run.json").write_text(json.dumps({"status": "complete",
                                              "files": ["figures/class_shares.png"]}))
    for saved in (pipeline.FACTORIZATION, pipeline.PROBE, pipeline.ANALYSIS, pipeline.TCAV,
                  pipeline.TCAV_ARRAYS):
        (out / saved).write_bytes(b"earlier results")


def test_interrupted_run_leaves_no_complete_looking_report(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _previous_complete_run(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C in the middle of the job: after the run directory is set up, during training.
    monkeypatch.setattr(train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(pipeline.demo_config(quick=True), out, force=True, progress=False)
    assert not (out / "report.html").exists()
    assert not (out / "COMPLETE").exists()
    with pytest.raises(FileNotFoundError, match="stopped before"):
        pipeline.load_run(out)  # nothing of the earlier run passes for this one's results
    assert not (out / pipeline.TCAV).exists() and not (out / pipeline.TCAV_ARRAYS).exists()
    # --force removed what the earlier run listed, and nothing of the user's.
    assert not (out / "figures" / "class_shares.png").exists()
    assert (out / "figures" / "my_own.png").read_bytes() == b"the user's"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert record["error"].startswith("KeyboardInterrupt")
    assert "figures/my_own.png" not in record["files"] and "run.json" in record["files"]
    assert "train" not in record["seconds"]  # the stage never finished
    assert not list(out.glob(".*.tmp"))


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch, capsys):
    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        pytest.fail("SIGTERM did not interrupt the run")

    monkeypatch.setattr(train, "fit", terminated)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick", "--out", str(out), "--quiet"])
    assert exit_info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is not cli._interrupt  # restored after main


def test_a_run_into_a_locked_directory_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "demo"
    with pipeline.lock_run_dir(out), pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick", "--out", str(out), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another jaxcnmf run" in err[0], err
    assert not (out / "run.json").exists()


def test_cli_reports_an_interrupted_run_with_status_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet"])
    assert exit_info.value.code == 130
    assert "incomplete" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "COMPLETE").exists()


def test_unknown_layer_fails_before_data_or_training(tmp_path, monkeypatch):
    def must_not_train(*args, **kwargs):
        raise AssertionError("trained before checking the layers")

    monkeypatch.setattr(train, "fit", must_not_train)
    config = pipeline.RunConfig(layers=("conv2", "fc"), per_class=5, rank=3)
    with pytest.raises(ValueError, match="unknown layer 'fc'.*conv1, conv2, conv3, pool"):
        pipeline.run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank": 31}, r"rank: expected 1 <= rank <= 30"),
        ({"fidelity_ranks": (2, 40)}, r"fidelity_ranks: .* got 40"),
        ({"group_lam": 0.1, "groups": "superclass"}, "coarse labels"),
        ({"per_class": 1000}, "per_class"),
        ({"split": "validation"}, "split: expected 'train' or 'test'"),
        ({"layers": ()}, "at least one layer"),
        ({"model": "alexnet"}, "model name"),
        ({"pixels": "grey"}, "pixels: expected True, False or one of auto, rgb, gray, none"),
        ({"group_lam_fraction": 1.5}, r"group_lam_fraction: expected a fraction in \(0, 1\]"),
        ({"group_lam_fraction": 0.1, "group_lam": 2.0}, "either group_lam or"),
    ],
)
def test_bad_settings_fail_before_training(changes, message, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained"))
    config = pipeline.RunConfig(**{"per_class": 3, "rank": 5, **changes})
    with pytest.raises(ValueError, match=message):
        pipeline.run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "tcav, message",
    [
        (pipeline.TcavConfig(top=11), r"top: expected 1 <= top <= 10 \(a third of the 30"),
        (pipeline.TcavConfig(top=5, layers=("conv9",)), "layer: unknown layer 'conv9'"),
        (pipeline.TcavConfig(top=5, classes=("3", "x")), "classes: unknown class 'x'"),
        (pipeline.TcavConfig(random_runs=1), "random_runs: expected an integer >= 2"),
        (pipeline.TcavConfig(alpha=0.0), r"alpha: expected a level in \(0, 1\)"),
    ],
)
def test_bad_tcav_settings_fail_before_training(tcav, message, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained"))
    config = pipeline.RunConfig(per_class=3, rank=5)
    with pytest.raises(ValueError, match=message):
        pipeline.run(config, tmp_path / "run", progress=False, tcav=tcav)
    assert not (tmp_path / "run").exists()


def test_default_tcav_layer_skips_the_last_spatial_layer_when_it_can():
    from jaxcnmf.nets import models

    model = models.small_cnn(10, width=0.25)
    default = pipeline.TcavConfig()

    def layers(probed):
        return pipeline._tcav_layers(model, default, probed, (32, 32, 1))

    # conv3 feeds a linear head (average pool, dense): the layer before it is the default.
    assert layers(("conv2", "conv3", "pool")) == ("conv2",)
    assert layers(("conv1", "conv2", "pool")) == ("conv1",)
    assert layers(("conv3", "pool")) == ("conv3",)
    assert layers(("pool",)) == ("pool",)
    chosen = pipeline.TcavConfig(layers=("conv1", "pool"))
    assert pipeline._tcav_layers(model, chosen, ("conv3",), (32, 32, 1)) == ("conv1", "pool")


def test_config_is_json_ready():
    config = pipeline.demo_config(quick=True)
    restored = json.loads(json.dumps(config.to_json()))
    assert restored["layers"] == list(pipeline.DEMO_LAYERS)
    assert pipeline.RunConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in restored.items()}) == config


def test_analyze_records_no_training_settings_it_never_used():
    trained = pipeline.RunConfig().to_json()
    assert trained["epochs"] == 10 and trained["checkpoint"] is None
    loaded = pipeline.RunConfig(checkpoint="runs/c10/ckpt").to_json()
    assert not set(pipeline.TRAINING_FIELDS) & set(loaded)
    assert loaded["rank"] == 20 and loaded["checkpoint"] == "runs/c10/ckpt"
    users = pipeline.RunConfig(model_module="mypkg.models:build", input_shape=(32, 32, 3))
    assert not set(pipeline.TRAINING_FIELDS) & set(users.to_json()) and not users.trains
    assert users.to_json()["input_shape"] == [32, 32, 3]


def test_defaults_are_the_measured_ones():
    for config in (pipeline.RunConfig(), pipeline.demo_config()):
        assert (config.method, config.max_iter) == ("hals", 500)
    assert cli._DEFAULT_MAX_ITER == pipeline.DEFAULT_MAX_ITER


class _Log:
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_gray_pictures_stored_as_rgb_get_one_gray_view():
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8), 3, axis=-1)
    colour = gray.copy()
    colour[0, 0, 0, 1] ^= 1  # one channel of one pixel differs

    def mode(pixels, images):
        log = _Log()
        return pipeline._pixel_mode(pipeline.RunConfig(pixels=pixels), images, log), log.lines

    chosen, lines = mode("auto", gray)
    assert chosen == "gray" and len(lines) == 1 and "one gray pixel view" in lines[0]
    assert mode("auto", colour) == ("rgb", [])
    assert mode("rgb", gray) == ("rgb", [])
    assert mode(False, gray) == ("none", [])
    assert mode(True, gray[..., :1]) == ("rgb", [])  # one channel: already one view
    assert mode("gray", colour) == ("gray", [])


class _FakeResult:
    def __init__(self):
        self.config = {"group_lam": 0.3, "group_lam_fraction": 0.1}


@pytest.mark.parametrize(
    "changes, expected",
    [({"group_lam_fraction": 0.1}, ("3 of 20 concepts are empty at group_lam_fraction 0.1; "
                                    "try a smaller fraction")),
     ({"group_lam": 2.5}, "3 of 20 concepts are empty at group_lam 2.5; try a smaller value"),
     ({}, None)],
)
def test_dead_concepts_are_counted_and_warned_once(changes, expected, monkeypatch):
    import jaxcnmf
    from jaxcnmf.solver import fit as solver

    def fake_fit(views, rank, **settings):
        if changes:
            warnings.warn("library wording", solver.DeadConceptWarning)
        return _FakeResult()

    live = np.ones(20, bool)
    if changes:
        live[[2, 5, 7]] = False
    monkeypatch.setattr(jaxcnmf, "fit", fake_fit)
    monkeypatch.setattr(solver, "_live_mask", lambda result: live)
    config = pipeline.RunConfig(**changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe_set = type("Probe", (), {"labels": np.zeros(30, int)})()
        _, dead = pipeline._factorize({}, config, probe_set, progress=False)
    assert dead == (3 if changes else 0)
    assert [str(w.message) for w in caught] == ([expected] if expected else [])


def test_devices_setting_builds_a_mesh_and_the_fit_records_it():
    import subprocess
    import sys
    import textwrap

    with pytest.raises(ValueError, match=r"devices: expected an integer from 1 to the \d+ local "
                                         r"device\(s\), got 99"):
        pipeline._mesh(pipeline.RunConfig(devices=99))
    assert pipeline._mesh(pipeline.RunConfig(devices=1)) is None
    script = textwrap.dedent("""
        import numpy as np, jaxcnmf
        from jaxcnmf.runs import pipeline
        mesh = pipeline._mesh(pipeline.RunConfig())
        assert mesh.devices.size == 2 and mesh.axis_names == ("n",), mesh
        rng = np.random.default_rng(0)
        views = {"a": rng.random((6, 2)) @ rng.random((2, 11)), "b": rng.random((5, 11))}
        res = jaxcnmf.fit(views, 2, method="hals", max_iter=20, mesh=mesh, progress=False)
        print(res.devices, res.F.shape)
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:1] == ["2"] and "(2, 11)" in out.stdout


def test_pixel_share_sets_the_pixel_views_part_of_the_objective():
    rng = np.random.default_rng(0)
    views = {"red": rng.random((4, 6)), "green": 3 * rng.random((4, 6)),
             "blue": rng.random((4, 6)), "conv": 10 * rng.random((8, 6)),
             "pool": rng.random((2, 6))}
    weights = pipeline.view_weights(pipeline.RunConfig(pixel_share=0.1), views)
    share = {k: weights[k] * float(np.sum(v * v)) for k, v in views.items()}
    assert sum(share[k] for k in ("red", "green", "blue")) == pytest.approx(0.1)
    assert share["conv"] == pytest.approx(0.45) and share["pool"] == pytest.approx(0.45)
    assert pipeline.view_weights(pipeline.RunConfig(pixel_share=None), views) == "balanced"
    layers_only = {"conv": views["conv"]}
    assert pipeline.view_weights(pipeline.RunConfig(), layers_only) == "balanced"
    with pytest.raises(ValueError, match=r"pixel_share: expected a fraction in \(0, 1\) or None"):
        pipeline._check_config(pipeline.RunConfig(pixel_share=1.5))
    assert cli.build_parser().parse_args(["analyze", "--checkpoint", "c", "--out", "o",
                                          "--pixel-share", "equal"]).pixel_share is None


def test_analyze_decodes_only_the_probe_images_of_a_folder(tmp_path, monkeypatch):
    from PIL import Image

    from jaxcnmf.nets import data, models

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    (tmp_path / "ckpt").mkdir()  # _load_network is replaced below
    config = pipeline.RunConfig(dataset=str(root), checkpoint=str(tmp_path / "ckpt"),
                                per_class=2, rank=2, layers=("conv1",))
    want = data.balanced_subset(data.load(root, progress=False).test, 2, seed=config.seed)
    chosen = {bytes(im) for im in want.images}
    for path in root.rglob("*.png"):
        if bytes(np.asarray(Image.open(path))) not in chosen:
            path.write_bytes(b"corrupt: analyze must not open this file")
    network = models.small_cnn(2, width=0.25)
    monkeypatch.setattr(pipeline, "_load_network", lambda config: (network, {}, {}))
    seen = []

    class Stop(Exception):
        pass

    def stop(config, probe_set):
        seen.append(probe_set)
        raise Stop  # the data stage is all this test is about

    monkeypatch.setattr(pipeline, "_check_probe_set", stop)
    with pytest.raises(Stop):
        pipeline.run(config, tmp_path / "run", progress=False)
    np.testing.assert_array_equal(seen[0].images, want.images)
    np.testing.assert_array_equal(seen[0].labels, want.labels)
