"""Adaptive attacks on a whole defence: an L-inf PGD that knows the classifier *and* the detector, with
expectation over transformation (EOT) for random defences and BPDA for transforms without a gradient.

A defence plugs in as an :class:`AdaptiveTarget`, three things:

``loss_terms(x, gen) -> (logits (N, K), detector (N,))``
    differentiable in ``x``. ``detector`` is the defence's suspicion **centred at its threshold and
    scaled**: ``> 0`` where the defence would (roughly) flag ``x``, in units of the spread of its clean
    calibration scores (``(score - threshold) / std``, :func:`centred`), so that one ``lambda`` means the
    same for every defence. A random defence draws all of its randomness from ``gen`` (a CPU
    :class:`torch.Generator`; draw on the CPU and move, ``torch.rand(shape, generator=gen).to(x)``), one
    fresh draw per call: EOT calls it ``eot`` times per step and averages the gradients. A transform
    without a useful gradient (rounding, bit-depth reduction, median filtering, JPEG) goes through
    :func:`straight_through` (BPDA, Athalye et al. 2018: the transform forward, the identity backward).
``decide(x) -> (predicted labels (N,), flagged (N,) bool)``
    the **real** deployed decision, no gradient: the prediction the user gets and the flag at the
    calibrated threshold (not the surrogate). A random defence draws its own randomness here, as it would
    when deployed.
``randomized``
    whether ``loss_terms``/``decide`` are random (then EOT uses ``eot`` draws per step, and an evading
    iterate must pass a second, fresh ``decide`` to count).

The attack (:func:`adaptive_pgd`): random start in the ``eps`` ball, ``steps`` signed-gradient steps of
``2.5 eps / steps`` (Madry et al. 2018) on one of these objectives (:data:`OBJECTIVES`, written
``name`` or ``name:lambda``); ``m = max(z_y - max_{k != y} z_k, -kappa)`` the clamped classifier margin,
``d`` the centred detector term:

* ``margin``: ``m`` (plain PGD, the detector ignored);
* ``sum:L``: ``m + L d``;
* ``hinge:L``: ``m + L max(d + slack, 0)``: the detector term stops pulling once ``d`` is ``slack`` below
  the threshold, so the loss is lowest exactly where the attack succeeds (Tramer et al., NeurIPS 2020,
  "On Adaptive Attacks to Adversarial Example Defenses": attack the whole defence with a *consistent*
  loss, clamp each objective once it is met);
* ``selective``: per image, the margin while still classified right, else ``d`` while above
  ``-slack``, else the margin again (the selective step of Bryniarski et al., ICLR 2022, "Evading
  adversarial example detection defenses with orthogonal projected gradient descent"; no lambda).

An image **evades** when some iterate (after projection) is predicted wrong *and* not flagged by
``decide``. :func:`evasion_curve` runs every objective at every ``eps`` of a grid, ascending, on the
images not yet evaded (the attacker picks the best objective per image; an image that evades at a smaller
budget evades at every larger one: the same perturbation lies in the larger ball), and
:func:`budget_at` reads the budget at which a share (half) of the images evade from that monotone curve
by linear interpolation between the grid points that bracket it.

Plugging in a defence, e.g. the deep check (``nad_guard.probes``; ~20 lines): it needs (1) its probes as
a torch function of ``x`` and ``gen``, drawn exactly as deployed (same ``k``, same transforms and
magnitudes; noise from ``gen``; bit-depth reduction and median filtering wrapped in
:func:`straight_through`, Gaussian smoothing as it is, it has a gradient), (2) its extra detector columns
as a differentiable function of the probes' logits and pooled activations (``PathModel.pooled_forward``
of the input and its ``k`` probes in one batch), in the order the detector reads them after
:func:`nad_guard.evaluate.surrogate.soft_encode`'s columns, (3) its real decision. Then a function
``(EvalData, FittedBaselines, EvalConfig) -> AdaptiveTarget`` in
:data:`nad_guard.evaluate.adaptive.TARGETS`, named in ``EvalConfig.adaptive_targets``::

    def deep_target(paths, deep_guard, det, enc, k, fpr, X_cal) -> AdaptiveTarget:
        # det: the deep detector's logistic pipeline (or a logistic surrogate fitted on its rows);
        # X_cal: its rows (base + probe columns) of the calibration part's correct images
        lin = torch_linear(det, torch.float64, device)       # nad_guard.evaluate.surrogate
        thr_sur, scale = centred(det.decision_function(X_cal), fpr)
        masks, stats = ...                                   # as nad_guard.evaluate.adaptive does
        def loss_terms(x, gen):
            probes = probe_batch(x, k, gen)                  # (k*N, C, H, W); rounding via straight_through
            logits, pooled = paths.pooled_forward(torch.cat([x, probes]))
            base = soft_encode([p[:len(x)].double() for p in pooled], logits[:len(x)].double(), masks, stats, enc)
            extra = probe_columns_torch(logits, pooled, len(x), k)   # (N, P), differentiable
            return logits[:len(x)], (lin(torch.cat([base, extra], 1)) - thr_sur) / scale
        def decide(x):
            r = deep_guard.run(x)                            # the deployed deep mode, its own random probes
            return r.features.pred, torch.as_tensor(r.flag)  # a Guard's GuardResult
        return AdaptiveTarget("nad-guard deep", loss_terms, decide, randomized=True, note="EOT over the probes")

and feature squeezing (Xu et al. 2018): ``loss_terms`` returns ``(logits(x), (max_j ||softmax(f(x)) -
softmax(f(squeeze_j(x)))||_1 - t) / s)`` with each squeezer under :func:`straight_through`; ``decide``
the baseline's own flag. Pass ``randomized=False`` unless a squeezer draws noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

OBJECTIVES = ("margin", "sum", "hinge", "selective")

LossTerms = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
Decide = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AdaptiveTarget:
    """One defence as the adaptive attack sees it (see the module docstring)."""

    name: str
    loss_terms: LossTerms
    decide: Decide
    randomized: bool = False
    note: str = ""


def straight_through(transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """BPDA with the identity: ``transform(x)`` forward, the gradient passed through unchanged backward
    (for rounding, bit-depth reduction, median filters: transforms close to the identity whose own
    gradient is zero or undefined)."""
    def f(x: torch.Tensor) -> torch.Tensor:
        return x + (transform(x) - x).detach()
    return f


def centred(clean_scores: Any, fpr: float) -> tuple[float, float]:
    """``(threshold, scale)`` that centre a detector's scores for :class:`AdaptiveTarget`: its threshold at
    ``fpr`` on held-out clean scores (:func:`nad_guard.calibration.threshold_at_fpr`, the guard's rule)
    and their standard deviation (1 when they are constant)."""
    from nad_guard.calibration import threshold_at_fpr

    s = np.asarray(clean_scores, dtype=np.float64)
    sd = float(s.std())
    return float(threshold_at_fpr(s, fpr)), (sd if sd > 0 else 1.0)


def parse_objective(spec: str) -> tuple[str, float]:
    """``"sum:10"`` -> ``("sum", 10.0)``; ``margin`` and ``selective`` take no lambda."""
    name, _, lam = spec.partition(":")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown adaptive objective {spec!r}; choose from {', '.join(OBJECTIVES)} "
                         "(sum and hinge as NAME:LAMBDA)")
    if (name in ("sum", "hinge")) != bool(lam):
        raise ValueError(f"objective {spec!r}: sum and hinge need a lambda (sum:10), margin and selective none")
    return name, float(lam or 0.0)


def class_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{k != y} z_k`` ``(N,)``: negative when the prediction is wrong."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    return zy - logits.scatter(1, y[:, None], float("-inf")).amax(1)


def objective_loss(objective: str, logits: torch.Tensor, det: torch.Tensor, y: torch.Tensor, *,
                   kappa: float = 1.0, slack: float = 0.5) -> torch.Tensor:
    """The per-image loss ``(N,)`` the attack lowers (module docstring)."""
    name, lam = parse_objective(objective)
    raw = class_margin(logits, y)
    m = raw.clamp_min(-kappa)
    det = det.to(m.dtype)
    if name == "margin":
        return m
    if name == "sum":
        return m + lam * det
    if name == "hinge":
        return m + lam * (det + slack).clamp_min(0)
    return torch.where(raw > 0, m, torch.where(det > -slack, det, m))


def eot_gradient(target: AdaptiveTarget, x: torch.Tensor, y: torch.Tensor, objective: str, draws: int,
                 gen: torch.Generator, **loss_kw: Any) -> torch.Tensor:
    """The gradient of the summed loss with respect to ``x``, averaged over ``draws`` calls of
    ``target.loss_terms`` (each draws the defence's randomness afresh from ``gen``): expectation over
    transformation (Athalye et al., ICML 2018)."""
    total = torch.zeros_like(x)
    for _ in range(max(1, draws)):
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, det = target.loss_terms(xg, gen)
            loss = objective_loss(objective, logits, det, y, **loss_kw)
            (g,) = torch.autograd.grad(loss.sum(), xg)
        total += g
    return total / max(1, draws)


def _passes(target: AdaptiveTarget, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        pred, flagged = target.decide(x)
    return (pred.to(y.device) != y) & ~flagged.to(y.device).bool()


def adaptive_pgd(target: AdaptiveTarget, x0: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                 objective: str, *, eot: int = 1, seed: int = 0, **loss_kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One L-inf PGD run (module docstring). Returns ``(evaded (N,) bool, x_adv)``: whether some iterate
    was predicted wrong and not flagged by the real ``decide`` (for a random target: and passed a fresh
    ``decide`` again), and per image its first evading iterate (``x0`` where none)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    alpha = 2.5 * eps / max(1, steps)
    draws = eot if target.randomized else 1
    x = (x0 + (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0) * eps).clamp(0, 1)
    found, success = x0.clone(), torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    for step in range(steps + 1):
        live = (~success).nonzero().flatten()
        ok = _passes(target, x[live], y[live])
        found[live[ok]] = x[live[ok]]
        success[live[ok]] = True
        live = live[~ok]
        if step == steps or len(live) == 0:
            break
        g = eot_gradient(target, x[live], y[live], objective, draws, gen, **loss_kw)
        lo, hi = x0[live] - eps, x0[live] + eps
        x[live] = torch.min(torch.max(x[live] - alpha * g.sign(), lo), hi).clamp(0, 1)
    if target.randomized and success.any():
        idx = success.nonzero().flatten()
        success[idx[~_passes(target, found[idx], y[idx])]] = False
    return success, found


@dataclass
class EvasionCurve:
    """Share of images that evade at each ``eps`` of the grid (ascending, monotone by construction) and,
    per ``eps``, how many images each objective evaded first (objectives run in order on the rest)."""

    target: str
    eps: list[float]
    evades: list[float]
    images: int
    first_evaded_by: list[dict[str, int]]
    seconds: float
    note: str = ""
    per_image: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool), repr=False)

    def at(self, eps: float) -> float:
        """The evasion share at a grid point ``eps``."""
        i = int(np.argmin(np.abs(np.asarray(self.eps) - eps)))
        if not np.isclose(self.eps[i], eps, rtol=1e-6, atol=1e-9):
            raise ValueError(f"eps {eps} is not on the grid {self.eps}")
        return self.evades[i]

    def to_dict(self) -> dict[str, Any]:
        budget, bound = budget_at(self.eps, self.evades, 0.5)
        return {"target": self.target, "eps": self.eps, "evades": self.evades, "images": self.images,
                "first_evaded_by": self.first_evaded_by, "seconds": round(self.seconds, 1), "note": self.note,
                "budget_50": budget, "budget_50_bound": bound}


def evasion_curve(target: AdaptiveTarget, x: torch.Tensor, y: torch.Tensor, eps_grid: Sequence[float],
                  objectives: Sequence[str], *, steps: int = 20, eot: int = 1, batch_size: int = 128, seed: int = 0,
                  device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
                  **loss_kw: Any) -> EvasionCurve:
    """Every objective at every ``eps`` (ascending) on the images ``x`` ``(N, C, H, W)`` (CPU, labels ``y``)
    not yet evaded; see the module docstring."""
    for o in objectives:
        parse_objective(o)
    t0 = time.time()
    grid = sorted(float(e) for e in eps_grid)
    n = len(x)
    evaded = torch.zeros(n, dtype=torch.bool)
    per_image = np.zeros((n, len(grid)), bool)
    rates, firsts = [], []
    for ei, eps in enumerate(grid):
        first: dict[str, int] = {}
        for oi, obj in enumerate(objectives):
            todo = (~evaded).nonzero().flatten()
            before = int(evaded.sum())
            for s in range(0, len(todo), batch_size):
                idx = todo[s:s + batch_size]
                succ, _ = adaptive_pgd(target, x[idx].to(device), y[idx].to(device), eps, steps, obj, eot=eot,
                                       seed=seed + 7919 * ei + 104729 * oi + int(idx[0]), **loss_kw)
                evaded[idx[succ.cpu()]] = True
            first[obj] = int(evaded.sum()) - before
        per_image[:, ei] = evaded.numpy()
        rates.append(float(evaded.float().mean()))
        firsts.append(first)
        if log:
            log(f"adaptive {target.name}: eps {eps:.4g} evades {rates[-1]:.3f} ({time.time() - t0:.0f} s)")
    return EvasionCurve(target.name, grid, rates, n, firsts, time.time() - t0, target.note, per_image)


def budget_at(eps: Sequence[float], evades: Sequence[float], level: float = 0.5) -> tuple[float | None, str | None]:
    """The smallest budget at which ``level`` of the images evade, by linear interpolation between the grid
    points that bracket it, the curve starting at ``(0, 0)`` (the attacked images are classified right
    unperturbed, so none evades at budget 0): ``(budget, None)``, or ``(None, "above")`` when even the
    largest ``eps`` stays below ``level`` (the budget lies past the grid)."""
    e = np.r_[0.0, np.asarray(eps, dtype=float)]
    r = np.r_[0.0, np.asarray(evades, dtype=float)]
    hit = np.nonzero(r >= level)[0]
    if len(hit) == 0:
        return None, "above"
    i = int(hit[0])
    e0, e1, r0, r1 = e[i - 1], e[i], r[i - 1], r[i]
    return float(e0 + (level - r0) * (e1 - e0) / (r1 - r0)), None
