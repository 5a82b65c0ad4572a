"""Tests for jaxcnmf.figures: every figure renders to a readable PNG with the right axes."""

import doctest

import numpy as np
import pytest
from PIL import Image

from jaxcnmf.concepts import fidelity, images, labels, neighbours, neurons
from jaxcnmf.runs import figures

CLASS_NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    rank, n, H, W = 4, 40, 8, 8
    labels = np.repeat(np.arange(4), n // 4)
    F = rng.uniform(0, 0.2, (rank, n))
    F[labels, np.arange(n)] += 1.0
    return {
        "labels": labels,
        "F": F,
        "gray": rng.integers(0, 256, (n, H, W, 1), dtype=np.uint8),
        "rgb": rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8),
        "pixels_gray": {"gray": rng.random((H * W, rank))},
        "pixels_rgb": {c: rng.random((H * W, rank)) for c in ("red", "green", "blue")},
        "loadings": {
            name: rng.random((rows, rank)) for name, rows in (("conv1", 30), ("conv2", 20), ("pool", 8))
        },
    }


def check_png(fig, path, n_axes):
    assert len(fig.axes) == n_axes
    written = figures.save_figure(fig, path)
    assert written == path and path.stat().st_size > 1000
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 100
    assert fig.axes == []


def concept_inputs(case, kind):
    probe_images = case[kind]
    latent = images.latent_images(case[f"pixels_{kind}"], probe_images.shape[1:])
    records = labels.concept_table(case["F"], case["labels"], CLASS_NAMES, n_images=5)
    return probe_images, records, latent, images.median_mask(latent)


@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_concept_tile(case, tmp_path, kind):
    images, records, latent, masks = concept_inputs(case, kind)
    fig = figures.concept_tile(images, records[1], latent[1], masks[1], n_images=5,
                               labels=case["labels"], class_names=CLASS_NAMES)
    assert fig.get_suptitle().startswith("concept 1 · top class 'one' · ")
    assert [ax.get_title() for ax in fig.axes[:2]] == [
        f"#{records[1].top_images[0]}\nclass 'one'", "masked"]
    check_png(fig, tmp_path / "tile.png", 2 * 5 + 3)


def test_concept_gallery_writes_one_tile_per_concept_in_order(case, tmp_path):
    images, records, latent, masks = concept_inputs(case, "gray")
    order = labels.concept_order(case["F"])
    paths = figures.concept_gallery(
        images, records, latent, masks, tmp_path / "gallery", n_images=3, order=order
    )
    assert [p.name for p in paths] == [f"concept_{k:02d}.png" for k in order]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_concept_tile_rejects_latent_of_wrong_shape(case):
    records = labels.concept_table(case["F"], case["labels"], CLASS_NAMES)
    with pytest.raises(ValueError, match=r"latent: expected shape \(8, 8, 1\)"):
        figures.concept_tile(case["gray"], records[0], np.zeros((8, 8, 3)), np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="images: expected uint8"):
        figures.concept_tile(
            case["gray"].astype(float), records[0], np.zeros((8, 8, 1)), np.zeros((8, 8), bool)
        )


def test_class_share_heatmap(case, tmp_path):
    shares = labels.class_shares(case["F"], case["labels"], 4)
    order = labels.concept_order(case["F"], case["labels"])
    check_png(figures.class_share_heatmap(shares, CLASS_NAMES, order), tmp_path / "shares.png", 2)


@pytest.mark.parametrize("num_classes, title", [
    (10, "class shares of each concept (* unseen), LAM = 0.07 x lam_max"),
    (3, ("class shares of each concept at LAM = 0.07 x lam_max, group lasso over the "
         "probe classes (* unseen)")),
])
def test_class_share_heatmap_title_fits_the_figure(num_classes, title):
    shares = np.full((5, num_classes), 1.0 / num_classes)
    fig = figures.class_share_heatmap(shares, [f"class{k}" for k in range(num_classes)],
                                      title=title)
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert fig.axes[0].get_title().replace("\n", " ") == title


def test_similarity_heatmaps_and_layer_summary(case, tmp_path):
    summary = neurons.layer_summary(case["loadings"], order=labels.concept_order(case["F"]))
    check_png(figures.similarity_heatmaps(summary), tmp_path / "similarity.png", 3 + 1)
    check_png(figures.layer_summary_plot(summary), tmp_path / "summary.png", 1)


