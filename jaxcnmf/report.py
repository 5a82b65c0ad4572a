"""``report.html``: one self-contained page of a run's concepts, figures and tables.

:func:`write_report` reads a run directory written by :func:`jaxcnmf.pipeline.run`
(``run.json``, ``factorization.npz``, ``probe.npz``, ``analysis.json``), recomputes the
analyses that need only the factorization and the probe set, draws the figures with
:mod:`jaxcnmf.figures`, writes them to ``figures/*.png`` and the tables to
``tables/*.csv`` and ``tables/*.json``, and writes ``report.html`` with every image
embedded as a base64 PNG, so the page opens offline and can be mailed as one file. The
page is written to a temporary file and moved into place, so a reader never sees half of
it.

Sections (the ``id`` of each ``<section>``): ``settings``, ``summary``, ``concepts``,
``layers``, ``neighbours``, ``fidelity``, ``objective``.

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

SECTIONS = (
    ("settings", "Run settings"),
    ("summary", "Summary scores"),
    ("concepts", "Concept gallery"),
    ("layers", "Neurons per layer"),
    ("neighbours", "Neighbours and entropy"),
    ("fidelity", "Fidelity"),
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
"""


def png_bytes(figure) -> bytes:
    """PNG bytes of a matplotlib figure, which is closed afterwards.

    Args:
        figure: a ``matplotlib.figure.Figure``.

    Returns:
        bytes: the PNG file.
    """
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


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


def _write_text_atomic(path: Path, text: str) -> None:
    from jaxcnmf.pipeline import write_bytes_atomic

    write_bytes_atomic(path, text.encode("utf-8"))


PIXEL_VIEWS = ("red", "green", "blue", "gray")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


class _Page:
    """The analyses of one saved run, computed once and shared by the sections."""

    def __init__(self, saved):
        from jaxcnmf import analysis

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
        self.records = analysis.concept_table(
            self.F, labels, self.class_names,
            coarse_labels=coarse if self.superclass_names else None,
            superclass_names=self.superclass_names or None,
            top=3, n_images=self.config["top_images"],
        )
        strongest = analysis.strongest_concept(self.F)
        self.scores = {
            "purity": analysis.purity(self.F, labels, num_classes),
            "nmi": analysis.nmi(strongest, labels),
        }
        if self.superclass_names and coarse is not None:
            self.scores["superclass_purity"] = analysis.purity(
                self.F, coarse, len(self.superclass_names))
            self.scores["superclass_nmi"] = analysis.nmi(strongest, coarse)
        self.order = analysis.concept_order(self.F, labels, num_classes)
        self.layer_summary = (
            analysis.layer_summary({l: saved.result.loadings[l] for l in self.layers},
                                   top_k=3, order=self.order)
            if self.layers else None
        )
        self.latent = self.masks = None
        if self.channels:
            self.latent = analysis.latent_images(
                {c: saved.result.loadings[c] for c in self.channels}, saved.images.shape[1:])
            self.masks = analysis.median_mask(self.latent)
        n = self.F.shape[1]
        self.k = max(1, min(int(self.config["neighbours"]), n - 1))
        self.correct = saved.predictions == labels
        self.entropy = analysis.neighbour_entropy_all(self.F, self.k) if n > 1 else np.zeros(n)
        self.accuracy_table = analysis.accuracy_vs_entropy(self.entropy, self.correct, bins=5)
        self.examples = self._neighbour_examples(labels)

    def _neighbour_examples(self, labels, count: int = 3):
        """Queries for the neighbour section: the lowest-, middle- and highest-entropy images."""
        from jaxcnmf import analysis

        if self.F.shape[1] < 2:
            return []
        by_entropy = np.argsort(self.entropy, kind="stable")
        picks = by_entropy[np.linspace(0, len(by_entropy) - 1, count).round().astype(int)]
        return [
            {metric: analysis.neighbour_concepts(self.F, int(i), self.k, metric)
             for metric in analysis.METRICS}
            for i in dict.fromkeys(picks.tolist())
        ]
