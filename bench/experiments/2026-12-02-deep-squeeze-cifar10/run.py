"""Does the deep row gain from feature squeezing's columns? (issue 21, item 2's missed CW-L2 targets)

Feature squeezing is the best single signal on CW-L2 on the CIFAR-10 ResNet-20 (0.924 unsupervised), where the
deep check misses its targets (seen 0.956, held out 0.882). This reads, on the same half of the FIT part the
deep-check design was chosen on (``../2026-12-02-deep-check-cifar10/designs.py``: source images 0..519 of the
fit part's clean images and their nine cached attacks), the committed deep design's columns (k = 4, mixed
transforms) and the paper's three CIFAR-10 squeezers' L1 distances, and scores four rows by the same 3-fold CV
as that design's choice (``choose_design.scores``: seen per attack, unseen with whole attacks held out, clean-only
kNN): single pass, + probes (the deep row), + squeezing, + both. Nothing here looks at the calibration or
evaluation parts.

    python bench/experiments/2026-12-02-deep-squeeze-cifar10/run.py bench/experiments/2026-12-02-deep-squeeze-cifar10
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "2026-12-02-deep-check-cifar10"))
from choose_design import scores  # noqa: E402
from designs import fit_half_sets  # noqa: E402

from nad_guard.baselines import FeatureSqueezing  # noqa: E402
from nad_guard.encoding import encode  # noqa: E402
from nad_guard.probes import ProbeSpec, probe_features  # noqa: E402
from nad_guard.runinfo import machine_info  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    t_start = time.time()
    start = machine_info()
    paths, sets = fit_half_sets()
    sets.pop("wrong")  # the design experiment's sets without the mispredictions, as its scores read them
    clf = paths.classifier
    spec = ProbeSpec(k=4, transforms=("noise", "bits", "smooth", "shift"), sigma=0.01, bits=5)
    fs = FeatureSqueezing().fit(channels=3)
    rich, probes, squeeze, names, groups = [], [], [], [], []
    for s, (x, g) in sets.items():
        t0 = time.time()
        with torch.no_grad():
            r = probe_features(paths, x, spec)
            rich.append(encode(r.features, "rich", r.pooled))
            probes.append(r.columns)
            squeeze.append(fs.columns(clf, x, batch_size=128))
        names.append(np.array([s] * len(x)))
        groups.append(g)
        print(f"{s}: {len(x)} images, {time.time() - t0:.0f} s", flush=True)
    rich, probes, squeeze = np.concatenate(rich), np.concatenate(probes), np.concatenate(squeeze)
    sets_arr, groups_arr = np.concatenate(names), np.concatenate(groups)
    rows = {"single-pass": np.zeros((len(rich), 0)), "deep k=4 (committed design)": probes,
            "single-pass + squeezing": squeeze, "deep k=4 + squeezing": np.hstack([probes, squeeze])}
    res = {}
    for name, extra in rows.items():
        res[name] = scores(rich, extra, sets_arr, groups_arr)
        print(name, {m: round(res[name][m], 4) for m in ("score", "seen_mean", "seen_min", "unseen_mean",
                                                          "unseen_min", "clean_only_mean")},
              "cw-l2 seen", round(res[name]["seen"]["cw-l2"], 4), "unseen", round(res[name]["unseen"]["cw-l2"], 4),
              flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "command": "python bench/experiments/2026-12-02-deep-squeeze-cifar10/run.py "
                   "bench/experiments/2026-12-02-deep-squeeze-cifar10",
        "images": {s: int((sets_arr == s).sum()) for s in sets}, "squeezers": list(fs.squeezers_),
        "probe_spec": spec.to_dict(), "rows": res, "seconds": round(time.time() - t_start, 1),
        "machine": {"start": start, "end": machine_info()}}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
