"""The offline audit (nad_guard.audit, `nad-guard audit`): numbers checked by hand against the classifier
and samples.csv, invariance to the batch size, honest holdout parts, errors, and the HTML report
rendered in a real headless browser."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nad_guard.audit import (AuditError, check_fits, confusion_matrix, holdout_parts, load_split, run_audit,
                             wilson, write_report)
from nad_guard_cli import main
from nad_guard.data import ImageSet
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard
from nad_guard.provenance import PARTS
from nad_guard.runinfo import portable_path

pytestmark = pytest.mark.usefixtures("one_thread")

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def guard(one_thread) -> Guard:
    return Guard.load(DEFAULT_GUARD_DIR)


@pytest.fixture(scope="module")
def mnist_test() -> ImageSet:
    return load_split("mnist5k", "test")


@pytest.fixture(scope="module")
def audited(guard, mnist_test, tmp_path_factory):
    """The whole 1,000-image mnist5k test split audited with the bundled guard, and its report folder."""
    result = run_audit(guard, mnist_test, batch_size=256, progress=False, source="default", saliency_images=48)
    out = tmp_path_factory.mktemp("audit")
    write_report(result, out, command="pytest audited fixture")
    return result, out


def read_samples(out: Path) -> list[dict[str, str]]:
    with (out / "samples.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_report_folder_is_complete_and_self_contained(audited):
    result, out = audited
    summary = json.loads((out / "summary.json").read_text())
    rows = read_samples(out)
    assert len(rows) == 1000 == summary["n_images"] == len(result.clean)
    assert {r["input"] for r in rows} == {"clean"}
    must = ["index", "split_part", "true", "true_name", "pred", "pred_name", "correct", "confidence", "trust_score",
            "suspicion_score", "flagged", "nearest_path_class", "true_class_path_rank", "classifier_true_rank"]
    assert set(must) <= set(rows[0]) and [f"divergence:{l}" in rows[0] for l in result.layers] == [True] * 4
    assert sorted(int(r["index"]) for r in rows) == list(range(1000))
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(summary["figures"]) and len(pngs) == 9
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert summary["command"] == "pytest audited fixture" and summary["machine"]["cores"] >= 1
    assert summary["timings"]["clean_pass_s"] > 0 and summary["config"]["audited_images"] == 1000


def test_accuracy_and_confusion_equal_the_classifiers(guard, mnist_test, audited):
    result, _ = audited
    with torch.no_grad():
        pred = guard.classifier(mnist_test.float()).argmax(1).numpy()
    y = mnist_test.labels.numpy()
    conf = np.zeros((10, 10), dtype=int)
    np.add.at(conf, (y, pred), 1)
    s = result.summary
    assert s["accuracy"]["k"] == int((pred == y).sum()) and s["accuracy"]["share"] == pytest.approx((pred == y).mean())
    assert np.array_equal(np.asarray(s["confusion"]), conf)
    assert np.array_equal(confusion_matrix(y, pred, 10), conf)
    # the README's figure for the reference CNN
    assert s["accuracy"]["share"] == pytest.approx(0.985)


def test_nad_claim_shares_by_hand_from_samples_csv(audited):
    result, out = audited
    summary = json.loads((out / "summary.json").read_text())
    mis = [r for r in read_samples(out) if r["correct"] == "0"]
    n = len(mis)
    assert n == 15 == summary["n_mispredictions"] == len(summary["mispredictions"])
    assert summary["nad_claim"]["groups"]["mispredictions"]["n"] == n
    g = summary["nad_claim"]["groups"]["mispredictions"]
    by_hand = {
        "path_top1": sum(r["true_class_path_rank"] == "1" for r in mis),
        "path_top3": sum(int(r["true_class_path_rank"]) <= 3 for r in mis),
        "classifier_second": sum(r["classifier_true_rank"] == "2" for r in mis),
        "classifier_top3": sum(int(r["classifier_true_rank"]) <= 3 for r in mis),
        "path_is_pred": sum(r["nearest_path_class"] == r["pred"] for r in mis),
    }
    for m, k in by_hand.items():
        assert g[m]["k"] == k and g[m]["n"] == n and g[m]["share"] == pytest.approx(k / n)
        lo, hi = g[m]["ci"]
        assert lo <= k / n <= hi
    assert summary["nad_claim"]["chance"]["path_top1"] == pytest.approx(0.1)
    assert summary["nad_claim"]["chance"]["path_top3"] == pytest.approx(0.3)
    # a misprediction's true class is never the classifier's first choice
    assert all(int(r["classifier_true_rank"]) >= 2 for r in mis)
    # Wilson: symmetric around 1/2, zero successes start at 0, and the textbook value for 0 of 10
    assert wilson(5, 10)[0] == pytest.approx(1 - wilson(5, 10)[1])
    assert wilson(0, 10)[0] == 0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) is None


def test_claims_are_in_the_json_csv_and_html(audited):
    """NAD's k-most-similar test, each misprediction's path and the subnetwork-explanation test: in
    summary.json, samples.csv and index.html, and consistent with each other."""
    result, out = audited
    summary = json.loads((out / "summary.json").read_text())
    claims = summary["claims"]
    test = claims["sources"]["masks"]["nad_test"]["mispredictions"]
    np.testing.assert_allclose(claims["sources"]["masks"]["similarity"], result.similarity, rtol=1e-6, atol=1e-6)
    mis = [r for r in read_samples(out) if r["correct"] == "0"]
    ranks = [int(r["similar_rank:masks"]) for r in mis]
    assert all(r["similar_rank:masks"] == "" for r in read_samples(out) if r["correct"] == "1")
    for k in ("1", "3"):
        v = test["by_k"][k]
        assert v["n"] == 15 and v["hits"] == sum(r <= int(k) for r in ranks)
        assert v["chance"] == pytest.approx(int(k) / 9) and 0 <= v["p_value"] <= 1
        assert sum(c["n"] for c in v["per_class"]) == 15
    ex = claims["explanations"]
    rows = json.loads((out / ex["rows_file"]).read_text())["rows"]
    assert ex["n"] == 15 == len(rows) and {r["index"] for r in rows} == {int(r["index"]) for r in mis}
    assert [r["index"] for r in rows] == [r["index"] for r in summary["mispredictions"]]  # least trusted first
    assert all(len(r["layers"]["score_true"]) == 4 and len(r["channels"]) == 5 for r in rows)
    assert ex["knockout_flips"] == sum(r["knockout"]["flips"] for r in rows)
    sal = claims["subnetwork_explanations"]
    assert sal["n_images"] == 48 and len(sal["auc"]["full"]) == 48 and len(sal["mean_curve"]["subnetwork"]) == 11
    assert all(int(mis_i) not in sal["positions"] for mis_i in (r["index"] for r in mis))  # correct images only
    d = np.asarray(sal["auc"]["subnetwork"]) - np.asarray(sal["auc"]["full"])
    assert sal["subnetwork_minus_full"]["mean_difference"] == pytest.approx(float(d.mean()), abs=1e-5)  # AUCs: 5 decimals
    lo, hi = sal["subnetwork_minus_full"]["ci"]
    assert lo <= d.mean() <= hi and sal["verdict"]
    page = (out / "index.html").read_text()
    assert "NAD's own test" in page and "Verdict:" in page and "deciding filters" in page
    assert 'src="nad_test.png"' in page and 'src="deletion.png"' in page and page.count('class="cell"') == 15 * 4


def test_explanations_agree_with_the_guards_path_features(guard, mnist_test):
    """Each misprediction's per-layer scores are the guard's own class scores; the deciding filters are the
    largest contributions; the knock-out of channels is a real forward pass that can change the prediction."""
    from nad_guard.audit.explain import explain_mispredictions

    images, labels = mnist_test.images[:400].float() / 255.0, mnist_test.labels[:400]
    with torch.no_grad():
        pred = guard.classifier(images).argmax(1)
    wrong = torch.nonzero(pred != labels).flatten()
    assert len(wrong) >= 3
    ex = explain_mispredictions(guard.paths, images[wrong], labels[wrong], wrong.numpy(), top=3, batch_size=2)
    feats = guard.paths.features(images[wrong])
    assert ex["n"] == len(wrong) and sum(ex["divergence_layer_counts"].values()) + ex["never_diverged"] == ex["n"]
    for i, r in enumerate(ex["rows"]):
        assert r["pred"] == int(pred[wrong[i]]) and r["true"] == int(labels[wrong[i]]) and r["index"] == int(wrong[i])
        s = feats.class_scores[i]
        # rounded to 4 decimals in the rows
        np.testing.assert_allclose(r["layers"]["score_true"], s[:, r["true"]], rtol=0, atol=6e-5)
        np.testing.assert_allclose(r["layers"]["score_pred"], s[:, r["pred"]], rtol=0, atol=6e-5)
        np.testing.assert_allclose(r["layers"]["mass_pred"][-1], feats.mass_share[i, -1], rtol=0, atol=6e-5)
        contrib = [c["contribution"] for c in r["channels"]]
        assert len(contrib) == 3 and contrib == sorted(contrib, reverse=True)
        assert r["knockout"]["flips"] == (r["knockout"]["pred_after"] != r["pred"])
    assert ex["knockout_flips"] >= ex["random_knockout_flips"]


def test_similarity_and_confusion_are_compared_over_class_pairs(audited):
    result, _ = audited
    from scipy.stats import spearmanr

    svc = result.summary["similarity_vs_confusion"]
    sim, conf = result.similarity, np.asarray(result.summary["confusion"], float)
    rate = conf / conf.sum(1, keepdims=True)
    iu = np.triu_indices(10, 1)
    sym = (rate[iu] + rate.T[iu]) / 2
    assert svc["errors"]["n_pairs"] == 45 and svc["errors"]["n_pairs_confused"] == int((sym > 0).sum())
    assert svc["errors"]["rho"] == pytest.approx(spearmanr(sim[iu], sym).statistic)
    assert np.allclose(sim, result.similarity.T) and np.allclose(np.diag(sim), 1)


def test_holdout_parts_are_the_detectors_and_separation_uses_the_evaluation_part(audited, mnist_test, guard):
    from nad_guard.holdout import holdout_splits

    result, out = audited
    assert result.split["status"] == "verified"
    rows = read_samples(out)
    parts = {p: [int(r["index"]) for r in rows if r["split_part"] == p] for p in ("detector-fit", "calibration",
                                                                                   "evaluation")}
    assert [len(v) for v in parts.values()] == [400, 200, 400]
    fit, cal, ev = holdout_splits(mnist_test, 0)
    for name, part in zip(parts, (fit, cal, ev)):
        assert torch.equal(mnist_test.images[parts[name]], part.images), name
    sep = result.summary["separation"]
    assert sep["basis"] == "evaluation"
    errors = sep["rows"][0]
    ev_rows = [r for r in rows if r["split_part"] == "evaluation"]
    assert errors["n_positive"] == sum(r["correct"] == "0" for r in ev_rows)
    assert errors["n_correct"] + errors["n_positive"] == 400
    caught = [r["flagged"] == "1" for r in ev_rows if r["correct"] == "0"]
    assert errors["caught"] == pytest.approx(np.mean(caught))
    assert "evaluation part" in (out / "index.html").read_text()
    # the mispredictions the detector learnt as suspicious: the bundled guard's meta has the key's old name
    assert result.split["detector_fit_mispredicted"] == 8
    assert "trained on the 8 mispredictions of its fit part" in (out / "index.html").read_text()
    renamed = _with_detector_meta(guard, fit_mispredicted=None,  # the key's name now (0: a two-detector guard)
                                  fit_mispredicted_trained_as_suspicious=0)
    assert holdout_parts(renamed, mnist_test)[1]["detector_fit_mispredicted"] == 0


def _with_detector_meta(guard: Guard, **changes) -> Guard:
    meta = json.loads(json.dumps(guard.meta))
    for k, v in changes.items():
        if v is None:
            meta["detector"].pop(k, None)
        else:
            meta["detector"][k] = v
    return Guard(guard.paths, guard.detector, guard.encoding, meta)


def test_the_split_is_verified_from_the_record_not_from_scores(guard, mnist_test):
    """Scores that differ in their last bits (another CPU) change nothing: no score is an identity."""
    import copy

    other = copy.deepcopy(guard.detector)
    other.calibration_scores_ = other.calibration_scores_ * (1 + 3e-6)  # as if computed on another CPU
    moved = Guard(guard.paths, other, guard.encoding, guard.meta)
    parts, info = holdout_parts(moved, mnist_test)
    assert info["status"] == "verified" and "recorded in the guard's meta.json" in info["note"]
    record = guard.meta["detector"]["provenance"]
    for name in PARTS:
        assert sorted(np.flatnonzero(parts == name)) == record["parts"][name]["positions"]
    assert set(record["calibration_clean"]["positions"]) <= set(record["parts"]["calibration"]["positions"])
    assert record["calibration_clean"]["images"] == guard.meta["detector"]["calibration_clean"] == 199


def test_a_split_that_cannot_be_verified_is_said_so_with_what_to_do(guard, mnist_test):
    # no record (a guard fitted by an older nad-guard)
    old = _with_detector_meta(guard, provenance=None)
    result = run_audit(old, mnist_test, max_images=200, progress=False, gallery_size=0, saliency_images=0)
    assert result.split["status"] == "unrecorded" and "cannot be verified" in result.split["note"]
    assert "nad-guard fit-detector" in result.split["note"]
    assert set(result.clean.part) == {"unknown"} and result.summary["separation"]["basis"] == "all"
    assert "could not be determined" in result.summary["separation"]["note"]
    # the same split name with other content (one pixel changed): nothing can be told
    changed = ImageSet(mnist_test.images.clone(), mnist_test.labels, mnist_test.classes, mnist_test.name)
    changed.images[3, 0, 0, 0] ^= 1
    parts, info = holdout_parts(guard, changed)
    assert info["status"] == "mismatch" and "content differs" in info["note"] and set(parts) == {"unknown"}
    # a damaged record (one calibration position moved into the evaluation part)
    record = json.loads(json.dumps(guard.meta["detector"]["provenance"]))
    record["parts"]["calibration"]["positions"][0] = record["parts"]["evaluation"]["positions"][0]
    parts, info = holdout_parts(_with_detector_meta(guard, provenance=record), mnist_test)
    assert info["status"] == "mismatch" and "damaged" in info["note"] and set(parts) == {"unknown"}
    # another split: the detector saw none of it
    train = run_audit(guard, load_split("mnist5k", "train"), max_images=100, progress=False, gallery_size=0,
                      saliency_images=0)
    assert train.split["status"] == "independent" and set(train.clean.part) == {"not-used-by-detector"}


def test_holdout_parts_of_a_detector_fitted_on_a_sample(guard, mnist_test):
    """A detector fitted on `fit-detector --max-images 500`: its record holds the parts of that seeded
    sample, and every image outside the sample counts as unseen by the detector."""
    from nad_guard.holdout import holdout_indices, holdout_provenance, sample_heldout

    (fit, cal, ev), record = holdout_provenance(mnist_test, "mnist5k", 500, 0)
    assert record["sample"]["max_images"] == 500 and [len(fit), len(cal), len(ev)] == [200, 100, 200]
    parts, info = holdout_parts(_with_detector_meta(guard, provenance=record), mnist_test)
    sample, positions = sample_heldout(mnist_test, 500, 0)
    assert info["status"] == "verified" and "seeded sample of 500" in info["note"] and len(positions) == 500
    for name, pos, part in zip(PARTS, holdout_indices(sample.labels.numpy(), 0), (fit, cal, ev)):
        assert (parts[positions[pos]] == name).all() and torch.equal(mnist_test.images[positions[pos]], part.images)
    outside = np.setdiff1d(np.arange(len(mnist_test)), positions)
    assert len(outside) == 500 and (parts[outside] == "not-used-by-detector").all()


def test_the_report_says_what_the_calibration_guarantees(audited, guard):
    result, out = audited
    cal = json.loads((out / "summary.json").read_text())["calibration"]
    g = guard.detector.calibration()
    assert cal["n"] == 199 == g.n and cal["rank"] == 190 and cal["marginal_bound"] == pytest.approx(0.05)
    assert cal["realised_bound"] == pytest.approx(0.0776, abs=1e-4) and not cal["adequate"] and cal["needed"] == 240
    page = (out / "index.html").read_text()
    assert "clean calibration score 190 of 199" in page and "About 240 clean calibration inputs" in page
    assert "whole test split (1,000 images) is already used" in cal["warning"]  # mnist5k's: no larger sample
    # one detector: its threshold at the rate its metadata records
    assert f"threshold {guard.detector.threshold_:.4g} at 5% false positives)" in page


def test_ranks_in_cases_known_by_construction(guard, mnist_test):
    """Relabel each image with the class whose sub-architecture is nearest its path: that class ranks 1
    by definition; with the farthest one it ranks K; with the classifier's prediction, the classifier
    ranks it 1 and every prediction is correct."""
    pos = torch.as_tensor(run_audit(guard, mnist_test, max_images=100, progress=False, gallery_size=0,
                                     saliency_images=0).clean.position)
    x = mnist_test.images[pos]
    r = guard.run(x.float() / 255)
    sim = r.features.path_similarity

    def audit(labels: torch.Tensor):
        return run_audit(guard, ImageSet(x, labels, mnist_test.classes, "relabelled"), progress=False,
                         gallery_size=0, saliency_images=0).clean

    nearest = audit(sim.argmax(1))
    assert (nearest.true_path_rank == 1).all()
    assert np.array_equal(nearest.nearest_path, sim.argmax(1).numpy())
    unique_min = ((sim == sim.amin(1, keepdim=True)).sum(1) == 1).numpy()
    farthest = audit(sim.argmin(1))
    assert unique_min.mean() > 0.9 and (farthest.true_path_rank[unique_min] == 10).all()
    predicted = audit(r.features.pred)
    assert predicted.correct.all() and (predicted.clf_true_rank == 1).all()
    runner_up = audit(r.features.logits.topk(2, dim=1).indices[:, 1])
    assert not runner_up.correct.any() and (runner_up.clf_true_rank == 2).all()


def test_batch_size_changes_no_per_sample_value(guard, mnist_test):
    """Bit for bit: every forward pass is padded to a multiple of 8 rows (Guard.run), the promise the
    service's batching rests on, on one machine whatever its CPU."""
    a = run_audit(guard, mnist_test, max_images=120, batch_size=7, progress=False, gallery_size=5, saliency_images=0)
    b = run_audit(guard, mnist_test, max_images=120, batch_size=120, progress=False, gallery_size=5,
                  saliency_images=0)
    for name, va in vars(a.clean).items():
        assert np.array_equal(va, getattr(b.clean, name)), name
    assert [g.position for g in a.gallery] == [g.position for g in b.gallery]


