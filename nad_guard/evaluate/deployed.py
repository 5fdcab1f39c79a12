"""The ``deployed`` protocol: every attack (and the natural mispredictions) scored by the guard that
``nad-guard fit-detector`` would ship, at its deployed thresholds.

The per-attack ``seen`` and leave-one-out rows train a detector per task and set each row's threshold
afresh; a user runs one guard. This protocol fits that one guard on the fit part exactly as
:func:`nad_guard.fitting.fit_guard` does with ``nad-guard fit-detector``'s defaults, from the run's
features: the **attack detector** learns the fit part's correct images against every attack of the
suite (its method and encoding chosen as the run's ``select`` says), the **error detector**
(:mod:`nad_guard.errors`) the same correct images against the fit part's mispredictions (method by
cross-validation on the fit part); each is calibrated on the calibration part's correct images at its
share of ``fpr`` and an input is flagged when either flags it (the union bound keeps a clean input's
chance of a flag at most ``fpr``). With too few mispredictions in the fit part the guard is a
one-detector guard trained on the attacks and the mispredictions, at ``fpr``, as ``fit-detector``
ships it then.

Rows, per attack on the evaluation part and for its mispredictions:

``nad-guard[deployed]``
    the guard's decision: ``auroc`` of its combined trust score (``1 - trust``), ``tpr`` the share
    flagged, ``test_fpr`` the share of the evaluation part's correct images flagged (the observed
    false-positive rate, the same number on every row);
``nad-guard[deployed attack detector]`` / ``nad-guard[deployed error detector]``
    each detector alone at its own deployed threshold (its share of ``fpr``).

Next to them, the softmax baselines with a threshold at ``fpr`` on the calibration part (their usual rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy.stats import binomtest

from nad_guard.detectors import PathDetector
from nad_guard.errors import DEFAULT_ATTACK_SHARE, combined_trust, error_rows, fit_error_detector
from nad_guard.errors import MIN_MISPREDICTIONS as ERR_MIN
from nad_guard.evaluate.config import EvalConfig
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.features import (CALIBRATION_CLEAN, EVALUATION_CLEAN, EVALUATION_WRONG, FIT_CLEAN, FIT_WRONG,
                                         FeatureKey)
from nad_guard.evaluate.protocols import FittedBaselines, deep_rows, deployed_training_keys, metrics_row
from nad_guard.metrics import aupr, auroc, bootstrap_ci, labels_and_scores

DEPLOYED = "nad-guard[deployed]"
DEPLOYED_ATTACK = "nad-guard[deployed attack detector]"
DEPLOYED_ERROR = "nad-guard[deployed error detector]"
DEPLOYED_DEEP = "nad-guard[deployed deep k={}]"  # with EvalConfig.probes: the deep mode of the same guard
BASELINES = ("msp", "doctor", "energy")


def _rate(flags: np.ndarray, confidence: float = 0.95) -> tuple[float, list[float]]:
    """The share of ``flags`` that are true, with its exact (Clopper-Pearson) interval."""
    k, n = int(np.sum(flags)), len(flags)
    ci = binomtest(k, n).proportion_ci(confidence, method="exact")
    return k / n, [float(ci.low), float(ci.high)]


def decision_row(detector: str, attack: str, clean: tuple[np.ndarray, np.ndarray], susp: tuple[np.ndarray, np.ndarray],
                 cfg: EvalConfig, threshold: float | None) -> dict[str, Any]:
    """A row for a detector with a deployed decision: ``clean``/``susp`` are ``(suspicion, flagged)`` of the
    evaluation part's correct images and of the suspicious ones."""
    y, s = labels_and_scores(clean[0], susp[0])
    tpr, tpr_ci = _rate(susp[1])
    fpr, fpr_ci = _rate(clean[1])
    kw = dict(n_resamples=cfg.n_resamples, seed=cfg.seed)
    return {"detector": detector, "attack": attack, "auroc": auroc(y, s), "auroc_ci": bootstrap_ci(y, s, "auroc", **kw),
            "aupr": aupr(y, s), "aupr_ci": bootstrap_ci(y, s, "aupr", **kw),
            "tpr": tpr, "tpr_ci": tpr_ci, "test_fpr": fpr, "test_fpr_ci": fpr_ci, "threshold": threshold,
            "target_fpr": cfg.fpr, "n_clean": len(clean[0]), "n_suspicious": len(susp[0])}


@dataclass
class DeployedGuard:
    """The guard ``fit-detector`` would ship, fitted from a run's features: the attack detector ``det`` on
    encoding ``enc`` at ``share`` of the rate (trained on ``train_keys``), and, with enough mispredictions,
    the error detector ``err`` (rows: :func:`nad_guard.errors.error_rows`) at the rest; ``info``: what it is
    (methods, thresholds)."""

    det: PathDetector
    enc: str
    err: Any
    share: float
    info: dict[str, Any]
    train_keys: list[FeatureKey]


