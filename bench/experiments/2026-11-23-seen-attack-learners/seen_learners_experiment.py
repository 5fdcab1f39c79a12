"""Development experiment (detector-fit part only): do other supervised learners beat the --select cv
candidates on the weakest seen attacks (CW-L2, PGD-L2, FGSM)? Same grouped 3-fold CV by source image.

    .venv/bin/python bench/experiments/2026-11-23-seen-attack-learners/seen_learners_experiment.py cw-l2,pgd-l2,fgsm

(``--artifact``, ``--model``, ``--data``, ``--images``: see ``--help``; the defaults are the recorded run's.)
"""
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from nad_guard.evaluate import FIT_CLEAN, FeatureKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/experiments, for common.py
from common import evaluation_data, experiment_parser  # noqa: E402

parser = experiment_parser(__doc__)
parser.add_argument("attacks", nargs="?", default="cw-l2,pgd-l2,fgsm",
                    help="Comma-separated seen attacks to score (default: %(default)s).")
args = parser.parse_args()
d = evaluation_data(("rich", "full"), args.artifact, args.model, args.data, args.images)


def cands():
    yield "logistic", lambda: Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=1.0, max_iter=3000))])
    yield "logistic C0.1", lambda: Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=0.1, max_iter=3000))])
    yield "gboost", lambda: HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31, l2_regularization=1.0, early_stopping=True, n_iter_no_change=20, random_state=0)
    yield "mlp", lambda: Pipeline([("s", StandardScaler()), ("c", MLPClassifier((256, 64), alpha=1e-2, max_iter=300, early_stopping=True, random_state=0))])
    yield "svc-rbf", lambda: Pipeline([("s", StandardScaler()), ("c", SVC(C=1.0, gamma="scale"))])
for attack in args.attacks.split(","):
    for enc in ("rich", "full"):
        Xc, Xa = d.features[FIT_CLEAN].path[enc], d.features[FeatureKey.attack("fit", attack)].path[enc]
        X = np.vstack([Xc, Xa]); y = np.r_[np.zeros(len(Xc)), np.ones(len(Xa))]
        g = np.r_[d.groups[FIT_CLEAN], d.groups[FeatureKey.attack("fit", attack)]]
        for name, make in cands():
            t = time.time(); aucs = []
            for tr, te in StratifiedGroupKFold(3, shuffle=True, random_state=0).split(X, y, g):
                m = make().fit(X[tr], y[tr])
                s = m.decision_function(X[te]) if hasattr(m, "decision_function") else m.predict_proba(X[te])[:, 1]
                aucs.append(roc_auc_score(y[te], s))
            print(f"{attack:8s} {enc:5s} {name:14s} {np.mean(aucs):.3f}  ({time.time()-t:.0f} s)", flush=True)
