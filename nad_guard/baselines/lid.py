"""The LID baseline (Ma et al. 2018): local intrinsic dimensionality against a fixed clean reference set."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from nad_guard.baselines.base import BaseDetector, check_combine, check_targets, combiner, knn_distances
from nad_guard.baselines.features import Features


class LID(BaseDetector):
    """Ma et al. (2018): local intrinsic dimensionality of each layer's activations.

    ``LID(x) = -(mean_i log(r_i / r_k))^-1`` over the distances ``r_1 <= ... <= r_k`` from ``x``
    to its ``k`` nearest neighbours. The paper takes neighbours inside the current minibatch,
    which makes a sample's score depend on its batch; here they come from a fixed reference set
    of ``n_reference`` clean training activations (seeded draw), so scores are per-sample. Exact
    duplicates of a reference point (distance 0) are not counted as neighbours.

    ``combine="logistic"`` learns a logistic regression across layers from ``detector_features``
    / ``detector_targets``; ``combine="last"`` uses the last layer's LID.
    Fitted: ``layers_``, ``reference_`` (layer -> ``(R, C)`` float32), ``combiner_``.
    """

    def __init__(self, layers: Sequence[str] | None = None, k: int = 20, n_reference: int = 1000,
                 combine: str = "logistic", C: float = 1.0, random_state: int = 0):
        self.layers = layers
        self.k = k
        self.n_reference = n_reference
        self.combine = combine
        self.C = C
        self.random_state = random_state

    def fit_features(self, features: Features, labels: Any = None, *, detector_features: Features | None = None,
                     detector_targets: Any = None) -> "LID":
        """Reference set from clean training ``features`` (labels unused); combiner as in
        :class:`Mahalanobis`."""
        check_combine(self.combine)
        t = check_targets(detector_features, detector_targets)
        if self.combine == "logistic" and t is None:
            raise ValueError("combine='logistic' needs detector_features and detector_targets "
                             "(clean 0 / adversarial 1); use combine='last' for the unsupervised version")
        n = len(features)
        if n < self.k + 1:
            raise ValueError(f"need more than k={self.k} reference samples, got {n}")
        rng = np.random.default_rng(self.random_state)
        pick = np.sort(rng.choice(n, size=min(self.n_reference, n), replace=False))
        layers = self._select_layers(features)
        self.reference_ = {name: np.ascontiguousarray(features.layers[name][pick]) for name in layers}
        self.layers_ = layers
        self.combiner_ = None
        if t is not None and self.combine == "logistic":
            self.combiner_ = combiner(self.C).fit(self.layer_scores(detector_features), t)
        return self

    def layer_scores(self, features: Features) -> np.ndarray:
        """``(N, L)``: each sample's LID estimate at each fitted layer."""
        check_is_fitted(self)
        self._check_layers(features)
        cols = []
        for name in self.layers_:
            r, _ = knn_distances(torch.from_numpy(features.layers[name]).double(),
                                 torch.from_numpy(self.reference_[name]).double(), self.k, exclude_zero=True)
            r = r.clamp_min(1e-12)
            mean_log = torch.log(r / r[:, -1:]).mean(1)
            lid = -1.0 / mean_log.clamp_max(-1e-12)
            cols.append(torch.nan_to_num(lid, nan=0.0, posinf=1e12).numpy())
        return np.stack(cols, axis=1)

    def score_features(self, features: Features) -> np.ndarray:
        s = self.layer_scores(features)
        if self.combiner_ is not None:
            return self.combiner_.decision_function(s)
        return s[:, -1]
