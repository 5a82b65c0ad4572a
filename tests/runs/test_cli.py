"""The ``jaxcnmf`` command line: help, ``train``, and one clear error line per bad argument."""

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
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
    assert "expected a directory" in line and "--out" not in line


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
        seen.update(out=Path(out), force=force, quick=config.per_class, tcav=tcav,
                    config=config)
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

    assert cli.main(["demo", "--force", "--out", str(previous)]) == 0
    assert (seen["config"].method, seen["config"].max_iter) == ("hals", 500)
    assert seen["config"].pixels == "auto"
    assert cli.main(["demo", "--force", "--max-iter", "1000", "--method", "mu", "--pixels",
                     "gray", "--out", str(previous)]) == 0
    assert (seen["config"].method, seen["config"].max_iter) == ("mu", 1000)
    assert seen["config"].pixels == "gray"


def _capture_analyze(monkeypatch, argv):
    seen = {}

    def fake_run(config, out, *, force, progress, tcav):
        seen["config"] = config
        return Path(out) / "report.html"

    monkeypatch.setattr(pipeline, "run", fake_run)
    assert cli.main(["analyze", "--checkpoint", "c", "--out", "o", *argv]) == 0
    return seen["config"]


def test_analyze_options_reach_the_config(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = _capture_analyze(monkeypatch, [])
    assert (config.method, config.max_iter, config.pixels) == ("hals", 500, "auto")
    assert config.baseline and config.group_lam_fraction is None and config.group_lam == 0
    config = _capture_analyze(monkeypatch, ["--group-sparse", "0.1", "--no-baseline",
                                            "--pixels", "none"])
    assert config.group_lam_fraction == 0.1 and config.group_lam == 0
    assert not config.baseline and config.pixels == "none"
    assert _capture_analyze(monkeypatch, ["--group-lam", "2.5"]).group_lam == 2.5
    assert _capture_analyze(monkeypatch, ["--no-pixels"]).pixels == "none"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--group-sparse", "2"], "--group-sparse: expected a fraction in (0, 1], got '2'"),
        (["--group-sparse", "0"], "expected a fraction in (0, 1]"),
        (["--group-sparse", "0.1", "--group-lam", "1"], "not allowed with argument"),
        (["--pixels", "grey"], "invalid choice: 'grey'"),
    ],
)
def test_bad_analyze_options_are_one_line(argv, expected, capsys):
    line = _error_line(capsys, ["analyze", "--checkpoint", "c", "--out", "o", *argv])
    assert expected in line


def test_warnings_are_one_clean_line_and_stdout_holds_only_the_path(tmp_path, monkeypatch,
                                                                     capsys):
    from jaxcnmf.solver.fit import ConvergenceWarning, DeadConceptWarning

    def noisy_run(config, out, *, force, progress, tcav):
        print("epoch 1/1  loss 0.5")  # as train.fit's tqdm.write does, on stdout
        warnings.warn("jaxcnmf.fit stopped at max_iter=500 before the KKT violation fell "
                      "to tol=0.0001 of its start; increase max_iter or tol",
                      ConvergenceWarning)
        warnings.warn("3 of 20 concepts are empty at group_lam_fraction 0.1; try a "
                      "smaller fraction", DeadConceptWarning)
        warnings.warn("a\nmulti-line\nwarning", UserWarning)
        return Path(out) / "report.html"

    monkeypatch.setattr(pipeline, "run", noisy_run)
    # pytest records warnings; print them as Python does when nobody records them.
    monkeypatch.setattr(warnings, "_showwarnmsg_impl",
                        lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{tmp_path / 'd' / 'report.html'}\n"  # the path, once
    assert captured.err.splitlines() == [
        "epoch 1/1  loss 0.5",
        ("jaxcnmf: warning: jaxcnmf.fit stopped at --max-iter 500 before the KKT violation "
         "fell to tol=0.0001 of its start; increase --max-iter or tol"),
        ("jaxcnmf: note: 3 of 20 concepts are empty at --group-sparse 0.1; try a smaller "
         "fraction"),
        "jaxcnmf: warning: a multi-line warning",
    ]
    assert warnings.formatwarning is not cli._format_warning  # restored after main


def test_cifar_without_source_says_what_to_pass_in_cli_words(tmp_path, monkeypatch, capsys):
    from jaxcnmf.nets import data

    def not_prepared(name, splits, download, data_dir, progress, looked):
        logging.getLogger("absl").warning("Variant folder %s has no dataset_info.json", name)
        raise data._not_found(name, [*looked, "tensorflow-datasets at /x (not prepared)"])

    monkeypatch.delenv("JAXCNMF_DATA", raising=False)
    monkeypatch.setattr(data, "_load_tfds", not_prepared)
    line = _error_line(capsys, ["train", "--dataset", "cifar10", "--out", str(tmp_path / "t"),
                                "--quiet"])
    assert line.startswith("jaxcnmf: error: cifar10: not found; pass --source DIR, where DIR "
                           "holds cifar-10-python.tar.gz or its extracted cifar-10-batches-py/")
    assert "source=DIR" not in line and "load(" not in line and len(line) < 300
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("command", ["demo", "analyze"])
def test_out_that_is_a_file_is_an_error(command, tmp_path, capsys):
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0")
    argv = [command, "--out", str(target), "--quiet"]
    if command == "analyze":
        argv += ["--checkpoint", str(tmp_path)]
    line = _error_line(capsys, argv)
    assert f"--out: {target} exists and is not a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd"]  # no sibling run
    assert target.read_text() == "root:x:0:0"


