"""Paired bootstrap of the AUROC gain from 2 to 256 draws on the same images (run after run.py; reads its cache,
or reads the images again if the cache is gone). Writes paired.json beside this file. From the repository root:

    OMP_NUM_THREADS=1 nice python bench/experiments/2026-12-02-odds-full-draws-cifar10/paired.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from run import ATTACKS, load_sets, read_all  # noqa: E402

from nad_guard.baselines import OddsAreOdd  # noqa: E402
from nad_guard.data import cache_dir  # noqa: E402
from nad_guard.metrics import auroc, labels_and_scores  # noqa: E402

torch.set_num_threads(1)
sets, _, clf, _ = load_sets(250, 150, 120, 0)
done = read_all(clf, sets, 10, float("inf"), cache_dir() / "odds-full-draws" / "seed0-fit250-cal150-eval120", print)


def scores(cols):
    det = OddsAreOdd().fit_columns(cols["fit"])
    return {k: det.score_columns(v) for k, v in cols.items() if k != "fit"}


variants = {"256": scores({k: v["prefix"][:, 3] for k, v in done.items()}),
            "first 2 of the 256": scores({k: v["prefix"][:, 0] for k, v in done.items()}),
            "the project's 2": scores({k: v["two"] for k, v in done.items()})}
rng = np.random.default_rng(0)
out = {}
for a in ATTACKS:
    n0, n1 = len(variants["256"]["clean"]), len(variants["256"][a])
    idx = [(rng.integers(0, n0, n0), rng.integers(0, n1, n1)) for _ in range(1000)]
    au = lambda s, i=None: auroc(*labels_and_scores(s["clean"][i[0]] if i else s["clean"],  # noqa: E731
                                                    s[a][i[1]] if i else s[a]))
    out[a] = {}
    for other in ("first 2 of the 256", "the project's 2"):
        diffs = np.array([au(variants["256"], i) - au(variants[other], i) for i in idx])
        out[a][f"256 minus {other}"] = {"diff": au(variants["256"]) - au(variants[other]),
                                        "ci95": [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))],
                                        "share_of_resamples_above_0": float(np.mean(diffs > 0))}
(HERE / "paired.json").write_text(json.dumps(out, indent=1))
for a, r in out.items():
    print(a, {k: f"{v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" for k, v in r.items()})
