"""``report.html``: one self-contained page of a run's concepts, figures and tables.

:func:`write_report` reads a run directory written by :func:`jaxcnmf.runs.pipeline.run`
(``run.json``, ``factorization.npz``, ``probe.npz``, ``analysis.json`` and, when the TCAV
step ran, ``tcav.json``/``tcav.npz``), recomputes the
analyses that need only the factorization and the probe set, draws the figures with
:mod:`jaxcnmf.runs.figures`, writes them to ``figures/*.png`` and the tables to
``tables/*.csv`` and ``tables/*.json``, and writes ``report.html`` with every image
embedded as a base64 PNG, so the page opens offline and can be mailed as one file.

Everything is drawn into a staging directory and swapped in at the end
(:func:`jaxcnmf.runs.rundir.swap_in_report`): a redraw that fails or is killed leaves the
previous figures, tables and page in place. A figure that cannot be drawn costs one line
on the page (and a :class:`FigureWarning`), never the rest of the report.

Every analysis that ranks or assigns concepts from ``F`` (class shares, concept table,
each image's strongest concept, purity, NMI, the concept order, the neighbours' concept
mix) uses the fit's scaled F (:func:`jaxcnmf.concepts.labels.scaled_F`): row ``k`` times
its concept's weighted loading norm, which does not depend on how the solver split the
scale between the loadings and ``F``.

The page opens with the run's status (complete, running, interrupted or failed) from
``run.json``. CSV cells that start with ``= + - @``, a tab or a carriage return get a
leading ``'`` (OWASP's advice against CSV injection); the JSON tables keep the raw text.

Sections (the ``id`` of each ``<section>``): ``settings``, ``summary``, ``concepts``,
``layers``, ``neighbours``, ``fidelity``, ``tcav``, ``objective``.

Example:
    >>> from jaxcnmf.runs.report import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcnmf.runs import rundir

SECTIONS = (
    ("settings", "Run settings"),
    ("summary", "Summary scores"),
    ("concepts", "Concept gallery"),
    ("layers", "Neurons per layer"),
    ("neighbours", "Neighbours and entropy"),
    ("fidelity", "Fidelity"),
    ("tcav", "TCAV"),
    ("objective", "Objective history"),
)

SCALED_F_NOTE = (
    "Concepts are ranked and assigned on the scaled F (each row of F times its concept's "
    "weighted loading norm), so class shares, strongest concepts, purity, NMI, the concept "
    "order and the neighbours' concept mix do not depend on how the solver split the scale "
    "between the loadings and F."
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 72rem; padding: 1rem 2rem;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
nav a { margin-right: 1rem; } .note { color: #555; font-size: 0.92rem; }
.status { padding: 0.4rem 0.8rem; border-radius: 4px; margin: 0.5rem 0; }
.status-complete { background: #e6f4ea; } .status-running { background: #fff4d6; }
.status-interrupted, .status-failed, .status-unknown { background: #fde2e1; }
.failed { color: #a00; }
.table-wrap { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.45rem; text-align: left; }
td { overflow-wrap: break-word; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 0.8rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9rem; }
.concept { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; margin: 1rem 0; }
.concept h3 { margin-top: 0.2rem; }
.strip { display: flex; flex-wrap: wrap; gap: 0.5rem; }
.thumb { margin: 0; text-align: center; }
.thumb img { width: 96px; height: 96px; image-rendering: pixelated; }
"""


class FigureWarning(UserWarning):
    """A figure of the report could not be drawn; the page marks it and goes on."""


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def figure_block(out_dir: Path, name: str, figure, caption: str,
                 failures: list[str] | None = None) -> str:
    """Draw a figure to ``out_dir/figures/<name>.png`` and return it as an HTML block.

    Args:
        out_dir: where ``figures/`` goes.
        name: the PNG's stem.
        figure: a matplotlib Figure, or a function of no arguments that builds one (then
            an error while building it is caught too).
        caption: the figure's caption.
        failures: a list that collects the names of figures that failed.

    Returns:
        A ``<figure>`` with the PNG inline; when drawing raised an ``Exception``, one
        ``<p class="note failed">`` line naming the figure and the error instead (and a
        :class:`FigureWarning`), so the rest of the report is still written.
    """
    from jaxcnmf.runs import figures

    try:
        fig = figure() if callable(figure) else figure
        path = figures.save_figure(fig, Path(out_dir) / "figures" / f"{name}.png")
    except Exception as err:  # noqa: BLE001 (one figure must not cost the whole report)
        line = _one_line(err)
        warnings.warn(f"report: figure {name!r} could not be drawn ({line}); the page "
                      "marks it and the report goes on", FigureWarning, stacklevel=2)
        if failures is not None:
            failures.append(name)
        return (f'<p class="note failed">Figure {html.escape(repr(name))} could not be '
                f"drawn ({html.escape(line)}); the tables are unaffected.</p>")
    return figure_html(path.read_bytes(), caption)


def figure_html(png: bytes, caption: str, alt: str | None = None) -> str:
    """A ``<figure>`` holding ``png`` as a base64 data URI, with a caption."""
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt or caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{html.escape(str(value))}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    # A path may break after a slash; no word or number is ever broken inside (with
    # overflow-wrap: anywhere the browser squeezed wide tables into the page by breaking
    # "conv2" and "0.04667" over two lines, instead of letting the wrapper scroll).
    return f"<td>{html.escape(str(value)).replace('/', '/<wbr>')}</td>"


# Table headers as a reader says them; the CSV and JSON files keep the machine names.
HEADERS = {
    "original_accuracy": "accuracy with the layer's own activations",
    "accuracy_drop": "accuracy drop",
    "relative_error": "relative error",
    "largest_eigenvalue": "largest eigenvalue",
    "identity_distance": "distance from identity ‖S − I‖",
    "entropy_low": "entropy from (bits)",
    "entropy_high": "entropy to (bits)",
    "count": "images",
    "mean_score": "mean TCAV score",
    "std_score": "std of TCAV score",
    "random_mean": "mean random score",
    "magnitude": "magnitude score",
    "cav_accuracy": "CAV accuracy",
    "p_value": "p-value",
    "p_adjusted": "corrected p-value",
    "constant_gradient": "constant gradient",
}


