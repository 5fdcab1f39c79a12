"""Baselines that read the logits only and need no fitting: :class:`MSP`, :class:`Energy` and :class:`DOCTOR`,
and the three scores as plain functions of the logits (:func:`msp_score`, :func:`energy_score`,
:func:`doctor_score`; higher = more suspicious), which the error detector (:mod:`nad_guard.errors`) reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from nad_guard.baselines.base import BaseDetector
from nad_guard.baselines.features import Features


def msp_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """``1 - max_k softmax(logits / T)_k`` ``(N,)`` (Hendrycks & Gimpel 2017); higher = more suspicious."""
    p = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature, dim=1)
    return (1 - p.max(1).values).numpy()


def energy_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Energy ``-T logsumexp(logits / T)`` ``(N,)`` (Liu et al. 2020); higher = more suspicious."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (-temperature * torch.logsumexp(z / temperature, dim=1)).numpy()


def doctor_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """DOCTOR's ``D_alpha`` ``1 - sum_k p_k^2`` with ``p = softmax(logits / T)`` ``(N,)`` (Granese et al.,
    NeurIPS 2021: the Gini impurity of the prediction; the paper thresholds ``(1 - g) / g`` with
    ``g = sum_k p_k^2``, a monotone function of it, so every ranking and AUROC is the same). In
    ``[0, 1 - 1/K]``; higher = more suspicious."""
    p = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature, dim=1)
    return (1 - (p * p).sum(1)).numpy()


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


class DOCTOR(BaseDetector):
    """DOCTOR's ``D_alpha`` for misprediction detection (Granese et al., NeurIPS 2021): ``1 - sum_k p_k^2``
    of ``softmax(logits / temperature)`` (:func:`doctor_score`). Needs no fitting.

    ``epsilon > 0`` applies the paper's input pre-processing on the raw-input path (:meth:`score`):
    each image moves by ``epsilon`` (in ``[0, 1]`` pixel units, clipped) along the signed gradient that
    *lowers* ``D_alpha`` (makes the prediction more confident), as ODIN does, and is scored there;
    correct predictions respond more than wrong ones. The feature path (:meth:`score_features`) has
    only the logits, so it is the plain variant whatever ``epsilon`` is (the default, 0, and ``T = 1``
    is the variant the evaluation reports)."""

    uses_layers = False

    def __init__(self, temperature: float = 1.0, epsilon: float = 0.0):
        self.temperature = temperature
        self.epsilon = epsilon

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, model: nn.Module | None = None, images: Any = None, labels: Any = None,
            **kwargs: Any) -> "DOCTOR":
        return self

    def fit_features(self, features: Features | None = None, labels: Any = None, **kwargs: Any) -> "DOCTOR":
        return self

    def score_features(self, features: Features) -> np.ndarray:
        return doctor_score(_logits(features), self.temperature)

    def score(self, model: nn.Module, images: Any, *, batch_size: int = 256,
              device: str | torch.device = "cpu") -> np.ndarray:
        """``D_alpha`` of ``images`` (float ``(N, C, H, W)`` in ``[0, 1]``), after the input
        pre-processing when ``epsilon > 0``."""
        if self.epsilon <= 0:
            return super().score(model, images, batch_size=batch_size, device=device)
        x_all = torch.as_tensor(images.float() if hasattr(images, "float") and not torch.is_tensor(images) else images)
        out = []
        model = model.to(device)
        for i in range(0, len(x_all), batch_size):
            x = x_all[i:i + batch_size].to(device).float().requires_grad_(True)
            p = torch.softmax(model(x) / self.temperature, dim=1)
            torch.log((p * p).sum(1)).sum().backward()  # raise g = sum p^2, i.e. lower D_alpha
            x2 = (x + self.epsilon * x.grad.sign()).clamp(0, 1).detach()
            with torch.no_grad():
                out.append(doctor_score(model(x2).double().cpu(), self.temperature))
        return np.concatenate(out) if out else np.zeros(0)
