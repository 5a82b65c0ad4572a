"""Tests of jaxcnmf.data: the Dataset type, every loader on tiny files written here in the
official formats, balanced sampling, pixel scaling and each error message."""

import io
import json
import os
import pickle
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcnmf.nets import data
from jaxcnmf.nets.data import Dataset, DatasetSplits

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------- writers


def _rows(images):
    """(N, 32, 32, 3) -> (N, 3072): red plane, green plane, blue plane (official layout)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def _key(name, bytes_keys):
    return name.encode() if bytes_keys else name


def _dump(obj, path, bytes_keys=True, protocol=2):
    obj = {_key(k, bytes_keys): v for k, v in obj.items()}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _random_images(rng, n, size=32, channels=3):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def write_cifar10(root, rng, per_batch=4, n_test=6, bytes_keys=True):
    """Official cifar-10-batches-py folder; returns (train images, train labels, test ...)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    enc = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    _dump({"label_names": [enc(n) for n in CIFAR10_NAMES], "num_vis": 3072}, folder / "batches.meta", bytes_keys)
    train_x, train_y = _random_images(rng, 5 * per_batch), rng.integers(0, 10, 5 * per_batch)
    for b in range(5):
        s = slice(b * per_batch, (b + 1) * per_batch)
        _dump({"data": _rows(train_x[s]), "labels": [int(v) for v in train_y[s]]},
              folder / f"data_batch_{b + 1}", bytes_keys)
    test_x, test_y = _random_images(rng, n_test), rng.integers(0, 10, n_test)
    _dump({"data": _rows(test_x), "labels": [int(v) for v in test_y]}, folder / "test_batch", bytes_keys, protocol=4)
    return folder, (train_x, train_y, test_x, test_y)


