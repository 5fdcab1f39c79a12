"""The ``adaptive`` protocol: a white-box L-inf PGD that lowers the classifier's margin and a detector's
score at once (:func:`adaptive_protocol`), against the deployed nad-guard detector (through
:func:`~nad_guard.evaluate.surrogate.soft_encode`) and Mahalanobis-LR."""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from nad_guard.baselines import combiner
from nad_guard.calibration import CalibrationWarning
from nad_guard.detectors import PathDetector
from nad_guard.evaluate.config import EvalConfig
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.features import CALIBRATION_CLEAN
from nad_guard.evaluate.protocols import FittedBaselines, deployed_training_keys
from nad_guard.evaluate.surrogate import soft_encode, torch_linear
from nad_guard.encoding import detector_input
from nad_guard.hooks import capture
from nad_guard.metrics import threshold_at_fpr


def _adaptive_pgd(clf: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, surrogate: Callable, real_flag: Callable,
                  eps: float, alpha: float, steps: int, lam: float, kappa: float, seed: int) -> torch.Tensor:
    """L-inf PGD minimising ``clamp(z_y - max_{k!=y} z_k, -kappa) + lam * surrogate(x)``; returns, per
    image, whether some iterate (after projection) is misclassified and not flagged by ``real_flag``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0) * eps).clamp(0, 1)
    success = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    for step in range(steps + 1):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits, det = surrogate(x)
            zy = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
            loss = (zy - other).clamp_min(-kappa) + lam * det
            (grad,) = torch.autograd.grad(loss.sum(), x)
        x = x.detach()
        with torch.no_grad():
            wrong = logits.detach().argmax(1) != y
            if wrong.any():
                idx = wrong.nonzero().flatten()
                ok = ~real_flag(x[idx])
                success[idx[ok]] = True
        if step == steps:
            break
        x = torch.min(torch.max(x - alpha * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)
    return success


def adaptive_protocol(d: EvalData, b: FittedBaselines, cfg: EvalConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """Adaptive white-box attack on the deployed nad-guard detector and on Mahalanobis-LR."""
    paths, clf = d.paths, d.paths.classifier
    dev = next(iter(clf.buffers())).device
    spec = d.suite["pgd"]
    if spec.norm != "Linf":
        raise ValueError("the adaptive attack uses the suite's L-inf pgd budget")
    eps, alpha = float(spec.eps), float(spec.params["alpha"])
    steps = int(cfg.adaptive_steps or spec.params["steps"])
    # the detector as deployed: all attacks and the natural mispredictions of the fit part
    train_keys = deployed_training_keys(d)
    (method, enc), _ = d.choose(train_keys)
    y = d.training_set(train_keys)[0]
    X = np.vstack([d.features[k].path[enc] for k in train_keys])
    real = PathDetector(method, random_state=cfg.seed).fit(X, y)
    with warnings.catch_warnings():  # the calibration's bounds are in the results' "calibration"
        warnings.simplefilter("ignore", CalibrationWarning)
        thr = real.infer_threshold(d.features[CALIBRATION_CLEAN].path[enc], cfg.fpr).threshold_  # the guard's own rule
    surrogate_det = real if method == "logistic" else PathDetector("logistic", random_state=cfg.seed).fit(X, y)
    lin = torch_linear(surrogate_det.estimator_, torch.float64, dev)
    masks = [paths.masks_[n].to(dev) for n in paths.layer_names_]
    stats = [paths.stats_[n].to(dev) for n in paths.layer_names_]

    def nad_surrogate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = paths.pooled_forward(x)
        feats = soft_encode([p.double() for p in pooled], logits.double(), masks, stats, enc)
        return logits, lin(feats)

    def nad_flag(x: torch.Tensor) -> torch.Tensor:
        s = real.score_samples(detector_input(paths, x, enc, batch_size=len(x))[1])
        return torch.as_tensor(s > thr, device=x.device)

    # Mahalanobis-LR trained on the same data; its distance is differentiable
    L = np.vstack([b.layer_scores("mahalanobis", k) for k in train_keys])
    comb = combiner(1.0).fit(L, y)
    m_thr = threshold_at_fpr(comb.decision_function(b.layer_scores("mahalanobis", CALIBRATION_CLEAN)), cfg.fpr)
    m_lin = torch_linear(comb, torch.float64, dev)
    maha = b.maha

    def maha_decision(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture(clf, maha.layers_, detach=False) as store:
            logits = clf(x)
            dist = torch.stack([maha.min_distance(store[n].double(), n) for n in maha.layers_], 1)
        return logits, m_lin(dist)

    def maha_flag(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return maha_decision(x)[1] > m_thr

    clean = d.clean["evaluation"]
    n = min(cfg.adaptive_images, len(clean))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(clean), n, replace=False))
    x_all, y_all = clean.float()[pick], clean.labels[pick]
    out: dict[str, Any] = {"images": n, "detector": f"{method},{enc}", "eps": eps, "alpha": alpha, "steps": steps, "norm": "Linf",
                           "lambdas": list(cfg.adaptive_lambdas), "kappa": 1.0, "detectors": {}}
    for name, surrogate, flag, threshold in (("nad-guard", nad_surrogate, nad_flag, thr),
                                             ("mahalanobis-lr", maha_decision, maha_flag, m_thr)):
        t0 = time.time()
        per_lam, any_success = {}, torch.zeros(n, dtype=torch.bool)
        for lam in (0.0, *cfg.adaptive_lambdas):
            succ = []
            for s in range(0, n, cfg.batch_size):
                xb, yb = x_all[s:s + cfg.batch_size].to(dev), y_all[s:s + cfg.batch_size].to(dev)
                succ.append(_adaptive_pgd(clf, xb, yb, surrogate, flag, eps, alpha, steps, lam, 1.0,
                                          cfg.seed + s).cpu())
            succ = torch.cat(succ)
            per_lam[str(lam)] = float(succ.float().mean())
            any_success |= succ  # the attacker may pick any lambda per image, plain PGD (0) included
        out["detectors"][name] = {
            "threshold": threshold,
            "plain_pgd_evades": per_lam["0.0"],  # lam 0: the classifier-only attack, same budget
            "adaptive_evades": float(any_success.float().mean()),
            "per_lambda": per_lam, "seconds": round(time.time() - t0, 1),
            "surrogate": ("the detector itself" if name == "mahalanobis-lr" or method == "logistic"
                          else f"logistic detector on the same data and encoding ({enc})")}
        log(f"adaptive {name}: evades {out['detectors'][name]['adaptive_evades']:.3f} "
            f"(plain PGD {per_lam['0.0']:.3f})")
    return out
