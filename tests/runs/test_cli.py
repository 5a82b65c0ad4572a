"""The ``jaxcnmf`` command line: help, ``train``, and one clear error line per bad argument."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcnmf.runs import cli, pipeline


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SmallCNN trained for one epoch on the digits by ``jaxcnmf train``."""
    out = tmp_path_factory.mktemp("cli") / "train"
    code = cli.main(["train", "--model", "small", "--dataset", "digits", "--out", str(out),
                     "--epochs", "1", "--width", "0.25", "--batch-size", "64", "--quiet"])
    assert code == 0
    return out / "ckpt"


def _error_line(capsys, argv):
    """Run ``main(argv)``, expect exit status 2, return the single stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxcnmf: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_train_writes_checkpoint_and_history(checkpoint, capsys):
    assert (checkpoint / "meta.json").is_file()
    history = json.loads((checkpoint.parent / "train.json").read_text())
    assert history["epochs"] == 1
    assert 0.0 <= history["accuracy"] <= 1.0
    assert set(history["seconds"]) == {"data", "train"}


def test_help_names_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "analyze", "tcav", "report"):
        assert command in out
    assert "examples:" in out


@pytest.mark.parametrize("command", ["demo", "train", "analyze", "tcav", "report"])
def test_each_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    assert "usage: jaxcnmf" in capsys.readouterr().err


def test_unknown_layer_lists_the_available_ones(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    line = _error_line(capsys, ["analyze", "--checkpoint", str(checkpoint), "--layers",
                                "conv2,conv9", "--out", str(out), "--quiet"])
    assert "unknown layer 'conv9'" in line
    assert "conv1, conv2, conv3, pool" in line
    assert not out.exists()  # validation happens before the run directory is created


def test_rank_larger_than_probe_set(checkpoint, tmp_path, capsys):
    line = _error_line(capsys, ["analyze", "--checkpoint", str(checkpoint), "--per-class", "1",
                                "--rank", "50", "--out", str(tmp_path / "run"), "--quiet"])
    assert "rank: expected 1 <= rank <= 10" in line
    assert "got 50" in line


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "no-such-ckpt"
    line = _error_line(capsys, ["analyze", "--checkpoint", str(missing),
                                "--out", str(tmp_path / "run"), "--quiet"])
    assert "checkpoint" in line and str(missing) in line and "does not exist" in line


def test_checkpoint_that_is_a_file(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "weights.bin"
    not_a_checkpoint.write_bytes(b"0")
    line = _error_line(capsys, ["analyze", "--checkpoint", str(not_a_checkpoint),
                                "--out", str(tmp_path / "run"), "--quiet"])
    assert "expected a directory" in line


def test_missing_data(checkpoint, tmp_path, capsys):
    line = _error_line(capsys, ["analyze", "--checkpoint", str(checkpoint), "--dataset",
                                "cifar10", "--source", str(tmp_path / "no-data"),
                                "--out", str(tmp_path / "run"), "--quiet"])
    assert "no-data" in line


def test_unknown_dataset(checkpoint, tmp_path, capsys):
    line = _error_line(capsys, ["analyze", "--checkpoint", str(checkpoint), "--dataset",
                                "imagenet", "--out", str(tmp_path / "run"), "--quiet"])
    assert "unknown dataset 'imagenet'" in line


def test_existing_run_directory_suggests_force(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _error_line(capsys, ["analyze", "--checkpoint", str(checkpoint),
                                "--out", str(out), "--quiet"])
    assert "already exists" in line and "--force" in line
    assert (out / "notes.txt").read_text() == "mine"


def test_unknown_model(tmp_path, capsys):
    line = _error_line(capsys, ["train", "--model", "alexnet", "--out", str(tmp_path / "t")])
    assert "alexnet" in line and "small" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["analyze", "--checkpoint", "c", "--out", "o", "--method", "adam"], "invalid choice"),
        (["analyze", "--checkpoint", "c", "--out", "o", "--rank", "0"], "positive integer"),
        (["analyze", "--checkpoint", "c", "--out", "o", "--fidelity-ranks", "2,x"], "2,x"),
        (["analyze", "--out", "o"], "--checkpoint"),
        (["frobnicate"], "invalid choice"),
        (["tcav", "r", "--random-runs", "1"], "--random-runs: expected an integer >= 2, got '1'"),
        (["tcav", "r", "--alpha", "1.5"], "--alpha: expected a level in (0, 1), got '1.5'"),
        (["tcav", "r", "--correction", "holm"], "invalid choice"),
        (["tcav", "r", "--cav", "svm"], "invalid choice"),
        (["tcav", "r", "--top", "0"], "positive integer"),
        (["demo", "--tcav-runs", "5"], "--tcav-runs needs --tcav"),
    ],
)
def test_argument_errors_are_one_line(argv, expected, capsys, tmp_path, monkeypatch):
    # Relative default paths (runs/demo) must not depend on where the suite runs.
    monkeypatch.chdir(tmp_path)
    line = _error_line(capsys, argv)
    assert expected in line


def test_bad_demo_argument_is_one_line_even_beside_an_earlier_demo(capsys, tmp_path,
                                                                   monkeypatch):
    # After `./run.sh demo`, runs/demo holds a run; the error must still come alone.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "report.html").write_text("<html></html>")
    line = _error_line(capsys, ["demo", "--tcav-runs", "5"])
    assert "--tcav-runs needs --tcav" in line


def test_tcav_of_a_missing_run_directory(tmp_path, capsys):
    line = _error_line(capsys, ["tcav", str(tmp_path / "nowhere")])
    assert "nowhere does not exist" in line


def test_report_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    line = _error_line(capsys, ["report", str(tmp_path)])
    assert "run.json" in line


def test_demo_keeps_an_existing_run_and_writes_beside_it(tmp_path, monkeypatch, capsys):
    previous = tmp_path / "demo"
    previous.mkdir()
    (previous / "report.html").write_text("earlier run")
    seen = {}

    def fake_run(config, out, *, force, progress, tcav):
        seen.update(out=Path(out), force=force, quick=config.per_class, tcav=tcav)
        return Path(out) / "report.html"

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert cli.main(["demo", "--quick", "--out", str(previous)]) == 0
    assert seen["out"].parent == tmp_path and seen["out"].name.startswith("demo-")
    assert seen["force"] is False
    assert (previous / "report.html").read_text() == "earlier run"
    assert "--force" in capsys.readouterr().err

    assert cli.main(["demo", "--quick", "--force", "--out", str(previous)]) == 0
    assert seen["out"] == previous and seen["force"] is True and seen["tcav"] is None

    assert cli.main(["demo", "--quick", "--force", "--tcav", "--tcav-runs", "7", "--seed", "3",
                     "--out", str(previous)]) == 0
    assert seen["tcav"] == pipeline.TcavConfig(random_runs=7, seed=3)


def test_python_dash_m_runs_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "jaxcnmf", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("jaxcnmf ")
