"""``jaxcnmf demo`` end to end, the report's sections and files, ``jaxcnmf report`` and
``jaxcnmf tcav``."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest

from jaxcnmf.runs import cli, pipeline, report
from jaxcnmf.concepts import tcav


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A complete quick demo run with its TCAV stage, made by the command line."""
    out = tmp_path_factory.mktemp("report") / "demo"
    assert cli.main(["demo", "--quick", "--tcav", "--tcav-runs", "3", "--out", str(out),
                     "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def tcav_dir(demo_dir, tmp_path_factory):
    """A copy of the demo run re-tested by ``jaxcnmf tcav`` at two layers and three classes."""
    copy = tmp_path_factory.mktemp("tcav") / "run"
    shutil.copytree(demo_dir, copy)
    with pytest.warns(tcav.TcavWarning, match="layer 'conv3'"):
        assert cli.main(["tcav", str(copy), "--layer", "conv2,conv3", "--classes", "0,1,2",
                         "--top", "5", "--random-runs", "2", "--cav", "mean_diff",
                         "--correction", "bonferroni", "--quiet"]) == 0
    return copy


def _error_line(capsys, argv):
    """Run ``main(argv)``, expect exit status 2, return the single stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxcnmf: error: "), lines
    return lines[0]


def _section_ids(page):
    return re.findall(r'<section id="([a-z]+)">', page)


def test_demo_writes_a_complete_run(demo_dir, capsys):
    record = json.loads((demo_dir / "run.json").read_text())
    assert record["status"] == "complete"
    assert (demo_dir / "COMPLETE").is_file()
    assert set(record["seconds"]) == {"model", "data", "train", "probe", "factorize",
                                      "baseline", "fidelity", "tcav", "report"}
    assert all(seconds >= 0 for seconds in record["seconds"].values())
    assert record["layers"] == ["conv2", "conv3", "pool"]
    assert list(record["views"]) == ["gray", "conv2", "conv3", "pool"]
    result = pipeline.load_run(demo_dir).result
    assert result.F.shape == (10, 100)
    assert set(result.relative_errors) == {"gray", "conv2", "conv3", "pool"}


def test_report_has_every_section_and_embeds_its_images(demo_dir):
    page = (demo_dir / "report.html").read_text()
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    for _, heading in report.SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    for concept in range(10):
        assert f'id="concept-{concept}"' in page
    pngs = sorted((demo_dir / "figures").glob("*.png"))
    assert len(pngs) >= 10 + 5
    assert page.count('src="data:image/png;base64,') == len(pngs)
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    for heading in ("Views: relative reconstruction error", "Wall time per stage"):
        assert heading in page
    tcav_section = page.split('<section id="tcav">')[1].split("</section>")[0]
    assert tcav_section.count('src="data:image/png;base64,') == 1
    assert "Significant cells" in tcav_section


def test_tables_are_written_as_csv_and_json(demo_dir):
    tables = demo_dir / "tables"
    for name in ("settings", "summary", "concepts", "layers", "eigenvalues", "fidelity",
                 "accuracy_vs_entropy", "relative_errors", "wall_times", "history", "tcav"):
        assert (tables / f"{name}.csv").is_file(), name
        assert isinstance(json.loads((tables / f"{name}.json").read_text()), list), name
    summary = json.loads((tables / "summary.json").read_text())
    assert [row["method"].split(" ")[0] for row in summary] == ["coupled", "k-means"]
    assert all(0.0 <= row["NMI"] <= 1.0 and 0.0 <= row["cluster purity"] <= 1.0
               for row in summary)
    assert 0.0 <= summary[0]["concept purity"] <= 1.0
    fidelity = json.loads((tables / "fidelity.json").read_text())
    assert {(row["layer"], row["rank"]) for row in fidelity} == {
        ("conv2", 10), ("conv3", 10), ("pool", 10)}
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in fidelity)


def test_report_command_redraws_from_the_saved_run(demo_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    before = (copy / "tables" / "summary.json").read_text()
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "tables")
    for png in (copy / "figures").glob("*.png"):
        png.unlink()
    (copy / "figures" / "concept_99.png").write_bytes(b"from an earlier drawing")
    assert cli.main(["report", str(copy), "--quiet"]) == 0
    page = (copy / "report.html").read_text()
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    assert (copy / "figures" / "concept_00.png").is_file()
    assert (copy / "figures" / "tcav_conv2.png").is_file()  # re-drawn from tcav.npz
    assert not (copy / "figures" / "concept_99.png").exists()
    assert (copy / "tables" / "summary.json").read_text() == before


def test_report_refuses_a_run_that_stopped_before_its_results(demo_dir, tmp_path):
    copy = tmp_path / "stopped"
    shutil.copytree(demo_dir, copy)
    (copy / pipeline.ANALYSIS).unlink()
    (copy / "report.html").unlink()
    with pytest.raises(FileNotFoundError, match="analysis.json"):
        report.write_report(copy, progress=False)
    assert not (copy / "report.html").exists()


def test_table_html_escapes_markup():
    table = report.table_html([{"class": "<script>x</script>", "share": 0.5}])
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert '<td class="num">0.5</td>' in table


def test_render_html_links_every_section():
    page = report.render_html("t", "s", [("a", "A", ["<p>x</p>"]), ("b", "B", [])])
    assert '<a href="#a">A</a>' in page and '<section id="b"><h2>B</h2></section>' in page
    assert page.startswith("<!DOCTYPE html>")


def test_write_table_columns_are_the_union_of_row_keys(tmp_path):
    report.write_table(tmp_path, "t", [{"a": 1}, {"a": 2, "b": np.float64(0.5).item()}])
    lines = (tmp_path / "tables" / "t.csv").read_text().splitlines()
    assert lines == ["a,b", "1,", "2,0.5"]


def _synthetic_run(out, *, pixels):
    """A saved run made without a network: random views, 2 superclasses, no fidelity."""
    import jaxcnmf

    rng = np.random.default_rng(0)
    n = 24
    labels = np.repeat(np.arange(4), n // 4)
    views = {"conv": rng.random((16, n)), "pool": rng.random((8, n))}
    if pixels:
        views = {"gray": rng.random((32 * 32, n)), **views}
    out.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 iterations are enough to draw a report
        jaxcnmf.fit(views, 4, max_iter=10, progress=False).save(out / pipeline.FACTORIZATION)
    np.savez(out / pipeline.PROBE,
             images=rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8), labels=labels,
             coarse_labels=labels // 2, predictions=labels)
    (out / pipeline.ANALYSIS).write_text(json.dumps({
        "kmeans": {"k": 4, "nmi": 0.5, "purity": 0.5, "views": ["conv", "pool"]},
        "fidelity": [], "fidelity_skipped": ["conv"]}))
    config = pipeline.RunConfig(layers=("conv", "pool"), pixels=pixels, pooling="mean",
                                per_class=6, rank=4, max_iter=10, top_images=3, neighbours=3)
    (out / pipeline.RUN_JSON).write_text(json.dumps({
        "status": "complete", "config": config.to_json(),
        "dataset": {"name": "toy", "class_names": ["a", "b", "c", "<d>"],
                    "superclass_names": ["ab", "cd"], "split": "test", "probe_images": n,
                    "image_shape": [32, 32, 1]},
        "model": {"name": "Toy"}, "layers": ["conv", "pool"], "seconds": {"probe": 1.0}}))
    return out


def test_report_without_pixels_shows_top_images_and_superclasses(tmp_path):
    run_dir = _synthetic_run(tmp_path / "run", pixels=False)
    page = report.write_report(run_dir, progress=False).read_text()
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    assert page.count('<figure class="thumb">') == 4 * 3
    assert "no pixel views" in page
    assert "no TCAV results" in page and "jaxcnmf tcav RUN_DIR" in page
    assert "Not measured for conv" in page
    assert "&lt;d&gt;" in page and "<d>" not in page
    summary = json.loads((run_dir / "tables" / "summary.json").read_text())
    assert [row["labels"] for row in summary] == ["class", "class", "superclass"]
    concepts = json.loads((run_dir / "tables" / "concepts.json").read_text())
    assert all("top superclasses" in row for row in concepts)


def test_report_with_pixels_draws_a_tile_per_concept(tmp_path):
    run_dir = _synthetic_run(tmp_path / "run", pixels=True)
    page = report.write_report(run_dir, progress=False).read_text()
    assert sorted(p.name for p in (run_dir / "figures").glob("concept_*.png")) == [
        f"concept_{k:02d}.png" for k in range(4)]
    assert '<figure class="thumb">' not in page


def test_summary_markdown_needs_a_complete_run_and_copies_figures(demo_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete run"):
        report.write_summary(tmp_path, tmp_path / "x.md")
    path = report.write_summary(demo_dir, tmp_path / "summary" / "README.md", title="Demo")
    text = path.read_text()
    assert text.startswith("# Demo\n")
    for heading in ("purity, NMI", "Fidelity", "Relative reconstruction error", "Wall time"):
        assert heading in text
    assert "| report |" in text  # the summary has the report stage's time too
    copied = sorted(p.name for p in path.parent.glob("*.png"))
    assert "similarity.png" in copied and not any(n.startswith("concept_") for n in copied)
    assert "tcav_conv2.png" in copied and "## TCAV: significant" in text


def test_demo_tcav_stage_tests_every_concept_against_every_class(demo_dir):
    summary = json.loads((demo_dir / pipeline.TCAV).read_text())
    # The demo probes conv2, conv3 and pool; conv3 feeds a linear head (average pool,
    # dense), so the default is conv2, whose scores are graded.
    assert summary["layers"] == ["conv2"]
    assert not any(cell["constant_gradient"] for cell in summary["cells"])
    assert summary["classes"] == [str(digit) for digit in range(10)]
    # 100 probe images: the default of 50 images per concept falls to a third of them.
    assert summary["config"]["top"] == 33 and summary["config"]["random_runs"] == 3
    assert len(summary["cells"]) == 10 * 10
    record = json.loads((demo_dir / "run.json").read_text())
    assert record["tcav"] == pipeline.TcavConfig(random_runs=3).to_json()
    saved = pipeline.load_run(demo_dir)
    assert saved.tcav.scores.shape == (1, 10, 10, 3)
    assert saved.tcav.table() == summary["cells"]


def test_tcav_command_saves_results_and_redraws_the_report(tcav_dir, demo_dir, capsys):
    result = pipeline.load_tcav(tcav_dir)
    assert result.layers == ("conv2", "conv3") and result.classes == ("0", "1", "2")
    assert result.correction == "bonferroni" and result.config["cav_method"] == "mean_diff"
    assert result.scores.shape == (2, 10, 3, 2)
    # conv3 reaches the logits through an average pool and a dense layer only.
    assert result.constant_gradient.tolist() == [[False] * 3, [True] * 3]
    assert np.isin(result.scores[1], [0.0, 1.0]).all()
    assert not list(tcav_dir.glob(".*.tmp"))
    with open(tcav_dir / "tables" / "tcav.csv") as handle:
        assert len(handle.read().splitlines()) == 1 + 2 * 10 * 3
    for layer in ("conv2", "conv3"):
        assert (tcav_dir / "figures" / f"tcav_{layer}.png").is_file()
    page = (tcav_dir / "report.html").read_text()
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    section = page.split('<section id="tcav">')[1].split("</section>")[0]
    assert section.count('src="data:image/png;base64,') == 2
    significant = int(result.significant.sum())
    assert section.count("<tr><td>conv") == significant
    assert f"{significant} of 60 cells significant" in section
    assert section.count("Warning: at ") == 1
    assert "Warning: at conv3 the class-logit gradient is the same for every image" in section
    summary = report.write_summary(tcav_dir, tcav_dir / "summary" / "README.md").read_text()
    assert summary.count("Warning: at conv3 the class-logit gradient") == 1
    record = json.loads((tcav_dir / "run.json").read_text())
    assert record["seconds"]["tcav"] >= 0 and record["status"] == "complete"
    assert record["tcav"]["layers"] == ["conv2", "conv3"] and record["tcav"]["top"] == 5
    # The rest of the run is untouched.
    assert (tcav_dir / "tables" / "summary.json").read_text() == (
        demo_dir / "tables" / "summary.json").read_text()


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--layer", "conv9"], "unknown layer 'conv9' for model SmallCNN; expected some of "
                               "conv1, conv2, conv3, pool"),
        (["--top", "101"], "top: expected 1 <= top <= 33 (a third of the 100 probe images"),
        (["--classes", "0,ten"], "unknown class 'ten'; expected 'all' or some of 0, 1, 2"),
    ],
)
def test_tcav_command_errors_on_a_run(options, expected, demo_dir, capsys):
    before = (demo_dir / pipeline.TCAV).read_text()
    line = _error_line(capsys, ["tcav", str(demo_dir), "--quiet", "--top", "5", *options])
    assert expected in line
    assert (demo_dir / pipeline.TCAV).read_text() == before


def test_tcav_command_refuses_an_incomplete_run(demo_dir, tmp_path, capsys):
    copy = tmp_path / "stopped"
    shutil.copytree(demo_dir, copy)
    (copy / pipeline.FACTORIZATION).unlink()
    line = _error_line(capsys, ["tcav", str(copy), "--quiet"])
    assert "no factorization.npz" in line and "stopped before" in line


def test_tcav_command_needs_the_network(demo_dir, tmp_path, capsys):
    copy = tmp_path / "moved"
    shutil.copytree(demo_dir, copy, ignore=shutil.ignore_patterns(pipeline.CHECKPOINT_DIR))
    record = json.loads((copy / "run.json").read_text())
    record["model"]["checkpoint"] = str(tmp_path / "gone")
    (copy / "run.json").write_text(json.dumps(record))
    line = _error_line(capsys, ["tcav", str(copy), "--quiet"])
    assert "TCAV needs the run's network" in line and "gone" in line