def test_train_help_names_folder_layouts_and_schedule_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for words in ("ROOT/SUPERCLASS/CLASS/IMAGE", "ROOT/CLASS/IMAGE", "--schedule",
                  "--label-smoothing", "--warmup", "--resume"):
        assert words in out, words


def test_train_resume_continues_the_checkpoint_and_refuses_without_it(checkpoint, tmp_path,
                                                                      capsys):
    out = tmp_path / "train"
    shutil.copytree(checkpoint.parent, out)
    line = _error_line(capsys, ["train", "--out", str(out), "--epochs", "1"])
    assert "already holds a checkpoint" in line and "--resume" in line
    line = _error_line(capsys, ["train", "--out", str(out), "--resume", "--epochs", "3"])
    assert "epochs: the checkpoint" in line and "trained with 1, got 3" in line
    # A crash between the two renames of a checkpoint write leaves only ckpt.old.
    (out / "ckpt").rename(out / "ckpt.old")
    assert cli.main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "ckpt")
    history = json.loads((out / "train.json").read_text())
    assert history["resumed"] is True and history["epochs"] == 1
    assert len(history["history"]["epoch"]) == 1  # the epoch done before, not retrained
    line = _error_line(capsys, ["train", "--out", str(tmp_path / "empty"), "--resume"])
    assert "no checkpoint to resume" in line


def test_python_dash_m_runs_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "jaxcnmf", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("jaxcnmf ")


# ------------------------------------------------------------ the user's own network

# A user's module beside their data: conftest's TINY_NNX_MODULE (a small NNX CNN with nested
# blocks and batch norm) and a builder that raises.
USER_MODULE = '''


def broken():
    raise RuntimeError("no weights here")
'''
USER_ARGS = ["--dataset", "digits", "--layers", "layer1,layer2", "--per-class", "3",
             "--pixels", "none",
             "--rank", "2", "--fidelity-ranks", "2", "--max-iter", "20", "--no-baseline",
             "--quiet"]


@pytest.fixture(scope="module")
def user_network(tmp_path_factory, tiny_nnx_module):
    """``usernets_cli.py`` in a folder, and an orbax checkpoint of a TinyCNN whose weights
    differ from the ones the builder starts from (seed 7 against 0)."""
    from jaxcnmf.nets import usermodel

    folder = tmp_path_factory.mktemp("usernet")
    (folder / "usernets_cli.py").write_text(tiny_nnx_module + USER_MODULE)
    sys.path.insert(0, str(folder))
    import usernets_cli

    saved = usernets_cli.TinyCNN(10, 1, seed=7)
    usermodel.save_orbax(saved, folder / "ckpt")
    yield folder, saved
    sys.path.remove(str(folder))
    sys.modules.pop("usernets_cli", None)


