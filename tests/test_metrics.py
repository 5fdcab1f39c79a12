"""Detection metrics on hand-made scores with known answers; calibration; bootstrap; reports."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from nad_guard.calibration import (CalibrationError, CalibrationWarning, calibration_size_needed, fpr_guarantee,
                                   min_calibration_size)
from nad_guard.metrics import (aupr, auroc, bootstrap_ci, detection_rate, evaluate, labels_and_scores,
                               markdown_table, plot_roc, roc_curve, threshold_at_fpr, write_report)


def test_perfect_reversed_and_tied_scores():
    y = [0, 0, 0, 1, 1]
    assert auroc(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert aupr(y, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert auroc(y, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert auroc(y, [0.5] * 5) == 0.5
    assert aupr(y, [0.5] * 5) == pytest.approx(2 / 5)  # one threshold: precision = prevalence


def test_hand_computed_auroc_and_aupr():
    # Pairs (positive, negative): 0.9 beats both negatives, 0.7 beats only 0.1 -> 3 of 4.
    y, s = [1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]
    assert auroc(y, s) == pytest.approx(0.75)
    # Thresholds 0.9: P=1, R=1/2; 0.8: P=1/2, R=1/2; 0.7: P=2/3, R=1 -> 1/2*1 + 0 + 1/2*2/3.
    assert aupr(y, s) == pytest.approx(0.5 + 1 / 3)
    # A tie between a positive and a negative counts half.
    assert auroc([0, 1, 1], [0.5, 0.5, 0.9]) == pytest.approx(0.75)
    fpr, tpr, thr = roc_curve(y, s)
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1] and thr[0] == np.inf


def test_agrees_with_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert aupr(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_threshold_and_detection_rate_by_hand():
    clean = np.arange(1.0, 11.0)  # 1..10
    # n = 10, fpr = 0.2: k = ceil(11 * 0.8) = 9, the 9th smallest; a new clean score lands above it with
    # probability (11 - 9) / 11 = 0.18 <= 0.2
    t = threshold_at_fpr(clean, fpr=0.2)
    assert t == 9.0 and detection_rate(clean, t) == 0.1
    assert threshold_at_fpr(np.arange(1.0, 20.0), fpr=0.05) == 19.0  # n = 19: k = ceil(20 * 0.95) = 19
    with pytest.raises(CalibrationError, match="needs at least 19"):
        threshold_at_fpr(np.arange(1.0, 19.0), fpr=0.05)  # n = 18: k = 19 > n
    assert detection_rate([7.0, 8.0, 9.0, 10.5], threshold=8.0) == 0.5  # strictly above flags


def test_the_issue_example_200_clean_scores_one_rule():
    """On 200 clean scores the guard and evaluate used to flag 9 and 10: one rule now, 9 (k = 191)."""
    from nad_guard.detectors import PathDetector
    from nad_guard.evaluate import EvalConfig, metrics_row

    rng = np.random.default_rng(5)
    det = PathDetector("gaussian").fit(rng.normal(size=(500, 3)))
    cal, clean_test, adv = rng.normal(size=(200, 3)), rng.normal(size=(1000, 3)), rng.normal(1.5, 1, size=(300, 3))
    with pytest.warns(CalibrationWarning, match="About 240"):  # 200 is fewer than a tight bound needs
        det.infer_threshold(cal, fpr=0.05)
    assert det.predict(cal).sum() == 9 == (det.score_samples(cal) > threshold_at_fpr(det.score_samples(cal))).sum()
    # evaluate's reported FPR and TPR (nad_guard.evaluate builds its rows with this call) are the deployed
    # detector's on the same scores
    row = metrics_row("nad-guard", "x", det.score_samples(clean_test), det.score_samples(adv),
                       det.score_samples(cal), EvalConfig(n_resamples=50))
    assert row["threshold"] == det.threshold_
    assert row["test_fpr"] == det.predict(clean_test).mean() and row["tpr"] == det.predict(adv).mean()


def test_conformal_guarantees_hold_by_simulation():
    """For exchangeable clean scores: the marginal FPR is (n + 1 - k) / (n + 1) <= fpr, and the realised FPR
    is below the Beta bound in at least 95% of calibration sets (uniform scores: realised FPR = 1 - threshold)."""
    rng = np.random.default_rng(6)
    for n, fpr in ((19, 0.05), (99, 0.1), (199, 0.05), (535, 0.05)):
        g = fpr_guarantee(n, fpr)
        assert g.rank == math.ceil((n + 1) * (1 - fpr) - 1e-9) and g.above == n - g.rank
        assert g.marginal_bound <= fpr + 1e-12
        realised = np.array([1 - threshold_at_fpr(rng.random(n), fpr) for _ in range(4000)])
        assert realised.mean() == pytest.approx(g.marginal_bound, abs=0.004)
        covered = (realised <= g.realised_bound).mean()
        assert 0.94 <= covered <= 0.96, (n, covered)
    assert fpr_guarantee(535, 0.05).adequate and not fpr_guarantee(199, 0.05).adequate
    assert min_calibration_size(0.05) == 19 and min_calibration_size(0.1) == 9 and min_calibration_size(0.01) == 99


def test_calibration_size_needed_is_where_the_bound_stays_tight():
    for fpr in (0.05, 0.1):
        needed = calibration_size_needed(fpr)
        tight = [fpr_guarantee(n, fpr).realised_bound <= 1.5 * fpr for n in range(needed - 60, needed + 200)]
        assert all(tight[60:]) and not all(tight[:60])
        g = fpr_guarantee(100, fpr)  # loose for both rates: the warning names the size that is enough
        assert not g.adequate and g.needed == needed and f"About {needed} clean calibration inputs" in g.warning
    assert calibration_size_needed(0.05) == 240


def test_the_small_calibration_advice_follows_what_the_split_allows():
    """A larger sample is advised only when one exists: a guard calibrated on its data set's whole test split
    (the provenance record holds no sample) is told so instead (nad_guard.provenance.exhausted_split)."""
    from nad_guard.provenance import exhausted_split

    sampled = {"sample": {"max_images": 3000}, "split_images": 10000, "fractions": {"calibration": 0.2}}
    whole = {"sample": None, "split_images": 1000, "fractions": {"calibration": 0.2}}
    assert exhausted_split(sampled) == {} and exhausted_split(None) == {}
    assert exhausted_split(whole) == {"whole_split": 1000, "calibration_share": 0.2}
    g = fpr_guarantee(199, 0.05, **exhausted_split(sampled))
    assert "a larger --max-images or the whole test split" in g.warning
    g = fpr_guarantee(199, 0.05, **exhausted_split(whole))
    assert g.warning.endswith("About 240 clean calibration inputs keep it within 1.5x: this data set's whole test "
                              "split (1,000 images) is already used and the calibration part is its 20%: accept "
                              "the looser rate, or fit on a data set with a larger test split")
    assert fpr_guarantee(535, 0.05, **exhausted_split(whole)).warning is None


def test_threshold_on_held_out_clean_reaches_target_fpr():
    rng = np.random.default_rng(1)
    calibration, test_clean = rng.normal(size=20000), rng.normal(size=20000)
    t = threshold_at_fpr(calibration, fpr=0.05)
    assert detection_rate(calibration, t) <= 0.05
    assert abs(detection_rate(test_clean, t) - 0.05) < 0.006


def test_bootstrap_contains_estimate_narrows_and_is_seeded():
    rng = np.random.default_rng(2)

    def sample(n):
        return labels_and_scores(rng.normal(size=n), rng.normal(1.0, 1.0, size=n))

    y, s = sample(100)
    lo, hi = bootstrap_ci(y, s, "auroc", n_resamples=500, seed=0)
    assert lo < auroc(y, s) < hi
    assert (lo, hi) == bootstrap_ci(y, s, "auroc", n_resamples=500, seed=0)
    plo, phi = bootstrap_ci(y, s, "aupr", n_resamples=500, seed=0)
    assert plo < aupr(y, s) < phi
    tlo, thi = bootstrap_ci(y, s, "tpr", threshold=0.5, n_resamples=500, seed=0)
    assert tlo <= detection_rate(s[y == 1], 0.5) <= thi
    y2, s2 = sample(3000)
    lo2, hi2 = bootstrap_ci(y2, s2, "auroc", n_resamples=500, seed=0, max_cells=600_000)  # chunked path
    assert hi2 - lo2 < (hi - lo) / 3  # width ~ 1/sqrt(n): 30x the data, about 5x narrower


def test_evaluate_report_and_plot(tmp_path):
    rng = np.random.default_rng(3)
    clean, adv, calib = rng.normal(size=400), rng.normal(2.0, 1.0, size=300), rng.normal(size=1000)
    m = evaluate(clean, adv, calib, fpr=0.05, n_resamples=200)
    assert m.threshold == threshold_at_fpr(calib, 0.05)
    assert m.tpr == detection_rate(adv, m.threshold) and m.test_fpr == detection_rate(clean, m.threshold)
    assert m.auroc_ci[0] < m.auroc < m.auroc_ci[1] and (m.n_clean, m.n_suspicious) == (400, 300)
    rows = [{"detector": "x|y", **m.to_dict()}, {"detector": "nan", "auroc": float("nan")}]
    md, js = write_report(tmp_path / "r", rows, title="T", meta={"seed": 0})
    text = md.read_text()
    assert text.startswith("# T\n") and "x\\|y" in text and f"{m.auroc:.3f}" in text
    assert f"[{m.auroc_ci[0]:.3f}, {m.auroc_ci[1]:.3f}]" in text
    data = json.loads(js.read_text())
    assert data["meta"] == {"seed": 0} and data["rows"][0]["auroc"] == m.auroc and data["rows"][1]["auroc"] is None
    assert markdown_table([{"a": 1, "b": 0.5}]) == "| a | b |\n| --- | --- |\n| 1 | 0.500 |\n"
    png = plot_roc({"detector": (clean, adv)}, tmp_path / "roc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="both"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="equal length"):
        aupr([0, 1], [0.1])
    with pytest.raises(ValueError, match="threshold"):
        bootstrap_ci([0, 1], [0.1, 0.2], "tpr")
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr([1.0, 2.0], fpr=1.0)
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr([1.0, 2.0], fpr=0.0)
    with pytest.raises(ValueError, match="finite"):
        threshold_at_fpr([1.0, np.nan], fpr=0.5)
