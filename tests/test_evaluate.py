"""The evaluation harness end to end on the tiny digits CNN, its adaptive surrogate, and the CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nad_guard.calibration import CalibrationWarning
from nad_guard.evaluate import PROTOCOLS, EvalConfig, run_evaluation, soft_encode, write_outputs
from nad_guard.encoding import detector_input
from nad_guard.paths import LAYER_FEATURES
from training.paths import fit_paths

ROW_KEYS = {"protocol", "detector", "attack", "trained_on", "auroc", "auroc_ci", "aupr", "aupr_ci", "tpr", "tpr_ci",
            "threshold", "target_fpr", "test_fpr", "n_clean", "n_suspicious"}
FAST = dict(suite="fast", attacks=["fgsm", "pgd"], n_resamples=200, adaptive_images=40, progress=False)


@pytest.fixture(scope="module")
def paths(tiny_model, digits):
    torch.set_num_threads(1)
    return fit_paths(tiny_model, digits[0], None, epochs=12, batch_size=64, target_keep=0.3, device="cpu",
                     progress=False)


def with_errors(test, every: int = 12):
    """``test`` with every ``every``-th label shifted by one, so that each part of the holdout split holds
    mispredictions however well the tiny model does on the real labels."""
    labels = test.labels.clone()
    labels[::every] = (labels[::every] + 1) % 10
    return type(test)(test.images, labels, test.classes, test.name + "[relabelled]")


@pytest.fixture(scope="module")
def result(paths, digits, tmp_path_factory):
    return run_evaluation(paths, digits[0], with_errors(digits[1]), EvalConfig(**FAST),
                          cache_dir=tmp_path_factory.mktemp("atk"))


def test_every_protocol_reports_rows_with_intervals(result):
    protocols = {r["protocol"] for r in result["rows"]}
    assert protocols == set(PROTOCOLS) - {"adaptive"}
    for r in result["rows"]:
        assert ROW_KEYS <= set(r)
        assert r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1]
        assert 0 <= r["tpr"] <= 1 and r["n_clean"] > 0 and r["n_suspicious"] > 0
    seen = {(r["detector"], r["attack"]) for r in result["rows"] if r["protocol"] == "seen"}
    for det in ("nad-guard", "nad-guard[gboost,rich]", "nad-guard[logistic,full]", "nad-guard[gboost,full]", "mahalanobis-lr", "lid-lr", "msp", "energy", "deep-knn"):
        assert {(det, "fgsm"), (det, "pgd")} <= seen
    clean_only = {r["detector"] for r in result["rows"] if r["protocol"] == "clean-only"}
    assert {"nad-guard", "nad-guard[gaussian,rich]", "nad-guard[isoforest,rich]", "msp", "energy", "mahalanobis",
            "lid", "deep-knn"} <= clean_only  # nad-guard: the first of clean_methods, knn on summary
    unseen = [r for r in result["rows"] if r["protocol"] == "unseen" and r["detector"] == "nad-guard"]
    assert {(r["attack"], r["trained_on"]) for r in unseen} == {("fgsm", "pgd"), ("pgd", "fgsm")}
    assert set(result["summary"]) == protocols
    mis = {r["detector"]: r["trained_on"] for r in result["rows"] if r["protocol"] == "mispredictions"}
    assert mis["nad-guard"] == "all attacks + fit mispredictions"
    assert mis["nad-guard[logistic,rich,attacks only]"] == "all attacks" and "msp" in mis and "doctor" in mis
    err = [r for r in result["rows"] if r["detector"] == "nad-guard[error-detector]"]
    assert len(err) == 1 and err[0]["selected"] in err[0]["cv"]["auroc"]
    assert all(0 <= r["aurc"] <= 1 for r in result["rows"] if r["protocol"] == "mispredictions")
    for split in ("fit", "evaluation"):
        for a in ("fgsm", "pgd"):
            s = result["attacks"][split][a]
            assert 0 < s["success_rate"] <= 1 and s["mean_linf"] <= 0.3 + 1e-6 and s["seconds"] >= 0


def test_splits_are_disjoint_and_clean_sets_correct(result):
    d = result["data"]
    assert d["fit_images"] + d["calibration_images"] + d["evaluation_images"] == 360
    assert d["fit_clean"] <= d["fit_images"] and d["evaluation_clean"] + d["evaluation_mispredicted"] == \
        d["evaluation_images"]


def test_the_parts_are_recorded_by_content_hash(result, digits):
    """evaluate records which images its parts hold, as fit-detector does, so the two can be compared."""
    from nad_guard.provenance import compare, content_sha256
    from nad_guard.holdout import holdout_provenance

    prov = result["provenance"]
    test = with_errors(digits[1])
    assert prov["split_sha256"] == content_sha256(test) and "guard" not in prov
    assert [prov["parts"][p]["images"] for p in ("detector-fit", "calibration", "evaluation")] == \
        [result["data"][f"{k}_images"] for k in ("fit", "calibration", "evaluation")]
    _, record = holdout_provenance(test, "digits", None, 0)
    assert compare(prov, record)["status"] == "same"
    _, other = holdout_provenance(test, "digits", None, 1)  # another seed: other parts of the same split
    assert compare(prov, other)["status"] == "different" and compare(prov, None)["status"] == "unrecorded"


def test_path_detector_beats_chance_clearly(result):
    seen = {r["attack"]: r for r in result["rows"] if r["protocol"] == "seen" and r["detector"] == "nad-guard"}
    for attack, r in seen.items():
        assert r["auroc"] > 0.85, attack
        assert r["auroc_ci"][0] > 0.75, attack
        assert r["test_fpr"] < 0.2  # threshold from the separate calibration part
    assert result["summary"]["clean-only"]["nad_guard_mean_auroc"] > 0.75


def test_adaptive_attack_is_reported_for_every_defence(result):
    a = result["adaptive"]
    assert a["images"] == 40 and a["eps"] == pytest.approx(0.3)
    assert a["eps_grid"] == pytest.approx([0.0375, 0.075, 0.15, 0.3, 0.6])
    assert set(a["detectors"]) == {"nad-guard", "mahalanobis-lr", "msp", "feature-squeezing"}
    for det, v in a["detectors"].items():
        curve = list(v["curve"].values())
        assert all(0 <= c <= 1 for c in curve) and curve == sorted(curve)  # monotone in eps
        assert v["adaptive_evades"] == curve[3] and 0 <= v["plain_pgd_evades"] <= 1
        assert set(v["first_evaded_by"]["0.3"]) == set(a["objectives"])
        if v["budget_50"] is None:
            assert v["budget_50_bound"] == "above" and curve[-1] < 0.5
        else:
            assert 0 < v["budget_50"] <= 0.6 and curve[-1] >= 0.5
    assert "two detectors" in a["detectors"]["nad-guard"]["surrogate"]  # the deployed guard, as fit-detector ships
    assert "BPDA" in a["detectors"]["feature-squeezing"]["surrogate"]
    # the sanity reference: an attack that only wants a confident wrong class passes the MSP threshold
    assert a["detectors"]["msp"]["adaptive_evades"] > 0.5


@pytest.mark.parametrize("encoding", ["rich", "full"])
def test_soft_surrogate_matches_the_detector_input(paths, digits, encoding):
    x = digits[1].float(0, 32).requires_grad_(True)
    logits, pooled = paths.pooled_forward(x)
    masks = [paths.masks_[n] for n in paths.layer_names_]
    stats = [paths.stats_[n] for n in paths.layer_names_]
    soft = soft_encode([p.double() for p in pooled], logits.double(), masks, stats, encoding, tau=1e-4)
    hard = torch.as_tensor(detector_input(paths, x.detach(), encoding)[1])
    assert soft.shape == hard.shape
    # continuous columns are exact; with a tiny temperature the step columns agree too (ties aside)
    L = len(paths.layer_names_)
    step_cols = [j * len(LAYER_FEATURES) + LAYER_FEATURES.index(f) for j in range(L)
                 for f in ("nearest_is_pred", "pred_rank")] + [L * len(LAYER_FEATURES)]
    cont = [c for c in range(hard.shape[1]) if c not in step_cols]
    assert torch.allclose(soft.detach()[:, cont], hard[:, cont], atol=1e-4)
    assert (soft.detach()[:, step_cols] - hard[:, step_cols]).abs().mean() < 0.05
    (g,) = torch.autograd.grad(soft.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_outputs_and_cli(paths, tiny_model, digits, result, tmp_path):
    from safetensors.torch import save_file

    from nad_guard_cli import main

    files = write_outputs(result, tmp_path / "lib", command="test")
    assert (tmp_path / "lib" / "results.md").read_text().startswith("# Detection evaluation")
    assert json.loads((tmp_path / "lib" / "results.json").read_text())["command"] == "test"
    assert any(p.suffix == ".png" for p in files.values())
    assert files["risk_coverage"].is_file()
    md = (tmp_path / "lib" / "results.md").read_text()
    assert "## mispredictions: risk-coverage (AURC)" in md and "nad-guard[error-detector]" in md
    assert "## deployed: the guard `fit-detector` ships" in md and "guard flagged" in md
    assert json.loads((tmp_path / "lib" / "results.json").read_text())["deployed"]["two_detectors"] is True

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}, str(weights))
    paths.save(tmp_path / "artifact")
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, [
        "evaluate", "--artifact", str(tmp_path / "artifact"), "--model", "tiny_models:tiny_digits_cnn",
        "--weights", str(weights), "--data", "digits", "--suite", "fast", "--attacks", "fgsm,pgd",
        "--protocols", "seen,clean-only,adaptive", "--out", str(out), "--device", "cpu", "--bootstrap", "100",
        "--adaptive-images", "20", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary["summary"]) == {"seen", "clean-only"} and set(summary["adaptive"]) == {"nad-guard",
                                                                                              "mahalanobis-lr", "msp",
                                                                                              "feature-squeezing"}
    md = (out / "results.md").read_text()
    assert "## seen: AUROC" in md and "## Adaptive white-box attack" in md and "nad-guard evaluate" in md
    js = json.loads((out / "results.json").read_text())
    assert {r["protocol"] for r in js["rows"]} == {"seen", "clean-only"}
    assert js["machine"]["start"]["cores"] >= 1 and js["seconds"] > 0
    assert str(tmp_path) not in json.dumps(js) and "--out '<outside-repo>/cli'" in js["command"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "roc_seen.png" in pngs and "roc_clean-only_pgd.png" in pngs
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_cross_validated_selection_reports_its_choice(paths, digits, tmp_path):
    cfg = EvalConfig(**{**FAST, "protocols": ["seen", "mispredictions"], "select": "cv"})
    r = run_evaluation(paths, digits[0], with_errors(digits[1]), cfg, cache_dir=tmp_path)
    candidates = {"logistic,rich", "gboost,rich", "logistic,full", "gboost,full"}
    for protocol in ("seen", "mispredictions"):
        rows = [x for x in r["rows"] if x["protocol"] == protocol]
        for x in (x for x in rows if x["detector"] == "nad-guard"):
            cv = x["cv"]["auroc"]
            assert x["selected"] in candidates and set(cv) == candidates and cv[x["selected"]] == max(cv.values())
            # one attack: folds split images; fgsm + pgd + mispredictions: folds hold out whole kinds
            assert x["cv"]["folds_by"] == ("image" if protocol == "seen" else "attack")
            if protocol == "seen":  # 'nad-guard' is the chosen candidate's row, scored the same
                twin = next(v for v in rows if v["detector"] == f"nad-guard[{x['selected']}]"
                            and v["attack"] == x["attack"])
                assert twin["auroc"] == x["auroc"] and twin["tpr"] == x["tpr"]
    assert {x["detector"] for x in r["rows"] if x["protocol"] == "seen"} >= {f"nad-guard[{c}]" for c in candidates}
    md = write_outputs(r, tmp_path / "out")["md"].read_text()
    assert "## nad-guard's detector per training task" in md and "cross-validation on the fit part" in md
    with pytest.raises(ValueError, match="select must be one of"):
        run_evaluation(paths, *digits, EvalConfig(**{**FAST, "select": "best-on-test"}))


def test_unknown_protocol_is_refused(paths, digits):
    with pytest.raises(ValueError, match="unknown protocols"):
        run_evaluation(paths, *digits, EvalConfig(**{**FAST, "protocols": ["seen", "nope"]}))


def test_clean_only_detectors_name_their_encoding(paths, digits):
    cfg = EvalConfig(**{**FAST, "clean_methods": ["knn:summary", "gaussian"]})
    assert cfg.clean_specs() == [("knn", "summary"), ("gaussian", cfg.primary[1])]
    for bad in (["knn:wide"], ["svm"], ["logistic:rich"], []):
        with pytest.raises(ValueError, match="clean-only detector|clean_methods is empty"):
            run_evaluation(paths, *digits, EvalConfig(**{**FAST, "clean_methods": bad}))


def test_guard_with_the_full_encoding_round_trips(paths, digits, tmp_path):
    from nad_guard.detectors import PathDetector
    from nad_guard.guard import Guard

    x = digits[1].float(0, 80)
    _, X = detector_input(paths, x, "full")
    assert X.shape[1] > detector_input(paths, x, "rich")[1].shape[1]
    y = (np.arange(80) % 2).astype(int)  # any labels: only the plumbing is checked here
    with pytest.warns(CalibrationWarning):  # 40 clean calibration rows: a loose false-positive bound, said so
        det = PathDetector("logistic").fit(X, y).infer_threshold(X[:40])
    guard = Guard(paths, det, "full")
    guard.classifier.net.cpu()
    save_weights = tmp_path / "g"
    guard.save(save_weights)
    loaded = Guard.load(save_weights, classifier=paths.classifier)
    assert loaded.encoding == "full"
    np.testing.assert_allclose(loaded.run(x).score, det.score_samples(X), rtol=1e-5, atol=1e-9)


def test_image_columns_are_read_from_the_same_stream(paths, digits):
    """Multi-pass detectors' columns come from every batch of images, in order, next to the path features."""
    from nad_guard.baselines import default_layers
    from nad_guard.evaluate.features import compute_features

    test = digits[1]
    x = test.float(0, 50)
    cols = {"mean": lambda b: b.mean((1, 2, 3)).cpu().numpy(), "two": lambda b: b.flatten(1)[:, :2].cpu().numpy()}
    fs = compute_features(paths, x, test.labels[:50], ["rich"], default_layers(paths.classifier), batch_size=16,
                          image_columns=cols)
    assert fs.extra["mean"].shape == (50, 1) and fs.extra["two"].shape == (50, 2)
    np.testing.assert_allclose(fs.extra["mean"][:, 0], x.double().mean((1, 2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fs.extra["two"], x.flatten(1)[:, :2].numpy(), rtol=1e-6)
    assert fs.path["rich"].shape[0] == 50 and fs.base.logits.shape[0] == 50


def test_deployed_protocol_scores_the_shipped_guard_at_its_thresholds(result):
    """The deployed rows are the two-detector guard's decisions: the combined flag covers each detector's,
    its observed clean FPR is one number on every row, and the thresholds are the fit-detector shares."""
    from nad_guard.evaluate.deployed import DEPLOYED, DEPLOYED_ATTACK, DEPLOYED_ERROR

    rows = [r for r in result["rows"] if r["protocol"] == "deployed"]
    info = result["deployed"]
    assert info["two_detectors"], "the relabelled digits hold mispredictions in the fit part"
    assert info["attack_detector"]["fpr"] == pytest.approx(0.025) and info["error_detector"]["fpr"] == pytest.approx(0.025)
    attacks = {r["attack"] for r in rows}
    assert attacks == {"fgsm", "pgd", "mispredictions"}
    for attack in attacks:
        by = {r["detector"]: r for r in rows if r["attack"] == attack}
        assert {DEPLOYED, DEPLOYED_ATTACK, DEPLOYED_ERROR, "msp", "doctor", "energy"} <= set(by)
        # either detector's flag is a guard's flag: the guard flags at least as many as each
        assert by[DEPLOYED]["tpr"] >= max(by[DEPLOYED_ATTACK]["tpr"], by[DEPLOYED_ERROR]["tpr"]) - 1e-12
        assert by[DEPLOYED]["test_fpr"] >= by[DEPLOYED_ATTACK]["test_fpr"] - 1e-12
        lo, hi = by[DEPLOYED]["tpr_ci"]
        assert lo <= by[DEPLOYED]["tpr"] <= hi
    fprs = {r["test_fpr"] for r in rows if r["detector"] == DEPLOYED}
    assert len(fprs) == 1
    # the attack detector learned the attacks, not chance
    assert min(r["auroc"] for r in rows if r["detector"] == DEPLOYED_ATTACK and r["attack"] != "mispredictions") > 0.7


def test_the_adaptive_nad_guard_target_decides_as_the_deployed_guard(paths, digits, tmp_path):
    """The adaptive attack judges evasion by the shipped guard's real decision: on the evaluation part's
    correct images it flags what the deployed protocol's guard flags (its observed clean FPR)."""
    from nad_guard.evaluate import EvalData, FittedBaselines
    from nad_guard.evaluate.adaptive import TARGETS
    from nad_guard.evaluate.deployed import DEPLOYED, deployed_protocol

    cfg = EvalConfig(**{**FAST, "protocols": ["deployed"]})
    d = EvalData(paths, digits[0], with_errors(digits[1]), cfg, tmp_path, lambda _m: None)
    b = FittedBaselines(d, cfg.seed)
    with pytest.warns(CalibrationWarning):
        rows, _ = deployed_protocol(d, b, cfg, {})
    target = TARGETS["nad-guard"](d, b, cfg)
    clean = d.clean["evaluation"]
    with torch.no_grad():
        pred, flagged = target.decide(clean.float())
    assert (pred == clean.labels).all()
    fpr = next(r["test_fpr"] for r in rows if r["detector"] == DEPLOYED)
    assert abs(float(flagged.float().mean()) - fpr) <= 1 / len(clean) + 1e-9
    logits, score = target.loss_terms(clean.float()[:16].requires_grad_(True), torch.Generator())
    assert logits.shape == (16, 10) and score.shape == (16,) and score.requires_grad
    # feature squeezing: its real decision is the calibrated threshold on its own score, and BPDA gives the
    # attack a gradient through the squeezers (bit depth, median), which have none
    squeezing = TARGETS["feature-squeezing"](d, b, cfg)
    cal = d.clean["calibration"].float()
    with torch.no_grad():
        pred, flagged = squeezing.decide(cal)
    assert (pred == d.clean["calibration"].labels).all() and float(flagged.float().mean()) <= cfg.fpr
    x = cal[:16].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(squeezing.loss_terms(x, torch.Generator())[1].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
