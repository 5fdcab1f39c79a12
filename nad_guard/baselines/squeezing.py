"""Feature squeezing (Xu, Evans & Qi, NDSS 2018): an input is suspicious when the classifier's softmax moves
much once the input is "squeezed" (its colour depth reduced, or smoothed). The score is the largest L1
distance ``||softmax(x) - softmax(squeeze_i(x))||_1`` over the squeezers ``i`` (in ``[0, 2]``); the paper sets
its threshold on clean images only (unsupervised), as :func:`nad_guard.calibration` does with the
calibration part.

The squeezers, named as strings (:func:`squeeze`):

``bit-B``
    colour depth reduced to ``B`` bits per channel: ``rint(x * (2^B - 1)) / (2^B - 1)`` (``bit-1`` is
    binarisation at 0.5).
``median-S``
    median smoothing over an ``S x S`` window per channel, by :func:`scipy.ndimage.median_filter` with
    ``mode="reflect"`` (an even window's median is the upper of the two middle values, as in SciPy).
``nlm-S-P-H``
    OpenCV's non-local means (``fastNlMeansDenoisingColored``, ``fastNlMeansDenoising`` for one channel) with
    search window ``S``, patch ``P`` and filter strength ``H`` (both ``h`` and ``hColor``) on the image
    rounded to 8 bits; channels handed over in the order the tensor holds them (RGB), as the paper's code
    does.

The paper's joint-detection configurations: MNIST ``bit-1`` + ``median-2``
(:data:`GRAY_SQUEEZERS`); CIFAR-10 ``bit-5`` + ``median-2`` + ``nlm-13-3-2`` (:data:`COLOR_SQUEEZERS`).
:func:`paper_squeezers` picks one by the input's channels. Cost: ``1 + S`` forward passes per image (the
plain one and one per squeezer; :func:`squeeze_distances`), plus the squeezing itself (non-local means about 4 ms per 32x32 image on one CPU core).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn

GRAY_SQUEEZERS = ("bit-1", "median-2")
COLOR_SQUEEZERS = ("bit-5", "median-2", "nlm-13-3-2")


def paper_squeezers(channels: int) -> tuple[str, ...]:
    """The paper's squeezers for images with ``channels`` channels: MNIST's for one, CIFAR-10's otherwise."""
    return GRAY_SQUEEZERS if channels == 1 else COLOR_SQUEEZERS


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` in ``[0, 1]`` reduced to ``bits`` bits per channel (``2^bits`` levels, 0 and 1 among them)."""
    if bits < 1:
        raise ValueError(f"bits must be at least 1, got {bits}")
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


def median_smooth(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median over ``size x size`` windows of each channel of ``x`` ``(N, C, H, W)`` (SciPy, ``reflect`` borders)."""
    from scipy.ndimage import median_filter

    out = median_filter(x.detach().cpu().numpy(), size=(1, 1, size, size), mode="reflect")
    return torch.from_numpy(out).to(x.device, x.dtype)


def non_local_means(x: torch.Tensor, search: int, patch: int, strength: float) -> torch.Tensor:
    """OpenCV's non-local means of each image of ``x`` ``(N, C, H, W)`` in ``[0, 1]`` (``C`` 1 or 3), computed on
    its 8-bit rounding as the paper does; back in ``[0, 1]``."""
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("the nlm squeezer needs OpenCV (pip install opencv-python-headless)") from e
    imgs = np.clip(np.rint(x.detach().cpu().numpy() * 255), 0, 255).astype(np.uint8)
    out = np.empty_like(imgs)
    for i, img in enumerate(imgs):
        if img.shape[0] == 1:
            out[i, 0] = cv2.fastNlMeansDenoising(np.ascontiguousarray(img[0]), None, strength, patch, search)
        elif img.shape[0] == 3:
            hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
            out[i] = cv2.fastNlMeansDenoisingColored(hwc, None, strength, strength, patch, search).transpose(2, 0, 1)
        else:
            raise ValueError(f"non-local means takes 1 or 3 channels, got {img.shape[0]}")
    return torch.from_numpy(out.astype(np.float32) / 255.0).to(x.device, x.dtype)


def parse_squeezer(spec: str) -> tuple[str, tuple[int, ...]]:
    """``(kind, integer parameters)`` of a squeezer name (see the module docstring), checked."""
    kind, *params = spec.split("-")
    expected = {"bit": 1, "median": 1, "nlm": 3}
    if kind not in expected or len(params) != expected[kind] or not all(p.isdigit() and int(p) > 0 for p in params):
        raise ValueError(f"unknown squeezer {spec!r}: expected bit-B, median-S or nlm-S-P-H (positive integers)")
    return kind, tuple(int(p) for p in params)


def squeeze(x: torch.Tensor, spec: str) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` in ``[0, 1]`` squeezed by the squeezer named ``spec``."""
    kind, p = parse_squeezer(spec)
    if kind == "bit":
        return bit_depth(x, p[0])
    if kind == "median":
        return median_smooth(x, p[0])
    return non_local_means(x, *p)


def squeeze_distances(model: nn.Module, x: torch.Tensor, squeezers: Sequence[str]) -> np.ndarray:
    """``(N, S)``: ``||softmax(model(x)) - softmax(model(squeeze_s(x)))||_1`` for each squeezer ``s``, for one
    batch ``x`` on the model's device (``1 + S`` forward passes)."""
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
        cols = [(p - torch.softmax(model(squeeze(x, s)).double(), 1)).abs().sum(1) for s in squeezers]
    return torch.stack(cols, 1).cpu().numpy() if cols else np.zeros((len(x), 0))


class FeatureSqueezing(BaseEstimator):
    """Feature squeezing's detector: score = max over ``squeezers`` of the L1 softmax distance (higher = more
    suspicious). ``squeezers=None``: the paper's configuration for the images' channels
    (:func:`paper_squeezers`). Unsupervised and without parameters to learn: :meth:`fit` only settles the
    squeezers; the threshold comes from clean calibration images."""

    def __init__(self, squeezers: Sequence[str] | None = None):
        self.squeezers = squeezers

    def fit(self, model: nn.Module | None = None, images: Any = None, labels: Any = None, *, channels: int | None = None,
            **kwargs: Any) -> "FeatureSqueezing":
        """Settle ``squeezers_`` (the given ones, or the paper's for ``channels`` or the images' channels)."""
        if self.squeezers is not None:
            chosen = tuple(self.squeezers)
        else:
            c = channels if channels is not None else (images.shape[1] if images is not None else None)
            if c is None:
                raise ValueError("squeezers=None needs images or channels to choose the paper's configuration")
            chosen = paper_squeezers(int(c))
        for s in chosen:
            parse_squeezer(s)
        if not chosen:
            raise ValueError("no squeezers")
        self.squeezers_ = chosen
        return self

    def columns(self, model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
        """``(N, S)`` per-squeezer L1 distances of ``images`` (on the model's device, in batches)."""
        dev = next(iter(model.parameters())).device
        return np.concatenate([squeeze_distances(model, images[s:s + batch_size].to(dev), self.squeezers_)
                               for s in range(0, len(images), batch_size)])

    @staticmethod
    def score_columns(columns: np.ndarray) -> np.ndarray:
        """The detector's score from :meth:`columns`: the max over squeezers, ``(N,)``."""
        return np.asarray(columns, dtype=np.float64).max(1)

    def score(self, model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
        """Suspicion score per image, ``(N,)``."""
        return self.score_columns(self.columns(model, images, batch_size=batch_size))
