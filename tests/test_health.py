"""A guard's health report (``nad-guard check``): the degenerate-mask rule, the per-attack cross-validated
AUROC recorded at fit time, the report on the bundled guard and on a deliberately weak one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nad_guard.calibration import CalibrationWarning
from nad_guard.detectors import cross_val_auroc_per_block
from nad_guard.fitting import fit_guard
from nad_guard.guard import DEFAULT_GUARD_DIR
from nad_guard.health import (clopper_pearson, format_report, health_report, mask_problems, static_report,
                              unseen_warnings)
from nad_guard.holdout import holdout_provenance
from nad_guard_cli import main
from training.paths import fit_paths

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_rule_hand_checked() -> None:
    kept = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.01], [0.2, 1.0, 0.0], [0.99, 1.0, 1.0]]
    got = mask_problems(["a", "b", "c", "d"], kept, ["x", "y", "z"], [1.0, 0.5, None])
    assert [(p.kind, p.layer, p.cls) for p in got] == [
        ("keeps-all", "a", None), ("keeps-none", "b", None), ("keeps-all", "d", None), ("subnet-accuracy", None, "y")]
    assert "keeps every channel" in got[0].text and "at least 99%" in got[2].text and "50.0%" in got[3].text
    assert mask_problems(["a"], [[0.3, 0.2, 0.25]], ["x", "y", "z"], [0.95, 1.0, 0.97]) == []


@pytest.mark.parametrize("guard", [DEFAULT_GUARD_DIR, ROOT / "bench/results/guard_cifar10-resnet20"])
def test_the_reference_recipes_give_sound_masks(guard: Path) -> None:
    """The bundled MNIST guard (the default recipe) and the committed CIFAR-10 guard pass the check that
    fit-paths applies: the rule the training loop uses, on the kept fractions and subnetwork accuracies
    their artifacts record."""
    meta = json.loads((guard / "meta.json").read_text())
    m = meta["metrics"]
    layers = [d["name"] for d in meta["layers"]]
    assert mask_problems(layers, [m["kept_fraction"][n] for n in layers], meta["class_names"],
                         [c["subnet_accuracy_on_correct"] for c in m["classes"]]) == []
    report = static_report(guard)
    assert report["masks"]["problems"] == [] and report["gate_points"]["count"] == len(layers) >= 4
    for row in report["gate_points"]["layers"]:  # kept fractions read from the masks are the recorded ones
        assert row["kept_fraction"] == pytest.approx(m["kept_fraction_per_layer"][row["name"]])
    assert not any("gate point" in w or "subnetwork" in w for w in report["warnings"])


def test_clopper_pearson_interval() -> None:
    lo, hi = clopper_pearson(31, 394)
    assert lo < 31 / 394 < hi and lo == pytest.approx(0.0541, abs=5e-4) and hi == pytest.approx(0.1099, abs=5e-4)
    assert clopper_pearson(0, 10)[0] == 0 and clopper_pearson(10, 10)[1] == 1
    assert clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** 0.1)


def test_cross_validated_auroc_per_attack() -> None:
    rng = np.random.default_rng(0)
    # three attacks along one direction, the third indistinguishable from clean; each held out in turn
    clean, far, near = rng.normal(0, 1, (90, 2)), rng.normal(5, 1, (45, 2)), rng.normal(3, 1, (45, 2))
    invisible = rng.normal(0, 1, (30, 2))
    X = np.vstack([clean, far, near, invisible])
    y = np.r_[np.zeros(90), np.ones(120)]
    groups = np.r_[np.arange(90), np.full(45, -1), np.full(45, -2), np.full(30, -3)]  # by attack
    rows = {"far": np.arange(90, 135), "near": np.arange(135, 180), "invisible": np.arange(180, 210), "none": []}
    got = cross_val_auroc_per_block("logistic", X, y, groups, rows, folds=3)
    assert got["far"] > 0.95 and got["near"] > 0.9 and 0.3 < got["invisible"] < 0.7 and got["none"] is None
    with pytest.raises(ValueError, match="at least 3 groups"):
        cross_val_auroc_per_block("logistic", X, y, np.r_[np.arange(90), np.full(120, -1)], rows, folds=3)


def test_warnings_on_measured_figures() -> None:
    unseen = {"status": "measured", "clean": 394, "flagged": 31, "observed_fpr": 31 / 394,
              "interval": list(clopper_pearson(31, 394)), "confidence": 0.95,
              "mispredictions": {"n": 40, "detector_auroc": 0.56, "msp_auroc": 0.79}}
    got = unseen_warnings(unseen, 0.05)
    assert len(got) == 2 and "clearly more than the 5% asked" in got[0]
    assert got[0].endswith("calibrate on more held-out images")
    exhausted = unseen_warnings(unseen, 0.05, whole_split=1000)[0]  # no larger sample exists: say so instead
    assert "the whole test split (1,000 images) is already used" in exhausted and "more held-out" not in exhausted
    assert "below the classifier's own confidence (MSP) at 0.790" in got[1]
    fine = {**unseen, "flagged": 22, "observed_fpr": 22 / 394, "interval": list(clopper_pearson(22, 394)),
            "mispredictions": {"n": 40, "detector_auroc": 0.8, "msp_auroc": 0.79}}
    assert unseen_warnings(fine, 0.05) == []
    assert "not measured" in unseen_warnings({"status": "unrecorded", "note": "no record"}, 0.05)[0]


def test_health_of_the_bundled_guard() -> None:
    """The default guard: 4 gate points, sound masks, 199 calibration images (warned: the 95% bound is
    0.0776), and on the 394 correctly classified images of its evaluation part 7.9% flagged (warned)."""
    report = health_report("default")
    assert report["gate_points"]["count"] == 4 and report["gate_points"]["depth_covered"] == pytest.approx(4 / 6)
    assert report["calibration"]["n"] == 199 and not report["calibration"]["adequate"]
    u = report["unseen"]
    assert u["status"] == "measured" and u["images"] == 400 and u["clean"] == 394
    assert abs(u["observed_fpr"] - 0.079) < 0.01 and u["interval"][0] < u["observed_fpr"] < u["interval"][1]
    assert u["mispredictions"]["n"] < 10 and "needed to compare" in u["mispredictions"]["note"]
    agree = u["nearest_path_is_predicted"]  # 306 of the 394: the nearest class path is the predicted class
    assert agree["n"] == 394 and agree["chance"] == 0.1 and abs(agree["share"] - 306 / 394) < 0.01
    w = report["warnings"]
    assert len(w) == 2 and w[0].startswith("small calibration set: only 199") and "never saw" in w[1]
    assert any("per-attack cross-validated AUROC" in n for n in report["notes"])
    text = format_report(report)
    assert "gate points: 4, covering 67% of the depth" in text and "WARNING: small calibration set" in text
    assert f"nearest class sub-architecture = the predicted class on {agree['share']:.1%} of the correctly " \
        "classified (chance 10%)" in text


def test_check_command_on_the_bundled_guard() -> None:
    res = CliRunner().invoke(main, ["check", "--no-data"])
    assert res.exit_code == 0, res.output
    assert "features.12" in res.output and "calibration: 199 clean images" in res.output
    assert "WARNING: small calibration set" in res.output
    # mnist5k's whole test split is already used: the advice says so rather than ask for a larger --max-images
    assert ("this data set's whole test split (1,000 images) is already used and the calibration part is its 20%: "
            "accept the looser rate, or fit on a data set with a larger test split") in res.output
    assert "a larger --max-images" not in res.output
    res = CliRunner().invoke(main, ["check", str(DEFAULT_GUARD_DIR), "--no-data", "--json", "--strict"])
    assert res.exit_code == 2 and json.loads(res.stdout)["calibration"]["needed"] == 240
    res = CliRunner().invoke(main, ["check", "no/such/guard"])
    assert res.exit_code == 1 and "guard directory no/such/guard does not exist" in res.output


@pytest.fixture(scope="module")
def weak_guard(tiny_model, digits, tmp_path_factory, one_thread) -> Path:
    """One gate point and a sample of 150 test images (30 in the calibration part): weak on purpose."""
    train, test = digits
    paths = fit_paths(tiny_model, train, test, layers=["2"], epochs=8, batch_size=64, device="cpu", progress=False,
                      check=False)
    (fit, calib, _), record = holdout_provenance(test, "digits", max_images=150, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        guard = fit_guard(paths, fit, calib, suite="fast", attacks=["fgsm", "pgd"],
                          cache_dir=tmp_path_factory.mktemp("a"), progress=False, provenance=record)
    return guard.save(tmp_path_factory.mktemp("weak") / "guard")


def test_health_of_a_weak_guard(weak_guard: Path, tiny_model) -> None:
    meta = json.loads((weak_guard / "meta.json").read_text())["detector"]
    cv = meta["cv_per_attack"]  # recorded when the detector was fitted: no attack regenerated by the report
    assert cv["method"] == "logistic" and cv["folds"] == 3 and set(cv["auroc"]) >= {"fgsm", "pgd"}
    assert all(0 <= v <= 1 for v in cv["auroc"].values() if v is not None)
    report = health_report(weak_guard, classifier=tiny_model)  # a custom classifier: not rebuilt from the directory
    w = " | ".join(report["warnings"])
    assert "only 1 gate point ('2')" in w and "fit-paths --layers" in w
    assert f"small calibration set: only {report['calibration']['n']} clean calibration inputs" in w
    assert report["calibration"]["n"] <= 30 and report["gate_points"]["depth_covered"] == pytest.approx(0.25)
    u = report["unseen"]
    assert u["status"] == "measured" and u["images"] == 60 and u["split"] == "digits/test"
    text = format_report(report)
    assert "cross-validated AUROC per training attack (3 folds by" in text and "fgsm" in text
    assert "never-seen images (60 of digits/test, evaluation part)" in text
    # without the classifier the guard cannot be loaded: the report says so and keeps what the directory records
    res = CliRunner().invoke(main, ["check", str(weak_guard)])
    assert res.exit_code == 0 and "WARNING: the guard cannot be loaded" in res.output
    assert "only 1 gate point" in res.output
