"""A two-detector guard on CIFAR-10 (what `nad-guard fit-detector` now builds by default) against the committed
one-detector guard, both scored on the evaluation part of the same 3,000-image sample: the flag's observed
false-positive rate on correct images, each detector's AUROC on its question, and the share of each attack's
successful adversarials (cached attacks of the `cifar10` suite on the evaluation part's correct images) and of
the natural mispredictions flagged at the deployed thresholds."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from nad_guard import Guard, load_dataset
from nad_guard.attacks import default_cache_dir, generate, get_suite
from nad_guard.holdout import holdout_provenance, partition_correct
from nad_guard.metrics import auroc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--two", required=True, help="a guard fitted with the error detector (fit-detector's default)")
    ap.add_argument("--one", default="bench/results/guard_cifar10-resnet20")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    guards = {"two-detector": Guard.load(a.two), "one-detector (committed)": Guard.load(a.one)}
    _, test = load_dataset("cifar10", a.data_root)
    (_, _, ev), _ = holdout_provenance(test, "cifar10", a.images, 0)
    g2 = guards["two-detector"]
    clean, wrong = partition_correct(g2.paths, ev)
    suite = get_suite("cifar10", seed=0)
    advs = {name: generate(g2.classifier, clean, attack=name, suite=suite, batch_size=128, device="cpu",
                           cache_dir=default_cache_dir(), progress=False).adv_images
            for name in suite.names if not name.startswith("noise")}
    out: dict = {"evaluation": {"correct": len(clean), "mispredicted": len(wrong)},
                 "attacks_kept": {k: len(v) for k, v in advs.items()}, "guards": {}}
    for name, g in guards.items():
        rc, rw = g.run(clean.float(), 128), g.run(wrong.float(), 128)
        row = {"fpr": g.fpr, "observed_fpr": float(rc.flag.mean()),
               "mispredictions": {"flagged": float(rw.flag.mean()),
                                  "auroc_trust": auroc(np.r_[np.zeros(len(rc.trust)), np.ones(len(rw.trust))],
                                                       -np.r_[rc.trust, rw.trust])}}
        if rc.error_trust is not None:
            row["observed_fpr_attack_detector"] = float((rc.attack_trust <= g.detector.fpr_).mean())
            row["observed_fpr_error_detector"] = float((rc.error_trust <= g.error_detector.fpr_).mean())
            row["mispredictions"]["auroc_error_score"] = auroc(np.r_[np.zeros(len(rc.trust)), np.ones(len(rw.trust))],
                                                               np.r_[rc.error_score, rw.error_score])
            row["error_detector"] = g.error_detector.method
        row["attacks"] = {}
        for atk, x in advs.items():
            if not len(x):
                continue
            ra = g.run(x, 128)
            y = np.r_[np.zeros(len(rc.score)), np.ones(len(ra.score))]
            row["attacks"][atk] = {"auroc_attack_score": auroc(y, np.r_[rc.score, ra.score]),
                                   "flagged": float(ra.flag.mean())}
        row["attacks_mean_auroc"] = float(np.mean([v["auroc_attack_score"] for v in row["attacks"].values()]))
        row["attacks_mean_flagged"] = float(np.mean([v["flagged"] for v in row["attacks"].values()]))
        out["guards"][name] = row
    out["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
