""""The Odds are Odd" (Roth, Kilcher & Hofmann, ICML 2019): the noise response of the logit differences.

For an input ``x`` predicted ``y`` and every other class ``z``, the pairwise logit difference
``f_{y,z} = l_y - l_z`` (the last linear layer's ``(w_y - w_z) . phi(x)``; its bias cancels in the paper's
statistic) is compared with its value under small random noise ``eta``::

    g_{y,z}(x) = E_eta[ f_{y,z}(x) - f_{y,z}(clip(x + eta)) ]

(the released code's sign: positive when noise moves the input away from ``y`` towards ``z``, which an
adversarial input does, since the noise undoes part of the attack). The expected value is the mean over
``n_samples`` draws of each noise setting. The statistics are standardised per predicted class ``y``, noise
setting and ``z`` with their mean and standard deviation over clean images predicted ``y``; the detection
score is the z-score averaged over the noise settings, maximised over ``z != y``; the paper's rule flags an
input whose score exceeds ``Phi^-1(0.999) ~ 3.09``.

The settings of the authors' released code (``noise_eps_detect``, ``wdiff_samples``, ``maxp_cutoff``): nine
noise settings, Gaussian (``n``), sign (``s``) and uniform (``u``) noise of scale 0.003, 0.005 and 0.008 in
``[0, 1]`` pixel units, clipped to ``[0, 1]``; 256 draws each (:data:`PAPER_NOISES`, :data:`PAPER_SAMPLES`).
Cost: ``len(noises) * n_samples`` forward passes per image (2,304 at the paper's settings).

Differences from the paper's code, by design: the noise draws are drawn once from ``seed`` and shared by every
image (common random numbers: an image's score does not depend on its batch or on the order of images); the
clean statistics come from whichever clean images :meth:`OddsAreOdd.fit_columns` is given (the released code
uses training images on which its own PGD attack succeeds); a class with fewer than ``min_class_images``
clean images is standardised with the statistics of all classes pooled (the released code never flags such
a class); a zero standard deviation is floored at ``1e-12``. The paper's second stage (correcting the
prediction with statistics of PGD adversarials) is not part of detection and is left out.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import norm
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch import nn

PAPER_NOISES = tuple(f"{kind}{eps}" for eps in ("0.003", "0.005", "0.008") for kind in "nsu")
PAPER_SAMPLES = 256
PAPER_THRESHOLD = float(norm.ppf(0.999))  # the released code's p_ratio_cutoff (maxp_cutoff) 0.999


def parse_noise(spec: str) -> tuple[str, float]:
    """``(kind, scale)`` of a noise setting ``n0.003`` (Gaussian), ``s0.003`` (sign) or ``u0.003`` (uniform)."""
    kind, scale = spec[:1], spec[1:]
    try:
        eps = float(scale)
    except ValueError:
        eps = -1.0
    if kind not in ("n", "s", "u") or not eps > 0:
        raise ValueError(f"noise setting {spec!r}: expected n, s or u followed by a positive scale")
    return kind, eps


def noise_draws(shape: Sequence[int], noises: Sequence[str], n_samples: int, seed: int = 0) -> torch.Tensor:
    """``(E, n_samples, *shape)`` float32 noise, one block per setting of ``noises`` (already scaled)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in noises:
        kind, eps = parse_noise(spec)
        if kind == "n":
            z = torch.randn((n_samples, *shape), generator=g)
        else:
            z = torch.rand((n_samples, *shape), generator=g) * 2 - 1
            if kind == "s":
                z = z.sign()
        out.append(z * eps)
    return torch.stack(out)