def test_neighbour_figure_and_accuracy_plot(case, tmp_path):
    result = neighbours.neighbour_concepts(case["F"], 3, k=5, metric="euclidean")
    fig = figures.neighbour_figure(case["rgb"], result, case["labels"], CLASS_NAMES)
    # The probe index (#) and the class are told apart, and so are query and neighbours.
    query, first = fig.axes[0], fig.axes[1]
    assert query.get_title() == "#3\nclass 'zero'" and query.get_xlabel() == "query"
    assert first.get_title() == f"#{result.neighbours[0]}\nclass " \
        f"'{CLASS_NAMES[case['labels'][result.neighbours[0]]]}'"
    assert first.get_xlabel() == "neighbour 1"
    assert "Probe image #3 and its 5 nearest neighbours" in fig.get_suptitle()
    check_png(fig, tmp_path / "neighbours.png", 5 + 2)
    entropy = neighbours.neighbour_entropy_all(case["F"], 5)
    correct = np.random.default_rng(1).random(entropy.size) < 0.8
    table = neighbours.accuracy_vs_entropy(entropy, correct, bins=[0.0, 0.5, 1.0, 1.5, 2.0])
    check_png(figures.accuracy_entropy_plot(table), tmp_path / "entropy.png", 1)


def test_fidelity_plot(tmp_path):
    tables = [
        fidelity.FidelityTable(
            layer, 0.9, np.array([2, 5, 10]), np.array([0.3, 0.6, 0.85]) + shift,
            np.array([0.5, 0.3, 0.1]),
        )
        for layer, shift in (("conv2", 0.0), ("pool", 0.04))
    ]
    fig = figures.fidelity_plot(tables)
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(0.9)
    check_png(fig, tmp_path / "fidelity.png", 1)
    with pytest.raises(ValueError, match="tables"):
        figures.fidelity_plot([])


def test_history_plot(tmp_path):
    history = {
        "objective": np.geomspace(10.0, 1.0, 30),
        "rel_error": {"gray": np.linspace(0.9, 0.3, 30), "conv2": np.linspace(0.8, 0.2, 30)},
    }
    fig = figures.history_plot(history)
    assert fig.axes[0].get_yscale() == "log"
    assert len(fig.axes[1].get_lines()) == 2
    check_png(fig, tmp_path / "history.png", 2)
    with pytest.raises(ValueError, match="history: expected keys"):
        figures.history_plot({"rel_error": {}})



@pytest.mark.parametrize("objective", [np.geomspace(0.19, 0.11, 200), np.geomspace(30.0, 0.2, 50)])
def test_history_plot_log_axis_labels_are_plain_numbers(objective):
    # Under plain_text the default log labels came out as raw "$\\mathdefault{10^{-1}}$".
    fig = figures.history_plot({"objective": objective, "rel_error": {}})
    with figures.plain_text():
        fig.canvas.draw()
    texts = [t.get_text() for t in fig.axes[0].get_yticklabels(which="both")]
    shown = [t for t in texts if t]
    assert shown and not [t for t in shown if "$" in t or "\\" in t], texts
    assert len(set(shown)) == len(shown), texts  # each tick says its own value
    values = [float(t.replace("\u2212", "-")) for t in shown]
    assert min(values) <= objective.max() and max(values) >= objective.min()


def test_figures_of_many_images_fit_the_report_column(case, tmp_path):
    # The report column is about 800 px at a 900 px window; a wider PNG is shrunk and its
    # 7-8 pt labels with it (the 10-neighbour figure was 1958 px wide, shown at 43%).
    most = figures.PAGE_WIDTH * 110 + 1
    probe_images, _, latent, masks = concept_inputs(case, "gray")
    long_names = ["aquarium_fish", "a_very_long_class_name_indeed", "two", "three"]
    records = labels.concept_table(case["F"], case["labels"], long_names, n_images=6)
    tile = figures.concept_tile(probe_images, records[1], latent[1], masks[1], n_images=6,
                                labels=case["labels"], class_names=long_names)
    # A long class name takes a line of its own under the index, cut to 16 characters.
    assert tile.axes[0].get_title() == f"#{records[1].top_images[0]}\nclass\n'a_very_long_c…'"
    result = neighbours.neighbour_concepts(case["F"], 3, k=10)
    neighbour = figures.neighbour_figure(case["gray"], result, case["labels"], long_names)
    assert neighbour.axes[10].get_xlabel() == "neighbour 10"
    summary = neurons.layer_summary({f"layer{i}": case["loadings"]["conv1"] for i in range(5)})
    heatmaps = figures.similarity_heatmaps(summary)
    for name, fig in (("tile", tile), ("neighbours", neighbour), ("similarity", heatmaps)):
        with Image.open(figures.save_figure(fig, tmp_path / f"{name}.png")) as png:
            assert png.size[0] <= most, (name, png.size)


