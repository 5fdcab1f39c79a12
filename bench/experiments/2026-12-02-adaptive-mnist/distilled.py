"""The adaptive protocol on the MNIST gboost guard through a distilled smooth surrogate of its trees.

The committed run (``single/``) attacks the deployed guard (gradient boosting on ``full`` + DOCTOR's error
detector) through a *logistic* detector fitted on the same rows (:func:`nad_guard.evaluate.adaptive.nad_guard_target`)
and gets 10% of images through at 0.3; a logistic guard that the attack differentiates exactly lets 94% through.
Is the gboost guard harder, or is the logistic stand-in a poor surrogate of the trees?

Here the attack follows a **distilled surrogate**: a StandardScaler + ReLU MLPRegressor trained to reproduce the
gboost attack detector's raw score (its log-odds, ``decision_function``; the deployed flag is monotone in it) on
the fit part's rows (clean + the nine suite attacks), optionally (``--augment-images``) refitted once with the rows
of the attack's own iterates on fit-part images (PGD on the first surrogate, every 10th step), labelled by the
gboost detector: the region the attack actually visits. The MLP becomes a torch function of
:func:`nad_guard.evaluate.surrogate.soft_encode`'s rows, is centred on the calibration clean rows at the guard's
share of the rate with :func:`nad_guard.attacks.adaptive.centred`, exactly as ``nad_guard_target`` centres its
logistic stand-in; the error term and the real decision (the gboost detector and the error detector at their
deployed thresholds) are ``nad_guard_target``'s. Fidelity: Spearman rank correlation of surrogate and gboost
scores on the evaluation part's rows (clean + suite attacks), never used in training.

The evasion curve is :func:`nad_guard.evaluate.adaptive.adaptive_protocol` itself (same 100 images, budgets,
objectives, steps, seed), with this target added to its ``TARGETS`` table under ``nad-guard-distilled``.
Run from the repository root, one thread (README.md has the command).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.neural_network import MLPRegressor  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from nad_guard.attacks import default_cache_dir  # noqa: E402
from nad_guard.attacks.adaptive import AdaptiveTarget, centred, eot_gradient  # noqa: E402
from nad_guard.calibration import CalibrationWarning  # noqa: E402
from nad_guard.data import load_dataset  # noqa: E402
from nad_guard.encoding import detector_input  # noqa: E402
from nad_guard.errors import error_rows  # noqa: E402
from nad_guard.evaluate import (CALIBRATION_CLEAN, EVALUATION_CLEAN, EvalConfig, EvalData, FeatureKey,  # noqa: E402
                                adaptive_protocol, compute_features)
from nad_guard.evaluate.adaptive import TARGETS, guard_target  # noqa: E402
from nad_guard.evaluate.deployed import DeployedGuard, fit_deployed  # noqa: E402
from nad_guard.guard import artifact_classifier  # noqa: E402
from nad_guard.paths import PathModel  # noqa: E402
from nad_guard.runinfo import load_snapshot, machine_info  # noqa: E402

DEV = torch.device("cpu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fit_mlp(X: np.ndarray, t: np.ndarray, hidden: tuple[int, ...], seed: int) -> Pipeline:
    """StandardScaler + ReLU MLPRegressor imitating the scores ``t`` of the rows ``X``."""
    mlp = MLPRegressor(hidden_layer_sizes=hidden, activation="relu", alpha=1e-3, learning_rate_init=1e-3,
                       batch_size=256, max_iter=200, early_stopping=True, n_iter_no_change=10, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("mlp", mlp)]).fit(X, t)


def torch_mlp(pipe: Pipeline, dtype: torch.dtype = torch.float64):
    """The pipeline's ``predict`` as a differentiable torch function of ``(N, F)`` rows."""
    scaler, mlp = pipe.steps[0][1], pipe.steps[-1][1]
    m, s = (torch.as_tensor(v, dtype=dtype, device=DEV) for v in (scaler.mean_, scaler.scale_))
    W = [torch.as_tensor(w, dtype=dtype, device=DEV) for w in mlp.coefs_]
    b = [torch.as_tensor(v, dtype=dtype, device=DEV) for v in mlp.intercepts_]

    def f(x: torch.Tensor) -> torch.Tensor:
        h = (x - m) / s
        for i, (w, c) in enumerate(zip(W, b)):
            h = h @ w + c
            if i < len(W) - 1:
                h = torch.relu(h)
        return h[:, 0]
    return f


