"""Guard: fit-detector on the tiny digits CNN, predictions, trust records and the artifact round trip."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from nad_guard.calibration import CalibrationWarning
from nad_guard.encoding import encode
from nad_guard.guard import Guard
from nad_guard.metrics import auroc
from nad_guard.paths import ArtifactError
from nad_guard.fitting import fit_guard
from nad_guard.holdout import correct_subset, holdout_splits
from training.paths import fit_paths

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def guard(tiny_model, digits, tmp_path_factory, one_thread):
    train, test = digits
    paths = fit_paths(tiny_model, train, None, epochs=12, batch_size=64, target_keep=0.3, device="cpu", progress=False)
    fit, calib, _ = holdout_splits(test)
    with pytest.warns(CalibrationWarning, match="clean calibration inputs"):  # digits: ~70, fewer than 240
        g = fit_guard(paths, fit, calib, suite="fast", attacks=["fgsm", "pgd"],
                      method="gboost", cache_dir=tmp_path_factory.mktemp("atk"), progress=False)
    return g


def test_guard_flags_attacks_on_held_out_images(guard, digits):
    from nad_guard.attacks import generate

    _, test = digits
    *_, evaluation = holdout_splits(test)
    clean = correct_subset(guard.paths, evaluation)
    res = generate(guard.classifier, clean, attack="pgd", suite="fast", progress=False)
    s_clean = guard.run(clean.float()).score
    s_adv = guard.run(res.adv_images).score
    y = np.r_[np.zeros(len(s_clean)), np.ones(len(s_adv))]
    assert auroc(y, np.r_[s_clean, s_adv]) > 0.85  # clearly better than chance on unseen images
    fpr = (s_clean > guard.detector.threshold_).mean()
    assert fpr < 0.15  # threshold set on the other (calibration) half at 5%


def test_records_schema_and_batch_independence(guard, digits):
    x = digits[1].float(0, 9)
    recs = guard.predict(x)
    assert len(recs) == 9
    r = recs[0]
    assert set(r) >= {"label", "class_name", "confidence", "trust_score", "is_suspicious", "threshold",
                      "nearest_path_class", "per_layer"}
    assert 0 < r["trust_score"] <= 1 and 0 <= r["confidence"] <= 1
    assert len(r["per_layer"]) == len(guard.paths.layer_names_)
    assert all(0 <= layer["divergence"] <= 1 for layer in r["per_layer"])
    # bit for bit, whatever the batch: every forward pass is padded to a multiple of 8 rows (the promise
    # the service's batching rests on; on one machine, whatever its CPU's instructions)
    assert [guard.predict(x[i:i + 1])[0] for i in range(9)] == recs
    assert guard.predict(torch.cat([x[4:], digits[1].float(100, 120), x[:4]]))[-4:] == recs[:4]


def test_artifact_round_trip_and_errors(guard, digits, tmp_path, tiny_model):
    d = guard.save(tmp_path / "g")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["detector"]["method"] == "gboost" and meta["classifier"]["builder"] == "custom"
    with pytest.raises(ArtifactError, match="wrapped by hand"):
        Guard.load(d)
    back = Guard.load(d, classifier=tiny_model)
    x = digits[1].float(0, 20)
    assert np.array_equal(back.run(x).score, guard.run(x).score)
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "detector.skops").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="detector"):
        Guard.load(broken, classifier=tiny_model)
    (tmp_path / "nodet").mkdir()
    guard.paths.save(tmp_path / "nodet")
    with pytest.raises(ArtifactError, match="no classifier"):
        Guard.load(tmp_path / "nodet", classifier=tiny_model)


def test_encodings(guard, digits):
    f = guard.paths.features(digits[1].float(0, 5))
    summary, rich = encode(f, "summary"), encode(f, "rich")
    n_layers, k = len(f.layers), 10
    assert rich.shape == (5, summary.shape[1] + n_layers * k)
    # the predicted class's own column of s_k - s_p is zero at every layer
    rel = rich[:, summary.shape[1]:].reshape(5, n_layers, k)
    assert np.allclose(rel[np.arange(5), :, f.pred.numpy()], 0)
    with pytest.raises(ValueError, match="encoding"):
        encode(f, "raw")


def test_fit_detector_can_choose_its_detector_by_cross_validation(guard, digits, tmp_path):
    fit, calib, _ = holdout_splits(digits[1])
    with pytest.warns(CalibrationWarning):
        g = fit_guard(guard.paths, fit, calib, suite="fast", attacks=["fgsm", "pgd"], select="cv",
                      cache_dir=tmp_path, progress=False)
    sel = g.meta["detector_info"]["selection"]
    assert set(sel["cv_auroc"]) == {"logistic,rich", "gboost,rich", "logistic,full", "gboost,full"}
    assert sel["cv_auroc"][sel["selected"]] == max(sel["cv_auroc"].values()) and sel["folds"] == 3
    # fgsm, pgd (and the mispredictions, if any): whole kinds are held out once there are as many as folds
    kinds = 2 + (g.meta["detector_info"]["fit_mispredicted_trained_as_suspicious"] > 0)
    assert sel["folds_by"] == ("attack" if kinds >= 3 else "image")
    assert sel["selected"] == f"{g.detector.method},{g.encoding}"
    back = Guard.load(g.save(tmp_path / "g"), classifier=guard.classifier)
    x = digits[1].float(0, 20)
    assert back.encoding == g.encoding and np.array_equal(back.run(x).score, g.run(x).score)
    with pytest.raises(ValueError, match="clean-only"):
        fit_guard(guard.paths, fit, calib, suite="fast", method="gaussian", select="cv", progress=False)


def test_clean_only_knn_guard_round_trips(guard, digits, tmp_path):
    """A guard whose detector saw no attack (knn on the summary encoding) saves with skops and loads
    back under the allow-list, giving the same scores."""
    fit, calib, _ = holdout_splits(digits[1])
    with pytest.warns(CalibrationWarning):
        g = fit_guard(guard.paths, fit, calib, suite="fast", method="knn", encoding="summary", progress=False)
    assert g.detector.method == "knn" and g.encoding == "summary"
    assert g.meta["detector_info"].get("attacks", {}) == {}  # clean-only: no attack generated
    back = Guard.load(g.save(tmp_path / "g"), classifier=guard.classifier)
    x = digits[1].float(0, 20)
    assert np.array_equal(back.run(x).score, g.run(x).score)
    assert back.detector.threshold_ == g.detector.threshold_


def test_fit_detector_records_provenance_and_calibration(guard, digits, tmp_path):
    """What the detector was fitted and calibrated on goes into meta.json (positions and content hashes),
    with the calibration's size and false-positive bounds; the audit verifies the split from it alone."""
    from nad_guard.audit import holdout_parts
    from nad_guard.provenance import PARTS, content_sha256
    from nad_guard.holdout import holdout_provenance

    test = digits[1]
    (fit, calib, ev), record = holdout_provenance(test, "digits", None, 0)
    with pytest.warns(CalibrationWarning, match="clean calibration inputs"):  # digits: ~70 clean calibration images
        g = fit_guard(guard.paths, fit, calib, suite="fast", method="knn", encoding="summary", progress=False,
                      provenance=record)
    meta = json.loads((g.save(tmp_path / "g") / "meta.json").read_text())["detector"]
    prov, cal = meta["provenance"], meta["calibration"]
    assert prov["data"] == "digits" and prov["split_name"] == test.name and prov["split_sha256"] == content_sha256(test)
    assert prov["sample"] is None and prov["seed"] == 0 and prov["fractions"] == dict(zip(PARTS, (0.4, 0.2, 0.4)))
    for name, part in zip(PARTS, (fit, calib, ev)):
        pos = prov["parts"][name]["positions"]
        assert torch.equal(test.images[pos], part.images) and prov["parts"][name]["sha256"] == content_sha256(test, pos)
    correct = correct_subset(guard.paths, calib)
    assert prov["calibration_clean"]["images"] == len(correct) == meta["calibration_clean"] == cal["n"]
    assert torch.equal(test.images[prov["calibration_clean"]["positions"]], correct.images)
    assert cal["rank"] == math.ceil((cal["n"] + 1) * 0.95) and not cal["adequate"] and cal["warning"]
    assert cal["marginal_bound"] <= 0.05 < cal["realised_bound"]
    back = Guard.load(tmp_path / "g", classifier=guard.classifier)
    parts, info = holdout_parts(back, test)
    assert info["status"] == "verified" and [int((parts == p).sum()) for p in PARTS] == [len(fit), len(calib), len(ev)]


