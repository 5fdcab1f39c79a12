"""The multi-pass baselines (feature squeezing, the Odds are Odd), their rows in the evaluation, and the
rich+subnet encoding, on the digits fixtures."""

import numpy as np
import pytest
import torch

from nad_guard.baselines import FeatureSqueezing, OddsAreOdd
from nad_guard.baselines.odds import PAPER_NOISES, PAPER_THRESHOLD, noise_draws
from nad_guard.baselines.squeezing import (COLOR_SQUEEZERS, GRAY_SQUEEZERS, bit_depth, median_smooth, non_local_means,
                                           paper_squeezers, squeeze)
from nad_guard.encoding import ENCODINGS, detector_inputs, encode
from nad_guard.evaluate import EvalConfig, run_evaluation
from training.paths import fit_paths


@pytest.fixture(scope="module")
def paths(tiny_model, digits):
    torch.set_num_threads(1)
    return fit_paths(tiny_model, digits[0], None, epochs=12, batch_size=64, target_keep=0.3, device="cpu",
                     progress=False)


@pytest.fixture(scope="module")
def clean(paths, digits):
    """The first 300 test images the tiny model classifies correctly."""
    x, y = digits[1].float(0, 400), digits[1].labels[:400]
    with torch.no_grad():
        ok = paths.classifier(x).argmax(1) == y
    return x[ok][:300], y[ok][:300]


def test_squeezers_do_what_they_say(digits):
    x = digits[1].float(0, 20)
    assert paper_squeezers(1) == GRAY_SQUEEZERS == ("bit-1", "median-2")
    assert paper_squeezers(3) == COLOR_SQUEEZERS == ("bit-5", "median-2", "nlm-13-3-2")
    b1 = bit_depth(x, 1)
    assert set(b1.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(b1, (x >= 0.5).float())
    b5 = bit_depth(x, 5)
    assert torch.allclose(b5 * 31, (b5 * 31).round(), atol=1e-4) and (b5 - x).abs().max() <= 0.5 / 31 + 1e-6
    # 2x2 median: the upper of the middle two of each window that ends at the pixel, borders mirrored
    m = median_smooth(x, 2)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 0), (1, 0)), mode="symmetric")
    win = np.stack([padded[..., i:i + 8, j:j + 8] for i in (0, 1) for j in (0, 1)], -1)
    np.testing.assert_allclose(m.numpy(), np.sort(win, -1)[..., 2], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown squeezer"):
        squeeze(x, "blur-3")


def test_non_local_means_smooths_noise_and_keeps_flat_images(digits):
    flat = torch.full((2, 3, 16, 16), 0.4)
    out = non_local_means(flat, 13, 3, 2)  # a flat image stays flat (up to 1/255 from OpenCV's CIELAB round trip)
    assert len(out.unique()) == 1 and (out - flat).abs().max() <= 1.5 / 255
    x = torch.nn.functional.interpolate(digits[1].float(0, 8), scale_factor=4, mode="nearest")
    noisy = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 0.08).clamp(0, 1)
    den = non_local_means(noisy, 13, 3, 20)  # a strong filter, so that its effect on noise is plain to see
    assert ((den - x) ** 2).mean() < 0.7 * ((noisy - x) ** 2).mean()


def test_squeezing_scores_zero_when_the_squeezers_change_nothing(paths, clean):
    x = clean[0][:60]
    fs = FeatureSqueezing().fit(channels=1)
    assert fs.squeezers_ == GRAY_SQUEEZERS
    constant = torch.cat([torch.zeros(3, *x.shape[1:]), torch.ones(3, *x.shape[1:])])  # bit-1 and median-2 keep it
    np.testing.assert_allclose(fs.score(paths.classifier, constant), 0.0, atol=1e-12)
    binary = bit_depth(x, 1)
    np.testing.assert_allclose(FeatureSqueezing(["bit-1"]).fit().score(paths.classifier, binary), 0.0, atol=1e-12)
    cols = fs.columns(paths.classifier, x, batch_size=16)
    assert cols.shape == (60, 2) and (cols >= 0).all() and (cols <= 2 + 1e-9).all() and cols.max() > 0
    np.testing.assert_allclose(fs.score_columns(cols), cols.max(1))


