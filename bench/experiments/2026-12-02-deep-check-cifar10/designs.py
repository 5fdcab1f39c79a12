"""Step 1 of the deep-check design experiment: per-probe shifts of the FIT part only (clean images, the
fit part's natural mispredictions and the nine cached attacks on its clean images) for each candidate probe
design, k = 16 probes each (k = 4 and 8 are their first probes: the probes are prefix-stable).

    python bench/experiments/2026-12-02-deep-check-cifar10/designs.py runs/deep_designs [DESIGN ...]

Writes OUT/base.npz (rich/full encodings, labels, source-image groups, set names) and OUT/<design>.npz
(per-probe shifts), read by choose_design.py. Nothing here looks at the calibration or evaluation parts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from nad_guard.attacks import default_cache_dir, generate, get_suite
from nad_guard.data import load_dataset
from nad_guard.encoding import encode
from nad_guard.guard import artifact_classifier
from nad_guard.holdout import correct_mask, holdout_provenance
from nad_guard.paths import PathModel
from nad_guard.probes import ProbeSpec, probe_features

ARTIFACT = "bench/results/guard_cifar10-resnet20"
ATTACKS = ["fgsm", "bim", "pgd", "pgd-l2", "cw-l2", "deepfool", "apgd-ce", "apgd-dlr", "square"]
MIXED = ("noise", "bits", "smooth", "shift")
DESIGNS = {
    "noise-0.01": ProbeSpec(k=16, transforms=("noise",), sigma=0.01),
    "noise-0.03": ProbeSpec(k=16, transforms=("noise",), sigma=0.03),
    "mixed-0.01": ProbeSpec(k=16, transforms=MIXED, sigma=0.01, bits=5),
}
HALF = 520  # source images 0..519 of the fit part's clean images (and their adversarials): half the cost


def fit_half_sets() -> tuple[PathModel, dict[str, tuple[torch.Tensor, np.ndarray]]]:
    """The committed guard's paths and the image sets read here: ``name -> (images, source-image indices)`` for
    the first HALF of the fit part's correct clean images, all of its mispredictions and the nine cached attacks
    on those clean images."""
    train, test = load_dataset("cifar10")
    clf = artifact_classifier(ARTIFACT, "cifar10-resnet20", class_names=train.classes, input_size=train.shape[1],
                              channels=train.shape[0])
    paths = PathModel.load(ARTIFACT, clf)
    (fit, _, _), _ = holdout_provenance(test, "cifar10", 3000, 0)
    ok = correct_mask(paths, fit)
    clean, wrong = fit.subset(ok.nonzero().flatten().numpy()), fit.subset((~ok).nonzero().flatten().numpy())
    suite = get_suite("cifar10", seed=0)
    sets = {"clean": (clean.float(0, HALF), np.arange(HALF)),
            "wrong": (wrong.float(0, len(wrong)), len(clean) + np.arange(len(wrong)))}
    for a in ATTACKS:
        r = generate(clf, clean, attack=a, suite=suite, batch_size=128, device="cpu", cache_dir=default_cache_dir(),
                     progress=False)
        assert r.from_cache, f"{a} was not in the attack cache"
        keep = r.indices.numpy() < HALF
        sets[a] = (r.adv_images[torch.as_tensor(keep)], r.indices.numpy()[keep])
    return paths, sets


def main(out: Path, only: list[str]) -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    paths, sets = fit_half_sets()
    print({k: len(v[1]) for k, v in sets.items()}, flush=True)
    base: dict[str, np.ndarray] = {}
    for name, spec in DESIGNS.items():
        if (out / f"{name}.npz").exists() or (only and name not in only):
            continue
        t0 = time.time()
        shifts: dict[str, list[np.ndarray]] = {}
        for s, (x, groups) in sets.items():
            r = probe_features(paths, x, spec, batch_size=16, keep_shifts=True)
            for q, v in r.shifts.items():
                shifts.setdefault(q, []).append(v.astype(np.float32))
            if not (out / "base.npz").exists():
                for e in ("rich", "full"):
                    base.setdefault(e, []).append(encode(r.features, e, r.pooled))
                base.setdefault("set", []).append(np.array([s] * len(x)))
                base.setdefault("group", []).append(groups)
            print(f"{name} {s}: {len(x)} images, {time.time() - t0:.0f} s", flush=True)
        np.savez(out / f"{name}.npz", **{q: np.concatenate(v) for q, v in shifts.items()})
        if not (out / "base.npz").exists():
            np.savez(out / "base.npz", **{k: np.concatenate(v) for k, v in base.items()})
        print(f"{name} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