def test_the_documented_example_answers():
    """docs/serving.md quotes the bundled guard's answers to the example images to 4 significant digits (the
    precision that holds across CPUs, docs/reproducibility.md): they must be what the guard answers."""
    import re
    from pathlib import Path

    from nad_guard.guard import DEFAULT_GUARD_DIR
    from service.inputs import decode_image

    root = Path(__file__).resolve().parents[1]
    quoted = [json.loads(block) for block in
              re.findall(r"```json\n(\[\n.*?\n\])\n```", (root / "docs" / "serving.md").read_text(), re.S)]
    default = Guard.load(DEFAULT_GUARD_DIR)
    spec = default.classifier.spec
    images = [np.load(root / "service" / "examples" / "digit_7.npy"),
              decode_image((root / "service" / "examples" / "digit_7_fgsm.png").read_bytes(), spec, 10 ** 6)]
    answers = [default.predict(torch.from_numpy(np.asarray(x, dtype=np.float32))) for x in images]
    assert len(quoted) == 2

    def same(doc, got):
        if isinstance(doc, dict):
            assert doc.keys() == got.keys()
            for k in doc:
                same(doc[k], got[k])
        elif isinstance(doc, list):
            assert len(doc) == len(got)
            for a, b in zip(doc, got):
                same(a, b)
        elif isinstance(doc, float):
            assert doc == pytest.approx(got, rel=1e-3), (doc, got)
        else:
            assert doc == got

    for doc, got in zip(quoted, answers):
        same(doc, got)