def test_gallery_holds_the_least_trusted_inputs(audited, mnist_test):
    result, out = audited
    rows = read_samples(out)
    order = sorted(rows, key=lambda r: (float(r["trust_score"]), -float(r["suspicion_score"]), int(r["index"])))
    expected = [int(r["index"]) for r in order[:24]]
    assert [g.position for g in result.gallery] == expected
    for g in result.gallery:
        assert np.array_equal(g.image, mnist_test.images[g.position].numpy())


def test_attacks_are_audited_on_the_evaluation_part_only(guard, mnist_test, tmp_path):
    kw = dict(max_images=300, suite="fast", attacks=["fgsm"], progress=False, cache_dir=tmp_path / "cache",
              gallery_size=0, saliency_images=0)
    r = run_audit(guard, mnist_test, **kw)
    adv = r.adversarial["fgsm"]
    assert len(adv) > 0 and (adv.pred != adv.label).all()
    assert set(adv.part) == {"evaluation"}
    eval_correct = set(r.clean.position[(r.clean.part == "evaluation") & r.clean.correct])
    assert set(adv.position) <= eval_correct
    assert r.attack_stats["fgsm"]["attacked"] == len(eval_correct) and not r.attack_stats["fgsm"]["from_cache"]
    assert any(row["what"].startswith("adversarial (fgsm)") for row in r.summary["separation"]["rows"])
    write_report(r, tmp_path / "report")
    rows = read_samples(tmp_path / "report")
    assert sum(row["input"] == "fgsm" for row in rows) == len(adv)
    assert sum(row["input"] == "clean" for row in rows) == 300
    again = run_audit(guard, mnist_test, **kw)
    assert again.attack_stats["fgsm"]["from_cache"]
    assert np.array_equal(again.adversarial["fgsm"].score, adv.score)
    with pytest.raises(ValueError, match="has no attack 'nope'"):
        run_audit(guard, mnist_test, max_images=20, suite="fast", attacks=["nope"], progress=False)


