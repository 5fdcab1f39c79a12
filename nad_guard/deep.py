"""A guard's deep mode: the deep check's detector (:mod:`nad_guard.probes`) beside the attack detector.

``nad-guard fit-detector --probes K`` fits, besides the attack detector, a *deep* attack detector: the same
method and encoding, trained on the same images and labels, on the encoding's rows followed by the probe
columns of a :class:`~nad_guard.probes.ProbeSpec` with ``k = K`` (:func:`deep_rows`), and calibrated on the
same clean calibration images at the same false-positive rate as the attack detector. It is stored beside
the others as ``deep_detector.skops`` (skops, the same allow-list as every detector) with ``meta["deep"]``:
``{file, probes: spec.to_dict(), method, encoding, threshold, fpr, n_features, calibration, columns}``
(``columns``: the probe columns' names, :func:`~nad_guard.probes.probe_column_names`).

``Guard.run(x, deep=True)`` then runs ONE batched pass per step of the inputs and their ``k`` probes
(``(k + 1)`` rows an input; :func:`deep_step` inputs a step so that a pass holds about as many rows as a
single-pass step), reads the inputs' own path features from that pass, and lets the deep detector's score
take the attack detector's place in the decision (with an error detector, combined as always:
:func:`nad_guard.errors.combined_trust`). Single-pass mode stays the default; guards without ``deep`` load
and answer as before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nad_guard.detectors import PathDetector, load_detector, save_detector
from nad_guard.encoding import encode
from nad_guard.paths import PathFeatures, PathModel
from nad_guard.probes import ProbeSpec, probe_column_names, probe_features

DEEP_DETECTOR_FILE = "deep_detector.skops"


def deep_step(batch_size: int, k: int, pad_multiple: int = 8) -> int:
    """Inputs per deep pass: about ``batch_size`` rows in all (``(k + 1)`` per input), rounded down to a
    multiple of ``pad_multiple`` (at least one multiple), so that every pass of a padded batch holds a
    multiple of ``pad_multiple`` inputs (and rows)."""
    m = max(1, pad_multiple)
    per = max(1, batch_size // (k + 1))
    return max(m, per - per % m)


def deep_rows(paths: PathModel, x: torch.Tensor, encoding: str, spec: ProbeSpec, step: int = 32
              ) -> tuple[PathFeatures, np.ndarray, np.ndarray]:
    """``(features, encoding rows, deep rows)`` of ``x`` from one pass of the inputs and their probes per
    ``step`` inputs (:func:`~nad_guard.probes.probe_features`): the deep rows are the encoding's rows
    followed by the probe columns."""
    res = probe_features(paths, x, spec, batch_size=step)
    X = encode(res.features, encoding, res.pooled)
    return res.features, X, np.hstack([X, res.columns])


def fit_deep_detector(paths: PathModel, blocks: Sequence[torch.Tensor], labels: Sequence[np.ndarray],
                      calibration: torch.Tensor, *, method: str, encoding: str, spec: ProbeSpec, fpr: float,
                      seed: int = 0, rows: int = 256, progress: bool = True) -> tuple[PathDetector, dict[str, Any]]:
    """The deep detector: ``method`` fitted on the deep rows (:func:`deep_rows`) of the images ``blocks``
    (the attack detector's training images, block by block, with their ``labels``) and calibrated on the
    clean ``calibration`` images at ``fpr``. Returns it and its record for ``meta["deep"]``."""
    if spec.k < 1:
        raise ValueError(f"a deep detector needs k >= 1 probes, got {spec.k}")
    t0 = time.time()
    step = deep_step(rows, spec.k, 1)
    X = []
    for i, b in enumerate(blocks):
        if progress:
            print(f"deep check: block {i + 1}/{len(blocks)}, {len(b)} images x {spec.k + 1} rows", flush=True)
        X.append(deep_rows(paths, b, encoding, spec, step)[2])
    det = PathDetector(method, random_state=seed).fit(np.vstack(X), np.concatenate(labels))
    det.infer_threshold(deep_rows(paths, calibration, encoding, spec, step)[2], fpr=fpr)
    info = {"fit_rows": int(sum(len(b) for b in blocks)), "calibration_clean": len(calibration),
            "seconds": round(time.time() - t0, 1)}
    return det, info


def deep_record(det: PathDetector, spec: ProbeSpec, encoding: str, layers: Sequence[str],
                info: dict[str, Any] | None = None) -> dict[str, Any]:
    """``meta["deep"]`` of a guard with the deep detector ``det``."""
    return {"file": DEEP_DETECTOR_FILE, "probes": spec.to_dict(), "method": det.method, "encoding": encoding,
            "threshold": det.threshold_, "fpr": det.fpr_, "n_features": int(det.n_features_in_),
            "calibration": det.calibration().to_dict(), "columns": probe_column_names(layers, spec), **(info or {})}


def save_deep(det: PathDetector, path: str | Path) -> None:
    save_detector(det, Path(path) / DEEP_DETECTOR_FILE)


def load_deep(path: str | Path, record: dict[str, Any] | None) -> tuple[PathDetector | None, ProbeSpec | None]:
    """The deep detector and its probes from a guard directory's ``meta["deep"]`` record (``(None, None)``
    without one); ``ValueError`` / ``FileNotFoundError`` when the record or the file is not usable."""
    if not record:
        return None, None
    if not isinstance(record, dict) or not isinstance(record.get("probes"), dict):
        raise ValueError("meta.json's 'deep' record has no probe spec")
    spec = ProbeSpec.from_dict(record["probes"])
    if spec.k < 1:
        raise ValueError(f"meta.json's 'deep' record has k = {spec.k} probes")
    det = load_detector(Path(path) / record.get("file", DEEP_DETECTOR_FILE))
    if type(det) is not PathDetector or not hasattr(det, "threshold_"):
        raise ValueError(f"{record.get('file', DEEP_DETECTOR_FILE)} holds no calibrated PathDetector")
    return det, spec
