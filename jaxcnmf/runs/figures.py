"""Matplotlib figures of the analyses in :mod:`jaxcnmf.analysis`.

Each function takes analysis outputs (plain arrays and the result dataclasses) and returns
a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as PNG. Figures are
built with the object API on the Agg canvas, never through ``pyplot``, so nothing needs a
display and no figure lingers in a global registry.

Images are uint8 (N, H, W, C) with C = 1 (drawn with a gray colormap) or C = 3.

User strings (class and layer names) are drawn as plain text: every figure is built and
saved with mathtext and TeX off (:func:`plain_text`), so a class called ``"$x$"`` or
``"$\\frac{"`` is drawn as typed instead of crashing the report.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from jaxcnmf.concepts import neurons
    >>> from jaxcnmf.runs import figures
    >>> summary = neurons.layer_summary({"conv": np.eye(4)[:, :2], "fc": np.ones((3, 2))})
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "layers.png"
    >>> figures.save_figure(figures.layer_summary_plot(summary), out).stat().st_size > 0
    True
"""

from __future__ import annotations

import functools
import pathlib
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcnmf.concepts.fidelity import FidelityTable
from jaxcnmf.concepts.images import masked_images
from jaxcnmf.concepts.labels import ConceptRecord
from jaxcnmf.concepts.neighbours import AccuracyTable, NeighbourConcepts
from jaxcnmf.concepts.neurons import LayerSummary

__all__ = [
    "accuracy_entropy_plot",
    "class_share_heatmap",
    "concept_gallery",
    "concept_heading",
    "concept_tile",
    "eigenvalue_plot",
    "fidelity_plot",
    "history_plot",
    "layer_summary_plot",
    "neighbour_figure",
    "plain_text",
    "quoted",
    "save_figure",
    "similarity_heatmaps",
]

# Beyond this many ticks labels overlap; longer axes get every n-th label.
_MAX_TICKS = 40

# The report's column is about 800 px wide in a 900 px window. A figure much wider than
# PAGE_WIDTH inches (at save_figure's 110 dpi) is shrunk to fit, and its 7-8 pt labels
# with it, below reading size: the figures of many images are laid out to fit.
PAGE_WIDTH = 8.6
# Longest class caption (``class 'name'``) on one line under a thumbnail.
_CAPTION_NAME = 16


def plain_text():
    """A context in which new matplotlib text is plain: no mathtext, no TeX.

    Text objects read ``text.parse_math`` and ``text.usetex`` when they are created, and
    tick labels are created when a figure is drawn, so both the building and the saving
    of a figure must run inside it (every function here does).
    """
    return matplotlib.rc_context({"text.parse_math": False, "text.usetex": False})


def _plain(build):
    """Run a figure-building function inside :func:`plain_text`."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with plain_text():
            return build(*args, **kwargs)

    return wrapper


def quoted(name) -> str:
    """A user's name in quotes, so that class '4' is never read as a count or an index."""
    return f"'{name}'"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path, dpi: int = 110) -> pathlib.Path:
    """Write ``fig`` as PNG (creating parent folders) and release its drawing memory.

    Args:
        fig: a figure from this module.
        path: file path; ".png" is appended when it has no suffix.
        dpi: resolution.

    Returns:
        The path written.
    """
    path = pathlib.Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with plain_text():
            fig.savefig(path, dpi=dpi, format="png")
    finally:
        # Release the drawing memory even when drawing failed half-way.
        fig.clear()
    return path


def _images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(
            "images: expected uint8 (N, H, W, C) with C in (1, 3), "
            f"got {images.dtype} {images.shape}"
        )
    return images


def _class_name(index: int, labels, class_names) -> str | None:
    """Image ``index``'s class (``class '4'``, or ``class 4`` by id), or None without labels."""
    if labels is None:
        return None
    label = int(np.asarray(labels)[index])
    return f"class {quoted(class_names[label])}" if class_names is not None else f"class {label}"