def test_bad_input_gets_a_clear_error(guard, mnist_test, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["audit", "--artifact", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "does not exist" in res.output and "fit-detector" in res.output
    res = runner.invoke(main, ["audit", "--data", "digits", "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 1 and "1x8x8" in res.output and "1x28x28" in res.output
    res = runner.invoke(main, ["audit", "--data", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "nope" in res.output
    res = runner.invoke(main, ["audit", "--attack-names", "fgsm", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--attacks" in res.output

    empty = ImageSet(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.long),
                     mnist_test.classes, "empty")
    with pytest.raises(AuditError, match="holds no images"):
        check_fits(guard, empty)
    five = ImageSet(mnist_test.images[:10], mnist_test.labels[:10] % 5, [str(i) for i in range(5)], "five")
    with pytest.raises(AuditError, match="5 classes"):
        run_audit(guard, five, progress=False)
    with pytest.raises(AuditError, match="at least 10"):
        run_audit(guard, mnist_test, max_images=3, progress=False)
    with pytest.raises(AuditError, match="unknown data set"):
        load_split("nope")


def test_cli_writes_the_report_and_records_the_command(tmp_path):
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["audit", "--max-images", "100", "--batch-size", "64", "--saliency-images", "12",
                                    "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert printed["images"] == 100 == summary["n_images"]
    # an absolute --out is recorded as a placeholder: result files hold no absolute machine path
    assert summary["command"] == ("nad-guard audit --max-images 100 --batch-size 64 --saliency-images 12 --out "
                                  f"{shlex.quote(portable_path(out))} --quiet")
    assert summary["command"].endswith("--out '<outside-repo>/report' --quiet")
    assert str(tmp_path) not in json.dumps(summary)
    assert printed["detector_split"] == "verified" and "190 of 199" in printed["calibration"]
    assert "About 240" in printed["calibration_warning"]
    assert summary["config"]["data"] == "mnist5k/test" and summary["config"]["guard"] == "default"
    assert {"load_s", "clean_pass_s", "report_s", "total_s"} <= set(summary["timings"])


# --------------------------------------------------------------------------- the report in a real browser

def find_browser() -> str | None:
    """A Chromium executable: $NAD_GUARD_BROWSER, Debian's /usr/bin/chromium, or one on PATH."""
    for candidate in (os.environ.get("NAD_GUARD_BROWSER"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def need_browser(reason: str) -> None:
    if os.environ.get("NAD_GUARD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (NAD_GUARD_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def test_report_renders_in_a_headless_browser(audited, tmp_path):
    _, out = audited
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_browser("the browser test needs the playwright package (pip install '.[test]')")
    executable = find_browser()
    if executable is None:
        need_browser("no Chromium found (install Debian's 'chromium' package, or set NAD_GUARD_BROWSER)")
    summary = json.loads((out / "summary.json").read_text())
    errors, outside = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))

            def route(r):  # the report must not reach outside its folder
                if r.request.url.startswith("file://"):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()
            page.route("**/*", route)
            page.goto((out / "index.html").as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                                   "i.naturalWidth, i.naturalHeight])")
            headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert not errors and not outside, errors + outside
    assert len(images) == len(summary["figures"]) == len(list(out.glob("*.png")))
    assert sorted(src for src, *_ in images) == sorted(summary["figures"])
    for src, complete, width, height in images:
        assert complete and width > 0 and height > 0, src
    assert len(headings) == 11 and headings[0].startswith("1. How accurate")
    assert [h.split(". ", 1)[0] for h in headings] == [str(i) for i in range(1, 12)]
    assert any("most similar sub-architectures" in h for h in headings)
    assert any("subnetwork" in h for h in headings) and any("filters decided it" in h for h in headings)
