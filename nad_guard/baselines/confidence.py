"""Baselines that read the logits only and need no fitting: :class:`MSP` and :class:`Energy`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from nad_guard.baselines.base import BaseDetector
from nad_guard.baselines.features import Features


def _logits(features: Features) -> torch.Tensor:
    if features.logits is None:
        raise ValueError("these features carry no logits")
    return torch.from_numpy(features.logits).double()


class MSP(BaseDetector):
    """1 - max softmax probability (of ``logits / temperature``). Needs no fitting."""

    uses_layers = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, model: nn.Module | None = None, images: Any = None, labels: Any = None, **kwargs: Any) -> "MSP":
        return self

    def fit_features(self, features: Features | None = None, labels: Any = None, **kwargs: Any) -> "MSP":
        return self

    def score_features(self, features: Features) -> np.ndarray:
        p = torch.softmax(_logits(features) / self.temperature, dim=1)
        return (1 - p.max(1).values).numpy()


class Energy(BaseDetector):
    """Energy ``-T * logsumexp(logits / T)``: higher (less negative) for unusual inputs. Needs no fitting."""

    uses_layers = False

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, model: nn.Module | None = None, images: Any = None, labels: Any = None,
            **kwargs: Any) -> "Energy":
        return self

    def fit_features(self, features: Features | None = None, labels: Any = None, **kwargs: Any) -> "Energy":
        return self

    def score_features(self, features: Features) -> np.ndarray:
        t = self.temperature
        return (-t * torch.logsumexp(_logits(features) / t, dim=1)).numpy()
