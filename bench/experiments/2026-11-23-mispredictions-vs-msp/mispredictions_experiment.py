"""Experiment: can the deployed detector match MSP on natural mispredictions?

    .venv/bin/python bench/experiments/2026-11-23-mispredictions-vs-msp/mispredictions_experiment.py

(``--artifact``, ``--model``, ``--data``, ``--images``: see ``--help``; the defaults are the recorded run's,
which was ``runs/cifar_guard cifar10-resnet20 cifar10 3000`` as positional arguments.)

Rebuilds `nad-guard evaluate`'s splits, attacks (from the cache) and features for a path artifact, then
scores the evaluation part's mispredictions and attacks with variants of the deployed detector:
logistic regression with mispredictions weighted up (C in 1, 0.1, 0.01), MSP alone, and the union
(max) and sum of the clean-calibrated ranks of the attack detector and of 1 - MSP. Prints
(mispredictions AUROC, mean attack AUROC, per-attack AUROCs) per variant."""
import sys, time
from pathlib import Path
import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from nad_guard.evaluate import (CALIBRATION_CLEAN, EVALUATION_CLEAN, EVALUATION_WRONG, FIT_CLEAN, FIT_WRONG,
                                FeatureKey)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/experiments, for common.py
from common import evaluation_data, experiment_parser  # noqa: E402
args = experiment_parser(__doc__).parse_args()
# as recorded: one torch thread, evaluate's default encodings (rich, full), its log lines printed
d = evaluation_data(("rich", "full"), args.artifact, args.model, args.data, args.images, threads=1, log=print)
enc = "rich"
ak = [FIT_CLEAN] + [FeatureKey.attack("fit", a) for a in d.usable]
F = lambda k: d.features[k].path[enc]
Xc, Xw = F(FIT_CLEAN), F(FIT_WRONG)
Xa = np.vstack([F(k) for k in ak[1:]])
def evals(score):
    c = score(F(EVALUATION_CLEAN)); w = score(F(EVALUATION_WRONG))
    mis = roc_auc_score(np.r_[np.zeros(len(c)), np.ones(len(w))], np.r_[c, w])
    att = [roc_auc_score(np.r_[np.zeros(len(c)), np.ones(len(s))], np.r_[c, s]) for a in d.usable for s in [score(F(FeatureKey.attack("evaluation", a)))]]
    return round(mis, 3), round(float(np.mean(att)), 3), [round(x, 3) for x in att]
for C in (1.0, 0.1, 0.01):
    for wmis in (1.0, 10.0, "bal"):
        X = np.vstack([Xc, Xa, Xw]); y = np.r_[np.zeros(len(Xc)), np.ones(len(Xa)), np.ones(len(Xw))]
        sw = np.ones(len(y))
        wm = (len(Xa) / len(Xw)) if wmis == "bal" else wmis
        sw[len(Xc) + len(Xa):] = wm
        sw[:len(Xc)] = (len(Xa) + wm * len(Xw)) / len(Xc) if wmis == "bal" else 1.0
        t = time.time()
        p = Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=C, max_iter=3000))]).fit(X, y, c__sample_weight=sw)
        print("C", C, "wmis", wmis, evals(lambda Z: p.decision_function(Z)), round(time.time() - t, 1), "s", flush=True)
from scipy.special import softmax
def mspk(k): return 1 - softmax(d.features[k].base.logits, 1).max(1)
X = np.vstack([Xc, Xa, Xw]); y = np.r_[np.zeros(len(Xc)), np.ones(len(Xa)), np.ones(len(Xw))]
att = Pipeline([("s", StandardScaler()), ("c", LogisticRegression(C=1.0, max_iter=3000))]).fit(X, y)
cal_a = np.sort(att.decision_function(F(CALIBRATION_CLEAN))); cal_e = np.sort(mspk(CALIBRATION_CLEAN))
def union(k):
    a = np.searchsorted(cal_a, att.decision_function(F(k)), side="right") / len(cal_a)
    e = np.searchsorted(cal_e, mspk(k), side="right") / len(cal_e)
    return np.maximum(a + 1e-6 * att.decision_function(F(k)), e)
def evals_k(score):
    c = score(EVALUATION_CLEAN); w = score(EVALUATION_WRONG)
    mis = roc_auc_score(np.r_[np.zeros(len(c)), np.ones(len(w))], np.r_[c, w])
    at = [roc_auc_score(np.r_[np.zeros(len(c)), np.ones(len(s))], np.r_[c, s]) for a in d.usable for s in [score(FeatureKey.attack("evaluation", a))]]
    return round(mis, 3), round(float(np.mean(at)), 3), [round(x, 3) for x in at]
print("msp alone", evals_k(mspk))
print("union(max of clean-calibrated ranks: attack LR, msp)", evals_k(union))
def mean_rank(k):
    a = np.searchsorted(cal_a, att.decision_function(F(k)), side="right") / len(cal_a)
    e = np.searchsorted(cal_e, mspk(k), side="right") / len(cal_e)
    return a + e
print("sum of ranks", evals_k(mean_rank))
