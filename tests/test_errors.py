"""Two questions, two calibrated answers: DOCTOR, AURC, the error detector (nad_guard.errors), the combined
decision of a two-detector guard, and guards without an error detector unchanged."""

import json
from pathlib import Path

import numpy as np
import pytest

from nad_guard.baselines import DOCTOR, Features
from nad_guard.baselines.confidence import doctor_score
from nad_guard.calibration import CalibrationWarning
from nad_guard.errors import (ERROR_METHODS, ErrorDetector, combined_trust, error_rows, fit_error_detector,
                              select_error_method, softmax_columns)
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard
from nad_guard.metrics import aurc, risk_coverage

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------ DOCTOR and AURC, by hand

def test_doctor_formula():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [np.log(3.0), 0.0, -np.inf, -np.inf], [50.0, 0.0, 0.0, 0.0]])
    d = doctor_score(logits)
    assert d[0] == pytest.approx(0.75)                       # uniform over 4: 1 - 4 * (1/4)^2
    assert d[1] == pytest.approx(1 - (0.75 ** 2 + 0.25 ** 2))  # p = (3/4, 1/4, 0, 0)
    assert d[2] == pytest.approx(0.0, abs=1e-12)
    assert doctor_score(logits[:2] * 2, temperature=2.0) == pytest.approx(d[:2])
    f = Features({}, logits.astype(np.float32))
    assert DOCTOR().score_features(f) == pytest.approx(d, abs=1e-6)


def test_doctor_input_preprocessing_runs_and_moves_towards_confidence(tiny_model, digits):
    x = digits[1].float(0, 16)
    plain = DOCTOR().score(tiny_model.net, x)
    pre = DOCTOR(epsilon=0.01).score(tiny_model.net, x)
    assert plain.shape == pre.shape == (16,)
    assert (pre <= plain + 1e-6).mean() > 0.8  # the step lowers D_alpha (raises sum p^2) on most images