def test_fit_detector_cli_reports_the_calibration_and_refuses_an_impossible_rate(guard, tiny_model, tmp_path):
    """fit-detector's output gives the calibration's size and bounds (JSON) and says the warning loudly
    (stderr); a rate the calibration set cannot give at all is a usage error naming the size needed."""
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from nad_guard_cli import main

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}, str(weights))
    guard.paths.save(tmp_path / "artifact")
    args = ["fit-detector", "--artifact", str(tmp_path / "artifact"), "--model", "tiny_models:tiny_digits_cnn",
            "--weights", str(weights), "--data", "digits", "--suite", "fast", "--method", "knn",
            "--encoding", "summary", "--device", "cpu"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout.strip().splitlines()[-1])
    cal = info["calibration"]
    assert cal["n"] == info["calibration_clean"] > 19 and cal["marginal_bound"] <= 0.05 and not cal["adequate"]
    assert f"clean calibration score {cal['rank']} of {cal['n']}" in res.stderr and "WARNING: only" in res.stderr
    assert info["provenance"]["data"] == "digits" and "positions" not in json.dumps(info["provenance"])
    meta = json.loads((tmp_path / "artifact" / "meta.json").read_text())["detector"]
    assert meta["calibration"] == cal and len(meta["provenance"]["parts"]["calibration"]["positions"]) == 72
    res = CliRunner().invoke(main, [*args, "--fpr", "0.001"])
    assert res.exit_code == 2 and "cannot calibrate a false-positive rate of 0.001" in res.output
    assert "at least 999" in res.output