def human_header(column: str) -> str:
    """A table header for a reader: ``p_adjusted`` -> ``corrected p-value``.

    Example:
        >>> human_header("top_3_mean"), human_header("some_other_name")
        ('mean of top 3 eigenvalues', 'some other name')
    """
    if column in HEADERS:
        return HEADERS[column]
    top = re.fullmatch(r"top_(\d+)_mean", column)
    if top:
        return f"mean of top {top.group(1)} eigenvalues"
    return column.replace("_", " ")


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
               headers: dict[str, str] | None = None) -> str:
    """An HTML table of ``rows`` (dicts) in a horizontally scrolling wrapper.

    Args:
        rows: one dict per row.
        columns: keys to show, in order; default the first row's keys.
        headers: header text per key; default :func:`human_header` of the key.
    """
    if not rows:
        return '<p class="note">(empty)</p>'
    columns = list(columns or rows[0].keys())
    headers = headers or {}
    head = "".join(f"<th>{html.escape(headers.get(c, human_header(str(c))))}</th>"
                   for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(row.get(c, "")) for c in columns) + "</tr>" for row in rows
    )
    # Wide tables scroll inside their wrapper instead of widening the page.
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def paragraph(text: str, note: bool = False) -> str:
    """A ``<p>`` of escaped text; ``note`` renders it small and grey."""
    klass = ' class="note"' if note else ""
    return f"<p{klass}>{html.escape(text)}</p>"


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ tab CR gets a ``'``.

    Numbers (and booleans, None) are returned unchanged, so they stay numbers.

    Example:
        >>> csv_safe("=HYPERLINK(1)"), csv_safe("-x"), csv_safe(-0.5), csv_safe("cat")
        ("'=HYPERLINK(1)", "'-x", -0.5, 'cat')
    """
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_table(run_dir: Path, name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` to ``run_dir/tables/<name>.csv`` and ``<name>.json``.

    CSV text cells go through :func:`csv_safe`; the JSON keeps the values as they are.
    """
    tables = Path(run_dir) / "tables"
    tables.mkdir(exist_ok=True)
    (tables / f"{name}.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(tables / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[csv_safe(c) for c in columns])
        writer.writeheader()
        writer.writerows({csv_safe(key): csv_safe(value) for key, value in row.items()}
                         for row in rows)


def render_html(title: str, subtitle: str, sections: Iterable[tuple[str, str, list[str]]],
                banner: Sequence[str] = ()) -> str:
    """The whole page: a header with links to each section, then the sections.

    Args:
        title: page title and ``<h1>``.
        subtitle: one line under the title.
        sections: ``(id, heading, blocks)`` with ``blocks`` ready-made HTML strings.
        banner: HTML blocks shown at the top, under the title (the run's status).

    Returns:
        str: a complete HTML document with no external references.
    """
    sections = list(sections)
    nav = "".join(f'<a href="#{sid}">{html.escape(heading)}</a>' for sid, heading, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(heading)}</h2>{"".join(blocks)}</section>'
        for sid, heading, blocks in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1>{''.join(banner)}"
        f"{paragraph(subtitle, note=True)}<nav>{nav}</nav></header>{body}"
        '<footer><p class="note">Written by jaxcnmf.</p></footer></body></html>\n'
    )


PIXEL_VIEWS = ("red", "green", "blue", "gray")


def _group_sparsity(config, factorization) -> str:
    """The group penalty as set (a fraction of lambda_max, or absolute) and as used."""
    fraction = config.get("group_lam_fraction")
    used = factorization.get("group_lam", config.get("group_lam", 0.0))
    if fraction:
        return f"{fraction:g} of lambda_max (group_lam {used:.4g}) over {config['groups']}"
    return f"{used:g} over {config['groups']}" if used else "off"


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_status(run_dir: Path, record: dict, status: str | None = None) -> tuple[str, str]:
    """The run's state for the top of the page, and one sentence about it.

    Args:
        run_dir: the run directory (its ``COMPLETE`` file means complete).
        record: ``run.json``.
        status: the state to show instead of the one on disk (the run's own report
            stage passes "complete": it is the last stage, and the page only exists
            when it succeeds).

    Returns:
        (state, sentence), state one of "complete", "running", "interrupted", "failed"
        or "unknown".
    """
    if status is None:
        if (Path(run_dir) / rundir.COMPLETE).is_file():
            status = "complete"
        else:
            status = str(record.get("status") or "unknown")
    error = str(record.get("error") or "")
    if status == "failed" and error.startswith(("KeyboardInterrupt", "SystemExit", "Interrupted")):
        status = "interrupted"
    because = f" ({' '.join(error.split())[:200]})" if error else ""
    sentences = {
        "complete": "complete" + (f", finished {record['finished']}"
                                  if record.get("finished") else "") + ".",
        "running": "running: the run had not finished when this page was drawn (or it was "
                   "killed before it could record that); what it has not saved yet is "
                   "missing here and its results may still change.",
        "interrupted": f"interrupted{because}: the run stopped before it finished; this "
                       "page shows what it had saved.",
        "failed": f"failed{because}: the run stopped before it finished; this page shows "
                  "what it had saved.",
    }
    if status not in sentences:
        return "unknown", f"{status!r}: run.json does not say whether the run finished."
    return status, sentences[status]


