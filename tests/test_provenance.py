"""Recorded provenance of the committed guards, content hashes, and result files that hold only the project's
own facts (no other process's command line, no absolute path of the machine that wrote them)."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nad_guard.audit import holdout_parts
from nad_guard.calibration import CalibrationWarning, threshold_at_fpr
from nad_guard.data import DEFAULT_CIFAR10_ROOT, ImageSet, load_dataset
from nad_guard.detectors import PathDetector, load_detector
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard
from nad_guard.provenance import PARTS, content_sha256
from nad_guard.runinfo import portable_command, portable_path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_GUARD = ROOT / "bench" / "results" / "guard_cifar10-resnet20"


@pytest.mark.parametrize("guard_dir", [DEFAULT_GUARD_DIR, CIFAR_GUARD], ids=["mnist-default", "cifar10"])
def test_committed_detectors_load_and_follow_the_threshold_rule(guard_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)  # an older rule's threshold would warn on load
        det = load_detector(guard_dir / "detector.skops")
    assert isinstance(det, PathDetector) and det.method == "logistic" and hasattr(det, "predict")
    assert det.threshold_ == threshold_at_fpr(det.calibration_scores_, det.fpr_)
    meta = json.loads((guard_dir / "meta.json").read_text())["detector"]
    cal = meta["calibration"]
    assert cal["n"] == len(det.calibration_scores_) == meta["calibration_clean"] and meta["threshold"] == det.threshold_
    assert cal == {**det.calibration().to_dict()}
    x = np.zeros((3, det.n_features_in_))
    assert det.score_samples(x).shape == (3,) and det.predict(x).dtype == bool


def test_the_bundled_guard_verifies_its_split_from_its_record():
    guard = Guard.load(DEFAULT_GUARD_DIR)
    test = load_dataset("mnist5k")[1]
    parts, info = holdout_parts(guard, test)
    assert info["status"] == "verified"
    assert [int((parts == p).sum()) for p in PARTS] == [400, 200, 400]
    record = guard.meta["detector"]["provenance"]
    assert record["data"] == "mnist5k" and record["split_sha256"] == content_sha256(test)


@pytest.mark.skipif(not DEFAULT_CIFAR10_ROOT.is_dir(), reason=f"no CIFAR-10 data at {DEFAULT_CIFAR10_ROOT}")
def test_the_committed_cifar10_guard_verifies_its_split_from_its_record():
    """Verified from positions and content hashes alone: whatever CPU computes the scores."""
    from nad_guard.data import load_cifar10

    guard = Guard.load(CIFAR_GUARD)
    test = load_cifar10(None, "test")
    parts, info = holdout_parts(guard, test)
    assert info["status"] == "verified" and "seeded sample of 3000" in info["note"]
    assert [int((parts == p).sum()) for p in PARTS] == [1200, 600, 1200]
    assert int((parts == "not-used-by-detector").sum()) == 7000
    assert guard.meta["detector"]["provenance"]["calibration_clean"]["images"] == 535


def test_content_hash_sees_every_pixel_label_and_order():
    _, test = load_dataset("digits")
    base = content_sha256(test)
    assert content_sha256(test) == base and content_sha256(test, np.arange(len(test))) == base
    labels = test.labels.clone()
    labels[5] = (labels[5] + 1) % 10
    images = test.images.clone()
    images[7, 0, 3, 3] ^= 1
    for other in (ImageSet(test.images, labels, test.classes), ImageSet(images, test.labels, test.classes),
                  test.subset(torch.arange(len(test)).flip(0))):
        assert content_sha256(other) != base


def test_paths_and_commands_are_recorded_without_the_machines_paths(tmp_path):
    assert portable_path("runs/x") == "runs/x"
    assert portable_path(ROOT / "bench" / "results" / "x") == "bench/results/x"
    assert portable_path(tmp_path / "out") == "<outside-repo>/out"
    assert portable_command(["/usr/bin/python3", str(ROOT / "bench" / "paths_bench.py"), "--out",
                             str(tmp_path / "o"), f"--cache={tmp_path}/c", "--n", "3"]) == \
        "<outside-repo>/python3 bench/paths_bench.py --out '<outside-repo>/o' '--cache=<outside-repo>/c' --n 3"


# Absolute paths of a machine (a home, /tmp, the work tree) and the process lists results used to hold.
_MACHINE = re.compile(r"(?<![\w.<>-])/(?:work|root|home|tmp|Users|private|mnt|opt)/|busiest_other_processes|"
                      r"busiest other processes")


def test_result_files_hold_only_the_projects_own_facts():
    files = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    bad = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".json", ".md", ".txt", ".html", ".csv") or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _MACHINE.search(line):
                bad.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not bad, "\n".join(bad[:20])