def write_cifar100(root, images, fine, coarse, fine_names, coarse_names, bytes_keys=True, train=None):
    """Official cifar-100-python folder with ``images`` as the test set (train empty by default)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    enc = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    _dump({"fine_label_names": [enc(n) for n in fine_names],
           "coarse_label_names": [enc(n) for n in coarse_names]}, folder / "meta", bytes_keys)
    _dump({"data": _rows(images), "fine_labels": [int(v) for v in fine],
           "coarse_labels": [int(v) for v in coarse]}, folder / "test", bytes_keys)
    tx, tf, tc = train if train is not None else (np.zeros((0, 32, 32, 3), np.uint8), [], [])
    _dump({"data": _rows(tx), "fine_labels": list(tf), "coarse_labels": list(tc)}, folder / "train", bytes_keys)
    return folder


def tar_folder(folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny100(rng):
    fine_names = ("apple", "bee", "cup", "tulip")
    coarse_names = ("flora", "insects", "things")
    fine_to_coarse = np.array([0, 1, 2, 0])
    fine = np.array([0, 1, 2, 3, 3, 1, 0])
    return _random_images(rng, len(fine)), fine, fine_to_coarse[fine], fine_names, coarse_names


# ----------------------------------------------------------------------------- Dataset


def _ds(n=6, c=3, **kw):
    args = dict(images=np.zeros((n, 4, 4, c), np.uint8), labels=np.arange(n) % 2, class_names=("a", "b"))
    args.update(kw)
    return Dataset(**args)


def test_dataset_normalises_labels_and_names():
    ds = _ds(labels=np.array([0, 1, 0, 1, 1, 0], np.uint8), class_names=["a", "b"])
    assert ds.labels.dtype == np.int64 and ds.class_names == ("a", "b")
    assert ds.num_classes == 2 and len(ds) == 6
    assert ds.class_counts().tolist() == [3, 3]
    assert "6 images 4x4x3 uint8, 2 classes" in ds.summary()


def test_dataset_subset_keeps_coarse_labels_and_names():
    ds = _ds(coarse_labels=np.arange(6) % 2, superclass_names=("x", "y"), name="t")
    sub = ds.subset([5, 0])
    assert sub.labels.tolist() == [1, 0] and sub.coarse_labels.tolist() == [1, 0]
    assert sub.superclass_names == ("x", "y") and sub.name == "t"
    assert len(ds.subset(ds.labels == 1)) == 3
    assert len(ds.subset([])) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(images=np.zeros((6, 4, 4, 3), np.float32)), r"images: expected dtype uint8.*got float32"),
        (dict(images=np.zeros((6, 4, 4), np.uint8)), r"images: expected shape \(N, H, W, C\).*got \(6, 4, 4\)"),
        (dict(images=np.zeros((6, 4, 4, 2), np.uint8)), r"C in \{1, 3\}, got \(6, 4, 4, 2\)"),
        (dict(labels=np.zeros(5, int)), r"labels: expected shape \(6,\) to match images, got \(5,\)"),
        (dict(labels=np.array([0, 1, 2, 0, 1, 0])), r"labels: expected values in \[0, 2\), got 2"),
        (dict(labels=np.array([0, 1, -1, 0, 1, 0])), r"labels: expected values in \[0, 2\), got -1"),
        (dict(labels=np.zeros(6)), r"labels: expected an integer array, got dtype float64"),
        (dict(class_names=("a", "a")), r"class_names: expected unique names, got duplicates \['a'\]"),
        (dict(coarse_labels=np.zeros(6, int)), r"expected both or neither, got only coarse_labels"),
        (dict(coarse_labels=np.array([0, 0, 0, 0, 0, 1]), superclass_names=("x", "y")),
         r"coarse_labels: expected one superclass per class, got class 'b' \(label 1\) in superclasses \['x', 'y'\]"),
        (dict(coarse_labels=np.array([0, 3, 0, 3, 0, 3]), superclass_names=("x", "y")),
         r"coarse_labels: expected values in \[0, 2\), got 3"),
    ],
)
def test_dataset_rejects_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        _ds(**kw)


def test_dataset_splits_must_agree():
    with pytest.raises(ValueError, match=r"class_names: expected the same in train and test"):
        DatasetSplits(_ds(), _ds(class_names=("a", "c")), name="x")
    with pytest.raises(ValueError, match=r"images: expected the same \(H, W, C\).*\(4, 4, 3\) and \(4, 4, 1\)"):
        DatasetSplits(_ds(), _ds(c=1), name="x")
    splits = DatasetSplits(_ds(), _ds(n=2), name="x")
    assert splits.num_classes == 2 and splits.class_names == ("a", "b") and splits.superclass_names is None


# ----------------------------------------------------------------------------- small helpers


def test_to_float_scales_without_normalisation():
    x = np.array([[0, 1, 128, 255]], np.uint8)
    out = data.to_float(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, x.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="images: expected dtype uint8.*got float32"):
        data.to_float(out)


def test_same_channels_detects_gray_pictures_stored_as_rgb(rng):
    gray = rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    assert data.same_channels(np.repeat(gray, 3, axis=-1))
    assert data.same_channels(gray)
    almost = np.repeat(gray, 3, axis=-1)
    almost[2, 3, 3, 2] ^= 1  # one pixel of one image differs in blue
    assert not data.same_channels(almost)
    assert not data.same_channels(np.zeros((0, 4, 4, 3), np.uint8))
    assert data.same_channels(np.full((1, 2, 2, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"images: expected shape \(N, H, W, C\) with C in \{1, 3\}, got \(4, 4, 2\)"):
        data.same_channels(np.zeros((4, 4, 2)))


def test_channel_names():
    assert data.channel_names(3) == ("red", "green", "blue")
    assert data.channel_names(1) == ("gray",)
    with pytest.raises(ValueError, match="num_channels: expected 1 or 3, got 4"):
        data.channel_names(4)


# ----------------------------------------------------------------------------- digits


def test_digits_loads_offline_with_fixed_stratified_split():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    assert isinstance(ds, DatasetSplits) and ds.name == "digits"
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert ds.train.images.shape == (1438, 32, 32, 1) and ds.test.images.shape == (359, 32, 32, 1)
    assert ds.train.images.dtype == np.uint8 and ds.test.images.max() == 255
    # Each class keeps ~20% for test.
    np.testing.assert_allclose(ds.test.class_counts() / (ds.train.class_counts() + ds.test.class_counts()), 0.2, atol=0.02)
    # Nearest-neighbour upsampling: every 4x4 block is one source pixel, 0..16 -> 0..255.
    bunch = load_digits()
    both = np.concatenate([ds.train.images, ds.test.images])[..., 0]
    small = both[:, ::4, ::4]
    np.testing.assert_array_equal(both, small.repeat(4, axis=1).repeat(4, axis=2))
    source = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    labels = np.concatenate([ds.train.labels, ds.test.labels])
    assert sorted(zip(map(bytes, small), labels)) == sorted(zip(map(bytes, source), bunch.target))
    again = data.load("digits", split="test")
    np.testing.assert_array_equal(again.images, ds.test.images)
    other = data.load("digits", seed=1, split="test")
    assert {bytes(i) for i in other.images} != {bytes(i) for i in ds.test.images}


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_folder_round_trips_pixels(tmp_path, rng, bytes_keys):
    folder, (train_x, train_y, test_x, test_y) = write_cifar10(tmp_path, rng, bytes_keys=bytes_keys)
    for source in (tmp_path, folder):
        ds = data.load("cifar10", source=source)
        assert ds.name == "cifar10" and ds.class_names == CIFAR10_NAMES and ds.superclass_names is None
        np.testing.assert_array_equal(ds.train.images, train_x)
        np.testing.assert_array_equal(ds.train.labels, train_y)
        np.testing.assert_array_equal(ds.test.images, test_x)
        np.testing.assert_array_equal(ds.test.labels, test_y)
    # The path of the official folder alone is recognised too.
    np.testing.assert_array_equal(data.load(folder, split="test").images, test_x)


def test_cifar10_plane_layout_is_red_green_blue_row_major(tmp_path, rng):
    folder, (_, _, test_x, _) = write_cifar10(tmp_path, rng)
    raw = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"data"]
    img = data.load("cifar10", source=tmp_path, split="test").images
    # Pixel (h=2, w=5), channel c sits at c * 1024 + 2 * 32 + 5 of the row.
    for c in range(3):
        np.testing.assert_array_equal(img[:, 2, 5, c], raw[:, c * 1024 + 2 * 32 + 5])


def test_cifar10_archive_read_in_place(tmp_path, rng):
    folder, (train_x, train_y, test_x, test_y) = write_cifar10(tmp_path / "src", rng)
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
    for source in (tmp_path, archive):
        ds = data.load("cifar10", source=source)
        np.testing.assert_array_equal(ds.train.images, train_x)
        np.testing.assert_array_equal(ds.test.labels, test_y)
    test_only = data.load(archive, split="test")
    np.testing.assert_array_equal(test_only.images, test_x)
    assert not any(p.name == "cifar-10-batches-py" for p in tmp_path.iterdir())


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar100_fine_and_coarse(tmp_path, rng, tiny100, bytes_keys):
    images, fine, coarse, fine_names, coarse_names = tiny100
    train = (images[:3], fine[:3], coarse[:3])
    folder = write_cifar100(tmp_path, images, fine, coarse, fine_names, coarse_names, bytes_keys, train=train)
    ds = data.load("cifar100", source=folder)
    assert ds.class_names == fine_names and ds.superclass_names == coarse_names
    np.testing.assert_array_equal(ds.test.images, images)
    np.testing.assert_array_equal(ds.test.labels, fine)
    np.testing.assert_array_equal(ds.test.coarse_labels, coarse)
    np.testing.assert_array_equal(ds.train.images, images[:3])
    np.testing.assert_array_equal(ds.train.coarse_labels, coarse[:3])


def test_cifar100_empty_train_and_archive(tmp_path, tiny100):
    images, fine, coarse, fine_names, coarse_names = tiny100
    folder = write_cifar100(tmp_path / "src", images, fine, coarse, fine_names, coarse_names)
    archive = tar_folder(folder, tmp_path / "cifar-100-python.tar.gz")
    ds = data.load("cifar100", source=tmp_path)
    assert ds.train.images.shape == (0, 32, 32, 3) and ds.train.coarse_labels.shape == (0,)
    assert ds.train.superclass_names == coarse_names
    np.testing.assert_array_equal(ds.test.coarse_labels, coarse)
    np.testing.assert_array_equal(data.load(archive).test.images, images)


def test_cifar_found_through_env_var(tmp_path, rng, monkeypatch):
    _, (_, _, test_x, _) = write_cifar10(tmp_path, rng)
    monkeypatch.setenv("JAXCNMF_DATA", str(tmp_path))
    np.testing.assert_array_equal(data.load("cifar10", split="test").images, test_x)


def test_cifar_missing_everywhere_explains_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCNMF_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar100", data_dir=tmp_path / "tfds")
    message = str(err.value)
    assert "JAXCNMF_DATA" in message and "not prepared" in message
    assert "source=DIR" in message and "cifar-100-python.tar.gz" in message
    assert "download=True" in message


def test_cifar_source_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match=r"source: no such file or folder: '.*nowhere'"):
        data.load("cifar10", source=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"contain 'cifar-10-batches-py' or 'cifar-10-python.tar.gz'"):
        data.load("cifar10", source=tmp_path)
    folder, _ = write_cifar10(tmp_path, rng)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3'.*missing file of the official cifar10 layout"):
        data.load("cifar10", source=tmp_path)
    # Only the split asked for is read.
    assert len(data.load("cifar10", source=tmp_path, split="test")) == 6


def test_truncated_archive_is_named(tmp_path, rng):
    folder, _ = write_cifar10(tmp_path / "src", rng)
    archive = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz'?: corrupt or truncated archive"):
        data.load("cifar10", source=archive)
    archive.write_bytes(b"not a tar file at all")
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz'?: corrupt or truncated archive"):
        data.load("cifar10", source=archive)


def test_truncated_pickle_is_named(tmp_path, rng):
    folder, _ = write_cifar10(tmp_path, rng)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[:100])
    with pytest.raises(ValueError, match=r"test_batch: corrupt or truncated CIFAR pickle"):
        data.load("cifar10", source=folder)


def test_pickle_with_foreign_globals_is_refused(tmp_path, rng):
    folder, _ = write_cifar10(tmp_path, rng)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": os.getcwd}))
    with pytest.raises(ValueError, match=r"batches.meta: corrupt or truncated CIFAR pickle \(refusing to load"):
        data.load("cifar10", source=folder)


def test_cifar_wrong_rows_and_keys(tmp_path, rng):
    folder, _ = write_cifar10(tmp_path, rng)
    _dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, folder / "test_batch")
    with pytest.raises(ValueError, match=r"test_batch: data: expected uint8 of shape \(N, 3072\), got uint8 \(2, 100\)"):
        data.load("cifar10", source=folder, split="test")
    _dump({"data": np.zeros((2, 3072), np.uint8)}, folder / "test_batch")
    with pytest.raises(ValueError, match=r"test_batch: expected key 'labels'"):
        data.load("cifar10", source=folder, split="test")
    _dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, folder / "test_batch")
    with pytest.raises(ValueError, match=r"\(test_batch\): .*labels: expected shape \(2,\) to match images, got \(1,\)"):
        data.load("cifar10", source=folder, split="test")
    _dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, folder / "test_batch")
    with pytest.raises(ValueError, match=r"\(test_batch\): .*labels: expected values in \[0, 10\), got 10"):
        data.load("cifar10", source=folder, split="test")


# ----------------------------------------------------------------------------- tfds


class _FakeLabel:
    def __init__(self, names):
        self.names = list(names)


def _fake_tfds(examples_by_split, prepared=True):
    """A stand-in for tensorflow_datasets with one array-record CIFAR-100 builder."""
    downloads = []

    class Builder:
        data_dir = "/fake/tfds/cifar100"
        info = types.SimpleNamespace(features={
            "image": types.SimpleNamespace(shape=(32, 32, 3)),
            "label": _FakeLabel(["apple", "bee", "cup"]),
            "coarse_label": _FakeLabel(["flora", "fauna"]),
        })

        def is_prepared(self):
            return prepared or bool(downloads)

        def download_and_prepare(self, file_format):
            downloads.append(file_format)

        def as_data_source(self, split):
            return examples_by_split[split]

    module = types.ModuleType("tensorflow_datasets")
    module.builder = lambda name, data_dir=None: Builder()
    return module, downloads


def test_tfds_source_converted(monkeypatch, rng):
    monkeypatch.delenv("JAXCNMF_DATA", raising=False)
    images = _random_images(rng, 4)
    fine, coarse = [0, 2, 1, 0], [0, 1, 1, 0]
    examples = [{"image": images[i], "label": fine[i], "coarse_label": coarse[i], "id": f"x{i}"} for i in range(4)]
    fake, downloads = _fake_tfds({"train": examples[:1], "test": examples}, prepared=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(FileNotFoundError, match=r"tensorflow-datasets at /fake/tfds/cifar100 \(not prepared\)"):
        data.load("cifar100")
    ds = data.load("cifar100", download=True, progress=False)
    assert downloads == ["array_record"]
    assert ds.class_names == ("apple", "bee", "cup") and ds.superclass_names == ("flora", "fauna")
    np.testing.assert_array_equal(ds.test.images, images)
    assert ds.test.labels.tolist() == fine and ds.test.coarse_labels.tolist() == coarse
    assert len(ds.train) == 1


# ----------------------------------------------------------------------------- image folders


def test_flat_image_folder_with_seeded_split(tmp_path, rng):
    root = tmp_path / "shapes"
    arrays = {}
    for cls in ("square", "circle"):
        for i in range(10):
            arrays[(cls, i)] = _random_images(rng, 1, size=6)[0]
            write_png(root / cls / f"{i}.png", arrays[(cls, i)])
    (root / "circle" / "notes.txt").write_text("ignored: not an image")
    ds = data.load(root, test_fraction=0.3, seed=3)
    assert ds.name == "shapes" and ds.class_names == ("circle", "square") and ds.superclass_names is None
    assert len(ds.train) == 14 and len(ds.test) == 6 and ds.test.class_counts().tolist() == [3, 3]
    full = data.load(root, test_fraction=0.3, seed=3)
    np.testing.assert_array_equal(full.test.images, ds.test.images)
    # Every loaded image equals the PNG written for its class (lossless round trip).
    written = {cls: {bytes(a) for (c, _), a in arrays.items() if c == cls} for cls in ("circle", "square")}
    for split in (ds.train, ds.test):
        assert split.images.shape[1:] == (6, 6, 3)
        for img, label in zip(split.images, split.labels):
            assert bytes(img) in written[ds.class_names[label]]


def test_nested_folder_train_test_gives_coarse_labels(tmp_path, rng):
    root = tmp_path / "tiny100"
    layout = {"flora": ("tulip", "oak"), "insects": ("bee",)}
    expected = {}
    for split, count in (("train", 2), ("test", 1)):
        for sup, classes in layout.items():
            for cls in classes:
                for i in range(count):
                    img = _random_images(rng, 1, size=5)[0]
                    write_png(root / split / sup / cls / f"{i:04d}.png", img)
                    expected.setdefault(split, []).append((cls, sup, img))
    ds = data.load(root, progress=False)
    assert ds.class_names == ("bee", "oak", "tulip") and ds.superclass_names == ("flora", "insects")
    assert len(ds.train) == 6 and len(ds.test) == 3
    for split in ("train", "test"):
        got = getattr(ds, split)
        rows = {(got.class_names[l], got.superclass_names[c], bytes(im))
                for im, l, c in zip(got.images, got.labels, got.coarse_labels)}
        assert rows == {(c, s, bytes(im)) for c, s, im in expected[split]}
    test_only = data.load(root, split="test")
    assert test_only.class_names == ds.class_names and len(test_only) == 3


def test_gray_folder_gives_one_channel_and_channels_option(tmp_path, rng):
    root = tmp_path / "gray"
    for cls in ("a", "b"):
        for i in range(3):
            write_png(root / "train" / cls / f"{i}.png", _random_images(rng, 1, size=4, channels=1)[0])
            write_png(root / "test" / cls / f"{i}.png", _random_images(rng, 1, size=4, channels=1)[0])
    ds = data.load(root)
    assert ds.test.images.shape == (6, 4, 4, 1)
    first = np.asarray(Image.open(root / "test" / "a" / "0.png"))
    np.testing.assert_array_equal(ds.test.images[0, ..., 0], first)
    rgb = data.load(root, channels=3)
    assert rgb.test.images.shape == (6, 4, 4, 3)
    np.testing.assert_array_equal(rgb.test.images[0, ..., 1], first)


def test_colour_folder_as_gray_matches_pillow(tmp_path, rng):
    root = tmp_path / "c"
    img = _random_images(rng, 1, size=4)[0]
    for cls in ("a", "b"):
        write_png(root / "train" / cls / "0.png", img)
        write_png(root / "test" / cls / "0.png", img)
    gray = data.load(root, channels=1, split="test").images
    np.testing.assert_array_equal(gray[0, ..., 0], np.asarray(Image.fromarray(img).convert("L")))


def test_image_folder_errors(tmp_path, rng):
    root = tmp_path / "bad"
    write_png(root / "a" / "0.png", _random_images(rng, 1, size=4)[0])
    write_png(root / "b" / "1.png", _random_images(rng, 1, size=5)[0])
    with pytest.raises(ValueError, match=r"1.png'?: expected every image to be 4x4 .* got 5x5"):
        data.load(root)
    (root / "b" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"1.png'?: unreadable or corrupt image"):
        data.load(root)
    mixed = tmp_path / "mixed"
    write_png(mixed / "a" / "0.png", _random_images(rng, 1, size=4)[0])
    write_png(mixed / "sup" / "b" / "0.png", _random_images(rng, 1, size=4)[0])
    with pytest.raises(ValueError, match=r"expected all class folders at the same depth"):
        data.load(mixed)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty'?: expected image files"):
        data.load(empty)


# ----------------------------------------------------------------------------- npz


def test_npz_single_set_with_names(tmp_path, rng):
    images = _random_images(rng, 10, size=8)
    labels = np.repeat([0, 1], 5)
    path = tmp_path / "mine.npz"
    np.savez(path, images=images, labels=labels, coarse_labels=np.zeros(10, int),
             class_names=np.array(["cat", "dog"]), superclass_names=np.array(["pets"]))
    ds = data.load(path, test_fraction=0.2, seed=0)
    assert ds.name == "mine" and ds.class_names == ("cat", "dog") and ds.superclass_names == ("pets",)
    assert ds.test.class_counts().tolist() == [1, 1]
    merged = np.concatenate([ds.train.images, ds.test.images])
    assert sorted(map(bytes, merged)) == sorted(map(bytes, images))


def test_npz_train_test_keys_and_gray(tmp_path, rng):
    path = tmp_path / "split.npz"
    train_x, test_x = _random_images(rng, 3, size=8, channels=1), _random_images(rng, 2, size=8, channels=1)
    np.savez(path, train_images=train_x[..., 0], train_labels=[0, 1, 2], test_images=test_x[..., 0], test_labels=[2, 0])
    ds = data.load(path)
    assert ds.class_names == ("0", "1", "2")
    np.testing.assert_array_equal(ds.train.images, train_x)
    np.testing.assert_array_equal(ds.test.images, test_x)
    assert ds.test.labels.tolist() == [2, 0]


def test_npz_errors(tmp_path, rng):
    path = tmp_path / "x.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.float32), labels=[0, 1])
    with pytest.raises(ValueError, match=r"x.npz'?: images: expected dtype uint8.*got float32"):
        data.load(path)
    np.savez(path, pixels=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"x.npz'?: expected keys images and labels.*got keys \['pixels'\]"):
        data.load(path)
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.uint8), labels=[0, 3], class_names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"x.npz'?: .*labels: expected values in \[0, 2\), got 3"):
        data.load(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"x.npz'?: corrupt or truncated .npz file"):
        data.load(path)


# ----------------------------------------------------------------------------- load's front door


def test_load_front_door_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist': expected one of digits, cifar10, cifar100"):
        data.load("mnist")
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: '.*missing.npz'"):
        data.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"split: expected None, 'train' or 'test', got 'val'"):
        data.load("digits", split="val")
    with pytest.raises(ValueError, match=r"test_fraction: expected a number in \(0, 1\), got 1.5"):
        data.load("digits", test_fraction=1.5)
    with pytest.raises(ValueError, match=r"source: 'digits' ships with scikit-learn"):
        data.load("digits", source=tmp_path)
    with pytest.raises(ValueError, match=r"channels: only image folders are converted, expected None for 'digits', got 1"):
        data.load("digits", channels=1)
    other = tmp_path / "file.csv"
    other.write_text("1,2")
    with pytest.raises(ValueError, match=r"file.csv'?: expected an image folder, an .npz file"):
        data.load(other)


# ----------------------------------------------------------------------------- balanced_subset


def test_balanced_subset_counts_order_and_seed():
    labels = np.array([0] * 5 + [1] * 8 + [2] * 4)
    rng = np.random.default_rng(1)
    ds = _ds(n=len(labels), labels=rng.permutation(labels), class_names=("a", "b", "c"))
    sub = data.balanced_subset(ds, per_class=3, seed=7)
    assert sub.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = data.balanced_subset(ds, per_class=3, seed=7)
    np.testing.assert_array_equal(sub.labels, again.labels)
    assert data.balanced_subset(ds, per_class=4, seed=0).class_counts().tolist() == [4, 4, 4]


def test_balanced_subset_draws_distinct_images_per_seed():
    images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    ds = Dataset(images, np.arange(12) % 3, ("a", "b", "c"))
    first = data.balanced_subset(ds, per_class=2, seed=0).images.ravel()
    assert len(set(first.tolist())) == 6
    assert all(v % 3 == i // 2 for i, v in enumerate(first))
    assert all(first[i] < first[i + 1] for i in (0, 2, 4))
    draws = {tuple(data.balanced_subset(ds, per_class=2, seed=s).images.ravel()) for s in range(6)}
    assert len(draws) > 1


def test_balanced_subset_errors_name_the_class():
    ds = _ds(n=5, labels=np.array([0, 0, 0, 1, 0]), class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"class 'b' \(label 1\).*expected at least per_class=2 images, got 1"):
        data.balanced_subset(ds, per_class=2)
    with pytest.raises(ValueError, match=r"class 'c' \(label 2\).*got 0"):
        data.balanced_subset(ds, per_class=1)
    with pytest.raises(ValueError, match=r"per_class: expected an integer >= 1, got 0"):
        data.balanced_subset(ds, per_class=0)


# ----------------------------------------------------------------------------- load_probe_set


def _unique_folder(root, rng, layout, per_class_images, size=4):
    """A folder of distinct random PNGs; layout maps superclass (or None) to class names."""
    for sup, classes in layout.items():
        for cls in classes:
            for i in range(per_class_images):
                parts = (cls,) if sup is None else (sup, cls)
                write_png(root.joinpath(*parts, f"{i:03d}.png"), _random_images(rng, 1, size=size)[0])
    return root


def _assert_same_dataset(got, want):
    assert got.name == want.name and got.class_names == want.class_names
    assert got.superclass_names == want.superclass_names
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
    if want.coarse_labels is None:
        assert got.coarse_labels is None
    else:
        np.testing.assert_array_equal(got.coarse_labels, want.coarse_labels)


@pytest.mark.parametrize("layout", ["flat", "nested", "train_test"])
def test_load_probe_set_picks_the_images_of_load_then_balanced_subset(tmp_path, rng, layout):
    # Classes of different sizes, so the stratified split and the draw both matter.
    if layout == "flat":
        root = tmp_path / "flat"
        for cls, count in (("b", 14), ("a", 18), ("c10", 10), ("c9", 11)):
            _unique_folder(root, rng, {None: (cls,)}, count)
    elif layout == "nested":
        root = _unique_folder(tmp_path / "nested", rng,
                              {"flora": ("oak", "tulip"), "insects": ("bee",)}, 10)
    else:
        root = tmp_path / "split"
        _unique_folder(root / "train", rng, {None: ("x", "y")}, 3)
        _unique_folder(root / "test", rng, {None: ("x", "y")}, 6)
    for split in ("test", "train"):
        for per_class, seed, split_seed in ((None, 0, 0), (1, 0, 0), (2, 5, 0), (2, 1, 3)):
            want = data.load(root, seed=split_seed, progress=False)
            want = getattr(want, split)
            if per_class is not None:
                want = data.balanced_subset(want, per_class, seed=seed)
            got = data.load_probe_set(root, split=split, per_class=per_class, seed=seed,
                                      split_seed=split_seed, progress=False)
            _assert_same_dataset(got, want)
    # Every image is distinct, so equal pixels mean the same files were chosen.
    everything = data.load(root, progress=False)
    assert len({bytes(im) for s in (everything.train, everything.test) for im in s.images}) \
        == len(everything.train) + len(everything.test)


def test_load_probe_set_decodes_only_the_chosen_files(tmp_path, rng, monkeypatch):
    from PIL import Image as PILImage

    classes, per_class = ("a", "b", "c"), 2
    root = _unique_folder(tmp_path / "big", rng, {None: classes}, 20)
    want = data.balanced_subset(data.load(root, progress=False).test, per_class, seed=4)
    chosen = {bytes(im) for im in want.images}
    # Every file outside the probe set becomes unreadable: the eager load now fails on
    # them, and the probe set must not open one.
    for path in root.rglob("*.png"):
        if bytes(np.asarray(PILImage.open(path))) not in chosen:
            path.write_bytes(b"\x89PNG not an image")
    with pytest.raises(ValueError, match="unreadable or corrupt image"):
        data.load(root, progress=False)
    opened = []
    real_open = PILImage.open

    def counting_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PILImage, "open", counting_open)
    got = data.load_probe_set(root, per_class=per_class, seed=4, progress=False)
    _assert_same_dataset(got, want)
    assert len(opened) == per_class * len(classes) == len(set(opened))



def test_folder_files_in_natural_order_hidden_and_other_files_skipped(tmp_path):
    root = tmp_path / "order"
    for value in (10, 2, 1):
        write_png(root / "test" / "a" / f"{value}.png", np.full((2, 2, 1), value, np.uint8))
    write_png(root / "test" / "a" / ".hidden.png", np.full((2, 2, 1), 99, np.uint8))
    (root / "test" / "a" / "README").write_text("not an image")
    (root / "test" / ".cache").mkdir()
    ds = data.load(root, split="test", progress=False)
    assert ds.class_names == ("a",) and ds.images[:, 0, 0, 0].tolist() == [1, 2, 10]
    probe = data.load_probe_set(root, progress=False)
    assert probe.images[:, 0, 0, 0].tolist() == [1, 2, 10]

def test_load_probe_set_errors_are_those_of_load_and_balanced_subset(tmp_path, rng):
    root = _unique_folder(tmp_path / "few", rng, {None: ("a", "b")}, 5)
    with pytest.raises(ValueError, match=r"balanced_subset: class 'a' \(label 0\) of few/test: "
                                         r"expected at least per_class=2 images, got 1"):
        data.load_probe_set(root, per_class=2, progress=False)
    with pytest.raises(ValueError, match=r"per_class: expected an integer >= 1, got 0"):
        data.load_probe_set(root, per_class=0, progress=False)
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'test', got 'val'"):
        data.load_probe_set(root, split="val")
    with pytest.raises(ValueError, match=r"test_fraction: expected a number in \(0, 1\), got 1.5"):
        data.load_probe_set(root, test_fraction=1.5)
    only_train = _unique_folder(tmp_path / "only_train" / "train", rng, {None: ("a",)}, 3)
    with pytest.raises(ValueError, match=r"class 'a' \(label 0\) of only_train/test: .* got 0"):
        data.load_probe_set(only_train.parent, per_class=1, progress=False)
    empty_test = data.load_probe_set(only_train.parent, progress=False)
    assert empty_test.images.shape == (0, 4, 4, 3)
    digits = data.load_probe_set("digits", per_class=3, seed=2)
    _assert_same_dataset(digits, data.balanced_subset(data.load("digits").test, 3, seed=2))


# ----------------------------------------------------------------------------- shared real data


needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@pytest.mark.shared
@needs_shared
@pytest.mark.parametrize("packed", [False, True])
def test_real_cifar100_sample_in_official_format(tmp_path, packed):
    sample = np.load(SHARED_DATA / "cifar100-test-first20.npz")
    meta = json.loads((SHARED_DATA / "cifar100-meta.json").read_text())
    folder = write_cifar100(tmp_path / "src", sample["images"], sample["fine_labels"], sample["coarse_labels"],
                            meta["fine_label_names"], meta["coarse_label_names"])
    source = tar_folder(folder, tmp_path / "cifar-100-python.tar.gz") if packed else folder
    ds = data.load("cifar100", source=source)
    assert ds.num_classes == 100 and len(ds.superclass_names) == 20 and len(ds.train) == 0
    np.testing.assert_array_equal(ds.test.images, sample["images"])
    np.testing.assert_array_equal(ds.test.labels, sample["fine_labels"])
    np.testing.assert_array_equal(ds.test.coarse_labels, sample["coarse_labels"])
    assert ds.class_names == tuple(meta["fine_label_names"])


@pytest.mark.shared
@needs_shared
def test_real_cifar100_sample_npz_loads_directly():
    ds = data.load(SHARED_DATA / "cifar100-test-first20.npz", split="test")
    sample = np.load(SHARED_DATA / "cifar100-test-first20.npz")
    assert ds.images.shape[1:] == (32, 32, 3) and ds.superclass_names is not None
    rows = {bytes(im) for im in sample["images"]}
    assert all(bytes(im) in rows for im in ds.images)


@pytest.mark.shared
@needs_shared
def test_real_cifar10_jpegs_as_image_folder(tmp_path):
    # The first few members of the JPEG archive, laid out as an image folder.
    root = tmp_path / "cifar10-few"
    wanted = 12
    with tarfile.open(SHARED_DATA / "cifar10-jpeg.tar.gz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                _, split, cls, base = member.name.split("/")
                out = root / split / cls / base
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.extractfile(member).read())
                wanted -= 1
                if not wanted:
                    break
    ds = data.load(root, progress=False)
    one = next(root.rglob("*.jpg"))
    images = np.concatenate([ds.train.images, ds.test.images])
    assert images.shape[1:] == (32, 32, 3)
    assert bytes(np.asarray(Image.open(io.BytesIO(one.read_bytes())).convert("RGB"))) in {bytes(i) for i in images}
    assert set(ds.class_names) <= set(CIFAR10_NAMES)


def test_select_classes_remaps_in_given_order():
    ds = Dataset(
        np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1).repeat(2, 1).repeat(2, 2),
        np.array([0, 1, 2, 1, 0, 2]), ("a", "b", "c"),
        coarse_labels=np.array([0, 1, 1, 1, 0, 1]), superclass_names=("x", "y"),
        name="tiny",
    )
    sub = data.select_classes(ds, ["c", 0])
    assert sub.class_names == ("c", "a")
    assert sub.labels.tolist() == [1, 0, 1, 0]
    assert sub.images[:, 0, 0, 0].tolist() == [0, 2, 4, 5]
    assert sub.coarse_labels.tolist() == [0, 1, 0, 1]
    assert sub.superclass_names == ("x", "y")
    assert data.select_classes(ds, [np.int64(1)]).labels.tolist() == [0, 0]


@pytest.mark.parametrize(
    "classes, match",
    [
        (["a", "dog"], "expected names in .* got 'dog'"),
        ([3], r"expected ids in \[0, 3\), got 3"),
        (["a", 0], r"expected distinct classes, got \['a'\]"),
        ([], "non-empty list"),
        ("a", "non-empty list"),
        ([1.5], "class name or int id, got 1.5"),
    ],
)
def test_select_classes_errors(classes, match):
    ds = Dataset(np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1, 2]), ("a", "b", "c"))
    with pytest.raises(ValueError, match=match):
        data.select_classes(ds, classes)
