"""Issue 21, item 1 on CIFAR-10: the error detector (nad_guard.errors) against MSP, DOCTOR and energy on the
natural mispredictions of the committed CIFAR-10 guard's ResNet-20, on the same 3,000-image sample and
40/20/40 parts as `fit-detector --max-images 3000` (seed 0). The method is chosen by 3-fold CV on the fit
part only; AUROC and AURC are measured on the evaluation part. No attacks: the attack detector is not
involved here (see README.md)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from nad_guard import Guard, load_dataset
from nad_guard.encoding import detector_input
from nad_guard.errors import ERROR_METHODS, ErrorDetector, error_rows, fit_error_detector
from nad_guard.holdout import holdout_provenance
from nad_guard.metrics import auroc, aurc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guard", default="bench/results/guard_cifar10-resnet20")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--encoding", default="rich")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    guard = Guard.load(a.guard)
    _, test = load_dataset("cifar10", a.data_root)
    (fit, cal, ev), _ = holdout_provenance(test, "cifar10", a.images, 0)
    parts = {}
    for name, part in (("fit", fit), ("calibration", cal), ("evaluation", ev)):
        f, X = detector_input(guard.paths, part.float(), a.encoding, 128)
        wrong = (f.pred != part.labels).numpy()
        parts[name] = (error_rows(f.logits, X), wrong)
    Xf, yf = parts["fit"]
    Xc, wc = parts["calibration"]
    det, info = fit_error_detector(Xf, yf, Xc[~wc], 0.025, folds=3, seed=0)
    Xe, ye = parts["evaluation"]
    rows = {}
    for m in ERROR_METHODS:  # every candidate, refitted on the whole fit part, scored on the evaluation part
        s = ErrorDetector(m).fit(Xf, yf).score_samples(Xe)
        rows[m] = {"auroc": auroc(ye, s), "aurc": aurc(s, ye), "cv_auroc_fit_part": info["selection"]["cv_auroc"][m]}
    s = det.score_samples(Xe)
    p = det.trust_of_scores(s)
    out = {"selected": info["method"], "evaluation": {"images": int(len(ye)), "mispredicted": int(ye.sum())},
           "fit": {"images": int(len(yf)), "mispredicted": int(yf.sum())},
           "calibration_correct": int((~wc).sum()), "rows": rows,
           "error_detector": {"auroc": auroc(ye, s), "aurc": aurc(s, ye),
                              "correct_flagged_at_0.025": float((p[~ye] <= 0.025).mean()),
                              "mispredictions_flagged_at_0.025": float((p[ye] <= 0.025).mean())},
           "oracle_aurc": aurc(ye.astype(float), ye), "random_aurc": float(ye.mean()),
           "seconds": round(time.time() - t0, 1)}
    best_softmax = max(("msp", "doctor", "energy"), key=lambda k: rows[k]["auroc"])
    out["best_softmax"] = best_softmax
    out["gain_over_best_softmax"] = out["error_detector"]["auroc"] - rows[best_softmax]["auroc"]
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
