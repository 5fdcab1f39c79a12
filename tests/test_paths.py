"""Class sub-architectures: gate points, learning (joint, NAD, resume, torchrun), features, artifacts."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.exceptions import NotFittedError
from torch import nn

import training.paths as tp
from nad_guard.data import ImageSet, SampleSizeNotice
from nad_guard.models import Classifier, InputSpec, from_module, mnist_cnn, resnet20, torchvision_classifier
from nad_guard.paths import (ArtifactError, ChannelStats, PathModel, find_gate_points, mask_similarity,
                             path_features)
from tiny_models import DIGITS_SPEC, tiny_digits_cnn

ROOT = Path(__file__).resolve().parent.parent
FIT = dict(epochs=8, batch_size=64, device="cpu", progress=False)  # the single-process reference run
TARGET = 0.25


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: more threads only add synchronisation, which is slow on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(tiny_model: Classifier, digits: tuple[ImageSet, ImageSet]) -> tuple[PathModel, dict[str, torch.Tensor]]:
    """Joint masks of the tiny model, and its state dict from before fitting."""
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    return tp.fit_paths(tiny_model, *digits, target_keep=TARGET, **FIT), before


def forward_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------- gate points

def test_automatic_gate_points_of_reference_models() -> None:
    assert [(p.name, p.channels) for p in find_gate_points(mnist_cnn())] == [
        ("features.2", 32), ("features.5", 32), ("features.9", 64), ("features.12", 64)]
    points = find_gate_points(resnet20())
    assert [p.name for p in points] == ["relu"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert [p.channels for p in points] == [16] * 4 + [32] * 3 + [64] * 3


def test_explicit_gate_points_and_their_errors() -> None:
    assert [p.channels for p in find_gate_points(mnist_cnn(), ["features.5", "classifier.3"])] == [32, 128]
    with pytest.raises(ValueError, match=r"no module named 'features\.99'.*features\.2"):
        find_gate_points(mnist_cnn(), ["features.99"])
    with pytest.raises(ValueError, match="called 2 times"):  # the ReLU module a BasicBlock reuses
        find_gate_points(resnet20(), ["layer1.0.relu"])
    with pytest.raises(ValueError, match="input_shape"):
        find_gate_points(mnist_cnn().net)
    assert len(find_gate_points(mnist_cnn().net, input_shape=(1, 28, 28))) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet users still have such files
        scripted = torch.jit.trace(mnist_cnn().net, torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="TorchScript"):
        find_gate_points(scripted, input_shape=(1, 28, 28))


@pytest.mark.parametrize("arch, count, first, last", [
    ("resnet18", 9, ("relu", 64), ("layer4.1", 512)),
    ("vgg11_bn", 8, ("features.2", 64), ("features.27", 512)),
    ("mobilenet_v2", 19, ("features.0.2", 32), ("features.18.2", 1280)),  # stem, 17 inverted residuals, last conv
    ("densenet121", 5, ("features.relu0", 64), ("features.denseblock4", 1024)),  # stem and the 4 dense blocks
])
def test_torchvision_models_give_gate_points_and_features(arch: str, count: int, first: tuple, last: tuple) -> None:
    torch.manual_seed(0)
    clf = torchvision_classifier(arch, num_classes=10, input_size=32)
    points = find_gate_points(clf)
    assert len(points) == count
    assert (points[0].name, points[0].channels) == first and (points[-1].name, points[-1].channels) == last
    pm = PathModel(clf).set_gates({p.name: torch.rand(10, p.channels) for p in points})
    pm.fit_stats(torch.rand(20, 3, 32, 32), torch.arange(20) % 10)
    f = pm.features(torch.rand(2, 3, 32, 32), subnetwork=True)
    assert f.X.shape == (2, 7 * count + 7) == (2, len(f.names))
    assert f.class_scores.shape == (2, count, 10) and torch.isfinite(f.X).all()
    assert forward_hook_count(clf) == 0


# --------------------------------------------------------------------------- learning

def test_hard_gates_are_the_binary_masks_with_the_soft_gradient() -> None:
    gates = tp.GateLogits([(2, 3)], init_logit=0.0)
    with torch.no_grad():
        gates.logits[0].copy_(torch.tensor([[2.0, -2.0, 0.1], [-1.0, 1.0, -0.1]]))
    labels = torch.tensor([0, 1, 0])
    (hard,), (soft,) = gates(labels, hard=True), gates(labels)
    assert torch.equal(hard.detach(), (soft > 0.5).float()) and set(hard.detach().unique().tolist()) == {0.0, 1.0}
    (g_hard,) = torch.autograd.grad((hard * torch.arange(3.0)).sum(), gates.logits[0])
    (g_soft,) = torch.autograd.grad((soft * torch.arange(3.0)).sum(), gates.logits[0])
    assert torch.allclose(g_hard, g_soft) and g_hard.abs().sum() > 0
    with pytest.raises(ValueError, match="hard_epochs"):
        tp.fit_paths(mnist_cnn(), ImageSet(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]),
                                           [str(i) for i in range(10)]), epochs=1, hard_epochs=2)


def test_joint_masks_are_learned_and_sparse(fitted: tuple[PathModel, dict]) -> None:
    pm, _ = fitted
    kept = pm.kept_fraction()
    assert kept.shape == (3, 10)
    assert abs(kept.mean().item() - TARGET) < 0.08
    assert (kept.mean(1) > 0.1).all() and (kept.mean(1) < 0.4).all()
    for name in pm.layer_names_:
        g = pm.gates_[name]
        assert g.dtype == torch.float32 and ((g > 0) & (g < 1)).all()
        assert torch.equal(pm.masks_[name], g > 0.5)
    assert pm.metrics_["kept_fraction_mean"] == pytest.approx(kept.mean().item())
    assert pm.training_["schedule"] == "joint" and pm.training_["layers"] == pm.layer_names_
    assert len(pm.metrics_["history"]) == FIT["epochs"]


def test_each_class_subnetwork_keeps_its_class(fitted: tuple[PathModel, dict], tiny_model: Classifier,
                                               digits: tuple[ImageSet, ImageSet]) -> None:
    pm, _ = fitted
    _, test = digits
    x, y = test.float(), test.labels
    with torch.no_grad():
        right = tiny_model(x).argmax(1) == y
        for k in range(10):
            own = (y == k) & right
            sub = pm.subnetwork_logits(x[own], torch.full((int(own.sum()),), k)).argmax(1)
            assert (sub == k).float().mean().item() >= 0.9, k
            assert pm.metrics_["classes"][k]["subnet_accuracy_on_correct"] == (sub == k).float().mean().item()
    sim = torch.tensor(pm.metrics_["similarity"])
    assert sim.shape == (10, 10) and torch.allclose(sim, sim.T) and torch.allclose(sim.diag(), torch.ones(10))


def test_fitting_leaves_the_model_unchanged(fitted: tuple[PathModel, dict], tiny_model: Classifier) -> None:
    _, before = fitted
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert not any(m.training for m in tiny_model.modules())
    assert forward_hook_count(tiny_model) == 0


def test_interrupted_run_resumes_to_the_same_masks(tiny_model: Classifier, digits: tuple[ImageSet, ImageSet],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = digits[0].subset(range(400))
    # 21 steps leave every gate open (test_too_few_steps_...): the mask check is off, resuming is the point here
    settings = dict(epochs=3, batch_size=64, device="cpu", progress=False, check=False)
    whole = tp.fit_paths(tiny_model, train, **settings)
    save = tp._save_checkpoint

    def save_then_crash(*args: object) -> None:
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(tp, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tp.fit_paths(tiny_model, train, checkpoint_dir=tmp_path, **settings)
    monkeypatch.setattr(tp, "_save_checkpoint", save)
    assert torch.load(tmp_path / tp.CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    resumed = tp.fit_paths(tiny_model, train, checkpoint_dir=tmp_path, **settings)
    assert all(torch.equal(whole.gates_[n], resumed.gates_[n]) for n in whole.layer_names_)
    with pytest.raises(ValueError, match="other settings.*lr"):
        tp.fit_paths(tiny_model, train, checkpoint_dir=tmp_path, **settings, lr=0.01)


def test_nad_one_class_schedule(tiny_model: Classifier, digits: tuple[ImageSet, ImageSet], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 epochs at lr 1.0 instead of NAD's 21 at 0.1, to stay fast: the normalised step covers the same distance.
    settings = dict(epochs=3, lr=1.0, beta=1.0, device="cpu", progress=False)
    pm = tp.fit_paths_nad(tiny_model, *digits, **settings)
    kept = pm.kept_fraction()
    assert 0.05 < kept.mean().item() < 0.6
    assert pm.metrics_["subnet_accuracy_on_correct_min"] >= 0.9
    assert pm.training_["schedule"] == "nad"

    save, calls = tp._save_checkpoint, []

    def crash_mid_class(*args: object) -> None:  # after class 1's second epoch
        save(*args)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(tp, "_save_checkpoint", crash_mid_class)
    with pytest.raises(KeyboardInterrupt):
        tp.fit_paths_nad(tiny_model, digits[0], checkpoint_dir=tmp_path, **settings)
    resumed = tp.fit_paths_nad(tiny_model, digits[0], checkpoint_dir=tmp_path, **settings)
    assert len(calls) == 30
    assert all(torch.equal(pm.gates_[n], resumed.gates_[n]) for n in pm.layer_names_)


def test_two_processes_give_the_masks_of_one(fitted: tuple[PathModel, dict], tiny_model: Classifier,
                                            tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo) through ``python -m training.paths``: at least 99% of the mask
    entries agree with the single-process run and the gates agree within 1e-4."""
    pm, _ = fitted
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}, str(weights))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.paths", "--model", "tiny_models:tiny_digits_cnn", "--weights", str(weights),
           "--data", "digits", "--out", str(tmp_path / "out"), "--target-keep", str(TARGET),
           "--epochs", str(FIT["epochs"]), "--batch-size", str(FIT["batch_size"]), "--device", "cpu", "--no-progress"]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = PathModel.load(tmp_path / "out", tiny_model)
    assert two.metrics_["world_size"] == 2 and two.training_ == pm.training_
    for n in pm.layer_names_:
        assert (two.masks_[n] == pm.masks_[n]).float().mean().item() >= 0.99
        assert torch.allclose(two.gates_[n], pm.gates_[n], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- features

def test_path_features_hand_checked() -> None:
    pooled = [torch.tensor([[4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])]
    masks = [torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)]
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # channel means 1, std 1: z = a - 1 = [3, 1, 0, 0] and [0, 0, 0, 0]
    stats = [ChannelStats(torch.ones(4), torch.ones(4), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))]
    f = path_features(pooled, logits, masks, stats, top_k=0.25)
    assert f["pred"].tolist() == [0, 1]
    assert torch.allclose(f["mass_share"][:, 0], torch.tensor([5 / 8, 0.5]))
    # strongest standardised channel of row 0 is channel 0 (in class 0's mask); row 1 ties everywhere
    assert f["topk_overlap"][:, 0].tolist() == [1.0, 0.5]
    # s_0 = mean(z0, z2) - mean(z1, z3) = 1.5 - 0.5; s_1 = -1
    assert torch.allclose(f["class_scores"][:, 0], torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert torch.allclose(f["margin"][:, 0], torch.tensor([2.0, 0.0]))
    assert f["nearest_class"][:, 0].tolist() == [0, 0] and f["pred_rank"][:, 0].tolist() == [1, 1]
    assert f["nearest_is_pred"][:, 0].tolist() == [1.0, 0.0]
    # centroid distances: row 0 to class 0 sqrt((4 + 1) / 4), to class 1 sqrt((9 + 0 + 0 + 0) / 4) = 1.5
    assert torch.allclose(f["centroid_dist"][:, 0], torch.tensor([math.sqrt(5 / 4), 0.5]))
    assert torch.allclose(f["centroid_margin"][:, 0], torch.tensor([0.0, 0.0]))
    p = 1 / (1 + math.exp(-2))
    assert f["msp"][0].item() == pytest.approx(p) and f["softmax_margin"][0].item() == pytest.approx(2 * p - 1)
    assert f["energy"][0].item() == pytest.approx(-math.log(math.exp(2) + 1))


def test_mask_similarity_hand_checked() -> None:
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0], [1, 0], [0, 0]], dtype=torch.bool)
    sim = mask_similarity([a, b])
    assert torch.allclose(sim, torch.tensor([[1, (0.5 + 1) / 2, 0], [(0.5 + 1) / 2, 1, 0], [0, 0, 1]]).double())


