"""Mahalanobis as Lee et al. (2018) run it, in an evaluation run: the ``mahalanobis-lr[pre]`` row.

With ``EvalConfig.maha_noise`` set (e.g. :data:`~nad_guard.baselines.mahalanobis_pre.LEE_NOISE`), every
image set of the run gets the column :data:`COLUMN` (:func:`maha_pre_columns`): the per-layer distances
at the stem and each stage's output (:func:`~nad_guard.baselines.mahalanobis_pre.stage_layers`), after
input pre-processing with each magnitude (Gaussians fitted on the classifier's training images, as for
the other baselines). In each supervised training task, :func:`maha_pre_scores` chooses the magnitude by
grouped cross-validated AUROC of the logistic regression over the layers on the fit part only (the
folds of :func:`nad_guard.detectors.cv_groups`, as nad-guard's own ``--select cv``), refits that
regression on the whole fit part and scores the evaluation and calibration parts. Lee et al. choose
the magnitude on a held-out half of their 10% "validation" split, which is the same idea.

Cost: ``L x (1 forward + 1 backward + M forwards)`` per image (``L`` layers, ``M`` non-zero magnitudes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from nad_guard.baselines import Mahalanobis, combiner
from nad_guard.baselines.mahalanobis_pre import magnitude_block, preprocessed_distances, stage_layers

if TYPE_CHECKING:
    from nad_guard.evaluate.config import EvalConfig
    from nad_guard.evaluate.data import EvalData
    from nad_guard.evaluate.features import FeatureKey

COLUMN = "mahalanobis-pre"
ROW = "mahalanobis-lr[pre]"


def maha_pre_columns(d: "EvalData") -> dict[str, Callable[[torch.Tensor], np.ndarray]]:
    """``{COLUMN: fn}`` for :func:`nad_guard.evaluate.multipass.image_columns` (empty when
    ``d.cfg.maha_noise`` is empty). Fits the Gaussians on ``d.train_base`` first."""
    mags = tuple(float(m) for m in d.cfg.maha_noise)
    if not mags:
        return {}
    clf = d.paths.classifier
    layers = [n for n in stage_layers(clf) if n in d.train_base.layers]
    maha = Mahalanobis(layers=layers, combine="last").fit_features(d.train_base, d.train_labels)
    return {COLUMN: lambda x: preprocessed_distances(clf, maha, x, mags)}


def maha_pre_scores(d: "EvalData", cfg: "EvalConfig", train_keys: Sequence["FeatureKey"],
                    test: Mapping[str, "FeatureKey"]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Scores of the ``mahalanobis-lr[pre]`` row on each of ``test`` (role -> key), trained on
    ``train_keys`` (the negatives first), with the chosen magnitude and every magnitude's CV AUROC."""
    from nad_guard.detectors import select_by_cv

    mags = [float(m) for m in cfg.maha_noise]
    y, groups, by = d.folds(train_keys)

    def block(key: "FeatureKey", m: float) -> np.ndarray:
        return magnitude_block(d.features[key].extra[COLUMN], mags, m)

    cands = {f"noise={m:g}": ("logistic", np.vstack([block(k, m) for k in train_keys])) for m in mags}
    try:
        best, cv = select_by_cv(cands, y, groups, cfg.cv_folds, cfg.seed)
        m = mags[list(cands).index(best)]
    except ValueError:  # too few rows or groups to cross-validate: the smallest magnitude
        m = min(mags)
        best, cv = f"noise={m:g} (too few rows to cross-validate)", {}
    comb = combiner(1.0).fit(np.vstack([block(k, m) for k in train_keys]), y)
    scores = {r: comb.decision_function(block(k, m)) for r, k in test.items()}
    return scores, {"selected": best, "cv": {"folds_by": by, "auroc": cv}}
