"""Classifier wrapper, reference weights and torchvision architectures."""

import json
import pickle

import pytest
import torch
from torch import nn

from nad_guard.data import load_dataset
from nad_guard.model_names import load_torchscript
from nad_guard.models import (WEIGHTS_DIR, Classifier, InputSpec, accuracy, from_module, load_reference,
                              load_state_dict_file, mnist_cnn, reference_record, resnet20, resolve_device,
                              torchvision_classifier)


def test_committed_mnist_weights_reach_stated_accuracy():
    model = load_reference("mnist-cnn")
    _, test = load_dataset("mnist5k")
    acc = accuracy(model, test)
    record = reference_record("mnist-cnn")
    assert acc >= 0.975
    assert acc == pytest.approx(record["test_accuracy"], abs=1e-9)
    assert record["test_images"] == len(test) == 1000


def test_committed_resnet20_weights_load_and_record_is_complete():
    # The target is 90% test accuracy; the committed weights reach what the record says
    # (87.45%, below target): the record is checked here, the accuracy itself needs CIFAR-10 (bench).
    record = reference_record("cifar10-resnet20")
    assert record["test_images"] == 10000 and 0.85 <= record["test_accuracy"] <= 1.0
    assert record["command"].startswith("nad-guard train-reference cifar10-resnet20")
    assert len(record["history"]) == record["recipe"]["epochs"]
    model = load_reference("cifar10-resnet20")
    assert model.class_names[0] == "airplane" and model.spec.shape == (3, 32, 32)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2", "densenet121"])
def test_torchvision_wrappers_give_logits(arch):
    torch.manual_seed(0)
    model = torchvision_classifier(arch, num_classes=7, input_size=32)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert not any(p.requires_grad for p in model.parameters())


def test_torchvision_user_weights_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    a = torchvision_classifier("resnet18", num_classes=3, input_size=32)
    save_file({k: v.contiguous() for k, v in a.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(a.net.state_dict(), tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32)
    for f in ("w.safetensors", "w.pt"):
        b = torchvision_classifier("resnet18", num_classes=3, input_size=32, weights=tmp_path / f)
        with torch.no_grad():
            assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="do not fit the architecture"):
        torchvision_classifier("resnet18", num_classes=5, weights=tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        torchvision_classifier("resnet_nope")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_loading_never_unpickles_arbitrary_objects(tmp_path):
    torch.save({"w": torch.zeros(1), "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_state_dict_file(tmp_path / "evil.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError):
        load_state_dict_file(tmp_path / "plain.pkl")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="safetensors"):
        load_state_dict_file(tmp_path / "broken.safetensors")
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.pt")


def test_wrapper_normalises_inside_and_stays_frozen():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    model = from_module(net, InputSpec(1, 2, 2, (0.5,), (0.25,), ["a", "b"]))
    x = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    assert torch.allclose(model(x), torch.tensor([[2.0, -2.0]]))  # (1-0.5)/0.25, (0-0.5)/0.25
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"expected shape \(N, 1, 2, 2\)"):
        model.check_input(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="mean/std"):
        InputSpec(3, 2, 2, (0.5,), (0.25,))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_wrapper(tmp_path):
    torch.manual_seed(0)
    m = mnist_cnn()
    torch.jit.save(torch.jit.script(m.net), str(tmp_path / "m.ts"))
    ts = load_torchscript(tmp_path / "m.ts", m.spec)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(ts(x), m(x), atol=1e-6)
    torch.export.save(torch.export.export(m.net, (torch.rand(2, 1, 28, 28),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},)), str(tmp_path / "m.pt2"))
    ex = load_torchscript(tmp_path / "m.pt2", m.spec)
    with torch.no_grad():
        assert torch.allclose(ex(x), m(x), atol=1e-5)
    (tmp_path / "bad.ts").write_bytes(b"nope")
    with pytest.raises(ValueError, match="TorchScript"):
        load_torchscript(tmp_path / "bad.ts", m.spec)


def test_resnet20_architecture():
    m = resnet20()
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(0.27e6, rel=0.02)
    assert len([b for b in m.net.modules() if type(b).__name__ == "BasicBlock"]) == 9


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_reference_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown reference model"):
        load_reference("lenet")
    with pytest.raises(FileNotFoundError, match="train-reference"):
        load_reference("mnist-cnn", weights=tmp_path / "none.safetensors")
    assert json.loads((WEIGHTS_DIR / "mnist-cnn.json").read_text())["model"] == "mnist-cnn"
