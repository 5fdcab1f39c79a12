"""Fit a guard's detector: attacks on a fit split, features, detector, threshold on held-out clean data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nad_guard.attacks import generate, get_suite
from nad_guard.calibration import conformal_rank
from nad_guard.data import ImageSet
from nad_guard.detectors import CLEAN_ONLY, PathDetector, cv_groups, select_by_cv
from nad_guard.guard import Guard, guard_matrices, guard_matrix
from nad_guard.models import resolve_device
from nad_guard.paths import PathModel
from nad_guard.provenance import summary as provenance_summary
from nad_guard.provenance import with_calibration_clean


def correct_mask(paths: PathModel, images: ImageSet, batch_size: int = 256) -> torch.Tensor:
    """``(N,)`` bool: whether the classifier labels each image correctly."""
    device = next(paths.classifier.parameters()).device
    keep = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            pred = paths.classifier(images.float(s, s + batch_size).to(device)).argmax(1).cpu()
            keep.append(pred == images.labels[s:s + batch_size])
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.bool)


def partition_correct(paths: PathModel, images: ImageSet, batch_size: int = 256) -> tuple[ImageSet, ImageSet]:
    """``(correct, wrong)``: the images the classifier labels correctly, and those it gets wrong."""
    ok = correct_mask(paths, images, batch_size)
    return (images.subset(ok.nonzero().flatten(), f"{images.name}[correct]"),
            images.subset((~ok).nonzero().flatten(), f"{images.name}[mispredicted]"))


def correct_subset(paths: PathModel, images: ImageSet, batch_size: int = 256) -> ImageSet:
    """The images the classifier labels correctly (the only clean images detectors see)."""
    return partition_correct(paths, images, batch_size)[0]


CV_CANDIDATES = {"methods": ("logistic", "gboost"), "encodings": ("rich", "full")}


def fit_guard(paths: PathModel, fit_set: ImageSet, calibration_set: ImageSet, *, suite: str = "mnist",
              attacks: Sequence[str] | None = None, method: str = "logistic", encoding: str = "rich",
              select: str = "fixed", cv_folds: int = 3, mispredictions: bool = True, fpr: float = 0.05,
              device: str = "auto", batch_size: int = 128, cache_dir: str | Path | None = None, progress: bool = True,
              seed: int = 0, provenance: dict[str, Any] | None = None) -> Guard:
    """Train a detector on path features of ``fit_set`` and calibrate its threshold on the correctly
    classified images of ``calibration_set`` (held out, clean only).

    Supervised methods learn the correctly classified images (label 0) against the suite's successful
    attacks on them and, with ``mispredictions``, the images the classifier gets wrong (label 1): the
    guard's question is whether a prediction can be trusted, whatever the cause. Clean-only methods
    (``knn``, ``gaussian``, ``isoforest``) generate no attacks and see only the correct images.

    ``select="cv"`` ignores ``method`` and ``encoding`` and takes, among :data:`CV_CANDIDATES`, the
    pair with the best ``cv_folds``-fold cross-validated AUROC on this training data, folds holding out
    whole attacks (or, with fewer attacks than folds, whole source images; see
    :func:`nad_guard.detectors.cv_groups`); the scores go into the guard's metadata.

    ``provenance``: the record of which images ``fit_set`` and ``calibration_set`` are
    (:func:`holdout_provenance`); the guard's metadata gets it, plus the calibration images that set the
    threshold. The metadata always gets the calibration's size and false-positive bounds
    (:meth:`PathDetector.calibration`); a calibration set too small for a tight bound warns
    (:class:`~nad_guard.calibration.CalibrationWarning`), one too small for ``fpr`` at all raises.
    """
    if select not in ("fixed", "cv"):
        raise ValueError(f"select must be 'fixed' or 'cv', got {select!r}")
    conformal_rank(len(calibration_set), fpr)  # too few calibration images for fpr at all: say so before any attack
    if select == "cv" and method in CLEAN_ONLY:
        raise ValueError(f"select='cv' chooses among the supervised detectors {CV_CANDIDATES['methods']}; "
                         f"{method!r} is clean-only")
    t0 = time.time()
    dev = resolve_device(device)
    paths.classifier.to(dev)
    encodings = (encoding,) if select == "fixed" else CV_CANDIDATES["encodings"]

    def matrices(x: torch.Tensor) -> dict[str, np.ndarray]:
        return guard_matrices(paths, x, encodings, batch_size)[1]

    clean, wrong = partition_correct(paths, fit_set)
    X_clean = matrices(clean.float())
    n_clean = len(clean)
    blocks, ys, sources, per_attack = [X_clean], [np.zeros(n_clean)], [], {}
    suite_obj = get_suite(suite, seed=seed)
    n_wrong = 0
    if method not in CLEAN_ONLY:
        for name in attacks or [a for a in suite_obj.names if not a.startswith("noise")]:
            res = generate(paths.classifier, clean, attack=name, suite=suite_obj, batch_size=batch_size,
                           device=dev, cache_dir=cache_dir, progress=progress)
            if len(res.adv_images):
                blocks.append(matrices(res.adv_images))
                ys.append(np.ones(len(res.adv_images)))
                sources.append(res.indices.numpy())  # each adversarial's source image
            per_attack[name] = {"success_rate": res.stats.success_rate, "kept": res.stats.n_kept,
                                "seconds": res.stats.seconds}
        if mispredictions and len(wrong):
            blocks.append(matrices(wrong.float()))
            ys.append(np.ones(len(wrong)))
            sources.append(n_clean + np.arange(len(wrong)))
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
    cal_ok = correct_mask(paths, calibration_set)
    calib = calibration_set.subset(cal_ok.nonzero().flatten(), f"{calibration_set.name}[correct]")
    if provenance is not None:
        cal_positions = np.asarray(provenance["parts"]["calibration"]["positions"])
        if len(cal_positions) != len(calibration_set):
            raise ValueError(f"the provenance record's calibration part has {len(cal_positions)} images, the "
                             f"calibration set {len(calibration_set)}")
        provenance = with_calibration_clean(provenance, cal_positions[cal_ok.numpy()])
    det.infer_threshold(guard_matrix(paths, calib.float(), encoding, batch_size)[1], fpr=fpr)
    info: dict[str, Any] = {"suite": suite, "attacks": per_attack, "fit_set": fit_set.name,
                            "fit_clean": n_clean, "fit_adversarial": int(sum(len(v) for v in ys[1:])) - n_wrong,
                            "fit_mispredicted": n_wrong,
                            "calibration_set": calibration_set.name, "calibration_clean": len(calib),
                            "calibration": det.calibration().to_dict(),
                            "seed": seed, "seconds": round(time.time() - t0, 1),
                            **({"selection": selection} if selection else {}),
                            **({"provenance": provenance} if provenance is not None else {})}
    paths.classifier.cpu()
    return Guard(paths, det, encoding, {"detector_info": info})


HOLDOUT_FRACTIONS = (0.4, 0.2, 0.4)


def sample_heldout(test: ImageSet, max_images: int | None, seed: int = 0) -> tuple[ImageSet, np.ndarray]:
    """A seeded stratified sample of ``max_images`` images of a held-out set, named ``<name>[<max_images>]``,
    and its sorted positions in ``test``; all of ``test`` when ``max_images`` is ``None`` or not smaller.
    ``nad-guard evaluate``, ``fit-detector`` and ``audit`` draw the same sample for the same arguments,
    so attacks cached by one are reused by the others and the audit knows which images a detector saw."""
    from nad_guard.data import stratified_split

    if max_images is None or max_images >= len(test):
        return test, np.arange(len(test))
    _, keep = stratified_split(test.labels.numpy(), max_images, seed=seed)
    return test.subset(keep, f"{test.name}[{max_images}]"), keep


def holdout_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(fit, calibration, evaluation)`` of :func:`holdout_splits`'s parts for a held-out set
    with ``labels`` ``(N,)``: seeded, stratified, 40/20/40, each sorted."""
    from nad_guard.data import stratified_split

    labels = np.asarray(labels)
    rest, evaluation = stratified_split(labels, test_size=int(round(len(labels) * HOLDOUT_FRACTIONS[2])), seed=seed)
    fit_pos, cal_pos = stratified_split(labels[rest], test_size=int(round(len(labels) * HOLDOUT_FRACTIONS[1])),
                                        seed=seed)
    return rest[fit_pos], rest[cal_pos], evaluation


