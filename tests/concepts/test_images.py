"""Tests for jaxcnmf.concepts.images: latent images, median masks and masked images."""

import numpy as np
import pytest

from jaxcnmf.concepts.images import latent_images, masked_images, median_mask


def test_known_latent_image_comes_back_after_scaling():
    rng = np.random.default_rng(0)
    H, W, rank = 4, 5, 2
    planted = rng.random((rank, H, W, 3))
    planted[:, 0, 0, :] = 0.0
    planted[:, -1, -1, :] = 1.0
    # P_i column k is the concept's channel image flattened row-major (row h*W + w), at
    # an arbitrary positive scale and offset that min-max scaling must undo.
    loadings = {
        name: 7.0 * planted[..., c].reshape(rank, H * W).T + 0.3
        for c, name in enumerate(["red", "green", "blue"])
    }
    latent = latent_images(loadings, (H, W, 3))
    assert latent.shape == (rank, H, W, 3)
    np.testing.assert_allclose(latent, planted, atol=1e-12)


def test_latent_images_constant_channel_gives_zeros_and_checks_shape():
    latent = latent_images({"gray": np.ones((6, 2))}, (2, 3))
    np.testing.assert_array_equal(latent, np.zeros((2, 2, 3, 1)))
    with pytest.raises(ValueError, match="expected 6 rows"):
        latent_images({"gray": np.ones((5, 2))}, (2, 3))


def test_median_mask_and_masked_images():
    latent = np.arange(8, dtype=float).reshape(1, 2, 4, 1)
    mask = median_mask(latent)
    np.testing.assert_array_equal(mask[0], [[False, False, False, False], [True, True, True, True]])
    assert not median_mask(np.ones((1, 2, 2, 3))).any()
    images = np.full((2, 2, 4, 3), 100, np.uint8)
    out = masked_images(images, mask[0], background=0.5)
    assert out.dtype == np.uint8
    assert (out[:, 1] == 100).all() and (out[:, 0] == 50).all()


@pytest.mark.parametrize("dtype, exact", [("float32", True), ("bfloat16", False)])
def test_store_images_rebuild_the_probed_pictures(tmp_path, dtype, exact):
    from jaxcnmf.concepts.images import store_images
    from jaxcnmf.nets.probe import pixel_views
    from jaxcnmf.solver import store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 4, 3, 3), dtype=np.uint8)
    views = {**pixel_views(images), "conv": rng.random((5, 11), dtype=np.float32)}
    s = store.save(tmp_path / "s", views, block_size=4, dtype=dtype,
                   shapes={name: (4, 3) for name in ("red", "green", "blue")})
    got = store_images(s, [10, 0, 5])
    assert got.dtype == np.uint8 and got.shape == (3, 4, 3, 3)
    difference = np.abs(got.astype(int) - images[[10, 0, 5]].astype(int)).max()
    assert difference == 0 if exact else difference <= 1
    gray = rng.integers(0, 256, (6, 2, 2, 1), dtype=np.uint8)
    g = store.save(tmp_path / "g", pixel_views(gray), shapes={"gray": (2, 2)})
    np.testing.assert_array_equal(store_images(g, [3, 1]), gray[[3, 1]])
    layers = store.save(tmp_path / "l", {"conv": views["conv"]})
    with pytest.raises(ValueError, match=r"expected pixel views \('red', 'green', 'blue' or "
                                         r"'gray'\).*index the source dataset"):
        store_images(layers, [0])
