"""Tests for jaxcnmf.concepts.fidelity: activation layout and accuracy with a layer replaced by O_j F."""

import json
import sys
import types

import numpy as np
import pytest
from scipy.optimize import nnls

from jaxcnmf.concepts.fidelity import fidelity, fidelity_from_logits_fn, fidelity_from_store, flatten_activations, unflatten_activations


def test_flatten_unflatten_channel_major_round_trip():
    H, W, C, N = 2, 3, 4, 5
    acts = np.random.default_rng(0).random((N, H, W, C))
    A = flatten_activations(acts)
    assert A.shape == (C * H * W, N)
    n, c, h, w = 3, 2, 1, 2
    assert A[c * H * W + h * W + w, n] == acts[n, h, w, c]
    np.testing.assert_array_equal(unflatten_activations(A, (H, W, C)), acts)
    vec = np.arange(6.0).reshape(2, 3)
    back = unflatten_activations(flatten_activations(vec), (3,))
    np.testing.assert_array_equal(back, vec)
    with pytest.raises(ValueError, match=r"expected \(24, N\)"):
        unflatten_activations(A[:-1], (H, W, C))


def linear_network(num_classes=3, shape=(2, 2, 3), per_class=20, seed=0):
    """An exactly rank-``num_classes`` layer and a linear head that reads its concepts.

    ``A = O_true F_true`` with each image's strongest concept equal to its label, and
    logits ``= pinv(O_true) A = F_true``, so the network is right on every image.
    """
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape))
    labels = np.repeat(np.arange(num_classes), per_class)
    F_true = rng.uniform(0.0, 0.3, (num_classes, labels.size))
    F_true[labels, np.arange(labels.size)] += 1.0
    O_true = rng.uniform(0.0, 1.0, (rows, num_classes))
    A = O_true @ F_true
    head = np.linalg.pinv(O_true)

    def logits_fn(acts):
        assert acts.shape == (labels.size, *shape) and acts.dtype == np.float32
        return (head @ flatten_activations(acts)).T

    return A, labels, O_true, logits_fn, shape


def nnls_transform(O):
    return lambda A: np.stack([nnls(O, col)[0] for col in A.T], axis=1)


def test_fidelity_full_rank_of_exactly_low_rank_layer_keeps_accuracy():
    A, labels, O_true, logits_fn, shape = linear_network()
    original, replaced, rel = fidelity_from_logits_fn(
        logits_fn, A, labels, O_true, nnls_transform(O_true), shape
    )
    assert original == 1.0
    assert replaced == 1.0
    assert rel < 1e-5


def test_fidelity_rank_one_drops_accuracy():
    A, labels, _, logits_fn, shape = linear_network()
    # Best non-negative rank-1 approximation: the Perron singular vector.
    u = np.abs(np.linalg.svd(A, full_matrices=False)[0][:, :1])
    original, replaced, rel = fidelity_from_logits_fn(
        logits_fn, A, labels, u, nnls_transform(u), shape
    )
    assert original == 1.0
    # A rank-1 reconstruction gives every image the same logit direction: one class.
    assert replaced <= 1 / 3 + 1e-9
    assert rel > 0.05