def holdout_splits(test: ImageSet, seed: int = 0) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Seeded stratified split of a held-out (test) set into ``(fit, calibration, evaluation)`` parts,
    40/20/40 (positions: :func:`holdout_indices`). The detector learns on ``fit`` (clean images and
    their attacks), the threshold is set on ``calibration`` (clean only), and reports that judge the
    guard use ``evaluation``.

    Held-out images, not the classifier's training images, are used to fit the detector: the
    classifier is over-confident on images it was trained on, and a detector fitted on them learns
    that confidence level as "clean" (measured on the tiny digits CNN: AUROC 0.66 on held-out PGD
    when fitted on training images).
    """
    fit, cal, evaluation = holdout_indices(test.labels.numpy(), seed)
    return (test.subset(fit, f"{test.name}[detector-fit]"), test.subset(cal, f"{test.name}[calibration]"),
            test.subset(evaluation, f"{test.name}[evaluation]"))


def holdout_provenance(test: ImageSet, data: str, max_images: int | None = None, seed: int = 0
                       ) -> tuple[tuple[ImageSet, ImageSet, ImageSet], dict[str, Any]]:
    """The ``(fit, calibration, evaluation)`` parts of :func:`holdout_splits` of the seeded sample of
    ``test`` (:func:`sample_heldout`), and the provenance record saying which images of ``test`` each
    holds (:mod:`nad_guard.provenance`; ``data`` is the data set's name for :func:`load_dataset`)."""
    from nad_guard.provenance import PARTS, make_record

    sample, positions = sample_heldout(test, max_images, seed)
    indices = holdout_indices(sample.labels.numpy(), seed)
    parts = holdout_splits(sample, seed)
    kind = test.name.rsplit("/", 1)[-1] if "/" in test.name else "test"
    record = make_record(test, data=data, split_kind=kind, parts={p: positions[i] for p, i in zip(PARTS, indices)},
                         seed=seed, fractions=dict(zip(PARTS, HOLDOUT_FRACTIONS)),
                         rule="training.detector.holdout_indices (seeded, stratified)",
                         sample=None if len(sample) == len(test) else
                         {"max_images": max_images, "seed": seed, "rule": "training.detector.sample_heldout"})
    return parts, record


def build_guard(artifact: str | Path, model: str, data: str, *, weights: str | None = None,
                data_root: str | None = None, suite: str = "mnist", attacks: Sequence[str] | None = None,
                method: str = "logistic", encoding: str = "rich", select: str = "fixed", mispredictions: bool = True,
                fpr: float = 0.05, max_images: int | None = None, device: str = "auto", seed: int = 0,
                progress: bool = True) -> dict[str, Any]:
    """``nad-guard fit-detector``: load the path artifact, fit and calibrate a detector, save the guard.
    ``max_images``: use a seeded stratified sample of the test split (:func:`sample_heldout`)."""
    from nad_guard.attacks import default_cache_dir
    from nad_guard.data import load_dataset
    from training.paths import build_classifier

    train, test = load_dataset(data, data_root)
    paths = PathModel.load(artifact, build_classifier(model, train, weights))
    (fit, calibration, _), record = holdout_provenance(test, data, max_images, seed)
    guard = fit_guard(paths, fit, calibration, suite=suite, attacks=attacks,
                      method=method, encoding=encoding, select=select, mispredictions=mispredictions, fpr=fpr,
                      device=device, seed=seed, cache_dir=default_cache_dir(), progress=progress, provenance=record)
    guard.save(artifact)
    info = dict(guard.meta["detector_info"])
    info["provenance"] = provenance_summary(info.get("provenance"))
    return {"artifact": str(artifact), "method": guard.detector.method, "encoding": guard.encoding,
            "threshold": guard.detector.threshold_, **info}


DEFAULT_RECIPE: dict[str, Any] = {"model": "mnist-cnn", "data": "mnist5k", "schedule": "joint", "target_keep": 0.25,
                                  "epochs": 10, "suite": "mnist", "method": "logistic", "encoding": "rich",
                                  "fpr": 0.05, "seed": 0}


def build_default(out: str | Path, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Rebuild the bundled default guard with :data:`DEFAULT_RECIPE` (``nad-guard build-default``)."""
    from training.paths import fit_and_save

    r = DEFAULT_RECIPE
    t0 = time.time()
    paths_summary = fit_and_save(r["model"], r["data"], out, schedule=r["schedule"], target_keep=r["target_keep"],
                                 epochs=r["epochs"], device=device, seed=r["seed"], progress=progress)
    det = build_guard(out, r["model"], r["data"], suite=r["suite"], method=r["method"], encoding=r["encoding"],
                      fpr=r["fpr"], device=device, seed=r["seed"], progress=progress)
    return {"recipe": r, "paths": paths_summary, "detector": det, "seconds": round(time.time() - t0, 1)}