def noise_response(model: nn.Module, x: torch.Tensor, draws: torch.Tensor, chunk: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions ``(B,)`` of ``x`` ``(B, C, H, W)`` and ``g`` ``(B, E, K)``: per noise setting of ``draws``
    (``(E, n, C, H, W)``, on ``x``'s device), the mean over its draws of ``f_{y,z}(x) - f_{y,z}(clip(x + eta))``
    (column ``y`` is 0). At most ``chunk`` noisy images go through the model at once."""
    E, n = draws.shape[:2]
    per = max(1, chunk // n)
    with torch.no_grad():
        logits = model(x).double()
        pred = logits.argmax(1)
        out = []
        for s in range(0, len(x), per):
            xb, lb, pb = x[s:s + per], logits[s:s + per], pred[s:s + per]
            ge = []
            for e in range(E):
                noisy = (xb[:, None] + draws[e][None]).clamp_(0, 1).flatten(0, 1)
                d = (lb[:, None] - model(noisy).double().view(len(xb), n, -1)).mean(1)  # (b, K): E[l(x) - l(x+eta)]
                ge.append(d.gather(1, pb[:, None]) - d)
            out.append(torch.stack(ge, 1))
    return pred, torch.cat(out)


class OddsAreOdd(BaseEstimator):
    """The detector of "The Odds are Odd" (see the module docstring); higher score = more suspicious.

    Two paths, as the other baselines: :meth:`columns` runs the model on images (``1 + E * n`` passes per
    image) and returns per-image rows ``[pred, g (E * K values)]``; :meth:`fit_columns` learns the clean
    statistics from such rows of clean images; :meth:`score_columns` scores rows. :meth:`fit` and
    :meth:`score` chain the two on images."""

    def __init__(self, noises: Sequence[str] = PAPER_NOISES, n_samples: int = PAPER_SAMPLES,
                 threshold: float = PAPER_THRESHOLD, seed: int = 0, min_class_images: int = 3):
        self.noises = noises
        self.n_samples = n_samples
        self.threshold = threshold
        self.seed = seed
        self.min_class_images = min_class_images

    def _draws(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape[1:])
        cached = getattr(self, "_draws_cache", None)
        if cached is None or cached[0] != key:
            if self.n_samples < 1:
                raise ValueError(f"n_samples must be at least 1, got {self.n_samples}")
            cached = (key, noise_draws(key, self.noises, self.n_samples, self.seed))
            self._draws_cache = cached
        return cached[1].to(x.device)

    def columns(self, model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
        """``(N, 1 + E * K)``: the prediction, then ``g`` per noise setting and class, of each image."""
        dev = next(iter(model.parameters())).device
        rows = []
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(dev)
            pred, g = noise_response(model, x, self._draws(x), chunk=max(batch_size, self.n_samples))
            rows.append(torch.cat([pred[:, None].double(), g.flatten(1)], 1).cpu().numpy())
        return np.concatenate(rows)

    def _split(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(columns, dtype=np.float64)
        E = len(self.noises)
        if c.ndim != 2 or (c.shape[1] - 1) % E or c.shape[1] < 1 + E:
            raise ValueError(f"expected rows [pred, g of {E} noise settings x K classes], got shape {c.shape}")
        return c[:, 0].astype(np.int64), c[:, 1:].reshape(len(c), E, -1)

    def fit_columns(self, columns: np.ndarray) -> "OddsAreOdd":
        """Learn ``mean_`` and ``std_`` ``(K, E, K)`` (per predicted class, noise setting and class ``z``) from
        :meth:`columns` of clean images."""
        pred, g = self._split(columns)
        if len(g) < 2:
            raise ValueError("need at least 2 clean images")
        K = g.shape[2]
        pooled_mean, pooled_std = g.mean(0), g.std(0)
        self.mean_ = np.broadcast_to(pooled_mean, (K, *pooled_mean.shape)).copy()
        self.std_ = np.broadcast_to(pooled_std, (K, *pooled_std.shape)).copy()
        self.class_counts_ = np.bincount(pred, minlength=K)
        for c in range(K):
            gc = g[pred == c]
            if len(gc) >= self.min_class_images:
                self.mean_[c], self.std_[c] = gc.mean(0), gc.std(0)
        self.std_ = np.maximum(self.std_, 1e-12)
        return self

    def z_scores(self, columns: np.ndarray) -> np.ndarray:
        """``(N, E, K)`` standardised noise responses (column ``pred`` is 0)."""
        check_is_fitted(self, "mean_")
        pred, g = self._split(columns)
        z = (g - self.mean_[pred]) / self.std_[pred]
        z[np.arange(len(z)), :, pred] = 0.0
        return z

    def score_columns(self, columns: np.ndarray) -> np.ndarray:
        """The paper's statistic ``(N,)``: z-scores averaged over noise settings, max over ``z != pred``."""
        pred, _ = self._split(columns)
        zm = self.z_scores(columns).mean(1)
        zm[np.arange(len(zm)), pred] = -np.inf
        return zm.max(1)

    def detect_columns(self, columns: np.ndarray) -> np.ndarray:
        """The paper's rule: ``score > threshold`` (``Phi^-1(0.999)`` by default), ``(N,)`` bool."""
        return self.score_columns(columns) > self.threshold

    def fit(self, model: nn.Module, images: torch.Tensor, labels: Any = None, *, batch_size: int = 256,
            **kwargs: Any) -> "OddsAreOdd":
        """Clean statistics from clean ``images`` (correctly classified ones, as the paper uses)."""
        return self.fit_columns(self.columns(model, images, batch_size=batch_size))

    def score(self, model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
        """Suspicion score per image, ``(N,)``."""
        return self.score_columns(self.columns(model, images, batch_size=batch_size))
