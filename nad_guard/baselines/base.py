"""The baselines' shared parts: :class:`BaseDetector` (the raw-input path over the feature path), the
supervised combiner across layers, the checks of detector targets and of ``combine``, and the k-nearest
neighbour distances LID and deep kNN score with."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import inspect
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import nn

from nad_guard.baselines.features import Features, ImagesLike, default_layers, extract_features, labels_of
from nad_guard.data import ImageSet


class BaseDetector(BaseEstimator, metaclass=ABCMeta):
    """Shared raw-input path. Subclasses implement ``fit_features`` and ``score_features``, and
    set ``uses_layers`` (False: logits are enough)."""

    uses_layers = True
    needs_labels = False

    def _layers_for(self, model: nn.Module) -> list[str]:
        layers = getattr(self, "layers", None)
        return list(default_layers(model) if layers is None else layers)

    def _extract(self, model: nn.Module, images: ImagesLike, layers: Sequence[str] | None, batch_size: int,
                 device: str | torch.device) -> Features:
        return extract_features(model, images, layers if self.uses_layers else [], batch_size=batch_size,
                                device=device)

    def fit(self, model: nn.Module, images: ImagesLike, labels: Any = None, *, batch_size: int = 256,
            device: str | torch.device = "cpu", **kwargs: Any) -> "BaseDetector":
        """Extract features of clean training ``images`` and fit on them. Extra keyword arguments
        that end in ``_images`` are image sets too (e.g. ``detector_images``, ``calibration_images``);
        they become the matching ``_features`` argument of :meth:`fit_features` (and, for an
        :class:`ImageSet`, its labels the matching ``_labels`` argument when there is one)."""
        layers = self._layers_for(model) if self.uses_layers else []
        feats = self._extract(model, images, layers, batch_size, device)
        extra = dict(kwargs)
        for k, v in kwargs.items():
            if k.endswith("_images"):
                base = k[:-len("_images")]
                del extra[k]
                extra[base + "_features"] = None if v is None else self._extract(model, v, layers, batch_size, device)
                if isinstance(v, ImageSet) and extra.get(base + "_labels") is None \
                        and base + "_labels" in inspect.signature(self.fit_features).parameters:
                    extra[base + "_labels"] = v.labels.numpy()
        return self.fit_features(feats, labels_of(images, labels) if self.needs_labels else labels, **extra)

    def score(self, model: nn.Module, images: ImagesLike, *, batch_size: int = 256,
              device: str | torch.device = "cpu") -> np.ndarray:
        """Suspicion score per image, ``(N,)``; higher = more suspicious."""
        check_is_fitted(self)
        layers = getattr(self, "layers_", []) if self.uses_layers else []
        return self.score_features(self._extract(model, images, layers, batch_size, device))

    @abstractmethod
    def fit_features(self, features: Features, labels: Any = None, **kwargs: Any) -> "BaseDetector":
        """Fit on precomputed features; every detector defines it."""

    @abstractmethod
    def score_features(self, features: Features) -> np.ndarray:
        """Suspicion scores from precomputed features (higher = more suspicious); every detector defines it."""

    def _select_layers(self, features: Features) -> list[str]:
        """The ``layers`` parameter (default: every layer of ``features``), checked against them."""
        layers = list(features.layers) if self.layers is None else list(self.layers)
        missing = [n for n in layers if n not in features.layers]
        if missing or not layers:
            raise ValueError(f"features lack the layers {missing}" if missing else "no layers to fit on")
        return layers

    def _check_layers(self, features: Features) -> None:
        missing = [n for n in self.layers_ if n not in features.layers]
        if missing:
            raise ValueError(f"features lack the layers {missing} this detector was fitted on")


def combiner(c: float) -> Pipeline:
    """The supervised baselines' combiner (Ma et al.; Lee et al.): standardise the per-layer scores, then a
    logistic regression with inverse regularisation ``c``."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))


def check_combine(combine: str) -> None:
    """Refuse a ``combine`` other than ``"logistic"`` or ``"last"``."""
    if combine not in ("logistic", "last"):
        raise ValueError(f"combine must be 'logistic' or 'last', got {combine!r}")


def check_targets(features: Features | None, targets: Any) -> np.ndarray | None:
    """Detector targets (0 clean, 1 suspicious) of ``features`` as ints, checked; ``None`` when neither is given."""
    if features is None and targets is None:
        return None
    if features is None or targets is None:
        raise ValueError("detector_features and detector_targets go together")
    t = np.asarray(targets).astype(int)
    if t.shape != (len(features),) or not np.isin(t, (0, 1)).all() or len(np.unique(t)) < 2:
        raise ValueError("detector_targets must be 0 (clean) / 1 (suspicious) per sample, with both present")
    return t


def knn_distances(queries: torch.Tensor, reference: torch.Tensor, k: int, chunk: int = 1024,
                  exclude_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the ``k`` nearest reference rows of each query, in query chunks."""
    dists, idxs = [], []
    for s in range(0, len(queries), chunk):
        d = torch.cdist(queries[s:s + chunk], reference)
        if exclude_zero:
            d = d.masked_fill(d <= 0, float("inf"))
        v, i = d.topk(k, dim=1, largest=False)
        dists.append(v)
        idxs.append(i)
    if not dists:
        return torch.zeros(0, k, dtype=reference.dtype), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)
