"""The protocols with adversarial or mispredicted positives scored from precomputed features: the supervised
ones (``seen``, ``unseen``, ``fgsm-only``: :func:`supervised_protocol`), ``clean-only`` and
``mispredictions`` (with DOCTOR, the error detector of :mod:`nad_guard.errors` and every row's AURC); the unsupervised baselines fitted once for all of them (:class:`FittedBaselines`);
and one result row (:func:`metrics_row`)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from nad_guard.baselines import DOCTOR, LID, MSP, DeepKNN, Energy, Mahalanobis, combiner
from nad_guard.detectors import PathDetector
from nad_guard.errors import MIN_MISPREDICTIONS as ERR_MIN
from nad_guard.errors import ErrorDetector, error_rows, select_error_method
from nad_guard.evaluate.config import MIN_MISPREDICTIONS, UNSUPERVISED_BASELINES, EvalConfig
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.features import (CALIBRATION_CLEAN, EVALUATION_CLEAN, EVALUATION_WRONG, FIT_CLEAN, FIT_WRONG,
                                         FeatureKey, FeatureSet)
from nad_guard.evaluate.multipass import multipass_scores, rule_fields
from nad_guard.evaluate.maha_pre import ROW as MAHA_PRE_ROW
from nad_guard.evaluate.maha_pre import maha_pre_scores
from nad_guard.evaluate.multipass import ENCODER, ENCODER_ROW, PROBES, SQUEEZING, deep_name
from nad_guard.metrics import aurc
from nad_guard.metrics import evaluate as evaluate_scores

ERROR_DETECTOR_ROW = "nad-guard[error-detector]"  # the mispredictions protocol's row of nad_guard.errors


def error_row(extra: str) -> str:
    """The error detector's row with ``extra``'s columns appended to its input (e.g. the deep check's)."""
    return f"nad-guard[error-detector+{extra}]"


class FittedBaselines:
    """Unsupervised baselines fitted once; per-set scores and layer scores cached."""

    def __init__(self, d: EvalData, seed: int):
        self.d = d
        self.msp, self.energy, self.doctor = MSP(), Energy(), DOCTOR()
        self.maha = Mahalanobis(combine="last").fit_features(d.train_base, d.train_labels)
        self.lid = LID(combine="last", random_state=seed).fit_features(d.train_base)
        self.knn = DeepKNN(random_state=seed).fit_features(d.train_base, d.train_labels)
        self.multipass = multipass_scores(d)  # feature squeezing, the Odds: unsupervised, read FeatureSet.extra
        self._cache: dict[tuple[str, FeatureKey], np.ndarray] = {}

    def layer_scores(self, which: str, key: FeatureKey) -> np.ndarray:
        k = (which + ":layers", key)
        if k not in self._cache:
            det = self.maha if which == "mahalanobis" else self.lid
            self._cache[k] = det.layer_scores(self.d.features[key].base)
        return self._cache[k]

    def score(self, name: str, key: FeatureKey) -> np.ndarray:
        k = (name, key)
        if k not in self._cache and name in self.multipass:
            self._cache[k] = self.multipass[name](self.d.features[key])
        if k not in self._cache:
            det = {"msp": self.msp, "energy": self.energy, "doctor": self.doctor, "mahalanobis": self.maha, "lid": self.lid,
                   "deep-knn": self.knn}[name]
            self._cache[k] = det.score_features(self.d.features[key].base)
        return self._cache[k]


def metrics_row(detector: str, attack: str, clean: np.ndarray, susp: np.ndarray, cal: np.ndarray,
                 cfg: EvalConfig) -> dict[str, Any]:
    m = evaluate_scores(clean, susp, cal, fpr=cfg.fpr, n_resamples=cfg.n_resamples, seed=cfg.seed)
    return {"detector": detector, "attack": attack, **m.to_dict()}


def _nad_name(method: str, encoding: str, cfg: EvalConfig) -> str:
    """Row name of a supervised candidate: 'nad-guard' for the fixed primary; under ``select="cv"``
    every candidate is a variant and 'nad-guard' is a copy of the chosen one's scores."""
    if cfg.select == "fixed" and (method, encoding) == tuple(cfg.primary):
        return "nad-guard"
    return f"nad-guard[{method},{encoding}]"


def augmented_rows(cfg: EvalConfig) -> dict[str, str]:
    """nad-guard's detector with more per-image columns: ``row name -> FeatureSet.extra key(s)`` (the deep
    check's probe columns with ``probes > 0``, and with feature squeezing among ``multipass_baselines`` also
    the probe columns followed by the squeezers' distances, ``"probes+feature-squeezing"``; the NND
    encoder's with ``encoder``; none by default)."""
    squeeze = cfg.probes > 0 and SQUEEZING in cfg.multipass_baselines
    return {**({deep_name(cfg.probes): PROBES} if cfg.probes > 0 else {}),
            **({f"{deep_name(cfg.probes)[:-1]}+squeezing]": f"{PROBES}+{SQUEEZING}"} if squeeze else {}),
            **({ENCODER_ROW: ENCODER} if cfg.encoder is not None else {})}


def extra_columns(fs: FeatureSet, extra: str) -> np.ndarray:
    """The ``FeatureSet.extra`` columns named by ``extra``: one key, or keys joined by ``+`` side by side."""
    return np.hstack([fs.extra[k] for k in extra.split("+")])


def deep_rows(d: EvalData, keys: list[FeatureKey] | FeatureKey, encoding: str, extra: str = PROBES) -> np.ndarray:
    """A detector input with more columns: ``encoding``'s rows of ``keys`` (stacked) with the ``extra``
    columns (:func:`extra_columns`; the deep check's probe columns by default)."""
    keys = [keys] if isinstance(keys, FeatureKey) else keys
    return np.vstack([np.hstack([d.features[k].path[encoding], extra_columns(d.features[k], extra)]) for k in keys])


def deep_scores(d: EvalData, cfg: EvalConfig, method: str, encoding: str, train_keys: list[FeatureKey],
                y: np.ndarray | None, test: dict[str, FeatureKey]) -> dict[str, dict[str, np.ndarray]]:
    """``{row: {role: scores}}`` of nad-guard's ``method`` on ``encoding`` + each of :func:`augmented_rows`'
    columns, fitted on ``train_keys`` (labels ``y``; ``None`` for a clean-only method); empty without any."""
    out = {}
    for row, extra in augmented_rows(cfg).items():
        det = PathDetector(method, random_state=cfg.seed).fit(deep_rows(d, train_keys, encoding, extra), y)
        out[row] = {r: det.score_samples(deep_rows(d, k, encoding, extra)) for r, k in test.items()}
    return out


def supervised_protocol(d: EvalData, b: FittedBaselines, cfg: EvalConfig, tasks: list[tuple[str, list[str]]],
                        progress_desc: str, keep_scores: dict[str, Any]) -> list[dict[str, Any]]:
    """Each task ``(test_attack, train_attacks)``: fit every supervised detector on the fit part's negatives
    (its clean images, and the noisy copies of ``cfg.noisy_negatives``) + the train attacks' adversarials,
    score the evaluation part (its negatives against the test attack's adversarials; thresholds from the
    calibration part's negatives). Every row of the task, unsupervised ones too, has the same negatives."""
    from tqdm.auto import tqdm

    rows, aug = [], augmented_rows(cfg)
    neg = d.negatives
    noisy = {"negatives": neg["evaluation"].kind} if d.noisy else {}
    for test_attack, train_attacks in tqdm(tasks, desc=progress_desc, disable=not cfg.progress):
        train_keys = [neg["fit"]] + [FeatureKey.attack("fit", a) for a in train_attacks]
        y = d.training_set(train_keys)[0]
        test = {"clean": neg["evaluation"], "adv": FeatureKey.attack("evaluation", test_attack),
                "cal": neg["calibration"]}
        scores: dict[str, dict[str, np.ndarray]] = {}
        for enc in cfg.encodings:
            X = np.vstack([d.features[k].path[enc] for k in train_keys])
            for method in cfg.methods:
                det = PathDetector(method, random_state=cfg.seed).fit(X, y)
                scores[_nad_name(method, enc, cfg)] = {r: det.score_samples(d.features[k].path[enc])
                                                       for r, k in test.items()}
        (cm, ce), cv = d.choose(train_keys)
        if cfg.select == "cv":
            scores = {"nad-guard": scores[_nad_name(cm, ce, cfg)], **scores}
        scores |= deep_scores(d, cfg, cm, ce, train_keys, y, test)
        for which in ("mahalanobis", "lid"):
            L = np.vstack([b.layer_scores(which, k) for k in train_keys])
            comb = combiner(1.0).fit(L, y)
            scores[f"{which}-lr"] = {r: comb.decision_function(b.layer_scores(which, k)) for r, k in test.items()}
        info: dict[str, dict[str, Any]] = {}
        if cfg.maha_noise:  # Lee et al.'s input pre-processing, magnitude chosen by CV on the fit part
            scores[MAHA_PRE_ROW], info[MAHA_PRE_ROW] = maha_pre_scores(d, cfg, train_keys, test)
        for name in ("msp", "energy", "deep-knn", *b.multipass):
            scores[name] = {r: b.score(name, k) for r, k in test.items()}
        for det_name, s in scores.items():
            rows.append({**metrics_row(det_name, test_attack, s["clean"], s["adv"], s["cal"], cfg),
                         "trained_on": "+".join(train_attacks), **noisy,
                         **({"selected": f"{cm},{ce}", "cv": cv} if det_name == "nad-guard" else {}),
                         **info.get(det_name, {}),
                         **({"selected": f"{cm},{ce}+{aug[det_name]}"} if det_name in aug else {})})
        keep_scores[test_attack] = scores
    return rows


def clean_only_protocol(d: EvalData, b: FittedBaselines, cfg: EvalConfig,
                        keep_scores: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    keys = {"clean": EVALUATION_CLEAN, "cal": CALIBRATION_CLEAN}
    dets = {}
    for i, (method, enc) in enumerate(cfg.clean_specs()):
        det = PathDetector(method, random_state=cfg.seed).fit(d.features[FIT_CLEAN].path[enc])
        name = "nad-guard" if i == 0 else f"nad-guard[{method},{enc}]"
        dets[name] = lambda k, det=det, enc=enc: det.score_samples(d.features[k].path[enc])
        for row, extra in (augmented_rows(cfg).items() if i == 0 else ()):
            deep = PathDetector(method, random_state=cfg.seed).fit(deep_rows(d, FIT_CLEAN, enc, extra))
            dets[row] = lambda k, det=deep, enc=enc, extra=extra: det.score_samples(deep_rows(d, k, enc, extra))
    for name in (*UNSUPERVISED_BASELINES, *b.multipass):
        dets[name] = lambda k, name=name: b.score(name, k)
    for attack in d.usable:
        scores = {}
        for name, fn in dets.items():
            s = {r: fn(k) for r, k in {**keys, "adv": FeatureKey.attack("evaluation", attack)}.items()}
            scores[name] = s
            rows.append({**metrics_row(name, attack, s["clean"], s["adv"], s["cal"], cfg), "trained_on": "clean",
                         **rule_fields(name, d, s)})
        keep_scores[attack] = scores
    return rows


def deployed_training_keys(d: EvalData) -> list[FeatureKey]:
    """The deployed detector's training data: the fit part's clean images, every attack on them and the
    fit part's natural mispredictions (as ``nad-guard fit-detector`` trains it)."""
    return ([FIT_CLEAN] + [FeatureKey.attack("fit", a) for a in d.usable]
            + ([FIT_WRONG] if FIT_WRONG in d.features else []))


def mispredictions_protocol(d: EvalData, b: FittedBaselines, cfg: EvalConfig,
                            keep_scores: dict[str, Any]) -> list[dict[str, Any]]:
    if EVALUATION_WRONG not in d.features or len(d.features[EVALUATION_WRONG]) == 0:
        return []
    keys = {"clean": EVALUATION_CLEAN, "adv": EVALUATION_WRONG, "cal": CALIBRATION_CLEAN}
    dets: dict[str, Callable[[FeatureKey], np.ndarray]] = {}
    attack_keys = [FIT_CLEAN] + [FeatureKey.attack("fit", a) for a in d.usable]
    deployed_keys = deployed_training_keys(d)
    (method, enc), cv = d.choose(deployed_keys)
    for name, train_keys in (("nad-guard", deployed_keys), (f"nad-guard[{method},{enc},attacks only]", attack_keys)):
        X = np.vstack([d.features[k].path[enc] for k in train_keys])
        y = d.training_set(train_keys)[0]
        det = PathDetector(method, random_state=cfg.seed).fit(X, y)
        dets[name] = lambda k, det=det: det.score_samples(d.features[k].path[enc])
        for row, extra in (augmented_rows(cfg).items() if name == "nad-guard" else ()):
            deep = PathDetector(method, random_state=cfg.seed).fit(deep_rows(d, train_keys, enc, extra), y)
            dets[row] = lambda k, det=deep, extra=extra: det.score_samples(deep_rows(d, k, enc, extra))
    cm, ce = cfg.clean_specs()[0]
    clean_det = PathDetector(cm, random_state=cfg.seed).fit(d.features[FIT_CLEAN].path[ce])
    dets[f"nad-guard[{cm},{ce}]"] = lambda k: clean_det.score_samples(d.features[k].path[ce])
    if d.n_wrong["fit"] >= MIN_MISPREDICTIONS:
        Xm = np.vstack([d.features[FIT_CLEAN].path[enc], d.features[FIT_WRONG].path[enc]])
        ym = np.r_[np.zeros(len(d.features[FIT_CLEAN])), np.ones(len(d.features[FIT_WRONG]))]
        mis_det = PathDetector(method, random_state=cfg.seed).fit(Xm, ym)
        dets[f"nad-guard[{method},{enc},on-mispredictions]"] = lambda k: mis_det.score_samples(
            d.features[k].path[enc])
    err_cv: dict[str, dict[str, Any]] = {}  # error-detector row -> its method chosen by CV on the fit part
    if len(d.features[FIT_WRONG] if FIT_WRONG in d.features else ()) >= max(ERR_MIN, cfg.cv_folds):
        def err_rows(k: FeatureKey) -> np.ndarray:
            return error_rows(d.features[k].base.logits, d.features[k].path[enc])

        ye = np.r_[np.zeros(len(d.features[FIT_CLEAN])), np.ones(len(d.features[FIT_WRONG]))]
        for row, extra in {ERROR_DETECTOR_ROW: None, **{error_row(x): x for x in augmented_rows(cfg).values()}}.items():
            def rows_of(k: FeatureKey, extra: str | None = extra) -> np.ndarray:  # + the extra columns, if any
                return err_rows(k) if extra is None else np.hstack([err_rows(k), extra_columns(d.features[k], extra)])

            X = np.vstack([rows_of(FIT_CLEAN), rows_of(FIT_WRONG)])  # the fit part only
            best, cv_auroc = select_error_method(X, ye, cfg.cv_folds, cfg.seed)
            det = ErrorDetector(best, random_state=cfg.seed).fit(X, ye)
            dets[row] = lambda k, det=det, rows_of=rows_of: det.score_samples(rows_of(k))
            err_cv[row] = {"selected": best, "cv": {"folds_by": "image", "auroc": cv_auroc}}
    for name in (*UNSUPERVISED_BASELINES, "doctor", *b.multipass):
        dets[name] = lambda k, name=name: b.score(name, k)
    rows, scores = [], {}
    for name, fn in dets.items():
        s = {r: fn(k) for r, k in keys.items()}
        scores[name] = s
        trained_on = {"nad-guard": "all attacks + fit mispredictions",
                      **{row: "all attacks + fit mispredictions" for row in augmented_rows(cfg)},
                      **dict.fromkeys(err_cv, "fit mispredictions (method by CV on the fit part)")}.get(
            name, "all attacks" if "attacks only" in name else "")
        rows.append({**metrics_row(name, "mispredictions", s["clean"], s["adv"], s["cal"], cfg),
                     "trained_on": trained_on,
                     "aurc": aurc(np.r_[s["clean"], s["adv"]], np.r_[np.zeros(len(s["clean"])), np.ones(len(s["adv"]))]),
                     **({"selected": f"{method},{enc}", "cv": cv} if name == "nad-guard" else {}),
                     **err_cv.get(name, {})})
    keep_scores["mispredictions"] = scores
    return rows
