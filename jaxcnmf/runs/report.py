"""``report.html``: one self-contained page of a run's concepts, figures and tables.

:func:`write_report` reads a run directory written by :func:`jaxcnmf.runs.pipeline.run`
(``run.json``, ``factorization.npz``, ``probe.npz``, ``analysis.json`` and, when the TCAV
step ran, ``tcav.json``/``tcav.npz``), recomputes the
analyses that need only the factorization and the probe set, draws the figures with
:mod:`jaxcnmf.figures`, writes them to ``figures/*.png`` and the tables to
``tables/*.csv`` and ``tables/*.json``, and writes ``report.html`` with every image
embedded as a base64 PNG, so the page opens offline and can be mailed as one file. The
page is written to a temporary file and moved into place, so a reader never sees half of
it.

Sections (the ``id`` of each ``<section>``): ``settings``, ``summary``, ``concepts``,
``layers``, ``neighbours``, ``fidelity``, ``tcav``, ``objective``.

Example:
    >>> from jaxcnmf.report import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

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

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 72rem; padding: 1rem 2rem;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
nav a { margin-right: 1rem; } .note { color: #555; font-size: 0.92rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.9rem; }
.concept { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; margin: 1rem 0; }
.concept h3 { margin-top: 0.2rem; }
.strip { display: flex; flex-wrap: wrap; gap: 0.5rem; }
.thumb { margin: 0; text-align: center; }
.thumb img { width: 96px; height: 96px; image-rendering: pixelated; }
"""


def figure_block(run_dir: Path, name: str, figure, caption: str) -> str:
    """Save ``figure`` to ``run_dir/figures/<name>.png`` and return it as an HTML block."""
    from jaxcnmf.runs import figures

    path = figures.save_figure(figure, Path(run_dir) / "figures" / f"{name}.png")
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
    return f"<td>{html.escape(str(value))}</td>"