def distilled_target(d: EvalData, g: DeployedGuard, cfg: EvalConfig, pipe: Pipeline, note: str) -> AdaptiveTarget:
    """``nad_guard_target`` with the MLP surrogate in place of the logistic stand-in
    (:func:`nad_guard.evaluate.adaptive.guard_target`)."""
    cal = pipe.predict(d.features[CALIBRATION_CLEAN].path[g.enc])
    return guard_target(d, g, cfg, torch_mlp(pipe), cal, note, name="nad-guard-distilled")


def iterates(target: AdaptiveTarget, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int, objective: str,
             seed: int, every: int = 10) -> torch.Tensor:
    """``adaptive_pgd``'s loop (start, step rule) without stopping, returning every ``every``-th iterate."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    alpha = 2.5 * eps / max(1, steps)
    x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    out = []
    for step in range(1, steps + 1):
        g = eot_gradient(target, x, y, objective, 1, gen)
        x = torch.min(torch.max(x - alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
        if step % every == 0:
            out.append(x.clone())
    return torch.cat(out)


def diagnose(d: EvalData, g: DeployedGuard, cfg: EvalConfig, target: AdaptiveTarget, pipe: Pipeline) -> dict:
    """Where the attack stops: the final iterate (40 steps, 0.3) of sum:10 and selective on the adaptive
    protocol's images (its pick, copied), and per objective the share misclassified, the share the surrogate
    (attack term, centred) puts above its threshold, the share gboost flags, the share the error detector flags,
    and among the misclassified the share the surrogate passes but gboost flags (surrogate misled)."""
    clean = d.clean["evaluation"]
    n = min(cfg.adaptive_images, len(clean))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(clean), n, replace=False))
    x0, y = clean.float()[pick], clean.labels[pick]
    ta, _ = centred(pipe.predict(d.features[CALIBRATION_CLEAN].path[g.enc]), cfg.fpr * g.share)
    out = {}
    for obj in ("sum:10", "selective"):
        xa = iterates(target, x0, y, 0.3, 40, obj, seed=cfg.seed, every=40)
        feats, X = detector_input(d.paths, xa, g.enc, batch_size=cfg.batch_size)
        wrong = (feats.pred.cpu() != y).numpy()
        sur = pipe.predict(X) > ta
        gbf = g.det.score_samples(X) > g.det.threshold_
        errf = g.err.score_samples(error_rows(feats.logits, X)) > g.err.threshold_ if g.err is not None else gbf & False
        out[obj] = {"misclassified": float(wrong.mean()), "surrogate_flags": float(sur.mean()),
                    "gboost_flags": float(gbf.mean()), "error_flags": float(errf.mean()),
                    "evade": float((wrong & ~gbf & ~errf).mean()),
                    "misclassified_surrogate_passes_gboost_flags": float((wrong & ~sur & gbf).mean()),
                    "misclassified_both_flag": float((wrong & sur & gbf).mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default="nad_guard/default_guard")
    ap.add_argument("--model", default="mnist-cnn")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--suite", default="mnist")
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--select", default="cv")
    ap.add_argument("--adaptive-images", type=int, default=100)
    ap.add_argument("--hidden", default="128,64", help="the MLP's hidden layer sizes")
    ap.add_argument("--augment-images", type=int, default=0,
                    help="fit-part images whose attack iterates (on the first surrogate) are added to its training "
                         "rows before one refit; 0: no augmentation")
    ap.add_argument("--smooth", type=float, default=0.0,
                    help="distil the gboost log-odds averaged over Gaussian noise of this std in standardised feature "
                         "units (32 draws per row): a target with slope across the gap between the clean and attack "
                         "plateaus; 0: the log-odds themselves")
    ap.add_argument("--skip-curve", action="store_true", help="fidelity only")
    ap.add_argument("--diagnose", action="store_true",
                    help="after the curve: the final iterates of sum:10 and selective at 0.3 on the same images, "
                         "which part of the guard (surrogate, gboost, error detector) flags them")
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start, start = time.time(), machine_info()
    cfg = EvalConfig(suite=args.suite, protocols=["adaptive"], methods=["logistic", "gboost"],
                     encodings=["rich", "full"], primary=("logistic", "rich"), select=args.select,
                     train_images=args.train_images, adaptive_images=args.adaptive_images,
                     adaptive_eps_scales=[0.125, 0.25, 0.5, 1.0], adaptive_targets=["nad-guard-distilled"],
                     device="cpu", progress=False, seed=args.seed)
    train, test = load_dataset(args.data)
    paths = PathModel.load(args.artifact, artifact_classifier(args.artifact, args.model, class_names=train.classes,
                                                              input_size=train.shape[1], channels=train.shape[0]))
    d = EvalData(paths, train, test, cfg, default_cache_dir(), log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        g = fit_deployed(d, cfg)
    det, enc = g.det, g.enc
    log(f"deployed guard: {g.info['attack_detector']['method']} on {enc}; error detector "
        f"{g.info.get('error_detector', {}).get('method')}; ({time.time() - t_start:.0f} s)")
    gb = det.estimator_
    X = np.vstack([d.features[k].path[enc] for k in g.train_keys])
    t = gb.decision_function(X)
    if args.smooth > 0:  # the training target only; fidelity is measured against the plain log-odds
        sd, rng = X.std(0), np.random.default_rng(args.seed + 2)
        t_fit = np.mean([gb.decision_function(X + rng.normal(0, args.smooth, X.shape) * sd) for _ in range(32)], 0)
    else:
        t_fit = t
    eval_keys = [EVALUATION_CLEAN] + [FeatureKey.attack("evaluation", a) for a in d.usable]
    Xe = np.vstack([d.features[k].path[enc] for k in eval_keys])
    te = gb.decision_function(Xe)
    n_ec = len(d.features[EVALUATION_CLEAN])
    hidden = tuple(int(v) for v in args.hidden.split(","))
    y_tr = d.training_set(g.train_keys)[0]
    target_spread = {f"{kind}_rows_percentiles_5_50_95": np.percentile(t[y_tr == lab], [5, 50, 95]).round(3).tolist()
                     for kind, lab in (("clean", 0), ("attack", 1))}
    log(f"gboost log-odds on its training rows: {target_spread}")

    def fidelity(pipe: Pipeline) -> dict:
        p = pipe.predict(Xe)
        cal_g = gb.decision_function(d.features[CALIBRATION_CLEAN].path[enc])
        # the deployed flag is gboost's probability > threshold, i.e. its log-odds > logit(threshold)
        thr_g = float(np.log(det.threshold_ / (1 - det.threshold_)))
        thr_s, _ = centred(pipe.predict(d.features[CALIBRATION_CLEAN].path[enc]), cfg.fpr * g.share)
        fg, fs = te > thr_g, p > thr_s
        return {"spearman_eval_rows": float(spearmanr(p, te).statistic),
                "spearman_eval_clean": float(spearmanr(p[:n_ec], te[:n_ec]).statistic),
                "spearman_eval_attacks": float(spearmanr(p[n_ec:], te[n_ec:]).statistic),
                "flag_agreement_eval_rows": float((fg == fs).mean()),
                "gboost_flags": float(fg.mean()), "surrogate_flags": float(fs.mean()),
                "train_spearman": float(spearmanr(pipe.predict(X), t).statistic),
                "eval_rows": int(len(te)), "train_rows": int(len(t)),
                "calibration_spearman": float(spearmanr(pipe.predict(d.features[CALIBRATION_CLEAN].path[enc]),
                                                        cal_g).statistic)}

    t0 = time.time()
    pipe = fit_mlp(X, t_fit, hidden, args.seed)
    fid = {"base": fidelity(pipe) | {"seconds": round(time.time() - t0, 1), "iterations": pipe[-1].n_iter_}}
    log(f"surrogate on {len(t)} rows x {X.shape[1]} columns: {fid['base']}")
    # the logistic stand-in's fidelity, for comparison
    from nad_guard.detectors import PathDetector
    lr = PathDetector("logistic", random_state=cfg.seed).fit(X, d.training_set(g.train_keys)[0])
    pl = lr.estimator_.decision_function(Xe)
    fid["logistic_stand_in"] = {"spearman_eval_rows": float(spearmanr(pl, te).statistic),
                                "spearman_eval_clean": float(spearmanr(pl[:n_ec], te[:n_ec]).statistic),
                                "spearman_eval_attacks": float(spearmanr(pl[n_ec:], te[n_ec:]).statistic)}
    log(f"logistic stand-in: {fid['logistic_stand_in']}")
    note = (f"a ReLU MLP {hidden} distilled from the "
            f"gboost attack detector's log-odds on its training rows ({enc})")
    augment = None
    if args.augment_images:
        t0 = time.time()
        target = distilled_target(d, g, cfg, pipe, note)
        fit = d.clean["fit"]
        pick = np.sort(np.random.default_rng(args.seed + 1).choice(len(fit), min(args.augment_images, len(fit)), replace=False))
        x_fit, y_fit = fit.float()[pick], fit.labels[pick]
        xs, ys = [], []
        for i, (eps, obj) in enumerate([(0.15, "sum:10"), (0.3, "sum:10"), (0.15, "selective"), (0.3, "selective")]):
            part = slice(i, None, 4)
            xs.append(iterates(target, x_fit[part], y_fit[part], eps, 40, obj, seed=args.seed + 31 * i))
            ys.append(y_fit[part].repeat(4))
        fs = compute_features(paths, torch.cat(xs), torch.cat(ys), d.encodings, d.layers, cfg.batch_size)
        Xa = fs.path[enc]
        ta_ = gb.decision_function(Xa)
        pipe = fit_mlp(np.vstack([X, Xa]), np.r_[t, ta_], hidden, args.seed)
        augment = {"images": len(pick), "rows": int(len(Xa)), "budgets_objectives":
                   "0.15/0.3 x sum:10/selective, one quarter of the images each, iterates 10/20/30/40",
                   "gboost_flags_on_iterates": float((ta_ > np.log(det.threshold_ / (1 - det.threshold_))).mean())}
        fid["augmented"] = fidelity(pipe) | {"seconds": round(time.time() - t0, 1), "iterations": pipe[-1].n_iter_}
        note += f" plus {len(Xa)} rows of its own attack iterates on {len(pick)} fit-part images"
        log(f"augmented surrogate: {augment}; {fid['augmented']}")
    note += "; the error detector (doctor) on the smooth rows, the larger centred score of the two"

    result = {"question": "does a distilled smooth surrogate of the gboost guard's trees get more images past it "
                          "than the logistic stand-in (10% at 0.3)?",
              "guard": g.info, "surrogate": {"model": "StandardScaler + MLPRegressor (ReLU)", "hidden": list(hidden),
                                             "target": "gboost decision_function (log-odds)", "augment": augment,
                                             "target_spread": target_spread},
              "fidelity": fid, "config": cfg.to_dict(),
              "command": "python " + " ".join(["bench/experiments/2026-12-02-adaptive-mnist/distilled.py"]
                                              + sys.argv[1:])}
    if not args.skip_curve:
        TARGETS["nad-guard-distilled"] = lambda d_, b_, c_: distilled_target(d_, g, c_, pipe, note)
        result["adaptive"] = adaptive_protocol(d, None, cfg, log)
    if args.diagnose:
        result["diagnosis"] = diagnose(d, g, cfg, distilled_target(d, g, cfg, pipe, note), pipe)
        log(f"diagnosis: {result['diagnosis']}")
    result |= {"machine": {"start": start, "end": machine_info(), "end_load": load_snapshot()},
               "seconds": round(time.time() - t_start, 1)}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
        log(f"wrote {out / 'results.json'}")
    log(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
