"""The Odds are Odd (Roth et al., ICML 2019) at the paper's 256 noise draws per setting, on a seeded subset of
the committed CIFAR-10 sample's parts, beside the 2-draw figures of 2026-12-02-multipass-baselines-cifar10.

Run from the repository root (one core; about an hour):

    OMP_NUM_THREADS=1 nice python bench/experiments/2026-12-02-odds-full-draws-cifar10/run.py

The parts are those ``nad-guard evaluate --max-images 3000`` builds (``nad_guard.holdout.holdout_provenance``
and ``correct_subset``, seed 0), the attacks the cifar10 suite's, read from the attack cache with the key
``nad-guard evaluate`` uses (batch size 128, seed 0). Seeded subsets: ``--n-fit`` clean fit-part images fit the
clean statistics, ``--n-cal`` clean calibration-part images set the 5% FPR threshold, ``--n-eval`` clean
evaluation-part images and ``--n-eval`` adversarials per attack (of the evaluation part's) are scored.

Each image's noise responses are read once with the 256 draws of ``OddsAreOdd(n_samples=256, seed=0)``
(``nad_guard.baselines.odds.noise_draws``) and kept at the prefixes 2, 16, 64 and 256 of the same draws (running
means), so the trend costs nothing extra; the project's own 2-draw columns (``OddsAreOdd(n_samples=2)``, other
draws: a separate generator run) are read too (19 passes). Images are read round-robin across the sets in
``--rounds`` rounds, cached under ``$NAD_GUARD_CACHE/odds-full-draws`` after every set's share of a round; the
run stops after the round in which ``--budget-s`` is passed, so every set is equally far along whenever it
stops, and the figures are computed on what was read.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from nad_guard.attacks import default_cache_dir, generate, get_suite
from nad_guard.baselines import OddsAreOdd
from nad_guard.baselines.odds import PAPER_NOISES, PAPER_SAMPLES, PAPER_THRESHOLD, noise_draws
from nad_guard.data import cache_dir, load_dataset
from nad_guard.guard import artifact_classifier
from nad_guard.holdout import correct_subset, holdout_provenance
from nad_guard.metrics import evaluate
from nad_guard.paths import PathModel
from nad_guard.runinfo import machine_info

HERE = Path(__file__).parent
ARTIFACT = "bench/results/guard_cifar10-resnet20"
ATTACKS = ("fgsm", "pgd", "cw-l2", "deepfool")
PREFIXES = (2, 16, 64, 256)


def prefix_columns(model: torch.nn.Module, x: torch.Tensor, draws: torch.Tensor, prefixes=PREFIXES,
                   chunk: int = 128) -> np.ndarray:
    """``(B, len(prefixes), 1 + E * K)``: rows ``[pred, g]`` as ``OddsAreOdd.columns`` makes them, with ``g`` the
    mean over the first ``p`` draws of each setting of ``draws`` ``(E, n, C, H, W)``, for each ``p``."""
    E, n = draws.shape[:2]
    out = []
    with torch.no_grad():
        logits = model(x).double()
        pred = logits.argmax(1)
        for i in range(len(x)):
            per_p = []
            for e in range(E):
                diffs = []
                for s in range(0, n, chunk):
                    noisy = (x[i][None] + draws[e, s:s + chunk]).clamp_(0, 1)
                    diffs.append(logits[i][None] - model(noisy).double())  # (c, K): l(x) - l(x + eta)
                cum = torch.cat(diffs).cumsum(0)
                d = torch.stack([cum[p - 1] / p for p in prefixes])  # (P, K)
                per_p.append(d[:, pred[i]][:, None] - d)
            g = torch.stack(per_p, 1)  # (P, E, K)
            row = torch.cat([torch.full((len(prefixes), 1), float(pred[i]), dtype=torch.float64), g.flatten(1)], 1)
            out.append(row.numpy())
    return np.stack(out)


def load_sets(n_fit: int, n_cal: int, n_eval: int, seed: int) -> tuple[dict[str, torch.Tensor], dict, torch.nn.Module, torch.Tensor]:
    """The image sets (seeded subsets), what they were drawn from, and all clean fit-part images."""
    train, test = load_dataset("cifar10")
    clf = artifact_classifier(ARTIFACT, "cifar10-resnet20", class_names=train.classes, input_size=train.shape[1],
                              channels=train.shape[0])
    paths = PathModel.load(ARTIFACT, clf)
    clf.eval()
    (fit, cal, ev), _ = holdout_provenance(test, "cifar10", 3000, seed)
    clean = {k: correct_subset(paths, v) for k, v in (("fit", fit), ("calibration", cal), ("evaluation", ev))}
    rng = np.random.default_rng(seed)
    pick = lambda n, k: np.sort(rng.choice(n, min(k, n), replace=False))  # noqa: E731
    sets, info = {}, {"parts_clean": {k: len(v) for k, v in clean.items()}, "attacks": {}}
    for name, part, k in (("fit", "fit", n_fit), ("calibration", "calibration", n_cal), ("clean", "evaluation", n_eval)):
        idx = pick(len(clean[part]), k)
        sets[name] = clean[part].images[torch.as_tensor(idx)].float().div_(255.0)  # uint8 -> [0, 1]
    suite = get_suite("cifar10", seed=seed)
    for a in ATTACKS:
        r = generate(clf, clean["evaluation"], attack=a, suite=suite, batch_size=128, device="cpu",
                     cache_dir=default_cache_dir(), progress=False)
        idx = pick(len(r), n_eval)
        sets[a] = r.adv_images[torch.as_tensor(idx)]
        info["attacks"][a] = {"from_cache": r.from_cache, "adversarials": len(r),
                              "mean_linf": float(r.linf[idx].mean()), "mean_l2": float(r.l2[idx].mean())}
    return sets, info, clf, clean["fit"].float()


def read_all(clf, sets, rounds: int, budget_s: float, store: Path, log) -> dict[str, dict[str, np.ndarray]]:
    """Round-robin reading with a cache: ``name -> {"prefix": (m, P, 1+E*K), "two": (m, 1+E*K)}``."""
    draws = noise_draws(tuple(next(iter(sets.values())).shape[1:]), PAPER_NOISES, PAPER_SAMPLES, seed=0)
    two = OddsAreOdd(n_samples=2, seed=0)
    done: dict[str, dict[str, np.ndarray]] = {}
    for name, x in sets.items():
        f = store / f"{name}.npz"
        got = dict(np.load(f)) if f.exists() else {}
        if got and got.get("n_total", np.array(-1)) == len(x):
            done[name] = {"prefix": got["prefix"], "two": got["two"]}
        else:
            done[name] = {"prefix": np.zeros((0, len(PREFIXES), 1 + 9 * 10)), "two": np.zeros((0, 1 + 9 * 10))}
    t0 = time.time()
    total = sum(len(x) for x in sets.values())
    for k in range(1, rounds + 1):
        for name, x in sets.items():
            target = min(len(x), math.ceil(len(x) * k / rounds))
            m = len(done[name]["two"])
            if m >= target:
                continue
            xb = x[m:target]
            p = prefix_columns(clf, xb, draws)
            t = two.columns(clf, xb, batch_size=len(xb))
            done[name] = {"prefix": np.concatenate([done[name]["prefix"], p]),
                          "two": np.concatenate([done[name]["two"], t])}
            np.savez(store / f"{name}.npz", n_total=len(x), **done[name])
        n_done = sum(len(v["two"]) for v in done.values())
        el = time.time() - t0
        log(f"round {k}/{rounds}: {n_done}/{total} images, {el:.0f} s this run")
        if el > budget_s and k < rounds:
            log(f"budget of {budget_s:.0f} s passed: stopping after round {k}")
            break
    return done


def figures(cols: dict[str, np.ndarray], n_resamples: int, seed: int) -> dict:
    """Fit on ``cols["fit"]``, threshold on ``cols["calibration"]``, score the clean evaluation rows and each
    attack's: AUROC with its bootstrap interval, TPR at the calibrated 5% FPR, the paper's rule's flag rates."""
    det = OddsAreOdd().fit_columns(cols["fit"])
    s = {k: det.score_columns(v) for k, v in cols.items() if k != "fit"}
    out = {"paper_rule_flagged": {k: float(np.mean(v > PAPER_THRESHOLD)) for k, v in s.items()}, "attacks": {}}
    for a in ATTACKS:
        m = evaluate(s["clean"], s[a], s["calibration"], fpr=0.05, n_resamples=n_resamples, seed=seed)
        out["attacks"][a] = {"auroc": m.auroc, "auroc_ci": list(m.auroc_ci), "tpr": m.tpr, "tpr_ci": list(m.tpr_ci),
                             "test_fpr": m.test_fpr, "threshold": m.threshold}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-fit", type=int, default=250)
    ap.add_argument("--n-cal", type=int, default=150)
    ap.add_argument("--n-eval", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=3300.0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True)  # noqa: E731
    start = machine_info()
    t0 = time.time()
    sets, info, clf, fit_all = load_sets(args.n_fit, args.n_cal, args.n_eval, args.seed)
    log(f"sets: { {k: len(v) for k, v in sets.items()} }; {info}")
    store = cache_dir() / "odds-full-draws" / f"seed{args.seed}-fit{args.n_fit}-cal{args.n_cal}-eval{args.n_eval}"
    store.mkdir(parents=True, exist_ok=True)
    # the check: the running means equal OddsAreOdd.columns with the same draws (8 here, on 2 images)
    x2 = sets["fit"][:2]
    ref = OddsAreOdd(n_samples=8, seed=0).columns(clf, x2, batch_size=2)
    mine = prefix_columns(clf, x2, noise_draws(tuple(x2.shape[1:]), PAPER_NOISES, 8, seed=0), prefixes=(8,))[:, 0]
    log(f"check: largest difference {np.abs(mine - ref).max():.2e} (|g| up to {np.abs(ref[:, 1:]).max():.2e})")
    np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-5)
    log("check passed: running means = OddsAreOdd.columns with the same draws")
    t_read = time.time()
    done = read_all(clf, sets, args.rounds, args.budget_s, store, log)
    read_s = time.time() - t_read
    # the project's configuration exactly: 2 draws, clean statistics of all the fit part's clean images
    f = store / "fit_all_two.npy"
    if not f.exists():
        np.save(f, OddsAreOdd(n_samples=2, seed=0).columns(clf, fit_all, batch_size=128))
    fit_all_two = np.load(f)
    n = {k: len(v["two"]) for k, v in done.items()}
    rows = {}
    for j, p in enumerate(PREFIXES):
        rows[f"{p} draws (first {p} of the 256)"] = figures({k: v["prefix"][:, j] for k, v in done.items()},
                                                          args.bootstrap, args.seed)
    rows["2 draws (the project's draws)"] = figures({k: v["two"] for k, v in done.items()}, args.bootstrap, args.seed)
    rows[f"2 draws (the project's draws), fitted on all {len(fit_all_two)} fit-part clean images"] = figures(
        {"fit": fit_all_two, **{k: v["two"] for k, v in done.items() if k != "fit"}}, args.bootstrap, args.seed)
    result = {"question": "Do the Odds' 2-draw figures understate the baseline at the paper's 256 draws?",
              "command": "OMP_NUM_THREADS=1 nice python bench/experiments/2026-12-02-odds-full-draws-cifar10/run.py "
                         f"--n-fit {args.n_fit} --n-cal {args.n_cal} --n-eval {args.n_eval} --rounds {args.rounds} "
                         f"--budget-s {args.budget_s:.0f}",
              "model": "cifar10-resnet20", "artifact": ARTIFACT, "data": "cifar10 test, --max-images 3000 sample",
              "noises": list(PAPER_NOISES), "draws": PAPER_SAMPLES, "prefixes": list(PREFIXES),
              "paper_threshold": PAPER_THRESHOLD, "sizes_asked": {"fit": args.n_fit, "calibration": args.n_cal,
                                                                  "evaluation": args.n_eval},
              "sizes_read": n, "source": info, "rows": rows,
              "seconds": {"reading": round(read_s, 1), "all": round(time.time() - t0, 1),
                          "per_image_reading": round(read_s / max(1, sum(n.values())), 2)},
              "machine": {"start": start, "end": machine_info()}}
    (HERE / "results.json").write_text(json.dumps(result, indent=1))
    print("\n| draws | " + " | ".join(ATTACKS) + " | rule: clean | " + " | ".join(f"rule: {a}" for a in ATTACKS) + " |")
    print("|---" * (2 + 2 * len(ATTACKS)) + "|")
    for name, r in rows.items():
        cells = [f"{r['attacks'][a]['auroc']:.3f} [{r['attacks'][a]['auroc_ci'][0]:.3f}, "
                 f"{r['attacks'][a]['auroc_ci'][1]:.3f}] ({r['attacks'][a]['tpr']:.2f})" for a in ATTACKS]
        rule = [f"{100 * r['paper_rule_flagged'][k]:.1f}%" for k in ("clean", *ATTACKS)]
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(rule) + " |")


if __name__ == "__main__":
    main()
