"""Data loaders: shapes, ranges, split sizes, determinism and clear errors."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from nad_guard.data import DataError, ImageSet, load_cifar10, load_dataset, load_imagefolder, stratified_split


def test_digits_split_shapes_ranges_and_determinism():
    tr, te = load_dataset("digits")
    assert (len(tr), len(te)) == (1437, 360)
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.uint8
    x = te.float()
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and x.max() == 1
    tr2, te2 = load_dataset("digits")
    assert torch.equal(te.images, te2.images) and torch.equal(te.labels, te2.labels)
    # stratified: every class is in the test split in proportion
    counts = te.labels.bincount(minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_split_indices_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 50)
    tr, te = stratified_split(labels, test_size=100)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 500
    assert np.bincount(labels[te]).tolist() == [10] * 10
    assert np.array_equal(te, stratified_split(labels, test_size=100)[1])


def test_mnist5k_fixed_stratified_split():
    tr, te = load_dataset("mnist5k")
    assert (len(tr), len(te)) == (4000, 1000)
    assert tr.shape == (1, 28, 28) and tr.num_classes == 10
    assert te.labels.bincount(minlength=10).tolist() == [100] * 10
    assert tr.labels.bincount(minlength=10).tolist() == [400] * 10
    _, te2 = load_dataset("mnist5k")
    assert torch.equal(te.images, te2.images)
    x, y = te[0]
    assert x.shape == (1, 28, 28) and 0 <= x.min() and x.max() <= 1 and isinstance(y, int)


def _jpeg(color, size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


CLASSES = ["cat", "dog", "ship"]
COLORS = {"cat": (250, 10, 10), "dog": (10, 250, 10), "ship": (10, 10, 250)}


def _make_archive(root, split="test", per_class=2, extra=None):
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / f"{split}.tar.gz", "w:gz") as tf:
        for c in CLASSES:
            for i in range(per_class):
                data = _jpeg(COLORS[c])
                info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return root


def test_cifar10_from_archive_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAD_GUARD_CACHE", str(tmp_path / "cache"))
    root = _make_archive(tmp_path / "c10")
    ds = load_cifar10(root, "test")
    assert ds.images.shape == (6, 3, 32, 32) and ds.classes == CLASSES
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # colours survive decoding (JPEG is lossy: within a few levels)
    assert ds.images[2, 1].float().mean() > 240 and ds.images[2, 0].float().mean() < 20
    assert len(list((tmp_path / "cache").glob("cifar10-test-*.npz"))) == 1
    again = load_cifar10(root, "test")  # from the cache
    assert torch.equal(again.images, ds.images) and again.classes == ds.classes


def test_cifar10_from_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NAD_GUARD_CACHE", str(tmp_path / "cache"))
    for c in CLASSES:
        (tmp_path / "c10" / "train" / c).mkdir(parents=True)
        (tmp_path / "c10" / "train" / c / "0001.jpg").write_bytes(_jpeg(COLORS[c]))
    ds = load_cifar10(tmp_path / "c10", "train", use_cache=False)
    assert ds.images.shape == (3, 3, 32, 32) and ds.classes == CLASSES


def test_cifar10_errors_name_the_path_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("NAD_GUARD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"nowhere.*test\.tar\.gz.*<class name>"):
        load_cifar10(tmp_path / "nowhere", "test")
    bad = _make_archive(tmp_path / "bad", extra={"test/loose.jpg": _jpeg((0, 0, 0))})
    with pytest.raises(DataError, match="unexpected member 'test/loose.jpg'"):
        load_cifar10(bad, "test", use_cache=False)
    corrupt = _make_archive(tmp_path / "corrupt", extra={"test/cat/9999.jpg": b"not a jpeg"})
    with pytest.raises(DataError, match="cannot decode image test/cat/9999.jpg"):
        load_cifar10(corrupt, "test", use_cache=False)
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "test.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="cannot read archive"):
        load_cifar10(tmp_path / "trunc", "test", use_cache=False)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "valid")


def test_imagefolder_resizes_converts_and_splits(tmp_path):
    for c in CLASSES:
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (40 + i, 30), COLORS[c]).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "notes.txt").write_text("ignored")
    full = load_imagefolder(tmp_path / "data", channels=1, size=(16, 16))
    assert full.images.shape == (15, 1, 16, 16) and full.classes == CLASSES
    tr, te = load_dataset("imagefolder", tmp_path / "data", channels=3, size=(8, 8))
    assert len(tr) + len(te) == 15 and te.labels.bincount(minlength=3).min() >= 1
    assert tr.shape == (3, 8, 8)
    with pytest.raises(DataError, match="different shapes"):
        load_imagefolder(tmp_path / "data")  # no size given, images differ
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_imagefolder(tmp_path / "empty")


def test_imageset_validates_and_batches():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a"])
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), ["a"])
    ds = ImageSet(torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2), torch.arange(5), list("abcde"))
    sizes = [len(y) for _, y in ds.batches(2)]
    assert sizes == [2, 2, 1]
    xs = torch.cat([x for x, _ in ds.batches(2)])
    assert torch.equal(xs, ds.float())
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("svhn")
    assert np.allclose(ds.subset([4, 0]).labels.numpy(), [4, 0])


def test_max_images_above_the_split_uses_all_of_it_and_says_so():
    """fit-detector, evaluate and audit sample the test split with sample_heldout; more images than it holds
    is the whole split, with a SampleSizeNotice (the command line's NOTE line) instead of silence."""
    import warnings

    from nad_guard.data import SampleSizeNotice
    from nad_guard.holdout import sample_heldout

    _, te = load_dataset("digits")
    with pytest.warns(SampleSizeNotice, match=r"--max-images 3000: the test split \(digits/test\) has 360 images; "
                                              "using all of them"):
        whole, positions = sample_heldout(te, 3000)
    assert whole is te and np.array_equal(positions, np.arange(360))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleSizeNotice)
        assert sample_heldout(te, 360)[0] is te and sample_heldout(te, None)[0] is te
        assert len(sample_heldout(te, 100)[0]) == 100