def test_odds_statistics_are_standardized_on_clean_fit_images(paths, clean):
    x = clean[0]
    odds = OddsAreOdd(n_samples=4, seed=0)
    cols = odds.columns(paths.classifier, x, batch_size=64)
    E, K = len(PAPER_NOISES), 10
    assert cols.shape == (len(x), 1 + E * K)
    pred = cols[:, 0].astype(int)
    g = cols[:, 1:].reshape(len(x), E, K)
    np.testing.assert_allclose(g[np.arange(len(x)), :, pred], 0.0, atol=1e-12)  # f_{y,y} does not move
    np.testing.assert_allclose(odds.columns(paths.classifier, x[:20], batch_size=7), cols[:20], rtol=1e-4, atol=1e-5)
    odds.fit_columns(cols)
    z = odds.z_scores(cols)
    for c in range(K):
        zc = z[pred == c]
        if len(zc) >= odds.min_class_images:
            np.testing.assert_allclose(zc.mean(0), 0.0, atol=1e-6)
            other = [k for k in range(K) if k != c]
            np.testing.assert_allclose(zc[:, :, other].std(0), 1.0, rtol=1e-5)
    s = odds.score_columns(cols)
    assert s.shape == (len(x),) and abs(PAPER_THRESHOLD - 3.0902) < 1e-3
    assert odds.detect_columns(cols).mean() < 0.1  # the paper's rule rarely flags the clean images it was fitted on
    d = noise_draws((1, 4, 4), ["s0.01", "u0.02", "n0.5"], 50, seed=1)
    assert d.shape == (3, 50, 1, 4, 4) and torch.allclose(d[0].abs(), torch.tensor(0.01))
    assert d[1].abs().max() <= 0.02 and 0.3 < d[2].std() < 0.7


def test_rich_subnet_encoding_appends_the_subnetwork_confidence(paths, clean):
    x = clean[0][:40]
    assert "rich+subnet" in ENCODINGS
    f, m = detector_inputs(paths, x, ["rich", "rich+subnet"])
    ref = paths.features(x, subnetwork=True)
    assert m["rich+subnet"].shape[1] == m["rich"].shape[1] + 2
    np.testing.assert_allclose(m["rich+subnet"][:, :-2], m["rich"], rtol=1e-6)
    np.testing.assert_allclose(m["rich+subnet"][:, -2], ref.subnet_confidence.double().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["rich+subnet"][:, -1], (ref.msp - ref.subnet_confidence).double().numpy(),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(encode(ref, "rich"), m["rich"], rtol=1e-6)  # rich is the same with the pass or without
    with pytest.raises(ValueError, match="class-subnetwork"):
        encode(paths.features(x), "rich+subnet")


def test_evaluation_rows_of_the_multipass_baselines_and_the_subnet_encoding(paths, digits, tmp_path):
    cfg = EvalConfig(suite="fast", attacks=["fgsm", "pgd"], n_resamples=100, progress=False, max_images=600,
                     protocols=["seen", "clean-only"], encodings=["rich", "rich+subnet"],
                     multipass_baselines=["feature-squeezing", "odds"], odds_samples=2)
    r = run_evaluation(paths, *digits, cfg, cache_dir=tmp_path)
    rows = {(x["protocol"], x["detector"], x["attack"]): x for x in r["rows"]}
    for protocol in ("seen", "clean-only"):
        for det in ("feature-squeezing", "odds"):
            for attack in ("fgsm", "pgd"):
                row = rows[(protocol, det, attack)]
                assert 0 <= row["auroc"] <= 1 and row["n_suspicious"] > 0
    assert rows[("seen", "nad-guard[logistic,rich+subnet]", "pgd")]["auroc"] > 0.5
    rule = rows[("clean-only", "odds", "pgd")]["paper_rule"]
    assert rule["threshold"] == pytest.approx(PAPER_THRESHOLD, abs=1e-4) and 0 <= rule["flagged_adv"] <= 1
    assert r["config"]["multipass_baselines"] == ["feature-squeezing", "odds"]
    with pytest.raises(ValueError, match="unknown multi-pass"):
        run_evaluation(paths, *digits, EvalConfig(suite="fast", attacks=["fgsm"], progress=False, max_images=300,
                                                  protocols=["clean-only"], multipass_baselines=["magnet"]),
                       cache_dir=tmp_path)
