"""What an audit keeps: the per-input records of one group (:class:`Samples`), the least trusted
inputs' images (:class:`GalleryItem`) and the whole audit's result (:class:`AuditResult`), the input of
every number, figure and page of the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


# --------------------------------------------------------------------------- per-sample records

@dataclass
class Samples:
    """Per-input results of one group (the clean data, or one attack's adversarial examples).

    ``position`` ``(N,)`` int64: the input's (for adversarial inputs: its source image's) position in
    the audited split; ``part`` ``(N,)`` str: which part of the detector's holdout split that image
    belongs to; ``label`` true class, ``pred`` predicted class ``(N,)`` int64; ``confidence``
    (softmax probability of ``pred``), ``trust``, ``score`` ``(N,)`` float64; ``flag`` ``(N,)`` bool;
    ``nearest_path``, ``true_path_rank``, ``clf_true_rank`` ``(N,)`` int64; ``divergence`` ``(N, L)``
    float64 in [0, 1]; ``layer_nearest`` ``(N, L)`` int64: the nearest class at each gate point;
    ``attack_trust``, ``error_trust`` ``(N,)`` float64: the two p-values of a guard with an error detector
    (:mod:`nad_guard.errors`; ``trust`` is then their combination), ``None`` for other guards.
    """

    position: np.ndarray
    part: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    confidence: np.ndarray
    trust: np.ndarray
    score: np.ndarray
    flag: np.ndarray
    nearest_path: np.ndarray
    true_path_rank: np.ndarray
    clf_true_rank: np.ndarray
    divergence: np.ndarray
    layer_nearest: np.ndarray
    attack_trust: np.ndarray | None = None
    error_trust: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label

    def select(self, mask: np.ndarray) -> "Samples":
        return Samples(**{k: (None if v is None else v[mask]) for k, v in vars(self).items()})


# --------------------------------------------------------------------------- gallery

@dataclass
class GalleryItem:
    """One of the least trusted inputs: its image ``(C, H, W)`` uint8 and its record."""

    position: int
    image: np.ndarray
    label: int
    pred: int
    confidence: float
    trust: float
    score: float
    flag: bool
    nearest_path: int
    true_path_rank: int
    part: str


# --------------------------------------------------------------------------- the audit

@dataclass
class AuditResult:
    """Everything :func:`write_report` needs; ``summary`` holds every number of the report."""

    clean: Samples
    adversarial: dict[str, Samples]
    gallery: list[GalleryItem]
    class_names: list[str]
    layers: list[str]
    similarity: np.ndarray
    threshold: float
    split: dict[str, Any]
    config: dict[str, Any]
    attack_stats: dict[str, Any]
    timings: dict[str, float]
    calibration: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    class_paths: list[Any] = field(default_factory=list)  # nad_guard.audit.class_paths.ClassPaths, masks first
    explanations: dict[str, Any] | None = None  # nad_guard.audit.explain.explain_mispredictions
    saliency: dict[str, Any] | None = None  # nad_guard.audit.saliency.subnetwork_explanations