class _Page:
    """The analyses of one saved run, computed once and shared by the sections."""

    def __init__(self, saved):
        from jaxcnmf.concepts import images, neighbours, neurons
        from jaxcnmf.concepts.labels import (
            class_shares,
            cluster_purity,
            concept_order,
            concept_table,
            nmi,
            purity,
            scaled_F,
            strongest_concept,
        )

        self.saved = saved
        self.record = saved.record
        self.config = saved.record["config"]
        self.result = saved.result
        self.failures: list[str] = []
        raw = np.asarray(saved.result.F, dtype=np.float64)
        # Concepts that died in the fit: rows of F that are exactly zero.
        self.dead = [int(k) for k in np.flatnonzero(~np.any(raw > 0, axis=1))]
        self.F = scaled_F(raw, saved.result.loadings,
                          saved.result.config.get("weights") or None)
        self.class_names = tuple(saved.record["dataset"]["class_names"])
        self.superclass_names = tuple(saved.record["dataset"].get("superclass_names") or ())
        self.layers = [v for v in saved.result.view_names if v not in PIXEL_VIEWS]
        self.channels = [v for v in saved.result.view_names if v in PIXEL_VIEWS]
        labels, coarse = saved.labels, saved.coarse_labels
        self.coarse = coarse if self.superclass_names else None
        num_classes = len(self.class_names)
        self.shares = class_shares(self.F, labels, num_classes)
        self.records = concept_table(
            self.F, labels, self.class_names,
            coarse_labels=self.coarse,
            superclass_names=self.superclass_names or None,
            top=3, n_images=self.config["top_images"],
        )
        strongest = strongest_concept(self.F)
        self.scores = {
            "purity": purity(self.F, labels, num_classes),
            "cluster_purity": cluster_purity(strongest, labels),
            "nmi": nmi(strongest, labels),
        }
        if self.coarse is not None:
            self.scores["superclass_purity"] = purity(
                self.F, self.coarse, len(self.superclass_names))
            self.scores["superclass_cluster_purity"] = cluster_purity(strongest, self.coarse)
            self.scores["superclass_nmi"] = nmi(strongest, self.coarse)
        # One concept order for the gallery, the tables, the heatmaps and TCAV.
        self.order = concept_order(self.F, labels, num_classes)
        self.layer_summary = (
            neurons.layer_summary({l: saved.result.loadings[l] for l in self.layers},
                                   top_k=3, order=self.order)
            if self.layers else None
        )
        self.latent = self.masks = None
        if self.channels:
            self.latent = images.latent_images(
                {c: saved.result.loadings[c] for c in self.channels}, saved.images.shape[1:])
            self.masks = images.median_mask(self.latent)
        n = self.F.shape[1]
        self.k = max(1, min(int(self.config["neighbours"]), n - 1))
        self.correct = saved.predictions == labels
        self.entropy = neighbours.neighbour_entropy_all(self.F, self.k) if n > 1 else np.zeros(n)
        self.accuracy_table = neighbours.accuracy_vs_entropy(self.entropy, self.correct, bins=5)
        self.examples = self._neighbour_examples()

    def figure(self, out_dir: Path, name: str, draw: Callable, caption: str) -> str:
        """:func:`figure_block` that records a failure in ``self.failures``."""
        return figure_block(out_dir, name, draw, caption, failures=self.failures)

    def class_of(self, index: int) -> str:
        """Image ``index``'s class name, quoted."""
        return f"'{self.class_names[int(self.saved.labels[int(index)])]}'"

    def _neighbour_examples(self, count: int = 3):
        """Queries for the neighbour section: the lowest-, middle- and highest-entropy images."""
        from jaxcnmf.concepts import neighbours

        if self.F.shape[1] < 2:
            return []
        by_entropy = np.argsort(self.entropy, kind="stable")
        picks = by_entropy[np.linspace(0, len(by_entropy) - 1, count).round().astype(int)]
        return [
            {metric: neighbours.neighbour_concepts(self.F, int(i), self.k, metric)
             for metric in neighbours.METRICS}
            for i in dict.fromkeys(picks.tolist())
        ]


def _dead_note(page: _Page) -> str | None:
    if not page.dead:
        return None
    rank = page.F.shape[0]
    return (f"{len(page.dead)} of {rank} concepts are empty (all-zero rows of F): concepts "
            f"{', '.join(map(str, page.dead))}. The fit lost them (often a group penalty "
            "too strong for the data); they carry no images and are left out of purity.")


def _settings_section(page: _Page, out: Path) -> list[str]:
    record, config, result = page.record, page.config, page.result
    model = record.get("model", {})
    dataset = record["dataset"]
    settings = [
        ("command", config["command"]),
        ("model", f"{model.get('name', '?')} ({model['kind']} network from {model['module']})"
                  if model.get("module") else
                  f"{model.get('name', '?')} (width {model.get('width', config.get('width', '?'))})"),
        ("checkpoint", model.get("checkpoint") or ("as its builder returned it"
                                                   if model.get("module") else
                                                   "trained by this run")),
        ("test accuracy (at training)", _num(model.get("accuracy"))),
        ("accuracy on the probe set", _num(record.get("probe_accuracy"))),
        ("dataset", f"{dataset['name']}, {dataset['split']} split"),
        ("probe images", f"{dataset['probe_images']} ({config['per_class']} per class)"),
        ("layers", ", ".join(record["layers"])),
        ("pixel views", ", ".join(page.channels) or "none"),
        ("pooling", config["pooling"]),
        ("rank", config["rank"]),
        ("method", config["method"]),
        ("seed", config["seed"]),
        ("iterations", (f"{result.n_iter} of {config['max_iter']}"
                        f" ({'converged' if result.converged else 'not converged'})")),
        ("restarts", config["restarts"]),
        ("devices", record.get("factorization", {}).get("devices", 1)),
        ("stability across restarts", _num(result.stability)),
        ("view weights", (config["weights"] or "none") + (
            f", pixel views' share {config['pixel_share']:g}"
            if config.get("pixel_share") and page.channels else "")),
        ("unit columns", config["unit_columns"]),
        ("group sparsity", _group_sparsity(config, record.get("factorization", {}))),
        *([("activation store", _store_text(record["store"]))] if record.get("store") else []),
        ("started", record.get("started", "")),
    ]
    settings_rows = [{"setting": key, "value": value} for key, value in settings]
    view_rows = [
        {"view": name, "rows": int(result.loadings[name].shape[0]),
         "relative error": float(result.relative_errors[name])}
        for name in result.view_names
    ]
    time_rows = _time_rows(record)
    write_table(out, "settings", settings_rows)
    write_table(out, "relative_errors", view_rows)
    write_table(out, "wall_times", time_rows)
    return [
        table_html(settings_rows),
        "<h3>Views: relative reconstruction error ||X - W F|| / ||X||</h3>",
        table_html(view_rows),
        "<h3>Wall time per stage</h3>",
        table_html(time_rows),
        paragraph("The report stage is not timed here: this page is its output.", note=True),
    ]


