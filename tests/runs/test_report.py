"""``jaxcnmf demo`` end to end, the report's sections and files, ``jaxcnmf report`` and
``jaxcnmf tcav``."""

import csv
import dataclasses
import functools
import html
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxcnmf.concepts import tcav
from jaxcnmf.runs import cli, pipeline, report, rundir


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
    # The fit, the same fit of the layers alone (what coupling the pixels costs), k-means.
    assert [row["method"].split(" ")[0] for row in summary] == ["coupled", "the", "k-means"]
    assert "without the pixel views" in summary[1]["method"]
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


@functools.cache
def _fitted(pixels):
    """One small fit per pixel setting, shared by the synthetic runs of this file."""
    import jaxcnmf

    rng = np.random.default_rng(0)
    n = 24
    views = {"conv": rng.random((16, n)), "pool": rng.random((8, n))}
    if pixels:
        views = {"gray": rng.random((32 * 32, n)), **views}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 iterations are enough to draw a report
        return jaxcnmf.fit(views, 4, max_iter=10, progress=False)


def _synthetic_run(out, *, pixels, class_names=("a", "b", "c", "<d>"), kmeans=None,
                   status="complete", error=None, complete=False, result=None, tcav_result=None):
    """A saved run made without a network: random views, 2 superclasses, no fidelity."""
    rng = np.random.default_rng(0)
    n = 24
    labels = np.repeat(np.arange(4), n // 4)
    out.mkdir()
    (result or _fitted(pixels)).save(out / pipeline.FACTORIZATION)
    np.savez(out / pipeline.PROBE,
             images=rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8), labels=labels,
             coarse_labels=labels // 2, predictions=labels)
    (out / pipeline.ANALYSIS).write_text(json.dumps({
        "kmeans": kmeans or {"k": 4, "nmi": 0.5, "purity": 0.5, "views": ["conv", "pool"]},
        "fidelity": [], "fidelity_skipped": ["conv"]}))
    config = pipeline.RunConfig(layers=("conv", "pool"), pixels=pixels, pooling="mean",
                                per_class=6, rank=4, max_iter=10, top_images=3, neighbours=3)
    (out / pipeline.RUN_JSON).write_text(json.dumps({
        "status": status, **({"error": error} if error else {}), "config": config.to_json(),
        "dataset": {"name": "toy", "class_names": list(class_names),
                    "superclass_names": ["ab", "cd"], "split": "test", "probe_images": n,
                    "image_shape": [32, 32, 1]},
        "model": {"name": "Toy"}, "layers": ["conv", "pool"], "seconds": {"probe": 1.0}}))
    if complete:
        (out / "COMPLETE").write_text("now\n")
    if tcav_result is not None:
        rundir.save_tcav(out, tcav_result)
    return out


def _section(page, section_id):
    return page.split(f'<section id="{section_id}">')[1].split("</section>")[0]


TOY_CLASSES = ("0", "1", "2", "<3>")


def _tcav_result(rank=4, classes=TOY_CLASSES):
    """A fabricated TCAV result: concept0 above random for class 0, concept1 below for 1."""
    shape = (1, rank, len(classes), 3)
    scores = np.full(shape, 0.5, np.float32)
    scores[0, 0, 0] = 0.9
    scores[0, 1, 1] = 0.1
    significant = np.zeros(shape[:3], bool)
    significant[0, 0, 0] = significant[0, 1, 1] = True
    p_values = np.where(significant, 0.001, 0.9)
    return tcav.TcavResult(
        layers=("conv",), concepts=tuple(f"concept{k}" for k in range(rank)),
        classes=tuple(classes), scores=scores, random_scores=np.full(shape, 0.5, np.float32),
        magnitudes=scores, random_magnitudes=np.full(shape, 0.5, np.float32),
        cav_accuracies=np.full(shape[:2] + (3,), 0.8, np.float32),
        random_cav_accuracies=np.full(shape[:2] + (3,), 0.5, np.float32),
        p_values=p_values, adjusted=p_values, significant=significant, correction="bh",
        alpha=0.05, timings={"total": 1.0},
        config={"top": 3, "cav_method": "logistic", "random_runs": 3})


# k-means "beats" the concepts in the toy run, and its assignment is saved.
TOY_ASSIGNMENT = np.arange(24) // 6


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A synthetic run (no pixels, superclasses, TCAV) and its page, drawn once for real."""
    kmeans = {"k": 4, "nmi": 0.99, "purity": 0.99, "views": ["conv", "pool"],
              "assignment": TOY_ASSIGNMENT.tolist()}
    run_dir = _synthetic_run(tmp_path_factory.mktemp("toy") / "run", pixels=False,
                             class_names=TOY_CLASSES, kmeans=kmeans,
                             tcav_result=_tcav_result())
    return run_dir, report.write_report(run_dir, progress=False).read_text()


@pytest.fixture
def quick_figures(monkeypatch):
    """Figures are built but not rendered (a placeholder PNG): for checks of text and files."""
    from jaxcnmf.runs import figures

    def save(fig, path, dpi=110):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.clear()
        path.write_bytes(b"\x89PNG placeholder")
        return path

    monkeypatch.setattr(figures, "save_figure", save)


def test_report_without_pixels_shows_top_images_and_superclasses(toy):
    run_dir, page = toy
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    assert page.count('<figure class="thumb">') == 4 * 3
    assert "no pixel views" in page
    assert "Not measured for conv" in page
    assert "&lt;3&gt;" in page and "<3>" not in page
    summary = json.loads((run_dir / "tables" / "summary.json").read_text())
    assert [row["labels"] for row in summary] == ["class", "class", "superclass", "superclass"]
    concepts = json.loads((run_dir / "tables" / "concepts.json").read_text())
    assert all("top superclasses" in row for row in concepts)
    assert not list(run_dir.glob(".report-*"))
    assert "could not be drawn" not in page


def test_report_with_pixels_draws_a_tile_per_concept_with_plain_text_names(tmp_path):
    # Class names matplotlib's mathtext would choke on are drawn as typed, in the tiles,
    # the share heatmap, the neighbour figures and the TCAV heatmap.
    names = ("$\\alpha$", "$\\notacommand{$", "a$b", "$x^$")
    run_dir = _synthetic_run(tmp_path / "run", pixels=True, class_names=names,
                             tcav_result=_tcav_result(classes=names))
    with warnings.catch_warnings():
        warnings.simplefilter("error", report.FigureWarning)
        page = report.write_report(run_dir, progress=False).read_text()
    assert sorted(p.name for p in (run_dir / "figures").glob("concept_*.png")) == [
        f"concept_{k:02d}.png" for k in range(4)]
    assert '<figure class="thumb">' not in page
    assert "could not be drawn" not in page
    for name in ("class_shares", "tcav_conv", "neighbours_0_cosine"):
        assert (run_dir / "figures" / f"{name}.png").stat().st_size > 1000, name


def _rescaled(result, factors):
    """The same W F with the scale split differently: F rows times d, loadings over d."""
    factors = np.asarray(factors, dtype=np.float64)
    return dataclasses.replace(
        result, F=(np.asarray(result.F, np.float64) * factors[:, None]).astype(np.float32),
        loadings={name: (np.asarray(W, np.float64) / factors).astype(np.float32)
                  for name, W in result.loadings.items()})


def test_concept_assignments_do_not_depend_on_the_scale_split(tmp_path, quick_figures):
    from jaxcnmf.concepts.labels import nmi, strongest_concept

    result = _fitted(False)
    split = _rescaled(result, [100.0, 1.0, 0.01, 3.0])
    # The raw F of the two splits assign images to different concepts ...
    labels = np.repeat(np.arange(4), 6)
    assert nmi(strongest_concept(split.F), labels) != pytest.approx(
        nmi(strongest_concept(result.F), labels))
    pages = []
    for name, fit in (("a", result), ("b", split)):
        run_dir = _synthetic_run(tmp_path / name, pixels=False, result=fit)
        pages.append(report.write_report(run_dir, progress=False).read_text())
    # ... but the report's scores, concept table, order and neighbours are the same.
    for table in ("summary", "concepts", "accuracy_vs_entropy", "neighbour_examples"):
        one, two = (json.loads((tmp_path / name / "tables" / f"{table}.json").read_text())
                    for name in "ab")
        assert len(one) == len(two) > 0, table
        for row_one, row_two in zip(one, two):
            assert row_one.keys() == row_two.keys()
            for key, value in row_one.items():
                if isinstance(value, float):
                    assert value == pytest.approx(row_two[key], abs=1e-5), (table, key)
                else:
                    assert value == row_two[key], (table, key)
    assert re.findall(r'id="concept-(\d+)"', pages[0]) == re.findall(r'id="concept-(\d+)"',
                                                                       pages[1])
    assert html.escape(report.SCALED_F_NOTE) in _section(pages[0], "summary")


def test_headings_name_the_concept_the_class_and_the_share(toy):
    _, page = toy
    headings = re.findall(r'<div class="concept" id="concept-\d+"><h3>(.*?)</h3>', page)
    assert len(headings) == 4
    for heading in headings:
        assert re.fullmatch(r"concept \d · top class &#x27;(\d|&lt;3&gt;)&#x27; · \d+% of "
                            r"its mass", heading), heading
    # Thumbnails say which number is the probe index and which is the class.
    assert re.search(r"<figcaption>#\d+ · class &#x27;\d&#x27;</figcaption>", page)


def test_neighbour_figures_explain_their_numbers(toy):
    run_dir, page = toy
    section = _section(page, "neighbours")
    assert "probe index (#n, its column of F)" in section
    captions = re.findall(r"<figcaption>Query: probe image #\d+ \(class &#x27;.+?&#x27;\) "
                          r"and its 3 nearest neighbours by (\w+) distance;", section)
    # Every figure but the accuracy plot is a neighbour figure, and says what it shows.
    assert len(captions) == section.count("<figure>") - 1 >= 2
    assert set(captions) == {"cosine", "euclidean"}
    examples = json.loads((run_dir / "tables" / "neighbour_examples.json").read_text())
    assert set(examples[0]) == {"query image (#)", "class", "metric", "entropy (bits)",
                                "neighbours (#)"}


def test_one_concept_order_everywhere_and_tcav_counts_apart(toy):
    from jaxcnmf.concepts.labels import concept_order, scaled_F

    run_dir, page = toy
    result = _fitted(False)
    order = concept_order(scaled_F(result.F, result.loadings, result.config["weights"]),
                          np.repeat(np.arange(4), 6)).tolist()
    assert order != sorted(order)  # else the test could not tell orders apart
    gallery = [int(k) for k in re.findall(r'id="concept-(\d+)"', page)]
    table = [row["concept"] for row in
             json.loads((run_dir / "tables" / "concepts.json").read_text())]
    tcav_rows = json.loads((run_dir / "tables" / "tcav.json").read_text())
    tcav_order = [int(row["concept"][len("concept"):]) for row in tcav_rows][::4]
    assert gallery == table == tcav_order == order
    significant = re.findall(r"<tr><td>conv</td><td>concept(\d)</td>", _section(page, "tcav"))
    assert [int(k) for k in significant] == [k for k in order if k in (0, 1)]
    assert ("2 of 16 cells significant: 1 above random (the concept raises the class logit "
            "more often than random directions do), 1 below random (less often)") in page
    assert {row["direction"] for row in tcav_rows if row["significant"]} == {"above", "below"}


def test_tcav_in_order_permutes_every_concept_array():
    result = _tcav_result()
    moved = report.tcav_in_order(result, [2, 0, 3, 1])
    assert moved.concepts == ("concept2", "concept0", "concept3", "concept1")
    np.testing.assert_array_equal(moved.scores[0, 1], result.scores[0, 0])
    np.testing.assert_array_equal(moved.significant[0, 3], result.significant[0, 1])
    renamed = dataclasses.replace(result, concepts=("w", "x", "y", "z"))
    assert report.tcav_in_order(renamed, [2, 0, 3, 1]) is renamed



def test_page_at_900px_scales_figures_and_never_breaks_a_number_or_word(toy):
    _, page = toy
    css = page.split("<style>")[1].split("</style>")[0]
    # Every image is in a <figure>, whose images shrink to the column (thumbnails have a
    # fixed 96 px size).
    assert "figure img { max-width: 100%; height: auto; }" in css
    assert page.count("<img") == len(re.findall(r'<figure(?: class="thumb")?><img ', page)) > 3
    # Numbers never wrap; with "overflow-wrap: anywhere" on every cell the browser fitted
    # wide tables by breaking "conv2" and "0.04667" over two lines instead of scrolling.
    assert re.search(r"td\.num \{[^}]*white-space: nowrap", css)
    assert "anywhere" not in css
    assert '<td class="num">0.04667</td>' in report._cell(0.0466667)
    # A long path may still break, after a slash.
    assert report._cell("/tmp/run/ckpt") == "<td>/<wbr>tmp/<wbr>run/<wbr>ckpt</td>"


def test_page_fits_900px_tables_scroll_and_headers_are_human(toy):
    run_dir, page = toy
    assert page.count("<table>") == page.count('<div class="table-wrap"><table>') > 5
    assert ".table-wrap { max-width: 100%; overflow-x: auto; }" in page
    assert 'name="viewport"' in page
    headers = re.findall(r"<th>(.*?)</th>", page)
    assert headers and not [h for h in headers if "_" in h]
    for human in ("corrected p-value", "mean TCAV score", "entropy from (bits)"):
        assert f"<th>{human}</th>" in page
    # The eigenvalues: a figure, and a table one column per layer (not rank + 1).
    layers = _section(page, "layers")
    assert (run_dir / "figures" / "eigenvalue_spectra.png").is_file()
    eigen = layers.split("<details>")[1]
    first_row = re.search(r"<thead><tr>(.*?)</tr>", eigen).group(1)
    assert first_row == "<th>eigenvalue number</th><th>conv</th><th>pool</th>"
    # The CSV files keep the machine names.
    with open(run_dir / "tables" / "tcav.csv") as handle:
        assert "p_adjusted" in next(csv.reader(handle))


def test_kmeans_baseline_note_and_superclass_scores(toy):
    from jaxcnmf.concepts.labels import cluster_purity, nmi

    run_dir, page = toy
    summary = json.loads((run_dir / "tables" / "summary.json").read_text())
    coarse = np.repeat(np.arange(4), 6) // 2
    assert summary[3]["labels"] == "superclass" and summary[3]["method"].startswith("k-means")
    assert summary[3]["NMI"] == pytest.approx(nmi(TOY_ASSIGNMENT, coarse))
    assert summary[3]["cluster purity"] == pytest.approx(cluster_purity(TOY_ASSIGNMENT, coarse))
    text = _section(page, "summary")
    assert "k-means scores higher here (class NMI 0.99 against" in text
    assert "k-means optimises exactly a partition of these layer activations" in text
    assert "unavailable" not in text


def test_no_kmeans_note_when_the_concepts_win_and_no_superclass_baseline_unsaved(
        tmp_path, quick_figures):
    kmeans = {"k": 4, "nmi": 0.0, "purity": 0.0, "views": ["conv", "pool"]}
    run_dir = _synthetic_run(tmp_path / "run", pixels=False, kmeans=kmeans)
    page = report.write_report(run_dir, progress=False).read_text()
    text = _section(page, "summary")
    assert "k-means scores higher" not in text
    assert "k-means against the superclasses: unavailable" in text
    summary = json.loads((run_dir / "tables" / "summary.json").read_text())
    assert summary[3]["NMI"] == "n/a" and summary[3]["method"].startswith("k-means")


def test_csv_cells_cannot_start_a_formula(tmp_path, quick_figures):
    names = ('=HYPERLINK("http://x","y")', "+1", "-cmd", "@SUM(A1)")
    run_dir = _synthetic_run(tmp_path / "run", pixels=False, class_names=names,
                             tcav_result=_tcav_result(classes=names))
    report.write_report(run_dir, progress=False)
    checked = 0
    for path in (run_dir / "tables").glob("*.csv"):
        with open(path, newline="") as handle:
            for row in csv.reader(handle):
                for cell in row:
                    if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                        float(cell)  # only a number may start with a sign
                    checked += 1
    assert checked > 100
    with open(run_dir / "tables" / "tcav.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["class"] for row in rows} == {"'" + name for name in names}
    assert all(0.0 <= float(row["mean_score"]) <= 1.0 for row in rows)  # numbers stay numbers
    # The JSON keeps the class names as they are.
    tcav_json = json.loads((run_dir / "tables" / "tcav.json").read_text())
    assert {row["class"] for row in tcav_json} == set(names)


def test_write_table_neutralises_formula_cells(tmp_path):
    report.write_table(tmp_path, "t", [{"name": "=1+1", "tab": "\tx", "value": -2.5,
                                        "count": -3, "plain": "cat"}])
    with open(tmp_path / "tables" / "t.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[1] == ["'=1+1", "'\tx", "-2.5", "-3", "cat"]
    assert json.loads((tmp_path / "tables" / "t.json").read_text())[0]["name"] == "=1+1"


def test_a_figure_that_fails_costs_one_line_not_the_report(tmp_path, quick_figures,
                                                           monkeypatch):
    from jaxcnmf.runs import figures

    def broken(*args, **kwargs):
        raise RuntimeError("the drawing broke\nover two lines")

    monkeypatch.setattr(figures, "history_plot", broken)
    run_dir = _synthetic_run(tmp_path / "run", pixels=False)
    with pytest.warns(report.FigureWarning, match="figure 'history' could not be drawn"):
        page = report.write_report(run_dir, progress=False).read_text()
    assert _section_ids(page) == [section_id for section_id, _ in report.SECTIONS]
    assert ("Figure &#x27;history&#x27; could not be drawn (RuntimeError: the drawing broke "
            "over two lines); the tables are unaffected.") in _section(page, "objective")
    assert "1 figure(s) could not be drawn: history" in page.split("<nav>")[0]
    assert (run_dir / "tables" / "history.csv").is_file()
    assert not (run_dir / "figures" / "history.png").exists()
    assert (run_dir / "figures" / "similarity.png").is_file()


@pytest.mark.parametrize("record, complete, keyword, expected", [
    ({"status": "complete", "finished": "T"}, True, None, ("complete", "complete, finished T.")),
    ({"status": "complete"}, False, None, ("complete", "complete.")),
    ({"status": "running"}, False, None, ("running", "running: the run had not finished")),
    ({"status": "running"}, True, None, ("complete", "complete.")),
    ({"status": "failed", "error": "KeyboardInterrupt: "}, False, None,
     ("interrupted", "interrupted (KeyboardInterrupt:): the run stopped")),
    ({"status": "failed", "error": "ValueError: bad"}, False, None,
     ("failed", "failed (ValueError: bad): the run stopped")),
    ({"status": "running"}, False, "complete", ("complete", "complete.")),
    ({}, False, None, ("unknown", "'unknown': run.json does not say")),
])
def test_run_status(tmp_path, record, complete, keyword, expected):
    if complete:
        (tmp_path / "COMPLETE").write_text("T\n")
    state, sentence = report.run_status(tmp_path, record, keyword)
    assert state == expected[0] and sentence.startswith(expected[1])


def test_page_shows_the_run_status_at_the_top(tmp_path, quick_figures):
    run_dir = _synthetic_run(tmp_path / "run", pixels=False, status="failed",
                             error="KeyboardInterrupt: ")
    top = report.write_report(run_dir, progress=False).read_text().split("<nav>")[0]
    assert '<p class="status status-interrupted"><strong>Run status: interrupted' in top
    assert top.count("Run status:") == 1


def test_dead_concepts_are_noted(tmp_path, quick_figures):
    result = _fitted(False)
    F = np.array(result.F)
    F[2] = 0.0
    run_dir = _synthetic_run(tmp_path / "run", pixels=False,
                             result=dataclasses.replace(result, F=F))
    page = report.write_report(run_dir, progress=False).read_text()
    note = "1 of 4 concepts are empty (all-zero rows of F): concepts 2."
    assert note in page.split("<nav>")[0] and note in _section(page, "summary")
    assert "concept 2 · empty (no mass)" in page


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def drawn(toy, tmp_path):
    """A copy of the toy run with its report, to redraw and break."""
    copy = tmp_path / "copy"
    shutil.copytree(toy[0], copy)
    (copy / "COMPLETE").write_text("T\n")
    (copy / "figures" / "notes.txt").write_text("the user's own file")
    return copy, _snapshot(copy)


def test_a_failing_redraw_leaves_the_previous_report(drawn, quick_figures, monkeypatch):
    run_dir, before = drawn
    assert "report.html" in before and "figures/similarity.png" in before

    def interrupted(page, out):
        raise KeyboardInterrupt

    monkeypatch.setitem(report._BUILDERS, "neighbours", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(run_dir, progress=False)
    assert _snapshot(run_dir) == before
    assert not list(run_dir.glob(".report-*"))


def _quick_builders(monkeypatch):
    """Sections that write one figure and one table each, fast."""
    def build(page, out):
        report.write_table(out, "only", [{"a": 1}])
        (out / "figures").mkdir(exist_ok=True)
        (out / "figures" / "only.png").write_bytes(b"new")
        return []

    for name in list(report._BUILDERS):
        monkeypatch.setitem(report._BUILDERS, name, build)


def test_a_redraw_replaces_the_report_outputs_and_keeps_user_files(drawn, monkeypatch):
    run_dir, before = drawn
    _quick_builders(monkeypatch)
    report.write_report(run_dir, progress=False)
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == ["notes.txt", "only.png"]
    assert sorted(p.name for p in (run_dir / "tables").iterdir()) == ["only.csv", "only.json"]
    assert (run_dir / "report.html").read_bytes() != before["report.html"]
    # Not the staging directory's private 0o700.
    assert (run_dir / "figures").stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_swap_that_fails_half_way_is_undone(drawn, monkeypatch):
    run_dir, before = drawn
    _quick_builders(monkeypatch)
    calls = []
    real_rename = os.rename

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 3:  # figures swapped, tables moved aside: fail the next one
            raise OSError("disk full")
        return real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        report.write_report(run_dir, progress=False)
    monkeypatch.setattr(rundir.os, "rename", real_rename)
    assert len(calls) == 3 + 2  # the third rename of the swap failed; two undid it
    assert _snapshot(run_dir) == before
    assert not list(run_dir.glob(".report-*"))


def test_a_swap_killed_half_way_is_repaired_by_the_next_redraw(drawn, monkeypatch):
    run_dir, before = drawn
    # What a kill between the two renames of a swap leaves: no figures/, the old one aside.
    aside = run_dir / ".report-killed" / "previous"
    aside.mkdir(parents=True)
    os.rename(run_dir / "figures", aside / "figures")
    (run_dir / ".report-killed" / "tables").mkdir()
    monkeypatch.setitem(report._BUILDERS, "summary", lambda page, out: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        report.write_report(run_dir, progress=False)
    assert _snapshot(run_dir) == before
    assert not list(run_dir.glob(".report-*"))


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
        (["--layer", "conv9"], ("unknown layer 'conv9' for model SmallCNN; expected some "
                                "of conv1, conv2, conv3, pool")),
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


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(report)
    assert result.attempted >= 3 and result.failed == 0
