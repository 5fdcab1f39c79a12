"""Which images a guard's detector was fitted and calibrated on: recorded when it is fitted, checked by
content hash and position when it is audited or evaluated. No recomputed float is ever used as an
identity (scores differ in their last bits from one CPU to another).

The record (``meta.json["detector"]["provenance"]``, written by ``nad-guard fit-detector`` and
``build-default``, :func:`training.detector.build_guard`, the evaluation harness)::

    {"format": 1,
     "data": "cifar10", "split": "test", "split_name": "cifar10/test",
     "split_images": 10000, "split_sha256": "<sha256 of the split's labels and decoded pixels>",
     "sample": {"max_images": 3000, "seed": 0, "rule": "nad_guard.holdout.sample_heldout"} or null,
     "seed": 0, "fractions": {"detector-fit": 0.4, "calibration": 0.2, "evaluation": 0.4},
     "rule": "nad_guard.holdout.holdout_indices",
     "parts": {"detector-fit": {"images": 1200, "sha256": "...", "positions": [...]}, ...},
     "calibration_clean": {"images": 535, "positions": [...]}}

``positions`` are positions in the whole split, sorted; a part's ``sha256`` covers its images' labels
and pixels in that order (:func:`content_sha256`). ``calibration_clean`` are the calibration images the
classifier labelled correctly, the ones whose detector scores set the threshold. The rule and seed say
how the parts were drawn (records written before the code moved name the same rules under
``training.detector``); the positions are what the checks use, so a change in a random number
generator cannot move an image into another part unnoticed.

:func:`locate` assigns each image of an audited split its part, with a status:

``verified``
    the split's content hash is the recorded one, and every part's positions give its recorded hash;
``independent``
    another split (other content, other name): the detector saw none of its images;
``mismatch``
    same name as the recorded split but other content (another version or order of the data), or a
    record whose positions do not give its hashes: nothing can be told;
``unrecorded``
    the guard has no record (fitted before records were written, or by hand): nothing can be told;
    refit it with ``nad-guard fit-detector``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import numpy as np

from nad_guard.data import ImageSet

FORMAT = 1
PARTS = ("detector-fit", "calibration", "evaluation")
PART_UNKNOWN, PART_INDEPENDENT = "unknown", "not-used-by-detector"
REFIT = "refit the detector with `nad-guard fit-detector` (it records which images it used)"


def content_sha256(data: ImageSet, positions: np.ndarray | None = None) -> str:
    """SHA-256 of the labels and ``uint8`` pixels (with their shape) of ``data`` (or of its images at
    ``positions``, in that order)."""
    images, labels = data.images, data.labels
    if positions is not None:
        idx = np.asarray(positions, dtype=np.int64)
        images, labels = images[idx], labels[idx]
    h = hashlib.sha256()
    h.update(repr(tuple(images.shape)).encode())
    h.update(labels.numpy().astype("<i8").tobytes())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _positions(p: Any) -> list[int]:
    return [int(i) for i in np.sort(np.asarray(p, dtype=np.int64))]


def make_record(split: ImageSet, *, data: str, split_kind: str, parts: Mapping[str, np.ndarray], seed: int,
                fractions: Mapping[str, float], rule: str, sample: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance record of a detector whose parts are ``parts`` (name -> positions in ``split``)."""
    if set(parts) != set(PARTS):
        raise ValueError(f"parts must be {PARTS}, got {sorted(parts)}")
    return {
        "format": FORMAT, "data": data, "split": split_kind, "split_name": split.name, "split_images": len(split),
        "split_sha256": content_sha256(split), "sample": dict(sample) if sample else None, "seed": int(seed),
        "fractions": {k: float(fractions[k]) for k in PARTS}, "rule": rule,
        "parts": {k: {"images": int(len(parts[k])), "sha256": content_sha256(split, parts[k]),
                      "positions": _positions(parts[k])} for k in PARTS},
    }


def with_calibration_clean(record: dict[str, Any], positions: np.ndarray) -> dict[str, Any]:
    """``record`` plus the calibration images whose scores set the threshold (positions in the split)."""
    cal = set(record["parts"]["calibration"]["positions"])
    pos = _positions(positions)
    if not set(pos) <= cal:
        raise ValueError("the calibration images must lie in the calibration part")
    return {**record, "calibration_clean": {"images": len(pos), "positions": pos}}


