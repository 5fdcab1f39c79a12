"""Mahalanobis with Lee et al.'s input pre-processing (nad_guard.baselines.mahalanobis_pre) and its
evaluation row (nad_guard.evaluate.maha_pre), on the digits fixtures."""

import numpy as np
import pytest
import torch

from nad_guard.attacks import generate, get_suite
from nad_guard.baselines import Mahalanobis, extract_features
from nad_guard.baselines.mahalanobis_pre import LEE_NOISE, magnitude_block, preprocessed_distances, stage_layers
from nad_guard.evaluate import EvalConfig, run_evaluation, write_outputs
from training.paths import fit_paths

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tiny_model, digits):
    train = digits[0].subset(range(600))
    layers = stage_layers(tiny_model)
    feats = extract_features(tiny_model, train, layers)
    return Mahalanobis(layers=layers, combine="last").fit_features(feats, train.labels.numpy()), train


def test_preprocessing_makes_clean_images_look_more_in_distribution(tiny_model, digits, fitted):
    maha, train = fitted
    x = digits[1].float()[:80]
    cols = preprocessed_distances(tiny_model, maha, x, LEE_NOISE)
    n_layers = len(maha.layers_)
    assert cols.shape == (80, len(LEE_NOISE) * n_layers)
    # magnitude 0 is the plain per-layer distance
    plain = maha.layer_scores(extract_features(tiny_model, x, maha.layers_))
    np.testing.assert_allclose(magnitude_block(cols, LEE_NOISE, 0.0), plain, rtol=1e-5, atol=1e-6)
    # Lee et al.'s rationale: the step against the distance's gradient brings a clean image closer to
    # its class's Gaussian, at every layer, and a larger (small) step closer still on average
    drops = {m: plain - magnitude_block(cols, LEE_NOISE, m) for m in LEE_NOISE if m > 0}
    for m, drop in drops.items():
        assert (drop > 0).mean(0).min() >= 0.9, m
    assert drops[0.005].mean() > drops[0.001].mean() > drops[0.0005].mean() > 0
    # the same numbers as the raw-input path of Mahalanobis(noise=m) (one magnitude, one pass per layer)
    raw = Mahalanobis(layers=maha.layers_, combine="last", noise=0.005).fit(tiny_model, train, batch_size=256)
    np.testing.assert_allclose(raw.score(tiny_model, x), magnitude_block(cols, LEE_NOISE, 0.005)[:, -1],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="magnitudes"):
        preprocessed_distances(tiny_model, maha, x, [-0.01])


def test_evaluation_reports_the_preprocessed_row_with_its_chosen_magnitude(tiny_model, digits, tmp_path):
    torch.set_num_threads(1)
    paths = fit_paths(tiny_model, digits[0], None, epochs=6, batch_size=64, target_keep=0.3, device="cpu",
                      progress=False)
    mags = (0.0, 0.01, 0.002)
    cfg = EvalConfig(suite="fast", attacks=["fgsm", "pgd"], protocols=["seen", "fgsm-only"], n_resamples=50,
                     progress=False, maha_noise=mags)
    r = run_evaluation(paths, *digits, cfg, cache_dir=tmp_path / "atk")
    rows = [x for x in r["rows"] if x["detector"] == "mahalanobis-lr[pre]"]
    assert {(x["protocol"], x["attack"]) for x in rows} == {("seen", "fgsm"), ("seen", "pgd"), ("fgsm-only", "pgd")}
    for x in rows:
        cv = x["cv"]["auroc"]
        assert set(cv) == {"noise=0", "noise=0.01", "noise=0.002"} and cv[x["selected"]] == max(cv.values())
        assert x["cv"]["folds_by"] == "image" and 0.5 < x["auroc"] <= 1
    assert {x["detector"] for x in r["rows"]} >= {"mahalanobis-lr", "mahalanobis-lr[pre]"}
    written = write_outputs(r, tmp_path / "out")
    import json
    assert json.loads(written["json"].read_text())["config"]["maha_noise"] == list(mags)


def test_cli_refuses_bad_magnitudes(tmp_path):
    from click.testing import CliRunner

    from nad_guard_cli.commands import main

    for bad in ("0.01,abc", "-0.01"):
        r = CliRunner().invoke(main, ["evaluate", "--artifact", "nad_guard/default_guard", "--data", "digits",
                                      "--maha-noise", bad, "--out", str(tmp_path / "out")])
        assert r.exit_code == 2 and "--maha-noise" in r.output, r.output
