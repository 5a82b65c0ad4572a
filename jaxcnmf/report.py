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
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

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
