"""``jaxcnmf demo`` end to end, the report's sections and files, and ``jaxcnmf report``."""

import json
import re
import shutil

import numpy as np
import pytest

from jaxcnmf import cli, pipeline, report


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A complete quick demo run, made by the command line."""
    out = tmp_path_factory.mktemp("report") / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


def _section_ids(page):
    return re.findall(r'<section id="([a-z]+)">', page)


def test_demo_writes_a_complete_run(demo_dir, capsys):
    record = json.loads((demo_dir / "run.json").read_text())
    assert record["status"] == "complete"
    assert (demo_dir / "COMPLETE").is_file()
    assert set(record["seconds"]) == {"model", "data", "train", "probe", "factorize",
                                      "analyze", "report"}
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


def test_tables_are_written_as_csv_and_json(demo_dir):
    tables = demo_dir / "tables"
    for name in ("settings", "summary", "concepts", "layers", "eigenvalues", "fidelity",
                 "accuracy_vs_entropy", "relative_errors", "wall_times", "history"):
        assert (tables / f"{name}.csv").is_file(), name
        assert isinstance(json.loads((tables / f"{name}.json").read_text()), list), name
    summary = json.loads((tables / "summary.json").read_text())
    assert [row["method"].split(" ")[0] for row in summary] == ["coupled", "k-means"]
    assert all(0.0 <= row["NMI"] <= 1.0 and 0.0 <= row["purity"] <= 1.0 for row in summary)
    fidelity = json.loads((tables / "fidelity.json").read_text())
    assert {(row["layer"], row["rank"]) for row in fidelity} == {
        ("conv2", 10), ("conv3", 10), ("pool", 10)}
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in fidelity)


def test_report_command_redraws_from_the_saved_run(demo_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_dir, copy)
    before = (copy / "tables" / "summary.json").read_text()
    (copy / "report.html").unlink()
    shutil.rmtree(copy / "figures")
    shutil.rmtree(copy / "tables")
    assert cli.main(["report", str(copy), "--quiet"]) == 0
    page = (copy / "report.html").read_text()
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    assert (copy / "figures" / "concept_00.png").is_file()
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
