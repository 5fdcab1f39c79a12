"""Development experiment (detector-fit part only): do spatial statistics of the gate-point
activations help on the weak seen attacks? The path features pool every channel over its positions
(a mean); this adds, per channel at every gate point, the spatial standard deviation and the
spatial maximum minus the mean (704 columns for the CIFAR-10 ResNet-20's ten gate points), computed
from the same cached attacked images.

    .venv/bin/python bench/experiments/2026-11-23-spatial-activation-features/spatial_features_experiment.py

(``--artifact``, ``--model``, ``--data``, ``--images``: see ``--help``; the defaults are the recorded run's.)

Candidates: logistic regression (C = 1 and 0.1, scaled) and gradient boosting, on ``rich``,
``rich`` + spatial, and spatial alone; 3-fold cross-validation grouped by source image on CW-L2,
PGD-L2 and FGSM (as ``../2026-11-23-seen-attack-learners/seen_learners_experiment.py``, whose best
candidates were 0.893, 0.889 and 0.955). A scratch version ran first; this script reproduces it."""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from nad_guard.attacks import default_cache_dir, generate
from nad_guard.evaluate import FIT_CLEAN, FeatureKey
from nad_guard.hooks import hooked

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/experiments, for common.py
from common import evaluation_data, experiment_parser  # noqa: E402

ATTACKS = ("cw-l2", "pgd-l2", "fgsm")
args = experiment_parser(__doc__).parse_args()
d = evaluation_data(("rich",), args.artifact, args.model, args.data, args.images)
clf, names = d.paths.classifier, d.paths.layer_names_


@torch.no_grad()
def spatial(x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Per channel at every gate point: the spatial std and max - mean, ``(N, 2 * sum C_l)``."""
    rows = []
    for i in range(0, len(x), batch):
        got: list = [None] * len(names)

        def record(j: int, out: torch.Tensor) -> None:
            o = out.flatten(2)
            got[j] = torch.cat([o.std(2), o.amax(2) - o.mean(2)], 1)

        with hooked(clf.net, names, record):
            clf(x[i:i + batch])
        rows.append(torch.cat(got, 1))
    return torch.cat(rows).double().numpy()


S = {FIT_CLEAN: spatial(d.clean["fit"].float())}
for attack in ATTACKS:
    r = generate(clf, d.clean["fit"], attack=attack, suite=d.suite, batch_size=d.cfg.batch_size, device="cpu",
                 cache_dir=default_cache_dir(), progress=False)
    if len(r) != len(d.features[FeatureKey.attack("fit", attack)].path["rich"]):
        raise RuntimeError(f"{attack}: the cached attack does not match the evaluation's rows")
    S[FeatureKey.attack("fit", attack)] = spatial(r.adv_images.float())
print(f"gate points {names}; spatial columns {S[FIT_CLEAN].shape[1]}", flush=True)


def features(key: FeatureKey, kind: str) -> np.ndarray:
    if kind == "spatial":
        return S[key]
    X = d.features[key].path["rich"]
    return np.hstack([X, S[key]]) if kind == "rich + spatial" else X


LEARNERS = (
    ("logistic", lambda: Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=1.0, max_iter=3000))])),
    ("logistic C0.1", lambda: Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=0.1, max_iter=3000))])),
    ("gboost", lambda: HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True,
                                                      n_iter_no_change=20, random_state=0)),
)
for attack in ATTACKS:
    for kind in ("rich", "rich + spatial", "spatial"):
        Xc, Xa = features(FIT_CLEAN, kind), features(FeatureKey.attack("fit", attack), kind)
        X, y = np.vstack([Xc, Xa]), np.r_[np.zeros(len(Xc)), np.ones(len(Xa))]
        groups = np.r_[d.groups[FIT_CLEAN], d.groups[FeatureKey.attack("fit", attack)]]
        for name, make in LEARNERS:
            aucs = []
            for tr, te in StratifiedGroupKFold(3, shuffle=True, random_state=0).split(X, y, groups):
                model = make().fit(X[tr], y[tr])
                scores = (model.decision_function(X[te]) if hasattr(model, "decision_function")
                          else model.predict_proba(X[te])[:, 1])
                aucs.append(roc_auc_score(y[te], scores))
            print(f"{attack:8s} {kind:15s} {name:14s} {np.mean(aucs):.3f}", flush=True)