def test_fidelity_wrapper_uses_probe_and_transform(monkeypatch):
    A, labels, O_true, logits_fn, shape = linear_network()
    images = np.zeros((labels.size, 4, 4, 1), np.uint8)
    calls = []

    def intervene(model, variables, imgs, layer, acts):
        calls.append(layer)
        assert imgs is images
        return logits_fn(acts)

    fake_probe = types.SimpleNamespace(
        available_layers=lambda model, input_shape: {"conv": shape},
        collect=lambda model, variables, imgs, layers, pixels, pooling, progress: {"conv": A},
        intervene=intervene,
    )
    import jaxcnmf.nets

    monkeypatch.setitem(sys.modules, "jaxcnmf.nets.probe", fake_probe)
    monkeypatch.setattr(jaxcnmf.nets, "probe", fake_probe, raising=False)

    class FakeResult:
        def __init__(self, O):
            self.loadings = {"conv": O}
            self.F = np.zeros((O.shape[1], labels.size))
            self._transform = nnls_transform(O)

        def transform(self, views):
            assert set(views) == {"conv"}
            return self._transform(views["conv"])

    u = np.abs(np.linalg.svd(A, full_matrices=False)[0][:, :1])
    fits = [FakeResult(O_true), FakeResult(u)]
    table = fidelity(None, None, images, labels, fits, "conv")
    assert table.layer == "conv" and table.original_accuracy == 1.0
    np.testing.assert_array_equal(table.ranks, [1, 3])
    assert table.accuracy[0] <= 1 / 3 + 1e-9 and table.accuracy[1] == 1.0
    assert table.relative_error[1] < 1e-5 < table.relative_error[0]
    assert calls == ["conv"] * 3
    rows = json.loads(json.dumps(table.to_rows()))
    assert rows[1]["accuracy_drop"] == 0.0
    with pytest.raises(ValueError, match="layer: expected one of the fitted views"):
        fidelity(None, None, images, labels, FakeResult(u), "fc")


def test_fidelity_from_a_store_measures_a_seeded_subset(monkeypatch, tmp_path):
    from jaxcnmf.nets.probe import pixel_views
    from jaxcnmf.solver import store

    A, labels, O_true, _, shape = linear_network(per_class=10)
    images = np.random.default_rng(1).integers(0, 256, (labels.size, 2, 2, 3), np.uint8)
    head = np.linalg.pinv(O_true)
    seen = []

    def intervene(model, variables, imgs, layer, acts):
        seen.append(imgs)
        assert acts.shape == (len(imgs), *shape)
        return (head @ flatten_activations(acts)).T

    fake_probe = types.SimpleNamespace(
        available_layers=lambda model, input_shape: {"conv": shape}, intervene=intervene)
    import jaxcnmf.nets

    monkeypatch.setitem(sys.modules, "jaxcnmf.nets.probe", fake_probe)
    monkeypatch.setattr(jaxcnmf.nets, "probe", fake_probe, raising=False)

    class FakeResult:
        def __init__(self, O):
            self.loadings = {"conv": O}
            self.F = np.zeros((O.shape[1], labels.size))

        def transform(self, views):
            return nnls_transform(self.loadings["conv"])(views["conv"])

    views = {**pixel_views(images), "conv": A.astype(np.float32)}
    s = store.save(tmp_path / "s", views, labels=labels, block_size=7,
                   shapes={"red": (2, 2), "green": (2, 2), "blue": (2, 2), "conv": shape})
    res = FakeResult(O_true)
    table = fidelity_from_store(None, None, s, res, "conv", n_images=12, seed=3)
    subset = np.sort(np.random.default_rng(3).choice(labels.size, 12, replace=False))
    expected = fidelity(None, None, images[subset], labels[subset], res, "conv",
                        activations=A[:, subset].astype(np.float32), shape=shape)
    assert (table.n_images, table.n_total) == (12, labels.size)
    np.testing.assert_array_equal(seen[0], images[subset])  # rebuilt from the pixel views
    assert table.original_accuracy == expected.original_accuracy == 1.0
    np.testing.assert_allclose(table.accuracy, expected.accuracy)
    np.testing.assert_allclose(table.relative_error, expected.relative_error, rtol=1e-5)
    assert table.to_rows()[0]["n_images"] == 12 and "n_images" not in expected.to_rows()[0]
    with pytest.raises(ValueError, match=r"layer: expected one of the store's views"):
        fidelity_from_store(None, None, s, res, "fc")
    pooled = store.save(tmp_path / "p", {"conv": A[:3]}, labels=labels,
                        shapes={"conv": shape})
    with pytest.raises(ValueError, match="holds it pooled"):
        fidelity_from_store(None, None, pooled, FakeResult(O_true[:3]), "conv")
    with pytest.raises(ValueError, match=r"view 'conv': expected 3 rows as when fitted, got 12"):
        fidelity_from_store(None, None, s, FakeResult(O_true[:3]), "conv")
