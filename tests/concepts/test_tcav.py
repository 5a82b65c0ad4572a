"""Tests of jaxcnmf.tcav on a toy network whose class logits depend on known directions."""

import csv
import warnings

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnmf.nets import models
from jaxcnmf.concepts import tcav

DIM = 64  # the toy layer: 4x4 spatial, 4 channels
RUNS = 10


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


class QuadraticHead(nn.Module):
    """logit_k = <v_k, c> + c^T Q_k c / 2 with c the centred channel-major activations.

    Q_k acts only orthogonally to v_k, so the gradient of logit k is v_k plus an
    input-dependent part orthogonal to v_k: every input's sensitivity along v_k is 1,
    while random directions get sensitivities of both signs.
    """

    directions: tuple
    curvatures: tuple

    @nn.compact
    def __call__(self, feat):
        c = jnp.moveaxis(feat, -1, 1).reshape(feat.shape[0], -1) - 0.5
        v, q = jnp.asarray(self.directions), jnp.asarray(self.curvatures)
        return c @ v.T + 0.5 * jnp.einsum("bi,kij,bj->bk", c, q, c)


class Toy(nn.Module):
    directions: tuple
    curvatures: tuple

    @nn.compact
    def __call__(self, x, train=False):
        return QuadraticHead(self.directions, self.curvatures, name="fc")(
            Identity(name="feat")(x)
        )


def _nested_tuple(a):
    return tuple(_nested_tuple(b) for b in a) if a.ndim > 1 else tuple(float(x) for x in a)


def _to_images(rows):
    """(n, 64) channel-major rows -> (n, 4, 4, 4) NHWC images."""
    return np.moveaxis(rows.reshape(-1, 4, 4, 4), 1, -1).astype(np.float32)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = rng.normal(size=(3, DIM, DIM)) * 0.15
    project = np.eye(DIM)[None] - v[:, :, None] * v[:, None, :]
    q = project @ (q + q.transpose(0, 2, 1)) @ project
    model = Toy(_nested_tuple(v), _nested_tuple(q))

    def images(n, shift=None):
        rows = rng.uniform(0.1, 0.9, size=(n, DIM))
        if shift is not None:
            rows = np.clip(rows + 0.2 * shift, 0, 1)
        return _to_images(rows)

    half = images(15)
    concepts = {
        "along": images(30, np.sign(v[0])),
        "against": images(30, -np.sign(v[0])),
        # A plain random set's chance offset along v_k is a real (tiny) sensitivity that
        # enough runs detect; antithetic pairs x, 1 - x remove it, so this concept tests
        # the procedure rather than the luck of one draw.
        "random": np.concatenate([half, 1 - half]),
    }
    variables = model.init(jax.random.key(0), images(2))
    return {
        "model": model,
        "variables": variables,
        "v": v,
        "pool": images(300),
        "classes": {k: images(60) for k in range(3)},
        "concepts": concepts,
    }


@pytest.fixture(scope="module")
def result(toy):
    return tcav.run(
        toy["model"], toy["variables"], "feat", toy["concepts"], toy["classes"],
        random_runs=RUNS, pool=toy["pool"], seed=0, progress=False,
    )


def _cell(result, concept, cls):
    return result.concepts.index(concept), result.classes.index(str(cls))


def test_aligned_concept_scores_near_one_and_is_significant(result):
    c, k = _cell(result, "along", 0)
    assert result.scores[0, c, k].mean() > 0.95
    assert abs(result.random_scores[0, c, k].mean() - 0.5) < 0.2
    assert result.significant[0, c, k]
    assert result.cav_accuracies[0, c].mean() > 0.9


def test_opposite_direction_flips_the_score(result):
    c, k = _cell(result, "against", 0)
    assert result.scores[0, c, k].mean() < 0.05
    assert result.significant[0, c, k]
    assert result.magnitudes[0, c, k].mean() < 0.05


def test_random_concept_is_not_significant(result):
    c = result.concepts.index("random")
    assert not result.significant[0, c].any()
    assert (result.adjusted[0, c] > 0.05).all()
    assert result.cav_accuracies[0, c].mean() < 0.75


