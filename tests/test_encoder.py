"""The NND architecture encoder: gates, the unchanged classifier under open gates, training (fidelity,
resume), files, and the decoupled network with its closed channels skipped."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import training.encoder as te
from nad_guard.data import ImageSet
from nad_guard.encoder import (ArchitectureEncoder, BoostedResNet, count_flops, encoder_features,
                               read_encoder_meta, skip_forward, skip_forward_topk)
from nad_guard.models import Classifier, CifarResNet, InputSpec
from nad_guard.paths import ArtifactError, weights_fingerprint
from tiny_models import DIGITS_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(digits: tuple[ImageSet, ImageSet], n: int = 32) -> torch.Tensor:
    return digits[1].float(0, n)


def _open_all(enc: ArchitectureEncoder, logit: float = 40.0) -> None:
    with torch.no_grad():
        for c in enc.controls:
            c.fc2.weight.zero_()
            c.fc2.bias.fill_(logit)


def test_gates_lie_in_0_1_with_one_per_channel(tiny_model: Classifier, digits) -> None:
    enc = ArchitectureEncoder(tiny_model)
    torch.manual_seed(0)
    with torch.no_grad():
        for c in enc.controls:
            torch.nn.init.normal_(c.fc2.weight)
    x = _x(digits)
    for mode in ("soft", "hard"):
        with torch.no_grad():
            logits, gates, _ = enc(x, mode)
        assert logits.shape == (len(x), 10)
        assert [tuple(g.shape) for g in gates] == [(len(x), p.channels) for p in enc.gate_points]
        assert all(float(g.min()) >= 0 and float(g.max()) <= 1 for g in gates)
    assert all(set(g.unique().tolist()) <= {0.0, 1.0} for g in gates)  # hard gates are exactly 0/1
    assert any(0 < float(g.mean()) < 1 for g in gates)  # and not all alike


def test_open_gates_leave_the_classifier_unchanged(tiny_model: Classifier, digits) -> None:
    enc = ArchitectureEncoder(tiny_model)
    _open_all(enc)
    x = _x(digits)
    with torch.no_grad():
        plain = tiny_model(x)
        hard, _, _ = enc(x, "hard")
        soft, _, _ = enc(x, "soft")
    torch.testing.assert_close(hard, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft, plain, rtol=1e-5, atol=1e-5)
    assert all(len(getattr(m, "_forward_hooks")) == 0 for m in tiny_model.modules())


SETTINGS = dict(epochs=3, batch_size=32, lr=0.01, device="cpu", progress=False, target_keep=0.5)


def test_training_closes_gates_and_keeps_the_prediction(tiny_model: Classifier, digits, tmp_path: Path) -> None:
    train, test = digits[0].subset(range(600)), digits[1]
    enc, metrics = te.fit_encoder(tiny_model, train, test, **SETTINGS)
    first, last = metrics["history"][0], metrics["history"][-1]
    assert last["sparsity"] < first["sparsity"]  # gates closed
    assert last["aux_ce"] < first["aux_ce"]  # the mutual-information bound rose
    t = metrics["test"]
    assert t["kept_fraction_mean"] < 0.95
    assert t["fidelity"] >= 0.85 and t["accuracy_decoupled"] >= t["accuracy_original"] - 0.15
    # class-mean encodings: one row per class, in [0, 1]
    assert enc.class_means.shape == (10, sum(enc.channels)) and 0 <= float(enc.class_means.min())
    # files: a round trip gives the same gates; another classifier is refused
    enc.save(tmp_path)
    back = ArchitectureEncoder.load(tmp_path, tiny_model)
    x = _x(digits)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x)[1], enc.encode(x)[1], rtol=1e-6, atol=1e-6)
    assert read_encoder_meta(tmp_path)["training"] == {}
    X, names = encoder_features(enc, None, x)
    assert X.shape == (len(x), len(names)) and torch.isfinite(X).all()
    assert "enc_cos_mean" in names and "enc_cos_mask" not in names


def test_refuses_an_encoder_for_other_weights(tiny_model: Classifier, tmp_path: Path) -> None:
    ArchitectureEncoder(tiny_model).save(tmp_path)
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.net[0].weight.mul_(2)
    with pytest.raises(ArtifactError, match="other classifier weights"):
        ArchitectureEncoder.load(tmp_path, other)
    with pytest.raises(ArtifactError, match="missing"):
        ArchitectureEncoder.load(tmp_path / "nothing", tiny_model)


def test_interrupted_fit_resumes_to_the_same_encoder(tiny_model: Classifier, digits, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    train = digits[0].subset(range(300))
    whole, _ = te.fit_encoder(tiny_model, train, **SETTINGS)
    save = te._save_checkpoint

    def save_then_crash(*args: object) -> None:
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(te, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        te.fit_encoder(tiny_model, train, checkpoint_dir=tmp_path, **SETTINGS)
    monkeypatch.setattr(te, "_save_checkpoint", save)
    assert torch.load(tmp_path / te.CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    resumed, _ = te.fit_encoder(tiny_model, train, checkpoint_dir=tmp_path, **SETTINGS)
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ValueError, match="other settings.*lr"):
        te.fit_encoder(tiny_model, train, checkpoint_dir=tmp_path, **SETTINGS | {"lr": 0.5})


def _tiny_resnet() -> Classifier:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = CifarResNet(1, 10, 1)
        for m in net.modules():  # BatchNorm statistics that are not the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
    return Classifier(net.eval(), InputSpec(**DIGITS_SPEC, class_names=[str(i) for i in range(10)]), "tiny-resnet")


@pytest.mark.parametrize("layers", [["relu", "layer1.0", "layer2.0", "layer3.0"],  # the guard's: block outputs
                                    ["layer1.0.bn1", "layer2.0.bn1", "layer2.0", "layer3.0.bn1"]])  # inner, mixed
def test_skipping_closed_channels_gives_the_masked_logits_with_fewer_flops(digits, layers: list[str]) -> None:
    clf = _tiny_resnet()
    enc = ArchitectureEncoder(clf, layers)
    torch.manual_seed(1)
    with torch.no_grad():
        for c in enc.controls:
            torch.nn.init.normal_(c.fc2.weight, std=0.5)
            c.fc2.bias.normal_(0, 1)
    x = _x(digits, 16)
    with torch.no_grad():
        masked, gates, _ = enc(x, "hard")
    kept = float(torch.cat(gates, 1).mean())
    assert 0.2 < kept < 0.8
    for group in ("image", "union"):
        torch.testing.assert_close(skip_forward(enc, x, group), masked, rtol=1e-5, atol=1e-5)
    full, skipped = count_flops(lambda: clf(x[:1])), count_flops(lambda: skip_forward(enc, x[:1]))
    assert skipped < 0.9 * full
    with pytest.raises(ValueError, match="CIFAR ResNets"):
        skip_forward(ArchitectureEncoder(_tiny_digits()), x)
    with pytest.raises(ValueError, match="in that order"):
        skip_forward(ArchitectureEncoder(clf, ["layer2.0", "layer1.0"]), x)


def _tiny_digits() -> Classifier:
    from tiny_models import tiny_digits_cnn
    return tiny_digits_cnn()


def test_evaluate_reads_the_encoder_features_as_image_columns(tiny_model: Classifier, digits, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from nad_guard.evaluate.config import EvalConfig
    from nad_guard.evaluate.multipass import image_columns
    from nad_guard.paths import PathModel

    enc = ArchitectureEncoder(tiny_model)
    gen = torch.Generator().manual_seed(0)
    pm = PathModel(tiny_model).set_gates({p.name: torch.rand(10, p.channels, generator=gen) for p in enc.gate_points})
    pm.fit_stats(digits[0].float(0, 200), digits[0].labels[:200])
    enc.save(tmp_path)
    assert image_columns(SimpleNamespace(cfg=EvalConfig(), paths=pm)) == {}
    cols = image_columns(SimpleNamespace(cfg=EvalConfig(encoder=str(tmp_path)), paths=pm))
    x = _x(digits, 8)
    got = cols["nnd-encoder"](x)
    X, names = encoder_features(enc, pm, x)
    assert got.shape == (8, 6 + 2 * len(enc.names)) and len(names) == got.shape[1]
    assert torch.allclose(torch.as_tensor(got), X, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = """
