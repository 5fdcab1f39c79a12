"""Detection metrics, confidence intervals and reports.

Score convention for the whole project: **a higher score means more suspicious** (less
trustworthy). Every detector's ``score`` follows it, and every function here takes it for granted:
the positive class (label 1) is the suspicious one (adversarial, or about to be mispredicted) and
the negative class (label 0) is clean.

* :func:`auroc`, :func:`aupr` (average precision, as scikit-learn defines it: no interpolation),
  :func:`roc_curve`; ties count half, as in the Mann-Whitney statistic.
* :func:`threshold_at_fpr` (:mod:`nad_guard.calibration`, the rule the deployed guard uses too) sets
  a threshold on *held-out clean* scores (never on the test set): their
  ``ceil((n + 1)(1 - fpr))``-th smallest; a sample is flagged when its score is strictly above the
  threshold (:func:`detection_rate`).
* :func:`bootstrap_ci`: seeded, stratified (positives and negatives resampled separately,
  so every resample has both), percentile intervals, vectorised over resamples.
* :func:`evaluate` bundles it all into a :class:`DetectionMetrics`; :func:`markdown_table`,
  :func:`write_json`, :func:`write_report` and :func:`plot_roc` (matplotlib's Agg canvas, no
  pyplot) write results.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nad_guard.calibration import threshold_at_fpr

METRICS = ("auroc", "aupr", "tpr")


def _check(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold 0 (clean) and 1 (suspicious) only")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("y_true must contain both clean (0) and suspicious (1) samples")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return y, s


def labels_and_scores(clean_scores: Any, suspicious_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate clean (label 0) and suspicious (label 1) scores into ``(y_true, scores)``."""
    c = np.asarray(clean_scores, dtype=np.float64).ravel()
    a = np.asarray(suspicious_scores, dtype=np.float64).ravel()
    return np.r_[np.zeros(len(c), dtype=int), np.ones(len(a), dtype=int)], np.r_[c, a]


