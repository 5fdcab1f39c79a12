"""Fit and calibrate a guard's detector on path features (used by ``nad-guard fit-detector`` and the
evaluation harness): attacks on the fit part, features, detector, threshold on held-out clean images."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nad_guard.attacks import generate, get_suite
from nad_guard.calibration import conformal_rank
from nad_guard.data import ImageSet
from nad_guard.deep import fit_deep_detector
from nad_guard.detectors import CLEAN_ONLY, PathDetector, cross_val_auroc_per_block, cv_groups, select_by_cv
from nad_guard.encoding import detector_input, detector_inputs
from nad_guard.errors import DEFAULT_ATTACK_SHARE, MIN_MISPREDICTIONS, error_rows, fit_error_detector
from nad_guard.guard import Guard
from nad_guard.holdout import correct_mask, partition_correct
from nad_guard.models import resolve_device
from nad_guard.paths import PathModel
from nad_guard.probes import ProbeSpec
from nad_guard.provenance import exhausted_split, with_calibration_clean


CV_CANDIDATES = {"methods": ("logistic", "gboost"), "encodings": ("rich", "full")}


def fit_guard(paths: PathModel, fit_set: ImageSet, calibration_set: ImageSet, *, suite: str = "mnist",
              attacks: Sequence[str] | None = None, method: str = "logistic", encoding: str = "rich",
              select: str = "fixed", cv_folds: int = 3, mispredictions: bool = True, fpr: float = 0.05,
              device: str = "auto", batch_size: int = 128, cache_dir: str | Path | None = None, progress: bool = True,
              seed: int = 0, provenance: dict[str, Any] | None = None, error_detector: bool = False,
              attack_share: float = DEFAULT_ATTACK_SHARE, probes: int | ProbeSpec = 0) -> Guard:
    """Train a detector on path features of ``fit_set`` and calibrate its threshold on the correctly
    classified images of ``calibration_set`` (held out, clean only).

    Supervised methods learn the correctly classified images (label 0) against the suite's successful
    attacks on them and, with ``mispredictions``, the images the classifier gets wrong (label 1): the
    guard's question is whether a prediction can be trusted, whatever the cause. Clean-only methods
    (``knn``, ``gaussian``, ``isoforest``) generate no attacks and see only the correct images. The
    metadata's ``fit_mispredicted_trained_as_suspicious`` counts the mispredictions so learnt (0 with an
    error detector, whose own ``fit_mispredicted`` counts the fit part's mispredictions it learns from).

    ``select="cv"`` ignores ``method`` and ``encoding`` and takes, among :data:`CV_CANDIDATES`, the
    pair with the best ``cv_folds``-fold cross-validated AUROC on this training data, folds holding out
    whole attacks (or, with fewer attacks than folds, whole source images; see
    :func:`nad_guard.detectors.cv_groups`); the scores go into the guard's metadata.

    ``provenance``: the record of which images ``fit_set`` and ``calibration_set`` are
    (:func:`nad_guard.holdout.holdout_provenance`); the guard's metadata gets it, plus the calibration images that set the
    threshold. The metadata always gets the calibration's size and false-positive bounds
    (:meth:`PathDetector.calibration`); a calibration set too small for a tight bound warns
    (:class:`~nad_guard.calibration.CalibrationWarning`), one too small for ``fpr`` at all raises.

    ``error_detector`` (``nad-guard fit-detector``'s default; off here so that existing callers keep their
    guards): two questions, two detectors (:mod:`nad_guard.errors`). The attack detector then learns the
    correct images against the attacks only (``mispredictions`` is ignored) and is calibrated at
    ``attack_share * fpr``; an :class:`~nad_guard.errors.ErrorDetector`, its method chosen by
    cross-validation on the fit part's correct and mispredicted images only, at ``(1 - attack_share) * fpr``.
    With fewer than :data:`~nad_guard.errors.MIN_MISPREDICTIONS` (or ``cv_folds``) mispredictions in the fit
    part there is no error detector: the guard is a one-detector guard at ``fpr`` and the metadata says why
    (``error_detector_skipped``).

    ``probes`` (``k`` or a :class:`~nad_guard.probes.ProbeSpec`; 0: none): also fit the deep check's detector
    (:mod:`nad_guard.deep`) on the same images and labels, calibrated on the same images at the attack
    detector's rate.
    """
    spec = probes if isinstance(probes, ProbeSpec) else ProbeSpec(k=int(probes)) if probes else None
    if spec is not None and spec.k < 1:
        spec = None
    if select not in ("fixed", "cv"):
        raise ValueError(f"select must be 'fixed' or 'cv', got {select!r}")
    conformal_rank(len(calibration_set), fpr)  # too few calibration images for fpr at all: say so before any attack
    if error_detector:  # nor for the smaller of its two shares
        conformal_rank(len(calibration_set), fpr * min(attack_share, 1 - attack_share))
    if select == "cv" and method in CLEAN_ONLY:
        raise ValueError(f"select='cv' chooses among the supervised detectors {CV_CANDIDATES['methods']}; "
                         f"{method!r} is clean-only")
    t0 = time.time()
    dev = resolve_device(device)
    paths.classifier.to(dev)
    encodings = (encoding,) if select == "fixed" else CV_CANDIDATES["encodings"]

    def matrices(x: torch.Tensor, logits: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
        f, m = detector_inputs(paths, x, encodings, batch_size)
        if logits is not None:
            logits.append(f.logits.double().numpy())
        return m

    clean, wrong = partition_correct(paths, fit_set)
    two = error_detector and len(wrong) >= max(MIN_MISPREDICTIONS, cv_folds)
    skipped = (f"{len(wrong)} mispredictions in the fit part, fewer than the {max(MIN_MISPREDICTIONS, cv_folds)} "
               "cross-validation needs: no error detector") if error_detector and not two else None
    if skipped:
        warnings.warn(skipped, stacklevel=2)
    if two:
        mispredictions = False  # the attack detector answers the first question only
    logits: list[np.ndarray] = []
    X_clean = matrices(clean.float(), logits)
    n_clean = len(clean)
    blocks, ys, sources, per_attack = [X_clean], [np.zeros(n_clean)], [], {}
    images = [clean.float()]  # the images of each block (the deep detector's training data)
    block_names: list[str] = []  # one per suspicious block, as sources
    suite_obj = get_suite(suite, seed=seed)
    n_wrong = 0
    if method not in CLEAN_ONLY:
        for name in attacks or [a for a in suite_obj.names if not a.startswith("noise")]:
            res = generate(paths.classifier, clean, attack=name, suite=suite_obj, batch_size=batch_size,
                           device=dev, cache_dir=cache_dir, progress=progress)
            if len(res.adv_images):
                blocks.append(matrices(res.adv_images))
                images.append(res.adv_images)
                ys.append(np.ones(len(res.adv_images)))
                sources.append(res.indices.numpy())  # each adversarial's source image
                block_names.append(name)
            per_attack[name] = {"success_rate": res.stats.success_rate, "kept": res.stats.n_kept,
                                "seconds": res.stats.seconds}
        if mispredictions and len(wrong):
            blocks.append(matrices(wrong.float()))
            images.append(wrong.float())
            ys.append(np.ones(len(wrong)))
            sources.append(n_clean + np.arange(len(wrong)))
            block_names.append("mispredictions")
            n_wrong = len(wrong)
    y = np.concatenate(ys)
    X = {e: np.vstack([b[e] for b in blocks]) for e in encodings}
    selection = None
    if select == "cv":
        groups, by = cv_groups(n_clean, sources, cv_folds)
        best, cv = select_by_cv({f"{m},{e}": (m, X[e]) for e in encodings for m in CV_CANDIDATES["methods"]}, y,
                                groups, cv_folds, seed)
        method, encoding = best.split(",")
        selection = {"folds": cv_folds, "folds_by": by, "cv_auroc": cv, "selected": best}
    det = PathDetector(method, random_state=seed).fit(X[encoding], y)
    per_block = _cv_per_block(method, encoding, X[encoding], y, n_clean, sources, block_names, cv_folds, seed) \
        if method not in CLEAN_ONLY else None
    cal_ok = correct_mask(paths, calibration_set)
    calib = calibration_set.subset(cal_ok.nonzero().flatten(), f"{calibration_set.name}[correct]")
    if provenance is not None:
        cal_positions = np.asarray(provenance["parts"]["calibration"]["positions"])
        if len(cal_positions) != len(calibration_set):
            raise ValueError(f"the provenance record's calibration part has {len(cal_positions)} images, the "
                             f"calibration set {len(calibration_set)}")
        provenance = with_calibration_clean(provenance, cal_positions[cal_ok.numpy()])
    f_cal, X_cal = detector_input(paths, calib.float(), encoding, batch_size)
    det.infer_threshold(X_cal, fpr=fpr * attack_share if two else fpr)
    deep, deep_info = None, None
    if spec is not None:
        deep, deep_info = fit_deep_detector(paths, images, ys, calib.float(), method=method, encoding=encoding,
                                            spec=spec, fpr=det.fpr_, seed=seed, rows=2 * batch_size,
                                            progress=progress)
    err, err_info = None, None
    if two:
        X_wrong = matrices(wrong.float(), logits)[encoding]
        X_err = error_rows(np.vstack(logits), np.vstack([X_clean[encoding], X_wrong]))
        y_err = np.r_[np.zeros(n_clean), np.ones(len(wrong))]
        err, err_info = fit_error_detector(X_err, y_err, error_rows(f_cal.logits, X_cal), fpr * (1 - attack_share),
                                           folds=cv_folds, seed=seed)
    info: dict[str, Any] = {"suite": suite, "attacks": per_attack, "fit_set": fit_set.name,
                            "fit_clean": n_clean, "fit_adversarial": int(sum(len(v) for v in ys[1:])) - n_wrong,
                            "fit_mispredicted_trained_as_suspicious": n_wrong,  # 0 with an error detector
                            "calibration_set": calibration_set.name, "calibration_clean": len(calib),
                            "calibration": det.calibration(**exhausted_split(provenance)).to_dict(),
                            "seed": seed, "seconds": round(time.time() - t0, 1),
                            **({"selection": selection} if selection else {}),
                            **({"cv_per_attack": per_block} if per_block else {}),
                            **({"provenance": provenance} if provenance is not None else {}),
                            **({"error_detector_skipped": skipped} if skipped else {})}
    paths.classifier.cpu()
    return Guard(paths, det, encoding, {"detector_info": info, **({"error_detector_info": err_info} if two else {}),
                                        **({"deep_info": deep_info} if deep_info else {})},
                 error_detector=err, attack_share=attack_share, deep_detector=deep, probes=spec)


def _cv_per_block(method: str, encoding: str, X: np.ndarray, y: np.ndarray, n_clean: int,
                  sources: list[np.ndarray], names: list[str], folds: int, seed: int) -> dict[str, Any]:
    """The deployed method's cross-validated AUROC per training attack (and on the mispredictions), with
    the folds of ``select="cv"`` (:func:`nad_guard.detectors.cv_groups`), for the guard's metadata (the
    health report reads it, so no attack needs regenerating); ``error`` says why when too few rows."""
    groups, by = cv_groups(n_clean, sources, folds)
    offsets = n_clean + np.cumsum([0] + [len(s) for s in sources])
    rows = {name: np.arange(offsets[i], offsets[i + 1]) for i, name in enumerate(names)}
    record: dict[str, Any] = {"method": method, "encoding": encoding, "folds": folds, "folds_by": by}
    try:
        return record | {"auroc": cross_val_auroc_per_block(method, X, y, groups, rows, folds, seed)}
    except ValueError as e:
        return record | {"error": str(e)}