def _caption(index: int, labels, class_names) -> str:
    """Two lines: the image's probe index (``#60``) and its class (``class '4'``); a
    class name too long for one line under a thumbnail gets a third line, cut to 16
    characters.

    The index is the image's column of ``F`` (its position in ``probe.npz``); the ``#``
    keeps it apart from class names that are numbers too.
    """
    name = _class_name(index, labels, class_names)
    if name is None:
        return f"#{int(index)}"
    if len(name) > _CAPTION_NAME:
        # A long name gets a line of its own, cut so that neighbouring captions never meet.
        name = name.removeprefix("class ")
        if len(name) > _CAPTION_NAME:
            name = name[: _CAPTION_NAME - 2] + "…'"
        return f"#{int(index)}\nclass\n{name}"
    return f"#{int(index)}\n{name}"


def _show(ax, image, title: str | None = None, fontsize: float = 8) -> None:
    """Draw one (H, W, C) image, uint8 or float in [0, 1]; one channel in gray."""
    image = np.asarray(image)
    vmax = 255 if image.dtype == np.uint8 else 1.0
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=fontsize)


def _ticks(ax, axis: str, labels: Sequence[str], fontsize: float = 7, rotation: float = 0) -> None:
    step = max(1, int(np.ceil(len(labels) / _MAX_TICKS)))
    positions = np.arange(0, len(labels), step)
    names = [str(labels[i]) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, names, fontsize=fontsize, rotation=rotation)
    else:
        ax.set_yticks(positions, names, fontsize=fontsize)


# --------------------------------------------------------------------------- concepts


@_plain
def concept_tile(
    images,
    record: ConceptRecord,
    latent,
    mask,
    n_images: int = 6,
    background: float = 0.15,
    labels=None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """One concept at a glance: top images, masked overlays, latent image, top classes.

    Layout: row 1 the concept's top images, row 2 the same images with the median mask
    of the latent image applied; then the latent image, its mask, and a bar chart of the
    top-class shares.

    Args:
        images: uint8 (N, H, W, C) probe images (the columns of ``F``).
        record: the concept's :class:`~jaxcnmf.concepts.labels.ConceptRecord`.
        latent: float (H, W, C) latent image in [0, 1] (``latent_images(...)[k]``).
        mask: bool (H, W) mask (``median_mask(latent)[k]``).
        n_images: number of top images shown (at most ``len(record.top_images)``).
        background: brightness outside the mask in the overlays.
        labels: optional int (N,) labels to caption each top image.
        class_names: names for ``labels``.

    Returns:
        Figure with ``2 * n + 3`` axes, n = images shown.
    """
    images = _images(images)
    latent = np.asarray(latent, dtype=np.float64)
    if latent.shape != images.shape[1:]:
        raise ValueError(f"latent: expected shape {images.shape[1:]}, got {latent.shape}")
    n = max(1, min(int(n_images), len(record.top_images)))
    top = np.asarray(record.top_images[:n])
    overlays = masked_images(images[top], mask, background=background)
    # n + 3.2 units wide: n top images, the latent image, the bars; 6 images fit the page.
    fig = _figure(min(0.9 * (n + 3.2) + 0.3, PAGE_WIDTH), 3.4)
    grid = fig.add_gridspec(2, n + 2, width_ratios=[1] * n + [1, 2.2])
    for i, index in enumerate(top):
        _show(fig.add_subplot(grid[0, i]), images[index], _caption(index, labels, class_names))
        overlay = fig.add_subplot(grid[1, i])
        _show(overlay, overlays[i], "masked" if i == 0 else None)
        # The outline keeps the mask readable on dark images, where dimming barely shows.
        overlay.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="red", linewidths=0.7)
    _show(fig.add_subplot(grid[0, n]), latent, "latent image")
    _show(fig.add_subplot(grid[1, n]), np.asarray(mask, dtype=np.float64)[..., None], "median mask")
    bars = fig.add_subplot(grid[:, n + 1])
    names = [name for name, _ in record.top_classes][::-1]
    shares = [share for _, share in record.top_classes][::-1]
    bars.barh(np.arange(len(names)), shares, color="tab:blue")
    for y, share in enumerate(shares):
        bars.text(share + 0.02, y, f"{share:.0%}", va="center", fontsize=8)
    bars.set_yticks(np.arange(len(names)), [quoted(name) for name in names], fontsize=8)
    bars.set_xlim(0, 1)
    bars.set_xlabel("share of concept mass", fontsize=8)
    bars.set_title("top classes", fontsize=9)
    bars.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        f"{concept_heading(record)}\nclass entropy {record.entropy_bits:.2f} bits"
        f" ({record.entropy_normalized:.0%} of max) · {record.mass:.1%} of F's mass"
        " · above each image: its probe index (#) and class",
        fontsize=9,
    )
    return fig