def test_aurc_hand_computed():
    # sorted by score: errors 0, 1, 0, 1 -> risks 0, 1/2, 1/3, 2/4
    assert aurc([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    cov, risk = risk_coverage([0.4, 0.1, 0.3, 0.2], [1, 0, 0, 1])
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0] and risk == pytest.approx([0, 1 / 2, 1 / 3, 2 / 4])
    assert aurc([0.5] * 4, [1, 0, 0, 0]) == pytest.approx(0.25)  # ties: kept in random order, in expectation
    assert aurc([0.0, 1.0], [0, 1]) == pytest.approx(0.5 * (0 + 1 / 2))  # the perfect ranking's floor
    with pytest.raises(ValueError):
        aurc([], [])


# ------------------------------------------------------------------ the error detector on synthetic rows

def _synthetic(n_ok: int, n_wrong: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits_ok = rng.normal(0, 1, (n_ok, 5)) + np.eye(5)[rng.integers(0, 5, n_ok)] * 6
    logits_wrong = rng.normal(0, 1, (n_wrong, 5)) + np.eye(5)[rng.integers(0, 5, n_wrong)] * 1.5
    path = rng.normal(0, 1, (n_ok + n_wrong, 4))
    path[n_ok:, 0] += 1.0  # one path column carries signal too
    X = error_rows(np.vstack([logits_ok, logits_wrong]), path)
    return X, np.r_[np.zeros(n_ok), np.ones(n_wrong)]


def test_error_rows_and_score_methods():
    X, y = _synthetic(50, 20)
    assert X.shape == (70, 3 + 4)
    logits = np.array([[2.0, 0.0, -1.0]])
    assert softmax_columns(logits)[0] == pytest.approx([1 - np.exp(2) / np.exp([2, 0, -1]).sum(),
                                                        doctor_score(logits)[0], -np.log(np.exp([2, 0, -1]).sum())])
    for i, m in enumerate(("msp", "doctor", "energy")):
        assert np.array_equal(ErrorDetector(m).fit(X).score_samples(X), X[:, i])
    for m in ERROR_METHODS:
        s = ErrorDetector(m).fit(X, y).score_samples(X)
        assert s.shape == (70,) and np.isfinite(s).all()


def test_selection_reads_only_the_rows_it_is_given():
    X, y = _synthetic(300, 60)
    best, cv = select_error_method(X, y, folds=3, seed=0)
    assert set(cv) == set(ERROR_METHODS) and best == max(cv, key=cv.get)
    Xc, _ = _synthetic(200, 0, seed=5)
    det, info = fit_error_detector(X, y, Xc, 0.05, folds=3, seed=0)
    # other calibration rows change the threshold, never the choice
    det2, info2 = fit_error_detector(X, y, _synthetic(200, 0, seed=9)[0], 0.05, folds=3, seed=0)
    assert info["selection"] == info2["selection"] and info["method"] == best
    assert info["fit_correct"] == 300 and info["fit_mispredicted"] == 60
    with pytest.raises(ValueError, match="needs at least 3"):
        select_error_method(X[:302], y[:302], folds=3)  # 2 mispredictions: too few


def test_error_p_values_are_valid_on_clean_rows():
    Xc, _ = _synthetic(4000, 0, seed=1)
    X, y = _synthetic(300, 60, seed=2)
    det = ErrorDetector("logistic").fit(X, y).infer_threshold(Xc[:1000], fpr=0.1)
    p = det.trust(Xc[1000:])  # new clean rows, drawn like the calibration rows
    assert 0.08 <= (p <= 0.1).mean() <= 0.12
    assert 0.45 <= p.mean() <= 0.55  # uniform-ish
    assert np.array_equal(det.predict(Xc[1000:]), p <= 0.1)


def test_combined_rule_and_its_false_positive_rate():
    p = combined_trust([0.01, 0.5, 0.6, 1.0], [0.9, 0.02, 0.6, 1.0])
    assert p == pytest.approx([0.02, 0.04, 1.0, 1.0])
    assert combined_trust([0.03], [0.9], attack_share=0.75) == pytest.approx([0.04])
    rng = np.random.default_rng(0)
    pa, pe = rng.uniform(size=200_000), rng.uniform(size=200_000)  # clean inputs: both p-values uniform
    for share in (0.5, 0.3):
        t = combined_trust(pa, pe, share)
        assert (t <= 0.05).mean() <= 0.05 + 0.002
        assert np.array_equal(t <= 0.05, (pa <= share * 0.05) | (pe <= (1 - share) * 0.05))
    with pytest.raises(ValueError):
        combined_trust(pa, pe, 1.0)


# ------------------------------------------------------------------ a two-detector guard on digits

@pytest.fixture(scope="module")
def two_guard(digits, tmp_path_factory, one_thread):
    """A guard with both detectors, on a tiny CNN trained 2 epochs only (the 10-epoch one of conftest.py
    makes no mistake on the fit part: nothing for an error detector to learn); 14 of the fit part's 144
    images are mispredicted."""
    from nad_guard.holdout import holdout_splits
    from tiny_models import tiny_digits_cnn, train_tiny
    from training.paths import fit_paths

    train, test = digits
    weak = train_tiny(tiny_digits_cnn(), train, epochs=2)
    paths = fit_paths(weak, train, None, epochs=4, batch_size=64, target_keep=0.3, device="cpu", progress=False)
    fit, calib, evaluation = holdout_splits(test)
    seen = {}
    import nad_guard.errors as errors
    original = errors.select_error_method

    def spy(X, y, *a, **k):
        seen["rows"] = len(X)
        return original(X, y, *a, **k)

    errors.select_error_method = spy
    try:
        with pytest.warns(CalibrationWarning):
            g = fit_guard_two(paths, fit, calib, tmp_path_factory.mktemp("atk"))
    finally:
        errors.select_error_method = original
    return g, fit, calib, evaluation, seen


def fit_guard_two(paths, fit, calib, cache):
    from nad_guard.fitting import fit_guard

    return fit_guard(paths, fit, calib, suite="fast", attacks=["fgsm"], fpr=0.1, cache_dir=cache, progress=False,
                     error_detector=True)


def test_two_detector_guard_selects_on_the_fit_part_only(two_guard):
    g, fit, calib, _, seen = two_guard
    assert g.error_detector is not None, g.meta["detector_info"].get("error_detector_skipped")
    info = g.meta["error_detector_info"]
    assert seen["rows"] == len(fit) == info["fit_correct"] + info["fit_mispredicted"]
    assert set(info["selection"]["cv_auroc"]) == set(ERROR_METHODS)
    assert g.detector.fpr_ == pytest.approx(0.05) and g.error_detector.fpr_ == pytest.approx(0.05)
    assert g.fpr == pytest.approx(0.1)
    assert g.meta["detector_info"]["fit_mispredicted_trained_as_suspicious"] == 0  # the attack detector: attacks only


def test_two_detector_records_flag_and_round_trip(two_guard, tmp_path):
    from nad_guard.holdout import correct_subset

    g, _, _, evaluation, _ = two_guard
    assert g.error_detector is not None, "the fixture's weak CNN must leave mispredictions in the fit part"
    clean = correct_subset(g.paths, evaluation)
    res = g.run(clean.float())
    assert np.array_equal(res.flag, res.trust <= g.fpr)
    assert res.trust == pytest.approx(np.minimum(1, 2 * np.minimum(res.attack_trust, res.error_trust)))
    assert res.flag.mean() <= 0.1 + 0.1  # held-out correct images, ~140 of them: within sampling noise of 10%
    recs = res.records(g.classifier.class_names)
    assert {"attack_p_value", "error_p_value", "error_score", "error_threshold", "trust_score",
            "suspicion_score", "is_suspicious", "threshold"} <= set(recs[0])
    g.save(tmp_path / "guard")
    meta = json.loads((tmp_path / "guard" / "meta.json").read_text())
    assert meta["decision"]["attack_share"] == 0.5 and meta["error_detector"]["selection"]["selected"]
    from nad_guard.health import static_report

    assert static_report(tmp_path / "guard")["decision"]["fpr"] == pytest.approx(0.1)  # check's rate: the flag's
    g2 = Guard.load(tmp_path / "guard", classifier=g.classifier)
    assert isinstance(g2.error_detector, ErrorDetector)
    assert g2.predict(clean.float(0, 8)) == g.predict(clean.float(0, 8))


def test_default_guard_records_unchanged():
    """The bundled guard has no error detector: its records are those of the code before two detectors
    (stored from it; bit-identical on the machine that stored them), without the new fields. Compared as
    docs/reproducibility.md promises across CPUs: floats up to float32 rounding (1e-5), trust scores
    (multiples of 1/(n+1)) within one step, since an input that ties with a calibration score (the calibration
    images themselves) can move by one, and the flag wherever the score is not within rounding of the
    threshold."""
    from nad_guard import load_dataset

    g = Guard.load(DEFAULT_GUARD_DIR)
    assert g.error_detector is None and g.fpr == 0.05
    _, test = load_dataset("mnist5k")
    recs = g.predict(test.float(0, 64))[:16]
    ref = json.loads((DATA / "default_guard_records.json").read_text())
    assert [set(r) for r in recs] == [set(r) for r in ref]
    assert not any(k in recs[0] for k in ("attack_p_value", "error_p_value"))
    step = 1 / (len(g.detector.calibration_scores_) + 1)
    for r, e in zip(recs, ref):
        assert (r["label"], r["nearest_path_class"]) == (e["label"], e["nearest_path_class"])
        for k in ("confidence", "suspicion_score", "threshold"):
            assert r[k] == pytest.approx(e[k], rel=1e-5, abs=1e-6)
        assert r["trust_score"] == pytest.approx(e["trust_score"], abs=step + 1e-9)
        if abs(e["suspicion_score"] - e["threshold"]) > 1e-5 * max(1.0, abs(e["threshold"])):
            assert r["is_suspicious"] == e["is_suspicious"]


def test_audit_shows_both_p_values(two_guard, digits, tmp_path):
    import csv

    from nad_guard.audit import run_audit, write_report

    g = two_guard[0]
    assert g.error_detector is not None, "the fixture's weak CNN must leave mispredictions in the fit part"
    result = run_audit(g, digits[1], attacks=["fgsm"], suite="fast", attack_images=40, progress=False,
                       gallery_size=4, cache_dir=tmp_path / "atk")
    assert result.clean.error_trust is not None and len(result.clean.error_trust) == len(result.clean)
    files = write_report(result, tmp_path / "audit")
    with open(files["samples.csv"]) as fh:
        header = next(csv.reader(fh))
    assert header[-2:] == ["attack_p_value", "error_p_value"]
    html = files["index.html"].read_text()
    assert "Two detectors, two p-values per input" in html and "error detector (1 - error p-value)" in html
    assert result.summary["two_detectors"]["error_fpr"] == pytest.approx(0.05)
    # the header names whose threshold it is and each rate, as the guard records them (fpr=0.1, split in two)
    assert (f"attack detector&#x27;s threshold {g.detector.threshold_:.4g} at 5% FPR; error detector&#x27;s at 5%; "
            "flagged at 10% in all") in html and "false positives)" not in html


def test_the_service_schema_documents_both_p_values_as_optional():
    from service.service import TrustPrediction

    schema = TrustPrediction.model_json_schema()
    for k in ("attack_p_value", "error_p_value", "error_score", "error_threshold"):
        assert k in schema["properties"] and k not in schema.get("required", [])
    assert {"trust_score", "suspicion_score", "is_suspicious", "threshold"} <= set(schema["required"])


def test_readyz_detail_shows_both_detectors(two_guard, tmp_path):
    """/readyz's detail (service.readiness) for a two-detector guard, read from its saved meta.json: each
    detector's rate and calibration, and the split; a one-detector guard's detail has neither key."""
    from nad_guard.guard import read_guard_meta
    from service.readiness import readiness_detail

    g = two_guard[0]
    meta = read_guard_meta(g.save(tmp_path / "two"))
    detail = readiness_detail(meta["detector"], meta.get("error_detector"), meta.get("decision"))
    err = detail["error_detector"]
    assert err["method"] == meta["error_detector"]["method"] and err["fpr"] == g.error_detector.fpr_
    assert err["calibration"]["n"] == len(g.error_detector.calibration_scores_)
    assert detail["calibration"]["n"] == len(g.detector.calibration_scores_)
    assert detail["decision"] == meta["decision"] and detail["fpr"] + err["fpr"] == pytest.approx(meta["decision"]["fpr"])
    one = readiness_detail(Guard.load(DEFAULT_GUARD_DIR).meta["detector"])
    assert "error_detector" not in one and "decision" not in one