def test_table_csv_and_heatmap(result, tmp_path):
    rows = result.table()
    assert len(rows) == 3 * 3
    assert {"concept", "class", "layer", "mean_score", "std_score", "p_value",
            "p_adjusted", "significant"} <= set(rows[0])
    path = tmp_path / "tcav.csv"
    result.to_csv(path)
    with open(path) as handle:
        assert len(list(csv.DictReader(handle))) == 9
    means, significant = result.heatmap_matrix()
    assert means.shape == significant.shape == (3, 3)
    np.testing.assert_allclose(means, result.scores[0].mean(-1))
    fig = tcav.figure(result, path=tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    fig.clf()


def test_heatmap_title_and_labels_fit_the_figure(result):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = tcav.figure(result)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    for artist in (ax.title, ax.yaxis.label, *ax.get_yticklabels()):
        box = artist.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    assert ax.get_title() == "TCAV scores at feat\n(hatched: not significant)"


def _separable(seed, runs=5, n=30):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    concept = rng.normal(size=(n, DIM)) + 3 * direction
    randoms = rng.normal(size=(runs, n, DIM)) - 3 * direction
    return concept, randoms, direction


def test_logistic_cavs_are_unit_separating_normals():
    concept, randoms, direction = _separable(1)
    cavs = tcav.train_cavs(concept, randoms, seed=0)
    assert cavs.vectors.shape == (5, DIM) and cavs.accuracies.shape == (5,)
    np.testing.assert_allclose(np.linalg.norm(cavs.vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(cavs.accuracies, 1.0)
    assert (cavs.vectors @ direction > 0.5).all()
    # Separating: every concept example projects above every random example.
    for vector, negatives in zip(cavs.vectors, randoms):
        assert (concept @ vector).min() > (negatives @ vector).max()


def test_logistic_cavs_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    concept, randoms, _ = _separable(2)
    randoms = randoms + np.random.default_rng(3).normal(size=randoms.shape) * 3
    l2 = 0.01
    cavs = tcav.train_cavs(concept, randoms, holdout=0.0, l2=l2)
    for vector, negatives in zip(cavs.vectors, randoms):
        x = np.concatenate([concept, negatives])
        y = np.r_[np.ones(len(concept)), np.zeros(len(negatives))]
        centred = x - x.mean(0)
        scale = np.sqrt((centred**2).mean())
        reference = LogisticRegression(C=1 / (len(x) * l2), tol=1e-10, max_iter=10_000)
        normal = reference.fit(centred / scale, y).coef_[0]
        np.testing.assert_allclose(vector, normal / np.linalg.norm(normal), atol=1e-3)


def test_vmapped_cavs_equal_one_by_one():
    concept, randoms, _ = _separable(4)
    randoms = randoms + np.random.default_rng(5).normal(size=randoms.shape) * 3
    for method in tcav.CAV_METHODS:
        batch = tcav.train_cavs(concept, randoms, method=method, holdout=0.0)
        for r in range(len(randoms)):
            one = tcav.train_cavs(concept, randoms[r : r + 1], method=method, holdout=0.0)
            np.testing.assert_allclose(batch.vectors[r], one.vectors[0], atol=1e-4)
            np.testing.assert_allclose(batch.accuracies[r], one.accuracies[0])


def test_mean_diff_cav_is_the_normalised_mean_difference():
    concept, randoms, _ = _separable(6)
    cavs = tcav.train_cavs(concept, randoms, method="mean_diff", holdout=0.0)
    expected = concept.mean(0) - randoms.mean(1)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(cavs.vectors, expected, atol=1e-5)
    np.testing.assert_array_equal(cavs.accuracies, 1.0)


def test_sensitivities_equal_finite_differences():
    model = models.small_cnn(4, width=0.25)
    rng = np.random.default_rng(7)
    images = rng.uniform(0, 1, size=(6, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.key(1), images[:1], train=False)
    labels = np.array([0, 1, 2, 3, 0, 1])
    grads = tcav.layer_gradients(model, variables, images, labels, ["conv2"], batch_size=4)
    shape = tcav.layer_shapes(model, variables, images.shape[1:])["conv2"]  # (H, W, C)
    cavs = rng.normal(size=(3, int(np.prod(shape))))
    cavs /= np.linalg.norm(cavs, axis=1, keepdims=True)
    sens = tcav.sensitivities(grads["conv2"], cavs)
    assert sens.shape == (6, 3)

    @jax.jit
    def logits_shifted(shift):
        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.module.name == "conv2" and context.method_name == "__call__":
                out = out + shift
            return out

        with nn.intercept_methods(interceptor):
            return model.apply(variables, images, train=False)

    eps = 1e-2
    for r, cav in enumerate(cavs):
        # The CAV is channel-major (C, H, W); the layer output is NHWC.
        shift = np.moveaxis(cav.reshape(shape[2], shape[0], shape[1]), 0, -1) * eps
        up, down = (np.asarray(logits_shifted(s), np.float64) for s in (shift, -shift))
        finite = (up - down) / (2 * eps)
        np.testing.assert_allclose(
            sens[:, r], finite[np.arange(6), labels], rtol=2e-2, atol=2e-3
        )


def test_tcav_scores_and_magnitudes():
    grads = np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [0.0, -1.0]])
    cavs = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores, magnitudes = tcav.tcav_scores(grads, cavs, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(scores, [[0.5, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(magnitudes, [[1 / 3, 0.0], [0.0, 0.75]])


def test_multiple_testing_corrections_match_textbook_values():
    # Benjamini & Hochberg (1995)'s 15 p-values; adjusted values as R's p.adjust gives.
    p = np.array([0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344,
                  0.0459, 0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.0000])
    bh = [0.0015, 0.0030, 0.0095, 0.035625, 0.0603, 0.06385714, 0.06385714, 0.0645,
          0.0765, 0.486, 0.58118182, 0.714875, 0.75323077, 0.81321429, 1.0]
    np.testing.assert_allclose(tcav.adjust_pvalues(p, "bh"), bh, rtol=1e-6)
    bonferroni = np.minimum(1, p * 15)
    np.testing.assert_allclose(tcav.adjust_pvalues(p, "bonferroni"), bonferroni)
    # Shape is kept, order does not matter, NaN counts as 1.
    grid = np.array([[0.04, 0.01], [np.nan, 0.03]])
    np.testing.assert_allclose(
        tcav.adjust_pvalues(grid, "bh"), [[0.16 / 3, 0.04], [1.0, 0.16 / 3]]
    )
    with pytest.raises(ValueError, match="correction"):
        tcav.adjust_pvalues(p, "holm")


def test_welch_pvalues_match_scipy_and_handle_constant_cells():
    from scipy import stats

    rng = np.random.default_rng(8)
    a, b = rng.random((2, 3, 12))
    expected = stats.ttest_ind(a, b, axis=-1, equal_var=False).pvalue
    np.testing.assert_allclose(tcav.welch_pvalues(a, b), expected)
    assert tcav.welch_pvalues(np.ones(5), np.ones(5)) == 1.0


def test_concepts_from_factors_takes_top_images():
    F = np.array([[0.0, 5.0, 1.0, 3.0], [2.0, 0.0, 4.0, 1.0]])
    images = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    concepts = tcav.concepts_from_factors(F, images, top=2, names=["a", "b"])
    assert list(concepts) == ["a", "b"]
    np.testing.assert_array_equal(concepts["a"][:, 0, 0, 0], [1, 3])
    np.testing.assert_array_equal(concepts["b"][:, 0, 0, 0], [2, 0])
    with pytest.raises(ValueError, match="top"):
        tcav.concepts_from_factors(F, images, top=5)
    with pytest.raises(ValueError, match="images"):
        tcav.concepts_from_factors(F, images[:3])


def test_random_sets_exclude_the_concept_images(toy):
    # The concept is half the pool: random sets must come from the other half only.
    pool = toy["pool"][:80]
    concept = pool[:30]
    with pytest.raises(ValueError, match="got 50 pool images outside the concept"):
        tcav.run(toy["model"], toy["variables"], "feat", {"c": concept}, toy["classes"],
                 random_runs=2, pool=pool, progress=False, cav_method="mean_diff")
    result = tcav.run(toy["model"], toy["variables"], "feat", {"c": concept},
                      toy["classes"], random_runs=2, random_size=20, pool=pool,
                      progress=False, cav_method="mean_diff")
    assert result.scores.shape == (1, 1, 3, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer": "nope"}, r"layer: expected one of the model's layers \('feat', 'fc'\)"),
        ({"random_runs": 1}, "random_runs: expected an int >= 2"),
        ({"correction": "holm"}, "correction"),
        ({"cav_method": "svm"}, "cav method"),
        ({"classes": {"cat": None}}, "class_names"),
        ({"classes": {7: None}}, r"logit indices in \[0, 3\)"),
        ({"concepts": {"tiny": np.zeros((1, 4, 4, 4), np.float32)}}, "at least 2"),
        ({"concepts": {"big": np.full((3, 4, 4, 4), 2.0, np.float32)}}, r"in \[0, 1\]"),
        ({"concepts": {"odd": np.zeros((3, 8, 8, 4), np.float32)}}, "expected images of shape"),
    ],
)
def test_run_validates_at_the_front_door(toy, kwargs, message):
    args = {
        "layer": "feat",
        "concepts": toy["concepts"],
        "classes": toy["classes"],
        "random_runs": 2,
        "pool": toy["pool"],
        "progress": False,
    }
    if "classes" in kwargs:
        kwargs = {"classes": {**{k: toy["classes"][0] for k in kwargs["classes"]}}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        tcav.run(toy["model"], toy["variables"], **args)


def test_network_running_names_are_probes():
    # They moved to nets.probe; tcav re-exports them for code that imported them here.
    from jaxcnmf.nets import probe

    for name in ("layer_shapes", "layer_activations", "layer_gradients"):
        assert getattr(tcav, name) is getattr(probe, name), name


def test_several_layers_in_one_call_match_single_layer_calls(toy):
    args = dict(concepts=toy["concepts"], classes=toy["classes"], random_runs=3,
                pool=toy["pool"], cav_method="mean_diff", progress=False, seed=3)
    # The logits' gradient with respect to themselves is constant: "fc" warns.
    with pytest.warns(tcav.TcavWarning, match="layer 'fc'"):
        both = tcav.run(toy["model"], toy["variables"], ["feat", "fc"], **args)
    assert both.constant_gradient.tolist() == [[False] * 3, [True] * 3]
    single = tcav.run(toy["model"], toy["variables"], "feat", **args)
    assert both.layers == ("feat", "fc")
    assert both.scores.shape == (2, 3, 3, 3) and both.p_values.shape == (2, 3, 3)
    # Scores are fractions of positive directional derivatives: computed by two programs,
    # one can move only where a derivative lies within rounding of zero.
    np.testing.assert_allclose(both.scores[0], single.scores[0], atol=0.02)
    np.testing.assert_allclose(both.random_scores[0], single.random_scores[0], atol=0.02)
    assert len(both.table()) == 2 * 3 * 3


def _precisions(jaxpr):
    """``precision`` of every matmul and convolution in a jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(eqn.params["precision"])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_precisions(sub))
    return found


def test_every_matmul_in_cav_fits_and_scores_runs_at_full_precision():
    # The CPU always computes float32 products in full, so the traced programs are what
    # can be checked here: each product must carry HIGHEST rather than the backend's
    # default, which is TF32 on NVIDIA GPUs. (The activations and gradients are checked
    # in tests/nets/test_probe.py.)
    programs = [
        jax.make_jaxpr(tcav._class_scores)(jnp.ones((4, 6)), jnp.ones((3, 6)), jnp.ones((4, 2))),
    ]
    acts = jnp.ones((12, 6))
    pos, neg = jnp.arange(4)[None].repeat(2, 0), 4 + jnp.arange(8).reshape(2, 4)
    train = jnp.ones((2, 8), bool)
    for method in tcav.CAV_METHODS:
        programs.append(jax.make_jaxpr(
            lambda a, p, n, t, method=method: tcav._fit_cavs(
                a, p, n, t, method=method, l2=0.01, max_steps=5, tol=1e-5, chunk=2
            )
        )(acts, pos, neg, train))
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for program in programs:
        found = _precisions(program.jaxpr)
        assert found and all(p == highest for p in found), found


class ConvFeatures(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Conv(6, (3, 3))(x))


class LinearHead(nn.Module):
    """conv -> global average pool -> dense: linear from "conv" to the logits."""

    @nn.compact
    def __call__(self, x, train=False):
        feat = ConvFeatures(name="conv")(x)
        return nn.Dense(3, name="fc")(feat.mean(axis=(1, 2)))


class NonLinearHead(nn.Module):
    """conv -> dense -> ReLU -> dense: the ReLU makes the gradient depend on the input."""

    @nn.compact
    def __call__(self, x, train=False):
        feat = ConvFeatures(name="conv")(x)
        hidden = nn.relu(nn.Dense(16, name="hidden")(feat.reshape(feat.shape[0], -1)))
        return nn.Dense(3, name="fc")(hidden)


def _run_head(model):
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(120, 6, 6, 1)).astype(np.float32)
    variables = model.init(jax.random.key(1), images[:1])
    return tcav.run(
        model, variables, "conv", {"a": images[:10], "b": images[10:20]},
        {k: images[20 + 20 * k: 40 + 20 * k] for k in range(3)}, random_runs=4,
        pool=images, cav_method="mean_diff", progress=False,
    )


def test_linear_head_warns_and_flags_zero_one_scores():
    with pytest.warns(tcav.TcavWarning, match=r"layer 'conv'.*every class.*exactly 0 or 1"
                      r".*earlier layer"):
        result = _run_head(LinearHead())
    assert result.constant_gradient.shape == (1, 3) and result.constant_gradient.all()
    assert np.isin(result.scores, [0.0, 1.0]).all()
    assert np.isin(result.random_scores, [0.0, 1.0]).all()
    assert all(row["constant_gradient"] for row in result.table())


def test_non_linear_head_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", tcav.TcavWarning)
        result = _run_head(NonLinearHead())
    assert not result.constant_gradient.any()
    assert not any(row["constant_gradient"] for row in result.table())
    # Gradients differ between inputs, so some CAV splits a class's inputs.
    assert not np.isin(result.random_scores, [0.0, 1.0]).all()


def test_constant_gradients_tolerance_and_single_input_classes():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(1, 20))
    rounding = base + 1e-7 * rng.normal(size=(6, 20))
    varying = base + 1e-3 * rng.normal(size=(6, 20))
    grads = np.concatenate([rounding, varying, np.zeros((4, 20)), base])
    labels = np.repeat([0, 1, 2, 3], [6, 6, 4, 1])
    # Round-off counts as constant, a real spread does not, all-zero gradients are
    # constant, and one input alone says nothing about the layer.
    assert tcav.constant_gradients(grads, labels, 5).tolist() == [True, False, True, False,
                                                                  False]


def test_concepts_from_store_equal_concepts_from_factors(tmp_path):
    from jaxcnmf.nets.probe import pixel_views
    from jaxcnmf.solver import store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, 2, 2, 3), dtype=np.uint8)
    F = rng.random((3, 9))
    s = store.save(tmp_path / "s", pixel_views(images), block_size=4,
                   shapes={name: (2, 2) for name in ("red", "green", "blue")})
    got = tcav.concepts_from_store(F, s, top=4)
    expected = tcav.concepts_from_factors(F, images, top=4)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    with pytest.raises(ValueError, match=r"F: expected shape \(rank, 9\)"):
        tcav.concepts_from_store(F[:, :5], s)
