"""Noise controls counted as negatives (``EvalConfig.noisy_negatives``, Lee et al. 2018's noisy images) in the
supervised protocols, on the digits fixtures: one run with them, one that scores the same control as an attack."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from nad_guard.evaluate import NOISY_NEGATIVE_PROTOCOLS, EvalConfig, run_evaluation, write_outputs
from training.paths import fit_paths

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(suite="fast", protocols=["seen", "unseen", "fgsm-only", "clean-only"], methods=["logistic"], encodings=["rich"],
            n_resamples=50, progress=False, maha_noise=(0.0, 0.01))
SUPERVISED = ("nad-guard", "mahalanobis-lr", "mahalanobis-lr[pre]", "lid-lr")


@pytest.fixture(scope="module")
def runs(tiny_model, digits, tmp_path_factory):
    """``(with, without)``: noise-l2 as negatives; noise-l2 scored as an attack (as before the setting)."""
    torch.set_num_threads(1)
    paths = fit_paths(tiny_model, digits[0], None, epochs=6, batch_size=64, target_keep=0.3, device="cpu",
                      progress=False)
    cache = tmp_path_factory.mktemp("atk")
    noisy = run_evaluation(paths, *digits, EvalConfig(**BASE, attacks=["fgsm", "pgd"], noisy_negatives=["noise-l2"],
                                                      select="cv"), cache_dir=cache)
    plain = run_evaluation(paths, *digits, EvalConfig(**BASE, attacks=["fgsm", "pgd", "noise-l2"]), cache_dir=cache)
    return noisy, plain


def test_the_controls_are_negatives_of_every_supervised_protocol_row(runs, tmp_path):
    noisy, plain = runs
    dd = noisy["data"]
    # noise keeps every copy: each part's negatives are its clean images twice over
    assert dd["negatives"] == {p: 2 * dd[f"{p}_clean"] for p in ("fit", "calibration", "evaluation")}
    assert noisy["attacks"]["calibration"]["noise-l2"]["n_kept"] == dd["calibration_clean"]
    assert set(NOISY_NEGATIVE_PROTOCOLS) >= {"seen", "fgsm-only"}
    rows = noisy["rows"]
    assert rows and not any(r["attack"].startswith("noise") for r in rows)  # never scored as an attack
    for r in rows:
        if r["protocol"] in NOISY_NEGATIVE_PROTOCOLS:
            assert r["n_clean"] == dd["negatives"]["evaluation"] and r["negatives"] == "clean+noise-l2", r
        else:  # clean-only keeps its clean negatives
            assert r["n_clean"] == dd["evaluation_clean"] and "negatives" not in r
    assert {(r["protocol"], r["detector"], r["attack"]) for r in rows
            if r["detector"] in SUPERVISED and r["protocol"] != "clean-only"} == {
        (p, det, a) for det in SUPERVISED for p in ("seen", "unseen") for a in ("fgsm", "pgd")} | {
        ("fgsm-only", det, "pgd") for det in SUPERVISED}
    # cross-validated choices on the fit part's negatives: one attack, so folds by source image
    assert {r["cv"]["folds_by"] for r in rows if r["detector"] in ("nad-guard", "mahalanobis-lr[pre]")
            and r["protocol"] != "clean-only"} == {"image"}
    assert all(r["n_clean"] == dd["evaluation_clean"] for r in plain["rows"])
    written = write_outputs(noisy, tmp_path / "out")
    assert json.loads(written["json"].read_text())["config"]["noisy_negatives"] == ["noise-l2"]
    md = written["md"].read_text()
    assert "**Noisy negatives** (`--noisy-negatives noise-l2`" in md and "noise-l2" in md
    assert "Noisy negatives" not in write_outputs(plain, tmp_path / "plain")["md"].read_text()


def test_a_detector_that_flags_noise_loses_auroc(runs):
    noisy, plain = runs
    n = noisy["data"]["evaluation_clean"]
    for det in ("msp", "mahalanobis-lr"):
        s, s0 = noisy["scores"]["seen"]["fgsm"][det], plain["scores"]["seen"]["fgsm"][det]
        # the negatives are the clean images' scores (the same as without the setting) and the noisy copies'
        if det == "msp":  # unsupervised: the same scores either way
            np.testing.assert_allclose(s["clean"][:n], s0["clean"], rtol=1e-5, atol=1e-6)
        clean, noise, adv = s["clean"][:n], s["clean"][n:], s["adv"]
        assert len(noise) == n and roc_auc_score(np.r_[np.zeros(n), np.ones(n)], np.r_[clean, noise]) > 0.6
        row = next(r for r in noisy["rows"] if (r["protocol"], r["detector"], r["attack"]) == ("seen", det, "fgsm"))
        row0 = next(r for r in plain["rows"] if (r["protocol"], r["detector"], r["attack"]) == ("seen", det, "fgsm"))

        def auc(neg):
            return roc_auc_score(np.r_[np.zeros(len(neg)), np.ones(len(adv))], np.r_[neg, adv])

        # the AUROC of the mixed negatives is the count-weighted mean of the two, and lower: noise looks suspicious
        assert row["auroc"] == pytest.approx((auc(clean) + auc(noise)) / 2, abs=1e-6)
        assert row["auroc"] < row0["auroc"] and auc(noise) < auc(clean)


def test_supervised_detectors_learn_the_noise_as_negative(runs):
    """Trained on FGSM with the noisy copies as label 0, a supervised detector tells the evaluation part's noisy
    copies from its FGSM adversarials better than the same detector trained on FGSM without them (nad-guard's
    detector clearly; the regressions over a few layer scores have little room)."""
    noisy, plain = runs
    n = noisy["data"]["evaluation_clean"]
    for det in SUPERVISED:
        s = noisy["scores"]["seen"]["fgsm"][det]  # trained on fit clean + fit noisy (label 0) + fit fgsm
        # trained on fit clean + fit fgsm: the same fitted detector scores both tasks (same data, same seed)
        noise0, adv0 = plain["scores"]["fgsm-only"]["noise-l2"][det]["adv"], plain["scores"]["seen"]["fgsm"][det]["adv"]
        np.testing.assert_allclose(plain["scores"]["fgsm-only"]["noise-l2"][det]["clean"],
                                   plain["scores"]["seen"]["fgsm"][det]["clean"], rtol=1e-5, atol=1e-6)
        with_noise = roc_auc_score(np.r_[np.zeros(n), np.ones(len(s["adv"]))], np.r_[s["clean"][n:], s["adv"]])
        without = roc_auc_score(np.r_[np.zeros(n), np.ones(len(adv0))], np.r_[noise0, adv0])
        # the noisy rows changed the fit: other scores for the same adversarials
        assert np.abs(s["adv"] - adv0).max() > 1e-3, det
        # measured: nad-guard 0.90 against 0.74 (0.85 against 0.77 with AVX2 kernels); the regressions on a
        # few layer scores gain 0.003-0.025, too little to demand more than "not worse"
        assert with_noise > without + (0.05 if det == "nad-guard" else -0.01), (det, with_noise, without)


def test_cli_refuses_controls_it_cannot_count(tmp_path):
    from nad_guard_cli.commands import main

    for extra in (["--noisy-negatives", "fgsm"], ["--noisy-negatives", "noise-l2", "--attacks", "fgsm,noise-l2"]):
        r = CliRunner().invoke(main, ["evaluate", "--artifact", "nad_guard/default_guard", "--data", "digits",
                                      "--suite", "fast", *extra, "--out", str(tmp_path / "out")])
        assert r.exit_code == 2 and "--noisy-negatives" in r.output, r.output
    help_text = CliRunner().invoke(main, ["evaluate", "--help"]).output
    assert "--noisy-negatives" in help_text