def concept_heading(record: ConceptRecord) -> str:
    """``concept 8 · top class '4' · 59% of its mass``: every number says what it counts.

    Example:
        >>> from jaxcnmf.concepts.labels import concept_table
        >>> concept_heading(concept_table(np.array([[1.0, 3.0]]), np.array([0, 1]), ["3", "4"])[0])
        "concept 0 · top class '4' · 75% of its mass"
    """
    if not record.top_classes:
        return f"concept {record.concept} · empty (no mass)"
    name, share = record.top_classes[0]
    return f"concept {record.concept} · top class {quoted(name)} · {share:.0%} of its mass"


def concept_gallery(
    images,
    records: Sequence[ConceptRecord],
    latent,
    masks,
    directory,
    n_images: int = 6,
    order=None,
    labels=None,
    class_names: Sequence[str] | None = None,
) -> list[pathlib.Path]:
    """Save one :func:`concept_tile` PNG per concept, ``concept_<k>.png``.

    Args:
        images: uint8 (N, H, W, C) probe images.
        records: from :func:`~jaxcnmf.concepts.labels.concept_table`.
        latent: float (rank, H, W, C) from :func:`~jaxcnmf.concepts.images.latent_images`.
        masks: bool (rank, H, W) from :func:`~jaxcnmf.concepts.images.median_mask`.
        directory: output folder (created).
        n_images: top images per tile.
        order: optional concept order (e.g. :func:`~jaxcnmf.concepts.labels.concept_order`).
        labels: optional int (N,) labels to caption the images.
        class_names: names for ``labels``.

    Returns:
        The written paths, in ``order``.
    """
    order = range(len(records)) if order is None else [int(k) for k in order]
    directory = pathlib.Path(directory)
    return [
        save_figure(
            concept_tile(
                images, records[k], latent[k], masks[k], n_images,
                labels=labels, class_names=class_names,
            ),
            directory / f"concept_{records[k].concept:02d}.png",
        )
        for k in order
    ]


@_plain
def class_share_heatmap(
    shares, class_names: Sequence[str], order=None, title: str = "class shares of each concept"
) -> Figure:
    """Concepts x classes heatmap of :func:`~jaxcnmf.concepts.labels.class_shares`.

    Args:
        shares: float (rank, C) shares in [0, 1].
        class_names: C names.
        order: optional (rank,) concept order for the rows.
        title: figure title; the figure widens for it, and a long one wraps.

    Returns:
        Figure with 2 axes (heatmap, colorbar).
    """
    shares = np.asarray(shares, dtype=np.float64)
    if shares.ndim != 2 or shares.shape[1] != len(class_names):
        raise ValueError(f"shares: expected (rank, {len(class_names)}), got {shares.shape}")
    order = np.arange(shares.shape[0]) if order is None else np.asarray(order)
    rank, num_classes = shares.shape
    # The title is about 0.1 inch per character, centred over the heatmap whose colour
    # bar takes the right margin: widen the figure for it (up to 8 inches, beyond which
    # it wraps) so that it is never cut off.
    width = max(min(3.0 + 0.22 * num_classes, 24.0), min(0.8 + 0.1 * len(title), 8.0))
    title = textwrap.fill(title, width=int((width - 0.8) / 0.1))
    lines = title.count("\n")
    fig = _figure(width, 1.8 + 0.25 * rank + 0.2 * lines)
    ax = fig.add_subplot()
    image = ax.imshow(
        shares[order], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
    )
    _ticks(ax, "x", list(class_names), rotation=90)
    _ticks(ax, "y", [str(k) for k in order])
    ax.set_xlabel("class")
    ax.set_ylabel("concept")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of concept mass")
    return fig


