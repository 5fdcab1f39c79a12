"""Your own model, end to end (issue 19, item 2): one way to name a model (``--model NAME |
package.module:function | path.pt2``) in every command, recorded once by fit-paths, so that later commands,
``Guard.load`` and the service need only the directory."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from nad_guard.guard import Guard, ModelRecordWarning, artifact_classifier, rebuild_classifier, save_classifier
from nad_guard.model_names import build_classifier, load_torchscript
from nad_guard.paths import ArtifactError, PathModel
from nad_guard_cli import main
from tiny_models import tiny_digits_cnn, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

# A classifier written outside the project, as a user writes one: its own module, its own architecture
# (not nad-guard's, not torchvision's), and a factory that loads its weights from beside the module.
OUTSIDE_MODULE = '''
"""An 8x8 digits CNN written outside nad-guard; `outside_digits:digits_net` names it."""
from pathlib import Path

import torch
from torch import nn

from nad_guard.models import InputSpec, from_module, load_state_dict_file

WEIGHTS = Path(__file__).with_name("outside_digits.safetensors")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(12, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.Conv2d(24, 24, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def digits_net():
    torch.manual_seed(0)
    net = Net()
    if WEIGHTS.is_file():
        net.load_state_dict(load_state_dict_file(WEIGHTS))
    return from_module(net, InputSpec(1, 8, 8, (0.3,), (0.4,), [str(i) for i in range(10)]), "outside-digits-net")


renamed = digits_net  # the same network under another name (a module refactored)
'''


@pytest.fixture
def outside(tmp_path, monkeypatch, digits):
    """The outside module's folder, on ``sys.path`` (as PYTHONPATH puts it), with trained weights."""
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "outside_digits.py").write_text(textwrap.dedent(OUTSIDE_MODULE))
    monkeypatch.syspath_prepend(str(ext))
    monkeypatch.delitem(sys.modules, "outside_digits", raising=False)
    import outside_digits

    model = train_tiny(outside_digits.digits_net(), digits[0], epochs=6)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(outside_digits.WEIGHTS))
    yield ext
    sys.modules.pop("outside_digits", None)