def fit_deployed(d: EvalData, cfg: EvalConfig) -> DeployedGuard:
    """Fit and calibrate the shipped guard as the module docstring says (the fit and calibration parts only)."""
    n_wrong = len(d.features[FIT_WRONG]) if FIT_WRONG in d.features else 0
    two = n_wrong >= max(ERR_MIN, cfg.cv_folds)
    share = DEFAULT_ATTACK_SHARE if two else 1.0
    train_keys = ([FIT_CLEAN] + [FeatureKey.attack("fit", a) for a in d.usable]) if two else deployed_training_keys(d)
    (method, enc), cv = d.choose(train_keys)
    det = PathDetector(method, random_state=cfg.seed).fit(np.vstack([d.features[k].path[enc] for k in train_keys]),
                                                          d.training_set(train_keys)[0])
    det.infer_threshold(d.features[CALIBRATION_CLEAN].path[enc], fpr=cfg.fpr * share)
    info: dict[str, Any] = {"two_detectors": two, "attack_share": share if two else None,
                            "attack_detector": {"method": method, "encoding": enc, "trained_on": [str(k) for k in train_keys],
                                                "fpr": cfg.fpr * share, "threshold": det.threshold_, **({"cv": cv} if cv else {})}}
    err = None
    if two:
        def err_rows(k: FeatureKey) -> np.ndarray:
            return error_rows(d.features[k].base.logits, d.features[k].path[enc])

        Xe = np.vstack([err_rows(FIT_CLEAN), err_rows(FIT_WRONG)])
        ye = np.r_[np.zeros(len(d.features[FIT_CLEAN])), np.ones(n_wrong)]
        err, err_info = fit_error_detector(Xe, ye, err_rows(CALIBRATION_CLEAN), cfg.fpr * (1 - share),
                                           folds=cfg.cv_folds, seed=cfg.seed)
        info["error_detector"] = {k: err_info[k] for k in ("method", "fpr", "threshold", "selection")}
    return DeployedGuard(det, enc, err, share, info, train_keys)


def fit_deployed_deep(d: EvalData, cfg: EvalConfig, g: DeployedGuard) -> PathDetector:
    """The deep detector ``fit-detector --probes K`` adds to ``g`` (:mod:`nad_guard.deep`): ``g``'s method on
    its encoding's rows followed by the probe columns, the same training rows, calibrated on the same clean
    images at the attack detector's share of the rate."""
    deep = PathDetector(g.det.method, random_state=cfg.seed).fit(deep_rows(d, g.train_keys, g.enc),
                                                                  d.training_set(g.train_keys)[0])
    return deep.infer_threshold(deep_rows(d, CALIBRATION_CLEAN, g.enc), fpr=cfg.fpr * g.share)


def deployed_protocol(d: EvalData, b: FittedBaselines, cfg: EvalConfig,
                      keep_scores: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the module docstring, and what the guard is (methods, thresholds, shares)."""
    g = fit_deployed(d, cfg)
    det, enc, err, share, info = g.det, g.enc, g.err, g.share, g.info

    def err_rows(k: FeatureKey) -> np.ndarray:
        return error_rows(d.features[k].base.logits, d.features[k].path[enc])

    deep = fit_deployed_deep(d, cfg, g) if cfg.probes > 0 else None
    deep_name = DEPLOYED_DEEP.format(cfg.probes)
    if deep is not None:
        info["deep_detector"] = {"probes": cfg.probe_spec().to_dict(), "fpr": cfg.fpr * share,
                                 "threshold": deep.threshold_}

    def decide(k: FeatureKey) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        e = err.score_samples(err_rows(k)) if err is not None else None
        out = {}
        for name, a_det, rows in ((DEPLOYED, det, d.features[k].path[enc]),
                                  *(((deep_name, deep, deep_rows(d, k, enc)),) if deep is not None else ())):
            s = a_det.score_samples(rows)
            ta, fa = a_det.trust_of_scores(s), s > a_det.threshold_
            if name == DEPLOYED:
                out[DEPLOYED_ATTACK] = (s, fa)
            if e is None:
                out[name] = (1 - ta, fa)
            else:
                fe = e > err.threshold_
                out[DEPLOYED_ERROR] = (e, fe)
                out[name] = (1 - combined_trust(ta, err.trust_of_scores(e), share), fa | fe)
        return out

    clean = decide(EVALUATION_CLEAN)
    thresholds = {DEPLOYED: None, DEPLOYED_ATTACK: det.threshold_, DEPLOYED_ERROR: err.threshold_ if err else None,
                  deep_name: None}
    targets = [(a, FeatureKey.attack("evaluation", a)) for a in d.usable]
    if EVALUATION_WRONG in d.features and len(d.features[EVALUATION_WRONG]):
        targets.append(("mispredictions", EVALUATION_WRONG))
    baselines: dict[str, Callable[[FeatureKey], np.ndarray]] = {n: (lambda k, n=n: b.score(n, k)) for n in BASELINES}
    rows = []
    for attack, key in targets:
        susp = decide(key)
        scores = {}
        for name in (DEPLOYED, deep_name, DEPLOYED_ATTACK, DEPLOYED_ERROR):
            if name in susp:
                rows.append({**decision_row(name, attack, clean[name], susp[name], cfg, thresholds[name]),
                             "trained_on": "the shipped guard (fit part: every attack; mispredictions)"})
                scores[name] = {"clean": clean[name][0], "adv": susp[name][0]}
        for name, fn in baselines.items():
            s = {"clean": fn(EVALUATION_CLEAN), "adv": fn(key), "cal": fn(CALIBRATION_CLEAN)}
            rows.append({**metrics_row(name, attack, s["clean"], s["adv"], s["cal"], cfg), "trained_on": ""})
            scores[name] = s
        keep_scores[attack] = scores
    return rows, info
