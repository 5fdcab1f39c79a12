"""Established detectors to compare nad-guard against, as scikit-learn-style estimators.

Scores follow the project convention (see :mod:`nad_guard.metrics`): **higher = more suspicious**.

========================  =================================================================
:class:`MSP`              1 - max softmax probability (Hendrycks & Gimpel 2017)
:class:`Energy`           energy ``-T logsumexp(logits / T)`` (Liu et al. 2020)
:class:`DOCTOR`           ``1 - sum_k p_k^2`` of the softmax, for mispredictions (Granese et
                          al. 2021; temperature and input pre-processing as options)
:class:`Mahalanobis`      min class-conditional Mahalanobis distance per layer, shared
                          covariance (Lee et al. 2018); logistic regression across layers
                          or, unsupervised, the last layer's distance
:class:`LID`              local intrinsic dimensionality per layer w.r.t. a fixed clean
                          reference set (Ma et al. 2018); logistic regression across layers
                          or the last layer's LID
:class:`DeepKNN`          deep k-nearest neighbours with conformal p-values (Papernot &
                          McDaniel 2018): 1 - p-value of the predicted label, or
                          1 - credibility
:class:`FeatureSqueezing` max L1 softmax change under squeezed inputs (Xu et al. 2018);
                          multi-pass, reads the images
:class:`OddsAreOdd`       noise response of the logit differences, z-scored per predicted
                          class (Roth et al. 2019); multi-pass, reads the images
========================  =================================================================

Every detector has two paths, as in pytorch-ood: the raw-input path ``fit(model, images, ...)`` /
``score(model, images)`` runs the model (one forward pass with hooks, streamed in batches) and
hands :class:`Features` to the feature path ``fit_features(features, ...)`` /
``score_features(features)``, which is cheap, so features can be extracted once, saved
(:meth:`Features.save`) and reused. ``__init__`` only stores parameters, learned state ends in
``_``, and using a detector before ``fit`` raises :class:`sklearn.exceptions.NotFittedError`.

Features are global-average-pooled activations ``(N, C)`` of named modules (see
:func:`default_layers`), plus the logits.

The package, one file per idea: :mod:`~nad_guard.baselines.features` (:class:`Features`, :func:`default_layers`,
:func:`extract_features`), :mod:`~nad_guard.baselines.base` (:class:`BaseDetector`, :func:`combiner` and the
shared helpers), :mod:`~nad_guard.baselines.confidence` (MSP, Energy, DOCTOR), :mod:`~nad_guard.baselines.mahalanobis`,
:mod:`~nad_guard.baselines.lid` and :mod:`~nad_guard.baselines.deep_knn`; the multi-pass ones, which need the images
rather than one pass's features, :mod:`~nad_guard.baselines.squeezing` and :mod:`~nad_guard.baselines.odds`; :mod:`~nad_guard.baselines.mahalanobis_pre`
computes Lee et al.'s input pre-processing for a list of noise magnitudes at once (what ``nad-guard evaluate
--maha-noise`` reads).
"""

from __future__ import annotations

from nad_guard.baselines.base import BaseDetector, combiner
from nad_guard.baselines.confidence import DOCTOR, MSP, Energy
from nad_guard.baselines.deep_knn import DeepKNN
from nad_guard.baselines.features import Features, ImagesLike, default_layers, extract_features
from nad_guard.baselines.lid import LID
from nad_guard.baselines.mahalanobis import Mahalanobis
from nad_guard.baselines.odds import OddsAreOdd
from nad_guard.baselines.squeezing import FeatureSqueezing

__all__ = ["BaseDetector", "DETECTORS", "DOCTOR", "DeepKNN", "Energy", "FeatureSqueezing", "Features", "ImagesLike", "LID",
           "MSP", "Mahalanobis", "OddsAreOdd", "combiner", "default_layers", "extract_features"]

DETECTORS = {"msp": MSP, "energy": Energy, "doctor": DOCTOR, "mahalanobis": Mahalanobis, "lid": LID, "deep-knn": DeepKNN}
