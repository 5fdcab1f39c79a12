"""The detection evaluation harness: nad-guard and the baselines under one honest protocol.

Splits (as :func:`nad_guard.holdout.holdout_splits`): the test set is divided, seeded and
stratified, into a *detector-fit* part (40%), a *calibration* part (20%, clean only: thresholds)
and an *evaluation* part (40%). Clean sets hold only images the classifier gets right; adversarial
sets hold only successful attacks on those clean images (:func:`nad_guard.attacks.generate`, cached
on disk). Detectors learn on the fit part and are judged on the evaluation part, so their train and
test images are disjoint; every detector's threshold is the one that flags 5% of the calibration
part's clean scores (:func:`nad_guard.metrics.threshold_at_fpr`). Baselines get exactly the same
splits, the same training data and the same threshold rule. Scores: **higher = more suspicious**.

Unsupervised parts are learned from the classifier's training images, as nad-guard's masks are:
the class Gaussians of Mahalanobis, the LID reference set and the deep-kNN neighbours (a seeded,
stratified sample of at most ``train_images``). Supervised parts (nad-guard's detector, the
logistic regressions of Mahalanobis-LR and LID-LR) learn on the fit part only. With
``EvalConfig.maha_noise``, ``mahalanobis-lr[pre]`` is Mahalanobis as Lee et al. run it (input
pre-processing, its magnitude chosen by cross-validation on the fit part: :mod:`~nad_guard.evaluate.maha_pre`).
With ``EvalConfig.noisy_negatives`` (e.g. ``("noise-l2",)``), the named noise controls are negatives, as
Lee et al.'s noisy images are: in ``seen``, ``unseen`` and ``fgsm-only`` each part's negatives are its
clean images and their noisy copies, for fitting, thresholds and scores alike.

Protocols (``PROTOCOLS``):

``seen``
    per attack: train on the fit part's clean images + that attack's adversarials, test on the
    evaluation part's clean images + that attack's adversarials.
``unseen``
    leave one attack out: train on the other attacks, test on the left-out one.
``fgsm-only``
    train on FGSM only, test on every other attack.
``clean-only``
    no adversarial data at all: nad-guard's clean-only detectors (``EvalConfig.clean_methods``)
    against MSP, Energy, unsupervised Mahalanobis (last layer), LID (last layer) and deep kNN.
``mispredictions``
    natural errors: positives are the evaluation part's misclassified clean images, negatives its
    correctly classified ones. nad-guard as deployed (the primary method trained on all attacks of
    the fit part and the fit part's natural mispredictions, as ``nad-guard fit-detector`` does), the
    same trained on the attacks only, its clean-only detector, and one trained on the fit part's own
    mispredictions only when it holds at least ``MIN_MISPREDICTIONS`` of them.
``adaptive``
    white-box L-inf PGD against whole defences (:mod:`nad_guard.evaluate.adaptive`, the attack in
    :mod:`nad_guard.attacks.adaptive`): the classifier's margin and the defence's detector together,
    through differentiable surrogates (:func:`soft_encode` into the deployed guard's detectors;
    Mahalanobis-LR's exact distances; MSP), with EOT for random defences and BPDA for transforms without
    a gradient, several objectives, over a grid of budgets around the suite's ``pgd`` ``eps``. Reported
    per defence: the share of attacked images that some objective and iterate makes misclassified *and*
    not flagged by the defence's real decision at its calibrated threshold, at the suite's ``eps`` and
    over the grid, the budget at which half the images evade, and plain PGD's share.

Which supervised detector is "nad-guard" (``EvalConfig.select``): ``fixed``, the configured primary
method and encoding; ``cv``, per training task (each seen attack, each left-out attack, the deployed
detector of the mispredictions and adaptive protocols), the candidate method x encoding with the best
cross-validated AUROC on that task's training data (:func:`nad_guard.detectors.cv_groups`: folds hold
out whole attacks when the task trains on at least as many attacks as there are folds, else whole
source images, so no fold is scored on perturbed copies of its own training images). Both choices use
the fit part only;
the other candidates are reported as ``nad-guard[method,encoding]`` rows either way.

Outputs (:func:`write_outputs`): ``results.md`` (tables), ``results.json`` (everything, with the
configuration and timing) and ``roc_<protocol>.png`` plots.

The package, one file per idea: :mod:`~nad_guard.evaluate.config` (:class:`EvalConfig`, the protocols),
:mod:`~nad_guard.evaluate.features` (:class:`FeatureSet`, :class:`FeatureKey`),
:mod:`~nad_guard.evaluate.data` (:class:`EvalData`), :mod:`~nad_guard.evaluate.protocols` (seen, unseen,
fgsm-only, clean-only, mispredictions), :mod:`~nad_guard.evaluate.surrogate` and
:mod:`~nad_guard.evaluate.adaptive` (the adaptive attack), :mod:`~nad_guard.evaluate.run`
(:func:`run_evaluation`) and :mod:`~nad_guard.evaluate.report` (tables, JSON, plots).
"""

from __future__ import annotations

from nad_guard.evaluate.adaptive import adaptive_protocol
from nad_guard.evaluate.config import (MIN_MISPREDICTIONS, NOISY_NEGATIVE_PROTOCOLS, PROTOCOLS, SELECT,
                                       SUPERVISED_BASELINES, UNSUPERVISED_BASELINES, EvalConfig, clean_spec)
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.features import (CALIBRATION_CLEAN, EVALUATION_CLEAN, EVALUATION_WRONG, FIT_CLEAN, FIT_WRONG,
                                         FeatureKey, FeatureSet, compute_features)
from nad_guard.evaluate.protocols import FittedBaselines, metrics_row
from nad_guard.evaluate.report import render_markdown, summarize, write_outputs
from nad_guard.evaluate.run import run_evaluation
from nad_guard.evaluate.surrogate import soft_encode

__all__ = ["CALIBRATION_CLEAN", "EVALUATION_CLEAN", "EVALUATION_WRONG", "FIT_CLEAN", "FIT_WRONG", "MIN_MISPREDICTIONS",
           "NOISY_NEGATIVE_PROTOCOLS", "PROTOCOLS", "SELECT", "SUPERVISED_BASELINES", "UNSUPERVISED_BASELINES", "EvalConfig", "EvalData",
           "FeatureKey", "FeatureSet", "FittedBaselines", "adaptive_protocol", "clean_spec", "compute_features",
           "metrics_row", "render_markdown", "run_evaluation", "soft_encode", "summarize", "write_outputs"]
