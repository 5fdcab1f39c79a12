"""Development experiment (detector-fit part only): do the classifier's whole logit vector, as extra
columns next to the path features, help on the weak attacks? The ``rich`` encoding already holds
the top-1 softmax, the top-2 softmax and logit margins and the energy; this adds, per input, the
sorted logits minus the largest (9 columns on CIFAR-10) or the sorted log-probabilities (10).

    .venv/bin/python bench/experiments/2026-11-23-logit-vector-features/logit_features_experiment.py

(``--artifact``, ``--model``, ``--data``, ``--images``: see ``--help``; the defaults are the recorded run's.)

Logistic regression (the --select cv candidate; scaled, C = 1) on ``rich`` with and without them:

* seen attacks CW-L2, PGD-L2, FGSM, APGD-DLR: 3-fold cross-validation grouped by source image, as
  ``../2026-11-23-seen-attack-learners/seen_learners_experiment.py``;
* leave one attack out: trained on the even-index images' clean rows and the other eight attacks,
  scored on the odd-index images' clean rows against the left-out attack.

The rule fixed before the run: add the columns to an encoding only if they raise a weak attack's
AUROC, or the leave-one-out mean or minimum, by more than 0.01."""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from nad_guard.evaluate import FIT_CLEAN, FeatureKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/experiments, for common.py
from common import evaluation_data, experiment_parser  # noqa: E402

args = experiment_parser(__doc__).parse_args()
d = evaluation_data(("rich",), args.artifact, args.model, args.data, args.images)
KINDS = ("rich", "rich + sorted logits", "rich + sorted log-probs")


def features(key: FeatureKey, kind: str) -> np.ndarray:
    X = d.features[key].path["rich"]
    if kind == "rich":
        return X
    top = torch.as_tensor(d.features[key].base.logits).double().sort(1, descending=True).values
    extra = (top[:, 1:] - top[:, :1]) if kind == "rich + sorted logits" else top.log_softmax(1)
    return np.hstack([X, extra.numpy()])


def logistic() -> Pipeline:
    return Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=1.0, max_iter=3000))])


def auroc(clean_scores: np.ndarray, attack_scores: np.ndarray) -> float:
    return roc_auc_score(np.r_[np.zeros(len(clean_scores)), np.ones(len(attack_scores))],
                         np.r_[clean_scores, attack_scores])


print("seen: 3-fold cross-validation on the fit part, grouped by source image", flush=True)
for attack in ("cw-l2", "pgd-l2", "fgsm", "apgd-dlr"):
    for kind in KINDS:
        Xc, Xa = features(FIT_CLEAN, kind), features(FeatureKey.attack("fit", attack), kind)
        X, y = np.vstack([Xc, Xa]), np.r_[np.zeros(len(Xc)), np.ones(len(Xa))]
        groups = np.r_[d.groups[FIT_CLEAN], d.groups[FeatureKey.attack("fit", attack)]]
        aucs = []
        for tr, te in StratifiedGroupKFold(3, shuffle=True, random_state=0).split(X, y, groups):
            model = logistic().fit(X[tr], y[tr])
            scores = model.decision_function(X[te])
            aucs.append(auroc(scores[y[te] == 0], scores[y[te] == 1]))
        print(f"{attack:8s} {kind:24s} {np.mean(aucs):.3f}", flush=True)

print("leave one attack out: fitted on even-index images, scored on odd-index ones", flush=True)
for kind in KINDS:
    even = {k: d.groups[k] % 2 == 0 for k in [FIT_CLEAN] + [FeatureKey.attack("fit", a) for a in d.usable]}
    results = []
    for held in d.usable:
        parts = [features(FIT_CLEAN, kind)[even[FIT_CLEAN]]] + [
            features(k, kind)[even[k]] for k in (FeatureKey.attack("fit", a) for a in d.usable if a != held)]
        y = np.r_[np.zeros(len(parts[0])), np.ones(sum(len(p) for p in parts[1:]))]
        model = logistic().fit(np.vstack(parts), y)
        held_key = FeatureKey.attack("fit", held)
        results.append(auroc(model.decision_function(features(FIT_CLEAN, kind)[~even[FIT_CLEAN]]),
                             model.decision_function(features(held_key, kind)[~even[held_key]])))
    print(f"{kind:24s} mean {np.mean(results):.3f} min {np.min(results):.3f}  "
          + " ".join(f"{a} {v:.3f}" for a, v in zip(d.usable, results)), flush=True)
