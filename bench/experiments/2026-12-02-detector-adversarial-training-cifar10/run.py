"""Adversarial training of the guard's attack detector against the adaptive attack itself (issue 21, item 4).

Round 0 is the deployed single-pass guard as the ``adaptive`` protocol attacks it
(:func:`nad_guard.evaluate.adaptive.nad_guard_target`: ``fit_deployed``'s logistic attack detector on ``rich``
and the error detector, each at 2.5%). Round r = 1..R: the adaptive PGD of :mod:`nad_guard.attacks.adaptive`
attacks the current guard on correctly classified images of the FIT part (never evaluation images), each image
at one budget of ``--budgets`` (cycled) with each of ``--train-objectives``; every final or first evading
iterate that is misclassified becomes a new positive ("fit:adaptive-rN" in the run's feature store); the
attack detector is refitted by ``fit_deployed`` exactly as deployed (same method, encoding and
hyper-parameters) on the old training rows + all adaptive positives so far, and recalibrated on the
calibration part's clean images (the error detector is refitted on unchanged data, so it is unchanged).
The target is rebuilt around the new detector (its own logistic is its surrogate).

The chosen rounds' guards are then measured with the ``adaptive`` protocol itself
(:func:`nad_guard.evaluate.adaptive.adaptive_protocol`: the same 200 evaluation images, budgets, objectives,
steps and seeds as the committed run), and each round's attack detector is scored on the nine cached suite
attacks of the evaluation part (AUROC, and the guard's flag rate at its deployed thresholds) with the guard's
observed clean false-positive rate there.

``--separability`` adds a diagnostic on the last round's positives (:func:`separability_check`); ``--method gboost``
runs the same rounds with a gradient-boosting attack detector (the attack then uses a logistic surrogate fitted
on the same rows, as the adaptive protocol does for any non-logistic detector).

Run from the repository root (one thread; see README.md for the command used).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nad_guard.attacks import default_cache_dir  # noqa: E402
from nad_guard.attacks.adaptive import AdaptiveTarget, eot_gradient  # noqa: E402
from nad_guard.calibration import CalibrationWarning  # noqa: E402
from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.errors import error_rows  # noqa: E402
from nad_guard.evaluate import (CALIBRATION_CLEAN, EVALUATION_CLEAN, FIT_CLEAN, EvalConfig, EvalData,  # noqa: E402
                                FeatureKey, adaptive_protocol, compute_features)
from nad_guard.evaluate.adaptive import nad_guard_target  # noqa: E402
from nad_guard.evaluate.deployed import DeployedGuard, fit_deployed  # noqa: E402
from nad_guard.guard import artifact_classifier  # noqa: E402
from nad_guard.metrics import auroc, labels_and_scores  # noqa: E402
from nad_guard.paths import PathModel  # noqa: E402
from nad_guard.provenance import summary as provenance_summary  # noqa: E402
from nad_guard.runinfo import load_snapshot, machine_info  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def attack_iterates(target: AdaptiveTarget, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                    objective: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nad_guard.attacks.adaptive.adaptive_pgd`'s loop (same start, step rule and stopping), returning per
    image its first evading iterate, or else its final iterate, and whether it evaded."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    alpha = 2.5 * eps / max(1, steps)
    x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0) * eps).clamp(0, 1)
    success = torch.zeros(len(x0), dtype=torch.bool)
    for step in range(steps + 1):
        live = (~success).nonzero().flatten()
        with torch.no_grad():
            pred, flagged = target.decide(x[live])
        ok = (pred.cpu() != y[live]) & ~flagged.cpu().bool()
        success[live[ok]] = True
        live = live[~ok]
        if step == steps or len(live) == 0:
            break
        g = eot_gradient(target, x[live], y[live], objective, 1, gen)
        lo, hi = x0[live] - eps, x0[live] + eps
        x[live] = torch.min(torch.max(x[live] - alpha * g.sign(), lo), hi).clamp(0, 1)
    return success, x


def fitted(d: EvalData, cfg: EvalConfig) -> DeployedGuard:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return fit_deployed(d, cfg)


def detection_costs(d: EvalData, g: DeployedGuard, attacks: list[str]) -> dict:
    """The attack detector's AUROC on each cached suite attack of the evaluation part, the guard's flag rate
    there at its deployed thresholds, and its observed clean false-positive rate."""
    enc = g.enc

    def flags(k: FeatureKey) -> tuple[np.ndarray, np.ndarray]:
        X = d.features[k].path[enc]
        s = g.det.score_samples(X)
        f = s > g.det.threshold_
        if g.err is not None:
            f |= g.err.score_samples(error_rows(d.features[k].base.logits, X)) > g.err.threshold_
        return s, f

    s0, f0 = flags(EVALUATION_CLEAN)
    out = {"clean_fpr": float(f0.mean()), "clean_images": int(len(f0)),
           "attack_detector_clean_fpr": float((s0 > g.det.threshold_).mean()), "attacks": {}}
    for a in attacks:
        s, f = flags(FeatureKey.attack("evaluation", a))
        out["attacks"][a] = {"auroc": auroc(*labels_and_scores(s0, s)), "guard_tpr": float(f.mean()), "n": int(len(s))}
    out["mean_auroc"] = float(np.mean([v["auroc"] for v in out["attacks"].values()]))
    return out


def flag_rate(d: EvalData, g: DeployedGuard, key: FeatureKey) -> float:
    """The share of ``key``'s rows the guard ``g`` flags at its deployed thresholds."""
    X = d.features[key].path[g.enc]
    f = g.det.score_samples(X) > g.det.threshold_
    if g.err is not None:
        f |= g.err.score_samples(error_rows(d.features[key].base.logits, X)) > g.err.threshold_
    return float(f.mean())


