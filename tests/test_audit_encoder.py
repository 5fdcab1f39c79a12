"""The audit's second class-path source (issue 20, item 5): an NND architecture encoder's class-average gates,
on the tiny digits CNN with a guard and an encoder fitted in seconds; NAD's test and the similarity-against-
confusion correlation for both sources in the report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import training.encoder as te
from nad_guard.audit import (class_paths_from_encoder, confusion_matrix, k_similar_test, load_audit_encoder, run_audit,
                             write_report)
from nad_guard.audit.class_paths import ENCODER_SOURCE
from nad_guard.audit.stats import pair_rates
from nad_guard.calibration import CalibrationWarning
from nad_guard.encoder import ArchitectureEncoder
from nad_guard.fitting import fit_guard
from nad_guard.holdout import holdout_splits
from training.paths import fit_paths

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def guard(tiny_model, digits, one_thread):
    train, test = digits
    paths = fit_paths(tiny_model, train, None, epochs=6, batch_size=64, target_keep=0.3, device="cpu", progress=False)
    fit, calib, _ = holdout_splits(test)
    with pytest.warns(CalibrationWarning):  # digits: ~70 clean calibration images, a loose bound, said so
        return fit_guard(paths, fit, calib, method="knn", encoding="summary", device="cpu", progress=False)


@pytest.fixture(scope="module")
def encoder(tiny_model, digits, one_thread) -> ArchitectureEncoder:
    enc, _ = te.fit_encoder(tiny_model, digits[0].subset(range(400)), epochs=2, batch_size=32, lr=0.01,
                            device="cpu", progress=False, target_keep=0.5)
    return enc


def _gates(enc: ArchitectureEncoder, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        _, gates, _ = enc(x, "soft")
    return gates


def test_encoder_class_paths_are_the_class_means_of_the_per_image_gates(guard, encoder, digits):
    test = digits[1]
    src = class_paths_from_encoder(encoder, test.images, test.labels, guard.paths.layer_names_, batch_size=50)
    assert src.name == ENCODER_SOURCE and src.layers == encoder.names == guard.paths.layer_names_
    assert "the guard's gate points" in src.description
    assert src.images_per_class == torch.bincount(test.labels, minlength=10).tolist()
    gates = _gates(encoder, test.float())  # one pass, one batch: per image, per gate point
    for v, g, c in zip(src.vectors, gates, encoder.channels):
        assert v.shape == (10, c) and 0 <= v.min() and v.max() <= 1
        by_hand = np.stack([g[test.labels == k].double().mean(0).numpy() for k in range(10)])
        np.testing.assert_allclose(v, by_hand, rtol=1e-5, atol=1e-6)
    assert not np.allclose(src.vectors[-1], src.vectors[-1][:1])  # the classes' gates differ
    sim = src.similarity()
    np.testing.assert_allclose(sim, sim.T, rtol=1e-12, atol=1e-12)
    assert np.allclose(np.diag(sim), 1) and 0 < sim.min() and sim.max() <= 1 + 1e-12


def test_an_encoder_at_other_gate_points_keeps_its_own(guard, tiny_model, digits):
    own = guard.paths.layer_names_[:2]
    enc = ArchitectureEncoder(tiny_model, own)  # unfitted: its gates still depend on the input
    test = digits[1]
    src = class_paths_from_encoder(enc, test.images[:60], test.labels[:60], guard.paths.layer_names_)
    assert src.layers == own != guard.paths.layer_names_ and "(not the guard's)" in src.description
    assert [v.shape for v in src.vectors] == [(10, c) for c in enc.channels]


def test_the_audit_reports_both_sources_in_json_csv_and_html(guard, encoder, digits, tmp_path):
    test = digits[1]
    labels = test.labels.clone()  # the tiny CNN gets every digits test image right: every 9th label is shifted
    labels[::9] = (labels[::9] + 1 + labels[::9] % 3) % 10  # to make "errors" to count, to 3 different classes
    test = type(test)(test.images, labels, test.classes, test.name + "[relabelled]")
    result = run_audit(guard, test, progress=False, gallery_size=0, saliency_images=0, explain=False,
                       encoder=encoder, encoder_source="runs/enc")
    files = write_report(result, tmp_path / "report", command="pytest")
    summary = json.loads(files["summary.json"].read_text())
    assert summary["config"]["encoder"] == "runs/enc"
    sources = summary["claims"]["sources"]
    assert list(sources) == ["masks", ENCODER_SOURCE]
    c = result.clean
    ok = c.correct
    # the encoder's class paths: the audited images the classifier gets right, by class
    want = class_paths_from_encoder(encoder, test.images[torch.as_tensor(c.position[ok])], c.label[ok])
    enc = sources[ENCODER_SOURCE]
    np.testing.assert_allclose(enc["similarity"], want.similarity(), rtol=1e-5, atol=1e-6)
    assert enc["images_per_class"] == np.bincount(c.label[ok], minlength=10).tolist()
    assert enc["layers"] == encoder.names
    iu = np.triu_indices(10, 1)
    rate = pair_rates(confusion_matrix(c.label, c.pred, 10))[iu]
    assert (~ok).sum() >= len(test) // 9 - 2
    for name, d in sources.items():
        sim = np.asarray(d["similarity"])
        rho = spearmanr(sim[iu], rate)
        assert d["similarity_vs_confusion"]["rho"] == pytest.approx(rho.statistic, abs=1e-9)
        assert d["similarity_vs_confusion"]["p_value"] == pytest.approx(rho.pvalue, rel=1e-6)
        t = d["nad_test"]["mispredictions"]
        assert set(t["by_k"]) == {"1", "3"} and t["n"] == int((~ok).sum())
        again = k_similar_test(sim, c.label, c.pred, test.classes, seed=0)
        assert [t["by_k"][k]["hits"] for k in ("1", "3")] == [again["by_k"][k]["hits"] for k in ("1", "3")]
    with open(files["samples.csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"similar_rank:masks", f"similar_rank:{ENCODER_SOURCE}"} <= set(rows[0])
    wrong = [r for r in rows if r["true"] != r["pred"]]
    assert wrong and all(1 <= int(r[f"similar_rank:{ENCODER_SOURCE}"]) <= 9 for r in wrong)
    html = files["index.html"].read_text()
    assert html.count(ENCODER_SOURCE) >= 3 and "correctly classified audited images" in html


def test_the_audit_takes_the_guard_directorys_encoder_unless_told_otherwise(tmp_path):
    """``nad-guard audit --encoder``'s rule (:func:`load_audit_encoder`), on the bundled MNIST guard and the
    encoder committed for its classifier: none by default for a guard directory without one, the guard
    directory's own when it has one, a given directory, and ``none``."""
    from nad_guard.guard import DEFAULT_GUARD_DIR, Guard

    committed = REPO / "bench" / "results" / "encoder_mnist-cnn"
    guard = Guard.load(DEFAULT_GUARD_DIR, device="cpu")
    assert load_audit_encoder(DEFAULT_GUARD_DIR, None, guard) == (None, None)
    enc, where = load_audit_encoder(DEFAULT_GUARD_DIR, committed, guard)
    assert where == str(committed) and enc.names == guard.paths.layer_names_ and enc.classifier is guard.classifier
    guard_dir = tmp_path / "guard"
    shutil.copytree(DEFAULT_GUARD_DIR, guard_dir)
    for name in ("encoder.json", "encoder.safetensors"):
        shutil.copy(committed / name, guard_dir)
    enc, where = load_audit_encoder(guard_dir, None, guard)
    assert where == str(guard_dir) and enc.names == guard.paths.layer_names_
    assert load_audit_encoder(guard_dir, "none", guard) == (None, None)
