"""Give a guard fitted before provenance records existed its record, without refitting its detector.

    python bench/backfill_provenance.py nad_guard/default_guard --data mnist5k
    python bench/backfill_provenance.py bench/results/guard_cifar10-resnet20 --data cifar10 --max-images 3000

Rebuilds the holdout parts the guard was fitted with by the rule ``fit-detector`` uses
(:func:`nad_guard.holdout.holdout_provenance`: the seeded sample, then the seeded stratified
40/20/40 parts), and **confirms once, on the machine that runs this**, that they are the very parts
the detector used: the scores of the calibration part's correctly classified images must pair off,
one to one, with every calibration score stored in the detector (within ``rtol`` 1e-5, a float32
tolerance: recomputed floats, good enough for a one-off check on the machine where the record is
made, never used as an identity afterwards; the CIFAR-10 guard's differ by up to 2.2e-6 relative
here, so 4 of its 535 missed the audit's former 1e-6), and
the fit part's clean and mispredicted counts must be the recorded ones. Only then is the record
written into meta.json (:mod:`nad_guard.provenance`), with the calibration's size and
false-positive bounds (:mod:`nad_guard.calibration`). A stored threshold that the current
calibration rule does not give on the stored calibration scores (an older rule) is replaced by the
rule's (the detector's learned score is unchanged) and the old value kept in
``meta["detector"]["threshold_before_rule_change"]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nad_guard.calibration import threshold_at_fpr  # noqa: E402
from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.detectors import save_detector  # noqa: E402
from nad_guard.encoding import detector_input  # noqa: E402
from nad_guard.guard import DETECTOR_FILE, Guard  # noqa: E402
from nad_guard.paths import META_FILE  # noqa: E402
from nad_guard.provenance import with_calibration_clean  # noqa: E402
from nad_guard.holdout import correct_mask, holdout_provenance  # noqa: E402


def paired(a: np.ndarray, b: np.ndarray, rtol: float = 1e-5, atol: float = 1e-9) -> int:
    """How many of sorted ``a`` pair off with a distinct, equal (within tolerance) value of sorted ``b``."""
    i = j = n = 0
    while i < len(a) and j < len(b):
        if abs(a[i] - b[j]) <= atol + rtol * abs(b[j]):
            n, i, j = n + 1, i + 1, j + 1
        elif a[i] < b[j]:
            i += 1
        else:
            j += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("guard", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="check and print, write nothing")
    a = ap.parse_args()
    torch.set_num_threads(1)
    guard = Guard.load(a.guard)
    det_meta = guard.meta["detector"]
    _, test = load_dataset(a.data)
    (fit, cal, _), record = holdout_provenance(test, a.data, a.max_images, a.seed)
    if det_meta.get("fit_set") != fit.name:
        sys.exit(f"the guard was fitted on {det_meta.get('fit_set')!r}, these arguments rebuild {fit.name!r}")
    fit_ok, cal_ok = correct_mask(guard.paths, fit), correct_mask(guard.paths, cal)
    # the calibration scores as fit_guard computed them: the correct images, detector_input in batches of 128
    scores = guard.detector.score_samples(detector_input(guard.paths, cal.float()[cal_ok], guard.encoding, 128)[1])
    stored = np.sort(guard.detector.calibration_scores_)
    matched = paired(np.sort(scores), stored)
    counts = {"fit_clean": int(fit_ok.sum()), "fit_mispredicted": int((~fit_ok).sum()),
              "calibration_clean": int(cal_ok.sum())}
    rel = (np.abs(np.sort(scores) - stored) / np.abs(stored)).max() if len(scores) == len(stored) else None
    print(json.dumps({"parts": {k: v["images"] for k, v in record["parts"].items()}, **counts,
                      "stored_calibration_scores": len(stored), "paired_within_rtol_1e-5": matched,
                      "max_relative_difference_sorted": rel}))
    recorded = {k: det_meta.get(k) for k in counts}
    if matched != len(stored) or len(scores) != len(stored) or (
            det_meta.get("mispredictions", True) and recorded != counts):
        sys.exit(f"not confirmed: {matched} of {len(stored)} stored calibration scores paired, counts {counts} vs "
                 f"recorded {recorded}; not writing a record")
    cal_positions = np.asarray(record["parts"]["calibration"]["positions"])
    record = with_calibration_clean(record, cal_positions[cal_ok.numpy()])
    meta = json.loads((a.guard / META_FILE).read_text())
    meta["detector"]["provenance"] = record
    det = guard.detector
    rule = threshold_at_fpr(det.calibration_scores_, det.fpr_)
    if det.threshold_ != rule:
        print(f"threshold {det.threshold_!r} -> {rule!r} (the current calibration rule on the stored scores)")
        meta["detector"]["threshold_before_rule_change"] = det.threshold_
        det.threshold_ = rule
        meta["detector"]["threshold"] = rule
        if not a.dry_run:
            save_detector(det, a.guard / det_meta.get("file", DETECTOR_FILE))
    meta["detector"]["calibration"] = det.calibration().to_dict()
    print(det.calibration().summary())
    if not a.dry_run:
        (a.guard / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote the provenance record into {a.guard / META_FILE}")


if __name__ == "__main__":
    main()