def separability_check(d: EvalData, cfg: EvalConfig, key: FeatureKey, eps: np.ndarray) -> dict:
    """Can any detector of the guard's kind tell the adaptive positives from clean images at all? The fit part's
    clean images are split in half by a seeded pick; a detector (``logistic``, ``gboost``) learns the clean
    images of one half against the positives made from them, alone (no suite attacks), is calibrated at the
    attack detector's share of the rate on the calibration part, and is judged on the other half's positives
    (held-out source images): AUROC against the evaluation part's clean images and the flag rate, per budget."""
    from nad_guard.detectors import PathDetector

    g0 = fitted(d, cfg)
    enc, fpr = g0.enc, cfg.fpr * g0.share
    src = d.groups[key]
    n = len(d.features[FIT_CLEAN])
    half = np.zeros(n, bool)
    half[np.random.default_rng(cfg.seed).choice(n, n // 2, replace=False)] = True
    Xc, Xp = d.features[FIT_CLEAN].path[enc], d.features[key].path[enc]
    tr_p, te_p = half[src], ~half[src]
    X = np.vstack([Xc[half], Xp[tr_p]])
    y = np.r_[np.zeros(half.sum()), np.ones(tr_p.sum())]
    ev_clean = d.features[EVALUATION_CLEAN].path[enc]
    out = {"train_clean": int(half.sum()), "train_positives": int(tr_p.sum()), "test_positives": int(te_p.sum()),
           "fpr": fpr, "methods": {}}
    for method in ("logistic", "gboost"):
        det = PathDetector(method, random_state=cfg.seed).fit(X, y)
        det.infer_threshold(d.features[CALIBRATION_CLEAN].path[enc], fpr=fpr)
        s_c, s_p = det.score_samples(ev_clean), det.score_samples(Xp[te_p])
        row = {"auroc": auroc(*labels_and_scores(s_c, s_p)), "tpr": float((s_p > det.threshold_).mean()),
               "clean_fpr": float((s_c > det.threshold_).mean()), "by_budget": {}}
        for e in np.unique(eps):
            m = eps[te_p] == e
            row["by_budget"][f"{e:g}/255"] = {"auroc": auroc(*labels_and_scores(s_c, s_p[m])),
                                              "tpr": float((s_p[m] > det.threshold_).mean()), "n": int(m.sum())}
        out["methods"][method] = row
        log(f"separability, {method}: AUROC {row['auroc']:.4f}, flags {row['tpr']:.3f} of held-out positives "
            f"at clean FPR {row['clean_fpr']:.3f}; by budget {row['by_budget']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default="bench/results/guard_cifar10-resnet20")
    ap.add_argument("--model", default="cifar10-resnet20")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--max-images", type=int, default=3000)
    ap.add_argument("--method", default="logistic", choices=["logistic", "gboost"],
                    help="the attack detector's method (the deployed guard's is logistic; with gboost the attack's "
                         "surrogate is a logistic detector fitted on the same rows, as the adaptive protocol does)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fit-images", type=int, default=600, help="fit-part clean images attacked per round")
    ap.add_argument("--budgets", default="2,4,8", help="training budgets, in 1/255, cycled over the images")
    ap.add_argument("--train-objectives", default="hinge:10,selective,margin")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--evaluate-rounds", default="last", help="rounds to measure with the adaptive protocol: "
                    "'last', 'none' or comma-separated round numbers")
    ap.add_argument("--adaptive-images", type=int, default=200)
    ap.add_argument("--out", default=None, help="folder for results.json (default: none written)")
    ap.add_argument("--separability", action="store_true",
                    help="also measure how well detectors trained on the fit part's clean images vs the last round's "
                         "positives alone separate held-out ones (split by source image)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    start = machine_info()

    cfg = EvalConfig(suite="cifar10", protocols=["adaptive"], encodings=["rich"], primary=(args.method, "rich"),
                     max_images=args.max_images, train_images=100, adaptive_images=args.adaptive_images,
                     adaptive_targets=["nad-guard"], device="cpu", progress=False, seed=args.seed)
    train, test = load_dataset(args.data)
    paths = PathModel.load(args.artifact, artifact_classifier(args.artifact, args.model, class_names=train.classes,
                                                              input_size=train.shape[1], channels=train.shape[0]))
    d = EvalData(paths, train, test, cfg, default_cache_dir(), log)
    suite_attacks = list(d.usable)
    log(f"data ready ({time.time() - t_start:.0f} s): fit clean {len(d.features[FIT_CLEAN])}, calibration clean "
        f"{len(d.features[CALIBRATION_CLEAN])}, evaluation clean {len(d.features[EVALUATION_CLEAN])}; "
        f"attacks {suite_attacks}")

    fit_clean = d.clean["fit"]
    x_fit, y_fit = fit_clean.float(), fit_clean.labels
    budgets = [float(b) / 255 for b in args.budgets.split(",")]
    objectives = [o for o in args.train_objectives.split(",") if o]
    guards = {0: fitted(d, cfg)}
    usable = {0: list(d.usable)}
    rounds = []
    last_positives = None
    for r in range(1, args.rounds + 1):
        t0 = time.time()
        target = nad_guard_target(d, None, cfg)  # the current guard: fit_deployed on d.usable's fit rows
        rng = np.random.default_rng(args.seed + 1000 * r)
        pick = np.sort(rng.choice(len(x_fit), min(args.fit_images, len(x_fit)), replace=False))
        pos_x, pos_src, pos_eps, stats = [], [], [], {}
        for bi, eps in enumerate(budgets):
            idx = torch.as_tensor(pick[bi::len(budgets)])
            for oi, obj in enumerate(objectives):
                ev_all, mis_all = 0, 0
                for s in range(0, len(idx), cfg.batch_size):
                    b = idx[s:s + cfg.batch_size]
                    ok, xa = attack_iterates(target, x_fit[b], y_fit[b], eps, args.steps, obj,
                                             seed=args.seed + 7 * r + 7919 * bi + 104729 * oi + int(b[0]))
                    with torch.no_grad():
                        wrong = paths.classifier(xa).argmax(1) != y_fit[b]
                    pos_x.append(xa[wrong])
                    pos_src.append(b[wrong].numpy())
                    pos_eps.append(np.full(int(wrong.sum()), eps * 255))
                    ev_all += int(ok.sum())
                    mis_all += int(wrong.sum())
                stats[f"{eps * 255:g}/255 {obj}"] = {"images": len(idx), "evaded": ev_all, "misclassified": mis_all}
                log(f"round {r}: eps {eps * 255:g}/255 {obj}: {ev_all}/{len(idx)} evade the round-{r - 1} guard, "
                    f"{mis_all} misclassified ({time.time() - t0:.0f} s)")
        xp = torch.cat(pos_x)
        name = f"adaptive-r{r}"
        key = FeatureKey.attack("fit", name)
        d.features[key] = compute_features(paths, xp, y_fit[torch.as_tensor(np.concatenate(pos_src))], d.encodings,
                                           d.layers, cfg.batch_size)
        d.groups[key] = np.concatenate(pos_src)
        d.usable = d.usable + [name]
        usable[r] = list(d.usable)
        guards[r] = g = fitted(d, cfg)
        n_rows = sum(len(d.features[k]) for k in g.train_keys)
        own = flag_rate(d, g, key)
        last_positives = (key, np.concatenate(pos_eps))
        rounds.append({"round": r, "fit_images": len(pick), "positives": len(xp), "by_budget_objective": stats,
                       "training_rows": n_rows, "attack_detector_threshold": g.det.threshold_,
                       "own_positives_flagged_after_refit": own,
                       "seconds": round(time.time() - t0, 1)})
        log(f"round {r}: {len(xp)} new positives; detector refitted on {n_rows} rows; it flags {own:.3f} of "
            f"these training positives ({time.time() - t0:.0f} s)")

    separability = separability_check(d, cfg, *last_positives) if args.separability and args.rounds else None
    costs = {r: detection_costs(d, g, suite_attacks) for r, g in guards.items()}
    for r, c in costs.items():
        log(f"round {r}: mean AUROC on the suite {c['mean_auroc']:.4f}, clean FPR of the guard {c['clean_fpr']:.4f}")

    spec = args.evaluate_rounds
    eval_rounds = ([] if spec == "none" else [args.rounds] if spec == "last" else [int(v) for v in spec.split(",")])
    adaptive: dict = {}

    def write() -> None:
        result = {"question": "does adversarial training of the attack detector against the adaptive attack lower "
                              "the adaptive attack's evasion of the guard?",
                  "args": vars(args), "config": cfg.to_dict(), "rounds": rounds,
                  "guards": {r: g.info for r, g in guards.items()}, "detection": costs,
                  "separability": separability,
                  "adaptive": adaptive, "provenance": provenance_summary(d.provenance),
                  "machine": {"start": start, "end": machine_info(), "end_load": load_snapshot()},
                  "seconds": round(time.time() - t_start, 1)}
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
            log(f"wrote {out / 'results.json'}")

    write()  # the rounds and their detection costs, before the (long) adaptive measurements
    for r in eval_rounds:
        d.usable = usable[r]
        log(f"adaptive protocol on the round-{r} guard")
        adaptive[r] = adaptive_protocol(d, None, cfg, log)
        write()
    d.usable = usable[max(usable)]
    log(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