def _store_text(store: dict) -> str:
    """The settings row of a run whose fit streamed from an on-disk store."""
    from jaxcnmf.runs.runstore import human_bytes

    done = {"written": "written by this run", "resumed": "resumed by this run",
            "reused": "reused from an earlier run"}.get(store.get("state"), store.get("state"))
    return (f"the fit streamed from {store['path']} ({human_bytes(store['bytes'])} on disk, "
            f"{store['blocks']} blocks of {store['block_size']} images, {store['dtype']}; "
            f"{done})")


def _time_rows(record: dict) -> list[dict]:
    rows = [{"stage": stage, "seconds": float(seconds)}
            for stage, seconds in record.get("seconds", {}).items()]
    return rows + [{"stage": "total", "seconds": float(sum(r["seconds"] for r in rows))}]


def _kmeans_superclass(page: _Page, kmeans: dict) -> dict | None:
    """k-means scores against the superclasses, from the saved assignment; None without one.

    ``analysis.json`` holds the k-means assignment as ``kmeans["assignment"]`` (one
    cluster id per probe image) in runs that save it; older runs have only the class
    scores.
    """
    from jaxcnmf.concepts.labels import cluster_purity, nmi

    if "superclass_nmi" in kmeans and "superclass_purity" in kmeans:
        return {"nmi": float(kmeans["superclass_nmi"]),
                "purity": float(kmeans["superclass_purity"])}
    assignment = kmeans.get("assignment")
    if assignment is None:
        return None
    try:
        assignment = np.asarray(assignment, dtype=np.int64)
    except (TypeError, ValueError):
        return None
    if assignment.shape != page.coarse.shape:
        return None
    return {"nmi": nmi(assignment, page.coarse), "purity": cluster_purity(assignment, page.coarse)}


def _baseline_note(page: _Page, comparisons: list[tuple[str, float, float, float, float]]) -> str:
    """What it means when k-means beats the concepts on purity/NMI, with the numbers.

    ``comparisons``: (labels, concept cluster purity, k-means purity, concept NMI, k-means
    NMI) per kind of label.
    """
    wins = [
        f"{labels} NMI {k_nmi:.2f} against {c_nmi:.2f} for the concepts, cluster purity "
        f"{k_pur:.2f} against {c_pur:.2f}"
        for labels, c_pur, k_pur, c_nmi, k_nmi in comparisons
        if k_nmi > c_nmi or k_pur > c_pur
    ]
    if not wins:
        return ""
    pixels = (" and the pixels" if page.channels else "")
    return (
        f"k-means scores higher here ({'; '.join(wins)}). That is what this comparison "
        "measures, not a fault found in the concepts: k-means optimises exactly a "
        "partition of these layer activations into k groups, one group per image, and "
        "purity and NMI score partitions against the labels. The concepts are a "
        "different object: a shared, additive, non-exclusive description in which each "
        f"image is a weighted sum of several concepts that must explain every layer{pixels} "
        "at once, and an image's 'cluster' here is only its largest weight. Read the "
        "baseline as how well the activations alone separate the labels, not as a "
        "competing set of concepts."
    )


def _pixel_cost_note(page: _Page, unpixelled: dict) -> str:
    """How much coupling the pixel views in (the paper's setting) costs or gains."""
    d_nmi = page.scores["nmi"] - float(unpixelled["nmi"])
    d_purity = page.scores["cluster_purity"] - float(unpixelled["purity"])
    return (f"Coupling the pixel views into the factorization (the paper's setting) changes "
            f"class NMI by {d_nmi:+.3f} and cluster purity by {d_purity:+.3f} here, against "
            f"the same fit of the layers alone. The pixels "
            f"give each concept its latent image; they also pull concepts towards what "
            f"images look like rather than what the network computes.")


def _summary_section(page: _Page, out: Path) -> list[str]:
    kmeans = page.saved.network.get("kmeans")
    rank = page.config["rank"]
    nmf = f"coupled NMF (rank {rank})"
    rows = [
        {"method": nmf, "labels": "class", "concept purity": page.scores["purity"],
         "cluster purity": page.scores["cluster_purity"], "NMI": page.scores["nmi"]},
    ]
    blocks = []
    unpixelled = page.saved.network.get("without_pixels")
    if unpixelled:
        rows.append({"method": f"the same fit without the pixel views (rank {rank})",
                     "labels": "class", "concept purity": "n/a",
                     "cluster purity": unpixelled["purity"], "NMI": unpixelled["nmi"]})
        blocks.append(paragraph(_pixel_cost_note(page, unpixelled), note=True))
    if kmeans is None:
        write_table(out, "summary", rows)
        return [paragraph("The k-means baseline was skipped for this run (--no-baseline)."),
                paragraph(SCALED_F_NOTE, note=True), table_html(rows), *blocks,
                *([paragraph(_dead_note(page))] if _dead_note(page) else [])]
    means = f"k-means on the layer activations (k={kmeans['k']})"
    rows.append({"method": means, "labels": "class", "concept purity": "n/a",
                 "cluster purity": kmeans["purity"], "NMI": kmeans["nmi"]})
    comparisons = [("class", page.scores["cluster_purity"], float(kmeans["purity"]),
                    page.scores["nmi"], float(kmeans["nmi"]))]
    if "superclass_nmi" in page.scores:
        rows.append({"method": nmf, "labels": "superclass",
                     "concept purity": page.scores["superclass_purity"],
                     "cluster purity": page.scores["superclass_cluster_purity"],
                     "NMI": page.scores["superclass_nmi"]})
        coarse = _kmeans_superclass(page, kmeans)
        if coarse is None:
            rows.append({"method": means, "labels": "superclass", "concept purity": "n/a",
                         "cluster purity": "n/a", "NMI": "n/a"})
            blocks.append(paragraph(
                "k-means against the superclasses: unavailable, because this run did not "
                "save the k-means assignment (analysis.json has only its class scores).",
                note=True))
        else:
            rows.append({"method": means, "labels": "superclass", "concept purity": "n/a",
                         "cluster purity": coarse["purity"], "NMI": coarse["nmi"]})
            comparisons.append(("superclass", page.scores["superclass_cluster_purity"],
                                coarse["purity"], page.scores["superclass_nmi"],
                                coarse["nmi"]))
    write_table(out, "summary", rows)
    note = _baseline_note(page, comparisons)
    dead = _dead_note(page)
    return [
        paragraph(
            "Concept purity: the mean over concepts of the share of a concept's weight (row "
            "of F) that falls on its top class (the paper's reading of F). Cluster purity: "
            "each image goes to its strongest concept (or k-means cluster), and the mean "
            "over clusters of the share of the commonest label is taken; it and NMI "
            "(normalized mutual information between cluster and label) compare the two "
            "methods on the same footing. The baseline clusters the same layer activations "
            f"({', '.join(kmeans['views'])}) with k-means, each view's columns scaled to "
            "unit norm."
        ),
        paragraph(SCALED_F_NOTE, note=True),
        table_html(rows),
        *([paragraph(note)] if note else []),
        *blocks,
        *([paragraph(dead)] if dead else []),
    ]