def test_features_do_not_depend_on_the_batch(fitted: tuple[PathModel, dict], digits: tuple[ImageSet, ImageSet]
                                             ) -> None:
    pm, _ = fitted
    x = digits[1].float(0, 24)
    with torch.no_grad():
        logits, pooled = pm.pooled_forward(x)
    masks = [pm.masks_[n] for n in pm.layer_names_]
    stats = [pm.stats_[n] for n in pm.layer_names_]
    whole = path_features(pooled, logits, masks, stats)
    # Equal up to float32 rounding (rtol/atol 1e-5), not bit for bit: how a CPU kernel rounds depends on the
    # batch's size and on the instructions it uses (AVX-512, AVX2, ...). Only Guard.run, which pads every pass
    # to a multiple of 8 rows, promises bit-identical results whatever the batch (tests/test_guard.py).
    for i in (0, 7, 23):  # the feature math is row-wise; only BLAS rounds a 1-row matmul differently
        row = path_features([p[i:i + 1] for p in pooled], logits[i:i + 1], masks, stats)
        for k in whole:
            if whole[k].is_floating_point():
                assert torch.allclose(whole[k][i:i + 1], row[k], rtol=1e-5, atol=1e-5), k
            else:
                assert torch.equal(whole[k][i:i + 1], row[k]), k
    batch = pm.features(x, subnetwork=True)
    single = [pm.features(x[i:i + 1], subnetwork=True) for i in range(len(x))]
    # end to end, the network's own convolutions may round differently at batch size 1
    assert torch.allclose(torch.cat([s.X for s in single]), batch.X, rtol=1e-5, atol=1e-5)
    for field in ("pred", "nearest_class", "pred_rank"):
        assert torch.equal(torch.cat([getattr(s, field) for s in single]), getattr(batch, field))
    assert torch.allclose(pm.features(x, subnetwork=True, batch_size=5).X, batch.X, rtol=1e-5, atol=1e-5)
    assert batch.subnet_drop is not None and batch.X.shape == (24, 7 * 3 + 7)


