"""Development experiment: which clean-only detector, on which encoding, for `--protocols clean-only`?

    .venv/bin/python bench/clean_only_experiment.py runs/cifar_guard cifar10-resnet20 cifar10 3000

Rebuilds `nad-guard evaluate`'s splits, attacks (from the cache) and features, and then uses the
**detector-fit part only** (the calibration and evaluation parts, on which the committed results are
scored, are not read): its correctly classified images are split by source image in two halves (even
and odd index); each candidate is fitted on the even half's clean features, and scored on the odd
half's clean images against the odd half's successful attacks (each attack's rows grouped by source
image, so no adversarial copy of a fitted image is scored). Prints the AUROC per attack and the mean
per candidate. Candidates, all fitted on clean features alone (``gaussian``, ``knn`` and ``isoforest``
are nad-guard's own :class:`nad_guard.detectors.PathDetector` methods):

* ``gaussian`` (the clean-only default before this experiment): Mahalanobis distance to one Ledoit-Wolf Gaussian;
* ``class-gaussian``: Mahalanobis distance to the predicted class's mean under a tied Ledoit-Wolf
  covariance (class-conditional Gaussians, as the Mahalanobis baseline does on pooled activations);
* ``knn``: mean Euclidean distance to the 10 nearest fitted clean rows (standardised features);
* ``isoforest``: isolation forest (300 trees);
on the ``summary``, ``rich`` and ``full`` encodings."""
import sys
import time

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from nad_guard.attacks import default_cache_dir
from nad_guard.data import load_dataset
from nad_guard.detectors import PathDetector
from nad_guard.evaluate import EvalConfig, _Data
from nad_guard.models import load_reference
from nad_guard.paths import PathModel

torch.set_num_threads(2)
art, model, data, n = sys.argv[1:5]
clf = load_reference(model)
pm = PathModel.load(art, clf)
train, test = load_dataset(data)
cfg = EvalConfig(suite="cifar10" if "cifar" in data else "mnist", max_images=int(n) or None, train_images=1000,
                 progress=False, device="cpu", encodings=("summary", "rich", "full"))
t0 = time.time()
d = _Data(pm, train, test, cfg, default_cache_dir(), lambda m: None)
print(f"features {time.time() - t0:.0f} s; attacks {d.usable}", flush=True)


def pred(k):
    return d.f[k].base.logits.argmax(1)


def detector(method):
    """nad-guard's own clean-only detector ``method`` (nad_guard.detectors), fitted on clean rows."""
    def make(Xf, yf):
        det = PathDetector(method).fit(Xf)
        return lambda X, p: det.score(X)
    return make


def class_gaussian(Xf, yf):
    s = StandardScaler().fit(Xf)
    Z = s.transform(Xf)
    classes = np.unique(yf)
    means = np.stack([Z[yf == c].mean(0) for c in classes])
    lw = LedoitWolf(assume_centered=True).fit(Z - means[np.searchsorted(classes, yf)])
    P = lw.precision_

    def score(X, p):
        D = s.transform(X) - means[np.clip(np.searchsorted(classes, p), 0, len(classes) - 1)]
        return np.einsum("ij,jk,ik->i", D, P, D)
    return score


clean_idx = d.groups["fit:clean"]
fit_rows, test_rows = clean_idx % 2 == 0, clean_idx % 2 == 1
for enc in ("summary", "rich", "full"):
    Xc, pc = d.f["fit:clean"].path[enc], pred("fit:clean")
    for name, make in (("gaussian", detector("gaussian")), ("class-gaussian", class_gaussian),
                       ("knn", detector("knn")), ("isoforest", detector("isoforest"))):
        score = make(Xc[fit_rows], pc[fit_rows])
        sc = score(Xc[test_rows], pc[test_rows])
        aucs = []
        for a in d.usable:
            k = f"fit:{a}"
            odd = d.groups[k] % 2 == 1
            sa = score(d.f[k].path[enc][odd], pred(k)[odd])
            aucs.append(roc_auc_score(np.r_[np.zeros(len(sc)), np.ones(len(sa))], np.r_[sc, sa]))
        print(f"{enc:8s} {name:15s} mean {np.mean(aucs):.3f}  " +
              " ".join(f"{a} {v:.3f}" for a, v in zip(d.usable, aucs)), flush=True)
