"""PathDetector: estimator contract, threshold calibration, trust scores and safe persistence."""

import numpy as np
import pytest
import skops.io as sio
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from nad_guard.detectors import (METHODS, PathDetector, TrustRecord, cross_val_auroc, cv_groups, load_detector,
                                 save_detector, select_by_cv)


def _data(n=400, shift=2.0, seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(size=(n, 4)), rng.normal(shift, 1.0, size=(n, 4))])
    return X, np.r_[np.zeros(n), np.ones(n)], rng


@pytest.mark.parametrize("method", METHODS)
def test_detectors_separate_and_calibrate(method):
    X, y, rng = _data()
    det = PathDetector(method).fit(X, y).infer_threshold(rng.normal(size=(1000, 4)), fpr=0.05)
    clean_test = rng.normal(size=(4000, 4))
    fpr = det.predict(clean_test).mean()
    assert 0.03 <= fpr <= 0.07  # calibrated on held-out clean data, close to the target
    far = rng.normal(4.0, 1.0, size=(500, 4))
    assert det.predict(far).mean() > 0.8
    assert det.score(far).mean() > det.score(clean_test).mean()  # higher = more suspicious
    t = det.trust(np.vstack([np.zeros((1, 4)), np.full((1, 4), 6.0)]))
    assert t[0] > 0.3 and t[1] < 0.01 and ((0 < t) & (t <= 1)).all()


def test_trust_is_the_conformal_p_value():
    det = PathDetector("gaussian").fit(np.random.default_rng(0).normal(size=(50, 2)))
    det.infer_threshold(np.random.default_rng(1).normal(size=(99, 2)), fpr=0.1)
    cal = det.calibration_scores_
    s = det.score(np.zeros((1, 2)))[0]
    assert det.trust(np.zeros((1, 2)))[0] == pytest.approx((1 + (cal >= s).sum()) / 100)
    rec = det.records(np.zeros((1, 2)))[0]
    assert isinstance(rec, TrustRecord) and rec.flag == (rec.score > rec.threshold) and rec.threshold == det.threshold_


def test_knn_distance_is_the_mean_distance_to_the_nearest_clean_rows():
    X = np.array([[0.0], [1.0], [3.0]])
    det = PathDetector("knn").fit(np.repeat(X, 4, axis=0))  # 10 neighbours among 12 rows
    sd = X.std()
    # from 1.0: the four 1.0 rows (0), the four 0.0 rows (1) and two 3.0 rows (2) -> (4 + 4) / 10
    assert det.score(np.array([[1.0]]))[0] == pytest.approx(0.8 / sd)
    from nad_guard.detectors import KNNDistance
    k1 = KNNDistance(n_neighbors=1).fit(X)
    assert k1.score_samples(np.array([[2.0], [5.0]])) == pytest.approx(np.array([1.0, 2.0]) / sd)
    with pytest.raises(ValueError, match="at least n_neighbors=10 clean rows"):
        PathDetector("knn").fit(X)


def test_estimator_contract():
    X, y, _ = _data(100)
    det = PathDetector("logistic", random_state=3)
    assert det.get_params() == {"method": "logistic", "random_state": 3}
    c = clone(det.fit(X, y))
    assert not hasattr(c, "estimator_")
    grid = GridSearchCV(PathDetector(), {"method": ["logistic", "gaussian"]}, cv=StratifiedKFold(2, shuffle=True, random_state=0),
                        scoring=lambda est, X_, y_: float(np.mean((est.score(X_) > 0.5) == y_))).fit(X, y)
    assert grid.best_params_["method"] in ("logistic", "gaussian")