# -------------------------------------------------------------------- neurons per layer


@_plain
def similarity_heatmaps(summary: LayerSummary) -> Figure:
    """Per-layer cosine similarity of the loading columns, concepts in the same order.

    Args:
        summary: from :func:`~jaxcnmf.concepts.neurons.layer_summary`.

    Returns:
        Figure with one axes per layer plus a shared colorbar.
    """
    layers = summary.layers
    lo = min(0.0, min(float(s.min()) for s in summary.similarity.values()))
    # Square panels, at most 3 a row so that the page shows them at reading size, plus
    # room for two-line titles, tick labels and the suptitle.
    cols = min(len(layers), 3)
    rows = -(-len(layers) // cols)
    fig = _figure(min(2.6 * cols + 1.2, PAGE_WIDTH), 0.7 + 3.1 * rows)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(len(layers))]
    ticks = [str(k) for k in summary.order]
    for i, (ax, layer) in enumerate(zip(axes, layers, strict=True)):
        image = ax.imshow(
            summary.similarity[layer], cmap="magma", vmin=lo, vmax=1.0, interpolation="nearest"
        )
        _ticks(ax, "x", ticks, rotation=90)
        _ticks(ax, "y", ticks)
        ax.set_title(f"{layer}\nlargest eigenvalue {summary.largest[i]:.2f}", fontsize=9)
        ax.set_xlabel("concept", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("concept", fontsize=8)
    fig.colorbar(image, ax=axes, label="cosine similarity of loadings", shrink=0.8)
    fig.suptitle("Do concepts share neurons? (cosine similarity of loading columns)", fontsize=10)
    return fig


@_plain
def layer_summary_plot(summary: LayerSummary) -> Figure:
    """The paper's per-layer summary: largest eigenvalue, top-K mean, distance from I.

    Args:
        summary: from :func:`~jaxcnmf.concepts.neurons.layer_summary`.

    Returns:
        Figure with 1 axes, one line per statistic across layers.
    """
    fig = _figure(max(4.5, 1.2 * len(summary.layers) + 2.5), 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(summary.layers))
    ax.plot(x, summary.largest, "o-", label="largest eigenvalue")
    ax.plot(x, summary.top_k_mean, "s-", label=f"mean of top {summary.top_k} eigenvalues")
    ax.plot(x, summary.identity_distance, "^-", label="‖S − I‖ (Frobenius)")
    ax.set_xticks(x, summary.layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("value")
    ax.set_title("Sharing of neurons between concepts, by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


@_plain
def eigenvalue_plot(summary: LayerSummary) -> Figure:
    """Every layer's eigenvalues of the loading similarity, largest first, one line each.

    The figure stands in for a table of rank + 1 columns, which no page of readable width
    holds at ranks of 20 and more.

    Args:
        summary: from :func:`~jaxcnmf.concepts.neurons.layer_summary`.

    Returns:
        Figure with 1 axes; the dotted line at 1 is the eigenvalue of concepts that use
        disjoint neurons.
    """
    rank = max(len(summary.eigenvalues[layer]) for layer in summary.layers)
    fig = _figure(max(4.5, min(0.25 * rank + 3.0, 9.0)), 3.4)
    ax = fig.add_subplot()
    for layer in summary.layers:
        values = np.sort(np.asarray(summary.eigenvalues[layer], dtype=np.float64))[::-1]
        ax.plot(np.arange(1, values.size + 1), values, "o-", markersize=3, label=str(layer))
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    step = max(1, int(np.ceil(rank / 20)))
    ax.set_xticks(np.arange(1, rank + 1, step))
    ax.set_xlabel("eigenvalue number (largest first)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Eigenvalues of the loading similarity, per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="layer", title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


# --------------------------------------------------------------------------- neighbours


@_plain
def neighbour_figure(
    images,
    result: NeighbourConcepts,
    labels=None,
    class_names: Sequence[str] | None = None,
    order=None,
) -> Figure:
    """A query image, its nearest neighbours in F-space, and their concept distribution.

    Every thumbnail is captioned with the image's probe index (``#60``: its column of
    ``F``) and, with ``labels``, its class (``class '2'``); the query's caption says
    "query", each neighbour's says its rank ("neighbour 1" is the nearest).

    Args:
        images: uint8 (N, H, W, C) probe images.
        result: from :func:`~jaxcnmf.concepts.neighbours.neighbour_concepts`.
        labels: optional int (N,) labels for captions.
        class_names: names for ``labels``.
        order: optional (rank,) concept display order for the bars (the order of every
            other concept figure of a report); default concept id order.

    Returns:
        Figure with ``k + 2`` axes: query, k neighbours, distribution bar chart.
    """
    images = _images(images)
    rank = len(result.distribution)
    order = np.arange(rank) if order is None else np.asarray(order, dtype=np.int64)
    if sorted(order.tolist()) != list(range(rank)):
        raise ValueError(f"order: expected a permutation of 0..{rank - 1}, got {order.tolist()}")

    k = len(result.neighbours)
    # At most 5 neighbours a row, so that 10 of them still fit the page at reading size;
    # the query spans the rows, the bars take the right.
    rows = max(1, -(-k // 5))
    cols = max(1, -(-k // rows))
    fig = _figure(min(0.88 * (cols + 4.6) + 0.3, PAGE_WIDTH), 0.5 + 1.45 * rows)
    grid = fig.add_gridspec(rows, cols + 2, width_ratios=[1.6] + [1] * cols + [3.0])
    query = fig.add_subplot(grid[:, 0])
    _show(query, images[result.index], _caption(result.index, labels, class_names), fontsize=9)
    query.set_xlabel("query", fontsize=9, fontweight="bold")
    for i, index in enumerate(result.neighbours):
        ax = fig.add_subplot(grid[i // cols, 1 + i % cols])
        _show(ax, images[index], _caption(index, labels, class_names), fontsize=7)
        ax.set_xlabel(f"neighbour {i + 1}", fontsize=7)
    bars = fig.add_subplot(grid[:, cols + 1])
    positions = np.arange(rank)
    bars.bar(positions, np.asarray(result.distribution)[order], color="tab:orange")
    bars.set_ylim(0, 1)
    bars.set_xlabel("strongest concept (report order)", fontsize=8)
    bars.set_ylabel("share of neighbours", fontsize=8)
    _ticks(bars, "x", [str(c) for c in order])
    bars.set_title(f"entropy {result.entropy_bits:.2f} bits", fontsize=9)
    fig.suptitle(
        f"Probe image #{result.index} and its {k} nearest neighbours in F-space "
        f"({result.metric})\nabove each image: probe index (#) and class",
        fontsize=9,
    )
    return fig


@_plain
def accuracy_entropy_plot(table: AccuracyTable) -> Figure:
    """The network's accuracy per bin of neighbour entropy, with images per bin.

    Args:
        table: from :func:`~jaxcnmf.concepts.neighbours.accuracy_vs_entropy`.

    Returns:
        Figure with 1 axes.
    """
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    centres = (table.edges[:-1] + table.edges[1:]) / 2
    widths = np.diff(table.edges) * 0.9
    filled = table.count > 0
    ax.bar(centres[filled], table.accuracy[filled], width=widths[filled], color="tab:green",
           alpha=0.8)
    for x, acc, n in zip(centres[filled], table.accuracy[filled], table.count[filled]):
        # Counts sit at the bar's foot, clear of the overall-accuracy line.
        ax.text(x, 0.02, f"n={n}", ha="center", fontsize=7)
    ax.axhline(table.overall, color="black", linestyle="--", linewidth=1,
               label=f"overall {table.overall:.1%}")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("entropy of neighbours' strongest concepts (bits)")
    ax.set_ylabel("network accuracy")
    ax.set_title("Accuracy against neighbourhood entropy")
    # Outside the axes, right of them: inside, wherever it goes, it can hide a bar or
    # its count (the counts sit at the bars' feet, the bars can reach the top).
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return fig


# ------------------------------------------------------------------- fidelity, history


@_plain
def fidelity_plot(tables: Sequence[FidelityTable]) -> Figure:
    """Accuracy with each layer replaced by ``O_j F``, against rank, per layer.

    Args:
        tables: one :class:`~jaxcnmf.concepts.fidelity.FidelityTable` per layer.

    Returns:
        Figure with 1 axes; the original accuracy is a dashed line.
    """
    if not tables:
        raise ValueError("tables: expected at least one FidelityTable, got none")
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    originals = {round(t.original_accuracy, 9) for t in tables}
    for table in tables:
        (line,) = ax.plot(table.ranks, table.accuracy, "o-", label=table.layer)
        if len(originals) > 1:
            ax.axhline(table.original_accuracy, color=line.get_color(), linestyle="--", linewidth=1)
    if len(originals) == 1:
        ax.axhline(tables[0].original_accuracy, color="black", linestyle="--", linewidth=1,
                   label=f"original {tables[0].original_accuracy:.1%}")
    ranks = np.unique(np.concatenate([t.ranks for t in tables]))
    ax.set_xticks(ranks)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("rank (number of concepts)")
    ax.set_ylabel("accuracy on the probe images")
    ax.set_title("Fidelity: accuracy with a layer replaced by O_j F")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


@_plain
class _PlainLogFormatter(matplotlib.ticker.LogFormatterSciNotation):
    """Log-axis labels on the ticks matplotlib would label, as plain numbers (0.13, 1e-05).

    matplotlib's own are mathtext, which :func:`plain_text` shows raw
    (``$\\mathdefault{1.3\\times10^{-1}}$``).
    """

    def __call__(self, x, pos=None):
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def history_plot(history: Mapping) -> Figure:
    """Objective and per-view relative error over the solver's iterations.

    Args:
        history: ``FitResult.history``: {"objective": (n_iter,), "rel_error": {view:
            (n_iter,)}}.

    Returns:
        Figure with 2 axes (objective; relative errors).
    """
    if "objective" not in history:
        raise ValueError(
            f"history: expected keys 'objective' and 'rel_error', got {sorted(history)}"
        )
    objective = np.asarray(history["objective"], dtype=np.float64)
    errors = history.get("rel_error", {})
    fig = _figure(9.0, 3.4)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    iterations = np.arange(1, objective.size + 1)
    left.plot(iterations, objective, color="tab:blue")
    if objective.size and np.all(objective > 0):
        left.set_yscale("log")
        left.yaxis.set_major_formatter(_PlainLogFormatter())
        left.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    left.set_xlabel("iteration")
    left.set_ylabel("objective")
    left.set_title("objective")
    for name, values in errors.items():
        values = np.asarray(values, dtype=np.float64)
        right.plot(np.arange(1, values.size + 1), values, label=str(name))
    right.set_xlabel("iteration")
    right.set_ylabel("‖X_v − W_v F‖ / ‖X_v‖")
    right.set_title("relative error per view")
    if errors:
        right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig
