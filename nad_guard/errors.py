"""The second question: is this prediction wrong? The error (misprediction) detector and the rule that
combines its answer with the attack detector's.

Attacks are confident and natural errors are not, so one detector asked both questions is pulled two
ways (``bench/experiments/2026-11-23-mispredictions-vs-msp``). A guard with an error detector asks them
separately:

* the **attack detector** (:class:`~nad_guard.detectors.PathDetector`) learns the fit part's correctly
  classified images against the suite's attacks only;
* the **error detector** (:class:`ErrorDetector`) learns the same correct images against the fit part's
  natural mispredictions. Its input row (:func:`error_rows`) is the three softmax-only scores of
  :data:`SOFTMAX_COLUMNS` followed by the guard's path-feature row, and its method is chosen among
  :data:`ERROR_METHODS` by cross-validated AUROC (correct vs mispredicted) on the fit part only
  (:func:`select_error_method`): a softmax score alone, or a logistic regression on the softmax scores, on
  the path features, or on both.

Both are calibrated by the project's one rule (:mod:`nad_guard.calibration`) on the calibration part's
correctly classified images, each at its share of the requested false-positive rate ``fpr``: the attack
detector at ``a = attack_share * fpr``, the error detector at ``b = (1 - attack_share) * fpr``
(``attack_share`` 0.5 by default). An input is flagged when ``p_attack <= a`` or ``p_error <= b``; by the
union bound a clean input is flagged with probability at most ``a + b = fpr``. The combined trust score
(:func:`combined_trust`) is the weighted Bonferroni p-value
``min(1, p_attack / attack_share, p_error / (1 - attack_share))`` (``min(1, 2 min(p_attack, p_error))`` at
the default), so that, as for a one-detector guard, flagged is ``trust_score <= fpr``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from nad_guard.baselines.confidence import doctor_score, energy_score, msp_score
from nad_guard.detectors import PathDetector

SOFTMAX_COLUMNS = ("msp", "doctor", "energy")  # the first columns of an error row, in this order
SCORE_METHODS = SOFTMAX_COLUMNS                 # one column as the score, nothing learned
LEARNED_METHODS = ("logistic", "logistic-softmax", "logistic-path")  # all columns, the softmax ones, the path ones
ERROR_METHODS = SCORE_METHODS + LEARNED_METHODS
DEFAULT_ATTACK_SHARE = 0.5
MIN_MISPREDICTIONS = 3  # fewer in the fit part: no cross-validation, no error detector


def softmax_columns(logits: Any) -> np.ndarray:
    """``(N, 3)``: MSP's ``1 - max p``, DOCTOR's ``1 - sum p^2`` and the energy, of ``logits`` ``(N, K)``
    at temperature 1 (higher = more suspicious, :mod:`nad_guard.baselines.confidence`)."""
    z = np.asarray(logits, dtype=np.float64)
    return np.stack([msp_score(z), doctor_score(z), energy_score(z)], 1)


def error_rows(logits: Any, path_rows: np.ndarray) -> np.ndarray:
    """The error detector's input ``(N, 3 + F)``: :func:`softmax_columns` then the path-feature rows
    (the guard's encoding, :func:`nad_guard.encoding.encode`)."""
    return np.hstack([softmax_columns(logits), np.asarray(path_rows, dtype=np.float64)])


class ErrorDetector(PathDetector):
    """Flags predictions likely to be wrong; a :class:`~nad_guard.detectors.PathDetector` (same calibration,
    ``infer_threshold``, ``trust``, ``calibration``, skops persistence) whose ``method`` is one of
    :data:`ERROR_METHODS` and whose rows are :func:`error_rows`:

    * ``msp``, ``doctor``, ``energy``: the row's column of that score (nothing is learned; ``fit`` only
      checks the rows);
    * ``logistic``: standardised logistic regression on every column; ``logistic-softmax`` on the three
      softmax columns; ``logistic-path`` on the path columns alone.

    ``y``: 0 = correctly classified, anything else = mispredicted. Higher score = more likely wrong.
    """

    def __init__(self, method: str = "logistic", random_state: int = 0):
        self.method = method
        self.random_state = random_state

    @property
    def supervised(self) -> bool:
        return self.method in LEARNED_METHODS

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = self.method in LEARNED_METHODS
        return tags

    def _columns(self, X: np.ndarray) -> np.ndarray:
        n = len(SOFTMAX_COLUMNS)
        return {"logistic": X, "logistic-softmax": X[:, :n], "logistic-path": X[:, n:]}[self.method]

    def fit(self, X, y=None) -> "ErrorDetector":
        """Learn the score (``X`` ``(N, 3 + F)`` rows of :func:`error_rows`); forgets any earlier fit and
        threshold."""
        self._forget()
        if self.method not in ERROR_METHODS:
            raise ValueError(f"unknown error detector method {self.method!r}; choose one of {', '.join(ERROR_METHODS)}")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=1)
        if X.shape[1] < len(SOFTMAX_COLUMNS) + (self.method == "logistic-path"):
            raise ValueError(f"error rows start with the {len(SOFTMAX_COLUMNS)} softmax columns {SOFTMAX_COLUMNS}; "
                             f"got {X.shape[1]} columns")
        if self.method in SCORE_METHODS:
            self.estimator_ = None
            return self
        y = self._labels(y, len(X))
        est = Pipeline([("scale", StandardScaler()),
                        ("clf", LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))])
        self.estimator_ = est.fit(self._columns(X), y)
        return self

    def score_samples(self, X) -> np.ndarray:
        """``(N,)``: higher = more likely a misprediction."""
        check_is_fitted(self, "estimator_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        if self.method in SCORE_METHODS:
            return X[:, SOFTMAX_COLUMNS.index(self.method)].copy()
        return self.estimator_.predict_proba(self._columns(X))[:, 1]


def select_error_method(X, y, folds: int = 3, seed: int = 0,
                        methods: tuple[str, ...] = ERROR_METHODS) -> tuple[str, dict[str, float]]:
    """The method of :data:`ERROR_METHODS` with the best mean AUROC (correct ``y == 0`` vs mispredicted)
    over ``folds`` stratified folds of ``X`` (rows of :func:`error_rows`; each row is one image, so
    stratified folds keep every image on one side). Pass the **fit part only**: nothing else should
    choose. Ties go to the earlier method (a softmax score before anything learned). Returns
    ``(best, {method: mean CV AUROC})``."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    X, y = np.asarray(X, dtype=np.float64), (np.asarray(y).ravel() != 0).astype(int)
    if len(X) != len(y):
        raise ValueError(f"X and y need one row each, got {len(X)} and {len(y)}")
    if folds < 2 or min((y == 0).sum(), (y == 1).sum()) < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} correct and {folds} mispredicted "
                         f"rows, got {(y == 0).sum()} and {(y == 1).sum()}")
    sums = {m: 0.0 for m in methods}
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    for tr, te in splits:
        for m in methods:
            det = ErrorDetector(m, random_state=seed).fit(X[tr], y[tr])
            sums[m] += roc_auc_score(y[te], det.score_samples(X[te]))
    cv = {m: float(v / len(splits)) for m, v in sums.items()}
    best = max(cv, key=lambda k: (cv[k], -list(cv).index(k)))
    return best, cv


def fit_error_detector(X_fit, y_fit, X_calibration_clean, fpr: float, *, folds: int = 3,
                       seed: int = 0) -> tuple[ErrorDetector, dict[str, Any]]:
    """Choose the method on the fit part's rows (:func:`select_error_method`), refit it on all of them and
    calibrate it on the calibration part's correctly classified rows at ``fpr`` (the error detector's share
    of the guard's rate). Returns the detector and the record for ``meta.json``: the method, the
    cross-validated AUROC of every candidate, the rows it learned from and its calibration."""
    best, cv = select_error_method(X_fit, y_fit, folds, seed)
    y = (np.asarray(y_fit).ravel() != 0).astype(int)
    det = ErrorDetector(best, random_state=seed).fit(X_fit, y)
    det.infer_threshold(X_calibration_clean, fpr=fpr)
    return det, {"method": best, "selection": {"folds": folds, "by": "stratified images, fit part only",
                                                "cv_auroc": cv, "selected": best},
                 "fit_correct": int((y == 0).sum()), "fit_mispredicted": int((y == 1).sum()),
                 "columns": list(SOFTMAX_COLUMNS) + ["path features (the guard's encoding)"],
                 "fpr": float(fpr), "threshold": det.threshold_, "calibration": det.calibration().to_dict()}


def combined_trust(p_attack: Any, p_error: Any, attack_share: float = DEFAULT_ATTACK_SHARE) -> np.ndarray:
    """The weighted Bonferroni combination ``min(1, p_attack / s, p_error / (1 - s))``, ``s = attack_share``:
    a p-value for "neither an attack nor an error" whenever each input is one; ``<= fpr`` exactly when
    ``p_attack <= s * fpr`` or ``p_error <= (1 - s) * fpr``."""
    if not 0 < attack_share < 1:
        raise ValueError(f"attack_share must be in (0, 1), got {attack_share}")
    pa, pe = np.asarray(p_attack, dtype=np.float64), np.asarray(p_error, dtype=np.float64)
    return np.minimum(1.0, np.minimum(pa / attack_share, pe / (1 - attack_share)))