def test_feature_math_is_differentiable(fitted: tuple[PathModel, dict], digits: tuple[ImageSet, ImageSet]) -> None:
    pm, _ = fitted
    x = digits[1].float(0, 4).requires_grad_()
    logits, pooled = pm.pooled_forward(x)
    parts = path_features(pooled, logits, [pm.masks_[n] for n in pm.layer_names_],
                          [pm.stats_[n] for n in pm.layer_names_])
    (parts["mass_share"].sum() + parts["margin"].sum() + parts["centroid_dist"].sum() + parts["msp"].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.allclose(parts["mass_share"].detach(), pm.features(x.detach()).mass_share, atol=1e-6)


def test_hooks_are_removed_after_calls_and_errors(fitted: tuple[PathModel, dict], tiny_model: Classifier,
                                                  digits: tuple[ImageSet, ImageSet]) -> None:
    pm, _ = fitted
    x = digits[1].float(0, 4)
    pm.features(x, subnetwork=True)
    assert forward_hook_count(tiny_model) == 0

    def fail(*_: object) -> None:
        raise RuntimeError("boom inside the forward")

    handle = tiny_model.net[-1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            pm.features(x)
        with pytest.raises(RuntimeError, match="boom"):
            pm.subnetwork_logits(x, torch.zeros(4, dtype=torch.long))
    finally:
        handle.remove()
    assert forward_hook_count(tiny_model) == 0
    assert pm.features(x).X.shape[0] == 4


def test_unfitted_and_bad_inputs(tiny_model: Classifier, fitted: tuple[PathModel, dict]) -> None:
    pm = PathModel(tiny_model)
    with pytest.raises(NotFittedError):
        pm.features(torch.rand(2, 1, 8, 8))
    with pytest.raises(NotFittedError):
        pm.save("unused")
    with pytest.raises(ValueError, match="shape"):
        fitted[0].features(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="top_k"):
        fitted[0].features(torch.rand(2, 1, 8, 8), top_k=0.0)
    with pytest.raises(ValueError, match=r"expected \(10, 16\)"):
        PathModel(tiny_model).set_gates({n: torch.rand(10, 3) for n in fitted[0].layer_names_})
    no_stats = PathModel(tiny_model).set_gates(fitted[0].gates_)
    with pytest.raises(NotFittedError, match="fit_stats"):
        no_stats.features(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at least one image"):
        no_stats.fit_stats(torch.rand(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))


# --------------------------------------------------------------------------- artifacts

@pytest.fixture
def saved(fitted: tuple[PathModel, dict], tmp_path: Path) -> Path:
    return fitted[0].save(tmp_path / "paths")


def test_save_then_load_gives_identical_features(fitted: tuple[PathModel, dict], saved: Path,
                                                 tiny_model: Classifier, digits: tuple[ImageSet, ImageSet]) -> None:
    pm = fitted[0]
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["format"] == "nad-guard-paths" and meta["version"] == 2 and meta["detector"] is None
    assert meta["model"]["name"] == "tiny-digits-cnn"
    assert meta["model"]["input_spec"] == json.loads(json.dumps(tiny_model.spec.to_dict()))
    assert [d["name"] for d in meta["layers"]] == pm.layer_names_ and "torch" in meta["versions"]
    loaded = PathModel.load(saved, tiny_model)
    x = digits[1].float(0, 50)
    assert torch.equal(loaded.features(x, subnetwork=True).X, pm.features(x, subnetwork=True).X)
    assert all(torch.equal(loaded.masks_[n], pm.masks_[n]) for n in pm.layer_names_)
    assert loaded.metrics_ == json.loads(json.dumps(pm.metrics_)) and loaded.training_ == pm.training_


def _edit_meta(path: Path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _edit_tensors(path: Path, change) -> None:
    tensors = load_file(str(path / "paths.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "paths.safetensors"))


BAD_ARTIFACTS = {
    "missing directory": (lambda p: shutil.rmtree(p), "not a directory"),
    "missing meta": (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    "meta not JSON": (lambda p: (p / "meta.json").write_text("{not json"), "not valid JSON"),
    "other format": (lambda p: _edit_meta(p, lambda m: m.update(format="something")), "not a nad-guard-paths"),
    "newer version": (lambda p: _edit_meta(p, lambda m: m.update(version=3)), "format version 3"),
    "version 1 (no statistics)": (lambda p: _edit_meta(p, lambda m: m.update(version=1)), "refit with"),
    "no layers field": (lambda p: _edit_meta(p, lambda m: m.pop("layers")), "lacks a required field"),
    "unknown layer": (lambda p: _edit_meta(p, lambda m: m["layers"][0].update(name="features.99")),
                      "no module named 'features.99'"),
    "channel mismatch": (lambda p: _edit_meta(p, lambda m: m["layers"][0].update(channels=17)), "17 in artifact"),
    "other input size": (lambda p: _edit_meta(p, lambda m: m["model"]["input_spec"].update(height=28)), "height"),
    "other classes": (lambda p: _edit_meta(p, lambda m: m.update(class_names=list("abcdefghij"))), "classes"),
    "other weights": (lambda p: _edit_meta(p, lambda m: m["model"].update(weights_sha256="0" * 64)), "other weights"),
    "missing tensors": (lambda p: (p / "paths.safetensors").unlink(), "paths.safetensors is missing"),
    "corrupt tensors": (lambda p: (p / "paths.safetensors").write_bytes(b"\x00garbage" * 10), "cannot read"),
    "missing tensor": (lambda p: _edit_tensors(p, lambda t: t.pop("masks/2")), "lacks tensor"),
    "tensor shape": (lambda p: _edit_tensors(p, lambda t: t.update({"gates/5": torch.rand(10, 15)})), "shape"),
    "missing statistics": (lambda p: _edit_tensors(p, lambda t: t.pop("stats/std/2")), "lacks tensor"),
    "zero std": (lambda p: _edit_tensors(p, lambda t: t.update({"stats/std/2": torch.zeros(16)})), "positive std"),
}


@pytest.mark.parametrize("damage", BAD_ARTIFACTS, ids=list(BAD_ARTIFACTS))
def test_bad_artifacts_raise_artifact_error(damage: str, saved: Path, tiny_model: Classifier) -> None:
    change, message = BAD_ARTIFACTS[damage]
    change(saved)
    with pytest.raises(ArtifactError, match=message):
        PathModel.load(saved, tiny_model)


def test_artifact_for_another_architecture_is_refused(saved: Path) -> None:
    other = from_module(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10)),
                        InputSpec(**DIGITS_SPEC, class_names=[str(i) for i in range(10)]))
    with pytest.raises(ArtifactError, match="does not fit"):
        PathModel.load(saved, other, check_weights=False)
    assert isinstance(PathModel.load(saved, tiny_digits_cnn(), check_weights=False), PathModel)


def test_torch_threads_sets_and_restores_the_count():
    from nad_guard.hooks import torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError):
            with torch_threads(1):
                raise KeyError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- --max-images, degenerate masks

def test_max_images_is_a_seeded_stratified_sample(digits: tuple[ImageSet, ImageSet]) -> None:
    train, _ = digits
    sub = tp.sample_training_set(train, 300, seed=0)
    assert sub.name == "digits/train[300]" and len(sub) == 300
    share = train.labels.bincount(minlength=10).double() / len(train)
    assert ((sub.labels.bincount(minlength=10) - 300 * share).abs() <= 1).all()  # stratified
    again, other = tp.sample_training_set(train, 300, seed=0), tp.sample_training_set(train, 300, seed=1)
    assert torch.equal(again.images, sub.images) and not torch.equal(other.images, sub.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleSizeNotice)  # exactly the split, or no bound: nothing to say
        assert tp.sample_training_set(train, None) is train and tp.sample_training_set(train, len(train)) is train
    with pytest.warns(SampleSizeNotice, match=r"--max-images 3000: the training split \(digits/train\) has 1,437 "
                                              "images; using all of them"):
        assert tp.sample_training_set(train, 3000) is train  # more than there are: all of them, said
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        tp.sample_training_set(train, 5)


def test_too_few_steps_keep_every_channel_and_stop_with_an_error(tiny_model: Classifier,
                                                                  digits: tuple[ImageSet, ImageSet]) -> None:
    """1 epoch of digits at batch 128 is 12 steps: Adam moves a gate logit from +3 by about lr = 0.05 per step,
    so every gate stays open, also after the bound of 2 epochs: an error naming each gate point and the fix."""
    with pytest.raises(tp.DegenerateMasksError) as e:
        tp.fit_paths(tiny_model, *digits, epochs=1, device="cpu", progress=False)
    assert e.value.epochs == 2 and {p.kind for p in e.value.problems} == {"keeps-all"}
    assert [p.layer for p in e.value.problems] == ["2", "5", "9"]
    msg = str(e.value)
    assert "gate point '2' keeps every channel for every class" in msg and "after 2 epochs (1 asked" in msg
    assert "at least 60 steps; this run made 12 per epoch" in msg and "--epochs" in msg
    assert "--layers (now 2,5,9)" in msg


def test_a_target_too_low_closes_layers_and_classes(tiny_model: Classifier, digits: tuple[ImageSet, ImageSet]) -> None:
    with pytest.raises(tp.DegenerateMasksError) as e:
        tp.fit_paths(tiny_model, *digits, epochs=4, batch_size=64, target_keep=0.01, sparsity=20.0, hard_epochs=0,
                     device="cpu", progress=False)
    kinds = {p.kind for p in e.value.problems}
    assert kinds == {"keeps-none", "subnet-accuracy"} and e.value.epochs == 8
    assert any(p.cls is not None and p.value < 0.95 for p in e.value.problems)
    assert "raise --target-keep (now 0.01)" in str(e.value)


def test_degenerate_masks_train_on_until_sound(tiny_model: Classifier, digits: tuple[ImageSet, ImageSet],
                                               tmp_path: Path) -> None:
    pm = tp.fit_paths(tiny_model, *digits, epochs=2, batch_size=64, max_epochs=8, device="cpu", progress=False)
    check = pm.metrics_["mask_check"]
    assert check["epochs_asked"] == 2 and check["epochs_run"] == 3 == len(pm.metrics_["history"])
    assert check["checks"][0]["problems"] and not check["checks"][-1]["problems"]
    assert check["checked_on"] == "digits/test" and pm.metrics_["subnet_accuracy_on_correct_min"] >= 0.95
    # stopped at the bound with a checkpoint: a rerun with a larger bound resumes there, same as one long run
    with pytest.raises(tp.DegenerateMasksError):
        tp.fit_paths(tiny_model, *digits, epochs=1, device="cpu", progress=False, checkpoint_dir=tmp_path)
    resumed = tp.fit_paths(tiny_model, *digits, epochs=1, max_epochs=12, device="cpu", progress=False,
                           checkpoint_dir=tmp_path)
    whole = tp.fit_paths(tiny_model, *digits, epochs=1, max_epochs=12, device="cpu", progress=False)
    assert resumed.metrics_["mask_check"]["checks"] == whole.metrics_["mask_check"]["checks"]
    assert all(torch.equal(whole.gates_[n], resumed.gates_[n]) for n in whole.layer_names_)
    with pytest.raises(ValueError, match="max_epochs"):
        tp.fit_paths(tiny_model, *digits, epochs=3, max_epochs=2, device="cpu", progress=False)


def test_nad_schedule_trains_every_class_on_until_sound(tiny_model: Classifier,
                                                        digits: tuple[ImageSet, ImageSet]) -> None:
    pm = tp.fit_paths_nad(tiny_model, *digits, epochs=1, lr=1.0, device="cpu", progress=False)
    assert pm.metrics_["mask_check"]["epochs_run"] == 2 and len(pm.metrics_["history"]) == 20
    assert [h["class"] for h in pm.metrics_["history"][10:]] == list(range(10))
    with pytest.raises(tp.DegenerateMasksError, match="after 2 epochs per class"):
        tp.fit_paths_nad(tiny_model, *digits, epochs=1, lr=0.1, device="cpu", progress=False)


def test_fit_paths_command_samples_and_refuses_degenerate_masks(tiny_model: Classifier, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nad_guard_cli import main

    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.net.state_dict().items()}, str(weights))
    base = ["fit-paths", "--model", "tiny_models:tiny_digits_cnn", "--weights", str(weights), "--data", "digits",
            "--device", "cpu"]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "p"), "--max-images", "300", "--epochs", "4",
                                    "--batch-size", "16"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["train_set"] == "digits/train[300]" and summary["train_images"] == 300 and summary["epochs_run"] == 4
    training = json.loads((tmp_path / "p" / "meta.json").read_text())["training"]
    assert training["train_images"] == 300 and training["train_set"] == "digits/train[300]"
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "bad"), "--epochs", "1"])
    assert res.exit_code == 1 and "keeps every channel for every class" in res.output and "--max-epochs" in res.output
    assert not (tmp_path / "bad").exists()
    assert "--max-images" in CliRunner().invoke(main, ["fit-paths", "--help"]).output