def summary(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The record without its position lists (for reports and command output)."""
    if not isinstance(record, Mapping):
        return None
    out = {k: v for k, v in record.items() if k not in ("parts", "calibration_clean")}
    out["parts"] = {k: {"images": v.get("images"), "sha256": v.get("sha256")}
                    for k, v in (record.get("parts") or {}).items()}
    if "calibration_clean" in record:
        out["calibration_clean_images"] = record["calibration_clean"].get("images")
    return out


def exhausted_split(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"whole_split": N, "calibration_share": s}`` when ``record``'s parts were drawn from the whole split
    of ``N`` images (no ``--max-images`` sample), the keywords that make
    :func:`nad_guard.calibration.fpr_guarantee`'s warning say that no larger sample exists; else ``{}``."""
    if not isinstance(record, Mapping) or record.get("sample") or not record.get("split_images"):
        return {}
    return {"whole_split": int(record["split_images"]),
            "calibration_share": (record.get("fractions") or {}).get("calibration")}


def locate(record: Mapping[str, Any] | None, data: ImageSet) -> tuple[np.ndarray, dict[str, Any]]:
    """Each image's part of the detector's holdout split, from ``record`` (see the module docstring).

    Returns ``(parts, info)``: ``parts`` ``(len(data),)`` object array of :data:`PARTS`,
    :data:`PART_INDEPENDENT` (not used by the detector) or :data:`PART_UNKNOWN`; ``info`` with
    ``status``, ``note`` (a sentence a person reads) and what was compared.
    """
    n = len(data)
    unknown = np.full(n, PART_UNKNOWN, dtype=object)
    info: dict[str, Any] = {"audited_split": data.name, "provenance": summary(record)}
    if (not isinstance(record, Mapping) or record.get("format") != FORMAT
            or not isinstance(record.get("parts"), Mapping)):
        info.update(status="unrecorded", note=(
            "the guard's meta.json does not record which images its detector was fitted and calibrated on (no "
            "provenance record: the guard was fitted by an older nad-guard, or by hand), so the split cannot be "
            f"verified and no image can be called unseen by the detector; {REFIT}"))
        return unknown, info
    name = record.get("split_name")
    digest = content_sha256(data)
    info.update(detector_split=name, detector_split_sha256=record.get("split_sha256"), audited_split_sha256=digest)
    if digest != record.get("split_sha256") or n != record.get("split_images"):
        if data.name == name:
            info.update(status="mismatch", note=(
                f"the audited split is named like the detector's ({name}) but its content differs (sha256 "
                f"{digest[:12]} with {n} images, recorded {str(record.get('split_sha256'))[:12]} with "
                f"{record.get('split_images')}): another version or order of the data set, so which images the "
                "detector saw cannot be told"))
            return unknown, info
        info.update(status="independent", note=(
            f"the detector was fitted and calibrated on parts of {name}; the audited split {data.name} is another "
            "one (other content), so the detector saw none of its images"))
        return np.full(n, PART_INDEPENDENT, dtype=object), info
    parts = np.full(n, PART_INDEPENDENT, dtype=object)
    for part in PARTS:
        rec = record["parts"].get(part) or {}
        try:
            pos = np.asarray(rec.get("positions"), dtype=np.int64)
            ok = (pos.ndim == 1 and len(pos) == rec.get("images")
                  and (len(pos) == 0 or (pos.min() >= 0 and pos.max() < n))
                  and (parts[pos] == PART_INDEPENDENT).all() and content_sha256(data, pos) == rec.get("sha256"))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            info.update(status="mismatch", note=(
                f"the audited split is the detector's ({name}, same content hash), but the recorded positions of its "
                f"{part} part do not give the recorded part hash: the provenance record is damaged, so which images "
                f"the detector saw cannot be told; {REFIT}"))
            return unknown, info
        parts[pos] = part
    sample = record.get("sample")
    sampled = (f", a seeded sample of {sample.get('max_images')} images (seed {sample.get('seed')}; the other "
               f"{int((parts == PART_INDEPENDENT).sum())} were never used by the detector)") if sample else ""
    info.update(status="verified", detector_data=name, seed=record.get("seed"), note=(
        f"the audited split is the one the detector was fitted on ({name}, content sha256 {digest[:12]}{sampled}); "
        "each image's part comes from the positions recorded in the guard's meta.json when the detector was "
        f"fitted (parts of {', '.join(str(record['parts'][p]['images']) for p in PARTS)} images, "
        f"{record.get('rule')}, seed {record.get('seed')}), and each part's content hash matches"))
    return parts, info


def compare(record: Mapping[str, Any], guard_record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Whether a run's holdout parts (``record``, e.g. ``nad-guard evaluate``'s) are the ones a guard's
    detector was fitted and calibrated on (``guard_record``), by content hashes: ``status`` ``same``,
    ``different`` or ``unrecorded``, and a ``note``."""
    if not isinstance(guard_record, Mapping) or guard_record.get("format") != FORMAT:
        return {"status": "unrecorded", "note": "the artifact's guard records no provenance: whether these parts are "
                f"the ones its detector used cannot be told ({REFIT})"}
    same_split = record.get("split_sha256") == guard_record.get("split_sha256")
    differing = [p for p in PARTS if (record["parts"].get(p) or {}).get("sha256")
                 != ((guard_record.get("parts") or {}).get(p) or {}).get("sha256")]
    if same_split and not differing:
        return {"status": "same", "note": "the fit, calibration and evaluation parts are the ones the artifact's guard "
                "detector was fitted and calibrated on (equal content hashes): the evaluation part is unseen by it"}
    what = "another split" if not same_split else f"other {', '.join(differing)} part(s) of the same split"
    return {"status": "different", "note": f"these parts are not the guard detector's ({what}); its figures are "
            "those of a detector fitted here, not of the guard's"}
