"""Which part of the guard detector's holdout split (detector-fit, calibration, evaluation) each audited
image is in, from the provenance the guard's meta.json records; :func:`unseen` marks the images the
detector never saw, the basis of the report's honest separation figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from nad_guard.data import ImageSet
from nad_guard.guard import Guard
from nad_guard.provenance import PART_INDEPENDENT, locate


def unseen(parts: np.ndarray) -> np.ndarray:
    """Images the detector was neither fitted nor calibrated on: its evaluation part, and (when it was
    fitted on a sample of the audited split) the images outside that sample."""
    return np.isin(parts, ("evaluation", PART_INDEPENDENT))


def holdout_parts(guard: Guard, data: ImageSet) -> tuple[np.ndarray, dict[str, Any]]:
    """Which part of the guard detector's holdout split each image of ``data`` (a whole split) is in,
    read from the provenance recorded in the guard's meta.json and checked by content hash
    (:func:`nad_guard.provenance.locate`: status ``verified``, ``independent``, ``mismatch`` or
    ``unrecorded``). Returns ``(parts, info)``; ``parts`` ``(len(data),)`` holds :data:`nad_guard.provenance.PARTS`,
    :data:`PART_INDEPENDENT` (never used by the detector) or :data:`PART_UNKNOWN`."""
    det = guard.meta.get("detector") or {}
    parts, info = locate(det.get("provenance"), data)
    info.update(detector_fit_set=det.get("fit_set"), detector_calibration_set=det.get("calibration_set"),
                detector_fit_mispredicted=det.get("fit_mispredicted_trained_as_suspicious",
                                                  det.get("fit_mispredicted")))  # the key before 2026-12
    return parts, info
