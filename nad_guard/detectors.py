"""Detectors on path-divergence features, and the trust decision.

Score convention (the whole project): **higher score = more suspicious** (less trustworthy).

A :class:`PathDetector` is a scikit-learn estimator on a feature matrix ``X`` of shape ``(N, F)``
(the divergence features of :mod:`nad_guard.paths`):

* supervised methods learn clean (``y = 0``) against adversarial (``y = 1``) features:
  ``"logistic"`` (standardised logistic regression) and ``"gboost"`` (histogram gradient boosting);
* clean-only methods need no adversarial data and ignore ``y``: ``"knn"`` (mean Euclidean distance
  to the ``k = 10`` nearest clean rows, standardised features), ``"gaussian"`` (Mahalanobis distance
  to a Ledoit-Wolf Gaussian fitted on standardised clean features) and ``"isoforest"`` (isolation
  forest).

:meth:`PathDetector.infer_threshold` turns the score into a decision using held-out *clean*
features only, by the project's one rule (:func:`nad_guard.calibration.threshold_at_fpr`: the
``ceil((n + 1)(1 - fpr))``-th smallest of the ``n`` clean scores), and the trust score of an input is
its conformal p-value among them,

    trust(x) = (1 + #{clean held-out scores >= score(x)}) / (n + 1)   in (0, 1],

the share of clean held-out inputs that look at least as suspicious as ``x``: 1 is fully
trustworthy. The flag is ``score > threshold``, which with this rule is exactly ``trust <= fpr``.
:meth:`PathDetector.calibration` says what the ``n`` clean scores guarantee (the false-positive
rate's finite-sample bounds, :mod:`nad_guard.calibration`).

Detectors are saved with skops (no pickle); loading accepts only an explicit allow-list of types.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.covariance import LedoitWolf
from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from nad_guard.calibration import (CalibrationWarning, FPRGuarantee, fpr_guarantee, p_values, threshold_at_fpr,
                                   warn_if_inadequate)

SUPERVISED = ("logistic", "gboost")
CLEAN_ONLY = ("knn", "gaussian", "isoforest")
METHODS = SUPERVISED + CLEAN_ONLY
DEFAULT_METHOD = "logistic"


@dataclass(frozen=True)
class TrustRecord:
    """The decision for one input. ``score``: higher = more suspicious; ``trust`` in (0, 1]:
    conformal p-value among clean held-out scores (higher = more trustworthy); ``flag``:
    ``score > threshold``."""

    score: float
    trust: float
    threshold: float
    flag: bool

    def to_dict(self) -> dict:
        return asdict(self)


class GaussianDistance(BaseEstimator):
    """Mahalanobis distance to a Ledoit-Wolf Gaussian of standardised clean features (higher = farther)."""

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        self.scaler_ = StandardScaler().fit(X)
        self.cov_ = LedoitWolf().fit(self.scaler_.transform(X))
        return self

    def score_samples(self, X) -> np.ndarray:
        check_is_fitted(self, "cov_")
        return np.sqrt(self.cov_.mahalanobis(self.scaler_.transform(np.asarray(X, dtype=np.float64))))


class KNNDistance(BaseEstimator):
    """Mean Euclidean distance from a row to its ``n_neighbors`` nearest clean rows, in standardised
    features (higher = farther). Exact (brute-force) search, so the fitted state is plain arrays."""

    def __init__(self, n_neighbors: int = 10):
        self.n_neighbors = n_neighbors

    def fit(self, X, y=None):
        X = np.asarray(X, dtype=np.float64)
        if self.n_neighbors < 1:
            raise ValueError(f"n_neighbors must be at least 1, got {self.n_neighbors}")
        if len(X) < self.n_neighbors:
            raise ValueError(f"knn needs at least n_neighbors={self.n_neighbors} clean rows to fit, got {len(X)}")
        self.scaler_ = StandardScaler().fit(X)
        self.nn_ = NearestNeighbors(n_neighbors=self.n_neighbors, algorithm="brute").fit(self.scaler_.transform(X))
        return self

    def score_samples(self, X) -> np.ndarray:
        check_is_fitted(self, "nn_")
        return self.nn_.kneighbors(self.scaler_.transform(np.asarray(X, dtype=np.float64)))[0].mean(1)


def _make(method: str, random_state: int):
    if method == "logistic":
        return Pipeline([("scale", StandardScaler()),
                         ("clf", LogisticRegression(C=1.0, max_iter=2000))])
    if method == "gboost":
        return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                                              l2_regularization=1.0, early_stopping=True,
                                              n_iter_no_change=20, random_state=random_state)
    if method == "isoforest":
        return IsolationForest(n_estimators=300, random_state=random_state)
    if method == "gaussian":
        return GaussianDistance()
    if method == "knn":
        return KNNDistance()
    raise ValueError(f"unknown detector method {method!r}; choose one of {', '.join(METHODS)}")


class PathDetector(BaseEstimator):
    """Flags inputs whose path features look unlike clean, correctly handled inputs.

    A scikit-learn estimator (``get_params``/``set_params``/``clone``; ``sklearn.utils.estimator_checks``
    pass but for those named with the reason in ``tests/test_detectors.py``) with the per-sample methods
    of scikit-learn's outlier detectors, **in this project's sign: higher = more suspicious**
    (scikit-learn's outlier detectors use the opposite sign):

    * :meth:`fit` learns the score; it forgets everything of an earlier fit, threshold included;
    * :meth:`score_samples` ``(N,)``: the suspicion score;
    * :meth:`infer_threshold` calibrates the decision on held-out *clean* features
      (:func:`nad_guard.calibration.threshold_at_fpr`, the project's one rule); only then do
      :meth:`decision_function` (``score - threshold``, positive = flagged), :meth:`predict` (the
      flags), :meth:`trust` (conformal p-values), :meth:`records` and :meth:`calibration` exist
      (scikit-learn's ``available_if``: ``hasattr`` is false before, and calling one raises an
      ``AttributeError`` whose cause, a :class:`~sklearn.exceptions.NotFittedError`, says to call
      ``infer_threshold``).

    There is no ``score(X, y)``: the quality of a detector is an AUROC or a detection rate at the
    calibrated threshold (:mod:`nad_guard.metrics`), not one accuracy.

    Parameters:
        method: ``logistic`` (the default everywhere: this class, ``fit_guard``, ``nad-guard
            fit-detector``), ``gboost`` (supervised), or ``knn``, ``gaussian``, ``isoforest`` (clean-only).
        random_state: seed for the stochastic methods.
    """

    def __init__(self, method: str = DEFAULT_METHOD, random_state: int = 0):
        self.method = method
        self.random_state = random_state

    @property
    def supervised(self) -> bool:
        return self.method in SUPERVISED

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = self.method in SUPERVISED
        return tags

    def _forget(self) -> None:
        """Drop every attribute an earlier :meth:`fit` or :meth:`infer_threshold` set (names ending in
        ``_``), so that a refit never keeps an old threshold or calibration."""
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, name)

    def fit(self, X, y=None) -> "PathDetector":
        """``X`` ``(N, F)``; ``y`` ``(N,)`` with 1 = adversarial / suspicious, 0 = clean (ignored by the
        clean-only methods, which fit on the ``y == 0`` rows when ``y`` is given, else on all rows).
        Forgets any earlier fit and threshold: call :meth:`infer_threshold` again afterwards."""
        self._forget()
        if self.method not in METHODS:
            raise ValueError(f"unknown detector method {self.method!r}; choose one of {', '.join(METHODS)}")
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=1)
        est = _make(self.method, self.random_state)
        if y is not None or self.supervised:
            y = self._labels(y, len(X))
        if self.supervised:
            est.fit(X, y)
        else:
            est.fit(X if y is None else X[y == 0])
        self.estimator_ = est
        return self

    def _labels(self, y, n: int) -> np.ndarray:
        """``y`` as 0 (clean) / 1 (suspicious): 0 and ``False`` are clean, any other integer label (or
        ``True``) suspicious, so bool masks and attack ids both work; non-integer values are refused."""
        if y is None:
            raise ValueError(f"method {self.method!r} is supervised: it requires y to be passed, but the target y is "
                             "None (give labels y: 0 clean, 1 adversarial)")
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y must be one label per row of X, shape ({n},), got {y.shape}")
        integer = y.dtype.kind in "biu" or (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all())
        if not integer:
            raise ValueError("Unknown label type: y must hold integer labels, 0 for clean rows and 1 (or any other "
                             f"integer) for adversarial / suspicious ones; got {y.dtype} values {y[:5].tolist()}")
        y = (y != 0).astype(int)
        if self.supervised and len(np.unique(y)) != 2:
            raise ValueError(f"method {self.method!r} needs both kinds of rows in y: 0 (clean) and 1 (adversarial); "
                             f"got only {'clean' if y[0] == 0 else 'adversarial'} ones (one class)")
        if not self.supervised and not (y == 0).any():
            raise ValueError(f"method {self.method!r} fits on the clean rows (y == 0) and y has none (one class)")
        return y

    def score_samples(self, X) -> np.ndarray:
        """Suspicion scores ``(N,)``: higher = more suspicious."""
        check_is_fitted(self, "estimator_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        if self.supervised:
            return self.estimator_.predict_proba(X)[:, 1]
        if self.method == "isoforest":
            return -self.estimator_.score_samples(X)
        return self.estimator_.score_samples(X)

    def infer_threshold(self, X_clean, fpr: float = 0.05) -> "PathDetector":
        """Fit the decision threshold on held-out clean features (never the test set), with the rule of
        :func:`nad_guard.calibration.threshold_at_fpr`. Raises
        :class:`~nad_guard.calibration.CalibrationError` when there are too few rows for ``fpr`` at all, and
        warns (:class:`~nad_guard.calibration.CalibrationWarning`) when they are too few for a tight
        bound on the realised false-positive rate (:meth:`calibration`)."""
        s = np.sort(self.score_samples(X_clean))
        threshold = threshold_at_fpr(s, fpr)
        self.calibration_scores_ = s
        self.threshold_ = threshold
        self.fpr_ = float(fpr)
        warn_if_inadequate(self.calibration())
        return self

    def _calibrated(self) -> bool:
        check_is_fitted(self, "estimator_")
        if not hasattr(self, "threshold_"):
            raise NotFittedError("this PathDetector has no threshold yet: call infer_threshold(X_clean, fpr) on "
                                 "held-out clean features")
        return True

    @available_if(_calibrated)
    def calibration(self, whole_split: int | None = None, calibration_share: float | None = None) -> FPRGuarantee:
        """What the clean calibration scores guarantee about the false-positive rate (calibration size,
        rank of the threshold, marginal and high-probability bounds; :func:`nad_guard.calibration.fpr_guarantee`,
        which says what ``whole_split`` and ``calibration_share`` change)."""
        return fpr_guarantee(len(self.calibration_scores_), self.fpr_, whole_split=whole_split,
                             calibration_share=calibration_share)

    @available_if(_calibrated)
    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - threshold_`` ``(N,)``: positive = flagged."""
        return self.score_samples(X) - self.threshold_

    @available_if(_calibrated)
    def trust(self, X) -> np.ndarray:
        """Conformal p-values ``(N,)`` in (0, 1]: higher = more trustworthy."""
        return self.trust_of_scores(self.score_samples(X))

    @available_if(_calibrated)
    def trust_of_scores(self, scores: np.ndarray) -> np.ndarray:
        """The trust (conformal p-values) of scores already computed by :meth:`score_samples`."""
        return p_values(self.calibration_scores_, scores)

    @available_if(_calibrated)
    def predict(self, X) -> np.ndarray:
        """Flags ``(N,)`` bool: ``score > threshold_`` (the same as ``trust(X) <= fpr_``)."""
        return self.score_samples(X) > self.threshold_

    @available_if(_calibrated)
    def records(self, X) -> list[TrustRecord]:
        """One :class:`TrustRecord` per row of ``X``."""
        s = self.score_samples(X)
        t = self.trust_of_scores(s)
        return [TrustRecord(float(a), float(b), self.threshold_, bool(a > self.threshold_)) for a, b in zip(s, t)]


# ------------------------------------------------------------------ model selection on training data only

def cross_val_auroc(method: str, X, y, groups, folds: int = 3, seed: int = 0) -> float:
    """Mean AUROC over ``folds`` stratified, grouped folds of a :class:`PathDetector` ``method`` on
    ``X`` ``(N, F)`` with labels ``y`` (1 = suspicious). ``groups`` ``(N,)``: rows sharing a value
    (an image and the adversarials made from it) always fall in the same fold, so no fold scores a
    perturbed copy of an image it was trained on."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    X, y, groups = np.asarray(X, dtype=np.float64), np.asarray(y).astype(int).ravel(), np.asarray(groups).ravel()
    if not (len(X) == len(y) == len(groups)):
        raise ValueError(f"X, y and groups must have one row each, got {len(X)}, {len(y)}, {len(groups)}")
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    for label, what in ((0, "clean"), (1, "suspicious")):
        if len(np.unique(groups[y == label])) < folds:
            raise ValueError(f"{folds}-fold cross-validation needs {what} rows from at least {folds} groups (images)")
    aucs = []
    for tr, te in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, groups):
        if len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2:
            raise ValueError("a fold lacks clean or suspicious rows: too few rows or groups for "
                             f"{folds}-fold cross-validation")
        det = PathDetector(method, random_state=seed).fit(X[tr], y[tr])
        aucs.append(roc_auc_score(y[te], det.score_samples(X[te])))
    return float(np.mean(aucs))


def cross_val_auroc_per_block(method: str, X, y, groups, blocks: dict[str, np.ndarray], folds: int = 3,
                              seed: int = 0) -> dict[str, float | None]:
    """Cross-validated AUROC of a :class:`PathDetector` ``method`` per suspicious block (an attack, or the
    mispredictions): in each of the folds of :func:`cross_val_auroc` (same split, same seed), the block's
    rows in the held-out fold against that fold's clean rows, scored by the detector trained on the other
    folds; averaged over folds, weighted by the block's rows in each. With groups from :func:`cv_groups`
    (``by="attack"``) every block lies in one fold, so its figure is that of an attack the detector was not
    trained on. ``blocks``: name -> row indices into ``X``; ``None`` for a block without rows."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    X, y, groups = np.asarray(X, dtype=np.float64), np.asarray(y).astype(int).ravel(), np.asarray(groups).ravel()
    if not (len(X) == len(y) == len(groups)) or folds < 2:
        raise ValueError(f"X, y and groups need one row each and folds at least 2, got {len(X)}, {len(y)}, "
                         f"{len(groups)} rows and {folds} folds")
    for label, what in ((0, "clean"), (1, "suspicious")):
        if len(np.unique(groups[y == label])) < folds:
            raise ValueError(f"{folds}-fold cross-validation needs {what} rows from at least {folds} groups")
    sums = {name: [0.0, 0] for name in blocks}
    member = {name: np.isin(np.arange(len(y)), np.asarray(rows, dtype=np.int64)) for name, rows in blocks.items()}
    for tr, te in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, groups):
        if len(np.unique(y[tr])) < 2 or not (y[te] == 0).any():
            raise ValueError(f"a fold lacks clean or suspicious rows: too few rows or groups for {folds}-fold "
                             "cross-validation")
        det = PathDetector(method, random_state=seed).fit(X[tr], y[tr])
        s = det.score_samples(X[te])
        clean = s[y[te] == 0]
        for name, inside in member.items():
            rows = inside[te] & (y[te] == 1)
            if rows.any():
                auc = roc_auc_score(np.r_[np.ones(rows.sum()), np.zeros(len(clean))], np.r_[s[rows], clean])
                sums[name][0] += auc * rows.sum()
                sums[name][1] += int(rows.sum())
    return {name: (total / n if n else None) for name, (total, n) in sums.items()}


def cv_groups(n_clean: int | np.ndarray, suspicious: Sequence[np.ndarray], folds: int = 3) -> tuple[np.ndarray, str]:
    """Cross-validation groups for the clean rows followed by the rows of each suspicious block (one
    block per attack or kind of error; each array gives its rows' source-image indices). ``n_clean``:
    the number of clean rows (row ``i`` is image ``i``), or an array of each negative row's source image
    (e.g. clean images followed by noisy copies of them, which then share their image's group).
    Returns ``(groups, by)``:

    * ``by="attack"`` when there are at least ``folds`` blocks: each block is one group, so every fold
      holds out whole attacks and the score is that of attacks the detector was not trained on (what a
      deployed detector meets);
    * ``by="image"`` otherwise: a suspicious row joins its source image's group (one attack: the score
      is that of new images under the same attack).
    """
    blocks = [np.asarray(b).ravel() for b in suspicious]
    clean = np.arange(n_clean) if np.ndim(n_clean) == 0 else np.asarray(n_clean).ravel()
    if len(blocks) >= folds:
        return np.concatenate([clean] + [np.full(len(b), -1 - i) for i, b in enumerate(blocks)]), "attack"
    return np.concatenate([clean] + blocks), "image"


def select_by_cv(candidates: dict[str, tuple[str, np.ndarray]], y, groups, folds: int = 3,
                 seed: int = 0) -> tuple[str, dict[str, float]]:
    """The candidate with the best :func:`cross_val_auroc`; ``candidates``: name -> ``(method, X)``
    (the rows of every ``X`` are the same inputs, in the same order, as ``y`` and ``groups``). Ties go
    to the earlier candidate. Returns ``(best name, {name: mean CV AUROC})``."""
    if not candidates:
        raise ValueError("no candidates to select from")
    cv = {name: cross_val_auroc(m, X, y, groups, folds, seed) for name, (m, X) in candidates.items()}
    best = max(cv, key=lambda k: (cv[k], -list(cv).index(k)))
    return best, cv


# ------------------------------------------------------------------ safe persistence (skops)

def _trusted_types() -> list[str]:
    """The types skops does not trust by default that a saved PathDetector (or its subclass
    ``nad_guard.errors.ErrorDetector``) contains (measured with ``skops.io.get_untrusted_types`` for every
    method); anything else is refused on load."""
    return ["nad_guard.detectors.GaussianDistance", "nad_guard.detectors.KNNDistance", "nad_guard.detectors.PathDetector",
            "nad_guard.errors.ErrorDetector",
            "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor", "sklearn.tree._tree.Tree"]


def save_detector(det: PathDetector, path: str | Path) -> None:
    """Write a fitted detector (with its threshold) to ``path`` in the skops format."""
    import skops.io as sio

    check_is_fitted(det, "threshold_")
    sio.dump(det, Path(path))


def load_detector(path: str | Path) -> PathDetector:
    """Load a detector saved by :func:`save_detector`, refusing any type outside the allow-list."""
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector file {path} does not exist")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable skops detector file: {e}") from e
    unexpected = sorted(set(untrusted) - set(_trusted_types()))
    if unexpected:
        raise ValueError(f"{path} contains types outside nad-guard's allow-list, refusing to load: {unexpected}")
    try:
        det = sio.load(path, trusted=untrusted)
    except Exception as e:
        raise ValueError(f"cannot load detector {path}: {e}") from e
    if not isinstance(det, PathDetector):
        raise ValueError(f"{path} holds a {type(det).__name__}, not a PathDetector")
    check_is_fitted(det, "threshold_")
    rule = threshold_at_fpr(det.calibration_scores_, det.fpr_)
    if det.threshold_ != rule:
        warnings.warn(f"{path}: the stored threshold {det.threshold_!r} is not the one the calibration rule gives on "
                      f"its stored clean calibration scores ({rule!r}): it was set by an older version of nad-guard. "
                      "It is used as stored; refit the detector (nad-guard fit-detector) to calibrate it by the "
                      "current rule", CalibrationWarning, stacklevel=2)
    return det

