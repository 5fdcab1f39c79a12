"""The ``adaptive`` protocol: the white-box attack of :mod:`nad_guard.attacks.adaptive` (PGD on the classifier's
margin and a detector's centred score, with EOT and BPDA where a defence needs them) against each defence of
:data:`TARGETS`, over a grid of L-inf budgets (:func:`adaptive_protocol`).

Each entry of :data:`TARGETS` builds one :class:`~nad_guard.attacks.adaptive.AdaptiveTarget` from a run's
data (fit and calibration parts only), as the defence is deployed:

``nad-guard``
    the guard ``fit-detector`` would ship (:func:`nad_guard.evaluate.deployed.fit_deployed`): its attack
    detector and, when it has one, its error detector, each at its share of the rate; flagged when either
    flags. Surrogate: :func:`~nad_guard.evaluate.surrogate.soft_encode` (smooth step columns) into the
    logistic attack detector (a logistic detector fitted on the same rows when the shipped one is another
    method) and the error detector's own score of the softmax columns and those rows; the surrogate
    detector term is the larger of the two centred scores.
``mahalanobis-lr``
    Lee et al.'s layer distances (exact and differentiable) into the logistic combiner trained on the
    same data as the guard's detector, threshold at ``fpr`` on the calibration part.
``msp``
    the max-softmax threshold at ``fpr`` (a sanity reference: an attacker who wants a confident wrong
    class passes it).
``feature-squeezing``
    Xu et al.'s detector with the paper's squeezers for the images' channels
    (:class:`~nad_guard.baselines.FeatureSqueezing`), threshold at ``fpr`` on the calibration part's correct
    images; none of its squeezers has a useful gradient (rounding, median, non-local means), so the
    attack goes through each by BPDA (:func:`~nad_guard.attacks.adaptive.straight_through`).
``undefended``
    no detector at all (not attacked by default): the classifier's own robustness curve, the ceiling.

A new defence (the deep check) is one more function ``(EvalData, FittedBaselines,
EvalConfig) -> AdaptiveTarget`` added to :data:`TARGETS` and named in ``EvalConfig.adaptive_targets``; see
:mod:`nad_guard.attacks.adaptive` for what it must provide.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch

from nad_guard.attacks.adaptive import AdaptiveTarget, centred, evasion_curve, straight_through
from nad_guard.baselines import FeatureSqueezing, combiner
from nad_guard.baselines.squeezing import squeeze
from nad_guard.calibration import CalibrationWarning
from nad_guard.detectors import PathDetector
from nad_guard.encoding import detector_input
from nad_guard.errors import SCORE_METHODS, SOFTMAX_COLUMNS, error_rows
from nad_guard.evaluate.config import EvalConfig
from nad_guard.evaluate.data import EvalData
from nad_guard.evaluate.deployed import fit_deployed
from nad_guard.evaluate.features import CALIBRATION_CLEAN
from nad_guard.evaluate.protocols import FittedBaselines, deployed_training_keys
from nad_guard.evaluate.surrogate import soft_encode, torch_linear
from nad_guard.hooks import capture

BUDGET_RULE = ("the smallest L-inf budget at which half the images evade: linear interpolation between the two grid "
               "points that bracket 50% on the evasion curve, which starts at (0, 0); 'above' = not reached on the grid")


def softmax_columns_torch(logits: torch.Tensor) -> torch.Tensor:
    """:func:`nad_guard.errors.softmax_columns` as a differentiable torch function ``(N, 3)``."""
    p = torch.softmax(logits, 1)
    return torch.stack([1 - p.amax(1), 1 - (p * p).sum(1), -torch.logsumexp(logits, 1)], 1)


def _device(d: EvalData) -> torch.device:
    return next(iter(d.paths.classifier.buffers())).device


def _error_term(d: EvalData, g: Any, cfg: EvalConfig, dev: torch.device
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, float, float, str]:
    """The deployed guard's error detector as a differentiable function of its row (softmax columns, then the
    smooth path rows), centred at its threshold: ``(fn, centre, scale, description)``; ``fn`` None without one."""
    err, enc = g.err, g.enc
    if err is None:
        return None, 0.0, 1.0, ""
    cal = d.features[CALIBRATION_CLEAN]
    rows = error_rows(cal.base.logits, cal.path[enc])
    n_soft = len(SOFTMAX_COLUMNS)
    if err.method in SCORE_METHODS:
        j = SOFTMAX_COLUMNS.index(err.method)
        cal_e = rows[:, j]
        err_fn = lambda r: r[:, j]  # noqa: E731
    else:
        cols = {"logistic": slice(None), "logistic-softmax": slice(0, n_soft), "logistic-path": slice(n_soft, None)}
        c = cols[err.method]
        cal_e = err.estimator_.decision_function(rows[:, c])
        e_lin = torch_linear(err.estimator_, torch.float64, dev)
        err_fn = lambda r: e_lin(r[:, c])  # noqa: E731
    te, se = centred(cal_e, cfg.fpr * (1 - g.share))
    return err_fn, te, se, f"; the error detector ({err.method}) on the smooth rows, the larger centred score of the two"


def nad_guard_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """The deployed single-pass guard (module docstring)."""
    with warnings.catch_warnings():  # the calibration's bounds are in the deployed protocol's record
        warnings.simplefilter("ignore", CalibrationWarning)
        g = fit_deployed(d, cfg)
    det, enc = g.det, g.enc
    if det.method == "logistic":
        sur, how = det, "the attack detector itself"
    else:
        X = np.vstack([d.features[k].path[enc] for k in g.train_keys])
        sur = PathDetector("logistic", random_state=cfg.seed).fit(X, d.training_set(g.train_keys)[0])
        how = f"a logistic detector on the same rows ({enc}) for the {det.method} attack detector"
    lin = torch_linear(sur.estimator_, torch.float64, _device(d))
    return guard_target(d, g, cfg, lin, sur.estimator_.decision_function(d.features[CALIBRATION_CLEAN].path[enc]), how)


def guard_target(d: EvalData, g: Any, cfg: EvalConfig, surrogate: Callable[[torch.Tensor], torch.Tensor],
                 cal_scores: np.ndarray, how: str, name: str = "nad-guard") -> AdaptiveTarget:
    """A deployed single-pass guard ``g`` (:func:`nad_guard.evaluate.deployed.fit_deployed`) as an adaptive
    target whose attack detector the attacker follows through ``surrogate``: a differentiable function of
    :func:`soft_encode`'s rows (float64) to a score, higher = more suspicious, with ``cal_scores`` its scores of
    the calibration part's clean rows (it is centred at the guard's share of the false-positive rate there).
    The real decision is the guard's (``g.det`` and ``g.err`` at their thresholds); ``how`` describes the
    surrogate in the target's note."""
    paths, dev = d.paths, _device(d)
    det, enc, err = g.det, g.enc, g.err
    ta, sa = centred(cal_scores, cfg.fpr * g.share)
    masks = [paths.masks_[n].to(dev) for n in paths.layer_names_]
    stats = [paths.stats_[n].to(dev) for n in paths.layer_names_]
    err_fn, te, se, err_how = _error_term(d, g, cfg, dev)

    def loss_terms(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        logits, pooled = paths.pooled_forward(x)
        z = logits.double()
        feats = soft_encode([p.double() for p in pooled], z, masks, stats, enc)
        score = (surrogate(feats) - ta) / sa
        if err_fn is not None:
            score = torch.maximum(score, (err_fn(torch.cat([softmax_columns_torch(z), feats], 1)) - te) / se)
        return logits, score

    def decide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, X = detector_input(paths, x, enc, batch_size=len(x))
        flag = det.score_samples(X) > det.threshold_
        if err is not None:
            flag |= err.score_samples(error_rows(f.logits, X)) > err.threshold_
        return f.pred, torch.as_tensor(flag)

    kind = "two detectors (attack, error)" if err is not None else "one detector"
    return AdaptiveTarget(name, loss_terms, decide, note=f"deployed guard, {kind}; surrogate: {how}{err_how}")


def score_target(name: str, score: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], thr: float,
                 scale: float, note: str) -> AdaptiveTarget:
    """A deterministic defence given by ``score(x) -> (logits, suspicion)`` (differentiable, the same function
    deployed) and its threshold: the surrogate is the score itself, centred at ``thr`` in units of ``scale``."""

    def loss_terms(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        logits, s = score(x)
        return logits, (s - thr) / scale

    def decide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, s = score(x)
        return logits.argmax(1), s > thr

    return AdaptiveTarget(name, loss_terms, decide, note=note)


def mahalanobis_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """Mahalanobis-LR (module docstring)."""
    clf, dev, maha = d.paths.classifier, _device(d), b.maha
    keys = deployed_training_keys(d)
    comb = combiner(1.0).fit(np.vstack([b.layer_scores("mahalanobis", k) for k in keys]), d.training_set(keys)[0])
    thr, scale = centred(comb.decision_function(b.layer_scores("mahalanobis", CALIBRATION_CLEAN)), cfg.fpr)
    lin = torch_linear(comb, torch.float64, dev)

    def score(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with capture(clf, maha.layers_, detach=False) as store:
            logits = clf(x)
            dist = torch.stack([maha.min_distance(store[n].double(), n) for n in maha.layers_], 1)
        return logits, lin(dist)

    return score_target("mahalanobis-lr", score, thr, scale, "the detector itself (exact distances)")


def msp_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """The max-softmax threshold (module docstring)."""
    clf = d.paths.classifier
    thr, scale = centred(b.score("msp", CALIBRATION_CLEAN), cfg.fpr)

    def msp(logits: torch.Tensor) -> torch.Tensor:
        return 1 - torch.softmax(logits.double(), 1).amax(1)

    def loss_terms(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        logits = clf(x)
        return logits, (msp(logits) - thr) / scale

    def decide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = clf(x)
        return logits.argmax(1), msp(logits) > thr

    return AdaptiveTarget("msp", loss_terms, decide, note="the score itself")


def feature_squeezing_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """Feature squeezing (module docstring), attacked through BPDA: each squeezer forward, the identity backward."""
    clf = d.paths.classifier
    fs = FeatureSqueezing().fit(channels=clf.spec.channels)
    thr, scale = centred(fs.score(clf, d.clean["calibration"].float(), batch_size=cfg.batch_size), cfg.fpr)
    squeezers = [straight_through(lambda x, s=s: squeeze(x, s)) for s in fs.squeezers_]

    def score(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = clf(x)
        p = torch.softmax(logits.double(), 1)
        dist = [(p - torch.softmax(clf(sq(x)).double(), 1)).abs().sum(1) for sq in squeezers]
        return logits, torch.stack(dist, 1).amax(1)

    return score_target("feature-squeezing", score, thr, scale,
                        f"the score itself, BPDA through the squeezers ({', '.join(fs.squeezers_)})")


def undefended_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """No detector: nothing is flagged, so evading is being misclassified (the classifier's own robustness,
    the ceiling every detector's curve is measured against)."""
    clf = d.paths.classifier

    def loss_terms(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        logits = clf(x)
        return logits, torch.zeros(len(x), dtype=logits.dtype, device=x.device)

    def decide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return clf(x).argmax(1), torch.zeros(len(x), dtype=torch.bool, device=x.device)

    return AdaptiveTarget("undefended", loss_terms, decide, note="no detector (misclassification only)")


def _deep_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig, eot: bool) -> AdaptiveTarget:
    """The deployed guard in deep mode (``fit-detector --probes K``, :mod:`nad_guard.deep`): its deep detector
    (the attack detector's method on the encoding's rows + the probe columns) and its error detector. The
    deployed probes are a fixed sequence (``ProbeSpec.seed``). ``eot=False``: the attacker knows that seed and
    differentiates through the very probes the guard runs (bit-depth rounding and the 0/1 changes straight
    through, :func:`nad_guard.probes.probe_columns_torch`); ``eot=True``: the attacker does not know it and
    averages the gradient over probes drawn with fresh seeds (EOT); the real decision uses the deployed probes."""
    from dataclasses import replace

    from nad_guard.evaluate.deployed import fit_deployed_deep
    from nad_guard.evaluate.protocols import deep_rows
    from nad_guard.encoding import encode
    from nad_guard.probes import probe_columns_torch, probe_features

    if cfg.probes <= 0:
        raise ValueError("the deep adaptive targets attack the deep check: run evaluate with --probes K (K > 0)")
    paths, dev, spec = d.paths, _device(d), cfg.probe_spec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        g = fit_deployed(d, cfg)
        deep = fit_deployed_deep(d, cfg, g)
    enc = g.enc
    if deep.method == "logistic":
        sur, how = deep, "the deep detector itself"
    else:
        sur = PathDetector("logistic", random_state=cfg.seed).fit(deep_rows(d, g.train_keys, enc),
                                                                  d.training_set(g.train_keys)[0])
        how = f"a logistic detector on the same rows for the {deep.method} deep detector"
    lin = torch_linear(sur.estimator_, torch.float64, dev)
    ta, sa = centred(sur.estimator_.decision_function(deep_rows(d, CALIBRATION_CLEAN, enc)), cfg.fpr * g.share)
    masks = [paths.masks_[n].to(dev) for n in paths.layer_names_]
    stats = [paths.stats_[n].to(dev) for n in paths.layer_names_]
    err_fn, te, se, err_how = _error_term(d, g, cfg, dev)

    def loss_terms(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = replace(spec, seed=int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))) if eot else spec
        logits, pooled = paths.pooled_forward(x)
        z = logits.double()
        feats = soft_encode([p.double() for p in pooled], z, masks, stats, enc)
        score = (lin(torch.cat([feats, probe_columns_torch(paths, x, s).double()], 1)) - ta) / sa
        if err_fn is not None:
            score = torch.maximum(score, (err_fn(torch.cat([softmax_columns_torch(z), feats], 1)) - te) / se)
        return logits, score

    def decide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, pooled, cols = probe_features(paths, x, spec)  # one pass: the input's own features and its probes'
        X = encode(f, enc, pooled)
        flag = deep.score_samples(np.hstack([X, cols])) > deep.threshold_
        if g.err is not None:
            flag |= g.err.score_samples(error_rows(f.logits, X)) > g.err.threshold_
        return f.pred, torch.as_tensor(flag)

    kind = "EOT over freshly seeded probes" if eot else "the deployed probes, known to the attacker"
    return AdaptiveTarget(f"nad-guard-deep{'-eot' if eot else ''}", loss_terms, decide, randomized=eot,
                          note=f"deep mode (k={spec.k}), {kind}; surrogate: {how}{err_how}")


def deep_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """Deep mode, the attacker knowing the deployed probes (:func:`_deep_target`)."""
    return _deep_target(d, b, cfg, eot=False)


def deep_eot_target(d: EvalData, b: FittedBaselines, cfg: EvalConfig) -> AdaptiveTarget:
    """Deep mode, the attacker averaging over freshly seeded probes (EOT; :func:`_deep_target`)."""
    return _deep_target(d, b, cfg, eot=True)


TARGETS: dict[str, Callable[[EvalData, FittedBaselines, EvalConfig], AdaptiveTarget]] = {
    "nad-guard": nad_guard_target, "mahalanobis-lr": mahalanobis_target, "msp": msp_target,
    "feature-squeezing": feature_squeezing_target, "undefended": undefended_target,
    "nad-guard-deep": deep_target, "nad-guard-deep-eot": deep_eot_target}


def eps_grid(eps: float, scales: Any) -> list[float]:
    """``eps`` times each of ``scales``, with ``eps`` itself, ascending and without repeats."""
    return sorted({round(float(eps) * float(s), 12) for s in scales} | {round(float(eps), 12)})


def adaptive_protocol(d: EvalData, b: FittedBaselines, cfg: EvalConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The evasion curve of every defence of ``cfg.adaptive_targets`` and plain PGD's figure at the suite's
    ``eps``; JSON-ready."""
    unknown = set(cfg.adaptive_targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown adaptive targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    spec = d.suite["pgd"]
    if spec.norm != "Linf":
        raise ValueError("the adaptive attack uses the suite's L-inf pgd budget")
    eps = float(spec.eps)
    steps = int(cfg.adaptive_steps or spec.params["steps"])
    grid = eps_grid(eps, cfg.adaptive_eps_scales)
    dev = _device(d)
    clean = d.clean["evaluation"]
    n = min(cfg.adaptive_images, len(clean))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(clean), n, replace=False))
    x_all, y_all = clean.float()[pick], clean.labels[pick]
    kw = dict(steps=steps, eot=cfg.adaptive_eot, batch_size=cfg.batch_size, seed=cfg.seed, device=dev)
    out: dict[str, Any] = {"images": n, "eps": eps, "eps_grid": grid, "steps": steps, "step_rule": "2.5 eps / steps",
                           "norm": "Linf", "objectives": list(cfg.adaptive_objectives), "eot": cfg.adaptive_eot,
                           "kappa": 1.0, "slack": 0.5, "budget_rule": BUDGET_RULE, "detectors": {}}
    for name in cfg.adaptive_targets:
        target = TARGETS[name](d, b, cfg)
        curve = evasion_curve(target, x_all, y_all, grid, cfg.adaptive_objectives, log=log, **kw)
        plain = evasion_curve(target, x_all, y_all, [eps], ["margin"], **kw)
        c = curve.to_dict()
        out["detectors"][name] = {
            "adaptive_evades": curve.at(eps), "plain_pgd_evades": plain.evades[0],
            "budget_50": c["budget_50"], "budget_50_bound": c["budget_50_bound"],
            "curve": {f"{e:.6g}": r for e, r in zip(c["eps"], c["evades"])},
            "first_evaded_by": {f"{e:.6g}": f for e, f in zip(c["eps"], c["first_evaded_by"])},
            "randomized": target.randomized, "surrogate": target.note,
            "seconds": round(curve.seconds + plain.seconds, 1)}
        log(f"adaptive {name}: evades {curve.at(eps):.3f} at eps {eps:.4g} (plain PGD {plain.evades[0]:.3f}), "
            f"50% budget {c['budget_50'] if c['budget_50'] is not None else c['budget_50_bound']}")
    return out