def _concept_rows(page: _Page) -> list[dict]:
    """The concept table's rows, in the page's concept order."""
    rows = []
    for k in page.order:
        record = page.records[int(k)]
        row = {
            "concept": record.concept,
            "mass": record.mass,
            "top classes": "; ".join(f"'{n}' {s:.2f}" for n, s in record.top_classes),
            "entropy (bits)": record.entropy_bits,
            "entropy (normalized)": record.entropy_normalized,
        }
        if record.top_superclasses is not None:
            row["top superclasses"] = "; ".join(
                f"'{n}' {s:.2f}" for n, s in record.top_superclasses)
            row["superclass entropy (bits)"] = record.superclass_entropy_bits
        row["top images (#)"] = " ".join(str(int(i)) for i in record.top_images)
        rows.append(row)
    return rows


def _image_strip(images, indices, captions) -> str:
    """The images at ``indices`` as inline PNGs, drawn large with square pixels."""
    from PIL import Image

    cells = []
    for index, caption in zip(indices, captions):
        image = images[int(index)]
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        cells.append(
            f'<figure class="thumb"><img src="data:image/png;base64,{data}" '
            f'alt="probe image #{int(index)}"><figcaption>{html.escape(str(caption))}'
            "</figcaption></figure>"
        )
    return f'<div class="strip">{"".join(cells)}</div>'


def _concepts_section(page: _Page, out: Path) -> list[str]:
    from jaxcnmf.runs import figures

    rows = _concept_rows(page)
    write_table(out, "concepts", rows)
    json_rows = [page.records[int(k)].to_dict() for k in page.order]
    (Path(out) / "tables" / "concepts_full.json").write_text(json.dumps(json_rows, indent=2))
    blocks = [
        paragraph(
            "Each concept is a row of F. Its top images are the probe images with the largest "
            "weight; its class shares are the fractions of the row's mass on each class. "
            "Concepts are listed in one order throughout the page (grouped by top class, "
            "purest first): this table, the gallery, the heatmaps and the TCAV section. "
            "#n is a probe image's index (its column of F); class names are in quotes. "
            + ("The latent image is the concept's column of the pixel loadings (each channel "
               "scaled to [0, 1]); the overlays keep the pixels above its median."
               if page.latent is not None else
               "This run factorized no pixel views, so there are no latent images.")
        ),
        table_html(rows),
        page.figure(out, "class_shares",
                    lambda: figures.class_share_heatmap(page.shares, page.class_names,
                                                        order=page.order),
                    "Class shares of each concept (rows in the page's concept order)."),
    ]
    n_images = int(page.config["top_images"])
    for k in page.order:
        record = page.records[int(k)]
        if page.latent is None:
            top = record.top_images[:n_images]
            body = _image_strip(page.saved.images, top,
                                [f"#{int(i)} · class {page.class_of(i)}" for i in top])
        else:
            body = page.figure(
                out, f"concept_{record.concept:02d}",
                lambda record=record, k=int(k): figures.concept_tile(
                    page.saved.images, record, page.latent[k], page.masks[k],
                    n_images=n_images, labels=page.saved.labels,
                    class_names=page.class_names),
                f"Concept {record.concept}: top images (above each: probe index # and "
                "class), masked overlays, latent image, median mask and top classes.")
        blocks.append(
            f'<div class="concept" id="concept-{record.concept}">'
            f"<h3>{html.escape(figures.concept_heading(record))}</h3>{body}</div>"
        )
    return blocks


