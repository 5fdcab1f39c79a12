"""Step 2 of the deep-check design experiment: choose the probe design by cross-validation on the FIT part
only (the shifts designs.py wrote), before the evaluation part is looked at.

    python bench/experiments/2026-12-02-deep-check-cifar10/choose_design.py runs/deep_designs \
        bench/experiments/2026-12-02-deep-check-cifar10/selection.json

Per candidate (design, k, per_transform or per_layer=False ("layer-mean")), nad-guard's primary detector (logistic on the ``rich`` encoding)
with the probe columns appended, 3-fold CV on the fit part:
  seen        per attack, clean + that attack, folds by source image; mean and min over attacks;
  unseen      clean + all nine attacks, folds hold out whole attacks (cv_groups by="attack"); per attack;
  clean-only  kNN (the committed clean-only detector, ``summary`` encoding + probes) fitted on clean folds,
              held-out clean images against the adversarials of the same held-out images; mean over attacks.
Rule (fixed before running): score = mean of the three means; the best design, then the smallest k whose
score is within 0.003 of that design's best k (each probe costs about one forward pass), at most k = 8:
the committed evaluation computes the probes of about 21,000 images on the shared 2-core machine, and k = 16
would not finish in the time this run had (its CV figures are reported all the same)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from nad_guard.detectors import PathDetector, cross_val_auroc, cross_val_auroc_per_block, cv_groups
from nad_guard.probes import ProbeSpec, shift_columns_torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from designs import ATTACKS, DESIGNS  # noqa: E402

K_MAX = 8
N_SUMMARY = 7 * 10 + 5  # the summary encoding's columns for the ResNet-20's 10 gate points (rich starts with them)


def probe_cols(shifts: dict[str, np.ndarray], spec: ProbeSpec) -> np.ndarray:
    import torch

    return shift_columns_torch({q: torch.from_numpy(v[:, :spec.k]) for q, v in shifts.items()}, spec).double().numpy()


def scores(rich: np.ndarray, extra: np.ndarray, sets: np.ndarray, groups: np.ndarray) -> dict[str, object]:
    X = np.hstack([rich, extra])
    clean = sets == "clean"
    seen = {}
    for a in ATTACKS:
        m = clean | (sets == a)
        seen[a] = cross_val_auroc("logistic", X[m], (sets[m] == a).astype(int), groups[m], 3, 0)
    m = clean | np.isin(sets, ATTACKS)
    g, _ = cv_groups(int(clean.sum()), [groups[sets == a] for a in ATTACKS], 3)
    order = np.r_[np.flatnonzero(clean), *[np.flatnonzero(sets == a) for a in ATTACKS]]
    Xo, so = X[order], sets[order]
    unseen = cross_val_auroc_per_block("logistic", Xo, (so != "clean").astype(int), g,
                                       {a: np.flatnonzero(so == a) for a in ATTACKS}, 3, 0)
    Xs = np.hstack([rich[:, :N_SUMMARY], extra])
    src = groups[clean]
    co = {a: [] for a in ATTACKS}
    for tr, te in KFold(3, shuffle=True, random_state=0).split(src):
        det = PathDetector("knn").fit(Xs[clean][tr])
        sc = det.score_samples(Xs[clean][te])
        for a in ATTACKS:
            r = (sets == a) & np.isin(groups, src[te])
            sa = det.score_samples(Xs[r])
            co[a].append(roc_auc_score(np.r_[np.zeros(len(sc)), np.ones(len(sa))], np.r_[sc, sa]))
    clean_only = {a: float(np.mean(v)) for a, v in co.items()}
    out = {"seen_mean": float(np.mean(list(seen.values()))), "seen_min": float(min(seen.values())),
           "unseen_mean": float(np.mean(list(unseen.values()))), "unseen_min": float(min(unseen.values())),
           "clean_only_mean": float(np.mean(list(clean_only.values()))),
           "seen": seen, "unseen": unseen, "clean_only": clean_only}
    out["score"] = (out["seen_mean"] + out["unseen_mean"] + out["clean_only_mean"]) / 3
    return out


def main(folder: Path, out: Path) -> None:
    base = np.load(folder / "base.npz")
    keep = base["set"] != "wrong"
    rich, sets, groups = base["rich"][keep], base["set"][keep], base["group"][keep]
    done = json.loads(out.read_text())["candidates"] if out.exists() else {}  # a rerun adds new designs only
    res = {"single-pass": done.get("single-pass") or scores(rich, np.zeros((len(rich), 0)), sets, groups)}
    print("single-pass", round(res["single-pass"]["score"], 4), flush=True)
    for name, spec in DESIGNS.items():
        if not (folder / f"{name}.npz").exists():
            continue
        sh = {q: v[keep] for q, v in np.load(folder / f"{name}.npz").items()}
        for k in (4, 8, 16):
            for per, flat in ((False, False), (False, True)) + (((True, False),) if len(spec.transforms) > 1 else ()):
                s = ProbeSpec(**{**spec.to_dict(), "k": k, "per_transform": per, "per_layer": not flat,
                                 "transforms": spec.transforms})
                key = f"{name} k={k}" + (" per-transform" if per else "") + (" layer-mean" if flat else "")
                res[key] = done.get(key) or {**scores(rich, probe_cols(sh, s), sets, groups), "spec": s.to_dict()}
                print(key, {m: round(res[key][m], 4) for m in ("score", "seen_mean", "seen_min", "unseen_mean",
                                                              "unseen_min", "clean_only_mean")}, flush=True)
    cands = {k: v for k, v in res.items() if k != "single-pass"}
    best = max(cands, key=lambda k: cands[k]["score"])
    design = best.split(" k=")[0]
    variant = best.split(" k=")[1].partition(" ")[2]
    same = {k: v for k, v in cands.items() if k.split(" k=")[0] == design and k.split(" k=")[1].partition(" ")[2] == variant}
    top = max((v["score"] for v in same.values() if v["spec"]["k"] <= K_MAX))
    chosen = min((k for k, v in same.items() if v["spec"]["k"] <= K_MAX and v["score"] >= top - 0.003),
                 key=lambda k: same[k]["spec"]["k"])
    out.write_text(json.dumps({"rule": __doc__.split("Rule (fixed before running): ")[1].strip().replace("\n", " "), "best_by_cv": best,
                               "chosen": chosen, "images": {s: int((sets == s).sum()) for s in np.unique(sets)},
                               "candidates": res}, indent=1))
    print("best", best, "chosen", chosen)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
