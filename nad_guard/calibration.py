"""The one threshold rule of the project, the conformal p-value, and what a calibration set guarantees.

Score convention: **higher score = more suspicious**; an input is flagged when its score is
*strictly above* the threshold.

Rule (split conformal). With ``n`` clean held-out (calibration) scores sorted ascending,
``s_(1) <= ... <= s_(n)``, and a requested false-positive rate ``fpr`` (alpha), the threshold is the
``k``-th smallest,

    k = ceil((n + 1) * (1 - fpr)),

which needs ``n >= ceil(1 / fpr) - 1`` (else ``k > n``: no calibration score is high enough and
:class:`CalibrationError` is raised). :func:`threshold_at_fpr` computes it; the deployed guard
(:meth:`nad_guard.detectors.PathDetector.infer_threshold`) and the evaluation harness
(:func:`nad_guard.metrics.evaluate`, ``nad-guard evaluate``'s "TPR at 5% FPR") both call it, so a
guard and its evaluation flag the same inputs on the same scores.

The trust score of an input is its conformal p-value among the calibration scores,
``(1 + #{s_i >= s(x)}) / (n + 1)`` (:func:`p_values`), and with this rule an input is flagged
exactly when its p-value is ``<= fpr``.

Guarantees (:func:`fpr_guarantee`), for a new clean input exchangeable with the calibration inputs
(drawn from the same distribution):

* **marginal** (averaged over calibration sets): ``P(flagged) = (n + 1 - k) / (n + 1) <= fpr``
  (the classic split-conformal bound; ties in the scores only lower it);
* **high probability** (for *this* calibration set): the realised false-positive rate
  ``1 - F(s_(k))`` follows ``Beta(n + 1 - k, k)`` (``F(s_(k))`` is the ``k``-th order statistic of
  ``n`` uniforms), so with probability ``confidence`` (0.95) over the draw of the calibration set it
  is at most ``scipy.stats.beta.ppf(confidence, n + 1 - k, k)``.

A small calibration set makes the second bound loose: 199 clean images at 5% give 7.8%, 85 give
8.9%. :func:`fpr_guarantee` calls a calibration *adequate* when that bound is at most ``slack``
(1.5) times the requested rate, and says how many clean calibration inputs would make it so
(:func:`calibration_size_needed`); callers warn loudly (:class:`CalibrationWarning`) otherwise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95  # of the high-probability bound on the realised false-positive rate
SLACK = 1.5        # that bound may be at most this many times the requested rate for an adequate calibration
_EPS = 1e-9        # guards ceil() against binary rounding ((n + 1) * (1 - fpr) = 19.000000000000004)


class CalibrationError(ValueError):
    """The clean calibration set cannot give the requested false-positive rate at all."""


class CalibrationWarning(UserWarning):
    """The clean calibration set is too small for the requested false-positive rate to be tight."""


def _check_fpr(fpr: float) -> float:
    if not (isinstance(fpr, (int, float, np.floating)) and 0 < fpr < 1):
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    return float(fpr)


def conformal_rank(n: int, fpr: float) -> int:
    """``k = ceil((n + 1)(1 - fpr))``: the threshold is the ``k``-th smallest of ``n`` calibration scores
    (1-based). Raises :class:`CalibrationError` when ``k > n``."""
    fpr = _check_fpr(fpr)
    k = max(1, math.ceil((n + 1) * (1 - fpr) - _EPS))
    if k > n:
        raise CalibrationError(
            f"{n} clean calibration inputs cannot calibrate a false-positive rate of {fpr:g}: the conformal "
            f"threshold needs at least {min_calibration_size(fpr)} (ceil(1/fpr) - 1); a rate below "
            f"{fpr:g} needs still more, see nad_guard.calibration.calibration_size_needed")
    return k


def min_calibration_size(fpr: float) -> int:
    """The fewest clean calibration inputs for which :func:`conformal_rank` exists: ``ceil(1/fpr) - 1``."""
    fpr = _check_fpr(fpr)
    n = max(1, math.ceil((1 - fpr) / fpr - _EPS))
    while math.ceil((n + 1) * (1 - fpr) - _EPS) > n:  # exact in the presence of rounding
        n += 1
    return n


def _sorted_finite(scores: Any) -> np.ndarray:
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError("need at least one clean calibration score, all finite")
    return s


def threshold_at_fpr(clean_scores: Any, fpr: float = 0.05) -> float:
    """The threshold set on held-out clean scores: their ``ceil((n + 1)(1 - fpr))``-th smallest
    (module docstring). Inputs scoring strictly above it are flagged."""
    s = _sorted_finite(clean_scores)
    return float(s[conformal_rank(s.size, fpr) - 1])


def p_values(calibration_sorted: np.ndarray, scores: Any) -> np.ndarray:
    """Conformal p-values ``(1 + #{c >= s}) / (n + 1)`` of ``scores`` among ``calibration_sorted``
    (ascending), in ``(0, 1]``: higher = more like the calibration inputs."""
    cal = np.asarray(calibration_sorted, dtype=np.float64)
    at_least = cal.size - np.searchsorted(cal, np.asarray(scores, dtype=np.float64), side="left")
    return (1.0 + at_least) / (cal.size + 1.0)


def _realised_bound(n: int, k: int, confidence: float) -> float:
    from scipy.stats import beta

    return float(beta.ppf(confidence, n + 1 - k, k))


def calibration_size_needed(fpr: float, slack: float = SLACK, confidence: float = CONFIDENCE,
                            limit: int = 10_000_000) -> int:
    """The fewest clean calibration inputs from which on the ``confidence`` bound on the realised
    false-positive rate stays at most ``slack * fpr`` (the bound saw-tooths with ``n``, period about
    ``1 / fpr``, along a falling envelope)."""
    from scipy.stats import beta

    fpr = _check_fpr(fpr)
    if slack <= 1:
        raise ValueError(f"slack must be above 1 (the bound is always above fpr), got {slack}")
    period = math.ceil(2 / fpr) + 1

    def worst(n0: int) -> float:
        n = np.arange(n0, n0 + period)
        k = np.ceil((n + 1) * (1 - fpr) - _EPS)
        return float(beta.ppf(confidence, n + 1 - k, k).max())

    lo = min_calibration_size(fpr)
    hi = lo
    while worst(hi) > slack * fpr:  # doubling, then bisection on the falling envelope
        lo, hi = hi, hi * 2
        if hi > limit:
            raise ValueError(f"no calibration size up to {limit} reaches {slack} x {fpr}")
    while lo < hi:
        mid = (lo + hi) // 2
        if worst(mid) <= slack * fpr:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class FPRGuarantee:
    """What ``n`` clean calibration scores guarantee about the false-positive rate at the threshold.

    ``rank``: the threshold is the ``rank``-th smallest calibration score; ``above``: calibration scores
    above it (``n - rank``); ``marginal_bound``: ``(n + 1 - rank) / (n + 1)``, the probability that a new
    exchangeable clean input is flagged (<= ``fpr``); ``realised_bound``: with probability
    ``confidence`` over the calibration set, the realised rate is at most this (Beta quantile);
    ``adequate``: ``realised_bound <= slack * fpr``; ``needed``: calibration inputs for that;
    ``warning``: the message when not adequate, else ``None``."""

    n: int
    fpr: float
    rank: int
    above: int
    marginal_bound: float
    realised_bound: float
    confidence: float
    slack: float
    adequate: bool
    needed: int
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": "split conformal: threshold = ceil((n+1)(1-fpr))-th smallest clean calibration score; "
                        "flag = score > threshold",
                **asdict(self)}

    def summary(self) -> str:
        """One line a person reads (fit-detector's output, the audit, /readyz)."""
        return (f"threshold = clean calibration score {self.rank} of {self.n} from the lowest ({self.above} above it): "
                f"P(a new clean input is flagged) <= {self.marginal_bound:.4f} (asked: {self.fpr:g}); with "
                f"{self.confidence:.0%} confidence the realised false-positive rate is <= {self.realised_bound:.4f}")


def fpr_guarantee(n: int, fpr: float, *, confidence: float = CONFIDENCE, slack: float = SLACK,
                  whole_split: int | None = None, calibration_share: float | None = None) -> FPRGuarantee:
    """The finite-sample guarantees of :func:`threshold_at_fpr` with ``n`` clean calibration scores
    (module docstring). Raises :class:`CalibrationError` when ``n`` is below :func:`min_calibration_size`.

    ``whole_split``: the caller says the calibration part was drawn from a data set's whole test split of
    that many images (``calibration_share`` of it; :func:`nad_guard.provenance.exhausted_split` reads both
    from a guard's record), so the warning does not advise a larger sample that does not exist."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    k = conformal_rank(n, fpr)
    realised = _realised_bound(n, k, confidence)
    adequate = realised <= slack * fpr
    needed = calibration_size_needed(fpr, slack, confidence)
    warning = None if adequate else (
        f"only {n} clean calibration inputs for a false-positive rate of {fpr:g}: with {confidence:.0%} "
        f"confidence the realised rate is <= {realised:.4f} ({realised / fpr:.2f}x what was asked; the "
        f"guarantee on average is {(n + 1 - k) / (n + 1):.4f}). About {needed} clean calibration inputs keep "
        f"it within {slack:g}x: " + (
            f"calibrate on more held-out clean images (fit-detector: a larger --max-images or the whole test "
            f"split), or accept a looser rate" if whole_split is None else
            f"this data set's whole test split ({whole_split:,} images) is already used"
            + (f" and the calibration part is its {calibration_share:.0%}" if calibration_share else "")
            + ": accept the looser rate, or fit on a data set with a larger test split"))
    return FPRGuarantee(n=n, fpr=float(fpr), rank=k, above=n - k, marginal_bound=(n + 1 - k) / (n + 1),
                        realised_bound=realised, confidence=confidence, slack=slack, adequate=adequate,
                        needed=needed, warning=warning)


def warn_if_inadequate(g: FPRGuarantee, stacklevel: int = 3) -> None:
    """Issue a :class:`CalibrationWarning` with ``g.warning`` when the calibration is not adequate."""
    if g.warning:
        warnings.warn(g.warning, CalibrationWarning, stacklevel=stacklevel)