@pytest.fixture(scope="module")
def user_run(user_network):
    """``jaxcnmf analyze --model-module usernets_cli:build --checkpoint DIR`` on the digits,
    with the views ``probe.collect`` returned to the run."""
    from jaxcnmf.nets import probe
    from jaxcnmf.runs import report

    folder, saved = user_network
    seen, collect = {}, probe.collect

    def recording(*args, **kwargs):
        seen["views"] = collect(*args, **kwargs)
        return seen["views"]

    def no_report(out, progress=True, status=None):  # drawing it is test_report's job
        path = Path(out) / "report.html"
        path.write_text("report")
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(probe, "collect", recording)
        patch.setattr(report, "write_report", no_report)
        argv = ["analyze", "--model-module", "usernets_cli:build", "--checkpoint",
                str(folder / "ckpt"), "--out", str(folder / "run"), *USER_ARGS]
        assert cli.main(argv) == 0
    return folder / "run", seen["views"], saved


def test_analyze_probes_the_users_nnx_network_from_its_orbax_checkpoint(user_run, user_network):
    run, views, saved = user_run
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["model"] == {"name": "TinyCNN", "module": "usernets_cli:build", "kind": "nnx",
                               "checkpoint": str(user_network[0] / "ckpt"), "num_classes": 10,
                               "input_shape": [32, 32, 1]}
    assert record["layers"] == ["layer1", "layer2"]
    # The probed views are the saved network's own activations (not the builder's seed-0
    # weights), channel-major, and the predictions its own.
    probe_set = np.load(run / "probe.npz")
    x = probe_set["images"].astype(np.float32) / 255
    saved.eval()
    h1 = saved.layer1(x)
    h2 = saved.layer2(h1[:, ::4, ::4])
    for name, act in (("layer1", h1), ("layer2", h2)):
        expected = np.moveaxis(np.asarray(act), -1, 1).reshape(len(x), -1).T
        np.testing.assert_allclose(views[name], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(probe_set["predictions"], np.asarray(saved(x)).argmax(1))
    fidelity = json.loads((run / "analysis.json").read_text())["fidelity"]
    assert {row["layer"] for row in fidelity} == {"layer1", "layer2"}


def test_users_network_probed_into_a_store_gives_the_in_memory_concepts(user_run, user_network):
    from jaxcnmf.runs import report
    from jaxcnmf.solver import store

    folder, _ = user_network
    argv = ["analyze", "--model-module", "usernets_cli:build", "--checkpoint",
            str(folder / "ckpt"), "--out", str(folder / "stored_run"), "--store",
            str(folder / "acts"), *USER_ARGS]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", lambda out, progress=True, status=None:
                      Path(out, "report.html").write_text("report") and Path(out, "report.html"))
        assert cli.main(argv) == 0
    # The store holds the user's layers only (the logits are not a layer of theirs), and the
    # streamed fit finds the concepts of the in-memory run of the same network and seed.
    assert set(store.open(folder / "acts").views) == {"layer1", "layer2"}
    stored, in_memory = pipeline.load_run(folder / "stored_run"), pipeline.load_run(user_run[0])
    assert stored.record["store"]["state"] == "written"
    np.testing.assert_array_equal(stored.predictions, in_memory.predictions)
    F, F_ref = stored.result.F, in_memory.result.F
    np.testing.assert_allclose(F, F_ref, atol=1e-3 * float(np.max(F_ref)))


def test_tcav_rebuilds_the_users_network_from_run_json(user_run):
    from flax import nnx

    # What `jaxcnmf tcav RUN` loads: the module and orbax checkpoint run.json names.
    run, _, saved = user_run
    saved_run = pipeline.load_run(run)
    model, variables = pipeline._saved_network(saved_run, [str(i) for i in range(10)])
    assert variables is None and type(model).__name__ == "TinyCNN"
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(model),
                        nnx.state(saved))
    assert all(jax.tree.leaves(same))


