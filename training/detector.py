"""``nad-guard fit-detector`` and ``build-default``: load a path artifact, fit and calibrate its detector
(:func:`nad_guard.fitting.fit_guard`) on the held-out parts (:mod:`nad_guard.holdout`), save the guard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from nad_guard.attacks import default_cache_dir
from nad_guard.data import load_dataset
from nad_guard.fitting import fit_guard
from nad_guard.guard import artifact_classifier, read_guard_meta
from nad_guard.holdout import holdout_provenance
from nad_guard.paths import PathModel
from nad_guard.provenance import summary as provenance_summary
from training.paths import fit_and_save


def build_guard(artifact: str | Path, model: str | None, data: str, *, weights: str | None = None,
                mean: Sequence[float] | str | None = None, std: Sequence[float] | str | None = None,
                data_root: str | None = None, suite: str = "mnist", attacks: Sequence[str] | None = None,
                method: str = "logistic", encoding: str = "rich", select: str = "fixed", mispredictions: bool = True,
                fpr: float = 0.05, max_images: int | None = None, device: str = "auto", seed: int = 0,
                progress: bool = True, error_detector: bool = True, attack_share: float = 0.5,
                probes: int = 0) -> dict[str, Any]:
    """``nad-guard fit-detector``: load the path artifact, fit and calibrate a detector, save the guard.
    ``model=None``: the classifier the artifact records (:func:`nad_guard.guard.artifact_classifier`).
    ``max_images``: use a seeded stratified sample of the test split (:func:`nad_guard.holdout.sample_heldout`;
    the output's ``heldout_images`` says how many were asked for, held and used)."""
    train, test = load_dataset(data, data_root)
    clf = artifact_classifier(artifact, model, weights, mean=mean, std=std, class_names=train.classes,
                              input_size=train.shape[1], channels=train.shape[0])
    paths = PathModel.load(artifact, clf)
    (fit, calibration, _), record = holdout_provenance(test, data, max_images, seed)
    guard = fit_guard(paths, fit, calibration, suite=suite, attacks=attacks,
                      method=method, encoding=encoding, select=select, mispredictions=mispredictions, fpr=fpr,
                      device=device, seed=seed, cache_dir=default_cache_dir(), progress=progress, provenance=record,
                      error_detector=error_detector, attack_share=attack_share, probes=probes)
    guard.save(artifact)
    info = dict(guard.meta["detector_info"])
    info["provenance"] = provenance_summary(info.get("provenance"))
    err = guard.meta.get("error_detector_info")
    deep = {k: v for k, v in read_guard_meta(artifact).get("deep", {}).items() if k != "columns"}
    used = sum(int(p["images"]) for p in record["parts"].values())
    return {"artifact": str(artifact), "method": guard.detector.method, "encoding": guard.encoding,
            "threshold": guard.detector.threshold_,
            "heldout_images": {"max_images": max_images, "split_images": len(test), "used": used}, **info,
            **({"error_detector": err, "decision": {"fpr": guard.fpr, "attack_share": guard.attack_share}}
               if err else {}), **({"deep": deep} if deep else {})}


DEFAULT_RECIPE: dict[str, Any] = {"model": "mnist-cnn", "data": "mnist5k", "schedule": "joint", "target_keep": 0.25,
                                  "epochs": 10, "suite": "mnist", "method": "logistic", "encoding": "rich",
                                  "fpr": 0.05, "seed": 0, "error_detector": False}
# error_detector False: the bundled guard was built before there were two detectors, and the recipe rebuilds it


def build_default(out: str | Path, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Rebuild the bundled default guard with :data:`DEFAULT_RECIPE` (``nad-guard build-default``)."""
    r = DEFAULT_RECIPE
    t0 = time.time()
    paths_summary = fit_and_save(r["model"], r["data"], out, schedule=r["schedule"], target_keep=r["target_keep"],
                                 epochs=r["epochs"], device=device, seed=r["seed"], progress=progress)
    det = build_guard(out, r["model"], r["data"], suite=r["suite"], method=r["method"], encoding=r["encoding"],
                      fpr=r["fpr"], device=device, seed=r["seed"], progress=progress,
                      error_detector=r["error_detector"])
    return {"recipe": r, "paths": paths_summary, "detector": det, "seconds": round(time.time() - t0, 1)}