def test_errors_are_clear():
    X, y, _ = _data(50)
    with pytest.raises(NotFittedError):
        PathDetector().score(X)
    with pytest.raises(NotFittedError):
        PathDetector("logistic").fit(X, y).predict(X)  # fitted but no threshold yet
    with pytest.raises(ValueError, match="supervised"):
        PathDetector("logistic").fit(X)
    with pytest.raises(ValueError, match="both 0"):
        PathDetector("logistic").fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="unknown detector method"):
        PathDetector("svm").fit(X, y)
    det = PathDetector("gaussian").fit(X)
    with pytest.raises(ValueError, match="3 features"):
        det.score(X[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        det.score(np.full((1, 4), np.nan))
    with pytest.raises(ValueError, match="need at least 20"):
        det.infer_threshold(X[:10], fpr=0.05)


def _grouped(n_images=120, seed=0):
    """Each image: a clean row and two adversarial rows made from it (one group); column 0 is the group."""
    rng = np.random.default_rng(seed)
    g = np.arange(n_images)
    clean = np.c_[g, rng.normal(size=(n_images, 3))]
    adv = [np.c_[g, rng.normal(1.5, 1.0, size=(n_images, 3))] for _ in range(2)]
    X = np.vstack([clean, *adv])
    return X, np.r_[np.zeros(n_images), np.ones(2 * n_images)], np.tile(g, 3), rng


def test_cross_validation_never_scores_an_image_it_trained_on(monkeypatch):
    X, y, groups, _ = _grouped()
    seen: list[tuple[set, set]] = []
    fit, score = PathDetector.fit, PathDetector.score

    def spy_fit(self, X_, y_=None):
        seen.append((set(X_[:, 0]), set()))
        return fit(self, X_, y_)

    def spy_score(self, X_):
        seen[-1][1].update(X_[:, 0])
        return score(self, X_)

    monkeypatch.setattr(PathDetector, "fit", spy_fit)
    monkeypatch.setattr(PathDetector, "score", spy_score)
    auc = cross_val_auroc("logistic", X, y, groups, folds=3)
    assert len(seen) == 3 and all(train and test and not train & test for train, test in seen)
    assert set().union(*(t for _, t in seen)) == set(groups)  # every image is scored once
    assert 0.8 < auc <= 1.0  # the shifted rows are easy to tell apart


def test_cv_groups_hold_out_whole_attacks_when_there_are_enough():
    src = [np.array([0, 2]), np.array([1]), np.array([0, 1, 2])]
    g, by = cv_groups(3, src, folds=3)
    assert by == "attack" and list(g) == [0, 1, 2, -1, -1, -2, -3, -3, -3]
    g, by = cv_groups(3, src[:2], folds=3)
    assert by == "image" and list(g) == [0, 1, 2, 0, 2, 1]
    # two attacks, two folds: each fold is scored on one whole attack it was not trained on
    X, y, groups, _ = _grouped()
    X[120:240, 0], X[240:, 0] = -1, -2  # column 0: the source image for clean rows, -attack for the others
    g, _ = cv_groups(120, [groups[120:240], groups[240:]], folds=2)
    tested: list[set] = []
    score = PathDetector.score

    def spy_score(self, X_):
        tested.append(set(X_[X_[:, 0] < 0, 0]))
        return score(self, X_)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PathDetector, "score", spy_score)
        auc = cross_val_auroc("logistic", X, y, g, folds=2)
    assert sorted(map(sorted, tested)) == [[-2.0], [-1.0]] and 0.8 < auc <= 1.0


def test_selection_prefers_the_informative_encoding_and_breaks_ties_in_order():
    X, y, groups, rng = _grouped()
    noise = rng.normal(size=X.shape)
    best, cv = select_by_cv({"logistic,noise": ("logistic", noise), "logistic,signal": ("logistic", X)}, y, groups)
    assert best == "logistic,signal" and cv["logistic,signal"] > cv["logistic,noise"] + 0.3
    best, _ = select_by_cv({"a": ("logistic", X), "b": ("logistic", X.copy())}, y, groups)
    assert best == "a"
    with pytest.raises(ValueError, match="one row each"):
        cross_val_auroc("logistic", X, y, groups[:-1])
    with pytest.raises(ValueError, match="suspicious rows from at least 3 groups"):
        cross_val_auroc("logistic", X[:6], np.r_[0, 0, 0, 0, 0, 1], np.arange(6), folds=3)
    with pytest.raises(ValueError, match="no candidates"):
        select_by_cv({}, y, groups)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, method):
    X, y, rng = _data(200)
    det = PathDetector(method).fit(X, y).infer_threshold(rng.normal(size=(200, 4)))
    save_detector(det, tmp_path / "d.skops")
    back = load_detector(tmp_path / "d.skops")
    probe = rng.normal(size=(50, 4))
    assert np.array_equal(back.score(probe), det.score(probe)) and back.threshold_ == det.threshold_


class Sneaky(BaseEstimator):
    pass


def test_load_refuses_unknown_types_and_garbage(tmp_path):
    sio.dump({"x": Sneaky()}, tmp_path / "evil.skops")
    with pytest.raises(ValueError, match="allow-list"):
        load_detector(tmp_path / "evil.skops")
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable skops"):
        load_detector(tmp_path / "junk.skops")
    with pytest.raises(FileNotFoundError):
        load_detector(tmp_path / "none.skops")