def _layers_section(page: _Page, out: Path) -> list[str]:
    from jaxcnmf.runs import figures

    summary = page.layer_summary
    if summary is None:
        return [paragraph("This run factorized no layers.")]
    rows = summary.to_rows()
    # One row per eigenvalue and one column per layer: a table rank rows long but only
    # layers + 1 columns wide, which fits a narrow page at any rank.
    rank = max(len(summary.eigenvalues[layer]) for layer in summary.layers)
    eigen_rows = []
    for i in range(rank):
        row: dict[str, Any] = {"eigenvalue": i + 1}
        for layer in summary.layers:
            values = summary.eigenvalues[layer]
            row[layer] = float(values[i]) if i < len(values) else None
        eigen_rows.append(row)
    write_table(out, "layers", rows)
    write_table(out, "eigenvalues", eigen_rows)
    eigen_headers = {"eigenvalue": "eigenvalue number",
                     **{layer: str(layer) for layer in summary.layers}}
    return [
        paragraph(
            "For each layer, the cosine similarity between the columns of its loadings O_j "
            "(one column per concept, in the page's concept order in every heatmap). "
            "Concepts that use disjoint neurons give the identity; eigenvalues (sorted, "
            "from eigvalsh) near 1 mean separate neurons, a large first eigenvalue means "
            "shared ones."
        ),
        page.figure(out, "similarity", lambda: figures.similarity_heatmaps(summary),
                    "Cosine similarity of loading columns per layer."),
        page.figure(out, "eigenvalues", lambda: figures.layer_summary_plot(summary),
                    f"Largest eigenvalue, mean of the top {summary.top_k} and distance from "
                    "the identity, per layer."),
        table_html(rows),
        "<h3>Eigenvalues, largest first</h3>",
        page.figure(out, "eigenvalue_spectra", lambda: figures.eigenvalue_plot(summary),
                    "Every eigenvalue of each layer's loading similarity, largest first."),
        "<details><summary>Eigenvalues as a table (one column per layer)</summary>",
        table_html(eigen_rows, headers=eigen_headers),
        "</details>",
    ]


def _neighbours_section(page: _Page, out: Path) -> list[str]:
    from jaxcnmf.runs import figures

    table = page.accuracy_table
    rows = table.to_rows()
    write_table(out, "accuracy_vs_entropy", rows)
    blocks = [
        paragraph(
            f"Each image's {page.k} nearest neighbours in F-space (columns of the scaled F), "
            "the distribution of their strongest concepts and its entropy. Examples: the "
            "images with the lowest, median and highest entropy. Above each thumbnail: the "
            "image's probe index (#n, its column of F) and its class in quotes; under it, "
            "'query' or the neighbour's rank (neighbour 1 is the nearest)."
        )
    ]
    example_rows = []
    for number, example in enumerate(page.examples):
        for metric, result in example.items():
            index = int(result.index)
            blocks.append(page.figure(
                out, f"neighbours_{number}_{metric}",
                lambda result=result: figures.neighbour_figure(
                    page.saved.images, result, labels=page.saved.labels,
                    class_names=page.class_names, order=page.order),
                f"Query: probe image #{index} (class {page.class_of(index)}) and its "
                f"{len(result.neighbours)} nearest neighbours by {metric} distance; entropy "
                f"of their strongest concepts {result.entropy_bits:.2f} bits."))
            example_rows.append({"query image (#)": index, "class": page.class_of(index),
                                 "metric": metric, "entropy (bits)": result.entropy_bits,
                                 "neighbours (#)": " ".join(map(str, result.neighbours.tolist()))})
    write_table(out, "neighbour_examples", example_rows)
    blocks += [
        "<h3>Network accuracy against neighbourhood entropy</h3>",
        page.figure(out, "accuracy_vs_entropy", lambda: figures.accuracy_entropy_plot(table),
                    "Accuracy of the network per bin of neighbour entropy (cosine)."),
        table_html(rows),
    ]
    return blocks


def _fidelity_section(page: _Page, out: Path) -> list[str]:
    from jaxcnmf.concepts import fidelity
    from jaxcnmf.runs import figures

    rows = page.saved.network["fidelity"]
    write_table(out, "fidelity", rows)
    blocks = [paragraph(
        "Accuracy of the network on the probe images when a layer's activations are "
        "replaced by their reconstruction O_j F, with F computed from that layer alone "
        "(FitResult.transform), against its accuracy with the layer's own activations. "
        "It says how much of what the network uses the concepts capture.")]
    measured = page.saved.network.get("fidelity_images")
    total = int(page.record["dataset"]["probe_images"])
    if measured is not None and measured < total:
        blocks.append(paragraph(
            f"Fidelity on {measured} of {total} images: a random subset of the probe set "
            "(--fidelity-images; from a store the network runs on a subset, whose "
            "activations are read from the store); the fits use every image.", note=True))
    skipped = page.saved.network.get("fidelity_skipped") or []
    if skipped:
        blocks.append(paragraph(
            f"Not measured for {', '.join(skipped)}: pooled conv activations "
            f"(--pooling {page.config['pooling']}) cannot be put back into the network.",
            note=True))
    if not rows:
        return blocks
    tables = []
    for layer in dict.fromkeys(row["layer"] for row in rows):
        mine = [row for row in rows if row["layer"] == layer]
        tables.append(fidelity.FidelityTable(
            layer=layer, original_accuracy=mine[0]["original_accuracy"],
            ranks=np.array([row["rank"] for row in mine]),
            accuracy=np.array([row["accuracy"] for row in mine]),
            relative_error=np.array([row["relative_error"] for row in mine])))
    blocks += [
        page.figure(out, "fidelity", lambda: figures.fidelity_plot(tables),
                    "Accuracy with each layer replaced by its reconstruction, per rank."),
        table_html(rows),
    ]
    return blocks


TCAV_COLUMNS = ("layer", "concept", "class", "direction", "mean_score", "std_score",
                "random_mean", "magnitude", "cav_accuracy", "p_adjusted")

# The arrays of a TcavResult whose axis 1 runs over concepts.
_TCAV_CONCEPT_ARRAYS = ("scores", "random_scores", "magnitudes", "random_magnitudes",
                        "cav_accuracies", "random_cav_accuracies", "p_values", "adjusted",
                        "significant")


def tcav_in_order(result, order):
    """``result`` with its concepts in the report's ``order``.

    The run's TCAV concepts are named ``concept<k>`` after row ``k`` of F; a result
    whose names are not exactly those (e.g. user concepts) is returned unchanged.

    Args:
        result: a :class:`jaxcnmf.concepts.tcav.TcavResult`.
        order: (rank,) permutation of the concept ids.
    """
    order = [int(k) for k in order]
    if tuple(result.concepts) != tuple(f"concept{k}" for k in range(len(order))):
        return result
    arrays = {name: np.take(getattr(result, name), order, axis=1)
              for name in _TCAV_CONCEPT_ARRAYS}
    return dataclasses.replace(result, concepts=tuple(result.concepts[k] for k in order),
                               **arrays)


