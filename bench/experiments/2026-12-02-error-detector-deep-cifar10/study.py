"""Which error detector, on the dumped holdout parts (dump.py): softmax scores, their logs, the deep check's
global probe columns, the path summary; logistic regression (two strengths) and gradient boosting; 3-fold CV
on the fit part and the AUROC on the evaluation part. Writes a JSON of every figure."""
import json
import sys

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nad_guard.errors import softmax_columns
from nad_guard.runinfo import machine_info

f = np.load(sys.argv[1])
names = [str(n) for n in f["names"]]
GLOBAL = [i for i, n in enumerate(names) if n.count(":") == 1]  # probe[all]:kl/l1/msp_drop (mean, max), pred_share


def part(p: str) -> dict[str, np.ndarray]:
    z = f[p + "_logits"]
    sm = softmax_columns(z)  # 1 - max p, 1 - sum p^2, energy
    srt = np.sort(z, 1)
    logsm = np.hstack([np.log(np.clip(sm[:, :2], 1e-12, None)), sm[:, 2:], (srt[:, -1] - srt[:, -2])[:, None]])
    return dict(sm=sm, logsm=logsm, probes=f[p + "_probes"], pglob=f[p + "_probes"][:, GLOBAL],
                summary=f[p + "_summary"])


P = {p: part(p) for p in ("fit_clean", "fit_wrong", "ev_clean", "ev_wrong")}


def xy(a: str, b: str, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    X = np.vstack([np.hstack([P[a][c] for c in cols]), np.hstack([P[b][c] for c in cols])])
    return X, np.r_[np.zeros(len(P[a]["sm"])), np.ones(len(P[b]["sm"]))]


LEARNERS = {
    "logistic C=1": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=1, max_iter=2000)),
    "logistic C=0.05": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)),
    "hist-gboost": lambda: HistGradientBoostingClassifier(max_depth=3, learning_rate=0.05, max_iter=200,
                                                          l2_regularization=1.0, random_state=0),
}
folds = StratifiedKFold(3, shuffle=True, random_state=0)
out = {"machine": machine_info(), "n": {p: len(v["sm"]) for p, v in P.items()}, "single_scores": {}, "learned": []}
Xf, yf = xy("fit_clean", "fit_wrong", ["sm"])
Xe, ye = xy("ev_clean", "ev_wrong", ["sm"])
for i, s in enumerate(("msp", "doctor", "energy")):
    out["single_scores"][s] = {"fit_part": roc_auc_score(yf, Xf[:, i]), "evaluation": roc_auc_score(ye, Xe[:, i])}
for cols in (["sm"], ["logsm"], ["logsm", "pglob"], ["sm", "pglob"], ["logsm", "probes"], ["logsm", "summary"],
             ["logsm", "pglob", "summary"], ["pglob"]):
    Xf, yf = xy("fit_clean", "fit_wrong", cols)
    Xe, ye = xy("ev_clean", "ev_wrong", cols)
    for ln, mk in LEARNERS.items():
        cv = cross_val_predict(mk(), Xf, yf, cv=folds, method="predict_proba")[:, 1]
        ev = mk().fit(Xf, yf).predict_proba(Xe)[:, 1]
        out["learned"].append({"columns": "+".join(cols), "learner": ln, "cv_fit": roc_auc_score(yf, cv),
                               "evaluation": roc_auc_score(ye, ev)})
        print(f"{'+'.join(cols):22s} {ln:16s} cv {out['learned'][-1]['cv_fit']:.4f} ev {out['learned'][-1]['evaluation']:.4f}")
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(json.dumps(out["single_scores"], indent=1))