def _ok(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_factory_model_is_named_once_and_every_later_command_and_the_service_need_only_the_directory(
        outside, tmp_path, digits):
    from service.loader import GuardSource, load_guard

    art = tmp_path / "guard"
    runner = CliRunner()
    summary = _ok(runner.invoke(main, ["fit-paths", "--model", "outside_digits:digits_net", "--data", "digits",
                                       "--out", str(art), "--epochs", "2", "--batch-size", "32", "--device", "cpu"]))
    assert summary["model"] == "outside_digits:digits_net"
    ref = json.loads((art / "meta.json").read_text())["classifier"]
    assert ref["builder"] == "factory" and ref["factory"] == ref["model"] == "outside_digits:digits_net"
    assert (art / ref["file"]).is_file() and ref["spec"]["mean"] == [0.3]

    res = runner.invoke(main, ["fit-detector", "--artifact", str(art), "--data", "digits", "--suite", "fast",
                               "--attacks", "fgsm", "--device", "cpu", "--max-images", "5000"])
    info = _ok(res)  # no --model: the recorded one
    assert info["method"] == "logistic"
    # the attack detector's count is named for what it counts (not "no mispredictions found")
    assert "fit_mispredicted" not in info and info["fit_mispredicted_trained_as_suspicious"] >= 0
    if "error_detector" in info:
        assert info["fit_mispredicted_trained_as_suspicious"] == 0 and info["error_detector"]["fit_mispredicted"] > 0
    # more images than the test split holds: all of them, said on stderr and in the output
    assert "NOTE: --max-images 5000: the test split (digits/test) has 360 images; using all of them" in res.stderr
    assert info["heldout_images"] == {"max_images": 5000, "split_images": 360, "used": 360}
    assert "whole test split (360 images) is already used" in res.stderr and "--max-images" not in info[
        "calibration"]["warning"]  # the small calibration set's advice: no larger sample exists
    meta = json.loads((art / "meta.json").read_text())
    assert meta["classifier"]["factory"] == "outside_digits:digits_net" and meta["detector"]["method"] == "logistic"

    report = _ok(runner.invoke(main, ["audit", "--artifact", str(art), "--max-images", "60", "--device", "cpu",
                                      "--quiet", "--out", str(tmp_path / "report")]))
    assert report["images"] == 60 and (tmp_path / "report" / "index.html").is_file()

    guard = Guard.load(art)  # no classifier passed: the factory is imported, the stored weights loaded
    assert guard.classifier.source == {"builder": "factory", "factory": "outside_digits:digits_net"}
    x = digits[1].float(0, 16)
    served = load_guard(GuardSource("dir", str(art), art), env={})  # the service: NAD_GUARD_DIR alone
    assert served.predict(x) == guard.predict(x)

    # another name for the same network is used, with a warning (the weights fingerprint still decides)
    with pytest.warns(ModelRecordWarning, match="outside_digits:digits_net"):
        clf = artifact_classifier(art, "outside_digits:renamed")
    assert Guard.load(art, classifier=clf).predict(x) == guard.predict(x)
    res = runner.invoke(main, ["audit", "--artifact", str(art), "--model", "outside_digits:renamed",
                               "--max-images", "20", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r2")])
    assert res.exit_code == 0 and "WARNING: --model outside_digits:renamed is not the classifier" in res.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelRecordWarning)  # the recorded name: no warning
        artifact_classifier(art, "outside_digits:digits_net")
    with pytest.raises(ValueError, match="go with --model"):
        artifact_classifier(art, weights=art / "classifier.safetensors")

    # the module gone from the path: every way in says to put it on PYTHONPATH
    sys.path.remove(str(outside))
    sys.modules.pop("outside_digits")
    with pytest.raises(ArtifactError, match="outside_digits:digits_net.*PYTHONPATH"):
        Guard.load(art)
    res = runner.invoke(main, ["audit", "--artifact", str(art), "--out", str(tmp_path / "r3"), "--quiet"])
    assert res.exit_code == 1 and "PYTHONPATH" in res.output


def test_a_missing_module_says_pythonpath_and_an_unrecorded_artifact_asks_for_model(tmp_path, digits, tiny_model):
    runner = CliRunner()
    res = runner.invoke(main, ["fit-paths", "--model", "no_such_module_here:net", "--data", "digits",
                               "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert res.exit_code == 1 and "cannot import 'no_such_module_here'" in res.output and "PYTHONPATH" in res.output
    with pytest.raises(ValueError, match="PYTHONPATH"):
        build_classifier("no_such_module_here:net", class_names=digits[0].classes, input_size=8)
    res = runner.invoke(main, ["fit-paths", "--model", "mnist-cnn", "--mean", "0.5", "--std", "0.5",
                               "--data", "mnist5k", "--out", str(tmp_path / "a")])
    assert res.exit_code == 1 and "--mean/--std apply to torchvision models" in res.output
    res = runner.invoke(main, ["fit-paths", "--model", "resnet18", "--mean", "a,b", "--data", "digits",
                               "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "comma-separated numbers" in res.output

    # an artifact written before the record existed (PathModel.save alone): --model is needed, and said so
    from training.paths import fit_paths

    paths = fit_paths(tiny_model, digits[0], epochs=1, device="cpu", progress=False, check=False)  # masks are not the point here
    paths.save(tmp_path / "old")
    res = runner.invoke(main, ["fit-detector", "--artifact", str(tmp_path / "old"), "--data", "digits",
                               "--device", "cpu"])
    assert res.exit_code == 1 and "does not record its classifier" in res.output and "--model" in res.output
    res = runner.invoke(main, ["evaluate", "--artifact", str(tmp_path / "old"), "--data", "digits",
                               "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert res.exit_code == 1 and "does not record its classifier" in res.output
    # a classifier wrapped by hand is recorded as such and refused with what to do instead
    save_classifier(tmp_path / "old", tiny_model)
    with pytest.raises(ArtifactError, match="wrapped by hand.*package.module:function"):
        rebuild_classifier(tmp_path / "old")


def test_torchvision_normalisation_is_recorded_and_rebuilt(tmp_path):
    """--mean/--std (or the weights' own metadata) set a torchvision model's normalisation; the artifact
    records it, and later commands rebuild it without being told again."""
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    art = tmp_path / "art"
    summary = _ok(CliRunner().invoke(main, [
        "fit-paths", "--model", "resnet18", "--mean", "0.5,0.4,0.3", "--std", "0.2", "--data", "imagefolder",
        "--data-root", str(root), "--out", str(art), "--epochs", "1", "--device", "cpu",
        "--no-mask-check"]))  # random images: nothing to learn, and the masks are not the point here
    assert summary["model"] == "resnet18"
    ref = json.loads((art / "meta.json").read_text())["classifier"]
    assert ref["builder"] == "torchvision" and ref["spec"]["mean"] == [0.5, 0.4, 0.3] and ref["spec"]["std"] == [0.2] * 3
    clf = artifact_classifier(art)  # rebuilt from the record: architecture, normalisation, stored weights
    assert clf.spec.mean == (0.5, 0.4, 0.3) and clf.class_names == ["a", "b", "c"]
    PathModel.load(art, clf)  # the weights fingerprint matches
    PathModel.load(art, artifact_classifier(art, "resnet18"))  # the recorded model: its recorded mean/std

    # the weights' own metadata gives mean/std when --mean/--std are not given
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clf.net.state_dict().items()}, str(weights),
              metadata={"mean": "[0.1, 0.2, 0.3]", "std": "0.25,0.25,0.25"})
    own = build_classifier("resnet18", weights, class_names=["a", "b", "c"], input_size=16)
    assert own.spec.mean == (0.1, 0.2, 0.3) and own.spec.std == (0.25,) * 3
    given = build_classifier("resnet18", weights, class_names=["a", "b", "c"], input_size=16, mean="0.5", std="0.5")
    assert given.spec.mean == (0.5,) * 3
    plain = build_classifier("resnet18", class_names=["a", "b", "c"], input_size=16)
    assert plain.spec.mean == (0.485, 0.456, 0.406)  # ImageNet's, as before
    with pytest.raises(ValueError, match="together"):
        build_classifier("resnet18", class_names=["a"], input_size=16, mean="0.5")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # torch.export and torch.jit notes
def test_an_exported_program_is_copied_into_the_guard_and_its_gate_points_named(tmp_path, digits, tiny_model):
    m = tiny_digits_cnn()
    m.net.load_state_dict(tiny_model.net.state_dict())
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(m.net, (torch.rand(2, 1, 8, 8),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(pt2))
    args = ["fit-paths", "--model", str(pt2), "--mean", "0.3", "--std", "0.4", "--data", "digits",
            "--out", str(tmp_path / "art"), "--epochs", "2", "--batch-size", "32", "--device", "cpu"]
    runner = CliRunner()
    res = runner.invoke(main, args)
    assert res.exit_code == 1 and "tiny.pt2 is an exported program" in res.output
    assert "--layers 2,5,9 (its activation modules)" in res.output
    summary = _ok(runner.invoke(main, [*args, "--layers", "2,5,9"]))
    assert summary["model"] == "tiny.pt2"
    art = tmp_path / "art"
    ref = json.loads((art / "meta.json").read_text())["classifier"]
    assert ref["builder"] == "graph" and ref["format"] == "export" and ref["graph"] == "classifier_graph.pt2"
    assert (art / "classifier_graph.pt2").read_bytes() == pt2.read_bytes() and ref["spec"]["std"] == [0.4]
    pt2.unlink()  # the directory is self-contained
    _ok(runner.invoke(main, ["fit-detector", "--artifact", str(art), "--data", "digits", "--method", "knn",
                             "--encoding", "summary", "--device", "cpu"]))
    guard = Guard.load(art)
    assert guard.classifier.name == "export:tiny.pt2" and guard.paths.layer_names_ == ["2", "5", "9"]
    x = digits[1].float(0, 24)
    with torch.no_grad():
        assert torch.allclose(guard.classifier(x), tiny_model(x), atol=1e-5)
    assert json.loads((guard.save(tmp_path / "again") / "meta.json").read_text())["classifier"]["model"] == "tiny.pt2"
    (art / "classifier_graph.pt2").write_bytes(b"changed")
    with pytest.raises(ArtifactError, match="SHA-256"):
        Guard.load(art)

    # TorchScript runs as a classifier but cannot be hooked: fit-paths says so and what to use instead
    torch.jit.save(torch.jit.script(m.net), str(tmp_path / "tiny.ts"))
    assert load_torchscript(tmp_path / "tiny.ts", m.spec).source["format"] == "torchscript"
    res = runner.invoke(main, ["fit-paths", "--model", str(tmp_path / "tiny.ts"), "--data", "digits",
                               "--out", str(tmp_path / "ts"), "--device", "cpu"])
    assert res.exit_code == 1 and "TorchScript, whose modules cannot be hooked" in res.output and ".pt2" in res.output