def _direction(row: dict) -> str:
    """"above" / "below" random for a significant cell, "" otherwise."""
    if not row["significant"]:
        return ""
    return "above" if row["mean_score"] > row["random_mean"] else "below"


def tcav_headline(rows: Sequence[dict[str, Any]]) -> str:
    """Significant cells, counted apart above and below random.

    Example:
        >>> tcav_headline([{"significant": True, "mean_score": 0.9, "random_mean": 0.5},
        ...                {"significant": True, "mean_score": 0.1, "random_mean": 0.5},
        ...                {"significant": False, "mean_score": 0.5, "random_mean": 0.5}])
        '2 of 3 cells significant: 1 above random (the concept raises the class logit more often than random directions do), 1 below random (less often)'
    """
    above = sum(_direction(row) == "above" for row in rows)
    below = sum(_direction(row) == "below" for row in rows)
    return (f"{above + below} of {len(rows)} cells significant: {above} above random (the "
            "concept raises the class logit more often than random directions do), "
            f"{below} below random (less often)")


def _constant_gradient_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One warning per layer whose rows carry ``constant_gradient`` (see ``tcav.run``)."""
    flagged: dict[str, dict[str, None]] = {}
    every: dict[str, dict[str, None]] = {}
    for row in rows:
        every.setdefault(row["layer"], {})[row["class"]] = None
        if row.get("constant_gradient"):
            flagged.setdefault(row["layer"], {})[row["class"]] = None
    notes = []
    for layer, classes in flagged.items():
        which = ("every class" if len(classes) == len(every[layer])
                 else "classes " + ", ".join(f"'{c}'" for c in classes))
        notes.append(
            f"Warning: at {layer} the class-logit gradient is the same for every image of "
            f"{which}: the network is linear from {layer} to those logits (an average pool "
            "and a dense layer), so their TCAV scores are all 0 or 1 and say only on which "
            "side of that one gradient each CAV lies. Test an earlier layer "
            "('jaxcnmf tcav RUN_DIR --layer ...').")
    return notes


def _tcav_section(page: _Page, out: Path) -> list[str]:
    from jaxcnmf.concepts import tcav
    from jaxcnmf.runs import figures

    result = page.saved.tcav
    if result is None:
        return [paragraph(
            "This run has no TCAV results. Add them with 'jaxcnmf tcav RUN_DIR' (options: "
            "'jaxcnmf tcav --help'), or pass --tcav to analyze or demo; this section then "
            "shows the concept x class heatmap of TCAV scores.")]
    result = tcav_in_order(result, page.order)
    config = result.config
    rows = [{**row, "direction": _direction(row)} for row in result.table()]
    write_table(out, "tcav", rows)
    significant = [row for row in rows if row["significant"]]
    blocks = [
        paragraph(
            f"Each concept is the {config.get('top', '?')} probe images with the largest "
            "weight in its row of F. At each layer, a linear classifier "
            f"({config['cav_method']}) separates their activations from those of "
            f"{config['random_runs']} random sets of probe images; its unit normal is the "
            "concept activation vector (CAV). A cell's TCAV score is the fraction of the "
            "class's probe images whose logit for that class rises along the CAV, averaged "
            "over the random runs. The scores are tested against random-vs-random CAVs with "
            "a two-sided Welch t-test, corrected for the whole grid "
            f"({'Benjamini-Hochberg' if result.correction == 'bh' else 'Bonferroni'}); a cell "
            f"is significant when the corrected p-value is at most {result.alpha}. "
            "Concepts are in the page's concept order."),
        paragraph(f"{tcav_headline(rows)}; TCAV took "
                  f"{result.timings.get('total', 0.0):.1f} s.", note=True),
    ]
    blocks.extend(paragraph(text) for text in _constant_gradient_notes(rows))
    for layer in result.layers:
        def draw(layer=layer):
            with figures.plain_text():
                return tcav.figure(result, layer)
        blocks.append(page.figure(
            out, f"tcav_{layer}", draw,
            f"Mean TCAV score of each concept (row) for each class (column) at {layer}; "
            "hatched grey cells are not significant."))
    blocks.append("<h3>Significant cells</h3>")
    blocks.append(table_html(significant, TCAV_COLUMNS) if significant else paragraph(
        "No cell is significant after correction.", note=True))
    return blocks


def _objective_section(page: _Page, out: Path) -> list[str]:
    from jaxcnmf.runs import figures

    history = page.result.history
    objective = np.asarray(history["objective"], dtype=np.float64)
    rows = [{"iteration": i + 1, "objective": float(v)} for i, v in enumerate(objective)]
    for name, errors in history.get("rel_error", {}).items():
        for row, value in zip(rows, np.asarray(errors, dtype=np.float64)):
            row[f"rel_error {name}"] = float(value)
    write_table(out, "history", rows)
    final = f"{objective[-1]:.6g}" if objective.size else "n/a"
    return [
        paragraph(f"{objective.size} iterations; final objective {final}; "
                  f"{'converged' if page.result.converged else 'stopped at max_iter'}."),
        page.figure(out, "history", lambda: figures.history_plot(history),
                    "Objective and relative error per view over the iterations."),
    ]


_BUILDERS = {
    "settings": _settings_section,
    "summary": _summary_section,
    "concepts": _concepts_section,
    "layers": _layers_section,
    "neighbours": _neighbours_section,
    "fidelity": _fidelity_section,
    "tcav": _tcav_section,
    "objective": _objective_section,
}


def _banner(page: _Page, state: str, sentence: str) -> list[str]:
    blocks = [(f'<p class="status status-{state}"><strong>Run status: '
               f"{html.escape(sentence)}</strong></p>")]
    dead = _dead_note(page)
    if dead:
        blocks.append(f'<p class="status status-running">{html.escape(dead)}</p>')
    if page.failures:
        blocks.append(
            f'<p class="note failed">{len(page.failures)} figure(s) could not be drawn: '
            f"{html.escape(', '.join(page.failures))} (each is marked where it belongs; "
            "the tables are complete).</p>")
    return blocks


def write_report(run_dir, *, progress: bool = True, status: str | None = None) -> Path:
    """Draw the figures and tables of a saved run and write its ``report.html``.

    Everything is drawn into a staging directory ``run_dir/.report-*`` and swapped in at
    the end, so an error or a kill part-way leaves the previous figures, tables and page.
    A figure that fails to draw is one line on the page and a :class:`FigureWarning`.

    Args:
        run_dir: a directory written by :func:`jaxcnmf.runs.pipeline.run` (it needs
            ``run.json``, ``factorization.npz``, ``probe.npz`` and ``analysis.json``).
        progress: a progress bar over the sections on stderr.
        status: the run state shown at the top of the page; default from the run
            directory (``COMPLETE`` means complete, else ``run.json``'s status). The run's
            own report stage, its last, passes "complete".

    Returns:
        Path of ``report.html``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory, or the run stopped before
            its results were saved.

    Example:
        >>> write_report("runs/demo").name  # doctest: +SKIP
        'report.html'
    """
    saved = rundir.load_run(run_dir)
    run_dir = saved.path
    page = _Page(saved)
    state, sentence = run_status(run_dir, saved.record, status)
    staging = rundir.report_staging(run_dir)
    try:
        sections = []
        for section_id, heading in rundir.progress_bar(SECTIONS, progress, "report"):
            sections.append((section_id, heading, _BUILDERS[section_id](page, staging)))
        dataset = saved.record["dataset"]
        subtitle = (
            f"{saved.record['model'].get('name', 'network')} on {dataset['name']}: "
            f"{dataset['probe_images']} probe images, layers "
            f"{', '.join(saved.record['layers'])}, rank {page.config['rank']} "
            f"({page.config['method']})."
        )
        page_html = render_html("jaxcnmf concept report", subtitle, sections,
                                banner=_banner(page, state, sentence))
        rundir.write_bytes_atomic(staging / rundir.REPORT, page_html.encode("utf-8"))
        rundir.swap_in_report(run_dir, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run_dir / rundir.REPORT


SUMMARY_FIGURES = ("class_shares", "similarity", "eigenvalues", "fidelity",
                   "accuracy_vs_entropy", "history")


def _markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(empty)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(human_header(str(c)).replace("|", "\\|") for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(run_dir, path, *, title: str | None = None,
                  figures: Sequence[str] = SUMMARY_FIGURES) -> Path:
    """A Markdown summary of a finished run, with a few of its figures copied beside it.

    For committing an experiment's numbers without its data: settings, purity and NMI
    against the k-means baseline, fidelity, relative errors per view, wall times per
    stage, the concept table, the TCAV heatmaps and significant cells when the run has
    them, and the figures named in ``figures`` (none shows probe images, except the
    concept tiles, which are not copied by default).

    Args:
        run_dir: a complete run directory (it has ``COMPLETE`` and ``tables/``).
        path: the Markdown file to write, e.g. ``experiments/results/cifar10/README.md``.
        title: first heading; defaults to "<model> on <dataset>" from ``run.json``.
        figures: names of ``run_dir/figures/<name>.png`` to copy next to ``path``.

    Returns:
        Path of the Markdown file.

    Raises:
        FileNotFoundError: ``run_dir`` is not a complete run.

    Example:
        >>> write_summary("runs/c10", "experiments/results/cifar10/README.md")  # doctest: +SKIP
    """
    run_dir, path = Path(run_dir), Path(path)
    if not (run_dir / rundir.COMPLETE).is_file():
        raise FileNotFoundError(f"run_dir: {run_dir} is not a complete run (no "
                                f"{rundir.COMPLETE} file)")
    record = json.loads((run_dir / rundir.RUN_JSON).read_text())

    def table(name):
        return json.loads((run_dir / "tables" / f"{name}.json").read_text())

    dataset = record["dataset"]
    heading = title or (f"{record['model'].get('name', 'network')} on {dataset['name']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    copied = []
    tcav_figures = sorted(p.stem for p in (run_dir / "figures").glob("tcav_*.png"))
    for name in dict.fromkeys((*figures, *tcav_figures)):
        source = run_dir / "figures" / f"{name}.png"
        if source.is_file():
            (path.parent / source.name).write_bytes(source.read_bytes())
            copied.append(source.name)
    tcav_part = []
    if (run_dir / "tables" / "tcav.json").is_file():
        cells = table("tcav")
        significant = [{key: row.get(key, _direction(row) if key == "direction" else None)
                        for key in TCAV_COLUMNS}
                       for row in cells if row["significant"]]
        tcav_part = ["## TCAV: significant (concept, class) cells after correction\n",
                     *[f"{note}\n" for note in _constant_gradient_notes(cells)],
                     _markdown_table(significant)]
    parts = [
        f"# {heading}\n",
        (f"Run finished {record.get('finished', '?')}; written by `jaxcnmf` from "
         f"`{run_dir}` (report.html there holds the concept gallery with the probe images).\n"),
        "## Settings\n", _markdown_table(table("settings")),
        "## Concepts against labels (purity, NMI) and the k-means baseline\n",
        _markdown_table(table("summary")),
        "## Fidelity: accuracy with a layer replaced by its reconstruction O_j F\n",
        _markdown_table(table("fidelity")),
        "## Relative reconstruction error per view\n", _markdown_table(table("relative_errors")),
        "## Wall time per stage (seconds)\n", _markdown_table(_time_rows(record)),
        f"Environment: {record.get('environment', {})}\n",
        "## Neurons per layer\n", _markdown_table(table("layers")),
        "## Concepts\n", _markdown_table(table("concepts")),
        *tcav_part,
        "## Figures\n", *[f"![{name}]({name})\n" for name in copied],
    ]
    path.write_text("\n".join(parts))
    return path