def table_html(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An HTML table of ``rows`` (dicts); ``columns`` defaults to the first row's keys."""
    if not rows:
        return '<p class="note">(empty)</p>'
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(_cell(row.get(c, "")) for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def paragraph(text: str, note: bool = False) -> str:
    """A ``<p>`` of escaped text; ``note`` renders it small and grey."""
    klass = ' class="note"' if note else ""
    return f"<p{klass}>{html.escape(text)}</p>"


def write_table(run_dir: Path, name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` to ``run_dir/tables/<name>.csv`` and ``<name>.json``."""
    tables = Path(run_dir) / "tables"
    tables.mkdir(exist_ok=True)
    (tables / f"{name}.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(tables / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def render_html(title: str, subtitle: str, sections: Iterable[tuple[str, str, list[str]]]) -> str:
    """The whole page: a header with links to each section, then the sections.

    Args:
        title: page title and ``<h1>``.
        subtitle: one line under the title.
        sections: ``(id, heading, blocks)`` with ``blocks`` ready-made HTML strings.

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
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1>{paragraph(subtitle, note=True)}"
        f"<nav>{nav}</nav></header>{body}"
        '<footer><p class="note">Written by jaxcnmf.</p></footer></body></html>\n'
    )


PIXEL_VIEWS = ("red", "green", "blue", "gray")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


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
            strongest_concept,
        )

        self.saved = saved
        self.record = saved.record
        self.config = saved.record["config"]
        self.result = saved.result
        self.F = np.asarray(saved.result.F, dtype=np.float64)
        self.class_names = tuple(saved.record["dataset"]["class_names"])
        self.superclass_names = tuple(saved.record["dataset"].get("superclass_names") or ())
        self.layers = [v for v in saved.result.view_names if v not in PIXEL_VIEWS]
        self.channels = [v for v in saved.result.view_names if v in PIXEL_VIEWS]
        labels, coarse = saved.labels, saved.coarse_labels
        num_classes = len(self.class_names)
        self.shares = class_shares(self.F, labels, num_classes)
        self.records = concept_table(
            self.F, labels, self.class_names,
            coarse_labels=coarse if self.superclass_names else None,
            superclass_names=self.superclass_names or None,
            top=3, n_images=self.config["top_images"],
        )
        strongest = strongest_concept(self.F)
        self.scores = {
            "purity": purity(self.F, labels, num_classes),
            "cluster_purity": cluster_purity(strongest, labels),
            "nmi": nmi(strongest, labels),
        }
        if self.superclass_names and coarse is not None:
            self.scores["superclass_purity"] = purity(
                self.F, coarse, len(self.superclass_names))
            self.scores["superclass_cluster_purity"] = cluster_purity(strongest, coarse)
            self.scores["superclass_nmi"] = nmi(strongest, coarse)
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


def _settings_section(page: _Page, run_dir: Path) -> list[str]:
    record, config, result = page.record, page.config, page.result
    model = record.get("model", {})
    dataset = record["dataset"]
    settings = [
        ("command", config["command"]),
        ("model", f"{model.get('name', '?')} (width {model.get('width', config['width'])})"),
        ("checkpoint", model.get("checkpoint") or "trained by this run"),
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
        ("iterations", f"{result.n_iter} of {config['max_iter']}"
                       f" ({'converged' if result.converged else 'not converged'})"),
        ("restarts", config["restarts"]),
        ("stability across restarts", _num(result.stability)),
        ("view weights", config["weights"] or "none"),
        ("unit columns", config["unit_columns"]),
        ("group sparsity", f"{config['group_lam']} over {config['groups']}"
                           if config["group_lam"] else "off"),
        ("started", record.get("started", "")),
    ]
    settings_rows = [{"setting": key, "value": value} for key, value in settings]
    view_rows = [
        {"view": name, "rows": int(result.loadings[name].shape[0]),
         "relative error": float(result.relative_errors[name])}
        for name in result.view_names
    ]
    time_rows = _time_rows(record)
    write_table(run_dir, "settings", settings_rows)
    write_table(run_dir, "relative_errors", view_rows)
    write_table(run_dir, "wall_times", time_rows)
    return [
        table_html(settings_rows),
        "<h3>Views: relative reconstruction error ||X - W F|| / ||X||</h3>",
        table_html(view_rows),
        "<h3>Wall time per stage</h3>",
        table_html(time_rows),
        paragraph("The report stage is not timed here: this page is its output.", note=True),
    ]


def _time_rows(record: dict) -> list[dict]:
    rows = [{"stage": stage, "seconds": float(seconds)}
            for stage, seconds in record.get("seconds", {}).items()]
    return rows + [{"stage": "total", "seconds": float(sum(r["seconds"] for r in rows))}]


def _summary_section(page: _Page, run_dir: Path) -> list[str]:
    kmeans = page.saved.network["kmeans"]
    rows = [
        {"method": f"coupled NMF (rank {page.config['rank']})", "labels": "class",
         "concept purity": page.scores["purity"],
         "cluster purity": page.scores["cluster_purity"], "NMI": page.scores["nmi"]},
        {"method": f"k-means on the layer activations (k={kmeans['k']})", "labels": "class",
         "concept purity": "n/a", "cluster purity": kmeans["purity"], "NMI": kmeans["nmi"]},
    ]
    if "superclass_nmi" in page.scores:
        rows.append({"method": f"coupled NMF (rank {page.config['rank']})",
                     "labels": "superclass", "concept purity": page.scores["superclass_purity"],
                     "cluster purity": page.scores["superclass_cluster_purity"],
                     "NMI": page.scores["superclass_nmi"]})
    write_table(run_dir, "summary", rows)
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
        table_html(rows),
    ]


def _concept_rows(page: _Page) -> list[dict]:
    rows = []
    for record in page.records:
        row = {
            "concept": record.concept,
            "mass": record.mass,
            "top classes": "; ".join(f"{n} {s:.2f}" for n, s in record.top_classes),
            "entropy (bits)": record.entropy_bits,
            "entropy (normalized)": record.entropy_normalized,
        }
        if record.top_superclasses is not None:
            row["top superclasses"] = "; ".join(
                f"{n} {s:.2f}" for n, s in record.top_superclasses)
            row["superclass entropy (bits)"] = record.superclass_entropy_bits
        row["top images"] = " ".join(str(int(i)) for i in record.top_images)
        rows.append(row)
    return rows


def _lead(record) -> str:
    if not record.top_classes:
        return "no mass"
    name, share = record.top_classes[0]
    return f"{name} ({share:.0%} of its mass)"


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
            f'alt="image {int(index)}"><figcaption>{html.escape(str(caption))}'
            "</figcaption></figure>"
        )
    return f'<div class="strip">{"".join(cells)}</div>'


def _concepts_section(page: _Page, run_dir: Path) -> list[str]:
    from jaxcnmf.runs import figures

    rows = _concept_rows(page)
    write_table(run_dir, "concepts", rows)
    json_rows = [record.to_dict() for record in page.records]
    (Path(run_dir) / "tables" / "concepts_full.json").write_text(json.dumps(json_rows, indent=2))
    blocks = [
        paragraph(
            "Each concept is a row of F. Its top images are the probe images with the largest "
            "weight; its class shares are the fractions of the row's mass on each class. "
            + ("The latent image is the concept's column of the pixel loadings (each channel "
               "scaled to [0, 1]); the overlays keep the pixels above its median."
               if page.latent is not None else
               "This run factorized no pixel views, so there are no latent images.")
        ),
        table_html(rows),
        figure_block(run_dir, "class_shares",
                     figures.class_share_heatmap(page.shares, page.class_names, order=page.order),
                     "Class shares of each concept (rows in display order)."),
    ]
    n_images = int(page.config["top_images"])
    for k in page.order:
        record = page.records[int(k)]
        if page.latent is None:
            top = record.top_images[:n_images]
            body = _image_strip(page.saved.images, top,
                                [page.class_names[page.saved.labels[i]] for i in top])
        else:
            tile = figures.concept_tile(page.saved.images, record, page.latent[k],
                                        page.masks[k], n_images=n_images,
                                        labels=page.saved.labels, class_names=page.class_names)
            body = figure_block(run_dir, f"concept_{record.concept:02d}", tile,
                                f"Concept {record.concept}: top images, masked overlays, "
                                "latent image, median mask and top classes.")
        blocks.append(
            f'<div class="concept" id="concept-{record.concept}">'
            f"<h3>Concept {record.concept}: {html.escape(_lead(record))}</h3>{body}</div>"
        )
    return blocks


def _layers_section(page: _Page, run_dir: Path) -> list[str]:
    from jaxcnmf.runs import figures

    summary = page.layer_summary
    if summary is None:
        return [paragraph("This run factorized no layers.")]
    rows = summary.to_rows()
    eigen_rows = [
        {"layer": layer, **{f"eigenvalue {i + 1}": float(v)
                            for i, v in enumerate(summary.eigenvalues[layer])}}
        for layer in summary.layers
    ]
    write_table(run_dir, "layers", rows)
    write_table(run_dir, "eigenvalues", eigen_rows)
    return [
        paragraph(
            "For each layer, the cosine similarity between the columns of its loadings O_j "
            "(one column per concept, same order in every heatmap). Concepts that use "
            "disjoint neurons give the identity; eigenvalues (sorted, from eigvalsh) near 1 "
            "mean separate neurons, a large first eigenvalue means shared ones."
        ),
        figure_block(run_dir, "similarity", figures.similarity_heatmaps(summary),
                     "Cosine similarity of loading columns per layer."),
        figure_block(run_dir, "eigenvalues", figures.layer_summary_plot(summary),
                     f"Largest eigenvalue, mean of the top {summary.top_k} and distance from "
                     "the identity, per layer."),
        table_html(rows),
        "<h3>Eigenvalues, largest first</h3>",
        table_html(eigen_rows),
    ]


def _neighbours_section(page: _Page, run_dir: Path) -> list[str]:
    from jaxcnmf.runs import figures

    table = page.accuracy_table
    rows = table.to_rows()
    write_table(run_dir, "accuracy_vs_entropy", rows)
    blocks = [
        paragraph(
            f"Each image's {page.k} nearest neighbours in F-space (columns of F), the "
            "distribution of their strongest concepts and its entropy. Examples: the images "
            "with the lowest, median and highest entropy."
        )
    ]
    example_rows = []
    for number, example in enumerate(page.examples):
        for metric, result in example.items():
            blocks.append(figure_block(
                run_dir, f"neighbours_{number}_{metric}",
                figures.neighbour_figure(page.saved.images, result, labels=page.saved.labels,
                                         class_names=page.class_names),
                f"Image {result.index}: {metric} neighbours, entropy "
                f"{result.entropy_bits:.2f} bits."))
            example_rows.append({"image": result.index, "metric": metric,
                                 "entropy (bits)": result.entropy_bits,
                                 "neighbours": " ".join(map(str, result.neighbours.tolist()))})
    write_table(run_dir, "neighbour_examples", example_rows)
    blocks += [
        "<h3>Network accuracy against neighbourhood entropy</h3>",
        figure_block(run_dir, "accuracy_vs_entropy", figures.accuracy_entropy_plot(table),
                     "Accuracy of the network per bin of neighbour entropy (cosine)."),
        table_html(rows),
    ]
    return blocks


def _fidelity_section(page: _Page, run_dir: Path) -> list[str]:
    from jaxcnmf.concepts import fidelity
    from jaxcnmf.runs import figures

    rows = page.saved.network["fidelity"]
    write_table(run_dir, "fidelity", rows)
    blocks = [paragraph(
        "Accuracy of the network on the probe images when a layer's activations are "
        "replaced by their reconstruction O_j F, with F computed from that layer alone "
        "(FitResult.transform), against its accuracy with the layer's own activations. "
        "It says how much of what the network uses the concepts capture.")]
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
        figure_block(run_dir, "fidelity", figures.fidelity_plot(tables),
                     "Accuracy with each layer replaced by its reconstruction, per rank."),
        table_html(rows),
    ]
    return blocks


TCAV_COLUMNS = ("layer", "concept", "class", "mean_score", "std_score", "random_mean",
                "magnitude", "cav_accuracy", "p_adjusted")


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
                 else "classes " + ", ".join(classes))
        notes.append(
            f"Warning: at {layer} the class-logit gradient is the same for every image of "
            f"{which}: the network is linear from {layer} to those logits (an average pool "
            "and a dense layer), so their TCAV scores are all 0 or 1 and say only on which "
            "side of that one gradient each CAV lies. Test an earlier layer "
            "('jaxcnmf tcav RUN_DIR --layer ...').")
    return notes


def _tcav_section(page: _Page, run_dir: Path) -> list[str]:
    from jaxcnmf.concepts import tcav

    result = page.saved.tcav
    if result is None:
        return [paragraph(
            "This run has no TCAV results. Add them with 'jaxcnmf tcav RUN_DIR' (options: "
            "'jaxcnmf tcav --help'), or pass --tcav to analyze or demo; this section then "
            "shows the concept x class heatmap of TCAV scores.")]
    config = result.config
    rows = result.table()
    write_table(run_dir, "tcav", rows)
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
            f"is significant when the corrected p-value is at most {result.alpha}."),
        paragraph(f"{len(significant)} of {len(rows)} cells significant; TCAV took "
                  f"{result.timings.get('total', 0.0):.1f} s.", note=True),
    ]
    blocks.extend(paragraph(text) for text in _constant_gradient_notes(rows))
    for layer in result.layers:
        blocks.append(figure_block(
            run_dir, f"tcav_{layer}", tcav.figure(result, layer),
            f"Mean TCAV score of each concept (row) for each class (column) at {layer}; "
            "hatched grey cells are not significant."))
    blocks.append("<h3>Significant cells</h3>")
    blocks.append(table_html(significant, TCAV_COLUMNS) if significant else paragraph(
        "No cell is significant after correction.", note=True))
    return blocks


def _objective_section(page: _Page, run_dir: Path) -> list[str]:
    from jaxcnmf.runs import figures

    history = page.result.history
    objective = np.asarray(history["objective"], dtype=np.float64)
    rows = [{"iteration": i + 1, "objective": float(v)} for i, v in enumerate(objective)]
    for name, errors in history.get("rel_error", {}).items():
        for row, value in zip(rows, np.asarray(errors, dtype=np.float64)):
            row[f"rel_error {name}"] = float(value)
    write_table(run_dir, "history", rows)
    final = f"{objective[-1]:.6g}" if objective.size else "n/a"
    return [
        paragraph(f"{objective.size} iterations; final objective {final}; "
                  f"{'converged' if page.result.converged else 'stopped at max_iter'}."),
        figure_block(run_dir, "history", figures.history_plot(history),
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


def write_report(run_dir, *, progress: bool = True) -> Path:
    """Draw the figures and tables of a saved run and write its ``report.html``.

    Args:
        run_dir: a directory written by :func:`jaxcnmf.runs.pipeline.run` (it needs
            ``run.json``, ``factorization.npz``, ``probe.npz`` and ``analysis.json``).
        progress: a progress bar over the sections on stderr.

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
    # Figures and tables of an earlier drawing (say, of a higher rank) must not linger.
    for pattern in ("figures/*.png", "tables/*.csv", "tables/*.json"):
        for stale in run_dir.glob(pattern):
            stale.unlink()
    sections = []
    for section_id, heading in rundir.progress_bar(SECTIONS, progress, "report"):
        sections.append((section_id, heading, _BUILDERS[section_id](page, run_dir)))
    dataset = saved.record["dataset"]
    subtitle = (
        f"{saved.record['model'].get('name', 'network')} on {dataset['name']}: "
        f"{dataset['probe_images']} probe images, layers {', '.join(saved.record['layers'])}, "
        f"rank {page.config['rank']} ({page.config['method']})."
    )
    path = run_dir / rundir.REPORT
    rundir.write_bytes_atomic(
        path, render_html("jaxcnmf concept report", subtitle, sections).encode("utf-8"))
    return path


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

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
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
        significant = [{key: row[key] for key in TCAV_COLUMNS}
                       for row in cells if row["significant"]]
        tcav_part = ["## TCAV: significant (concept, class) cells after correction\n",
                     *[f"{note}\n" for note in _constant_gradient_notes(cells)],
                     _markdown_table(significant)]
    parts = [
        f"# {heading}\n",
        f"Run finished {record.get('finished', '?')}; written by `jaxcnmf` from "
        f"`{run_dir}` (report.html there holds the concept gallery with the probe images).\n",
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
