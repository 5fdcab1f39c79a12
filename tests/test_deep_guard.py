"""A guard's deep mode (nad_guard.deep): fit-detector --probes K on the tiny digits CNN, the deep run, the
artifact round trip, and batch independence."""

import json

import numpy as np
import pytest
import torch

from nad_guard.calibration import CalibrationWarning
from nad_guard.deep import DEEP_DETECTOR_FILE
from nad_guard.encoding import encode
from nad_guard.fitting import fit_guard
from nad_guard.guard import Guard
from nad_guard.health import format_report, static_report
from nad_guard.holdout import holdout_splits
from nad_guard.probes import ProbeSpec, probe_column_names, probe_features
from training.paths import fit_paths

pytestmark = pytest.mark.usefixtures("one_thread")
K = 4


@pytest.fixture(scope="module")
def deep_guard(tiny_model, digits, tmp_path_factory, one_thread):
    train, test = digits
    paths = fit_paths(tiny_model, train, None, epochs=8, batch_size=64, target_keep=0.3, device="cpu", progress=False)
    fit, calib, _ = holdout_splits(test)
    with pytest.warns(CalibrationWarning):
        return fit_guard(paths, fit, calib, suite="fast", attacks=["fgsm", "pgd"], method="logistic",
                         cache_dir=tmp_path_factory.mktemp("atk"), progress=False, probes=K)


def test_deep_run_is_probe_features_and_the_deep_detector(deep_guard, digits):
    g = deep_guard
    assert g.deep_k == K and g.probes == ProbeSpec(k=K)
    assert g.deep_detector.method == g.detector.method and g.deep_detector.fpr_ == g.detector.fpr_
    n_cols = len(probe_column_names(g.paths.layer_names_, g.probes))
    assert g.deep_detector.n_features_in_ == g.detector.n_features_in_ + n_cols
    x = digits[1].float(0, 16)
    res = g.run(x, deep=True)
    direct = probe_features(g.paths, x, g.probes, batch_size=16)
    rows = np.hstack([encode(direct.features, g.encoding, direct.pooled), direct.columns])
    s = g.deep_detector.score_samples(rows)
    np.testing.assert_allclose(res.score, s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.trust, g.deep_detector.trust_of_scores(s), atol=1e-12)
    assert res.threshold == g.deep_detector.threshold_
    assert np.array_equal(res.flag, s > g.deep_detector.threshold_) or np.abs(s - res.threshold).min() < 1e-5
    # the original's prediction comes from the same pass: equal to the single-pass guard's
    single = g.run(x)
    assert torch.equal(res.features.pred, single.features.pred)
    recs, plain = res.records(g.classifier.class_names), single.records(g.classifier.class_names)
    assert all(r["mode"] == "deep" and r["probes"] == K for r in recs)
    assert not any("mode" in r or "probes" in r for r in plain)  # single-pass records answer as before


def test_deep_run_does_not_depend_on_its_batch(deep_guard, digits):
    """float32 tolerance, not bit-exactness: the probes of a padded batch go through one pass of (k + 1) * B
    rows, and a row's place in that pass changes with B."""
    g, x = deep_guard, digits[1].float(0, 9)
    whole = g.run(x, deep=True)
    alone = [g.run(x[i:i + 1], deep=True) for i in (0, 5, 8)]
    mixed = g.run(torch.cat([x[4:], digits[1].float(100, 120), x[:4]]), deep=True, batch_size=64)
    np.testing.assert_allclose([a.score[0] for a in alone], whole.score[[0, 5, 8]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed.score[-4:], whole.score[:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed.score[:5], whole.score[4:], rtol=1e-5, atol=1e-5)


def test_deep_detector_round_trips_and_single_pass_guards_refuse_deep(deep_guard, digits, tmp_path, tiny_model):
    d = deep_guard.save(tmp_path / "g")
    meta = json.loads((d / "meta.json").read_text())
    deep = meta["deep"]
    assert (d / DEEP_DETECTOR_FILE).is_file() and deep["probes"]["k"] == K
    assert deep["threshold"] == deep_guard.deep_detector.threshold_ and deep["fpr"] == meta["detector"]["fpr"]
    assert deep["columns"] == probe_column_names(deep_guard.paths.layer_names_, ProbeSpec(k=K))
    assert deep["calibration"]["n"] == meta["detector"]["calibration"]["n"]
    report = static_report(d)  # nad-guard check says it
    assert report["deep"]["probes"] == K and report["deep"]["probe_columns"] == len(deep["columns"])
    assert f"deep mode: {K} probes" in format_report(report)
    back = Guard.load(d, classifier=tiny_model)
    x = digits[1].float(0, 12)
    np.testing.assert_allclose(back.run(x, deep=True).score, deep_guard.run(x, deep=True).score, rtol=1e-6)
    # without the deep detector: loads and answers as before, and deep mode is a clear error
    plain = Guard(back.paths, back.detector, back.encoding)
    assert plain.deep_k == 0
    with pytest.raises(ValueError, match="no deep detector"):
        plain.run(x, deep=True)
    p = plain.save(tmp_path / "plain")
    assert "deep" not in json.loads((p / "meta.json").read_text()) and not (p / DEEP_DETECTOR_FILE).exists()
    assert static_report(p)["deep"] is None
    np.testing.assert_array_equal(Guard.load(p, classifier=tiny_model).run(x).score, back.run(x).score)
