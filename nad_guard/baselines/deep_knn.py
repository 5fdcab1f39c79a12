"""The deep k-nearest-neighbours baseline (Papernot & McDaniel 2018) with conformal p-values."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from nad_guard.baselines.base import BaseDetector, knn_distances
from nad_guard.baselines.features import Features
from nad_guard.calibration import p_values


class DeepKNN(BaseDetector):
    """Papernot & McDaniel (2018): deep k-nearest neighbours with conformal calibration.

    For a candidate label ``j``, nonconformity ``alpha(x, j)`` = number of the ``k`` nearest
    training neighbours, summed over layers, whose label is not ``j``. The calibration set (held
    out from the kNN training data) gives ``A = {alpha(x_c, y_c)}``; the p-value of ``j`` is
    ``(#{a in A: a >= alpha(x, j)} + 1) / (|A| + 1)`` (:func:`nad_guard.calibration.p_values`, the
    formula of nad-guard's own trust score).

    ``label="predicted"``: score = 1 - p-value of the classifier's predicted label (needs logits);
    ``label="credibility"``: score = 1 - max_j p-value (the paper's credibility).
    Calibration data: ``calibration_features`` / ``calibration_labels`` at fit, or else a seeded
    ``calibration_size`` share split off the training features. ``metric`` "euclidean" or
    "cosine" (rows L2-normalised first).
    Fitted: ``layers_``, ``train_`` (layer -> ``(N, C)``), ``train_labels_``, ``n_classes_``,
    ``calibration_scores_`` (sorted ``A``).
    """

    needs_labels = True

    def __init__(self, layers: Sequence[str] | None = None, k: int = 75, label: str = "predicted",
                 metric: str = "euclidean", calibration_size: float = 0.1, random_state: int = 0):
        self.layers = layers
        self.k = k
        self.label = label
        self.metric = metric
        self.calibration_size = calibration_size
        self.random_state = random_state

    def _prep(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(x, dtype=np.float32))
        return torch.nn.functional.normalize(t, dim=1) if self.metric == "cosine" else t

    def fit_features(self, features: Features, labels: Any = None, *,
                     calibration_features: Features | None = None, calibration_labels: Any = None) -> "DeepKNN":
        if self.label not in ("predicted", "credibility"):
            raise ValueError(f"label must be 'predicted' or 'credibility', got {self.label!r}")
        if self.metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {self.metric!r}")
        if labels is None:
            raise ValueError("DeepKNN needs the training labels")
        y = np.asarray(labels).astype(np.int64)
        if y.shape != (len(features),):
            raise ValueError(f"labels must have shape ({len(features)},)")
        if (calibration_features is None) != (calibration_labels is None):
            raise ValueError("calibration_features and calibration_labels go together")
        if calibration_features is None:
            rng = np.random.default_rng(self.random_state)
            perm = rng.permutation(len(y))
            n_cal = max(1, int(round(self.calibration_size * len(y))))
            cal, train = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
            calibration_features, calibration_labels = features.subset(cal), y[cal]
            features, y = features.subset(train), y[train]
        if len(y) < self.k:
            raise ValueError(f"need at least k={self.k} training samples, got {len(y)}")
        layers = self._select_layers(features)
        n_classes = int(y.max()) + 1
        if features.logits is not None:
            n_classes = max(n_classes, features.logits.shape[1])
        self.layers_ = layers
        self.train_ = {n: self._prep(features.layers[n]) for n in layers}
        self.train_labels_ = torch.from_numpy(y)
        self.n_classes_ = n_classes
        cal_y = torch.as_tensor(np.asarray(calibration_labels).astype(np.int64))
        alpha = self.nonconformity(calibration_features)
        self.calibration_scores_ = np.sort(alpha.gather(1, cal_y[:, None]).squeeze(1).numpy())
        return self

    def nonconformity(self, features: Features) -> torch.Tensor:
        """``(N, n_classes)``: for every candidate label, neighbours disagreeing with it, summed over layers."""
        check_is_fitted(self, "train_")
        self._check_layers(features)
        counts = torch.zeros(len(features), self.n_classes_, dtype=torch.float64)
        for n in self.layers_:
            _, idx = knn_distances(self._prep(features.layers[n]), self.train_[n], self.k)
            lab = self.train_labels_[idx]  # (N, k)
            counts.scatter_add_(1, lab, torch.ones_like(lab, dtype=torch.float64))
        return len(self.layers_) * self.k - counts

    def p_values(self, features: Features) -> np.ndarray:
        """``(N, n_classes)`` conformal p-values of every label."""
        check_is_fitted(self)
        return p_values(self.calibration_scores_, self.nonconformity(features).numpy())

    def score_features(self, features: Features) -> np.ndarray:
        p = self.p_values(features)
        if self.label == "credibility":
            return 1 - p.max(1)
        pred = features.predictions()
        return 1 - p[np.arange(len(p)), pred]
