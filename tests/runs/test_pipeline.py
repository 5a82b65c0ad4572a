"""The pipeline's front door and run-directory lifecycle: checks before work, failures."""

import json

import pytest

from jaxcnmf.runs import cli, pipeline
from jaxcnmf.nets import train


def _previous_complete_run(out):
    out.mkdir()
    (out / "report.html").write_text("<html>an earlier, finished report</html>")
    (out / "COMPLETE").write_text("earlier\n")
    (out / "run.json").write_text(json.dumps({"status": "complete"}))
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
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["error"].startswith("KeyboardInterrupt")
    assert "train" not in record["seconds"]  # the stage never finished
    assert not list(out.glob(".*.tmp"))


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
