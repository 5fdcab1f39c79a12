"""The Mahalanobis baseline (Lee et al. 2018): class-conditional Gaussians with a shared covariance per layer."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from nad_guard.baselines.base import BaseDetector, check_combine, check_targets, combiner
from nad_guard.baselines.features import Features, ImagesLike, extract_features, image_batches, labels_of
from nad_guard.hooks import capture


class Mahalanobis(BaseDetector):
    """Lee et al. (2018): class-conditional Gaussians with one shared covariance per layer.

    Per layer the feature is the smallest Mahalanobis distance to a class mean. ``combine=
    "logistic"`` learns a logistic regression across layers from labelled clean (0) vs adversarial
    (1) ``detector_features`` (as the paper, which trains it on part of the attack's data);
    ``combine="last"`` is the unsupervised version: the last layer's distance. ``noise > 0``
    enables the paper's input pre-processing (a signed-gradient step of that size in ``[0, 1]``
    pixel units that lowers the distance, per layer); it needs the raw-input path and costs a
    forward-backward pass per layer.

    Parameters: ``layers`` (module names, default :func:`default_layers`), ``combine``, ``noise``,
    ``C`` (inverse regularisation of the logistic regression).
    Fitted: ``layers_``, ``classes_``, ``means_`` (layer -> ``(K, C)``), ``precisions_``
    (layer -> ``(C, C)``, pseudo-inverse of the shared covariance), ``combiner_`` (or ``None``).
    """

    needs_labels = True

    def __init__(self, layers: Sequence[str] | None = None, combine: str = "logistic", noise: float = 0.0,
                 C: float = 1.0):
        self.layers = layers
        self.combine = combine
        self.noise = noise
        self.C = C

    def fit_features(self, features: Features, labels: Any = None, *, detector_features: Features | None = None,
                     detector_targets: Any = None) -> "Mahalanobis":
        """Gaussians from clean training ``features`` and their true ``labels``; the combiner from
        ``detector_features`` with ``detector_targets`` (0 clean, 1 adversarial)."""
        y = self._check_fit_args(features, labels, detector_features is not None)
        t = check_targets(detector_features, detector_targets)
        self._fit_gaussians(features, y)
        self.combiner_ = None
        if self.combine == "logistic":
            self.combiner_ = combiner(self.C).fit(self.layer_scores(detector_features), t)
        return self

    def fit(self, model: nn.Module, images: ImagesLike, labels: Any = None, *,
            detector_images: ImagesLike | None = None, detector_targets: Any = None, batch_size: int = 256,
            device: str | torch.device = "cpu") -> "Mahalanobis":
        """Raw-input path: Gaussians from clean training ``images``; the combiner from
        ``detector_images`` (pre-processed when ``noise > 0``, as they will be when scored)."""
        feats = extract_features(model, images, self._layers_for(model), batch_size=batch_size, device=device)
        y = self._check_fit_args(feats, labels_of(images, labels), detector_images is not None)
        self._fit_gaussians(feats, y)
        self.combiner_ = None
        if self.combine == "logistic":
            det = self._extract(model, detector_images, self.layers_, batch_size, device)
            self.combiner_ = combiner(self.C).fit(self.layer_scores(det), check_targets(det, detector_targets))
        return self

    def _check_fit_args(self, features: Features, labels: Any, has_detector_data: bool) -> np.ndarray:
        check_combine(self.combine)
        if labels is None:
            raise ValueError("Mahalanobis needs the training labels")
        y = np.asarray(labels)
        if y.shape != (len(features),):
            raise ValueError(f"labels must have shape ({len(features)},)")
        if self.combine == "logistic" and not has_detector_data:
            raise ValueError("combine='logistic' needs detector data (clean 0 / adversarial 1); "
                             "use combine='last' for the unsupervised version")
        return y

    def _fit_gaussians(self, features: Features, y: np.ndarray) -> None:
        layers = self._select_layers(features)
        classes = np.unique(y)
        means_, precisions_ = {}, {}
        for n in layers:
            x = features.layers[n].astype(np.float64)
            means = np.stack([x[y == c].mean(0) for c in classes])
            centred = x - means[np.searchsorted(classes, y)]
            cov = centred.T @ centred / len(x)
            means_[n], precisions_[n] = means, np.linalg.pinv(cov, hermitian=True)
        self.classes_, self.means_, self.precisions_, self.layers_ = classes, means_, precisions_, layers

    def min_distance(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """Smallest squared Mahalanobis distance of each row of ``x`` ``(n, C)`` to a class mean."""
        mu = torch.from_numpy(self.means_[layer]).to(x)
        prec = torch.from_numpy(self.precisions_[layer]).to(x)
        xp = x @ prec  # (x - mu)^T P (x - mu) expanded: memory (n, K), not (n, K, C)
        d = (xp * x).sum(1, keepdim=True) - 2 * xp @ mu.T + ((mu @ prec) * mu).sum(1)[None]
        return d.min(1).values.clamp_min(0)

    def layer_scores(self, features: Features) -> np.ndarray:
        """``(N, L)``: per fitted layer, the smallest Mahalanobis distance to a class mean."""
        check_is_fitted(self)
        self._check_layers(features)
        cols = [self.min_distance(torch.from_numpy(features.layers[n]).double(), n).numpy() for n in self.layers_]
        return np.stack(cols, axis=1)

    def score_features(self, features: Features) -> np.ndarray:
        d = self.layer_scores(features)
        if self.combiner_ is not None:
            return self.combiner_.decision_function(d)
        return d[:, -1]

    # raw path with input pre-processing
    def _extract(self, model: nn.Module, images: ImagesLike, layers: Sequence[str] | None, batch_size: int,
                 device: str | torch.device) -> Features:
        if self.noise == 0 or not hasattr(self, "means_"):  # Gaussians not fitted yet: plain features
            return super()._extract(model, images, layers, batch_size, device)
        return self._preprocessed(model, images, layers, batch_size, device)

    def _preprocessed(self, model: nn.Module, images: ImagesLike, layers: Sequence[str] | None, batch_size: int,
                      device: str | torch.device) -> Features:
        """Features where each layer's entry is read at the input moved by ``noise`` against the
        gradient of that layer's distance (one forward-backward and one forward pass per layer)."""
        device = torch.device(device)
        model = model.to(device).eval()
        out: dict[str, list[np.ndarray]] = {n: [] for n in layers}
        logits = []
        for x in image_batches(images, batch_size):
            x = x.to(device)
            with torch.no_grad():
                logits.append(model(x).float().cpu().numpy())
            for n in layers:
                xg = x.clone().requires_grad_(True)
                with capture(model, [n], detach=False) as store, torch.enable_grad():
                    model(xg)
                    d = self.min_distance(store[n].double(), n)
                    (grad,) = torch.autograd.grad(d.sum(), xg)
                x2 = (x - self.noise * grad.sign()).clamp(0, 1)
                with capture(model, [n]) as store, torch.no_grad():
                    model(x2)
                    out[n].append(store[n].cpu().numpy())
        return Features({n: np.concatenate(v) for n, v in out.items()}, np.concatenate(logits))