def test_docstring_example_runs():
    result = doctest.testmod(figures)
    assert result.attempted >= 1 and result.failed == 0


def test_neighbour_figure_bars_follow_the_concept_order(case):
    result = neighbours.neighbour_concepts(case["F"], 3, k=5, metric="euclidean")
    order = [2, 0, 3, 1]
    fig = figures.neighbour_figure(case["rgb"], result, case["labels"], CLASS_NAMES, order=order)
    bars = fig.axes[-1]
    heights = [patch.get_height() for patch in bars.patches]
    np.testing.assert_allclose(heights, np.asarray(result.distribution)[order])
    assert [t.get_text() for t in bars.get_xticklabels()] == ["2", "0", "3", "1"]
    with pytest.raises(ValueError, match="order: expected a permutation of 0..3"):
        figures.neighbour_figure(case["rgb"], result, order=[0, 0, 1, 2])


def test_accuracy_legend_covers_no_bar_and_no_count():
    # Full bars and a count at every bar's foot: a legend inside the axes covers something.
    table = neighbours.AccuracyTable(
        edges=np.linspace(0.0, 2.0, 6), count=np.array([40, 3, 200, 7, 50]),
        accuracy=np.array([1.0, 0.95, 1.0, 0.9, 1.0]), overall=0.98)
    fig = figures.accuracy_entropy_plot(table)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    covered = [artist for artist in (*ax.patches, *ax.texts)
               if legend.overlaps(artist.get_window_extent(renderer))]
    assert covered == []
    assert legend.x1 <= fig.bbox.x1  # and it is not cut off


def test_eigenvalue_plot_has_a_line_per_layer(case, tmp_path):
    summary = neurons.layer_summary(case["loadings"])
    fig = figures.eigenvalue_plot(summary)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines[:3]] == ["conv1", "conv2", "pool"]
    np.testing.assert_allclose(lines[0].get_ydata(),
                               np.sort(summary.eigenvalues["conv1"])[::-1])
    check_png(fig, tmp_path / "eigen.png", 1)


HOSTILE_NAMES = ["$\\alpha$", "$\\notacommand{$", "a$b", "$x^$"]


def test_hostile_names_break_mathtext(tmp_path):
    # Without plain_text these names crash matplotlib; the figures below must not.
    fig = figures._figure(2, 1)
    fig.text(0.1, 0.5, HOSTILE_NAMES[1])
    with pytest.raises(ValueError):
        fig.savefig(tmp_path / "x.png")


def test_user_strings_are_drawn_as_plain_text(case, tmp_path):
    shares = labels.class_shares(case["F"], case["labels"], 4)
    check_png(figures.class_share_heatmap(shares, HOSTILE_NAMES), tmp_path / "shares.png", 2)
    probe_images, _, latent, masks = concept_inputs(case, "gray")
    records = labels.concept_table(case["F"], case["labels"], HOSTILE_NAMES, n_images=3)
    fig = figures.concept_tile(probe_images, records[1], latent[1], masks[1], n_images=3,
                               labels=case["labels"], class_names=HOSTILE_NAMES)
    assert f"top class '{HOSTILE_NAMES[1]}'" in fig.get_suptitle()
    check_png(fig, tmp_path / "tile.png", 2 * 3 + 3)
    result = neighbours.neighbour_concepts(case["F"], 3, k=3)
    check_png(figures.neighbour_figure(case["gray"], result, case["labels"], HOSTILE_NAMES),
              tmp_path / "neighbours.png", 3 + 2)
    summary = neurons.layer_summary({"$\\bad{": case["loadings"]["conv1"]})
    check_png(figures.similarity_heatmaps(summary), tmp_path / "similarity.png", 2)