@pytest.mark.parametrize("argv, expected", [
    (["--model-module", "no_such_pkg.models:build"],
     ("jaxcnmf: error: --model-module: cannot import no_such_pkg.models (no module named "
      "'no_such_pkg'); run from the folder that holds it or add that folder to PYTHONPATH")),
    (["--model-module", "usernets_cli:missing"],
     "jaxcnmf: error: --model-module: module usernets_cli has no attribute 'missing'"),
    (["--model-module", "usernets_cli:broken"],
     ("jaxcnmf: error: --model-module: usernets_cli:broken() raised RuntimeError: no weights "
      "here")),
    (["--model-module", "usernets_cli:build", "--layers", "layer9"],
     ("jaxcnmf: error: layers: unknown layer 'layer9' for model TinyCNN; expected some of "
      "layer1, layer1.conv, layer1.norm, layer2, layer2.conv, layer2.norm, fc")),
    (["--model-module", "usernets_cli:build", "--input-shape", "32,32,3"],
     ("jaxcnmf: error: --input-shape: the network takes images of shape (32, 32, 3) but "
      "dataset 'digits' has (32, 32, 1); probe it with a dataset of 32x32 images with 3 "
      "channel(s)")),
    ([], ("jaxcnmf: error: checkpoint: {ckpt} is an orbax checkpoint, which holds weights "
          "but not the network; name the network with --model-module MODULE:BUILDER")),
])
def test_user_network_errors_are_one_line(user_network, argv, expected, capsys, tmp_path):
    folder = user_network[0]
    line = _error_line(capsys, ["analyze", "--checkpoint", str(folder / "ckpt"),
                                "--out", str(tmp_path / "out"), *USER_ARGS, *argv])
    assert line == expected.format(ckpt=folder / "ckpt")


def test_pre_activation_layer_of_a_user_network_is_refused_in_cli_words(user_network, capsys,
                                                                        tmp_path):
    folder = user_network[0]
    line = _error_line(capsys, ["analyze", "--model-module", "usernets_cli:build",
                                "--checkpoint", str(folder / "ckpt"), "--out",
                                str(tmp_path / "out"), *USER_ARGS, "--layers", "layer1.conv"])
    assert line.startswith("jaxcnmf: error: layer 'layer1.conv' has negative values (min -")
    assert line.endswith("NMF needs non-negative views: probe the activation after it (its "
                         "ReLU) in --layers")


def test_user_checkpoint_errors_are_one_line(user_network, checkpoint, tmp_path, capsys):
    import usernets_cli  # on sys.path through user_network

    from jaxcnmf.nets import usermodel

    usermodel.save_orbax(usernets_cli.TinyCNN(5, 1), tmp_path / "five")
    (tmp_path / "notorbax").mkdir()
    (tmp_path / "notorbax" / "weights.npz").write_bytes(b"0")
    cases = {
        tmp_path / "five": f"jaxcnmf: error: checkpoint: the state in "
                           f"{str(tmp_path / 'five')!r} does not match the model built by "
                           "usernets_cli:build: 'fc.bias' has shape (5,) in the checkpoint "
                           "but (10,) in the model",
        tmp_path / "notorbax": f"jaxcnmf: error: checkpoint: {str(tmp_path / 'notorbax')!r} "
                               "is not an orbax checkpoint (no _METADATA or manifest.ocdbt; "
                               "save one with orbax.checkpoint.StandardCheckpointer().save("
                               "DIR, nnx.state(model)))",
        tmp_path / "missing": f"jaxcnmf: error: checkpoint: {tmp_path / 'missing'} does not "
                              "exist",
        checkpoint: f"jaxcnmf: error: checkpoint: {checkpoint} was written by 'jaxcnmf "
                    "train' and rebuilds its own network; leave out --model-module, or pass "
                    "an orbax checkpoint of your network",
    }
    for path, expected in cases.items():
        line = _error_line(capsys, ["analyze", "--model-module", "usernets_cli:build",
                                    "--checkpoint", str(path), "--out", str(tmp_path / "out"),
                                    *USER_ARGS])
        assert line == expected