def _cumulative(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted true/false positive counts at each distinct threshold, highest score first.

    ``w``: ``(B, n)`` sample weights (bootstrap counts, or ones). Returns ``tp, fp`` of shape
    ``(B, G)`` for the ``G`` distinct scores, and those scores (descending).
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted, w = s[order], y[order], w[:, order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(w * y_sorted, axis=1)[:, last]
    fp = np.cumsum(w * ~y_sorted, axis=1)[:, last]
    return tp, fp, s_sorted[last]


def _auroc_from(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    tpr = np.concatenate([np.zeros((len(tp), 1)), tp / tp[:, -1:]], axis=1)
    fpr = np.concatenate([np.zeros((len(fp), 1)), fp / fp[:, -1:]], axis=1)
    return np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)


def _aupr_from(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    recall = np.concatenate([np.zeros((len(tp), 1)), tp / tp[:, -1:]], axis=1)
    predicted = tp + fp
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return np.sum(np.diff(recall, axis=1) * precision, axis=1)


def auroc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve; ``y_true`` 1 = suspicious. Ties count half."""
    y, s = _check(y_true, scores)
    tp, fp, _ = _cumulative(y, s, np.ones((1, len(y))))
    return float(_auroc_from(tp, fp)[0])


def aupr(y_true: Any, scores: Any) -> float:
    """Average precision with suspicious (1) as the positive class: sum over thresholds of
    (recall increase) x precision, as :func:`sklearn.metrics.average_precision_score`."""
    y, s = _check(y_true, scores)
    tp, fp, _ = _cumulative(y, s, np.ones((1, len(y))))
    return float(_aupr_from(tp, fp)[0])


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` from (0, 0) upwards; point ``i`` flags scores ``>= thresholds[i]``
    (the first threshold is ``inf``)."""
    y, s = _check(y_true, scores)
    tp, fp, thr = _cumulative(y, s, np.ones((1, len(y))))
    return np.r_[0.0, fp[0] / fp[0, -1]], np.r_[0.0, tp[0] / tp[0, -1]], np.r_[np.inf, thr]


def detection_rate(scores: Any, threshold: float) -> float:
    """Share of ``scores`` strictly above ``threshold`` (flagged): TPR on suspicious samples, FPR on clean."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) == 0:
        raise ValueError("no scores")
    return float(np.mean(s > threshold))


def _resample_weights(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n)`` counts of a stratified bootstrap (positives and negatives separately)."""
    w = np.zeros((n_resamples, len(y)))
    for group in (np.flatnonzero(y), np.flatnonzero(~y)):
        if len(group):
            w[:, group] = rng.multinomial(len(group), np.full(len(group), 1.0 / len(group)), size=n_resamples)
    return w


def bootstrap_ci(y_true: Any, scores: Any, metric: str = "auroc", *, threshold: float | None = None,
                 n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 max_cells: int = 2_000_000) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` ("auroc", "aupr", or "tpr" at a fixed ``threshold``).

    Stratified and seeded: the same inputs and ``seed`` give the same interval. Resamples are
    processed in chunks of at most ``max_cells`` weights, so memory stays bounded: a chunk holds a
    few float64 arrays of that size (about 100 MB at the default 2 million; at 20 million the
    CIFAR-10 evaluation's peak memory grew by 115 MiB per 1,000 test images). For "tpr" the
    threshold is held fixed (it comes from separate calibration data).
    """
    y, s = _check(y_true, scores)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "tpr" and threshold is None:
        raise ValueError("metric 'tpr' needs the threshold set on held-out clean scores")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError("confidence must be in (0, 1) and n_resamples positive")
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // len(y))
    values = []
    for start in range(0, n_resamples, chunk):
        w = _resample_weights(y, min(chunk, n_resamples - start), rng)
        if metric == "tpr":
            values.append(w[:, y] @ (s[y] > threshold).astype(float) / y.sum())
        else:
            tp, fp, _ = _cumulative(y, s, w)
            values.append(_auroc_from(tp, fp) if metric == "auroc" else _aupr_from(tp, fp))
    v = np.concatenate(values)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(v, [alpha, 1 - alpha])
    return float(lo), float(hi)


def risk_coverage(scores: Any, errors: Any) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve of a selective classifier that keeps the inputs with the lowest
    suspicion ``scores`` ``(N,)`` (higher = more suspicious, handed to a human first) and gets
    ``errors`` ``(N,)`` (bool: the prediction is wrong) wrong: ``(coverage, risk)``, each ``(N,)``,
    where ``coverage[k-1] = k / N`` and ``risk[k-1]`` the error rate among the ``k`` kept inputs.
    Tied scores are kept in random order, in expectation: inside a tie group the errors accumulate at
    the group's error rate, so the curve does not depend on the inputs' order."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    e = np.asarray(errors).astype(np.float64).ravel()
    if s.shape != e.shape or s.size == 0:
        raise ValueError(f"scores and errors need the same, non-zero length, got {s.shape} and {e.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    _, start, count = np.unique(s, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(start)), count)
    before = np.r_[0.0, np.cumsum(e)][start]            # errors before each tie group
    rate = np.add.reduceat(e, start) / count            # each group's error rate
    k = np.arange(1, s.size + 1)
    cum = before[group] + (k - start[group]) * rate[group]
    return k / s.size, cum / k


def aurc(scores: Any, errors: Any) -> float:
    """Area under the risk-coverage curve (:func:`risk_coverage`; Geifman et al. 2019), the mean of the
    risk over the coverages ``1/N, ..., N/N``: lower is better; a perfect ranking of ``m`` errors among
    ``N`` gets ``sum_{k > N-m} (k - N + m) / k / N``, a random one the error rate."""
    return float(risk_coverage(scores, errors)[1].mean())


@dataclass
class DetectionMetrics:
    """One detector on one test set. ``tpr`` is the detection rate at the threshold set on the
    calibration (held-out clean) scores for ``target_fpr``; ``test_fpr`` is the rate it gives on
    the clean test scores. Intervals are ``(low, high)`` percentile bootstrap bounds."""

    auroc: float
    auroc_ci: tuple[float, float]
    aupr: float
    aupr_ci: tuple[float, float]
    tpr: float
    tpr_ci: tuple[float, float]
    threshold: float
    target_fpr: float
    test_fpr: float
    n_clean: int
    n_suspicious: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(clean_scores: Any, suspicious_scores: Any, calibration_scores: Any, *, fpr: float = 0.05,
             n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> DetectionMetrics:
    """AUROC, AUPR and TPR at ``fpr`` with bootstrap intervals.

    ``calibration_scores`` are clean scores held out from the test set; the threshold is set on them
    only. Higher scores are more suspicious.
    """
    y, s = labels_and_scores(clean_scores, suspicious_scores)
    thr = threshold_at_fpr(calibration_scores, fpr)
    kw = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    return DetectionMetrics(
        auroc=auroc(y, s), auroc_ci=bootstrap_ci(y, s, "auroc", **kw),
        aupr=aupr(y, s), aupr_ci=bootstrap_ci(y, s, "aupr", **kw),
        tpr=detection_rate(s[y == 1], thr), tpr_ci=bootstrap_ci(y, s, "tpr", threshold=thr, **kw),
        threshold=thr, target_fpr=fpr, test_fpr=detection_rate(s[y == 0], thr),
        n_clean=int((y == 0).sum()), n_suspicious=int((y == 1).sum()))


# --------------------------------------------------------------------------- reports

def _cell(v: Any, floatfmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else format(float(v), floatfmt)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(u, (float, np.floating)) for u in v):
        return f"[{format(float(v[0]), floatfmt)}, {format(float(v[1]), floatfmt)}]"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".3f") -> str:
    """A Markdown table, one row per mapping. ``columns`` defaults to the keys in first-seen order;
    floats use ``floatfmt``, pairs of floats (intervals) print as ``[lo, hi]``, missing cells stay empty."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(r.get(c), floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(u) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if hasattr(v, "to_dict"):
        return _jsonable(v.to_dict())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(v) else float(v)
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (numpy values converted; NaN and inf become null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def write_report(stem: str | Path, rows: Sequence[Mapping[str, Any]], *, title: str | None = None,
                 meta: Mapping[str, Any] | None = None, columns: Sequence[str] | None = None
                 ) -> tuple[Path, Path]:
    """Write ``stem.md`` (a Markdown table under an optional title) and ``stem.json``
    (``{"meta": ..., "rows": ...}``). Returns both paths."""
    stem = Path(stem)
    md = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns)
    md_path = stem.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(md)
    return md_path, write_json(stem.with_suffix(".json"), {"meta": dict(meta or {}), "rows": list(rows)})


def plot_roc(curves: Mapping[str, tuple[Any, Any]], path: str | Path, title: str = "ROC") -> Path:
    """Save ROC curves to a PNG. ``curves``: label -> ``(clean_scores, suspicious_scores)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.5, 4.5), dpi=120)  # Agg canvas, no pyplot: no global backend state
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (clean, suspicious) in curves.items():
        y, s = labels_and_scores(clean, suspicious)
        f, t, _ = roc_curve(y, s)
        ax.plot(f, t, label=f"{label} (AUROC {auroc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (clean flagged)", ylabel="true positive rate (suspicious flagged)",
           title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
