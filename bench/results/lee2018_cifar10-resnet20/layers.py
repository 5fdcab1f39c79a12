"""Per-layer AUROC of the Mahalanobis distance on the run's evaluation part (same sample, same cached attacks):
each of the ResNet-20's 10 default layers without pre-processing, and the 4 stage layers at magnitude 0.005
(the one the run's cross-validation chose in most tasks). Single-layer scores, no regression: which layers
see each attack. Run from the repository root: python bench/results/lee2018_cifar10-resnet20/layers.py"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from nad_guard.attacks import default_cache_dir, generate, get_suite
from nad_guard.baselines import Mahalanobis, default_layers, extract_features
from nad_guard.baselines.mahalanobis_pre import magnitude_block, preprocessed_distances, stage_layers
from nad_guard.data import load_dataset, stratified_split
from nad_guard.guard import artifact_classifier
from nad_guard.holdout import correct_subset, holdout_provenance
from nad_guard.paths import PathModel
from nad_guard.runinfo import machine_info

torch.set_num_threads(1)
t0 = time.time()
start = machine_info()
ART = "bench/results/guard_cifar10-resnet20"
train, test = load_dataset("cifar10")
clf = artifact_classifier(ART, "cifar10-resnet20", class_names=train.classes, input_size=32, channels=3)
paths = PathModel.load(ART, clf)
clf = paths.classifier.eval()
(_, _, ev), _ = holdout_provenance(test, "cifar10", 1000, 0)
clean = correct_subset(paths, ev)
_, keep = stratified_split(train.labels.numpy(), 5000, seed=0)
tr = train.subset(keep, "train[5000]")
layers = default_layers(clf)
maha = Mahalanobis(combine="last").fit_features(extract_features(clf, tr, layers), tr.labels.numpy())
stages = stage_layers(clf)
maha_s = Mahalanobis(layers=stages, combine="last").fit_features(extract_features(clf, tr, stages), tr.labels.numpy())
MAGS = (0.0, 0.005)


def scores(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    plain = maha.layer_scores(extract_features(clf, x, layers))
    pre = np.concatenate([preprocessed_distances(clf, maha_s, x[s:s + 128], MAGS) for s in range(0, len(x), 128)])
    return plain, magnitude_block(pre, MAGS, 0.005)


c_plain, c_pre = scores(clean.float())
suite = get_suite("lee2018")
out = {"layers": layers, "stage_layers": stages, "magnitude": 0.005, "n_clean": len(clean), "attacks": {}}
for attack in ("fgsm", "bim", "deepfool", "cw-l2"):
    r = generate(clf, clean, attack=attack, suite=suite, batch_size=128, cache_dir=default_cache_dir(), progress=False)
    a_plain, a_pre = scores(r.adv_images)
    y = np.r_[np.zeros(len(c_plain)), np.ones(len(a_plain))]
    out["attacks"][attack] = {
        "n": len(a_plain), "from_cache": r.from_cache,
        "auroc_plain": {n: round(roc_auc_score(y, np.r_[c_plain[:, i], a_plain[:, i]]), 3) for i, n in enumerate(layers)},
        "auroc_pre": {n: round(roc_auc_score(y, np.r_[c_pre[:, i], a_pre[:, i]]), 3) for i, n in enumerate(stages)}}
    print(attack, out["attacks"][attack], flush=True)
out["seconds"] = round(time.time() - t0, 1)
out["machine"] = {"start": start, "end": machine_info()}
Path("bench/results/lee2018_cifar10-resnet20/layers.json").write_text(json.dumps(out, indent=1))