import os, sys, torch
from tiny_models import tiny_digits_cnn, train_tiny
from nad_guard.data import load_dataset
import training.encoder as te
torch.set_num_threads(1)
train = load_dataset("digits")[0]
model = train_tiny(tiny_digits_cnn(), train, epochs=10)
enc, metrics = te.fit_encoder(model, train.subset(range(320)), epochs=2, batch_size=32, lr=0.01, device="cpu",
                              progress=False)
if os.environ.get("RANK", "0") == "0":
    torch.save({"state": enc.state_dict(), "world": metrics["world_size"]}, sys.argv[1])
"""


def test_two_processes_fit_the_encoder_of_one(tiny_model: Classifier, digits, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo): the same encoder as one process, up to float32 summation order."""
    import os
    import subprocess
    import sys

    one, _ = te.fit_encoder(tiny_model, digits[0].subset(range(320)), epochs=2, batch_size=32, lr=0.01,
                            device="cpu", progress=False)
    root = Path(__file__).resolve().parents[1]
    script, out = tmp_path / "fit.py", tmp_path / "enc.pt"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out)], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = torch.load(out, weights_only=True)
    assert two["world"] == 2
    for k, v in one.state_dict().items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_evaluate_adds_the_encoder_row_in_every_protocol(tiny_model: Classifier, digits, tmp_path: Path) -> None:
    """``--encoder DIR``: nad-guard's detector on its row plus the encoder's columns, in the supervised,
    clean-only and mispredictions protocols, while every single-pass row stays as it was."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from safetensors.torch import save_file

    from nad_guard.evaluate import EvalConfig, run_evaluation
    from nad_guard.paths import PathModel
    from nad_guard_cli import main

    enc = ArchitectureEncoder(tiny_model)
    gen = torch.Generator().manual_seed(0)
    pm = PathModel(tiny_model).set_gates({p.name: torch.rand(10, p.channels, generator=gen) for p in enc.gate_points})
    pm.fit_stats(digits[0].float(0, 300), digits[0].labels[:300])
    enc.save(tmp_path / "enc")
    test = digits[1]
    labels = test.labels.clone()
    labels[::12] = (labels[::12] + 1) % 10  # mispredictions in every part of the split
    test = type(test)(test.images, labels, test.classes, test.name + "[relabelled]")
    base = dict(suite="fast", attacks=["fgsm", "pgd"], protocols=["seen", "unseen", "clean-only", "mispredictions"],
                methods=["logistic"], encodings=["rich"], clean_methods=["gaussian:rich"], n_resamples=50,
                progress=False, train_images=300)
    plain = run_evaluation(pm, digits[0], test, EvalConfig(**base), cache_dir=tmp_path / "atk")
    withenc = run_evaluation(pm, digits[0], test, EvalConfig(**base, encoder=str(tmp_path / "enc")),
                             cache_dir=tmp_path / "atk")
    key = lambda r: (r["protocol"], r["detector"], r["attack"])  # noqa: E731
    rows = {key(r): r for r in withenc["rows"]}
    for r in plain["rows"]:
        np.testing.assert_allclose(rows[key(r)]["auroc"], r["auroc"], rtol=1e-9)
    name = "nad-guard[+nnd-encoder]"
    got = [r for r in withenc["rows"] if r["detector"] == name]
    assert {(r["protocol"], r["attack"]) for r in got} == {
        ("seen", "fgsm"), ("seen", "pgd"), ("unseen", "fgsm"), ("unseen", "pgd"), ("clean-only", "fgsm"),
        ("clean-only", "pgd"), ("mispredictions", "mispredictions")}
    assert all(0 <= r["auroc"] <= 1 and r["auroc_ci"][0] <= r["auroc"] <= r["auroc_ci"][1] for r in got)
    assert all(0.5 < r["auroc"] for r in got if r["protocol"] == "seen")
    assert {r["selected"] for r in got if r["protocol"] == "seen"} == {"logistic,rich+nnd-encoder"}
    assert not any(r["detector"] == name for r in plain["rows"])
    err = [r for r in withenc["rows"] if r["detector"] == "nad-guard[error-detector+nnd-encoder]"]
    assert len(err) == 1 and err[0]["selected"] in err[0]["cv"]["auroc"] and 0 <= err[0]["aurc"] <= 1
    assert err[0]["trained_on"].startswith("fit mispredictions")
    assert withenc["timings"]["columns:nnd-encoder"] >= 0  # recorded (rounded to 0.1 s: may read 0 here)

    weights, art = tmp_path / "tiny.safetensors", tmp_path / "artifact"
    save_file({k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}, str(weights))
    pm.save(art)
    res = CliRunner().invoke(main, [
        "evaluate", "--artifact", str(art), "--model", "tiny_models:tiny_digits_cnn", "--weights", str(weights),
        "--data", "digits", "--suite", "fast", "--attacks", "fgsm,pgd", "--protocols", "seen", "--method", "logistic",
        "--encoding", "rich", "--encoder", str(tmp_path / "enc"), "--out", str(tmp_path / "cli"), "--device", "cpu",
        "--bootstrap", "50", "--train-images", "300", "--cache-dir", str(tmp_path / "atk2"), "--quiet"])
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert js["config"]["encoder"] == "<outside-repo>/enc" and str(tmp_path) not in json.dumps(js)
    assert {r["detector"] for r in js["rows"]} >= {"nad-guard", name}
    assert "nad-guard[+nnd-encoder]" in (tmp_path / "cli" / "results.md").read_text()
    bad = CliRunner().invoke(main, ["evaluate", "--artifact", str(art), "--encoder", str(tmp_path / "missing"),
                                    "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--encoder" in bad.output

def test_topk_gates_skipped_give_the_masked_logits_at_the_budgets_flops(digits) -> None:
    clf = _tiny_resnet()
    model = BoostedResNet(clf, keep=0.5).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.predictors:
            torch.nn.init.normal_(p.weight, std=1.0)
    x = _x(digits, 16)
    with torch.no_grad():
        masked, gates = model(clf.normalize(x), return_gates=True)
    assert model.k == [8, 16, 32]
    for g, k in zip(gates, model.k):  # exactly k channels open per image
        assert set(g.unique().tolist()) == {0.0, 1.0} and (g.sum(1) == k).all()
    assert any(len({tuple(r.tolist()) for r in g}) > 1 for g in gates)  # and not the same ones for every image
    for group in ("image", "grouped"):
        torch.testing.assert_close(skip_forward_topk(model, x, group), masked, rtol=1e-5, atol=1e-5)
    full, one = count_flops(lambda: clf(x[:1])), count_flops(lambda: skip_forward_topk(model, x[:1]))
    assert one < 0.6 * full  # both convolutions of every block at half their work
    assert count_flops(lambda: skip_forward_topk(model, x, "grouped")) == len(x) * one
    static = model.static_net([g[0].nonzero().flatten() for g in gates])  # image 0's channels, for every image
    with torch.no_grad():
        torch.testing.assert_close(static(clf.normalize(x[:1])), masked[:1], rtol=1e-5, atol=1e-5)
    assert count_flops(lambda: static(clf.normalize(x[:1]))) < one  # no predictors
    with pytest.raises(ValueError, match="CIFAR ResNets"):
        BoostedResNet(_tiny_digits())


def test_fine_tuned_copy_learns_leaves_the_original_and_round_trips(digits, tmp_path: Path) -> None:
    import training.boost as tb

    clf = _tiny_resnet()
    before = weights_fingerprint(clf)
    train, test = digits
    model, metrics = tb.fit_boosted(clf, train.subset(range(320)), test.subset(range(100)), keep=0.5, epochs=2,
                                    batch_size=32, lr=0.05, init_images=200, out=tmp_path, log_every=1000)
    assert weights_fingerprint(clf) == before  # the guard's classifier never changes
    losses = [h["loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    loaded = BoostedResNet.load(tmp_path, clf)  # float16 on disk
    x = _x(digits, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clf.normalize(x)), model(clf.normalize(x)), rtol=0.02, atol=0.02)
        torch.testing.assert_close(loaded.as_classifier()(x), loaded(clf.normalize(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ArtifactError, match="other classifier weights"):
        BoostedResNet.load(tmp_path, _tiny_resnet_other())


def _tiny_resnet_other() -> Classifier:
    clf = _tiny_resnet()
    with torch.no_grad():
        clf.net.fc.bias.add_(1.0)
    return clf


def test_a_diverging_fine_tune_stops_with_an_error(digits, tmp_path: Path) -> None:
    """A loss that is no longer finite ends the fit with an error naming the step, instead of saving NaN weights."""
    import training.boost as tb

    with pytest.raises(FloatingPointError, match="diverged; lower --lr or --clip"):
        tb.fit_boosted(_tiny_resnet(), digits[0].subset(range(320)), None, keep=0.5, epochs=1, batch_size=32,
                       lr=1e12, init_images=200, out=tmp_path, log_every=1000, clip=float("inf"))
    assert not (tmp_path / "boosted.safetensors").exists()
