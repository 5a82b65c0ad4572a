"""The run directory's plumbing: atomic writes, the output-directory rules, re-exports."""

import json
import os

import pytest

from jaxcnmf.runs import pipeline, rundir


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        rundir.write_bytes_atomic(target, b"new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    path = tmp_path / "run.json"
    rundir.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.stat().st_mode & 0o044 == 0o044 & ~rundir._umask()


def test_out_dir_rules(tmp_path):
    assert rundir.check_out_dir(tmp_path / "new", force=False) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    rundir.check_out_dir(tmp_path / "empty", force=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        rundir.check_out_dir(tmp_path / "full", force=False)
    rundir.check_out_dir(tmp_path / "full", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        rundir.check_out_dir(tmp_path / "file", force=True)


def test_pipeline_re_exports_the_run_directory_names():
    # Code written before rundir existed reads them from pipeline: the same objects.
    for name in ("RUN_JSON", "FACTORIZATION", "PROBE", "ANALYSIS", "TCAV", "TCAV_ARRAYS",
                 "CHECKPOINT_DIR", "COMPLETE", "REPORT", "holds_files", "check_out_dir",
                 "write_json_atomic", "write_bytes_atomic", "progress_bar", "SavedRun",
                 "load_run", "save_tcav", "load_tcav"):
        assert getattr(pipeline, name) is getattr(rundir, name), name


def test_start_run_dir_removes_what_a_previous_run_left(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = (rundir.COMPLETE, rundir.REPORT, rundir.FACTORIZATION, rundir.PROBE,
             rundir.ANALYSIS, rundir.TCAV, rundir.TCAV_ARRAYS)
    for name in stale + ("notes.txt",):
        (out / name).write_text("earlier")
    rundir.start_run_dir(out, {"status": "running"})
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", rundir.RUN_JSON]
    assert json.loads((out / rundir.RUN_JSON).read_text()) == {"status": "running"}


def test_a_second_writer_is_refused_while_the_lock_is_held(tmp_path):
    out = tmp_path / "run"
    with rundir.lock_run_dir(out) as lock:
        assert lock == out / rundir.LOCK
        # A separate open of the lock file is what a second process would do: flock
        # conflicts between open file descriptions even within one process.
        with pytest.raises(FileExistsError, match="in use by another jaxcnmf run"), \
                rundir.lock_run_dir(out):
            pass
    with rundir.lock_run_dir(out):  # released on exit
        pass
    assert not rundir.holds_files(out)  # the lock file alone does not make a run


def test_lock_is_refused_across_processes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    with rundir.lock_run_dir(out):
        code = ("import sys; from jaxcnmf.runs import rundir\n"
                "try:\n    rundir.lock_run_dir(sys.argv[1]).__enter__()\n"
                "except FileExistsError as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "in use by another jaxcnmf run" in proc.stdout


def test_remove_written_deletes_only_what_the_run_listed(tmp_path):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "tables").mkdir()
    (tmp_path / "outside.txt").write_text("not the run's")
    ours = ["figures/class_shares.png", "tables/summary.csv", rundir.FACTORIZATION]
    for name in ours:
        (out / name).write_text("run")
    mine = ["figures/my_plot.png", "tables/my_notes.csv", "notes.txt"]
    for name in mine:
        (out / name).write_text("mine")
    (out / rundir.RUN_JSON).write_text(json.dumps(
        {"status": "complete", "files": ours + ["../outside.txt", "figures/gone.png"]}))
    removed = rundir.remove_written(out)
    assert sorted(removed) == sorted(ours)
    for name in mine:
        assert (out / name).read_text() == "mine"
    assert (tmp_path / "outside.txt").exists()  # a listed path outside the run: kept


def test_written_files_are_the_new_ones(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = rundir.files_under(tmp_path)
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_text("run")
    (tmp_path / rundir.LOCK).write_text("")
    assert rundir.written_files(tmp_path, before, ["run.json"]) == ["figures/a.png", "run.json"]
